"""The benchmarks of ``bench/run.py``: each returns a row {key, ratio, a_ms, b_ms, what}.

``ratio = b / a``, where ``a`` is the baseline (the denominator) and ``b`` what is measured
against it; times are medians over alternating repeats (``paired_medians``).
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import torch

from common.configs import SamplerConfig, UNetConfig, time_steps
from diffusion import GaussianDiffusion
from schedulers import make_sampler
from model import UNet
from snn.convert import convert
from snn.neuron import spike_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = UNetConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, dropout=0.0, num_groups=8)  # config/train_ANN/demo.txt
CIFAR10 = UNetConfig(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, dropout=0.1)
TINY = UNetConfig(ch=32, ch_mult=(1,), num_res_blocks=1, dropout=0.0)
BIT = 2


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paired_medians(fa, fb, repeats, device, warmup=1):
    """Median seconds of ``fa()`` and of ``fb()``, timed alternately after ``warmup`` calls each."""
    return interleaved_medians([fa, fb], repeats, device, warmup)


def interleaved_medians(fns, repeats, device, warmup=1):
    """Median seconds of each of ``fns``, called in turn ``repeats`` times after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def row(key, a, b, what):
    return {"key": key, "ratio": b / a, "a_ms": a * 1e3, "b_ms": b * 1e3, "what": what}


MODES = {"": ("if", "step"), "_exact": ("graded", "compensated")}  # key suffix: (neuron, norm)


@torch.no_grad()
def snn_over_ann(name, cfg, batch, device, repeats):
    """(a) SNN forward time / (T x quantized-ANN forward time), 32x32 images, eval mode, for the
    seed's mode (binary IF, GroupNorm per step) and the exact one (graded, compensated).

    Per mode three rows: reference kernels, fused kernels (``--kernels=auto``, for the ANN's
    quantizers too), and the two SNNs against each other; all models are timed in turn.
    """
    torch.manual_seed(0)
    ann = UNet(replace(cfg, bit=BIT), 1000).to(device).eval()
    ann_fused = UNet(replace(cfg, bit=BIT), 1000, "auto").to(device).eval()
    ann_fused.load_state_dict(ann.state_dict())
    x = torch.randn(batch, 3, 32, 32, device=device)
    t = torch.randint(1000, (batch,), device=device)
    models = [ann, ann_fused]
    for neuron, norm in MODES.values():
        models += [convert(ann, neuron, norm), convert(ann_fused, neuron, norm)]
    for model in models:
        model(x, t)  # compiles the fused kernels outside the timing
    times = interleaved_medians([lambda m=m: m(x, t) for m in models], repeats, device)
    a, a_fused, T = times[0], times[1], models[2].time_steps
    rows = []
    for i, (suffix, (neuron, norm)) in enumerate(MODES.items()):
        ref, fused = times[2 + 2 * i], times[3 + 2 * i]
        what = f"{name} UNet, batch {batch}, T={T}, {neuron} neurons, {norm} GroupNorm"
        rows += [row(f"snn_over_T_ann_{name}{suffix}", T * a, ref, what + ", reference loop; A = T x ANN"),
                 row(f"snn_over_T_ann_{name}{suffix}_fused", T * a_fused, fused,
                     what + ", fused (auto); A = T x ANN, fused"),
                 row(f"snn_fused_over_reference_{name}{suffix}", ref, fused, what + "; A = SNN with the reference loop")]
    return rows


@torch.no_grad()
def if_over_copy(device, repeats, batch=8, T=time_steps(BIT)):
    """(b) IF neuron over x [T, B, 32, 32, 32] / x.clone(), reference loop and fused kernel, each kind."""
    x = torch.randn(T, batch, 32, 32, 32, device=device) * 0.5
    theta = torch.tensor(0.7, device=device)
    rows = []
    for kind in ("if", "signed", "graded"):
        for kernels in ("reference", "auto"):
            spike_train(x, theta, kind, kernels)  # compiles once, outside the timing
            a, b = paired_medians(lambda: x.clone(), lambda: spike_train(x, theta, kind, kernels), repeats, device)
            key = "if_over_copy_" + ("reference" if kernels == "reference" else "fused") + \
                ("" if kind == "if" else f"_{kind}")
            rows.append(row(key, a, b, f"[{T}, {batch}, 32, 32, 32] float32, {kind} neurons, "
                                       f"kernels={kernels}; A = x.clone()"))
    return rows


