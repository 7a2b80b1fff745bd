"""FID / IS plumbing with the real pytorch-gan-metrics Inception network (random weights), shards.

The Inception weights are random (the real ones cannot be downloaded here); they are saved under
the real file name into a temporary TORCH_HOME (``inception_home`` in conftest.py), so torch.hub
and the library load them as usual.
The numbers are meaningless; the properties tested hold for any weights.
"""
import json
import os

import numpy as np
import pytest
import torch

from pytorch_image_generation_metrics.core import calculate_frechet_distance

from model.data import draw_shape
from common.errors import UserError
from helpers import stage_in_process
from metrics import inception, scores, shards
from metrics.report import append_jsonl, psnr



def shapes_uint8(n, start=0):
    return np.stack([draw_shape(i) for i in range(start, start + n)])  # [n, 32, 32, 3]


def test_weights_path_follows_torch_home(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert inception.weights_path() == os.path.join(str(tmp_path), "hub", "checkpoints",
                                                    "pt_inception-2015-12-05-6726825d.pth")


@pytest.fixture(scope="module")
def shape_features(inception_home):
    """Inception outputs of 8 shapes images and of the same images with noise: (feats, probs)."""
    clean = shapes_uint8(8)
    rng = np.random.default_rng(0)
    noisy = np.clip(clean + rng.normal(0, 40, clean.shape), 0, 255).astype(np.uint8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", inception_home)
        net = inception.load_inception("cpu")
    feats, probs = inception.inception_outputs(net, np.concatenate([clean, noisy]), "cpu", batch_size=16)
    return net, clean, feats, probs


def test_fid_against_own_statistics_is_zero_and_grows_with_noise(shape_features):
    net, clean, feats, probs = shape_features
    assert feats.shape == (16, 2048) and probs.shape == (16, 1008)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    mu, sigma = scores.feature_statistics(feats[:8])
    scale = np.trace(sigma)
    assert scale > 0
    assert abs(scores.fid_from_features(feats[:8], mu, sigma)) < 1e-6 * scale
    assert scores.fid_from_features(feats[8:], mu, sigma) > 0.05 * scale
    # the float path (what compute_fid_stats feeds) gives the features of the uint8 path
    again, _ = inception.inception_outputs(net, torch.from_numpy(clean[:2]).permute(0, 3, 1, 2) / 255.0, "cpu")
    np.testing.assert_allclose(again, feats[:2], rtol=1e-4, atol=1e-5)


def test_low_rank_fid_equals_the_library_formula():
    rng = np.random.default_rng(1)
    dim = 48
    ref = rng.normal(size=(300, dim)) * rng.uniform(0.5, 2, dim) + 0.3
    mu, sigma = ref.mean(0), np.cov(ref, rowvar=False)
    for n in (5, 20, dim):
        x = rng.normal(size=(n, dim))
        expected = calculate_frechet_distance(x.mean(0), np.cov(x, rowvar=False), mu, sigma)
        assert scores.low_rank_frechet_distance(x, mu, sigma) == pytest.approx(expected, rel=1e-6)


def test_inception_score_closed_forms():
    uniform = np.full((20, 1008), 1 / 1008)
    score, std = scores.inception_score(uniform, splits=2)
    assert score == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)
    # 4 images per split, each sure of a different class: IS = exp(log 4) = 4
    sure = np.full((8, 1008), 1e-9)
    sure[np.arange(8), np.arange(8) % 4] = 1 - 1007e-9
    assert scores.inception_score(sure, splits=2)[0] == pytest.approx(4.0, rel=1e-5)


def test_fewer_images_than_splits_is_a_clear_error():
    with pytest.raises(UserError, match="at least --is_splits=10 images, got 6"):
        scores.inception_score(np.full((6, 1008), 1 / 1008), splits=10)


def test_missing_weights_message_names_the_file(offline):
    with pytest.raises(UserError) as err:
        inception.load_inception("cpu")
    assert inception.weights_path() in str(err.value)
    assert "TORCH_HOME" in str(err.value) and "missing" in str(err.value)


def test_missing_statistics_message_names_the_command(tmp_path):
    path = str(tmp_path / "cifar10.train.npz")
    command = scores.stats_command("cifar10", 32, "inception", path)
    with pytest.raises(UserError, match="python compute_fid_stats.py --dataset=cifar10 .*--out=" + path):
        scores.load_stats(path, command=command)


def test_statistics_of_another_network_are_refused(tmp_path):
    path = str(tmp_path / "s.npz")
    scores.save_stats(path, np.zeros(4), np.eye(4), "shapes_net_16px_0123456789")
    other = scores.FeatureNet("shapes_net_16px_abcdefabcd", 4, None, True)
    with pytest.raises(UserError, match="not of shapes_net_16px_abcdefabcd"):
        scores.load_stats(path, other)
    same = scores.FeatureNet("shapes_net_16px_0123456789", 4, None, True)
    mu, sigma = scores.load_stats(path, same)
    assert mu.shape == (4,) and np.array_equal(sigma, np.eye(4))
    np.savez(path, mean=np.zeros(4))  # a file without mu and sigma
    with pytest.raises(UserError, match="'mu' and 'sigma'"):
        scores.load_stats(path, same)


def test_stats_command_writes_statistics_that_load_back(torch_home, shape_features, tmp_path):
    """compute_fid_stats.py's library call of its command line, in this process."""
    out = str(tmp_path / "stats" / "shapes.train.npz")
    stage_in_process("compute_fid_stats.py", "--dataset=shapes", "--num_images=4", "--batch_size=4",
                     "--features=inception", f"--out={out}")
    net = scores.FeatureNet(scores.INCEPTION_NAME, inception.FID_DIM, None, False)
    mu, sigma = scores.load_stats(out, net)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    np.testing.assert_allclose(sigma, sigma.T)
    feats = shape_features[2][:4]  # the first 4 training images of shapes, computed in this process
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-4, atol=1e-6)
    assert not [name for name in os.listdir(tmp_path / "stats") if name != "shapes.train.npz"]


