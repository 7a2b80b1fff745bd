"""Reference statistics for FID: mu and sigma of a feature network's features of the training images.

    python compute_fid_stats.py --dataset=cifar10 --data_dir=./data --out=stats/cifar10.train.npz
    python compute_fid_stats.py --dataset=celeba --data_dir=./data --img_size=64   # stats/celeba64px.train.npz
    python compute_fid_stats.py --dataset=shapes --img_size=16          # the shapes network's

Every training image, unflipped, as the model sees it (resized and cropped to ``--img_size``,
``--img_channels``), through the feature network (``--features``: pytorch-gan-metrics'
Inception, grayscale repeated to three channels, or the shapes network for the embedded data,
``docs/metrics.md``). The file has the library's format (``mu``, ``sigma``) plus the network's
name (``features``), and is written atomically; its path is checked before any feature is computed.
The work is ``metrics.fid_stats.compute_fid_stats``.
"""
from common import flags as cflags
from metrics.fid_stats import compute_fid_stats

cflags.flags_of("compute_fid_stats.py")


def main(argv):
    compute_fid_stats(**cflags.fid_stats_settings())


if __name__ == "__main__":
    cflags.run(main)
