"""Block-wise fine-tuning of a converted spiking UNet against its quantized ANN (``docs/finetune.md``).

Fast-SNN's layer-wise tuning, adapted to the UNet's blocks (``UNet.blocks()``, forward order).
For block k, with the blocks before it already tuned, every step

1. draws a training batch: x_0 from the data, t ~ U{0, ..., T_diffusion - 1}, noise,
   x_t = q_sample(x_0, t, noise);
2. captures the quantized ANN's output of block k for (x_t, t) with a forward hook (the target);
3. captures the SNN's spike-train input of block k (time-major, ``[T*B, ...]``, with the time
   embedding and the concatenated skip tensor it receives) with a forward pre-hook, stopping the
   forward there;
4. runs SNN block k on that input and takes its time mean; the gradient comes from the ANN
   version of block k -- the same parameters with quantized ReLUs -- evaluated on the time-mean
   input (straight-through: value of the SNN, gradient of the ANN); MSE against the target.

Thresholds (``act_alpha``) stay frozen. Before the steps, bias correction (``snn.calibrate``)
may shift the block's output bias by the mean ANN-SNN difference of its output. Each change of a
block (the correction, then the steps) is kept only when neither of two errors of the whole SNN
against the ANN grows and one falls: the one-call error on a fixed held-out batch, and the error
of the images of a short sampling run from fixed noise, which sees the biases a sampler adds up
over its steps; otherwise the block is restored bit for bit.
"""
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.func import functional_call

from snn import calibrate
from snn.capture import block_inputs, block_output
from snn.neuron import IFNeuron
from snn.steps import time_mean, unfold


def decode_input(value, time_steps):
    """Rate decoding of one block input: ``[T*B, ...]`` -> ``[B, ...]``.

    Integer inputs (the diffusion step fed to the time embedding) are the same at every time
    step and are returned for the first one.
    """
    if not torch.is_tensor(value):
        return value
    if value.is_floating_point():
        return time_mean(value, time_steps)
    return unfold(value, time_steps)[0]


def straight_through_output(snn_block, ann_block, args, kwargs, time_steps):
    """Block output ``[B, ...]`` with the SNN's value and the ANN's gradient.

    ``snn_block`` simulates the spike-train input ``args`` ``[T*B, ...]``; ``ann_block`` (same
    parameter names, quantized ReLUs) is evaluated *with the SNN block's parameters* on the
    time-mean input, so gradients land on the SNN's weights:
    ``ann_out + (snn_out - ann_out).detach()``.
    """
    with torch.no_grad():
        snn_out = time_mean(snn_block(*args, **kwargs), time_steps)
    mean_args = tuple(decode_input(a, time_steps) for a in args)
    mean_kwargs = {k: decode_input(v, time_steps) for k, v in kwargs.items()}
    tensors = {**dict(snn_block.named_parameters()), **dict(snn_block.named_buffers())}
    ann_out = functional_call(ann_block, tensors, mean_args, mean_kwargs)
    return ann_out + (snn_out - ann_out).detach()


@dataclass
class BlockPair:
    """Block k of the SNN being tuned and of the frozen quantized ANN (its target)."""
    index: int
    name: str
    snn_block: torch.nn.Module
    ann_block: torch.nn.Module


def block_pairs(snn, ann):
    """``[BlockPair]`` in forward order; the two models must have the same block structure."""
    snn_blocks, ann_blocks = snn.blocks(), ann.blocks()
    assert [n for n, _ in snn_blocks] == [n for n, _ in ann_blocks], "the SNN and the ANN differ in blocks"
    return [BlockPair(i, name, s, a) for i, ((name, s), (_, a)) in enumerate(zip(snn_blocks, ann_blocks))]


def block_loss(snn, ann, pair, x_t, t):
    """MSE between the straight-through SNN block output and the ANN block output for (x_t, t).

    ``x_t`` [B, 3, H, W], ``t`` [B]. Returns a scalar with a graph to the SNN block's parameters.
    """
    with torch.no_grad():
        target = block_output(ann, pair.ann_block, x_t, t)
        args, kwargs = block_inputs(snn, pair.snn_block, x_t, t)
    out = straight_through_output(pair.snn_block, pair.ann_block, args, kwargs, snn.time_steps)
    return F.mse_loss(out, target)


def block_mismatch(snn, ann, pair, x_t, t, loss=None):
    """The SNN block's MSE to the ANN block's output relative to that output's mean square, on
    (x_t [B, 3, H, W], t [B]): 0 where the SNN block reproduces the ANN exactly, ~1e-15 where it
    does up to float rounding (a time embedding fed the same step at every time step).
    ``loss``: ``block_loss`` on the same batch, where the caller has it already."""
    with torch.no_grad():
        if loss is None:
            loss = block_loss(snn, ann, pair, x_t, t).item()
        return loss / block_output(ann, pair.ann_block, x_t, t).pow(2).mean().clamp(min=1e-30).item()