def quant_over_fp_train(device, repeats, batch=16):
    """(c) training step of the 2-bit demo UNet / of the full-precision one (same batch).

    Two rows: the quantizers fused (``--kernels=auto``, as the flagfiles run) and one by one.
    """
    steps = {}
    for bit, kernels in ((32, "reference"), (BIT, "auto"), (BIT, "reference")):
        torch.manual_seed(0)
        unet = UNet(replace(DEMO, bit=bit), 1000, kernels)
        unet = unet.to(device).train()
        diffusion = GaussianDiffusion(1e-4, 0.02, 1000).to(device)
        optim = torch.optim.Adam(unet.parameters(), lr=1e-4)
        x_0 = torch.randn(batch, 3, 32, 32, device=device)
        steps[bit, kernels] = _train_step(unet, diffusion, optim, x_0)
        steps[bit, kernels]()  # compiles outside the timing
    fp, fused, ref = interleaved_medians([steps[32, "reference"], steps[BIT, "auto"], steps[BIT, "reference"]],
                                         repeats, device)
    what = f"demo UNet, batch {batch}, forward+backward+Adam; A = full precision"
    return [row("quant_over_fp_train", fp, fused, what + "; quantizer fused (--kernels=auto)"),
            row("quant_over_fp_train_reference", fp, ref, what + "; quantizer reference")]


def _train_step(model, diffusion, optim, x_0):
    def step():
        optim.zero_grad(set_to_none=True)
        diffusion.training_losses(model, x_0).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
    return step


@torch.no_grad()
def ddim_over_ddpm(device, quick=False):
    """(d) DDIM (100 steps) / ancestral (1000 steps) sampling, 2-bit UNet, one 32x32 image.

    Full mode: whole runs of the tiny UNet (ch 32, one level). Quick mode: the demo UNet, 20
    steps of each sampler, scaled to 100 and 1000 steps.
    """
    torch.manual_seed(0)
    model = UNet(replace(DEMO if quick else TINY, bit=BIT), 1000).to(device).eval()
    x_T = torch.randn(1, 3, 32, 32, device=device)
    diffusion = GaussianDiffusion(1e-4, 0.02, 1000).to(device)
    ddpm = make_sampler(diffusion, SamplerConfig("ddpm"))
    ddim = make_sampler(diffusion, SamplerConfig("ddim", 100))
    if quick:
        a, b = paired_medians(lambda: _first_steps(ddpm, model, x_T, 20), lambda: _first_steps(ddim, model, x_T, 20),
                              3, device)
        a, b = a * 1000 / 20, b * 100 / 20
        what = "demo UNet, 1 image, 20 steps of each timed and scaled to 1000 / 100 steps"
    else:
        a, b = paired_medians(lambda: ddpm(model, x_T), lambda: ddim(model, x_T), 2, device, warmup=0)
        what = "tiny UNet (ch 32, ch_mult 1), 1 image, whole sampling runs"
    return row("ddim100_over_ddpm1000", a, b, what + "; A = ancestral 1000 steps")


def _first_steps(sampler, model, x_T, n):
    for i, _ in enumerate(sampler.steps(model, x_T)):
        if i + 1 == n:
            break


def ddp_over_single(steps=30, batch=16, threads=1):
    """(e) images/s of ANN_train.py under torchrun (2 gloo processes) / one process, same global
    batch, demo UNet, ``threads`` threads per process; from the ``wall_s`` its summary line reports
    (the training loop: first step and final checkpoint included)."""
    args = ["--dataset=shapes", "--img_size=32", "--ch=32", "--ch_mult=1", "--ch_mult=2", "--num_res_blocks=1",
            "--dropout=0.0", "--bit=2", f"--batch_size={batch}", f"--total_steps={steps}", f"--save_step={steps}",
            "--sample_step=0", "--num_workers=0", "--log_step=1000000", "--warmup=10"]
    single = _train_images_per_s(args, steps * batch, [], threads)
    double = _train_images_per_s(args, steps * batch, ["-m", "torch.distributed.run", "--standalone",
                                                       "--nproc_per_node=2"], threads)
    what = (f"ANN_train.py demo UNet, global batch {batch}, {steps} steps, images/s; {threads} thread(s) per "
            f"process, {os.cpu_count()} cores; A = 1 process, B = 2 processes (gloo); ideal 2.0")
    # a ratio of throughputs (> 1: the two processes are faster); the times are ms per image
    return {"key": "ddp2_over_1", "ratio": double / single, "a_ms": 1e3 / single, "b_ms": 1e3 / double,
            "what": what}


def _train_images_per_s(args, images, launcher, threads):
    with tempfile.TemporaryDirectory() as logdir:
        cmd = [sys.executable, *launcher, os.path.join(ROOT, "ANN_train.py"), *args, f"--logdir={logdir}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    return images / summary["wall_s"]
