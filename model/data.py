"""Training data: torchvision's CIFAR-10, MNIST, Fashion-MNIST and CelebA, any folder of images, or
the embedded ``shapes`` set (``docs/data.md``).

Datasets yield float images [C, H, W] in [-1, 1], C the model's ``img_channels``, resized and
cropped to the model's size as is usual for each set; training batches are flipped left-right at
random as in pytorch-ddpm (``random_flip``). The images of training step ``s`` are a function of
(seed, s) alone (``StepBatchSampler``), so a resumed run sees the batches an uninterrupted run sees.
"""
import contextlib
import functools
import os
import socket

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets, transforms
from torchvision.datasets.celeba import CSV

from common import configs
from common.errors import UserError
from common.runtime import derived_seed, generator

SHAPES_SIZE = 16384
SHAPES_TEST_SIZE = 2048  # held out: images SHAPES_SIZE .. SHAPES_SIZE + SHAPES_TEST_SIZE - 1
_PALETTE = np.array([
    [230, 57, 70], [241, 250, 238], [168, 218, 220], [69, 123, 157], [29, 53, 87],
    [255, 183, 3], [251, 133, 0], [42, 157, 143], [38, 70, 83], [233, 196, 106],
], dtype=np.float32)
SHAPE_CLASSES = ("disk", "square", "ring", "stripes", "diagonal", "cross")


def _attributes(rng, index):
    """The first draws of image ``index``'s generator: (shape class, foreground colour, background colour)."""
    bg, fg = rng.choice(len(_PALETTE), size=2, replace=False)
    return index % len(SHAPE_CLASSES), int(fg), int(bg)


def shape_attributes(index):
    """(shape class in 0..5, foreground colour in 0..9, background colour in 0..9) of image ``index``.

    The labels ``draw_shape`` draws the image from; the two colours always differ.
    """
    return _attributes(np.random.default_rng(index), index)


def draw_shape(index, size=32):
    """Image ``index`` of the embedded dataset: [size, size, 3] uint8, the same on every machine.

    A background colour with a soft vertical gradient and one shape of another colour: a disk,
    a square, a ring, horizontal stripes, a diagonal split or a cross, with random position and
    scale. Class ``index % 6``; everything else comes from a generator seeded by ``index``.
    """
    rng = np.random.default_rng(index)
    label, fg, bg = _attributes(rng, index)
    kind = SHAPE_CLASSES[label]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    cy, cx = rng.uniform(0.3, 0.7, size=2)
    r = rng.uniform(0.15, 0.3)
    if kind == "disk":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
    elif kind == "square":
        mask = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r)
    elif kind == "ring":
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        mask = (d < r + 0.06) & (d > r - 0.06)
    elif kind == "stripes":
        mask = np.floor(yy * rng.integers(2, 5) * 2 + rng.uniform()) % 2 == 0
    elif kind == "diagonal":
        mask = (yy - cy) > (xx - cx) * rng.choice([-1.0, 1.0])
    else:
        mask = (np.abs(yy - cy) < r / 3) | (np.abs(xx - cx) < r / 3)
    shade = 0.8 + 0.4 * yy[..., None]
    img = np.where(mask[..., None], _PALETTE[fg], _PALETTE[bg] * shade)
    return np.clip(img, 0, 255).astype(np.uint8)


class ShapesDataset(Dataset):
    """The embedded synthetic dataset: ``length`` images drawn on demand by ``draw_shape``,
    from image number ``first`` on (the training set starts at 0, the held-out set after it)."""

    def __init__(self, length=SHAPES_SIZE, img_size=32, transform=None, first=0):
        self.length = length
        self.img_size = img_size
        self.transform = transform
        self.first = first

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(f"image {index} of a dataset of {self.length}")
        number = self.first + index
        img = Image.fromarray(draw_shape(number, self.img_size))
        return (self.transform(img) if self.transform else img), number % len(SHAPE_CLASSES)


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


def load_dataset(name, data_dir, img_size=32, train=True, channels=None):
    """The dataset ``name`` (a key of ``configs.DATASET_CHANNELS``) yielding (image [C, H, W] in
    [-1, 1], label), C = ``channels`` (None: the dataset's own).

    ``train=False``: the held-out images (CIFAR-10's test batch, MNIST's and Fashion-MNIST's test
    sets, CelebA's 'valid' partition, a folder's every ``HELD_OUT_EVERY``-th image, the shapes
    after the training ones).
    """
    if name not in configs.DATASET_CHANNELS:
        raise UserError(f"unknown dataset {name!r}: use one of {', '.join(configs.DATASET_CHANNELS)}")
    try:
        channels = configs.dataset_channels(name, channels)
    except ValueError as err:
        raise UserError(str(err)) from None
    transform = image_transform(name, img_size, channels)
    if name == "shapes":
        if train:
            return ShapesDataset(SHAPES_SIZE, img_size, transform)
        return ShapesDataset(SHAPES_TEST_SIZE, img_size, transform, first=SHAPES_SIZE)
    if name == "folder":
        return ImageFiles(data_dir, transform, pillow_mode(channels), train)
    return _torchvision_dataset(name, data_dir, train, transform)


def random_flip(x, generator=None):
    """Each image of x [B, C, H, W] mirrored left-right with probability 1/2 (draws from ``generator``)."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class StepBatchSampler(Sampler):
    """Index batches for training steps ``start_step, start_step + 1, ...`` (endless).

    The global batch of step s is slice ``s mod E`` of epoch ``s // E``'s permutation (E whole
    batches an epoch, the rest dropped), each permutation seeded by (seed, epoch). Under
    torchrun, rank r takes the r-th of ``world_size`` equal parts of it.
    """

    def __init__(self, size, batch_size, seed=0, start_step=0, rank=0, world_size=1):
        if batch_size % world_size:
            raise UserError(f"--batch_size={batch_size} must be divisible by the {world_size} processes")
        if size < batch_size:
            raise UserError(f"the dataset has {size} images, fewer than one batch of {batch_size}")
        self.size, self.batch_size, self.seed, self.start_step = size, batch_size, seed, start_step
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        per_epoch, part = self.size // self.batch_size, self.batch_size // self.world_size
        epoch, order, step = None, None, self.start_step
        while True:
            if step // per_epoch != epoch:
                epoch = step // per_epoch
                order = torch.randperm(self.size, generator=generator(derived_seed(self.seed, epoch)))
            first = (step % per_epoch) * self.batch_size + self.rank * part
            yield order[first:first + part].tolist()
            step += 1


def training_batches(dataset, batch_size, rt, num_workers=0, seed=0, start_step=0):
    """Endless stream of this rank's images [batch_size / world_size, C, H, W] on ``rt.device``,
    from training step ``start_step`` on (unflipped: ``random_flip`` them)."""
    sampler = StepBatchSampler(len(dataset), batch_size, seed, start_step, rt.rank, rt.world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                        pin_memory=rt.device.type == "cuda", persistent_workers=num_workers > 0)
    try:
        for x, _ in loader:
            yield x.to(rt.device, non_blocking=True)
    except UserError as err:  # from a worker, its message carries the worker's traceback: keep its last line
        raise UserError(str(err).strip().splitlines()[-1].split("UserError: ", 1)[-1]) from None