MATCHED = 1e-10  # a block whose relative mismatch is below this already equals its ANN block


def freeze_thresholds(model):
    """``act_alpha`` of every IF neuron stops taking gradients: thresholds stay those of the ANN."""
    for module in model.modules():
        if isinstance(module, IFNeuron):
            module.act_alpha.requires_grad_(False)
    return model


def trainable_parameters(block):
    """The parameters of ``block`` that fine-tuning updates (not thresholds, not frozen tables)."""
    return [p for p in block.parameters() if p.requires_grad]


def draw_batch(x_0, diffusion, generator=None):
    """The training distribution for x_0 [B, 3, H, W]: returns (x_t [B, 3, H, W], t [B]).

    t ~ U{0, ..., T-1}, noise ~ N(0, I), x_t = q_sample(x_0, t, noise) (DDPM eq. 4).
    ``generator`` (on x_0's device) makes the draws reproducible.
    """
    t = torch.randint(diffusion.T, size=(x_0.shape[0],), device=x_0.device, generator=generator)
    noise = torch.randn(x_0.shape, device=x_0.device, dtype=x_0.dtype, generator=generator)
    return diffusion.q_sample(x_0, t, noise), t


def average_gradients(params, world_size):
    """All-reduce (mean) every gradient over the process group; a no-op in a single process."""
    if world_size <= 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world_size)


def snapshot(block):
    """A detached copy of ``block``'s state to revert to."""
    return {k: v.detach().clone() for k, v in block.state_dict().items()}


def revert(block, state):
    """Put ``snapshot(block)``'s values back, bit for bit."""
    block.load_state_dict(state)


@dataclass(frozen=True)
class Errors:
    """How far the whole SNN is from its ANN, as keep-or-revert judges it: ``val``, the relative
    error of one network call on the held-out batch, and ``sample``, the relative error of the
    images of a short sampling run from fixed noise (None: the run judges by ``val`` alone)."""
    val: float
    sample: Optional[float] = None

    def improved_by(self, after):
        """True when the errors ``after`` a change let neither error grow and lower at least one."""
        pairs = [(self.val, after.val)] + ([] if self.sample is None else [(self.sample, after.sample)])
        return all(a <= b for b, a in pairs) and any(a < b for b, a in pairs)


@dataclass
class BlockRecord:
    """What fine-tuning block ``name`` did (one entry of ``finetune.json``).

    Bias correction is judged first, against the errors the block started from; the gradient
    steps then start from whatever was kept and are judged against its errors.
    """
    index: int
    name: str
    loss_start: float   # block MSE on the fixed probe batch before tuning
    loss_end: float     # ... after the gradient steps (before their keep/revert decision)
    val_before: float   # whole-SNN one-call error vs the ANN when the block starts
    val_after: float    # ... with the gradient steps (where none ran: the errors they would start from)
    kept: bool          # the gradient steps stay (no error grew, one fell); otherwise reverted
    steps: int          # gradient steps taken: ft_steps, or 0 (none asked for, or nothing to tune)
    lr: float
    wall_s: float
    sample_before: Optional[float] = None  # whole-SNN sample error vs the ANN when the block starts
    sample_after: Optional[float] = None   # ... with the gradient steps
    bias_shift: Optional[float] = None     # RMS over channels of the bias correction (None: not corrected)
    bias_val: Optional[float] = None       # one-call error with the bias correction
    bias_sample: Optional[float] = None    # sample error with the bias correction
    bias_kept: bool = False                # the correction stays; otherwise reverted
    val_end: Optional[float] = None        # the errors the block leaves the SNN with
    sample_end: Optional[float] = None

    def as_dict(self):
        return asdict(self)

    def steps_from(self):
        """(one-call, sample) errors the gradient steps started from and were judged against."""
        return (self.bias_val, self.bias_sample) if self.bias_kept else (self.val_before, self.sample_before)


