"""Saving image grids a person can look at."""
import math

import torch
import torch.nn.functional as F

from common.atomic import atomic_open

MIN_PIXELS = 64  # small images are enlarged (nearest neighbour) to at least this many pixels a side


def to_unit(x):
    """[-1, 1] -> [0, 1]."""
    return (x.clamp(-1, 1) + 1) / 2


def enlarge(x, min_pixels=MIN_PIXELS):
    """Images [B, C, H, W] scaled up by the smallest integer factor that makes H >= ``min_pixels``,
    nearest neighbour, so every pixel stays a visible square."""
    factor = max(1, math.ceil(min_pixels / x.shape[-2]))
    return F.interpolate(x, scale_factor=factor, mode="nearest") if factor > 1 else x


def save_grid(x, path, nrow=None):
    """Save images [B, 3, H, W] in [-1, 1] as one enlarged grid PNG, atomically."""
    from torchvision.utils import save_image  # torchvision takes ~1.5 s to import: only where a grid is saved
    nrow = nrow or max(1, int(round(x.shape[0] ** 0.5)))
    with atomic_open(path) as f:
        save_image(to_unit(enlarge(x.float().cpu())), f, nrow=nrow, padding=4, format="png")


def side_by_side(left, right, nrow=None):
    """One image [1, 3, H', W'] in [-1, 1]: two enlarged grids next to each other with a white gap."""
    from torchvision.utils import make_grid
    nrow = nrow or max(1, int(round(left.shape[0] ** 0.5)))
    a = make_grid(enlarge(left.float().cpu()), nrow=nrow, padding=4, pad_value=1.0)
    b = make_grid(enlarge(right.float().cpu()), nrow=nrow, padding=4, pad_value=1.0)
    gap = torch.ones(3, a.shape[1], 16)
    return torch.cat([a, gap, b], dim=2)[None]
