"""Diffusion schedule, posterior and samplers against closed forms, oracle models and pinned numbers."""
import numpy as np
import pytest
import torch

from common.configs import SamplerConfig
from diffusion import AncestralSampler, DDIMSampler, GaussianDiffusion, extract
from schedulers import make_sampler

T, B1, BT = 100, 1e-4, 0.02


def schedule():
    betas = np.linspace(B1, BT, T, dtype=np.float64)
    return betas, np.cumprod(1 - betas)


def posterior_coefs(t):
    """(c1, c2) of the posterior mean c1 x_0 + c2 x_t (DDPM eq. 7) in float64, for steps t."""
    betas, ab = schedule()
    ab_prev = np.where(t > 0, ab[np.maximum(t - 1, 0)], 1.0)
    return np.sqrt(ab_prev) * betas[t] / (1 - ab[t]), np.sqrt(1 - betas[t]) * (1 - ab_prev) / (1 - ab[t])


def col(v):
    return torch.tensor(v).view(-1, 1, 1, 1)


class Oracle(torch.nn.Module):
    """Predicts the exact noise (or x_0, or posterior mean) for data that is a single image x0."""

    def __init__(self, x0, mean_type):
        super().__init__()
        self.x0, self.mean_type = x0, mean_type
        self.ab = torch.tensor(schedule()[1])

    def forward(self, x_t, t):
        ab = self.ab[t].float().view(-1, 1, 1, 1)
        x0 = self.x0.expand_as(x_t)
        if self.mean_type == "epsilon":
            return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        if self.mean_type == "xstart":
            return x0
        c1, c2 = posterior_coefs(t.numpy())
        return col(c1).float() * x0 + col(c2).float() * x_t


class Wild(torch.nn.Module):
    """A fixed model whose predictions imply x_0 far outside [-1, 1]: 3 tanh(x_t) + t / T."""

    def forward(self, x_t, t):
        return 3 * torch.tanh(x_t) + t.view(-1, 1, 1, 1).to(x_t.dtype) / T


def test_extract_broadcasts():
    v = torch.arange(10).double()
    out = extract(v, torch.tensor([2, 7]), (2, 3, 4, 4))
    assert out.shape == (2, 1, 1, 1) and out.dtype == torch.float32
    assert out.flatten().tolist() == [2.0, 7.0]


def test_q_sample_closed_form():
    diffusion = GaussianDiffusion(B1, BT, T)
    _, ab = schedule()
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 50, 99])
    expected = col(np.sqrt(ab[t.numpy()])).float() * x0 + col(np.sqrt(1 - ab[t.numpy()])).float() * noise
    assert torch.allclose(diffusion.q_sample(x0, t, noise), expected, atol=1e-6)


@pytest.mark.parametrize("mean_type", ["epsilon", "xstart", "xprev"])
def test_training_loss_is_zero_for_the_oracle_and_draws_from_the_generator(mean_type):
    """The target is what the model predicts: the noise, x_0 or the posterior mean."""
    x0 = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    diffusion = GaussianDiffusion(B1, BT, T, mean_type)
    batch = x0.expand(64, -1, -1, -1)
    loss = diffusion.training_losses(Oracle(x0, mean_type), batch, torch.Generator().manual_seed(1))
    # float32 cancellation near t = 0 (sqrt(1 - alpha_bar) = 0.01) leaves ~1e-7; a wrong model scores ~1e-2..1
    assert loss.shape == (64, 3, 8, 8) and loss.max() < 1e-5
    others = [m for m in ("epsilon", "xstart", "xprev") if m != mean_type]
    for other in others:
        assert diffusion.training_losses(Oracle(x0, other), batch, torch.Generator().manual_seed(1)).mean() > 1e-3
    seen = []

    def model(x_t, t):
        seen.append((x_t, t))
        return torch.zeros_like(x_t)

    for _ in range(2):
        diffusion.training_losses(model, x0.expand(4, -1, -1, -1), torch.Generator().manual_seed(3))
    assert torch.equal(seen[0][0], seen[1][0]) and torch.equal(seen[0][1], seen[1][1])


