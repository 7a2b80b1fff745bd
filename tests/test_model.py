"""The UNet: pytorch-ddpm's topology with injected quantized activations."""
import pytest
import torch

from helpers import unet
from quant import QuantReLU


def tiny(bit=2, **kw):
    cfg = dict(ch=32, ch_mult=[1, 2], attn=[], num_res_blocks=1, dropout=0.0, bit=bit)
    cfg.update(kw)
    return unet(100, **cfg)


def test_cifar10_baseline_has_pytorch_ddpm_size():
    # pytorch-ddpm's CIFAR-10 model (attention at 16x16): 35.75 M trainable parameters
    model = unet(1000, ch=128, ch_mult=[1, 2, 2, 2], attn=[1], num_res_blocks=2, dropout=0.1, bit=32)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 35_746_307


def test_quantized_model_has_one_quantizer_per_swish():
    model = tiny()
    n_res = len([m for m in model.modules() if type(m).__name__ == "ResBlock"])
    quants = [m for m in model.modules() if isinstance(m, QuantReLU)]
    # 3 per ResBlock (block1, temb_proj, block2), 1 in the time embedding, 1 in the tail
    assert len(quants) == 3 * n_res + 2
    assert all(q.bit == 2 and q.act_alpha.item() == 6.0 for q in quants)


def test_forward_shape_and_quantized_state_dict_names():
    model = tiny()
    x = torch.randn(3, 3, 16, 16)
    assert model(x, torch.tensor([0, 50, 99])).shape == x.shape
    fp_keys = set(tiny(bit=32).state_dict())
    q_keys = set(model.state_dict())
    assert fp_keys < q_keys
    assert all(k.endswith("act_alpha") for k in q_keys - fp_keys)


def test_attention_only_for_full_precision():
    with pytest.raises(ValueError, match="attention"):
        tiny(bit=2, attn=[1])
    assert any(type(m).__name__ == "AttnBlock" for m in tiny(bit=32, attn=[1]).modules())


def test_blocks_cover_every_parameter_once_in_forward_order():
    model = tiny(ch_mult=[1, 2, 2])
    seen = []
    for _, block in model.blocks():
        seen += [id(p) for p in block.parameters()]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    names = [n for n, _ in model.blocks()]
    assert names[0] == "time_embedding" and names[1] == "head" and names[-1] == "tail"

    order = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: order.append(n)) for n, m in model.blocks()]
    model(torch.randn(1, 3, 16, 16), torch.tensor([3]))
    for h in hooks:
        h.remove()
    assert order == names


def test_weight_quantized_model_keeps_first_and_last_layers_full_precision():
    model = tiny(wbit=4)
    assert not hasattr(model.head, "weight_quant")
    assert model.downblocks[0].block1[-1].weight_quant.wbit == 4
    assert model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2])).isfinite().all()


def test_ch_must_fit_group_norm():
    with pytest.raises(ValueError, match="multiple of --num_groups"):
        tiny(ch=48)


def test_every_group_norm_has_num_groups_groups():
    import torch.nn as nn
    from common.configs import UNetConfig
    assert UNetConfig().num_groups == 32  # pytorch-ddpm's, and what checkpoints without the field were built with
    for groups in (8, 32):
        norms = [m for m in tiny(num_groups=groups).modules() if isinstance(m, nn.GroupNorm)]
        assert norms and all(m.num_groups == groups for m in norms)


def test_grayscale_unet_has_one_channel_in_and_out_and_converts_exactly():
    """``img_channels=1``: [B, 1, H, W] -> [B, 1, H, W], only the head's input and the tail's output
    differ from the RGB UNet (the head by 2 x ch x 9 weights, the tail by 2 x (ch x 9 + 1)), and
    the exact SNN (graded, compensated) is the ANN in float64."""
    from snn.convert import convert
    torch.manual_seed(0)
    gray, rgb = tiny(img_channels=1, num_groups=8), tiny(num_groups=8)
    assert {k: v.shape for k, v in gray.state_dict().items() if not k.startswith(("head", "tail.2"))} == \
        {k: v.shape for k, v in rgb.state_dict().items() if not k.startswith(("head", "tail.2"))}
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(rgb) - count(gray) == 2 * 32 * 9 + 2 * (32 * 9 + 1)
    with torch.no_grad():
        for p in gray.parameters():
            p.add_(0.05 * torch.randn_like(p))
    gray = gray.double().eval()
    x, t = torch.randn(2, 1, 16, 16, dtype=torch.float64), torch.tensor([3, 70])
    out = gray(x, t)
    assert out.shape == (2, 1, 16, 16)
    torch.testing.assert_close(convert(gray, "graded", "compensated")(x, t), out, rtol=0, atol=1e-10)
