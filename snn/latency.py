"""Latency of a spiking UNet: time steps per network call, from the model's own graph.

A streaming neuron (``if``, ``signed``, ``graded``) fires while its input arrives, so a network
call takes the T steps of its window. A two-phase neuron fires only after it has integrated its
whole window, so the layer after it integrates during the next window: with D neuron layers on
the longest path from the input to the output, the last fires in window D + 1, in which the
output is read out, and a call takes (D + 1) * T steps.

D is measured, not counted by hand per architecture: ``neuron_depth`` runs the model once on a
small input under a ``TorchFunctionMode`` that carries, for every tensor, the number of neuron
layers behind it (the maximum over a function's tensor arguments; a neuron adds one).
"""
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from model import UNet
from quant import FULL_PRECISION, QuantReLU
from snn.neuron import IFNeuron
from snn.steps import STREAMING


class _Depth(TorchFunctionMode):
    """Neuron layers behind every tensor made while the mode is active (by identity; 0 if unseen)."""

    def __init__(self):
        super().__init__()
        self.depth = {}  # id -> (tensor, depth): the tensor is kept so that its id stays its own

    def of(self, x):
        entry = self.depth.get(id(x))
        return entry[1] if entry is not None and entry[0] is x else 0

    def set(self, x, depth):
        self.depth[id(x)] = (x, depth)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in tree_flatten((args, kwargs or {}))[0] if isinstance(a, torch.Tensor)]
        depth = max((self.of(a) for a in inputs), default=0)
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor):
                self.set(o, max(depth, self.of(o)))
        return out


def _is_neuron(module):
    return isinstance(module, IFNeuron) or (isinstance(module, QuantReLU) and module.bit != FULL_PRECISION)


@torch.no_grad()
def neuron_depth(model, *inputs):
    """Neuron layers (IF neurons or quantized activations) on the longest path from ``inputs`` to
    the output of ``model(*inputs)``."""
    mode = _Depth()

    def bump(module, args, out):
        mode.set(out, max(mode.of(a) for a in args if isinstance(a, torch.Tensor)) + 1)

    handles = [m.register_forward_hook(bump) for m in model.modules() if _is_neuron(m)]
    try:
        with mode:
            out = model(*inputs)
            return max(mode.of(o) for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor))
    finally:
        for handle in handles:
            handle.remove()


def unet_depth(config, T=1000):
    """``neuron_depth`` of the UNet of a ``UNetConfig``, on one image 2x2 pixels at its lowest level.

    Built and run on the ``meta`` device (shapes only, no values: the path depends on neither),
    with plain PyTorch kernels, so that it takes milliseconds for any size of UNet.
    """
    with torch.device("meta"):
        unet = UNet(config, T, "reference").eval()
        size = 2 ** config.levels
        x = torch.zeros(1, unet.head.in_channels, size, size)
        return neuron_depth(unet, x, torch.zeros(1, dtype=torch.long))


def latency_steps(config, neuron, time_steps, T=1000):
    """Time steps one network call of the SNN takes: ``time_steps`` for a streaming neuron,
    (``unet_depth`` + 1) x ``time_steps`` for ``two_phase``."""
    if neuron in STREAMING:
        return time_steps
    return (unet_depth(config, T) + 1) * time_steps
