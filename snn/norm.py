"""GroupNorm for spiking networks: per step, or compensated so that it is exact over T steps.

A spiking UNet runs every layer on the folded ``[T*B, ...]`` tensor. All its layers but two kinds
are linear, so they commute with the time mean; the activations (IF neurons) and GroupNorm do
not. A plain ``nn.GroupNorm`` normalises every step on its own (``norm="step"``) and
mean_t GN(x_t) != GN(mean_t x_t). ``CompensatedGroupNorm`` (``norm="compensated"``) keeps the
running input sum S_t = x_1 + ... + x_t and emits

    o_t = t * GN(S_t / t) - (t - 1) * GN(S_{t-1} / (t - 1)),    o_1 = GN(x_1),

so o_1 + ... + o_T = T * GN(mean_t x_t) (the sum telescopes) while step t uses steps <= t only.
"""
import torch
import torch.nn as nn

from model.build import replace_modules
from snn.steps import fold, unfold

NORM_KINDS = ("step", "compensated")


def check_norm(norm):
    """``norm`` if it names a GroupNorm mode of ``NORM_KINDS``, else ValueError."""
    if norm not in NORM_KINDS:
        raise ValueError(f"norm must be one of {NORM_KINDS}, got {norm!r}")
    return norm


class CompensatedGroupNorm(nn.GroupNorm):
    """GroupNorm over a T-step window whose outputs sum to T * GN(time-mean input), causally.

    forward(x [T*B, C, ...]) -> [T*B, C, ...] (time-major folded). Parameters and their names
    (``weight``, ``bias``) are ``nn.GroupNorm``'s, so a state dict loads into either.
    """

    def __init__(self, time_steps, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None):
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.time_steps = int(time_steps)

    @classmethod
    def from_group_norm(cls, norm, time_steps):
        """A compensated copy of the ``nn.GroupNorm`` ``norm`` (same settings, parameter values,
        device and dtype)."""
        factory = {"device": norm.weight.device, "dtype": norm.weight.dtype} if norm.affine else {}
        new = cls(time_steps, norm.num_groups, norm.num_channels, norm.eps, norm.affine, **factory)
        new.load_state_dict(norm.state_dict())
        return new.train(norm.training)

    def forward(self, x):
        T = self.time_steps
        steps = torch.arange(1, T + 1, dtype=x.dtype, device=x.device).view(T, *[1] * x.dim())
        running_mean = torch.cumsum(unfold(x, T), 0) / steps           # S_t / t, [T, B, C, ...]
        total = steps * unfold(super().forward(fold(running_mean)), T)  # t * GN(S_t / t)
        # o_t = total_t - total_{t-1}: the outputs telescope back to total_T = T * GN(mean x)
        return fold(torch.cat([total[:1], total[1:] - total[:-1]]))

    def extra_repr(self):
        return f"time_steps={self.time_steps}, {super().extra_repr()}"


def swap_group_norms(module, time_steps):
    """Replace every plain ``nn.GroupNorm`` under ``module`` with a ``CompensatedGroupNorm`` over
    ``time_steps`` steps, in place, keeping names and parameter values. Returns ``module``."""
    return replace_modules(module, lambda m: isinstance(m, nn.GroupNorm) and not isinstance(m, CompensatedGroupNorm),
                           lambda norm: CompensatedGroupNorm.from_group_norm(norm, time_steps))
