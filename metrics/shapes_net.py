"""Sample quality on the embedded ``shapes`` data with a small feature network of our own.

FID and IS need the Inception network and CIFAR-10, neither of which can always be downloaded.
For the ``shapes`` data (``model.data.draw_shape``) this module trains, in code and
deterministically, a small CNN (``ShapesNet``) that predicts each image's shape class, with
auxiliary heads for the foreground and background colour so that its features also encode colour;
its features pool three resolutions, so they also see noise and blur. Noise images are trained
towards a uniform class prediction, so that noise is not "recognised" as a shape. Trained once
per image size (the whole training split, 4 epochs), it is cached under ``stats/``.

The scores (``metrics.scores``, the same code as for Inception), in this network's outputs:

* FID: the library's formula in the network's D-dimensional pooled features. It reacts to wrong
  colours, blur, noise and wrong shapes.
* IS: the library's Inception-Score formula over the 6 shape classes, exp(E_x KL(p(y|x) || p(y))),
  between 1 and 6 (6: confident predictions, balanced over the classes).
* recognisability: the share of images whose top class probability reaches 0.9.

What they are not: these numbers are only meaningful for images of the ``shapes`` data at the
image size the network was trained for, and only between runs that used the same network
(``features_name`` says which; records should store it). They are not comparable with Inception
FID / IS, with published numbers, or across image sizes. Training is bit-for-bit repeatable on
one machine with one thread count; elsewhere the float kernels differ in the last bits and give a
slightly different network (FIDs a few percent apart), so compare numbers from one cached file.
"""
import hashlib
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.checkpoint import save_atomic
from model.data import SHAPE_CLASSES, SHAPES_SIZE, draw_shape, shape_attributes
from common.errors import UserError

VERSION = "shapes-net-1"  # bump on any change to the architecture or the training code
NUM_CLASSES = len(SHAPE_CLASSES)
NUM_COLOURS = 10
_EXPECTED_SECONDS = 30  # for the log line; measured on 2 idle CPU cores: 8 px ~10 s, 16 px ~23 s, 32 px ~33 s


def training_setup(img_size):
    """Everything that determines the trained weights at ``img_size``; its digest names the cache file."""
    return {"version": VERSION, "img_size": int(img_size), "train_images": SHAPES_SIZE, "epochs": 4,
            "batch_size": 128, "lr": 1e-2, "width": 24, "stem": _stem(img_size), "colour_weight": 0.25,
            "outliers": 16, "outlier_weight": 0.2, "seed": 0}


