"""Reference statistics for FID: mu and sigma of a feature network's features of the training images.

    python compute_fid_stats.py --dataset=cifar10 --data_dir=./data --out=stats/cifar10.train.npz
    python compute_fid_stats.py --dataset=celeba --data_dir=./data --img_size=64   # stats/celeba64px.train.npz
    python compute_fid_stats.py --dataset=shapes --img_size=16          # the shapes network's

Every training image, unflipped, as the model sees it (resized and cropped to ``--img_size``,
``--img_channels``), through the feature network (``--features``: pytorch-gan-metrics'
Inception, grayscale repeated to three channels, or the shapes network for the embedded data,
``docs/metrics.md``). The file has the library's format (``mu``, ``sigma``) plus the network's
name (``features``), and is written atomically; its path is checked before any feature is computed.
"""
from absl import flags

from common import configs, runtime
from model import data
from common import flags as cflags
from common.errors import UserError
from common.progress import progress
from metrics import scores

cflags.flags_of("compute_fid_stats.py")
FLAGS = flags.FLAGS


def main(argv):
    rt = runtime.setup(0)
    kind = scores.feature_kind(FLAGS.features, FLAGS.dataset)
    try:
        channels = configs.dataset_channels(FLAGS.dataset, FLAGS.img_channels)
    except ValueError as err:
        raise UserError(str(err)) from None
    out = FLAGS.out or scores.default_stats_path(kind, FLAGS.dataset, FLAGS.img_size, data_dir=FLAGS.data_dir,
                                                 img_channels=channels)
    if not configs.creatable(out, folder=False):  # before hours of features, not after
        raise UserError(f"cannot write {out}: a regular file is in the way of its folder, or it is a folder")
    net = scores.load_features(kind, FLAGS.img_size, rt.device, FLAGS.batch_size)  # fails fast offline
    dataset = data.load_dataset(FLAGS.dataset, FLAGS.data_dir, FLAGS.img_size, train=True, channels=channels)
    mu, sigma = scores.dataset_statistics(net, dataset, FLAGS.num_images, FLAGS.batch_size,
                                          lambda it: progress(it, desc=kind, unit="batch"))
    scores.save_stats(out, mu, sigma, net.name)
    print(f"{FLAGS.num_images or len(dataset)} {FLAGS.dataset} training images, {net.name} features -> {out} "
          f"(mu {mu.shape}, sigma {sigma.shape})")


if __name__ == "__main__":
    cflags.run(main)
