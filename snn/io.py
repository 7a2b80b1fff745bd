"""SNN checkpoints (DESIGN §6) and loading any checkpoint of the project as a model."""
import os

from common import checkpoint
from common.errors import UserError
from common.flags import MODEL_FLAG_NAMES
from common.models import build_unet
from quant import FULL_PRECISION
from snn.convert import SpikingUNet


def snn_state(snn_model, flags, **extra):
    """The checkpoint dict of a spiking UNet: ``ema_model``, ``flags``, ``bit``, ``T``, ``signed``."""
    return {"ema_model": snn_model.state_dict(), "flags": dict(flags), "bit": snn_model.bit,
            "T": snn_model.time_steps, "signed": snn_model.neuron == "signed", **extra}


def save_snn(path, snn_model, flags, **extra):
    """Write an SNN checkpoint atomically; ``extra`` entries are stored beside the standard ones."""
    checkpoint.save_atomic(snn_state(snn_model, flags, **extra), path)


def build_snn(flags, signed, kernels="reference"):
    try:
        return SpikingUNet(neuron="signed" if signed else "if", T=flags["T"], ch=flags["ch"], ch_mult=flags["ch_mult"],
                           attn=flags["attn"], num_res_blocks=flags["num_res_blocks"],
                           dropout=flags["dropout"], bit=flags["bit"], wbit=flags.get("wbit", 32),
                           kernels=kernels)
    except ValueError as err:
        raise UserError(str(err)) from None


def load_training_ann(path, device="cpu", kernels="reference", resolve=None):
    """The quantized EMA UNet of a training ``ckpt.pt``, the source of stages 2 and 3.

    Returns (ann in eval mode, its architecture and diffusion flags, the checkpoint). ``resolve``
    (``common.flags.resolve_model_flags`` in the scripts) merges those flags with the command line.
    A missing file, an SNN checkpoint or a full-precision model is a ``UserError``.
    """
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: train the quantized ANN first (ANN_train.py) "
                        "or point --logdir at the folder that holds its ckpt.pt")
    ckpt = checkpoint.load_checkpoint(path)
    if checkpoint.checkpoint_kind(ckpt) != "ann":
        raise UserError(f"{path} is already an SNN checkpoint; conversion and fine-tuning start from "
                        "the training ckpt.pt")
    # only the architecture/diffusion flags: the stored training flags (seed, batch_size) are not ours
    stored = {name: value for name, value in ckpt["flags"].items() if name in MODEL_FLAG_NAMES}
    if resolve is not None:
        stored = resolve(stored, path)
    if stored["bit"] == FULL_PRECISION:
        raise UserError(f"{path} is a full-precision model (bit=32): only a quantized ANN (--bit 1..8) "
                        f"converts into IF neurons; train one with ANN_train.py --bit=2 [--init {path}]")
    ann = checkpoint.load_weights(build_unet(stored, kernels), ckpt["ema_model"], path)
    return ann.to(device).eval(), stored, ckpt


def load_model(path, device="cpu", kernels="reference"):
    """Any checkpoint of the project as an eval-mode model: (model, kind, ckpt).

    ``kind`` is ``'snn'`` (converted or fine-tuned SNN: a ``SpikingUNet``) or ``'ann'`` (a
    training ``ckpt.pt``: its EMA ``UNet``); ``kernels`` as for ``UNet``.
    """
    ckpt = checkpoint.load_checkpoint(path)
    kind = checkpoint.checkpoint_kind(ckpt)
    if kind == "snn":
        model = build_snn(ckpt["flags"], ckpt["signed"], kernels)
    else:
        model = build_unet(ckpt["flags"], kernels)
    checkpoint.load_weights(model, ckpt["ema_model"], path)
    return model.to(device).eval(), kind, ckpt
