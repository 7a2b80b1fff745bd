"""Latency of a spiking UNet: neuron layers on the longest path, counted by hand and measured."""
import pytest
import torch
import torch.nn as nn

from common.configs import UNetConfig
from helpers import unet
from quant import QuantReLU
from snn import convert
from snn.latency import latency_steps, neuron_depth, unet_depth

ONE_LEVEL = dict(ch=32, ch_mult=(1,), num_res_blocks=1, dropout=0.0, bit=2)


class Branches(nn.Module):
    """x -> fc -> act -> fc -> act, plus a skip of one act, plus x itself: longest path 2 acts."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)
        self.act1, self.act2, self.skip_act = QuantReLU(2), QuantReLU(2), QuantReLU(2)

    def forward(self, x):
        deep = self.act2(self.fc2(self.act1(self.fc1(x))))
        return torch.cat([deep + self.skip_act(x), x], dim=1)


def test_depth_of_a_hand_made_graph():
    assert neuron_depth(Branches(), torch.randn(2, 4)) == 2
    assert neuron_depth(nn.Sequential(nn.Linear(4, 4), QuantReLU(32)), torch.randn(2, 4)) == 0  # a plain ReLU


def test_depth_of_a_one_level_unet_by_hand():
    """ch_mult (1,), one ResBlock a level: the time embedding's path has 2 activations (its own and
    temb_proj's), added after the first activation of each ResBlock, so the first ResBlock ends at
    max(1, 2) + 1 = 3, every later one adds 2: down 1, middle 2, up 2 ResBlocks -> 3 + 4 * 2 = 11,
    and the tail's activation 12."""
    assert unet_depth(UNetConfig(**ONE_LEVEL)) == 12
    assert latency_steps(UNetConfig(**ONE_LEVEL), "two_phase", 3) == 13 * 3
    for streaming in ("if", "signed", "graded"):
        assert latency_steps(UNetConfig(**ONE_LEVEL), streaming, 3) == 3


@pytest.mark.parametrize("fields, depth", [({}, 18), ({"spike_driven": True}, 18),
                                           ({"spike_driven": True, "resample": "act_conv"}, 20),
                                           ({"spike_driven": True, "resample": "signed_conv"}, 20)])
def test_depth_of_a_two_level_unet_by_hand(fields, depth):
    """ch_mult (1, 2): 3 (first ResBlock) + 2 (second down ResBlock) + 4 (middle) + 8 (four up
    ResBlocks) + 1 (tail) = 18; an activation before the down and the up conv adds one each."""
    assert unet_depth(UNetConfig(**{**ONE_LEVEL, "ch_mult": (1, 2), **fields})) == depth


def test_the_snn_has_its_anns_depth():
    """Measured on the spiking UNet itself (its IF neurons as the neuron layers), the depth is the
    one ``latency_steps`` takes from the UNet of its configuration."""
    ann = unet(100, **{**ONE_LEVEL, "ch_mult": [1, 2]}).eval()
    snn = convert(ann, "two_phase", "compensated")
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([5])
    assert neuron_depth(snn, x, t) == unet_depth(ann.config) == 18
    assert snn.latency_steps() == 19 * 3 and convert(ann, "graded", "compensated").latency_steps() == 3
