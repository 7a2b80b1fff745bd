"""The scripts on CUDA, run as a user runs them (subprocesses that inherit CUDA_VISIBLE_DEVICES):
a 3-step training (also with --parallel: DataParallel when more than one GPU is visible, the plain
model on one), its conversion, a sharded evaluation run twice, and torchrun over every visible GPU.

Each script runs through ``on_cuda.py``, which reports the CUDA memory the script allocated: the
evidence that it ran on the GPU. Every checkpoint must load on the CPU.
"""
import json
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch

from model.checkpoint import load_checkpoint
from helpers import ROOT, TINY_TRAIN, run_script
from metrics import shards
from snn import SpikingUNet
from snn.io import Loaded, load_model
from test_distributed import HELPER, torchrun

STEPS = 3
CONVERT = ["--sample_size=4", "--val_size=8", "--sampler=ddim", "--sample_steps=2", "--num_workers=0"]
EVALUATE = ["--num_images=6", "--batch_size=2", "--sampler=ddim", "--sample_steps=2", "--fid=skip",
            "--probe_images=2"]


def on_cuda(script, *args):
    """``python script args`` (``helpers.run_script``) through on_cuda.py; fails unless the script
    allocated CUDA memory. Returns the CompletedProcess."""
    proc = run_script(os.path.join("tests", "gpu", "on_cuda.py"), script, *args, env={"PYTHONPATH": ROOT})
    peak = re.findall(r"^cuda_peak_bytes=(\d+)$", proc.stderr, re.MULTILINE)
    assert peak and int(peak[-1]) > 0, f"{script} did not run on CUDA:\n{proc.stderr[-2000:]}"
    return proc


def train(logdir, *extra):
    """``tests.helpers.train_tiny`` on CUDA: the tiny 2-bit UNet, STEPS steps, ``logdir/ckpt.pt``."""
    return on_cuda("ANN_train.py", *TINY_TRAIN, f"--logdir={logdir}", f"--total_steps={STEPS}",
                   f"--save_step={STEPS}", *extra)


def assert_loads_on_the_cpu(path, kind):
    """``snn.io.load_model(path)`` on the CPU: a ``Loaded`` of ``kind`` whose model runs there."""
    loaded = load_model(str(path))
    assert isinstance(loaded, Loaded) and loaded.kind == kind
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())
    size, T = loaded.config.data.img_size, loaded.config.diffusion.T
    with torch.no_grad():
        out = loaded.model(torch.zeros(2, 3, size, size), torch.tensor([0, T - 1]))
    assert out.shape == (2, 3, size, size) and torch.isfinite(out).all()
    return loaded


def assert_trained_checkpoint(logdir):
    path = os.path.join(logdir, "ckpt.pt")
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == STEPS and ckpt["config"]["train"]["total_steps"] == STEPS
    assert not [key for key in ckpt["net_model"] if key.startswith("module.")], "the unwrapped model is saved"
    loaded = assert_loads_on_the_cpu(path, "ann")
    assert loaded.config.unet.bit == 2 and loaded.config.diffusion.T == 100


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step run with the fused (Triton) quantizers: its logdir."""
    logdir = tmp_path_factory.mktemp("gpu_train")
    train(logdir, "--kernels=compile")
    return logdir


def test_training_on_cuda(trained):
    assert_trained_checkpoint(trained)


def test_parallel_training_on_cuda(tmp_path):
    """--parallel: DataParallel over the visible GPUs (more than one), else the plain model."""
    train(tmp_path, "--parallel")
    assert_trained_checkpoint(tmp_path)


@pytest.fixture(scope="module")
def converted(trained, tmp_path_factory):
    """SNN_conversion.py on a copy of the trained run, with the fused IF neurons: its logdir."""
    logdir = tmp_path_factory.mktemp("gpu_convert")
    shutil.copy(trained / "ckpt.pt", logdir / "ckpt.pt")
    on_cuda("SNN_conversion.py", f"--logdir={logdir}", *CONVERT, "--kernels=compile")
    return logdir


def test_conversion_on_cuda(converted):
    report = json.loads((converted / "conversion.json").read_text())
    assert report["bit"] == 2 and report["time_steps"] == 3 and report["neuron"] == "if"
    assert report["network_calls"] == 2 and report["spike_stats"]["num_samples"] == 8
    assert math.isfinite(report["noise_relative_error"]) and report["noise_relative_error"] >= 0
    for name in ("ann.png", "snn.png", "ann_vs_snn.png"):
        assert (converted / "images" / name).stat().st_size > 0
    loaded = assert_loads_on_the_cpu(converted / "converted_snn.pt", "snn")
    assert isinstance(loaded.model, SpikingUNet) and loaded.ckpt["time_steps"] == 3


def evaluate(model, logdir):
    """evaluate.py on CUDA into ``logdir``; returns the last record of ``logdir/snn_eval.txt``."""
    on_cuda("evaluate.py", f"--eval_model_path={model}", f"--logdir={logdir}", *EVALUATE)
    return json.loads((logdir / "snn_eval.txt").read_text().splitlines()[-1])


def shard_files(folder):
    """{name: (bytes, mtime_ns)} of the shards in ``folder``."""
    found = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith("shard_"):
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[name] = (f.read(), os.stat(path).st_mtime_ns)
    return found


def test_sharded_evaluation_on_cuda_is_reused_and_reproducible(converted, tmp_path):
    model = converted / "converted_snn.pt"
    first = evaluate(model, tmp_path / "a")
    assert first["kind"] == "snn" and first["world_size"] == 1 and first["num_images"] == 6
    assert (first["shards_made"], first["shards_reused"]) == (3, 0)
    assert first["metrics_skipped"] == "--fid=skip" and first["energy_pJ_per_image"] > 0
    made = shard_files(first["shards"])
    assert len(made) == 3

    second = evaluate(model, tmp_path / "a")  # the same command again: every shard is found
    assert second["shards"] == first["shards"]
    assert (second["shards_made"], second["shards_reused"]) == (0, 3)
    assert shard_files(second["shards"]) == made, "the shards are reused as they are, not rewritten"

    fresh = evaluate(model, tmp_path / "b")  # made again from scratch: the same images
    assert (fresh["shards_made"], fresh["shards_reused"]) == (3, 0)
    np.testing.assert_array_equal(shards.gather_images(fresh["shards"], 6, 2),
                                  shards.gather_images(first["shards"], 6, 2))


def test_torchrun_over_every_gpu(tmp_path):
    """One process per visible GPU (NCCL): every rank ends with the weights rank 0 saved."""
    gpus = torch.cuda.device_count()
    if gpus < 2:
        pytest.skip(f"torchrun over GPUs needs more than one visible GPU ({gpus} visible)")
    args = [a for a in TINY_TRAIN if not a.startswith("--batch_size=")]
    torchrun(HELPER, *args, f"--batch_size={2 * gpus}", f"--logdir={tmp_path}", f"--total_steps={STEPS}",
             f"--save_step={STEPS}", nproc=gpus)
    reports = []
    for rank in range(gpus):
        with open(tmp_path / f"rank{rank}.json") as f:
            reports.append(json.load(f))
    for rank, report in enumerate(reports):
        assert report["rank"] == rank and report["world_size"] == gpus and report["per_rank_batch"] == 2
        assert report["net_equal"] and report["ema_equal"], report
    assert len({report["param_sum"] for report in reports}) == 1
    assert_trained_checkpoint(tmp_path)
