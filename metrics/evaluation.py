"""Stage 4: FID / IS, energy and SNN-ANN agreement of a spiking (or quantized) DDPM.

``evaluate(cfg, sampler_cfg, logdir=...)`` is what ``python evaluate.py`` runs:
``cfg.eval_model_path`` names a converted or fine-tuned SNN checkpoint or an ANN ``ckpt.pt``; the
model is rebuilt from the configuration stored in it, so an ANN and its SNN are evaluated the
same way. Images are generated in shards under ``<logdir>/eval_<tag>/`` (a restarted run resumes
from them; under torchrun the ranks share the shards), then rank 0 computes IS and FID against
``cfg.fid_cache``, measures the energy per generated image and, for an SNN whose ANN is at hand,
the PSNR between SNN and ANN samples drawn from the same noise. One JSON line per run is
appended to ``<logdir>/snn_eval.txt`` (``docs/formats.md``).
"""
import contextlib
import functools
import json
import math
import os
import time
from dataclasses import dataclass

import torch
from PIL import Image

from common import configs, runtime
from common.atomic import remove_stale_temporaries, write_error
from common.errors import UserError
from common.lock import folder_lock
from common.progress import progress
from diffusion import sample_noise
from metrics import scores, shards
from metrics.report import append_jsonl, psnr
from model import checkpoint
from model.images import save_grid
from schedulers import build_sampler
from snn.io import Loaded, load_model
from snn.stats import SpikeMonitor, per_image


def prepare_metrics(cfg, model_cfg, device):
    """(feature network, reference statistics, path, reason the scores are skipped) for the model
    of ``model_cfg``, all checked before sampling: ``cfg.fid == "require"`` stops here with what is
    missing (``cfg``: an EvalConfig)."""
    if cfg.fid == "skip":
        return None, None, None, "--fid=skip"
    if cfg.num_images < cfg.is_splits:
        raise UserError(f"--num_images={cfg.num_images} is fewer than --is_splits={cfg.is_splits}: "
                        "the Inception Score needs at least one image per split (or give --fid=skip)")
    try:
        kind = scores.feature_kind(cfg.features, model_cfg.data.dataset)
        net = scores.load_features(kind, model_cfg.data.img_size, device, cfg.inception_batch)
        stats, path = scores.reference_statistics(net, kind, model_cfg.data.dataset, model_cfg.data.img_size,
                                                  cfg.fid_cache, img_channels=model_cfg.unet.img_channels)
        return net, stats, path, None
    except UserError as err:
        if cfg.fid == "require":
            raise
        return None, None, None, str(err)