def fake_sampler(x_T, generator):
    """A sampler that also draws its own noise, like the ancestral one: [B, 3, H, W] in [-1, 1]."""
    return torch.tanh(x_T + 0.5 * torch.randn(x_T.shape, generator=generator))


def test_interrupted_generation_resumes_identically(tmp_path):
    size, num_images = 4, 10                     # 3 shards, the last one used in part
    plans = {name: shards.ShardPlan(str(tmp_path / name), size, 8, seed=5) for name in ("full", "part")}
    for name, max_new in (("full", None), ("part", 1)):
        _, todo = shards.plan_shards(plans[name], 3)
        assert todo == [0, 1, 2]
        assert shards.make_shards(fake_sampler, plans[name], todo, "cpu", max_new=max_new) == \
            (3 if max_new is None else 1)
    with open(shards.shard_path(plans["part"].folder, 1), "wb") as f:   # a torn write must not count as a shard
        f.write(b"PK\x03\x04 torn")
    torch.manual_seed(99)  # the global generator plays no part
    _, todo = shards.plan_shards(plans["part"], 3)
    assert todo == [1, 2]
    shards.make_shards(fake_sampler, plans["part"], todo, "cpu")
    a, b = (shards.gather_images(plans[name].folder, num_images, size) for name in ("full", "part"))
    assert a.shape == (num_images, 8, 8, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[:4], a[4:8])     # shards get different noise


def test_shards_are_split_round_robin_over_ranks(tmp_path):
    plan = shards.ShardPlan(str(tmp_path), 2, 8, 0)
    owned = [shards.plan_shards(plan, 7, rank, 3)[0] for rank in range(3)]
    assert owned == [[0, 3, 6], [1, 4], [2, 5]]


def test_to_uint8_rounds_the_range_onto_0_255():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    np.testing.assert_array_equal(shards.to_uint8(x)[0, 0, :, 0], [0, 0, 128, 255, 255])


def test_psnr_closed_form():
    a = torch.zeros(2, 3, 4, 4)
    assert psnr(a, a + 0.1) == pytest.approx(10 * np.log10(4 / 0.01))
    assert psnr(a, a) == float("inf")


def test_append_jsonl_keeps_earlier_lines(tmp_path):
    path = str(tmp_path / "snn_eval.txt")
    append_jsonl(path, {"FID": 1.5})
    append_jsonl(path, {"FID": None})
    assert [json.loads(line) for line in open(path)] == [{"FID": 1.5}, {"FID": None}]


def test_results_table_shows_the_energy_baselines():
    """One row per model: energy per image of the model itself, of its quantized ANN on integer
    hardware, the float-MAC ANN over the model (SNNs only) and the latency, from snn_eval lines."""
    from metrics.results import table
    common = {"sampler": "ddim", "sample_steps": 20, "num_images": 256, "features": "shapes_net", "FID": 30.0,
              "IS": 2.0, "recognisability": 0.4, "bit": 2}
    ann = {**common, "kind": "ann", "model_path": "logs/x/ckpt.pt", "spike_driven": True,
           "energy_pJ_per_image": 4.4e9, "int_ann_energy_pJ_per_image": 4.2e8, "energy_ratio_ann_over_snn": 1.0}
    snn = {**common, "kind": "snn", "model_path": "logs/x/converted_snn_tp.pt", "neuron": "two_phase",
           "norm": "compensated", "spike_driven": True, "energy_pJ_per_image": 5.7e8,
           "int_ann_energy_pJ_per_image": 4.2e8, "energy_ratio_ann_over_snn": 7.75, "latency_steps": 75,
           "firing_rate": 0.22, "psnr_snn_vs_ann_dB": 40.0}
    lines = table([ann, snn]).splitlines()
    assert "integer ANN / image (uJ)" in lines[2] and "ANN / model" in lines[2] and "latency (steps)" in lines[2]
    assert lines[4].startswith("| quantized ANN (2-bit), spike-driven |")
    assert "| 4400.0 | 420.0 | – | – |" in lines[4]
    assert lines[5].startswith("| SNN, converted, spike-driven | two_phase | compensated |")
    assert "| 570.0 | 420.0 | 7.75 | 75 | 0.220 |" in lines[5]
