"""The pytorch-ddpm CIFAR-10 UNet with an injected (quantized) activation.

The same module tree serves the full-precision baseline (``bit = 32``), the quantized ANN and,
after ``snn.convert`` swaps each ``QuantReLU`` for an IF neuron, the spiking UNet: parameter
names never change, so every checkpoint loads strictly into every variant.
"""
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn import init

from quant import FULL_PRECISION, QConv2d, QLinear, QuantReLU


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of the diffusion step -> linear -> activation -> linear.

    ``t``: [B] int64 -> [B, dim].
    """

    def __init__(self, T, d_model, dim, act, linear):
        super().__init__()
        assert d_model % 2 == 0, "the sinusoidal embedding needs an even width"
        freqs = torch.exp(-torch.arange(0, d_model, 2).float() / d_model * math.log(10000))
        angles = torch.arange(T).float()[:, None] * freqs[None, :]
        table = torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).view(T, d_model)
        self.timembedding = nn.Sequential(
            nn.Embedding.from_pretrained(table),
            linear(d_model, dim),
            act(),
            linear(dim, dim),
        )
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init.xavier_uniform_(module.weight)
                init.zeros_(module.bias)

    def forward(self, t):
        return self.timembedding(t)


class DownSample(nn.Module):
    def __init__(self, ch, conv):
        super().__init__()
        self.main = conv(ch, ch, 3, stride=2, padding=1)
        init.xavier_uniform_(self.main.weight)
        init.zeros_(self.main.bias)

    def forward(self, x, temb):
        return self.main(x)


class UpSample(nn.Module):
    def __init__(self, ch, conv):
        super().__init__()
        self.main = conv(ch, ch, 3, stride=1, padding=1)
        init.xavier_uniform_(self.main.weight)
        init.zeros_(self.main.bias)

    def forward(self, x, temb):
        return self.main(F.interpolate(x, scale_factor=2, mode="nearest"))


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels (full-precision baseline only)."""

    def __init__(self, ch):
        super().__init__()
        self.group_norm = nn.GroupNorm(32, ch)
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


class ResBlock(nn.Module):
    """GroupNorm -> act -> conv, + projected time embedding, GroupNorm -> act -> dropout -> conv, + skip."""

    def __init__(self, in_ch, out_ch, tdim, dropout, act, conv, linear, attn=False):
        super().__init__()
        self.block1 = nn.Sequential(nn.GroupNorm(32, in_ch), act(), conv(in_ch, out_ch, 3, stride=1, padding=1))
        self.temb_proj = nn.Sequential(act(), linear(tdim, out_ch))
        self.block2 = nn.Sequential(
            nn.GroupNorm(32, out_ch), act(), nn.Dropout(dropout), conv(out_ch, out_ch, 3, stride=1, padding=1))
        self.shortcut = conv(in_ch, out_ch, 1, stride=1, padding=0) if in_ch != out_ch else nn.Identity()
        self.attn = AttnBlock(out_ch) if attn else nn.Identity()
        for part in (self.block1, self.temb_proj, self.block2, self.shortcut):
            for module in part.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    init.xavier_uniform_(module.weight)
                    init.zeros_(module.bias)
        init.xavier_uniform_(self.block2[-1].weight, gain=1e-5)

    def forward(self, x, temb):
        h = self.block1(x)
        h = h + self.temb_proj(temb)[:, :, None, None]
        h = self.block2(h)
        h = h + self.shortcut(x)
        return self.attn(h)


class UNet(nn.Module):
    """Noise-prediction UNet of pytorch-ddpm with ``QuantReLU(bit)`` in place of Swish.

    forward(x [B, 3, H, W], t [B] int64) -> [B, 3, H, W].
    ``wbit < 32`` quantizes the weights of every conv and linear layer but the first and the
    last (APoT); ``alpha_init`` is the initial clipping threshold of every quantized activation
    (a trained value comes with the state dict); ``kernels``
    (reference / compile / auto, ``common.compiled``) is how the quantizers run, with the same values; ``attn`` lists the resolution levels with self-attention and is only accepted
    for the full-precision baseline, since attention has no integrate-and-fire equivalent.
    """

    def __init__(self, T, ch, ch_mult, attn, num_res_blocks, dropout, bit=FULL_PRECISION,
                 wbit=FULL_PRECISION, alpha_init=6.0, kernels="reference"):
        super().__init__()
        attn = list(attn or [])
        ch_mult = list(ch_mult)
        for i in attn:
            if not 0 <= i < len(ch_mult):
                raise ValueError(f"attention level {i} is out of range for ch_mult {ch_mult}")
        if attn and bit != FULL_PRECISION:
            raise ValueError(
                f"attention (--attn {attn}) is only available for the full-precision model (--bit=32): "
                "softmax attention multiplies two activations and has no integrate-and-fire "
                "equivalent, so a quantized model meant for conversion must not use it")
        if ch % 32:
            raise ValueError(f"--ch must be a multiple of 32 (GroupNorm uses 32 groups), got {ch}")
        self.config = dict(T=int(T), ch=int(ch), ch_mult=ch_mult, attn=attn, num_res_blocks=int(num_res_blocks),
                           dropout=float(dropout), bit=int(bit), wbit=int(wbit))
        self.bit = int(bit)
        self.kernels = kernels
        act = partial(QuantReLU, bit, init_alpha=alpha_init, kernels=kernels)
        conv = partial(QConv2d, wbit=wbit)
        linear = partial(QLinear, wbit=wbit)
        block = partial(ResBlock, dropout=dropout, act=act, conv=conv, linear=linear)

        tdim = ch * 4
        self.time_embedding = TimeEmbedding(T, ch, tdim, act, linear)
        self.head = nn.Conv2d(3, ch, kernel_size=3, stride=1, padding=1)
        self.downblocks = nn.ModuleList()
        chs = [ch]
        now_ch = ch
        for i, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.downblocks.append(block(now_ch, ch * mult, tdim, attn=i in attn))
                now_ch = ch * mult
                chs.append(now_ch)
            if i != len(ch_mult) - 1:
                self.downblocks.append(DownSample(now_ch, conv))
                chs.append(now_ch)
        self.middleblocks = nn.ModuleList([
            block(now_ch, now_ch, tdim, attn=bool(attn)),
            block(now_ch, now_ch, tdim),
        ])
        self.upblocks = nn.ModuleList()
        for i, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.upblocks.append(block(chs.pop() + now_ch, ch * mult, tdim, attn=i in attn))
                now_ch = ch * mult
            if i != 0:
                self.upblocks.append(UpSample(now_ch, conv))
        assert not chs, "every skip tensor is consumed by an up block"
        self.tail = nn.Sequential(nn.GroupNorm(32, now_ch), act(), nn.Conv2d(now_ch, 3, 3, stride=1, padding=1))

        init.xavier_uniform_(self.head.weight)
        init.zeros_(self.head.bias)
        init.xavier_uniform_(self.tail[-1].weight, gain=1e-5)
        init.zeros_(self.tail[-1].bias)

    @classmethod
    def from_config(cls, cfg, T, kernels="reference", **extra):
        """The UNet of a ``common.configs.UNetConfig`` for ``T`` diffusion steps; ``extra`` goes to
        a subclass (the spiking UNet's conversion mode)."""
        return cls(T=T, ch=cfg.ch, ch_mult=list(cfg.ch_mult), attn=list(cfg.attn), num_res_blocks=cfg.num_res_blocks,
                   dropout=cfg.dropout, bit=cfg.bit, wbit=cfg.wbit, alpha_init=cfg.alpha_init, kernels=kernels,
                   **extra)

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
