"""The fused IF neuron (snn/fused.py) against the reference loop (snn/steps.py).

Compiling costs seconds per (T, kind) pair, so the tests share six compiled kernels:
T = 3 unsigned, T = 3 signed, T = 3 graded, T = 3 two-phase (and its signed-levels variant) and
T = 7 unsigned (T = 7 signed alone compiles for half a minute on two cores). The graded neuron gets T = 3 only: its step differs from the
binary ones in a division, a floor, a clamp and a product with a non-binary spike, which T = 3
exercises as well as T = 7 (spikes up to +-3, thresholds hit exactly), and the unrolled loop is
the same code for every T. The kernels are compiled for dynamic sizes, so every shape below
reuses them (tests/test_neuron.py reuses the T = 3 graded one).
"""
import logging
import shutil

import pytest
import torch

from quant import quantize_activation
from snn import fused
from snn.neuron import IFNeuron, spike_train
from snn.steps import SIGNED_LEVELS, fold, if_spikes, time_mean, unfold

HAS_CXX = any(shutil.which(name) for name in ("g++", "c++", "clang++"))
needs_compiler = pytest.mark.skipif(not HAS_CXX, reason="torch.compile on the CPU needs a C++ compiler")


def bits(x):
    """The float32 bit patterns, so that -0.0 and 0.0 (or two NaNs) are told apart."""
    return x.contiguous().view(torch.int32)


def near_threshold_inputs(T, shape, theta, generator):
    """Inputs [T, *shape] that put the membrane exactly on, or one ulp either side of, ``theta``.

    Multiples of theta / 4 add up exactly in float32, so the membrane (which starts at theta / 2)
    lands on theta itself; ulp-sized nudges test the >= comparison from both sides.
    """
    steps = torch.randint(-4, 5, (T, *shape), generator=generator).float() * (theta / 4)
    nudge = torch.randint(-1, 2, (T, *shape), generator=generator).float()
    nudged = torch.nextafter(steps, steps + nudge)
    return torch.where(nudge == 0, steps, nudged)


@needs_compiler
@pytest.mark.parametrize("T,kind", [(3, "if"), (3, "signed"), (3, "graded"), (3, "two_phase"), (3, SIGNED_LEVELS),
                                    (7, "if")])
@pytest.mark.parametrize("shape", [(5,), (2, 3, 4, 4), (4, 32, 8, 8)])
def test_fused_equals_reference_bit_for_bit(T, kind, shape):
    g = torch.Generator().manual_seed(T * 100 + len(shape))
    theta = torch.tensor(0.7)  # not a binary fraction: rounding differences would show
    x = torch.randn(T, *shape, generator=g) * 0.8
    ref = if_spikes(x, theta, kind)
    out = fused.if_spikes_fused(x, theta, kind)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(bits(out), bits(ref))
    if x.numel() > 100:
        assert (ref > 0).any() and (kind in ("if", "two_phase") or (ref < 0).any()), \
            "the case must exercise (negative) spikes"
        assert (kind != "graded") or (ref.abs() > 1).any(), "and graded spikes larger than 1"


@needs_compiler
@pytest.mark.parametrize("T,kind", [(3, "if"), (3, "signed"), (3, "graded"), (3, "two_phase"), (3, SIGNED_LEVELS),
                                    (7, "if")])
def test_fused_equals_reference_near_threshold(T, kind):
    g = torch.Generator().manual_seed(7)
    theta = 0.75
    x = near_threshold_inputs(T, (3, 16, 8), theta, g)
    ref = if_spikes(x, theta, kind)
    assert torch.equal(bits(fused.if_spikes_fused(x, torch.tensor(theta), kind)), bits(ref))
    # the membrane sits exactly on the threshold somewhere: v = theta / 2 + theta / 2 at t = 0
    # (two-phase: after the whole window)
    first = x[0] if kind in ("if", "signed", "graded") else x.sum(0)
    assert ((first == theta / 2) & (ref[0] == 1)).any()


