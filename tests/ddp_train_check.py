"""``ANN_train.py`` for test_distributed.py: after ``model.train.TrainLoop.run``, every process compares its model
with the checkpoint rank 0 wrote and reports into ``<logdir>/rank{RANK}.json``.

    PYTHONPATH=. python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_train_check.py [ANN_train flags]

A process whose parameters drifted from rank 0's (DDP not averaging gradients, a rank that
skipped a step) reports ``net_equal: false``: each rank sees other data and other noise, so
identical parameters are evidence of the synchronisation, not a coincidence.
"""
import json
import os

import torch

import ANN_train
from common.flags import run
from model import checkpoint, data
from model import train as training

_run = training.TrainLoop.run


def same_state(model, state):
    """True when every tensor of ``model.state_dict()`` equals ``state``'s exactly."""
    own = model.state_dict()
    return own.keys() == state.keys() and all(torch.equal(own[k].cpu(), state[k]) for k in own)


def run_then_compare(loop, dataset):
    _run(loop, dataset)
    ckpt = checkpoint.load_checkpoint(loop.ckpt_path)  # complete: run() ends with a barrier after saving
    batch = next(data.training_batches(dataset, loop.cfg.batch_size, loop.rt))
    report = {
        "rank": loop.rt.rank,
        "world_size": loop.rt.world_size,
        "per_rank_batch": int(batch.shape[0]),
        "net_equal": same_state(loop.net_model, ckpt["net_model"]),
        "ema_equal": same_state(loop.ema_model, ckpt["ema_model"]),
        "param_sum": float(sum(p.double().sum() for p in loop.net_model.parameters())),
    }
    with open(os.path.join(loop.logdir, f"rank{loop.rt.rank}.json"), "w") as f:
        json.dump(report, f)


training.TrainLoop.run = run_then_compare

if __name__ == "__main__":
    run(ANN_train.main)