def _stem(img_size):
    """The number of stride-2 layers before the main body: 0 up to 31 px, 1 for 32..63 px, ...

    The body then sees maps of at most 31 x 31 and training costs about the same at 32 px as at
    16 px (at full resolution the body would cost 4x as much).
    """
    return max(0, (int(img_size) // 16).bit_length() - 1)


def setup_digest(setup):
    """A short checksum (10 hex digits) of a training setup dict."""
    return hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:10]


def features_name(img_size):
    """The name of the feature network for ``img_size``, for records: shapes_net_<size>px_<digest>."""
    return f"shapes_net_{int(img_size)}px_{setup_digest(training_setup(img_size))}"


def cache_path(img_size, cache_dir="stats"):
    """Where ``load_shapes_net`` keeps the trained network for ``img_size``."""
    return os.path.join(cache_dir, features_name(img_size) + ".pt")


def _block(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class ShapesNet(nn.Module):
    """A CNN of 6 + ``stem`` 3x3 conv layers (BatchNorm, ReLU) for any image size >= 8.

    Features [N, D = 7 * width]: the global averages of the three stages' outputs (1, 1/2 and 1/4
    of the resolution after the stem), so that they see fine detail (noise, blur) as well as
    shapes. Heads: the shape class (``forward``) and the foreground / background colours
    (``colour_logits``), trained together so that the features carry colour as well as shape.
    """

    def __init__(self, width=24, stem=0):
        super().__init__()
        w = width
        stem_layers = [_block(3, w // 2)] + [_block(w // 2, w // 2, 2) for _ in range(stem)]
        self.stages = nn.ModuleList([
            nn.Sequential(*stem_layers, _block(w // 2, w)),
            nn.Sequential(_block(w, 2 * w, 2), _block(2 * w, 2 * w)),
            nn.Sequential(_block(2 * w, 4 * w, 2), _block(4 * w, 4 * w))])
        self.dim = 7 * w
        self.shape_head = nn.Linear(self.dim, NUM_CLASSES)
        self.colour_head = nn.Linear(self.dim, 2 * NUM_COLOURS)

    def forward(self, x):
        """x [N, 3, H, W] in [-1, 1] -> (features [N, D], shape class logits [N, 6])."""
        pooled = []
        for stage in self.stages:
            x = stage(x)
            pooled.append(x.mean(dim=(2, 3)))
        feats = torch.cat(pooled, dim=1)
        return feats, self.shape_head(feats)

    def colour_logits(self, feats):
        """features [N, D] -> (foreground colour logits [N, 10], background colour logits [N, 10])."""
        out = self.colour_head(feats)
        return out[:, :NUM_COLOURS], out[:, NUM_COLOURS:]


def _draw(first, count, img_size):
    """uint8 images [count, 3, S, S] and labels [count, 3] of images ``first .. first + count - 1``."""
    numbers = range(first, first + count)
    images = np.stack([draw_shape(i, img_size) for i in numbers])
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([shape_attributes(i) for i in numbers], dtype=torch.int64)
    return images, labels


def draw_images(first, count, img_size):
    """Images ``first .. first + count - 1`` as float [count, 3, S, S] in [-1, 1] and their labels
    [count, 3] (int64: shape class, foreground colour, background colour)."""
    images, labels = _draw(first, count, img_size)
    return images.float() / 127.5 - 1, labels


def to_model_input(images):
    """uint8 numpy [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]; float tensors pass unchanged."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise UserError(f"numpy images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images.float()


def noise_images(count, img_size, gen):
    """Images [count, 3, S, S] in [-1, 1] that show no shape: a random colour plus Gaussian noise of
    a random strength, pixel by pixel for half of them and smooth (upsampled) for the others."""
    base = torch.rand(count, 3, 1, 1, generator=gen) * 2 - 1
    strength = torch.rand(count, 1, 1, 1, generator=gen) * 2
    fine = torch.randn(count, 3, img_size, img_size, generator=gen)
    coarse = torch.randn(count, 3, max(2, img_size // 4), max(2, img_size // 4), generator=gen)
    coarse = F.interpolate(coarse, size=img_size, mode="bilinear", align_corners=False)
    smooth = (torch.arange(count) % 2 == 1)[:, None, None, None]
    return (base + strength * torch.where(smooth, coarse, fine)).clamp(-1, 1)


def _loss(net, x, labels, setup):
    """Cross-entropy of the shape and colour heads; on the trailing outlier images (no labels),
    cross-entropy of the shape head against the uniform distribution."""
    feats, logits = net(x)
    n = len(labels)
    fg, bg = net.colour_logits(feats[:n])
    colour = F.cross_entropy(fg, labels[:, 1]) + F.cross_entropy(bg, labels[:, 2])
    loss = F.cross_entropy(logits[:n], labels[:, 0]) + setup["colour_weight"] * colour
    if len(x) > n:
        # outlier exposure: noise must not look like any shape, so recognisability means something
        loss = loss - setup["outlier_weight"] * F.log_softmax(logits[n:], dim=1).mean()
    return loss


def _batches(x, labels, setup, gen):
    """One epoch of (images [B + outliers, 3, S, S], labels [B, 3]): shuffled, randomly flipped
    left-right, with ``setup["outliers"]`` noise images appended."""
    order = torch.randperm(len(x), generator=gen)
    size = setup["batch_size"]
    for start in range(0, len(x) - size + 1, size):
        idx = order[start:start + size]
        xb = x[idx].float() / 127.5 - 1  # kept as uint8 until here: 4x less memory
        flip = torch.rand(size, generator=gen) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
        if setup["outliers"]:
            xb = torch.cat([xb, noise_images(setup["outliers"], setup["img_size"], gen)])
        yield xb, labels[idx]


def train_shapes_net(setup):
    """A ``ShapesNet`` trained as ``setup`` says (see ``training_setup``), in eval mode on the CPU.

    Deterministic on one machine: the weights, the order of the images, the flips and the noise
    images all come from generators seeded by ``setup["seed"]``; the global RNG state is left as
    it was.
    """
    if setup["train_images"] > SHAPES_SIZE:
        raise UserError(f"the shapes training split has {SHAPES_SIZE} images, not {setup['train_images']}")
    x, labels = _draw(0, setup["train_images"], setup["img_size"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(setup["seed"])
        net = ShapesNet(setup["width"], setup["stem"])
    gen = torch.Generator().manual_seed(setup["seed"])
    opt = torch.optim.Adam(net.parameters(), lr=setup["lr"])
    steps = len(x) // setup["batch_size"] * setup["epochs"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, setup["lr"], total_steps=steps)
    net.train()
    for _ in range(setup["epochs"]):
        for xb, yb in _batches(x, labels, setup, gen):
            loss = _loss(net, xb, yb, setup)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


def _save(net, setup, path):
    """``torch.save`` of the weights with the setup and digest they were trained with, atomically."""
    save_atomic({"setup": setup, "digest": setup_digest(setup), "state_dict": net.state_dict()}, path)


def _read_cached(path, setup):
    """The cached network at ``path`` if it holds ``setup``'s weights; else (None, why not)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["setup"] != setup or state["digest"] != setup_digest(setup):
            return None, "it was trained with another setup"
        net = ShapesNet(setup["width"], setup["stem"])
        net.load_state_dict(state["state_dict"])
    except Exception as err:  # a truncated or foreign file: pickle, zip or key errors
        return None, f"it cannot be read ({type(err).__name__})"
    return net.eval(), None


def load_shapes_net(img_size, cache_dir="stats", device="cpu", log=print):
    """The shapes feature network for ``img_size`` x ``img_size`` images, in eval mode on ``device``.

    Loaded from ``cache_path(img_size, cache_dir)``; trained (~10-35 s on 2 CPU cores) and written
    there, atomically, on first use or when the file there is stale or unreadable (one ``log``
    line each time it trains, nothing when it loads).
    """
    setup = training_setup(img_size)
    path = cache_path(img_size, cache_dir)
    if os.path.exists(path):
        net, why = _read_cached(path, setup)
        if net is not None:
            return net.to(device)
        log(f"retraining the shapes feature network {path}: {why}")
    else:
        log(f"training the shapes feature network for {img_size}x{img_size} images "
            f"(first use, ~{_EXPECTED_SECONDS} s) -> {path}")
    net = train_shapes_net(setup)
    _save(net, setup, path)
    return net.to(device)


@torch.no_grad()
def shapes_outputs(net, images, device="cpu", batch_size=256):
    """Features [N, D] and shape class probabilities [N, 6] (float64 numpy) of ``images``:
    uint8 numpy [N, H, W, 3] or a float tensor [N, 3, H, W] in [-1, 1]."""
    feats, probs = [], []
    for start in range(0, len(images), batch_size):
        x = to_model_input(images[start:start + batch_size]).to(device)
        f, logits = net(x)
        feats.append(f.double().cpu().numpy())
        probs.append(logits.double().softmax(dim=1).cpu().numpy())
    return np.concatenate(feats), np.concatenate(probs)
