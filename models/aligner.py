"""The aligner of one pyramid level: target and warped-source features -> residual field."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from models.correlation import local_correlation
from models.encoder import LEAKY_SLOPE


class Aligner(nn.Module):
    """A small conv net predicting the residual field of one level.

    Input: ``concat(target features, warped source features,
    local_correlation(target, warped source, corr_radius))`` (the correlation only
    if ``corr_radius > 0``). Layers: one ``k x k`` conv ('same' padding) per entry
    of ``widths`` with a leaky ReLU after each, then a ``k x k`` conv to the 2
    output channels with no activation. The last conv starts at zero (weights and
    bias), so an untrained aligner outputs exactly the zero field.
    """

    def __init__(self, feature_channels: int, k: int = 7, widths: Sequence[int] = (32, 64, 32, 16),
                 corr_radius: int = 3):
        super().__init__()
        if k < 1 or k % 2 == 0:
            raise ValueError(f"aligner kernel size k must be odd and positive, got {k}")
        if corr_radius < 0:
            raise ValueError(f"corr_radius must be >= 0, got {corr_radius}")
        self.corr_radius = corr_radius
        inputs = 2 * feature_channels + (2 * corr_radius + 1) ** 2 * (corr_radius > 0)
        layers: list[nn.Module] = []
        for c_in, c_out in zip([inputs, *widths], widths):
            layers += [nn.Conv2d(c_in, c_out, k, padding=k // 2), nn.LeakyReLU(LEAKY_SLOPE)]
        last = nn.Conv2d(widths[-1] if widths else inputs, 2, k, padding=k // 2)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)

    def forward(self, target: torch.Tensor, warped_source: torch.Tensor) -> torch.Tensor:
        """target, warped_source: features ``[N, C, h, w]`` -> residual field ``[N, 2, h, w]`` (level pixels)."""
        inputs = [target, warped_source]
        if self.corr_radius > 0:
            inputs.append(local_correlation(target, warped_source, self.corr_radius))
        return self.net(torch.cat(inputs, 1))

    def radius(self) -> int:
        """Receptive-field radius (px of its level) of its output over its input features: ``k // 2`` per conv,
        plus the correlation's ``corr_radius``."""
        convs = [m for m in self.net if isinstance(m, nn.Conv2d)]
        return sum(conv.kernel_size[0] // 2 for conv in convs) + self.corr_radius
