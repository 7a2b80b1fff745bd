"""pytorch-gan-metrics' Inception network (module ``pytorch_image_generation_metrics``).

The network and its weights file are the library's (and so are the IS / FID formulas,
``metrics.scores``), so the numbers are comparable with pytorch-ddpm's and the papers that use
it. The feature loop is ours (a few lines around the library's ``InceptionV3``): the library's own
loop joins torch.distributed collectives whenever a process group exists, and here only rank 0
computes the metrics.
"""
import os
import socket

import numpy as np
import torch

from common.errors import UserError

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_DIM, PROB_DIM = 2048, 1008   # pool3 features (FID) and the 1008-way softmax (IS)


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

    ``images``: uint8 [N, H, W, C] (numpy) or float [N, C, H, W] in [0, 1] (torch), C = 3, or 1
    (grayscale, repeated to three channels, as is usual); the network resizes to 299 x 299 itself.
    """
    feats, probs = [], []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        f, p = model(x.to(device))
        feats.append(f.view(len(x), FID_DIM).double().cpu().numpy())
        probs.append(p.view(len(x), PROB_DIM).double().cpu().numpy())
    return np.concatenate(feats), np.concatenate(probs)
