"""Spike statistics and energy with graded spikes: a spike of size k is k synaptic events."""
import json

import pytest
import torch
import torch.nn as nn

from helpers import unet
from quant import QuantReLU
from snn import IFNeuron, convert, fold, time_mean
from snn.stats import ENERGY_PER_AC_PJ, ENERGY_PER_MAC_PJ, SpikeMonitor, fan_out, per_image

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


# -- the integer-activation ANN and the breakdown by role ---------------------------------------

LEVELS = [[3, 2, 1, 0], [0, 0, 0, 0]]  # 2-bit levels of two samples' four activations


class TinyANN(nn.Module):
    """quantizer -> linear: forward(x [B, 4] pre-activations) -> [B, 5]."""

    def __init__(self):
        super().__init__()
        self.act = QuantReLU(2, init_alpha=THETA)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.act(x))


def test_integer_ann_costs_popcounts_of_the_levels():
    """Levels 3, 2, 1, 0 have 2 + 1 + 1 + 0 set bits: 4 additions per output, 5 outputs, for the
    first sample, nothing for the silent one; the ANN's own cost stays fan_in MACs per output."""
    x = torch.tensor(LEVELS, dtype=torch.float32) * THETA / 3
    monitor = SpikeMonitor(TinyANN().eval())
    with monitor, torch.no_grad():
        monitor.root(x)
    s = monitor.summary()
    row = next(r for r in s["layers"] if r["name"] == "fc")
    assert row["input"] == "quantized" and row["role"] == "spike_linear"
    assert row["int_ann_add_per_sample"] == 4 * 5 / 2 and row["int_ann_mac_per_sample"] == 0
    assert row["mac_per_sample"] == row["ann_mac_per_sample"] == 4 * 5 and row["ac_per_sample"] == 0
    assert s["int_ann_energy_pJ_per_sample"] == pytest.approx(10 * ENERGY_PER_AC_PJ)
    assert s["energy_pJ_per_sample"] == s["ann_energy_pJ_per_sample"] == pytest.approx(20 * ENERGY_PER_MAC_PJ)


@pytest.mark.parametrize("kind", ["two_phase", "graded"])
def test_snn_integer_baseline_is_its_counts(kind):
    """The same levels as constant currents into a neuron: its counts are the levels, so the
    integer baseline is the ANN's (4 additions a output), and the SNN spends one accumulate per
    spike: 3 + 2 + 1 = 6 per output."""
    model = TinySNN(kind).eval()
    currents = torch.tensor(LEVELS, dtype=torch.float32)[:, None, :].expand(2, 3, 4) * THETA / 3
    monitor = SpikeMonitor(model)
    with monitor, torch.no_grad():
        model(currents.contiguous())
    row = next(r for r in monitor.summary()["layers"] if r["name"] == "fc")
    assert row["input"] == "spikes" and row["role"] == "spike_linear"
    assert row["int_ann_add_per_sample"] == 4 * 5 / 2 and row["ac_per_sample"] == 6 * 5 / 2


DEMO = dict(ch=32, ch_mult=[1, 2, 2], attn=[], num_res_blocks=1, dropout=0.0, bit=2, num_groups=8, alpha_init=0.5)


def roles(summary):
    return {r["name"]: r["role"] for r in summary["layers"] if r["type"] != "neuron"}


def test_roles_and_breakdown_of_the_seeds_unet():
    """pytorch-ddpm's UNet (the demo's shape): the head, the first time-embedding linear, the
    1x1 shortcuts and the resampling convs read analog values; the rest read activations. The
    breakdown adds up to the totals, per network call and (x calls) per image."""
    torch.manual_seed(0)
    ann = unet(100, **DEMO).eval()
    snn = convert(ann, "two_phase", "compensated")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 90])
    for model in (ann, snn):
        monitor = SpikeMonitor(model)
        with monitor, torch.no_grad():
            model(x, t)
        s = monitor.summary()
        by_name = roles(s)
        assert by_name["head"] == "head" and by_name["time_embedding.timembedding.1"] == "time_embedding"
        assert by_name["time_embedding.timembedding.3"] == "spike_linear"
        assert by_name["downblocks.1.main"] == by_name["upblocks.2.main"] == "resampling"
        assert by_name["downblocks.2.shortcut"] == by_name["upblocks.0.shortcut"] == "shortcut"
        assert by_name["downblocks.0.block1.2"] == by_name["tail.2"] == "spike_conv"
        assert by_name["downblocks.0.temb_proj.1"] == "spike_linear"
        parts = s["energy_breakdown"]
        for key, total in (("energy_pJ", "energy_pJ_per_sample"), ("ann_energy_pJ", "ann_energy_pJ_per_sample"),
                           ("int_ann_energy_pJ", "int_ann_energy_pJ_per_sample")):
            assert sum(p[key] for p in parts.values()) == pytest.approx(s[total])
        assert parts["other_analog"] == {"energy_pJ": 0.0, "ann_energy_pJ": 0.0, "int_ann_energy_pJ": 0.0}
        image = per_image(s, 20)
        assert image["energy_pJ_per_image"] == pytest.approx(20 * s["energy_pJ_per_sample"])
        assert image["energy_breakdown_pJ_per_image"]["shortcut"]["energy_pJ"] == \
            pytest.approx(20 * parts["shortcut"]["energy_pJ"])
    # analog layers run once per call in the two-phase SNN: the same energy as in the ANN
    for role in ("head", "shortcut", "resampling", "time_embedding"):
        assert parts[role]["energy_pJ"] == pytest.approx(parts[role]["ann_energy_pJ"])


