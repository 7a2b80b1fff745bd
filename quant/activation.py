"""Quantized ReLU with a learnable clipping threshold (APoT, Li et al., ICLR 2020).

    y = alpha * clamp(floor(relu(x) / alpha * L + 1/2), 0, L) / L,   L = 2**bit - 1

Rounding is half *up*: that is what an integrate-and-fire neuron whose membrane starts at
half its threshold computes over L time steps, so the conversion of ``snn/`` is exact for a
constant input.
"""
import functools
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.compiled import check_kernels, compile_elementwise, run_auto

log = logging.getLogger(__name__)

FULL_PRECISION = 32


def quantize_activation(x, alpha, levels):
    """Forward value of the b-bit quantizer (no gradient rules), any shape."""
    scaled = torch.floor(F.relu(x) / alpha * levels + 0.5)
    return alpha * scaled.clamp(0, levels) / levels


def _gradient_terms(grad_y, x, alpha, y):
    """(d loss / d x, d loss / d alpha) of the APoT rules below, elementwise then one sum."""
    inside = (x > 0) & (x < alpha)
    above = x >= alpha
    grad_x = torch.where(inside, grad_y, 0.0)
    local = torch.where(above, 1.0, torch.where(inside, (y - x) / alpha, 0.0))
    return grad_x, (grad_y * local).sum()


_failure = []  # the first compile error of this process: 'auto' stops trying after it


@functools.lru_cache(maxsize=None)
def _compiled():
    """The two functions above compiled (on first use: it takes seconds), for every tensor size."""
    return compile_elementwise(quantize_activation), compile_elementwise(_gradient_terms)


def _kernel(index, kernels, *args):
    """Function ``index`` (0: forward value, 1: gradient terms) run by ``kernels``."""
    reference = (quantize_activation, _gradient_terms)[index]
    if kernels == "reference":
        return reference(*args)
    if kernels == "compile":
        return _compiled()[index](*args)
    return run_auto(lambda: _compiled()[index](*args), lambda: reference(*args), _failure,
                    "the fused activation quantizer", log)


class _QuantReLUFunction(torch.autograd.Function):
    """Quantizer with the APoT gradients.

    d y / d x     = 1 inside (0, alpha), 0 elsewhere (straight-through estimator)
    d y / d alpha = 1 where x >= alpha, (y - x) / alpha inside (0, alpha), 0 below 0

    ``kernels``: ``reference`` runs the operations one by one; ``compile`` fuses the forward and
    the backward into one kernel each (the same values: inductor keeps the order of the
    floating-point operations), ``auto`` compiles and falls back to the reference.
    """

    @staticmethod
    def forward(ctx, x, alpha, levels, kernels="reference"):
        y = _kernel(0, kernels, x, alpha, levels)
        ctx.save_for_backward(x, alpha, y)
        ctx.kernels = kernels
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, alpha, y = ctx.saved_tensors
        grad_x, grad_alpha = _kernel(1, ctx.kernels, grad_y, x, alpha, y)
        return grad_x, grad_alpha.reshape(alpha.shape), None, None


class QuantReLU(nn.Module):
    """``bit``-bit quantized ReLU; ``bit = 32`` is a plain ReLU (the full-precision baseline).

    A quantized activation holds one learnable scalar ``act_alpha`` (the clipping threshold,
    later the IF threshold); the full-precision one has no parameter. ``kernels`` (reference /
    compile / auto, ``common.compiled``) picks how the elementwise chain runs; the values are the same.
    """

    def __init__(self, bit, init_alpha=6.0, kernels="reference"):
        super().__init__()
        self.kernels = check_kernels(kernels)
        if not (1 <= int(bit) <= 8 or int(bit) == FULL_PRECISION):
            raise ValueError(f"activation bit width must be 1..8 or 32, got {bit}")
        self.bit = int(bit)
        if self.bit != FULL_PRECISION:
            self.act_alpha = nn.Parameter(torch.tensor(float(init_alpha)))

    @property
    def levels(self):
        return 2 ** self.bit - 1

    def forward(self, x):
        if self.bit == FULL_PRECISION:
            return F.relu(x)
        return _QuantReLUFunction.apply(x, self.act_alpha, self.levels, self.kernels)

    def extra_repr(self):
        return f"bit={self.bit}, kernels={self.kernels}"
