"""Stage 2: convert the quantized ANN of ``<logdir>/ckpt.pt`` into a spiking UNet and measure it.

``convert_run`` is what ``SNN_conversion.py`` does: it writes into ``logdir`` the SNN checkpoint
``converted_snn.pt``, ``images/`` (ANN and SNN samples from the same noise, side by side) and
``conversion.json`` (the relative error of the SNN's noise prediction to the ANN's on the
held-out batch stage 3 validates on, by t quarter and in float64, spike statistics and energy;
``docs/conversion.md``). The model comes from the checkpoint; a setting named in ``given`` that
contradicts it is a ``UserError``.
"""
import os
import time

import torch

from common import configs, runtime
from common.atomic import remove_stale_temporaries, write_json
from common.errors import UserError
from common.lock import folder_lock
from common.progress import progress
from diffusion import sample_noise
from model.build import build_unet
from model.images import save_grid, side_by_side
from schedulers import build_sampler
from snn import agreement
from snn.io import load_training_ann, save_snn, to_snn
from snn.stats import SpikeMonitor, per_image


@torch.no_grad()
def sample_pair(ann, snn, cfg, sampler_cfg, count, seed, device):
    """ANN and SNN samples [count, C, H, W] from the same x_T and the same sampler noise
    (``diffusion.sample_noise(count, ..., seed)``)."""
    _, sampler = build_sampler(cfg, sampler_cfg, device)
    images = []
    for model in (ann, snn):
        x_T, generator = sample_noise(count, cfg.image_shape, seed, device)
        x = x_T
        for x in progress(sampler.steps(model, x_T, generator), total=sampler.network_calls, desc="sample",
                          leave=False):
            pass
        images.append(x.clamp(-1, 1).cpu())
    return images


