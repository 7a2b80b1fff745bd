"""The UNet noise predictor."""
from model.unet import AttnBlock, DownSample, ResBlock, TimeEmbedding, UNet, UpSample

__all__ = ["UNet", "ResBlock", "DownSample", "UpSample", "TimeEmbedding", "AttnBlock"]
