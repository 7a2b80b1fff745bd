"""Block-wise fine-tuning (snn/finetune.py) and stage 3 (snn/finetune_run.py, SNN_ft.py)."""
import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from common.configs import FinetuneConfig
from diffusion import GaussianDiffusion, sample_noise
from helpers import cli_cases, stage_in_process, unet
from model.unet import ResBlock
from quant import QuantReLU
from diffusion import DDIMSampler
from snn import agreement, calibrate
from snn import finetune as ft
from snn.convert import convert
from snn.steps import time_mean

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T_DIFF = 100


MODES = [("if", "step"), ("signed", "step"), ("if", "compensated"), ("graded", "step"), ("graded", "compensated")]


def tiny_pair(seed=0, neuron="if", norm="step"):
    """A tiny 2-bit UNet with weights large enough that the SNN differs from the ANN, and its SNN."""
    torch.manual_seed(seed)
    ann = unet(T_DIFF, ch=32, ch_mult=[1], attn=[], num_res_blocks=1, dropout=0.0, bit=2).eval()
    with torch.no_grad():
        for m in ann.modules():
            if isinstance(m, QuantReLU):
                m.act_alpha.fill_(1.0)
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                m.bias.normal_(0, 0.1)
    return ann, convert(ann, neuron, norm).eval()


def noisy_batch(n=8, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(T_DIFF, (n,), generator=g)


def manual_trace(model, x, t):
    """Inputs and outputs of every block by an explicit forward written out here: {name: (args, out)}."""
    trace = {}

    def call(name, module, *args):
        out = module(*args)
        trace[name] = (args, out)
        return out

    temb = call("time_embedding", model.time_embedding, t)
    h = call("head", model.head, x)
    hs = [h]
    for i, layer in enumerate(model.downblocks):
        h = call(f"downblocks.{i}", layer, h, temb)
        hs.append(h)
    for i, layer in enumerate(model.middleblocks):
        h = call(f"middleblocks.{i}", layer, h, temb)
    for i, layer in enumerate(model.upblocks):
        if isinstance(layer, ResBlock):
            h = torch.cat([h, hs.pop()], dim=1)
        h = call(f"upblocks.{i}", layer, h, temb)
    call("tail", model.tail, h)
    return trace


@pytest.mark.parametrize("neuron,norm", [("if", "step"), ("graded", "compensated")])
@torch.no_grad()
def test_hook_capture_equals_explicit_forward(neuron, norm):
    ann, snn = tiny_pair(neuron=neuron, norm=norm)
    x, t = noisy_batch()
    T = snn.time_steps
    ann_trace = manual_trace(ann, x, t)
    snn_trace = manual_trace(snn, x.repeat(T, 1, 1, 1), t.repeat(T))
    assert torch.equal(ann_trace["tail"][1], ann(x, t))
    for pair in ft.block_pairs(snn, ann):
        args, kwargs = ft.block_inputs(snn, pair.snn_block, x, t)
        expected = snn_trace[pair.name][0]
        assert kwargs == {} and len(args) == len(expected), pair.name
        for got, want in zip(args, expected):
            assert got.shape[0] == T * x.shape[0] and torch.equal(got, want), pair.name
        assert torch.equal(ft.block_output(ann, pair.ann_block, x, t), ann_trace[pair.name][1]), pair.name


@torch.no_grad()
def test_capture_stops_the_forward_at_the_block():
    ann, snn = tiny_pair()
    ran = []
    snn.tail.register_forward_pre_hook(lambda *_: ran.append("tail"))
    ft.block_inputs(snn, snn.upblocks[0], *noisy_batch())
    ft.block_output(snn, snn.upblocks[0], *noisy_batch())
    assert ran == []


@pytest.mark.parametrize("neuron,norm", MODES)
def test_straight_through_has_snn_value_and_ann_gradient(neuron, norm):
    """In every conversion mode: the value is the SNN block's, the gradient the ANN block's."""
    ann, snn = tiny_pair(neuron=neuron, norm=norm)
    ft.freeze_thresholds(snn)
    pair = ft.block_pairs(snn, ann)[4]  # middleblocks.1: neurons fed by a time-varying input
    assert pair.name == "middleblocks.1"
    T = snn.time_steps
    x, t = noisy_batch()
    with torch.no_grad():
        args, _ = ft.block_inputs(snn, pair.snn_block, x, t)
        snn_value = time_mean(pair.snn_block(*args), T)
    out = ft.straight_through_output(pair.snn_block, pair.ann_block, args, {}, T)
    torch.testing.assert_close(out, snn_value, rtol=0, atol=1e-6)
    weight = torch.randn_like(out)
    (out * weight).sum().backward()

    twin = copy.deepcopy(pair.ann_block)  # the ANN block with the SNN block's weights
    twin.load_state_dict(pair.snn_block.state_dict())
    mean_args = [time_mean(a, T) for a in args]
    ann_value = twin(*mean_args)
    if (neuron, norm) != ("graded", "compensated"):  # the exact mode has no sequential error to show
        assert (ann_value - snn_value).abs().max() > 1e-3, "the sequential error should be visible here"
    else:
        torch.testing.assert_close(ann_value, snn_value, rtol=1e-4, atol=1e-4)
    (ann_value * weight).sum().backward()
    twin_params = dict(twin.named_parameters())
    for name, p in pair.snn_block.named_parameters():
        if name.endswith("act_alpha"):
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, twin_params[name].grad)


