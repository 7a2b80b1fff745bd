"""Stage 3: block-wise fine-tuning of the converted SNN against the quantized ANN (DESIGN §4).

    python SNN_ft.py --flagfile config/SNN_ft/CIFAR10_snnft.txt [--flag=value ...]

Reads ``<logdir>/ckpt.pt`` (the quantized ANN, EMA weights), converts it and tunes the SNN block
by block. Writes under ``<logdir>/SNN_{bit}bit_ft/``: ``model_backpacks/`` (a checkpoint after
every block), ``ft_blocks_samples/`` (a sample grid after every block), ``snn_ft.pt`` (the
fine-tuned SNN, loadable by ``evaluate.py``), ``finetune.json`` and tensorboard events. A
restart continues after the last finished block; ``--restart`` starts again.
"""
import glob
import hashlib
import json
import os

import torch
import torch.distributed as dist
from absl import flags
from tensorboardX import SummaryWriter
from tqdm import tqdm

from common import checkpoint, data, runtime
from common import flags as cflags
from common.atomic import write_json
from common.errors import UserError, run
from common.images import save_grid
from common.models import build_sampler
from diffusion import GaussianDiffusionTrainer
from snn import finetune
from snn.convert import convert
from snn.io import load_training_ann, save_snn

cflags.define_model_flags()
cflags.define_data_flags()
cflags.define_run_flags()
cflags.define_sampler_flags()
cflags.define_snn_flags()
# Fine-tuning
flags.DEFINE_float("lr", 1e-6, help="Adam learning rate of every block")
flags.DEFINE_integer("ft_steps", 20000, help="fine-tuning steps per block")
flags.DEFINE_integer("batch_size", 128, help="global batch size")
flags.DEFINE_float("grad_clip", 1.0, help="gradient norm clipping (0: none)")
flags.DEFINE_integer("val_size", 128, help="images in the fixed held-out batch that decides keep or revert")
flags.DEFINE_bool("restart", False, help="discard earlier progress in SNN_{bit}bit_ft and start from the converted SNN")
# Logging and sampling
flags.DEFINE_integer("log_step", 10, help="frequency of the training-loss scalars")
flags.DEFINE_integer("sample_size", 64, help="images in the grid sampled after every block (0: no grids)")
FLAGS = flags.FLAGS

# Changing these would make the stored validation errors incomparable with new ones.
RESUME_FIXED = ("source_sha256", "val_size", "seed", "signed")


def settings():
    names = ("lr", "ft_steps", "batch_size", "grad_clip", "val_size", "seed")
    source = os.path.join(cflags.logdir(), "ckpt.pt")
    return {**{name: FLAGS[name].value for name in names}, "signed": FLAGS.sign, "source_sha256": file_digest(source)}


def file_digest(path):
    """sha256 of a file: a backpack is only resumed against the very ckpt.pt it was tuned from."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_snn(ann):
    try:
        return convert(ann, neuron="signed" if FLAGS.sign else "if").eval()
    except ValueError as err:
        raise UserError(f"cannot convert {cflags.logdir()}/ckpt.pt: {err}") from None


def backpack_path(out_dir, index, name):
    return os.path.join(out_dir, "model_backpacks", f"block_{index:02d}_{name}.pt")


def latest_backpack(out_dir):
    """Path of the backpack with the highest block index, or None."""
    paths = sorted(glob.glob(os.path.join(out_dir, "model_backpacks", "block_[0-9][0-9]_*.pt")))
    return paths[-1] if paths else None


def resume(out_dir, snn, path):
    """Load the SNN weights and the fine-tuning state of the backpack at ``path``."""
    ckpt = checkpoint.load_checkpoint(path)
    state = ckpt.get("finetune")
    if state is None:
        raise UserError(f"{path} is not a fine-tuning backpack (no 'finetune' entry)")
    now = settings()
    if state["settings"].get("source_sha256") != now["source_sha256"]:
        raise UserError(f"{cflags.logdir()}/ckpt.pt has changed since the fine-tuning in {out_dir} started: "
                        "use --restart to tune the new checkpoint")
    for name in RESUME_FIXED[1:]:
        if state["settings"].get(name) != now[name]:
            flag = "sign" if name == "signed" else name
            raise UserError(f"{out_dir} was tuned with --{flag}={state['settings'][name]}, now --{flag}="
                            f"{now[name]}: use the same value, or --restart to start again")
    try:
        snn.load_state_dict(ckpt["ema_model"])
    except RuntimeError as err:
        raise UserError(f"{path} does not fit the SNN of this ckpt.pt: {str(err).splitlines()[0]}") from None
    return state


def clear_outputs(out_dir):
    """--restart: remove the backpacks, the result and the JSON of an earlier run."""
    for path in glob.glob(os.path.join(out_dir, "model_backpacks", "*.pt")) + \
            [os.path.join(out_dir, "snn_ft.pt"), os.path.join(out_dir, "finetune.json")]:
        if os.path.exists(path):
            os.remove(path)


def summary(state, out_dir, finished):
    return {"ckpt": os.path.join(cflags.logdir(), "ckpt.pt"), "bit": FLAGS.bit, "T": 2 ** FLAGS.bit - 1,
            "signed": FLAGS.sign, "settings": state["settings"], "converted_error": state["converted_error"],
            "final_error": state["val_error"], "finished": finished,
            "snn_ft": os.path.join(out_dir, "snn_ft.pt") if finished else None, "blocks": state["records"]}


def shared_error(rt, compute):
    """``compute()`` on rank 0, broadcast so every rank takes the same keep/revert decision."""
    value = torch.tensor([compute() if rt.is_main else 0.0], dtype=torch.float64, device=rt.device)
    if rt.distributed:
        dist.broadcast(value, 0)
    return value.item()


def make_validator(snn, ann, val_batch, rt):
    """validate() -> the whole SNN's relative L2 error to the ANN's noise prediction on the fixed batch."""
    x_t, t = val_batch
    chunk = max(1, FLAGS.batch_size // rt.world_size)
    with torch.no_grad():
        ann_out = torch.cat([ann(x_t[i:i + chunk], t[i:i + chunk]) for i in range(0, len(t), chunk)])
    model = runtime.data_parallel(snn, FLAGS.parallel and not rt.distributed)
    return lambda: shared_error(rt, lambda: finetune.relative_error(model, ann_out, x_t, t, chunk))


def make_batches(dataset, q_sample, rt):
    """batches_for(index): block ``index``'s (x_t, t) stream, reproducible per block and rank."""
    def batches_for(index):
        generator = torch.Generator(device=rt.device).manual_seed(FLAGS.seed + 1000003 * (index + 1) + rt.rank)
        loader = data.infinite_batches(dataset, FLAGS.batch_size, rt, FLAGS.num_workers, seed=FLAGS.seed + index)
        return (finetune.draw_batch(x_0, q_sample, FLAGS.T, generator) for x_0 in loader)
    return batches_for


