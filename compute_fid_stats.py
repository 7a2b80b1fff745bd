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
from common.errors import UserError, run
from common.progress import progress
from metrics import scores

cflags.define_data_flags()
flags.DEFINE_integer("img_size", 32, help="image size (the size the evaluated model generates)")
flags.DEFINE_integer("img_channels", None, help="image channels of the evaluated model: 1 or 3; default: the "
                     "dataset's (a folder's images are RGB, or grayscale with --img_channels=1)")
flags.DEFINE_enum("features", "auto", list(scores.FEATURES),
                  help="feature network: inception (pytorch-gan-metrics), shapes (the project's network for the "
                       "shapes data) or auto (shapes for --dataset=shapes, else inception)")
flags.DEFINE_string("out", None, help="output .npz (default: where evaluate.py looks for it, under stats/)")
flags.DEFINE_integer("batch_size", 50, help="batch size of the feature network")
flags.DEFINE_integer("num_images", 0, help="use only the first N training images (0: all)")
flags.register_validator("img_size", lambda v: v >= 4, message="--img_size must be at least 4")
flags.register_validator("img_channels", lambda c: c is None or c in (1, 3),
                         message="--img_channels must be 1 (grayscale) or 3 (RGB)")
flags.register_validator("batch_size", lambda v: v >= 1, message="--batch_size must be at least 1")
flags.register_validator("num_images", lambda v: v >= 0, message="--num_images must be 0 (all) or more")
cflags.register_file_validator("out")
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
    if not cflags.creatable(out, folder=False):  # before hours of features, not after
        raise UserError(f"cannot write {out}: a regular file is in the way of its folder, or it is a folder")
    net = scores.load_features(kind, FLAGS.img_size, rt.device, FLAGS.batch_size)  # fails fast offline
    dataset = data.load_dataset(FLAGS.dataset, FLAGS.data_dir, FLAGS.img_size, train=True, channels=channels)
    mu, sigma = scores.dataset_statistics(net, dataset, FLAGS.num_images, FLAGS.batch_size,
                                          lambda it: progress(it, desc=kind, unit="batch"))
    scores.save_stats(out, mu, sigma, net.name)
    print(f"{FLAGS.num_images or len(dataset)} {FLAGS.dataset} training images, {net.name} features -> {out} "
          f"(mu {mu.shape}, sigma {sigma.shape})")


if __name__ == "__main__":
    run(main)
