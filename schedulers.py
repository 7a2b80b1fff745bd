"""Fast samplers from Hugging Face diffusers' schedulers, driven with our model and our diffusion.

``SchedulerSampler`` follows the sampler protocol of ``diffusion.py`` (``name``,
``network_calls``, ``steps``, ``__call__``) for any diffusers scheduler class. Each sampling run
builds a fresh scheduler (schedulers are stateful) and follows diffusers' own loop:

1. ``scheduler = Class(**config)``, with the config below (keyword arguments only: nothing is
   downloaded, no ``from_pretrained``);
2. ``scheduler.set_timesteps(sample_steps)``;
3. ``x = x_T * scheduler.init_noise_sigma``;
4. for each ``t`` in ``scheduler.timesteps``: ``out = model(scheduler.scale_model_input(x, t), t')``
   with ``t'`` the integer nearest to ``t`` (ties to even; sigma-based schedulers such as Euler
   with "linspace" spacing visit fractional steps, our UNet embeds integer steps), then
   ``x = scheduler.step(out, t, x, ...).prev_sample``, the step given ``generator=`` (and
   ``eta=``) where it takes one: every random draw comes from the explicit generator.

The config, so that the scheduler is the same process as our ``GaussianDiffusion``:

* ``trained_betas = diffusion.betas`` (float64 numpy) and ``num_train_timesteps = T``: the
  identical beta schedule, not just another "linear" one (diffusers holds it in float32);
* ``prediction_type``: "epsilon" for ``mean_type=epsilon``, "sample" for ``xstart``; a model
  that predicts ``xprev`` is refused (no scheduler takes it);
* ``clip_sample=False`` and ``thresholding=False`` (where the class has them; DDIM and DDPM
  default to clipping): ``clip_denoised`` is honoured in one way for every scheduler, by the
  model wrapper of ``denoiser``: x_0 predicted, clamped to [-1, 1] and turned back into the
  model's output type, as ``DDIMSampler.eps_and_xstart`` does. Off (the default, as
  pytorch-ddpm), only the final image is clipped;
* ``timestep_spacing="linspace"`` (Lin et al., 2024, arXiv:2305.08891, Table 2): the steps of
  ``round(linspace(0, T - 1, n))`` (DDPM, Euler, Heun: fractional for Euler/Heun) or, for the
  multistep solvers, the first ``n`` of ``round(linspace(0, T - 1, n + 1))`` descending, the
  last step going to sigma = 0. Except for the classes in ``UNIFORM_STRIDE`` (DDIM, PNDM):
  their ``step`` takes ``t - T // n`` as the previous step, which only holds for "leading"
  spacing (diffusers issues #11347, #12633), so they get "leading": steps ``k * (T // n)``,
  k = n-1 .. 0, the "uniform" skip of the DDIM paper's code (Song et al., 2021);
* ``steps_offset=0`` and ``set_alpha_to_one=True``: the last DDIM step goes to alpha_bar = 1.

Named choices (``NAMED``): ``dpm_solver++`` = DPMSolverMultistepScheduler(algorithm_type=
"dpmsolver++", solver_order=2): DPM-Solver++(2M), Lu et al., 2022 (arXiv:2211.01095),
Algorithm 2, the last step first order to sigma = 0; ``unipc`` = UniPCMultistepScheduler
(Zhao et al., 2023, arXiv:2302.04867; diffusers' defaults: order 2, bh2, data prediction);
``euler`` = EulerDiscreteScheduler (Karras et al., 2022, arXiv:2206.00364, Algorithm 2 without
churn: deterministic). Any other class as ``diffusers:<ClassName>``, e.g.
``diffusers:DDIMScheduler`` (Song et al., 2021, eqs. 12 and 16; ``eta`` goes to its step) or
``diffusers:HeunDiscreteScheduler`` (Karras et al. Algorithm 1: two network calls per step
but the last, ``network_calls = 2 n - 1``).

Samplers yield the scheduler's own samples: x_t for the DDPM/DDIM/multistep schedulers,
x_t / sqrt(alpha_bar_t) for the sigma-based ones (Euler, Heun, ...); the last is x_0.
"""
import inspect

import torch

from common.errors import UserError
from diffusion import AncestralSampler, DDIMSampler, GaussianDiffusion, final_image

PREFIX = "diffusers:"
NAMED = {
    "dpm_solver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
}
# classes whose step() assumes the previous step is t - T // n: "leading" spacing only
UNIFORM_STRIDE = frozenset({"DDIMScheduler", "DDIMParallelScheduler", "PNDMScheduler",
                            "CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"})
