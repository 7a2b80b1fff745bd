"""Stage 3 as a run: the converted SNN tuned block by block against the quantized ANN, with its
outputs, its resume and its judges (the block-wise algorithm is ``snn.finetune``).

``finetune_run`` is what ``SNN_ft.py`` does. It reads ``<logdir>/ckpt.pt`` (the quantized ANN, EMA
weights), converts it and tunes the SNN block by block (``docs/finetune.md``), writing under
``<logdir>/SNN_{bit}bit_ft[_<tag>]/``: ``model_backpacks/`` (a checkpoint after every block),
``ft_blocks_samples/`` (a sample grid after every block), ``snn_ft.pt`` (the fine-tuned SNN),
``finetune.json`` and tensorboard events. A restart continues after the last finished block with
the settings stored in its backpack; ``run_cfg.restart`` starts again.
"""
import glob
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tensorboardX import SummaryWriter
from tqdm import tqdm

from common import configs, runtime
from common.atomic import remove_stale_temporaries, write_json
from common.errors import UserError
from common.lock import folder_lock
from common.progress import progress
from diffusion import sample_noise
from model import checkpoint, data
from model.images import save_grid
from schedulers import build_sampler
from snn import agreement, calibrate, finetune
from snn.io import load_training_ann, save_snn, to_snn

# Changing these would make the stored errors incomparable with new ones.
RESUME_FIXED = ("val_size", "seed", "judge_images", "judge_steps", "judge_eta")
# What a backpack's 'finetune' entry holds for a run to continue from it.
BACKPACK_STATE = ("next_block", "records", "source_sha256", "config", "converted_error", "val_error")


def backpack_path(out_dir, index, name):
    return os.path.join(out_dir, "model_backpacks", f"block_{index:02d}_{name}.pt")


def latest_backpack(out_dir):
    """(path, checkpoint) of the last readable backpack, or (None, None); an unreadable newer one
    (a write cut short by a crash of the machine) is reported and passed over."""
    paths = sorted(glob.glob(os.path.join(out_dir, "model_backpacks", "block_[0-9][0-9]_*.pt")))
    for path in reversed(paths):
        try:
            ckpt = checkpoint.load_checkpoint(path)
        except UserError as err:
            print(f"note: {err}; continuing from the backpack before it")
            continue
        if not isinstance(ckpt.get("finetune"), dict) or not checkpoint.is_snn(ckpt):
            raise UserError(f"{path} is not a fine-tuning backpack (no 'finetune' entry); use --restart")
        checkpoint.require(ckpt["finetune"], f"{path} (its 'finetune' entry)", BACKPACK_STATE, "resuming")
        return path, ckpt
    return None, None


def clear_outputs(out_dir):
    """Restart: remove the backpacks, the result and the JSON of an earlier run."""
    for path in glob.glob(os.path.join(out_dir, "model_backpacks", "*.pt")) + \
            [os.path.join(out_dir, "snn_ft.pt"), os.path.join(out_dir, "finetune.json")]:
        if os.path.exists(path):
            os.remove(path)


def resumed_settings(backpack, path, source_digest, snn_cfg, ft_cfg, given):
    """(SNNConfig, FinetuneConfig) of a resumed run: the backpack's, with the wanted ``snn_cfg`` and
    ``ft_cfg`` of the names in ``given`` checked against it (``RESUME_FIXED`` may not change)."""
    state = backpack["finetune"]
    if state["source_sha256"] != source_digest:
        raise UserError(f"the ckpt.pt this fine-tuning started from has changed since {path} was written: "
                        "use --restart to tune the new checkpoint")
    snn_cfg = configs.resolve(checkpoint.snn_config(backpack), snn_cfg, given, path, hint=" (or --restart)")
    stored = configs.from_dict(configs.FinetuneConfig, state["config"])
    ft_cfg = configs.resolve(stored, ft_cfg, given, path, RESUME_FIXED)
    for name in set(configs.field_names(configs.FinetuneConfig)) - set(RESUME_FIXED):
        if getattr(ft_cfg, name) != getattr(stored, name):
            print(f"note: the remaining blocks use --{name}={getattr(ft_cfg, name)} (earlier ones: "
                  f"{getattr(stored, name)})")
    return snn_cfg, ft_cfg


