"""Bias correction of a spiking UNet, block by block (``docs/finetune.md``).

The "bias calibration" of Li et al. (2021), "A free lunch from ANN: towards efficient, accurate
spiking neural networks calibration" (ICML), applied to the UNet's blocks. A converted SNN's block
output differs from its ANN's by an error with a mean of its own in every output channel: a
systematic bias that the one-call error barely sees and a sampler adds up over its steps.

Every block of the UNet ends in a conv or linear layer whose bias is added after everything
nonlinear in the block (``output_bias``). Adding to that bias, per output channel c,

    delta_c = mean over the calibration batch (and the pixels) of (ANN block output - SNN block output)_c

(the SNN's output taken as its time mean) moves the SNN block's time-mean output by exactly
delta_c at every element. So, as long as the block's input stays the same, the mean difference
per channel on that batch becomes zero, to float rounding. A block's input depends on the blocks
before it only, which is why the blocks are corrected in forward order.
"""
import torch
import torch.distributed as dist
import torch.nn as nn

from model.data import random_flip
from model.unet import DownSample, ResBlock, TimeEmbedding, UpSample
from snn.capture import block_output
from snn.steps import time_mean

CHUNK = 32  # images per forward pass of the calibration batch: the result does not depend on it


def output_bias(block):
    """The bias parameter [C_out] added last in ``block``, one of ``UNet.blocks()``, or None for a
    block without one (a pooling DownSample / UpSample).

    Time embedding: its last linear; head: the conv itself; ResBlock: block2's last conv (the
    shortcut, linear, is added after it), or the attention's projection where there is one;
    DownSample / UpSample: ``main``; tail: its conv.
    """
    if isinstance(block, TimeEmbedding):
        return block.timembedding[-1].bias
    if isinstance(block, ResBlock):
        return block.block2[-1].bias if isinstance(block.attn, nn.Identity) else block.attn.proj.bias
    if isinstance(block, (DownSample, UpSample)):
        return None if block.pool else block.main.bias
    if isinstance(block, nn.Conv2d):
        return block.bias
    if isinstance(block, nn.Sequential) and isinstance(block[-1], nn.Conv2d):
        return block[-1].bias
    raise TypeError(f"no output bias known for a block of type {type(block).__name__}")


def channel_sum(x):
    """[B, C, ...] -> [C]: the sum over every dimension but the channels, in float64."""
    return x.double().transpose(0, 1).reshape(x.shape[1], -1).sum(1)


@torch.no_grad()
def mean_difference(snn, ann, pair, x_t, t, chunk=CHUNK):
    """Per output channel, the mean of (ANN block output - SNN block time-mean output): [C_out].

    ``pair``: a ``snn.finetune.BlockPair``; ``x_t`` [N, C, H, W], ``t`` [N], fed ``chunk`` at a time.
    """
    total, count = 0, 0
    for i in range(0, len(t), chunk):
        x, s = x_t[i:i + chunk], t[i:i + chunk]
        target = block_output(ann, pair.ann_block, x, s)
        out = time_mean(block_output(snn, pair.snn_block, x, s), snn.time_steps)
        total = total + channel_sum(target - out)
        count += target.numel() // target.shape[1]
    return total / count


@torch.no_grad()
def correct_bias(snn, ann, pair, x_t, t, world_size=1, chunk=CHUNK):
    """Add ``mean_difference`` to the SNN block's ``output_bias``; returns the shift [C_out].

    Under torch.distributed every rank takes rank 0's shift, so the models stay identical.
    """
    bias = output_bias(pair.snn_block)
    delta = mean_difference(snn, ann, pair, x_t, t, chunk).to(bias.dtype)
    if world_size > 1:
        dist.broadcast(delta, 0)
    bias.add_(delta)
    return delta


def calibration_batch(dataset, size, diffusion, seed, device="cpu"):
    """The calibration batch (x_t [size, C, H, W], t [size]) on ``device``, drawn as fine-tuning
    draws its batches: ``size`` training images chosen by ``seed``, flipped at random,
    t ~ U{0, ..., T-1}, x_t = q_sample(x_0, t, noise). The same for the same ``seed``."""
    if size > len(dataset):
        raise ValueError(f"a calibration batch of {size} needs at least as many images, the data has {len(dataset)}")
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(dataset), generator=generator)[:size].tolist()
    x_0 = random_flip(torch.stack([dataset[i][0] for i in index]), generator)
    t = torch.randint(diffusion.T, size=(size,), generator=generator)
    noise = torch.randn(x_0.shape, generator=generator)
    x_0, t, noise = x_0.to(device), t.to(device), noise.to(device)
    return diffusion.q_sample(x_0, t, noise), t
