"""Fused kernels on CUDA (Triton, through ``torch.compile``) against the reference, and the exact
float64 spiking UNet on CUDA.

How a fused CUDA kernel is compared with the reference
------------------------------------------------------
On the CPU inductor's C++ keeps every operation's rounding and tests/test_fused.py demands bit
equality. Triton, by default, does not (torch 2.14: ``torch/_inductor/config.py`` ``eager_numerics``,
``TritonKernel.triton_meta_common``, and the comment in ``lowering.div_mode``):

* float32 ``a / b`` of tensors is ``div.full.f32``, within 2 ulps but not correctly rounded (eager
  CUDA is); it may land just below an exact integer quotient, and floor() then gives one less;
* a product followed by an addition is contracted into one fused multiply-add (one rounding, not
  two) and, with libdevice built for flush-to-zero (``enable_reflect_ftz``), subnormal numbers may
  become zero (FTZ).

The criterion follows the operations of each kernel:

* ``if`` and ``signed`` neurons: additions, subtractions, comparisons and selects only (theta / 2,
  a division by a constant, becomes an exact product by 0.5). Triton rounds these as eager does,
  so the spikes must be equal bit for bit: random inputs, inputs exactly on a threshold or one ulp
  either side, T = 3 and 7. One allowance, FTZ: the on-threshold inputs include currents one ulp
  from zero (subnormal); a membrane at 0 that gets -1 ulp is negative in the reference, where the
  signed neuron takes a spike back, and would be zero when flushed. So for ``signed`` the elements
  with a subnormal input are left out of the exact comparison (their trains must stay valid:
  spikes in {-1, 0, 1}, net count never negative); ``if`` never tests a sign: exact everywhere.
* ``graded`` neuron (floor(v / theta), v - s * theta) and the quantizer (floor(relu(x) / alpha * L
  + 1/2), alpha * k / L): the kernel's membrane and decision variable stay within
  T * 2^-23 * (T + max|u|) + 2 ulps of the reference's (about 1e-4 for T = 7 and |u| < 100, asserted),
  u being the decision variable v / theta or relu(x) / alpha * L + 1/2. So an element whose
  reference u (float64 from the reference's float32 values) keeps ``MARGIN`` = 1e-3 from every
  integer at every step cannot flip: those elements must agree exactly, zero mismatches, and they
  must be at least 90% of the random elements. Within the margin (inputs on a threshold or a
  rounding tie) a flip is allowed, but the output stays valid: a graded train's net count in
  [0, T] at every step, a quantizer level off by at most one. The quantizer's values at equal
  levels within 4 ulps (alpha * k then / L: the reference's and the kernel's divisions each within
  2 ulps of the quotient), the gradient of x bit for bit (a select), the gradient of act_alpha (a
  sum) within the flipped elements' share plus summation rounding.
* The explanation is checked as well: compiled with inductor's eager-numerics options (correctly
  rounded division, no contraction, no flushing) the graded and signed neurons are the reference
  bit for bit, on-threshold and subnormal inputs included, and the quantizer's levels are exact.

The eager reference on CUDA divides correctly rounded and fuses nothing, so it gives the CPU
reference's spikes bit for bit for every kind, on thresholds included.
"""
import copy

import pytest
import torch

from quant import QuantReLU, quantize_activation
from snn import convert
from snn.neuron import spike_train
from snn.steps import NEURON_KINDS, STEPS, if_spikes, run_steps
from test_fused import bits, near_threshold_inputs, quantizer_inputs
from test_neuron import inputs, near_threshold, random_unet, relative_error

CUDA = "cuda"
MARGIN = 1e-3  # distance of a decision variable to the nearest integer below which a flip is allowed
SHAPE = (4, 32, 8, 8)
EAGER_NUMERICS = {"emulate_precision_casts": True, "eager_numerics.division_rounding": True,
                  "eager_numerics.disable_ftz": True}


