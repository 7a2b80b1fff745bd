"""Checkpoint I/O: atomic writes, and loads that fail with a clear message (``docs/formats.md``).

Two kinds of checkpoint, both dicts with the configs under ``config`` (plain dicts, see
``common.configs``):

* training (``ckpt.pt``): ``net_model``, ``ema_model``, ``optim``, ``sched``, ``step``, ``x_T``;
  ``config`` has ``unet``, ``diffusion``, ``data`` and ``train``;
* spiking (``converted_snn.pt``, ``snn_ft.pt``, backpacks): ``model`` (the SNN's state dict),
  ``time_steps``; ``config`` has ``unet``, ``diffusion``, ``data`` and ``snn``.

Checkpoints written before the configs existed (a flat ``flags`` dict) are read through
``_upgrade``.
"""
import hashlib
import os

import torch

from common import configs
from common.atomic import atomic_open
from common.errors import UserError


def save_atomic(obj, path):
    """``torch.save`` into a temporary file of the same folder, then rename into place.

    An interruption leaves the previous file at ``path`` untouched.
    """
    with atomic_open(path) as f:
        torch.save(obj, f)


def file_digest(path, length=None):
    """The sha256 of a file's bytes as hex (its first ``length`` digits when given): what a
    result derived from the file is keyed by, so a changed file is never mistaken for it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def load_weights(model, state, path):
    """``model.load_state_dict(state)`` (strict); weights that do not fit are a ``UserError`` naming ``path``."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{path}: the weights do not fit the model its configuration describes: "
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
    ckpt = _upgrade(ckpt) if isinstance(ckpt, dict) else ckpt
    if not isinstance(ckpt, dict) or "config" not in ckpt or not ({"ema_model", "model"} & set(ckpt)):
        raise UserError(f"{path} is not a checkpoint of this project (no model weights and configuration)")
    return ckpt


def is_snn(ckpt):
    """Whether ``ckpt`` holds a spiking UNet (else a training checkpoint of a quantized ANN)."""
    return "snn" in ckpt["config"]


def model_config(ckpt):
    """The ``ModelConfig`` a checkpoint's model was built from."""
    return configs.ModelConfig.from_dict(ckpt["config"])


def snn_config(ckpt):
    """The ``SNNConfig`` of a spiking checkpoint."""
    return configs.from_dict(configs.SNNConfig, ckpt["config"]["snn"])


def _upgrade(ckpt):
    """A checkpoint with a flat ``flags`` dict (the first format) in today's format."""
    if "config" in ckpt or "flags" not in ckpt:
        return ckpt
    flat = ckpt.pop("flags")
    parts = {"unet": configs.UNetConfig, "diffusion": configs.DiffusionConfig, "data": configs.DataConfig,
             "train": configs.TrainConfig}
    ckpt["config"] = {key: configs.to_dict(configs.from_dict(cls, flat)) for key, cls in parts.items()}
    if "signed" in ckpt:  # a spiking checkpoint: its weights were stored under 'ema_model'
        del ckpt["config"]["train"]
        ckpt["config"]["snn"] = {"neuron": "signed" if ckpt.pop("signed") else "if", "norm": "step"}
        ckpt["model"] = ckpt.pop("ema_model")
        ckpt["time_steps"] = ckpt.pop("T")
    return ckpt