@dataclass
class Tuner:
    """Block-wise tuning of ``snn`` against ``ann`` with the settings of a ``FinetuneConfig``.

    ``validate()`` returns the whole SNN's relative one-call error to the ANN on a fixed held-out
    batch, ``sample_error()`` (optional) the relative error of its images from a short sampling
    run from fixed noise (both the same number on every rank); a change of a block is kept only
    when neither grows and one falls. ``probe`` is a fixed (x_t, t) batch for the block loss
    before and after; ``calibration`` the (x_t, t) batch of bias correction (needed when
    ``cfg.bias_correction``). ``on_step(pair, step, loss)`` runs after every step,
    ``on_block(record, val_error)`` after every block (checkpoints, samples, logs).
    """
    snn: torch.nn.Module
    ann: torch.nn.Module
    cfg: object
    validate: Callable[[], float]
    probe: tuple
    world_size: int = 1
    on_step: Optional[Callable] = None
    on_block: Optional[Callable] = None
    sample_error: Optional[Callable[[], float]] = None
    calibration: Optional[tuple] = None

    def __post_init__(self):
        if self.cfg.bias_correction and self.calibration is None:
            raise ValueError("bias correction needs a calibration batch (x_t, t)")

    def step(self, pair, x_t, t, optim, params):
        """One Adam step of ``pair``'s SNN block on (x_t [B, 3, H, W], t [B]); returns the loss."""
        optim.zero_grad(set_to_none=True)
        loss = block_loss(self.snn, self.ann, pair, x_t, t)
        loss.backward()
        average_gradients(params, self.world_size)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        optim.step()
        return loss.detach()

    def probe_loss(self, pair):
        with torch.no_grad():
            return block_loss(self.snn, self.ann, pair, *self.probe).item()

    def judge(self):
        """The whole SNN's ``Errors`` now."""
        return Errors(self.validate(), None if self.sample_error is None else self.sample_error())

    def try_change(self, pair, change, current):
        """Run ``change()`` on ``pair``'s SNN block and keep it if ``current.improved_by`` the
        errors it gives; otherwise restore the block bit for bit. Returns (those errors, kept)."""
        saved = snapshot(pair.snn_block)
        change()
        after = self.judge()
        kept = current.improved_by(after)
        if not kept:
            revert(pair.snn_block, saved)
        return after, kept

    def correct_bias(self, pair, current, record):
        """Bias correction of ``pair`` (``snn.calibrate``), judged; returns the errors it leaves."""
        shift = []
        after, kept = self.try_change(pair, lambda: shift.append(calibrate.correct_bias(
            self.snn, self.ann, pair, *self.calibration, world_size=self.world_size)), current)
        record.bias_shift = float(shift[0].double().pow(2).mean().sqrt())
        record.bias_val, record.bias_sample, record.bias_kept = after.val, after.sample, kept
        return after if kept else current

    def gradient_steps(self, pair, batches, current, record):
        """``cfg.ft_steps`` Adam steps on ``pair``, judged; returns the errors they leave."""
        params = trainable_parameters(pair.snn_block)

        def steps():
            optim = torch.optim.Adam(params, lr=self.cfg.lr)
            for step in range(self.cfg.ft_steps):
                loss = self.step(pair, *next(batches), optim, params)
                if self.on_step is not None:
                    self.on_step(pair, step, loss)
            record.loss_end = self.probe_loss(pair)
        after, kept = self.try_change(pair, steps, current)
        record.val_after, record.sample_after, record.kept, record.steps = after.val, after.sample, kept, \
            self.cfg.ft_steps
        return after if kept else current

    def tune_block(self, pair, batches, val_before, sample_before=None):
        """Bias-correct, then tune one block, each change kept only if the errors say so.

        ``batches`` yields (x_t, t); ``val_before`` and ``sample_before`` are the SNN's errors now.
        A block without trainable parameters, or one that already equals its ANN block on the
        probe batch (``block_mismatch`` below ``MATCHED``: nothing to learn, and Adam would only
        walk its weights about), is left as it is (``steps`` 0, no correction). Returns a
        ``BlockRecord``; the SNN holds the kept (or restored, bit for bit) weights.
        """
        start, current = time.time(), Errors(val_before, sample_before)
        loss_start = self.probe_loss(pair)
        record = BlockRecord(pair.index, pair.name, loss_start, loss_start, val_before, val_before, False, 0,
                             self.cfg.lr, 0.0, sample_before, sample_before)
        if trainable_parameters(pair.snn_block) and (self.cfg.bias_correction or self.cfg.ft_steps > 0) and \
                block_mismatch(self.snn, self.ann, pair, *self.probe, loss=loss_start) >= MATCHED:
            if self.cfg.bias_correction and calibrate.output_bias(pair.snn_block) is not None:
                current = self.correct_bias(pair, current, record)
            if self.cfg.ft_steps > 0:
                current = self.gradient_steps(pair, batches, current, record)
        if record.steps == 0:
            record.val_after, record.sample_after = current.val, current.sample
        record.val_end, record.sample_end = current.val, current.sample
        record.wall_s = round(time.time() - start, 2)
        return record

    def run(self, batches_for, start_block=0, val_error=None, sample_error=None):
        """Tune every block from ``start_block`` on, in forward order; returns the ``BlockRecord``s.

        ``batches_for(index)`` gives block ``index``'s stream of (x_t, t) batches; ``val_error``
        and ``sample_error`` are the SNN's current errors (computed when None).
        """
        self.snn.eval()
        self.ann.eval()
        freeze_thresholds(self.snn)
        self.ann.requires_grad_(False)
        val_error = self.validate() if val_error is None else val_error
        if sample_error is None and self.sample_error is not None:
            sample_error = self.sample_error()
        records = []
        for pair in block_pairs(self.snn, self.ann)[start_block:]:
            record = self.tune_block(pair, batches_for(pair.index), val_error, sample_error)
            val_error, sample_error = record.val_end, record.sample_end
            records.append(record)
            if self.on_block is not None:
                self.on_block(record, val_error)
        return records