@dataclass
class Evaluation:
    """One evaluation run: its settings, the model, how it samples, where the shards go, this process.

    ``kernels`` is how the ANN of the agreement runs; ``parallel`` samples through DataParallel.
    """
    cfg: configs.EvalConfig
    loaded: Loaded
    sampler_cfg: configs.SamplerConfig
    plan: shards.ShardPlan
    rt: runtime.Runtime
    logdir: str
    kernels: str = "reference"
    parallel: bool = False

    @classmethod
    def setup(cls, cfg, sampler_cfg, rt, *, logdir, model=None, given=(), kernels="reference", parallel=False):
        """The evaluation of ``cfg.eval_model_path``, every setting checked before any sampling.

        ``model`` (a ModelConfig) and ``given`` (the names of the flags given explicitly): a given
        model setting must agree with the checkpoint's. ``sampler_cfg`` is checked against its T.
        """
        loaded = load_model(cfg.eval_model_path, rt.device, kernels)
        configs.model_config(model or configs.ModelConfig(), set(given), loaded.config, cfg.eval_model_path)
        if cfg.ann_path:
            checkpoint.load_checkpoint(cfg.ann_path)  # a file that is no ANN checkpoint fails here, not after sampling
        sampler_cfg = configs.sampler_config(sampler_cfg, loaded.config.diffusion.T)
        _, sampler = build_sampler(loaded.config, sampler_cfg)
        folder = shards.shard_folder(logdir, cfg.eval_model_path, sampler_cfg, sampler.network_calls, cfg.seed,
                                     cfg.batch_size)
        plan = shards.ShardPlan(folder, cfg.batch_size, loaded.config.data.img_size, cfg.seed,
                                loaded.config.unet.img_channels)
        return cls(cfg, loaded, sampler_cfg, plan, rt, logdir, kernels, parallel)

    @functools.cached_property
    def sampler(self):
        return build_sampler(self.loaded.config, self.sampler_cfg, self.rt.device)[1]

    def sample(self, model, x_T, generator):
        """Images [B, C, H, W] in [-1, 1] of ``model`` (DataParallel with ``parallel``) from x_T."""
        net = runtime.data_parallel(model, self.parallel and not self.rt.distributed)
        return self.sampler(net, x_T, generator)

    @property
    def num_shards(self):
        return -(-self.cfg.num_images // self.plan.shard_size)

    def generate(self):
        """This rank's shards (progress in images); returns (made, reused) shard counts."""
        mine, todo = shards.plan_shards(self.plan, self.num_shards, self.rt.rank, self.rt.world_size)
        reused = len(mine) - len(todo)
        with progress(total=len(mine) * self.plan.shard_size, initial=reused * self.plan.shard_size, unit="img",
                      desc="sample", disable=not self.rt.is_main) as pbar:
            made = shards.make_shards(lambda x_T, g: self.sample(self.loaded.model, x_T, g), self.plan, todo,
                                      self.rt.device, pbar=pbar)
        return made, reused

    def probe_noise(self):
        """(x_T [probe_images, C, H, W], sampler generator) of the probe run, apart from the shards'."""
        shape = self.loaded.config.image_shape
        return sample_noise(self.cfg.probe_images, shape, self.cfg.seed + 1, self.rt.device)

    def metered_sample(self):
        """The probe run: ``cfg.probe_images`` images sampled with the spike monitor on.

        Returns (images [N, C, H, W] in [-1, 1], energy fields). The monitor sees every sampler
        step, so its per-forward average represents the whole run; energy of a generated image =
        energy of one forward of one sample x network calls per image (``snn.stats.per_image``),
        split by layer role per call and per image.
        """
        monitor = SpikeMonitor(self.loaded.model)
        with monitor:
            images = self.sample(self.loaded.model, *self.probe_noise())
        s = monitor.summary()
        return images, {**per_image(s, self.sampler.network_calls),
                        "energy_breakdown_pJ_per_call": s["energy_breakdown"],
                        "firing_rate": s.get("firing_rate"), "energy_forwards_metered": s.get("num_forwards")}

    def agreement(self, snn_images, ann_path):
        """PSNR (dB) between the SNN's probe images and its ANN's from the same noise (or why not)."""
        try:
            ann = load_model(ann_path, self.rt.device, self.kernels)
        except UserError as err:  # a file found beside the SNN (--ann_path was checked before sampling)
            return {"ann_path": ann_path, "agreement_note": str(err)}
        mine = self.loaded.config
        if ann.kind != "ann" or (ann.config.unet, ann.config.diffusion) != (mine.unet, mine.diffusion):
            return {"ann_path": ann_path, "agreement_note": f"{ann_path} is not the ANN of this SNN"}
        value = psnr(snn_images, self.sample(ann.model, *self.probe_noise()))
        return {"ann_path": ann_path, "psnr_snn_vs_ann_dB": "inf" if math.isinf(value) else round(value, 3),
                "agreement_images": self.cfg.probe_images}

    def probe(self):
        """Energy per image and, for an SNN whose ANN is at hand, the SNN-ANN agreement."""
        if self.cfg.probe_images < 1:
            return {"energy_note": "--probe_images=0"}
        images, record = self.metered_sample()
        if self.loaded.kind == "snn":
            ann_path = find_ann(self.cfg, self.loaded.ckpt, self.logdir)
            if ann_path is None:
                record["agreement_note"] = "no ANN ckpt.pt found beside the SNN (give --ann_path)"
            else:
                record.update(self.agreement(images, ann_path))
        return record

    def describe(self):
        """The fields of a snn_eval.txt line that say what was evaluated and how."""
        snn = configs.to_dict(self.loaded.snn) if self.loaded.snn else {"neuron": None, "norm": None}
        model, unet = self.loaded.model, self.loaded.config.unet
        return {"model_path": self.cfg.eval_model_path, "kind": self.loaded.kind, "bit": unet.bit,
                "time_steps": self.loaded.ckpt.get("time_steps"), **snn,
                "latency_steps": model.latency_steps() if self.loaded.kind == "snn" else None,
                "spike_driven": unet.spike_driven, "resample": unet.resampling, "sampler": self.sampler_cfg.sampler,
                "sample_steps": self.sampler.network_calls,
                "eta": self.sampler_cfg.eta if self.sampler_cfg.sampler == "ddim" else None,
                "clip_denoised": self.sampler_cfg.clip_denoised, "num_images": self.cfg.num_images,
                "seed": self.cfg.seed, "shards": self.plan.folder}


def find_ann(cfg, ckpt, logdir):
    """The ANN ckpt.pt of an SNN checkpoint: ``cfg.ann_path``, else one found beside it; None if none."""
    if cfg.ann_path:
        if not os.path.isfile(cfg.ann_path):
            raise UserError(f"--ann_path {cfg.ann_path} does not exist")
        return cfg.ann_path
    here = os.path.dirname(os.path.abspath(cfg.eval_model_path))
    candidates = [ckpt.get("source"), os.path.join(here, "ckpt.pt"),
                  os.path.join(os.path.dirname(here), "ckpt.pt"), os.path.join(logdir, "ckpt.pt")]
    return next((p for p in candidates if isinstance(p, str) and os.path.isfile(p)), None)


def write_images(images, folder):
    """Every image of uint8 [N, H, W, C] as ``folder/00000.png`` ... (grayscale PNGs for C = 1)."""
    os.makedirs(folder, exist_ok=True)
    for i, img in enumerate(progress(images, desc="png", unit="img")):
        path = os.path.join(folder, f"{i:05d}.png")
        try:
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path)
        except OSError as err:  # a full disk: no half-written PNG is left behind
            with contextlib.suppress(OSError):
                os.remove(path)
            raise write_error(path, err) from None