PREDICTION_TYPES = {"epsilon": "epsilon", "xstart": "sample"}
HOW_TO_NAME = (f"the samplers are ddpm, ddim (ours), {', '.join(NAMED)} and {PREFIX}<ClassName> for a diffusers "
               f"scheduler class, e.g. {PREFIX}DDIMScheduler or {PREFIX}HeunDiscreteScheduler")


def scheduler_class(name):
    """The diffusers scheduler class of a sampler name (``NAMED`` or ``diffusers:<ClassName>``).

    Imports diffusers. Raises ValueError for any other name, or a class diffusers lacks.
    """
    if name in NAMED:
        class_name = NAMED[name][0]
    elif name.startswith(PREFIX) and name[len(PREFIX):].isidentifier():
        class_name = name[len(PREFIX):]
    else:
        raise ValueError(f"unknown sampler {name!r}: {HOW_TO_NAME}")
    import diffusers.schedulers
    from diffusers import SchedulerMixin
    cls = getattr(diffusers.schedulers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"diffusers {diffusers.__version__} has no scheduler class {class_name!r}: {HOW_TO_NAME}")
    return cls


def accepts(function, name):
    """Whether ``function`` takes a keyword argument ``name``."""
    return name in inspect.signature(function).parameters


def scheduler_config(cls, diffusion, timestep_spacing=None, **extra):
    """Keyword arguments of ``cls`` for the schedule of ``diffusion`` (the module docstring).

    Only those ``cls.__init__`` takes; ``trained_betas`` and ``prediction_type`` are required.
    """
    if diffusion.mean_type not in PREDICTION_TYPES:
        raise ValueError(f"the diffusers schedulers need a model that predicts epsilon or x_0 (mean_type "
                         f"epsilon or xstart), not {diffusion.mean_type}")
    if timestep_spacing is None:
        timestep_spacing = "leading" if cls.__name__ in UNIFORM_STRIDE else "linspace"
    wanted = {"num_train_timesteps": diffusion.T, "trained_betas": diffusion.betas.detach().cpu().numpy(),
              "prediction_type": PREDICTION_TYPES[diffusion.mean_type], "clip_sample": False,
              "thresholding": False, "timestep_spacing": timestep_spacing, "steps_offset": 0,
              "set_alpha_to_one": True, **extra}
    params = inspect.signature(cls.__init__).parameters
    for needed in ("trained_betas", "prediction_type"):
        if needed not in params:
            raise ValueError(f"{PREFIX}{cls.__name__} takes no {needed}: it cannot run this model's diffusion")
    return {key: value for key, value in wanted.items() if key in params}


