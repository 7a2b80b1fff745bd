"""Saving image grids and single images."""

import torch
from torchvision.utils import make_grid, save_image

from common.atomic import atomic_open


def to_unit(x):
    """[-1, 1] -> [0, 1]."""
    return (x.clamp(-1, 1) + 1) / 2


def save_grid(x, path, nrow=None):
    """Save images [B, 3, H, W] in [-1, 1] as one grid PNG, atomically."""
    nrow = nrow or max(1, int(round(x.shape[0] ** 0.5)))
    with atomic_open(path) as f:
        save_image(to_unit(x.float().cpu()), f, nrow=nrow, format="png")


def side_by_side(left, right, nrow=None):
    """One grid image [3, H', W'] in [-1, 1]: two image batches next to each other with a gap."""
    nrow = nrow or max(1, int(round(left.shape[0] ** 0.5)))
    a = make_grid(left.float().cpu(), nrow=nrow, pad_value=1.0)
    b = make_grid(right.float().cpu(), nrow=nrow, pad_value=1.0)
    gap = torch.ones(3, a.shape[1], 8)
    return torch.cat([a, gap, b], dim=2)