def score(images, metrics, is_splits):
    """The score fields of a snn_eval.txt line (null with the reason when skipped)."""
    net, stats, path, skipped = metrics
    if net is None:
        return {"features": None, "fid_cache": None, "FID": None, "IS": None, "IS_std": None,
                "recognisability": None, "warning": None, "metrics_skipped": skipped}
    return {**scores.evaluate_images(net, images, stats, is_splits), "fid_cache": path, "metrics_skipped": None}


def finish(ev, metrics):
    """Rank 0: gather the images, compute everything, save the grid and return the record."""
    cfg = ev.cfg
    images = shards.gather_images(ev.plan.folder, cfg.num_images, ev.plan.shard_size)
    record = {**ev.describe(), **score(images, metrics, cfg.is_splits)}
    with torch.inference_mode():
        record.update(ev.probe())
    if cfg.pic_or_not:
        grid = torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float() / 127.5 - 1
        save_grid(grid, os.path.join(ev.logdir, "images", os.path.basename(ev.plan.folder)[len("eval_"):] + ".png"))
    if cfg.save_images:
        write_images(images, cfg.save_images)
    return record


def report(record, path):
    """Append ``record`` to ``path`` and print the scores, the record and where it went."""
    append_jsonl(path, record)
    if record["metrics_skipped"]:
        print(f"FID/IS skipped: {record['metrics_skipped']}")
    else:
        recognised = "" if record["recognisability"] is None else f"   recognisability {record['recognisability']:.3f}"
        print(f"{record['features']}: IS {record['IS']:.4f} +- {record['IS_std']:.4f}   FID {record['FID']:.4f}"
              f"{recognised}")
        if record["warning"]:
            print(f"warning: {record['warning']}")
    print(json.dumps(record))
    print(f"appended to {path}")


def generate_and_report(ev, metrics):
    """Generate the missing shards (every rank), then score and report them (rank 0, which
    returns the record; the other ranks return None)."""
    rt = ev.rt
    if rt.is_main:
        for folder in (ev.logdir, ev.plan.folder, os.path.join(ev.logdir, "images")):
            remove_stale_temporaries(folder)
    start = time.time()
    with torch.inference_mode():
        made, reused = ev.generate()
    runtime.barrier(rt)  # every rank's shards are on disk
    if not rt.is_main:
        return None
    record = finish(ev, metrics)
    record.update({"shards_made": made, "shards_reused": reused, "world_size": rt.world_size,  # rank 0's
                   "wall_s": round(time.time() - start, 1), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    report(record, os.path.join(ev.logdir, "snn_eval.txt"))
    return record


def evaluate(cfg, sampler_cfg, *, logdir, model=None, given=(), kernels="reference", parallel=False):
    """Stage 4 (``python evaluate.py``): evaluate ``cfg.eval_model_path`` into ``logdir``.

    ``cfg``: an EvalConfig; ``sampler_cfg``: a SamplerConfig (checked against the model's T);
    ``model`` and ``given``: the model settings asked for and the names of those given explicitly
    (each must agree with the checkpoint); ``kernels``, ``parallel``: how the networks run.
    Returns the record appended to ``<logdir>/snn_eval.txt`` (None on ranks other than 0).
    """
    rt = runtime.setup(cfg.seed)
    ev = Evaluation.setup(cfg, sampler_cfg, rt, logdir=logdir, model=model, given=given, kernels=kernels,
                          parallel=parallel)
    metrics = prepare_metrics(cfg, ev.loaded.config, rt.device) if rt.is_main else None
    # the shard folder is this run's to write into, unless every shard is there already (a finished
    # run evaluated again only reads it)
    writes = rt.is_main and bool(shards.missing_shards(ev.plan, range(ev.num_shards)))
    with folder_lock(ev.plan.folder, enabled=writes):
        record = generate_and_report(ev, metrics)
    runtime.teardown(rt)
    return record
