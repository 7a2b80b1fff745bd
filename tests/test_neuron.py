"""Proofs for the spiking UNet's two exact parts: the graded neuron and compensated GroupNorm.

Every layer of the UNet is linear except the activations and GroupNorm, so the SNN's time-mean
output is the ANN's as soon as both are exact over the T steps. The tests check closed forms
(float64, to rounding), the whole float64 network, and why float32 is judged differently.
"""
import copy
import functools
import shutil

import pytest
import torch
import torch.nn as nn
from torch.nn import init

from helpers import unet
from quant import QuantReLU, quantize_activation
from quant.activation import quantize_signed
from snn import IFNeuron, SpikingUNet, convert, fold, swap_activations, time_mean, unfold
from snn.convert import Hold
from snn.neuron import spike_train
from snn.steps import SIGNED_LEVELS, if_spikes
from snn.stats import SpikeMonitor
from snn.norm import CompensatedGroupNorm, swap_group_norms

HAS_CXX = any(shutil.which(name) for name in ("g++", "c++", "clang++"))
SMALL = dict(ch=32, ch_mult=[1, 2], attn=[], num_res_blocks=1, dropout=0.0)  # T = 100 diffusion steps


def loop_spikes(x, theta, kind):
    """The neurons from their definitions, step by step: x [T, ...] -> integer spikes [T, ...].

    For ``if`` and ``signed`` this is the reference loop the project had before the step
    functions, operation for operation (with the reference codes' tolerance of the signed
    neuron: -1 at a membrane of -1e-3 or below), so equality with it pins today's spikes.
    """
    theta = torch.as_tensor(theta, dtype=x.dtype)
    levels = x.shape[0]
    v = (theta / 2).expand_as(x[0]).clone()
    count = torch.zeros_like(x[0])
    spikes = torch.empty_like(x)
    for t in range(levels):
        v = v + x[t]
        if kind == "graded":
            s = torch.clamp(torch.floor(v / theta), -count, levels - count)
        else:
            s = (v >= theta).to(x.dtype)
        v = v - s * theta
        if kind == "signed":
            n = ((v <= -1e-3) & (count > 0)).to(x.dtype)
            v = v + n * theta
            s = s - n
        count = count + s
        spikes[t] = s
    return spikes


def near_threshold(T, shape, theta, generator, dtype=torch.float32):
    """Inputs [T, *shape] in multiples of theta / 4 (exact sums: the membrane lands on multiples of
    theta), some nudged by one ulp either way; steps of up to 3 theta make graded spikes of 2, 3."""
    steps = torch.randint(-12, 13, (T, *shape), generator=generator).to(dtype) * (theta / 4)
    nudge = torch.randint(-1, 2, (T, *shape), generator=generator).to(dtype)
    return torch.where(nudge == 0, steps, torch.nextafter(steps, steps + nudge))


# -- the neuron -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["if", "signed", "graded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_functions_are_the_definitions(kind, dtype):
    """Random and on-threshold inputs: the spikes equal the loop above (binary: today's spikes)."""
    g = torch.Generator().manual_seed(5)
    for T, theta in ((3, 0.7), (7, 0.75), (15, 1.3)):
        x = torch.randn(T, 6, 50, generator=g).to(dtype) * theta
        assert torch.equal(if_spikes(x, theta, kind), loop_spikes(x, theta, kind))
        x = near_threshold(T, (6, 50), theta, g, dtype)
        assert torch.equal(if_spikes(x, theta, kind), loop_spikes(x, theta, kind))


def tolerance_cases(theta, dtype):
    """Inputs [3, 4] and hand-computed spikes of a signed neuron: the first step brings the membrane
    from theta / 2 to theta exactly (a spike, then v = 0), the second to m; -1 exactly when m is at
    -1e-3 or below, whatever theta."""
    m = torch.tensor([-5e-4, -2e-3, -1e-3, -0.0], dtype=dtype)
    x = torch.stack([torch.full_like(m, theta / 2), m, torch.zeros_like(m)])
    expected = torch.tensor([[1, 1, 1, 1], [0, -1, -1, 0], [0, 0, 0, 0]], dtype=dtype)
    return x, expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("theta", [0.01, 1.0, 10.0])