@pytest.mark.parametrize("mean_type", ["epsilon", "xstart", "xprev"])
def test_min_snr_weights_closed_form_and_weighted_loss(mean_type):
    """Min-SNR-gamma: the x_0 error weighted by min(SNR, gamma), in the units of the prediction."""
    _, ab = schedule()
    snr = ab / (1 - ab)
    gamma = 5.0
    c1, _ = posterior_coefs(np.arange(T))
    scale = {"epsilon": snr, "xstart": np.ones(T), "xprev": c1 ** 2}[mean_type]
    diffusion = GaussianDiffusion(B1, BT, T, mean_type)
    weights = diffusion.min_snr_weights(gamma)
    # the diffusion's betas come from a float32 linspace: equal to ~4e-8 relative
    np.testing.assert_allclose(weights.numpy(), np.minimum(snr, gamma) / scale, rtol=1e-6)
    if mean_type == "epsilon":  # 1 where the SNR is below gamma (the noisy steps), gamma / SNR above it
        assert weights[-1] == 1.0 and weights[0] == pytest.approx(gamma / snr[0])
    x0 = torch.rand(16, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seen = []

    def model(x_t, t):
        seen.append(t)
        return torch.zeros_like(x_t)

    plain = diffusion.training_losses(model, x0, torch.Generator().manual_seed(2))
    weighted = diffusion.training_losses(model, x0, torch.Generator().manual_seed(2), snr_gamma=gamma)
    assert torch.equal(seen[0], seen[1])
    expected = plain * weights[seen[0]].float().view(-1, 1, 1, 1)
    assert torch.allclose(weighted, expected, rtol=1e-6, atol=0)
    assert torch.equal(diffusion.training_losses(model, x0, torch.Generator().manual_seed(2), snr_gamma=0.0), plain)


def test_variances_pinned():
    betas, ab = schedule()
    d = GaussianDiffusion(B1, BT, T, "epsilon", "fixedlarge")
    t = torch.tensor([0, 1, 50])
    post = betas * (1 - np.concatenate([[1.0], ab[:-1]])) / (1 - ab)
    large = d.model_log_var(t, (3, 1, 1, 1)).flatten().double()
    assert torch.allclose(large, torch.tensor(np.log([post[1], betas[1], betas[50]])), rtol=1e-6)
    d = GaussianDiffusion(B1, BT, T, "epsilon", "fixedsmall")
    small = d.model_log_var(t, (3, 1, 1, 1)).flatten().double()
    assert torch.allclose(small, torch.tensor(np.log([post[1], post[1], post[50]])), rtol=1e-6)


@pytest.mark.parametrize("mean_type", ["epsilon", "xstart", "xprev"])
def test_p_mean_is_the_true_posterior_mean_for_an_oracle(mean_type):
    x0 = torch.rand(1, 3, 8, 8) * 2 - 1
    d = GaussianDiffusion(B1, BT, T, mean_type)
    t = torch.tensor([5, 60])
    x_t = torch.randn(2, 3, 8, 8)
    mean, _ = d.p_mean_variance(Oracle(x0, mean_type), x_t, t)
    c1, c2 = posterior_coefs(t.numpy())
    assert torch.allclose(mean, col(c1).float() * x0 + col(c2).float() * x_t, atol=1e-4)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("mean_type", ["epsilon", "xstart", "xprev"])
def test_ancestral_mean_is_eqs_6_7_at_the_unclipped_x0(mean_type, clip):
    """The seed's sampler (pytorch-ddpm) takes the posterior mean at the model's x_0 as it is;
    --clip_denoised clips x_0 to [-1, 1] first. Closed form in float64 numpy."""
    d = GaussianDiffusion(B1, BT, T, mean_type)
    t = torch.tensor([1, 40, 99])
    x_t = torch.linspace(-3, 3, 3 * 3 * 4 * 4).view(3, 3, 4, 4)
    out = Wild()(x_t, t).double().numpy()
    xt, tn = x_t.double().numpy(), t.numpy()
    _, ab = schedule()
    if mean_type == "epsilon":
        x0 = np.sqrt(1 / ab[tn])[:, None, None, None] * xt - np.sqrt(1 / ab[tn] - 1)[:, None, None, None] * out
    else:
        x0 = out
    assert np.abs(x0).max() > 2, "the case must exercise an x_0 outside [-1, 1]"
    c1, c2 = (c[:, None, None, None] for c in posterior_coefs(tn))
    expected = out if mean_type == "xprev" else c1 * (np.clip(x0, -1, 1) if clip else x0) + c2 * xt
    mean, _ = d.p_mean_variance(Wild(), x_t, t, clip_denoised=clip)
    np.testing.assert_allclose(mean.double().numpy(), expected, rtol=1e-4, atol=1e-5)


def test_clipping_changes_the_mean_where_x0_leaves_the_range():
    d = GaussianDiffusion(B1, BT, T)
    x_t, t = torch.full((1, 3, 4, 4), 2.5), torch.tensor([1])
    faithful, _ = d.p_mean_variance(Wild(), x_t, t)
    clipped, _ = d.p_mean_variance(Wild(), x_t, t, clip_denoised=True)
    assert (faithful - clipped).abs().min() > 0.1


@pytest.mark.parametrize("mean_type", ["epsilon", "xstart"])
def test_samplers_recover_a_point_mass(mean_type):
    x0 = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    oracle = Oracle(x0, mean_type)
    d = GaussianDiffusion(B1, BT, T, mean_type)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ancestral = AncestralSampler(d)(oracle, x_T, torch.Generator().manual_seed(2))
    assert torch.allclose(ancestral, x0.expand_as(ancestral), atol=1e-4)
    for steps, eta in [(10, 0.0), (37, 1.0), (T, 0.0)]:
        ddim = DDIMSampler(d, steps, eta)(oracle, x_T, torch.Generator().manual_seed(2))
        assert torch.allclose(ddim, x0.expand_as(ddim), atol=1e-4)


def test_the_generator_alone_fixes_the_ancestral_noise():
    d = GaussianDiffusion(B1, BT, T)
    x_T = torch.randn(2, 3, 4, 4)
    a = AncestralSampler(d)(Wild(), x_T, torch.Generator().manual_seed(5))
    torch.manual_seed(123)  # the global generator plays no part
    b = AncestralSampler(d)(Wild(), x_T, torch.Generator().manual_seed(5))
    c = AncestralSampler(d)(Wild(), x_T, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ddim_is_deterministic_with_eta_zero_and_visits_its_steps():
    visited = []

    class Recorder(torch.nn.Module):
        def forward(self, x, t):
            visited.append(int(t[0]))
            return torch.zeros_like(x)

    s = DDIMSampler(GaussianDiffusion(B1, BT, T), sample_steps=5)
    a = s(Recorder(), torch.ones(1, 3, 8, 8))
    assert visited == [99, 74, 50, 25, 0] and s.network_calls == 5
    b = s(Recorder(), torch.ones(1, 3, 8, 8))
    assert torch.equal(a, b)


def test_ddim_refuses_bad_settings():
    with pytest.raises(ValueError):
        DDIMSampler(GaussianDiffusion(B1, BT, T), sample_steps=0)
    with pytest.raises(ValueError):
        DDIMSampler(GaussianDiffusion(B1, BT, T), sample_steps=T + 1)
    with pytest.raises(ValueError):
        DDIMSampler(GaussianDiffusion(B1, BT, T, mean_type="xprev"), sample_steps=10)


def test_ddim_eta_one_over_all_steps_has_the_ancestral_posterior_variance():
    d = GaussianDiffusion(B1, BT, T)
    s = DDIMSampler(d, sample_steps=T, eta=1.0)
    assert s.timesteps == list(range(T))
    a = d.alphas_bar
    sigma2 = s.sigma(a[1:], a[:-1]) ** 2
    assert torch.allclose(sigma2, d.posterior_var[1:], rtol=1e-10)
    betas, ab = schedule()
    assert np.allclose(sigma2.numpy(), betas[1:] * (1 - ab[:-1]) / (1 - ab[1:]), rtol=1e-10)


def numpy_ddim(x_T, steps):
    """DDIM, eta 0, unclipped, for ``Wild`` in float64 numpy: an oracle written from eq. 12."""
    _, ab = schedule()
    seq = np.round(np.linspace(0, T - 1, steps)).astype(int)
    x = x_T.astype(np.float64)
    for i in reversed(range(steps)):
        t = seq[i]
        eps = 3 * np.tanh(x) + t / T
        x0 = (x - np.sqrt(1 - ab[t]) * eps) / np.sqrt(ab[t])
        a_prev = ab[seq[i - 1]] if i > 0 else 1.0
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    return x


def test_full_ddim_loop_pinned():
    """A whole deterministic loop (DDIM, eta 0, 10 steps) of a fixed model from fixed x_T, as the
    diffusers scheduler tests do: the sum of the final sample, pinned and against a numpy oracle."""
    x_T = torch.linspace(-2, 2, 48).view(1, 3, 4, 4)
    sampler = make_sampler(GaussianDiffusion(B1, BT, T), SamplerConfig("ddim", 10, 0.0))
    *_, x_0 = sampler.steps(Wild(), x_T)
    expected = numpy_ddim(x_T.numpy(), 10)
    np.testing.assert_allclose(x_0.double().numpy(), expected, rtol=1e-4, atol=1e-4)
    assert float(x_0.sum()) == pytest.approx(-7.3209, abs=1e-4)
    assert float(sampler(Wild(), x_T).sum()) == pytest.approx(float(x_0.clamp(-1, 1).sum()), abs=1e-6)


def test_make_sampler_network_calls():
    d = GaussianDiffusion(B1, BT, T)
    assert make_sampler(d, SamplerConfig("ddpm")).network_calls == T
    assert make_sampler(d, SamplerConfig("ddim", 20)).network_calls == 20
    with pytest.raises(ValueError):
        make_sampler(d, SamplerConfig("nonsense"))
