"""Stage 4: FID / IS, energy and SNN-ANN agreement of a spiking (or quantized) DDPM.

    python evaluate.py --flagfile config/SNN_evaluate/CIFAR10_snn.txt [--flag=value ...]

``--eval_model_path`` names a converted or fine-tuned SNN checkpoint or an ANN ``ckpt.pt``; the
model is rebuilt from the flags stored in it, so an ANN and its SNN are evaluated the same way.
Images are generated in shards under ``<logdir>/eval_<tag>/`` (a restarted run resumes from
them; under torchrun the ranks share the shards), then rank 0 computes IS and FID against
``--fid_cache``, measures the energy per generated image and, for an SNN whose ANN is at hand,
the PSNR between SNN and ANN samples drawn from the same noise. One JSON line per run is
appended to ``<logdir>/snn_eval.txt``.
"""
import json
import math
import os
import time

import torch
from absl import flags
from PIL import Image
from tqdm import tqdm

from common import runtime
from common import flags as cflags
from common.errors import UserError, run
from common.images import save_grid
from common.models import build_sampler
from metrics import inception, shards
from metrics.report import append_jsonl, psnr
from snn.io import load_model
from snn.stats import SpikeMonitor

cflags.define_model_flags()
cflags.define_run_flags()
cflags.define_sampler_flags()
# What to evaluate
flags.DEFINE_string("eval_model_path", None, help="SNN checkpoint (converted_snn.pt, a fine-tuned SNN) or ANN ckpt.pt")
flags.DEFINE_string("ann_path", None, help="the ANN ckpt.pt of the SNN, for the agreement PSNR "
                    "(default: a ckpt.pt beside the checkpoint, one folder up, or in --logdir)")
# Generation
flags.DEFINE_integer("num_images", 50000, help="images generated for IS / FID")
flags.DEFINE_integer("batch_size", 128, help="images per sampler call; also the size of a shard")
# Metrics
flags.DEFINE_enum("fid", "auto", ["auto", "require", "skip"],
                  help="FID and IS: auto = compute when the Inception weights and --fid_cache are there, "
                       "else skip with the reason; require = fail before sampling when they are not; skip")
flags.DEFINE_string("fid_cache", "stats/cifar10.train.npz", help="reference statistics (.npz with mu, sigma)")
flags.DEFINE_integer("is_splits", 10, help="splits of the Inception Score")
flags.DEFINE_integer("inception_batch", 50, help="batch size of the Inception network")
flags.DEFINE_integer("probe_images", 8, help="images sampled once more with the spike monitor on, for the energy "
                     "per image and (ANN at hand) the SNN-ANN PSNR from the same noise (0: neither)")
# Outputs
flags.DEFINE_bool("pic_or_not", True, help="save a grid of generated images into <logdir>/images/")
flags.DEFINE_string("save_images", None, help="also write every generated image as a PNG into this folder")
FLAGS = flags.FLAGS


def check_flags():
    for name in ("num_images", "batch_size", "is_splits", "inception_batch"):
        if FLAGS[name].value < 1:
            raise UserError(f"--{name} must be at least 1, got {FLAGS[name].value}")
    if FLAGS.eval_model_path is None:
        raise UserError("--eval_model_path is required: an SNN checkpoint or an ANN ckpt.pt")


def prepare_metrics(device, dataset):
    """(Inception network or None, reason FID/IS are skipped or None), checked before sampling."""
    if FLAGS.fid == "skip":
        return None, "--fid=skip"
    if FLAGS.num_images < FLAGS.is_splits:
        raise UserError(f"--num_images={FLAGS.num_images} is fewer than --is_splits={FLAGS.is_splits}: "
                        "the Inception Score needs at least one image per split (or give --fid=skip)")
    net, reasons = None, []
    try:
        inception.check_stats(FLAGS.fid_cache, dataset)
    except UserError as err:
        reasons.append(str(err))
    try:
        net = inception.load_inception(device)
    except UserError as err:
        reasons.append(str(err))
    if not reasons:
        return net, None
    if FLAGS.fid == "require":
        raise UserError("; ".join(reasons))
    return None, "; ".join(reasons)


def network_calls(cfg):
    """Network evaluations per generated image: the number of sampling steps."""
    return FLAGS.sample_steps if FLAGS.sampler == "ddim" else cfg["T"]


