"""How close a spiking UNet is to its quantized ANN, measured the same way in every stage.

Stage 2 (``conversion.json``) and stage 3 (``finetune.json``) both report the relative L2 error
of the SNN's noise prediction against the ANN's on one held-out batch (``validation_batch``):
the same images, steps and noise for the same ``val_size`` and ``seed``, evaluated in chunks of
``CHUNK``, so the two files give the same number for the same SNN. Stage 3 also judges by the
error of a short sampling run from fixed noise (``SampleJudge``).
"""
import torch

from model import data
from common.errors import UserError

CHUNK = 32  # images per forward pass: fixed, so the number does not depend on a batch flag


def validation_batch(dataset, size, diffusion, seed, device="cpu"):
    """A fixed held-out batch (x_t [size, C, H, W], t [size]) on ``device``, the same for a given seed.

    x_0 are ``size`` images of ``dataset`` chosen by ``seed``, t is spread evenly over
    0..T-1 (ascending) and the noise comes from ``seed`` too; x_t = q_sample(x_0, t, noise).
    """
    if size > len(dataset):
        raise ValueError(f"a validation batch of {size} needs at least as many images, the data has {len(dataset)}")
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(dataset), generator=generator)[:size].tolist()
    x_0 = torch.stack([dataset[i][0] for i in index])
    t = torch.linspace(0, diffusion.T - 1, size).round().long()
    noise = torch.randn(x_0.shape, generator=generator)
    x_0, t, noise = x_0.to(device), t.to(device), noise.to(device)
    return diffusion.q_sample(x_0, t, noise), t


def held_out_batch(cfg, size, diffusion, seed, data_dir, device="cpu"):
    """``validation_batch`` of the held-out split of a ``ModelConfig``'s dataset (``UserError`` if absent)."""
    held_out = data.load_dataset(cfg.data.dataset, data_dir, cfg.data.img_size, train=False,
                                 channels=cfg.unet.img_channels)
    try:
        return validation_batch(held_out, size, diffusion, seed, device)
    except ValueError as err:
        raise UserError(f"--val_size={size}: {err}") from None


@torch.no_grad()
def predictions(model, x_t, t, chunk=CHUNK):
    """``model(x_t, t)`` [N, C, H, W] computed ``chunk`` images at a time."""
    return torch.cat([model(x_t[i:i + chunk], t[i:i + chunk]) for i in range(0, len(t), chunk)])


def relative_error(out, ref):
    """||out - ref|| / ||ref|| (Frobenius norms, float64)."""
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm())


def errors_by_quarter(out, ref, t):
    """``relative_error`` for each quarter of a batch sorted by t: [{t_min, t_max, relative_error}]."""
    rows = []
    for part in torch.arange(len(t)).chunk(4):
        rows.append({"t_min": int(t[part[0]]), "t_max": int(t[part[-1]]),
                     "relative_error": relative_error(out[part], ref[part])})
    return rows


class SampleJudge:
    """The relative L2 error of a model's images against its ANN's, from the same fixed noise.

    ``sampler(model, x_T, generator)`` draws images [N, C, H, W] from ``x_T``; the sampler's own
    noise (DDIM with eta > 0) replays ``generator``'s stream from the state it had when the judge
    was made (``diffusion.sample_noise`` gives both), afresh at every call, so a model's error is a
    function of the model alone. The ANN's images are drawn once.
    """

    def __init__(self, sampler, x_T, generator, ann):
        self.sampler, self.x_T = sampler, x_T
        self.device, self.state = generator.device, generator.get_state()
        self.reference = self.images(ann)

    @torch.no_grad()
    def images(self, model):
        generator = torch.Generator(device=self.device)
        generator.set_state(self.state)
        return self.sampler(model, self.x_T, generator)

    def __call__(self, model):
        return relative_error(self.images(model), self.reference)