def test_signed_neuron_tolerance_is_absolute(theta, dtype):
    """The reference codes' signed neuron: a membrane of -5e-4 gives no negative spike, -2e-3 and
    -1e-3 give one, for a threshold of 0.01 as for 10 (an absolute tolerance)."""
    from snn.steps import SIGNED_TOLERANCE
    assert SIGNED_TOLERANCE == 1e-3
    x, expected = tolerance_cases(theta, dtype)
    assert torch.equal(if_spikes(x, theta, "signed"), expected)
    neuron = IFNeuron(3, theta, "signed").to(dtype)  # its threshold: theta rounded to float32
    x, expected = tolerance_cases(neuron.act_alpha.item(), dtype)
    assert torch.equal(neuron(fold(x)).detach(), fold(expected) * neuron.act_alpha.detach())


@pytest.mark.parametrize("bit", [1, 2, 3, 4])
def test_graded_count_is_the_quantizer_level_at_every_step(bit):
    """Net count after step t = clamp(floor(S_t / theta + 1/2), 0, L) for time-varying input; after
    T = L steps the mean output is the b-bit quantizer of the mean input."""
    L = 2 ** bit - 1
    g = torch.Generator().manual_seed(bit)
    theta = float(torch.empty(1).uniform_(0.3, 3.0, generator=g))
    mean = torch.empty(4096, dtype=torch.float64).uniform_(-0.5 * theta, 1.5 * theta, generator=g)
    x = mean + 2 * theta * torch.randn(L, 4096, dtype=torch.float64, generator=g)
    s = if_spikes(x, theta, "graded")
    assert torch.equal(s, s.round()) and s.abs().max() <= L
    level = torch.clamp(torch.floor(torch.cumsum(x, 0) / theta + 0.5), 0, L)
    assert torch.equal(torch.cumsum(s, 0), level)
    out = time_mean(IFNeuron(L, theta, "graded").double()(fold(x[:, :, None])), L)[:, 0]
    torch.testing.assert_close(out, quantize_activation(x.mean(0), theta, L), rtol=0, atol=1e-12 * theta)
    if bit > 1:  # (one step can neither take back nor exceed L = 1)
        assert (s < 0).any() and (s.abs() > 1).any(), "the input must exercise graded spikes"


def test_graded_spikes_take_back_at_most_what_was_sent():
    """theta = 1: hand-computed graded trains (membrane starts at 0.5, L = T = 3)."""
    cases = [([2.6, 0.0, 0.0], [3, 0, 0]),     # v = 3.1: all three levels at once
             ([5.0, 0.0, 0.0], [3, 0, 0]),     # capped at L - count
             ([2.0, -3.0, 0.0], [2, -2, 0]),   # v: 2.5 -> 0.5 -> -2.5: back to count 0, not below
             ([-2.0, 1.0, 2.0], [0, 0, 1])]    # v: -1.5 (no negative count) -> -0.5 -> 1.5
    for inputs, expected in cases:
        x = torch.tensor(inputs, dtype=torch.float64)[:, None]
        assert if_spikes(x, 1.0, "graded")[:, 0].tolist() == expected


@pytest.mark.skipif(not HAS_CXX, reason="torch.compile on the CPU needs a C++ compiler")
def test_fused_graded_equals_reference_bit_for_bit():
    """T = 3 (the kernel tests/test_fused.py compiles too): multi-level spikes, exact multiples of
    theta, ulp nudges, through the module with every kernel choice."""
    g = torch.Generator().manual_seed(11)
    for theta in (0.75, 0.7, 1.3):
        x = near_threshold(3, (4, 32, 8), theta, g)
        ref = if_spikes(x, theta, "graded")
        out = spike_train(x, torch.tensor(theta), "graded", "compile")
        assert torch.equal(out.view(torch.int32), ref.view(torch.int32))
        assert (ref.abs() == 3).any() and (ref < 0).any()
    x = fold(torch.randn(3, 2, 32, 4, 4, generator=g) * 1.5)
    neurons = [IFNeuron(3, 0.9, "graded", kernels) for kernels in ("reference", "compile", "auto")]
    outs = [n(x).detach() for n in neurons]
    assert all(torch.equal(o.view(torch.int32), outs[0].view(torch.int32)) for o in outs)