def error_batch(cfg, size, seed, data_dir, device, fallback):
    """((x_t [size, C, H, W], t [size]), held out?): the held-out batch of stage 3; without the
    dataset, noised ``fallback`` images [N, C, H, W] (repeated up to ``size``)."""
    diffusion, _ = build_sampler(cfg, configs.SamplerConfig(), device)
    try:
        return agreement.held_out_batch(cfg, size, diffusion, seed, data_dir, device), True
    except UserError as err:
        print(f"note: {err}; measuring the error on the ANN's own samples instead")
    x_0 = fallback.repeat((size + len(fallback) - 1) // len(fallback), 1, 1, 1)[:size]
    held_out = [(x, 0) for x in x_0]
    return agreement.validation_batch(held_out, size, diffusion, seed, device), False


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


def load_checked(ckpt_path, model_cfg, given, sampler_cfg, kernels, device):
    """(the ANN, its ModelConfig, its checkpoint, the SamplerConfig checked against its T): the
    settings in ``given`` must agree with the checkpoint, and the sampler must suit the model."""
    ann, cfg, ckpt = load_training_ann(ckpt_path, device, kernels)
    configs.model_config(model_cfg, given, cfg, ckpt_path)  # explicit flags must agree with the checkpoint
    sampler_cfg = configs.sampler_config(sampler_cfg, cfg.diffusion.T)
    build_sampler(cfg, sampler_cfg)  # a sampler this model cannot use fails before any work
    return ann, cfg, ckpt, sampler_cfg


def save_samples(folder, ann_x, snn_x, tag):
    """``ann.png``, ``snn.png`` and ``ann_vs_snn.png`` (the pairs side by side) into ``folder``."""
    save_grid(ann_x, os.path.join(folder, "ann.png"))
    save_grid(snn_x, os.path.join(folder, configs.tagged("snn.png", tag)))
    save_grid(side_by_side(ann_x, snn_x), os.path.join(folder, configs.tagged("ann_vs_snn.png", tag)), nrow=1)


def convert_and_measure(logdir, *, model_cfg, given, snn_cfg, sampler_cfg, conversion_cfg, loader_cfg,
                        runtime_cfg, device):
    """Convert ``<logdir>/ckpt.pt``, save the SNN and the sample grids, measure; returns the
    conversion.json record. ``runtime_cfg.kernels`` is what the models run (the script turns it
    to ``reference`` under ``parallel``)."""
    start, ckpt_path, tag = time.time(), os.path.join(logdir, "ckpt.pt"), conversion_cfg.tag
    ann, cfg, ckpt, sampler_cfg = load_checked(ckpt_path, model_cfg, given, sampler_cfg, runtime_cfg.kernels, device)
    snn = to_snn(ann, snn_cfg)
    snn_path = os.path.join(logdir, configs.tagged("converted_snn.pt", tag))
    save_snn(snn_path, snn, cfg, snn_cfg, source=os.path.abspath(ckpt_path), step=ckpt.get("step"))
    print(f"converted {ckpt_path} (bit={cfg.unet.bit}, time_steps={snn.time_steps}, neuron={snn_cfg.neuron}) "
          f"-> {snn_path}")
    ann_run, snn_run = (runtime.data_parallel(m, runtime_cfg.parallel) for m in (ann, snn))
    ann_x, snn_x = sample_pair(ann_run, snn_run, cfg, sampler_cfg, conversion_cfg.sample_size, conversion_cfg.seed,
                               device)
    save_samples(os.path.join(logdir, "images"), ann_x, snn_x, tag)
    (x_t, t), held_out = error_batch(cfg, conversion_cfg.val_size, conversion_cfg.seed, loader_cfg.data_dir, device,
                                     ann_x)
    error, by_t, stats = noise_errors(ann_run, snn_run, x_t, t)
    ann_floor, error64 = float64_errors(ann, cfg, snn_cfg, x_t, t)
    calls = build_sampler(cfg, sampler_cfg)[1].network_calls
    return {
        "bit": cfg.unet.bit, "time_steps": snn.time_steps, **configs.to_dict(snn_cfg),
        "latency_steps": snn.latency_steps(), "spike_driven": cfg.unet.spike_driven, "resample": cfg.unet.resampling,
        "source": os.path.abspath(ckpt_path), "step": ckpt.get("step"), "snn_checkpoint": os.path.abspath(snn_path),
        "noise_relative_error": error, "noise_relative_error_by_t": by_t, "ann_float32_vs_float64": ann_floor,
        "noise_relative_error_float64": error64, "val_size": conversion_cfg.val_size,
        "val_images": "held-out" if held_out else "ANN samples",
        "sample_relative_error": agreement.relative_error(snn_x, ann_x), **configs.to_dict(sampler_cfg),
        "network_calls": calls, "sample_size": conversion_cfg.sample_size, "seed": conversion_cfg.seed,
        "spike_stats": stats, "energy": per_image(stats, calls), "wall_s": round(time.time() - start, 1),
    }


def summary_line(result, report):
    """The line stage 2 ends with: the errors, the firing rate, the latency and the energies."""
    stats = result["spike_stats"]
    return (f"noise prediction relative error {result['noise_relative_error']:.3g} (the ANN's own float32 vs "
            f"float64: {result['ann_float32_vs_float64']:.3g}; "
            f"float64 SNN: {result['noise_relative_error_float64']:.2e}), "
            f"firing rate {stats['firing_rate']:.4f}, latency {result['latency_steps']} steps a call, energy per "
            f"network call of one image {stats['energy_pJ_per_sample'] / 1e6:.2f} uJ (SNN) vs "
            f"{stats['ann_energy_pJ_per_sample'] / 1e6:.2f} uJ (ANN, float MACs: "
            f"{stats['energy_ratio_ann_over_snn']:.2f}x) and {stats['int_ann_energy_pJ_per_sample'] / 1e6:.2f} uJ "
            f"(the ANN on integer activations: {stats['energy_ratio_int_ann_over_snn']:.2f}x) -> {report}")


def convert_run(*, logdir, model_cfg, given, snn_cfg, sampler_cfg, conversion_cfg, loader_cfg, runtime_cfg):
    """Stage 2 as ``SNN_conversion.py`` runs it, on every rank of a torchrun (rank 0 works under
    the folder's lock, the others wait): the conversion.json record on rank 0, else None.

    ``model_cfg`` (``unet.img_channels`` may be None) and the names in ``given`` are checked
    against the checkpoint; ``conversion_cfg.seed`` seeds the run."""
    rt = runtime.setup(conversion_cfg.seed)
    result = None
    if rt.is_main:
        with folder_lock(logdir):
            for folder in (logdir, os.path.join(logdir, "images")):
                remove_stale_temporaries(folder)
            result = convert_and_measure(logdir, model_cfg=model_cfg, given=given, snn_cfg=snn_cfg,
                                         sampler_cfg=sampler_cfg, conversion_cfg=conversion_cfg,
                                         loader_cfg=loader_cfg, runtime_cfg=runtime_cfg, device=rt.device)
            report = os.path.join(logdir, configs.tagged("conversion.json", conversion_cfg.tag))
            write_json(result, report)
        print(summary_line(result, report))
    runtime.teardown(rt)  # the other ranks wait here for rank 0
    return result
