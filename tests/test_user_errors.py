"""Every bad input a user can type, through the real command line of each script.

Each case runs a script with the demo flagfile of its stage (as a user would) in its own copy of
a run folder that already holds a checkpoint, and must end with one line on stderr, no
traceback, a non-zero exit, and nothing in the folder changed. The cases of one script run one
after the other in one process (``tests/cli_cases.py``: each a full command-line parse and the
script's own ``run(main)``), two scripts at a time: most of a process is importing torch.
"""
import hashlib
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import cases_results, run_cases_two_at_a_time, stage_in_process, start_cases

FLAGFILES = {"ANN_train.py": "config/train_ANN/demo.txt", "SNN_conversion.py": "config/SNN_convert/demo.txt",
             "SNN_ft.py": "config/SNN_ft/demo.txt", "evaluate.py": "config/SNN_evaluate/demo.txt",
             "compute_fid_stats.py": None}

REFUSED = ("not a checkpoint of this project", "nothing in it was executed")

# (script, arguments with {run} = the run folder and {file} = a regular file, words the error line holds)
CASES = {
    "T=0": ("ANN_train.py", ["--T=0"], ["--T=0", "at least 2"]),
    "batch_size=0": ("ANN_train.py", ["--batch_size=0"], ["--batch_size=0", "at least 1"]),
    "lr=-1": ("ANN_train.py", ["--lr=-1"], ["--lr=-1", "positive"]),
    "img_size=7": ("ANN_train.py", ["--img_size=7"], ["img_size=7", "multiple of 2**(levels - 1)"]),
    "img_size=0": ("ANN_train.py", ["--img_size=0"], ["img_size=0", "multiple"]),
    "save_step=0": ("ANN_train.py", ["--save_step=0"], ["--save_step=0"]),
    "log_step=0": ("ANN_train.py", ["--log_step=0"], ["--log_step=0"]),
    "sample_size=0": ("ANN_train.py", ["--sample_size=0"], ["--sample_size=0"]),
    "logdir under a file": ("ANN_train.py", ["--logdir={file}/run"], ["--logdir", "regular file"]),
    "decreasing betas": ("ANN_train.py", ["--beta_1=0.1", "--beta_T=0.01"], ["beta_1=0.1", "beta_T=0.01", "<="]),
    "beta_T=1.5": ("ANN_train.py", ["--beta_T=1.5"], ["beta_T=1.5", "< 1"]),
    "ddim with 0 steps": ("ANN_train.py", ["--sampler=ddim", "--sample_steps=0"], ["--sample_steps=0"]),
    "more steps than T": ("ANN_train.py", ["--sample_steps=5000"], ["--sample_steps=5000", "1..1000"]),
    "ema_decay=2": ("ANN_train.py", ["--ema_decay=2"], ["--ema_decay=2", "[0, 1]"]),
    "total_steps=0": ("ANN_train.py", ["--total_steps=0"], ["--total_steps=0"]),
    "init and resume": ("ANN_train.py", ["--init={run}/ckpt.pt"], ["--init", "already exists"]),
    "contradicting --ch": ("ANN_train.py", ["--ch=64"], ["--ch=64", "contradicts", "ch=32"]),
    "missing flagfile": ("ANN_train.py", ["--flagfile=missing.txt"], ["missing.txt"]),
    "unknown flag": ("ANN_train.py", ["--no_such_flag=1"], ["no_such_flag"]),
    "bit=9": ("ANN_train.py", ["--bit=9"], ["--bit"]),
    "ch=36": ("ANN_train.py", ["--ch=36"], ["ch=36", "multiple of --num_groups"]),
    "num_groups=3": ("ANN_train.py", ["--num_groups=3"], ["num_groups=3", "multiple of --num_groups"]),
    "snr_gamma=-1": ("ANN_train.py", ["--snr_gamma=-1"], ["--snr_gamma=-1", "0 (off) or positive"]),
    "folder missing": ("ANN_train.py", ["--logdir={run}/new", "--dataset=folder", "--data_dir={run}/no_such_folder"],
                       ["no_such_folder", "is not a folder"]),
    "folder without images": ("ANN_train.py", ["--logdir={run}/new", "--dataset=folder", "--data_dir={run}/empty"],
                              ["no image files below", "empty"]),
    "folder with a broken image": ("ANN_train.py", ["--logdir={run}/new", "--dataset=folder", "--data_dir={run}/images"],
                                   ["cannot read the image", "broken.png"]),
    "img_channels against mnist": ("ANN_train.py", ["--logdir={run}/new", "--dataset=mnist", "--img_channels=3"],
                                   ["--img_channels=3", "--dataset=mnist"]),
    "img_channels=2": ("ANN_train.py", ["--img_channels=2"], ["--img_channels", "1 (grayscale) or 3"]),
    "stats out under a file": ("compute_fid_stats.py", ["--dataset=shapes", "--out={file}/s.npz"], ["--out"]),
    "conversion val_size=0": ("SNN_conversion.py", ["--val_size=0"], ["--val_size=0"]),
    "conversion sample_size=0": ("SNN_conversion.py", ["--sample_size=0"], ["--sample_size=0"]),
    "conversion steps > T": ("SNN_conversion.py", ["--sample_steps=5000"], ["--sample_steps=5000", "T=1000"]),
    "removed --sign": ("SNN_conversion.py", ["--sign"], ["'sign'", "give --neuron=signed"]),
    "removed --nosign": ("SNN_ft.py", ["--nosign"], ["'nosign'", "give --neuron=if"]),
    "old --error_size": ("SNN_conversion.py", ["--error_size=0"], ["error_size"]),
    "ft val_size=0": ("SNN_ft.py", ["--val_size=0"], ["--val_size=0"]),
    "ft lr=0": ("SNN_ft.py", ["--lr=0"], ["--lr=0", "positive"]),
    "ft steps > T": ("SNN_ft.py", ["--sample_steps=5000"], ["--sample_steps=5000"]),
    "ft judge steps > T": ("SNN_ft.py", ["--judge_steps=5000"], ["--judge_steps=5000", "1..1000"]),
    "ft judge_eta=2": ("SNN_ft.py", ["--judge_eta=2"], ["--judge_eta=2", "[0, 1]"]),
    "ft calib_size=0": ("SNN_ft.py", ["--calib_size=0"], ["--calib_size=0"]),
    "ft judge_images=-1": ("SNN_ft.py", ["--judge_images=-1"], ["--judge_images=-1"]),
    "eval logdir under a file": ("evaluate.py", ["--logdir={file}/x"], ["--logdir", "regular file"]),
    "eval save_images under a file": ("evaluate.py", ["--save_images={file}/png"], ["--save_images"]),
    "eval ddim with 0 steps": ("evaluate.py", ["--sample_steps=0"], ["--sample_steps=0"]),
    "eval missing model": ("evaluate.py", ["--eval_model_path={run}/none.pt"], ["no checkpoint at", "none.pt"]),
    "eval statistics without mu": ("evaluate.py", ["--fid=require", "--fid_cache={run}/bad.npz"],
                                   ["bad.npz", "mu"]),
    # a checkpoint from elsewhere whose unpickling would run a shell command (see ``template``)
    "malicious ckpt.pt, stage 1": ("ANN_train.py", ["--logdir={run}/evil"], ["evil/ckpt.pt", *REFUSED]),
    "malicious --init": ("ANN_train.py", ["--logdir={run}/new", "--init={run}/evil.pt"], ["evil.pt", *REFUSED]),
    "malicious ckpt.pt, stage 2": ("SNN_conversion.py", ["--logdir={run}/evil"], ["evil/ckpt.pt", *REFUSED]),
    "malicious ckpt.pt, stage 3": ("SNN_ft.py", ["--logdir={run}/evil"], ["evil/ckpt.pt", *REFUSED]),
    "malicious model, stage 4": ("evaluate.py", ["--eval_model_path={run}/evil.pt"], ["evil.pt", *REFUSED]),
    "malicious --ann_path": ("evaluate.py", ["--ann_path={run}/evil.pt"], ["evil.pt", *REFUSED]),
    # checkpoints that lack a configuration section, or the weights
    "no data section, stage 1": ("ANN_train.py", ["--logdir={run}/partial"], ["partial/ckpt.pt", "'data' section"]),
    "no data section, stage 2": ("SNN_conversion.py", ["--logdir={run}/partial"], ["partial/ckpt.pt", "'data'"]),
    "no data section, stage 3": ("SNN_ft.py", ["--logdir={run}/partial"], ["partial/ckpt.pt", "'data'"]),
    "no weights, --init": ("ANN_train.py", ["--logdir={run}/new", "--init={run}/noweights.pt"],
                           ["noweights.pt", "'ema_model'"]),
    "no data section, stage 4": ("evaluate.py", ["--eval_model_path={run}/partial/ckpt.pt"], ["'data' section"]),
    "no weights, --ann_path": ("evaluate.py", ["--ann_path={run}/noweights.pt"], ["noweights.pt"]),
    "no optimiser state, resume": ("ANN_train.py", ["--logdir={run}/no_optim"],
                                   ["no_optim/ckpt.pt", "'optim'", "resuming training"]),
}


