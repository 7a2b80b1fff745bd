"""Stage 4 (metrics.evaluation, evaluate.py) on a tiny SNN: metrics, snn_eval.txt, resumption,
offline messages; the command line once end to end and once for a one-line error."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from common import configs
from model.checkpoint import save_atomic
from common.errors import UserError
from model.build import build_unet
from helpers import assert_one_line_error, run_script
from metrics import inception, scores, shards
from metrics.evaluation import evaluate
from snn.convert import convert
from snn.io import save_snn

TINY = configs.ModelConfig(configs.UNetConfig(ch=32, ch_mult=(1,), attn=(), num_res_blocks=1, dropout=0.0, bit=2),
                           configs.DiffusionConfig(T=20), configs.DataConfig("shapes", 8))
FIELDS = ("IS", "IS_std", "FID", "recognisability", "features", "warning", "metrics_skipped", "model_path", "kind",
          "bit", "time_steps", "neuron", "norm", "sampler", "sample_steps", "eta", "clip_denoised", "num_images", "seed", "fid_cache", "shards",
          "wall_s", "time",
          "energy_pJ_per_image", "ann_energy_pJ_per_image", "firing_rate", "psnr_snn_vs_ann_dB", "ann_path",
          "shards_made", "shards_reused", "world_size", "latency_steps", "spike_driven", "resample",
          "int_ann_energy_pJ_per_image", "energy_ratio_ann_over_snn", "energy_ratio_int_ann_over_snn",
          "energy_breakdown_pJ_per_image", "energy_breakdown_pJ_per_call")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A folder with a tiny random 2-bit ANN ``ckpt.pt``, its SNN and FID statistics."""
    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    ann = build_unet(TINY).eval()
    with torch.no_grad():  # the output conv starts near zero: make the network do something
        for p in ann.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = ann.state_dict()
    save_atomic({"net_model": state, "ema_model": state, "config": TINY.to_dict(), "step": 0}, str(folder / "ckpt.pt"))
    save_snn(str(folder / "converted_snn.pt"), convert(ann, "if"), TINY, configs.SNNConfig("if", "step"))
    feats = np.random.default_rng(0).normal(size=(30, 2048))
    scores.save_stats(str(folder / "stats.npz"), *scores.feature_statistics(feats), scores.INCEPTION_NAME)
    return folder


def evaluate_run(logdir, sampler="ddim", sample_steps=2, **fields):
    """``python evaluate.py`` of an EvalConfig(**fields) into ``logdir``, in this process; returns the
    last snn_eval.txt record (which is the record the run returns)."""
    record = evaluate(configs.EvalConfig(**fields), configs.SamplerConfig(sampler, sample_steps), logdir=str(logdir))
    with open(os.path.join(logdir, "snn_eval.txt")) as f:
        last = json.loads(f.read().splitlines()[-1])
    assert last == json.loads(json.dumps(record))
    return last


def snn_args(run_dir, **extra):
    """The EvalConfig fields of a small SNN evaluation (``extra`` overrides them)."""
    return {"eval_model_path": str(run_dir / "converted_snn.pt"), "num_images": 10, "batch_size": 4, "is_splits": 2,
            "inception_batch": 10, "fid_cache": str(run_dir / "stats.npz"), "features": "inception",
            "probe_images": 4, **extra}


@pytest.fixture(scope="module")
def first_run(run_dir, inception_home, tmp_path_factory):
    """A complete evaluation with FID/IS (random Inception weights): (logdir, record)."""
    logdir = tmp_path_factory.mktemp("eval")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", inception_home)
        record = evaluate_run(logdir, **snn_args(run_dir, fid="require", save_images=str(logdir / "png")))
    return logdir, record


def test_record_has_every_field(first_run, run_dir):
    logdir, record = first_run
    assert not [field for field in FIELDS if field not in record]
    assert record["kind"] == "snn" and record["bit"] == 2 and record["time_steps"] == 3
    assert record["neuron"] == "if" and record["norm"] == "step" and record["clip_denoised"] is False
    assert record["sampler"] == "ddim" and record["sample_steps"] == 2 and record["num_images"] == 10
    assert math.isfinite(record["FID"]) and record["FID"] > 0
    assert 1 - 1e-9 <= record["IS"] <= 5  # 5 images per split bound the score
    assert "2048" in record["warning"] and record["metrics_skipped"] is None
    assert record["features"] == "inception_v3_pool3" and record["recognisability"] is None
    assert record["energy_pJ_per_image"] > 0 and record["ann_energy_pJ_per_image"] > 0
    assert record["latency_steps"] == 3 and record["spike_driven"] is False and record["resample"] == "conv"
    per_image, per_call = record["energy_breakdown_pJ_per_image"], record["energy_breakdown_pJ_per_call"]
    assert sum(p["energy_pJ"] for p in per_image.values()) == pytest.approx(record["energy_pJ_per_image"])
    assert per_image["head"]["energy_pJ"] == pytest.approx(2 * per_call["head"]["energy_pJ"])  # 2 calls an image
    assert 0 < record["int_ann_energy_pJ_per_image"] < record["ann_energy_pJ_per_image"]
    assert record["ann_path"] == str(run_dir / "ckpt.pt") and record["psnr_snn_vs_ann_dB"] > 0
    assert (record["shards_made"], record["shards_reused"]) == (3, 0)