class SchedulerSampler:
    """A diffusers scheduler as a sampler over ``diffusion`` (the module docstring has the details).

    ``sampler``: a name of ``NAMED`` or ``diffusers:<ClassName>``; ``sample_steps``: the
    scheduler's inference steps (1 .. T); ``eta``: for schedulers whose step takes one (DDIM),
    else it must be 0; ``timestep_spacing``: None for the choice of the module docstring.
    Raises ValueError for a setting it cannot run.
    """

    def __init__(self, diffusion, sampler, sample_steps, eta=0.0, clip_denoised=False, timestep_spacing=None):
        if not 1 <= sample_steps <= diffusion.T:
            raise ValueError(f"sample_steps must be in 1..{diffusion.T}, got {sample_steps}")
        self.diffusion, self.name = diffusion, sampler
        self.sample_steps, self.eta, self.clip_denoised = int(sample_steps), float(eta), bool(clip_denoised)
        self.cls = scheduler_class(sampler)
        self.config = scheduler_config(self.cls, diffusion, timestep_spacing, **NAMED.get(sampler, (None, {}))[1])
        if self.eta != 0 and not accepts(self.cls.step, "eta"):
            raise ValueError(f"eta={self.eta:g} needs a scheduler whose step takes eta (DDIM); "
                             f"{sampler} has none: give eta 0")
        self.probe()

    def probe(self):
        """One step of a throwaway scheduler on a tiny sample, so that a class that refuses this
        config or model type (e.g. Euler ancestral with "sample") fails here, not while sampling."""
        scheduler, x = self.make_scheduler(), torch.zeros(1, 3, 2, 2)
        steps = scheduler.timesteps.tolist()
        if hasattr(scheduler, "model_outputs") and len(set(steps)) < len(steps):
            # round(linspace(0, T - 1, n + 1)) repeats a step for n = T: a multistep update divides by 0
            raise ValueError(f"{self.name} with sample_steps={self.sample_steps} repeats a diffusion step; "
                             f"give at most {self.diffusion.T - 1}")
        t = scheduler.timesteps[0]
        try:
            scheduler.step(x, t, scheduler.scale_model_input(x, t), **self.step_kwargs(torch.Generator()))
        except (NotImplementedError, TypeError, ValueError) as err:
            raise ValueError(f"{self.name} cannot sample this model ({self.config['prediction_type']} "
                             f"prediction): {err}") from None

    def make_scheduler(self, device=None):
        """A fresh scheduler with its timesteps set (on ``device`` where it takes one)."""
        try:
            scheduler = self.cls(**self.config)
        except ImportError as err:  # a diffusers dummy class: an optional package is missing
            raise ValueError(f"{self.name} needs a package that is not installed: {err}") from None
        if device is not None and accepts(scheduler.set_timesteps, "device"):
            scheduler.set_timesteps(self.sample_steps, device=device)
        else:
            scheduler.set_timesteps(self.sample_steps)
        return scheduler

    @property
    def network_calls(self):
        """Model calls of one run: one per entry of ``scheduler.timesteps`` (2 n - 1 for Heun)."""
        return len(self.make_scheduler().timesteps)

    def model_times(self, timesteps):
        """The integer diffusion step nearest to each of the scheduler's ``timesteps`` (a list of
        ints, read from the device once, before the sampling loop: no host synchronisation in it)."""
        rounded = torch.round(timesteps.detach().to("cpu", torch.float64)).long().clamp(0, self.diffusion.T - 1)
        return rounded.tolist()

    def denoiser(self, model):
        """``model`` as the scheduler sees it: (x_t [B, C, H, W], t [B]) -> [B, C, H, W] of the
        model's type, through x_0 clamped to [-1, 1] when ``clip_denoised``."""
        if not self.clip_denoised:
            return model
        d = self.diffusion

        def clipped(x_t, t):
            out = model(x_t, t)
            if d.mean_type == "xstart":
                return out.clamp(-1, 1)
            x_0 = d.predict_xstart_from_eps(x_t, t, out).clamp(-1, 1)
            return d.predict_eps_from_xstart(x_t, t, x_0)

        return clipped

    def step_kwargs(self, generator):
        """The keyword arguments of ``step``: the generator and eta where it takes them."""
        kwargs = {"generator": generator} if accepts(self.cls.step, "generator") else {}
        if accepts(self.cls.step, "eta"):
            kwargs["eta"] = self.eta
        return kwargs

    def steps(self, model, x_T, generator=None):
        """Yields the sample after each scheduler step (``network_calls`` of them) from x_T
        [B, C, H, W]; the last one is x_0, unclipped. Noise comes from ``generator`` alone."""
        scheduler = self.make_scheduler(x_T.device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)  # the step index counts from 0: no lookup of t on the device
        denoise, kwargs = self.denoiser(model), self.step_kwargs(generator)
        x = x_T * scheduler.init_noise_sigma
        for t, step in zip(scheduler.timesteps, self.model_times(scheduler.timesteps)):
            out = denoise(scheduler.scale_model_input(x, t), x.new_full((x.shape[0],), step, dtype=torch.long))
            x = scheduler.step(out, t, x, **kwargs).prev_sample
            yield x

    def __call__(self, model, x_T, generator=None):
        """x_0 [B, C, H, W] in [-1, 1] from x_T: the last step's output, clipped."""
        return final_image(self.steps(model, x_T, generator))


def make_sampler(diffusion, cfg):
    """The sampler of a ``common.configs.SamplerConfig`` over ``diffusion``: ``ddpm`` and ``ddim``
    are diffusion.py's, every other name a diffusers scheduler (``SchedulerSampler``; diffusers is
    imported only then). Raises ValueError for a sampler or setting that cannot run."""
    if cfg.sampler == "ddpm":
        return AncestralSampler(diffusion, cfg.clip_denoised)
    if cfg.sampler == "ddim":
        return DDIMSampler(diffusion, cfg.sample_steps, cfg.eta, cfg.clip_denoised)
    return SchedulerSampler(diffusion, cfg.sampler, cfg.sample_steps, cfg.eta, cfg.clip_denoised)


def build_sampler(cfg, sampler_cfg, device="cpu"):
    """(diffusion, sampler) for a ``ModelConfig`` and a ``SamplerConfig``, the diffusion on ``device``."""
    diffusion = GaussianDiffusion.from_config(cfg.diffusion).to(device)
    try:
        return diffusion, make_sampler(diffusion, sampler_cfg)
    except ValueError as err:
        raise UserError(str(err)) from None
