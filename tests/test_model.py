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


def test_default_unet_computes_pytorch_ddpms_blocks():
    """The default settings (no --spike_driven, --resample conv) are pytorch-ddpm's blocks, written
    out here: h = block1(x) + temb_proj(temb); h = block2(h) + shortcut(x); down: conv(x); up:
    conv(nearest(x)). Checkpoints without the new fields load with these defaults."""
    import torch.nn.functional as F
    from common.configs import ModelConfig, UNetConfig
    model = tiny(ch_mult=[1, 2]).eval()
    assert model.config.resampling == "conv" and not model.config.spike_driven
    old = ModelConfig().to_dict()
    for key in ("spike_driven", "resample", "shortcut"):
        del old["unet"][key]
    assert ModelConfig.from_dict(old).unet == UNetConfig()
    g = torch.Generator().manual_seed(0)
    temb = torch.randn(2, 128, generator=g)
    block = next(m for m in model.downblocks if isinstance(getattr(m, "shortcut", None), torch.nn.Conv2d))  # 32 -> 64
    down = next(m for m in model.downblocks if type(m).__name__ == "DownSample")
    up = next(m for m in model.upblocks if type(m).__name__ == "UpSample")
    with torch.no_grad():
        x = torch.randn(2, 32, 8, 8, generator=g)
        h = block.block1(x) + block.temb_proj(temb)[:, :, None, None]
        assert torch.equal(block(x, temb), block.block2(h) + block.shortcut(x))
        assert torch.equal(down(x, temb), down.main(x))
        x = torch.randn(2, 64, 4, 4, generator=g)
        assert torch.equal(up(x, temb), up.main(F.interpolate(x, scale_factor=2, mode="nearest")))


def test_spike_driven_layers_read_activations():
    """--spike_driven: the 1x1 shortcut reads the ResBlock's first activation (the very tensor its
    first conv reads); resampling per --resample: pool has no weights, act_conv a GroupNorm and a
    quantizer, signed_conv a signed quantizer before the conv."""
    import torch.nn as nn
    import torch.nn.functional as F
    model = tiny(ch_mult=[1, 2], spike_driven=True, shortcut="act").eval()
    block = next(m for m in model.downblocks if isinstance(getattr(m, "shortcut", None), nn.Conv2d))
    seen = {}
    block.block1[1].register_forward_hook(lambda m, a, out: seen.update(act=out))
    block.shortcut.register_forward_hook(lambda m, a, out: seen.update(shortcut=a[0]))
    block.block1[2].register_forward_hook(lambda m, a, out: seen.update(conv=a[0]))
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        block(x, torch.randn(2, 128))
    assert seen["shortcut"] is seen["act"] is seen["conv"]
    down = next(m for m in model.downblocks if type(m).__name__ == "DownSample")
    up = next(m for m in model.upblocks if type(m).__name__ == "UpSample")
    assert model.config.resampling == "pool" and not list(down.parameters()) and not list(up.parameters())
    assert torch.equal(down(x, None), F.avg_pool2d(x, 2))
    assert torch.equal(up(x, None), F.interpolate(x, scale_factor=2, mode="nearest"))
    act = tiny(ch_mult=[1, 2], spike_driven=True, resample="act_conv")
    down = next(m for m in act.downblocks if type(m).__name__ == "DownSample")
    assert isinstance(down.act[0], nn.GroupNorm) and isinstance(down.act[1], QuantReLU) and not down.act[1].signed
    signed = tiny(ch_mult=[1, 2], spike_driven=True, resample="signed_conv", shortcut="signed")
    down = next(m for m in signed.downblocks if type(m).__name__ == "DownSample")
    assert isinstance(down.act, QuantReLU) and down.act.signed
    block = next(m for m in signed.downblocks if isinstance(getattr(m, "shortcut", None), nn.Conv2d))
    assert isinstance(block.shortcut_input, QuantReLU) and block.shortcut_input.signed
    with torch.no_grad():
        skip = block.shortcut(block.shortcut_input(x))
        h = block.block1(x) + block.temb_proj(torch.zeros(2, 128))[:, :, None, None]
        assert torch.equal(block(x, torch.zeros(2, 128)), block.block2(h) + skip)


def test_spike_driven_needs_layers_that_read_spikes():
    with pytest.raises(ValueError, match="spike-driven"):
        tiny(ch_mult=[1, 2], spike_driven=True, resample="conv")
    with pytest.raises(ValueError, match="spike-driven"):
        tiny(ch_mult=[1, 2], spike_driven=True, shortcut="x")
    with pytest.raises(ValueError, match="resample"):
        tiny(ch_mult=[1, 2], resample="bilinear")
    with pytest.raises(ValueError, match="shortcut"):
        tiny(ch_mult=[1, 2], shortcut="y")


def test_fold_shortcut_is_a_fixed_mean_of_channels():
    """--shortcut=fold: no weights; 96 -> 64 channels pads to 128 (k = 2 groups) and averages
    channel c and c + 64 (a padded zero for c >= 32); fold_sum adds them; 32 -> 64 is x and zeros."""
    from model.unet import ChannelFold
    x = torch.randn(2, 96, 4, 4)
    out, summed = ChannelFold(96, 64)(x), ChannelFold(96, 64, mean=False)(x)
    assert torch.equal(summed[:, :32], x[:, :32] + x[:, 64:]) and torch.equal(summed[:, 32:], x[:, 32:64])
    assert torch.equal(out, summed / 2)
    x = torch.randn(2, 32, 4, 4)
    out = ChannelFold(32, 64)(x)
    assert torch.equal(out[:, :32], x) and not out[:, 32:].any()
    model = tiny(ch_mult=[1, 2], spike_driven=True)  # fold is the spike-driven default
    assert model.config.shortcut_reads == "fold"
    folds = [m for m in model.modules() if isinstance(m, ChannelFold)]
    assert folds and not any(isinstance(getattr(m, "shortcut", None), torch.nn.Conv2d) for m in model.modules())


def test_fold_act_starts_as_fold():
    """--shortcut=fold_act: the fold of x plus a 1x1 conv of act(GN(x)) that starts at zero."""
    import torch.nn as nn
    model = tiny(ch_mult=[1, 2], spike_driven=True, shortcut="fold_act").eval()
    block = next(m for m in model.downblocks if isinstance(getattr(m, "shortcut", None), nn.Conv2d))
    assert block.fold is not None and not block.shortcut.weight.any()
    x, temb = torch.randn(2, 32, 8, 8), torch.randn(2, 128)
    with torch.no_grad():
        h = block.block1(x) + block.temb_proj(temb)[:, :, None, None]
        assert torch.equal(block(x, temb), block.block2(h) + (block.shortcut(block.block1[1](block.block1[0](x)))
                                                             + block.fold(x)))


def test_replace_modules_swaps_nested_modules_once_under_their_names():
    """Every matching submodule (nested ones too) is replaced under its own name; the root is never
    replaced, and a replacement that itself matches is not visited again."""
    import torch.nn as nn
    from model.build import replace_modules

    root = nn.Sequential(nn.ReLU(), nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    made = []

    def make(m):
        made.append(m)
        return nn.Sequential(nn.ReLU())  # holds a ReLU: would loop if replacements were visited

    assert replace_modules(root, lambda m: isinstance(m, nn.ReLU), make) is root
    assert len(made) == 2 and all(type(m) is nn.ReLU for m in made)
    names = [name for name, _ in root.named_modules()]
    assert names == ["", "0", "0.0", "1", "1.0", "1.1", "1.1.0"]
    assert isinstance(root[1][0], nn.Linear) and isinstance(root[1][1], nn.Sequential)
