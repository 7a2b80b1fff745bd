"""FID, IS and recognisability in the features of a feature network (``docs/metrics.md``).

Two feature networks, one code path: pytorch-gan-metrics' Inception (every dataset but the
shapes, grayscale images repeated to three channels; its pool3 features and 1008-way softmax,
the numbers papers report) and the project's own ``shapes``
network (``metrics.shapes_net``; its pooled features and 6-way shape softmax, meaningful for the
embedded data only). FID and IS are the library's formulas on either network's outputs; every
score and every statistics file carries the network's ``name``, so a shapes FID is never read as
an Inception FID.
"""
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from common.atomic import atomic_open
from common.configs import FEATURES  # noqa: F401 (the choices of --features)
from common.errors import UserError
INCEPTION_NAME = "inception_v3_pool3"


@dataclass(frozen=True)
class FeatureNet:
    """A feature network: ``outputs(uint8 images [N, H, W, C]) -> (features [N, dim], probs [N, classes])``."""
    name: str
    dim: int
    outputs: Callable
    recognises: bool    # its classes are the data's own (shapes): a recognisability score is meaningful


def feature_kind(kind, dataset):
    """``inception`` or ``shapes`` for ``--features`` (``auto``: the shapes network for the shapes
    data); the shapes network for other data is a ``UserError``: it knows only the shapes."""
    if kind == "auto":
        return "shapes" if dataset == "shapes" else "inception"
    if kind == "shapes" and dataset != "shapes":
        raise UserError(f"--features=shapes scores the shapes data only, not {dataset}: use --features=inception")
    return kind


def load_features(kind, img_size, device, batch_size=50, cache_dir="stats"):
    """The ``FeatureNet`` of ``kind`` for ``img_size`` images on ``device``; ``UserError`` when the
    Inception weights are not there (the shapes network is trained on first use)."""
    if kind == "inception":
        from metrics import inception
        net = inception.load_inception(device)
        return FeatureNet(INCEPTION_NAME, inception.FID_DIM,
                          lambda images: inception.inception_outputs(net, images, device, batch_size), False)
    from metrics import shapes_net
    net = shapes_net.load_shapes_net(img_size, cache_dir, device)
    return FeatureNet(shapes_net.features_name(img_size), net.dim,
                      lambda images: shapes_net.shapes_outputs(net, images, device), True)


def default_stats_path(kind, dataset, img_size, cache_dir="stats", data_dir=None, img_channels=3):
    """Where the reference statistics of ``dataset``'s training images live by default: the seed's
    ``stats/cifar10.train.npz`` for 32x32 CIFAR-10 with Inception, ``stats/<dataset><size>px.train.npz``
    at other sizes, ``stats/folder_<name of data_dir><size>px[_gray].train.npz`` for a folder;
    for the shapes named after the network (its name holds the digest of its training setup)."""
    if kind == "inception":
        size = "" if img_size == 32 else f"{img_size}px"
        if dataset == "folder":
            name = os.path.basename(os.path.abspath(data_dir or "."))
            return os.path.join(cache_dir, f"folder_{name}{size}{'_gray' if img_channels == 1 else ''}.train.npz")
        return os.path.join(cache_dir, f"{dataset}{size}.train.npz")
    from metrics import shapes_net
    return os.path.join(cache_dir, f"{dataset}.{shapes_net.features_name(img_size)}.train.npz")


def stats_command(dataset, img_size, kind, path):
    """The command that computes the statistics file ``path``."""
    data_dir = "" if dataset == "shapes" else " --data_dir=./data"  # the shapes are drawn in code
    return (f"python compute_fid_stats.py --dataset={dataset}{data_dir} --img_size={img_size} "
            f"--features={kind} --out={path}")


def reference_statistics(net, kind, dataset, img_size, path=None, log=print, img_channels=3):
    """((mu, sigma), path) of ``dataset``'s training images in ``net``'s features, from ``path``
    (default: ``default_stats_path``; a folder has none: its images are the user's). For the
    shapes network the default file is computed on first use (seconds); anything else must be
    there (``UserError`` naming the command)."""
    default = path is None
    if default and dataset == "folder":
        gray = " --img_channels=1" if img_channels == 1 else ""
        raise UserError("a model of --dataset=folder has no default FID statistics: compute them with "
                        f"python compute_fid_stats.py --dataset=folder --data_dir=<your images> --img_size={img_size}"
                        f"{gray} and give the file it writes as --fid_cache")
    path = path or default_stats_path(kind, dataset, img_size)
    if kind == "shapes" and default and not os.path.exists(path):
        from model import data
        log(f"computing the statistics of the {dataset} training images in {net.name} features -> {path}")
        save_stats(path, *dataset_statistics(net, data.load_dataset(dataset, None, img_size, train=True)), net.name)
    return load_stats(path, net, stats_command(dataset, img_size, kind, path)), path


def feature_statistics(feats):
    """mu [D] and sigma [D, D] of features [N, D], as the library computes them."""
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def save_stats(path, mu, sigma, features):
    """Write ``mu``, ``sigma`` and the feature network's name into ``path`` (.npz), atomically."""
    with atomic_open(path) as f:
        np.savez_compressed(f, mu=mu, sigma=sigma, features=np.array(features))


