"""Whole-section rigid matching by FFT cross-correlation: the one rigid step of SEAMLeSS.

``best_shifts`` finds, for each pair of sections, the constant field (x then y,
px; ``helpers`` convention: it pulls the source onto the target) whose shifted
source correlates best with the target. It checks a registration
(``evaluate.content_offsets``, ``import_stack.py --reregister``).

``rigid_search`` finds the shift *and* rotation that best match each source onto
its target, over a reach of a quarter of the section: it brings a pair within
the network's reach before it runs (``alignment.pair_field``). The pyramid
recovers shifts up to ~15 px between real fly neighbours, and a stack's sections
can be much further apart than that, and turned. It also says when the best
match is poor (``RigidMatch.poor``): a blank section, or one of another tissue.
``match_r`` scores a match; ``match_motion`` also says, far more cheaply than
``rigid_search``, how far a rigid match would still move a matched pair.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from helpers import UserError, affine_field, rigid_matrix, to_tensor, warp

MAX_ANGLE = 0.06  # rad: rigid_search tries rotations up to this either way,
SEARCH_SIZE = 256  # px: on sections averaged down to about this size,
STEP_PX = 2.0  # in steps that move the middle of their edges by this many px,
PATCHES = 3  # then refines the best from the shifts of PATCHES x PATCHES patches
MIN_LEAD = 0.05  # a best match whose Pearson r leads the best of other shifts by less is poor (``RigidMatch``),
MIN_TISSUE = 0.25  # as is one where either section shows tissue (non-zero) on less of its area


def best_shifts(sources, targets, reach: int = 32, factor: int = 2) -> np.ndarray:
    """The shift ``[N, 2]`` (px, x then y) that best matches each source ``[N, H, W]`` onto its target ``[N, H, W]``.

    The shift ``s`` maximises the Pearson r of ``source(p + s)`` with ``target(p)``
    over the target's centre (``reach`` px in from every border), ``|s_x|, |s_y| <=
    reach``, on sections averaged over ``factor`` x ``factor`` pixels and refined to
    a fraction of a pixel (parabola through the peak). Pixels of missing data
    should hold the section's mean (``helpers.normalise`` gives that: 0).
    """
    a, b = (_pool(to_tensor(x, dtype=torch.float64), factor) for x in (sources, targets))
    shift, _ = _peaks(_correlation_maps(a, b, -(-reach // factor), f"{reach} px"))
    return (shift * factor).float().numpy()


@dataclass(frozen=True)
class RigidMatch:
    """The best rigid match of each of N source sections onto its target (``rigid_search``); CPU tensors.

    The match pulls the source onto the target (``helpers`` convention) by
    ``p -> R(angle) (p - c) + c + shift``, ``c`` the section's centre: ``shift``
    ``[N, 2]`` is the displacement at the centre (px, x then y), ``angle`` ``[N]``
    the rotation (rad, ``helpers.rigid_matrix``'s sign). ``score`` ``[N]``: its
    Pearson r at the search's coarse resolution; ``lead`` ``[N]``: how much that r
    exceeds the best r at shifts further than a sixteenth of the section away, at
    the same angle (a true match stands out: 0.14-0.45 between most neighbours
    of SNEMI3D, ISBI 2012 or the phantom, but down to 0.01 between a few of ISBI
    2012, whose coarse maps peak little, and to 0.03 where both are cracked;
    0-0.1, median 0.02, between sections of different tissue, or noise: so
    ``alignment._prealignment`` warns only where the shift matches poorly too);
    ``tissue`` ``[N]``: the smaller of the two sections' fractions of pixels that
    hold tissue; ``edge`` bool ``[N]``: the best shift lies on the border of the
    shifts searched (the true one may lie beyond the reach).
    """

    shift: torch.Tensor
    angle: torch.Tensor
    score: torch.Tensor
    lead: torch.Tensor
    tissue: torch.Tensor
    edge: torch.Tensor

    @property
    def poor(self) -> torch.Tensor:
        """bool ``[N]``: not to be trusted (``lead`` under ``MIN_LEAD``, or ``tissue`` under ``MIN_TISSUE``)."""
        return (self.lead < MIN_LEAD) | (self.tissue < MIN_TISSUE)

    def field(self, h: int, w: int) -> torch.Tensor:
        """``[N, 2, H, W]`` (px): the field of each match on ``H`` x ``W`` sections; zero where a section shows too
        little tissue to trust one rigid match (``MIN_TISSUE``). A match that stands out little is kept: between
        true neighbours it is still the best guess (cracks lower the lead, to 0.03 on the phantom)."""
        matrix = rigid_matrix(self.angle, self.shift[:, 0], self.shift[:, 1])
        return affine_field(matrix, h, w) * (self.tissue >= MIN_TISSUE).view(-1, 1, 1, 1)

    def warning(self, i: int = 0) -> str:
        """One line saying why match ``i`` is ``poor`` (for where it is)."""
        if self.tissue[i] < MIN_TISSUE:
            return (f"warning: no whole-section pre-alignment: a section shows tissue on only "
                    f"{100 * float(self.tissue[i]):.0f} % of its area ({100 * MIN_TISSUE:.0f} % needed to trust one "
                    "rigid match)")
        return (f"warning: no whole-section match stands out (best Pearson r {float(self.score[i]):.2f}, "
                f"{float(self.lead[i]):.2f} above other shifts, {MIN_LEAD} expected): a blank or damaged section, or "
                "one of other tissue? evaluate.py names the neighbours that correlate least")


def rigid_search(sources, targets, reach: int | None = None, angles=None, size: int = SEARCH_SIZE) -> RigidMatch:
    """The shift and rotation that best match each normalised source ``[N, H, W]`` onto its target ``[N, H, W]``.

    Sections hold zero-mean tissue and 0 where data is missing (``data.normalise``).
    First a coarse search on sections averaged down to about ``size`` px (a whole
    factor ``f``): each rotation of ``angles`` (rad, ``[A]``; default: ``-MAX_ANGLE
    .. MAX_ANGLE`` in steps that move the middle of the coarse section's edges by
    ``STEP_PX`` coarse px) is tried on every source, and its best shift found at
    once for all of them by FFT cross-correlation (``best_shifts``' Pearson r),
    over ``reach`` px each way (default and at most: about a quarter of the
    section's smaller side, which the search needs as margin). The best angle is
    refined between the angles tried (parabola through their scores). Then, on
    sections averaged over ``f // 4`` px with the source turned as found, the
    shifts of ``PATCHES`` x ``PATCHES`` patches (within ``3 f`` px) give the last
    small shift and turn (``_patch_motion``). Cost per pair: ``A`` FFTs of
    ``size``-px images and ``PATCHES ** 2`` of patches of the finer ones (512 px
    sections, one thread: ~0.04 s).
    """
    a, b = (to_tensor(x, dtype=torch.float64) for x in (sources, targets))
    n, factor = len(a), _factor(a.shape, size)
    coarse_a, coarse_b = _pool(a, factor).float(), _pool(b, factor).float()
    side = min(coarse_a.shape[1:])
    if angles is None:
        step = STEP_PX * 2 / side
        angles = torch.arange(-math.ceil(MAX_ANGLE / step), math.ceil(MAX_ANGLE / step) + 1) * step
    angles = torch.as_tensor(angles, dtype=torch.float64).reshape(-1)
    count, radius = len(angles), (side - 1) // 4
    if reach is not None:
        radius = min(-(-reach // factor), radius)
    # every source turned by every angle: [N, A] maps of Pearson r per shift, their peaks
    turned = _turn(coarse_a.repeat_interleave(count, 0), angles.repeat(n), torch.zeros(n * count, 2))
    maps = _correlation_maps(turned.view(n, count, *turned.shape[1:]), coarse_b[:, None], radius, f"{reach} px")
    shift, score = (x.view(n, count, *x.shape[1:]) for x in _peaks(maps.flatten(0, 1)))
    best, rows = score.argmax(1), torch.arange(n)
    before, after = score[rows, (best - 1).clamp(min=0)], score[rows, (best + 1).clamp(max=count - 1)]
    step = angles[1] - angles[0] if count > 1 else 0.0
    angle = angles[best] + step * _parabola_vertex(before, score[rows, best], after, (best > 0) & (best < count - 1))
    centre = _rotate(shift[rows, best] * factor, angle)
    lead = score[rows, best] - _best_elsewhere(maps[rows, best], shift[rows, best], side / 16)
    # refined on finer sections, the source turned as found: the shift and turn that explain the patches' shifts
    fine = max(1, factor // 4)
    fine_a, fine_b = _pool(a, fine), _pool(b, fine)
    turn, residual = _patch_motion(_turn(fine_a, angle, centre / fine), fine_b, 3 * factor // fine)
    centre, angle = centre + _rotate(residual * fine, angle), angle + turn
    tissue = torch.minimum((a != 0).double().mean((1, 2)), (b != 0).double().mean((1, 2)))
    edge = shift[rows, best].abs().amax(1) >= radius - 0.5
    return RigidMatch(*(x.float() for x in (centre, angle, score[rows, best], lead, tissue)), edge)


def match_r(sources, targets, fields: torch.Tensor, size: int = SEARCH_SIZE) -> torch.Tensor:
    """Pearson r ``[N]`` of normalised sources ``[N, H, W]`` pulled by ``fields`` ``[N, 2, H, W]`` (px) with their
    targets ``[N, H, W]``, on sections averaged down to about ``size`` px (``rigid_search``'s factor), over the
    averaged pixels where both show tissue (non-zero) throughout; 0 where there are none."""
    return pearson(*_pooled_pair(sources, targets, fields, size)[:3])


def match_motion(sources, targets, fields: torch.Tensor, size: int = SEARCH_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``match_r`` ``[N]`` of normalised sources ``[N, H, W]`` pulled by ``fields`` ``[N, 2, H, W]`` (px) with their
    targets ``[N, H, W]``, and how far ``[N]`` (px) a rigid match would still move them: the median length over
    the section of the field of the small turn and shift that the shifts of ``PATCHES`` x ``PATCHES`` patches
    give (``_patch_motion``, each as far as its patch allows), on the same averaged sections. A few FFTs of
    patches: far cheaper than ``rigid_search``, and only as sure as the patches' shifts (between true
    neighbours of the demo, ISBI 2012 and SNEMI3D pulled by their whole-pixel shift: 0-14 px)."""
    a, b, both, factor = _pooled_pair(sources, targets, fields, size)
    turn, shift = _patch_motion(a, b, min(a.shape[1:]))
    step = max(1, min(a.shape[1:]) // 32)  # the field on a grid of about 32 x 32 points over the section
    field = affine_field(rigid_matrix(turn, shift[:, 0] / step, shift[:, 1] / step), *(x // step for x in a.shape[1:]))
    return pearson(a, b, both), field.norm(dim=1).flatten(1).median(1).values * factor * step


def _pooled_pair(sources, targets, fields: torch.Tensor, size: int):
    """float64 ``[N, h, w]`` sources ``[N, H, W]`` pulled by ``fields`` ``[N, 2, H, W]`` (px) and targets ``[N, H, W]``,
    averaged down to about ``size`` px (``_factor``); bool ``[N, h, w]``: where both show tissue (non-zero)
    throughout; and the factor."""
    a, b = (to_tensor(x, dtype=torch.float64) for x in (sources, targets))
    pulled = warp(a[:, None], fields.to(a.dtype))[:, 0]
    factor = _factor(a.shape, size)
    both = _pool(((pulled != 0) & (b != 0)).double(), factor) == 1
    return _pool(pulled, factor), _pool(b, factor), both, factor


def pearson(a: torch.Tensor, b: torch.Tensor, both: torch.Tensor) -> torch.Tensor:
    """Pearson r ``[N]`` of ``a`` with ``b`` ``[N, h, w]`` where ``both`` (bool, ``[N, h, w]``); 0 if nowhere."""
    count = both.sum((1, 2)).clamp_min(1)
    a, b = (torch.where(both, x - (x * both).sum((1, 2), keepdim=True) / count[:, None, None], 0) for x in (a, b))
    return ((a * b).sum((1, 2)) / ((a * a).sum((1, 2)) * (b * b).sum((1, 2))).sqrt().clamp_min(1e-12)).float()


def _factor(shape, size: int) -> int:
    """The whole factor that averages ``[..., H, W]`` sections down to about ``size`` px."""
    return max(1, round(min(shape[-2:]) / size))


def _best_elsewhere(r_map: torch.Tensor, peak: torch.Tensor, distance: float) -> torch.Tensor:
    """The largest value ``[N]`` of each map ``[N, 2r+1, 2r+1]`` of ``_correlation_maps`` at shifts further than
    ``distance`` px from its ``peak`` ``[N, 2]`` (px, x then y); -1 where there are none."""
    r = r_map.shape[-1] // 2
    y, x = torch.meshgrid(*(torch.arange(-r, r + 1, dtype=peak.dtype),) * 2, indexing="ij")
    near = (x - peak[:, :1, None]) ** 2 + (y - peak[:, 1:, None]) ** 2 <= distance ** 2
    return r_map.masked_fill(near, -1).flatten(1).amax(1)


def _patch_motion(a: torch.Tensor, b: torch.Tensor, reach: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The small turn ``[N]`` (rad) and shift ``[N, 2]`` (px at the centre) that best match sources ``a`` ``[N, H, W]``
    onto targets ``b`` ``[N, H, W]`` already nearly matched, from the shifts of their ``PATCHES`` x ``PATCHES`` patches.

    Each patch's best shift ``s_k`` (``best_shifts``' Pearson r, up to ``reach`` px, less on small patches) is
    fitted by ``u + turn * (-y_k, x_k)``, ``(x_k, y_k)`` the patch's centre from the section's: least squares,
    each patch weighted by its peak r (0 if negative).
    """
    n, h, w = a.shape
    ph, pw = h // PATCHES, w // PATCHES
    reach = min(reach, (min(ph, pw) - 1) // 4)

    def patches(x):  # [N * PATCHES^2, ph, pw], row by row
        return x[:, :ph * PATCHES, :pw * PATCHES].reshape(n, PATCHES, ph, PATCHES, pw).transpose(2, 3).flatten(0, 2)

    shift, peak = _peaks(_correlation_maps(patches(a), patches(b), reach, f"{reach} px"))
    y, x = torch.meshgrid(torch.arange(PATCHES) * ph + (ph - 1) / 2 - (h - 1) / 2,
                          torch.arange(PATCHES) * pw + (pw - 1) / 2 - (w - 1) / 2, indexing="ij")
    one, zero = torch.ones(PATCHES ** 2), torch.zeros(PATCHES ** 2)
    design = torch.cat([torch.stack([one, zero, -y.flatten()], 1), torch.stack([zero, one, x.flatten()], 1)])
    weight = peak.clamp_min(0).view(n, 1, -1).repeat(1, 1, 2).to(design.dtype)  # [N, 1, 2 P^2]: x rows, y rows
    target = torch.cat([shift.view(n, -1, 2)[..., 0], shift.view(n, -1, 2)[..., 1]], 1).to(design.dtype)
    normal = (design.T * weight) @ design + 1e-9 * torch.eye(3)  # [N, 3, 3]; a blank pair: all zero
    u_x, u_y, turn = torch.linalg.solve(normal, (design.T * weight) @ target[..., None])[..., 0].unbind(1)
    return turn, torch.stack([u_x, u_y], 1)


def _rotate(vectors: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Vectors ``[N, 2]`` (x, y) turned by ``angle`` ``[N]`` (rad; ``helpers.rigid_matrix``'s sign)."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    x, y = vectors.unbind(1)
    return torch.stack([cos * x - sin * y, sin * x + cos * y], 1)


def _turn(images: torch.Tensor, angle: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``[N, H, W]`` images pulled by the rigid map of ``angle`` ``[N]`` (rad) and ``shift`` ``[N, 2]`` (px at the
    centre); outside reads 0 (the normalised sections' mean)."""
    h, w = images.shape[1:]
    field = affine_field(rigid_matrix(angle, shift[:, 0], shift[:, 1]).to(images.dtype), h, w)
    return warp(images[:, None], field)[:, 0]


def _pool(images: torch.Tensor, factor: int) -> torch.Tensor:
    """``[N, H, W]`` images averaged over ``factor`` x ``factor`` pixels."""
    return F.avg_pool2d(images[:, None], factor)[:, 0] if factor > 1 else images


def _correlation_maps(a: torch.Tensor, b: torch.Tensor, r: int, reach: str) -> torch.Tensor:
    """Pearson r ``[..., 2r+1, 2r+1]`` of ``a(p + s)`` with ``b(p)`` over ``b``'s centre (``r`` px in from every
    border), for every shift ``s`` (index ``s + r``, y then x) up to ``r`` px each way; ``a``, ``b`` ``[..., H, W]``
    (leading dimensions broadcast: one target for several sources). ``reach`` names the reach asked for, in the
    error raised when the sections are too small for it."""
    h, w = a.shape[-2:]
    if min(h, w) <= 4 * r:
        raise UserError(f"sections of {h}x{w} px (after averaging) are too small for reach {reach}")
    plane = (-2, -1)
    source = (a - a.mean(plane, keepdim=True)) / a.std(plane, keepdim=True).clamp_min(1e-12)
    target = b[..., r:h - r, r:w - r]
    target = target - target.mean(plane, keepdim=True)
    kh, kw = target.shape[-2:]
    # numerator sum_p source(p + s) target(p) for every shift: cross-correlation by FFT (no wrap for s in 0..2r)
    spectrum = torch.fft.rfft2(source) * torch.fft.rfft2(target, s=(h, w)).conj()
    numerator = torch.fft.irfft2(spectrum, s=(h, w))[..., :2 * r + 1, :2 * r + 1]
    # window means of the source at every shift, for the Pearson r's denominator
    mean, square = (_window_means(x, kh, kw, 2 * r + 1) for x in (source, source ** 2))
    spread = ((square - mean ** 2).clamp_min(0) * kh * kw).sqrt() * target.flatten(-2).norm(dim=-1)[..., None, None]
    return numerator / spread.clamp_min(1e-12)


def _peaks(r_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The shift ``[N, 2]`` (px, x then y; a fraction of a pixel from a parabola through the peak) at which each
    map ``[N, 2r+1, 2r+1]`` of ``_correlation_maps`` peaks, and its peak value ``[N]``."""
    last = r_map.shape[-1] - 1
    best = r_map.flatten(1).argmax(1)
    dy, dx = best // (last + 1), best % (last + 1)
    n = torch.arange(len(r_map))
    peak = r_map[n, dy, dx]
    x = dx + _parabola_vertex(r_map[n, dy, (dx - 1).clamp(min=0)], peak, r_map[n, dy, (dx + 1).clamp(max=last)],
                              (dx > 0) & (dx < last))
    y = dy + _parabola_vertex(r_map[n, (dy - 1).clamp(min=0), dx], peak, r_map[n, (dy + 1).clamp(max=last), dx],
                              (dy > 0) & (dy < last))
    return torch.stack([x, y], 1) - last // 2, peak


def _window_means(x: torch.Tensor, kh: int, kw: int, shifts: int) -> torch.Tensor:
    """Means ``[..., shifts, shifts]`` of ``x`` ``[..., H, W]`` over the ``kh`` x ``kw`` windows at the first
    ``shifts`` offsets along each axis, from the summed-area table (O(1) per window whatever its size)."""
    table = F.pad(x.cumsum(-2).cumsum(-1), (1, 0, 1, 0))
    top, bottom, left, right = slice(0, shifts), slice(kh, kh + shifts), slice(0, shifts), slice(kw, kw + shifts)
    total = (table[..., bottom, right] - table[..., top, right] - table[..., bottom, left]
             + table[..., top, left])
    return total / (kh * kw)


def _parabola_vertex(before, at, after, inner) -> torch.Tensor:
    """Where the parabola through three equally spaced samples peaks, relative to the middle one.

    0 where not ``inner`` (the peak at the edge of the searched shifts) or where the samples do not bend down.
    """
    curvature = before - 2 * at + after
    inner = inner & (curvature < 0)
    return torch.where(inner, 0.5 * (before - after) / curvature.where(inner, -torch.ones_like(curvature)), 0.0)
