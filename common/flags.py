"""Flags shared by the scripts, each defined once with the values it accepts (``docs/flags.md``).

A script calls the ``define_*`` groups it needs at import time. A value outside its domain is
refused while the command line is parsed, before any work starts, with one line naming the
flag, the value and what would be valid (``common.errors``).

Flags become configs (``common.configs``) here and only here. When a checkpoint already fixes
a config, an explicitly given flag (command line or flagfile) that contradicts it is a
``UserError``, and flags not given take the checkpoint's values. Nothing writes into ``FLAGS``.
"""
import dataclasses
import functools
import os
import sys

from absl import flags

from common import configs
from common.errors import UserError

FLAGS = flags.FLAGS

# flags of the UNet, the diffusion and the image size: architecture settings stored in checkpoints
MODEL_CONFIGS = {"unet": configs.UNetConfig, "diffusion": configs.DiffusionConfig, "data": configs.DataConfig}


def _positive(name):
    flags.register_validator(name, lambda v: v is not None and v >= 1, message=f"--{name} must be at least 1")


def _non_negative(name):
    flags.register_validator(name, lambda v: v is not None and v >= 0, message=f"--{name} must be 0 or more")


def _in_range(name, low, high, what):
    flags.register_validator(name, lambda v: v is not None and low <= v <= high, message=f"--{name} must be {what}")


def define_model_flags():
    # UNet
    flags.DEFINE_integer("ch", 128, help="base channel of the UNet (a multiple of --num_groups)")
    flags.DEFINE_multi_integer("ch_mult", [1, 2, 2, 2], help="channel multiplier per resolution level")
    flags.DEFINE_multi_integer("attn", [], help="levels with self-attention (full precision only)")
    flags.DEFINE_integer("num_res_blocks", 2, help="ResBlocks per level")
    flags.DEFINE_float("dropout", 0.1, help="dropout rate of the ResBlocks")
    flags.DEFINE_integer("num_groups", 32, help="groups of every GroupNorm (pytorch-ddpm: 32); with one channel per "
                         "group GroupNorm removes each channel's mean, and the UNet cannot predict an image's "
                         "mean colour: keep --ch / --num_groups >= 2 (the CIFAR-10 UNet has 4)")
    flags.DEFINE_integer("img_size", 32, help="image size (a multiple of 2**(levels - 1))")
    flags.DEFINE_integer("img_channels", None, help="image channels of the UNet: 1 (grayscale) or 3 (RGB); default: "
                         "the dataset's (mnist, fashion_mnist: 1; cifar10, celeba, shapes, folder: 3); "
                         "--dataset=folder --img_channels=1 converts the images to grayscale")
    flags.DEFINE_bool("spike_driven", False, help="every weight layer after the head reads a quantized activation "
                      "(spikes in the SNN): no 1x1 shortcut and no resampling conv reads the analog stream; "
                      "off: pytorch-ddpm's UNet (docs/energy.md)")
    flags.DEFINE_enum("resample", "", ["", "conv", "pool", "act_conv", "signed_conv"],
                      help="down/up-sampling: conv = a 3x3 conv of the stream (pytorch-ddpm), pool = average "
                           "pooling / nearest upsampling without weights (DDPM's resamp_with_conv=False), "
                           "act_conv = GroupNorm and a quantized ReLU before the conv, signed_conv = a signed "
                           "quantizer before the conv; empty: conv, or pool with --spike_driven")
    flags.DEFINE_enum("shortcut", "", ["", "x", "act", "signed", "fold", "fold_sum", "fold_act"],
                      help="the ResBlock shortcuts where the channels change: a 1x1 conv of x = the analog stream "
                           "(pytorch-ddpm), act = the block's first activation act(GroupNorm(x)), signed = a signed "
                           "quantizer of x; fold = no conv, x's channels zero-padded and averaged in groups onto the "
                           "output's (fold_sum: summed); fold_act = fold_sum plus the 1x1 conv of act; empty: x, or "
                           "fold with --spike_driven")
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

    _positive("num_groups")
    flags.register_multi_flags_validator(
        ["ch", "num_groups"], lambda v: v["ch"] > 0 and v["num_groups"] > 0 and v["ch"] % v["num_groups"] == 0,
        message="--ch must be a positive multiple of --num_groups (the GroupNorm groups)")
    flags.register_multi_flags_validator(
        ["spike_driven", "resample", "shortcut"],
        lambda v: not (v["spike_driven"] and (v["resample"] == "conv" or v["shortcut"] == "x")),
        message="--spike_driven needs layers that read spikes: --resample=pool, act_conv or signed_conv and "
                "--shortcut=act, signed or fold (or leave them out)")
    flags.register_validator("ch_mult", lambda m: bool(m) and min(m) >= 1,
                             message="--ch_mult needs at least one level, every multiplier at least 1")
    _positive("num_res_blocks")
    flags.register_validator("img_channels", lambda c: c is None or c in (1, 3),
                             message="--img_channels must be 1 (grayscale) or 3 (RGB)")
    flags.register_validator("dropout", lambda p: 0 <= p < 1, message="--dropout must be in [0, 1)")
    flags.register_validator("bit", lambda b: 1 <= b <= 8 or b == 32, message="--bit must be in 1..8 or 32")
    flags.register_validator("wbit", lambda b: 2 <= b <= 7 or b == 32, message="--wbit must be in 2..7 or 32")
    flags.register_validator("alpha_init", lambda a: a > 0, message="--alpha_init must be positive")
    flags.register_validator("T", lambda t: t >= 2, message="--T must be at least 2")
    flags.register_multi_flags_validator(
        ["beta_1", "beta_T"], lambda v: 0 < v["beta_1"] <= v["beta_T"] < 1,
        message="the beta schedule needs 0 < --beta_1 <= --beta_T < 1")
    flags.register_multi_flags_validator(
        ["img_size", "ch_mult"], lambda v: _fits_levels(v["img_size"], v["ch_mult"]),
        message="--img_size must be a positive multiple of 2**(levels - 1), levels = the number of --ch_mult "
                "values, and at least 4")
    flags.register_multi_flags_validator(
        ["attn", "ch_mult"], lambda v: all(0 <= i < len(v["ch_mult"]) for i in v["attn"]),
        message="every --attn level must be one of the --ch_mult levels (0 .. levels - 1)")


