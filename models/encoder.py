"""The Siamese feature encoder: one stage per pyramid level, shared by source and target."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

LEAKY_SLOPE = 0.1  # negative slope of every leaky ReLU in models/


def encoder_channels(levels: int, base: int = 12, step: int = 6) -> list[int]:
    """Feature channels of each level, finest first: ``base + step * level``."""
    return [base + step * level for level in range(levels)]


class Encoder(nn.Module):
    """Features of an image at every pyramid level; the same weights encode source and target.

    Level 0 applies two 3x3 convs (padding 1), each followed by a leaky ReLU, to
    the image; level ``n`` applies the same to the 2x2 max-pooled features of
    level ``n - 1``. Level ``n`` has ``base + step * n`` channels.
    """

    def __init__(self, levels: int, base: int = 12, step: int = 6):
        super().__init__()
        self.channels = encoder_channels(levels, base, step)
        inputs = [1] + self.channels[:-1]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.LeakyReLU(LEAKY_SLOPE),
                          nn.Conv2d(c_out, c_out, 3, padding=1), nn.LeakyReLU(LEAKY_SLOPE))
            for c_in, c_out in zip(inputs, self.channels))

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """image: float ``[N, 1, H, W]`` -> features, finest first; level ``l`` is ``[N, C_l, H/2^l, W/2^l]``."""
        features, x = [], image
        for level, stage in enumerate(self.stages):
            x = stage(F.max_pool2d(x, 2) if level else x)
            features.append(x)
        return features

    def radius(self, level: int) -> int:
        """Receptive-field radius of level ``level``'s features, in level-0 px beyond the square of ``2^level`` px a
        feature pixel covers: two 3x3 convs at each level's scale (``2 * 2^l`` px); a 2x2 max pool adds nothing."""
        return 2 * (2 ** (level + 1) - 1)
