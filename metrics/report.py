"""The pieces of an evaluation report that need no Inception network."""
import json
import math
import os

import torch

from common.atomic import atomic_open
from common.lock import exclusive


def psnr(a, b, data_range=2.0):
    """PSNR in dB between image batches of the same shape (default range: [-1, 1], so peak-to-peak 2).

    One number over the whole batch: 10 log10(range^2 / mean squared error); inf when equal.
    """
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def append_jsonl(path, record):
    """Append ``record`` as one JSON line to ``path``, atomically (old lines + new one, then rename),
    one process at a time: runs evaluating into the same folder never lose each other's lines."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with exclusive(folder):
        old = open(path).read() if os.path.exists(path) else ""
        if old and not old.endswith("\n"):
            old += "\n"
        with atomic_open(path, "w") as f:
            f.write(old + json.dumps(record) + "\n")