def sample_grid(model, stored, x_T, path, rt):
    """A grid from the fixed noise ``x_T`` with the RNG reseeded, so grids of all blocks compare."""
    if FLAGS.sample_size <= 0:
        return
    sampler = build_sampler(runtime.data_parallel(model, FLAGS.parallel and not rt.distributed), stored,
                            FLAGS.sampler, FLAGS.sample_steps, FLAGS.eta).to(rt.device)
    with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(FLAGS.seed)
        save_grid(sampler(x_T.to(rt.device)), path)


class Recorder:
    """Rank 0's outputs after every block: backpack, sample grid, finetune.json, tensorboard."""

    def __init__(self, snn, stored, state, out_dir, x_T, rt):
        self.snn, self.stored, self.state, self.out_dir, self.x_T, self.rt = snn, stored, state, out_dir, x_T, rt
        self.writer = SummaryWriter(out_dir) if rt.is_main else None
        self.bar = None

    def on_step(self, pair, step, loss):
        if self.bar is None:
            self.bar = tqdm(total=FLAGS.ft_steps, desc=f"[{pair.index + 1}] {pair.name}", dynamic_ncols=True,
                            disable=not self.rt.is_main)
        self.bar.update(1)
        if self.rt.is_main and (step + 1) % FLAGS.log_step == 0:
            loss = loss.item()
            self.bar.set_postfix(loss=f"{loss:.3e}")
            self.writer.add_scalar(f"train_loss/{pair.name}", loss, step + 1)
        if step + 1 == FLAGS.ft_steps:
            self.bar.close()
            self.bar = None

    def on_block(self, record, val_error):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.state["records"].append(record.as_dict())
        self.state["next_block"] = record.index + 1
        self.state["val_error"] = val_error
        if self.rt.is_main:
            self.write(record)
        runtime.barrier(self.rt)

    def write(self, record):
        save_snn(backpack_path(self.out_dir, record.index, record.name), self.snn, self.stored, finetune=self.state)
        sample_grid(self.snn, self.stored, self.x_T,
                    os.path.join(self.out_dir, "ft_blocks_samples", f"block_{record.index:02d}_{record.name}.png"),
                    self.rt)
        write_json(summary(self.state, self.out_dir, finished=False), os.path.join(self.out_dir, "finetune.json"))
        values = record.as_dict()
        for key in ("loss_start", "loss_end", "val_before", "val_after", "kept"):
            self.writer.add_scalar(f"block/{key}", float(values[key]), record.index)
        self.writer.add_scalar("val_error", self.state["val_error"], record.index + 1)
        verdict = "kept" if record.kept else "reverted"
        tqdm.write(f"[{record.index + 1}] {record.name}: block loss {record.loss_start:.4e} -> {record.loss_end:.4e}, "
                   f"SNN-vs-ANN error {record.val_before:.5f} -> {record.val_after:.5f}: {verdict}")


