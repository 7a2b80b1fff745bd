"""Typed settings: what a checkpoint's model is, how it was trained, converted, tuned and sampled.

Each setting is defined once: a field of a frozen dataclass here, with its default, its help
text and the values it accepts (``setting``). The field names are the flag names: the scripts'
flags and ``docs/flags.md`` are generated from these fields (``common.flags``), and library code
takes configs. Every checkpoint stores its model, training, conversion and fine-tuning configs
as plain dicts (``to_dict``) under ``config``, and a model is rebuilt from them alone
(``ModelConfig.from_dict``); the configs of one run's outputs and runtime are not stored.

How a stored config and the settings a user gives combine (``resolve``, ``changes``,
``model_config``) are pure functions of the stored config, the wanted one and the names given.
"""
import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import NamedTuple

from common.errors import UserError

_SAME = object()


def setting(default, help, choices=None, check=None, message=None, flag_default=_SAME):
    """A dataclass field with its ``help`` text and the values it accepts.

    ``choices``: the values a str may take. ``check(value) -> bool`` (or raising ValueError with
    its own line) and ``message``: what follows ``--<name>`` in the error line when it fails.
    ``flag_default``: the flag's default where it differs from the field's (None: "follow
    another setting", as ``img_channels`` follows the dataset); the field's default is what a
    stored config that lacks the field takes.
    """
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "check": check,
            "message": message, "flag_default": default if flag_default is _SAME else flag_default}
    return field(default=default, metadata=meta)


class Check(NamedTuple):
    """A rule over several settings: ``test({name: value}) -> bool``, else the error ``message``."""
    names: tuple
    test: object
    message: str


def _rule(test, message):
    return {"check": test, "message": message}


AT_LEAST_1 = _rule(lambda v: v is not None and v >= 1, "must be at least 1")
AT_LEAST_0 = _rule(lambda v: v is not None and v >= 0, "must be 0 or more")
POSITIVE = _rule(lambda v: v > 0, "must be positive")
UNIT = _rule(lambda v: 0 <= v <= 1, "must be in [0, 1]")


