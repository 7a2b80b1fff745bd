"""Every conversion mode side by side on one trained model: the mode table of README and docs.

    python -m bench.modes --logdir=logs/demo [--val_size=256] [--num_images=512] [--finetune]

For each neuron (if, signed, graded) x GroupNorm (step, compensated), against the quantized ANN
of ``<logdir>/ckpt.pt``: the noise-prediction error on the held-out batch (``--val_size`` pairs,
t spread over the diffusion range, the batch of conversion.json), the error of the samples drawn
from the same noise (``--sampler``, default DDIM 20 steps), FID / IS / recognisability in the
shapes network's features, spike events per neuron per time step and the energy per generated
image. ``--finetune`` also tunes the binary modes with ``SNN_ft.py`` (the demo flagfile's
settings, one ``--tag`` per mode) and adds those rows. Writes ``docs/measured/modes.md`` and ``.json``.
"""
import argparse
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

from bench.quality import Scorer
from common import flags as cflags
from common.atomic import atomic_open, write_json
from common.configs import SamplerConfig, SNNConfig
from schedulers import build_sampler
from snn import agreement
from snn.finetune_run import finetune_run
from snn.io import load_model, load_training_ann, to_snn
from snn.stats import SpikeMonitor

MODES = [(neuron, norm) for neuron in ("if", "signed", "graded") for norm in ("step", "compensated")]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="logs/demo", help="the run folder holding ckpt.pt")
    parser.add_argument("--val_size", type=int, default=256, help="held-out pairs of the noise-prediction error")
    parser.add_argument("--num_images", type=int, default=512, help="images sampled per model for the scores")
    parser.add_argument("--sampler", default="ddim", help="sampler of the scored images (as --sampler)")
    parser.add_argument("--sample_steps", type=int, default=20, help="its network calls")
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM eta (the demo's: 1)")
    parser.add_argument("--finetune", action="store_true", help="also fine-tune the binary modes (SNN_ft.py)")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "measured", "modes"), help="output stem (.md, .json)")
    return parser.parse_args(argv)


def stage3(*argv):
    """Stage 3 (``snn.finetune_run.finetune_run``) in this process, with the settings SNN_ft.py
    makes of the command line ``argv`` (its flags, parsed into flag values of their own)."""
    return finetune_run(**cflags.finetune_settings(cflags.values_of("SNN_ft.py", argv)))


class Bench:
    """The ANN, the held-out batch, its predictions and samples, and the scorer rows compare against."""

    def __init__(self, args, device=None):
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.args, self.device = args, device
        self.ann, self.cfg, _ = load_training_ann(os.path.join(args.logdir, "ckpt.pt"), device, "auto")
        self.sampler_cfg = SamplerConfig(args.sampler, args.sample_steps, args.eta)
        diffusion, sampler = build_sampler(self.cfg, self.sampler_cfg, device)
        self.calls = sampler.network_calls
        self.x_t, self.t = agreement.held_out_batch(self.cfg, args.val_size, diffusion, 0, "./data", device)
        self.ann_out = agreement.predictions(self.ann, self.x_t, self.t)
        self.scorer = Scorer.for_config(self.cfg, args.num_images, device=device)
        self.ann_row = self.scorer.score(self.ann, self.cfg, self.sampler_cfg, device)

    @torch.no_grad()
    def measure(self, snn, label):
        """One row: errors against the ANN, scores, spike events and energy of ``snn``."""
        monitor = SpikeMonitor(snn)
        with monitor:
            out = agreement.predictions(snn, self.x_t, self.t)
        stats = monitor.summary()
        scored = self.scorer.score(snn, self.cfg, self.sampler_cfg, self.device)
        as_float = [torch.from_numpy(r["images"]).double() for r in (scored, self.ann_row)]
        return {"model": label, "noise_error": agreement.relative_error(out, self.ann_out),
                "sample_error": agreement.relative_error(*as_float),
                **{k: scored[k] for k in ("FID", "IS", "recognisability", "s_per_image")},
                "events_per_neuron_step": stats["firing_rate"], "multi_spike_fraction": stats.get("multi_spike_fraction"),
                "negative_spike_fraction": stats["negative_spike_fraction"],
                "energy_uJ_per_image": stats["energy_pJ_per_sample"] * self.calls / 1e6}

    def row(self, snn, label, **extra):
        """``measure(snn, label)`` with ``extra`` fields, printed as one JSON line."""
        row = {**self.measure(snn, label), **extra}
        print(json.dumps(row), flush=True)
        return row

    def converted(self, neuron, norm, **extra):
        """The row of the ANN converted in mode (neuron, norm), labelled "neuron, norm"."""
        return self.row(to_snn(self.ann, SNNConfig(neuron, norm)), f"{neuron}, {norm}", **extra)

    def finetuned(self, neuron, norm):
        """The SNN of mode (neuron, norm) after stage 3 with the demo flagfile's settings."""
        tag = f"bench_{neuron}_{norm}"
        stage3(f"--flagfile={os.path.join(ROOT, 'config', 'SNN_ft', 'demo.txt')}", f"--logdir={self.args.logdir}",
               f"--neuron={neuron}", f"--norm={norm}", f"--tag={tag}", "--sample_size=0")
        path = os.path.join(self.args.logdir, f"SNN_{self.cfg.unet.bit}bit_ft_{tag}", "snn_ft.pt")
        return load_model(path, self.device, "auto").model


def table(rows, ann, args, calls):
    lines = [f"Against the quantized ANN: FID {ann['FID']:.2f}, IS {ann['IS']:.2f}, recognisability "
             f"{ann['recognisability']:.3f} ({args.num_images} images, {args.sampler} {calls} calls, eta {args.eta:g}, shapes network "
             f"features); noise-prediction error on {args.val_size} held-out pairs.", "",
             "| SNN | noise error | sample error | FID | IS | recognisability | events / neuron / step "
             "| spikes > 1 | negative | energy / image (uJ) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['noise_error']:.4f} | {r['sample_error']:.4f} | {r['FID']:.2f} "
                     f"| {r['IS']:.2f} | {r['recognisability']:.3f} | {r['events_per_neuron_step']:.3f} "
                     f"| {r['multi_spike_fraction'] or 0:.3f} | {r['negative_spike_fraction']:.3f} "
                     f"| {r['energy_uJ_per_image']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    bench = Bench(args)
    rows = [bench.converted(neuron, norm) for neuron, norm in MODES]
    if args.finetune:
        rows += [bench.row(bench.finetuned(neuron, norm), f"{neuron}, {norm}, fine-tuned")
                 for neuron, norm in MODES if neuron != "graded"]
    write_report(table(rows, bench.ann_row, args, bench.calls), rows, bench, args)


def write_report(text, rows, bench, args):
    """``text`` (the Markdown table) to ``args.out``.md, the ANN's and the ``rows``' figures with
    the settings to ``args.out``.json, both atomically; the table printed."""
    with atomic_open(args.out + ".md", "w") as f:
        f.write(text)
    write_json({"ann": {k: v for k, v in bench.ann_row.items() if k != "images"}, "rows": rows,
                "settings": vars(args)}, args.out + ".json")
    print(text)


if __name__ == "__main__":
    main()
