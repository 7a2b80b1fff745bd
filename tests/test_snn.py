"""IF neurons, the ANN -> SNN conversion and spike statistics / energy."""
import copy
import json

import pytest
import torch
import torch.nn as nn
from torch.nn import init

from model.data import load_dataset
from diffusion import GaussianDiffusion
from helpers import unet
from quant import QuantReLU
from snn import IFNeuron, SpikingUNet, convert, fold, if_spikes, swap_activations, time_mean, unfold
from snn.stats import ENERGY_PER_AC_PJ, ENERGY_PER_MAC_PJ, SpikeMonitor

SMALL = dict(ch=32, ch_mult=[1, 2], attn=[], num_res_blocks=1, dropout=0.0)  # T = 100 diffusion steps


def integer_level(x, alpha, levels):
    """The quantizer's integer level floor(relu(x) / alpha * L + 1/2), clamped to [0, L]."""
    return torch.floor(torch.relu(x) / alpha * levels + 0.5).clamp(0, levels)


# -- the neuron -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["if", "signed", "graded", "two_phase"])
@pytest.mark.parametrize("bit", [1, 2, 3, 4])
def test_constant_input_reproduces_quant_relu(bit, kind):
    """Over T = 2^bit - 1 steps of a constant input, the spike count is the quantizer's level."""
    T = 2 ** bit - 1
    gen = torch.Generator().manual_seed(bit)
    for _ in range(5):
        alpha = float(torch.empty(1).uniform_(0.2, 4.0, generator=gen))
        x = torch.empty(2048, dtype=torch.float64).uniform_(-0.5 * alpha, 1.5 * alpha, generator=gen)
        counts = if_spikes(x.expand(T, -1), alpha, kind).sum(0)
        assert torch.equal(counts, integer_level(x, alpha, T))

        neuron = IFNeuron(T, alpha, kind).double()
        quant = QuantReLU(bit, init_alpha=alpha).double()
        out = time_mean(neuron(x[None].expand(T, -1).reshape(T * 8, 256)), T).reshape(-1)
        torch.testing.assert_close(out, quant(x), rtol=0, atol=1e-12 * alpha)


@pytest.mark.parametrize("inputs, kind, expected", [
    ([0.9, -0.9, 0.0], "signed", [1, -1, 0]),     # fired, then the membrane drops below 0: -1
    ([0.9, -0.9, 0.0], "if", [1, 0, 0]),          # the plain neuron keeps its negative membrane
    ([-0.9, 0.9, 0.9], "signed", [0, 0, 1]),      # no -1 before the first spike
    ([1.0, 1.0, -2.0], "signed", [1, 1, -1]),     # at most one -1 per step
    ([0.3, 0.3, 0.3], "if", [0, 1, 0]),           # v: 0.8, 1.1 -> fire -> 0.1, 0.4
    ([0.3, 0.3, 0.3], "signed", [0, 1, 0]),
    ([0.3, 0.3, 0.3], "graded", [0, 1, 0]),
    ([0.9, -0.9, 0.0], "graded", [1, -1, 0]),
    ([1.0, 1.0, -2.0], "graded", [1, 1, -2]),     # v: 1.5, 1.5, -1.5: takes back both spikes at once
    ([2.6, 0.0, 0.0], "graded", [3, 0, 0]),       # v = 3.1: three levels in one step
    # the signed neuron's tolerance: after the spike at step 0 the membrane is 0 + x_1
    ([0.5, -5e-4, 0.0], "signed", [1, 0, 0]),     # v = -5e-4: above -1e-3, no -1 (v < 0 is not enough)
    ([0.5, -2e-3, 0.0], "signed", [1, -1, 0]),    # v = -2e-3: -1, and v = 0.998
    ([0.5, -1e-3, 0.0], "signed", [1, -1, 0]),    # v = -1e-3 exactly: -1 (at the tolerance or below)
    ([0.5, -5e-4, -5e-4], "signed", [1, 0, -1]),  # v: -5e-4, then -1e-3: -1 at the second step
    ([-0.5, -2e-3, 0.0], "signed", [0, 0, 0]),    # v = 0, -2e-3, but it never fired: no -1
])
def test_pinned_spike_trains(inputs, kind, expected):
    """Hand-computed spike trains of a neuron with theta = 1 (membrane starts at 0.5)."""
    x = torch.tensor(inputs, dtype=torch.float64)[:, None]
    assert if_spikes(x, 1.0, kind)[:, 0].tolist() == expected


