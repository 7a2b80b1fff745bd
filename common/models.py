"""Building models and samplers from stored flag dicts (library code: no FLAGS here)."""
from common.errors import UserError
from diffusion import make_sampler
from model import UNet


def build_unet(cfg, kernels="reference"):
    """A ``UNet`` from a flag dict with the keys of ``common.flags.MODEL_FLAG_NAMES``."""
    try:
        return UNet(T=cfg["T"], ch=cfg["ch"], ch_mult=cfg["ch_mult"], attn=cfg["attn"],
                    num_res_blocks=cfg["num_res_blocks"], dropout=cfg["dropout"],
                    bit=cfg["bit"], wbit=cfg.get("wbit", 32), alpha_init=cfg.get("alpha_init", 6.0),
                    kernels=kernels)
    except ValueError as err:
        raise UserError(str(err)) from None


def build_sampler(model, cfg, sampler="ddpm", sample_steps=None, eta=0.0):
    """The sampler named by ``sampler`` for ``model`` with the diffusion settings of ``cfg``."""
    return make_sampler(model, sampler, cfg["beta_1"], cfg["beta_T"], cfg["T"], cfg["img_size"],
                        cfg["mean_type"], cfg["var_type"], sample_steps=sample_steps, eta=eta)
