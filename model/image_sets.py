"""Image datasets read from files, through torchvision: CIFAR-10, MNIST, Fashion-MNIST, CelebA and
any folder of images (``docs/data.md``), with the transforms that bring each to the model's size
and channels. ``model.data.load_dataset`` imports this module for those sets only, so a run on the
embedded shapes (and every process that reads no data set) starts without importing torchvision.
"""
import contextlib
import functools
import os
import socket

import torch
from PIL import Image
from torchvision import datasets, transforms
from torchvision.datasets.celeba import CSV

from common.errors import UserError


class _CIFAR10Folder(datasets.CIFAR10):
    """torchvision's CIFAR10 that accepts a folder holding every file of its layout.

    torchvision checks the md5 of each extracted file; a folder written by another tool in the
    same format (or a test's small one) is accepted when every file is present. The download
    itself is still checked against the archive's md5.
    """

    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


class _CelebAFolder(datasets.CelebA):
    """torchvision's CelebA needing only ``celeba/img_align_celeba/`` and ``list_eval_partition.txt``.

    Images come without labels (label 0): the attribute, identity, box and landmark lists are read
    when present and taken as empty when not, and no list file's md5 is checked, so a folder with
    the aligned images and the partition file (a test's small one too) is accepted. A download
    fetches and checks every file as torchvision does. ``train=False``: the 'valid' partition.
    """

    PARTITION = "list_eval_partition.txt"

    def __init__(self, root, train=True, download=False, transform=None):
        super().__init__(root, split="train" if train else "valid", target_type=[], transform=transform,
                         download=download)

    def _check_integrity(self):
        folder = os.path.join(self.root, self.base_folder)
        return (os.path.isfile(os.path.join(folder, self.PARTITION))
                and os.path.isdir(os.path.join(folder, "img_align_celeba")))

    def _load_csv(self, filename, header=None):
        if filename == self.PARTITION or os.path.isfile(os.path.join(self.root, self.base_folder, filename)):
            return super()._load_csv(filename, header)
        names = super()._load_csv(self.PARTITION).index
        return CSV([], names, torch.zeros(len(names), 0, dtype=torch.long))

    def __getitem__(self, index):
        return super().__getitem__(index)[0], 0


def _mnist_layout(folder):
    return "{root}/" + folder + "/raw/ with train-images-idx3-ubyte, train-labels-idx1-ubyte, " \
           "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (the unpacked .gz files)"


# name -> (torchvision class taking root/train/download/transform, its name, the files it needs under {root})
_TORCHVISION = {
    "cifar10": (_CIFAR10Folder, "CIFAR-10",
                "{root}/cifar-10-batches-py/ with data_batch_1..5, test_batch, batches.meta"),
    "mnist": (datasets.MNIST, "MNIST", _mnist_layout("MNIST")),
    "fashion_mnist": (datasets.FashionMNIST, "Fashion-MNIST", _mnist_layout("FashionMNIST")),
    "celeba": (_CelebAFolder, "CelebA",
               "{root}/celeba/img_align_celeba/*.jpg and {root}/celeba/list_eval_partition.txt"),
}
DOWNLOAD_TIMEOUT_S = 30.0   # per socket operation: a firewall that drops packets must not hang a run
HELD_OUT_EVERY = 20         # a folder's held-out split: its 20th, 40th, ... image in sorted order
CELEBA_CROP = 140           # px of the centre of the aligned 178 x 218 CelebA images kept (then resized)


def one_line(err):
    """``Type: message`` of an exception on one line (download errors span several)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}" + ("..." if len(text) > 300 else "")


@contextlib.contextmanager
def _socket_timeout(seconds):
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _torchvision_dataset(name, data_dir, train, transform):
    """torchvision's dataset ``name`` from ``data_dir``, downloaded there when absent and possible."""
    cls, title, layout = _TORCHVISION[name]
    try:
        return cls(root=data_dir, train=train, download=False, transform=transform)
    except RuntimeError:  # torchvision's "not found": download it
        pass
    except Exception as err:  # there, but not in the format torchvision reads
        raise UserError(f"cannot read {title} in {os.path.abspath(data_dir)} ({one_line(err)}); torchvision's "
                        f"layout is {layout.format(root=data_dir)}") from None
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            return cls(root=data_dir, train=train, download=True, transform=transform)
    except Exception as err:
        raise UserError(f"{title} is not in {os.path.abspath(data_dir)} and could not be downloaded "
                        f"({one_line(err)}); put torchvision's layout there ({layout.format(root=data_dir)}) "
                        "or run with --dataset=shapes") from None


