"""Shared by the CPU suite and tests/gpu. The repository root is on the import path through
pytest's ``pythonpath`` setting (pyproject.toml); this folder is, as the folder of a conftest
file, so the modules here import each other by name (``from helpers import run_script``)."""
import os
import shutil

import pytest


def _threads_per_worker():
    """Under pytest-xdist, each of the N workers (and the processes it starts) gets its share of
    the cores, unless OMP_NUM_THREADS is set already: two workers of two threads each on two cores
    would spend a third of the suite waiting on each other's threads."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // workers))


_threads_per_worker()  # before torch is imported: its thread pool reads OMP_NUM_THREADS once

from helpers import TINY_TRAIN, train_in_process, train_tiny_in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN_STEPS = 3


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A folder holding a tiny 2-bit run of ``TINY_RUN_STEPS`` steps with TINY_TRAIN's settings
    (``ckpt.pt``, ``sample/``, events, ``flagfile.txt``), trained once per session in-process. Read
    it; write only into a ``copy_run``."""
    folder = tmp_path_factory.mktemp("tiny_run")
    train_in_process(*TINY_TRAIN, f"--logdir={folder}", f"--total_steps={TINY_RUN_STEPS}",
                     f"--save_step={TINY_RUN_STEPS}")
    return folder


def copy_run(tiny_run, tmp_path, name="run"):
    """A copy of the ``tiny_run`` folder at ``tmp_path/name`` (a test's own, to write into)."""
    return shutil.copytree(tiny_run, tmp_path / name)


@pytest.fixture(scope="session")
def shapes_net16():
    """(the shapes feature network for 16 px images, its cache folder): the repository's stats/,
    where the scripts keep it; trained there once if it is missing or stale (~25 s on 2 idle
    cores), then loaded by every test and script run that needs it."""
    from metrics import shapes_net
    folder = os.path.join(ROOT, "stats")
    return shapes_net.load_shapes_net(16, folder), folder


@pytest.fixture(scope="session")
def snn_tiny_run(tmp_path_factory):
    """A folder holding a tiny 2-bit ``ckpt.pt`` (TINY_TRAIN's model at 8x8 pixels, 2 steps) for
    stages 2 and 3, trained once per session in-process. Read it; write only into a copy
    (``shutil.copytree`` into the test's ``tmp_path``)."""
    folder = tmp_path_factory.mktemp("snn_tiny_run") / "run"
    train_tiny_in_process(folder, 2, "--img_size=8")
    return folder


# the FID Inception without a download: random weights under the real file name ---------------

def random_inception_state(seed=0):
    """The state dict of the library's FID Inception, randomly initialised (no download).

    The library builds the network and then loads the weights file into it; the loader is
    replaced by one that hands the freshly built network back instead.
    """
    import pytorch_image_generation_metrics.inception as lib_inception
    import torch
    from torchvision.models import inception as tv_inception
    built = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lib_inception, "load_state_dict_from_url", lambda *args, **kwargs: None)
        mp.setattr(tv_inception.Inception3, "load_state_dict", lambda self, *args, **kwargs: built.append(self))
        lib_inception.fid_inception_v3()
    torch.manual_seed(seed)
    for module in built[0].modules():  # He init keeps activations O(1) through ~40 layers
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.01)
    return built[0].state_dict()


@pytest.fixture(scope="session")
def inception_home(tmp_path_factory):
    """A TORCH_HOME folder holding random Inception weights under the real file name (made once
    a session; read it)."""
    import torch
    from metrics import inception
    home = tmp_path_factory.mktemp("torch_home")
    path = home / "hub" / "checkpoints" / inception.WEIGHTS_NAME
    path.parent.mkdir(parents=True)
    torch.save(random_inception_state(), path)
    return str(home)


@pytest.fixture
def torch_home(inception_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", inception_home)
    return inception_home


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty TORCH_HOME and no network for torch.hub."""
    import urllib.error
    import pytorch_image_generation_metrics.inception as lib_inception

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    monkeypatch.setattr(lib_inception, "load_state_dict_from_url", refuse)
