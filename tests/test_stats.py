"""Spike statistics and energy with graded spikes: a spike of size k is k synaptic events."""
import json

import pytest
import torch
import torch.nn as nn

from helpers import unet
from snn import IFNeuron, convert, fold, time_mean
from snn.stats import SpikeMonitor, fan_out

THETA = 0.7  # not a binary fraction: the monitor must recover s from theta * s by rounding

# input currents in units of theta, [T = 3 steps, 4 neurons], and the spikes they cause
CURRENTS = [[2.6, 2.0, 0.6, -2.0],
            [0.0, -3.0, 0.0, 1.0],
            [0.0, 0.0, 0.0, 2.0]]
SPIKES = {  # membrane starts at theta / 2; worked out by hand, step by step
    # neuron 0: v = 3.1 -> 3 at once; 1: v = 2.5 -> 2, then -2.5 -> back to count 0 (-2, not -3);
    # 2: v = 1.1 -> 1; 3: v = -1.5 -> no negative count -> -0.5 -> 1.5 -> 1
    "graded": [[3, 2, 1, 0], [0, -2, 0, 0], [0, 0, 0, 1]],
    # neuron 0: v = 3.1 -> 2.1 -> 1.1 -> 0.1, one spike a step; the others fire once
    "if": [[1, 1, 1, 0], [1, 0, 0, 0], [1, 0, 0, 1]],
}


class TinySNN(nn.Module):
    """neuron -> dropout -> linear over T = 3 steps; forward(x [B, T, 4] currents) -> [B, 5]."""

    time_steps = 3

    def __init__(self, kind, p=0.0):
        super().__init__()
        self.neuron = IFNeuron(3, THETA, kind)
        self.drop = nn.Dropout(p)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return time_mean(self.fc(self.drop(self.neuron(fold(x.transpose(0, 1))))), 3)


def currents():
    """Two samples: the table above, and silence."""
    x = torch.tensor(CURRENTS) * THETA
    return torch.stack([x, torch.zeros_like(x)])


@pytest.mark.parametrize("kind", ["graded", "if"])
def test_hand_computed_counts(kind):
    model = TinySNN(kind).eval()
    monitor = SpikeMonitor(model)
    with monitor, torch.no_grad():
        model(currents())
    s = json.loads(json.dumps(monitor.summary()))
    spikes = torch.tensor(SPIKES[kind], dtype=torch.float32)
    events, steps = float(spikes.abs().sum()), 2 * 3 * 4  # two samples, three steps, four neurons
    positive, negative = float(spikes.clamp(min=0).sum()), float((-spikes).clamp(min=0).sum())
    nonzero = float((spikes != 0).sum())
    expected = {"firing_rate": events / steps, "positive_rate": positive / steps, "negative_rate": negative / steps,
                "spike_rate": nonzero / steps, "negative_spike_fraction": float((spikes < 0).sum()) / nonzero,
                "multi_spike_fraction": float((spikes.abs() > 1).sum()) / nonzero}
    if kind == "graded":  # 9 events in 5 spikes: 3, 2, 1, -2, 1
        assert (events, positive, negative, nonzero) == (9, 7, 2, 5)
        assert expected["multi_spike_fraction"] == 3 / 5 and expected["negative_spike_fraction"] == 1 / 5
    else:  # binary: events are spikes
        assert (events, nonzero, negative) == (6, 6, 0)
    rows = {row["name"]: row for row in s["layers"]}
    for key, value in expected.items():
        assert s[key] == pytest.approx(value) and rows["neuron"][key] == pytest.approx(value), key
    # the linear reads theta * s: one accumulate per event and output, per sample
    assert rows["fc"]["input"] == "spikes" and rows["fc"]["mac_per_sample"] == 0
    assert rows["fc"]["ac_per_sample"] == pytest.approx(events * 5 / 2)
    assert rows["fc"]["ann_mac_per_sample"] == 4 * 5  # fan_in * outputs, once per sample


def test_training_dropout_counts_the_events_it_keeps():
    """Dropout in training mode scales the spikes it keeps by 1 / (1 - p): still k events each."""
    torch.manual_seed(0)
    model = TinySNN("graded", p=0.5).train()
    kept = {}
    model.drop.register_forward_hook(lambda module, args, out: kept.update(mask=out != 0))
    monitor = SpikeMonitor(model)
    with monitor, torch.no_grad():
        model(currents())
    spikes = torch.tensor(SPIKES["graded"], dtype=torch.float32)
    sample_major = torch.stack([spikes, torch.zeros_like(spikes)], 1).reshape(6, 4)  # [T*B, 4]
    events = float((sample_major.abs() * kept["mask"]).sum())
    assert 0 < events < 9, "the mask must drop some spikes and keep some"
    assert monitor.summary()["ac_per_sample"] == pytest.approx(events * 5 / 2)


def test_graded_unet_counts_events_of_spike_inputs():
    """A graded 2-bit SNN: every spike-fed layer costs sum |s| * fan_out ACs, s = input / theta,
    counted here with hooks of the test's own; graded spikes of 2 and 3 and negative ones occur."""
    torch.manual_seed(0)
    ann = unet(100, ch=32, ch_mult=[1], attn=[], num_res_blocks=1, dropout=0.0, bit=2, alpha_init=0.5)
    snn = convert(ann.eval(), "graded", "compensated")
    thetas, events = {}, {}
    for m in snn.modules():
        if isinstance(m, IFNeuron):
            m.register_forward_hook(lambda module, args, out: thetas.update({id(out): float(module.act_alpha)}))
    for m in snn.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            def count(module, args, out):
                if id(args[0]) in thetas:
                    events[module] = float((args[0] / thetas[id(args[0])]).round().abs().sum())
            m.register_forward_hook(count)
    monitor = SpikeMonitor(snn)
    with monitor, torch.no_grad():
        snn(torch.randn(2, 3, 8, 8), torch.tensor([10, 90]))
    s = monitor.summary()
    rows = {row["name"]: row for row in s["layers"]}
    names = {m: name for name, m in snn.named_modules()}
    assert events and all(rows[names[m]]["ac_per_sample"] == pytest.approx(e * fan_out(m) / 2)
                          for m, e in events.items())
    assert s["ac_per_sample"] == pytest.approx(sum(e * fan_out(m) for m, e in events.items()) / 2)
    assert s["firing_rate"] > s["spike_rate"] > 0 and 0 < s["multi_spike_fraction"] < 1
    assert 0 < s["negative_spike_fraction"] < 1
    assert s["firing_rate"] == pytest.approx(s["positive_rate"] + s["negative_rate"])