@dataclass
class FinetuneRun:
    """What stage 3 shares: the two models, the settings, the progress state and the outputs."""
    ann: torch.nn.Module
    snn: torch.nn.Module
    cfg: configs.ModelConfig
    snn_cfg: configs.SNNConfig
    ft_cfg: configs.FinetuneConfig
    state: dict
    out_dir: str
    rt: runtime.Runtime
    sampler_cfg: configs.SamplerConfig  # of the sample grids, checked against the model's T
    run_cfg: configs.FinetuneRunConfig
    loader_cfg: configs.LoaderConfig
    parallel: bool = False  # DataParallel over the visible GPUs (not under torchrun)

    def data_parallel(self, model):
        return runtime.data_parallel(model, self.parallel and not self.rt.distributed)

    def sample_grid(self, model, name):
        """A grid from fixed noise and a fixed sampler seed, so the grids of all blocks compare."""
        if self.run_cfg.sample_size <= 0:
            return
        x_T, generator = sample_noise(self.run_cfg.sample_size, self.cfg.image_shape, self.ft_cfg.seed,
                                      self.rt.device)
        _, sampler = build_sampler(self.cfg, self.sampler_cfg, self.rt.device)
        model = self.data_parallel(model)
        with torch.no_grad():
            images = sampler(model, x_T, generator)
        save_grid(images, os.path.join(self.out_dir, "ft_blocks_samples", name + ".png"))

    def summary(self, finished):
        return {"ckpt": self.state["source"], "bit": self.cfg.unet.bit, "time_steps": self.snn.time_steps,
                **configs.to_dict(self.snn_cfg), "settings": configs.to_dict(self.ft_cfg),
                "val_size": self.ft_cfg.val_size, "converted_error": self.state["converted_error"],
                "final_error": self.state["val_error"],
                "converted_sample_error": self.state.get("converted_sample_error"),
                "final_sample_error": self.state.get("sample_error"), "finished": finished,
                "snn_ft": os.path.join(self.out_dir, "snn_ft.pt") if finished else None,
                "blocks": self.state["records"]}

    def save(self, path):
        self.state["config"] = configs.to_dict(self.ft_cfg)
        save_snn(path, self.snn, self.cfg, self.snn_cfg, finetune=self.state)

    def finish(self):
        path = os.path.join(self.out_dir, "snn_ft.pt")
        if self.rt.is_main:
            if not os.path.exists(path):
                self.save(path)
            write_json(self.summary(finished=True), os.path.join(self.out_dir, "finetune.json"))
            kept = sum(r["kept"] for r in self.state["records"])
            print(json.dumps({"snn_ft": path, "converted_error": self.state["converted_error"],
                              "final_error": self.state["val_error"],
                              "converted_sample_error": self.state.get("converted_sample_error"),
                              "final_sample_error": self.state.get("sample_error"), "blocks_kept": kept,
                              "bias_corrections_kept": sum(r.get("bias_kept", False) for r in self.state["records"]),
                              "blocks": len(self.state["records"])}))
        runtime.barrier(self.rt)