def tuner(ann, snn, validate=lambda: 1.0, lr=1e-3, steps=5, probe=None, grad_clip=1.0, bias_correction=False,
          **kw):
    """A ``Tuner`` of the tiny pair; without bias correction (and sample errors) unless asked for."""
    cfg = FinetuneConfig(lr=lr, ft_steps=steps, grad_clip=grad_clip, bias_correction=bias_correction)
    return ft.Tuner(snn, ann, cfg, validate, probe or noisy_batch(), **kw)


def test_a_step_moves_each_weight_against_its_gradient():
    """Adam's first step: every weight moves by lr * g / (|g| + eps) against its (clipped)
    gradient g of the straight-through block loss; thresholds do not move."""
    ann, snn = tiny_pair()
    ft.freeze_thresholds(snn)
    ann.requires_grad_(False)
    pair = ft.block_pairs(snn, ann)[5]  # upblocks.0
    x, t = noisy_batch(n=16)
    params = ft.trainable_parameters(pair.snn_block)
    before = {name: p.detach().clone() for name, p in pair.snn_block.named_parameters()}
    ft.block_loss(snn, ann, pair, x, t).backward()
    grads = [p.grad.clone() for p in params]
    scale = min(1.0, 0.5 / float(torch.cat([g.flatten() for g in grads]).norm()))  # grad_clip=0.5
    for p in params:
        p.grad = None
    lr = 1e-3
    run = tuner(ann, snn, lr=lr, grad_clip=0.5)
    run.step(pair, x, t, torch.optim.Adam(params, lr=lr), params)
    moved = dict(pair.snn_block.named_parameters())
    for (name, p), g in zip([(n, p) for n, p in pair.snn_block.named_parameters() if p.requires_grad], grads):
        g = g * scale
        expected = before[name] - lr * g / (g.abs() + 1e-8)
        torch.testing.assert_close(moved[name].detach(), expected, rtol=0, atol=lr * 1e-3)  # steps are ~lr
    assert float(sum(g.abs().sum() for g in grads)) > 0
    for name, value in before.items():
        if name.endswith("act_alpha"):
            assert torch.equal(moved[name], value)


def batches_for_tiny(diffusion, n=16, size=8):
    def batches_for(index):
        g = torch.Generator().manual_seed(100 + index)
        while True:
            x_0 = torch.rand(n, 3, size, size, generator=g) * 2 - 1
            yield ft.draw_batch(x_0, diffusion, g)
    return batches_for


