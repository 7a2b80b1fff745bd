"""Stage 2: convert the quantized ANN of ``<logdir>/ckpt.pt`` into a spiking UNet.

    python SNN_conversion.py --flagfile config/SNN_convert/CIFAR10_snn.txt [--flag=value ...]

Writes into ``--logdir``: ``converted_snn.pt`` (the SNN checkpoint, DESIGN §6), ``images/`` (ANN
and SNN samples from the same noise) and ``conversion.json`` (the relative error of the SNN's
noise prediction, spike statistics and energy, DESIGN §8). The model is rebuilt from the flags
stored in the checkpoint; a flag given explicitly that contradicts them is an error.
"""
import os
import time

import torch
from absl import flags
from tqdm import tqdm

from common import data, runtime
from common import flags as cflags
from common.atomic import write_json
from common.errors import UserError, run
from common.images import save_grid, side_by_side
from common.models import build_sampler
from diffusion import GaussianDiffusionTrainer
from snn import convert
from snn.io import load_training_ann, save_snn
from snn.stats import SpikeMonitor

cflags.define_model_flags()
cflags.define_data_flags()
cflags.define_run_flags()
cflags.define_sampler_flags()
cflags.define_snn_flags()
flags.DEFINE_integer("sample_size", 64, help="images in the ANN and SNN sample grids")
flags.DEFINE_integer("error_size", 64, help="(x_t, t) pairs, t spread over the diffusion range, for the error")
flags.DEFINE_integer("batch_size", 64, help="batch of the error and statistics forward passes")
FLAGS = flags.FLAGS


def to_snn(ann, signed):
    try:
        return convert(ann, neuron="signed" if signed else "if")
    except (ValueError, TypeError) as err:
        raise UserError(f"cannot convert this model: {err}") from None


