"""Flag definitions shared by the four scripts, each defined once (DESIGN §1).

A script calls the ``define_*`` groups it needs at import time. Architecture and diffusion flags
are stored in every checkpoint (``model_flags``); later stages rebuild the model from the
checkpoint and refuse an explicitly given flag that contradicts it (``resolve_model_flags``).
"""
import functools
import os

from absl import flags

from common.errors import UserError

FLAGS = flags.FLAGS

MODEL_FLAG_NAMES = ("ch", "ch_mult", "attn", "num_res_blocks", "dropout", "bit", "wbit", "alpha_init",
                    "T", "beta_1", "beta_T", "mean_type", "var_type", "img_size", "dataset")


def define_model_flags():
    # UNet
    flags.DEFINE_integer("ch", 128, help="base channel of the UNet (a multiple of 32)")
    flags.DEFINE_multi_integer("ch_mult", [1, 2, 2, 2], help="channel multiplier per resolution level")
    flags.DEFINE_multi_integer("attn", [], help="levels with self-attention (full precision only)")
    flags.DEFINE_integer("num_res_blocks", 2, help="ResBlocks per level")
    flags.DEFINE_float("dropout", 0.1, help="dropout rate of the ResBlocks")
    # Quantization
    flags.DEFINE_integer("bit", 2, help="activation bits; the SNN runs T = 2**bit - 1 steps; 32 = full precision")
    flags.DEFINE_float("alpha_init", 6.0, help="initial act_alpha (clipping threshold) of the quantized activations")
    flags.DEFINE_integer("wbit", 32, help="APoT weight bits (32 = full-precision weights, as in the seed)")
    # Gaussian diffusion
    flags.DEFINE_float("beta_1", 1e-4, help="start beta value")
    flags.DEFINE_float("beta_T", 0.02, help="end beta value")
    flags.DEFINE_integer("T", 1000, help="number of diffusion steps")
    flags.DEFINE_enum("mean_type", "epsilon", ["xprev", "xstart", "epsilon"], help="predict variable")
    flags.DEFINE_enum("var_type", "fixedlarge", ["fixedlarge", "fixedsmall"], help="variance type")
    flags.DEFINE_integer("img_size", 32, help="image size")
    flags.register_validator("bit", lambda b: 1 <= b <= 8 or b == 32, message="--bit must be in 1..8 or 32")
    flags.register_validator("wbit", lambda b: 2 <= b <= 7 or b == 32, message="--wbit must be in 2..7 or 32")
    flags.register_validator("ch", lambda c: c > 0 and c % 32 == 0,
                             message="--ch must be a positive multiple of 32 (GroupNorm uses 32 groups)")


def define_data_flags():
    flags.DEFINE_enum("dataset", "cifar10", ["cifar10", "shapes"],
                      help="cifar10 (torchvision) or shapes (embedded synthetic data, no download)")
    flags.DEFINE_string("data_dir", "./data", help="folder of the torchvision CIFAR-10 data")
    flags.DEFINE_integer("num_workers", 4, help="workers of the data loader")


def define_run_flags():
    flags.DEFINE_string("logdir", None, help="log directory (default: ./logs/RELU_QUANT{bit}B_DDPM_CIFAR10_EPS)")
    flags.DEFINE_integer("seed", 0, help="random seed")
    flags.DEFINE_bool("parallel", False, help="multi-GPU training with torch.nn.DataParallel")
    flags.DEFINE_enum("kernels", "reference", ["reference", "compile", "auto"],
                      help="how quantized activations and IF neurons run; every choice gives the same values: "
                           "reference = plain PyTorch operations, compile = fused torch.compile kernels (a C++ "
                           "compiler on CPUs, Triton on GPUs; seconds to compile at start), auto = compile, "
                           "falling back to reference if it cannot")


@functools.lru_cache(maxsize=None)
def _parallel_kernels_note(kernels):
    print(f"note: --kernels={kernels} is not used with --parallel (DataParallel); torchrun runs the compiled kernels")


def kernels():
    """``--kernels``, except under ``--parallel``: DataParallel's replica threads run the reference."""
    if FLAGS.parallel and FLAGS.kernels != "reference":
        _parallel_kernels_note(FLAGS.kernels)  # once per process
        return "reference"
    return FLAGS.kernels


def define_sampler_flags():
    flags.DEFINE_enum("sampler", "ddpm", ["ddpm", "ddim"], help="ancestral 1000-step sampler or DDIM")
    flags.DEFINE_integer("sample_steps", 100, help="DDIM sampling steps")
    flags.DEFINE_float("eta", 0.0, help="DDIM eta (0: deterministic)")


def define_snn_flags():
    flags.DEFINE_bool("sign", False, help="--sign: Fast-SNN's signed IF neurons; --nosign (default): plain IF "
                      "neurons, whose DDIM samples measured closer to the ANN's on the demo model (README)")


def logdir():
    """``--logdir``, or the seed's default name for ``--bit``."""
    return FLAGS.logdir or os.path.join(".", "logs", f"RELU_QUANT{FLAGS.bit}B_DDPM_CIFAR10_EPS")


def model_flags():
    """Plain dict of the architecture and diffusion flags, as stored in checkpoints."""
    return {name: _plain(FLAGS[name].value) for name in MODEL_FLAG_NAMES if name in FLAGS}


def resolve_model_flags(stored, path):
    """Merge a checkpoint's stored flags into FLAGS, refusing explicit contradictions.

    Only architecture and diffusion flags are compared and adopted (training settings such as
    ``total_steps`` may change between runs). Returns the stored dict. A flag given on the command line or in a flagfile that differs
    from the checkpoint raises ``UserError`` naming both values and the checkpoint ``path``.
    """
    for name, value in stored.items():
        if name not in MODEL_FLAG_NAMES or name not in FLAGS:
            continue
        given = FLAGS[name]
        if given.present and _plain(given.value) != value:
            raise UserError(f"--{name}={_plain(given.value)} contradicts the checkpoint {path}, "
                            f"which was trained with {name}={value}; drop the flag or fix it")
        given.value = list(value) if isinstance(value, (list, tuple)) else value
    return stored


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value
