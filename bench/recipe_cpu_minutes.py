"""How long each book-checkpoint recipe takes to train on one CPU core: seconds per step x the recipe's steps.

Every recipe is sized in steps so that it trains in at most 20 minutes on one core of a 2-core laptop-class
CPU (30 for chapters 09-10); a GPU trains the same recipe in seconds. This script checks the budget without
training a recipe to the end: `vitdiff.pretrained.cpu_seconds_per_step` times a few real optimisation steps
(the recipe's model, loss, batch size, AdamW) after a warm-up, on one thread. Data loading and EMA add a
few percent. Run it on an otherwise idle machine.

    python bench/recipe_cpu_minutes.py                 # every recipe and candidate
    python bench/recipe_cpu_minutes.py shapes_text fmnist_vit --steps 10
"""

from __future__ import annotations

import argparse

from vitdiff import pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="recipes (default: every recipe and candidate)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per recipe (5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (2)")
    args = parser.parse_args()
    names = args.names or [*pretrained.RECIPES, *pretrained.CANDIDATES]
    print(f"{'recipe':24s} {'steps':>6s} {'s/step':>7s} {'CPU min':>8s}  (one thread)")
    for name in names:
        r = pretrained.recipe(name)
        dt = pretrained.cpu_seconds_per_step(name, args.steps, args.warmup)
        minutes = dt * r.train["steps"] / 60
        limit = 30 if r.chapter in ("09", "10") else 20
        print(f"{name:24s} {r.train['steps']:6d} {dt:7.3f} {minutes:8.1f}  {'ok' if minutes <= limit else 'OVER'} "
              f"(limit {limit})", flush=True)


if __name__ == "__main__":
    main()
