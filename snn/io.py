"""Spiking checkpoints, the one conversion helper, and loading any checkpoint of the project as a model."""
import os
from typing import NamedTuple, Optional

from common import configs
from model import checkpoint
from common.configs import ModelConfig, SNNConfig
from common.errors import UserError
from model.build import build_unet
from quant import FULL_PRECISION
from snn.convert import SpikingUNet, convert


class Loaded(NamedTuple):
    """A checkpoint as a model: ``kind`` is ``'snn'`` or ``'ann'`` (a training ``ckpt.pt``'s EMA UNet)."""
    model: object
    kind: str
    config: ModelConfig
    snn: Optional[SNNConfig]
    ckpt: dict


def to_snn(ann, snn_cfg):
    """The spiking copy of the quantized UNet ``ann`` in ``snn_cfg``'s mode, in eval mode."""
    try:
        return convert(ann, snn_cfg.neuron, snn_cfg.norm).eval()
    except (ValueError, TypeError) as err:
        raise UserError(f"cannot convert this model: {err}") from None


def save_snn(path, snn, cfg, snn_cfg, **extra):
    """Write a spiking checkpoint atomically (``model``, ``config``, ``time_steps`` and ``extra``)."""
    config = {**cfg.to_dict(), "snn": configs.to_dict(snn_cfg)}
    checkpoint.save_atomic({"model": snn.state_dict(), "config": config, "time_steps": snn.time_steps, **extra}, path)


def build_snn(cfg, snn_cfg, kernels="reference"):
    """An untrained ``SpikingUNet`` of a ``ModelConfig`` in ``snn_cfg``'s mode."""
    try:
        return SpikingUNet(cfg.unet, cfg.diffusion.T, kernels, snn_cfg.neuron, snn_cfg.norm)
    except ValueError as err:
        raise UserError(str(err)) from None


def load_training_ann(path, device="cpu", kernels="reference"):
    """The quantized EMA UNet of a training ``ckpt.pt``, the source of stages 2 and 3.

    Returns (ann in eval mode, its ``ModelConfig``, the checkpoint). A missing file, a spiking
    checkpoint or a full-precision model is a ``UserError``.
    """
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: train the quantized ANN first (ANN_train.py) "
                        "or point --logdir at the folder that holds its ckpt.pt")
    ckpt = checkpoint.load_checkpoint(path)
    if checkpoint.is_snn(ckpt):
        raise UserError(f"{path} is already an SNN checkpoint; conversion and fine-tuning start from "
                        "the training ckpt.pt")
    cfg = checkpoint.model_config(ckpt)
    if cfg.unet.bit == FULL_PRECISION:
        raise UserError(f"{path} is a full-precision model (bit=32): only a quantized ANN (--bit 1..8) "
                        f"converts into IF neurons; train one with ANN_train.py --bit=2 [--init {path}]")
    ann = checkpoint.load_weights(build_unet(cfg, kernels), ckpt["ema_model"], path)
    return ann.to(device).eval(), cfg, ckpt


def load_model(path, device="cpu", kernels="reference"):
    """Any checkpoint of the project as an eval-mode model (``Loaded``); ``kernels`` as for ``UNet``."""
    ckpt = checkpoint.load_checkpoint(path)
    cfg = checkpoint.model_config(ckpt)
    if checkpoint.is_snn(ckpt):
        snn_cfg = checkpoint.snn_config(ckpt)
        model = checkpoint.load_weights(build_snn(cfg, snn_cfg, kernels), ckpt["model"], path)
        return Loaded(model.to(device).eval(), "snn", cfg, snn_cfg, ckpt)
    model = checkpoint.load_weights(build_unet(cfg, kernels), ckpt["ema_model"], path)
    return Loaded(model.to(device).eval(), "ann", cfg, None, ckpt)