class Recorder:
    """Rank 0's outputs after every step and block: progress, backpack, sample grid, JSON, tensorboard."""

    def __init__(self, ft_run):
        self.run, self.bar = ft_run, None
        self.writer = SummaryWriter(ft_run.out_dir) if ft_run.rt.is_main else None

    def on_step(self, pair, step, loss):
        if self.bar is None:
            self.bar = progress(total=self.run.ft_cfg.ft_steps, desc=f"[{pair.index + 1}] {pair.name}",
                                disable=not self.run.rt.is_main)
        self.bar.update(1)
        if self.run.rt.is_main and (step + 1) % self.run.run_cfg.log_step == 0:
            loss = loss.item()
            self.bar.set_postfix(loss=f"{loss:.3e}", refresh=False)
            self.writer.add_scalar(f"train_loss/{pair.name}", loss, step + 1)

    def on_block(self, record, val_error):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        state = self.run.state
        state["records"].append(record.as_dict())
        state["next_block"], state["val_error"], state["sample_error"] = record.index + 1, val_error, record.sample_end
        if self.run.rt.is_main:
            self.write(record)
        runtime.barrier(self.run.rt)

    def write(self, record):
        self.run.save(backpack_path(self.run.out_dir, record.index, record.name))
        self.run.sample_grid(self.run.snn, f"block_{record.index:02d}_{record.name}")
        write_json(self.run.summary(finished=False), os.path.join(self.run.out_dir, "finetune.json"))
        for key, value in record.as_dict().items():
            if key not in ("index", "name", "lr", "wall_s") and value is not None:
                self.writer.add_scalar(f"block/{key}", float(value), record.index)
        self.writer.add_scalar("val_error", self.run.state["val_error"], record.index + 1)
        if record.sample_end is not None:
            self.writer.add_scalar("sample_error", record.sample_end, record.index + 1)
        for line in report_lines(record):
            tqdm.write(f"[{record.index + 1}] {record.name}: {line}")


def _errors(val_before, val_after, sample_before, sample_after):
    text = f"one-call error {val_before:.5g} -> {val_after:.5g}"
    return text if sample_before is None else text + f", sample error {sample_before:.5g} -> {sample_after:.5g}"


def report_lines(record):
    """What a block's record says, for the log: its bias correction and its steps, each with its verdict."""
    if record.steps == 0 and record.bias_shift is None:
        return [f"block loss {record.loss_start:.4e}, nothing to tune (no trainable weights, or already equal to "
                "the ANN block): left as it was"]
    lines = []
    if record.bias_shift is not None:
        lines.append(f"bias correction (RMS shift {record.bias_shift:.3e}), " + _errors(
            record.val_before, record.bias_val, record.sample_before, record.bias_sample) +
            (": kept" if record.bias_kept else ": reverted"))
    if record.steps:
        val_from, sample_from = record.steps_from()
        lines.append(f"block loss {record.loss_start:.4e} -> {record.loss_end:.4e}, " + _errors(
            val_from, record.val_after, sample_from, record.sample_after) + (": kept" if record.kept else ": reverted"))
    return lines


def shared_error(rt, compute):
    """``compute()`` on rank 0, broadcast so every rank takes the same keep/revert decision."""
    value = torch.tensor([compute() if rt.is_main else 0.0], dtype=torch.float64, device=rt.device)
    if rt.distributed:
        dist.broadcast(value, 0)
    return value.item()


def make_validator(ft_run, data_dir):
    """validate() -> the whole SNN's relative error to the ANN's noise prediction on the held-out batch."""
    diffusion, _ = build_sampler(ft_run.cfg, configs.SamplerConfig(), ft_run.rt.device)
    x_t, t = agreement.held_out_batch(ft_run.cfg, ft_run.ft_cfg.val_size, diffusion, ft_run.ft_cfg.seed, data_dir,
                                      ft_run.rt.device)
    ann_out = agreement.predictions(ft_run.ann, x_t, t)
    model = ft_run.data_parallel(ft_run.snn)

    def validate():
        return shared_error(ft_run.rt, lambda: agreement.relative_error(agreement.predictions(model, x_t, t), ann_out))
    per_rank = ft_run.ft_cfg.batch_size // ft_run.rt.world_size
    return validate, (x_t[:per_rank], t[:per_rank])


