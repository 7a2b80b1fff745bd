"""Shared by the CPU suite and tests/gpu. The repository root is on the import path through
pytest's ``pythonpath`` setting (pyproject.toml); this folder is, as the folder of a conftest
file, so the modules here import each other by name (``from helpers import run_script``)."""
