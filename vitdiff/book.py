"""Refresh the whole book in one command: train the book checkpoints, execute every notebook, report.

    python -m vitdiff.book run --budget full              # on a GPU: the target is <= 9 minutes in all
    python -m vitdiff.book run --budget quick             # on a CPU: the notebooks only (shipped checkpoints)
    python -m vitdiff.book run --budget full --dry-run    # what it would do, without doing it
    python -m vitdiff.book run --budget full --jobs 6     # six recipes / notebooks at a time (one GPU is enough)

Steps, in order: (a) train every book-checkpoint recipe (`vitdiff.pretrained`) and measure it, at the full
budget or with --checkpoints; (b) execute notebooks/NN_*.ipynb in order with the budget in VITDIFF_BUDGET,
writing each executed notebook back in place; (c) print a table of step times and each recipe's metrics.
A failing step is reported and the run goes on; the exit code is 1 if any step failed. The output is a
plain log (no progress bars), fit to be redirected to a file.

With --jobs N > 1 the recipes, then the notebooks, run N at a time, each in its own process (a recipe built
on a VAE or a teacher waits for it); the book's models are small, so one GPU serves several at once. Each step's output
goes to <data root>/book-logs/<step>.log, and a failing step's last lines are printed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from .budget import BUDGETS

TARGET_SECONDS = 540  # the whole full-budget run fits one 10-minute device command with room to spare
NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"


@dataclass
class Step:
    """One timed step of the run: a recipe's training or evaluation, or one notebook."""

    name: str
    seconds: float
    error: str | None = None  # the error's last line; None when the step succeeded


def _chapters(only: str | None) -> set[str] | None:
    """'4,05' -> {'04', '05'}; None means every chapter."""
    if only is None:
        return None
    return {part.strip().zfill(2) for part in only.split(",") if part.strip()}


def find_notebooks(folder: Path, chapters: set[str] | None = None) -> list[Path]:
    """The notebooks NN_*.ipynb of `folder` in chapter order, limited to `chapters` when given."""
    found = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb") if p.is_file())
    return [p for p in found if chapters is None or p.name[:2] in chapters]


def find_recipes(chapters: set[str] | None = None) -> list[str]:
    """The book-checkpoint recipes in RECIPES order (a VAE before the latent model built on it)."""
    from .pretrained import RECIPES

    return [name for name, r in RECIPES.items() if chapters is None or r.chapter in chapters]


def flatten(value: Any, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of nested dicts and short lists, keyed by dotted path ('fd.guidance_3': 12.5)."""
    if isinstance(value, bool):
        return {}
    if isinstance(value, (int, float)):
        return {prefix: value}
    items: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)) and len(value) <= 4:
        items = [(f"[{i}]", v) for i, v in enumerate(value)]
    out: dict[str, float] = {}
    for key, item in items:
        path = f"{prefix}{key}" if not prefix or key.startswith("[") else f"{prefix}.{key}"
        out.update(flatten(item, path))
    return out


def headline(metrics: dict[str, Any], limit: int = 12) -> str:
    """A recipe's sidecar metrics on one line: 'fd=12.3 accuracy=0.912 ...' (at most `limit` numbers)."""
    numbers = {k: v for k, v in flatten(metrics).items() if k != "eval_seconds"}
    if not numbers:
        return "no metrics in the sidecar (run `python -m vitdiff.pretrained evaluate NAME`)"
    shown = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(numbers.items())[:limit]]
    more = len(numbers) - limit
    return " ".join(shown) + (f" (+{more} more)" if more > 0 else "")


def _last_line(error: BaseException) -> str:
    """The last line of an error: for a failed cell, 'ValueError: ...' rather than the whole traceback."""
    ename, evalue = getattr(error, "ename", None), getattr(error, "evalue", None)
    if ename:
        return f"{ename}: {evalue}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def kernel_env(budget: str) -> dict[str, str]:
    """The notebooks' environment: this process's (OMP_NUM_THREADS and VITDIFF_DATA kept) plus the budget.

    VITDIFF_USE_SHIPPED=1 makes `pretrained.book_model` load the checkpoints this run has just trained (or
    the committed ones) instead of training each recipe a second time inside the notebook.
    """
    return {**os.environ, "VITDIFF_BUDGET": budget, "VITDIFF_USE_SHIPPED": "1"}


