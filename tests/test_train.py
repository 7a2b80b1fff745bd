"""Stage 1 on tiny settings: checkpoints, resume, --init, user errors.

``model.train.train`` runs in this process with the arguments ANN_train.py makes of its flags
(``train_in_process``); the command line itself is tested by one real run of the script and by
its error cases, all run through the script's flags and ``run`` wrapper by one process
(``tests/cli_cases.py``)."""
import os
import shutil

import pytest
import torch

from conftest import TINY_RUN_STEPS, copy_run
from model.build import build_unet
from model.checkpoint import load_checkpoint, model_config
from tests.helpers import (TINY_TRAIN, assert_one_line_error, run_cli_cases, run_script, train_in_process,
                           train_tiny_in_process as train_tiny)


def test_train_writes_a_complete_checkpoint(tiny_run):
    assert TINY_RUN_STEPS == 3
    ckpt = load_checkpoint(str(tiny_run / "ckpt.pt"))
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
    assert os.path.isdir(tiny_run / "sample") and list(tiny_run.glob("events.out.tfevents*"))
    assert not [p for p in os.listdir(tiny_run) if p.endswith(".tmp")]


def test_resume_continues_from_the_saved_step(tmp_path, capsys):
    train_tiny(tmp_path, 2)
    first = load_checkpoint(str(tmp_path / "ckpt.pt"))
    capsys.readouterr()
    train_tiny(tmp_path, 4)
    out = capsys.readouterr()
    assert "resuming" in out.out + out.err
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["step"] == 4
    assert ckpt["sched"]["last_epoch"] == 4  # the warm-up schedule went on, not restarted
    assert all(s["step"] == 4 for s in ckpt["optim"]["state"].values())
    assert torch.equal(ckpt["x_T"], first["x_T"])  # the same sample noise across the restart
    train_tiny(tmp_path, 4)
    assert "nothing to do" in capsys.readouterr().out


def test_resume_with_only_logdir_and_total_steps_equals_an_uninterrupted_run(tmp_path, capsys):
    """The model, the data, the image size and the training settings come from ckpt.pt; every
    random draw of a step is a function of (seed, step), so 3 + 3 steps end where 6 steps end."""
    dropout = [a for a in TINY_TRAIN if not a.startswith("--dropout")] + ["--dropout=0.1"]
    train_in_process(*dropout, f"--logdir={tmp_path / 'whole'}", "--total_steps=6", "--save_step=6")
    train_in_process(*dropout, f"--logdir={tmp_path / 'split'}", "--total_steps=3", "--save_step=3")
    capsys.readouterr()
    train_in_process(f"--logdir={tmp_path / 'split'}", "--total_steps=6", "--num_workers=0")
    out = capsys.readouterr().out
    assert "resuming" in out and "note:" not in out
    whole, split = (load_checkpoint(str(tmp_path / name / "ckpt.pt")) for name in ("whole", "split"))
    assert split["step"] == whole["step"] == 6 and split["config"] == whole["config"]
    for key in ("net_model", "ema_model"):
        for name, value in whole[key].items():
            assert torch.equal(split[key][name], value), (key, name)


def test_a_changed_learning_rate_on_resume_is_applied_and_said(tmp_path, capsys):
    train_tiny(tmp_path, 2, "--warmup=0")
    capsys.readouterr()
    train_in_process(f"--logdir={tmp_path}", "--total_steps=3", "--lr=0.5", "--num_workers=0")
    assert "--lr=0.5 (the checkpoint had 0.0002)" in capsys.readouterr().out
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
    # and through the training function: the run starts from those weights
    train_tiny(tmp_path / "q", 1, "--bit=2", f"--init={fp / 'ckpt.pt'}")


# the command line: every case below runs through ANN_train.py's flags and run() in one process

NO_NETWORK = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}


