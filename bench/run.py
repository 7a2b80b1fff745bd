"""Speed ratios of the toolkit, each pair measured side by side in one run.

    python -m bench.run [--quick] [--threads N] [--out bench/results.json]

Prints a table and writes the same figures to ``bench/results.json`` (atomically):

    snn_over_T_ann_{demo,cifar10}[_exact][_fused]
                                   SNN forward / (T x quantized-ANN forward): the seed's mode (binary
                                   IF, GroupNorm per step) and the exact one (_exact: graded neurons,
                                   compensated GroupNorm); reference loop or fused kernels
    if_over_copy_{reference,fused} IF neuron over [T, ...] / x.clone() of the same input
    quant_over_fp_train            2-bit training step (fused quantizers) / full-precision step (demo UNet)
    ddim100_over_ddpm1000          DDIM 100 steps / ancestral 1000 steps, sampling wall time
    ddp2_over_1                    images/s of ANN_train.py under torchrun (2 processes) / 1 process

Every ratio compares two things timed alternately (A, B, A, B, ...) after warm-up runs, and
takes the median of each, so a machine that other work slows down slows both sides alike.
"""
import argparse
import os
import platform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

from bench import measure
from common.atomic import write_json

TARGETS = {"snn_over_T_ann_demo": 1.10, "snn_over_T_ann_cifar10": 1.10, "if_over_copy_fused": 2.0,
           "quant_over_fp_train": 1.15, "snn_over_T_ann_demo_exact_fused": 1.15, "snn_over_T_ann_cifar10_exact_fused": 1.15}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller inputs, extrapolated sampling")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1: steadier "
                        "figures on a shared machine; the DDP comparison gives each process as many)")
    parser.add_argument("--skip_ddp", action="store_true", help="leave out the torchrun comparison")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results.json"), help="JSON output")
    return parser.parse_args(argv)


def run_all(args, device):
    """Every benchmark in turn: (results dict, table rows)."""
    reps = 3 if args.quick else 7
    rows = []
    rows += measure.snn_over_ann("demo", measure.DEMO, 4, device, reps * 2)
    rows += measure.snn_over_ann("cifar10", measure.CIFAR10, 2, device, reps)
    rows += measure.if_over_copy(device, reps * 5, batch=4 if args.quick else 16)
    rows += measure.quant_over_fp_train(device, reps, batch=8 if args.quick else 16)
    rows.append(measure.ddim_over_ddpm(device, quick=args.quick))
    if not args.skip_ddp:
        rows.append(measure.ddp_over_single(steps=10 if args.quick else 30, threads=args.threads))
    results = {row["key"]: row["ratio"] for row in rows}
    return results, rows


def format_table(rows, device, threads):
    lines = [f"device: {device}, torch {torch.__version__}, {threads} thread(s) per process, "
             f"{os.cpu_count()} cores visible",
             f"{'ratio':<34} {'value':>7} {'target':>7}  {'A (ms)':>10} {'B (ms)':>10}  what",
             "-" * 110]
    for row in rows:
        target = TARGETS.get(row["key"])
        mark = "" if target is None else (" ok" if row["ratio"] <= target else " MISSED")
        lines.append(f"{row['key']:<34} {row['ratio']:>7.3f} {'' if target is None else f'<= {target:.2f}':>7}"
                     f"  {row['a_ms']:>10.2f} {row['b_ms']:>10.2f}  {row['what']}{mark}")
    return "\n".join(lines)


def cpu_name():
    """The processor's model name (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return names[0] if names else platform.machine()
    except OSError:
        return platform.processor() or platform.machine()


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    described = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()})"
    results, rows = run_all(args, device)
    print(format_table(rows, described, args.threads))
    results.update({"device": described, "threads": args.threads, "quick": args.quick,
                    "notes": {row["key"]: row["what"] for row in rows},
                    "times_ms": {row["key"]: [round(row["a_ms"], 3), round(row["b_ms"], 3)] for row in rows}})
    write_json(results, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
