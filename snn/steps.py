"""Integrate-and-fire neurons as pure functions: the step of each kind and the loop over the window.

Tensors are time-major and folded into the batch, ``[T*B, ...]``; a neuron unfolds them to
``[T, B, ...]``, simulates the whole T-step window in one call and keeps no state between calls.

Each neuron kind is one pure step function ``(x_t, v, count, theta, levels) -> (s, v, count)``
(the spikingjelly style: the neuron's dynamics written once, stateless). ``run_steps`` runs a
step over the window; the reference calls it as is, ``snn.fused`` hands the very same function to
``torch.compile``, so the two agree bit for bit by construction.

Every kind starts its membrane at theta / 2, resets softly (subtracts what it emitted) and emits
an integer ``s`` per step; its output current is ``theta * s``:

* ``if``: binary, s in {0, 1} (fires when the membrane reaches theta);
* ``signed``: Fast-SNN's neuron, s in {-1, 0, 1}; -1 when the membrane has fallen to
  ``-SIGNED_TOLERANCE`` or below after the neuron has fired, so its net spike count never goes
  negative;
* ``graded``: s = clamp(floor(v / theta), -c, L - c) with ``c`` the net count so far and
  L = ``levels`` = T. Its net count after step t is clamp(floor(S_t / theta + 1/2), 0, L) for the
  input sum S_t, so over T = L steps its mean output is exactly the b-bit quantizer of its mean
  input, whatever the input's course in time.

One kind is no step-by-step recurrence: ``two_phase`` integrates the whole window first
(v = theta / 2 + S), then fires binary spikes, one per step at most, while v >= theta (v -= theta):
its count is clamp(floor(S / theta + 1/2), 0, T), the b-bit quantizer of its mean input for any
order of the inputs, with spikes in {0, 1} only. It is a window function (``two_phase_window``)
in place of a step; ``WINDOWS`` holds one window function per kind, compiled alike by
``snn.fused``. For a signed activation (levels -L..L) it also fires -1 while v < 0 (v += theta).
"""
from functools import partial

import torch