def _fits_levels(img_size, ch_mult):
    return img_size >= 4 and img_size % 2 ** (len(ch_mult or [1]) - 1) == 0


def define_data_flags():
    flags.DEFINE_enum("dataset", "cifar10", list(configs.DATASET_CHANNELS),
                      help="cifar10, mnist, fashion_mnist, celeba (torchvision's datasets), folder (every image "
                           "below --data_dir) or shapes (embedded synthetic data, no download) (docs/data.md)")
    flags.DEFINE_string("data_dir", "./data", help="folder of the data: torchvision's layout for cifar10, mnist, "
                        "fashion_mnist and celeba, any folder of images for folder; not used by shapes")
    flags.DEFINE_integer("num_workers", 4, help="workers of the data loader")
    _non_negative("num_workers")


def define_run_flags():
    flags.DEFINE_string("logdir", None, help="log directory (default: ./logs/RELU_QUANT{bit}B_DDPM_CIFAR10_EPS)")
    flags.DEFINE_integer("seed", 0, help="random seed")
    flags.DEFINE_bool("parallel", False, help="multi-GPU training with torch.nn.DataParallel")
    flags.DEFINE_enum("kernels", "reference", ["reference", "compile", "auto"],
                      help="how quantized activations and IF neurons run; every choice gives the same values: "
                           "reference = plain PyTorch operations, compile = fused torch.compile kernels (a C++ "
                           "compiler on CPUs, Triton on GPUs; seconds to compile at start), auto = compile, "
                           "falling back to reference if it cannot")
    register_folder_validator("logdir")
    _non_negative("seed")


