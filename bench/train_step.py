"""Training-step time of UNet variants on the demo settings, timed alternately on one machine.

    python -m bench.train_step [--variants seed spike_driven ...] [--repeats 10] [--threads 1]

Each variant is the demo UNet (config/train_ANN/demo.txt: ch 32, ch_mult 1 2 2, one ResBlock a
level, 8 GroupNorm groups, 2-bit, 16x16, batch 32) with the ``UNetConfig`` fields of ``VARIANTS``;
one step is forward, backward (min-SNR-5 loss), gradient clipping and Adam. The steps of all
variants are timed in turn (A, B, C, A, B, C, ...) after a warm-up, so a machine that other work
slows down slows all alike; the table gives the median per variant and its ratio to the first.
"""
import argparse
import os
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

from bench.measure import interleaved_medians
from common.configs import UNetConfig
from diffusion import GaussianDiffusion
from model import UNet

DEMO = UNetConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, dropout=0.0, num_groups=8, bit=2, alpha_init=2.0)
VARIANTS = {
    "seed": {},
    "pool": {"resample": "pool"},
    "act_conv": {"spike_driven": True, "shortcut": "act", "resample": "act_conv"},
    "act_pool": {"spike_driven": True, "shortcut": "act", "resample": "pool"},
    "act_signed_conv": {"spike_driven": True, "shortcut": "act", "resample": "signed_conv"},
    "signed_pool": {"spike_driven": True, "shortcut": "signed", "resample": "pool"},
    "signed_signed_conv": {"spike_driven": True, "shortcut": "signed", "resample": "signed_conv"},
    "fold_pool": {"spike_driven": True, "shortcut": "fold", "resample": "pool"},
    "fold_sum_pool": {"spike_driven": True, "shortcut": "fold_sum", "resample": "pool"},
    "fold_act_pool": {"spike_driven": True, "shortcut": "fold_act", "resample": "pool"},
    "fold_act_act_conv": {"spike_driven": True, "shortcut": "fold_act", "resample": "act_conv"},
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    return parser.parse_args(argv)


def train_step(fields, device):
    """One demo training step of the variant ``fields`` as a closure (its own model and batch)."""
    torch.manual_seed(0)
    model = UNet(replace(DEMO, **fields), 1000, "auto").to(device).train()
    diffusion = GaussianDiffusion(1e-4, 0.01, 1000).to(device)
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_0 = torch.randn(32, 3, 16, 16, device=device)

    def step():
        optim.zero_grad(set_to_none=True)
        diffusion.training_losses(model, x_0, snr_gamma=5.0).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
    return step


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = [train_step(VARIANTS[name], device) for name in args.variants]
    times = interleaved_medians(steps, args.repeats, device, warmup=2)
    print(f"demo training step, batch 32, {args.threads} thread(s), {device}: median of {args.repeats}")
    print("| variant | ms / step | relative |")
    print("|---|---:|---:|")
    for name, t in zip(args.variants, times):
        print(f"| {name} | {t * 1e3:.1f} | {t / times[0]:.2f} |")


if __name__ == "__main__":
    main()
