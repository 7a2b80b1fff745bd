"""Integrate-and-fire neurons (DESIGN §3).

Tensors are time-major and folded into the batch, ``[T*B, ...]``; a neuron unfolds them to
``[T, B, ...]``, simulates the whole T-step window in one call and keeps no state between calls.
"""
import torch
import torch.nn as nn

from common.compiled import check_kernels
from snn import fused


def fold(x):
    """[T, B, ...] -> [T*B, ...]."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def unfold(x, T):
    """[T*B, ...] -> [T, B, ...]."""
    assert x.shape[0] % T == 0, f"a folded batch of {x.shape[0]} is not a multiple of T={T}"
    return x.reshape(T, x.shape[0] // T, *x.shape[1:])


def time_mean(x, T):
    """Rate decoding: [T*B, ...] -> [B, ...]."""
    return unfold(x, T).mean(0)


NEURON_KINDS = ("if", "signed")


def check_kind(kind):
    """``kind`` if it names a neuron model of ``NEURON_KINDS``, else ValueError."""
    if kind not in NEURON_KINDS:
        raise ValueError(f"neuron kind must be one of {NEURON_KINDS}, got {kind!r}")
    return kind


def if_spikes(x, theta, kind="if"):
    """Spike train of an IF neuron for input currents ``x`` [T, ...] and threshold ``theta``.

    Membrane starts at theta / 2, soft reset. Returns s [T, ...] in {0, 1} (``if``) or
    {-1, 0, 1} (``signed``: a neuron whose membrane falls below zero after it has fired emits -1
    and takes theta back, so its net spike count never goes negative). The output current of
    the neuron is ``theta * s``.
    """
    signed = check_kind(kind) == "signed"
    theta = torch.as_tensor(theta, dtype=x.dtype, device=x.device)
    v = (theta / 2).expand_as(x[0]).clone()
    count = torch.zeros_like(x[0]) if signed else None
    spikes = torch.empty_like(x)
    for t in range(x.shape[0]):
        v = v + x[t]
        s = (v >= theta).to(x.dtype)
        v = v - s * theta
        if signed:
            n = ((v < 0) & (count > 0)).to(x.dtype)
            v = v + n * theta
            s = s - n
            count = count + s
        spikes[t] = s
    return spikes


def spike_train(x, theta, kind="if", kernels="reference"):
    """``if_spikes`` computed by ``kernels``: the same spikes [T, ...] bit for bit.

    ``reference``: the loop above. ``compile``: one fused kernel (``snn.fused``; fails when the
    compiler does). ``auto``: the fused kernel, falling back to the loop (with one warning) when
    it cannot be compiled.
    """
    if kernels == "compile":
        return fused.if_spikes_fused(x, theta, kind)
    if kernels == "auto":
        return fused.if_spikes_auto(x, theta, kind, reference=if_spikes)
    return if_spikes(x, theta, kind)


class IFNeuron(nn.Module):
    """IF neuron layer with threshold ``act_alpha`` simulating ``T`` steps per call.

    forward(x [T*B, ...]) -> [T*B, ...] with values in {-alpha, 0, alpha} (``signed``) or {0, alpha}
    (``if``). The parameter name matches ``QuantReLU``'s, so a quantized ANN's state dict loads as is.
    ``kernels`` picks how the time loop runs (``spike_train``); every choice gives the same spikes.
    """

    def __init__(self, T, alpha=1.0, kind="if", kernels="reference"):
        super().__init__()
        self.T = int(T)
        self.kind = check_kind(kind)
        self.kernels = check_kernels(kernels)
        self.act_alpha = nn.Parameter(torch.as_tensor(float(alpha)))

    def forward(self, x):
        spikes = spike_train(unfold(x, self.T), self.act_alpha.detach(), self.kind, self.kernels)
        return fold(spikes) * self.act_alpha

    def extra_repr(self):
        return f"T={self.T}, kind={self.kind}, kernels={self.kernels}"