def random_currents(T, theta, seed):
    """[T, *SHAPE] float32 on the CPU: large enough for graded spikes of 2 and 3."""
    return torch.randn(T, *SHAPE, generator=torch.Generator().manual_seed(seed)) * (1.2 * theta)


def threshold_currents(T, theta, kind, seed):
    """[T, *SHAPE[:-1]] on the CPU: membranes exactly on (multiples of) theta or one ulp either side."""
    g = torch.Generator().manual_seed(seed)
    if kind == "graded":  # steps up to 3 theta: graded spikes of 2 and 3
        return near_threshold(T, SHAPE[:-1], theta, g)
    return near_threshold_inputs(T, SHAPE[:-1], theta, g)


def decision_distance(x, theta, kind):
    """Over the reference's T steps, per element: the least distance of v_t / theta (float64, from
    the reference's float32 membrane v_t) to an integer; and max |v_t / theta| over everything."""
    step, seen = STEPS[kind], []

    def recording(x_t, v, count, th, levels):
        seen.append(v + x_t)  # the step's own first operation: the membrane it decides on
        return step(x_t, v, count, th, levels)

    th = torch.as_tensor(theta, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        run_steps(x, th, recording)
    u = torch.stack(seen).double() / th.double()
    return (u - u.round()).abs().amin(0), float(u.abs().max())


def assert_graded_agrees(out, ref, x, theta, least_checked):
    """The criterion of the module docstring for the graded neuron; returns (checked, flips)."""
    T = x.shape[0]
    distance, u_max = decision_distance(x, theta, "graded")
    assert u_max < 100, "the margin argument assumes |v / theta| < 100"
    checked = distance >= MARGIN
    differs = (bits(out) != bits(ref)).any(0)
    assert not (differs & checked).any(), \
        f"{int((differs & checked).sum())} elements differ though their membrane kept {MARGIN} theta from any threshold"
    assert float(checked.double().mean()) >= least_checked, float(checked.double().mean())
    assert torch.equal(out, out.round()) and float(out.abs().max()) <= T
    counts = out.cumsum(0)
    assert float(counts.min()) >= 0 and float(counts.max()) <= T, "a graded train's net count stays in [0, T]"
    return int(checked.sum()), int(differs.sum())


def levels_of(y, alpha, levels):
    """The integer level k of quantizer outputs y = alpha * k / L, float64."""
    return torch.round(y.double() / alpha.double() * levels)


def ulps(a, b):
    """Distance in units in the last place of float32 tensors of the same sign."""
    return (bits(a).long() - bits(b).long()).abs()


# -- the IF neuron ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", NEURON_KINDS)
@pytest.mark.parametrize("T", [3, 7])
def test_cuda_reference_is_the_cpu_reference(T, kind):
    for x, theta in ((random_currents(T, 0.7, T), 0.7), (threshold_currents(T, 0.75, kind, T), 0.75)):
        cpu = spike_train(x, theta, kind, "reference")
        cuda = spike_train(x.to(CUDA), theta, kind, "reference")
        assert cuda.device.type == torch.device(CUDA).type
        assert torch.equal(bits(cuda.cpu()), bits(cpu))


@pytest.mark.parametrize("kind", NEURON_KINDS)
@pytest.mark.parametrize("T", [3, 7])
def test_fused_neuron_on_cuda_against_the_reference(T, kind):
    x = random_currents(T, 0.7, 10 + T).to(CUDA)
    ref = spike_train(x, 0.7, kind, "reference")
    out = spike_train(x, torch.tensor(0.7), kind, "compile")
    assert out.device == x.device and out.dtype == x.dtype and out.shape == x.shape
    assert (ref > 0).any() and (kind in ("if", "two_phase") or (ref < 0).any()), \
        "the case must exercise (negative) spikes"
    if kind != "graded":
        assert torch.equal(bits(out), bits(ref))
    else:
        assert (ref.abs() > 1).any()
        checked, flips = assert_graded_agrees(out, ref, x, 0.7, least_checked=0.9)
        print(f"\ngraded T={T} random: {checked} elements checked exactly, {flips} flipped within the margin")

    x = threshold_currents(T, 0.75, kind, 20 + T).to(CUDA)
    ref = spike_train(x, 0.75, kind, "reference")
    out = spike_train(x, torch.tensor(0.75), kind, "compile")
    if kind in ("if", "two_phase"):  # additions and comparisons only: exact on CUDA too
        assert torch.equal(bits(out), bits(ref))
    elif kind == "signed":
        subnormal = ((x != 0) & (x.abs() < torch.finfo(x.dtype).tiny)).any(0)
        assert subnormal.any() and int((~subnormal).sum()) >= 200, "elements are left to compare exactly"
        differs = (bits(out) != bits(ref)).any(0)
        assert not (differs & ~subnormal).any(), f"{int((differs & ~subnormal).sum())} elements differ"
        assert set(out.unique().tolist()) <= {-1.0, 0.0, 1.0} and float(out.cumsum(0).min()) >= 0
        print(f"\nsigned T={T} on thresholds: {int(differs.sum())} of {int(subnormal.sum())} elements with a "
              "subnormal input differ (FTZ)")
    if kind != "graded":
        # the membrane sits exactly on the threshold somewhere: v = theta / 2 + theta / 2 at t = 0
        # (two-phase: after the whole window)
        first = x.sum(0) if kind == "two_phase" else x[0]
        assert ((first == 0.75 / 2) & (ref[0] == 1)).any()
    else:
        checked, flips = assert_graded_agrees(out, ref, x, 0.75, least_checked=0.0)
        assert checked > 0, "some elements never touch a threshold"
        print(f"\ngraded T={T} on thresholds: {checked} elements checked exactly, {flips} flipped on a threshold")


# -- the activation quantizer -----------------------------------------------------------------

@pytest.mark.parametrize("bit", [1, 2, 4])
def test_fused_quantizer_on_cuda_against_the_reference(bit):
    levels = 2 ** bit - 1
    generator = torch.Generator().manual_seed(bit)
    x = quantizer_inputs(1.3, levels, generator).to(CUDA)  # random values and every rounding tie
    grad = torch.randn(x.shape, generator=generator).to(CUDA)
    results = []
    for kernels in ("reference", "compile"):
        module = QuantReLU(bit, 1.3, kernels=kernels).to(CUDA)
        xi = x.clone().requires_grad_()
        y = module(xi)
        y.backward(grad)
        results.append((y.detach(), xi.grad, module.act_alpha.grad))
    (y_ref, gx_ref, ga_ref), (y_fused, gx_fused, ga_fused) = results
    assert y_fused.device == x.device and y_fused.dtype == x.dtype and y_fused.shape == x.shape
    alpha = module.act_alpha.detach()

    u = torch.relu(x.double()) / alpha.double() * levels + 0.5  # the argument of floor()
    checked = ((u - u.round()).abs() >= MARGIN).flatten()
    assert float(u.max()) < 100 and int(checked.sum()) >= 3900 and int((~checked).sum()) > 0
    k_ref, k_fused = levels_of(y_ref, alpha, levels).flatten(), levels_of(y_fused, alpha, levels).flatten()
    assert torch.equal(k_fused[checked], k_ref[checked]), "a level differs away from every rounding tie"
    assert float((k_fused - k_ref).abs().max()) <= 1
    same = k_fused == k_ref
    assert int(ulps(y_fused, y_ref).flatten()[same].max()) <= 4
    assert torch.equal(gx_fused, gx_ref)

    flipped = ~same
    xd, gd, a = x.double().flatten(), grad.double().flatten(), alpha.double()
    inside = (xd > 0) & (xd < a)
    local = torch.where(xd >= a, 1.0, torch.where(inside, (y_ref.double().flatten() - xd) / a, 0.0))
    bound = gd[flipped].abs().sum() / levels + 1e-4 * (gd * local).abs().sum() + 1e-6
    assert abs(float(ga_fused) - float(ga_ref)) <= float(bound), (float(ga_fused), float(ga_ref), float(bound))
    print(f"\nquantizer {bit} bit: {int(checked.sum())} values off every tie, {int(flipped.sum())} flipped on a tie")


def test_with_eager_numerics_the_cuda_kernels_are_exact():
    """Why the criterion above allows flips: with correctly rounded division, no fused multiply-add
    and no flush-to-zero, Triton's graded and signed neurons are the reference bit for bit, exact
    multiples of theta and subnormal currents included, and the quantizer's levels are exact on
    every tie."""
    def graded_window(x, theta):  # code objects of their own: compiled afresh with these options
        return run_steps(x, theta, STEPS["graded"])

    def signed_window(x, theta):
        return run_steps(x, theta, STEPS["signed"])

    def quantizer(x, alpha, levels):
        return quantize_activation(x, alpha, levels)

    windows = {kind: torch.compile(fn, dynamic=True, options=EAGER_NUMERICS)
               for kind, fn in (("graded", graded_window), ("signed", signed_window))}
    quantize = torch.compile(quantizer, dynamic=True, options=EAGER_NUMERICS)
    g = torch.Generator().manual_seed(23)
    with torch.no_grad():
        for kind, window in windows.items():
            for theta in (0.75, 0.7, 1.3):
                x = threshold_currents(3, theta, kind, int(theta * 100)).to(CUDA)
                out = window(x.reshape(3, -1), torch.tensor(theta, device=CUDA)).reshape(x.shape)
                ref = if_spikes(x, theta, kind)
                assert torch.equal(bits(out), bits(ref)), (kind, theta)
                assert (ref < 0).any() and (kind == "signed" or (ref.abs() == 3).any())
        alpha = torch.tensor(1.3, device=CUDA)
        for bit in (1, 2, 4):
            levels = 2 ** bit - 1
            x = quantizer_inputs(1.3, levels, g).to(CUDA)
            y, y_ref = quantize(x, alpha, levels), quantize_activation(x, alpha, levels)
            assert torch.equal(levels_of(y, alpha, levels), levels_of(y_ref, alpha, levels)), bit
            assert int(ulps(y, y_ref).max()) <= 4


# -- the whole spiking UNet -------------------------------------------------------------------

def test_float64_graded_compensated_unet_on_cuda_is_the_ann():
    """tests/test_neuron.py's random calibrated UNet: graded neurons + compensated GroupNorm in
    float64 on CUDA give the float64 ANN's output on CUDA (and that is the CPU's)."""
    ann = random_unet(2)  # shared with the CPU suite's cache: converted or copied, never changed
    snn = convert(ann, "graded", "compensated").double().to(CUDA)
    ann64 = copy.deepcopy(ann).double().to(CUDA)
    x, t = inputs(4, 16, torch.float64)
    with torch.no_grad():
        reference = ann64(x.to(CUDA), t.to(CUDA))
        out = snn(x.to(CUDA), t.to(CUDA))
        moved = relative_error(ann64(x.flip(0).to(CUDA), t.to(CUDA)), reference)
        cpu = copy.deepcopy(ann).double()(x, t)
    assert out.device.type == torch.device(CUDA).type and out.dtype == torch.float64 and out.shape == x.shape
    err = relative_error(out, reference)
    print(f"\nfloat64 graded+compensated SNN vs ANN on CUDA: relative error {float(err.max()):.1e}")
    assert float(err.max()) < 1e-9
    assert float(moved.min()) > 0.1, "the output depends on the input"
    assert float(relative_error(reference.cpu(), cpu).max()) < 1e-9, "CUDA and CPU compute the same ANN"
