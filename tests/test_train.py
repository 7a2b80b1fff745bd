"""ANN_train.py end to end on tiny settings: checkpoints, resume, --init, user errors."""
import os
import shutil

import pytest
import torch

from common.checkpoint import load_checkpoint
from common.models import build_unet
from tests.helpers import TINY_TRAIN, assert_one_line_error, run_script, train_tiny


def test_train_writes_a_complete_checkpoint(tmp_path):
    train_tiny(tmp_path, 3)
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert {"net_model", "ema_model", "optim", "sched", "step", "x_T", "flags"} <= set(ckpt)
    assert ckpt["step"] == 3
    assert ckpt["flags"]["bit"] == 2 and ckpt["flags"]["ch_mult"] == [1] and ckpt["flags"]["img_size"] == 16
    model = build_unet(ckpt["flags"])
    model.load_state_dict(ckpt["ema_model"])  # strict: the stored flags rebuild the model
    assert ckpt["net_model"].keys() == ckpt["ema_model"].keys()
    # EMA (decay 0.9) lags the online weights
    key = "head.weight"
    assert not torch.equal(ckpt["net_model"][key], ckpt["ema_model"][key])
    assert os.path.isdir(tmp_path / "sample") and list(tmp_path.glob("events.out.tfevents*"))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_resume_continues_from_the_saved_step(tmp_path):
    train_tiny(tmp_path, 2)
    first = load_checkpoint(str(tmp_path / "ckpt.pt"))
    proc = train_tiny(tmp_path, 4)
    assert "resuming" in proc.stdout + proc.stderr
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["step"] == 4
    assert ckpt["sched"]["last_epoch"] == 4  # the warm-up schedule went on, not restarted
    assert all(s["step"] == 4 for s in ckpt["optim"]["state"].values())
    assert torch.equal(ckpt["x_T"], first["x_T"])  # the same sample noise across the restart
    again = train_tiny(tmp_path, 4)
    assert "nothing to do" in again.stdout


def test_init_from_full_precision(tmp_path):
    fp = tmp_path / "fp"
    train_tiny(fp, 2, "--bit=32")
    q = tmp_path / "q"
    train_tiny(q, 1, "--bit=2", f"--init={fp / 'ckpt.pt'}", "--lr=0")
    source = load_checkpoint(str(fp / "ckpt.pt"))["ema_model"]
    target = load_checkpoint(str(q / "ckpt.pt"))["net_model"]
    alphas = [k for k in target if k.endswith("act_alpha")]
    assert alphas and all(k not in source for k in alphas)
    assert all(target[k].item() == 6.0 for k in alphas)  # initialised, untouched with lr 0
    assert all(torch.equal(source[k], target[k]) for k in source)


def test_user_errors_are_one_line(tmp_path):
    train_tiny(tmp_path / "a", 1)
    # a resumed run with a contradicting architecture flag
    proc = run_script("ANN_train.py", *TINY_TRAIN, "--ch=64", f"--logdir={tmp_path / 'a'}", "--total_steps=2",
                      check=False)
    assert_one_line_error(proc, "--ch=64", "ch=32")
    # --init from a checkpoint of another shape
    proc = run_script("ANN_train.py", *TINY_TRAIN, "--ch=64", f"--logdir={tmp_path / 'b'}", "--total_steps=1",
                      f"--init={tmp_path / 'a' / 'ckpt.pt'}", check=False)
    assert_one_line_error(proc, "--init")
    # attention on a quantized model, a missing --init file, bad CIFAR-10 folder
    proc = run_script("ANN_train.py", *TINY_TRAIN, "--attn=0", f"--logdir={tmp_path / 'c'}", check=False)
    assert_one_line_error(proc, "attention")
    proc = run_script("ANN_train.py", *TINY_TRAIN, f"--init={tmp_path / 'none.pt'}",
                      f"--logdir={tmp_path / 'd'}", check=False)
    assert_one_line_error(proc, "none.pt")
    # a truncated ckpt.pt on resume, an absent CIFAR-10 folder (offline)
    (tmp_path / "a" / "ckpt.pt").write_bytes(b"PK\x03\x04 not a whole file")
    proc = run_script("ANN_train.py", *TINY_TRAIN, f"--logdir={tmp_path / 'a'}", "--total_steps=2", check=False)
    assert_one_line_error(proc, "ckpt.pt")
    proc = run_script("ANN_train.py", *TINY_TRAIN, "--dataset=cifar10", f"--data_dir={tmp_path / 'nodata'}",
                      f"--logdir={tmp_path / 'e'}", check=False,
                      env={"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"})
    assert_one_line_error(proc, "nodata", "cifar-10-batches-py")


def test_non_finite_training_stops_before_saving(tmp_path):
    # an infinite learning rate spoils the weights in the first update: no checkpoint may hold them
    proc = run_script("ANN_train.py", *TINY_TRAIN, f"--logdir={tmp_path / 'inf'}", "--total_steps=20",
                      "--save_step=1", "--lr=inf", "--warmup=0", check=False)
    assert_one_line_error(proc, "became", "at step 1")
    assert not (tmp_path / "inf" / "ckpt.pt").exists()


def test_bad_flags_are_one_line():
    for args, fragment in [(["--flagfile=missing.txt"], "missing.txt"), (["--no_such_flag=1"], "no_such_flag"),
                           (["--bit=9"], "--bit"), (["--ch=48"], "--ch")]:
        assert_one_line_error(run_script("ANN_train.py", *args, check=False), fragment)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_kernels_train_the_same_model(tmp_path):
    """--kernels=compile fuses the quantizers' forward and backward: the same training run, up to
    the order of the act_alpha gradient's sum."""
    models = {}
    for kernels in ("reference", "compile"):
        train_tiny(str(tmp_path / kernels), 2, f"--kernels={kernels}")
        models[kernels] = load_checkpoint(str(tmp_path / kernels / "ckpt.pt"))["net_model"]
    for name, value in models["reference"].items():
        torch.testing.assert_close(models["compile"][name], value, rtol=1e-4, atol=1e-6, msg=name)
