"""The training loop: LR schedule, deterministic batches, EMA, exact resume, interruption, errors."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitdiff.train import TrainConfig, lr_factor, tensor_batches, train, update_ema


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long()
    return x, y


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def _loss(model, batch):
    x, y = batch
    # noise drawn from the global RNG: exact resume must restore it
    return F.cross_entropy(model(x + 0.05 * torch.randn_like(x)), y)


def test_lr_factor_warmup_then_cosine():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)
    values = [lr_factor(s, 100, 10) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_tensor_batches_cover_each_epoch_once_and_repeat():
    x = torch.arange(20)
    batch = tensor_batches((x,), batch_size=5, seed=3)
    epoch0 = torch.cat([batch(s)[0] for s in range(4)])
    assert sorted(epoch0.tolist()) == list(range(20))  # without replacement
    epoch1 = torch.cat([batch(s)[0] for s in range(4, 8)])
    assert not torch.equal(epoch0, epoch1)  # reshuffled
    again = tensor_batches((x,), batch_size=5, seed=3)
    assert torch.equal(again(6)[0], batch(6)[0])  # depends only on (seed, step)
    with pytest.raises(ValueError, match="first dimension"):
        tensor_batches((x, torch.arange(3)), 5, 0)


def test_training_reduces_loss_and_records_history():
    x, y = _data()
    result = train(_model(), _loss, (x, y), TrainConfig(steps=60, batch_size=32, lr=3e-2), progress=False,
                   eval_fn=lambda m: {"accuracy": (m(x).argmax(1) == y).float().mean()})
    h = result.history
    assert len(h.loss) == len(h.lr) == 60 and h.step == list(range(60))
    assert sum(h.loss[-10:]) / 10 < 0.5 * sum(h.loss[:10]) / 10
    assert h.evals[-1]["step"] == 60 and h.evals[-1]["accuracy"] > 0.9
    assert h.examples == 60 * 32 and h.examples_per_second > 0


def test_same_seed_same_losses_and_ema_lags():
    x, y = _data()
    cfg = TrainConfig(steps=15, batch_size=16, ema_decay=0.9)
    a = train(_model(), _loss, (x, y), cfg, progress=False)
    b = train(_model(), _loss, (x, y), cfg, progress=False)
    assert a.history.loss == b.history.loss
    assert a.best_model is a.ema
    diff = sum((p - q).abs().sum() for p, q in zip(a.ema.parameters(), a.model.parameters()))
    assert diff > 0


def test_update_ema_formula():
    ema, model = nn.Linear(2, 2), nn.Linear(2, 2)
    expected = [0.75 * e.detach() + 0.25 * p.detach() for e, p in zip(ema.parameters(), model.parameters())]
    update_ema(ema, model, 0.75)
    for e, want in zip(ema.parameters(), expected):
        assert torch.allclose(e, want)


def test_exact_resume_matches_uninterrupted(tmp_path):
    x, y = _data()
    cfg = TrainConfig(steps=24, batch_size=16, warmup_steps=4, ema_decay=0.8)
    straight = train(_model(), _loss, (x, y), cfg, progress=False)

    calls = {"n": 0}

    def interrupted_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 11:  # Ctrl-C during step 10
            raise KeyboardInterrupt
        return _loss(model, batch)

    ckpt = dataclasses.replace(cfg, checkpoint_dir=str(tmp_path / "run"))
    first = train(_model(), interrupted_loss, (x, y), ckpt, progress=False)
    assert first.interrupted and len(first.history.loss) == 10
    resumed = train(_model(), _loss, (x, y), ckpt, progress=False)
    assert not resumed.interrupted
    assert resumed.history.loss == straight.history.loss  # bit-for-bit the same trajectory
    for p, q in zip(resumed.ema.state_dict().values(), straight.ema.state_dict().values()):
        assert torch.equal(p, q)
    # a finished run resumed again does nothing more
    again = train(_model(), _loss, (x, y), ckpt, progress=False)
    assert again.history.loss == straight.history.loss


@pytest.mark.parametrize("where", ["after_noise_draw", "in_next_batch"])
def test_exact_resume_whatever_point_ctrl_c_hits(tmp_path, where):
    x, y = _data()
    cfg = TrainConfig(steps=16, batch_size=16, warmup_steps=3)
    straight = train(_model(), _loss, (x, y), cfg, progress=False)
    calls = {"loss": 0, "data": 0}
    base = tensor_batches((x, y), cfg.batch_size, cfg.seed)

    def loss_then_interrupt(model, batch):
        calls["loss"] += 1
        value = _loss(model, batch)  # draws noise from the global RNG first
        if where == "after_noise_draw" and calls["loss"] == 7:
            raise KeyboardInterrupt
        return value

    def batches(step):
        calls["data"] += 1
        if where == "in_next_batch" and calls["data"] == 7:  # after step 5's update, before step 6 starts
            raise KeyboardInterrupt
        return base(step)

    ckpt = dataclasses.replace(cfg, checkpoint_dir=str(tmp_path / "run"))
    first = train(_model(), loss_then_interrupt, batches, ckpt, progress=False)
    assert first.interrupted and first.history.step == list(range(6))
    resumed = train(_model(), _loss, base, ckpt, progress=False)
    assert resumed.history.loss == straight.history.loss


def test_history_lr_is_the_lr_each_step_used():
    x, y = _data()
    cfg = TrainConfig(steps=12, batch_size=16, lr=1e-3, warmup_steps=4, min_lr_ratio=0.1)
    h = train(_model(), _loss, (x, y), cfg, progress=False).history
    expected = [1e-3 * lr_factor(s, 12, 4, 0.1) for s in range(12)]
    assert h.lr == pytest.approx(expected)


def test_crash_resumes_from_last_periodic_checkpoint(tmp_path):
    x, y = _data()
    cfg = TrainConfig(steps=20, batch_size=16, checkpoint_every=5, checkpoint_dir=str(tmp_path / "ck"))
    straight = train(_model(), _loss, (x, y), dataclasses.replace(cfg, checkpoint_dir=None), progress=False)
    calls = {"n": 0}

    def crashing_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 13:  # a crash (not Ctrl-C) during step 12: nothing is saved then
            raise RuntimeError("power cut")
        return _loss(model, batch)

    with pytest.raises(RuntimeError, match="power cut"):
        train(_model(), crashing_loss, (x, y), cfg, progress=False)
    from vitdiff.checkpoint import read_config
    assert read_config(tmp_path / "ck")["step"] == 10
    resumed = train(_model(), _loss, (x, y), cfg, progress=False)
    assert resumed.history.loss == straight.history.loss


def test_parameters_subset_freezes_the_rest():
    x, y = _data()
    model = _model()
    frozen = model[0].weight.detach().clone()
    train(model, _loss, (x, y), TrainConfig(steps=5, batch_size=16), parameters=list(model[2].parameters()),
          progress=False)
    assert torch.equal(model[0].weight, frozen)


def test_callable_data_and_nonfinite_loss():
    def batches(step):
        return _data(16, seed=step)

    result = train(_model(), _loss, batches, TrainConfig(steps=3, batch_size=16), progress=False)
    assert len(result.history.loss) == 3
    with pytest.raises(FloatingPointError, match="step 0"):
        train(_model(), lambda m, b: m(b[0]).sum() * math.inf, batches, TrainConfig(steps=2), progress=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps"), (dict(steps=5, batch_size=0), "batch_size"), (dict(steps=5, lr=0), "lr"),
    (dict(steps=5, warmup_steps=6), "warmup_steps"), (dict(steps=5, ema_decay=1.0), "ema_decay"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_train_rejects_non_config():
    with pytest.raises(TypeError, match="TrainConfig"):
        train(_model(), _loss, _data(), {"steps": 3})


# ----------------------------------------------------------------------------- resuming with a changed config


def _counting_eval(calls):
    def eval_fn(model):
        calls.append(1)
        return {"calls": float(len(calls))}
    return eval_fn


def test_rerunning_a_finished_run_returns_at_once_without_a_second_evaluation(tmp_path):
    x, y = _data()
    cfg = TrainConfig(steps=10, batch_size=16, checkpoint_dir=str(tmp_path / "run"))
    calls = []
    first = train(_model(), _loss, (x, y), cfg, eval_fn=_counting_eval(calls), progress=False)
    again = train(_model(), _loss, (x, y), cfg, eval_fn=_counting_eval(calls), progress=False)
    assert len(calls) == 1 and again.history.evals == first.history.evals == [{"step": 10, "calls": 1.0}]
    assert again.history.loss == first.history.loss and not again.interrupted and not again.model.training
    for p, q in zip(again.model.parameters(), first.model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("interrupt_at", [None, 6])  # extend a finished run, or one stopped by Ctrl-C
def test_extending_steps_on_resume_replans_the_lr_schedule(tmp_path, interrupt_at):
    x, y = _data()
    cfg = TrainConfig(steps=10, batch_size=16, lr=1e-2, warmup_steps=2, min_lr_ratio=0.1,
                      checkpoint_dir=str(tmp_path / "run"))
    calls = {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        if calls["n"] == interrupt_at:
            raise KeyboardInterrupt
        return _loss(model, batch)

    first = train(_model(), loss, (x, y), cfg, progress=False)
    done = len(first.history.loss)
    assert done == (10 if interrupt_at is None else interrupt_at - 1)
    longer = dataclasses.replace(cfg, steps=20)
    evals = []
    resumed = train(_model(), _loss, (x, y), longer, eval_fn=_counting_eval(evals), progress=False)
    h = resumed.history
    assert h.step == list(range(20)) and len(evals) == 1 and h.evals[-1]["step"] == 20
    assert h.lr[:done] == pytest.approx([1e-2 * lr_factor(s, 10, 2, 0.1) for s in range(done)])
    # from the resumed step on, the LR is the one a fresh 20-step run would use at that step (never 0)
    assert h.lr[done:] == pytest.approx([1e-2 * lr_factor(s, 20, 2, 0.1) for s in range(done, 20)])
    assert min(h.lr[done:]) >= 1e-3 * (1 - 1e-6)


@pytest.mark.parametrize("change", [dict(batch_size=32), dict(lr=2e-3), dict(warmup_steps=3), dict(seed=1),
                                    dict(min_lr_ratio=0.5), dict(ema_decay=0.9), dict(grad_clip=None),
                                    dict(betas=(0.8, 0.99)), dict(weight_decay=0.0)])
def test_resume_refuses_a_changed_recipe(tmp_path, change):
    x, y = _data()
    cfg = TrainConfig(steps=8, batch_size=16, lr=1e-3, checkpoint_dir=str(tmp_path / "run"))
    train(_model(), _loss, (x, y), cfg, progress=False)
    (name,) = change
    with pytest.raises(ValueError, match=f"another recipe.*differing fields: {name}: checkpoint "):
        train(_model(), _loss, (x, y), dataclasses.replace(cfg, **change), progress=False)


def test_resume_error_lists_every_differing_field_and_allows_bookkeeping_changes(tmp_path):
    x, y = _data()
    cfg = TrainConfig(steps=8, batch_size=16, checkpoint_dir=str(tmp_path / "run"))
    straight = train(_model(), _loss, (x, y), dataclasses.replace(cfg, checkpoint_dir=None), progress=False)
    calls = {"n": 0}

    def interrupted_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return _loss(model, batch)

    assert train(_model(), interrupted_loss, (x, y), cfg, progress=False).interrupted
    with pytest.raises(ValueError, match="batch_size: checkpoint 16, now 8; lr: checkpoint 0.001, now 1.0"):
        train(_model(), _loss, (x, y), dataclasses.replace(cfg, batch_size=8, lr=1.0), progress=False)
    # eval_every, checkpoint_every, amp and channels_last may change: the trajectory stays exact
    relaxed = dataclasses.replace(cfg, eval_every=3, checkpoint_every=5, amp=False, channels_last=True)
    resumed = train(_model(), _loss, (x, y), relaxed, eval_fn=lambda m: {"x": 0.0}, progress=False)
    assert resumed.history.loss == straight.history.loss
    assert [e["step"] for e in resumed.history.evals] == [6, 8]


def test_resume_refuses_fewer_steps_than_already_trained(tmp_path):
    x, y = _data()
    cfg = TrainConfig(steps=8, batch_size=16, checkpoint_dir=str(tmp_path / "run"))
    train(_model(), _loss, (x, y), cfg, progress=False)
    with pytest.raises(ValueError, match="steps=5 is below the 8 steps"):
        train(_model(), _loss, (x, y), dataclasses.replace(cfg, steps=5), progress=False)
