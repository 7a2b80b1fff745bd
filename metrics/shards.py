"""Sharded, resumable image generation for evaluation.

Images are made in shards of ``shard_size`` images, each written atomically as
``shard_00012.npz`` (uint8 [shard_size, H, W, 3]) into a folder keyed by what determines the
images (the checkpoint, sampler, steps, eta, seed, shard size). The noise of shard ``i`` depends
only on (seed, i), so a restarted run skips the shards it finds and its output is identical to an
uninterrupted run's. Under torchrun shard ``i`` belongs to rank ``i % world_size``.
"""
import hashlib
import os

import numpy as np
import torch

from common.atomic import atomic_open


def file_digest(path, chunk=1 << 20):
    """First 10 hex digits of the sha1 of a file (a re-trained checkpoint gets new shards)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()[:10]


def shard_folder(logdir, model_path, sampler, steps, eta, seed, shard_size):
    """``<logdir>/eval_<model>_<sampler><steps>[_eta<eta>]_seed<seed>_b<shard_size>_<digest>``."""
    stem = os.path.splitext(os.path.basename(model_path))[0]
    eta_part = f"_eta{eta:g}" if sampler == "ddim" else ""
    tag = f"{stem}_{sampler}{steps}{eta_part}_seed{seed}_b{shard_size}_{file_digest(model_path)}"
    return os.path.join(logdir, f"eval_{tag}")


def shard_seed(seed, index):
    """A 63-bit seed for shard ``index``, a function of (seed, index) only."""
    return int(np.random.SeedSequence([seed, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def shard_path(folder, index):
    return os.path.join(folder, f"shard_{index:05d}.npz")


def to_uint8(x):
    """Images [B, 3, H, W] in [-1, 1] -> uint8 numpy [B, H, W, 3] (round half up, as PNG writers do)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5 + 0.5).floor().clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def shard_noise(seed, index, shard_size, img_size):
    """x_T [shard_size, 3, img_size, img_size] of shard ``index`` (CPU generator: any device agrees)."""
    gen = torch.Generator().manual_seed(shard_seed(seed, index))
    return torch.randn(shard_size, 3, img_size, img_size, generator=gen)


def generate_shard(sample_fn, seed, index, shard_size, img_size, device):
    """uint8 [shard_size, H, W, 3]: ``sample_fn(x_T)`` with every random draw seeded by (seed, index)."""
    x_T = shard_noise(seed, index, shard_size, img_size).to(device)
    torch.manual_seed(shard_seed(seed, index) ^ 0x5DEECE66D)  # the sampler's own noise (randn_like)
    return to_uint8(sample_fn(x_T))


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


def plan_shards(folder, num_shards, shard_size, rank=0, world_size=1):
    """(mine, todo): the shards rank ``rank`` owns (round-robin over ranks) and those not yet on disk."""
    os.makedirs(folder, exist_ok=True)
    mine = list(range(rank, num_shards, world_size))
    return mine, [i for i in mine if load_shard(shard_path(folder, i), shard_size) is None]


def make_shards(sample_fn, folder, todo, shard_size, img_size, seed, device, max_new=None, pbar=None):
    """Generate and save the shards ``todo``; returns how many were made.

    ``max_new`` stops after that many shards (an interruption, for tests); ``pbar`` is a tqdm
    bar counted in images.
    """
    made = 0
    for index in todo:
        if max_new is not None and made >= max_new:
            break
        images = generate_shard(sample_fn, seed, index, shard_size, img_size, device)
        save_shard(shard_path(folder, index), images)
        made += 1
        if pbar is not None:
            pbar.update(shard_size)
    return made


def gather_images(folder, num_images, shard_size):
    """Exactly ``num_images`` uint8 images [N, H, W, 3] from the first shards of ``folder``."""
    num_shards = -(-num_images // shard_size)
    parts = []
    for index in range(num_shards):
        images = load_shard(shard_path(folder, index), shard_size)
        if images is None:
            raise RuntimeError(f"shard {shard_path(folder, index)} is missing or incomplete")
        parts.append(images)
    return np.concatenate(parts)[:num_images]
