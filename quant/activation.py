"""Quantized ReLU with a learnable clipping threshold (APoT, Li et al., ICLR 2020).

    y = alpha * clamp(floor(relu(x) / alpha * L + 1/2), 0, L) / L,   L = 2**bit - 1

Rounding is half *up*: that is what an integrate-and-fire neuron whose membrane starts at
half its threshold computes over L time steps, so the conversion of ``snn/`` is exact for a
constant input.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

FULL_PRECISION = 32


def quantize_activation(x, alpha, levels):
    """Forward value of the b-bit quantizer (no gradient rules), any shape."""
    scaled = torch.floor(F.relu(x) / alpha * levels + 0.5)
    return alpha * scaled.clamp(0, levels) / levels


class _QuantReLUFunction(torch.autograd.Function):
    """Quantizer with the APoT gradients.

    d y / d x     = 1 inside (0, alpha), 0 elsewhere (straight-through estimator)
    d y / d alpha = 1 where x >= alpha, (y - x) / alpha inside (0, alpha), 0 below 0
    """

    @staticmethod
    def forward(ctx, x, alpha, levels):
        y = quantize_activation(x, alpha, levels)
        ctx.save_for_backward(x, alpha, y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, alpha, y = ctx.saved_tensors
        inside = (x > 0) & (x < alpha)
        above = x >= alpha
        grad_x = grad_y * inside.to(grad_y.dtype)
        local = torch.where(above, torch.ones_like(x), torch.where(inside, (y - x) / alpha, torch.zeros_like(x)))
        grad_alpha = (grad_y * local).sum().reshape(alpha.shape)
        return grad_x, grad_alpha, None


class QuantReLU(nn.Module):
    """``bit``-bit quantized ReLU; ``bit = 32`` is a plain ReLU (the full-precision baseline).

    A quantized activation holds one learnable scalar ``act_alpha`` (the clipping threshold,
    later the IF threshold); the full-precision one has no parameter.
    """

    def __init__(self, bit, init_alpha=6.0):
        super().__init__()
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
        return _QuantReLUFunction.apply(x, self.act_alpha, self.levels)

    def extra_repr(self):
        return f"bit={self.bit}"