def test_revert_restores_bit_identical_weights_and_keep_keeps():
    ann, snn = tiny_pair()
    ft.freeze_thresholds(snn)
    ann.requires_grad_(False)
    diffusion = GaussianDiffusion(1e-4, 0.02, T_DIFF)
    pair = ft.block_pairs(snn, ann)[5]
    original = ft.snapshot(pair.snn_block)
    worse = tuner(ann, snn, validate=lambda: 2.0).tune_block(pair, batches_for_tiny(diffusion)(0), 1.0)
    assert not worse.kept and worse.val_after == 2.0
    for key, value in pair.snn_block.state_dict().items():
        assert torch.equal(value, original[key]), key
    better = tuner(ann, snn, validate=lambda: 0.5).tune_block(pair, batches_for_tiny(diffusion)(0), 1.0)
    assert better.kept and better.lr == 1e-3 and better.steps == 5
    changed = [k for k, v in pair.snn_block.state_dict().items() if not torch.equal(v, original[k])]
    assert any(k.endswith("weight") for k in changed)
    assert not any(k.endswith("act_alpha") for k in changed)


def test_a_block_that_already_equals_its_ann_block_is_left_alone():
    """The time embedding sees the same step at every time step, so its SNN output is the ANN's up
    to float rounding: it is not tuned (Adam would only walk its weights about), not validated,
    and stays bit for bit; a block that differs is tuned."""
    ann, snn = tiny_pair()
    ft.freeze_thresholds(snn)
    ann.requires_grad_(False)
    diffusion = GaussianDiffusion(1e-4, 0.02, T_DIFF)
    pairs = ft.block_pairs(snn, ann)
    x, t = noisy_batch(n=16)
    assert ft.block_mismatch(snn, ann, pairs[0], x, t) < ft.MATCHED < ft.block_mismatch(snn, ann, pairs[5], x, t)
    original = ft.snapshot(pairs[0].snn_block)
    calls = []
    run = tuner(ann, snn, validate=lambda: calls.append(1) or 0.5)
    record = run.tune_block(pairs[0], batches_for_tiny(diffusion)(0), 1.0)
    assert record.steps == 0 and not record.kept and record.val_after == record.val_before == 1.0 and not calls
    for key, value in pairs[0].snn_block.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert run.tune_block(pairs[5], batches_for_tiny(diffusion)(5), 1.0).steps == 5 and calls


