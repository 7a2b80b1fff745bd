"""Quantized activations and APoT weights."""
from quant.activation import FULL_PRECISION, QuantReLU, quantize_activation
from quant.weight import QConv2d, QLinear, WeightQuantizer, apot_levels

__all__ = ["FULL_PRECISION", "QuantReLU", "quantize_activation", "QConv2d", "QLinear",
           "WeightQuantizer", "apot_levels"]
