"""Evaluation throughput of the CIFAR-10 UNet SNN, and what a 50,000-image evaluation costs in FLOPs.

    python -m bench.throughput [--batch_size 8] [--sampler ddim] [--sample_steps 20] [--repeats 1]

Builds pytorch-ddpm's CIFAR-10 UNet (ch 128, ch_mult 1 2 2 2, two ResBlocks a level) with 2-bit
activations and random weights (the time of a forward does not depend on the weights), converts it
in the seed's mode (binary IF, GroupNorm per step) and the exact one (graded, compensated), and
times whole sampling runs of ``--batch_size`` images on this machine's device (the ANN too, for
reference). It also counts the multiply-accumulates of one ANN forward of one image (every conv
and linear layer), from which the FLOPs of an evaluation follow, and measures the peak memory a
forward of the SNN adds per image, which bounds the batch a GPU takes:

    FLOPs = images x network calls x time_steps x 2 x MACs per forward

(an SNN runs every conv on the folded [time_steps * B, ...] batch, so on dense hardware each call
costs time_steps ANN forwards; the neurons' elementwise work is memory-bound and left out). Prints
a table and the formula with its numbers; writes ``docs/measured/throughput.json``.
"""
import argparse
import os
import platform
import time
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

from bench.measure import CIFAR10, sync
from common.atomic import write_json
from common.configs import SamplerConfig
from diffusion import GaussianDiffusion
from schedulers import make_sampler
from model import UNet
from snn.convert import convert
from snn.stats import SpikeMonitor

MODES = {"SNN, seed's mode (if, step)": ("if", "step"), "SNN, exact mode (graded, compensated)": ("graded", "compensated")}
EVAL_IMAGES = 50_000


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=8, help="images per sampling run")
    parser.add_argument("--sampler", default="ddim", help="sampler (as --sampler of the scripts)")
    parser.add_argument("--sample_steps", type=int, default=20, help="its network calls")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per model (the median is kept)")
    parser.add_argument("--kernels", default="auto", help="reference / compile / auto")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "measured", "throughput.json"), help="JSON output")
    return parser.parse_args(argv)


@torch.no_grad()
def macs_per_forward(model, img_size=32):
    """Multiply-accumulates of one forward of one image (``model.config.img_channels`` channels)
    through every conv and linear layer, as the spike monitor charges a quantized ANN."""
    monitor = SpikeMonitor(model)
    with monitor:
        model(torch.zeros(1, model.config.img_channels, img_size, img_size), torch.zeros(1, dtype=torch.long))
    return monitor.summary()["ann_mac_per_sample"]


def _memory_kb(field):
    """``VmRSS`` / ``VmHWM`` (peak) of this process in kB, from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


@torch.no_grad()
def activation_bytes_per_image(model, batch=32):
    """Peak memory a forward adds per image, measured on the CPU (peak RSS over the RSS before,
    under inference mode, ``batch`` images): what bounds the batch a GPU of a given memory takes."""
    before = _memory_kb("VmRSS")
    if before is None:
        return None
    with torch.inference_mode():
        model(torch.randn(batch, 3, 32, 32), torch.zeros(batch, dtype=torch.long))
    return max(0, _memory_kb("VmHWM") - before) * 1024 / batch


@torch.no_grad()
def images_per_second(model, sampler, args, device):
    """Median images/s of whole sampling runs of ``--batch_size`` images (after one warm-up call)."""
    x_T = torch.randn(args.batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    t = torch.zeros(args.batch_size, dtype=torch.long, device=device)
    model(x_T, t)  # compiles the fused kernels outside the timing
    times = []
    for _ in range(args.repeats):
        sync(device)
        start = time.perf_counter()
        sampler(model, x_T, torch.Generator(device).manual_seed(1))
        sync(device)
        times.append(time.perf_counter() - start)
    return args.batch_size / sorted(times)[len(times) // 2]


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    ann = UNet(replace(CIFAR10, bit=2), 1000, args.kernels).to(device).eval()
    reference = UNet(replace(CIFAR10, bit=2), 1000).eval()
    macs = macs_per_forward(reference)
    per_image = activation_bytes_per_image(convert(reference, "graded", "compensated"))  # first: the peak is its
    sampler = make_sampler(GaussianDiffusion(1e-4, 0.02, 1000).to(device),
                           SamplerConfig(args.sampler, args.sample_steps))
    calls = sampler.network_calls
    rows = [{"model": "quantized ANN", "time_steps": 1, "images_per_s": images_per_second(ann, sampler, args, device)}]
    for label, (neuron, norm) in MODES.items():
        snn = convert(ann, neuron, norm)
        rows.append({"model": label, "time_steps": snn.time_steps,
                     "images_per_s": images_per_second(snn, sampler, args, device)})
        print(f"{label}: {rows[-1]['images_per_s']:.4f} images/s", flush=True)
    described = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"\ndevice: {described}; CIFAR-10 UNet (2-bit), {args.sampler} {calls} network calls, batch {args.batch_size}")
    print(f"MACs per forward of one image: {macs / 1e9:.3f} G")
    if per_image:
        print(f"peak activation memory of the exact SNN per image (measured on the CPU, inference mode): "
              f"{per_image / 2 ** 20:.1f} MiB; a batch of 256 needs about {256 * per_image / 2 ** 30:.1f} GiB")
    print(f"{'model':<40} {'images/s':>10} {'s / image':>10} {'GFLOP/s achieved':>17}")
    for r in rows:
        flops = calls * r["time_steps"] * 2 * macs * r["images_per_s"]
        r["achieved_gflops"] = flops / 1e9
        print(f"{r['model']:<40} {r['images_per_s']:>10.4f} {1 / r['images_per_s']:>10.2f} {flops / 1e9:>17.1f}")
    snn_flops = EVAL_IMAGES * calls * rows[-1]["time_steps"] * 2 * macs
    print(f"\n{EVAL_IMAGES} images x {calls} calls x {rows[-1]['time_steps']} time steps x 2 x {macs / 1e9:.3f} G MACs "
          f"= {snn_flops:.3e} FLOPs (SNN); x {1000 // calls} for the ancestral 1000-step sampler")
    write_json({"device": described, "sampler": args.sampler, "network_calls": calls, "batch_size": args.batch_size,
                "macs_per_forward": macs, "activation_bytes_per_image": per_image, "rows": rows,
                "snn_eval_flops_50k": snn_flops}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
