"""What a user who shares checkpoints, fills a disk or starts a run twice can count on.

* Every file the project reads is loaded as data: a file whose unpickling would run code is
  refused without running it (the command-line cases are in ``test_user_errors.py``).
* A write that fails (no space left, a read-only or vanished folder) is one line saying what could
  not be written, the previous file is intact and no temporary file is left.
* One run writes into a folder at a time; a lock left by a killed run is taken over.

Write faults and two training runs on one folder go through the command line as a user's would:
faults are injected by ``tests/fault_run.py`` (several faults of one script in one process through
``tests/cli_cases.py``, each a command line of its own). The run the tests share and the locks of
stages 2 to 4 are the scripts' library calls in this process.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from model import checkpoint
from common.errors import UserError
from common.lock import LOCK_NAME, folder_lock
from helpers import (ROOT, TINY_TRAIN, assert_one_line_error, run_cases_two_at_a_time, run_script, stage_in_process,
                     train_tiny_in_process)
from metrics import scores, shards
from metrics.report import append_jsonl

TINY_EVAL = ["--sampler=ddim", "--sample_steps=2", "--num_images=8", "--batch_size=4", "--fid=skip",
             "--probe_images=2"]


class ShellCommand:
    """Unpickled, it runs ``touch path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def temporaries(folder):
    return [os.path.join(base, n) for base, _, names in os.walk(folder) for n in names if n.endswith(".tmp")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run folder with a 2-step tiny checkpoint, its converted SNN and one evaluation (made in this process)."""
    logdir = tmp_path_factory.mktemp("run")
    train_tiny_in_process(logdir, 2)
    stage_in_process("SNN_conversion.py", f"--logdir={logdir}", "--sample_size=2", "--val_size=4", "--sampler=ddim",
                     "--sample_steps=2", "--num_workers=0")
    stage_in_process("evaluate.py", f"--eval_model_path={logdir}/converted_snn.pt", f"--logdir={logdir}", *TINY_EVAL)
    return logdir


# -- loading as data --------------------------------------------------------------------------

def test_loading_runs_nothing_a_file_carries(tmp_path):
    """A checkpoint, a shard, a statistics file and a shapes-network cache holding a payload are
    refused (the first two with one line, the cache is retrained) and the payload never runs."""
    from metrics import shapes_net
    marker = tmp_path / "ran"
    payload = ShellCommand(marker)
    torch.save({"config": {}, "ema_model": {}, "x": payload}, tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match="not a checkpoint of this project.*nothing in it was executed"):
        checkpoint.load_checkpoint(str(tmp_path / "ckpt.pt"))
    torch.save({"setup": payload}, tmp_path / "net.pt")
    assert shapes_net._read_cached(str(tmp_path / "net.pt"), shapes_net.training_setup(16))[0] is None
    np.savez(tmp_path / "shard.npz", images=np.array([payload], dtype=object))
    assert shards.load_shard(str(tmp_path / "shard.npz"), 1) is None
    np.savez(tmp_path / "stats.npz", mu=np.array([payload], dtype=object), sigma=np.eye(1))
    with pytest.raises(UserError, match="stats.npz"):
        scores.load_stats(str(tmp_path / "stats.npz"))
    assert not marker.exists()


def test_a_foreign_or_partial_checkpoint_names_what_is_missing(tmp_path, trained):
    ckpt = torch.load(trained / "ckpt.pt", weights_only=True)
    cases = {
        "state_dict.pt": ({"state_dict": ckpt["ema_model"]}, "not a checkpoint of this project"),
        "no_unet.pt": ({**ckpt, "config": {k: v for k, v in ckpt["config"].items() if k != "unet"}},
                       "no 'unet' section"),
        "no_weights.pt": ({"config": ckpt["config"]}, "no 'ema_model' entry"),
        "bad_weights.pt": ({**ckpt, "ema_model": {"w": "not a tensor"}}, "not a dict of weight tensors"),
        "bad_type.pt": ({**ckpt, "config": {**ckpt["config"], "unet": {**ckpt["config"]["unet"], "ch": "32"}}},
                        "UNetConfig.ch must be int"),
        "snn_no_steps.pt": ({"model": ckpt["ema_model"], "config": {**ckpt["config"], "snn": {"neuron": "if"}}},
                            "no 'time_steps' entry"),
    }
    for name, (content, words) in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(UserError) as err:
            checkpoint.load_checkpoint(str(tmp_path / name))
        assert name in str(err.value) and words in str(err.value), (name, str(err.value))


def test_checkpoints_of_every_earlier_format_load_as_data(tmp_path, trained):
    """Today's files and the first format's (flat ``flags``; SNN weights under 'ema_model'; a
    backpack with 'settings') load with ``weights_only=True``, as what they were."""
    for name in ("ckpt.pt", "converted_snn.pt"):
        assert checkpoint.load_checkpoint(str(trained / name))["config"]["unet"]["bit"] == 2
    ann = torch.load(trained / "ckpt.pt", weights_only=True)
    flat = {**ann["config"]["unet"], **ann["config"]["diffusion"], **ann["config"]["data"], "lr": 0.5}
    old = {"ema_model": ann["ema_model"], "flags": flat, "bit": 2, "T": 3, "signed": False,
           "finetune": {"next_block": 3, "records": [], "val_error": 0.2, "converted_error": 0.3,
                        "settings": {"lr": 1e-4, "ft_steps": 5, "batch_size": 4, "grad_clip": 1.0, "val_size": 8,
                                     "seed": 0, "signed": False, "source_sha256": "abc"}}}
    torch.save(old, tmp_path / "block_02_old.pt")
    backpack = checkpoint.load_checkpoint(str(tmp_path / "block_02_old.pt"))
    assert checkpoint.snn_config(backpack).neuron == "if" and backpack["time_steps"] == 3
    assert backpack["finetune"]["config"]["ft_steps"] == 5 and backpack["finetune"]["source_sha256"] == "abc"
    assert torch.equal(backpack["model"]["head.weight"], ann["ema_model"]["head.weight"])


# -- faults while writing ---------------------------------------------------------------------

# (fault, name, nth, script, arguments, words of the error line); {copy}: a copy of the shared run,
# {new}: a folder that does not exist yet
FAULTS = {
    "full disk, second checkpoint": (
        "enospc", "ckpt.pt", 2, "ANN_train.py", [*TINY_TRAIN, "--logdir={new}", "--total_steps=2", "--save_step=1"],
        ["could not write {new}/ckpt.pt", "No space left on device", "the previous version there is intact"]),
    "read-only, checkpoint": (
        "erofs", "ckpt.pt", 1, "ANN_train.py", [*TINY_TRAIN, "--logdir={new}", "--total_steps=1"],
        ["{new}/ckpt.pt", "Read-only file system", "nothing was written there"]),
    "vanished, checkpoint": (
        "vanish", "ckpt.pt", 2, "ANN_train.py", [*TINY_TRAIN, "--logdir={new}", "--total_steps=2", "--save_step=1"],
        ["{new}/ckpt.pt", "no longer exists"]),
    "full disk, sample grid": (
        "enospc", "png", 1, "ANN_train.py", [*TINY_TRAIN, "--logdir={new}", "--total_steps=1", "--sample_step=1",
                                             "--sample_size=2", "--sampler=ddim", "--sample_steps=2"],
        ["{new}/sample/1.png", "No space left"]),
    "full disk, backpack": (
        "enospc", "block_", 2, "SNN_ft.py", ["--logdir={copy}", "--ft_steps=1", "--batch_size=2", "--val_size=4",
                                             "--sample_size=0", "--num_workers=0", "--neuron=if", "--norm=step"],
        ["model_backpacks/block_01_head.pt", "nothing was written there"]),
    "full disk, conversion record": (
        "enospc", "conversion.json", 1, "SNN_conversion.py", ["--logdir={copy}", "--sample_size=2", "--val_size=4",
                                                              "--sampler=ddim", "--sample_steps=2"],
        ["{copy}/conversion.json", "the previous version there is intact"]),
    "full disk, shard": (
        "enospc", "shard_", 1, "evaluate.py", ["--eval_model_path={copy}/ckpt.pt", "--logdir={copy}", *TINY_EVAL],
        ["shard_00000.npz", "nothing was written there"]),
    "full disk, evaluation record": (
        "enospc", "snn_eval.txt", 1, "evaluate.py", ["--eval_model_path={copy}/converted_snn.pt",
                                                     "--logdir={copy}", *TINY_EVAL],
        ["{copy}/snn_eval.txt", "the previous version there is intact"]),
    "full disk, statistics": (
        "enospc", "stats.npz", 1, "compute_fid_stats.py", ["--dataset=shapes", "--num_images=2", "--batch_size=2",
                                                           "--features=inception", "--out={new}/stats.npz"],
        ["{new}/stats.npz", "nothing was written there"]),
}


@pytest.fixture(scope="module")
def faults(trained, inception_home, tmp_path_factory):
    """{case of FAULTS: (the process as CompletedProcess, words, copy, new, the records of copy
    before)}: the cases of one script run in one process (tests/cli_cases.py), each a command line
    under its fault, two scripts at a time."""
    base = tmp_path_factory.mktemp("faults")
    by_script, made = {}, {}
    for i, (case, (fault, name, nth, script, args, words)) in enumerate(FAULTS.items()):
        copy, new = base / f"copy{i}", base / f"new{i}"
        shutil.copytree(trained, copy)
        before = {p: p.read_bytes() for p in (copy / "conversion.json", copy / "snn_eval.txt")}
        fill = {"copy": copy, "new": new}
        by_script.setdefault(script, {})[case] = {"argv": [a.format(**fill) for a in args], "fault": [fault, name, nth]}
        made[case] = ([w.format(**fill) for w in words], copy, new, before)
    results = run_cases_two_at_a_time(by_script, base, env={"TORCH_HOME": inception_home})
    assert results.keys() == made.keys()
    return {case: (subprocess.CompletedProcess([case], results[case]["code"], "", results[case]["stderr"]), *made[case])
            for case in FAULTS}


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_previous(faults):
    proc, words, _, logdir, _ = faults["full disk, second checkpoint"]
    assert_one_line_error(proc, *words)
    assert checkpoint.load_checkpoint(str(logdir / "ckpt.pt"))["step"] == 1
    assert not temporaries(logdir) and not (logdir / LOCK_NAME).exists()


@pytest.mark.parametrize("case", [case for case in FAULTS if case != "full disk, second checkpoint"])
def test_every_kind_of_output_fails_in_one_line(faults, case):
    """Backpacks, shards, images, JSON records and statistics under a full disk, a read-only
    folder or a vanished one: one line naming the file, nothing half written left behind, the
    earlier records intact."""
    proc, words, copy, new, before = faults[case]
    assert_one_line_error(proc, *words)
    assert not temporaries(copy) and not temporaries(new)
    for path, content in before.items():
        assert path.read_bytes() == content


def _mount_tmpfs(folder, size):
    folder.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    return proc.returncode == 0


def test_a_real_full_disk_through_the_command_line(tmp_path):
    """The demo model on a 30 MB file system: its first checkpoint (17 MB) fits, the second does not."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "30m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        logdir = disk / "run"
        proc = run_script("ANN_train.py", "--flagfile=config/train_ANN/demo.txt", f"--logdir={logdir}",
                          "--total_steps=2", "--save_step=1", "--sample_step=0", "--kernels=reference", check=False)
        assert_one_line_error(proc, f"could not write {logdir}/ckpt.pt", "No space left on device",
                              "the previous version there is intact")
        assert checkpoint.load_checkpoint(str(logdir / "ckpt.pt"))["step"] == 1
        assert not temporaries(logdir)
    finally:
        subprocess.run(["umount", str(disk)])


# -- one run per folder -----------------------------------------------------------------------

def wait_for_lock(folder, proc, timeout=120):
    """The holder record once ``proc`` holds ``folder``'s lock."""
    path = os.path.join(folder, LOCK_NAME)
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if os.path.exists(path) and os.path.getsize(path) > 0:
            return json.loads(open(path).read())
        time.sleep(0.2)
    raise AssertionError(f"{proc.args} did not take {path}")


def test_two_training_runs_on_one_logdir_and_a_killed_one(tmp_path, capsys):
    """The second run through the command line, refused in one line; after a kill -9 of the
    first, a third run (in this process) takes the lock over."""
    logdir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "ANN_train.py", *TINY_TRAIN, f"--logdir={logdir}",
                              "--total_steps=100000", "--save_step=100000"], cwd=ROOT, env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        holder = wait_for_lock(logdir, first)
        assert holder["pid"] == first.pid and "ANN_train.py" in holder["command"]
        second = run_script("ANN_train.py", *TINY_TRAIN, f"--logdir={logdir}", "--total_steps=2", check=False)
        assert_one_line_error(second, f"{logdir} is in use by process {first.pid} on {holder['host']}",
                              f"started {holder['started']}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert os.path.getsize(logdir / LOCK_NAME) > 0  # a killed run cannot clean up
    capsys.readouterr()
    train_tiny_in_process(logdir, 2)
    third = capsys.readouterr().out
    assert f"was left by process {first.pid}" in third and "taking it over" in third
    assert checkpoint.load_checkpoint(str(logdir / "ckpt.pt"))["step"] == 2
    assert not (logdir / LOCK_NAME).exists()


def test_each_stage_locks_the_folder_it_writes_and_reading_stays_possible(tmp_path, trained, capsys):
    """While another process holds the run folder, conversion (which writes there) is refused and
    evaluation (which writes its own shard folder) works; while that shard folder is held, a
    finished evaluation is scored again from its shards, and a new one is refused. The stages run
    in this process (a ``flock`` taken through a second open file conflicts here too); two
    training runs on one folder through the command line are the test above."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom common.lock import folder_lock\n"
                               f"with folder_lock({str(trained)!r}):\n    print('held', flush=True)\n"
                               "    time.sleep(300)"], cwd=ROOT, env=env(), stdout=subprocess.PIPE, text=True)
    evaluation = [f"--eval_model_path={trained}/converted_snn.pt", f"--logdir={trained}"]
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=re.escape(f"{trained} is in use by process {holder.pid} ")):
            stage_in_process("SNN_conversion.py", f"--logdir={trained}", "--sample_size=2", "--val_size=4")
        capsys.readouterr()
        stage_in_process("evaluate.py", *evaluation, *TINY_EVAL)
        assert "appended to" in capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()
    shard_folder = next(trained.glob("eval_converted_snn_*"))
    with folder_lock(str(shard_folder)):  # this test process writes there now
        record = stage_in_process("evaluate.py", *evaluation, *TINY_EVAL)
        assert (record["shards_reused"], record["shards_made"]) == (2, 0)
        with pytest.raises(UserError, match=re.escape(f"{shard_folder} is in use by process {os.getpid()} ")):
            stage_in_process("evaluate.py", *evaluation, *TINY_EVAL[:2], "--num_images=12", *TINY_EVAL[3:])


def test_runs_appending_to_one_record_file_lose_no_line(tmp_path):
    path = str(tmp_path / "snn_eval.txt")

    def append(worker):
        for i in range(20):
            append_jsonl(path, {"worker": worker, "i": i})
    threads = [threading.Thread(target=append, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = [json.loads(line) for line in open(path)]
    assert sorted((r["worker"], r["i"]) for r in lines) == [(w, i) for w in range(4) for i in range(20)]
