"""ANN_train.py end to end on tiny settings: checkpoints, resume, --init, user errors."""
import os
import shutil

import pytest
import torch

from model.checkpoint import load_checkpoint, model_config
from model.build import build_unet
from tests.helpers import TINY_TRAIN, assert_one_line_error, run_script, train_tiny


def test_train_writes_a_complete_checkpoint(tmp_path):
    train_tiny(tmp_path, 3)
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert {"net_model", "ema_model", "optim", "sched", "step", "x_T", "config"} <= set(ckpt)
    assert ckpt["step"] == 3
    config = ckpt["config"]
    assert config["unet"]["bit"] == 2 and config["unet"]["ch_mult"] == [1] and config["data"]["img_size"] == 16
    assert config["data"]["dataset"] == "shapes" and config["diffusion"]["T"] == 100
    assert config["train"]["batch_size"] == 4 and config["train"]["total_steps"] == 3
    model = build_unet(model_config(ckpt))
    model.load_state_dict(ckpt["ema_model"])  # strict: the stored configuration rebuilds the model
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


def test_resume_with_only_logdir_and_total_steps_equals_an_uninterrupted_run(tmp_path):
    """The model, the data, the image size and the training settings come from ckpt.pt; every
    random draw of a step is a function of (seed, step), so 3 + 3 steps end where 6 steps end."""
    dropout = [a for a in TINY_TRAIN if not a.startswith("--dropout")] + ["--dropout=0.1"]
    run_script("ANN_train.py", *dropout, f"--logdir={tmp_path / 'whole'}", "--total_steps=6", "--save_step=6")
    run_script("ANN_train.py", *dropout, f"--logdir={tmp_path / 'split'}", "--total_steps=3", "--save_step=3")
    proc = run_script("ANN_train.py", f"--logdir={tmp_path / 'split'}", "--total_steps=6", "--num_workers=0")
    assert "resuming" in proc.stdout and "note:" not in proc.stdout
    whole, split = (load_checkpoint(str(tmp_path / name / "ckpt.pt")) for name in ("whole", "split"))
    assert split["step"] == whole["step"] == 6 and split["config"] == whole["config"]
    for key in ("net_model", "ema_model"):
        for name, value in whole[key].items():
            assert torch.equal(split[key][name], value), (key, name)


def test_a_changed_learning_rate_on_resume_is_applied_and_said(tmp_path):
    train_tiny(tmp_path, 2, "--warmup=0")
    proc = run_script("ANN_train.py", f"--logdir={tmp_path}", "--total_steps=3", "--lr=0.5", "--num_workers=0")
    assert "--lr=0.5 (the checkpoint had 0.0002)" in proc.stdout
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["config"]["train"]["lr"] == 0.5
    assert [g["lr"] for g in ckpt["optim"]["param_groups"]] == [0.5]  # what ran is what is recorded


def test_init_from_full_precision(tmp_path):
    from common.configs import UNetConfig
    from model.build import load_init
    fp = tmp_path / "fp"
    train_tiny(fp, 2, "--bit=32")
    source = load_checkpoint(str(fp / "ckpt.pt"))
    cfg = model_config(source)
    quantized = build_unet(type(cfg)(UNetConfig(**{**cfg.unet.__dict__, "bit": 2}), cfg.diffusion, cfg.data))
    initialised = load_init(quantized, str(fp / "ckpt.pt"))
    target = quantized.state_dict()
    alphas = [k for k in target if k.endswith("act_alpha")]
    assert alphas and sorted(initialised) == sorted(alphas) and all(k not in source["ema_model"] for k in alphas)
    assert all(target[k].item() == 6.0 for k in alphas)  # the initial threshold
    assert all(torch.equal(value, target[k]) for k, value in source["ema_model"].items())
    # and through the command line: the run starts from those weights
    train_tiny(tmp_path / "q", 1, "--bit=2", f"--init={fp / 'ckpt.pt'}")


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
    assert_one_line_error(proc, "became", "at step 1", "no checkpoint was written")
    assert not (tmp_path / "inf" / "ckpt.pt").exists()
    # after a good checkpoint, the message says it is kept, and it is
    train_tiny(tmp_path / "good", 2)
    before = (tmp_path / "good" / "ckpt.pt").read_bytes()
    proc = run_script("ANN_train.py", f"--logdir={tmp_path / 'good'}", "--total_steps=4", "--lr=inf",
                      "--save_step=1", check=False)
    assert_one_line_error(proc, "at step 3", "ckpt.pt is kept")
    assert (tmp_path / "good" / "ckpt.pt").read_bytes() == before


def test_a_new_run_removes_the_temporaries_a_killed_one_left(tmp_path):
    """A write cut short by kill -9 leaves ``.ckpt.pt.<host>-<pid>.<random>.tmp``: the next start
    removes those of dead processes of this machine, and nothing else."""
    import socket
    import subprocess
    from common import atomic
    host = atomic._HOST
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "sample").mkdir()
    stale = [tmp_path / f".ckpt.pt.{host}-{dead.pid}.abcd1234.tmp", tmp_path / "sample" / f".4.png.{host}-{dead.pid}.x1y2z3w4.tmp"]
    kept = [tmp_path / f".ckpt.pt.{host}-{os.getpid()}.live0000.tmp", tmp_path / f".ckpt.pt.otherhost-{dead.pid}.zzzz0000.tmp",
            tmp_path / "notes.tmp"]
    for path in stale + kept:
        path.write_bytes(b"partial")
    train_tiny(tmp_path, 1)
    assert not [p for p in stale if p.exists()] and all(p.exists() for p in kept)
    assert socket.gethostname()


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
