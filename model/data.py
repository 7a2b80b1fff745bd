"""Training data: torchvision's CIFAR-10, MNIST, Fashion-MNIST and CelebA, any folder of images, or
the embedded ``shapes`` set (``docs/data.md``).

Datasets yield float images [C, H, W] in [-1, 1], C the model's ``img_channels``, resized and
cropped to the model's size as is usual for each set; training batches are flipped left-right at
random as in pytorch-ddpm (``random_flip``). The images of training step ``s`` are a function of
(seed, s) alone (``StepBatchSampler``), so a resumed run sees the batches an uninterrupted run sees.
"""
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

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


def to_unit_tensor(img):
    """An RGB PIL image [H, W] -> [3, H, W] in [-1, 1]: torchvision's ``ToTensor`` then
    ``Normalize(0.5, 0.5)``, the same operations on the same values (bit for bit), without importing it."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).view(img.size[1], img.size[0], 3)
    return x.permute(2, 0, 1).contiguous().float().div(255).sub_(0.5).div_(0.5)


def load_dataset(name, data_dir, img_size=32, train=True, channels=None):
    """The dataset ``name`` (a key of ``configs.DATASET_CHANNELS``) yielding (image [C, H, W] in
    [-1, 1], label), C = ``channels`` (None: the dataset's own).

    ``train=False``: the held-out images (CIFAR-10's test batch, MNIST's and Fashion-MNIST's test
    sets, CelebA's 'valid' partition, a folder's every ``image_sets.HELD_OUT_EVERY``-th image, the
    shapes after the training ones). The sets read from files are ``model.image_sets``'s.
    """
    if name not in configs.DATASET_CHANNELS:
        raise UserError(f"unknown dataset {name!r}: use one of {', '.join(configs.DATASET_CHANNELS)}")
    try:
        channels = configs.dataset_channels(name, channels)
    except ValueError as err:
        raise UserError(str(err)) from None
    if name == "shapes":
        if train:
            return ShapesDataset(SHAPES_SIZE, img_size, to_unit_tensor)
        return ShapesDataset(SHAPES_TEST_SIZE, img_size, to_unit_tensor, first=SHAPES_SIZE)
    from model.image_sets import load_image_set  # torchvision: imported only for the sets read from files
    return load_image_set(name, data_dir, img_size, train, channels)


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
