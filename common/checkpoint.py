"""Checkpoint I/O: atomic writes and loads that fail with a clear message (DESIGN §6)."""
import os

import torch

from common.atomic import atomic_open
from common.errors import UserError

ANN_KEYS = ("net_model", "ema_model", "flags", "step")
SNN_KEYS = ("ema_model", "flags", "bit", "T", "signed")


def save_atomic(obj, path):
    """``torch.save`` into a temporary file of the same folder, then rename into place.

    An interruption leaves the previous file at ``path`` untouched.
    """
    with atomic_open(path) as f:
        torch.save(obj, f)


def load_weights(model, state, path):
    """``model.load_state_dict(state)`` (strict); weights that do not fit are a ``UserError`` naming ``path``."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{path}: the weights do not fit the model its flags describe: "
                        f"{str(err).splitlines()[0]}") from None
    return model


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint dict; a missing, truncated or foreign file is a ``UserError``."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # truncated zip, pickle from elsewhere, ...
        raise UserError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from None
    if not isinstance(ckpt, dict) or "ema_model" not in ckpt or "flags" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this project (no 'ema_model' and 'flags' entries)")
    return ckpt


def checkpoint_kind(ckpt):
    """``'snn'`` for a converted or fine-tuned SNN checkpoint, ``'ann'`` for a training ``ckpt.pt``."""
    return "snn" if "signed" in ckpt else "ann"
