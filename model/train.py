"""Stage 1: train the activation-quantized UNet DDPM (``train``; ``ANN_train.py`` is its command line).

Writes ``ckpt.pt`` (atomically, every ``save_step``), ``sample/`` grids and tensorboard events
into ``logdir`` and resumes from ``ckpt.pt`` when it is already there: the model, its data and
the training settings come from the checkpoint, the fields named in ``given`` override the stored
training settings (a changed one is said once) and must agree with the stored model. ``init``
starts a new run from a higher-precision checkpoint (32 -> 4 -> 3 -> 2 bit, as in Fast-SNN).
"""
import copy
import json
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tensorboardX import SummaryWriter

from common import configs, runtime
from common.atomic import atomic_open, remove_stale_temporaries
from common.errors import UserError
from common.lock import folder_lock
from common.progress import progress
from diffusion import sample_noise
from model import checkpoint, data
from model.build import build_unet, load_init
from model.ema import update_ema
from model.images import save_grid
from quant import QuantReLU
from schedulers import build_sampler

RESUME_KEYS = ("net_model", "ema_model", "optim", "sched", "step", "x_T")  # what a run continues from


def warmup_lr(warmup):
    return lambda step: min(step, warmup) / warmup if warmup > 0 else 1.0


@dataclass
class TrainLoop:
    """What the training loop shares: settings, models, optimisation state and outputs."""
    cfg: configs.TrainConfig
    model_cfg: configs.ModelConfig
    run_cfg: configs.TrainRunConfig
    runtime_cfg: configs.RuntimeConfig
    rt: runtime.Runtime
    logdir: str
    net_model: torch.nn.Module
    ema_model: torch.nn.Module
    optim: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    x_T: torch.Tensor
    sampler_cfg: configs.SamplerConfig
    num_workers: int = 0
    step: int = 0
    log: Callable = print

    @property
    def ckpt_path(self):
        return os.path.join(self.logdir, "ckpt.pt")

    @classmethod
    def create(cls, cfg, model_cfg, rt, logdir, *, run_cfg, runtime_cfg, sampler_cfg, num_workers=0, log=print):
        """A fresh run: models (``run_cfg.init`` applied), Adam with warm-up, the sample grids' noise
        [sample_size, C, H, W] and sampler."""
        net_model = build_unet(model_cfg, runtime_cfg.kernels).to(rt.device)
        if run_cfg.init:
            initialised = load_init(net_model, run_cfg.init)
            if rt.is_main and initialised:
                log(f"--init {run_cfg.init}: {len(initialised)} quantizer thresholds start at their initial value")
        optim = torch.optim.Adam(net_model.parameters(), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda=warmup_lr(cfg.warmup))
        x_T, _ = sample_noise(run_cfg.sample_size, model_cfg.image_shape, cfg.seed)
        sampler_cfg = configs.sampler_config(sampler_cfg, model_cfg.diffusion.T)
        build_sampler(model_cfg, sampler_cfg)  # a sampler the model cannot use fails here, before training
        return cls(cfg, model_cfg, run_cfg, runtime_cfg, rt, logdir, net_model, copy.deepcopy(net_model), optim,
                   sched, x_T, sampler_cfg, num_workers=num_workers, log=log)

    def restore(self, ckpt):
        """Continue from ``ckpt``: weights, Adam, schedule, step and sample noise; the learning rate
        and warm-up of ``self.cfg`` apply from here on."""
        checkpoint.load_weights(self.net_model, ckpt["net_model"], self.ckpt_path)
        checkpoint.load_weights(self.ema_model, ckpt["ema_model"], self.ckpt_path)
        try:
            self.optim.load_state_dict(ckpt["optim"])
            self.sched.load_state_dict(ckpt["sched"])
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"{self.ckpt_path}: its optimiser state does not fit this model ({type(err).__name__}: "
                            f"{err})") from None
        self.sched.base_lrs = [self.cfg.lr] * len(self.optim.param_groups)
        for group in self.optim.param_groups:
            group["initial_lr"] = self.cfg.lr
            group["lr"] = self.cfg.lr * warmup_lr(self.cfg.warmup)(self.sched.last_epoch)
        self.step, self.x_T = ckpt["step"], ckpt["x_T"]

    def save(self):
        checkpoint.save_atomic({
            "net_model": self.net_model.state_dict(), "ema_model": self.ema_model.state_dict(),
            "optim": self.optim.state_dict(), "sched": self.sched.state_dict(), "step": self.step,
            "x_T": self.x_T.cpu(), "config": {**self.model_cfg.to_dict(), "train": configs.to_dict(self.cfg)},
        }, self.ckpt_path)

    def train_step(self, model, diffusion, batch):
        """One optimisation step on this rank's batch [B, C, H, W]; every random draw of step
        ``self.step`` (flips, t, noise, dropout) is seeded by (seed, step, rank) alone."""
        seed = runtime.derived_seed(self.cfg.seed, self.step, self.rt.rank)
        torch.manual_seed(seed)  # dropout draws from the global generator
        generator = runtime.generator(seed, self.rt.device)
        self.net_model.train()
        self.optim.zero_grad(set_to_none=True)
        loss = diffusion.training_losses(model, data.random_flip(batch, generator), generator,
                                         self.cfg.snr_gamma).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net_model.parameters(), self.cfg.grad_clip)
        self.optim.step()
        self.sched.step()
        self.step += 1
        return loss.detach()

    def check_finite(self, loss, check_weights):
        """Stop before a NaN or inf reaches a checkpoint (the weights too when ``check_weights``)."""
        bad = None if torch.isfinite(loss) else f"the loss became {loss.item()}"
        if bad is None and check_weights and not all(torch.isfinite(p).all() for p in self.net_model.parameters()):
            bad = "the weights became non-finite"
        if bad:
            kept = (f"the last good checkpoint {self.ckpt_path} is kept" if os.path.exists(self.ckpt_path)
                    else "no checkpoint was written")
            raise UserError(f"{bad} at step {self.step}; training stopped and {kept} (try a lower --lr or "
                            "--grad_clip)")

    def report(self, loss, writer, pbar):
        """Scalars every ``log_step``, a sample grid every ``sample_step`` (rank 0)."""
        if self.step % self.run_cfg.log_step == 0:
            loss = loss.item()
            writer.add_scalar("loss", loss, self.step)
            writer.add_scalar("lr", self.sched.get_last_lr()[0], self.step)
            for name, module in self.net_model.named_modules():
                if isinstance(module, QuantReLU) and hasattr(module, "act_alpha"):
                    writer.add_scalar(f"act_alpha/{name}", module.act_alpha.item(), self.step)
            pbar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if self.run_cfg.sample_step > 0 and self.step % self.run_cfg.sample_step == 0:
            self.sample_grid(os.path.join(self.logdir, "sample", f"{self.step}.png"))

    @torch.no_grad()
    def sample_grid(self, path):
        """A grid of the EMA model from the stored noise; the sampler's noise is seeded the same way
        every time, so the grids of a run show its progress on the same draws."""
        self.ema_model.eval()
        model = runtime.data_parallel(self.ema_model, self.runtime_cfg.parallel and not self.rt.distributed)
        _, sampler = build_sampler(self.model_cfg, self.sampler_cfg, self.rt.device)
        _, generator = sample_noise(len(self.x_T), self.model_cfg.image_shape, self.cfg.seed, self.rt.device)
        save_grid(sampler(model, self.x_T.to(self.rt.device), generator), path)

    def run(self, dataset):
        """Train from ``self.step`` to ``total_steps``, saving every ``save_step``."""
        model = runtime.wrap_model(self.net_model, self.rt, self.runtime_cfg.parallel)
        diffusion, _ = build_sampler(self.model_cfg, configs.SamplerConfig(), self.rt.device)
        batches = data.training_batches(dataset, self.cfg.batch_size, self.rt, self.num_workers, self.cfg.seed,
                                        start_step=self.step)
        writer = SummaryWriter(self.logdir, purge_step=self.step or None) if self.rt.is_main else None
        start, first = time.time(), self.step
        with progress(total=self.cfg.total_steps, initial=self.step, desc="train", disable=not self.rt.is_main) as pbar:
            while self.step < self.cfg.total_steps:
                loss = self.train_step(model, diffusion, next(batches))
                save_now = self.step % self.run_cfg.save_step == 0 or self.step == self.cfg.total_steps
                self.check_finite(loss, check_weights=save_now)
                update_ema(self.ema_model, self.net_model, self.cfg.ema_decay)
                pbar.update(1)
                if self.rt.is_main:
                    self.report(loss, writer, pbar)
                    if save_now:
                        self.save()
                if save_now:
                    runtime.barrier(self.rt)  # no rank reads a checkpoint rank 0 is still writing
        if writer is not None:
            writer.close()
            wall = time.time() - start
            self.log(json.dumps({"step": self.step, "ckpt": self.ckpt_path, "wall_s": round(wall, 1),
                                 "steps_per_s": round((self.step - first) / wall, 2)}))


