"""vitdiff.train.train under torchrun: 2 CPU processes with gloo train exactly like one process on the
whole batch (same losses, same weights on both ranks), and resume exactly at the same number of processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable")

SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    from torch import nn
    from vitdiff.train import TrainConfig, train

    out, steps = sys.argv[1], int(sys.argv[2])
    ckpt = sys.argv[3] if len(sys.argv) > 3 else None
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x @ torch.randn(4, 1) + 0.1 * torch.randn(64, 1)  # the same data on every rank
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    config = TrainConfig(steps=steps, batch_size=16, lr=0.05, warmup_steps=2, ema_decay=0.9, seed=3,
                         checkpoint_dir=ckpt, checkpoint_every=0)
    result = train(model, lambda m, batch: ((m(batch[0]) - batch[1]) ** 2).mean(), (x, y), config,
                   device="cpu", progress=False)
    rank = int(os.environ.get("RANK", "0"))
    flat = lambda module: torch.cat([p.detach().flatten() for p in module.parameters()]).tolist()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"loss": result.history.loss, "weights": flat(model), "ema": flat(result.ema),
                   "examples": result.history.examples, "world": int(os.environ.get("WORLD_SIZE", "1"))}, f)
''')


def _run(tmp_path, name: str, steps: int, processes: int, ckpt: str | None = None) -> list[dict]:
    out = tmp_path / name
    out.mkdir(exist_ok=True)
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, str(script), str(out), str(steps), *([ckpt] if ckpt else [])], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


def test_two_processes_train_like_one_on_the_whole_batch_and_resume_exactly(tmp_path):
    (single,) = _run(tmp_path, "single", 6, 1)
    rank0, rank1 = _run(tmp_path, "ddp", 6, 2)
    assert rank0["world"] == 2
    assert rank0["weights"] == rank1["weights"] and rank0["ema"] == rank1["ema"], "the ranks hold identical weights"
    assert rank0["loss"] == rank1["loss"], "every rank logs the mean loss of the global batch"
    torch.testing.assert_close(torch.tensor(rank0["loss"]), torch.tensor(single["loss"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(rank0["weights"]), torch.tensor(single["weights"]), rtol=1e-5, atol=1e-6)
    assert rank0["examples"] == single["examples"] == 6 * 16
    assert abs(single["loss"][-1] - single["loss"][0]) > 1e-3, "the run trains (a test that could not fail otherwise)"

    ckpt = str(tmp_path / "ckpt")
    _run(tmp_path, "first_half", 3, 2, ckpt)
    resumed0, resumed1 = _run(tmp_path, "resumed", 6, 2, ckpt)
    assert resumed0["weights"] == resumed1["weights"]
    torch.testing.assert_close(torch.tensor(resumed0["weights"]), torch.tensor(rank0["weights"]), rtol=0, atol=1e-7)
    assert resumed0["loss"] == pytest.approx(rank0["loss"], abs=1e-7)