def cli_cases(root, tiny_run):
    """{name: (argv, fragments of the one error line)} on the folders prepared under ``root``."""
    copy_run(tiny_run, root, "a")
    copy_run(tiny_run, root, "truncated")
    (root / "truncated" / "ckpt.pt").write_bytes(b"PK\x03\x04 not a whole file")
    tiny = TINY_TRAIN
    return {
        # a resumed run with a contradicting architecture flag
        "contradicting --ch": ([*tiny, "--ch=64", f"--logdir={root / 'a'}", "--total_steps=2"], ["--ch=64", "ch=32"]),
        # --init from a checkpoint of another shape
        "--init of another shape": ([*tiny, "--ch=64", f"--logdir={root / 'b'}", "--total_steps=1",
                                     f"--init={root / 'a' / 'ckpt.pt'}"], ["--init"]),
        # attention on a quantized model, a missing --init file
        "attention": ([*tiny, "--attn=0", f"--logdir={root / 'c'}"], ["attention"]),
        "missing --init": ([*tiny, f"--init={root / 'none.pt'}", f"--logdir={root / 'd'}"], ["none.pt"]),
        # a truncated ckpt.pt on resume, an absent CIFAR-10 folder (offline)
        "truncated ckpt.pt": ([*tiny, f"--logdir={root / 'truncated'}", "--total_steps=2"], ["ckpt.pt"]),
        "absent CIFAR-10": ([*tiny, "--dataset=cifar10", f"--data_dir={root / 'nodata'}", f"--logdir={root / 'e'}"],
                            ["nodata", "cifar-10-batches-py"]),
        # an infinite learning rate spoils the weights in the first update: no checkpoint may hold them
        "non-finite, new run": ([*tiny, f"--logdir={root / 'inf'}", "--total_steps=20", "--save_step=1", "--lr=inf",
                                 "--warmup=0"], ["became", "at step 1", "no checkpoint was written"]),
        # after a good checkpoint, the message says it is kept
        "non-finite, resumed": ([f"--logdir={root / 'good'}", "--total_steps=4", "--lr=inf", "--save_step=1"],
                                ["at step 3", "ckpt.pt is kept"]),
        # flags refused while parsing
        "missing flagfile": (["--flagfile=missing.txt"], ["missing.txt"]),
        "unknown flag": (["--no_such_flag=1"], ["no_such_flag"]),
        "bit=9": (["--bit=9"], ["--bit"]),
        "ch=48": (["--ch=48"], ["--ch"]),
    }


@pytest.fixture(scope="module")
def command_line(tmp_path_factory, tiny_run):
    """(folder, {case name: (its CompletedProcess, fragments)}, ckpt.pt of 'good' before its case)."""
    root = tmp_path_factory.mktemp("cli")
    cases = cli_cases(root, tiny_run)
    train_tiny(root / "good", 2)
    before = (root / "good" / "ckpt.pt").read_bytes()
    procs = run_cli_cases("ANN_train.py", [{"argv": argv} for argv, _ in cases.values()], env=NO_NETWORK)
    return root, {name: (proc, fragments) for (name, (_, fragments)), proc in zip(cases.items(), procs)}, before


USER_ERRORS = ["contradicting --ch", "--init of another shape", "attention", "missing --init", "truncated ckpt.pt",
               "absent CIFAR-10"]


def one_line_error(procs, name):
    proc, fragments = procs[name]
    assert_one_line_error(proc, *fragments)
    return proc


def test_user_errors_are_one_line(command_line):
    _, procs, _ = command_line
    for name in USER_ERRORS:
        one_line_error(procs, name)


def test_non_finite_training_stops_before_saving(command_line):
    root, procs, before = command_line
    one_line_error(procs, "non-finite, new run")
    assert not (root / "inf" / "ckpt.pt").exists()
    one_line_error(procs, "non-finite, resumed")
    assert (root / "good" / "ckpt.pt").read_bytes() == before


def test_bad_flags_are_one_line(command_line):
    _, procs, _ = command_line
    for name in ("missing flagfile", "unknown flag", "bit=9", "ch=48"):
        assert one_line_error(procs, name).returncode == 2  # refused while parsing, before any work


def test_a_new_run_removes_the_temporaries_a_killed_one_left(tmp_path):
    """A write cut short by kill -9 leaves ``.ckpt.pt.<host>-<pid>.<random>.tmp``: the next start
    removes those of dead processes of this machine, and nothing else. This run is the real
    command line, end to end."""
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
    proc = run_script("ANN_train.py", *TINY_TRAIN, f"--logdir={tmp_path}", "--total_steps=1", "--save_step=1")
    assert not [p for p in stale if p.exists()] and all(p.exists() for p in kept)
    assert socket.gethostname()
    # what the command line wrote: its checkpoint, its summary line and its flags
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 1
    assert '"step": 1' in proc.stdout
    assert "--total_steps=1" in (tmp_path / "flagfile.txt").read_text().splitlines()


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