def train_config(ckpt, wanted, given, source, log=print):
    """The ``TrainConfig`` of a run: ``wanted`` for a new one, else the checkpoint's with the fields
    named in ``given`` taken from ``wanted``; a changed value is said once."""
    stored = configs.from_dict(configs.TrainConfig, ckpt["config"].get("train", {})) if ckpt else None
    cfg = configs.resolve(stored, wanted, given, source, fixed=())
    for name, new, old in configs.changes(stored, cfg, skip=("total_steps",)):
        log(f"note: resuming with --{name}={new} (the checkpoint had {old})")
    return cfg


def load_resumable(path, init=None):
    """The training checkpoint to resume from, or None for a new run (``init``: the run must be new)."""
    if not os.path.exists(path):
        return None
    ckpt = checkpoint.load_checkpoint(path)
    if checkpoint.is_snn(ckpt):
        raise UserError(f"{path} is an SNN checkpoint, not a training checkpoint: give another --logdir")
    checkpoint.require(ckpt, path, RESUME_KEYS, "resuming training")
    if not isinstance(ckpt["step"], int) or not torch.is_tensor(ckpt["x_T"]):
        raise UserError(f"{path} is damaged: its 'step' or 'x_T' entry has the wrong type")
    if init:
        raise UserError(f"--init={init} starts a new run, but {path} already exists: resume without --init, "
                        "or give another --logdir")
    return ckpt