def test_images_grid_and_pngs(first_run):
    logdir, record = first_run
    images = shards.gather_images(record["shards"], 10, 4)
    assert images.shape == (10, 8, 8, 3)
    pngs = sorted(os.listdir(logdir / "png"))
    assert len(pngs) == 10
    np.testing.assert_array_equal(np.asarray(Image.open(logdir / "png" / pngs[7])), images[7])
    assert len(os.listdir(logdir / "images")) == 1


def test_interrupted_run_resumes_with_identical_images(first_run, run_dir, offline, tmp_path):
    """Shard 0 survived an interruption and shard 1 was torn: they are reused / remade.

    Also the offline ``--fid=auto`` path: FID/IS skipped with the reason, the run completes.
    """
    _, done = first_run
    folder = tmp_path / os.path.basename(done["shards"])
    folder.mkdir()
    shutil.copy(shards.shard_path(done["shards"], 0), folder)
    (folder / "shard_00001.npz").write_bytes(b"torn")
    record = evaluate_run(tmp_path, **snn_args(run_dir, fid="auto", probe_images=0))
    assert record["shards"] == str(folder)
    assert (record["shards_made"], record["shards_reused"]) == (2, 1)
    np.testing.assert_array_equal(shards.gather_images(str(folder), 10, 4),
                                  shards.gather_images(done["shards"], 10, 4))
    assert record["FID"] is None and record["IS"] is None
    assert inception.weights_path() in record["metrics_skipped"]


def test_required_metrics_fail_before_sampling(run_dir, offline, tmp_path):
    with pytest.raises(UserError, match="pt_inception-2015-12-05-6726825d.pth"):
        evaluate_run(tmp_path, **snn_args(run_dir, fid="require"))
    assert not [name for name in os.listdir(tmp_path) if name.startswith("eval_")]


def test_missing_statistics_name_the_command(run_dir, torch_home, tmp_path):
    with pytest.raises(UserError, match="compute_fid_stats.py --dataset=shapes"):
        evaluate_run(tmp_path, **snn_args(run_dir, fid="require", fid_cache=str(tmp_path / "none.npz")))
    assert not [name for name in os.listdir(tmp_path) if name.startswith("eval_")]


def test_fewer_images_than_splits_is_refused(run_dir, offline, tmp_path):
    with pytest.raises(UserError, match="--num_images=10 is fewer than --is_splits=11"):
        evaluate_run(tmp_path, **snn_args(run_dir, is_splits=11))
    assert not [name for name in os.listdir(tmp_path) if name.startswith("eval_")]


def test_an_ann_is_evaluated_the_same_way(run_dir, tmp_path):
    """The command line end to end (the flags become the configs of ``evaluate``)."""
    proc = run_script("evaluate.py", f"--eval_model_path={run_dir / 'ckpt.pt'}", f"--logdir={tmp_path}",
                      "--sampler=ddpm", "--num_images=4", "--batch_size=4", "--fid=skip", "--probe_images=1")
    with open(tmp_path / "snn_eval.txt") as f:
        lines = f.read().splitlines()
    assert len(lines) == 1 and "FID/IS skipped: --fid=skip" in proc.stdout and f"appended to {tmp_path}" in proc.stdout
    record = json.loads(lines[0])
    assert record["kind"] == "ann" and record["time_steps"] is None and record["sample_steps"] == TINY.diffusion.T
    assert record["metrics_skipped"] == "--fid=skip" and "psnr_snn_vs_ann_dB" not in record
    assert record["energy_pJ_per_image"] == pytest.approx(record["ann_energy_pJ_per_image"])
    assert record["latency_steps"] is None and 0 < record["int_ann_energy_pJ_per_image"] < record["energy_pJ_per_image"]


def test_contradicting_flag_is_a_one_line_error(run_dir, tmp_path):
    proc = run_script("evaluate.py", f"--eval_model_path={run_dir / 'converted_snn.pt'}", f"--logdir={tmp_path}",
                      "--bit=3", check=False)
    assert_one_line_error(proc, "--bit=3", "contradicts", "converted_snn.pt")