def _load_image(path, mode):
    """The image file ``path`` as a PIL image of ``mode``; an unreadable file is a ``UserError``."""
    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except Exception as err:  # UnidentifiedImageError, truncated data, SyntaxError of a broken PNG, ...
        raise UserError(f"cannot read the image {path} ({one_line(err)}): replace or remove it") from None


def verify_images(paths):
    """Check that Pillow recognises every file of ``paths`` (header and structure, not every
    pixel), so that a broken one is a ``UserError`` naming it before training starts."""
    for path in paths:
        try:
            with Image.open(path) as img:
                img.verify()
        except Exception as err:
            raise UserError(f"cannot read the image {path} ({one_line(err)}): replace or remove it") from None


class ImageFiles(datasets.DatasetFolder):
    """Every image file below ``root``, recursively, in sorted order, as (image, 0).

    The files torchvision's ``ImageFolder`` reads (``IMG_EXTENSIONS``), at any depth: its
    class-folder layout is one case of it. Every ``HELD_OUT_EVERY``-th file is the held-out split
    (``train=False``), the others the training split. Images are converted to Pillow's ``mode``
    ('RGB' or 'L'). A missing or empty folder and a file Pillow cannot read are ``UserError``s.
    """

    def __init__(self, root, transform=None, mode="RGB", train=True):
        if not root or not os.path.isdir(root):
            raise UserError(f"--data_dir {os.path.abspath(root or '')} is not a folder: give the folder of your "
                            "images")
        super().__init__(root, functools.partial(_load_image, mode=mode), datasets.folder.IMG_EXTENSIONS,
                         transform=transform, allow_empty=True)
        if not self.samples:
            raise UserError(f"no image files below {os.path.abspath(root)} (looked for "
                            f"{', '.join(datasets.folder.IMG_EXTENSIONS)} at any depth)")
        held_out = [i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 for i in range(len(self.samples))]
        self.samples = [s for s, out in zip(self.samples, held_out) if out != train]
        if not self.samples:
            raise UserError(f"{os.path.abspath(root)} has {len(held_out)} images, too few to hold any out "
                            f"(every {HELD_OUT_EVERY}th is)")
        self.targets = [target for _, target in self.samples]
        verify_images([path for path, _ in self.samples])

    def find_classes(self, directory):
        """One class, the folder itself: every image below it, at any depth, is a sample."""
        return [""], {"": 0}


def pillow_mode(channels):
    """Pillow's image mode of ``channels`` (1 or 3) channels: 'L' (grayscale) or 'RGB'."""
    return "L" if channels == 1 else "RGB"


class _Convert:
    """PIL image -> PIL image of ``mode`` (a picklable transform, for the loader's worker processes)."""

    def __init__(self, mode):
        self.mode = mode

    def __call__(self, img):
        return img if img.mode == self.mode else img.convert(self.mode)


def _finish(channels):
    """PIL image -> [channels, H, W] in [-1, 1]."""
    return [transforms.ToTensor(), transforms.Normalize((0.5,) * channels, (0.5,) * channels)]


def to_tensor(img_size, channels=3):
    """PIL image of ``img_size`` (or 32 px, then resized) -> [channels, img_size, img_size] in [-1, 1]."""
    steps = [transforms.Resize(img_size)] if img_size != 32 else []
    return transforms.Compose([_Convert(pillow_mode(channels)), *steps, *_finish(channels)])


def image_transform(name, img_size, channels):
    """The PIL -> [channels, img_size, img_size] transform of dataset ``name``.

    MNIST / Fashion-MNIST: the 28 px digits padded by 2 (black) to 32, or resized to another size;
    CelebA: the central ``CELEBA_CROP`` px square, resized; a folder: the shorter side resized,
    then the centre cropped; CIFAR-10 (32 px) resized when another size is asked for; shapes are
    drawn at their size.
    """
    if name in ("mnist", "fashion_mnist"):
        steps = [transforms.Pad(2)] if img_size == 32 else [transforms.Resize(img_size)]
    elif name == "celeba":
        steps = [transforms.CenterCrop(CELEBA_CROP), transforms.Resize(img_size)]
    elif name == "folder":
        steps = [transforms.Resize(img_size), transforms.CenterCrop(img_size)]
    else:
        return to_tensor(img_size, channels)
    return transforms.Compose([_Convert(pillow_mode(channels)), *steps, *_finish(channels)])


def load_image_set(name, data_dir, img_size, train, channels):
    """The dataset ``name`` (cifar10, mnist, fashion_mnist, celeba or folder) under ``data_dir`` as
    ``model.data.load_dataset`` describes it, ``channels`` resolved."""
    transform = image_transform(name, img_size, channels)
    if name == "folder":
        return ImageFiles(data_dir, transform, pillow_mode(channels), train)
    return _torchvision_dataset(name, data_dir, train, transform)
