"""The activation quantizer of ``docs/quantization.md`` and the APoT weight quantizer."""
import pytest
import torch
import torch.nn as nn

from quant import QConv2d, QLinear, QuantReLU, WeightQuantizer, apot_levels, quantize_activation


def test_levels_round_half_up_by_hand():
    # bit 2, alpha 3: L = 3 levels of width 1; ties go up (torch.round would send 0.5 and 2.5 down)
    x = torch.tensor([-1.0, 0.0, 0.49, 0.5, 1.5, 2.5, 2.99, 3.0, 10.0])
    expected = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 3.0, 3.0, 3.0])
    assert torch.equal(QuantReLU(2, init_alpha=3.0)(x), expected)


@pytest.mark.parametrize("bit", [1, 2, 3, 4])
def test_outputs_lie_on_the_grid(bit):
    torch.manual_seed(bit)
    q = QuantReLU(bit, init_alpha=2.5)
    y = q(torch.randn(4096) * 3)
    L = 2 ** bit - 1
    k = y / 2.5 * L
    assert torch.allclose(k, k.round(), atol=1e-5)
    assert y.min() >= 0 and y.max() <= 2.5 + 1e-6
    assert len(torch.unique(k.round())) == L + 1  # every level is reached


def test_full_precision_is_relu_without_parameters():
    q = QuantReLU(32)
    x = torch.randn(100)
    assert torch.equal(q(x), torch.relu(x))
    assert len(list(q.parameters())) == 0


def test_gradients_follow_apot_rules():
    alpha = 2.0
    q = QuantReLU(2, init_alpha=alpha)
    x = torch.tensor([-0.5, 0.3, 1.0, 1.9, 2.0, 5.0], requires_grad=True)
    y = q(x)
    y.sum().backward()
    # d y / d x: 1 strictly inside (0, alpha)
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.0]))
    # d y / d alpha: 0 below 0, (y - x) / alpha inside, 1 at and above alpha
    yv = [0.0, 0.0, 4 / 3, 2.0, 2.0, 2.0]  # 0.3 / 2 * 3 = 0.45 rounds down to level 0
    xv = [-0.5, 0.3, 1.0, 1.9, 2.0, 5.0]
    by_hand = sum((yi - xi) / alpha for yi, xi in zip(yv[1:4], xv[1:4])) + 2.0
    assert q.act_alpha.grad.item() == pytest.approx(by_hand, abs=1e-6)


def test_quantize_activation_is_the_module_forward():
    x = torch.randn(1000) * 4
    q = QuantReLU(3, init_alpha=1.7)
    assert torch.equal(q(x), quantize_activation(x, torch.tensor(1.7), 7))


def test_apot_levels_pinned():
    # 2 magnitude bits: {0, 2^-1, 2^-2, 2^-3} normalised by 2^-1
    assert apot_levels(2).tolist() == [0.0, 0.25, 0.5, 1.0]
    # 3 magnitude bits: {0, 1/2, 1/4, 1/16} + {0, 1/8}, max 5/8 -> sixteenths over 10
    expected = torch.tensor([0, 1, 2, 3, 4, 6, 8, 10], dtype=torch.float64) / 10
    assert torch.allclose(apot_levels(3), expected)


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_apot_levels_shape(bits):
    levels = apot_levels(bits)
    assert len(levels) == 2 ** bits
    assert levels[0] == 0 and levels[-1] == 1
    assert torch.all(levels[1:] > levels[:-1])


def test_weight_quantizer_snaps_to_signed_levels():
    torch.manual_seed(0)
    wq = WeightQuantizer(4, init_alpha=2.0)
    w = torch.randn(64, 32)
    q = wq(w)
    grid = torch.cat([-apot_levels(3), apot_levels(3)]).float() * 2.0
    assert torch.all((q[..., None] - grid).abs().min(-1).values < 1e-6)
    # nearest level of the normalised, clipped weight
    n = ((w - w.mean()) / w.std() / 2.0).clamp(-1, 1)
    nearest = grid[(n[..., None] * 2.0 - grid).abs().argmin(-1)]
    assert torch.allclose(q, nearest)


def test_weight_quantizer_alpha_gradient():
    wq = WeightQuantizer(3, init_alpha=1.0)
    w = torch.randn(256)
    wq(w).sum().backward()
    n = (w - w.mean()) / w.std()
    levels = apot_levels(2).float()
    inside = n.abs() <= 1
    q = levels[(n.abs()[..., None] - levels).abs().argmin(-1)] * n.sign()
    by_hand = torch.where(inside, q - n, n.sign()).sum()
    assert wq.wgt_alpha.grad.item() == pytest.approx(by_hand.item(), rel=1e-5, abs=1e-5)


def test_full_precision_layers_are_plain_layers():
    torch.manual_seed(0)
    conv, ref = QConv2d(4, 8, 3, padding=1), nn.Conv2d(4, 8, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(conv(x), ref(x))
    lin, ref = QLinear(4, 3), nn.Linear(4, 3)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(2, 4)
    assert torch.equal(lin(x), ref(x))


def test_bad_bit_widths_are_refused():
    with pytest.raises(ValueError):
        QuantReLU(0)
    with pytest.raises(ValueError):
        WeightQuantizer(1)


def test_signed_levels_round_half_up_by_hand():
    # bit 2, alpha 3: levels -3..3 of width 1; ties go up, on both sides of zero
    x = torch.tensor([-10.0, -3.0, -2.5, -1.5, -0.5, -0.49, 0.0, 0.5, 2.5, 10.0])
    expected = torch.tensor([-3.0, -3.0, -2.0, -1.0, 0.0, 0.0, 0.0, 1.0, 3.0, 3.0])
    assert torch.equal(QuantReLU(2, init_alpha=3.0, signed=True)(x), expected)
    assert torch.equal(QuantReLU(32, signed=True)(x), x)  # full precision: the identity


def test_signed_gradients_follow_apot_rules():
    alpha = 2.0
    q = QuantReLU(2, init_alpha=alpha, signed=True)
    xv = [-5.0, -2.0, -1.9, -0.3, 1.0, 2.0]
    x = torch.tensor(xv, requires_grad=True)
    y = q(x)
    y.sum().backward()
    # d y / d x: 1 strictly inside (-alpha, alpha)
    assert torch.equal(x.grad, torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 0.0]))
    # d y / d alpha: -1 at and below -alpha, (y - x) / alpha inside, 1 at and above alpha
    yv = y.detach().tolist()
    assert yv == pytest.approx([-2.0, -2.0, -2.0, 0.0, 4 / 3, 2.0])
    by_hand = -2.0 + sum((yi - xi) / alpha for yi, xi in zip(yv[2:5], xv[2:5])) + 1.0
    assert q.act_alpha.grad.item() == pytest.approx(by_hand, abs=1e-6)
