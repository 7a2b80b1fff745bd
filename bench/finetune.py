"""What stage 3 does to the seed's two modes: the fine-tuning table of README.

    python -m bench.finetune --logdir=logs/demo [--val_size=256] [--num_images=256]

For the seed's binary IF neurons and for its signed neurons, both with GroupNorm per time step,
against the quantized ANN of ``<logdir>/ckpt.pt``, four SNNs: the converted one; bias-corrected
only (``SNN_ft.py --ft_steps=0``); fine-tuned as stage 3 did before bias correction (judged by
the one-call error alone: ``--nobias_correction --judge_images=0``); and bias-corrected +
fine-tuned, judged by both errors (the demo flagfile as it is). Every run of ``SNN_ft.py`` takes
the settings of ``config/SNN_ft/demo.txt`` and starts afresh (``--restart``) in a folder of its
own (``--tag``). Per SNN: the one-call error on ``--val_size`` held-out pairs, the error of its
images to the ANN's and FID / IS / recognisability in the shapes network's features, all
images from the same noise (DDIM 20 steps, eta 1, as the demo evaluates). Writes
``docs/measured/finetune.md`` and ``.json``.
"""
import argparse
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


from bench.modes import Bench, stage3, write_report
from snn.io import load_model

MODES = [("if", "step"), ("signed", "step")]
# stage 3 variants: (label, tag suffix, SNN_ft.py flags over the demo flagfile)
VARIANTS = [("bias-corrected only", "bias", ["--bias_correction", "--ft_steps=0"]),
            ("fine-tuned, one-call criterion, no bias correction", "old", ["--nobias_correction", "--judge_images=0"]),
            ("bias-corrected + fine-tuned, both errors judged", "new", [])]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="logs/demo", help="the run folder holding ckpt.pt")
    parser.add_argument("--val_size", type=int, default=256, help="held-out pairs of the one-call error")
    parser.add_argument("--num_images", type=int, default=256, help="images sampled per model for the scores")
    parser.add_argument("--flagfile", default="config/SNN_ft/demo.txt",
                        help="the settings of every stage-3 run (SNN_ft.py's flags; relative to the repository)")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "measured", "finetune"),
                        help="output stem (.md, .json)")
    args = parser.parse_args(argv)
    args.sampler, args.sample_steps, args.eta = "ddim", 20, 1.0  # as the demo evaluates
    return args


def tuned(args, bit, neuron, norm, suffix, extra, device):
    """(the SNN stage 3 made, its finetune.json) for one mode and one variant."""
    tag = f"bench_ft_{neuron}_{norm}_{suffix}"
    stage3(f"--flagfile={os.path.join(ROOT, args.flagfile)}", f"--logdir={args.logdir}", f"--neuron={neuron}",
           f"--norm={norm}", f"--tag={tag}", "--sample_size=0", "--restart", *extra)
    out_dir = os.path.join(args.logdir, f"SNN_{bit}bit_ft_{tag}")
    with open(os.path.join(out_dir, "finetune.json")) as f:
        record = json.load(f)
    return load_model(os.path.join(out_dir, "snn_ft.pt"), device, "auto").model, record


def stage3_summary(record):
    """What one stage-3 run kept, from its finetune.json."""
    blocks = record["blocks"]
    return {"steps_kept": sum(b["kept"] for b in blocks), "bias_kept": sum(b.get("bias_kept", False) for b in blocks),
            "blocks_tuned": sum(b["steps"] > 0 or b.get("bias_shift") is not None for b in blocks),
            "wall_s": round(sum(b["wall_s"] for b in blocks), 1), "settings": record["settings"]}


def table(rows, ann, args):
    lines = [f"Against the quantized ANN: FID {ann['FID']:.2f}, IS {ann['IS']:.2f}, recognisability "
             f"{ann['recognisability']:.3f} ({args.num_images} images from the same noise, DDIM 20 steps, eta 1, "
             f"shapes network features); one-call error on {args.val_size} held-out pairs; sample error: "
             "relative L2 between the SNN's and the ANN's images.", "",
             "| neuron, norm | stage 3 | one-call error | sample error | FID | IS | recognisability "
             "| kept (bias / steps) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        kept = "–" if r["stage3"] is None else \
            f"{r['stage3']['bias_kept']} / {r['stage3']['steps_kept']} of {r['stage3']['blocks_tuned']}"
        lines.append(f"| {r['mode']} | {r['variant']} | {r['noise_error']:.4f} | {r['sample_error']:.4f} "
                     f"| {r['FID']:.2f} | {r['IS']:.2f} | {r['recognisability']:.3f} | {kept} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    bench = Bench(args)
    rows = []
    for neuron, norm in MODES:
        mode = f"{neuron}, {norm}"
        rows.append(bench.converted(neuron, norm, mode=mode, variant="converted", stage3=None))
        for label, suffix, extra in VARIANTS:
            snn, record = tuned(args, bench.cfg.unet.bit, neuron, norm, suffix, extra, bench.device)
            rows.append(bench.row(snn, mode, mode=mode, variant=label, stage3=stage3_summary(record)))
    write_report(table(rows, bench.ann_row, args), rows, bench, args)


if __name__ == "__main__":
    main()
