"""The multiscale Siamese encoder-aligner pyramid: coarse-to-fine residual alignment of a pair."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from helpers import upsample_field, warp
from models.aligner import Aligner
from models.encoder import Encoder


@dataclass
class PyramidOutput:
    """What ``Pyramid.forward`` returns.

    field: ``[N, 2, H/2^level, W/2^level]``, pixels of ``level``, aligning source onto target.
    level: the pyramid level of ``field`` (the ``trunc`` of the call).
    residuals: level -> that level's aligner output ``[N, 2, H/2^l, W/2^l]`` (pixels of level
    ``l``), for the levels that ran an aligner.
    """
    field: torch.Tensor
    level: int
    residuals: dict[int, torch.Tensor]

    def full_resolution(self) -> torch.Tensor:
        """``field`` upsampled to level 0: ``[N, 2, H, W]`` in level-0 pixels."""
        return upsample_field(self.field, 2 ** self.level)


class Pyramid(nn.Module):
    """Siamese encoder plus one aligner per level, predicting the field that warps source onto target.

    size: number of levels (level ``l`` works at 1/2^l the input resolution).
    k: aligner kernel size (odd). corr_radius: local-correlation radius fed to the
    aligners (0 = none). skip: the ``skip`` finest levels run no aligner (their
    field is only upsampled). encoder_base, encoder_step: level ``l`` features have
    ``encoder_base + encoder_step * l`` channels. aligner_widths: hidden widths of
    every aligner (a final conv to 2 channels follows). ``config`` holds every
    constructor argument, so ``Pyramid(**model.config)`` rebuilds the network.
    """

    def __init__(self, size: int = 5, k: int = 7, corr_radius: int = 3, skip: int = 0,
                 encoder_base: int = 12, encoder_step: int = 6,
                 aligner_widths: Sequence[int] = (32, 64, 32, 16)):
        super().__init__()
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if not 0 <= skip < size:
            raise ValueError(f"skip must be in [0, size - 1] = [0, {size - 1}], got {skip}")
        self.config = dict(size=size, k=k, corr_radius=corr_radius, skip=skip,
                           encoder_base=encoder_base, encoder_step=encoder_step,
                           aligner_widths=list(aligner_widths))
        self.size, self.skip = size, skip
        self.encoder = Encoder(size, encoder_base, encoder_step)
        self.aligners = nn.ModuleList(Aligner(c, k, aligner_widths, corr_radius)
                                      for c in self.encoder.channels)

    def level_parameters(self, level: int) -> list[nn.Parameter]:
        """The parameters of level ``level``'s aligner (the encoder is shared by all levels)."""
        if not 0 <= level < self.size:
            raise ValueError(f"level must be in [0, {self.size - 1}], got {level}")
        return list(self.aligners[level].parameters())

    def reach(self) -> int:
        """Receptive-field radius of the coarsest level's field, in level-0 px beyond the square of ``2^(size-1)`` px
        each of its pixels covers: its encoder features' plus its aligner's (at that stride). The finer levels read a little further (their aligners' radii at their strides),
        but what lies there barely moves the field: a chunk given this much context around it gets the whole
        section's field to ~0.01 px (bench/RESULTS.md, 2026-12-04 "reach")."""
        top = self.size - 1
        return self.encoder.radius(top) + self.aligners[top].radius() * 2 ** top

    def forward(self, source: torch.Tensor, target: torch.Tensor, trunc: int = 0) -> PyramidOutput:
        """Align ``source`` onto ``target``, coarse to fine, down to level ``trunc``.

        source, target: float ``[N, 1, H, W]`` intensities, ``H`` and ``W`` divisible
        by ``2^(size-1)``. At each level ``l`` from ``size - 1`` down to ``trunc``:
        ``field_l = upsample_field(field_{l+1}) + aligner_l(target_l,
        warp(source_l, upsample_field(field_{l+1})))`` on the level's features,
        with no coarser field at the top and no aligner on the ``skip`` finest levels.
        """
        if source.shape != target.shape or source.dim() != 4 or source.shape[1] != 1:
            raise ValueError(f"source {tuple(source.shape)} and target {tuple(target.shape)} "
                             "must both be [N, 1, H, W]")
        if not 0 <= trunc < self.size:
            raise ValueError(f"trunc must be in [0, {self.size - 1}], got {trunc}")
        unit = 2 ** (self.size - 1)
        if source.shape[-2] % unit or source.shape[-1] % unit:
            raise ValueError(f"image size {tuple(source.shape[-2:])} is not divisible by "
                             f"2^(size-1) = {unit} for a {self.size}-level pyramid")
        n = len(source)
        features = self.encoder(torch.cat([source, target]))
        field, residuals = None, {}
        for level in range(self.size - 1, trunc - 1, -1):
            if field is not None:
                field = upsample_field(field)
            if level < self.skip:
                continue
            src, tgt = features[level][:n], features[level][n:]
            if field is None:
                residual = self.aligners[level](tgt, src)
                field = residual
            else:
                residual = self.aligners[level](tgt, warp(src, field))
                field = field + residual
            residuals[level] = residual
        return PyramidOutput(field, trunc, residuals)