def define_sampler_flags():
    flags.DEFINE_string("sampler", "ddpm",
                        help="ddpm = ancestral sampling over all T steps (the seed's), ddim = our DDIM, "
                             "dpm_solver++ = DPM-Solver++(2M), unipc = UniPC, euler = Euler (diffusers' schedulers), "
                             "or diffusers:<ClassName> for any diffusers scheduler class, e.g. "
                             "diffusers:DDIMScheduler or diffusers:HeunDiscreteScheduler (schedulers.py)")
    flags.DEFINE_integer("sample_steps", 100, help="steps of every sampler but ddpm (1 .. T): the network calls of "
                         "ddim and the fast diffusers samplers (Heun-type schedulers call twice per step)")
    flags.DEFINE_float("eta", 0.0, help="DDIM eta in [0, 1] (0: deterministic, 1: the ancestral variance); "
                       "ddim and diffusers schedulers whose step takes eta")
    flags.DEFINE_bool("clip_denoised", False, help="clip the predicted x_0 to [-1, 1] before the posterior mean; "
                      "off (the default, as pytorch-ddpm and the seed's published FIDs): only the final image "
                      "is clipped")

    def known_sampler(name):
        """ddpm, ddim, a named diffusers sampler or ``diffusers:<ClassName>`` of a scheduler class
        that exists (only such a name imports diffusers: a few seconds)."""
        if name in ("ddpm", "ddim"):
            return True
        import schedulers
        if name not in schedulers.NAMED:
            try:
                schedulers.scheduler_class(name)
            except ValueError as err:
                raise flags.ValidationError(str(err)) from None
        return True

    flags.register_validator("sampler", known_sampler)
    _positive("sample_steps")
    _in_range("eta", 0.0, 1.0, "in [0, 1]")


def define_snn_flags():
    flags.DEFINE_enum("neuron", "graded", ["if", "signed", "graded", "two_phase"],
                      help="spiking neuron: graded = signed with integer (burst) spikes, exact with "
                           "--norm=compensated; two_phase = binary spikes fired after the whole window is "
                           "integrated, exact with --norm=compensated, (depth + 1) x T steps of latency; "
                           "if = binary integrate-and-fire (the seed's); signed = Fast-SNN's signed neuron "
                           "(docs/conversion.md)")
    flags.DEFINE_bool("sign", None, help="shorthand: --sign is --neuron=signed, --nosign is --neuron=if")
    flags.DEFINE_enum("norm", "compensated", ["step", "compensated"],
                      help="GroupNorm of the SNN: compensated = exact over the time steps; step = every time "
                           "step on its own (the seed's) (docs/conversion.md)")
    flags.DEFINE_string("tag", "", help="appended to the output names (converted_snn_<tag>.pt, conversion_<tag>.json, "
                        "SNN_{bit}bit_ft_<tag>/, ...), to keep SNNs of several conversion modes side by side")
    flags.register_validator("tag", lambda t: all(c.isalnum() or c in "-_" for c in t),
                             message="--tag may hold letters, digits, - and _ only")


def tagged(name):
    """``name`` with ``_<--tag>`` appended (before its extension), or ``name`` without a tag."""
    stem, ext = os.path.splitext(name)
    return f"{stem}_{FLAGS.tag}{ext}" if FLAGS.tag else name


def register_folder_validator(name):
    """``--name`` must be a folder or creatable as one: no regular file on the way."""
    flags.register_validator(name, lambda p: p is None or creatable(p, folder=True),
                             message=f"--{name} must name a folder that exists or can be created "
                                     "(a regular file is in the way)")


def register_file_validator(name):
    """``--name`` must be a file that can be written: its folder creatable, not itself a folder."""
    flags.register_validator(name, lambda p: p is None or creatable(p, folder=False),
                             message=f"--{name} must name a file that can be written (not a folder, and no "
                                     "regular file in the way of its folder)")


def creatable(path, folder):
    """Whether ``path`` is (or can be made) a folder (``folder``) or a file without touching the disk."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        return os.path.isdir(path) == folder
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return os.path.isdir(parent)


@functools.lru_cache(maxsize=None)
def _parallel_kernels_note(kernels):
    print(f"note: --kernels={kernels} is not used with --parallel (DataParallel); torchrun runs the compiled kernels")


def kernels():
    """``--kernels``, except under ``--parallel``: DataParallel's replica threads run the reference."""
    if FLAGS.parallel and FLAGS.kernels != "reference":
        _parallel_kernels_note(FLAGS.kernels)  # once per process
        return "reference"
    return FLAGS.kernels