def start_state(snn, ann, validate, stored, x_T, out_dir, rt):
    """The fine-tuning state to continue from: the latest backpack's, or a fresh one."""
    if FLAGS.restart and rt.is_main:
        clear_outputs(out_dir)
    runtime.barrier(rt)
    path = latest_backpack(out_dir)
    if path is not None:
        state = resume(out_dir, snn, path)
        if rt.is_main:
            print(f"resuming from {path}: {state['next_block']} block(s) done")
        return state
    state = {"next_block": 0, "records": [], "settings": settings(), "val_error": None}
    state["converted_error"] = state["val_error"] = validate()
    if rt.is_main:
        print(f"converted SNN: relative error to the ANN {state['converted_error']:.5f}")
        samples = os.path.join(out_dir, "ft_blocks_samples")
        sample_grid(ann, stored, x_T, os.path.join(samples, "ann.png"), rt)
        sample_grid(snn, stored, x_T, os.path.join(samples, "converted.png"), rt)
    return state


def finish(snn, stored, state, out_dir, rt):
    path = os.path.join(out_dir, "snn_ft.pt")
    if rt.is_main:
        if not os.path.exists(path):
            save_snn(path, snn, stored, finetune=state)
        write_json(summary(state, out_dir, finished=True), os.path.join(out_dir, "finetune.json"))
        kept = sum(r["kept"] for r in state["records"])
        print(json.dumps({"snn_ft": path, "converted_error": state["converted_error"],
                          "final_error": state["val_error"], "blocks_kept": kept, "blocks": len(state["records"])}))
    runtime.barrier(rt)


def check_flags():
    if FLAGS.sampler == "ddim" and not 1 <= FLAGS.sample_steps <= FLAGS.T:
        raise UserError(f"--sample_steps must be in 1..{FLAGS.T}, got {FLAGS.sample_steps}")
    for name in ("ft_steps", "val_size", "batch_size"):
        if FLAGS[name].value < (0 if name == "ft_steps" else 1):
            raise UserError(f"--{name} must be positive, got {FLAGS[name].value}")


def setup(rt):
    """Models, data and the fixed batches: (ann, snn, stored, dataset, trainer, val_batch, x_T)."""
    ann, stored, _ = load_training_ann(os.path.join(cflags.logdir(), "ckpt.pt"), rt.device, cflags.kernels(),
                                       cflags.resolve_model_flags)
    check_flags()
    snn = make_snn(ann)
    dataset = data.load_dataset(FLAGS.dataset, FLAGS.data_dir, FLAGS.img_size)
    held_out = data.load_dataset(FLAGS.dataset, FLAGS.data_dir, FLAGS.img_size, flip=False, train=False)
    trainer = GaussianDiffusionTrainer(ann, FLAGS.beta_1, FLAGS.beta_T, FLAGS.T).to(rt.device)
    try:
        val_batch = finetune.validation_batch(held_out, FLAGS.val_size, trainer.q_sample, FLAGS.T, FLAGS.seed,
                                              rt.device)
    except ValueError as err:
        raise UserError(f"--val_size: {err}") from None
    x_T = torch.randn(max(FLAGS.sample_size, 0), 3, FLAGS.img_size, FLAGS.img_size,
                      generator=torch.Generator().manual_seed(FLAGS.seed))
    return ann, snn, stored, dataset, trainer, val_batch, x_T


def main(argv):
    rt = runtime.setup(FLAGS.seed)
    ann, snn, stored, dataset, trainer, val_batch, x_T = setup(rt)
    out_dir = os.path.join(cflags.logdir(), f"SNN_{FLAGS.bit}bit_ft")
    validate = make_validator(snn, ann, val_batch, rt)
    state = start_state(snn, ann, validate, stored, x_T, out_dir, rt)
    n_blocks = len(snn.blocks())
    if state["next_block"] >= n_blocks:
        if rt.is_main:
            print(f"all {n_blocks} blocks are already tuned (use --restart to tune again)")
        finish(snn, stored, state, out_dir, rt)
        return runtime.teardown(rt)
    recorder = Recorder(snn, stored, state, out_dir, x_T, rt)
    per_rank = FLAGS.batch_size // rt.world_size
    probe = (val_batch[0][:per_rank], val_batch[1][:per_rank])
    finetune.finetune(snn, ann, make_batches(dataset, trainer.q_sample, rt), validate, probe, FLAGS.lr,
                      FLAGS.ft_steps, FLAGS.grad_clip, start_block=state["next_block"], val_error=state["val_error"],
                      world_size=rt.world_size, on_block=recorder.on_block, on_step=recorder.on_step)
    finish(snn, stored, state, out_dir, rt)
    if recorder.writer is not None:
        recorder.writer.close()
    runtime.teardown(rt)


if __name__ == "__main__":
    run(main)