def prepare_logdir(logdir, rt, flags_text=None):
    """The output folders, free of temporaries an interrupted run left, and ``flagfile.txt`` (the
    command line's flags, when ``flags_text`` is given)."""
    if rt.is_main:
        for folder in (logdir, os.path.join(logdir, "sample")):
            os.makedirs(folder, exist_ok=True)
            remove_stale_temporaries(folder)
        if flags_text is not None:
            with atomic_open(os.path.join(logdir, "flagfile.txt"), "w") as f:
                f.write(flags_text)
    runtime.barrier(rt)


def train(model_cfg, train_cfg, run_cfg, *, logdir, given=frozenset(), sampler_cfg=configs.SamplerConfig(),
          loader_cfg=configs.LoaderConfig(), runtime_cfg=configs.RuntimeConfig(), flags_text=None, log=print):
    """Stage 1 in ``logdir`` under its folder lock: a new run, or the one its ``ckpt.pt`` continues.

    ``model_cfg`` (its ``unet.img_channels`` may be None: the dataset's), ``train_cfg`` and
    ``sampler_cfg`` are the settings wanted; on resume the checkpoint's model and training settings
    hold except for the names in ``given`` (a given model setting must agree with the stored one;
    give ``total_steps`` to train on). ``runtime_cfg``: ``parallel`` and the ``kernels`` to build
    with (its ``logdir`` is not read). ``log``: where the run's lines go (rank 0's).
    """
    with folder_lock(logdir, enabled=runtime.launch_rank() == 0, log=log):
        _train(model_cfg, train_cfg, run_cfg, logdir, set(given), sampler_cfg, loader_cfg, runtime_cfg,
               flags_text, log)


def _train(model_cfg, train_cfg, run_cfg, logdir, given, sampler_cfg, loader_cfg, runtime_cfg, flags_text, log):
    ckpt_path = os.path.join(logdir, "ckpt.pt")
    ckpt = load_resumable(ckpt_path, run_cfg.init)
    model_cfg = configs.model_config(model_cfg, given, checkpoint.model_config(ckpt) if ckpt else None, ckpt_path)
    cfg = train_config(ckpt, train_cfg, given, ckpt_path, log)
    if ckpt and ckpt["step"] >= cfg.total_steps:
        log(f"{ckpt_path} is already at step {ckpt['step']} >= --total_steps={cfg.total_steps}; nothing to do")
        return
    rt = runtime.setup(cfg.seed)
    dataset = data.load_dataset(model_cfg.data.dataset, loader_cfg.data_dir, model_cfg.data.img_size,
                                channels=model_cfg.unet.img_channels)
    loop = TrainLoop.create(cfg, model_cfg, rt, logdir, run_cfg=run_cfg, runtime_cfg=runtime_cfg,
                            sampler_cfg=sampler_cfg, num_workers=loader_cfg.num_workers, log=log)
    if ckpt:
        loop.restore(ckpt)
        if rt.is_main:
            log(f"resuming from {ckpt_path} at step {loop.step}")
    prepare_logdir(logdir, rt, flags_text)
    loop.run(dataset)
    runtime.teardown(rt)
