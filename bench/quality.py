"""Sample quality of a model in the shapes network's features, for the measurement scripts of bench/.

``Scorer`` holds the feature network and the reference statistics of a run's data; ``score``
samples ``num_images`` images from fixed noise (the same for every model and sampler, so rows
compare) and returns FID, IS, recognisability and the wall time per image.
"""
import time
from dataclasses import dataclass

import numpy as np
import torch

from common import runtime
from diffusion import sample_noise
from schedulers import build_sampler
from metrics import scores, shards


@dataclass
class Scorer:
    """The shapes feature network and the reference statistics for a ``ModelConfig``'s images."""
    net: scores.FeatureNet
    stats: tuple
    num_images: int
    batch_size: int

    @classmethod
    def for_config(cls, cfg, num_images, batch_size=128, device="cpu"):
        net = scores.load_features("shapes", cfg.data.img_size, device)
        stats, _ = scores.reference_statistics(net, "shapes", cfg.data.dataset, cfg.data.img_size)
        return cls(net, stats, num_images, batch_size)

    @torch.no_grad()
    def images(self, model, cfg, sampler_cfg, device="cpu", seed=0):
        """uint8 images [num_images, H, W, C] of ``model`` and the wall time per image (s)."""
        _, sampler = build_sampler(cfg, sampler_cfg, device)
        parts, start = [], time.perf_counter()
        for first in range(0, self.num_images, self.batch_size):
            n = min(self.batch_size, self.num_images - first)
            x_T, generator = sample_noise(n, cfg.image_shape, runtime.derived_seed(seed, first), device)
            parts.append(shards.to_uint8(sampler(model, x_T, generator)))
        return np.concatenate(parts), (time.perf_counter() - start) / self.num_images

    def score(self, model, cfg, sampler_cfg, device="cpu", seed=0):
        """FID, IS, recognisability and seconds per image of ``model`` sampled with ``sampler_cfg``."""
        images, per_image = self.images(model, cfg, sampler_cfg, device, seed)
        result = scores.evaluate_images(self.net, images, self.stats, splits=1)
        return {"FID": result["FID"], "IS": result["IS"], "recognisability": result["recognisability"],
                "s_per_image": per_image, "images": images}