def test_a_spike_driven_unet_reads_analog_values_only_at_its_inputs():
    """--spike_driven (every resampling): only the head conv and the first time-embedding linear
    read analog values, in the ANN (quantized inputs elsewhere) and in its two-phase SNN."""
    torch.manual_seed(0)
    for resample, shortcut in (("pool", "act"), ("act_conv", "act"), ("signed_conv", "act"), ("pool", "signed"),
                             ("pool", "fold")):
        ann = unet(100, **DEMO, spike_driven=True, resample=resample, shortcut=shortcut).eval()
        for model, driven in ((ann, "quantized"), (convert(ann, "two_phase", "compensated"), "spikes")):
            monitor = SpikeMonitor(model)
            with monitor, torch.no_grad():
                model(torch.randn(2, 3, 16, 16), torch.tensor([10, 90]))
            rows = [r for r in monitor.summary()["layers"] if r["type"] != "neuron"]
            assert {r["name"] for r in rows if r["input"] == "analog"} == {"head", "time_embedding.timembedding.1"}
            assert all(r["input"] == driven for r in rows if r["name"] not in ("head", "time_embedding.timembedding.1"))


def test_exact_snn_has_its_anns_integer_baseline():
    """float64, two-phase and compensated: the SNN's counts are its ANN's levels, so the integer
    baselines agree exactly, and its accumulates are the levels' sum (at least the set bits)."""
    torch.manual_seed(1)
    ann = unet(100, **DEMO).double().eval()
    snn = convert(ann, "two_phase", "compensated")
    x, t = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.tensor([10, 90])
    summaries = []
    for model in (ann, snn):
        monitor = SpikeMonitor(model)
        with monitor, torch.no_grad():
            model(x, t)
        summaries.append(monitor.summary())
    a, s = summaries
    assert s["int_ann_energy_pJ_per_sample"] == pytest.approx(a["int_ann_energy_pJ_per_sample"], rel=1e-12)
    assert s["ac_per_sample"] >= s["int_ann_add_per_sample"] > 0


def test_bench_energy_prints_the_breakdown_and_draws_it(tmp_path, capsys):
    """bench/energy.py (its ``main``, in this process) on a tiny ANN ckpt.pt, converted on the fly:
    one row for the ANN, one for its two-phase SNN, the roles adding up to the total, and a PNG; a
    missing checkpoint ends it with one ``error:`` line."""
    from bench import energy
    from test_conversion_script import write_ckpt
    write_ckpt(tmp_path)
    out = tmp_path / "energy.png"
    energy.main([str(tmp_path / "ckpt.pt"), "--neuron=two_phase", "--probe_images=1", "--sample_steps=2",
                 "--labels", "tiny", f"--out={out}"])
    printed = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in printed.splitlines() if line.startswith("| tiny")]
    assert [r[0].strip() for r in rows] == ["tiny, ANN", "tiny, SNN"] and rows[1][1].strip() == "two_phase"
    header = next(line for line in printed.splitlines() if line.startswith("| model"))
    roles = len(header.split("|")[1:-1]) - 8  # model, neuron, the roles, then 6 columns
    for r in rows:
        parts = [float(v) for v in r[2:2 + roles]]
        assert sum(parts) == pytest.approx(float(r[2 + roles].strip(" *")), abs=0.1 * roles)
    assert float(rows[1][-1]) == 39 and out.stat().st_size > 10_000  # one level: (12 + 1) x 3 steps
    with pytest.raises(SystemExit) as bad:  # what the interpreter prints on stderr, with exit status 1
        energy.main([str(tmp_path / "missing.pt")])
    assert isinstance(bad.value.code, str) and bad.value.code.startswith("error: ") and "\n" not in bad.value.code
