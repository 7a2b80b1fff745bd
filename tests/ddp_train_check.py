"""``ANN_train.py`` for test_distributed.py: after training, every process compares its model
with the checkpoint rank 0 wrote and reports into ``<logdir>/rank{RANK}.json``.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_train_check.py [ANN_train flags]

A process whose parameters drifted from rank 0's (DDP not averaging gradients, a rank that
skipped a step) reports ``net_equal: false``: each rank sees other data and other noise, so
identical parameters are evidence of the synchronisation, not a coincidence.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import ANN_train  # noqa: E402
from common import checkpoint  # noqa: E402
from common.errors import run  # noqa: E402

_train_loop = ANN_train.train_loop


def same_state(model, state):
    """True when every tensor of ``model.state_dict()`` equals ``state``'s exactly."""
    own = model.state_dict()
    return own.keys() == state.keys() and all(torch.equal(own[k].cpu(), state[k]) for k in own)


def train_loop_then_compare(rt, step, trainer, net_model, ema_model, optim, sched, batches, x_T, writer,
                            ckpt_path):
    _train_loop(rt, step, trainer, net_model, ema_model, optim, sched, batches, x_T, writer, ckpt_path)
    ckpt = checkpoint.load_checkpoint(ckpt_path)  # complete: train_loop ends with a barrier after saving
    report = {
        "rank": rt.rank,
        "world_size": rt.world_size,
        "per_rank_batch": int(next(batches).shape[0]),
        "net_equal": same_state(net_model, ckpt["net_model"]),
        "ema_equal": same_state(ema_model, ckpt["ema_model"]),
        "param_sum": float(sum(p.double().sum() for p in net_model.parameters())),
    }
    with open(os.path.join(os.path.dirname(ckpt_path), f"rank{rt.rank}.json"), "w") as f:
        json.dump(report, f)


ANN_train.train_loop = train_loop_then_compare

if __name__ == "__main__":
    run(ANN_train.main)
