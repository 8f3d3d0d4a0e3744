"""Whole-section shifts by FFT cross-correlation: the one rigid step of SEAMLeSS.

``best_shifts`` finds, for each pair of sections, the constant field (x then y,
px; ``helpers`` convention: it pulls the source onto the target) whose shifted
source correlates best with the target. Two uses: checking a registration
(``evaluate.content_offsets``, ``import_stack.py --reregister``), and bringing a
pair within the network's reach before it runs (``alignment.pair_field``): the
pyramid recovers shifts up to ~15 px between real fly neighbours, and a stack's
sections can be further apart than that.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from helpers import UserError, to_tensor


def best_shifts(sources, targets, reach: int = 32, factor: int = 2) -> np.ndarray:
    """The shift ``[N, 2]`` (px, x then y) that best matches each source ``[N, H, W]`` onto its target ``[N, H, W]``.

    The shift ``s`` maximises the Pearson r of ``source(p + s)`` with ``target(p)``
    over the target's centre (``reach`` px in from every border), ``|s_x|, |s_y| <=
    reach``, on sections averaged over ``factor`` x ``factor`` pixels and refined to
    a fraction of a pixel (parabola through the peak). Pixels of missing data
    should hold the section's mean (``helpers.normalise`` gives that: 0).
    """
    a, b = (to_tensor(x, dtype=torch.float64)[:, None] for x in (sources, targets))
    if factor > 1:
        a, b = F.avg_pool2d(a, factor), F.avg_pool2d(b, factor)
    a, b = a[:, 0], b[:, 0]
    r = -(-reach // factor)
    h, w = a.shape[1:]
    if min(h, w) <= 4 * r:
        raise UserError(f"sections of {h}x{w} px (after averaging {factor}x) are too small for reach {reach} px")
    source = (a - a.mean((1, 2), keepdim=True)) / a.std((1, 2), keepdim=True).clamp_min(1e-12)
    target = b[:, r:h - r, r:w - r]
    target = target - target.mean((1, 2), keepdim=True)
    kh, kw = target.shape[1:]
    # numerator sum_p source(p + s) target(p) for every shift: cross-correlation by FFT (no wrap for s in 0..2r)
    spectrum = torch.fft.rfft2(source) * torch.fft.rfft2(target, s=(h, w)).conj()
    numerator = torch.fft.irfft2(spectrum, s=(h, w))[:, :2 * r + 1, :2 * r + 1]
    # window means of the source at every shift, for the Pearson r's denominator
    mean, square = (_window_means(x, kh, kw, 2 * r + 1) for x in (source, source ** 2))
    spread = ((square - mean ** 2).clamp_min(0) * kh * kw).sqrt() * target.flatten(1).norm(dim=1).view(-1, 1, 1)
    r_map = numerator / spread.clamp_min(1e-12)  # [N, 2r+1, 2r+1]: Pearson r per shift
    best = r_map.flatten(1).argmax(1)
    dy, dx = best // (2 * r + 1), best % (2 * r + 1)
    n, last = torch.arange(len(r_map)), 2 * r
    peak = r_map[n, dy, dx]
    x = dx + _parabola_vertex(r_map[n, dy, (dx - 1).clamp(min=0)], peak, r_map[n, dy, (dx + 1).clamp(max=last)],
                              (dx > 0) & (dx < last))
    y = dy + _parabola_vertex(r_map[n, (dy - 1).clamp(min=0), dx], peak, r_map[n, (dy + 1).clamp(max=last), dx],
                              (dy > 0) & (dy < last))
    return ((torch.stack([x, y], 1) - r) * factor).float().numpy()


def _window_means(x: torch.Tensor, kh: int, kw: int, shifts: int) -> torch.Tensor:
    """Means ``[N, shifts, shifts]`` of ``x`` ``[N, H, W]`` over the ``kh`` x ``kw`` windows at the first ``shifts``
    offsets along each axis, from the summed-area table (O(1) per window whatever its size)."""
    table = F.pad(x.cumsum(1).cumsum(2), (1, 0, 1, 0))
    top, bottom, left, right = slice(0, shifts), slice(kh, kh + shifts), slice(0, shifts), slice(kw, kw + shifts)
    total = table[:, bottom, right] - table[:, top, right] - table[:, bottom, left] + table[:, top, left]
    return total / (kh * kw)


def _parabola_vertex(before, at, after, inner) -> torch.Tensor:
    """Where the parabola through three equally spaced samples peaks, relative to the middle one.

    0 where not ``inner`` (the peak at the edge of the searched shifts) or where the samples do not bend down.
    """
    curvature = before - 2 * at + after
    inner = inner & (curvature < 0)
    return torch.where(inner, 0.5 * (before - after) / curvature.where(inner, -torch.ones_like(curvature)), 0.0)
