"""Gaussian diffusion (Ho et al., 2020) and its samplers; the model is an argument, never a member.

``GaussianDiffusion`` holds the schedule: coefficients computed once in float64 as buffers and
read through ``extract``. It serves the online and the EMA model, a quantized ANN and its SNN
alike, as improved-diffusion's object does, and keeps pytorch-ddpm's names (``q_sample``,
``q_mean_variance``, ``predict_xstart_from_eps``, ``p_mean_variance``). Every random draw comes
from an explicit ``torch.Generator``: the same generator state gives the same images for an ANN
and its SNN without touching the global random state.

Samplers are small objects over a diffusion (``schedulers.make_sampler`` picks one): ``AncestralSampler`` (the
seed's, ``T`` network calls) and ``DDIMSampler`` (``sample_steps`` calls). ``docs/diffusion.md``
has the equations.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.runtime import derived_seed, generator

MEAN_TYPES = ("xprev", "xstart", "epsilon")
VAR_TYPES = ("fixedlarge", "fixedsmall")


def extract(v, t, x_shape):
    """``v[t]`` as float32, reshaped to broadcast against a tensor of ``x_shape``: [B, 1, 1, 1]."""
    out = torch.gather(v, index=t, dim=0).float()
    return out.view([t.shape[0]] + [1] * (len(x_shape) - 1))


def randn(shape, like, generator):
    """Standard normal noise of ``shape`` on ``like``'s device and dtype, drawn from ``generator``."""
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def sample_noise(count, image_shape, seed, device="cpu"):
    """The fixed noise of sample grids and probes: ``(x_T, sampler generator)`` for ``seed``.

    x_T [count, *image_shape] is drawn on the CPU from a generator seeded with ``seed`` (the same
    numbers on every device), then moved to ``device``; the sampler's own noise (ancestral steps,
    DDIM with eta > 0) comes from the returned generator on ``device``, seeded with
    ``derived_seed(seed, 1)``. The same seed gives the same images for an ANN and its SNN.
    """
    x_T = torch.randn(count, *image_shape, generator=generator(seed))
    return x_T.to(device), generator(derived_seed(seed, 1), device)


