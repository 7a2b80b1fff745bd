"""Exponential moving average of a model's weights."""
import torch


@torch.no_grad()
def update_ema(target, source, decay):
    """target <- decay * target + (1 - decay) * source, over every floating-point state entry."""
    src = source.state_dict()
    for name, value in target.state_dict().items():
        if value.dtype.is_floating_point:
            value.mul_(decay).add_(src[name].detach(), alpha=1 - decay)
        else:
            value.copy_(src[name])
