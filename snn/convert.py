"""Quantized ANN -> SNN conversion by module swap (``docs/conversion.md``)."""
import torch.nn as nn

from model import UNet
from quant import FULL_PRECISION, QuantReLU
from snn.neuron import IFNeuron, time_mean
from snn.norm import check_norm, swap_group_norms


def swap_activations(module, make_neuron):
    """Replace every ``QuantReLU`` under ``module`` with ``make_neuron(quant_relu)``, in place."""
    targets = [(name, m) for name, m in module.named_modules() if isinstance(m, QuantReLU)]
    for name, quant in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, make_neuron(quant))
    return module


class SpikingUNet(UNet):
    """The UNet with IF neurons simulating ``T = 2**bit - 1`` steps.

    forward(x [B, 3, H, W], t [B]) -> [B, 3, H, W]: the input is repeated over T (direct
    encoding), every stateless layer runs on the folded ``[T*B, ...]`` tensors, and the output is
    the mean over T. Parameter names are those of the ANN.

    ``neuron``: the IF neuron kind (``snn.neuron.NEURON_KINDS``). ``norm``: ``step`` normalises
    every time step on its own (``nn.GroupNorm``), ``compensated`` makes GroupNorm exact over the
    T steps (``snn.norm``); with ``graded`` neurons too, the output is the ANN's.
    """

    def __init__(self, config, T=1000, kernels="reference", neuron="if", norm="step"):
        super().__init__(config, T, kernels)
        if self.bit == FULL_PRECISION:
            raise ValueError("a full-precision (--bit=32) UNet has no quantized activations to convert")
        self.time_steps = 2 ** self.bit - 1
        self.neuron = neuron
        self.norm = check_norm(norm)
        swap_activations(self, lambda q: IFNeuron(self.time_steps, q.act_alpha.item(), neuron, q.kernels))
        if norm == "compensated":
            swap_group_norms(self, self.time_steps)

    def forward(self, x, t):
        T = self.time_steps
        out = super().forward(x.repeat(T, 1, 1, 1), t.repeat(T))  # [T*B, ...], time-major
        return time_mean(out, T)


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
