"""Fused integrate-and-fire time loop.

The reference (``snn.steps.if_spikes``) runs a neuron's step function T times (the two-phase
neuron: its window function), each step a handful of tensor operations and each operation a
full pass over memory. Here the very same ``run_steps`` and step function (or window function)
are handed to ``torch.compile`` (inductor): tracing unrolls the loop over T and inductor emits one kernel in which every element's membrane and count stay in
registers; the input is read once and the spike train written once. On the CPU inductor
generates vectorised C++ (it needs a C++ compiler); on CUDA it generates a Triton kernel.

Reference and kernel share one definition, so they differ only if the compiler changes the
arithmetic. Inductor keeps each operation's order and rounding (its C++ is built with
``-ffp-contract=off`` and without unsafe math, so ``v - s * theta`` is no fused multiply-add and
``v / theta`` a true division); ``tests/test_fused.py`` checks bit equality, also for membranes
that land exactly on a threshold.

The CUDA path has not been exercised by the test suite, which runs on CPUs.
"""
import functools
import logging

import torch

from common.compiled import compile_elementwise, run_auto
from snn.steps import WINDOWS, check_kind, if_spikes

log = logging.getLogger(__name__)

_failure = []  # the first compile error of this process: 'auto' stops trying after it


@functools.lru_cache(maxsize=None)
def _compiled_window(kind):
    """``kind``'s window function (``run_steps`` with its step, or the two-phase window), compiled;
    built on first use (the compiler takes seconds).

    dynamic=True: one kernel per (T, kind, dtype, device) serves every tensor size.
    """
    window = WINDOWS[kind]

    def compiled(x, theta):
        return window(x, theta)

    return compile_elementwise(compiled)


def if_spikes_fused(x, theta, kind="if"):
    """``snn.steps.if_spikes`` as one compiled kernel: x [T, ...] -> spikes [T, ...].

    ``theta`` is a scalar (a Python number or a 0-dim tensor). Raises whatever the compiler
    raises when it cannot build the kernel; ``if_spikes_auto`` falls back instead.
    """
    check_kind(kind)
    theta = torch.as_tensor(theta, dtype=x.dtype, device=x.device).detach()
    assert theta.dim() == 0, f"the fused IF neuron takes a scalar threshold, got shape {tuple(theta.shape)}"
    flat = x.detach().reshape(x.shape[0], -1)  # [T, N]: one compiled kernel for every layer shape
    with torch.no_grad():  # spikes carry no gradient; no autograd graph to compile
        return _compiled_window(kind)(flat, theta).reshape(x.shape)


def if_spikes_auto(x, theta, kind="if"):
    """``if_spikes_fused``, or the reference ``if_spikes`` once the compiler has failed.

    The first failure is logged as a warning; the rest of the process uses the reference.
    """
    return run_auto(lambda: if_spikes_fused(x, theta, kind), lambda: if_spikes(x, theta, kind),
                    _failure, "the fused IF neuron", log)
