"""Models rebuilt from configs (library code: no flags here); their samplers: ``schedulers.build_sampler``."""
from common.errors import UserError
from model import UNet, checkpoint


def build_unet(cfg, kernels="reference"):
    """The (quantized) ``UNet`` of a ``ModelConfig``; an impossible architecture is a ``UserError``."""
    try:
        return UNet(cfg.unet, cfg.diffusion.T, kernels)
    except ValueError as err:
        raise UserError(str(err)) from None


def replace_modules(root, predicate, make):
    """Replace every submodule ``m`` of ``root`` (not ``root`` itself) for which ``predicate(m)``
    holds with ``make(m)``, in place, under the same name; the modules are chosen before any is
    replaced, so a replacement is never visited. Returns ``root``."""
    targets = [(name, m) for name, m in root.named_modules() if name and predicate(m)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent_name) if parent_name else root, child, make(module))
    return root


def load_init(model, path):
    """Load ``path``'s EMA weights into ``model`` for progressive quantization.

    ``act_alpha`` entries the source lacks (a full-precision source) keep their initial value;
    entries it has and the model lacks (a quantized source for a full-precision model) are
    dropped. Anything else that does not match is an error. Returns the keys left at their
    initial value.
    """
    ckpt = checkpoint.load_checkpoint(path)
    source = ckpt.get("ema_model", ckpt.get("model"))
    target = model.state_dict()
    missing = [k for k in target if k not in source]
    unexpected = [k for k in source if k not in target]
    bad = [k for k in missing + unexpected if not k.endswith(("act_alpha", "wgt_alpha"))]
    if bad:
        raise UserError(f"--init {path} does not fit this model: e.g. {bad[:3]} (check --ch, --ch_mult, "
                        "--num_res_blocks, --attn)")
    for key in target:
        if key in source and source[key].shape != target[key].shape:
            raise UserError(f"--init {path}: {key} has shape {tuple(source[key].shape)}, "
                            f"the model expects {tuple(target[key].shape)}")
    model.load_state_dict({k: v for k, v in source.items() if k in target}, strict=False)
    return missing