@pytest.mark.parametrize("bit", [1, 2, 3, 4])
@pytest.mark.parametrize("signed", [False, True])
def test_two_phase_count_is_the_quantizer_in_any_order(bit, signed):
    """Random time-varying inputs, the same inputs in random orders in time: the count is
    clamp(floor(S / theta + 1/2), 0 (signed: -L), L) every time, fired as |count| spikes of one
    sign at the start of the window; the mean output is the b-bit (signed) quantizer of the mean
    input."""
    L = 2 ** bit - 1
    kind = SIGNED_LEVELS if signed else "two_phase"
    g = torch.Generator().manual_seed(10 * bit + signed)
    theta = float(torch.empty(1).uniform_(0.3, 3.0, generator=g))
    mean = torch.empty(4096, dtype=torch.float64).uniform_(-1.5 * theta, 1.5 * theta, generator=g)
    x = mean + 2 * theta * torch.randn(L, 4096, dtype=torch.float64, generator=g)
    level = torch.clamp(torch.floor(x.sum(0) / theta + 0.5), -L if signed else 0, L)
    for _ in range(4):
        order = torch.stack([torch.randperm(L, generator=g) for _ in range(4096)], 1)  # per neuron
        s = if_spikes(torch.gather(x, 0, order), theta, kind)
        assert set(s.unique().tolist()) <= ({-1.0, 0.0, 1.0} if signed else {0.0, 1.0})
        assert torch.equal(s.sum(0), level)
        steps = torch.arange(L, dtype=torch.float64)[:, None]
        assert torch.equal(s, (steps < level.abs()).double() * level.sign())  # front-loaded
    quantizer = quantize_signed if signed else quantize_activation
    out = time_mean(IFNeuron(L, theta, "two_phase", signed=signed).double()(fold(x[:, :, None])), L)[:, 0]
    torch.testing.assert_close(out, quantizer(x.mean(0), theta, L), rtol=0, atol=1e-12 * theta)
    assert (level == L).any() and (level == 0).any() and (not signed or (level == -L).any())


def test_two_phase_spike_trains_by_hand():
    """theta = 1, T = 3: the membrane starts at 0.5 and integrates the window before it fires."""
    cases = [([2.6, 0.0, -1.0], [1, 1, 0]),   # v = 2.1: two spikes
             ([-1.0, 0.0, 2.6], [1, 1, 0]),   # the same inputs later: the same spikes, first
             ([0.25, 0.0, 0.25], [1, 0, 0]),  # v = 1.0: one spike (on the threshold fires)
             ([0.25, 0.125, 0.0], [0, 0, 0]),  # v = 0.875: none
             ([5.0, 0.0, 0.0], [1, 1, 1]),    # capped at one spike a step, T in all
             ([3.0, -3.0, 1.5], [1, 1, 0])]   # v = 2.0; the IF neuron fires 1, 0, 1
    for inputs, expected in cases:
        x = torch.tensor(inputs, dtype=torch.float64)[:, None]
        assert if_spikes(x, 1.0, "two_phase")[:, 0].tolist() == expected, inputs
    x = torch.tensor([-2.6, 0.0, 1.0], dtype=torch.float64)[:, None]  # v = -1.1: two negative spikes
    assert if_spikes(x, 1.0, SIGNED_LEVELS)[:, 0].tolist() == [-1, -1, 0]
    with pytest.raises(ValueError, match="two_phase"):
        IFNeuron(3, 1.0, "graded", signed=True)


# -- compensated GroupNorm --------------------------------------------------------------------

def random_norm(T, channels=64, groups=32):
    """A float64 compensated GroupNorm with random affine parameters, and the plain one."""
    g = torch.Generator().manual_seed(T)
    norm = CompensatedGroupNorm(T, groups, channels).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(channels, generator=g, dtype=torch.float64))
        norm.bias.copy_(torch.randn(channels, generator=g, dtype=torch.float64))
    plain = nn.GroupNorm(groups, channels).double()
    plain.load_state_dict(norm.state_dict())
    return norm.requires_grad_(False), plain.requires_grad_(False)


