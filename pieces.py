"""Pieces of tissue: where defects cut a section apart, each piece's own shift.

A crack, or a fold that crosses the whole section, cuts its tissue into pieces
that lie apart by the defect's jump: beside a fold of W px of tissue up to ~W px
(``misalign``'s folds: 60-120 px of tissue jump 40-96 px), more than the
network recovers. ``piece_field`` finds the large pieces (4-connected tissue
off the defects, at least ``MIN_SHARE`` of the section) of the source (or,
where they give none, of the target), matches each onto the other section on
its own (the whole-pixel shift, up to ``reach``, whose masked Pearson r is
best: ``masked_shift``), and where the pieces' shifts differ by more than a
gate gives the field that moves each piece by its own shift: a rough placement
that ``alignment.pair_prealignment`` keeps where the network's field on the
source so placed matches clearly better. Fields follow ``helpers``:
``[2, H, W]`` px, x then y, pulling. Everything here runs on sections averaged
down to about ``GRID`` px, where a pass over the section costs microseconds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from masks import distance_to_defect, interpolate_holes

MIN_SHARE = 0.05  # a piece is at least this fraction of the section
GRID = 128  # px: pieces are found and matched on sections averaged down to about this size (alignment.piece_factor)
DEPTH = 16  # px of the grid: how deep into a piece ``piece_field`` looks to tell which piece a target pixel sees


def label_pieces(tissue: torch.Tensor) -> torch.Tensor:
    """Connected components (4-connected) of bool ``[H, W]`` ``tissue``: long ``[H, W]``, 0 off it, one label per
    component (its largest pixel index plus one); by label propagation, one max over each pixel and its four
    neighbours per step. 4-connected, so that a defect's band parts the tissue even where it is one pixel wide
    and runs diagonally."""
    h, w = tissue.shape
    labels = torch.where(tissue, torch.arange(1, h * w + 1, dtype=torch.float64).view(h, w), 0.0)
    for _ in range(h * w):
        padded = F.pad(labels, (1, 1, 1, 1))
        grown = torch.stack([labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        grown = grown.amax(0) * tissue
        if torch.equal(grown, labels):
            break
        labels = grown
    return labels.long()


def _correlate(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``c[s] = sum_p f(p + s) g(p)`` for every shift ``s`` (index ``s`` mod the size, y then x) of float64
    ``[H, W]`` images, by FFT on a grid twice their size (no wrap)."""
    size = (2 * f.shape[0], 2 * f.shape[1])
    return torch.fft.irfft2(torch.fft.rfft2(f, s=size) * torch.fft.rfft2(g, s=size).conj(), s=size)


def masked_shift(source: torch.Tensor, source_mask: torch.Tensor, target: torch.Tensor, target_mask: torch.Tensor,
                 reach: int) -> tuple[int, int]:
    """The whole-pixel shift ``(x, y)`` (px, pulling: ``target(p) ~ source(p + s)``) up to ``reach`` px each way whose
    Pearson r of ``source`` with ``target``, over the pixels both masks hold (bool ``[H, W]``), is best among the
    shifts that overlap at least half of the smaller mask (the piece matched); ``(0, 0)`` where none overlaps.
    ``[H, W]`` images."""
    h, w = source.shape
    s, t, ms, mt = (x.double() for x in (source, target, source_mask, target_mask))
    s, t = s * ms, t * mt
    count = _correlate(ms, mt)
    sum_s, sum_t = _correlate(s, mt), _correlate(ms, t)
    n = count.clamp_min(1)
    covariance = _correlate(s, t) - sum_s * sum_t / n
    spread_s = (_correlate(s * s, mt) - sum_s ** 2 / n).clamp_min(1e-9)
    spread_t = (_correlate(ms, t * t) - sum_t ** 2 / n).clamp_min(1e-9)
    r = covariance / (spread_s * spread_t).sqrt()
    dy, dx = (torch.arange(2 * m).where(torch.arange(2 * m) < m, torch.arange(2 * m) - 2 * m) for m in (h, w))
    least = 0.5 * min(float(ms.sum()), float(mt.sum()))
    allowed = (count >= least) & (count > 0) & (dy.abs()[:, None] <= reach) & (dx.abs()[None] <= reach)
    if not allowed.any():
        return 0, 0
    best = int(r.masked_fill(~allowed, -2).argmax())
    return int(dx[best % (2 * w)]), int(dy[best // (2 * w)])


def _pieces(tissue: torch.Tensor) -> list[torch.Tensor]:
    """The large pieces (bool ``[H, W]`` each, at least ``MIN_SHARE`` of the image) of bool ``[H, W]`` ``tissue``."""
    labels = label_pieces(tissue)
    found, counts = labels[labels > 0].unique(return_counts=True)
    return [labels == label for label, count in zip(found, counts) if count >= MIN_SHARE * tissue.numel()]


def _shifted(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """``[H, W]`` ``y(p) = x(p + (dx, dy))``, 0 where ``p + (dx, dy)`` lies outside."""
    h, w = x.shape
    padded = F.pad(x, (max(-dx, 0), max(dx, 0), max(-dy, 0), max(dy, 0)))
    return padded[max(dy, 0):max(dy, 0) + h, max(dx, 0):max(dx, 0) + w]


def piece_field(source: torch.Tensor, target: torch.Tensor, source_tissue: torch.Tensor, target_tissue: torch.Tensor,
                reach: int, gate: float) -> torch.Tensor | None:
    """The field ``[2, H, W]`` (px, whole) that moves each large piece of tissue by its own shift, or None.

    source, target: normalised sections ``[H, W]``; ``source_tissue``,
    ``target_tissue``: bool ``[H, W]``, where each shows tissue off its defects.
    First the source's pieces (each matched onto the target's tissue,
    ``masked_shift`` up to ``reach`` px; each target pixel takes the shift of the
    piece it sees deepest inside), then, where they give none, the target's
    (the source's tissue matched onto each; each of its pixels takes its
    piece's shift). The pixels no piece gives a shift (the defects' bands, small
    pieces, missing data) are interpolated from around (``masks.interpolate_holes``:
    a ramp across a band). None where neither section has two large pieces
    whose shifts lie more than ``gate`` px apart: one shift serves.
    """
    for of_source in (True, False):
        cut = _pieces(source_tissue if of_source else target_tissue)
        if len(cut) < 2:
            continue
        shifts = [masked_shift(source, piece, target, target_tissue, reach) if of_source
                  else masked_shift(source, source_tissue, target, piece, reach) for piece in cut]
        spread = torch.tensor(shifts, dtype=torch.float32)
        if float(torch.cdist(spread, spread).max()) > gate:
            return _placed(cut, spread, of_source)
    return None


def _placed(cut: list[torch.Tensor], shifts: torch.Tensor, of_source: bool) -> torch.Tensor:
    """``piece_field``'s field ``[2, H, W]`` from the pieces ``cut`` (bool ``[H, W]`` each, of the source or not) and
    their shifts ``[K, 2]`` (px, x then y)."""
    if of_source:  # the depth inside each piece that target pixel p sees there: at p + its shift
        depth = torch.stack([_shifted(distance_to_defect((~piece)[None, None], DEPTH)[0, 0], int(dx), int(dy))
                             for piece, (dx, dy) in zip(cut, shifts.tolist())])
    else:
        depth = torch.stack([piece.float() for piece in cut])
    field = shifts[depth.argmax(0)].permute(2, 0, 1).contiguous()  # [2, H, W]
    hole = (depth.amax(0) <= 0)[None].expand_as(field)
    return interpolate_holes(field, hole) if hole.any() else field
