"""``python tests/gpu/on_cuda.py SCRIPT [flags]``: run the repository's SCRIPT as ``python SCRIPT
[flags]`` would, then print ``cuda_peak_bytes=N`` on stderr at exit: the CUDA memory the script
allocated on its current device (0 when it never touched CUDA), the tests' evidence that the
script ran on the GPU whatever it writes into its outputs. The repository root must be on
``PYTHONPATH`` (``test_gpu_scripts.on_cuda`` sets it), as it is for ``python SCRIPT``.
"""
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _report():
    import torch

    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else 0
    print(f"cuda_peak_bytes={peak}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    script = os.path.join(ROOT, sys.argv[1])
    sys.argv = [script, *sys.argv[2:]]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:  # also on absl's sys.exit at the end of a run
        _report()
