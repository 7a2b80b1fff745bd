"""Sample quality against network calls: our samplers and diffusers' on one trained model.

    python -m bench.samplers --logdir=logs/demo [--num_images=256]

For the quantized ANN of ``<logdir>/ckpt.pt`` and its SNN in the seed's mode (binary IF neurons,
GroupNorm per step) and in the exact mode (graded neurons, compensated GroupNorm): FID and
recognisability in the shapes network's features and the wall time per image, for the ancestral
sampler (the seed's, T calls), DDIM with 10/20/50/100 steps (eta 0 and 1), DPM-Solver++ and UniPC
with 10/20.
Every model and sampler starts from the same noise. Writes ``docs/measured/samplers.md``, ``.json``
and ``.png`` (FID against network calls, one line per model and sampler family).
"""
import argparse
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

from bench.quality import Scorer
from common.atomic import atomic_open, write_json
from common.configs import SamplerConfig, SNNConfig
from snn.io import load_training_ann, to_snn

# (sampler, steps, eta): the ancestral sampler (T calls), DDIM deterministic and stochastic, two solvers
SAMPLERS = ([("ddpm", 1000, 0.0)] + [("ddim", n, eta) for eta in (0.0, 1.0) for n in (10, 20, 50, 100)]
            + [(name, n, 0.0) for name in ("dpm_solver++", "unipc") for n in (10, 20)])
MODELS = {"quantized ANN": None, "SNN if, step (the seed's)": SNNConfig("if", "step"),
          "SNN graded, compensated (exact)": SNNConfig("graded", "compensated")}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="logs/demo", help="the run folder holding ckpt.pt")
    parser.add_argument("--num_images", type=int, default=256, help="images per model and sampler")
    parser.add_argument("--skip_ancestral", action="store_true", help="leave out the T-step ancestral sampler")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "measured", "samplers"), help="output stem")
    parser.add_argument("--replot", action="store_true", help="redraw the table and the plot from <out>.json")
    return parser.parse_args(argv)


def measure(args, device):
    """[{model, sampler, calls, FID, IS, recognisability, s_per_image}] for every model and sampler."""
    ann, cfg, _ = load_training_ann(os.path.join(args.logdir, "ckpt.pt"), device, "auto")
    scorer = Scorer.for_config(cfg, args.num_images, device=device)
    rows = []
    for label, snn_cfg in MODELS.items():
        model = ann if snn_cfg is None else to_snn(ann, snn_cfg)
        for sampler, steps, eta in SAMPLERS:
            if sampler == "ddpm" and args.skip_ancestral:
                continue
            calls = cfg.diffusion.T if sampler == "ddpm" else steps
            result = scorer.score(model, cfg, SamplerConfig(sampler, steps, eta), device)
            rows.append({"model": label, "sampler": family(sampler, eta), "calls": calls,
                         **{k: result[k] for k in ("FID", "IS", "recognisability", "s_per_image")}})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def family(sampler, eta):
    """A sampler's name in the table and the plot: DDIM with its eta."""
    return f"ddim eta={eta:g}" if sampler == "ddim" else sampler


def table(rows, args):
    lines = [f"{args.num_images} images per row, shapes network features; wall time per image on "
             f"{'the GPU' if torch.cuda.is_available() else 'the CPU'}.", "",
             "| model | sampler | network calls | FID | recognisability | s / image |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['sampler']} | {r['calls']} | {r['FID']:.2f} | {r['recognisability']:.3f} "
                     f"| {r['s_per_image']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    """FID against network calls (log scale): one panel per sampler family, one line per model in
    each, the ancestral sampler (T calls) as a star in every panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    families = [f for f in ("ddim eta=0", "ddim eta=1", "dpm_solver++", "unipc") if any(r["sampler"] == f for r in rows)]
    looks = {model: look for model, look in zip(MODELS, (dict(color="C0", marker="o", linestyle="-", linewidth=2.5),
                                                         dict(color="C1", marker="s", linestyle="-"),
                                                         dict(color="C2", marker="x", linestyle="--")))}
    fig, axes = plt.subplots(1, len(families), figsize=(3.2 * len(families), 3.6), sharey=True, squeeze=False)
    for ax, fam in zip(axes[0], families):
        for model, look in looks.items():
            points = sorted((r["calls"], r["FID"]) for r in rows if r["model"] == model and r["sampler"] == fam)
            if points:
                ax.plot(*zip(*points), label=model, markersize=5, **look)
            ancestral = [(r["calls"], r["FID"]) for r in rows if r["model"] == model and r["sampler"] == "ddpm"]
            if ancestral:
                first = model == next(iter(looks))  # drawn large and hollow: the others show inside it
                ax.plot(*zip(*ancestral), "*", color=look["color"], markersize=17 if first else 10,
                        markerfacecolor="none" if first else look["color"],
                        label=f"{model}, ancestral" if fam == families[0] else None)
        ax.set_xscale("log")
        ax.set_title(fam)
        ax.set_xlabel("network calls per image")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("FID (shapes network features)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.replot:
        with open(args.out + ".json") as f:
            stored = json.load(f)
        rows, args.num_images = stored["rows"], stored["settings"]["num_images"]
    else:
        rows = measure(args, device)
        write_json({"rows": rows, "settings": vars(args)}, args.out + ".json")
    text = table(rows, args)
    with atomic_open(args.out + ".md", "w") as f:
        f.write(text)
    plot(rows, args.out + ".png")
    print(text)


if __name__ == "__main__":
    main()
