"""The pytorch-ddpm CIFAR-10 UNet with an injected (quantized) activation.

The same module tree serves the full-precision baseline (``bit = 32``), the quantized ANN and,
after ``snn.convert`` swaps each ``QuantReLU`` for an IF neuron, the spiking UNet: parameter
names never change, so every checkpoint loads strictly into every variant.
"""
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn import init

from common.configs import UNetConfig
from quant import FULL_PRECISION, QConv2d, QLinear, QuantReLU


@dataclass(frozen=True)
class Layers:
    """How the UNet's layers are made: activation, conv, linear and GroupNorm factories, and the dropout rate."""
    act: Callable
    conv: Callable
    linear: Callable
    norm: Callable
    dropout: float


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of the diffusion step -> linear -> activation -> linear.

    ``t``: [B] int64 -> [B, dim].
    """

    def __init__(self, T, d_model, dim, layers):
        super().__init__()
        assert d_model % 2 == 0, "the sinusoidal embedding needs an even width"
        freqs = torch.exp(-torch.arange(0, d_model, 2).float() / d_model * math.log(10000))
        angles = torch.arange(T).float()[:, None] * freqs[None, :]
        table = torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).view(T, d_model)
        self.timembedding = nn.Sequential(
            nn.Embedding.from_pretrained(table),
            layers.linear(d_model, dim),
            layers.act(),
            layers.linear(dim, dim),
        )
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init.xavier_uniform_(module.weight)
                init.zeros_(module.bias)

    def forward(self, t):
        return self.timembedding(t)


RESAMPLE = ("conv", "pool", "act_conv", "signed_conv")
SHORTCUTS = ("x", "act", "signed", "fold", "fold_sum", "fold_act")


class AnalogInput(nn.Identity):
    """Marks where a weight layer reads the analog stream (no quantized activation): the identity
    here; a spiking UNet whose neurons fire after their window swaps it for a hold of the window's
    mean (``snn.convert.Hold``)."""


def _resampling_input(ch, layers, resample):
    """What a down/up-sampling conv reads, per ``resample``: the stream itself (``conv``), a
    GroupNorm and a quantized ReLU (``act_conv``), or a signed quantizer, levels -L..L (``signed_conv``)."""
    if resample == "act_conv":
        return nn.Sequential(layers.norm(ch), layers.act())
    if resample == "signed_conv":
        return layers.act(signed=True)
    return AnalogInput()


class DownSample(nn.Module):
    """2x down: a 3x3 conv of stride 2 (``resample`` as ``UNetConfig`` says), or average pooling (``pool``)."""

    def __init__(self, ch, layers, resample="conv"):
        super().__init__()
        self.pool = resample == "pool"
        if not self.pool:
            self.act = _resampling_input(ch, layers, resample)
            self.main = layers.conv(ch, ch, 3, stride=2, padding=1)
            init.xavier_uniform_(self.main.weight)
            init.zeros_(self.main.bias)

    def forward(self, x, temb):
        return F.avg_pool2d(x, 2) if self.pool else self.main(self.act(x))


class UpSample(nn.Module):
    """2x nearest up, then a 3x3 conv (``resample`` as ``UNetConfig`` says) or nothing (``pool``).

    The activation of ``act_conv`` / ``signed_conv`` comes after the upsampling (nearest
    upsampling commutes with GroupNorm and the quantizer: the same values), so the conv reads the
    activation's own output.
    """

    def __init__(self, ch, layers, resample="conv"):
        super().__init__()
        self.pool = resample == "pool"
        if not self.pool:
            self.act = _resampling_input(ch, layers, resample)
            self.main = layers.conv(ch, ch, 3, stride=1, padding=1)
            init.xavier_uniform_(self.main.weight)
            init.zeros_(self.main.bias)

    def forward(self, x, temb):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x if self.pool else self.main(self.act(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels (full-precision baseline only)."""

    def __init__(self, ch, norm):
        super().__init__()
        self.group_norm = norm(ch)
        self.proj_q = nn.Conv2d(ch, ch, 1)
        self.proj_k = nn.Conv2d(ch, ch, 1)
        self.proj_v = nn.Conv2d(ch, ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        for module in [self.proj_q, self.proj_k, self.proj_v, self.proj]:
            init.xavier_uniform_(module.weight)
            init.zeros_(module.bias)
        init.xavier_uniform_(self.proj.weight, gain=1e-5)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x)
        q = self.proj_q(h).permute(0, 2, 3, 1).reshape(B, H * W, C)
        k = self.proj_k(h).reshape(B, C, H * W)
        v = self.proj_v(h).permute(0, 2, 3, 1).reshape(B, H * W, C)
        w = torch.softmax(torch.bmm(q, k) * (C ** -0.5), dim=-1)  # [B, HW, HW]
        h = torch.bmm(w, v).reshape(B, H, W, C).permute(0, 3, 1, 2)
        return x + self.proj(h)


