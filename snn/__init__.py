"""Integrate-and-fire neurons and the quantized ANN -> SNN conversion."""
from snn.convert import SpikingUNet, convert, swap_activations
from snn.neuron import IFNeuron
from snn.steps import fold, if_spikes, time_mean, unfold

__all__ = ["IFNeuron", "SpikingUNet", "convert", "swap_activations", "fold", "unfold", "if_spikes", "time_mean"]
