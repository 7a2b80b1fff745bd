"""Elementwise kernels compiled with ``torch.compile``, and the ``auto`` fallback (``docs/scale.md``).

Quantized activations and IF neurons are chains of elementwise operations; run one by one, each
is a full pass over memory. ``torch.compile`` (inductor) fuses a chain into one kernel:
vectorised C++ on CPUs (a C++ compiler is needed) and Triton on GPUs. Each such kernel has a
plain PyTorch reference next to it; the choices (``--kernels``) are ``reference``, ``compile`` and ``auto``
(compile, falling back to the reference for the rest of the process after one warning).
"""
import logging

import torch

KERNELS = ("reference", "compile", "auto")


def compile_elementwise(fn):
    """``torch.compile(fn, dynamic=True)``: one kernel per rank and dtype serves every tensor size.

    Inductor's notice that a CPU-only machine has no CUDA runtime is silenced: it is no problem.
    """
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    return torch.compile(fn, dynamic=True)


def check_kernels(kernels):
    """``kernels`` if it names a kernel choice, else ValueError."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    return kernels


def run_auto(fused_call, reference_call, failures, what, log):
    """``fused_call()``, or ``reference_call()`` once a compile has failed (``failures`` not empty).

    The first failure is appended to ``failures`` and logged as one warning naming ``what``.
    """
    if not failures:
        try:
            return fused_call()
        except Exception as err:  # no C++ compiler, unsupported platform, inductor bug, ...
            failures.append(err)
            log.warning("%s could not be compiled (%s: %s); using the reference implementation",
                        what, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
    return reference_call()

