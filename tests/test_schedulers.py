"""diffusers' schedulers as samplers (schedulers.py): against our DDIM, a numpy DPM-Solver++,
oracle models, pinned numbers, the explicit generator, refusals and the --sampler flag."""
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from absl import flags

from common import flags as cflags
from common.configs import SamplerConfig
from diffusion import DDIMSampler, GaussianDiffusion
from helpers import ROOT, assert_one_line_error
from schedulers import NAMED, SchedulerSampler, make_sampler
from test_diffusion import B1, BT, T, Oracle, Wild, schedule

HEUN = "diffusers:HeunDiscreteScheduler"
PINNED_DPM_SOLVER_PP = -6.1988  # the sum of a 10-step DPM-Solver++(2M) sample, diffusers 0.42.1
X_T = torch.linspace(-2, 2, 48).view(1, 3, 4, 4)


def diffusion(mean_type="epsilon"):
    return GaussianDiffusion(B1, BT, T, mean_type)


def last(sampler, model, x_T, generator=None):
    """The last sample of ``sampler.steps`` (unclipped): [B, C, H, W]."""
    *_, x = sampler.steps(model, x_T, generator)
    return x


class Counter(torch.nn.Module):
    """``model`` with a record of the steps it was called at (each call: an int64 t [B])."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x_t, t):
        assert t.dtype == torch.long and t.shape == (x_t.shape[0],) and 0 <= int(t.min()) <= int(t.max()) < T
        self.seen.append(int(t[0]))
        return self.model(x_t, t)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("steps", [1, 7, 10, T])
def test_diffusers_ddim_is_our_ddim(steps, clip):
    """diffusers' DDIMScheduler through the adapter ("leading" steps k * (T // n), the DDIM
    paper's uniform skip) against our DDIMSampler on the same steps: eta 0, a model whose x_0
    leaves [-1, 1], so that clip_denoised matters."""
    d, x_T = diffusion(), 2 * X_T
    ours = DDIMSampler(d, steps, 0.0, clip)
    ours.timesteps = [k * (T // steps) for k in range(steps)]
    theirs = SchedulerSampler(d, "diffusers:DDIMScheduler", steps, 0.0, clip)
    model = Counter(Wild())
    expected, got = last(ours, Wild(), x_T), last(theirs, model, x_T)
    assert model.seen == ours.timesteps[::-1] and theirs.network_calls == steps
    # diffusers holds alpha_bar in float32: 1 - alpha_bar_0 = 1e-4 has ~1e-4 relative error, which
    # the eps recomputed from a clipped x_0 carries to ~2e-4 at n = 1; otherwise ~2e-6 is seen
    assert (got - expected).abs().max() < (1e-3 if clip else 2e-5), (got - expected).abs().max()
    if clip:  # the case exercises clipping: without it the images are far apart
        assert (last(SchedulerSampler(d, "diffusers:DDIMScheduler", steps), Wild(), x_T) - expected).abs().max() > 0.1


def test_diffusers_ddim_with_linspace_visits_our_ddim_steps():
    """"linspace" spacing visits exactly our DDIM's steps; over all T steps both are the same
    process (with fewer, diffusers' DDIM step goes to t - T // n, not the next visited step)."""
    d = diffusion()
    model = Counter(Wild())
    last(SchedulerSampler(d, "diffusers:DDIMScheduler", 10, timestep_spacing="linspace"), model, X_T)
    assert model.seen == DDIMSampler(d, 10).timesteps[::-1]
    full = SchedulerSampler(d, "diffusers:DDIMScheduler", T, timestep_spacing="linspace")
    assert torch.allclose(last(full, Wild(), X_T), last(DDIMSampler(d, T), Wild(), X_T), atol=1e-4)


def numpy_dpm_solver_pp(x_T, steps, order):
    """DPM-Solver++ (Lu et al., 2022, arXiv:2211.01095) for ``Wild`` in float64 numpy, written from
    the paper: Algorithm 1 (order 1) or the multistep Algorithm 2 (order 2, 2M), over the steps
    round(linspace(0, T - 1, n + 1)) descending without 0, the last step first order to sigma 0."""
    _, ab = schedule()
    ts = np.round(np.linspace(0, T - 1, steps + 1))[::-1][:-1].astype(int)
    alpha, sigma = np.sqrt(ab[ts]), np.sqrt(1 - ab[ts])
    lam = np.log(alpha / sigma)
    x, x0_prev, h_prev = x_T.astype(np.float64), None, None
    for i, t in enumerate(ts):
        x0 = (x - sigma[i] * (3 * np.tanh(x) + t / T)) / alpha[i]
        if i == steps - 1:  # to sigma = 0, alpha = 1: x = x0
            return x0
        h = lam[i + 1] - lam[i]
        D = x0 if order == 1 or x0_prev is None else x0 + (x0 - x0_prev) * h / (2 * h_prev)
        x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * np.expm1(-h) * D
        x0_prev, h_prev = x0, h


@pytest.mark.parametrize("order", [1, 2])
def test_dpm_solver_pp_against_numpy(order):
    sampler = SchedulerSampler(diffusion(), "diffusers:DPMSolverMultistepScheduler", 10)
    sampler.config["solver_order"] = order
    x_0 = last(sampler, Wild(), X_T)
    np.testing.assert_allclose(x_0.double().numpy(), numpy_dpm_solver_pp(X_T.numpy(), 10, order),
                               rtol=1e-4, atol=1e-4)


def test_dpm_solver_pp_loop_pinned():
    """A whole DPM-Solver++(2M) run (10 steps) of a fixed model from fixed x_T, as diffusers'
    scheduler tests do: the sum of the final sample, pinned (the numpy oracle gives it too)."""
    sampler = make_sampler(diffusion(), SamplerConfig("dpm_solver++", 10))
    x_0 = last(sampler, Wild(), X_T)
    assert float(x_0.sum()) == pytest.approx(PINNED_DPM_SOLVER_PP, abs=1e-4)
    assert float(numpy_dpm_solver_pp(X_T.numpy(), 10, 2).sum()) == pytest.approx(PINNED_DPM_SOLVER_PP, abs=1e-4)
    assert float(sampler(Wild(), X_T).sum()) == pytest.approx(float(x_0.clamp(-1, 1).sum()), abs=1e-6)

SAMPLERS = [*NAMED, "diffusers:DDIMScheduler", HEUN, "diffusers:DDPMScheduler",
            "diffusers:EulerAncestralDiscreteScheduler"]


@pytest.mark.parametrize("mean_type", ["epsilon", "xstart"])
@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_recovers_a_point_mass(name, mean_type):
    if name == "diffusers:EulerAncestralDiscreteScheduler" and mean_type == "xstart":
        pytest.skip("its step has no 'sample' prediction (refused: test_refusals)")
    x0 = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    sampler = make_sampler(diffusion(mean_type), SamplerConfig(name, 10, clip_denoised=mean_type == "xstart"))
    model = Counter(Oracle(x0, mean_type))
    out = sampler(model, x_T, torch.Generator().manual_seed(2))
    assert out.shape == x_T.shape and out.abs().max() <= 1
    assert torch.allclose(out, x0.expand_as(out), atol=1e-4)
    assert len(model.seen) == sampler.network_calls == (19 if name == HEUN else 10)
    assert sampler.name == name


def test_fractional_steps_reach_the_model_as_nearest_integers():
    model = Counter(Wild())
    last(make_sampler(diffusion(), SamplerConfig("euler", 7)), model, X_T)
    assert model.seen == [int(v) for v in np.round(np.linspace(0, T - 1, 7, dtype=np.float32))[::-1]]


@pytest.mark.parametrize("mean_type", ["epsilon", "xstart"])
def test_clip_denoised_clamps_the_predicted_x0(mean_type):
    d = diffusion(mean_type)
    sampler = SchedulerSampler(d, "euler", 5, clip_denoised=True)
    x_t, t = 2 * X_T, torch.tensor([3])
    out = sampler.denoiser(Wild())(x_t, t)
    x_0 = out if mean_type == "xstart" else d.predict_xstart_from_eps(x_t, t, out)
    raw = Wild()(x_t, t)
    raw_x0 = raw if mean_type == "xstart" else d.predict_xstart_from_eps(x_t, t, raw)
    assert raw_x0.abs().max() > 2 and torch.allclose(x_0, raw_x0.clamp(-1, 1), atol=1e-4)
    model = Wild()
    assert SchedulerSampler(d, "euler", 5).denoiser(model) is model  # off: the model as it is


@pytest.mark.parametrize("name, eta", [("diffusers:DDPMScheduler", 0.0),
                                       ("diffusers:EulerAncestralDiscreteScheduler", 0.0),
                                       ("diffusers:DDIMScheduler", 1.0)])
def test_the_generator_alone_fixes_the_noise(name, eta):
    sampler = SchedulerSampler(diffusion(), name, 10, eta)
    a = sampler(Wild(), X_T, torch.Generator().manual_seed(5))
    torch.manual_seed(123)  # the global generator plays no part
    b = sampler(Wild(), X_T, torch.Generator().manual_seed(5))
    c = sampler(Wild(), X_T, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-2


def test_refusals():
    with pytest.raises(ValueError, match="epsilon or x_0"):
        make_sampler(diffusion("xprev"), SamplerConfig("dpm_solver++", 10))
    with pytest.raises(ValueError, match="diffusers:<ClassName>"):
        make_sampler(diffusion(), SamplerConfig("diffusers:NoSuchScheduler", 10))
    with pytest.raises(ValueError, match="diffusers:<ClassName>"):
        make_sampler(diffusion(), SamplerConfig("nonsense", 10))
    with pytest.raises(ValueError, match="trained_betas"):
        make_sampler(diffusion(), SamplerConfig("diffusers:ScoreSdeVeScheduler", 10))
    with pytest.raises(ValueError, match="sample prediction"):
        make_sampler(diffusion("xstart"), SamplerConfig("diffusers:EulerAncestralDiscreteScheduler", 10))
    with pytest.raises(ValueError, match="eta"):
        make_sampler(diffusion(), SamplerConfig("euler", 10, eta=0.5))
    for name in ("dpm_solver++", "unipc"):  # n = T repeats a step of round(linspace(0, T - 1, n + 1))
        with pytest.raises(ValueError, match=f"at most {T - 1}"):
            make_sampler(diffusion(), SamplerConfig(name, T))
    for steps in (0, T + 1):
        with pytest.raises(ValueError, match="sample_steps"):
            make_sampler(diffusion(), SamplerConfig("unipc", steps))


def test_the_config_is_our_diffusion():
    sampler = make_sampler(diffusion("xstart"), SamplerConfig("diffusers:DDIMScheduler", 10))
    scheduler = sampler.make_scheduler()
    betas, ab = schedule()
    assert scheduler.config.prediction_type == "sample" and scheduler.config.num_train_timesteps == T
    assert not scheduler.config.clip_sample and not scheduler.config.thresholding
    assert scheduler.config.set_alpha_to_one and scheduler.config.steps_offset == 0
    np.testing.assert_allclose(scheduler.alphas_cumprod.double().numpy(), ab, rtol=1e-6)
    dpm = make_sampler(diffusion(), SamplerConfig("dpm_solver++", 10)).make_scheduler()
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2
    assert dpm.config.timestep_spacing == "linspace"


def test_offline_and_lazy(tmp_path):
    """Importing diffusion and schedulers imports no diffusers; building and running samplers needs no network
    (HF_HUB_OFFLINE=1, sockets refused) and writes nothing into the Hugging Face cache.

    The same process then runs ``python ANN_train.py --sampler=diffusers:NoSuchScheduler`` (the
    script as ``__main__``, as Python runs it): the command line refuses the name in one line,
    offline too."""
    code = textwrap.dedent("""
        import runpy, socket, sys, torch
        def refuse(*args, **kwargs):
            raise OSError("no network in this test")
        socket.socket.connect = refuse
        from common.configs import SamplerConfig
        from diffusion import GaussianDiffusion
        from schedulers import make_sampler
        assert "diffusers" not in sys.modules
        d = GaussianDiffusion(1e-4, 0.02, 100)
        for name in ("dpm_solver++", "unipc", "euler", "diffusers:HeunDiscreteScheduler"):
            make_sampler(d, SamplerConfig(name, 3))(lambda x, t: torch.zeros_like(x), torch.ones(1, 3, 4, 4))
        print("ok", flush=True)
        sys.argv = ["ANN_train.py", "--sampler=diffusers:NoSuchScheduler"]
        runpy.run_path("ANN_train.py", run_name="__main__")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.stdout.strip() == "ok", proc.stderr
    assert proc.returncode == 2, proc.stderr  # the flags' one-line error exit
    assert_one_line_error(proc, "--sampler", "no scheduler class 'NoSuchScheduler'", "diffusers:<ClassName>")
    assert not any((tmp_path / "hf").rglob("*"))


@pytest.mark.parametrize("value, fragment", [("nonsense", "unknown sampler 'nonsense'"),
                                             ("diffusers:NoSuchScheduler", "no scheduler class 'NoSuchScheduler'")])
def test_sampler_flag_refuses_unknown_names(value, fragment, monkeypatch, capsys):
    """The command line's parsing (``common.flags.parse``, what each script's ``run`` parses with)
    of ANN_train.py's flags, in this process: one ``error:`` line and exit 2 (the real command line:
    test_offline_and_lazy)."""
    values = flags.FlagValues()
    cflags.flags_of("ANN_train.py", values)
    monkeypatch.setattr(cflags, "FLAGS", values)
    with pytest.raises(SystemExit) as exit_:
        cflags.parse(["ANN_train.py", f"--sampler={value}"])
    err = capsys.readouterr().err
    assert_one_line_error(SimpleNamespace(returncode=exit_.value.code, stderr=err), "--sampler", fragment,
                          "diffusers:<ClassName>")
    assert exit_.value.code == 2