def run_notebook(path: Path, env: dict[str, str], timeout: float) -> None:
    """Execute `path` (kernel python3, cwd = its folder) and write it back in place; raise on failure.

    `timeout` bounds the whole notebook, not each cell. A failed notebook is not written back (the
    committed outputs stay); its partial outputs go to <data root>/book-failed/ for inspection.
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    deadline = time.monotonic() + timeout
    client = NotebookClient(nb, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
                            timeout_func=lambda cell: max(1, int(deadline - time.monotonic())))
    try:
        client.execute(env=env)
    except BaseException:
        from .data import data_root

        failed = data_root() / "book-failed" / path.name
        failed.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, failed)
        print(f"    partial outputs in {failed}", flush=True)
        raise
    nbformat.write(nb, path)


def _timed(steps: list[Step], name: str, action: Callable[[], Any]) -> bool:
    """Run `action` as the step `name`, print and record its time; report (not raise) an Exception."""
    print(f"-- {name} ...", flush=True)
    tic = time.perf_counter()
    error = None
    try:
        action()
    except Exception as exc:  # a failing step is reported and the run continues
        error = _last_line(exc)
    steps.append(Step(name, time.perf_counter() - tic, error))
    print(f"   {name}: {'FAILED: ' + error if error else 'ok'} ({steps[-1].seconds:.1f} s)", flush=True)
    return error is None


def _in_process(steps: list[Step], name: str, commands: list[list[str]], env: dict[str, str], log: Path,
                after: list[threading.Event], done: threading.Event, ok: dict[str, bool], needs: list[str]) -> None:
    """Run `commands` one after another in subprocesses as the step `name` (for --jobs > 1), output to `log`.

    Waits for the events of `after` first (the recipes this one is built on); `done` is set at the end and
    ok[name] says whether every command succeeded."""
    for event in after:
        event.wait()
    tic, error = time.perf_counter(), None
    failed_needs = [n for n in needs if not ok.get(n)]
    if failed_needs:
        error = f"not run: it needs {', '.join(failed_needs)}, which failed"
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            for command in commands:
                code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
                if code != 0:
                    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
                    error = (lines[-1].strip() if lines else f"exit code {code}") + f" (log: {log})"
                    break
    seconds = time.perf_counter() - tic
    steps.append(Step(name, seconds, error))  # list.append is atomic: safe from several threads
    ok[name] = error is None
    print(f"   {name}: {'FAILED: ' + error if error else 'ok'} ({seconds:.1f} s)", flush=True)
    done.set()


def _run_parallel(steps: list[Step], jobs: int, recipes: list[str], notebooks: list[Path], device: Any,
                  budget: str, timeout: float) -> None:
    """--jobs > 1: the recipes `jobs` at a time (each after the VAE it is built on), then the notebooks."""
    from .data import data_root
    from .pretrained import recipe

    logs = data_root() / "book-logs"
    child_env = {**kernel_env(budget), "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    python = [sys.executable, "-m"]
    events = {name: threading.Event() for name in recipes}
    ok: dict[str, bool] = {}
    for phase, items in (("recipes", recipes), ("notebooks", notebooks)):
        print(f"-- {phase}: {len(items)}, {jobs} at a time", flush=True)
        threads = []
        for item in items:
            if phase == "recipes":
                name = str(item)
                options = recipe(name).options  # a latent model needs its VAE, a distilled ViT its teacher
                needs = [n for n in (options.get("vae"), options.get("teacher")) if n in events]
                commands = [python + ["vitdiff.pretrained", command, name, "--device", str(device)]
                            for command in ("train", "evaluate")]
                args = (f"train+evaluate {name}", commands, child_env, logs / f"{name}.log",
                        [events[n] for n in needs], events[name], ok, [f"train+evaluate {n}" for n in needs])
            else:
                path = Path(item)
                commands = [python + ["vitdiff.book", "notebook", str(path), "--budget", budget,
                                      "--timeout", str(timeout)]]
                args = (path.name, commands, child_env, logs / f"{path.stem}.log", [], threading.Event(), ok, [])
            threads.append(threading.Thread(target=_in_process, args=(steps, *args), daemon=True))
        running: list[threading.Thread] = []
        for thread in threads:  # at most `jobs` at once, started in order (a VAE before the models built on it)
            while len([t for t in running if t.is_alive()]) >= jobs:
                time.sleep(0.1)
            thread.start()
            running.append(thread)
        for thread in running:
            thread.join()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vitdiff.book", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the book checkpoints, execute every notebook, print times and results")
    run.add_argument("--budget", required=True, choices=BUDGETS, help="quick (CPU, minutes) or full (GPU)")
    run.add_argument("--dry-run", action="store_true", help="list what would run, run nothing")
    run.add_argument("--only", metavar="NN,NN", help="only these chapters (notebooks and recipes), e.g. 04,05")
    which = run.add_mutually_exclusive_group()
    which.add_argument("--skip-checkpoints", action="store_true", help="do not train recipes (full budget)")
    which.add_argument("--checkpoints", action="store_true", help="train recipes at the quick budget too")
    run.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS", help="per notebook (600)")
    run.add_argument("--device", default=None, help="for the recipes (default: CUDA if available, else CPU)")
    run.add_argument("--jobs", type=int, default=1, metavar="N", help="recipes / notebooks at a time (1)")
    run.add_argument("--recipes", metavar="NAME,NAME", help="train exactly these recipes (candidates too)")
    one = sub.add_parser("notebook", help=argparse.SUPPRESS)  # one notebook, for --jobs > 1
    one.add_argument("path", type=Path)
    one.add_argument("--budget", required=True, choices=BUDGETS)
    one.add_argument("--timeout", type=float, default=600.0)
    run.add_argument("--notebook-dir", type=Path, default=NOTEBOOK_DIR, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (0 when every step succeeded)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    if args.command == "notebook":
        run_notebook(args.path, kernel_env(args.budget), args.timeout)
        return 0
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    chapters = _chapters(args.only)
    notebooks = find_notebooks(args.notebook_dir, chapters)
    train = not args.skip_checkpoints if args.budget == "full" else args.checkpoints
    recipes = find_recipes(chapters)
    if args.recipes is not None:
        from .pretrained import recipe

        recipes = [name.strip() for name in args.recipes.split(",") if name.strip()]
        for name in recipes:
            try:
                recipe(name)
            except ValueError as error:
                parser.error(str(error))
        train = True
    if chapters is not None and not notebooks and not recipes:
        parser.error(f"--only {args.only} matches no notebook in {args.notebook_dir} and no recipe")

    import torch

    from . import pretrained
    from .budget import get_device

    device = get_device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else pretrained._cpu_name()
    env = kernel_env(args.budget)
    print(f"book run: budget={args.budget} device={device} ({device_name}) torch={torch.__version__}")
    print(f"  env: VITDIFF_BUDGET={env['VITDIFF_BUDGET']} OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', '(unset)')} "
          f"VITDIFF_DATA={env.get('VITDIFF_DATA', '(unset: data/)')}")
    if train:
        print(f"  (a) train and evaluate {len(recipes)} recipes -> {pretrained.paths('NAME')[0].parent}/:")
        for name in recipes:
            r = pretrained.recipe(name)
            print(f"      {name:14s} ch{r.chapter} {r.model:9s} {r.train['steps']:5d} steps x batch "
                  f"{r.train['batch_size']}")
    else:
        why = "--skip-checkpoints" if args.budget == "full" else "quick budget; --checkpoints trains them"
        print(f"  (a) recipes: not trained ({why}); the shipped checkpoints are used")
    print(f"  (b) execute {len(notebooks)} notebooks in {args.notebook_dir} (timeout {args.timeout:.0f} s each), "
          "written back in place:")
    for path in notebooks:
        print(f"      {path.name}")
    if args.budget == "full" and device.type != "cuda":
        print("  note: the full budget on a CPU takes hours; it is meant for a CUDA GPU")
    if args.dry_run:
        print("dry run: nothing was run")
        return 0

    steps: list[Step] = []
    start = time.perf_counter()
    if args.jobs > 1:
        _run_parallel(steps, args.jobs, recipes if train else [], notebooks, device, args.budget, args.timeout)
    elif train:
        for name in recipes:
            if _timed(steps, f"train {name}", partial(pretrained.train_recipe, name, device=device, progress=False)):
                _timed(steps, f"evaluate {name}", partial(pretrained.evaluate_recipe, name, device=device,
                                                          progress=False))
    if args.jobs == 1:
        for path in notebooks:
            _timed(steps, path.name, partial(run_notebook, path, env, args.timeout))
    total = time.perf_counter() - start

    print(f"\n{'step':40s} {'seconds':>8s}  result")
    for step in steps:
        print(f"{step.name:40s} {step.seconds:8.1f}  {'FAILED: ' + step.error if step.error else 'ok'}")
    print(f"{'total' + (f' (wall, {args.jobs} at a time)' if args.jobs > 1 else ''):40s} {total:8.1f}")
    print("\nheadline results (sidecar metrics):")
    for name in recipes:
        try:
            line = headline(pretrained.info(name).get("metrics", {}))
        except Exception as exc:  # a missing sidecar is reported, not fatal
            line = f"unavailable: {_last_line(exc)}"
        print(f"  {name:14s} {line}")
    if args.budget == "full":
        verdict = "within" if total <= TARGET_SECONDS else "OVER"
        print(f"\ntotal {total:.0f} s vs the {TARGET_SECONDS} s (9 min) target: {verdict}")
    else:
        print(f"\ntotal {total:.0f} s (the {TARGET_SECONDS} s target applies to the full budget)")
    failed = [step for step in steps if step.error]
    for step in failed:
        print(f"FAILED {step.name}: {step.error}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