@pytest.mark.parametrize("kind", ["if", "signed"])
def test_module_equals_function_on_time_varying_input(kind):
    signed = kind == "signed"
    T, alpha = 7, 0.8
    x = torch.randn(T, 4, 5, 3, generator=torch.Generator().manual_seed(0))
    out = IFNeuron(T, alpha, kind)(fold(x))
    expected = fold(if_spikes(x, alpha, kind)) * alpha
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    allowed = torch.tensor([-alpha, 0.0, alpha] if signed else [0.0, alpha])
    assert torch.isclose(out[..., None], allowed).any(-1).all()
    assert (out < 0).any() == signed  # this input drives some signed neurons below zero
    net_count = torch.cumsum(unfold(out, T), 0)
    assert (net_count >= -1e-6).all(), "the net spike count of a neuron never goes negative"
    if not signed:
        assert (out >= 0).all()


def test_neuron_threshold_gets_a_gradient():
    neuron = IFNeuron(3, 1.0)
    neuron(torch.full((6, 2), 0.7)).sum().backward()
    assert neuron.act_alpha.grad is not None and neuron.act_alpha.grad != 0


# -- conversion by module swap ----------------------------------------------------------------

class TinyNet(nn.Module):
    def __init__(self, bit):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.act = QuantReLU(bit, init_alpha=1.3)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SpikingTiny(nn.Module):
    """``TinyNet`` with IF neurons: the input repeated over T, the output averaged, as SpikingUNet does."""

    def __init__(self, ann, T, kind):
        super().__init__()
        self.T = T
        self.net = swap_activations(copy.deepcopy(ann), lambda q: IFNeuron(T, q.act_alpha.item(), kind))

    def forward(self, x):
        return time_mean(self.net(x.repeat(self.T, 1)), self.T)


@pytest.mark.parametrize("kind", ["if", "signed"])
@pytest.mark.parametrize("bit", [1, 2, 3, 4])
def test_linear_quant_linear_converts_exactly(bit, kind):
    torch.manual_seed(bit)
    ann = TinyNet(bit)
    snn = SpikingTiny(ann, 2 ** bit - 1, kind)
    assert isinstance(snn.net.act, IFNeuron) and isinstance(ann.act, QuantReLU)
    assert list(snn.net.state_dict()) == list(ann.state_dict())
    x = torch.randn(64, 6) * 2
    torch.testing.assert_close(snn(x), ann(x), rtol=1e-5, atol=1e-5)


def small_unet(bit=2, wbit=32, seed=0):
    """A small quantized UNet whose output depends on its input (no near-zero last layers),
    with thresholds calibrated to the 99th percentile of each activation's input."""
    torch.manual_seed(seed)
    ann = unet(100, bit=bit, wbit=wbit, **SMALL)
    for module in ann.modules():
        if isinstance(module, nn.Conv2d) and module.weight.abs().max() < 1e-3:
            init.xavier_uniform_(module.weight)
    calibrate(ann, torch.randn(8, 3, 16, 16), torch.randint(100, (8,)))
    return ann.eval()


@torch.no_grad()
def calibrate(ann, x, t):
    def set_alpha(module, args):
        module.act_alpha.fill_(max(float(torch.quantile(args[0].flatten().float(), 0.99)), 1e-2))

    handles = [m.register_forward_pre_hook(set_alpha) for m in ann.modules() if isinstance(m, QuantReLU)]
    ann(x, t)  # in forward order, so every layer is calibrated on calibrated inputs
    for handle in handles:
        handle.remove()


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("bit", [1, 2, 3])
def test_convert_unet_shape_state_and_time_steps(bit):
    ann = small_unet(bit)
    snn = convert(ann, "signed")
    assert isinstance(snn, SpikingUNet) and snn.time_steps == 2 ** bit - 1 and snn.neuron == "signed"
    assert sum(isinstance(m, IFNeuron) for m in snn.modules()) == \
        sum(isinstance(m, QuantReLU) for m in ann.modules())
    assert not any(isinstance(m, QuantReLU) for m in snn.modules())
    state, ann_state = snn.state_dict(), ann.state_dict()
    assert list(state) == list(ann_state)
    assert all(torch.equal(state[k], ann_state[k]) for k in state)
    assert not snn.training and isinstance(ann.time_embedding.timembedding[2], QuantReLU)  # ann untouched
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 90])
    with torch.no_grad():
        assert snn(x, t).shape == ann(x, t).shape == x.shape