@needs_compiler
@pytest.mark.parametrize("theta", [0.01, 1.0, 10.0])
def test_fused_signed_neuron_tolerance(theta):
    """The hand-computed cases of the signed neuron's tolerance (tests/test_neuron.py), compiled:
    -5e-4 no negative spike, -2e-3 and -1e-3 one; and membranes a few ulps either side of
    float32(-1e-3), where the compiled comparison must round its constant as the reference does."""
    from test_neuron import tolerance_cases
    x, expected = tolerance_cases(theta, torch.float32)
    assert torch.equal(fused.if_spikes_fused(x, torch.tensor(theta), "signed"), expected)
    edge = torch.tensor(-1e-3, dtype=torch.float32)
    around = [edge]
    for direction in (-1.0, 1.0):
        value = edge
        for _ in range(3):
            value = torch.nextafter(value, torch.tensor(direction))
            around.append(value)
    m = torch.stack(around)  # [7]: float32(-1e-3) and three neighbours either side
    x = torch.stack([torch.full_like(m, theta / 2), m, torch.zeros_like(m)])
    ref = if_spikes(x, theta, "signed")
    assert torch.equal(bits(fused.if_spikes_fused(x, torch.tensor(theta), "signed")), bits(ref))
    assert ref[1].tolist() == [-1, -1, -1, -1, 0, 0, 0]  # at float32(-1e-3) and below: -1


@needs_compiler
def test_fused_constant_input_is_the_quantizer():
    """Closed form: over T = 3 steps the mean output equals the 2-bit quantizer."""
    theta = torch.tensor(1.3)
    x = torch.rand(4096, generator=torch.Generator().manual_seed(4)) * 2.5 - 0.5  # [-0.5, 2)
    spikes = fused.if_spikes_fused(x.expand(3, -1), theta, "if")
    assert torch.allclose(theta * spikes.mean(0), quantize_activation(x, theta, 3), atol=1e-6)


@needs_compiler
@pytest.mark.parametrize("kind", ["if", "signed", "graded", "two_phase"])
def test_neuron_module_kernels_agree(kind):
    T, B = 3, 2
    x = torch.randn(T * B, 32, 4, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    ref = IFNeuron(T, alpha=0.9, kind=kind)
    out_ref = ref(x)
    for kernels in ("compile", "auto"):
        neuron = IFNeuron(T, alpha=0.9, kind=kind, kernels=kernels)
        out = neuron(x)
        assert torch.equal(bits(out.detach()), bits(out_ref.detach()))
        # the threshold still gets its gradient through the output current theta * s
        neuron.act_alpha.grad = None
        time_mean(out, T).sum().backward()
        ref.act_alpha.grad = None
        time_mean(ref(x), T).sum().backward()
        assert torch.equal(neuron.act_alpha.grad, ref.act_alpha.grad)


def test_auto_falls_back_once_with_a_warning(monkeypatch, caplog):
    calls = []

    def broken(*args):
        calls.append(args)
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(fused, "_compiled_window", lambda kind: broken)
    monkeypatch.setattr(fused, "_failure", [])
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(2))
    with caplog.at_level(logging.WARNING, logger=fused.log.name):
        first = spike_train(x, 0.5, "signed", kernels="auto")
        second = spike_train(x * 2, 0.5, "signed", kernels="auto")
    assert torch.equal(first, if_spikes(x, 0.5, "signed"))
    assert torch.equal(second, if_spikes(x * 2, 0.5, "signed"))
    assert len(calls) == 1, "after the first failure 'auto' stops trying the compiler"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no compiler here" in warnings[0].getMessage()
    with pytest.raises(RuntimeError, match="no compiler here"):
        spike_train(x, 0.5, "signed", kernels="compile")  # asked for explicitly: the error shows


def test_unknown_kernels_and_kinds_are_refused():
    with pytest.raises(ValueError, match="kernels"):
        IFNeuron(3, kernels="triton")
    with pytest.raises(ValueError, match="kind"):
        IFNeuron(3, kind="lif")


