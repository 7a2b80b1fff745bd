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
import pickle
import re

import torch

from common import configs
from common.atomic import atomic_open
from common.errors import UserError

CONFIG_SECTIONS = ("unet", "diffusion", "data")


class _RecordingWriter:
    """A file's ``write`` and ``flush`` that remember the ``OSError`` they raised: torch's zip
    writer reports a failed write as a RuntimeError, which would hide a full disk."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self):
        try:
            self.f.flush()
        except OSError as err:
            self.error = err
            raise


def save_atomic(obj, path):
    """``torch.save`` into a temporary file of the same folder, then rename into place.

    An interruption leaves the previous file at ``path`` untouched; a write that fails (a full
    disk, a read-only folder) is a one-line ``WriteError`` (``common.atomic``).
    """
    with atomic_open(path) as f:
        writer = _RecordingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise


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
    """Load a checkpoint dict of this project, as data only (``torch.load(weights_only=True)``).

    A missing, truncated or foreign file, one that holds Python objects beyond tensors and plain
    data (whose unpickling could run code: it is refused, nothing in it is executed), and one that
    lacks a part every checkpoint has (its configuration sections, its weights) are a
    ``UserError`` naming the file and what is wrong.
    """
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"(GLOBAL|global) ([\w.]+)", str(err))
        what = f" ({found.group(2)})" if found else ""
        raise UserError(f"{path} is not a checkpoint of this project: it holds Python objects{what} beyond "
                        "tensors and plain data; it was refused and nothing in it was executed") from None
    except Exception as err:  # truncated zip, a file of another format, ...
        raise UserError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from None
    try:
        ckpt = _upgrade(ckpt) if isinstance(ckpt, dict) else ckpt
    except (ValueError, TypeError, KeyError) as err:
        raise UserError(f"{path} has an invalid configuration: {err}") from None
    _check_parts(ckpt, path)
    return ckpt


def _check_parts(ckpt, path):
    """``UserError`` unless ``ckpt`` has what every checkpoint of the project has: valid configs
    (``unet``, ``diffusion``, ``data``; ``snn`` for a spiking one) and a dict of weight tensors."""
    if not isinstance(ckpt, dict) or not ({"config", "ema_model", "model"} & set(ckpt)):
        raise UserError(f"{path} is not a checkpoint of this project (no model weights and configuration)")
    config = ckpt.get("config")
    if not isinstance(config, dict):
        raise UserError(f"{path} is incomplete: it has no configuration ('config')")
    sections = CONFIG_SECTIONS + (("snn",) if "snn" in config else ())
    for section in sections:
        if section not in config:
            raise UserError(f"{path} is incomplete: its configuration has no '{section}' section")
    weights = "model" if "snn" in config else "ema_model"
    require(ckpt, path, (weights,) + (("time_steps",) if "snn" in config else ()))
    state = ckpt[weights]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path} is damaged: its '{weights}' entry is not a dict of weight tensors")
    try:
        model_config(ckpt)
        if "snn" in config:
            snn_config(ckpt)
    except (ValueError, TypeError) as err:
        raise UserError(f"{path} has an invalid configuration: {err}") from None


def require(ckpt, path, keys, purpose=None):
    """``UserError`` naming ``path`` and the first of ``keys`` that the dict ``ckpt`` lacks
    (and ``purpose``, what needs it, e.g. 'resuming training')."""
    for key in keys:
        if key not in ckpt:
            needed = f", which {purpose} needs" if purpose else ""
            raise UserError(f"{path} is incomplete: it has no '{key}' entry{needed}")


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
        if isinstance(ckpt.get("finetune"), dict) and "settings" in ckpt["finetune"]:  # a backpack
            state = ckpt["finetune"]
            settings = state.pop("settings")
            state["config"] = configs.to_dict(configs.from_dict(configs.FinetuneConfig, settings))
            state["source_sha256"] = settings.get("source_sha256")
    return ckpt
