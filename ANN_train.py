"""Stage 1: train the activation-quantized UNet DDPM.

    python ANN_train.py --flagfile config/train_ANN/CIFAR10.txt [--flag=value ...]

Writes ``ckpt.pt`` (atomically, every ``save_step``), ``sample/`` grids and tensorboard events
into ``--logdir`` and resumes from ``ckpt.pt`` when it is already there. ``--init PATH`` starts
from a higher-precision checkpoint (32 -> 4 -> 3 -> 2 bit, as in Fast-SNN).
"""
import copy
import json
import os
import time

import torch
from absl import flags
from tensorboardX import SummaryWriter
from tqdm import trange

from common import checkpoint, data, runtime
from common import flags as cflags
from common.ema import update_ema
from common.errors import UserError, run
from common.images import save_grid
from common.models import build_sampler, build_unet
from diffusion import GaussianDiffusionTrainer
from quant import QuantReLU

cflags.define_model_flags()
cflags.define_data_flags()
cflags.define_run_flags()
cflags.define_sampler_flags()
# Training
flags.DEFINE_float("lr", 2e-4, help="target learning rate")
flags.DEFINE_float("grad_clip", 1.0, help="gradient norm clipping")
flags.DEFINE_integer("total_steps", 800000, help="total training steps")
flags.DEFINE_integer("warmup", 5000, help="learning rate warm-up steps")
flags.DEFINE_integer("batch_size", 128, help="global batch size")
flags.DEFINE_float("ema_decay", 0.9999, help="EMA decay rate")
flags.DEFINE_string("init", None, help="start from this (higher-precision) checkpoint")
# Logging and sampling
flags.DEFINE_integer("log_step", 10, help="frequency of tensorboard scalars")
flags.DEFINE_integer("sample_size", 64, help="images in a sample grid")
flags.DEFINE_integer("sample_step", 5000, help="frequency of sample grids (0: never)")
flags.DEFINE_integer("save_step", 5000, help="frequency of checkpoints")
FLAGS = flags.FLAGS


def warmup_lr(warmup):
    return lambda step: min(step, warmup) / warmup if warmup > 0 else 1.0


def load_init(model, path):
    """Load ``path``'s EMA weights into ``model`` for progressive quantization.

    ``act_alpha`` entries the source lacks (a full-precision source) keep their initial value;
    entries it has and the model lacks (a quantized source for a full-precision model) are
    dropped. Anything else that does not match is an error.
    """
    source = checkpoint.load_checkpoint(path)["ema_model"]
    target = model.state_dict()
    missing = [k for k in target if k not in source]
    unexpected = [k for k in source if k not in target]
    bad = [k for k in missing + unexpected if not k.endswith(("act_alpha", "wgt_alpha"))]
    if bad:
        raise UserError(f"--init {path} does not fit this model: e.g. {bad[:3]} (check --ch, --ch_mult, "
                        "--num_res_blocks, --attn)")
    for key in target:
        if key in source and source[key].shape != target[key].shape:
            raise UserError(f"--init {path}: {key} has shape {tuple(source[key].shape)}, "
                            f"the model expects {tuple(target[key].shape)}")
    model.load_state_dict({k: v for k, v in source.items() if k in target}, strict=False)
    return missing


def restore(path, net_model, ema_model, optim, sched):
    """Resume from ``path``: returns (step, x_T)."""
    ckpt = checkpoint.load_checkpoint(path)
    if "net_model" not in ckpt:
        raise UserError(f"{path} is not a training checkpoint (no 'net_model'): is it an SNN checkpoint?")
    cflags.resolve_model_flags(ckpt["flags"], path)
    net_model.load_state_dict(ckpt["net_model"])
    ema_model.load_state_dict(ckpt["ema_model"])
    optim.load_state_dict(ckpt["optim"])
    sched.load_state_dict(ckpt["sched"])
    return ckpt["step"], ckpt["x_T"]


def save(path, step, net_model, ema_model, optim, sched, x_T):
    checkpoint.save_atomic({
        "net_model": net_model.state_dict(),
        "ema_model": ema_model.state_dict(),
        "optim": optim.state_dict(),
        "sched": sched.state_dict(),
        "step": step,
        "x_T": x_T.cpu(),
        "flags": stored_flags(),
    }, path)


def stored_flags():
    train = {name: FLAGS[name].value for name in ("lr", "total_steps", "warmup", "batch_size", "ema_decay",
                                                   "grad_clip", "seed")}
    return {**cflags.model_flags(), **train}


def log_scalars(writer, step, loss, lr, model):
    writer.add_scalar("loss", loss, step)
    writer.add_scalar("lr", lr, step)
    for name, module in model.named_modules():
        if isinstance(module, QuantReLU) and hasattr(module, "act_alpha"):
            writer.add_scalar(f"act_alpha/{name}", module.act_alpha.item(), step)


@torch.no_grad()
def sample_grid(ema_model, x_T, path, rt):
    ema_model.eval()
    sampler = build_sampler(runtime.data_parallel(ema_model, FLAGS.parallel and not rt.distributed),
                            cflags.model_flags(), FLAGS.sampler, FLAGS.sample_steps, FLAGS.eta).to(rt.device)
    save_grid(sampler(x_T.to(rt.device)), path)