def clean_images(stored, n, fallback):
    """``n`` noise-free images [n, 3, H, W] in [-1, 1]: the dataset's, else ``fallback`` (samples)."""
    try:
        dataset = data.load_dataset(stored["dataset"], FLAGS.data_dir, stored["img_size"], flip=False)
    except UserError as err:
        print(f"note: {err}; measuring the error on the ANN's own samples instead")
        return fallback[:n].repeat((n + len(fallback) - 1) // len(fallback), 1, 1, 1)[:n]
    generator = torch.Generator().manual_seed(FLAGS.seed)
    index = torch.randperm(len(dataset), generator=generator)[:n]
    return torch.stack([dataset[int(i)][0] for i in index])


@torch.no_grad()
def noise_errors(ann, snn, stored, x_0, device):
    """Relative L2 error of the SNN's prediction vs the ANN's on x_t = q_sample(x_0, t, noise),
    t evenly spread over [0, T_diffusion); also the SNN's spike statistics over the same passes."""
    n = x_0.shape[0]
    diffusion = GaussianDiffusionTrainer(ann, stored["beta_1"], stored["beta_T"], stored["T"])  # for q_sample
    generator = torch.Generator().manual_seed(FLAGS.seed + 1)
    t = torch.linspace(0, stored["T"] - 1, n).round().long()
    x_t = diffusion.q_sample(x_0, t, torch.randn(x_0.shape, generator=generator))
    eps_ann, eps_snn = [], []
    monitor = SpikeMonitor(snn)
    with monitor:
        for start in tqdm(range(0, n, FLAGS.batch_size), desc="error", dynamic_ncols=True):
            xb, tb = x_t[start:start + FLAGS.batch_size].to(device), t[start:start + FLAGS.batch_size].to(device)
            eps_ann.append(ann(xb, tb).cpu())
            eps_snn.append(snn(xb, tb).cpu())
    eps_ann, eps_snn = torch.cat(eps_ann), torch.cat(eps_snn)
    quarters = []
    for part in torch.arange(n).chunk(4):
        a, s = eps_ann[part], eps_snn[part]
        quarters.append({"t_min": int(t[part[0]]), "t_max": int(t[part[-1]]),
                         "relative_error": float((s - a).norm() / a.norm())})
    return float((eps_snn - eps_ann).norm() / eps_ann.norm()), quarters, monitor.summary()


@torch.no_grad()
def sample(model, stored, x_T, device):
    """Samples [B, 3, H, W] in [-1, 1] from ``x_T``; the per-step noise is reseeded for every model."""
    sampler = build_sampler(model, stored, FLAGS.sampler, FLAGS.sample_steps, FLAGS.eta).to(device)
    runtime.seed_everything(FLAGS.seed + 2)
    x = x_T.to(device)
    steps = FLAGS.sample_steps if FLAGS.sampler == "ddim" else stored["T"]
    for x in tqdm(sampler.steps(x), total=steps, desc="sample", dynamic_ncols=True, leave=False):
        pass
    return x.clamp(-1, 1).cpu()


def sample_grids(ann, snn, stored, device, folder):
    """ANN and SNN samples from one seeded noise: ``ann.png``, ``snn.png``, ``ann_vs_snn.png``."""
    x_T = torch.randn(FLAGS.sample_size, 3, stored["img_size"], stored["img_size"],
                      generator=torch.Generator().manual_seed(FLAGS.seed))
    ann_x = sample(ann, stored, x_T, device)
    snn_x = sample(snn, stored, x_T, device)
    save_grid(ann_x, os.path.join(folder, "ann.png"))
    save_grid(snn_x, os.path.join(folder, "snn.png"))
    save_grid(side_by_side(ann_x, snn_x)[None], os.path.join(folder, "ann_vs_snn.png"), nrow=1)
    return ann_x, snn_x


def convert_and_measure(logdir, device):
    start = time.time()
    ckpt_path = os.path.join(logdir, "ckpt.pt")
    ann, stored, ckpt = load_training_ann(ckpt_path, device, cflags.kernels(), cflags.resolve_model_flags)
    step = ckpt.get("step")
    snn = to_snn(ann, FLAGS.sign)
    snn_path = os.path.join(logdir, "converted_snn.pt")
    save_snn(snn_path, snn, ckpt["flags"], source=os.path.abspath(ckpt_path), step=step)
    print(f"converted {ckpt_path} (bit={snn.bit}, T={snn.time_steps}, neuron={snn.neuron}) -> {snn_path}")
    ann_run, snn_run = runtime.data_parallel(ann, FLAGS.parallel), runtime.data_parallel(snn, FLAGS.parallel)
    ann_x, snn_x = sample_grids(ann_run, snn_run, stored, device, os.path.join(logdir, "images"))
    x_0 = clean_images(stored, FLAGS.error_size, ann_x)
    error, by_t, stats = noise_errors(ann_run, snn_run, stored, x_0, device)
    result = {
        "bit": snn.bit, "T": snn.time_steps, "signed": snn.neuron == "signed", "source": os.path.abspath(ckpt_path),
        "step": step, "snn_checkpoint": os.path.abspath(snn_path),
        "noise_relative_error": error, "noise_relative_error_by_t": by_t, "error_size": FLAGS.error_size,
        "sample_relative_error": float((snn_x - ann_x).norm() / ann_x.norm()),
        "sampler": FLAGS.sampler, "sample_steps": FLAGS.sample_steps if FLAGS.sampler == "ddim" else stored["T"],
        "sample_size": FLAGS.sample_size, "seed": FLAGS.seed,
        "spike_stats": stats, "wall_s": round(time.time() - start, 1),
    }
    write_json(result, os.path.join(logdir, "conversion.json"))
    return result


def main(argv):
    rt = runtime.setup(FLAGS.seed)
    logdir = cflags.logdir()
    if rt.is_main:
        result = convert_and_measure(logdir, rt.device)
        stats = result["spike_stats"]
        print(f"noise prediction relative error {result['noise_relative_error']:.4f}, "
              f"firing rate {stats['firing_rate']:.4f}, energy per sample "
              f"{stats['energy_pJ_per_sample'] / 1e6:.2f} uJ (SNN) vs "
              f"{stats['ann_energy_pJ_per_sample'] / 1e6:.2f} uJ (ANN) -> {os.path.join(logdir, 'conversion.json')}")
    runtime.teardown(rt)  # the other ranks wait here for rank 0


if __name__ == "__main__":
    run(main)
