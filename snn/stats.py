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
* fed with analog values (the head conv, the first time-embedding linear, the 1x1 shortcut and the
  down/up-sampling convs, which read a block's analog output): multiply-accumulates (MACs),
  counted once per sample when the input is the same at every time step (direct encoding:
  it would be computed once and held) and ``T`` times otherwise.

Which tensors are spikes is decided by identity: a hook on every neuron records its output
tensors with their unit (the threshold), so a weight layer is synaptic exactly when its input
*is* one of them, and it counts sum |round(input / unit)| events. The equivalent
quantized ANN costs ``fan_in`` MACs per output element of every weight layer, once per sample.
Energy at 45 nm (Horowitz 2014): 0.9 pJ per AC, 4.6 pJ per MAC. Biases, normalisation and
additions are not counted, as usual in SNN papers.
"""
import threading
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

from snn.neuron import IFNeuron

ENERGY_PER_AC_PJ = 0.9
ENERGY_PER_MAC_PJ = 4.6
_PASS_THROUGH = (nn.Dropout, nn.Identity)


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
    spike_input: bool = False
    analog_input: bool = False


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


def _constant_over_time(x, T):
    """Whether the folded tensor ``x`` [T*B, ...] holds the same values at every time step."""
    if T == 1:
        return True
    steps = x.reshape(T, x.shape[0] // T, -1)
    return bool(torch.equal(steps, steps[:1].expand_as(steps)))


class SpikeMonitor:
    """Counts spikes, ACs and MACs of ``model`` (a ``SpikingUNet`` or a (quantized) ``UNet``,
    possibly inside ``DataParallel``) over every forward call made inside ``with monitor:``.

    T is the model's ``time_steps`` (a ``SpikingUNet``'s, or any spiking model's that has one,
    running time-major folded tensors). A plain UNet runs one step (T = 1) and has no neurons:
    its energy is its MAC energy.
    """

    def __init__(self, model):
        self.outer = model  # samples are counted where the caller's batch enters
        self.root = model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) \
            else model
        self.T = int(getattr(self.root, "time_steps", 1))
        self.named = dict(self.root.named_modules())
        self._handles = []
        self._lock = threading.Lock()
        self._local = threading.local()  # spike tensors of the forward pass running in this thread
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

    def _spikes(self):
        if not hasattr(self._local, "spikes"):
            self._local.spikes = {}
        return self._local.spikes

    def _spike_unit(self, x):
        """The unit (threshold) of the spike tensor ``x``, or None when ``x`` is no neuron output."""
        entry = self._spikes().get(id(x))
        return entry[1] if entry is not None and entry[0] is x else None

    def _on_call(self, module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        with self._lock:
            self.num_samples += x.shape[0]
            self.num_forwards += 1

    def _on_model_start(self, module, args):
        self._spikes().clear()

    def _on_model_end(self, module, args, output):
        self._spikes().clear()  # drop the references kept for the identity test

    def _on_neuron(self, name, module, args, out):
        # the running module: under DataParallel a replica, whose threshold is the same
        unit = float(module.act_alpha)
        self._spikes()[id(out)] = (out, unit)
        s = spike_sizes(out, unit)
        found = {"positive": _count(s.clamp(min=0)), "negative": _count((-s).clamp(min=0)),
                 "spikes": _count(s != 0), "negative_spikes": _count(s < 0), "multi_spikes": _count(s.abs() > 1)}
        with self._lock:
            counts = self.neurons.setdefault(name, _NeuronCounts())
            counts.neurons = out[0].numel()
            for field, value in found.items():
                setattr(counts, field, getattr(counts, field) + value)
            counts.neuron_steps += out.numel()

    def _on_pass_through(self, module, args, out):
        unit = self._spike_unit(args[0])
        if unit is not None:
            if isinstance(module, nn.Dropout) and module.training and 0 < module.p < 1:
                unit /= 1 - module.p  # training-mode dropout scales the spikes it keeps
            self._spikes()[id(out)] = (out, unit)

    def _on_weight_layer(self, name, layer, module, args, out):
        x = args[0]
        ann_mac = out.numel() / self.T * fan_in(layer)  # one (ANN) pass of every sample
        unit = self._spike_unit(x)
        counts_spikes = unit is not None
        if counts_spikes:  # one accumulate per event and outgoing connection
            ac = float(_count(spike_sizes(x, unit).abs())) * fan_out(layer)
            mac = 0.0
        else:
            ac = 0.0
            mac = ann_mac * (1 if _constant_over_time(x, self.T) else self.T)
        with self._lock:
            counts = self.synapses.setdefault(name, _SynapseCounts(
                kind="conv" if isinstance(layer, nn.Conv2d) else "linear"))
            counts.ac += ac
            counts.mac += mac
            counts.ann_mac += ann_mac
            counts.spike_input |= counts_spikes
            counts.analog_input |= not counts_spikes

    # results -----------------------------------------------------------------------------

    def summary(self):
        """A JSON-serialisable dict: per-sample totals, energies, the spike rates over all neurons
        (``firing_rate`` ... ``multi_spike_fraction``, see the module docstring) and ``layers``."""
        n = max(self.num_samples, 1)
        layers = [self._neuron_row(name, c) for name, c in self.neurons.items()]
        layers += [self._synapse_row(name, c, n) for name, c in self.synapses.items()]
        order = {name: i for i, name in enumerate(self.named)}
        layers.sort(key=lambda row: order[row["name"]])
        ac = sum(c.ac for c in self.synapses.values()) / n
        mac = sum(c.mac for c in self.synapses.values()) / n
        ann_mac = sum(c.ann_mac for c in self.synapses.values()) / n
        energy = ac * ENERGY_PER_AC_PJ + mac * ENERGY_PER_MAC_PJ
        ann_energy = ann_mac * ENERGY_PER_MAC_PJ
        return {
            "time_steps": self.T, "num_samples": self.num_samples, "num_forwards": self.num_forwards,
            **_spike_rates(_total(self.neurons.values())),
            "ac_per_sample": ac, "mac_per_sample": mac, "ann_mac_per_sample": ann_mac,
            "energy_pJ_per_sample": energy, "ann_energy_pJ_per_sample": ann_energy,
            "energy_ratio_ann_over_snn": ann_energy / energy if energy else None,
            "pJ_per_ac": ENERGY_PER_AC_PJ, "pJ_per_mac": ENERGY_PER_MAC_PJ,
            "layers": layers,
        }

    def _neuron_row(self, name, c):
        return {"name": name, "type": "neuron", "neurons": c.neurons,
                "threshold": self.named[name].act_alpha.item(), **_spike_rates(c)}

    def _synapse_row(self, name, c, n):
        kind = "spikes" if c.spike_input and not c.analog_input else "analog" if c.analog_input and not \
            c.spike_input else "mixed"
        energy = (c.ac * ENERGY_PER_AC_PJ + c.mac * ENERGY_PER_MAC_PJ) / n
        return {"name": name, "type": c.kind, "input": kind,
                "ac_per_sample": c.ac / n, "mac_per_sample": c.mac / n, "ann_mac_per_sample": c.ann_mac / n,
                "energy_pJ_per_sample": energy, "ann_energy_pJ_per_sample": c.ann_mac / n * ENERGY_PER_MAC_PJ}
