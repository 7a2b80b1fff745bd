"""Spike statistics and energy of a spiking (or quantized) UNet, collected with forward hooks.

    monitor = SpikeMonitor(model)
    with monitor:               # hooks live only inside the block: no cost otherwise
        model(x, t)
    summary = monitor.summary()

A neuron emits an integer ``s`` per step (0/1 binary, -1/0/1 signed, -L..L graded); its output
current is ``theta * s``, from which the monitor recovers ``s``. A spike of size ``k`` is ``|k|``
synaptic *events*. Neuron layers (and the totals) report

* ``firing_rate``: events per neuron per time step, sum |s| / (neurons * T * samples); for binary
  and signed neurons this is spikes per neuron per step;
* ``positive_rate`` / ``negative_rate``: the same, counting only s > 0 / s < 0 (they add up to
  ``firing_rate``);
* ``spike_rate``: nonzero s per neuron per time step (a graded spike counts once);
* ``negative_spike_fraction`` / ``multi_spike_fraction``: the share of nonzero s that are
  negative / larger than 1 in magnitude (0 for binary neurons).

Weight layers (``nn.Conv2d`` / ``nn.Linear`` and their APoT subclasses):

* fed straight by an IF neuron (through ``Dropout`` / ``Identity`` at most): every event that
  enters costs one accumulate (AC) per outgoing connection, ``C_out*k*k/stride^2`` for a conv,
  ``out_features`` for a linear, so a spike of size k costs k ACs per connection;
* fed with analog values (the head conv, the first time-embedding linear; in pytorch-ddpm's UNet
  also the 1x1 shortcuts and the down/up-sampling convs, which read the residual stream):
  multiply-accumulates (MACs), counted once per sample when the input is the same at every time
  step (direct encoding, or a two-phase SNN's held inputs: computed once and held) and ``T``
  times otherwise.

Which tensors are spikes is decided by identity: a hook on every neuron records its output
tensors with their unit (the threshold), so a weight layer is synaptic exactly when its input
*is* one of them, and it counts sum |round(input / unit)| events. A quantized ANN's activations
(``QuantReLU``) are recorded the same way with their unit alpha / L, so the monitor knows which
of its layers read a quantized activation (those that read spikes once converted).

Three costs per weight layer, all per network call of one sample (``docs/energy.md``):

* the model's own: the SNN's ACs and MACs as above; an ANN's MACs;
* the papers' ANN: ``fan_in`` 32-bit float MACs per output element, once (``ann_*``);
* the same quantized ANN on integer-activation hardware (``int_ann_*``): a layer that reads a
  b-bit activation of level q costs popcount(|q|) additions per outgoing connection (q times a
  weight is that many shifted copies of it; zero activations cost nothing), a layer that reads
  analog values its MACs. For an SNN, q is each neuron's net spike count over the window: its
  ANN's level in the exact modes.

Energy at 45 nm (Horowitz 2014): 0.9 pJ per AC or addition (a 32-bit float add), 4.6 pJ per MAC
(a 32-bit float multiply, 3.7 pJ, and add). Biases, normalisation and additions of activations
are not counted, as usual in SNN papers. ``summary()['energy_breakdown']`` splits the three costs
by the layers' role in the UNet (``ROLES``).
"""
import threading
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn

from model.unet import DownSample, UpSample
from quant import FULL_PRECISION, QuantReLU
from snn.neuron import IFNeuron

ENERGY_PER_AC_PJ = 0.9
ENERGY_PER_MAC_PJ = 4.6
_PASS_THROUGH = (nn.Dropout, nn.Identity)

# roles of weight layers in the breakdown: those reading spikes (an ANN: quantized activations),
# then those reading analog values, by their place in the UNet
ROLES = ("spike_conv", "spike_linear", "head", "shortcut", "resampling", "time_embedding", "other_analog")


@dataclass
class _NeuronCounts:
    neurons: int = 0        # neurons of the layer for one sample
    positive: int = 0       # events of positive spikes (sum of s > 0), over steps and samples
    negative: int = 0       # events of negative spikes (sum of |s|, s < 0)
    spikes: int = 0         # nonzero s
    negative_spikes: int = 0  # s < 0
    multi_spikes: int = 0   # |s| > 1
    neuron_steps: int = 0   # neurons * T * samples


