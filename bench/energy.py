"""Where the energy of a model goes: a table and a stacked-bar plot, split by layer role.

    python -m bench.energy CKPT [CKPT ...] [--neuron=two_phase --norm=compensated] [--out docs/images/energy.png]

Each CKPT is an ANN ``ckpt.pt`` or an SNN checkpoint (``converted_snn*.pt``, a fine-tuned SNN).
With ``--neuron`` (and ``--norm``) every ANN is also converted on the fly into an SNN of that
mode, a row of its own. The energy is measured as ``evaluate.py``'s probe measures it: the spike
monitor on while ``--probe_images`` images are sampled (DDIM 20 steps, eta 1, the probe's noise of
``--seed``), per network call of one image, times the sampler's network calls for one image.

For every model the table gives the energy per image split by the role of the weight layers
(``snn.stats.ROLES``: spike-driven conv and linear layers; analog head, 1x1 shortcuts,
down/up-sampling convs, time embedding), the total, the same model's ANN with every synapse a
32-bit float MAC (the papers' baseline) and the same quantized ANN on integer-activation
hardware, each with its ratio to the model's energy, and the latency in time steps per network
call. The plot draws one stacked bar per model (its own energy by role) and, for every ANN, one
more: the same ANN on integer-activation hardware. ``docs/energy.md`` says where the constants
come from.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

from common.configs import SamplerConfig, SNNConfig
from common.errors import UserError
from diffusion import sample_noise
from schedulers import build_sampler
from snn.io import load_model, to_snn
from snn.stats import ROLES, SpikeMonitor, per_image

LABELS = {"spike_conv": "convs on spikes (ANN: on activations)", "spike_linear": "linears on spikes / activations",
          "head": "head (analog)",
          "shortcut": "1x1 shortcuts (analog)", "resampling": "down/up-sampling (analog)",
          "time_embedding": "time embedding (analog)", "other_analog": "other (analog)"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="ANN ckpt.pt or SNN checkpoints")
    parser.add_argument("--neuron", choices=["if", "signed", "graded", "two_phase"], default=None,
                        help="also convert every ANN into an SNN with this neuron")
    parser.add_argument("--norm", choices=["step", "compensated"], default="compensated",
                        help="GroupNorm of the converted SNNs (with --neuron)")
    parser.add_argument("--labels", nargs="*", default=None, help="a name per checkpoint (default: from the path)")
    parser.add_argument("--probe_images", type=int, default=8, help="images sampled with the monitor on")
    parser.add_argument("--sample_steps", type=int, default=20, help="DDIM steps (network calls per image)")
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM eta")
    parser.add_argument("--seed", type=int, default=0, help="the probe's seed (evaluate.py's --seed)")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "images", "energy.png"), help="the plot (PNG)")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.checkpoints):
        parser.error(f"--labels needs one name per checkpoint ({len(args.checkpoints)}), got {len(args.labels)}")
    if args.probe_images < 1 or args.sample_steps < 1:
        parser.error("--probe_images and --sample_steps must be at least 1")
    return args


def default_label(path):
    """``<folder>/<file>`` of a checkpoint path: enough to tell runs apart."""
    return os.path.join(os.path.basename(os.path.dirname(os.path.abspath(path))), os.path.basename(path))


@torch.no_grad()
def measure(model, cfg, args, device):
    """``per_image`` of ``model`` on the probe run: DDIM, the probe's noise (as evaluate.py draws it)."""
    sampler = build_sampler(cfg, SamplerConfig("ddim", args.sample_steps, args.eta), device)[1]
    size = cfg.data.img_size
    x_T, generator = sample_noise(args.probe_images, (model.head.in_channels, size, size), args.seed + 1, device)
    monitor = SpikeMonitor(model)
    with monitor:
        sampler(model, x_T, generator)
    summary = monitor.summary()
    return {**per_image(summary, sampler.network_calls), "firing_rate": summary["firing_rate"]}


