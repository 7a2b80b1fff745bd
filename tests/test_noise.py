"""One rule for the fixed noise of sample grids and probes: ``diffusion.sample_noise``.

Its rule is pinned against torch's own generators; every place that draws such noise (training
grids, the conversion's ANN/SNN pair, fine-tuning grids and its sample judge, evaluation's probe
run, the benchmarks' scorer and energy probe) is shown to take it from the helper, in-process
where the code can run alone and by its syntax tree where it sits inside a script's run.
"""
import ast
import os
from types import SimpleNamespace

import pytest
import torch

from common.runtime import derived_seed
from diffusion import DDIMSampler, GaussianDiffusion, sample_noise
from helpers import ROOT
from snn import agreement

SHAPE = (3, 8, 8)


def stream(generator, n=16):
    """The next ``n`` standard normals of ``generator``."""
    return torch.randn(n, generator=generator, device=generator.device)


def test_the_rule():
    """x_T is torch.randn from a CPU generator seeded with ``seed``; the sampler's generator is
    seeded with derived_seed(seed, 1); the same seed gives the same of both, another seed others."""
    x_T, g = sample_noise(4, SHAPE, 7)
    assert x_T.shape == (4, *SHAPE) and g.device.type == "cpu"
    assert torch.equal(x_T, torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(stream(g), stream(torch.Generator().manual_seed(derived_seed(7, 1))))
    again_x, again_g = sample_noise(4, SHAPE, 7)
    assert torch.equal(again_x, x_T) and torch.equal(stream(again_g, 32)[16:], stream(g))
    other_x, other_g = sample_noise(4, SHAPE, 8)
    assert not torch.equal(other_x, x_T) and not torch.equal(stream(other_g), stream(sample_noise(4, SHAPE, 7)[1]))
    assert torch.equal(sample_noise(2, SHAPE, 7)[0], x_T[:2])  # fewer images: the first ones


def _noisy_sampler():
    return DDIMSampler(GaussianDiffusion(1e-4, 0.02, 20), 4, eta=1.0)  # eta 1: the sampler draws noise


def test_the_sample_judge_replays_the_helpers_noise():
    """A judge made from sample_noise(seed) draws, at every call, exactly the images the sampler
    draws from a fresh sample_noise(seed): x_T and the sampler's own noise both from the helper."""
    def model(x, t):
        return 0.1 * x

    sampler = _noisy_sampler()
    judge = agreement.SampleJudge(sampler, *sample_noise(3, SHAPE, 11), model)
    expected = sampler(model, *sample_noise(3, SHAPE, 11))
    assert torch.equal(judge.reference, expected) and torch.equal(judge.images(model), expected)
    assert not torch.equal(sampler(model, *sample_noise(3, SHAPE, 12)), expected)


def test_evaluations_probe_noise_is_the_helpers():
    """evaluate.py's probe run: sample_noise(--probe_images, shape, --seed + 1)."""
    from common.configs import EvalConfig
    from metrics.evaluation import Evaluation
    fake = SimpleNamespace(cfg=EvalConfig(eval_model_path="unused.pt", probe_images=3, seed=5),
                           loaded=SimpleNamespace(config=SimpleNamespace(image_shape=SHAPE)),
                           rt=SimpleNamespace(device="cpu"))
    x_T, g = Evaluation.probe_noise(fake)
    want_x, want_g = sample_noise(3, SHAPE, 6)
    assert torch.equal(x_T, want_x) and torch.equal(stream(g), stream(want_g))


def test_the_scorer_draws_the_helpers_noise_chunk_by_chunk():
    """bench/quality.py: chunk ``first`` of the images comes from sample_noise(derived_seed(seed,
    first)) (here a sampler that returns its x_T plus its first noise draw, to see both)."""
    from bench import quality

    seen = []

    def fake_build_sampler(cfg, sampler_cfg, device):
        def sampler(model, x_T, generator):
            seen.append((x_T.clone(), stream(generator, 4)))
            return torch.zeros(x_T.shape[0], *SHAPE)
        return None, sampler

    scorer = SimpleNamespace(num_images=5, batch_size=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quality, "build_sampler", fake_build_sampler)
        quality.Scorer.images(scorer, None, SimpleNamespace(image_shape=SHAPE), None, seed=3)
    assert [x.shape[0] for x, _ in seen] == [2, 2, 1]
    for (x_T, noise), first in zip(seen, (0, 2, 4)):
        want_x, want_g = sample_noise(x_T.shape[0], SHAPE, derived_seed(3, first))
        assert torch.equal(x_T, want_x) and torch.equal(noise, stream(want_g, 4))


# The functions inside the scripts' runs that draw grid / probe / judge noise: (file, function).
CALLERS = [("model/train.py", "TrainLoop.create"), ("model/train.py", "TrainLoop.sample_grid"),
           ("snn/conversion.py", "sample_pair"), ("snn/finetune_run.py", "FinetuneRun.sample_grid"),
           ("snn/finetune_run.py", "make_sample_error"), ("metrics/evaluation.py", "Evaluation.probe_noise"),
           ("bench/quality.py", "Scorer.images"), ("bench/energy.py", "measure")]


def function_node(path, qualname):
    tree = ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())
    node = tree
    for name in qualname.split("."):
        node = next(n for n in node.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == name)
    return node


def calls(node):
    """The dotted names of the functions ``node`` calls (``torch.randn``, ``sample_noise``, ...)."""
    names = []
    for n in ast.walk(node):
        if isinstance(n, ast.Call):
            f, parts = n.func, []
            while isinstance(f, ast.Attribute):
                parts.append(f.attr)
                f = f.value
            if isinstance(f, ast.Name):
                names.append(".".join([f.id, *reversed(parts)]))
    return names


@pytest.mark.parametrize("path, qualname", CALLERS)
def test_every_caller_takes_its_noise_from_the_helper(path, qualname):
    """Each caller calls sample_noise and draws no noise or generator of its own."""
    called = calls(function_node(path, qualname))
    assert "sample_noise" in called, f"{path} {qualname} does not use diffusion.sample_noise"
    own = [c for c in called if c.endswith(("randn", "randn_like", "Generator", "manual_seed"))
           or c in ("runtime.generator", "generator")]
    assert not own, f"{path} {qualname} draws its own noise: {own}"
