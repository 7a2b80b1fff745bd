"""Typed settings: what a checkpoint's model is, how it was trained, converted, tuned and sampled.

Each setting is defined once, in a frozen dataclass whose field names are the flag names
(``docs/flags.md``). Scripts turn flags into configs (``common.flags``); library code takes
configs, never flags. Every checkpoint stores its configs as plain dicts (``to_dict``) under
``config``, and a model is rebuilt from them alone (``ModelConfig.from_dict``).
"""
from dataclasses import asdict, dataclass, field, fields


@dataclass(frozen=True)
class UNetConfig:
    """The UNet and its quantization (pytorch-ddpm's CIFAR-10 model by default)."""
    ch: int = 128                       # base channels, a multiple of num_groups
    ch_mult: tuple = (1, 2, 2, 2)       # channel multiplier per resolution level
    attn: tuple = ()                    # levels with self-attention (full precision only)
    num_res_blocks: int = 2
    dropout: float = 0.1
    bit: int = 2                        # activation bits; 32 = plain ReLU
    wbit: int = 32                      # APoT weight bits; 32 = full-precision weights
    alpha_init: float = 6.0             # initial clipping threshold act_alpha
    num_groups: int = 32                # GroupNorm groups (pytorch-ddpm: 32; keep ch / num_groups >= 2)
    img_channels: int = 3               # image channels in and out: 1 grayscale, 3 RGB (DATASET_CHANNELS)
    spike_driven: bool = False          # every weight layer after the head reads a quantized activation
    resample: str = ""                  # conv / pool / act_conv / signed_conv; '': conv, or pool if spike_driven
    shortcut: str = ""                  # where channels change: x / act / signed / fold / fold_sum / fold_act; '': x, or fold

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
    T: int = 1000                       # diffusion steps (the SNN's time steps are ``time_steps``)
    beta_1: float = 1e-4
    beta_T: float = 0.02
    mean_type: str = "epsilon"          # epsilon / xstart / xprev
    var_type: str = "fixedlarge"        # fixedlarge / fixedsmall


# The datasets and the image channels each gives: the first is its default, a second one the
# other it can be converted to (a folder's images become grayscale with Pillow's 'L').
DATASET_CHANNELS = {"cifar10": (3,), "shapes": (3,), "mnist": (1,), "fashion_mnist": (1,), "celeba": (3,),
                    "folder": (3, 1)}


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


@dataclass(frozen=True)
class DataConfig:
    """The images the model generates."""
    dataset: str = "cifar10"            # a key of DATASET_CHANNELS
    img_size: int = 32


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a trained model and sample from it."""
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)

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
    neuron: str = "graded"              # graded (integer spikes) / two_phase (binary) / if (the seed's) / signed (Fast-SNN)
    norm: str = "compensated"           # compensated: exact in total / step: GroupNorm per time step (the seed's)


@dataclass(frozen=True)
class SamplerConfig:
    """How images are drawn from a model (not stored with it: every run chooses)."""
    sampler: str = "ddpm"               # ddpm (ancestral, T steps) / ddim
    sample_steps: int = 100             # network calls of the fast samplers
    eta: float = 0.0                    # DDIM noise (0: deterministic)
    clip_denoised: bool = False         # clip the predicted x_0 before the posterior mean


@dataclass(frozen=True)
class TrainConfig:
    """Stage 1's optimisation."""
    lr: float = 2e-4
    grad_clip: float = 1.0
    total_steps: int = 800000
    warmup: int = 5000
    batch_size: int = 128               # global: split over torchrun processes
    ema_decay: float = 0.9999
    snr_gamma: float = 0.0              # min-SNR-gamma loss weighting; 0: uniform (pytorch-ddpm, the seed)
    seed: int = 0


@dataclass(frozen=True)
class FinetuneConfig:
    """Stage 3's block-wise tuning."""
    lr: float = 1e-6
    ft_steps: int = 20000               # steps per block
    batch_size: int = 128
    grad_clip: float = 1.0              # 0: no clipping
    val_size: int = 128                 # held-out pairs of the one-call error that keep-or-revert judges by
    judge_images: int = 64              # images of the sampling run it judges by too (0: the one-call error alone)
    judge_steps: int = 10               # DDIM steps of that run
    judge_eta: float = 1.0              # its DDIM eta (1: stochastic, as the evaluation samples; fixed noise)
    bias_correction: bool = True        # shift each block's output bias by its mean ANN-SNN difference first
    calib_size: int = 256               # (x_t, t) pairs of the calibration batch of bias correction
    seed: int = 0


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
