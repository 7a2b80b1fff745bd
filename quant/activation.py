"""Quantized ReLU with a learnable clipping threshold (APoT, Li et al., ICLR 2020).

    y = alpha * clamp(floor(relu(x) / alpha * L + 1/2), 0, L) / L,   L = 2**bit - 1

Rounding is half *up*: that is what an integrate-and-fire neuron whose membrane starts at
half its threshold computes over L time steps, so the conversion of ``snn/`` is exact for a
constant input. The *signed* quantizer keeps the sign, levels -L..L:

    y = alpha * clamp(floor(x / alpha * L + 1/2), -L, L) / L
"""
import functools
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.compiled import check_kernels, compile_elementwise, run_auto
from common.configs import time_steps

log = logging.getLogger(__name__)

FULL_PRECISION = 32


def quantize_activation(x, alpha, levels):
    """Forward value of the b-bit quantizer (no gradient rules), any shape."""
    scaled = torch.floor(F.relu(x) / alpha * levels + 0.5)
    return alpha * scaled.clamp(0, levels) / levels


def quantize_signed(x, alpha, levels):
    """Forward value of the signed b-bit quantizer (levels -L..L, no gradient rules), any shape."""
    scaled = torch.floor(x / alpha * levels + 0.5)
    return alpha * scaled.clamp(-levels, levels) / levels


def _gradient_terms(grad_y, x, alpha, y):
    """(d loss / d x, d loss / d alpha) of the APoT rules below, elementwise then one sum."""
    inside = (x > 0) & (x < alpha)
    above = x >= alpha
    grad_x = torch.where(inside, grad_y, 0.0)
    local = torch.where(above, 1.0, torch.where(inside, (y - x) / alpha, 0.0))
    return grad_x, (grad_y * local).sum()


def _signed_gradient_terms(grad_y, x, alpha, y):
    """``_gradient_terms`` of the signed quantizer: its clipping range is (-alpha, alpha)."""
    inside = (x > -alpha) & (x < alpha)
    grad_x = torch.where(inside, grad_y, 0.0)
    local = torch.where(x >= alpha, 1.0, torch.where(x <= -alpha, -1.0, torch.where(inside, (y - x) / alpha, 0.0)))
    return grad_x, (grad_y * local).sum()


_REFERENCE = (quantize_activation, _gradient_terms, quantize_signed, _signed_gradient_terms)


_failure = []  # the first compile error of this process: 'auto' stops trying after it


@functools.lru_cache(maxsize=None)
def _compiled(index):
    """Function ``index`` of ``_REFERENCE`` compiled (on first use: it takes seconds), for every tensor size."""
    return compile_elementwise(_REFERENCE[index])


def _kernel(index, kernels, *args):
    """Function ``index`` of ``_REFERENCE`` (0 / 2: forward value, 1 / 3: gradient terms of the
    unsigned / signed quantizer) run by ``kernels``."""
    reference = _REFERENCE[index]
    if kernels == "reference":
        return reference(*args)
    if kernels == "compile":
        return _compiled(index)(*args)
    return run_auto(lambda: _compiled(index)(*args), lambda: reference(*args), _failure,
                    "the fused activation quantizer", log)


class _QuantReLUFunction(torch.autograd.Function):
    """Quantizer with the APoT gradients.

    d y / d x     = 1 inside (0, alpha), 0 elsewhere (straight-through estimator)
    d y / d alpha = 1 where x >= alpha, (y - x) / alpha inside (0, alpha), 0 below 0

    The signed quantizer (``signed``): the same rules over (-alpha, alpha), d y / d alpha = -1
    where x <= -alpha.

    ``kernels``: ``reference`` runs the operations one by one; ``compile`` fuses the forward and
    the backward into one kernel each (the same values: inductor keeps the order of the
    floating-point operations), ``auto`` compiles and falls back to the reference.
    """

    @staticmethod
    def forward(ctx, x, alpha, levels, kernels="reference", signed=False):
        y = _kernel(2 if signed else 0, kernels, x, alpha, levels)
        ctx.save_for_backward(x, alpha, y)
        ctx.kernels, ctx.signed = kernels, signed
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, alpha, y = ctx.saved_tensors
        grad_x, grad_alpha = _kernel(3 if ctx.signed else 1, ctx.kernels, grad_y, x, alpha, y)
        return grad_x, grad_alpha.reshape(alpha.shape), None, None, None


class QuantReLU(nn.Module):
    """``bit``-bit quantized ReLU; ``bit = 32`` is a plain ReLU (the full-precision baseline).

    A quantized activation holds one learnable scalar ``act_alpha`` (the clipping threshold,
    later the IF threshold); the full-precision one has no parameter. ``signed``: levels -L..L
    (``quantize_signed``; full precision: the identity). ``kernels`` (reference / compile / auto,
    ``common.compiled``) picks how the elementwise chain runs; the values are the same.
    """

    def __init__(self, bit, init_alpha=6.0, kernels="reference", signed=False):
        super().__init__()
        self.kernels = check_kernels(kernels)
        if not (1 <= int(bit) <= 8 or int(bit) == FULL_PRECISION):
            raise ValueError(f"activation bit width must be 1..8 or 32, got {bit}")
        self.bit, self.signed = int(bit), bool(signed)
        if self.bit != FULL_PRECISION:
            self.act_alpha = nn.Parameter(torch.tensor(float(init_alpha)))

    @property
    def levels(self):
        return time_steps(self.bit)  # L = 2**bit - 1, the time steps of the IF neuron it becomes

    def forward(self, x):
        if self.bit == FULL_PRECISION:
            return x if self.signed else F.relu(x)
        return _QuantReLUFunction.apply(x, self.act_alpha, self.levels, self.kernels, self.signed)

    def extra_repr(self):
        return f"bit={self.bit}, kernels={self.kernels}" + (", signed" if self.signed else "")