def rows_of(path, label, args, device):
    """The table rows of one checkpoint: the model itself and (an ANN with --neuron) its SNN."""
    loaded = load_model(path, device, "auto")
    models = [(f"{label}, {loaded.kind.upper()}", loaded.model, loaded.snn)]
    if loaded.kind == "ann" and args.neuron:
        snn_cfg = SNNConfig(args.neuron, args.norm)
        models.append((f"{label}, SNN", to_snn(loaded.model, snn_cfg), snn_cfg))
    rows = []
    for name, model, snn_cfg in models:
        record = measure(model, loaded.config, args, device)
        rows.append({"model": name, "kind": "snn" if snn_cfg else "ann", "neuron": snn_cfg.neuron if snn_cfg else None,
                     "norm": snn_cfg.norm if snn_cfg else None, "spike_driven": loaded.config.unet.spike_driven,
                     "latency_steps": model.latency_steps() if snn_cfg else None, **record})
        print(f"measured {name}", file=sys.stderr, flush=True)
    return rows


def _uj(pj):
    return f"{pj / 1e6:.1f}"


def table(rows):
    """The markdown table of ``rows``: energy per image (uJ) by role, totals, baselines, ratios."""
    roles = [r for r in ROLES if any(row["energy_breakdown_pJ_per_image"][r]["energy_pJ"] for row in rows)]
    calls = sorted({row["network_calls"] for row in rows})
    lines = [f"Energy per generated image (uJ), {', '.join(map(str, calls))} network calls an image; "
             "the model's own energy by layer role, then the baselines.", "",
             "| model | neuron | " + " | ".join(LABELS[r] for r in roles) + " | total | ANN, float MACs | ANN / model "
             "| ANN, integer activations | integer ANN / model | latency (steps) |",
             "|---|---|" + "---:|" * (len(roles) + 6)]
    for row in rows:
        parts = row["energy_breakdown_pJ_per_image"]
        own, ann, ints = row["energy_pJ_per_image"], row["ann_energy_pJ_per_image"], row["int_ann_energy_pJ_per_image"]
        lines.append(f"| {row['model']} | {row['neuron'] or '–'} | "
                     + " | ".join(_uj(parts[r]["energy_pJ"]) for r in roles)
                     + f" | **{_uj(own)}** | {_uj(ann)} | {ann / own:.2f} | {_uj(ints)} | {ints / own:.2f} "
                       f"| {row['latency_steps'] or '–'} |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    """One stacked bar per model (its own energy by role) and one per ANN on integer hardware."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = []
    for row in rows:
        parts = row["energy_breakdown_pJ_per_image"]
        if row["kind"] == "ann":
            bars += [(f"{row['model']}\n(float MACs)", parts, "energy_pJ"),
                     (f"{row['model']}\n(integer activations)", parts, "int_ann_energy_pJ")]
        else:
            bars.append((f"{row['model']}\n({row['neuron']}, {row['norm']})", parts, "energy_pJ"))
    roles = [r for r in ROLES if any(parts[r][key] for _, parts, key in bars)]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 * len(bars) + 3), 5.5))
    colours = plt.get_cmap("tab10")
    bottom = [0.0] * len(bars)
    for i, role in enumerate(roles):
        heights = [parts[role][key] / 1e6 for _, parts, key in bars]
        ax.bar(range(len(bars)), heights, bottom=bottom, color=colours(i), label=LABELS[role], width=0.6)
        bottom = [b + h for b, h in zip(bottom, heights)]
    for x, total in enumerate(bottom):
        ax.text(x, total, f"{total:.0f}", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(bars)), [name for name, _, _ in bars], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("energy per generated image (uJ)")
    ax.set_title("Energy per image by layer role (45 nm: 0.9 pJ per add, 4.6 pJ per MAC)")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    labels = args.labels or [default_label(p) for p in args.checkpoints]
    try:
        rows = [row for path, label in zip(args.checkpoints, labels) for row in rows_of(path, label, args, device)]
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    print(table(rows))
    plot(rows, args.out)
    print(f"plot written to {args.out}")


if __name__ == "__main__":
    main()
