"""SNN checkpoints (DESIGN §6) and loading any checkpoint of the project as a model."""
from common import checkpoint
from common.errors import UserError
from common.models import build_unet
from snn.convert import SpikingUNet


def snn_state(snn_model, flags, **extra):
    """The checkpoint dict of a spiking UNet: ``ema_model``, ``flags``, ``bit``, ``T``, ``signed``."""
    return {"ema_model": snn_model.state_dict(), "flags": dict(flags), "bit": snn_model.bit,
            "T": snn_model.time_steps, "signed": snn_model.signed, **extra}


def save_snn(path, snn_model, flags, **extra):
    """Write an SNN checkpoint atomically; ``extra`` entries are stored beside the standard ones."""
    checkpoint.save_atomic(snn_state(snn_model, flags, **extra), path)


def build_snn(flags, signed, kernels="reference"):
    try:
        return SpikingUNet(signed=signed, T=flags["T"], ch=flags["ch"], ch_mult=flags["ch_mult"],
                           attn=flags["attn"], num_res_blocks=flags["num_res_blocks"],
                           dropout=flags["dropout"], bit=flags["bit"], wbit=flags.get("wbit", 32),
                           kernels=kernels)
    except ValueError as err:
        raise UserError(str(err)) from None


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
    try:
        model.load_state_dict(ckpt["ema_model"])
    except RuntimeError as err:
        raise UserError(f"{path}: the weights do not fit the model its flags describe: "
                        f"{str(err).splitlines()[0]}") from None
    return model.to(device).eval(), kind, ckpt