def train_step(trainer, params, optim, sched, batch):
    optim.zero_grad(set_to_none=True)
    loss = trainer(batch).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, FLAGS.grad_clip)
    optim.step()
    sched.step()
    return loss.detach()


def setup_models(rt):
    net_model = build_unet(cflags.model_flags(), cflags.kernels()).to(rt.device)
    if FLAGS.init:
        initialised = load_init(net_model, FLAGS.init)
        if rt.is_main and initialised:
            print(f"--init {FLAGS.init}: {len(initialised)} quantizer thresholds start at their initial value")
    ema_model = copy.deepcopy(net_model)
    optim = torch.optim.Adam(net_model.parameters(), lr=FLAGS.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda=warmup_lr(FLAGS.warmup))
    return net_model, ema_model, optim, sched


def main(argv):
    rt = runtime.setup(FLAGS.seed)
    logdir = cflags.logdir()
    ckpt_path = os.path.join(logdir, "ckpt.pt")
    dataset = data.load_dataset(FLAGS.dataset, FLAGS.data_dir, FLAGS.img_size)
    net_model, ema_model, optim, sched = setup_models(rt)
    x_T = torch.randn(FLAGS.sample_size, 3, FLAGS.img_size, FLAGS.img_size)
    step = 0
    if os.path.exists(ckpt_path):
        step, x_T = restore(ckpt_path, net_model, ema_model, optim, sched)
        if rt.is_main:
            print(f"resuming from {ckpt_path} at step {step}")
    if step >= FLAGS.total_steps:
        if rt.is_main:
            print(f"{ckpt_path} is already at step {step} >= --total_steps={FLAGS.total_steps}; nothing to do")
        runtime.teardown(rt)
        return
    runtime.seed_everything(FLAGS.seed + 1000003 * step + rt.rank)
    trainer = runtime.wrap_model(
        GaussianDiffusionTrainer(net_model, FLAGS.beta_1, FLAGS.beta_T, FLAGS.T).to(rt.device), rt, FLAGS.parallel)
    batches = data.infinite_batches(dataset, FLAGS.batch_size, rt, FLAGS.num_workers, seed=FLAGS.seed + step)
    writer = SummaryWriter(logdir) if rt.is_main else None
    if rt.is_main:
        os.makedirs(os.path.join(logdir, "sample"), exist_ok=True)
        with open(os.path.join(logdir, "flagfile.txt"), "w") as f:
            f.write(FLAGS.flags_into_string())
    train_loop(rt, step, trainer, net_model, ema_model, optim, sched, batches, x_T, writer, ckpt_path)
    runtime.teardown(rt)


def report(done, loss, pbar, start, writer, net_model, ema_model, sched, x_T, rt, logdir):
    """Scalars and the progress bar every ``log_step``, a sample grid every ``sample_step``."""
    if done % FLAGS.log_step == 0:
        loss = loss.item()
        log_scalars(writer, done, loss, sched.get_last_lr()[0], net_model)
        pbar.set_postfix(loss=f"{loss:.4f}", steps_per_s=f"{(done - pbar.initial) / (time.time() - start):.2f}")
    if FLAGS.sample_step > 0 and done % FLAGS.sample_step == 0:
        sample_grid(ema_model, x_T, os.path.join(logdir, "sample", f"{done}.png"), rt)


def check_finite(loss, model, step, ckpt_path):
    """Stop before a NaN or inf reaches a checkpoint (the weights are checked when ``model`` is given)."""
    bad = None if torch.isfinite(loss) else f"the loss became {loss.item()}"
    if bad is None and model is not None and not all(torch.isfinite(p).all() for p in model.parameters()):
        bad = "the weights became non-finite"
    if bad:
        raise UserError(f"{bad} at step {step}; training stopped and the last good checkpoint {ckpt_path} "
                        "is kept (try a lower --lr or --grad_clip)")


def train_loop(rt, step, trainer, net_model, ema_model, optim, sched, batches, x_T, writer, ckpt_path):
    logdir = os.path.dirname(ckpt_path)
    params = list(net_model.parameters())
    start = time.time()
    with trange(step, FLAGS.total_steps, initial=step, total=FLAGS.total_steps, dynamic_ncols=True,
                disable=not rt.is_main, desc="train") as pbar:
        for step in pbar:
            net_model.train()
            loss = train_step(trainer, params, optim, sched, next(batches))
            done = step + 1
            save_now = done % FLAGS.save_step == 0 or done == FLAGS.total_steps
            check_finite(loss, net_model if save_now else None, done, ckpt_path)
            update_ema(ema_model, net_model, FLAGS.ema_decay)
            if rt.is_main:
                report(done, loss, pbar, start, writer, net_model, ema_model, sched, x_T, rt, logdir)
                if save_now:
                    save(ckpt_path, done, net_model, ema_model, optim, sched, x_T)
            if save_now:
                runtime.barrier(rt)  # no rank reads a checkpoint rank 0 is still writing
    if writer is not None:
        writer.close()
        summary = {"step": FLAGS.total_steps, "ckpt": ckpt_path, "wall_s": round(time.time() - start, 1)}
        print(json.dumps(summary))


if __name__ == "__main__":
    run(main)