def creatable(path, folder):
    """Whether ``path`` is (or can be made) a folder (``folder``) or a file, without touching the disk."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        return os.path.isdir(path) == folder
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return os.path.isdir(parent)


FOLDER = _rule(lambda p: p is None or creatable(p, folder=True),
               "must name a folder that exists or can be created (a regular file is in the way)")
WRITABLE_FILE = _rule(lambda p: p is None or creatable(p, folder=False),
                      "must name a file that can be written (not a folder, and no regular file in the way of "
                      "its folder)")


def _seed():
    return setting(0, "random seed", **AT_LEAST_0)


def _fits_levels(img_size, ch_mult):
    return img_size >= 4 and img_size % 2 ** (len(ch_mult or [1]) - 1) == 0


# The datasets and the image channels each gives: the first is its default, a second one the
# other it can be converted to (a folder's images become grayscale with Pillow's 'L').
DATASET_CHANNELS = {"cifar10": (3,), "shapes": (3,), "mnist": (1,), "fashion_mnist": (1,), "celeba": (3,),
                    "folder": (3, 1)}

# feature networks of the scores (metrics.scores)
FEATURES = ("auto", "inception", "shapes")


def dataset_channels(dataset, requested=None):
    """The image channels a model of ``dataset`` has: ``requested`` (None: the dataset's default).

    ValueError when ``dataset`` cannot give ``requested`` channels (MNIST has no colour, CIFAR-10
    is not converted to grayscale).
    """
    allowed = DATASET_CHANNELS[dataset]
    if requested is None:
        return allowed[0]
    if requested not in allowed:
        raise ValueError(f"--img_channels={requested} contradicts --dataset={dataset}, whose images have "
                         f"{' or '.join(map(str, allowed))} channel(s); drop --img_channels or change --dataset")
    return requested


# stored with every model ------------------------------------------------------------------

@dataclass(frozen=True)
class UNetConfig:
    """The UNet and its quantization (pytorch-ddpm's CIFAR-10 model by default)."""
    ch: int = setting(128, "base channel of the UNet (a multiple of --num_groups)")
    ch_mult: tuple = setting((1, 2, 2, 2), "channel multiplier per resolution level",
                             check=lambda m: bool(m) and min(m) >= 1,
                             message="needs at least one level, every multiplier at least 1")
    attn: tuple = setting((), "levels with self-attention (full precision only)")
    num_res_blocks: int = setting(2, "ResBlocks per level", **AT_LEAST_1)
    dropout: float = setting(0.1, "dropout rate of the ResBlocks", check=lambda p: 0 <= p < 1,
                             message="must be in [0, 1)")
    bit: int = setting(2, "activation bits; the SNN runs time_steps = 2**bit - 1 steps per call; 32 = full precision",
                       check=lambda b: 1 <= b <= 8 or b == 32, message="must be in 1..8 or 32")
    wbit: int = setting(32, "APoT weight bits (32 = full-precision weights, as in the seed)",
                        check=lambda b: 2 <= b <= 7 or b == 32, message="must be in 2..7 or 32")
    alpha_init: float = setting(6.0, "initial act_alpha (clipping threshold) of the quantized activations",
                                **POSITIVE)
    num_groups: int = setting(32, "groups of every GroupNorm (pytorch-ddpm: 32); with one channel per group "
                              "GroupNorm removes each channel's mean, and the UNet cannot predict an image's "
                              "mean colour: keep --ch / --num_groups >= 2 (the CIFAR-10 UNet has 4)", **AT_LEAST_1)
    img_channels: int = setting(3, "image channels of the UNet: 1 (grayscale) or 3 (RGB); default: the dataset's "
                                "(mnist, fashion_mnist: 1; cifar10, celeba, shapes, folder: 3); --dataset=folder "
                                "--img_channels=1 converts the images to grayscale", flag_default=None,
                                check=lambda c: c is None or c in (1, 3), message="must be 1 (grayscale) or 3 (RGB)")
    spike_driven: bool = setting(False, "every weight layer after the head reads a quantized activation (spikes "
                                 "in the SNN): no 1x1 shortcut and no resampling conv reads the analog stream; off: "
                                 "pytorch-ddpm's UNet (docs/energy.md)")
    resample: str = setting("", "down/up-sampling: conv = a 3x3 conv of the stream (pytorch-ddpm), pool = average "
                            "pooling / nearest upsampling without weights (DDPM's resamp_with_conv=False), act_conv "
                            "= GroupNorm and a quantized ReLU before the conv, signed_conv = a signed quantizer "
                            "before the conv; empty: conv, or pool with --spike_driven",
                            choices=("", "conv", "pool", "act_conv", "signed_conv"))
    shortcut: str = setting("", "the ResBlock shortcuts where the channels change: a 1x1 conv of x = the analog "
                            "stream (pytorch-ddpm), act = the block's first activation act(GroupNorm(x)), signed = a "
                            "signed quantizer of x; fold = no conv, x's channels zero-padded and averaged in groups "
                            "onto the output's (fold_sum: summed); fold_act = fold_sum plus the 1x1 conv of act; "
                            "empty: x, or fold with --spike_driven",
                            choices=("", "x", "act", "signed", "fold", "fold_sum", "fold_act"))

    CHECKS = (
        Check(("ch", "num_groups"), lambda v: v["ch"] > 0 and v["num_groups"] > 0 and v["ch"] % v["num_groups"] == 0,
              "--ch must be a positive multiple of --num_groups (the GroupNorm groups)"),
        Check(("spike_driven", "resample", "shortcut"),
              lambda v: not (v["spike_driven"] and (v["resample"] == "conv" or v["shortcut"] == "x")),
              "--spike_driven needs layers that read spikes: --resample=pool, act_conv or signed_conv and "
              "--shortcut=act, signed or fold (or leave them out)"),
        Check(("attn", "ch_mult"), lambda v: all(0 <= i < len(v["ch_mult"]) for i in v["attn"]),
              "every --attn level must be one of the --ch_mult levels (0 .. levels - 1)"),
    )

    @property
    def resampling(self):
        """How the UNet resamples: ``resample``, or its default for the kind of UNet."""
        return self.resample or ("pool" if self.spike_driven else "conv")

    @property
    def shortcut_reads(self):
        """What the 1x1 shortcuts read: ``shortcut``, or its default for the kind of UNet."""
        return self.shortcut or ("fold" if self.spike_driven else "x")

    @property
    def levels(self):
        """Number of resolution levels; an image size must be divisible by 2 ** (levels - 1)."""
        return len(self.ch_mult)


@dataclass(frozen=True)
class DiffusionConfig:
    """The linear beta schedule of Ho et al. (2020) and what the model predicts."""
    T: int = setting(1000, "number of diffusion steps", check=lambda t: t >= 2, message="must be at least 2")
    beta_1: float = setting(1e-4, "start beta value")
    beta_T: float = setting(0.02, "end beta value")
    mean_type: str = setting("epsilon", "predict variable", choices=("xprev", "xstart", "epsilon"))
    var_type: str = setting("fixedlarge", "variance type", choices=("fixedlarge", "fixedsmall"))

    CHECKS = (Check(("beta_1", "beta_T"), lambda v: 0 < v["beta_1"] <= v["beta_T"] < 1,
                    "the beta schedule needs 0 < --beta_1 <= --beta_T < 1"),)


@dataclass(frozen=True)
class DataConfig:
    """The images the model generates."""
    dataset: str = setting("cifar10", "cifar10, mnist, fashion_mnist, celeba (torchvision's datasets), folder "
                           "(every image below --data_dir) or shapes (embedded synthetic data, no download) "
                           "(docs/data.md)", choices=tuple(DATASET_CHANNELS))
    img_size: int = setting(32, "image size (a multiple of 2**(levels - 1))")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a trained model and sample from it."""
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)

    CHECKS = (Check(("img_size", "ch_mult"), lambda v: _fits_levels(v["img_size"], v["ch_mult"]),
                    "--img_size must be a positive multiple of 2**(levels - 1), levels = the number of --ch_mult "
                    "values, and at least 4"),)

    @property
    def image_shape(self):
        """(channels, height, width) of the images the model generates and the noise it starts from."""
        return (self.unet.img_channels, self.data.img_size, self.data.img_size)

    def to_dict(self):
        return {"unet": to_dict(self.unet), "diffusion": to_dict(self.diffusion), "data": to_dict(self.data)}

    @classmethod
    def from_dict(cls, d):
        return cls(from_dict(UNetConfig, d["unet"]), from_dict(DiffusionConfig, d["diffusion"]),
                   from_dict(DataConfig, d["data"]))



def time_steps(bit):
    """2**bit - 1: the SNN's time steps for ``bit``-bit activations, the levels L of the b-bit
    quantizer (never a flag)."""
    return 2 ** bit - 1

@dataclass(frozen=True)
class SNNConfig:
    """How a quantized ANN becomes a spiking UNet; its time steps follow from ``bit``."""
    neuron: str = setting("graded", "spiking neuron: graded = signed with integer (burst) spikes, exact with "
                          "--norm=compensated; two_phase = binary spikes fired after the whole window is integrated, "
                          "exact with --norm=compensated, (depth + 1) x T steps of latency; if = binary "
                          "integrate-and-fire (the seed's); signed = Fast-SNN's signed neuron (docs/conversion.md)",
                          choices=("if", "signed", "graded", "two_phase"))
    norm: str = setting("compensated", "GroupNorm of the SNN: compensated = exact over the time steps; step = every "
                        "time step on its own (the seed's) (docs/conversion.md)", choices=("step", "compensated"))


@dataclass(frozen=True)
class TrainConfig:
    """Stage 1's optimisation (stored in the training checkpoint)."""
    lr: float = setting(2e-4, "target learning rate", **POSITIVE)
    grad_clip: float = setting(1.0, "gradient norm clipping", **POSITIVE)
    total_steps: int = setting(800000, "total training steps", **AT_LEAST_1)
    warmup: int = setting(5000, "learning rate warm-up steps", **AT_LEAST_0)
    batch_size: int = setting(128, "global batch size", **AT_LEAST_1)
    ema_decay: float = setting(0.9999, "EMA decay rate", **UNIT)
    snr_gamma: float = setting(0.0, "min-SNR-gamma loss weighting (Hang et al., 2023; docs/diffusion.md): steps "
                               "with a signal-to-noise ratio above gamma count less; 0 = uniform weights "
                               "(pytorch-ddpm, the seed's setting)", check=lambda v: v >= 0,
                               message="must be 0 (off) or positive")
    seed: int = _seed()


@dataclass(frozen=True)
class FinetuneConfig:
    """Stage 3's block-wise tuning (stored in every backpack)."""
    lr: float = setting(1e-6, "Adam learning rate of every block", **POSITIVE)
    ft_steps: int = setting(20000, "fine-tuning steps per block", **AT_LEAST_0)
    batch_size: int = setting(128, "global batch size", **AT_LEAST_1)
    grad_clip: float = setting(1.0, "gradient norm clipping (0: none)", **AT_LEAST_0)
    val_size: int = setting(128, "held-out (x_t, t) pairs of the one-call error that keep-or-revert judges by (the "
                            "batch of stage 2's error, for the same --val_size and --seed)", **AT_LEAST_1)
    judge_images: int = setting(64, "images of the short sampling run (fixed noise, the ANN's images beside) whose "
                                "error keep-or-revert judges by too; 0: the one-call error alone", **AT_LEAST_0)
    judge_steps: int = setting(10, "DDIM steps of that sampling run", **AT_LEAST_1)
    judge_eta: float = setting(1.0, "DDIM eta of that sampling run (its noise fixed too)", **UNIT)
    bias_correction: bool = setting(True, "before a block's steps, shift its output bias by the mean difference "
                                    "between the ANN's and the SNN's block output on a calibration batch")
    calib_size: int = setting(256, "(x_t, t) pairs of the calibration batch, drawn as the training batches",
                              **AT_LEAST_1)
    seed: int = _seed()


# one run's settings (not stored) ----------------------------------------------------------

@dataclass(frozen=True)
class SamplerConfig:
    """How images are drawn from a model (not stored with it: every run chooses)."""
    sampler: str = setting("ddpm", "ddpm = ancestral sampling over all T steps (the seed's), ddim = our DDIM, "
                           "dpm_solver++ = DPM-Solver++(2M), unipc = UniPC, euler = Euler (diffusers' schedulers), "
                           "or diffusers:<ClassName> for any diffusers scheduler class, e.g. diffusers:DDIMScheduler "
                           "or diffusers:HeunDiscreteScheduler (schedulers.py)",
                           message="must be ddpm, ddim, dpm_solver++, unipc, euler or diffusers:<ClassName> of a "
                                   "scheduler class diffusers has (checked by common.flags)")
    sample_steps: int = setting(100, "steps of every sampler but ddpm (1 .. T): the network calls of ddim and the "
                                "fast diffusers samplers (Heun-type schedulers call twice per step)", **AT_LEAST_1)
    eta: float = setting(0.0, "DDIM eta in [0, 1] (0: deterministic, 1: the ancestral variance); ddim and "
                         "diffusers schedulers whose step takes eta", **UNIT)
    clip_denoised: bool = setting(False, "clip the predicted x_0 to [-1, 1] before the posterior mean; off (the "
                                  "default, as pytorch-ddpm and the seed's published FIDs): only the final image "
                                  "is clipped")


@dataclass(frozen=True)
class LoaderConfig:
    """Where the training images are read from."""
    data_dir: str = setting("./data", "folder of the data: torchvision's layout for cifar10, mnist, fashion_mnist "
                            "and celeba, any folder of images for folder; not used by shapes")
    num_workers: int = setting(4, "workers of the data loader", **AT_LEAST_0)


@dataclass(frozen=True)
class RuntimeConfig:
    """Where a run writes and how it computes."""
    logdir: str = setting(None, "log directory (default: ./logs/RELU_QUANT{bit}B_DDPM_CIFAR10_EPS)", **FOLDER)
    parallel: bool = setting(False, "multi-GPU training with torch.nn.DataParallel")
    kernels: str = setting("reference", "how quantized activations and IF neurons run; every choice gives the same "
                           "values: reference = plain PyTorch operations, compile = fused torch.compile kernels (a "
                           "C++ compiler on CPUs, Triton on GPUs; seconds to compile at start), auto = compile, "
                           "falling back to reference if it cannot", choices=("reference", "compile", "auto"))

    def folder(self, bit):
        """``logdir``, or the seed's default name for ``bit``-bit activations."""
        return self.logdir or os.path.join(".", "logs", f"RELU_QUANT{bit}B_DDPM_CIFAR10_EPS")


@dataclass(frozen=True)
class TrainRunConfig:
    """Stage 1's start, logging and sampling cadence."""
    init: str = setting(None, "start from this (higher-precision) checkpoint")
    log_step: int = setting(10, "frequency of tensorboard scalars", **AT_LEAST_1)
    sample_size: int = setting(64, "images in a sample grid", **AT_LEAST_1)
    sample_step: int = setting(5000, "frequency of sample grids (0: never)", **AT_LEAST_0)
    save_step: int = setting(5000, "frequency of checkpoints", **AT_LEAST_1)


def _tag():
    return setting("", "appended to the output names (converted_snn_<tag>.pt, conversion_<tag>.json, "
                   "SNN_{bit}bit_ft_<tag>/, ...), to keep SNNs of several conversion modes side by side",
                   check=lambda t: all(c.isalnum() or c in "-_" for c in t),
                   message="may hold letters, digits, - and _ only")


def tagged(name, tag):
    """``name`` with ``_<tag>`` appended (before its extension), or ``name`` without a tag."""
    stem, ext = os.path.splitext(name)
    return f"{stem}_{tag}{ext}" if tag else name


@dataclass(frozen=True)
class ConversionConfig:
    """Stage 2's outputs and the batch its error is measured on."""
    tag: str = _tag()
    sample_size: int = setting(64, "images in the ANN and SNN sample grids", **AT_LEAST_1)
    val_size: int = setting(128, "held-out (x_t, t) pairs, t spread over the diffusion range, for the SNN-vs-ANN "
                            "error (the batch stage 3 validates on, for the same --val_size and --seed)", **AT_LEAST_1)
    seed: int = _seed()


@dataclass(frozen=True)
class FinetuneRunConfig:
    """Stage 3's outputs and restart."""
    tag: str = _tag()
    restart: bool = setting(False, "discard earlier progress in SNN_{bit}bit_ft and start from the converted SNN")
    log_step: int = setting(10, "frequency of the training-loss scalars", **AT_LEAST_1)
    sample_size: int = setting(64, "images in the grid sampled after every block (0: no grids)", **AT_LEAST_0)


@dataclass(frozen=True)
class EvalConfig:
    """Stage 4: what is evaluated, how many images, which scores and outputs."""
    eval_model_path: str = setting(None, "SNN checkpoint (converted_snn.pt, a fine-tuned SNN) or ANN ckpt.pt",
                                   check=lambda p: p is not None,
                                   message="is required: an SNN checkpoint or an ANN ckpt.pt")
    ann_path: str = setting(None, "the ANN ckpt.pt of the SNN, for the agreement PSNR (default: a ckpt.pt beside "
                            "the checkpoint, one folder up, or in --logdir)")
    num_images: int = setting(50000, "images generated for IS / FID", **AT_LEAST_1)
    batch_size: int = setting(128, "images per sampler call; also the size of a shard", **AT_LEAST_1)
    fid: str = setting("auto", "FID and IS: auto = compute when the feature network and the statistics are there, "
                       "else skip with the reason; require = fail before sampling when they are not; skip",
                       choices=("auto", "require", "skip"))
    features: str = setting("auto", "feature network of the scores: inception (pytorch-gan-metrics, comparable "
                            "with papers; grayscale images repeated to three channels), shapes (the project's "
                            "network for the shapes data: FID, IS over its 6 classes and recognisability) or auto "
                            "(shapes for the shapes data, else inception)", choices=FEATURES)
    fid_cache: str = setting(None, "reference statistics (.npz with mu, sigma); default: stats/<dataset>[<size>px]"
                             ".train.npz (stats/cifar10.train.npz for CIFAR-10, written by compute_fid_stats.py), "
                             "the shapes network's file (made on first use) for shapes; a folder's statistics must "
                             "be given")
    is_splits: int = setting(10, "splits of the Inception Score", **AT_LEAST_1)
    inception_batch: int = setting(50, "batch size of the feature network", **AT_LEAST_1)
    probe_images: int = setting(8, "images sampled once more with the spike monitor on, for the energy per image "
                                "and (ANN at hand) the SNN-ANN PSNR from the same noise (0: neither)", **AT_LEAST_0)
    pic_or_not: bool = setting(True, "save a grid of generated images into <logdir>/images/")
    save_images: str = setting(None, "also write every generated image as a PNG into this folder", **FOLDER)
    seed: int = _seed()


@dataclass(frozen=True)
class FidStatsConfig:
    """The reference statistics of a dataset's training images (compute_fid_stats.py)."""
    img_size: int = setting(32, "image size (the size the evaluated model generates)",
                            check=lambda v: v >= 4, message="must be at least 4")
    img_channels: int = setting(None, "image channels of the evaluated model: 1 or 3; default: the dataset's (a "
                                "folder's images are RGB, or grayscale with --img_channels=1)",
                                check=lambda c: c is None or c in (1, 3), message="must be 1 (grayscale) or 3 (RGB)")
    features: str = setting("auto", "feature network: inception (pytorch-gan-metrics), shapes (the project's "
                            "network for the shapes data) or auto (shapes for --dataset=shapes, else inception)",
                            choices=FEATURES)
    out: str = setting(None, "output .npz (default: where evaluate.py looks for it, under stats/)", **WRITABLE_FILE)
    batch_size: int = setting(50, "batch size of the feature network", **AT_LEAST_1)
    num_images: int = setting(0, "use only the first N training images (0: all)", check=lambda v: v >= 0,
                              message="must be 0 (all) or more")


# stored configs <-> plain dicts -----------------------------------------------------------

def to_dict(cfg):
    """A config as a plain dict of JSON types (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


def from_dict(cls, d):
    """``cls`` from a plain dict; keys it does not know are ignored, missing ones take the defaults.

    A value of the wrong type (a checkpoint from elsewhere) is a ValueError naming the field.
    """
    if not isinstance(d, dict):
        raise ValueError(f"the {cls.__name__} section is a {type(d).__name__}, not a dict")
    known = {f.name: f for f in fields(cls)}
    return cls(**{k: _typed(cls, known[k], v) for k, v in d.items() if k in known})


_ACCEPTS = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}


def _typed(cls, f, value):
    """``value`` for field ``f`` (lists become tuples), or ValueError if it has the wrong type."""
    if f.type is tuple:
        if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
    elif isinstance(value, _ACCEPTS[f.type]) and (f.type is bool or not isinstance(value, bool)):
        return value
    raise ValueError(f"{cls.__name__}.{f.name} must be {f.type.__name__}, got {value!r}")


def field_names(cls):
    return [f.name for f in fields(cls)]


# a stored config against the wanted one ---------------------------------------------------

def _shown(value):
    return list(value) if isinstance(value, tuple) else value


def resolve(stored, wanted, given, source, fixed=None, hint=""):
    """The config a run uses: ``wanted`` for a new run (``stored`` None); else ``stored`` with the
    fields named in ``given`` taken from ``wanted``.

    A given field in ``fixed`` (all fields when None) whose wanted value differs from the stored
    one is a ``UserError`` naming both values and ``source`` (``hint`` appended to its advice).
    """
    if stored is None:
        return wanted
    fixed = field_names(type(stored)) if fixed is None else fixed
    values = {}
    for name in field_names(type(stored)):
        old, new = getattr(stored, name), getattr(wanted, name)
        if name in given and new != old and name in fixed:
            raise UserError(f"--{name}={_shown(new)} contradicts {source}, which has {name}={_shown(old)}; "
                            f"drop the flag or fix it{hint}")
        values[name] = new if name in given else old
    return replace(stored, **values)


def changes(stored, cfg, skip=()):
    """(name, new value, stored value) of every field of ``cfg`` that differs from ``stored``."""
    if stored is None:
        return []
    return [(name, getattr(cfg, name), getattr(stored, name)) for name in field_names(type(cfg))
            if name not in skip and getattr(cfg, name) != getattr(stored, name)]


def model_config(wanted, given, stored=None, source=None):
    """The ``ModelConfig`` a run uses: ``stored`` checked against the ``given`` names of ``wanted``,
    or ``wanted`` with its ``img_channels`` (None: the dataset's) resolved against its dataset.

    ``wanted`` is a ModelConfig whose ``unet.img_channels`` may be None; a channel count the
    dataset cannot give is a ``UserError``.
    """
    parts = {key: resolve(getattr(stored, key) if stored else None, getattr(wanted, key), given, source)
             for key in ("unet", "diffusion", "data")}
    if stored is None:
        try:
            channels = dataset_channels(parts["data"].dataset, parts["unet"].img_channels)
        except ValueError as err:
            raise UserError(str(err)) from None
        parts["unet"] = replace(parts["unet"], img_channels=channels)
    return ModelConfig(**parts)


def check_steps(name, steps, T):
    """A ``UserError`` when ``steps`` (of the sampler named by ``--name``) exceed the model's ``T``."""
    if steps > T:
        raise UserError(f"--{name}={steps} exceeds the model's T={T} diffusion steps; give 1..{T}")


def sampler_config(cfg, T):
    """``cfg`` (a SamplerConfig) checked against the diffusion's ``T`` (ddpm always takes all T)."""
    if cfg.sampler != "ddpm":
        check_steps("sample_steps", cfg.sample_steps, T)
    return cfg