def test_resume_tunes_only_the_remaining_blocks():
    ann, snn = tiny_pair()
    diffusion = GaussianDiffusion(1e-4, 0.02, T_DIFF)
    before = {k: v.clone() for k, v in snn.state_dict().items()}
    done = []
    falling = iter([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    run = tuner(ann, snn, validate=lambda: next(falling), steps=2, on_block=lambda r, e: done.append((r.index, e)))
    records = run.run(batches_for_tiny(diffusion), start_block=3, val_error=1.0)
    n = len(snn.blocks())
    assert [r.index for r in records] == [i for i, _ in done] == list(range(3, n))
    assert all(r.kept for r in records) and [e for _, e in done] == [0.9, 0.8, 0.7, 0.6, 0.5][:n - 3]
    first_three = tuple(name + "." for name, _ in snn.blocks()[:3])
    for key, value in snn.state_dict().items():
        if key.startswith(first_three):
            assert torch.equal(value, before[key]), key


def test_relative_error_closed_form():
    ann, snn = tiny_pair()
    x, t = noisy_batch()
    out = agreement.predictions(snn, x, t, chunk=3)
    assert agreement.relative_error(out, out.double() / 1.25) == pytest.approx(0.25, rel=1e-9)  # |1.25 r - r| / |r|


def test_a_whole_run_never_ends_worse_than_it_started():
    """Keep-or-revert: a block is kept exactly when the held-out error fell; the error a block
    starts from is the last kept one; so the final error is the lowest the run has seen."""
    ann, snn = tiny_pair(seed=3)
    diffusion = GaussianDiffusion(1e-4, 0.02, T_DIFF)
    g = torch.Generator().manual_seed(7)
    x_0 = torch.rand(32, 3, 8, 8, generator=g) * 2 - 1
    val_x, val_t = ft.draw_batch(x_0, diffusion, g)
    ann_out = agreement.predictions(ann, val_x, val_t)

    def validate():
        return agreement.relative_error(agreement.predictions(snn, val_x, val_t), ann_out)

    converted = validate()
    records = tuner(ann, snn, validate=validate, steps=10, probe=(val_x[:16], val_t[:16])).run(
        batches_for_tiny(diffusion))
    final = validate()
    current = converted
    for r in records:
        assert r.val_before == current
        assert r.kept == (r.val_after < r.val_before)
        current = r.val_after if r.kept else current
    assert final == current <= converted


# --- bias correction ------------------------------------------------------------------------------

def calibration(n=64, size=8, seed=9):
    g = torch.Generator().manual_seed(seed)
    return ft.draw_batch(torch.rand(n, 3, size, size, generator=g) * 2 - 1, GaussianDiffusion(1e-4, 0.02, T_DIFF), g)


@pytest.mark.parametrize("variant", [{}, {"spike_driven": True}, {"resample": "act_conv", "shortcut": "act"},
                                     {"shortcut": "fold_act"}])
@torch.no_grad()
def test_output_bias_is_added_last_in_every_block(variant):
    """Adding c to a block's ``output_bias`` moves that block's output by exactly c at every
    element, for its own inputs held fixed (what bias correction relies on); in every kind of
    UNet, down and up sampling included (a pooling one has no bias)."""
    torch.manual_seed(0)
    ann = unet(T_DIFF, ch=32, ch_mult=[1, 2], attn=[], num_res_blocks=1, dropout=0.0, bit=2, **variant).eval()
    x, t = noisy_batch()
    checked = 0
    for pair in ft.block_pairs(ann, ann):
        bias = calibrate.output_bias(pair.ann_block)
        if bias is None:
            assert not list(pair.ann_block.parameters()), pair.name  # pooling: nothing to correct
            continue
        args, kwargs = ft.block_inputs(ann, pair.ann_block, x, t)
        before = pair.ann_block(*args, **kwargs)
        shift = torch.arange(bias.numel(), dtype=bias.dtype) / 8 - 1  # a different c per channel
        bias.add_(shift)
        moved = pair.ann_block(*args, **kwargs) - before
        bias.sub_(shift)
        expected = shift.view(1, -1, *[1] * (moved.dim() - 2)).expand_as(moved)
        torch.testing.assert_close(moved, expected, rtol=0, atol=1e-5, msg=pair.name)
        checked += 1
    assert checked >= len(ann.blocks()) - (2 if variant.get("spike_driven") else 0)


def block_mean_differences(snn, ann, batch):
    return {p.name: calibrate.mean_difference(snn, ann, p, *batch) for p in ft.block_pairs(snn, ann)}


@pytest.mark.parametrize("neuron,norm", [("if", "step"), ("signed", "step")])
def test_bias_correction_zeroes_each_blocks_mean_difference(neuron, norm):
    """One pass in forward order: a block's input depends on the blocks before it only, and its
    correction shifts its time-mean output by exactly the mean difference, so afterwards every
    block's per-channel mean ANN-SNN difference on the calibration batch is zero to rounding.
    Only the output biases change."""
    ann, snn = tiny_pair(neuron=neuron, norm=norm)
    batch = calibration()
    before = block_mean_differences(snn, ann, batch)
    state = {k: v.clone() for k, v in snn.state_dict().items()}
    biases = set()
    for pair in ft.block_pairs(snn, ann):
        calibrate.correct_bias(snn, ann, pair, *batch, chunk=24)  # chunks of 24: 64 is no multiple
        biases.add(next(k for k, v in snn.named_parameters() if v is calibrate.output_bias(pair.snn_block)))
    after = block_mean_differences(snn, ann, batch)
    assert max(float(d.abs().max()) for d in before.values()) > 1e-2, "the SNN must have a bias to correct"
    for name, diff in after.items():
        assert float(diff.abs().max()) < 1e-6, (name, diff)
    changed = {k for k, v in snn.state_dict().items() if not torch.equal(v, state[k])}
    assert changed and changed <= biases


@torch.no_grad()
def test_bias_correction_moves_the_block_output_by_its_shift():
    """The identity for the block itself: with its input held fixed, the SNN block's time-mean
    output moves by the shift at every element, so its mean difference to the ANN becomes 0."""
    ann, snn = tiny_pair()
    batch = calibration()
    pair = ft.block_pairs(snn, ann)[5]
    args, _ = ft.block_inputs(snn, pair.snn_block, *batch)
    before = time_mean(pair.snn_block(*args), snn.time_steps)
    diff = ft.block_output(ann, pair.ann_block, *batch) - before
    shift = calibrate.correct_bias(snn, ann, pair, *batch)
    torch.testing.assert_close(shift.double(), diff.double().mean((0, 2, 3)))
    moved = time_mean(pair.snn_block(*args), snn.time_steps) - before
    rounding = 1e-6 * float(before.abs().max())  # float32 rounding of outputs of that size
    torch.testing.assert_close(moved, shift.view(1, -1, 1, 1).expand_as(moved), rtol=0, atol=rounding)
    assert float(shift.abs().max()) > 1e3 * rounding


def test_calibration_batch_is_fixed_and_drawn_as_training_batches():
    data = [(torch.full((3, 4, 4), float(i) / 50 - 1), 0) for i in range(50)]
    diffusion = GaussianDiffusion(1e-4, 0.02, T_DIFF)
    a = calibrate.calibration_batch(data, 40, diffusion, seed=5)
    b = calibrate.calibration_batch(data, 40, diffusion, seed=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].shape == (40, 3, 4, 4)
    assert not torch.equal(a[1], calibrate.calibration_batch(data, 40, diffusion, seed=6)[1])
    assert len(set(a[1].tolist())) > 20 and 0 <= int(a[1].min()) and int(a[1].max()) < T_DIFF
    with pytest.raises(ValueError):
        calibrate.calibration_batch(data, 51, diffusion, seed=5)


# --- keep or revert by two errors --------------------------------------------------------------------

def test_a_change_is_kept_when_no_error_grows_and_one_falls():
    start = ft.Errors(0.5, 0.3)
    assert start.improved_by(ft.Errors(0.4, 0.3)) and start.improved_by(ft.Errors(0.5, 0.2))
    assert start.improved_by(ft.Errors(0.4, 0.2))
    assert not start.improved_by(ft.Errors(0.4, 0.31))   # one falls, the other grows
    assert not start.improved_by(ft.Errors(0.51, 0.2))
    assert not start.improved_by(ft.Errors(0.5, 0.3))    # nothing fell
    assert ft.Errors(0.5).improved_by(ft.Errors(0.4)) and not ft.Errors(0.5).improved_by(ft.Errors(0.5))


def block_five():
    """(ANN, SNN with frozen thresholds, the pair of their 6th blocks, a snapshot of the SNN block,
    its training batches): the setting of the keep-or-revert tests."""
    ann, snn = tiny_pair()
    ft.freeze_thresholds(snn)
    ann.requires_grad_(False)
    pair = ft.block_pairs(snn, ann)[5]
    return ann, snn, pair, ft.snapshot(pair.snn_block), batches_for_tiny(GaussianDiffusion(1e-4, 0.02, T_DIFF))(0)


@pytest.mark.parametrize("val,sample", [(0.5, 2.0), (2.0, 0.5)])
def test_steps_that_lower_one_error_and_raise_the_other_are_reverted(val, sample):
    ann, snn, pair, original, batches = block_five()
    record = tuner(ann, snn, validate=lambda: val, sample_error=lambda: sample).tune_block(pair, batches, 1.0, 1.0)
    assert record.steps == 5 and not record.kept and (record.val_after, record.sample_after) == (val, sample)
    assert (record.val_end, record.sample_end) == (1.0, 1.0)
    assert record.loss_end != record.loss_start  # the steps did change the block before it was reverted
    for key, value in pair.snn_block.state_dict().items():
        assert torch.equal(value, original[key]), key
    kept = tuner(ann, snn, validate=lambda: 0.9, sample_error=lambda: 1.0).tune_block(pair, batches, 1.0, 1.0)
    assert kept.kept and (kept.val_end, kept.sample_end) == (0.9, 1.0)
    assert any(not torch.equal(v, original[k]) for k, v in pair.snn_block.state_dict().items())


def test_bias_correction_is_judged_first_and_the_steps_on_top_of_what_was_kept():
    """A correction that lowers the one-call error but raises the sample error is reverted bit for
    bit; one that lowers both is kept, and the steps are judged against its errors (and, when
    they make one worse, reverted to the corrected block)."""
    ann, snn, pair, original, batches = block_five()

    def judged_by(*errors):
        """validate() and sample_error() returning the given (val, sample) pairs in turn."""
        vals, samples = iter([e[0] for e in errors]), iter([e[1] for e in errors])
        return dict(validate=lambda: next(vals), sample_error=lambda: next(samples))
    worse = tuner(ann, snn, steps=0, bias_correction=True, calibration=calibration(),
                  **judged_by((0.8, 1.2))).tune_block(pair, batches, 1.0, 1.0)
    assert worse.bias_shift > 0 and not worse.bias_kept and (worse.bias_val, worse.bias_sample) == (0.8, 1.2)
    assert worse.steps == 0 and (worse.val_end, worse.sample_end) == (1.0, 1.0)
    for key, value in pair.snn_block.state_dict().items():
        assert torch.equal(value, original[key]), key
    both = tuner(ann, snn, steps=3, bias_correction=True, calibration=calibration(),
                 **judged_by((0.8, 0.8), (0.85, 0.7))).tune_block(pair, batches, 1.0, 1.0)
    assert both.bias_kept and both.steps_from() == (0.8, 0.8)
    assert not both.kept and (both.val_end, both.sample_end) == (0.8, 0.8)
    bias = calibrate.output_bias(pair.snn_block)
    name = next(k for k, v in pair.snn_block.named_parameters() if v is bias)
    changed = {k for k, v in pair.snn_block.state_dict().items() if not torch.equal(v, original[k])}
    assert changed == {name}, "the steps were reverted to the corrected block: only its bias differs"


def tiny_judge(ann, n=8, steps=5, eta=1.0):
    sampler = DDIMSampler(GaussianDiffusion(1e-4, 0.02, T_DIFF), steps, eta, False)
    return agreement.SampleJudge(sampler, *sample_noise(n, (3, 8, 8), 2), ann)


def test_sample_judge_is_a_function_of_the_model():
    """The same fixed noise (x_T and the sampler's) at every call: the ANN is 0 from itself, an
    SNN the same number every time; other sampler noise gives other images."""
    ann, snn = tiny_pair()
    judge = tiny_judge(ann)
    assert judge(ann) == 0.0
    error = judge(snn)
    assert error > 1e-3 and judge(snn) == error
    other = agreement.SampleJudge(judge.sampler, judge.x_T, torch.Generator().manual_seed(4), ann)
    assert agreement.relative_error(other.reference, judge.reference) > 1e-2


def test_a_whole_run_with_both_errors_never_ends_worse_in_either():
    """Bias correction and steps on every block, judged by the held-out error and the sample
    error of real sampling runs: every decision follows the rule, each block starts from the
    errors the one before left, and the run ends no worse in either error than it started."""
    ann, snn = tiny_pair(seed=3)
    diffusion = GaussianDiffusion(1e-4, 0.02, T_DIFF)
    g = torch.Generator().manual_seed(7)
    val_x, val_t = ft.draw_batch(torch.rand(32, 3, 8, 8, generator=g) * 2 - 1, diffusion, g)
    ann_out = agreement.predictions(ann, val_x, val_t)
    judge = tiny_judge(ann)

    def validate():
        return agreement.relative_error(agreement.predictions(snn, val_x, val_t), ann_out)

    converted = ft.Errors(validate(), judge(snn))
    records = tuner(ann, snn, validate=validate, sample_error=lambda: judge(snn), steps=5, bias_correction=True,
                    calibration=calibration(), probe=(val_x[:16], val_t[:16])).run(batches_for_tiny(diffusion))
    current = converted
    for r in records:
        assert (r.val_before, r.sample_before) == (current.val, current.sample)
        if r.bias_shift is not None:
            assert r.bias_kept == current.improved_by(ft.Errors(r.bias_val, r.bias_sample))
        if r.steps:
            assert r.kept == ft.Errors(*r.steps_from()).improved_by(ft.Errors(r.val_after, r.sample_after))
        current = ft.Errors(r.val_end, r.sample_end)
    assert (validate(), judge(snn)) == (current.val, current.sample)
    assert current.val <= converted.val and current.sample <= converted.sample
    assert sum(r.bias_shift is not None for r in records) >= len(records) - 2  # all but the exact two


def test_validation_batch_is_fixed_and_spread():
    data = [(torch.full((3, 4, 4), float(i) / 50 - 1), 0) for i in range(50)]
    diffusion = GaussianDiffusion(1e-4, 0.02, T_DIFF)
    a = agreement.validation_batch(data, 10, diffusion, seed=5)
    b = agreement.validation_batch(data, 10, diffusion, seed=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[1].tolist() == [round(i * 99 / 9) for i in range(10)]
    with pytest.raises(ValueError):
        agreement.validation_batch(data, 51, diffusion, seed=5)


# --- end to end: SNN_ft.py on a checkpoint trained here ------------------------------------------

# the sample judge's 64 images (the default) with 2 DDIM steps instead of 10: its rule holds at any
# number of steps, and its sampling runs are most of the run's time
FT_FLAGS = ["--dataset=shapes", "--ft_steps=2", "--batch_size=4", "--val_size=4", "--sample_size=2",
            "--sampler=ddim", "--sample_steps=2", "--num_workers=0", "--lr=0.001", "--log_step=1",
            "--neuron=if", "--norm=step", "--judge_steps=2"]


def script(name, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def stage3(*args):
    """SNN_ft.py's run of the command line ``args``, in this process."""
    return stage_in_process("SNN_ft.py", *args)


@pytest.fixture(scope="module")
def tuned_run(snn_tiny_run, tmp_path_factory):
    """(a copy of the tiny run after one real ``python SNN_ft.py`` on it, that process)."""
    logdir = shutil.copytree(snn_tiny_run, tmp_path_factory.mktemp("ft") / "run")
    return logdir, script("SNN_ft.py", *FT_FLAGS, f"--logdir={logdir}")


@pytest.fixture(scope="module")
def error_outcomes(tuned_run, tmp_path_factory):
    """{case: {"code", "stderr", ...}} of the command lines that must fail with one line, run by one
    process: the backpacks' sample-error settings contradicted, the ckpt.pt they started from
    changed, a calibration batch larger than the data, no checkpoint at all."""
    logdir = tuned_run[0]
    work = tmp_path_factory.mktemp("ft_errors")
    contradicted = shutil.copytree(logdir, work / "contradicted")
    changed = shutil.copytree(logdir, work / "changed")
    ckpt = torch.load(changed / "ckpt.pt", weights_only=True)
    ckpt["step"] += 1  # another checkpoint now: the backpacks no longer belong to it
    torch.save(ckpt, changed / "ckpt.pt")
    (work / "empty").mkdir()
    cases = {"judge_images": [f"--logdir={contradicted}", "--judge_images=3"],
             "changed": [*FT_FLAGS, f"--logdir={changed}"],
             "calib_size": [*FT_FLAGS, f"--logdir={contradicted}", "--tag=calib", "--calib_size=20000",
                            "--judge_images=0"],
             "no checkpoint": [*FT_FLAGS, f"--logdir={work / 'empty'}"]}
    outcomes = cli_cases("SNN_ft.py", cases, str(work))
    return {case: subprocess.CompletedProcess(argv, outcomes[case]["code"], "", outcomes[case]["stderr"])
            for case, argv in cases.items()}


def mtimes(folder):
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in sorted(os.listdir(folder))}


def test_script_end_to_end_resume_and_skip(tuned_run, error_outcomes, capsys):
    from snn.io import load_model
    trained_logdir, run = tuned_run
    assert run.returncode == 0, run.stderr[-2000:]
    out_dir = trained_logdir / "SNN_2bit_ft"
    result = json.loads((out_dir / "finetune.json").read_text())
    loaded = load_model(str(out_dir / "snn_ft.pt"))
    n = len(loaded.model.blocks())
    assert loaded.kind == "snn" and loaded.ckpt["finetune"]["next_block"] == n
    assert result["finished"] and [b["index"] for b in result["blocks"]] == list(range(n))
    assert result["final_error"] <= result["converted_error"]
    assert result["neuron"] == "if" and result["settings"]["ft_steps"] == 2 and result["val_size"] == 4
    assert result["settings"]["bias_correction"] and result["settings"]["judge_images"] == 64
    assert 0 < result["final_sample_error"] <= result["converted_sample_error"]
    blocks = result["blocks"]
    assert all(b["sample_before"] is not None and b["sample_end"] is not None for b in blocks)
    assert all((b["bias_shift"] is None) == (b["steps"] == 0) for b in blocks)  # tuned blocks are corrected first
    assert blocks[-1]["val_end"] == result["final_error"] and blocks[-1]["sample_end"] == result["final_sample_error"]
    backpacks = out_dir / "model_backpacks"
    assert len(os.listdir(backpacks)) == n
    assert len(os.listdir(out_dir / "ft_blocks_samples")) == n + 2  # + ann.png, converted.png

    stamps = mtimes(backpacks)
    capsys.readouterr()
    stage3(*FT_FLAGS, f"--logdir={trained_logdir}")  # in this process from here on
    assert "already tuned" in capsys.readouterr().out
    assert mtimes(backpacks) == stamps

    # the last backpack lost, the one before it torn by a crash: resumed from the one before that,
    # with only --logdir given (the settings come from the backpack)
    names = sorted(os.listdir(backpacks))
    os.remove(backpacks / names[-1])
    (backpacks / names[-2]).write_bytes((backpacks / names[-2]).read_bytes()[:300])
    os.remove(out_dir / "snn_ft.pt")
    stage3(f"--logdir={trained_logdir}", "--num_workers=0", "--sample_size=2", "--sampler=ddim", "--sample_steps=2")
    resumed = capsys.readouterr().out
    assert "continuing from the backpack before it" in resumed
    assert f"{n - 2} block(s) done" in resumed
    new_stamps = mtimes(backpacks)
    assert {k: new_stamps[k] for k in names[:-2]} == {k: stamps[k] for k in names[:-2]}
    assert names[-1] in new_stamps and (out_dir / "snn_ft.pt").exists()
    result = json.loads((out_dir / "finetune.json").read_text())
    assert result["finished"] and len(result["blocks"]) == n and result["settings"]["ft_steps"] == 2

    # the sample errors stored would not compare with those of another sampling run
    assert_one_error_line(error_outcomes["judge_images"], "--judge_images=3", "contradicts")
    assert_one_error_line(error_outcomes["changed"], "has changed", "--restart")


def assert_one_error_line(proc, *words):
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    assert len([line for line in lines if line.startswith("error:")]) == 1, proc.stderr
    assert all(word in proc.stderr for word in words), proc.stderr


def test_script_calibration_batch_larger_than_the_data_is_one_error_line(error_outcomes):
    assert_one_error_line(error_outcomes["calib_size"], "--calib_size=20000", "at least as many images")


def test_script_without_checkpoint_is_one_error_line(error_outcomes):
    assert_one_error_line(error_outcomes["no checkpoint"], "no checkpoint", "ckpt.pt")