def make_sample_error(ft_run):
    """sample_error() -> the relative error of the SNN's images to the ANN's from fixed noise
    (``agreement.SampleJudge``, DDIM ``judge_steps`` steps, ``judge_eta``), or None for
    ``--judge_images=0``."""
    ft_cfg, rt = ft_run.ft_cfg, ft_run.rt
    if ft_cfg.judge_images == 0:
        return None
    _, sampler = build_sampler(ft_run.cfg, configs.SamplerConfig("ddim", ft_cfg.judge_steps, ft_cfg.judge_eta),
                               rt.device)
    judge = None
    if rt.is_main:  # rank 0 judges; shared_error hands its number to every rank
        x_T, generator = sample_noise(ft_cfg.judge_images, ft_run.cfg.image_shape,
                                      runtime.derived_seed(ft_cfg.seed, 3), rt.device)
        judge = agreement.SampleJudge(sampler, x_T, generator, ft_run.ann)
    model = ft_run.data_parallel(ft_run.snn)
    return lambda: shared_error(rt, lambda: judge(model))


def make_calibration(ft_run, dataset):
    """The calibration batch of bias correction (the same on every rank), or None when it is off."""
    ft_cfg = ft_run.ft_cfg
    if not ft_cfg.bias_correction:
        return None
    diffusion, _ = build_sampler(ft_run.cfg, configs.SamplerConfig(), ft_run.rt.device)
    try:
        return calibrate.calibration_batch(dataset, ft_cfg.calib_size, diffusion,
                                           runtime.derived_seed(ft_cfg.seed, 5), ft_run.rt.device)
    except ValueError as err:
        raise UserError(f"--calib_size={ft_cfg.calib_size}: {err}") from None


def make_batches(ft_run, dataset):
    """batches_for(index): block ``index``'s (x_t, t) stream, reproducible per block and rank."""
    rt, ft_cfg = ft_run.rt, ft_run.ft_cfg
    diffusion, _ = build_sampler(ft_run.cfg, configs.SamplerConfig(), rt.device)

    def batches_for(index):
        generator = runtime.generator(runtime.derived_seed(ft_cfg.seed, index, rt.rank), rt.device)
        loader = data.training_batches(dataset, ft_cfg.batch_size, rt, ft_run.loader_cfg.num_workers,
                                       seed=runtime.derived_seed(ft_cfg.seed, index))
        return (finetune.draw_batch(data.random_flip(x_0, generator), diffusion, generator) for x_0 in loader)
    return batches_for


def load_source(logdir, model_cfg, given, sampler_cfg, ft_cfg, tag, kernels, rt):
    """(the quantized ANN, its ModelConfig, its ckpt.pt, the fine-tuning folder, ``sampler_cfg``
    checked against the model's T), all checked first: the names in ``given`` must agree with
    the checkpoint, the sampler and ``ft_cfg.judge_steps`` with its T."""
    ckpt_path = os.path.join(logdir, "ckpt.pt")
    ann, cfg, _ = load_training_ann(ckpt_path, rt.device, kernels)
    configs.model_config(model_cfg, given, cfg, ckpt_path)
    sampler_cfg = configs.sampler_config(sampler_cfg, cfg.diffusion.T)  # a bad sampler setting fails before any work
    configs.check_steps("judge_steps", ft_cfg.judge_steps, cfg.diffusion.T)
    return ann, cfg, ckpt_path, os.path.join(logdir, configs.tagged(f"SNN_{cfg.unet.bit}bit_ft", tag)), sampler_cfg


def start(ann, cfg, ckpt_path, out_dir, rt, *, given, snn_cfg, ft_cfg, **settings):
    """The ``FinetuneRun`` to continue: from the last backpack (its settings, with the wanted
    ``snn_cfg`` and ``ft_cfg`` of the names in ``given`` checked against them), or from the
    converted SNN. ``settings``: the ``FinetuneRun`` fields ``sampler_cfg``, ``run_cfg``,
    ``loader_cfg``, ``parallel``."""
    if settings["run_cfg"].restart and rt.is_main:
        clear_outputs(out_dir)
    runtime.barrier(rt)
    path, backpack = latest_backpack(out_dir)
    digest = checkpoint.file_digest(ckpt_path)
    if backpack is None:
        state = {"next_block": 0, "records": [], "source": ckpt_path, "source_sha256": digest}
    else:
        snn_cfg, ft_cfg = resumed_settings(backpack, path, digest, snn_cfg, ft_cfg, given)
        state = {"source": ckpt_path, **backpack["finetune"]}  # a backpack of the first format names no source
    snn = to_snn(ann, snn_cfg)
    if backpack is not None:
        checkpoint.load_weights(snn, backpack["model"], path)
        if rt.is_main:
            print(f"resuming from {path}: {state['next_block']} block(s) done")
    return FinetuneRun(ann, snn, cfg, snn_cfg, ft_cfg, state, out_dir, rt, **settings)