def make_sampler(model, cfg, rt):
    net = runtime.data_parallel(model, FLAGS.parallel and not rt.distributed)
    try:
        return build_sampler(net, cfg, FLAGS.sampler, FLAGS.sample_steps, FLAGS.eta).to(rt.device)
    except ValueError as err:
        raise UserError(str(err)) from None


def generate(sampler, cfg, folder, rt):
    """This rank's shards of ``folder`` (tqdm bar in images); returns (made, reused) shard counts."""
    shard_size = FLAGS.batch_size
    num_shards = -(-FLAGS.num_images // shard_size)
    mine, todo = shards.plan_shards(folder, num_shards, shard_size, rt.rank, rt.world_size)
    reused = len(mine) - len(todo)
    with tqdm(total=len(mine) * shard_size, initial=reused * shard_size, unit="img", dynamic_ncols=True,
              desc="sample", disable=not rt.is_main) as pbar:
        made = shards.make_shards(sampler, folder, todo, shard_size, cfg["img_size"], FLAGS.seed,
                                  rt.device, pbar=pbar)
    return made, reused


def probe_noise(cfg, device):
    """x_T [--probe_images, 3, H, W] of the probe run, apart from the shards' noise."""
    gen = torch.Generator().manual_seed(FLAGS.seed + 1)
    return torch.randn(FLAGS.probe_images, 3, cfg["img_size"], cfg["img_size"], generator=gen).to(device)


def metered_sample(sampler, model, cfg, rt):
    """The probe run: ``--probe_images`` images sampled with the spike monitor (snn.stats) on.

    Returns (images [N, 3, H, W] in [-1, 1], energy fields). The monitor sees every diffusion step,
    so its per-forward average represents the whole run; energy of a generated image = energy of
    one forward of one sample x network calls per image.
    """
    monitor = SpikeMonitor(model)
    torch.manual_seed(FLAGS.seed + 2)  # the probe's sampler noise, shared with the ANN in agreement()
    with monitor:
        images = sampler(probe_noise(cfg, rt.device))
    s = monitor.summary()
    calls = network_calls(cfg)
    return images, {"energy_pJ_per_image": s["energy_pJ_per_sample"] * calls,
                    "ann_energy_pJ_per_image": s["ann_energy_pJ_per_sample"] * calls,
                    "energy_ratio_ann_over_snn": s["ann_energy_pJ_per_sample"] / max(s["energy_pJ_per_sample"], 1e-30),
                    "firing_rate": s.get("firing_rate"), "energy_forwards_metered": s.get("num_forwards")}


def find_ann(model_path, ckpt, logdir):
    """The ANN ckpt.pt of an SNN checkpoint: --ann_path, else one found beside it; None if none."""
    if FLAGS.ann_path:
        if not os.path.isfile(FLAGS.ann_path):
            raise UserError(f"--ann_path {FLAGS.ann_path} does not exist")
        return FLAGS.ann_path
    here = os.path.dirname(os.path.abspath(model_path))
    candidates = [ckpt.get("ann_path"), os.path.join(here, "ckpt.pt"),
                  os.path.join(os.path.dirname(here), "ckpt.pt"), os.path.join(logdir, "ckpt.pt")]
    return next((p for p in candidates if isinstance(p, str) and os.path.isfile(p)), None)


def agreement(snn_images, cfg, ann_path, rt):
    """PSNR (dB) between the SNN's probe images and its ANN's from the same noise (or why not)."""
    ann, kind, ann_ckpt = load_model(ann_path, rt.device, cflags.kernels())
    arch = [k for k in cflags.MODEL_FLAG_NAMES if k in cfg and k in ann_ckpt["flags"] and k != "dataset"]
    if kind != "ann" or any(ann_ckpt["flags"][k] != cfg[k] for k in arch):
        return {"ann_path": ann_path, "agreement_note": f"{ann_path} is not the ANN of this SNN"}
    torch.manual_seed(FLAGS.seed + 2)  # the sampler noise of metered_sample()
    ann_images = make_sampler(ann, cfg, rt)(probe_noise(cfg, rt.device))
    value = psnr(snn_images, ann_images)
    return {"ann_path": ann_path, "psnr_snn_vs_ann_dB": "inf" if math.isinf(value) else round(value, 3),
            "agreement_images": FLAGS.probe_images}


def probe(sampler, model, kind, ckpt, cfg, rt, logdir):
    """Energy per image and, for an SNN whose ANN is at hand, the SNN-ANN agreement."""
    if FLAGS.probe_images < 1:
        return {"energy_note": "--probe_images=0"}
    images, record = metered_sample(sampler, model, cfg, rt)
    if kind == "snn":
        ann_path = find_ann(FLAGS.eval_model_path, ckpt, logdir)
        if ann_path is None:
            record["agreement_note"] = "no ANN ckpt.pt found beside the SNN (give --ann_path)"
        else:
            record.update(agreement(images, cfg, ann_path, rt))
    return record


def write_images(images, folder):
    """Every image of uint8 [N, H, W, 3] as ``folder/00000.png`` ..."""
    os.makedirs(folder, exist_ok=True)
    for i, img in enumerate(tqdm(images, desc="png", unit="img", dynamic_ncols=True)):
        Image.fromarray(img).save(os.path.join(folder, f"{i:05d}.png"))


def describe(kind, ckpt, cfg, folder):
    """The fields of a snn_eval.txt line that say what was evaluated."""
    return {"model_path": FLAGS.eval_model_path, "kind": kind, "bit": cfg["bit"],
            "T": ckpt.get("T") if kind == "snn" else None, "signed": ckpt.get("signed") if kind == "snn" else None,
            "sampler": FLAGS.sampler, "sample_steps": network_calls(cfg),
            "eta": FLAGS.eta if FLAGS.sampler == "ddim" else None, "num_images": FLAGS.num_images,
            "seed": FLAGS.seed, "fid_cache": FLAGS.fid_cache, "shards": folder}


def score(images, net, skipped, device):
    """IS / FID fields of a snn_eval.txt line (null with the reason when skipped)."""
    if net is None:
        return {"IS": None, "IS_std": None, "FID": None, "warning": None, "metrics_skipped": skipped}
    result = inception.evaluate_images(net, images, FLAGS.fid_cache, device, FLAGS.is_splits,
                                       FLAGS.inception_batch)
    return {**result, "metrics_skipped": None}


def finish(model, kind, ckpt, cfg, sampler, folder, net, skipped, rt, logdir):
    """Rank 0: gather the images, compute everything, save the grid and the snn_eval.txt line."""
    images = shards.gather_images(folder, FLAGS.num_images, FLAGS.batch_size)
    record = {**describe(kind, ckpt, cfg, folder), **score(images, net, skipped, rt.device)}
    with torch.inference_mode():
        record.update(probe(sampler, model, kind, ckpt, cfg, rt, logdir))
    if FLAGS.pic_or_not:
        grid = torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float() / 127.5 - 1
        save_grid(grid, os.path.join(logdir, "images", os.path.basename(folder)[len("eval_"):] + ".png"))
    if FLAGS.save_images:
        write_images(images, FLAGS.save_images)
    return record


def report(record, path):
    append_jsonl(path, record)
    if record["metrics_skipped"]:
        print(f"FID/IS skipped: {record['metrics_skipped']}")
    else:
        print(f"IS {record['IS']:.4f} +- {record['IS_std']:.4f}   FID {record['FID']:.4f}")
        if record["warning"]:
            print(f"warning: {record['warning']}")
    print(json.dumps(record))
    print(f"appended to {path}")


def main(argv):
    check_flags()
    rt = runtime.setup(FLAGS.seed)
    model, kind, ckpt = load_model(FLAGS.eval_model_path, rt.device, cflags.kernels())
    cfg = cflags.resolve_model_flags(ckpt["flags"], FLAGS.eval_model_path)
    logdir = cflags.logdir()
    net, skipped = prepare_metrics(rt.device, cfg.get("dataset", "cifar10")) if rt.is_main else (None, None)
    sampler = make_sampler(model, cfg, rt)
    folder = shards.shard_folder(logdir, FLAGS.eval_model_path, FLAGS.sampler, network_calls(cfg), FLAGS.eta,
                                 FLAGS.seed, FLAGS.batch_size)
    start = time.time()
    with torch.inference_mode():
        made, reused = generate(sampler, cfg, folder, rt)
    runtime.barrier(rt)  # every rank's shards are on disk
    if rt.is_main:
        record = finish(model, kind, ckpt, cfg, sampler, folder, net, skipped, rt, logdir)
        record.update({"shards_made": made, "shards_reused": reused, "world_size": rt.world_size,  # rank 0's
                       "wall_s": round(time.time() - start, 1),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        report(record, os.path.join(logdir, "snn_eval.txt"))
    runtime.teardown(rt)


if __name__ == "__main__":
    run(main)
