"""Reference statistics for FID (``python compute_fid_stats.py``): mu and sigma of a feature
network's features of a dataset's training images.

Every training image, unflipped, as the model sees it (resized and cropped to ``img_size``, with
``img_channels``), through the feature network (``features``: pytorch-gan-metrics' Inception,
grayscale repeated to three channels, or the shapes network for the embedded data,
``docs/metrics.md``). The file has the library's format (``mu``, ``sigma``) plus the network's
name (``features``), and is written atomically; its path is checked before any feature is computed.
"""
from common import configs, runtime
from common.errors import UserError
from common.progress import progress
from metrics import scores
from model import data


def compute_fid_stats(cfg, *, dataset, data_dir="./data"):
    """Write the statistics of ``dataset`` (a name; its images under ``data_dir``) as ``cfg`` (a
    FidStatsConfig) says; returns (path, mu [D], sigma [D, D])."""
    rt = runtime.setup(0)
    kind = scores.feature_kind(cfg.features, dataset)
    try:
        channels = configs.dataset_channels(dataset, cfg.img_channels)
    except ValueError as err:
        raise UserError(str(err)) from None
    out = cfg.out or scores.default_stats_path(kind, dataset, cfg.img_size, data_dir=data_dir,
                                               img_channels=channels)
    if not configs.creatable(out, folder=False):  # before hours of features, not after
        raise UserError(f"cannot write {out}: a regular file is in the way of its folder, or it is a folder")
    net = scores.load_features(kind, cfg.img_size, rt.device, cfg.batch_size)  # fails fast offline
    images = data.load_dataset(dataset, data_dir, cfg.img_size, train=True, channels=channels)
    mu, sigma = scores.dataset_statistics(net, images, cfg.num_images, cfg.batch_size,
                                          lambda it: progress(it, desc=kind, unit="batch"))
    scores.save_stats(out, mu, sigma, net.name)
    print(f"{cfg.num_images or len(images)} {dataset} training images, {net.name} features -> {out} "
          f"(mu {mu.shape}, sigma {sigma.shape})")
    return out, mu, sigma
