"""Checkpoints: round trip, optimizer state, atomic replace, clear errors for corrupt or mismatched files."""

import json

import pytest
import torch
from torch import nn

from vitdiff.checkpoint import CheckpointError, load_checkpoint, load_model, read_config, save_checkpoint
from vitdiff.vit import ViT

CONFIG = dict(img_size=16, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2)


def _vit(seed=0):
    torch.manual_seed(seed)
    return ViT(**CONFIG)


def test_round_trip_weights_config_and_optimizer(tmp_path):
    model = _vit(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1, 16, 16)).sum().backward()
    opt.step()
    rng_state = torch.get_rng_state()
    save_checkpoint(tmp_path / "ck", model, step=7, optimizer=opt, extra={"note": "hi"}, rng={"cpu": rng_state})

    other = _vit(1)
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-3)
    meta = load_checkpoint(tmp_path / "ck", other, optimizer=opt2)
    assert meta["step"] == 7 and meta["extra"] == {"note": "hi"} and meta["model_config"]["embed_dim"] == 16
    assert torch.equal(meta["rng"]["cpu"], rng_state)
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)

    rebuilt = load_model(tmp_path / "ck", ViT)
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(rebuilt.eval()(x), model.eval()(x))


def test_save_replaces_atomically(tmp_path):
    path = tmp_path / "ck"
    save_checkpoint(path, _vit(0), step=1)
    save_checkpoint(path, _vit(1), step=2)
    assert read_config(path)["step"] == 2
    assert not (tmp_path / "ck.tmp").exists() and not (tmp_path / "ck.old").exists()


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path / "nothing", _vit())


def test_corrupt_weights(tmp_path):
    save_checkpoint(tmp_path / "ck", _vit())
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "ck", _vit())


def test_corrupt_config(tmp_path):
    save_checkpoint(tmp_path / "ck", _vit())
    (tmp_path / "ck" / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "ck", _vit())
    (tmp_path / "ck" / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(tmp_path / "ck", _vit())


def test_mismatched_model(tmp_path):
    save_checkpoint(tmp_path / "ck", _vit())
    wider = ViT(**{**CONFIG, "embed_dim": 32})
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_checkpoint(tmp_path / "ck", wider)
    with pytest.raises(CheckpointError, match="holds a ViT"):
        load_checkpoint(tmp_path / "ck", nn.Linear(2, 2))


def test_corrupt_optimizer_state(tmp_path):
    model = _vit()
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path / "ck", model, optimizer=opt)
    (tmp_path / "ck" / "trainer.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="trainer state"):
        load_checkpoint(tmp_path / "ck", _vit(), optimizer=torch.optim.AdamW(model.parameters()))


def test_optimizer_requested_but_not_saved(tmp_path):
    save_checkpoint(tmp_path / "ck", _vit())
    model = _vit()
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(tmp_path / "ck", model, optimizer=torch.optim.AdamW(model.parameters()))


def test_load_model_checks_class_before_building(tmp_path):
    from vitdiff.unet import UNet

    save_checkpoint(tmp_path / "ck", _vit())
    with pytest.raises(CheckpointError, match="holds a ViT, not a UNet"):
        load_model(tmp_path / "ck", UNet)


def test_interrupted_replace_falls_back_to_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "ck", _vit(), step=3)
    (tmp_path / "ck").rename(tmp_path / "ck.old")  # a crash between the two renames of a replace
    assert read_config(tmp_path / "ck")["step"] == 3


def test_load_model_uses_ema_weights(tmp_path):
    model, ema = _vit(0), _vit(1)
    save_checkpoint(tmp_path / "ck", model, ema=ema)
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(load_model(tmp_path / "ck", ViT, use_ema=True).eval()(x), ema.eval()(x))