@dataclass
class _SynapseCounts:
    kind: str = ""
    ac: float = 0.0         # accumulates, summed over samples
    mac: float = 0.0        # multiply-accumulates of the layer as it ran, summed over samples
    ann_mac: float = 0.0    # MACs of one ANN pass, summed over samples
    int_add: float = 0.0    # additions of the integer-activation ANN, summed over samples
    int_mac: float = 0.0    # MACs of the integer-activation ANN (analog inputs), summed over samples
    inputs: set = field(default_factory=set)  # what the layer read: spikes, quantized, analog


def fan_in(layer):
    """Multiplies per output element: ``C_in/groups * k * k`` (conv) or ``in_features`` (linear)."""
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return layer.in_channels // layer.groups * kh * kw
    return layer.in_features


def fan_out(layer):
    """Accumulates one input spike triggers: ``C_out*k*k/stride^2`` (conv) or ``out_features`` (linear)."""
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        sh, sw = layer.stride
        return layer.out_channels // layer.groups * kh * kw / (sh * sw)
    return layer.out_features


def spike_sizes(current, unit):
    """The integer spikes s of a neuron output current ``theta * s`` [any shape] with unit theta.

    Rounded: ``theta * s`` is the float product, and the division may miss s by an ulp.
    """
    unit = float(unit)
    if unit == 0:  # a zero threshold makes zero currents: nothing to count
        return torch.zeros_like(current)
    return torch.round(current.detach() / unit)


def _count(x):
    """A tensor count or sum as a Python int (float64 keeps sums of integers exact up to 2**53)."""
    return int(x.sum(dtype=torch.float64)) if x.is_floating_point() else int(x.sum())


def popcount(levels):
    """Set bits of |q| for integer levels q [any shape] (float or int): the additions q * w costs."""
    q = levels.abs().to(torch.int64)
    bits = torch.zeros_like(q)
    while bool(q.any()):
        bits += q & 1
        q = q >> 1
    return bits


def _total(counts):
    """The ``_NeuronCounts`` of several layers added up (``neurons`` excepted)."""
    total = _NeuronCounts()
    for c in counts:
        for field in ("positive", "negative", "spikes", "negative_spikes", "multi_spikes", "neuron_steps"):
            setattr(total, field, getattr(total, field) + getattr(c, field))
    return total


def _spike_rates(c):
    """The rates and shares of the module docstring, from the counts ``c`` (0 where undefined)."""
    steps, spikes = max(c.neuron_steps, 1), max(c.spikes, 1)
    return {"firing_rate": (c.positive + c.negative) / steps, "positive_rate": c.positive / steps,
            "negative_rate": c.negative / steps, "spike_rate": c.spikes / steps,
            "negative_spike_fraction": c.negative_spikes / spikes, "multi_spike_fraction": c.multi_spikes / spikes}