class ShellCommand:
    """Unpickled, it runs ``touch path``: what a checkpoint from elsewhere may carry."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.fixture(scope="module")
def marker(tmp_path_factory):
    """The file the malicious checkpoints would create when loaded."""
    return tmp_path_factory.mktemp("marker") / "the_checkpoint_ran_a_command"


@pytest.fixture(scope="module")
def template(tmp_path_factory, marker):
    """A run folder with a 1-step checkpoint of the demo model, a statistics file lacking mu/sigma,
    and checkpoints that are malicious (``evil/ckpt.pt``, ``evil.pt``) or incomplete
    (``partial/ckpt.pt``: no 'data' section; ``noweights.pt``; ``no_optim/ckpt.pt``: no optimiser),
    an empty folder and a folder of images one of which is broken."""
    folder = tmp_path_factory.mktemp("template")
    stage_in_process("ANN_train.py", "--flagfile=config/train_ANN/demo.txt", f"--logdir={folder}", "--total_steps=1",
                     "--save_step=1", "--sample_step=0")
    np.savez(folder / "bad.npz", mean=np.zeros(3))
    ckpt = torch.load(folder / "ckpt.pt", weights_only=True)
    for name in ("evil", "partial", "no_optim"):
        (folder / name).mkdir()
    for path in (folder / "evil" / "ckpt.pt", folder / "evil.pt"):
        torch.save({**ckpt, "note": ShellCommand(marker)}, path)
    torch.save({**ckpt, "config": {k: v for k, v in ckpt["config"].items() if k != "data"}},
               folder / "partial" / "ckpt.pt")
    torch.save({"config": ckpt["config"], "step": 1}, folder / "noweights.pt")
    torch.save({k: ckpt[k] for k in ("net_model", "ema_model", "config")}, folder / "no_optim" / "ckpt.pt")
    assert not marker.exists()
    (folder / "empty").mkdir()
    (folder / "images" / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.png"):
        Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(folder / "images" / name)
    (folder / "images" / "sub" / "broken.png").write_bytes(b"\x89PNG but not an image")
    return folder


_DIGESTS = {}  # (device, inode, size, mtime, ctime) -> sha256: a file written since has another ctime


def digest(path):
    """The sha256 of the file at ``path``; a file linked into many folders is read once until it changes."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _DIGESTS:
        with open(path, "rb") as f:
            _DIGESTS[key] = hashlib.sha256(f.read()).hexdigest()
    return _DIGESTS[key]