def test_reference_kernels_are_the_loop():
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(3))
    neuron = IFNeuron(3, alpha=0.4, kind="signed")
    assert neuron.kernels == "reference"
    expected = fold(if_spikes(unfold(x, 3), torch.tensor(0.4), "signed")) * 0.4
    assert torch.equal(neuron(x).detach(), expected)


@needs_compiler
def test_kernels_chosen_at_construction_reach_every_quantizer_and_neuron():
    """--kernels: a UNet built with compiled kernels, and the SNN converted from it, compute what
    the reference-built ones compute."""
    from helpers import unet
    from quant import QuantReLU
    from snn import convert

    torch.manual_seed(0)
    cfg = dict(ch=32, ch_mult=[1, 2], attn=[], num_res_blocks=1, dropout=0.0, bit=2, alpha_init=1.0)
    ann = unet(100, **cfg).eval()
    ann_fused = unet(100, kernels="compile", **cfg).eval()
    ann_fused.load_state_dict(ann.state_dict())
    snn, snn_fused = convert(ann, "signed"), convert(ann_fused, "signed")
    assert all(m.kernels == "compile" for m in ann_fused.modules() if isinstance(m, QuantReLU))
    neurons = [m for m in snn_fused.modules() if isinstance(m, IFNeuron)]
    assert neurons and all(m.kernels == "compile" for m in neurons)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 70])
    with torch.no_grad():
        assert torch.equal(bits(ann_fused(x, t)), bits(ann(x, t)))
        assert torch.equal(bits(snn_fused(x, t)), bits(snn(x, t)))
    with pytest.raises(ValueError, match="kernels"):
        unet(100, kernels="triton", **cfg)


def quantizer_inputs(alpha, levels, generator):
    """Random values over [-alpha, 2 alpha] plus every rounding tie k * alpha / (2 L) and 0, +-alpha."""
    random = (torch.rand(4000, generator=generator) * 3 - 1) * alpha
    ties = torch.arange(-2, 4 * levels + 3, dtype=torch.float32) * (alpha / (2 * levels))
    return torch.cat([random, ties, torch.tensor([0.0, -0.0, alpha, -alpha])]).reshape(-1, 1, 1, 1)


@needs_compiler
@pytest.mark.parametrize("bit, signed", [(1, False), (2, False), (4, False), (2, True)])
def test_compiled_quantizer_equals_reference(bit, signed):
    """--kernels=compile: the fused quantizer (and the signed one) gives the reference's values and gradients."""
    from quant import QuantReLU

    generator = torch.Generator().manual_seed(bit)
    ref, fused = QuantReLU(bit, 1.3, signed=signed), QuantReLU(bit, 1.3, kernels="compile", signed=signed)
    x = quantizer_inputs(1.3, 2 ** bit - 1, generator)
    grad = torch.randn(x.shape, generator=generator)
    results = []
    for module in (ref, fused):
        xi = x.clone().requires_grad_()
        y = module(xi)
        y.backward(grad)
        results.append((y.detach(), xi.grad, module.act_alpha.grad))
    (y_ref, gx_ref, ga_ref), (y_fused, gx_fused, ga_fused) = results
    assert torch.equal(bits(y_fused), bits(y_ref))
    assert torch.equal(gx_fused, gx_ref)
    torch.testing.assert_close(ga_fused, ga_ref, rtol=1e-5, atol=1e-5)  # a sum: the order may differ


def test_quantizer_auto_falls_back_to_the_reference(monkeypatch):
    from quant import QuantReLU, activation

    def broken(*args):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(activation, "_compiled", broken)
    monkeypatch.setattr(activation, "_failure", [])
    x = torch.randn(64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    y = QuantReLU(2, 1.0, kernels="auto")(x)
    y.sum().backward()
    assert torch.equal(y, QuantReLU(2, 1.0)(x)) and len(activation._failure) == 1
    with pytest.raises(RuntimeError, match="no compiler here"):
        QuantReLU(2, 1.0, kernels="compile")(x)
