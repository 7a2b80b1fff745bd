"""Stage 4: FID / IS, energy and SNN-ANN agreement of a spiking (or quantized) DDPM.

    python evaluate.py --flagfile config/SNN_evaluate/CIFAR10_snn.txt [--flag=value ...]

``--eval_model_path`` names a converted or fine-tuned SNN checkpoint or an ANN ``ckpt.pt``; the
model is rebuilt from the configuration stored in it, so an ANN and its SNN are evaluated the
same way. Images are generated in shards under ``<logdir>/eval_<tag>/`` (a restarted run resumes
from them; under torchrun the ranks share the shards), then rank 0 computes IS and FID against
``--fid_cache``, measures the energy per generated image and, for an SNN whose ANN is at hand,
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
from absl import flags
from PIL import Image

from common import configs, runtime
from model import checkpoint
from common import flags as cflags
from common.atomic import remove_stale_temporaries, write_error
from common.errors import UserError
from model.images import save_grid
from common.lock import folder_lock
from diffusion import sample_noise
from schedulers import build_sampler
from common.progress import progress
from metrics import scores, shards
from metrics.report import append_jsonl, psnr
from snn.io import Loaded, load_model
from snn.stats import SpikeMonitor, per_image

cflags.flags_of("evaluate.py")
FLAGS = flags.FLAGS


def prepare_metrics(cfg, device):
    """(feature network, reference statistics, path, reason the scores are skipped), all checked
    before sampling: ``--fid=require`` stops here with what is missing."""
    if FLAGS.fid == "skip":
        return None, None, None, "--fid=skip"
    if FLAGS.num_images < FLAGS.is_splits:
        raise UserError(f"--num_images={FLAGS.num_images} is fewer than --is_splits={FLAGS.is_splits}: "
                        "the Inception Score needs at least one image per split (or give --fid=skip)")
    try:
        kind = scores.feature_kind(FLAGS.features, cfg.data.dataset)
        net = scores.load_features(kind, cfg.data.img_size, device, FLAGS.inception_batch)
        stats, path = scores.reference_statistics(net, kind, cfg.data.dataset, cfg.data.img_size, FLAGS.fid_cache,
                                                  img_channels=cfg.unet.img_channels)
        return net, stats, path, None
    except UserError as err:
        if FLAGS.fid == "require":
            raise
        return None, None, None, str(err)


@dataclass
class Evaluation:
    """One evaluation run: the model, how it samples, where the shards go, this process."""
    loaded: Loaded
    sampler_cfg: configs.SamplerConfig
    plan: shards.ShardPlan
    rt: runtime.Runtime
    logdir: str

    @functools.cached_property
    def sampler(self):
        return build_sampler(self.loaded.config, self.sampler_cfg, self.rt.device)[1]

    def sample(self, model, x_T, generator):
        """Images [B, C, H, W] in [-1, 1] of ``model`` (DataParallel with --parallel) from x_T."""
        net = runtime.data_parallel(model, FLAGS.parallel and not self.rt.distributed)
        return self.sampler(net, x_T, generator)

    @property
    def num_shards(self):
        return -(-FLAGS.num_images // self.plan.shard_size)

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
        """(x_T [--probe_images, C, H, W], sampler generator) of the probe run, apart from the shards'."""
        shape = self.loaded.config.image_shape
        return sample_noise(FLAGS.probe_images, shape, FLAGS.seed + 1, self.rt.device)

    def metered_sample(self):
        """The probe run: ``--probe_images`` images sampled with the spike monitor on.

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
            ann = load_model(ann_path, self.rt.device, cflags.kernels())
        except UserError as err:  # a file found beside the SNN (--ann_path was checked before sampling)
            return {"ann_path": ann_path, "agreement_note": str(err)}
        mine = self.loaded.config
        if ann.kind != "ann" or (ann.config.unet, ann.config.diffusion) != (mine.unet, mine.diffusion):
            return {"ann_path": ann_path, "agreement_note": f"{ann_path} is not the ANN of this SNN"}
        value = psnr(snn_images, self.sample(ann.model, *self.probe_noise()))
        return {"ann_path": ann_path, "psnr_snn_vs_ann_dB": "inf" if math.isinf(value) else round(value, 3),
                "agreement_images": FLAGS.probe_images}

    def probe(self):
        """Energy per image and, for an SNN whose ANN is at hand, the SNN-ANN agreement."""
        if FLAGS.probe_images < 1:
            return {"energy_note": "--probe_images=0"}
        images, record = self.metered_sample()
        if self.loaded.kind == "snn":
            ann_path = find_ann(FLAGS.eval_model_path, self.loaded.ckpt, self.logdir)
            if ann_path is None:
                record["agreement_note"] = "no ANN ckpt.pt found beside the SNN (give --ann_path)"
            else:
                record.update(self.agreement(images, ann_path))
        return record

    def describe(self):
        """The fields of a snn_eval.txt line that say what was evaluated and how."""
        snn = configs.to_dict(self.loaded.snn) if self.loaded.snn else {"neuron": None, "norm": None}
        model, unet = self.loaded.model, self.loaded.config.unet
        return {"model_path": FLAGS.eval_model_path, "kind": self.loaded.kind, "bit": unet.bit,
                "time_steps": self.loaded.ckpt.get("time_steps"), **snn,
                "latency_steps": model.latency_steps() if self.loaded.kind == "snn" else None,
                "spike_driven": unet.spike_driven, "resample": unet.resampling, "sampler": self.sampler_cfg.sampler,
                "sample_steps": self.sampler.network_calls,
                "eta": self.sampler_cfg.eta if self.sampler_cfg.sampler == "ddim" else None,
                "clip_denoised": self.sampler_cfg.clip_denoised, "num_images": FLAGS.num_images,
                "seed": FLAGS.seed, "shards": self.plan.folder}


def find_ann(model_path, ckpt, logdir):
    """The ANN ckpt.pt of an SNN checkpoint: --ann_path, else one found beside it; None if none."""
    if FLAGS.ann_path:
        if not os.path.isfile(FLAGS.ann_path):
            raise UserError(f"--ann_path {FLAGS.ann_path} does not exist")
        return FLAGS.ann_path
    here = os.path.dirname(os.path.abspath(model_path))
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


def score(images, metrics):
    """The score fields of a snn_eval.txt line (null with the reason when skipped)."""
    net, stats, path, skipped = metrics
    if net is None:
        return {"features": None, "fid_cache": None, "FID": None, "IS": None, "IS_std": None,
                "recognisability": None, "warning": None, "metrics_skipped": skipped}
    return {**scores.evaluate_images(net, images, stats, FLAGS.is_splits), "fid_cache": path,
            "metrics_skipped": None}


def finish(ev, metrics):
    """Rank 0: gather the images, compute everything, save the grid and return the record."""
    images = shards.gather_images(ev.plan.folder, FLAGS.num_images, ev.plan.shard_size)
    record = {**ev.describe(), **score(images, metrics)}
    with torch.inference_mode():
        record.update(ev.probe())
    if FLAGS.pic_or_not:
        grid = torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float() / 127.5 - 1
        save_grid(grid, os.path.join(ev.logdir, "images", os.path.basename(ev.plan.folder)[len("eval_"):] + ".png"))
    if FLAGS.save_images:
        write_images(images, FLAGS.save_images)
    return record


def report(record, path):
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


def setup(rt):
    """The ``Evaluation`` of ``--eval_model_path``, every setting checked before any sampling."""
    loaded = load_model(FLAGS.eval_model_path, rt.device, cflags.kernels())
    cflags.model_config(loaded.config, FLAGS.eval_model_path)  # explicit flags must agree with it
    if FLAGS.ann_path:
        checkpoint.load_checkpoint(FLAGS.ann_path)  # a file that is no ANN checkpoint fails here, not after sampling
    sampler_cfg = cflags.sampler_config(loaded.config.diffusion.T)
    _, sampler = build_sampler(loaded.config, sampler_cfg)
    logdir = cflags.logdir()
    folder = shards.shard_folder(logdir, FLAGS.eval_model_path, sampler_cfg, sampler.network_calls, FLAGS.seed,
                                 FLAGS.batch_size)
    plan = shards.ShardPlan(folder, FLAGS.batch_size, loaded.config.data.img_size, FLAGS.seed,
                            loaded.config.unet.img_channels)
    return Evaluation(loaded, sampler_cfg, plan, rt, logdir)


def main(argv):
    rt = runtime.setup(FLAGS.seed)
    ev = setup(rt)
    metrics = prepare_metrics(ev.loaded.config, rt.device) if rt.is_main else None
    # the shard folder is this run's to write into, unless every shard is there already (a finished
    # run evaluated again only reads it)
    writes = rt.is_main and bool(shards.missing_shards(ev.plan, range(ev.num_shards)))
    with folder_lock(ev.plan.folder, enabled=writes):
        evaluate(ev, metrics)
    runtime.teardown(rt)


def evaluate(ev, metrics):
    """Generate the missing shards (every rank), then score and report them (rank 0)."""
    rt = ev.rt
    if rt.is_main:
        for folder in (ev.logdir, ev.plan.folder, os.path.join(ev.logdir, "images")):
            remove_stale_temporaries(folder)
    start = time.time()
    with torch.inference_mode():
        made, reused = ev.generate()
    runtime.barrier(rt)  # every rank's shards are on disk
    if rt.is_main:
        record = finish(ev, metrics)
        record.update({"shards_made": made, "shards_reused": reused, "world_size": rt.world_size,  # rank 0's
                       "wall_s": round(time.time() - start, 1),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        report(record, os.path.join(ev.logdir, "snn_eval.txt"))


if __name__ == "__main__":
    cflags.run(main)
