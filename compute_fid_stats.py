"""Reference statistics for FID: mu and sigma of the Inception pool3 features of a training set.

    python compute_fid_stats.py --dataset=cifar10 --data_dir=./data --out=stats/cifar10.train.npz
    python compute_fid_stats.py --dataset=shapes --out=stats/shapes.train.npz

Every training image, no flip, through pytorch-gan-metrics' Inception network; the file has the
library's format (``mu`` [2048], ``sigma`` [2048, 2048]) and is written atomically.
"""
import numpy as np
import torch
from absl import flags
from torch.utils.data import DataLoader

from common import data, runtime
from common import flags as cflags
from common.errors import UserError, run
from common.progress import progress
from metrics import inception

cflags.define_data_flags()
flags.DEFINE_integer("img_size", 32, help="image size (the size the evaluated model generates)")
flags.DEFINE_string("out", None, help="output .npz (default: stats/<dataset>.train.npz)")
flags.DEFINE_integer("batch_size", 50, help="batch size of the Inception network")
flags.DEFINE_integer("num_images", 0, help="use only the first N training images (0: all)")
flags.register_validator("img_size", lambda v: v >= 4, message="--img_size must be at least 4")
flags.register_validator("batch_size", lambda v: v >= 1, message="--batch_size must be at least 1")
flags.register_validator("num_images", lambda v: v >= 0, message="--num_images must be 0 (all) or more")
cflags.register_file_validator("out")
FLAGS = flags.FLAGS


def dataset_features(net, dataset, device, batch_size, num_workers):
    """Pool3 features [N, 2048] of a dataset of (image [3, H, W] in [-1, 1], label)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats = []
    for x, _ in progress(loader, desc="inception", unit="batch"):
        f, _ = inception.inception_outputs(net, (x + 1) / 2, device, batch_size)
        feats.append(f)
    return np.concatenate(feats)


def main(argv):
    rt = runtime.setup(0)
    out = FLAGS.out or f"stats/{FLAGS.dataset}.train.npz"
    if not cflags.creatable(out, folder=False):  # before hours of features, not after
        raise UserError(f"cannot write {out}: a regular file is in the way of its folder, or it is a folder")
    net = inception.load_inception(rt.device)  # before the dataset: fail fast offline
    dataset = data.load_dataset(FLAGS.dataset, FLAGS.data_dir, FLAGS.img_size, train=True)
    if FLAGS.num_images > 0:
        dataset = torch.utils.data.Subset(dataset, range(min(FLAGS.num_images, len(dataset))))
    feats = dataset_features(net, dataset, rt.device, FLAGS.batch_size, FLAGS.num_workers)
    mu, sigma = inception.feature_statistics(feats)
    inception.save_stats(out, mu, sigma)
    print(f"{len(feats)} {FLAGS.dataset} training images -> {out} (mu {mu.shape}, sigma {sigma.shape})")


if __name__ == "__main__":
    run(main)