def varying_input(T, B=3, channels=64, seed=0):
    """[T*B, C, 5, 5] float64: a per-sample offset plus noise that changes every step."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, B, channels, 5, 5, generator=g, dtype=torch.float64) * 2 + 1
    return fold(base + torch.randn(T, B, channels, 5, 5, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("T", [1, 3, 7, 15])
def test_compensated_group_norm_sums_to_the_norm_of_the_mean(T):
    """Prefix sums o_1 + ... + o_t = t * GN(S_t / t); at t = T, T * GN(mean input)."""
    norm, plain = random_norm(T)
    x = varying_input(T)
    out = unfold(norm(x), T)
    assert out.shape == unfold(x, T).shape
    expected = T * plain(time_mean(x, T))
    torch.testing.assert_close(out.sum(0), expected, rtol=0, atol=1e-12 * float(expected.abs().max()))
    prefix = torch.cumsum(unfold(x, T), 0)
    for t in range(1, T + 1):
        closed = t * plain(prefix[t - 1] / t)
        torch.testing.assert_close(out[:t].sum(0), closed, rtol=0, atol=1e-12 * float(closed.abs().max()))
    torch.testing.assert_close(out[0], plain(unfold(x, T)[0]), rtol=0, atol=1e-13)  # o_1 = GN(x_1)


def test_compensated_group_norm_is_causal():
    """Changing the last step's input changes no earlier output, bit for bit."""
    T = 7
    norm, _ = random_norm(T)
    x = varying_input(T)
    changed = unfold(x, T).clone()
    changed[-1] += torch.randn(changed[-1].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    before, after = unfold(norm(x), T), unfold(norm(fold(changed)), T)
    assert torch.equal(before[:-1], after[:-1]) and not torch.equal(before[-1], after[-1])


def test_swap_group_norms_keeps_names_and_values():
    model = nn.Sequential(nn.Conv2d(3, 32, 1), nn.GroupNorm(8, 32), nn.Sequential(nn.GroupNorm(4, 32, eps=1e-3)))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_(), m.bias.normal_()
    state = copy.deepcopy(model.state_dict())
    swap_group_norms(model, 3)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 2 and all(isinstance(m, CompensatedGroupNorm) and m.time_steps == 3 for m in norms)
    assert (norms[1].num_groups, norms[1].eps) == (4, 1e-3)
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    x = torch.randn(2, 32, 4, 4)  # T = 1: the compensated norm is the plain one
    assert torch.equal(CompensatedGroupNorm.from_group_norm(nn.GroupNorm(8, 32), 1)(x), nn.GroupNorm(8, 32)(x))


# -- the whole network ------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def random_unet(bit, size=16, seed=0, calibration=8, **fields):
    """A random quantized UNet (``SMALL``, updated by ``fields``) whose output depends on its input
    (the near-zero last convs are re-initialised) with every threshold at the 99th percentile of
    its activation's input over ``calibration`` random images.

    Shared between tests (built once): convert or deep-copy it, never change it."""
    torch.manual_seed(seed)
    ann = unet(100, bit=bit, **{**SMALL, **fields})
    for module in ann.modules():
        if isinstance(module, nn.Conv2d) and module.weight.abs().max() < 1e-3:
            init.xavier_uniform_(module.weight)

    def calibrate(module, args):
        module.act_alpha.data.fill_(max(float(torch.quantile(args[0].flatten(), 0.99)), 1e-2))

    hooks = [m.register_forward_pre_hook(calibrate) for m in ann.modules() if isinstance(m, QuantReLU)]
    with torch.no_grad():
        ann(torch.randn(calibration, 3, size, size), torch.randint(100, (calibration,)))
    for hook in hooks:
        hook.remove()
    return ann.eval()


def relative_error(a, b):
    """Per sample: ||a - b|| / ||b|| over all but the first dimension, [B]."""
    return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)


def inputs(batch, size, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g).to(dtype), torch.randint(100, (batch,), generator=g)


@pytest.mark.parametrize("bit", [2, 3])
def test_graded_compensated_snn_is_the_ann_in_float64(bit):
    """Graded neurons + compensated GroupNorm: the SNN's output is the ANN's, to float64 rounding."""
    ann = random_unet(bit)
    snn = convert(ann, "graded", "compensated").double()
    ann = copy.deepcopy(ann).double()  # the float32 weights of the SNN, exactly
    x, t = inputs(4, 16, torch.float64)
    with torch.no_grad():
        reference = ann(x, t)
        err = relative_error(snn(x, t), reference)
        moved = relative_error(ann(x.flip(0), t), reference)
    print(f"\nbit {bit}: float64 graded+compensated SNN vs ANN, relative error {float(err.max()):.1e}")
    assert float(err.max()) < 1e-12
    assert float(moved.min()) > 0.1, "the output depends on the input"


