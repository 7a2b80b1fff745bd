"""Stage 2: convert the quantized ANN of ``<logdir>/ckpt.pt`` into a spiking UNet.

    python SNN_conversion.py --flagfile config/SNN_convert/CIFAR10_snn.txt [--flag=value ...]

Writes into ``--logdir``: ``converted_snn.pt`` (the SNN checkpoint), ``images/`` (ANN and SNN
samples from the same noise) and ``conversion.json`` (the relative error of the SNN's noise
prediction on the held-out batch stage 3 uses too, spike statistics and energy). The model is
rebuilt from the configuration stored in the checkpoint; a flag given explicitly that
contradicts it is an error. ``docs/conversion.md`` explains the conversion modes.
"""
import os
import time

import torch
from absl import flags

from common import configs, runtime
from common import flags as cflags
from common.atomic import remove_stale_temporaries, write_json
from common.errors import UserError
from model.images import save_grid, side_by_side
from common.lock import folder_lock
from model.build import build_unet
from diffusion import sample_noise
from schedulers import build_sampler
from common.progress import progress
from snn import agreement
from snn.io import load_training_ann, save_snn, to_snn
from snn.stats import SpikeMonitor, per_image

cflags.flags_of("SNN_conversion.py")
FLAGS = flags.FLAGS


@torch.no_grad()
def sample_pair(ann, snn, cfg, sampler_cfg, device):
    """ANN and SNN samples [N, C, H, W] from the same x_T and the same sampler noise."""
    _, sampler = build_sampler(cfg, sampler_cfg, device)
    images = []
    for model in (ann, snn):
        x_T, generator = sample_noise(FLAGS.sample_size, cfg.image_shape, FLAGS.seed, device)
        x = x_T
        for x in progress(sampler.steps(model, x_T, generator), total=sampler.network_calls, desc="sample",
                          leave=False):
            pass
        images.append(x.clamp(-1, 1).cpu())
    return images


