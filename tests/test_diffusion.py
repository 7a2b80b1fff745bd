"""Diffusion schedule, posterior and samplers against closed forms and oracle models."""
import numpy as np
import pytest
import torch

from diffusion import DDIMSampler, GaussianDiffusionSampler, GaussianDiffusionTrainer, extract

T, B1, BT = 100, 1e-4, 0.02


def schedule():
    betas = np.linspace(B1, BT, T, dtype=np.float64)
    return betas, np.cumprod(1 - betas)


class Oracle(torch.nn.Module):
    """Predicts the exact noise (or x_0, or posterior mean) for data that is a single image x0."""

    def __init__(self, x0, mean_type):
        super().__init__()
        self.x0, self.mean_type = x0, mean_type
        _, ab = schedule()
        self.ab = torch.tensor(ab)

    def forward(self, x_t, t):
        ab = self.ab[t].float().view(-1, 1, 1, 1)
        x0 = self.x0.expand_as(x_t)
        if self.mean_type == "epsilon":
            return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        if self.mean_type == "xstart":
            return x0
        betas, abn = schedule()
        t_ = t.numpy()
        ab_prev = np.where(t_ > 0, abn[np.maximum(t_ - 1, 0)], 1.0)
        c1 = torch.tensor(np.sqrt(ab_prev) * betas[t_] / (1 - abn[t_])).float().view(-1, 1, 1, 1)
        c2 = torch.tensor(np.sqrt(1 - betas[t_]) * (1 - ab_prev) / (1 - abn[t_])).float().view(-1, 1, 1, 1)
        return c1 * x0 + c2 * x_t


def test_extract_broadcasts():
    v = torch.arange(10).double()
    out = extract(v, torch.tensor([2, 7]), (2, 3, 4, 4))
    assert out.shape == (2, 1, 1, 1) and out.dtype == torch.float32
    assert out.flatten().tolist() == [2.0, 7.0]


def test_q_sample_closed_form():
    trainer = GaussianDiffusionTrainer(None, B1, BT, T)
    _, ab = schedule()
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 50, 99])
    expected = (torch.tensor(np.sqrt(ab[t.numpy()])).float().view(-1, 1, 1, 1) * x0
                + torch.tensor(np.sqrt(1 - ab[t.numpy()])).float().view(-1, 1, 1, 1) * noise)
    assert torch.allclose(trainer.q_sample(x0, t, noise), expected, atol=1e-6)


def test_trainer_loss_is_zero_for_the_oracle():
    x0 = torch.rand(1, 3, 8, 8) * 2 - 1
    trainer = GaussianDiffusionTrainer(Oracle(x0, "epsilon"), B1, BT, T)
    loss = trainer(x0.expand(8, -1, -1, -1))
    assert loss.shape == (8, 3, 8, 8) and loss.max() < 1e-8


def test_variances_pinned():
    betas, ab = schedule()
    s = GaussianDiffusionSampler(None, B1, BT, T, 8, "epsilon", "fixedlarge")
    t = torch.tensor([0, 1, 50])
    post = betas * (1 - np.concatenate([[1.0], ab[:-1]])) / (1 - ab)
    large = s.model_log_var(t, (3, 1, 1, 1)).flatten().double()
    assert torch.allclose(large, torch.tensor(np.log([post[1], betas[1], betas[50]])), rtol=1e-6)
    s.var_type = "fixedsmall"
    small = s.model_log_var(t, (3, 1, 1, 1)).flatten().double()
    assert torch.allclose(small, torch.tensor(np.log([post[1], post[1], post[50]])), rtol=1e-6)


@pytest.mark.parametrize("mean_type", ["epsilon", "xstart", "xprev"])
def test_p_mean_is_the_true_posterior_mean_for_an_oracle(mean_type):
    betas, ab = schedule()
    x0 = torch.rand(1, 3, 8, 8) * 2 - 1
    s = GaussianDiffusionSampler(Oracle(x0, mean_type), B1, BT, T, 8, mean_type, "fixedlarge")
    t = torch.tensor([5, 60])
    x_t = torch.randn(2, 3, 8, 8)
    mean, _ = s.p_mean_variance(x_t, t)
    ab_prev = ab[t.numpy() - 1]
    c1 = np.sqrt(ab_prev) * betas[t.numpy()] / (1 - ab[t.numpy()])
    c2 = np.sqrt(1 - betas[t.numpy()]) * (1 - ab_prev) / (1 - ab[t.numpy()])
    expected = torch.tensor(c1).float().view(-1, 1, 1, 1) * x0 + torch.tensor(c2).float().view(-1, 1, 1, 1) * x_t
    assert torch.allclose(mean, expected, atol=1e-4)


@pytest.mark.parametrize("mean_type", ["epsilon", "xstart"])
def test_samplers_recover_a_point_mass(mean_type):
    torch.manual_seed(0)
    x0 = torch.rand(1, 3, 8, 8) * 2 - 1
    oracle = Oracle(x0, mean_type)
    x_T = torch.randn(2, 3, 8, 8)
    ancestral = GaussianDiffusionSampler(oracle, B1, BT, T, 8, mean_type, "fixedlarge")(x_T)
    assert torch.allclose(ancestral, x0.expand_as(ancestral), atol=1e-4)
    for steps, eta in [(10, 0.0), (37, 1.0), (T, 0.0)]:
        ddim = DDIMSampler(oracle, B1, BT, T, 8, mean_type, "fixedlarge", sample_steps=steps, eta=eta)(x_T)
        assert torch.allclose(ddim, x0.expand_as(ddim), atol=1e-4)


def test_ddim_is_deterministic_with_eta_zero_and_visits_its_steps():
    visited = []

    class Recorder(torch.nn.Module):
        def forward(self, x, t):
            visited.append(int(t[0]))
            return torch.zeros_like(x)

    s = DDIMSampler(Recorder(), B1, BT, T, 8, sample_steps=5)
    a = s(torch.ones(1, 3, 8, 8))
    assert visited == [99, 74, 50, 25, 0]
    b = s(torch.ones(1, 3, 8, 8))
    assert torch.equal(a, b)


def test_ddim_refuses_bad_settings():
    with pytest.raises(ValueError):
        DDIMSampler(None, B1, BT, T, sample_steps=0)
    with pytest.raises(ValueError):
        DDIMSampler(None, B1, BT, T, mean_type="xprev")


def test_ddim_eta_one_over_all_steps_has_the_ancestral_posterior_variance():
    s = DDIMSampler(None, B1, BT, T, 8, sample_steps=T, eta=1.0)
    assert s.timesteps.tolist() == list(range(T))
    a = s.alphas_bar
    sigma2 = s.sigma(a[1:], a[:-1]) ** 2
    assert torch.allclose(sigma2, s.posterior_var[1:], rtol=1e-10)
    betas, ab = schedule()
    assert np.allclose(sigma2.numpy(), betas[1:] * (1 - ab[:-1]) / (1 - ab[1:]), rtol=1e-10)