def snapshot(folder):
    """{relative path: sha256 of the content} of every file under ``folder``."""
    files = {}
    for base, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(base, name)
            files[os.path.relpath(path, folder)] = digest(path)
    return files


def command_line(script, args, run, blocker):
    """What follows ``python script`` for a case: the stage's demo flagfile, the run folder (unless
    the case gives its own), the model to evaluate, then the case's arguments."""
    flagfile = [f"--flagfile={FLAGFILES[script]}"] if FLAGFILES[script] else []
    own = script == "compute_fid_stats.py" or any(a.startswith("--logdir") for a in args)
    logdir = [] if own else [f"--logdir={run}"]
    model = [f"--eval_model_path={run}/ckpt.pt"] if script == "evaluate.py" else []
    return [*flagfile, *logdir, *model, *[a.format(run=run, file=blocker) for a in args]]


@pytest.fixture(scope="module")
def outcomes(template, tmp_path_factory):
    """{case: (returncode, stderr, files before, files after, files left open in the folder)}: the
    cases of one script run one after the other in one process, two scripts at a time."""
    folders, argvs = {}, {script: {} for script in FLAGFILES}
    for case, (script, args, _) in CASES.items():
        run = tmp_path_factory.mktemp("case")
        # hard links: a run that wrote into a file in place would change it in every folder (and be
        # seen in each); one that replaced it atomically changes only its own folder
        shutil.copytree(template, run, dirs_exist_ok=True, copy_function=os.link)
        blocker = tmp_path_factory.mktemp("file") / "a_file"
        blocker.write_text("not a folder")
        argvs[script][case] = command_line(script, args, run, blocker)
        folders[case] = run
    before = {case: snapshot(run) for case, run in folders.items()}  # after the last link: ctimes settled
    results = run_cases_two_at_a_time(argvs, tmp_path_factory.mktemp("cli_cases"))
    return {case: (r["code"], r["stderr"], before[case], snapshot(folders[case]),
                   [p for p in r["open"] if p.startswith(str(folders[case]))]) for case, r in results.items()}


