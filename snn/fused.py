"""Fused integrate-and-fire time loop (DESIGN §3).

``snn.neuron.if_spikes`` runs the T-step loop as ~10 tensor operations per step, each one a
full pass over memory. Here the same loop is unrolled over T and handed to ``torch.compile``
(inductor), which emits one kernel: every element's membrane and spike count stay in
registers, the input is read once and the spike train written once. On the CPU inductor
generates vectorised C++ (it needs a C++ compiler); on CUDA it generates a Triton kernel.

The arithmetic is the reference's, operation for operation, so the spikes are identical bit
for bit: subtracting or adding ``theta`` under a mask instead of ``s * theta`` changes nothing,
since ``s`` is 0 or 1 and ``s * theta`` is exact (and a fused multiply-add of an exact product
rounds once, like the separate operations).

The CUDA path has not been exercised by the test suite, which runs on CPUs.
"""
import functools
import logging

import torch

from common.compiled import compile_elementwise, run_auto

log = logging.getLogger(__name__)

_failure = []  # the first compile error of this process: 'auto' stops trying after it


def _if_steps(x, theta, signed: bool):
    """[T, N] input currents, 0-dim theta -> [T, N] spikes; the loop over T is unrolled."""
    v = (theta / 2).expand_as(x[0])
    count = torch.zeros_like(x[0])
    spikes = []
    for t in range(x.shape[0]):
        v = v + x[t]
        fire = v >= theta
        v = torch.where(fire, v - theta, v)
        s = fire.to(x.dtype)
        if signed:
            # Fast-SNN's negative spike: only after a positive one, so the net count stays >= 0
            neg = (v < 0) & (count > 0)
            v = torch.where(neg, v + theta, v)
            s = s - neg.to(x.dtype)
            count = count + s
        spikes.append(s)
    return torch.stack(spikes)


@functools.lru_cache(maxsize=None)
def _compiled_if_steps():
    """``_if_steps`` compiled, built on first use: setting up the compiler takes seconds.

    dynamic=True: one kernel per (T, signed, dtype, device) serves every tensor size.
    """
    return compile_elementwise(_if_steps)


def if_spikes_fused(x, theta, kind="if"):
    """``snn.neuron.if_spikes`` as one compiled kernel: x [T, ...] -> spikes [T, ...].

    ``theta`` is a scalar (a Python number or a 0-dim tensor). Raises whatever the compiler
    raises when it cannot build the kernel; ``if_spikes_auto`` falls back instead.
    """
    theta = torch.as_tensor(theta, dtype=x.dtype, device=x.device).detach()
    assert theta.dim() == 0, f"the fused IF neuron takes a scalar threshold, got shape {tuple(theta.shape)}"
    flat = x.detach().reshape(x.shape[0], -1)  # [T, N]: one compiled kernel for every layer shape
    with torch.no_grad():  # spikes carry no gradient; no autograd graph to compile
        return _compiled_if_steps()(flat, theta, kind == "signed").reshape(x.shape)


def if_spikes_auto(x, theta, kind, reference):
    """``if_spikes_fused``, or ``reference(x, theta, kind)`` once the compiler has failed.

    The first failure is logged as a warning; the rest of the process uses ``reference``.
    """
    return run_auto(lambda: if_spikes_fused(x, theta, kind), lambda: reference(x, theta, kind),
                    _failure, "the fused IF neuron", log)