def _constant_over_time(x, time_steps):
    """Whether the folded tensor ``x`` [T*B, ...] holds the same values at every time step."""
    if time_steps == 1:
        return True
    steps = x.reshape(time_steps, x.shape[0] // time_steps, -1)
    return bool(torch.equal(steps, steps[:1].expand_as(steps)))


class SpikeMonitor:
    """Counts spikes, ACs and MACs of ``model`` (a ``SpikingUNet`` or a (quantized) ``UNet``,
    possibly inside ``DataParallel``) over every forward call made inside ``with monitor:``.

    T is the model's ``time_steps`` (a ``SpikingUNet``'s, or any spiking model's that has one,
    running time-major folded tensors). A plain UNet runs one step (T = 1) and has no neurons:
    its energy is its MAC energy; its quantized activations give the integer-hardware baseline.
    """

    def __init__(self, model):
        self.outer = model  # samples are counted where the caller's batch enters
        self.root = model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) \
            else model
        self.time_steps = int(getattr(self.root, "time_steps", 1))
        self.named = dict(self.root.named_modules())
        self._handles = []
        self._lock = threading.Lock()
        self._local = threading.local()  # spike / level tensors of the forward pass running in this thread
        self.reset()

    def reset(self):
        self.num_samples = 0
        self.num_forwards = 0
        self.neurons = {}
        self.synapses = {}

    # hooks -------------------------------------------------------------------------------

    def __enter__(self):
        # hooks take the layer's name: DataParallel runs replicas, not the modules listed here
        self._handles.append(self.outer.register_forward_pre_hook(self._on_call, with_kwargs=True))
        self._handles.append(self.root.register_forward_pre_hook(self._on_model_start))
        self._handles.append(self.root.register_forward_hook(self._on_model_end))
        for name, module in self.root.named_modules():
            if isinstance(module, IFNeuron):
                hook = partial(self._on_neuron, name)
            elif isinstance(module, QuantReLU) and module.bit != FULL_PRECISION:
                hook = self._on_quantizer
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                hook = partial(self._on_weight_layer, name, module)
            elif isinstance(module, _PASS_THROUGH):
                hook = self._on_pass_through
            else:
                continue
            self._handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._local.__dict__.clear()
        return False

    def _tracked(self):
        if not hasattr(self._local, "tracked"):
            self._local.tracked = {}
        return self._local.tracked

    def _entry(self, x):
        """(unit, spikes?) of ``x`` when it is a neuron output (spikes) or a quantizer's (levels), else None."""
        entry = self._tracked().get(id(x))
        return entry[1:] if entry is not None and entry[0] is x else None

    def _on_call(self, module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        with self._lock:
            self.num_samples += x.shape[0]
            self.num_forwards += 1

    def _on_model_start(self, module, args):
        self._tracked().clear()

    def _on_model_end(self, module, args, output):
        self._tracked().clear()  # drop the references kept for the identity test

    def _on_neuron(self, name, module, args, out):
        # the running module: under DataParallel a replica, whose threshold is the same
        unit = float(module.act_alpha)
        self._tracked()[id(out)] = (out, unit, True)
        s = spike_sizes(out, unit)
        found = {"positive": _count(s.clamp(min=0)), "negative": _count((-s).clamp(min=0)),
                 "spikes": _count(s != 0), "negative_spikes": _count(s < 0), "multi_spikes": _count(s.abs() > 1)}
        with self._lock:
            counts = self.neurons.setdefault(name, _NeuronCounts())
            counts.neurons = out[0].numel()
            for field, value in found.items():
                setattr(counts, field, getattr(counts, field) + value)
            counts.neuron_steps += out.numel()

    def _on_quantizer(self, module, args, out):
        # a quantized ANN's activation alpha * q / L: its levels q, in units of alpha / L
        self._tracked()[id(out)] = (out, float(module.act_alpha) / module.levels, False)

    def _on_pass_through(self, module, args, out):
        entry = self._entry(args[0])
        if entry is not None:
            unit, spikes = entry
            if isinstance(module, nn.Dropout) and module.training and 0 < module.p < 1:
                unit /= 1 - module.p  # training-mode dropout scales the spikes it keeps
            self._tracked()[id(out)] = (out, unit, spikes)

    def _on_weight_layer(self, name, layer, module, args, out):
        x = args[0]
        ann_mac = out.numel() / self.time_steps * fan_in(layer)  # one (ANN) pass of every sample
        entry = self._entry(x)
        ac = mac = int_add = 0.0
        if entry is None:  # analog: MACs, once if the input is the same at every step
            mac = ann_mac * (1 if _constant_over_time(x, self.time_steps) else self.time_steps)
        else:
            levels = spike_sizes(x, entry[0])
            if entry[1]:  # spikes: one accumulate per event and outgoing connection
                ac = float(_count(levels.abs())) * fan_out(layer)
            else:  # an ANN reading a quantized activation runs its MACs
                mac = ann_mac
            counts = levels.reshape(self.time_steps, -1).sum(0)  # a neuron's net count over the window: its level
            int_add = float(_count(popcount(counts))) * fan_out(layer)
        with self._lock:
            counts = self.synapses.setdefault(name, _SynapseCounts(
                kind="conv" if isinstance(layer, nn.Conv2d) else "linear"))
            counts.ac += ac
            counts.mac += mac
            counts.ann_mac += ann_mac
            counts.int_add += int_add
            counts.int_mac += ann_mac if entry is None else 0.0
            counts.inputs.add("analog" if entry is None else "spikes" if entry[1] else "quantized")

    # results -----------------------------------------------------------------------------

    def summary(self):
        """A JSON-serialisable dict: per-sample totals, energies (the model's, ``ann_*``, ``int_ann_*``),
        the spike rates over all neurons (``firing_rate`` ... ``multi_spike_fraction``, see the
        module docstring), ``energy_breakdown`` by role and ``layers``."""
        n = max(self.num_samples, 1)
        layers = [self._neuron_row(name, c) for name, c in self.neurons.items()]
        synapses = [self._synapse_row(name, c, n) for name, c in self.synapses.items()]
        layers += synapses
        order = {name: i for i, name in enumerate(self.named)}
        layers.sort(key=lambda row: order[row["name"]])
        total = {key: sum(row[key] for row in synapses) for key in
                 ("ac_per_sample", "mac_per_sample", "ann_mac_per_sample", "int_ann_add_per_sample",
                  "int_ann_mac_per_sample", "energy_pJ_per_sample", "ann_energy_pJ_per_sample",
                  "int_ann_energy_pJ_per_sample")}
        energy, ann_energy, int_energy = (total[k] for k in ("energy_pJ_per_sample", "ann_energy_pJ_per_sample",
                                                             "int_ann_energy_pJ_per_sample"))
        return {
            "time_steps": self.time_steps, "num_samples": self.num_samples, "num_forwards": self.num_forwards,
            **_spike_rates(_total(self.neurons.values())), **total,
            "energy_ratio_ann_over_snn": ann_energy / energy if energy else None,
            "energy_ratio_int_ann_over_snn": int_energy / energy if energy else None,
            "pJ_per_ac": ENERGY_PER_AC_PJ, "pJ_per_mac": ENERGY_PER_MAC_PJ,
            "energy_breakdown": breakdown(synapses), "layers": layers,
        }

    def _neuron_row(self, name, c):
        return {"name": name, "type": "neuron", "neurons": c.neurons,
                "threshold": self.named[name].act_alpha.item(), **_spike_rates(c)}

    def _synapse_row(self, name, c, n):
        kind = next(iter(c.inputs)) if len(c.inputs) == 1 else "mixed"  # quantized: an ANN's activation
        return {"name": name, "type": c.kind, "input": kind, "role": self._role(name, c.kind, kind),
                "ac_per_sample": c.ac / n, "mac_per_sample": c.mac / n, "ann_mac_per_sample": c.ann_mac / n,
                "int_ann_add_per_sample": c.int_add / n, "int_ann_mac_per_sample": c.int_mac / n,
                "energy_pJ_per_sample": (c.ac * ENERGY_PER_AC_PJ + c.mac * ENERGY_PER_MAC_PJ) / n,
                "ann_energy_pJ_per_sample": c.ann_mac / n * ENERGY_PER_MAC_PJ,
                "int_ann_energy_pJ_per_sample": (c.int_add * ENERGY_PER_AC_PJ + c.int_mac * ENERGY_PER_MAC_PJ) / n}

    def _role(self, name, layer_kind, input_kind):
        """The layer's place in ``ROLES``: by its input, then (analog) by its path in the UNet."""
        if input_kind in ("spikes", "quantized"):
            return f"spike_{layer_kind}"
        parent = self.named.get(name.rpartition(".")[0])
        if name == "head":
            return "head"
        if name.split(".")[-1] == "shortcut":
            return "shortcut"
        if isinstance(parent, (DownSample, UpSample)):
            return "resampling"
        if name.startswith("time_embedding."):
            return "time_embedding"
        return "other_analog"


def breakdown(rows):
    """The three energies of weight-layer ``rows`` summed by role: {role: {energy_pJ, ann_energy_pJ,
    int_ann_energy_pJ}} per network call of one sample, every role of ``ROLES``."""
    parts = {role: {"energy_pJ": 0.0, "ann_energy_pJ": 0.0, "int_ann_energy_pJ": 0.0} for role in ROLES}
    for row in rows:
        part = parts[row["role"]]
        part["energy_pJ"] += row["energy_pJ_per_sample"]
        part["ann_energy_pJ"] += row["ann_energy_pJ_per_sample"]
        part["int_ann_energy_pJ"] += row["int_ann_energy_pJ_per_sample"]
    return parts


def per_image(summary, network_calls):
    """A summary's energies per generated image: ``network_calls`` calls of one sample each.

    {network_calls, energy_pJ_per_image, ann_energy_pJ_per_image, int_ann_energy_pJ_per_image,
    the two ratios, energy_breakdown_pJ_per_image (as ``energy_breakdown``, times the calls)}.
    """
    scale = lambda d: {k: v * network_calls for k, v in d.items()}  # noqa: E731
    return {"network_calls": network_calls,
            "energy_pJ_per_image": summary["energy_pJ_per_sample"] * network_calls,
            "ann_energy_pJ_per_image": summary["ann_energy_pJ_per_sample"] * network_calls,
            "int_ann_energy_pJ_per_image": summary["int_ann_energy_pJ_per_sample"] * network_calls,
            "energy_ratio_ann_over_snn": summary["energy_ratio_ann_over_snn"],
            "energy_ratio_int_ann_over_snn": summary["energy_ratio_int_ann_over_snn"],
            "energy_breakdown_pJ_per_image": {role: scale(part) for role, part in summary["energy_breakdown"].items()}}
