"""FID and IS with pytorch-gan-metrics' Inception network (module ``pytorch_image_generation_metrics``).

The network, its weights file and the IS / FID formulas are the library's, so the numbers are
comparable with pytorch-ddpm's and the papers that use it. The feature loop is ours (a few lines
around the library's ``InceptionV3``): the library's own loop joins torch.distributed collectives
whenever a process group exists, and here only rank 0 computes the metrics.
"""
import os
import socket

import numpy as np
import torch

from common.atomic import atomic_open
from common.errors import UserError

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_DIM, PROB_DIM = 2048, 1008   # pool3 features (FID) and the 1008-way softmax (IS)


def stats_command(dataset, path):
    """The command that computes the FID statistics file ``path`` of ``dataset``."""
    data_dir = " --data_dir=./data" if dataset == "cifar10" else ""  # the shapes are drawn in code
    return f"python compute_fid_stats.py --dataset={dataset}{data_dir} --out={path}"


def weights_path():
    """Where torch.hub keeps the Inception weights: $TORCH_HOME/hub/checkpoints/<name>."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_NAME)


def weights_help(reason):
    from pytorch_image_generation_metrics.inception import FID_WEIGHTS_URL
    return (f"the Inception weights for FID/IS are not available ({reason}): put {WEIGHTS_NAME} at "
            f"{weights_path()} (TORCH_HOME defaults to ~/.cache/torch; download it on a machine with "
            f"network access from {FID_WEIGHTS_URL})")


def load_inception(device, download_timeout=30.0):
    """The library's ``InceptionV3`` returning [pool3 features, softmax], in eval mode on ``device``.

    torch.hub loads the weights from ``weights_path()``, downloading them when absent; a
    missing file that cannot be downloaded, or a broken one, is a ``UserError`` naming the file.
    """
    from pytorch_image_generation_metrics.inception import InceptionV3
    blocks = [InceptionV3.BLOCK_INDEX_BY_DIM[FID_DIM], InceptionV3.BLOCK_INDEX_BY_DIM[PROB_DIM]]
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(download_timeout)  # a firewall that drops packets must not hang us
    try:
        model = InceptionV3(blocks)
    except Exception as err:  # URLError offline, RuntimeError / pickle errors for a broken file
        present = "present but unreadable" if os.path.exists(weights_path()) else "missing and not downloadable"
        raise UserError(weights_help(f"{present}: {type(err).__name__}: {err}")) from None
    finally:
        socket.setdefaulttimeout(previous)
    return model.to(device).eval()


@torch.no_grad()
def inception_outputs(model, images, device, batch_size=50):
    """Pool3 features [N, 2048] and class probabilities [N, 1008] (float64 numpy).

    ``images``: uint8 [N, H, W, 3] (numpy) or float [N, 3, H, W] in [0, 1] (torch); the network
    resizes to 299 x 299 itself.
    """
    feats, probs = [], []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
        f, p = model(x.to(device))
        feats.append(f.view(len(x), FID_DIM).double().cpu().numpy())
        probs.append(p.view(len(x), PROB_DIM).double().cpu().numpy())
    return np.concatenate(feats), np.concatenate(probs)


def inception_score(probs, splits=10):
    """(IS, std over ``splits`` groups) with the library's formula; needs >= ``splits`` images."""
    from pytorch_image_generation_metrics.core import calculate_inception_score
    if len(probs) < splits:
        raise UserError(f"the Inception Score needs at least --is_splits={splits} images, got {len(probs)}")
    return calculate_inception_score(probs, splits)


def fid_from_features(feats, mu, sigma):
    """FID of features [N, 2048] against reference statistics (mu [2048], sigma [2048, 2048]).

    N > 2048: the library's numpy formula (scipy's sqrtm of sigma1 sigma2), as published FIDs.
    N <= 2048: sigma1 = A^T A / (N - 1) (A: centred features) has rank < 2048, and sqrtm of
    the singular product is slow and ill-conditioned; tr sqrt(sigma1 sigma2) is then taken
    exactly from the eigenvalues of the N x N matrix A sigma2 A^T / (N - 1), which are the
    non-zero eigenvalues of sigma1 sigma2.
    """
    if len(feats) < 2:
        raise UserError(f"FID needs at least 2 images, got {len(feats)}")
    if len(feats) > FID_DIM:
        from pytorch_image_generation_metrics.core import calculate_frechet_inception_distance
        return float(calculate_frechet_inception_distance(feats, mu, sigma))
    return low_rank_frechet_distance(feats, mu, sigma)


def low_rank_frechet_distance(feats, mu, sigma):
    """Frechet distance between N < dim samples [N, dim] and (mu, sigma), via an N x N eigenproblem."""
    feats = np.asarray(feats, dtype=np.float64)
    centred = feats - feats.mean(axis=0)
    small = centred @ sigma @ centred.T / (len(feats) - 1)  # [N, N], symmetric PSD
    eig = np.clip(np.linalg.eigvalsh((small + small.T) / 2), 0, None)
    diff = feats.mean(axis=0) - mu
    trace1 = np.sum(centred ** 2) / (len(feats) - 1)
    return float(diff @ diff + trace1 + np.trace(sigma) - 2 * np.sum(np.sqrt(eig)))


def feature_statistics(feats):
    """mu [2048] and sigma [2048, 2048] of features [N, 2048], as the library computes them."""
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def save_stats(path, mu, sigma):
    """Write ``mu`` and ``sigma`` into ``path`` (.npz, the library's format), atomically."""
    with atomic_open(path) as f:
        np.savez_compressed(f, mu=mu, sigma=sigma)


def check_stats(path, dataset="cifar10"):
    """Raise a ``UserError`` naming the statistics command when ``path`` is absent."""
    if not os.path.isfile(path):
        raise UserError(f"no FID statistics at {path}; compute them with: "
                        f"{stats_command(dataset, path)}")


def load_stats(path, dataset="cifar10"):
    """(mu [2048], sigma [2048, 2048]) from a statistics file; errors name the path (and, when it
    is absent, the command that computes it for ``dataset``)."""
    check_stats(path, dataset)
    try:
        with np.load(path) as f:
            mu, sigma = f["mu"], f["sigma"]
    except Exception as err:
        raise UserError(f"cannot read FID statistics {path} ({type(err).__name__}: {err}); "
                        f"recompute them with compute_fid_stats.py") from None
    if mu.shape != (FID_DIM,) or sigma.shape != (FID_DIM, FID_DIM):
        raise UserError(f"{path} holds mu {mu.shape} and sigma {sigma.shape}, expected ({FID_DIM},) and "
                        f"({FID_DIM}, {FID_DIM})")
    return mu, sigma


def evaluate_images(model, images, stats_path, device, splits=10, batch_size=50):
    """IS, IS std and FID of uint8 images [N, H, W, 3], with a warning below 2,048 images."""
    mu, sigma = load_stats(stats_path)
    feats, probs = inception_outputs(model, images, device, batch_size)
    score, std = inception_score(probs, splits)
    result = {"IS": score, "IS_std": std, "FID": fid_from_features(feats, mu, sigma), "warning": None}
    if len(images) <= FID_DIM:
        result["warning"] = (f"FID from {len(images)} images (<= {FID_DIM}): the feature covariance is singular "
                             "and the FID biased upwards; not comparable with 50,000-image FIDs")
    return result