def assert_refused(returncode, stderr, before, after, left_open, words):
    """A non-zero exit, one ``error:`` line holding ``words`` and nothing else on stderr, the folder
    as it was and no file of it left open."""
    assert returncode != 0, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert after == before, "an earlier checkpoint or output changed"
    assert not left_open, f"still open after the run: {left_open}"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(outcomes, case):
    assert_refused(*outcomes[case], CASES[case][2])


PROBE = '''"""A script that succeeds, fails in one line, crashes or keeps a file open, as told."""
import sys

from absl import flags

from common import flags as cflags
from common.errors import UserError

flags.DEFINE_enum("do", "succeed", ["succeed", "refuse", "crash", "exit", "leak"], "what to do")
flags.DEFINE_string("path", "", "the file --do=leak keeps open")
FLAGS = flags.FLAGS
KEPT = []


def main(argv):
    if FLAGS.do == "refuse":
        raise UserError("refused as told")
    if FLAGS.do == "crash":
        raise RuntimeError("a bug")
    if FLAGS.do == "exit":
        sys.exit(3)
    if FLAGS.do == "leak":
        KEPT.append(open(FLAGS.path, "w"))
        raise UserError("refused with a file still open")
    print("done")


if __name__ == "__main__":
    cflags.run(main)
'''


def test_the_case_runner_reports_what_a_process_would(tmp_path):
    """Through ``tests/cli_cases.py`` a success exits 0 and a crash prints its traceback (exit 1):
    both fail ``assert_refused``, as does a file left open; a flag given in one case is back at
    its default in the next."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    kept = tmp_path / "kept.txt"
    argvs = {"refuse": ["--do=refuse"], "crash": ["--do=crash"], "exit": ["--do=exit"], "default": [],
             "leak": ["--do=leak", f"--path={kept}"], "bad flag": ["--do=fly"]}
    out = cases_results(*start_cases(str(script), argvs, tmp_path))
    codes = {case: out[case]["code"] for case in argvs}
    assert codes == {"refuse": 1, "crash": 1, "exit": 3, "default": 0, "leak": 1, "bad flag": 2}
    assert "Traceback" in out["crash"]["stderr"] and "RuntimeError: a bug" in out["crash"]["stderr"]
    assert out["leak"]["open"] == [str(kept)]

    def refused(case, words=()):
        r = out[case]
        assert_refused(r["code"], r["stderr"], {}, {}, [p for p in r["open"] if p.startswith(str(tmp_path))], words)
    refused("refuse", ["refused as told"])
    refused("bad flag", ["--do"])
    for case in ("crash", "default", "leak"):
        with pytest.raises(AssertionError):
            refused(case)


def test_no_checkpoint_ran_what_it_carries(outcomes, marker):
    """Every malicious checkpoint above was refused before its payload could run."""
    assert outcomes and not marker.exists()
