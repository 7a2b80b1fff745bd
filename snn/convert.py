"""Quantized ANN -> SNN conversion by module swap (``docs/conversion.md``)."""
import torch.nn as nn

from common.configs import time_steps
from model import UNet
from model.build import replace_modules
from model.unet import AnalogInput
from quant import FULL_PRECISION, QuantReLU
from snn.latency import latency_steps
from snn.neuron import IFNeuron
from snn.steps import STREAMING, fold, time_mean
from snn.norm import check_norm, swap_group_norms


def swap_activations(module, make_neuron):
    """Replace every ``QuantReLU`` under ``module`` with ``make_neuron(quant_relu)``, in place."""
    return replace_modules(module, lambda m: isinstance(m, QuantReLU), make_neuron)


class Hold(nn.Module):
    """The window's mean at every step: x [T*B, ...] -> [T*B, ...], each step mean_t x_t.

    What a weight layer reading the analog stream sees in a two-phase SNN: the value is known
    once the layer before has integrated its window, computed once and held, so the layer's
    multiply-accumulates happen once per network call (``snn.stats`` counts them so).
    """

    def __init__(self, time_steps):
        super().__init__()
        self.time_steps = int(time_steps)

    def forward(self, x):
        mean = time_mean(x, self.time_steps)
        return fold(mean.expand(self.time_steps, *mean.shape))

    def extra_repr(self):
        return f"time_steps={self.time_steps}"


def swap_analog_inputs(module, time_steps):
    """Replace every ``AnalogInput`` under ``module`` with a ``Hold`` over ``time_steps`` steps, in place."""
    return replace_modules(module, lambda m: isinstance(m, AnalogInput), lambda m: Hold(time_steps))


def make_neuron(quant, time_steps, kind):
    """The IF neuron of ``kind`` that replaces the quantizer ``quant`` (its threshold, kernels and sign)."""
    if quant.signed and kind in STREAMING:
        raise ValueError(f"a signed activation (levels -L..L) converts into two_phase neurons only, not {kind!r}")
    return IFNeuron(time_steps, quant.act_alpha.item(), kind, quant.kernels, signed=quant.signed)


class SpikingUNet(UNet):
    """The UNet with IF neurons simulating ``time_steps(bit) = 2**bit - 1`` steps.

    forward(x [B, 3, H, W], t [B]) -> [B, 3, H, W]: the input is repeated over T (direct
    encoding), every stateless layer runs on the folded ``[T*B, ...]`` tensors, and the output is
    the mean over T. Parameter names are those of the ANN.

    ``neuron``: the IF neuron kind (``snn.steps.NEURON_KINDS``). ``norm``: ``step`` normalises
    every time step on its own (``nn.GroupNorm``), ``compensated`` makes GroupNorm exact over the
    T steps (``snn.norm``); with ``graded`` or ``two_phase`` neurons too, the output is the ANN's.
    With ``two_phase`` neurons every weight layer that reads the analog stream reads it held
    (``Hold``).
    """

    def __init__(self, config, T=1000, kernels="reference", neuron="if", norm="step"):
        super().__init__(config, T, kernels)
        if self.bit == FULL_PRECISION:
            raise ValueError("a full-precision (--bit=32) UNet has no quantized activations to convert")
        self.time_steps = time_steps(self.bit)
        self.neuron = neuron
        self.norm = check_norm(norm)
        swap_activations(self, lambda q: make_neuron(q, self.time_steps, neuron))
        if norm == "compensated":
            swap_group_norms(self, self.time_steps)
        if neuron == "two_phase":
            swap_analog_inputs(self, self.time_steps)

    def forward(self, x, t):
        T = self.time_steps
        out = super().forward(x.repeat(T, 1, 1, 1), t.repeat(T))  # [T*B, ...], time-major
        return time_mean(out, T)

    def latency_steps(self):
        """Time steps one network call takes: ``time_steps``, or (neuron layers on the longest
        path + 1) x ``time_steps`` for two-phase neurons (``snn.latency``)."""
        return latency_steps(self.config, self.neuron, self.time_steps, self.T)


def convert(ann, neuron="if", norm="step"):
    """A spiking copy of the quantized UNet ``ann`` (bit < 32, no attention); ``neuron`` and
    ``norm`` as ``SpikingUNet`` takes them.

    The copy sits on ``ann``'s device with its dtype, in ``ann``'s train/eval mode; ``ann`` is left
    unchanged.
    """
    if isinstance(ann, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        ann = ann.module
    if not isinstance(ann, UNet):
        raise TypeError(f"convert expects a UNet, got {type(ann).__name__}")
    if ann.config.attn:
        raise ValueError("a UNet with attention cannot be converted: attention has no IF-neuron equivalent")
    snn = SpikingUNet(ann.config, ann.T, ann.kernels, neuron, norm)
    snn.load_state_dict(ann.state_dict())
    param = next(ann.parameters())
    return snn.to(param.device, param.dtype).train(ann.training)
