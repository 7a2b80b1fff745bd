"""Gaussian diffusion (Ho et al., 2020) with pytorch-ddpm's public shape, and DDIM sampling.

Schedule coefficients are computed once in float64 and stored as buffers; ``extract`` reads
them for a batch of steps. Both objects take the model as an argument, so the same code serves
the online model, the EMA model, a quantized ANN and its spiking conversion.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

MEAN_TYPES = ("xprev", "xstart", "epsilon")
VAR_TYPES = ("fixedlarge", "fixedsmall")


def extract(v, t, x_shape):
    """``v[t]`` as float32, reshaped to broadcast against a tensor of ``x_shape``: [B, 1, 1, 1]."""
    out = torch.gather(v, index=t, dim=0).float()
    return out.view([t.shape[0]] + [1] * (len(x_shape) - 1))


def mean_flat(x):
    return x.mean(dim=list(range(1, x.ndim)))


class GaussianDiffusionTrainer(nn.Module):
    """forward(x_0 [B, C, H, W]) -> per-element squared error of the noise prediction (eq. 14)."""

    def __init__(self, model, beta_1, beta_T, T):
        super().__init__()
        self.model = model
        self.T = T
        self.register_buffer("betas", torch.linspace(beta_1, beta_T, T).double())
        alphas_bar = torch.cumprod(1.0 - self.betas, dim=0)
        self.register_buffer("sqrt_alphas_bar", torch.sqrt(alphas_bar))
        self.register_buffer("sqrt_one_minus_alphas_bar", torch.sqrt(1.0 - alphas_bar))

    def q_sample(self, x_0, t, noise):
        """x_t ~ q(x_t | x_0) (eq. 4)."""
        return (extract(self.sqrt_alphas_bar, t, x_0.shape) * x_0
                + extract(self.sqrt_one_minus_alphas_bar, t, x_0.shape) * noise)

    def forward(self, x_0):
        t = torch.randint(self.T, size=(x_0.shape[0],), device=x_0.device)
        noise = torch.randn_like(x_0)
        x_t = self.q_sample(x_0, t, noise)
        return F.mse_loss(self.model(x_t, t), noise, reduction="none")


class GaussianDiffusionSampler(nn.Module):
    """Ancestral sampling of p(x_{t-1} | x_t); forward(x_T) -> x_0 clipped to [-1, 1].

    ``mean_type``: what the model predicts (``epsilon``, ``xstart`` or ``xprev``).
    ``var_type``: ``fixedlarge`` (beta_t, with the posterior variance at t = 1) or
    ``fixedsmall`` (the posterior variance, beta tilde).
    """

    def __init__(self, model, beta_1, beta_T, T, img_size=32, mean_type="epsilon", var_type="fixedlarge"):
        assert mean_type in MEAN_TYPES, f"mean_type must be one of {MEAN_TYPES}, got {mean_type!r}"
        assert var_type in VAR_TYPES, f"var_type must be one of {VAR_TYPES}, got {var_type!r}"
        super().__init__()
        self.model = model
        self.T = T
        self.img_size = img_size
        self.mean_type = mean_type
        self.var_type = var_type

        self.register_buffer("betas", torch.linspace(beta_1, beta_T, T).double())
        alphas = 1.0 - self.betas
        alphas_bar = torch.cumprod(alphas, dim=0)
        alphas_bar_prev = F.pad(alphas_bar, [1, 0], value=1)[:T]
        self.register_buffer("alphas_bar", alphas_bar)
        self.register_buffer("sqrt_recip_alphas_bar", torch.sqrt(1.0 / alphas_bar))
        self.register_buffer("sqrt_recipm1_alphas_bar", torch.sqrt(1.0 / alphas_bar - 1))
        # posterior q(x_{t-1} | x_t, x_0) (eqs. 6-7)
        self.register_buffer("posterior_var", self.betas * (1.0 - alphas_bar_prev) / (1.0 - alphas_bar))
        # the posterior variance is 0 at t = 0: log of the next value keeps the log finite
        self.register_buffer("posterior_log_var_clipped",
                             torch.log(torch.cat([self.posterior_var[1:2], self.posterior_var[1:]])))
        self.register_buffer("posterior_mean_coef1", torch.sqrt(alphas_bar_prev) * self.betas / (1.0 - alphas_bar))
        self.register_buffer("posterior_mean_coef2", torch.sqrt(alphas) * (1.0 - alphas_bar_prev) / (1.0 - alphas_bar))

    def q_mean_variance(self, x_0, x_t, t):
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (extract(self.posterior_mean_coef1, t, x_t.shape) * x_0
                + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        return mean, extract(self.posterior_log_var_clipped, t, x_t.shape)

    def predict_xstart_from_eps(self, x_t, t, eps):
        return (extract(self.sqrt_recip_alphas_bar, t, x_t.shape) * x_t
                - extract(self.sqrt_recipm1_alphas_bar, t, x_t.shape) * eps)

    def model_log_var(self, t, shape):
        if self.var_type == "fixedlarge":
            log_var = torch.log(torch.cat([self.posterior_var[1:2], self.betas[1:]]))
        else:
            log_var = self.posterior_log_var_clipped
        return extract(log_var, t, shape)

    def p_mean_variance(self, x_t, t):
        """Mean and log-variance of p(x_{t-1} | x_t); x_0 is clipped to [-1, 1] on the way."""
        log_var = self.model_log_var(t, x_t.shape)
        out = self.model(x_t, t)
        if self.mean_type == "xprev":
            return out, log_var
        if self.mean_type == "xstart":
            x_0 = out
        else:
            x_0 = self.predict_xstart_from_eps(x_t, t, out)
        mean, _ = self.q_mean_variance(x_0.clamp(-1, 1), x_t, t)
        return mean, log_var

    def steps(self, x_T):
        """Yields x_{t-1} for t = T-1, ..., 0 (the last one is x_0, unclipped)."""
        x_t = x_T
        for time_step in reversed(range(self.T)):
            t = x_t.new_full((x_T.shape[0],), time_step, dtype=torch.long)
            mean, log_var = self.p_mean_variance(x_t, t)
            noise = torch.randn_like(x_t) if time_step > 0 else torch.zeros_like(x_t)
            x_t = mean + torch.exp(0.5 * log_var) * noise
            yield x_t

    def forward(self, x_T):
        x_0 = x_T
        for x_0 in self.steps(x_T):
            pass
        return torch.clip(x_0, -1, 1)


class DDIMSampler(GaussianDiffusionSampler):
    """DDIM (Song et al., 2021, eq. 12) over ``sample_steps`` evenly spaced diffusion steps.

    ``eta = 0`` is deterministic; ``eta = 1`` has the variance of the ancestral sampler.
    Needs a model that predicts epsilon (or x_0, from which epsilon follows).
    """

    def __init__(self, model, beta_1, beta_T, T, img_size=32, mean_type="epsilon", var_type="fixedlarge",
                 sample_steps=100, eta=0.0):
        super().__init__(model, beta_1, beta_T, T, img_size, mean_type, var_type)
        if mean_type == "xprev":
            raise ValueError("DDIM needs a model that predicts epsilon or x_0, not xprev")
        if not 1 <= sample_steps <= T:
            raise ValueError(f"sample_steps must be in 1..{T}, got {sample_steps}")
        self.eta = float(eta)
        self.register_buffer("timesteps", torch.linspace(0, T - 1, sample_steps).round().long())

    def sigma(self, a_t, a_prev):
        """Noise scale of a DDIM step from alpha-bar a_t to a_prev (eq. 16); eta = 1 gives the
        posterior standard deviation of the ancestral sampler when every step is taken."""
        return self.eta * torch.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))

    def _eps_and_x0(self, x_t, t):
        out = self.model(x_t, t)
        if self.mean_type == "epsilon":
            x_0 = self.predict_xstart_from_eps(x_t, t, out)
        else:
            x_0 = out
        x_0 = x_0.clamp(-1, 1)
        eps = (extract(self.sqrt_recip_alphas_bar, t, x_t.shape) * x_t - x_0) / \
            extract(self.sqrt_recipm1_alphas_bar, t, x_t.shape)
        return eps, x_0

    def steps(self, x_T):
        x_t = x_T
        seq = self.timesteps.tolist()
        for i in reversed(range(len(seq))):
            t = x_t.new_full((x_T.shape[0],), seq[i], dtype=torch.long)
            eps, x_0 = self._eps_and_x0(x_t, t)
            a_t = extract(self.alphas_bar, t, x_t.shape)
            a_prev = extract(self.alphas_bar, t.new_full(t.shape, seq[i - 1]), x_t.shape) if i > 0 \
                else torch.ones_like(a_t)
            sigma = self.sigma(a_t, a_prev)
            direction = torch.sqrt((1 - a_prev - sigma ** 2).clamp(min=0)) * eps
            x_t = torch.sqrt(a_prev) * x_0 + direction + sigma * torch.randn_like(x_t)
            yield x_t


def make_sampler(model, sampler, beta_1, beta_T, T, img_size, mean_type, var_type, sample_steps=None, eta=0.0):
    """The ancestral sampler (``ddpm``) or ``DDIMSampler`` (``ddim``) for ``model``."""
    if sampler == "ddpm":
        return GaussianDiffusionSampler(model, beta_1, beta_T, T, img_size, mean_type, var_type)
    if sampler == "ddim":
        return DDIMSampler(model, beta_1, beta_T, T, img_size, mean_type, var_type,
                           sample_steps=sample_steps or T, eta=eta)
    raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
