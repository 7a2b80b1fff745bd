"""Sharded, resumable image generation for evaluation.

Images are made in shards of ``shard_size`` images, each written atomically as
``shard_00012.npz`` (uint8 [shard_size, H, W, C]) into a folder keyed by what determines the
images (the checkpoint's digest, the sampler settings, the seed, the shard size). Every random
draw of shard ``i`` comes from generators seeded by (seed, i) only, so a restarted run skips the
shards it finds and its output is identical to an uninterrupted run's. Under torchrun shard
``i`` belongs to rank ``i % world_size``.
"""
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from common.atomic import atomic_open
from model.checkpoint import file_digest
from common.runtime import derived_seed, generator


@dataclass(frozen=True)
class ShardPlan:
    """Where the shards go and what fixes their images besides the model and the sampler."""
    folder: str
    shard_size: int
    img_size: int
    seed: int
    img_channels: int = 3


def shard_folder(logdir, model_path, sampler_cfg, network_calls, seed, shard_size):
    """``<logdir>/eval_<model>_<sampler><calls>[_eta<eta>][_clip]_seed<seed>_b<shard_size>_<digest>``."""
    stem = os.path.splitext(os.path.basename(model_path))[0]
    name = re.sub(r"[^A-Za-z0-9]+", "", sampler_cfg.sampler.replace("+", "p"))  # dpm_solver++ -> dpmsolverpp
    eta = f"_eta{sampler_cfg.eta:g}" if sampler_cfg.sampler != "ddpm" else ""
    clip = "_clip" if sampler_cfg.clip_denoised else ""
    tag = f"{stem}_{name}{network_calls}{eta}{clip}_seed{seed}_b{shard_size}_{file_digest(model_path, 10)}"
    return os.path.join(logdir, f"eval_{tag}")


def shard_path(folder, index):
    return os.path.join(folder, f"shard_{index:05d}.npz")


def to_uint8(x):
    """Images [B, C, H, W] in [-1, 1] -> uint8 numpy [B, H, W, C] (round half up, as PNG writers do)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5 + 0.5).floor().clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def shard_noise(plan, index):
    """x_T [shard_size, C, img_size, img_size] of shard ``index`` (CPU generator: any device agrees)."""
    size = plan.img_size
    return torch.randn(plan.shard_size, plan.img_channels, size, size,
                       generator=generator(derived_seed(plan.seed, index)))


def generate_shard(sample_fn, plan, index, device):
    """uint8 [shard_size, H, W, C]: ``sample_fn(x_T, generator)`` with x_T and the generator of the
    sampler's own noise seeded by (seed, index). The images move to the CPU once, here."""
    x_T = shard_noise(plan, index).to(device)
    return to_uint8(sample_fn(x_T, generator(derived_seed(plan.seed, index, 1), device)))


def save_shard(path, images):
    with atomic_open(path) as f:
        np.savez(f, images=images)


def load_shard(path, shard_size):
    """The images of a shard, or None when it is absent or not a complete shard."""
    try:
        with np.load(path) as f:
            images = f["images"]
    except Exception:  # absent, torn (BadZipFile, EOFError), foreign: make the shard again
        return None
    return images if images.dtype == np.uint8 and len(images) == shard_size else None


def missing_shards(plan, shards):
    """The shards of ``shards`` (indices) that are not yet complete on disk."""
    return [i for i in shards if load_shard(shard_path(plan.folder, i), plan.shard_size) is None]


def plan_shards(plan, num_shards, rank=0, world_size=1):
    """(mine, todo): the shards rank ``rank`` owns (round-robin over ranks) and those not yet on disk."""
    os.makedirs(plan.folder, exist_ok=True)
    mine = list(range(rank, num_shards, world_size))
    return mine, missing_shards(plan, mine)


def make_shards(sample_fn, plan, todo, device, max_new=None, pbar=None):
    """Generate and save the shards ``todo``; returns how many were made.

    ``max_new`` stops after that many shards (an interruption, for tests); ``pbar`` is a progress
    bar counted in images.
    """
    made = 0
    for index in todo:
        if max_new is not None and made >= max_new:
            break
        save_shard(shard_path(plan.folder, index), generate_shard(sample_fn, plan, index, device))
        made += 1
        if pbar is not None:
            pbar.update(plan.shard_size)
    return made


def gather_images(folder, num_images, shard_size):
    """Exactly ``num_images`` uint8 images [N, H, W, C] from the first shards of ``folder``."""
    num_shards = -(-num_images // shard_size)
    parts = []
    for index in range(num_shards):
        images = load_shard(shard_path(folder, index), shard_size)
        if images is None:
            raise RuntimeError(f"shard {shard_path(folder, index)} is missing or incomplete")
        parts.append(images)
    return np.concatenate(parts)[:num_images]
