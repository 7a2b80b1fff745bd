"""The scripts under torchrun: two CPU processes (gloo).

Five torchrun launches (4 to 8 s each on two cores): train 3 steps, resume to 5, a sharded
evaluation compared with one in this process, and conversion and fine-tuning of the trained model.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from common import configs
from model.checkpoint import load_checkpoint
from model.build import build_unet
from snn.io import load_model
from tests.helpers import ROOT, TINY_TRAIN, stage_in_process

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

HELPER = os.path.join(ROOT, "tests", "ddp_train_check.py")


def torchrun(script, *args, nproc=2):
    """``torchrun --standalone --nproc_per_node=nproc script args``; returns the CompletedProcess.
    The repository root is on ``PYTHONPATH``: a helper of tests/ imports the project as a script does."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def rank_reports(logdir):
    reports = []
    for rank in range(2):
        with open(os.path.join(logdir, f"rank{rank}.json")) as f:
            reports.append(json.load(f))
    return reports


def assert_ranks_agree(logdir):
    """Both ranks hold exactly the weights rank 0 saved, with half the global batch of 4 each."""
    reports = rank_reports(logdir)
    for rank, report in enumerate(reports):
        assert report["rank"] == rank and report["world_size"] == 2
        assert report["per_rank_batch"] == 2
        assert report["net_equal"] and report["ema_equal"], report
    assert reports[0]["param_sum"] == reports[1]["param_sum"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step run of two processes: (logdir, its ANN_train arguments, the launch's output)."""
    logdir = str(tmp_path_factory.mktemp("ddp") / "run")
    args = TINY_TRAIN + [f"--logdir={logdir}", "--save_step=3"]
    return logdir, args, torchrun(HELPER, *args, "--total_steps=3")


def test_ranks_end_identical_and_the_checkpoint_loads_alone(trained):
    logdir, _, proc = trained
    assert "resuming" not in proc.stdout
    assert_ranks_agree(logdir)
    ckpt = load_checkpoint(os.path.join(logdir, "ckpt.pt"))
    assert ckpt["step"] == 3 and ckpt["config"]["train"]["batch_size"] == 4
    assert all(not key.startswith("module.") for key in ckpt["net_model"])
    init = tiny_initial_weights()
    assert any(not torch.equal(init[k], ckpt["net_model"][k]) for k in init if k.endswith("weight")), \
        "training moved the weights away from the initialisation"

    # one process, no process group: the checkpoint is a plain model
    model, kind, *_ = load_model(os.path.join(logdir, "ckpt.pt"))
    assert kind == "ann"
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 16, 16), torch.tensor([0, 99]))
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()


def test_resumed_distributed_run_continues_from_the_saved_step(trained, tmp_path):
    source, args, _ = trained
    logdir = str(tmp_path / "resume")
    shutil.copytree(source, logdir)
    for rank in range(2):
        os.remove(os.path.join(logdir, f"rank{rank}.json"))  # the reports of the first run
    args = [a for a in args if not a.startswith("--logdir=")] + [f"--logdir={logdir}"]

    second = torchrun(HELPER, *args, "--total_steps=5")
    assert second.stdout.count("resuming from") == 1, second.stdout  # rank 0 alone prints
    assert "at step 3" in second.stdout
    assert_ranks_agree(logdir)
    ckpt = load_checkpoint(os.path.join(logdir, "ckpt.pt"))
    assert ckpt["step"] == 5 and ckpt["sched"]["last_epoch"] == 5
    assert all(state["step"] == 5 for state in ckpt["optim"]["state"].values()), "Adam resumed its moments"


def test_sharded_evaluation_makes_the_images_of_one_process(trained, tmp_path):
    """Two ranks share the shards; every shard is seeded by its index, so the images are those of
    one process (this one)."""
    ckpt = os.path.join(trained[0], "ckpt.pt")
    common = [f"--eval_model_path={ckpt}", "--num_images=6", "--batch_size=2", "--sampler=ddim",
              "--sample_steps=2", "--fid=skip", "--probe_images=0", "--nopic_or_not"]
    folders = {name: tmp_path / name / "png" for name in ("one", "two")}
    stage_in_process("evaluate.py", *common, f"--logdir={tmp_path / 'one'}", f"--save_images={folders['one']}")
    torchrun(os.path.join(ROOT, "evaluate.py"), *common, f"--logdir={tmp_path / 'two'}",
             f"--save_images={folders['two']}")
    one, two = (sorted(os.listdir(folders[k])) for k in ("one", "two"))
    assert len(one) == len(two) == 6 and one == two
    for name in one:
        with open(folders["one"] / name, "rb") as a, open(folders["two"] / name, "rb") as b:
            assert a.read() == b.read(), name
    record = json.loads((tmp_path / "two" / "snn_eval.txt").read_text().splitlines()[-1])
    assert record["world_size"] == 2 and record["num_images"] == 6


def tiny_initial_weights():
    """The UNet of TINY_TRAIN as ANN_train initialises it (--seed=0 before building the model)."""
    torch.manual_seed(0)
    cfg = configs.ModelConfig(configs.UNetConfig(ch=32, ch_mult=(1,), num_res_blocks=1, dropout=0.0, bit=2),
                              configs.DiffusionConfig(T=100), configs.DataConfig("shapes", 16))
    return build_unet(cfg).state_dict()


def test_conversion_and_finetuning_run_under_torchrun(trained, tmp_path):
    """Stages 2 and 3 under torchrun: rank 0 writes, the other rank waits, the outputs load alone."""
    logdir = tmp_path / "run"
    logdir.mkdir()
    shutil.copy(os.path.join(trained[0], "ckpt.pt"), logdir / "ckpt.pt")
    torchrun(os.path.join(ROOT, "SNN_conversion.py"), f"--logdir={logdir}", "--sample_size=2", "--val_size=4",
             "--sampler=ddim", "--sample_steps=2", "--num_workers=0")
    converted = json.loads((logdir / "conversion.json").read_text())
    assert converted["time_steps"] == 3
    torchrun(os.path.join(ROOT, "SNN_ft.py"), f"--logdir={logdir}", "--dataset=shapes", "--ft_steps=2",
             "--batch_size=4", "--val_size=4", "--sample_size=0", "--num_workers=0", "--lr=0.001")
    out_dir = logdir / "SNN_2bit_ft"
    model, kind, *_ = load_model(str(out_dir / "snn_ft.pt"))
    result = json.loads((out_dir / "finetune.json").read_text())
    assert kind == "snn" and result["finished"]
    assert [b["index"] for b in result["blocks"]] == list(range(len(model.blocks())))
    # the same held-out batch and the same SNN: stage 2 and stage 3 report the same error
    assert result["converted_error"] == converted["noise_relative_error"]