def error_batch(cfg, device, fallback):
    """The held-out (x_t, t) batch of stage 3; without the dataset, noised ``fallback`` images."""
    diffusion, _ = build_sampler(cfg, configs.SamplerConfig(), device)
    try:
        return agreement.held_out_batch(cfg, FLAGS.val_size, diffusion, FLAGS.seed, FLAGS.data_dir, device), True
    except UserError as err:
        print(f"note: {err}; measuring the error on the ANN's own samples instead")
    x_0 = fallback.repeat((FLAGS.val_size + len(fallback) - 1) // len(fallback), 1, 1, 1)[:FLAGS.val_size]
    held_out = [(x, 0) for x in x_0]
    return agreement.validation_batch(held_out, FLAGS.val_size, diffusion, FLAGS.seed, device), False


@torch.no_grad()
def noise_errors(ann, snn, x_t, t):
    """The SNN's noise prediction against the ANN's: error, error by t quarter, spike statistics."""
    ann_out = agreement.predictions(ann, x_t, t)
    monitor = SpikeMonitor(snn)
    with monitor:
        snn_out = agreement.predictions(snn, x_t, t)
    return (agreement.relative_error(snn_out, ann_out), agreement.errors_by_quarter(snn_out, ann_out, t),
            monitor.summary())


@torch.no_grad()
def float64_errors(ann, cfg, snn_cfg, x_t, t):
    """(ANN float32 vs float64, SNN float64 vs ANN float64): where float32 rounding alone puts a
    quantized network (the floor no float32 SNN can beat), and how close the conversion is."""
    ann64 = build_unet(cfg).to(x_t.device).double().eval()
    ann64.load_state_dict(ann.state_dict())
    x64 = x_t.double()
    ref = agreement.predictions(ann64, x64, t)
    snn64 = to_snn(ann64, snn_cfg)
    return (agreement.relative_error(agreement.predictions(ann, x_t, t), ref),
            agreement.relative_error(agreement.predictions(snn64, x64, t), ref))


def convert_and_measure(logdir, device):
    """Convert, save, sample and measure; returns the conversion.json record."""
    start, ckpt_path = time.time(), os.path.join(logdir, "ckpt.pt")
    ann, cfg, ckpt = load_training_ann(ckpt_path, device, cflags.kernels())
    cflags.model_config(cfg, ckpt_path)  # explicit flags must agree with the checkpoint
    sampler_cfg, snn_cfg = cflags.sampler_config(cfg.diffusion.T), cflags.snn_config()
    build_sampler(cfg, sampler_cfg)  # a sampler this model cannot use fails before any work
    snn = to_snn(ann, snn_cfg)
    snn_path = os.path.join(logdir, cflags.tagged("converted_snn.pt"))
    save_snn(snn_path, snn, cfg, snn_cfg, source=os.path.abspath(ckpt_path), step=ckpt.get("step"))
    print(f"converted {ckpt_path} (bit={cfg.unet.bit}, time_steps={snn.time_steps}, neuron={snn_cfg.neuron}) "
          f"-> {snn_path}")
    ann_run, snn_run = runtime.data_parallel(ann, FLAGS.parallel), runtime.data_parallel(snn, FLAGS.parallel)
    ann_x, snn_x = sample_pair(ann_run, snn_run, cfg, sampler_cfg, device)
    folder = os.path.join(logdir, "images")
    save_grid(ann_x, os.path.join(folder, "ann.png"))
    save_grid(snn_x, os.path.join(folder, cflags.tagged("snn.png")))
    save_grid(side_by_side(ann_x, snn_x), os.path.join(folder, cflags.tagged("ann_vs_snn.png")), nrow=1)
    (x_t, t), held_out = error_batch(cfg, device, ann_x)
    error, by_t, stats = noise_errors(ann_run, snn_run, x_t, t)
    ann_floor, error64 = float64_errors(ann, cfg, snn_cfg, x_t, t)
    calls = build_sampler(cfg, sampler_cfg)[1].network_calls
    return {
        "bit": cfg.unet.bit, "time_steps": snn.time_steps, **configs.to_dict(snn_cfg),
        "latency_steps": snn.latency_steps(), "spike_driven": cfg.unet.spike_driven, "resample": cfg.unet.resampling,
        "source": os.path.abspath(ckpt_path), "step": ckpt.get("step"), "snn_checkpoint": os.path.abspath(snn_path),
        "noise_relative_error": error, "noise_relative_error_by_t": by_t, "ann_float32_vs_float64": ann_floor,
        "noise_relative_error_float64": error64, "val_size": FLAGS.val_size,
        "val_images": "held-out" if held_out else "ANN samples",
        "sample_relative_error": agreement.relative_error(snn_x, ann_x), **configs.to_dict(sampler_cfg),
        "network_calls": calls, "sample_size": FLAGS.sample_size, "seed": FLAGS.seed, "spike_stats": stats,
        "energy": per_image(stats, calls), "wall_s": round(time.time() - start, 1),
    }


def main(argv):
    rt = runtime.setup(FLAGS.seed)
    logdir = cflags.logdir()
    if rt.is_main:
        with folder_lock(logdir):
            for folder in (logdir, os.path.join(logdir, "images")):
                remove_stale_temporaries(folder)
            result = convert_and_measure(logdir, rt.device)
            report = os.path.join(logdir, cflags.tagged("conversion.json"))
            write_json(result, report)
        stats = result["spike_stats"]
        print(f"noise prediction relative error {result['noise_relative_error']:.3g} (the ANN's own float32 vs "
              f"float64: {result['ann_float32_vs_float64']:.3g}; float64 SNN: {result['noise_relative_error_float64']:.2e}), "
              f"firing rate {stats['firing_rate']:.4f}, latency {result['latency_steps']} steps a call, energy per "
              f"network call of one image {stats['energy_pJ_per_sample'] / 1e6:.2f} uJ (SNN) vs "
              f"{stats['ann_energy_pJ_per_sample'] / 1e6:.2f} uJ (ANN, float MACs: "
              f"{stats['energy_ratio_ann_over_snn']:.2f}x) and {stats['int_ann_energy_pJ_per_sample'] / 1e6:.2f} uJ "
              f"(the ANN on integer activations: {stats['energy_ratio_int_ann_over_snn']:.2f}x) -> {report}")
    runtime.teardown(rt)  # the other ranks wait here for rank 0


if __name__ == "__main__":
    cflags.run(main)