@pytest.mark.parametrize("fields", [{}, {"spike_driven": True}, {"spike_driven": True, "resample": "act_conv"},
                                    {"spike_driven": True, "resample": "signed_conv"},
                                    {"spike_driven": True, "shortcut": "signed"},
                                    {"spike_driven": True, "shortcut": "fold"}])
def test_two_phase_compensated_snn_is_the_ann_in_float64(fields):
    """Two-phase neurons + compensated GroupNorm: the SNN is its ANN to float64 rounding, with
    binary spikes only (signed ones for the signed quantizer), for the seed's and the spike-driven UNets."""
    ann = random_unet(2, ch_mult=(1, 2, 2), **fields)
    snn = convert(ann, "two_phase", "compensated").double()
    x, t = inputs(2, 16, torch.float64)
    monitor = SpikeMonitor(snn)
    with torch.no_grad(), monitor:
        reference = copy.deepcopy(ann).double()(x, t)
        err = relative_error(snn(x, t), reference)
    s = monitor.summary()
    print(f"\n{fields}: float64 two-phase+compensated SNN vs ANN, relative error {float(err.max()):.1e}")
    assert float(err.max()) < 1e-12
    assert s["multi_spike_fraction"] == 0 and s["firing_rate"] > 0.01
    assert (s["negative_spike_fraction"] > 0) == ("signed" in (fields.get("resample"), fields.get("shortcut")) or
                                                  fields.get("resample") == "signed_conv")


def test_two_phase_snn_of_a_cifar10_sized_unet_is_its_ann_in_float64():
    """ch 128, ch_mult 1 2 2 2, two ResBlocks a level, 32x32, one image: error <= 1e-12, spikes in {0, 1}."""
    ann = random_unet(2, size=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, dropout=0.1, calibration=2)
    snn = convert(ann, "two_phase", "compensated").double()
    x, t = inputs(1, 32, torch.float64, seed=3)
    monitor = SpikeMonitor(snn)
    with torch.no_grad(), monitor:
        reference = copy.deepcopy(ann).double()(x, t)
        err = float(relative_error(snn(x, t), reference).max())
    s = monitor.summary()
    print(f"\nCIFAR-10-sized UNet: float64 two-phase+compensated SNN vs ANN, relative error {err:.1e}, "
          f"{s['firing_rate']:.3f} spikes per neuron per step")
    assert err <= 1e-12 and float(reference.abs().max()) > 0
    assert s["multi_spike_fraction"] == 0 and s["negative_spike_fraction"] == 0 and s["firing_rate"] > 0.01


def test_two_phase_holds_the_analog_inputs():
    """Every weight layer that reads the analog stream reads its window mean, the same at every
    step (so its MACs are counted once); no other layer's input changes."""
    ann = random_unet(2, ch_mult=(1, 2, 2))
    snn = convert(ann, "two_phase", "compensated")
    holds = [name for name, m in snn.named_modules() if isinstance(m, Hold)]
    assert sorted(holds) == sorted([n + ".shortcut_input" for n, m in snn.named_modules()
                                    if isinstance(getattr(m, "shortcut", None), nn.Conv2d)] +
                                   [f"{p}.act" for p, m in snn.named_modules() if type(m).__name__ in
                                    ("DownSample", "UpSample")])
    monitor = SpikeMonitor(snn)
    with torch.no_grad(), monitor:
        snn(*inputs(2, 16, torch.float32))
    rows = [r for r in monitor.summary()["layers"] if r["type"] != "neuron"]
    analog = {r["name"] for r in rows if r["input"] == "analog"}
    assert {"head", "time_embedding.timembedding.1"} < analog and len(analog) == len(holds) + 2
    assert all(r["mac_per_sample"] == r["ann_mac_per_sample"] for r in rows if r["input"] == "analog")
    assert all(r["mac_per_sample"] == 0 and r["ac_per_sample"] > 0 for r in rows if r["input"] == "spikes")
    streaming = SpikeMonitor(convert(ann, "graded", "compensated"))
    assert not any(isinstance(m, Hold) for m in streaming.root.modules())


