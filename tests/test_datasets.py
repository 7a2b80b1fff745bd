"""MNIST, Fashion-MNIST, CelebA and a folder of images, read from small files written here in the
layout torchvision expects, and each trained, converted and evaluated with its flagfiles.

The files: MNIST's idx files under ``<root>/MNIST/raw/`` (``FashionMNIST/raw/`` likewise),
CelebA's ``celeba/img_align_celeba/*.jpg`` and ``list_eval_partition.txt``, and a nested folder
of PNG and JPEG files of odd sizes, one of them grayscale. Pixels written at known places are
checked where the transforms must put them. Every dataset trains with its flagfile (2 steps of a
tiny UNet given on the command line; MNIST's flagfile as it is, 1 step of its batch of 128),
converts (which samples) and evaluates a few images. The stages run in this process, each the
library call its script makes of the command line (its flagfile parsed by absl).
"""
import json
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from common import runtime
from model import data
from model.checkpoint import load_checkpoint
from common.errors import UserError
from helpers import stage_in_process
from metrics import inception, scores, shards

# A tiny UNet over each flagfile's levels; --ch_mult stays the flagfile's (a repeated flag adds levels)
TINY = ["--ch=16", "--num_groups=8", "--num_res_blocks=1", "--dropout=0", "--T=100", "--batch_size=4",
        "--num_workers=0", "--kernels=reference", "--sample_step=0", "--warmup=1"]
FLAGFILES = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "celeba": "CelebA64", "folder": "folder"}
SIZES = {"mnist": 32, "fashion_mnist": 32, "celeba": 16, "folder": 16}   # 16: a multiple of 2**(5 - 1)
CHANNELS = {"mnist": 1, "fashion_mnist": 1, "celeba": 3, "folder": 3}


def unit(value):
    """A uint8 pixel value as the datasets give it: in [-1, 1]."""
    return value / 127.5 - 1


# -- writing the files -------------------------------------------------------------------------

def write_idx(raw, split, images, labels):
    """``<split>-images-idx3-ubyte`` (uint8 [N, 28, 28]) and ``<split>-labels-idx1-ubyte`` in ``raw``."""
    with open(os.path.join(raw, f"{split}-images-idx3-ubyte"), "wb") as f:
        f.write(struct.pack(">IIII", 0x803, len(images), 28, 28) + images.astype(np.uint8).tobytes())
    with open(os.path.join(raw, f"{split}-labels-idx1-ubyte"), "wb") as f:
        f.write(struct.pack(">II", 0x801, len(labels)) + labels.astype(np.uint8).tobytes())


def write_mnist(root, folder="MNIST", n_train=130, n_test=12, seed=0):
    """Random digits in MNIST's raw layout; training image 0 is black but for two known pixels.
    Returns (train images, test images) as uint8 [N, 28, 28]."""
    raw = os.path.join(root, folder, "raw")
    os.makedirs(raw)
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8)
    train[0] = 0
    train[0, 3, 5], train[0, 27, 27] = 200, 255
    write_idx(raw, "train", train, np.arange(n_train) % 10)
    write_idx(raw, "t10k", test, np.arange(n_test) % 10)
    return train, test


CELEBA_SPLITS = [0] * 10 + [1] * 4 + [2] * 2   # 10 training, 4 'valid', 2 'test' images


def celeba_face(index):
    """A 178 x 218 RGB image [218, 178, 3]: grey 20 outside the central 140 x 140 square; inside,
    four quadrants of distinct colours that depend on ``index``."""
    img = np.full((218, 178, 3), 20, dtype=np.uint8)
    top, left = (218 - 140) // 2, (178 - 140) // 2   # 39, 19
    colours = np.array([[200, 60, 60], [60, 200, 60], [60, 60, 200], [220, 220, 90]]) + index
    for q, (dy, dx) in enumerate([(0, 0), (0, 70), (70, 0), (70, 70)]):
        img[top + dy:top + dy + 70, left + dx:left + dx + 70] = colours[q]
    return img


def write_celeba(root):
    """``celeba/img_align_celeba/000001.jpg ...`` and ``list_eval_partition.txt``, nothing else."""
    folder = os.path.join(root, "celeba")
    os.makedirs(os.path.join(folder, "img_align_celeba"))
    lines = []
    for i, split in enumerate(CELEBA_SPLITS):
        name = f"{i + 1:06d}.jpg"
        Image.fromarray(celeba_face(i)).save(os.path.join(folder, "img_align_celeba", name), quality=95)
        lines.append(f"{name} {split}\n")
    with open(os.path.join(folder, "list_eval_partition.txt"), "w") as f:
        f.writelines(lines)