def load_stats(path, net=None, command=None):
    """(mu [D], sigma [D, D]) from a statistics file; a missing, unreadable or foreign file (another
    network's, or of another dimension than ``net``'s) is a ``UserError`` naming ``path`` (and
    ``command``, the one that makes it)."""
    if not os.path.isfile(path):
        raise UserError(f"no FID statistics at {path}" + (f"; compute them with: {command}" if command else ""))
    try:
        with np.load(path) as f:
            mu, sigma = f["mu"], f["sigma"]
            name = str(f["features"]) if "features" in f.files else INCEPTION_NAME
    except Exception as err:
        raise UserError(f"cannot read FID statistics {path} ({type(err).__name__}: {err}; it needs 'mu' and "
                        f"'sigma'); recompute them with compute_fid_stats.py") from None
    if net is not None and (name != net.name or mu.shape != (net.dim,) or sigma.shape != (net.dim, net.dim)):
        raise UserError(f"{path} holds statistics of {name} (mu {mu.shape}), not of {net.name} ({net.dim} "
                        f"features): recompute them" + (f" with: {command}" if command else ""))
    return mu, sigma


def fid_from_features(feats, mu, sigma):
    """FID of features [N, D] against reference statistics (mu [D], sigma [D, D]).

    N > D: the library's formula (scipy's sqrtm of sigma1 sigma2), as published FIDs.
    N <= D: sigma1 = A^T A / (N - 1) (A: centred features) has rank < D, and sqrtm of the singular
    product is slow and ill-conditioned; tr sqrt(sigma1 sigma2) is then taken exactly from the
    eigenvalues of the N x N matrix A sigma2 A^T / (N - 1), the non-zero eigenvalues of sigma1 sigma2.
    """
    if len(feats) < 2:
        raise UserError(f"FID needs at least 2 images, got {len(feats)}")
    if len(feats) > feats.shape[1]:
        from pytorch_image_generation_metrics.core import calculate_frechet_distance
        return float(calculate_frechet_distance(*feature_statistics(feats), mu, sigma))
    return low_rank_frechet_distance(feats, mu, sigma)


def low_rank_frechet_distance(feats, mu, sigma):
    """Frechet distance between N <= dim samples [N, dim] and (mu, sigma), via an N x N eigenproblem."""
    feats = np.asarray(feats, dtype=np.float64)
    centred = feats - feats.mean(axis=0)
    small = centred @ sigma @ centred.T / (len(feats) - 1)  # [N, N], symmetric PSD
    eig = np.clip(np.linalg.eigvalsh((small + small.T) / 2), 0, None)
    diff = feats.mean(axis=0) - mu
    trace1 = np.sum(centred ** 2) / (len(feats) - 1)
    return float(diff @ diff + trace1 + np.trace(sigma) - 2 * np.sum(np.sqrt(eig)))


def inception_score(probs, splits=10):
    """(IS, std over ``splits`` groups) with the library's formula, for any number of classes."""
    from pytorch_image_generation_metrics.core import calculate_inception_score
    if len(probs) < splits:
        raise UserError(f"the Inception Score needs at least --is_splits={splits} images, got {len(probs)}")
    return calculate_inception_score(np.clip(probs, 1e-300, None), splits)  # 0 log 0 = 0, not nan


def recognisability(probs, threshold=0.9):
    """The share of images whose top class probability (probs [N, C]) is >= ``threshold``."""
    return float(np.mean(np.max(probs, axis=1) >= threshold))


def evaluate_images(net, images, stats, splits=10):
    """Scores of uint8 images [N, H, W, C] in ``net``'s features against ``stats`` (mu, sigma).

    Returns ``features``, ``FID``, ``IS`` and ``IS_std`` (over the network's classes),
    ``recognisability`` (shapes network only) and a ``warning`` when N <= the feature dimension.
    """
    feats, probs = net.outputs(images)
    score, std = inception_score(probs, splits)
    result = {"features": net.name, "FID": fid_from_features(feats, *stats), "IS": score, "IS_std": std,
              "recognisability": recognisability(probs) if net.recognises else None, "warning": None}
    if len(images) <= net.dim:
        result["warning"] = (f"FID from {len(images)} images (<= {net.dim} feature dimensions): the feature "
                             "covariance is singular and the FID biased upwards; compare only runs of as many images")
    return result


def dataset_statistics(net, dataset, num_images=0, batch_size=256, progress=None):
    """(mu, sigma) of ``net``'s features of a dataset's images (its first ``num_images``, 0: all).

    The images go through uint8, as generated images do. ``progress`` wraps the batch loop.
    """
    from metrics.shards import to_uint8
    count = len(dataset) if num_images <= 0 else min(num_images, len(dataset))
    starts = range(0, count, batch_size)
    feats = []
    for start in (progress(starts) if progress else starts):
        x = torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, count))])
        feats.append(net.outputs(to_uint8(x))[0])
    return feature_statistics(np.concatenate(feats))