def test_time_embedding_is_exact():
    """The time embedding's neuron sees a constant input, so the SNN's embedding is the ANN's."""
    ann = small_unet()
    snn = convert(ann, "if")
    t = torch.arange(0, 100, 7)
    with torch.no_grad():
        spiking = time_mean(snn.time_embedding(t.repeat(snn.time_steps)), snn.time_steps)
        torch.testing.assert_close(spiking, ann.time_embedding(t), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def trained():
    """A small 2-bit UNet trained for a few dozen steps on the shapes data, and noisy inputs
    (x_t, t) with t spread over the diffusion range."""
    torch.manual_seed(0)
    ann = unet(100, bit=2, **SMALL)
    diffusion = GaussianDiffusion(1e-4, 0.02, 100)
    dataset = load_dataset("shapes", None, 16)
    x_0 = torch.stack([dataset[i][0] for i in range(48)])
    optim = torch.optim.Adam(ann.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        loss = diffusion.training_losses(ann, x_0[torch.randint(32, (16,), generator=g)], g).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
    t = torch.linspace(0, 100 - 1, 16).long()
    x_t = diffusion.q_sample(x_0[32:], t, torch.randn(16, 3, 16, 16, generator=g))
    return ann.eval(), x_t, t


@pytest.mark.parametrize("kind", ["if", "signed"])
def test_learned_thresholds_carry_over(trained, kind):
    """The SNN with the ANN's learned thresholds predicts the noise far closer to the ANN than
    SNNs whose thresholds are off by 10x either way (measured: 0.42 against 0.64 and 1.00)."""
    ann, x_t, t = trained
    errors = {}
    with torch.no_grad():
        reference = ann(x_t, t)
        for factor in (1.0, 0.1, 10.0):
            scaled = copy.deepcopy(ann)
            for module in scaled.modules():
                if isinstance(module, QuantReLU):
                    module.act_alpha.data.mul_(factor)
            errors[factor] = relative_error(convert(scaled, kind)(x_t, t), reference)
    print(f"\n{kind} neurons: SNN-vs-ANN noise error {errors}")  # reported with pytest -s
    assert 0 < errors[1.0] < 0.8 * errors[0.1] and errors[1.0] < 0.5 * errors[10.0], errors


def test_apot_weights_convert_with_the_same_weights():
    ann = small_unet(wbit=4)
    snn = convert(ann, "signed")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 50])
    layer = ann.downblocks[0].block1[2]
    with torch.no_grad():
        assert torch.equal(snn.downblocks[0].block1[2].weight_quant(layer.weight), layer.weight_quant(layer.weight))
        assert torch.isfinite(snn(x, t)).all()


def test_convert_refuses_what_has_no_spiking_equivalent():
    with pytest.raises(ValueError, match="attention"):
        convert(unet(10, ch=32, ch_mult=[1], attn=[0], num_res_blocks=1, dropout=0.0, bit=32))
    with pytest.raises(ValueError, match="full-precision"):
        convert(unet(10, ch=32, ch_mult=[1], attn=[], num_res_blocks=1, dropout=0.0, bit=32))
    with pytest.raises(TypeError, match="UNet"):
        convert(TinyNet(2))


def test_convert_unwraps_data_parallel():
    ann = small_unet()
    snn = convert(nn.DataParallel(ann))
    assert isinstance(snn, SpikingUNet)


# -- spike statistics and energy --------------------------------------------------------------