def stripes(height=20, width=40):
    """[height, width, 3]: red columns 0..9, green 10..29, blue 30..39 (for width 40)."""
    img = np.zeros((height, width, 3), dtype=np.uint8)
    img[:, :width // 4, 0] = 255
    img[:, width // 4:3 * width // 4, 1] = 255
    img[:, 3 * width // 4:, 2] = 255
    return img


def write_folder(root, n=40):
    """``n`` images at depths 0 to 3 (PNG and JPEG, odd sizes, one grayscale, one upper-case
    extension) and a text file that is not an image. Returns {relative path: what it holds}."""
    rng = np.random.default_rng(1)
    files = {"a/b/stripes.png": stripes(), "gray.png": np.full((29, 23), 77, dtype=np.uint8),
             "a/red.png": np.tile(np.array([255, 0, 0], dtype=np.uint8), (17, 31, 1))}
    for i in range(n - len(files)):
        depth = ["", "a/", "a/b/", "c/d/e/"][i % 4]
        ext = [".png", ".jpg", ".JPEG"][i % 3]
        h, w = 13 + 7 * (i % 5), 11 + 5 * (i % 7)
        files[f"{depth}img_{i:02d}{ext}"] = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    for rel, pixels in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(pixels).save(path, format="PNG" if rel.endswith(".png") else "JPEG")
    with open(os.path.join(root, "a", "notes.txt"), "w") as f:
        f.write("not an image")
    return files


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """{dataset: its --data_dir} with every dataset's files written, and {dataset: what was written}."""
    base = tmp_path_factory.mktemp("data")
    dirs = {name: str(base / name) for name in FLAGFILES}
    written = {"mnist": write_mnist(dirs["mnist"]),
               "fashion_mnist": write_mnist(dirs["fashion_mnist"], "FashionMNIST", seed=1)}
    write_celeba(dirs["celeba"])
    written["folder"] = write_folder(dirs["folder"])
    return dirs, written


# -- the datasets ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_files_give_the_digits_padded_to_32(roots, name):
    """28 px images padded by 2 black pixels: pixel (r, c) comes back at (r + 2, c + 2); the test
    set is the held-out split; another size resizes instead."""
    dirs, written = roots
    train_images, test_images = written[name]
    train = data.load_dataset(name, dirs[name], img_size=32)
    held_out = data.load_dataset(name, dirs[name], img_size=32, train=False)
    assert (len(train), len(held_out)) == (len(train_images), len(test_images))
    x, label = train[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and label == 0
    expected = torch.full((1, 32, 32), -1.0)
    expected[0, 5, 7], expected[0, 29, 29] = unit(200), unit(255)
    torch.testing.assert_close(x, expected)
    x = held_out[3][0]
    torch.testing.assert_close(x[0, 2:30, 2:30], torch.from_numpy(test_images[3]).float() / 127.5 - 1)
    assert bool((x[0, :2] == -1).all() and (x[0, :, 30:] == -1).all())
    assert data.load_dataset(name, dirs[name], img_size=16)[5][0].shape == (1, 16, 16)


def test_celeba_keeps_the_central_140_pixels(roots):
    """The aligned 178 x 218 faces: the central 140 px square, resized to 16 px. Its four
    quadrants (grey 20 all around them) come back in place, no grey at the border; the 'valid'
    partition is the held-out split."""
    dirs, _ = roots
    train = data.load_dataset("celeba", dirs["celeba"], img_size=16)
    held_out = data.load_dataset("celeba", dirs["celeba"], img_size=16, train=False)
    assert (len(train), len(held_out)) == (CELEBA_SPLITS.count(0), CELEBA_SPLITS.count(1))
    for dataset, index, number in ((train, 2, 2), (held_out, 1, 11)):
        x, label = dataset[index]
        assert x.shape == (3, 16, 16) and label == 0
        colours = np.array([[200, 60, 60], [60, 200, 60], [60, 60, 200], [220, 220, 90]]) + number
        for q, (rows, cols) in enumerate([(slice(0, 7), slice(0, 7)), (slice(0, 7), slice(9, 16)),
                                          (slice(9, 16), slice(0, 7)), (slice(9, 16), slice(9, 16))]):
            want = torch.tensor(unit(colours[q]), dtype=torch.float32)[:, None, None].expand(3, 7, 7)
            # JPEG's error: a few levels; the grey around the square would be 0.3 away
            torch.testing.assert_close(x[:, rows, cols], want, atol=0.08, rtol=0)


def test_folder_reads_every_image_below_it_in_order(roots):
    """Every image file at any depth (PNG, JPEG, .JPEG; the text file left out), in ImageFolder's
    order; every 20th is held out; each image's shorter side resized and its centre cropped."""
    dirs, written = roots
    root = dirs["folder"]
    train = data.load_dataset("folder", root, img_size=16)
    held_out = data.load_dataset("folder", root, img_size=16, train=False)
    paths = [os.path.relpath(p, root) for p, _ in train.samples]
    held = [os.path.relpath(p, root) for p, _ in held_out.samples]
    assert sorted(paths + held) == sorted(written["folder"]) and len(held) == len(written["folder"]) // 20
    assert paths[:3] == ["gray.png", "img_00.png", "img_04.jpg"]   # a folder's own files before its subfolders'
    assert paths.index("a/red.png") < paths.index("a/b/stripes.png") < paths.index("c/d/e/img_11.JPEG")
    for x, label in (train[0], train[len(train) - 1], held_out[1]):
        assert x.shape == (3, 16, 16) and label == 0 and -1 <= x.min() and x.max() <= 1
    x = train[paths.index("a/b/stripes.png")][0]    # 40 x 20 -> 32 x 16, columns 8..23 kept: the green
    green = torch.tensor([-1.0, 1.0, -1.0])[:, None, None].expand(3, 16, 14)
    torch.testing.assert_close(x[:, :, 1:15], green, atol=2 / 127.5, rtol=0)
    torch.testing.assert_close(train[0][0], torch.full((3, 16, 16), unit(77)))   # grayscale -> RGB
    gray = data.load_dataset("folder", root, img_size=16, channels=1)
    red = gray[paths.index("a/red.png")][0]          # Pillow's 'L': 299 R / 1000 -> 76
    assert red.shape == (1, 16, 16)
    torch.testing.assert_close(red, torch.full((1, 16, 16), unit(76)), atol=1 / 127.5, rtol=0)


def test_folder_mistakes_are_one_line_errors_naming_the_path(tmp_path):
    """A missing folder, one without images, a file Pillow cannot read (found before training), and
    a truncated JPEG (found when a loader worker decodes it): one line each, naming the path."""
    with pytest.raises(UserError, match="no_such_folder.*is not a folder"):
        data.load_dataset("folder", str(tmp_path / "no_such_folder"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match="no image files below .*empty"):
        data.load_dataset("folder", str(tmp_path / "empty"))
    broken = tmp_path / "broken"
    broken.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(broken / f"{i}.jpg")
    (broken / "3.png").write_bytes(b"not a PNG at all")
    with pytest.raises(UserError, match=r"cannot read the image .*3\.png") as err:
        data.load_dataset("folder", str(broken))
    assert "\n" not in str(err.value)
    (broken / "3.png").unlink()
    whole = (broken / "2.jpg").read_bytes()
    (broken / "2.jpg").write_bytes(whole[:len(whole) // 2])   # the header intact, half the pixels
    dataset = data.load_dataset("folder", str(broken), img_size=8)
    with pytest.raises(UserError) as err:
        next(data.training_batches(dataset, 3, runtime.Runtime(device=torch.device("cpu")), num_workers=1))
    assert str(err.value).startswith("cannot read the image ") and str(err.value).count("2.jpg") == 1
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


@pytest.mark.parametrize("name,needs", [
    ("mnist", ["MNIST/raw/", "train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
    ("fashion_mnist", ["FashionMNIST/raw/", "train-labels-idx1-ubyte"]),
    ("celeba", ["celeba/img_align_celeba/", "celeba/list_eval_partition.txt"])])
def test_offline_each_torchvision_set_says_which_files_it_needs(tmp_path, monkeypatch, name, needs):
    from torchvision import datasets

    def offline(self):
        raise RuntimeError("Error downloading the files:\nTried a mirror, got:\n<urlopen error network unreachable>")

    monkeypatch.setattr(datasets.MNIST, "download", offline)
    monkeypatch.setattr(datasets.CelebA, "download", offline)
    with pytest.raises(UserError) as err:
        data.load_dataset(name, str(tmp_path / "nowhere"))
    message = str(err.value)
    assert "\n" not in message and "could not be downloaded" in message and "network unreachable" in message
    assert os.path.join(str(tmp_path / "nowhere"), needs[0]) in message
    assert all(part in message for part in needs)


def test_the_channels_follow_the_dataset_unless_given():
    from common.configs import dataset_channels
    assert [dataset_channels(d) for d in ("mnist", "fashion_mnist", "cifar10", "celeba", "shapes", "folder")] == \
        [1, 1, 3, 3, 3, 3]
    assert dataset_channels("folder", 1) == 1 and dataset_channels("mnist", 1) == 1
    for dataset, channels in (("mnist", 3), ("cifar10", 1), ("celeba", 1)):
        with pytest.raises(ValueError, match=f"--img_channels={channels} contradicts --dataset={dataset}"):
            dataset_channels(dataset, channels)


# -- the four stages through the command line ----------------------------------------------------

def train_command(name, data_dir, logdir):
    """Stage 1 with the dataset's flagfile: MNIST's exactly as it is (the flagfile's UNet and batch),
    the others with a tiny UNet."""
    small = [] if name == "mnist" else [*TINY, f"--img_size={SIZES[name]}"]
    return ["ANN_train.py", f"--flagfile=config/train_ANN/{FLAGFILES[name]}.txt", f"--data_dir={data_dir}",
            f"--logdir={logdir}", f"--total_steps={1 if name == 'mnist' else 2}", *small]


def convert_command(name, data_dir, logdir):
    return ["SNN_conversion.py", f"--flagfile=config/SNN_convert/{FLAGFILES[name]}_snn.txt", f"--data_dir={data_dir}",
            f"--logdir={logdir}", "--sample_size=4", "--val_size=2", "--sample_steps=2", "--num_workers=0",
            "--kernels=reference"]


@pytest.fixture(scope="module")
def runs(roots, inception_home, tmp_path_factory):
    """{dataset: run folder} after stage 1 (2 steps, MNIST 1 step of its flagfile as it is) and
    stage 2; Fashion-MNIST also through stage 3 (one step per block) and with the Inception
    statistics (random weights) of its first 8 training images in ``stats.npz``. Each stage is
    the library call its script makes of the command line (flagfiles parsed by absl), in this process."""
    dirs, _ = roots
    logdirs = {name: tmp_path_factory.mktemp(name) for name in FLAGFILES}
    for name in FLAGFILES:
        stage_in_process(*train_command(name, dirs[name], logdirs[name]))
    for name in FLAGFILES:
        stage_in_process(*convert_command(name, dirs[name], logdirs[name]))
    fashion = [f"--data_dir={dirs['fashion_mnist']}", "--num_workers=0", "--kernels=reference"]
    stage_in_process("SNN_ft.py", "--flagfile=config/SNN_ft/FashionMNIST_snnft.txt", *fashion,
                     f"--logdir={logdirs['fashion_mnist']}", "--ft_steps=1", "--batch_size=2", "--val_size=2",
                     "--sample_size=2", "--sample_steps=2", "--calib_size=8", "--judge_images=2", "--judge_steps=2")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", inception_home)
        stage_in_process("compute_fid_stats.py", "--dataset=fashion_mnist", f"--data_dir={dirs['fashion_mnist']}",
                         "--num_images=8", "--batch_size=8", f"--out={logdirs['fashion_mnist'] / 'stats.npz'}")
    return logdirs


@pytest.mark.parametrize("name", list(FLAGFILES))
def test_each_dataset_trains_and_converts(runs, name):
    """The checkpoint stores the dataset and its channels, the UNet's head and tail have them, the
    conversion measured on held-out images and sampled grids."""
    ckpt = load_checkpoint(str(runs[name] / "ckpt.pt"))
    channels, size = CHANNELS[name], SIZES[name]
    assert ckpt["config"]["data"] == {"dataset": name, "img_size": size}
    assert ckpt["config"]["unet"]["img_channels"] == channels
    weights = ckpt["ema_model"]
    assert weights["head.weight"].shape[1] == channels and weights["tail.2.weight"].shape[0] == channels
    assert ckpt["x_T"].shape == (64, channels, size, size)
    report = json.loads((runs[name] / "conversion.json").read_text())
    assert report["val_images"] == "held-out" and report["val_size"] == 2
    snn = load_checkpoint(str(runs[name] / "converted_snn.pt"))
    assert snn["config"]["unet"]["img_channels"] == channels and snn["config"]["data"]["dataset"] == name
    for grid in ("ann.png", "snn.png", "ann_vs_snn.png"):
        with Image.open(runs[name] / "images" / grid) as img:
            assert img.mode == "RGB" and min(img.size) >= 64


def test_the_mnist_flagfile_trains_as_it_is(runs):
    """Only --data_dir, --total_steps and --logdir given: the flagfile's UNet at 32 px on one channel."""
    ckpt = load_checkpoint(str(runs["mnist"] / "ckpt.pt"))
    assert ckpt["step"] == 1
    unet = ckpt["config"]["unet"]
    assert (unet["ch"], unet["ch_mult"], unet["num_res_blocks"], unet["img_channels"]) == (64, [1, 2, 2], 2, 1)
    assert ckpt["config"]["train"]["batch_size"] == 128


def test_a_grayscale_snn_fine_tunes(runs):
    out = runs["fashion_mnist"] / "SNN_2bit_ft_seed"
    result = json.loads((out / "finetune.json").read_text())
    assert result["finished"] and (result["neuron"], result["norm"]) == ("if", "step")
    assert len(result["blocks"]) == len(list((out / "model_backpacks").iterdir())) > 10
    assert load_checkpoint(str(out / "snn_ft.pt"))["model"]["head.weight"].shape[1] == 1
    with Image.open(out / "ft_blocks_samples" / "converted.png") as grid:
        assert grid.mode == "RGB"


def evaluate_run(*args):
    """Stage 4 of ``python evaluate.py args``, in this process; returns the record it appended to snn_eval.txt."""
    return stage_in_process("evaluate.py", *args)


@pytest.mark.parametrize("name", list(FLAGFILES))
def test_each_dataset_evaluates(runs, name):
    """Stage 4 with the dataset's flagfile (scores skipped): shards of the model's channels."""
    logdir = runs[name]
    record = evaluate_run(f"--flagfile=config/SNN_evaluate/{FLAGFILES[name]}_snn.txt",
                          f"--eval_model_path={logdir / 'converted_snn.pt'}", f"--logdir={logdir}", "--fid=skip",
                          "--num_images=4", "--batch_size=4", "--sample_steps=2", "--probe_images=2",
                          "--kernels=reference")
    assert record["kind"] == "snn" and record["metrics_skipped"] == "--fid=skip" and record["energy_pJ_per_image"] > 0
    images = shards.gather_images(record["shards"], 4, 4)
    assert images.shape == (4, SIZES[name], SIZES[name], CHANNELS[name]) and images.dtype == np.uint8


def test_a_grayscale_model_is_scored_in_inception_features(runs, roots, inception_home, monkeypatch):
    """compute_fid_stats.py on a 1-channel dataset: the grayscale images repeated to three channels
    (checked here against features of images repeated by hand); evaluate.py scores a 1-channel
    SNN against them and writes grayscale PNGs."""
    dirs, _ = roots
    logdir = runs["fashion_mnist"]
    monkeypatch.setenv("TORCH_HOME", inception_home)
    dataset = data.load_dataset("fashion_mnist", dirs["fashion_mnist"], 32)
    gray = shards.to_uint8(torch.stack([dataset[i][0] for i in range(8)]))     # [8, 32, 32, 1]
    assert gray.shape == (8, 32, 32, 1)
    net = inception.load_inception("cpu")
    feats, _ = inception.inception_outputs(net, np.repeat(gray, 3, axis=-1), "cpu", batch_size=8)
    mu, _ = scores.load_stats(str(logdir / "stats.npz"))
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-4, atol=1e-5)
    record = evaluate_run(f"--eval_model_path={logdir / 'converted_snn.pt'}", f"--logdir={logdir}", "--fid=require",
                          "--features=inception", f"--fid_cache={logdir / 'stats.npz'}", "--num_images=10",
                          "--batch_size=5", "--is_splits=2", "--inception_batch=10", "--sampler=ddim",
                          "--sample_steps=2", "--probe_images=0", f"--save_images={logdir / 'png'}",
                          "--kernels=reference")
    assert record["features"] == scores.INCEPTION_NAME and np.isfinite(record["FID"]) and record["FID"] > 0
    assert 1 <= record["IS"] <= 1008
    with Image.open(logdir / "png" / "00009.png") as img:
        assert img.mode == "L" and img.size == (32, 32)
