"""Atomic checkpoint writes and clear errors for bad files."""
import json
import os
import stat

import pytest
import torch

from model import checkpoint
from common.atomic import atomic_open, write_json
from common.errors import UserError


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_atomic({"ema_model": {"w": torch.ones(3)}, "flags": {}}, path)

    def crash(obj, f, *a, **kw):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({"ema_model": {"w": torch.zeros(3)}, "flags": {}}, path)
    monkeypatch.undo()
    assert torch.equal(checkpoint.load_checkpoint(path)["ema_model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_bad_files_name_the_path(tmp_path):
    with pytest.raises(UserError, match="missing.pt"):
        checkpoint.load_checkpoint(str(tmp_path / "missing.pt"))
    good = tmp_path / "good.pt"
    checkpoint.save_atomic({"ema_model": {"w": torch.ones(1000)}, "flags": {}}, str(good))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:500])
    with pytest.raises(UserError, match="truncated.pt"):
        checkpoint.load_checkpoint(str(truncated))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(UserError, match="not a checkpoint of this project"):
        checkpoint.load_checkpoint(str(foreign))


def test_atomic_files_get_the_usual_mode_and_failures_leave_no_trace(tmp_path):
    """A report written atomically is as readable as one written by open() (not mkstemp's 0600),
    and an error inside the block keeps the old content and leaves no temporary file."""
    path = tmp_path / "sub" / "report.json"
    write_json({"a": 1}, path)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask
    with pytest.raises(ZeroDivisionError):
        with atomic_open(path, "w") as f:
            f.write("half")
            1 / 0
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(path.parent) == ["report.json"]


OLD_FLAGS = {"ch": 32, "ch_mult": [1], "attn": [], "num_res_blocks": 1, "dropout": 0.0, "bit": 2, "wbit": 32,
             "T": 20, "beta_1": 1e-4, "beta_T": 0.02, "mean_type": "epsilon", "var_type": "fixedlarge",
             "img_size": 8, "dataset": "shapes", "lr": 0.002, "batch_size": 32, "seed": 0}


def test_checkpoints_of_the_first_format_still_load(tmp_path):
    """Before the configs, checkpoints held a flat ``flags`` dict and SNN weights under 'ema_model'
    with 'signed' and 'T' beside them: both still load, as what they were."""
    from common.configs import ModelConfig, UNetConfig
    from model.build import build_unet
    from snn.convert import convert
    from snn.io import load_model
    ann = build_unet(checkpoint.model_config(checkpoint._upgrade({"flags": dict(OLD_FLAGS)})))
    checkpoint.save_atomic({"net_model": ann.state_dict(), "ema_model": ann.state_dict(), "step": 7,
                            "flags": dict(OLD_FLAGS)}, str(tmp_path / "ckpt.pt"))
    snn = convert(ann, "signed")
    checkpoint.save_atomic({"ema_model": snn.state_dict(), "flags": dict(OLD_FLAGS), "bit": 2, "T": 3,
                            "signed": True}, str(tmp_path / "converted_snn.pt"))
    old_ann = load_model(str(tmp_path / "ckpt.pt"))
    assert old_ann.kind == "ann" and old_ann.config == ModelConfig.from_dict(old_ann.ckpt["config"])
    assert old_ann.config.unet == UNetConfig(ch=32, ch_mult=(1,), attn=(), num_res_blocks=1, dropout=0.0, bit=2)
    assert old_ann.config.unet.img_channels == 3 and old_ann.model.head.in_channels == 3
    assert old_ann.config.diffusion.T == 20 and old_ann.config.data.img_size == 8
    assert old_ann.ckpt["config"]["train"]["lr"] == 0.002
    old_snn = load_model(str(tmp_path / "converted_snn.pt"))
    assert old_snn.kind == "snn" and old_snn.snn.neuron == "signed" and old_snn.snn.norm == "step"
    assert old_snn.ckpt["time_steps"] == 3 and old_snn.model.time_steps == 3
    state = old_snn.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in snn.state_dict().items())


def test_file_digest_is_the_sha256_of_the_bytes(tmp_path):
    import hashlib
    path = tmp_path / "f.bin"
    path.write_bytes(b"spikes" * 300000)
    assert checkpoint.file_digest(str(path)) == hashlib.sha256(b"spikes" * 300000).hexdigest()
    assert checkpoint.file_digest(str(path), 10) == checkpoint.file_digest(str(path))[:10]


def test_checkpoints_from_before_img_channels_load_as_rgb_models(tmp_path):
    """A checkpoint whose ``unet`` config has no ``img_channels`` (every one written before it existed)
    is a 3-channel model: its weights load strictly and it maps [B, 3, H, W] to [B, 3, H, W]; a
    1-channel one stores its setting and is rebuilt with it."""
    from common.configs import DataConfig, DiffusionConfig, ModelConfig, UNetConfig
    from model.build import build_unet
    from snn.io import load_model
    rgb = ModelConfig(UNetConfig(ch=32, ch_mult=(1,), num_res_blocks=1, num_groups=8), DiffusionConfig(T=20),
                      DataConfig("cifar10", 8))
    ann = build_unet(rgb)
    config = rgb.to_dict()
    del config["unet"]["img_channels"]
    checkpoint.save_atomic({"net_model": ann.state_dict(), "ema_model": ann.state_dict(), "config": config},
                           str(tmp_path / "old.pt"))
    old = load_model(str(tmp_path / "old.pt"))
    assert old.config == rgb and old.config.unet.img_channels == 3
    with torch.no_grad():
        x = torch.randn(2, 3, 8, 8)
        assert old.model(x, torch.zeros(2, dtype=torch.long)).shape == (2, 3, 8, 8)
    gray = ModelConfig(UNetConfig(ch=32, ch_mult=(1,), num_res_blocks=1, num_groups=8, img_channels=1),
                       DiffusionConfig(T=20), DataConfig("mnist", 8))
    ann = build_unet(gray)
    checkpoint.save_atomic({"net_model": ann.state_dict(), "ema_model": ann.state_dict(), "config": gray.to_dict()},
                           str(tmp_path / "gray.pt"))
    loaded = load_model(str(tmp_path / "gray.pt"))
    assert loaded.config.unet.img_channels == 1 and loaded.config.image_shape == (1, 8, 8)
    assert loaded.model.head.weight.shape == (32, 1, 3, 3) and loaded.model.tail[-1].weight.shape == (1, 32, 3, 3)