def test_one_exact_part_alone_is_not_the_ann():
    """Sensitivity of the test above: with either part per step / binary, the SNN is far off."""
    ann = random_unet(2)
    x, t = inputs(2, 16, torch.float64)
    with torch.no_grad():
        reference = copy.deepcopy(ann).double()(x, t)
        for neuron, norm in (("graded", "step"), ("two_phase", "step"), ("if", "compensated"),
                             ("signed", "compensated")):
            snn = convert(ann, neuron, norm).double()
            assert float(relative_error(snn(x, t), reference).min()) > 1e-2, (neuron, norm)


class LoopNeuron(nn.Module):
    """``loop_spikes`` as a layer with the threshold of ``neuron``: today's IF neuron."""

    def __init__(self, neuron):
        super().__init__()
        self.T, self.kind, self.theta = neuron.time_steps, neuron.kind, neuron.act_alpha.detach().clone()

    def forward(self, x):
        return fold(loop_spikes(unfold(x, self.T), self.theta, self.kind)) * self.theta


@pytest.mark.parametrize("kind", ["if", "signed"])
def test_binary_step_snn_is_todays(kind):
    """The default norm='step' keeps plain per-step GroupNorm, and the binary SNN computes, bit for
    bit, what the same network with the loop neurons computes."""
    snn = convert(random_unet(2), kind)
    assert snn.norm == "step" and snn.neuron == kind
    assert all(type(m) is nn.GroupNorm for m in snn.modules() if isinstance(m, nn.GroupNorm))
    today = swap_activations(copy.deepcopy(snn), LoopNeuron)
    x, t = inputs(2, 16, torch.float32)
    with torch.no_grad():
        assert torch.equal(snn(x, t), today(x, t))


@pytest.mark.parametrize("neuron", ["if", "signed", "graded", "two_phase"])
@pytest.mark.parametrize("norm", ["step", "compensated"])
def test_every_neuron_and_norm_converts(neuron, norm):
    ann = random_unet(2)
    snn = convert(ann, neuron, norm)
    assert isinstance(snn, SpikingUNet) and (snn.neuron, snn.norm) == (neuron, norm)
    assert all(m.kind == neuron for m in snn.modules() if isinstance(m, IFNeuron))
    norms = [m for m in snn.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(isinstance(m, CompensatedGroupNorm) == (norm == "compensated") for m in norms)
    state, ann_state = snn.state_dict(), ann.state_dict()
    assert list(state) == list(ann_state) and all(torch.equal(state[k], ann_state[k]) for k in state)
    strict = SpikingUNet(ann.config, ann.T, neuron=neuron, norm=norm)
    strict.load_state_dict(ann_state)  # strict: the names are the ANN's
    x, t = inputs(1, 8, torch.float32)
    with torch.no_grad():
        assert snn(x, t).shape == x.shape
    with pytest.raises(ValueError, match="norm"):
        convert(ann, neuron, "batch")


def test_float32_snn_is_as_close_to_the_exact_ann_as_the_float32_ann():
    """float32: a quantized network is discontinuous, so reordering float additions (which the SNN
    does: its sums run over time steps) moves a value across a rounding tie now and then, and
    that one level propagates through the rest of the network. The float32 ANN itself does so
    against the float64 one. So the SNN is held to the ANN's own float32 error: per sample, the
    typical (median) error within twice the ANN's plus 1e-6, and few samples off by a flip."""
    ann = random_unet(2, size=32)
    x, t = inputs(16, 32, torch.float32, seed=1)
    with torch.no_grad():
        exact = copy.deepcopy(ann).double()(x.double(), t)
        ann_err = relative_error(ann(x, t).double(), exact)
        snn_err = relative_error(convert(ann, "graded", "compensated")(x, t).double(), exact)
    print(f"\nfloat32 vs the float64 ANN, per-sample relative error: ANN median {ann_err.median():.1e} "
          f"max {ann_err.max():.1e}; graded+compensated SNN median {snn_err.median():.1e} max {snn_err.max():.1e}")
    assert float(ann_err.median()) > 0, "float32 differs from float64"
    assert float(snn_err.median()) <= 2 * float(ann_err.median()) + 1e-6
    assert int((snn_err > 1e-4).sum()) <= 4, "a level flip is a rare event"
