"""Embedded shapes data and the torchvision CIFAR-10 path (with a folder the test makes)."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from common import runtime
from model import data
from common.errors import UserError
from helpers import ROOT


def test_shapes_are_deterministic_and_varied():
    a, b = data.draw_shape(7), data.draw_shape(7)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(data.draw_shape(7), data.draw_shape(8))
    # every image has a shape on a background: at least two distinct colours
    for i in range(12):
        assert len(np.unique(data.draw_shape(i).reshape(-1, 3), axis=0)) >= 2


def test_shapes_dataset_range_and_random_flip():
    ds = data.load_dataset("shapes", None, img_size=32)
    x, label = ds[3]
    assert x.shape == (3, 32, 32) and -1 <= x.min() and x.max() <= 1
    assert label == 3 % len(data.SHAPE_CLASSES) == data.shape_attributes(3)[0]
    assert torch.equal(ds[3][0], x)  # datasets are deterministic; flips happen per training batch
    batch = torch.stack([ds[i][0] for i in range(64)])
    flipped = data.random_flip(batch, torch.Generator().manual_seed(0))
    mirrored = torch.tensor([torch.equal(f, b.flip(-1)) and not torch.equal(f, b) for f, b in zip(flipped, batch)])
    kept = torch.tensor([torch.equal(f, b) for f, b in zip(flipped, batch)])
    assert bool((mirrored | kept).all()) and 16 < int(mirrored.sum()) < 48
    assert torch.equal(flipped, data.random_flip(batch, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("size", [8, 16, 32])
def test_shapes_tensors_are_torchvisions_bit_for_bit(size):
    """The shapes' own conversion is torchvision's ToTensor and Normalize(0.5, 0.5), exactly."""
    from PIL import Image
    from torchvision import transforms
    theirs = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    ds = data.load_dataset("shapes", None, img_size=size)
    for i in (0, 1, 5, 100):
        x = ds[i][0]
        assert x.dtype == torch.float32 and torch.equal(x, theirs(Image.fromarray(data.draw_shape(i, size))))


def test_shapes_and_the_stages_need_no_torchvision():
    """torchvision (~1.5 s to import) is imported for the sets read from files and for image
    grids only: a process that loads the stages' modules and the shapes starts without it."""
    code = ("import sys\nimport model.train, snn.conversion, snn.finetune_run, metrics.evaluation, metrics.fid_stats\n"
            "from model import data\ndata.load_dataset('shapes', None, 16)[0]\n"
            "print(sorted(m for m in sys.modules if m.startswith('torchvision'))[:3])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_shape_attributes_are_what_is_drawn():
    for index in range(12):
        kind, fg, bg = data.shape_attributes(index)
        img = data.draw_shape(index).reshape(-1, 3).astype(float)
        assert kind == index % 6 and fg != bg
        # the foreground colour is drawn exactly; the background is shaded by a gradient
        assert (np.abs(img - data._PALETTE[fg]).sum(1) < 1e-6).any()


def test_held_out_shapes_are_images_training_never_sees():
    train = data.load_dataset("shapes", None, img_size=32)
    held_out = data.load_dataset("shapes", None, img_size=32, train=False)
    assert len(train) == data.SHAPES_SIZE and len(held_out) == data.SHAPES_TEST_SIZE
    expected = torch.from_numpy(data.draw_shape(data.SHAPES_SIZE + 5)).permute(2, 0, 1).float() / 127.5 - 1
    x, label = held_out[5]
    torch.testing.assert_close(x, expected)
    assert label == (data.SHAPES_SIZE + 5) % len(data.SHAPE_CLASSES)
    with pytest.raises(IndexError):
        held_out[data.SHAPES_TEST_SIZE]


def test_shapes_can_be_resized():
    x, _ = data.load_dataset("shapes", None, img_size=16)[0]
    assert x.shape == (3, 16, 16)


def write_cifar_folder(root, n=10):
    """A small CIFAR-10 folder in torchvision's layout: pickled dicts of uint8 rows."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), "labels": list(range(n))}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return folder


def test_cifar10_folder_loads_through_torchvision(tmp_path):
    write_cifar_folder(str(tmp_path))
    ds = data.load_dataset("cifar10", str(tmp_path), img_size=32)
    assert len(ds) == 50
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and -1 <= x.min() and x.max() <= 1


def test_missing_cifar10_is_one_clear_error(tmp_path, monkeypatch):
    from torchvision import datasets

    def offline(self):
        raise OSError("network is unreachable")

    monkeypatch.setattr(datasets.CIFAR10, "download", offline)
    with pytest.raises(UserError) as err:
        data.load_dataset("cifar10", str(tmp_path / "nowhere"), img_size=32)
    msg = str(err.value)
    assert "nowhere" in msg and "cifar-10-batches-py" in msg and "\n" not in msg


def test_training_batches_cycle_and_check_sizes():
    rt = runtime.Runtime(device=torch.device("cpu"))
    ds = data.ShapesDataset(length=10, transform=data.to_unit_tensor)
    batches = data.training_batches(ds, 4, rt)
    shapes = [next(batches).shape for _ in range(5)]  # more batches than one epoch holds
    assert all(s == (4, 3, 32, 32) for s in shapes)
    with pytest.raises(UserError):
        next(data.training_batches(ds, 16, rt))


def test_step_batches_are_a_function_of_seed_and_step():
    """Step s of a run that starts at step k gets the indices step s of a run from step 0 gets;
    an epoch visits every index once (the rest of a batch dropped); ranks split the global batch."""
    whole = iter(data.StepBatchSampler(22, 4, seed=3))
    steps = [next(whole) for _ in range(12)]
    resumed = iter(data.StepBatchSampler(22, 4, seed=3, start_step=7))
    assert [next(resumed) for _ in range(5)] == steps[7:]
    epoch = sum(steps[:5], [])
    assert len(epoch) == len(set(epoch)) == 20 and set(epoch) <= set(range(22))
    assert steps[:5] != steps[5:10]  # a new permutation every epoch
    parts = [next(iter(data.StepBatchSampler(22, 4, seed=3, start_step=6, rank=r, world_size=2))) for r in range(2)]
    assert parts[0] + parts[1] == steps[6] and len(parts[0]) == 2
    with pytest.raises(UserError, match="divisible"):
        data.StepBatchSampler(22, 5, world_size=2)
