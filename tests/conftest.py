"""Shared by the CPU suite and tests/gpu. The repository root is on the import path through
pytest's ``pythonpath`` setting (pyproject.toml); this folder is, as the folder of a conftest
file, so the modules here import each other by name (``from helpers import run_script``)."""
import pytest

from helpers import train_tiny


@pytest.fixture(scope="session")
def snn_tiny_run(tmp_path_factory):
    """A folder holding a tiny 2-bit ``ckpt.pt`` (TINY_TRAIN's model at 8x8 pixels, 2 steps) for
    stages 2 and 3, trained once per session. Read it; write only into a copy
    (``shutil.copytree`` into the test's ``tmp_path``)."""
    folder = tmp_path_factory.mktemp("snn_tiny_run") / "run"
    train_tiny(folder, 2, "--img_size=8")
    return folder