class ChannelFold(nn.Module):
    """A shortcut without weights from ``in_ch`` to ``out_ch`` channels: x [B, in_ch, H, W] zero-padded
    to k * out_ch channels (k = ceil(in_ch / out_ch)), summed over the k groups and, with ``mean``,
    divided by k -> [B, out_ch, H, W] (the mean keeps the stream's scale where the up blocks fold
    their concatenated skip tensors onto it, once per block).

    Fewer channels in than out: x itself on the first channels, zeros on the rest. It keeps the
    stream analog and exact (additions and a fixed scale), so no weight layer reads it.
    """

    def __init__(self, in_ch, out_ch, mean=True):
        super().__init__()
        self.in_ch, self.out_ch, self.mean = in_ch, out_ch, mean

    def forward(self, x):
        k = -(-self.in_ch // self.out_ch)
        x = F.pad(x, (0, 0, 0, 0, 0, k * self.out_ch - self.in_ch))
        folded = x.view(x.shape[0], k, self.out_ch, *x.shape[2:]).sum(1)
        return folded / k if self.mean else folded

    def extra_repr(self):
        return f"{self.in_ch} -> {self.out_ch}, {'mean' if self.mean else 'sum'}"


class ResBlock(nn.Module):
    """GroupNorm -> act -> conv, + projected time embedding, GroupNorm -> act -> dropout -> conv, + skip.

    The skip is x itself, or where the channels change a 1x1 conv (``shortcut``) reading per
    ``shortcut_reads`` (``UNetConfig.shortcut``): ``x`` (pytorch-ddpm: the analog stream), ``act``
    the block's own first activation act(GroupNorm(x)), or ``signed`` a signed quantizer of x
    (levels -L..L): the latter two are quantized activations (spikes in the SNN). ``fold``: no
    conv, x folded onto the output channels (``ChannelFold``, the mean of each group; ``fold_sum``
    its sum); ``fold_act``: the summed fold of x plus the 1x1 conv of the block's first
    activation, that conv starting at zero.
    """

    def __init__(self, in_ch, out_ch, tdim, layers, attn=False, shortcut_reads="x"):
        super().__init__()
        act, conv = layers.act, layers.conv
        self.block1 = nn.Sequential(layers.norm(in_ch), act(), conv(in_ch, out_ch, 3, stride=1, padding=1))
        self.temb_proj = nn.Sequential(act(), layers.linear(tdim, out_ch))
        self.block2 = nn.Sequential(
            layers.norm(out_ch), act(), nn.Dropout(layers.dropout), conv(out_ch, out_ch, 3, stride=1, padding=1))
        self.shortcut = conv(in_ch, out_ch, 1, stride=1, padding=0) if in_ch != out_ch else nn.Identity()
        if in_ch != out_ch and shortcut_reads in ("fold", "fold_sum"):
            self.shortcut = ChannelFold(in_ch, out_ch, mean=shortcut_reads == "fold")
        self.fold = ChannelFold(in_ch, out_ch, mean=False) if in_ch != out_ch and shortcut_reads == "fold_act" else None
        self.shortcut_reads_act = shortcut_reads in ("act", "fold_act") and in_ch != out_ch
        self.shortcut_input = nn.Identity()
        if in_ch != out_ch and shortcut_reads in ("x", "signed"):
            self.shortcut_input = layers.act(signed=True) if shortcut_reads == "signed" else AnalogInput()
        self.attn = AttnBlock(out_ch, layers.norm) if attn else nn.Identity()
        for part in (self.block1, self.temb_proj, self.block2, self.shortcut):
            for module in part.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    init.xavier_uniform_(module.weight)
                    init.zeros_(module.bias)
        init.xavier_uniform_(self.block2[-1].weight, gain=1e-5)
        if self.fold is not None:  # the learned part of fold_act starts at zero: the block starts as fold
            init.zeros_(self.shortcut.weight)

    def forward(self, x, temb):
        a = self.block1[1](self.block1[0](x))  # act(GN(x))
        h = self.block1[2](a)
        skip = self.shortcut(a) if self.shortcut_reads_act else self.shortcut(self.shortcut_input(x))
        if self.fold is not None:
            skip = skip + self.fold(x)
        h = h + self.temb_proj(temb)[:, :, None, None]
        h = self.block2(h)
        h = h + skip
        return self.attn(h)


def check_config(cfg):
    """ValueError for a ``UNetConfig`` no UNet can be built from."""
    for i in cfg.attn:
        if not 0 <= i < len(cfg.ch_mult):
            raise ValueError(f"attention level {i} is out of range for ch_mult {list(cfg.ch_mult)}")
    if cfg.attn and cfg.bit != FULL_PRECISION:
        raise ValueError(
            f"attention (--attn {list(cfg.attn)}) is only available for the full-precision model (--bit=32): "
            "softmax attention multiplies two activations and has no integrate-and-fire "
            "equivalent, so a quantized model meant for conversion must not use it")
    if cfg.resample not in ("",) + RESAMPLE:
        raise ValueError(f"resample must be one of {RESAMPLE} (or '' for the default), got {cfg.resample!r}")
    if cfg.shortcut not in ("",) + SHORTCUTS:
        raise ValueError(f"shortcut must be one of {SHORTCUTS} (or '' for the default), got {cfg.shortcut!r}")
    if cfg.spike_driven and cfg.resampling == "conv":
        raise ValueError("a spike-driven UNet cannot resample with a conv of the analog stream (--resample=conv): "
                         "give --resample=pool, act_conv or signed_conv, or leave it out")
    if cfg.spike_driven and cfg.shortcut_reads == "x":
        raise ValueError("a spike-driven UNet's 1x1 shortcuts cannot read the analog stream (--shortcut=x): "
                         "give --shortcut=act, signed or fold, or leave it out")
    if cfg.num_groups < 1 or cfg.ch % cfg.num_groups:
        raise ValueError(f"--ch must be a multiple of --num_groups (the GroupNorm groups), got ch={cfg.ch}, "
                         f"num_groups={cfg.num_groups}")


class UNet(nn.Module):
    """Noise-prediction UNet of pytorch-ddpm with ``QuantReLU(bit)`` in place of Swish.

    forward(x [B, C, H, W], t [B] int64) -> [B, C, H, W], for ``T`` diffusion steps, C =
    ``config.img_channels`` (3 for RGB, 1 for grayscale data).
    ``config`` (``common.configs.UNetConfig``): ``wbit < 32`` quantizes the weights of every conv
    and linear layer but the first and the last (APoT); ``alpha_init`` is the initial clipping
    threshold of every quantized activation (a trained value comes with the state dict);
    ``attn`` lists the resolution levels with self-attention and is only accepted for the
    full-precision baseline, since attention has no integrate-and-fire equivalent. With
    ``spike_driven`` every weight layer after the head reads a quantized activation (the 1x1
    shortcuts as ``config.shortcut_reads`` says, the resampling ``config.resampling``'s). ``kernels``
    (reference / compile / auto, ``common.compiled``) is how the quantizers run, with the same
    values.
    """

    def __init__(self, config=UNetConfig(), T=1000, kernels="reference"):
        super().__init__()
        check_config(config)
        self.config, self.T, self.bit, self.kernels = config, int(T), config.bit, kernels
        layers = Layers(act=partial(QuantReLU, config.bit, init_alpha=config.alpha_init, kernels=kernels),
                        conv=partial(QConv2d, wbit=config.wbit), linear=partial(QLinear, wbit=config.wbit),
                        norm=partial(nn.GroupNorm, config.num_groups), dropout=config.dropout)
        ch, tdim = config.ch, config.ch * 4
        self.time_embedding = TimeEmbedding(T, ch, tdim, layers)
        self.head = nn.Conv2d(config.img_channels, ch, kernel_size=3, stride=1, padding=1)
        now_ch = self._build_levels(layers, tdim)
        self.tail = nn.Sequential(layers.norm(now_ch), layers.act(),
                                  nn.Conv2d(now_ch, config.img_channels, 3, stride=1, padding=1))
        init.xavier_uniform_(self.head.weight)
        init.zeros_(self.head.bias)
        init.xavier_uniform_(self.tail[-1].weight, gain=1e-5)
        init.zeros_(self.tail[-1].bias)

    def _build_levels(self, layers, tdim):
        """The down, middle and up blocks; returns the channels entering the tail."""
        cfg, block = self.config, partial(ResBlock, layers=layers, shortcut_reads=self.config.shortcut_reads)
        self.downblocks, self.upblocks = nn.ModuleList(), nn.ModuleList()
        chs, now_ch = [cfg.ch], cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                self.downblocks.append(block(now_ch, cfg.ch * mult, tdim, attn=i in cfg.attn))
                now_ch = cfg.ch * mult
                chs.append(now_ch)
            if i != len(cfg.ch_mult) - 1:
                self.downblocks.append(DownSample(now_ch, layers, cfg.resampling))
                chs.append(now_ch)
        self.middleblocks = nn.ModuleList([block(now_ch, now_ch, tdim, attn=bool(cfg.attn)),
                                           block(now_ch, now_ch, tdim)])
        for i, mult in reversed(list(enumerate(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                self.upblocks.append(block(chs.pop() + now_ch, cfg.ch * mult, tdim, attn=i in cfg.attn))
                now_ch = cfg.ch * mult
            if i != 0:
                self.upblocks.append(UpSample(now_ch, layers, cfg.resampling))
        assert not chs, "every skip tensor is consumed by an up block"
        return now_ch

    def blocks(self):
        """The blocks in forward order as (name, module): the unit of block-wise fine-tuning."""
        named = [("time_embedding", self.time_embedding), ("head", self.head)]
        named += [(f"downblocks.{i}", m) for i, m in enumerate(self.downblocks)]
        named += [(f"middleblocks.{i}", m) for i, m in enumerate(self.middleblocks)]
        named += [(f"upblocks.{i}", m) for i, m in enumerate(self.upblocks)]
        named.append(("tail", self.tail))
        return named

    def forward(self, x, t):
        temb = self.time_embedding(t)
        h = self.head(x)
        hs = [h]
        for layer in self.downblocks:
            h = layer(h, temb)
            hs.append(h)
        for layer in self.middleblocks:
            h = layer(h, temb)
        for layer in self.upblocks:
            if isinstance(layer, ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = layer(h, temb)
        return self.tail(h)
