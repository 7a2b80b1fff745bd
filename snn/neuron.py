"""Integrate-and-fire neuron layers: ``IFNeuron`` and the choice of how its time loop runs.

The neuron kinds, their step functions and the reference loop are ``snn.steps``'s; the compiled
kernels ``snn.fused``'s. Tensors are time-major and folded into the batch, ``[T*B, ...]``.
"""
import torch
import torch.nn as nn

from common.compiled import check_kernels
from snn import fused
from snn.steps import SIGNED_LEVELS, check_kind, fold, if_spikes, unfold


def spike_train(x, theta, kind="if", kernels="reference"):
    """``if_spikes`` computed by ``kernels``: the same spikes [T, ...] bit for bit.

    ``reference``: ``run_steps`` eagerly. ``compile``: the same function as one fused kernel
    (``snn.fused``; fails when the compiler does). ``auto``: the fused kernel, falling back to the
    reference (with one warning) when it cannot be compiled.
    """
    if check_kernels(kernels) == "reference":
        return if_spikes(x, theta, kind)
    if kernels == "compile":
        return fused.if_spikes_fused(x, theta, kind)
    return fused.if_spikes_auto(x, theta, kind)


class IFNeuron(nn.Module):
    """IF neuron layer with threshold ``act_alpha`` simulating ``time_steps`` steps per call.

    forward(x [T*B, ...]) -> [T*B, ...] = alpha * s, s as ``if_spikes`` gives it for ``kind``.
    The parameter name matches ``QuantReLU``'s, so a quantized ANN's state dict loads as is, and
    ``act_alpha`` gets a gradient through the output current. ``kernels`` picks how the time
    loop runs (``spike_train``); every choice gives the same spikes. ``signed``: the neuron of a
    signed activation (levels -L..L), a ``two_phase`` neuron only (ValueError otherwise).
    """

    def __init__(self, time_steps, alpha=1.0, kind="if", kernels="reference", signed=False):
        super().__init__()
        self.time_steps = int(time_steps)
        self.kind = check_kind(kind)
        if signed and kind != "two_phase":
            raise ValueError(f"a signed activation (levels -L..L) converts into two_phase neurons only, not {kind!r}")
        self.signed = bool(signed)
        self.kernels = check_kernels(kernels)
        self.act_alpha = nn.Parameter(torch.as_tensor(float(alpha)))

    def forward(self, x):
        kind = SIGNED_LEVELS if self.signed else self.kind
        spikes = spike_train(unfold(x, self.time_steps), self.act_alpha.detach(), kind, self.kernels)
        return fold(spikes) * self.act_alpha

    def extra_repr(self):
        return f"time_steps={self.time_steps}, kind={self.kind}, kernels={self.kernels}" + (", signed" if self.signed else "")
