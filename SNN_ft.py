"""Stage 3: block-wise fine-tuning of the converted SNN against the quantized ANN.

    python SNN_ft.py --flagfile config/SNN_ft/CIFAR10_snnft.txt [--flag=value ...]

Reads ``<logdir>/ckpt.pt`` (the quantized ANN, EMA weights), converts it and tunes the SNN block
by block (``docs/finetune.md``). Writes under ``<logdir>/SNN_{bit}bit_ft/``: ``model_backpacks/``
(a checkpoint after every block), ``ft_blocks_samples/`` (a sample grid after every block),
``snn_ft.pt`` (the fine-tuned SNN, loadable by ``evaluate.py``), ``finetune.json`` and
tensorboard events. A restart continues after the last finished block with the settings stored
in its backpack (``--logdir`` is enough); ``--restart`` starts again. The run is
``snn.finetune_run.finetune_run``.
"""
from common import flags as cflags
from snn.finetune_run import finetune_run

cflags.flags_of("SNN_ft.py")


def main(argv):
    finetune_run(**cflags.finetune_settings())


if __name__ == "__main__":
    cflags.run(main)