def independent_counts(snn, x, t):
    """Spikes entering each linear/conv, captured with hooks of this test's own."""
    entering = {}

    def hook(module, args, out):
        entering[module] = entering.get(module, 0) + int(torch.count_nonzero(args[0]))

    handles = [m.register_forward_hook(hook) for m in snn.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        snn(x, t)
    for handle in handles:
        handle.remove()
    return entering


def test_monitor_counts_and_energy():
    ann = small_unet()
    snn = convert(ann, "signed")
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([5, 50, 95])
    monitor = SpikeMonitor(snn)
    with monitor:
        with torch.no_grad():
            snn(x[:2], t[:2])
            snn(x[2:], t[2:])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in snn.modules())
    s = json.loads(json.dumps(monitor.summary()))
    assert s["num_samples"] == 3 and s["num_forwards"] == 2 and s["time_steps"] == 3
    rows = {row["name"]: row for row in s["layers"]}
    ch, hw = SMALL["ch"], 16 * 16
    # analog inputs cost MACs; the head's input is the same at every step, so it runs once
    assert rows["head"]["input"] == "analog"
    assert rows["head"]["mac_per_sample"] == rows["head"]["ann_mac_per_sample"] == 3 * 9 * ch * hw
    assert rows["time_embedding.timembedding.1"]["input"] == "analog"
    assert rows["downblocks.2.shortcut"]["input"] == "analog"   # the ResBlock's analog input
    assert rows["downblocks.2.shortcut"]["mac_per_sample"] == 3 * rows["downblocks.2.shortcut"]["ann_mac_per_sample"]
    # a linear fed by a neuron: one accumulate per spike per output
    entering = independent_counts(snn, x, t)
    temb = snn.downblocks[0].temb_proj[1]
    assert rows["downblocks.0.temb_proj.1"]["input"] == "spikes"
    assert rows["downblocks.0.temb_proj.1"]["ac_per_sample"] == pytest.approx(entering[temb] * temb.out_features / 3)
    conv = snn.downblocks[0].block1[2]
    assert rows["downblocks.0.block1.2"]["ac_per_sample"] == pytest.approx(entering[conv] * conv.out_channels * 9 / 3)
    # totals and energies
    assert s["ac_per_sample"] == pytest.approx(sum(r.get("ac_per_sample", 0) for r in s["layers"]))
    assert s["energy_pJ_per_sample"] == pytest.approx(ENERGY_PER_AC_PJ * s["ac_per_sample"]
                                                      + ENERGY_PER_MAC_PJ * s["mac_per_sample"])
    neurons = [r for r in s["layers"] if r["type"] == "neuron"]
    assert len(neurons) == sum(isinstance(m, IFNeuron) for m in snn.modules())
    for r in neurons:
        assert r["firing_rate"] == pytest.approx(r["positive_rate"] + r["negative_rate"])
        assert 0 <= r["negative_rate"] <= r["positive_rate"] <= 1
        # binary spikes: one event each, so events per neuron-step are spikes per neuron-step
        assert r["spike_rate"] == r["firing_rate"] and r["multi_spike_fraction"] == 0
        assert r["negative_spike_fraction"] == pytest.approx(r["negative_rate"] / r["firing_rate"] if
                                                             r["firing_rate"] else 0.0)
    assert 0 < s["firing_rate"] < 1 and s["spike_rate"] == s["firing_rate"]
    assert 0 < s["negative_spike_fraction"] < 0.5 and s["multi_spike_fraction"] == 0


def test_monitor_of_the_ann_counts_the_same_macs():
    """A quantized UNet costs only MACs, and as many as the SNN's equivalent-ANN count."""
    ann = small_unet()
    snn = convert(ann, "if")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 60])
    wrapped = nn.DataParallel(ann)
    ann_monitor, snn_monitor = SpikeMonitor(wrapped), SpikeMonitor(snn)
    with torch.no_grad(), ann_monitor, snn_monitor:
        wrapped(x, t)
        snn(x, t)
    a, s = ann_monitor.summary(), snn_monitor.summary()
    assert a["ac_per_sample"] == 0 and a["firing_rate"] == 0 and a["num_samples"] == 2
    assert a["mac_per_sample"] == a["ann_mac_per_sample"] == pytest.approx(s["ann_mac_per_sample"])
    assert a["energy_pJ_per_sample"] == pytest.approx(ENERGY_PER_MAC_PJ * a["mac_per_sample"])
    assert s["ann_energy_pJ_per_sample"] == pytest.approx(a["energy_pJ_per_sample"])


def test_silent_network_costs_no_accumulates():
    ann = small_unet()
    for module in ann.modules():
        if isinstance(module, QuantReLU):
            module.act_alpha.data.fill_(1e6)
    snn = convert(ann)
    monitor = SpikeMonitor(snn)
    with monitor, torch.no_grad():
        snn(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    s = monitor.summary()
    assert s["firing_rate"] == 0 and s["ac_per_sample"] == 0 and s["mac_per_sample"] > 0
