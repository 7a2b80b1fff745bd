"""The GPU suite (``make test-gpu``): fused kernels, the spiking UNet and the scripts on CUDA.

Without CUDA every test here is marked skipped at collection, so no fixture runs (no training,
no compiling) and the run takes the time of importing torch. ``make test`` (the CPU suite)
ignores this folder.

``pytest tests/gpu`` alone loads ``tests/conftest.py`` too (the rootdir is the repository's, where
pyproject.toml is), so the modules import the project and reuse the CPU suite's helpers
(``helpers``, ``test_fused``, ``test_neuron``, ``test_distributed``).
"""
import os

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))

NO_CUDA = ("no CUDA device (torch.cuda.is_available() is False): tests/gpu needs a GPU; "
           "run `make test-gpu` on a machine with one (`make test` is the CPU suite)")


def pytest_collection_modifyitems(config, items):
    """Mark every test of this folder skipped when CUDA is absent (others are left alone)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        if os.path.abspath(str(item.path)).startswith(HERE + os.sep):
            item.add_marker(skip)
