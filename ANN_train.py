"""Stage 1: train the activation-quantized UNet DDPM.

    python ANN_train.py --flagfile config/train_ANN/CIFAR10.txt [--flag=value ...]

Writes ``ckpt.pt`` (atomically, every ``save_step``), ``sample/`` grids and tensorboard events
into ``--logdir`` and resumes from ``ckpt.pt`` when it is already there: the model, its data and
the training settings come from the checkpoint, so ``--logdir`` and ``--total_steps`` are enough
to continue a run. ``--init PATH`` starts a new run from a higher-precision checkpoint
(32 -> 4 -> 3 -> 2 bit, as in Fast-SNN). The loop is ``model.train.train``.
"""
from common import flags as cflags
from model.train import train

cflags.flags_of("ANN_train.py")


def main(argv):
    train(**cflags.train_settings())


if __name__ == "__main__":
    cflags.run(main)