def measure_converted(ft_run, validate, sample_error):
    """The converted SNN's errors, which the first block starts from, and the ANN's and its grids."""
    state = ft_run.state
    state["converted_error"] = state["val_error"] = validate()
    state["converted_sample_error"] = state["sample_error"] = None if sample_error is None else sample_error()
    if ft_run.rt.is_main:
        converted = state["converted_sample_error"]
        print(f"converted SNN: one-call error to the ANN {state['converted_error']:.5g}" +
              ("" if converted is None else f", sample error {converted:.5g}"))
        ft_run.sample_grid(ft_run.ann, "ann")
        ft_run.sample_grid(ft_run.snn, "converted")


def tune(ft_run):
    """Tune the blocks not yet tuned and write the results (every rank)."""
    rt = ft_run.rt
    if rt.is_main:
        for sub in ("", "model_backpacks", "ft_blocks_samples"):
            remove_stale_temporaries(os.path.join(ft_run.out_dir, sub))
    n_blocks = len(ft_run.snn.blocks())
    if ft_run.state["next_block"] >= n_blocks:
        if rt.is_main:
            print(f"all {n_blocks} blocks are already tuned (use --restart to tune again)")
        return ft_run.finish()
    validate, probe = make_validator(ft_run, ft_run.loader_cfg.data_dir)
    sample_error = make_sample_error(ft_run)
    if ft_run.state["next_block"] == 0:
        measure_converted(ft_run, validate, sample_error)
    dataset = data.load_dataset(ft_run.cfg.data.dataset, ft_run.loader_cfg.data_dir, ft_run.cfg.data.img_size,
                                channels=ft_run.cfg.unet.img_channels)
    recorder = Recorder(ft_run)
    tuner = finetune.Tuner(ft_run.snn, ft_run.ann, ft_run.ft_cfg, validate, probe, rt.world_size,
                           recorder.on_step, recorder.on_block, sample_error, make_calibration(ft_run, dataset))
    tuner.run(make_batches(ft_run, dataset), start_block=ft_run.state["next_block"],
              val_error=ft_run.state["val_error"], sample_error=ft_run.state.get("sample_error"))
    ft_run.finish()
    if recorder.writer is not None:
        recorder.writer.close()




def finetune_run(*, logdir, model_cfg, given, snn_cfg, sampler_cfg, ft_cfg, run_cfg, loader_cfg, runtime_cfg):
    """Stage 3 as ``SNN_ft.py`` runs it, on every rank of a torchrun (under the lock of the
    fine-tuning folder): the ``FinetuneRun`` at its end.

    ``model_cfg`` (``unet.img_channels`` may be None) and the names in ``given`` are checked
    against ``<logdir>/ckpt.pt``; on a resume, ``snn_cfg`` and ``ft_cfg`` against the backpack's
    (only the names given count). ``runtime_cfg.kernels`` is what the models run."""
    rt = runtime.setup(ft_cfg.seed)
    ann, cfg, ckpt_path, out_dir, sampler_cfg = load_source(logdir, model_cfg, given, sampler_cfg, ft_cfg,
                                                            run_cfg.tag, runtime_cfg.kernels, rt)
    with folder_lock(out_dir, enabled=rt.is_main):
        ft_run = start(ann, cfg, ckpt_path, out_dir, rt, given=given, snn_cfg=snn_cfg, ft_cfg=ft_cfg,
                       sampler_cfg=sampler_cfg, run_cfg=run_cfg, loader_cfg=loader_cfg,
                       parallel=runtime_cfg.parallel)
        tune(ft_run)
    runtime.teardown(rt)
    return ft_run
