"""Atomic checkpoint writes and clear errors for bad files."""
import json
import os
import stat

import pytest
import torch

from common import checkpoint
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