def logdir():
    """``--logdir``, or the seed's default name for ``--bit``."""
    return FLAGS.logdir or os.path.join(".", "logs", f"RELU_QUANT{FLAGS.bit}B_DDPM_CIFAR10_EPS")


# flags -> configs ---------------------------------------------------------------------------

def _flag_value(name):
    value = FLAGS[name].value
    return tuple(value) if isinstance(value, list) else value


def config_from_flags(cls, stored=None, source=None, fixed=None):
    """``cls`` from the flags of its field names, over ``stored`` (a config of the same class).

    Fields in ``fixed`` (all of them when None) are the checkpoint's: a flag given explicitly
    with another value is a ``UserError`` naming both values and ``source``. Other fields take
    a given flag's value, else the stored one.
    """
    fixed = configs.field_names(cls) if fixed is None else fixed
    values = {}
    for name in configs.field_names(cls):
        given = name in FLAGS and FLAGS[name].present
        if stored is None:
            values[name] = _flag_value(name)
            continue
        old = getattr(stored, name)
        if given and _flag_value(name) != old and name in fixed:
            raise UserError(f"--{name}={_shown(_flag_value(name))} contradicts {source}, which has "
                            f"{name}={_shown(old)}; drop the flag or fix it")
        values[name] = _flag_value(name) if given else old
    return cls(**values)


def _shown(value):
    return list(value) if isinstance(value, tuple) else value


def model_config(stored=None, source=None):
    """The ``ModelConfig`` the flags describe, or ``stored`` checked against the given flags.

    A new model's ``img_channels`` follows its dataset unless ``--img_channels`` is given; a given
    value the dataset cannot provide is a ``UserError``.
    """
    parts = {key: config_from_flags(cls, getattr(stored, key) if stored else None, source)
             for key, cls in MODEL_CONFIGS.items()}
    if stored is None:
        try:
            channels = configs.dataset_channels(parts["data"].dataset, parts["unet"].img_channels)
        except ValueError as err:
            raise UserError(str(err)) from None
        parts["unet"] = dataclasses.replace(parts["unet"], img_channels=channels)
    return configs.ModelConfig(**parts)


def snn_config(stored=None, source=None):
    """``SNNConfig`` from ``--neuron`` (or its shorthand ``--sign``/``--nosign``) and ``--norm``,
    over ``stored``: a given flag that contradicts it is a ``UserError``."""
    neuron, given = FLAGS.neuron, FLAGS["neuron"].present
    if FLAGS.sign is not None:
        shorthand = "signed" if FLAGS.sign else "if"
        if given and neuron != shorthand and _typed_on_command_line("neuron"):
            raise UserError(f"--{'' if FLAGS.sign else 'no'}sign (short for --neuron={shorthand}) contradicts "
                            f"--neuron={neuron}, given too; give one of them")
        neuron, given = shorthand, True  # over a flagfile's --neuron, as any flag on the command line
    wanted = configs.SNNConfig(neuron=neuron, norm=FLAGS.norm)
    if stored is None:
        return wanted
    for name, present in (("neuron", given), ("norm", FLAGS["norm"].present)):
        if present and getattr(wanted, name) != getattr(stored, name):
            raise UserError(f"--{name}={getattr(wanted, name)} contradicts {source}, which has "
                            f"{name}={getattr(stored, name)}; drop the flag or fix it (or --restart)")
    return stored


def _typed_on_command_line(name):
    """Whether ``--name`` was typed on the command line itself (not only read from a flagfile)."""
    return any(arg == f"--{name}" or arg.startswith(f"--{name}=") for arg in sys.argv[1:])


def sampler_config(T):
    """``SamplerConfig`` from the flags, with ``--sample_steps`` checked against the diffusion's ``T``."""
    cfg = config_from_flags(configs.SamplerConfig)
    if cfg.sampler != "ddpm" and cfg.sample_steps > T:
        raise UserError(f"--sample_steps={cfg.sample_steps} exceeds the model's T={T} diffusion steps; "
                        f"give 1..{T}")
    return cfg
