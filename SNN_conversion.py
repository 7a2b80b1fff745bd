"""Stage 2: convert the quantized ANN of ``<logdir>/ckpt.pt`` into a spiking UNet.

    python SNN_conversion.py --flagfile config/SNN_convert/CIFAR10_snn.txt [--flag=value ...]

Writes into ``--logdir``: ``converted_snn.pt`` (the SNN checkpoint), ``images/`` (ANN and SNN
samples from the same noise) and ``conversion.json`` (the relative error of the SNN's noise
prediction on the held-out batch stage 3 uses too, spike statistics and energy). The model is
rebuilt from the configuration stored in the checkpoint; a flag given explicitly that
contradicts it is an error. ``docs/conversion.md`` explains the conversion modes. The work is
``snn.conversion.convert_run``.
"""
from common import flags as cflags
from snn.conversion import convert_run

cflags.flags_of("SNN_conversion.py")


def main(argv):
    convert_run(**cflags.conversion_settings())


if __name__ == "__main__":
    cflags.run(main)
