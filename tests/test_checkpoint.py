"""Atomic checkpoint writes and clear errors for bad files."""
import pytest
import torch

from common import checkpoint
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