def fold(x):
    """[T, B, ...] -> [T*B, ...]."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def unfold(x, time_steps):
    """[T*B, ...] -> [T, B, ...] for T = ``time_steps``."""
    assert x.shape[0] % time_steps == 0, f"a folded batch of {x.shape[0]} is not a multiple of {time_steps} time steps"
    return x.reshape(time_steps, x.shape[0] // time_steps, *x.shape[1:])


def time_mean(x, time_steps):
    """Rate decoding: [T*B, ...] -> [B, ...] for T = ``time_steps``."""
    return unfold(x, time_steps).mean(0)


NEURON_KINDS = ("if", "signed", "graded", "two_phase")
STREAMING = ("if", "signed", "graded")  # kinds that fire while their input arrives
SIGNED_LEVELS = "two_phase_signed"  # the two-phase neuron of a signed activation (levels -L..L)


def check_kind(kind):
    """``kind`` if it names a neuron model of ``NEURON_KINDS`` (or ``SIGNED_LEVELS``), else ValueError."""
    if kind not in NEURON_KINDS + (SIGNED_LEVELS,):
        raise ValueError(f"neuron kind must be one of {NEURON_KINDS}, got {kind!r}")
    return kind


# -- one step of each kind: x_t, v, count [N...], theta 0-dim, levels int -> s, v, count -------

def if_step(x, v, count, theta, levels):
    """Binary IF neuron: s = 1 when the membrane reaches theta, which it then gives back."""
    v = v + x
    fire = v >= theta
    s = fire.to(x.dtype)
    # where(), not v - s * theta: the same values (s * theta is exact), one operation fewer
    return s, torch.where(fire, v - theta, v), count + s


SIGNED_TOLERANCE = 1e-3
"""How far below zero a signed neuron's membrane must fall before it emits -1: an absolute
membrane value, the same whatever the threshold (Fast-SNN's and the seed's spiking layers)."""


def signed_step(x, v, count, theta, levels):
    """Fast-SNN's signed IF neuron: +1 as ``if_step``; then -1 (taking theta back) when the
    membrane is at ``-SIGNED_TOLERANCE`` or below and the net count positive, so the net count
    never goes negative. (A step that fired leaves v >= 0, so whether ``count`` includes that
    step's +1 makes no difference.)"""
    v = v + x
    fire = v >= theta
    v = torch.where(fire, v - theta, v)
    neg = (v <= -SIGNED_TOLERANCE) & (count > 0)
    v = torch.where(neg, v + theta, v)
    s = fire.to(x.dtype) - neg.to(x.dtype)
    return s, v, count + s


def graded_step(x, v, count, theta, levels):
    """Graded signed IF neuron: s = clamp(floor(v / theta), -count, levels - count).

    Written as the new count minus the old one, both integers in [0, levels]: the same value,
    and a silent step gives +0.0, never -0.0 (floor(-0.0) would), so the reference and the
    compiled kernel agree on the sign bit too.
    """
    v = v + x
    new_count = torch.clamp(count + torch.floor(v / theta), 0, levels)
    s = new_count - count
    return s, v - s * theta, new_count


STEPS = {"if": if_step, "signed": signed_step, "graded": graded_step}


def run_steps(x, theta, step):
    """Run ``step`` over the window: x [T, ...] input currents, 0-dim ``theta`` -> s [T, ...].

    The membrane starts at theta / 2 and the count at 0; ``levels`` is T. Plain tensor code with
    the loop over T unrolled when traced: the reference runs it eagerly, ``snn.fused`` compiles it.
    """
    v = (theta / 2).expand_as(x[0])
    count = torch.zeros_like(x[0])
    spikes = []
    for t in range(x.shape[0]):
        s, v, count = step(x[t], v, count, theta, x.shape[0])
        spikes.append(s)
    return torch.stack(spikes)


def two_phase_window(x, theta, signed=False):
    """Two-phase neuron over the window: x [T, ...] input currents, 0-dim ``theta`` -> s [T, ...].

    Phase 1 integrates the whole window, v = theta / 2 + x_1 + ... + x_T (added in time order,
    as the streaming kinds add). Phase 2 fires one spike per step at most: s_t = 1 while v >= theta,
    then v -= theta; ``signed``: s_t = -1 while v < 0, then v += theta. So s_t = 1 (or -1) for
    t < |count|, count = clamp(floor(S / theta + 1/2), 0 (or -T), T): the quantizer's level of the
    mean input S / T (T = L), the same for every order of the inputs.
    """
    v = (theta / 2).expand_as(x[0])
    for t in range(x.shape[0]):
        v = v + x[t]
    spikes = []
    for _ in range(x.shape[0]):
        up = v >= theta
        s = up.to(x.dtype)
        if signed:
            down = v < 0
            s = s - down.to(x.dtype)
            v = torch.where(down, v + theta, v)
        v = torch.where(up, v - theta, v)
        spikes.append(s)
    return torch.stack(spikes)


WINDOWS = {kind: partial(run_steps, step=step) for kind, step in STEPS.items()}
WINDOWS["two_phase"] = two_phase_window
WINDOWS[SIGNED_LEVELS] = partial(two_phase_window, signed=True)


def if_spikes(x, theta, kind="if"):
    """Spike train of a neuron of ``kind`` for input currents ``x`` [T, ...] and threshold ``theta``.

    ``theta``: a scalar (a number or a 0-dim tensor). Returns s [T, ...], integers of ``x.dtype``:
    {0, 1} (``if``, ``two_phase``), {-1, 0, 1} (``signed``, ``SIGNED_LEVELS``) or [-T, T]
    (``graded``). No gradient flows through s.
    """
    window = WINDOWS[check_kind(kind)]
    theta = torch.as_tensor(theta, dtype=x.dtype, device=x.device).detach()
    with torch.no_grad():
        return window(x.detach(), theta)
