"""APoT weight quantization (Li et al., ICLR 2020) for conv and linear layers.

A weight tensor is normalised to zero mean and unit standard deviation, divided by a learnable
clipping value ``wgt_alpha``, clamped to [-1, 1] and snapped to the nearest level of a signed
additive-powers-of-two set (one sign bit, ``wbit - 1`` magnitude bits).
"""
import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant.activation import FULL_PRECISION

# Each magnitude level is a sum of one term per group; a group offers 0 or one power of two
# 2**-k for k in its list. These are the additive sets of the APoT paper for 2..6 magnitude bits.
_APOT_TERMS = {
    2: ([1, 2, 3],),
    3: ([1, 2, 4], [3]),
    4: ([1, 3, 5], [2, 4, 6]),
    5: ([1, 3, 6], [2, 4, 7], [5]),
    6: ([1, 4, 7], [2, 5, 8], [3, 6, 9]),
}


def apot_levels(bits):
    """Sorted magnitude levels of the ``bits``-bit additive powers-of-two set, max 1.

    Returns a float64 tensor of 2**bits distinct values in [0, 1] that starts at 0.
    """
    if bits not in _APOT_TERMS:
        raise ValueError(f"APoT levels exist for 2..6 magnitude bits, got {bits}")
    groups = [[0.0] + [2.0 ** -k for k in exps] for exps in _APOT_TERMS[bits]]
    sums = sorted({sum(choice) for choice in itertools.product(*groups)})
    levels = torch.tensor(sums, dtype=torch.float64)
    return levels / levels.max()


def _snap(magnitude, levels):
    """Nearest level of ``levels`` for each element of ``magnitude`` (both in [0, 1])."""
    mids = (levels[1:] + levels[:-1]) / 2
    return levels[torch.bucketize(magnitude, mids)]


class _APoTWeightFunction(torch.autograd.Function):
    """Quantize normalised weights; straight-through for w, APoT rule for alpha."""

    @staticmethod
    def forward(ctx, w, alpha, levels):
        scaled = w / alpha
        clipped = scaled.clamp(-1, 1)
        q = _snap(clipped.abs(), levels) * clipped.sign()
        ctx.save_for_backward(scaled, q)
        return q * alpha

    @staticmethod
    def backward(ctx, grad):
        scaled, q = ctx.saved_tensors
        outside = scaled.abs() > 1
        local = torch.where(outside, scaled.sign(), q - scaled)
        return grad, (grad * local).sum().reshape(()), None


class WeightQuantizer(nn.Module):
    """Quantizes a weight tensor to ``wbit`` bits (``wbit = 32``: identity)."""

    def __init__(self, wbit, init_alpha=3.0):
        super().__init__()
        if not (2 <= int(wbit) <= 7 or int(wbit) == FULL_PRECISION):
            raise ValueError(f"weight bit width must be 2..7 or 32, got {wbit}")
        self.wbit = int(wbit)
        if self.wbit != FULL_PRECISION:
            self.wgt_alpha = nn.Parameter(torch.tensor(float(init_alpha)))
            magnitude_bits = self.wbit - 1
            if magnitude_bits == 1:  # one magnitude bit: {0, 1}, as in APoT's uniform fallback
                levels = torch.tensor([0.0, 1.0], dtype=torch.float64)
            else:
                levels = apot_levels(magnitude_bits)
            self.register_buffer("levels", levels.float(), persistent=False)

    def forward(self, w):
        if self.wbit == FULL_PRECISION:
            return w
        w = (w - w.mean().detach()) / w.std().detach()
        return _APoTWeightFunction.apply(w, self.wgt_alpha, self.levels.to(w.dtype))


class QConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight passes through a ``WeightQuantizer``."""

    def __init__(self, *args, wbit=FULL_PRECISION, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_quant = WeightQuantizer(wbit)

    def forward(self, x):
        return self._conv_forward(x, self.weight_quant(self.weight), self.bias)


class QLinear(nn.Linear):
    """``nn.Linear`` whose weight passes through a ``WeightQuantizer``."""

    def __init__(self, *args, wbit=FULL_PRECISION, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_quant = WeightQuantizer(wbit)

    def forward(self, x):
        return F.linear(x, self.weight_quant(self.weight), self.bias)
