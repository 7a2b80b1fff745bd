"""Shared by the CPU suite and tests/gpu. The repository root is on the import path through
pytest's ``pythonpath`` setting (pyproject.toml); this folder is, as the folder of a conftest
file, so the modules here import each other by name (``from helpers import run_script``)."""

import os  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def shapes_net16():
    """(the shapes feature network for 16 px images, its cache folder): the repository's stats/,
    where the scripts keep it; trained there once if it is missing or stale (~25 s on 2 idle
    cores), then loaded by every test and script run that needs it."""
    from metrics import shapes_net
    folder = os.path.join(ROOT, "stats")
    return shapes_net.load_shapes_net(16, folder), folder