class GaussianDiffusion(nn.Module):
    """The forward process q and the reverse process p of a model, for a linear beta schedule.

    ``mean_type``: what the model predicts (``epsilon``, ``xstart`` or ``xprev``).
    ``var_type``: ``fixedlarge`` (beta_t, with the posterior variance at t = 0) or
    ``fixedsmall`` (the posterior variance, beta tilde). Only buffers: ``.to(device)`` moves it.
    """

    def __init__(self, beta_1, beta_T, T, mean_type="epsilon", var_type="fixedlarge"):
        assert mean_type in MEAN_TYPES, f"mean_type must be one of {MEAN_TYPES}, got {mean_type!r}"
        assert var_type in VAR_TYPES, f"var_type must be one of {VAR_TYPES}, got {var_type!r}"
        super().__init__()
        self.T, self.mean_type, self.var_type = int(T), mean_type, var_type
        self.register_buffer("betas", torch.linspace(beta_1, beta_T, T).double())
        alphas = 1.0 - self.betas
        alphas_bar = torch.cumprod(alphas, dim=0)
        alphas_bar_prev = F.pad(alphas_bar, [1, 0], value=1)[:T]
        self.register_buffer("alphas_bar", alphas_bar)
        self.register_buffer("sqrt_alphas_bar", torch.sqrt(alphas_bar))
        self.register_buffer("sqrt_one_minus_alphas_bar", torch.sqrt(1.0 - alphas_bar))
        self.register_buffer("sqrt_recip_alphas_bar", torch.sqrt(1.0 / alphas_bar))
        self.register_buffer("sqrt_recipm1_alphas_bar", torch.sqrt(1.0 / alphas_bar - 1))
        # posterior q(x_{t-1} | x_t, x_0), eqs. 6-7
        self.register_buffer("posterior_var", self.betas * (1.0 - alphas_bar_prev) / (1.0 - alphas_bar))
        # the posterior variance is 0 at t = 0: the log takes the next value, so it stays finite
        self.register_buffer("posterior_log_var_clipped",
                             torch.log(torch.cat([self.posterior_var[1:2], self.posterior_var[1:]])))
        self.register_buffer("posterior_mean_coef1", torch.sqrt(alphas_bar_prev) * self.betas / (1.0 - alphas_bar))
        self.register_buffer("posterior_mean_coef2", torch.sqrt(alphas) * (1.0 - alphas_bar_prev) / (1.0 - alphas_bar))

    @classmethod
    def from_config(cls, cfg):
        """The diffusion of a ``common.configs.DiffusionConfig``."""
        return cls(cfg.beta_1, cfg.beta_T, cfg.T, cfg.mean_type, cfg.var_type)

    # forward process and training -----------------------------------------------------------

    def q_sample(self, x_0, t, noise):
        """x_t ~ q(x_t | x_0) (eq. 4): x_0, noise [B, C, H, W], t [B] -> [B, C, H, W]."""
        return (extract(self.sqrt_alphas_bar, t, x_0.shape) * x_0
                + extract(self.sqrt_one_minus_alphas_bar, t, x_0.shape) * noise)

    def training_losses(self, model, x_0, generator=None, snr_gamma=0.0):
        """Per-element squared error of the model's prediction for x_0 [B, C, H, W]: of the noise
        (eq. 14) for ``mean_type=epsilon``, of x_0 for ``xstart``, of the posterior mean for ``xprev``
        (pytorch-ddpm's trainer compares every mean type with the noise, which trains only epsilon).

        t ~ U{0, ..., T-1} and the noise are drawn from ``generator`` (on x_0's device).
        ``snr_gamma > 0`` weights each sample by ``min_snr_weights`` (0: uniform, as the seed).
        """
        t = torch.randint(self.T, size=(x_0.shape[0],), device=x_0.device, generator=generator)
        noise = randn(x_0.shape, x_0, generator)
        x_t = self.q_sample(x_0, t, noise)
        if self.mean_type == "epsilon":
            target = noise
        else:
            target = x_0 if self.mean_type == "xstart" else self.q_mean_variance(x_0, x_t, t)[0]
        loss = F.mse_loss(model(x_t, t), target, reduction="none")
        return loss * extract(self.min_snr_weights(snr_gamma), t, loss.shape) if snr_gamma > 0 else loss

    def min_snr_weights(self, gamma):
        """Min-SNR-gamma loss weights (Hang et al., 2023, arXiv:2303.09556) per step: [T] float64.

        The error of x_0 weighted by min(SNR_t, gamma), SNR_t = alpha_bar_t / (1 - alpha_bar_t),
        expressed for what the model predicts: an error of epsilon is SNR_t times one of x_0, an
        error of the posterior mean c1_t times one of x_0 (eq. 7), so the weights are
        min(SNR_t, gamma) / SNR_t (epsilon), min(SNR_t, gamma) (xstart), min(SNR_t, gamma) / c1_t^2
        (xprev). Steps with little noise, whose error says least about the samples, count less.
        """
        snr = self.alphas_bar / (1.0 - self.alphas_bar)
        x0_weight = torch.clamp(snr, max=gamma)
        scale = {"epsilon": snr, "xstart": torch.ones_like(snr), "xprev": self.posterior_mean_coef1 ** 2}
        return x0_weight / scale[self.mean_type]

    # reverse process --------------------------------------------------------------------------

    def q_mean_variance(self, x_0, x_t, t):
        """Mean and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0) (eqs. 6-7)."""
        mean = (extract(self.posterior_mean_coef1, t, x_t.shape) * x_0
                + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        return mean, extract(self.posterior_log_var_clipped, t, x_t.shape)

    def predict_xstart_from_eps(self, x_t, t, eps):
        """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t) (eq. 4 solved for x_0)."""
        return (extract(self.sqrt_recip_alphas_bar, t, x_t.shape) * x_t
                - extract(self.sqrt_recipm1_alphas_bar, t, x_t.shape) * eps)

    def predict_eps_from_xstart(self, x_t, t, x_0):
        return (extract(self.sqrt_recip_alphas_bar, t, x_t.shape) * x_t - x_0) / \
            extract(self.sqrt_recipm1_alphas_bar, t, x_t.shape)

    def model_log_var(self, t, shape):
        """log sigma_t^2 of p(x_{t-1} | x_t) for ``var_type``: [B, 1, 1, 1]."""
        if self.var_type == "fixedlarge":
            log_var = torch.log(torch.cat([self.posterior_var[1:2], self.betas[1:]]))
        else:
            log_var = self.posterior_log_var_clipped
        return extract(log_var, t, shape)

    def p_mean_variance(self, model, x_t, t, clip_denoised=False):
        """Mean and log-variance of p(x_{t-1} | x_t) for ``model``: x_t [B, C, H, W], t [B].

        The mean is the posterior mean (eqs. 6-7) at the predicted x_0. ``clip_denoised=False``
        (pytorch-ddpm's behaviour, which the published FIDs of this method used) takes the
        unclipped x_0; ``True`` clips it to [-1, 1] first, as the original DDPM code does.
        """
        log_var = self.model_log_var(t, x_t.shape)
        out = model(x_t, t)
        if self.mean_type == "xprev":
            return out, log_var
        x_0 = out if self.mean_type == "xstart" else self.predict_xstart_from_eps(x_t, t, out)
        if clip_denoised:
            x_0 = x_0.clamp(-1, 1)
        mean, _ = self.q_mean_variance(x_0, x_t, t)
        return mean, log_var


def final_image(steps):
    """Drain a sampler's ``steps`` generator: its last output (x_0) clipped to [-1, 1]."""
    x_0 = None
    for x_0 in steps:
        pass
    return x_0.clamp(-1, 1)


class AncestralSampler:
    """Ancestral sampling of p(x_{t-1} | x_t) over all ``T`` steps: the seed's sampler."""

    name = "ddpm"

    def __init__(self, diffusion, clip_denoised=False):
        self.diffusion, self.clip_denoised = diffusion, bool(clip_denoised)

    @property
    def network_calls(self):
        return self.diffusion.T

    def steps(self, model, x_T, generator=None):
        """Yields x_{t-1} for t = T-1, ..., 0 (the last one is x_0, unclipped): [B, C, H, W] each."""
        x_t = x_T
        for time_step in reversed(range(self.diffusion.T)):
            t = x_t.new_full((x_T.shape[0],), time_step, dtype=torch.long)
            mean, log_var = self.diffusion.p_mean_variance(model, x_t, t, self.clip_denoised)
            if time_step > 0:
                x_t = mean + torch.exp(0.5 * log_var) * randn(x_t.shape, x_t, generator)
            else:
                x_t = mean
            yield x_t

    def __call__(self, model, x_T, generator=None):
        """x_0 [B, C, H, W] in [-1, 1] from x_T: the last step's output, clipped."""
        return final_image(self.steps(model, x_T, generator))


class DDIMSampler(AncestralSampler):
    """DDIM (Song et al., 2021, eq. 12) over ``sample_steps`` evenly spaced diffusion steps.

    ``eta = 0`` is deterministic; ``eta = 1`` has the variance of the ancestral sampler.
    Needs a model that predicts epsilon (or x_0, from which epsilon follows). Without
    ``clip_denoised`` the model's own epsilon and x_0 are used as they are.
    """

    name = "ddim"

    def __init__(self, diffusion, sample_steps, eta=0.0, clip_denoised=False):
        super().__init__(diffusion, clip_denoised)
        if diffusion.mean_type == "xprev":
            raise ValueError("DDIM needs a model that predicts epsilon or x_0, not xprev")
        if not 1 <= sample_steps <= diffusion.T:
            raise ValueError(f"sample_steps must be in 1..{diffusion.T}, got {sample_steps}")
        self.sample_steps, self.eta = int(sample_steps), float(eta)
        self.timesteps = torch.linspace(0, diffusion.T - 1, sample_steps).round().long().tolist()

    @property
    def network_calls(self):
        return self.sample_steps

    def sigma(self, a_t, a_prev):
        """Noise scale of a step from alpha-bar a_t to a_prev (eq. 16); eta = 1 with every step
        taken gives the posterior standard deviation of the ancestral sampler."""
        return self.eta * torch.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))

    def eps_and_xstart(self, model, x_t, t):
        """The model's noise and x_0 predictions at (x_t, t), x_0 clipped with ``clip_denoised``."""
        d = self.diffusion
        out = model(x_t, t)
        if d.mean_type == "epsilon":
            eps, x_0 = out, d.predict_xstart_from_eps(x_t, t, out)
        else:
            eps, x_0 = None, out
        if self.clip_denoised:
            x_0, eps = x_0.clamp(-1, 1), None
        return (d.predict_eps_from_xstart(x_t, t, x_0) if eps is None else eps), x_0

    def steps(self, model, x_T, generator=None):
        x_t, seq, alphas_bar = x_T, self.timesteps, self.diffusion.alphas_bar
        for i in reversed(range(len(seq))):
            t = x_t.new_full((x_T.shape[0],), seq[i], dtype=torch.long)
            eps, x_0 = self.eps_and_xstart(model, x_t, t)
            a_t = extract(alphas_bar, t, x_t.shape)
            a_prev = extract(alphas_bar, t.new_full(t.shape, seq[i - 1]), x_t.shape) if i > 0 \
                else torch.ones_like(a_t)
            sigma = self.sigma(a_t, a_prev)
            direction = torch.sqrt((1 - a_prev - sigma ** 2).clamp(min=0)) * eps
            x_t = torch.sqrt(a_prev) * x_0 + direction
            if self.eta > 0:
                x_t = x_t + sigma * randn(x_t.shape, x_t, generator)
            yield x_t

