"""Ternary defect masks and the per-pixel weights the losses read from them.

A *defect map* says what is wrong with each pixel (uint8: 0 none, 1 crack,
2 fold). A *ternary mask* says how the losses should treat it:

* 0 — a normal pixel, far from any defect;
* 1 — near a defect: within ``mask_neighborhood_radius`` px (Euclidean) of one;
* 2 — inside a defect.

Masks become *weights* through the ``lambda`` family of the seed's training:

* ``lambda2`` — relative smoothness weight near defects (usually 0.01-0.1: let
  the field bend there);
* ``lambda3`` — relative smoothness weight inside defects (almost always 0);
* ``lambda4`` — relative similarity weight near defects (usually 5-10: focus the
  network on fixing the defects); the supervised end-point error, where a true
  field is known, is weighed the same way (``loss.pair_loss``);
* ``lambda5`` — relative similarity weight inside defects (almost always 0).

Normal pixels weigh 1 in both. Smoothness weights are then blurred by a box
filter of radius ``mask_smooth_radius`` so the penalty changes gradually.
Training (``loss.pair_loss``) also zeroes both in a border band of ``padding``
px (``border_weights``), and scores a coarser pyramid level with max-pooled
masks (``pool_mask``): a coarse pixel is as bad as the worst of the
full-resolution pixels it covers.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from helpers import UserError, box_mean, dilated

DEFECT_LABELS = "0 (none), 1 (crack) and 2 (fold)"  # the values of a defect map


def check_defect_map(defects, what: str):
    """``defects`` (an array or tensor of labels) as it is; a one-line ``UserError`` naming ``what`` (e.g. ``--defects
    PATH, section 3``) if it holds a value other than those of ``DEFECT_LABELS`` (e.g. an image given as defects)."""
    low, high = int(defects.min()), int(defects.max())
    if low < 0 or high > 2:
        raise UserError(f"{what} holds the value {high if high > 2 else low}; a defect map holds {DEFECT_LABELS} only")
    return defects


def check_image(image, what: str):
    """``image`` (an array of uint8 grey levels, any shape) as it is; a one-line ``UserError`` naming ``what`` where
    it holds only a defect map's values, 0 to 2, with more than 1 % of its pixels not 0 (a defect layer given as
    images): tissue never does, and a few dim pixels at the edge of missing data are let pass."""
    if image.max() <= 2 and (image > 0).sum() > image.size // 100:
        raise UserError(f"{what} holds only the values {DEFECT_LABELS}: a defect layer, not images")
    return image


def _squared_distance(defects: torch.Tensor, max_distance: float) -> torch.Tensor:
    """Exact squared Euclidean distance (px², float32) to the nearest defect, ``inf`` beyond ``max_distance``.

    defects: ``[..., H, W]``, any dtype, ``> 0`` marks a defect. Two passes: the
    horizontal distance to the nearest defect in each row (running max/min of
    defect column indices), then for each row offset ``|dy| <= max_distance`` the
    minimum of ``d_row(y + dy)² + dy²`` over the whole image at once.
    """
    defect = torch.as_tensor(defects) > 0
    h, w = defect.shape[-2:]
    col = torch.arange(w, dtype=torch.float32, device=defect.device)
    left = torch.where(defect, col, -math.inf).cummax(-1).values  # nearest defect column at or left of x
    right = torch.where(defect, col, math.inf).flip(-1).cummin(-1).values.flip(-1)  # at or right of x
    d_row = torch.minimum(col - left, right - col)
    d_row2 = d_row * d_row
    out = d_row2.clone()
    for dy in range(1, int(min(max_distance, h - 1)) + 1):
        above, below = out[..., dy:, :], out[..., :-dy, :]
        torch.minimum(above, d_row2[..., :-dy, :] + dy * dy, out=above)
        torch.minimum(below, d_row2[..., dy:, :] + dy * dy, out=below)
    return out.masked_fill_(out > max_distance ** 2, math.inf)


def distance_to_defect(defects: torch.Tensor, max_distance: float) -> torch.Tensor:
    """Euclidean distance (px) from each pixel to the nearest defect pixel, capped at ``max_distance``.

    defects: ``[N, 1, H, W]`` (any leading dims), any dtype, ``> 0`` marks a defect.
    Returns float32 of the same shape: 0 on defects, the exact distance where a
    defect lies within ``max_distance``, and ``max_distance`` where none does.
    Cost grows with ``max_distance`` (one whole-image step per row offset).
    """
    return _squared_distance(defects, max_distance).sqrt_().clamp_(max=max_distance)


def ternary_mask(defects: torch.Tensor, radius: float) -> torch.Tensor:
    """Ternary mask uint8 ``[N, 1, H, W]``: 2 inside a defect, 1 within ``radius`` px of one, 0 elsewhere.

    defects: ``[N, 1, H, W]`` (any leading dims), any dtype, ``> 0`` marks a defect
    (a crack or a fold alike). ``radius`` is ``mask_neighborhood_radius`` in
    pixels of the defect map; the distance is Euclidean and the bound inclusive.
    """
    defect = torch.as_tensor(defects) > 0
    near = _squared_distance(defect, radius) <= radius ** 2
    return near.to(torch.uint8) + defect.to(torch.uint8)


def _class_weights(mask: torch.Tensor, normal: float, near: float, inside: float) -> torch.Tensor:
    """float32 weights of the shape of ``mask``: ``normal`` / ``near`` / ``inside`` for classes 0 / 1 / 2."""
    mask = torch.as_tensor(mask)  # Python scalars: no copy to a GPU, no wait
    weights = torch.full(mask.shape, float(inside), dtype=torch.float32, device=mask.device)
    return weights.masked_fill_(mask == 1, near).masked_fill_(mask == 0, normal)


def _run_window(tissue: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(low, high, scale)`` of the shape of ``tissue`` (bool): the window ``[i - radius, i + radius]`` along the
    last dim as ``[low, high)`` (int64), stopped at the array's ends and before any pixel that is not tissue (within
    the run of ``tissue`` that holds ``i``), and ``1 / (high - low)`` (float64; 0 off the tissue, where the window
    is empty). Found once per mask, whatever the channels it is broadcast to."""
    n = tissue.shape[-1]
    i = torch.arange(n, device=tissue.device)
    start = torch.where(tissue, -1, i).cummax(-1).values + 1  # first pixel of the run (after the last gap)
    stop = torch.where(tissue, n, i).flip(-1).cummin(-1).values.flip(-1)  # one past its last pixel
    low, high = torch.maximum(i - radius, start), torch.minimum(i + radius + 1, stop)
    count = (high - low).double()  # -1 off the tissue
    return low, high, torch.where(count > 0, 1 / count, 0)


def _window_mean(x: torch.Tensor, window: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean of ``x`` (float64, contiguous) over each pixel's ``window`` along the last dim (``_run_window``,
    broadcast to ``x``): cumulative sums, O(1) per element whatever the radius; 0 off the tissue."""
    low, high, scale = window
    csum = torch.cat([x.new_zeros(*x.shape[:-1], 1), x.cumsum(-1)], -1)
    return (csum.gather(-1, high.expand_as(x)) - csum.gather(-1, low.expand_as(x))) * scale


def tissue_box_mean(x: torch.Tensor, tissue: torch.Tensor, radius: int, passes: int = 1) -> torch.Tensor:
    """``box_mean`` of ``x`` ``[..., H, W]`` within the tissue, ``passes`` times: a row pass then a column pass, each
    window stopped before any pixel where ``tissue`` (bool, broadcast to ``x``) is False, so no value crosses a
    crack or fold (a line of such pixels that spans the window, any 8-connected curve: a row or column crossing it
    meets one of its pixels). float32; 0 off the tissue. Without a gap in the window, exactly ``box_mean``'s value
    (up to float rounding). The windows are found once, on ``tissue`` as given (e.g. ``[..., 1, H, W]`` for fields
    ``[..., 2, H, W]``); each pass runs along contiguous rows (the column pass on the transpose). A ``tissue``
    without a gap is ``box_mean``, ``passes`` times, and so is each image (along the first dim, when ``tissue`` has
    one per image) without a gap."""
    if radius <= 0:
        return x.float().masked_fill(~tissue.expand_as(x), 0)
    if tissue.all():  # no gap anywhere: the plain box mean
        for _ in range(passes):
            x = box_mean(x, radius)
        return x
    gappy = (~tissue).flatten(1).any(1) if tissue.dim() == x.dim() > 2 and len(tissue) == len(x) > 1 else None
    if gappy is not None and not gappy.all():  # the images (along the first dim) without a gap: the plain one
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for these in (gappy, ~gappy):
            out[these] = tissue_box_mean(x[these], tissue[these], radius, passes)
        return out
    rows, columns = _run_window(tissue, radius), _run_window(tissue.transpose(-1, -2).contiguous(), radius)
    out = x.double()
    for _ in range(passes):
        out = _window_mean(out.contiguous(), rows).transpose(-1, -2).contiguous()
        out = _window_mean(out, columns).transpose(-1, -2)
    return out.float()


def _images_with_holes(fill):
    """``fill(x, hole, ...)`` (``x`` ``[..., H, W]``, bool ``hole`` broadcast to it) run only on the images (along
    the first dim) that have a hole (the other tensor arguments taken on the same images); ``x`` itself where there
    is none."""
    @functools.wraps(fill)
    def run(x: torch.Tensor, hole: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not hole.any():
            return x
        if hole.dim() == x.dim() > 2 and hole.shape[0] == x.shape[0] > 1:
            some = hole.flatten(1).any(1)
            if not some.all():
                def pick(a):
                    return a[some] if torch.is_tensor(a) and a.dim() == x.dim() and len(a) == len(x) else a
                out = x.clone()
                out[some] = fill(x[some], hole[some], *map(pick, args), **{k: pick(a) for k, a in kwargs.items()})
                return out
        return fill(x, hole, *args, **kwargs)
    return run


@_images_with_holes
def fill_from_around(x: torch.Tensor, hole: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """``x`` ``[..., H, W]`` with each pixel of ``hole`` (bool, broadcast to ``x``) replaced by the mean of the
    pixels outside the holes within a box of ``radius`` px around it (normalised convolution: ``box_mean(w x) /
    box_mean(w)``, ``w`` 0 in holes), the box doubled for the pixels it leaves without any; a pixel with no
    pixel outside the holes in reach keeps its value. Other pixels are returned as they are. ``w`` is averaged
    on ``hole`` as given (e.g. ``[..., 1, H, W]`` for fields ``[..., 2, H, W]``), once per box size, and only the
    images (along the first dim) with a hole are touched."""
    weight = (~hole).to(x.dtype)
    out, todo = x.clone(), hole.expand_as(x)
    while todo.any() and radius < 2 * max(x.shape[-2:]):
        total, count = box_mean(weight * x, radius), box_mean(weight, radius)
        found = todo & (count > 0)
        out = torch.where(found, total / count.clamp(min=1e-12), out)
        todo = todo & ~found
        radius *= 2
    return out


HOLE_REACH = 128  # px: how far ``interpolate_holes`` looks for the rim of a hole by default


def _bounding_box(mask: torch.Tensor, margin: int) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` px (bottom and right exclusive): the smallest box that holds every True pixel
    of ``mask`` ``[..., H, W]`` (bool, with one True at least; all images together), widened by ``margin`` px on
    each side, clipped to the image."""
    h, w = mask.shape[-2:]
    found = mask.reshape(-1, h, w).any(0)
    rows, columns = found.any(1).nonzero()[:, 0], found.any(0).nonzero()[:, 0]
    return (max(int(rows[0]) - margin, 0), min(int(rows[-1]) + 1 + margin, h),
            max(int(columns[0]) - margin, 0), min(int(columns[-1]) + 1 + margin, w))


@functools.lru_cache(maxsize=None)
def _fast_length(n: int) -> int:
    """The smallest ``2^a 3^b 5^c >= n`` (``n`` >= 1): an FFT length that is quick to transform (kept per ``n``)."""
    powers = range(n.bit_length() + 1)
    return min(m for m in (2 ** a * 3 ** b * 5 ** c for a in powers for b in powers for c in powers) if m >= n)


@functools.lru_cache(maxsize=8)
def _inverse_square_spectrum(reach: int, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``rfft2`` (float64, padded to ``size``) of the kernel ``1 / d²`` for ``0 < d <= reach`` px, 0 elsewhere
    (``[2 reach + 1]²``): one per reach and box size, kept for the next call (``_unfolded`` asks for the same)."""
    offsets = torch.arange(-reach, reach + 1, dtype=torch.float64, device=device)
    squared = offsets[:, None] ** 2 + offsets[None] ** 2
    kernel = torch.where((squared > 0) & (squared <= reach ** 2), 1 / squared.clamp(min=1), 0)
    return torch.fft.rfft2(kernel, size)


def _rim_sums(x: torch.Tensor, hole: torch.Tensor, reach: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(total, weight)`` float64: the sums over the rim of the holes (the pixels outside ``hole``, bool broadcast
    to ``x`` ``[..., H, W]``, next to one, 8-connected) of ``x`` and of 1, each weighted by ``1 / d²`` (``d`` px,
    ``0 < d <= reach``); ``total`` of the shape of ``x``, ``weight`` of ``hole``. Convolved by FFT (float64),
    whatever ``reach``, the image's edges replicated (a band that leaves the image goes on)."""
    h, w = x.shape[-2:]
    rim = (dilated(hole, 1) & ~hole).double()
    size = (_fast_length(h + 2 * reach), _fast_length(w + 2 * reach))  # the rest zeros: wrapped onto nothing kept
    spectrum = _inverse_square_spectrum(reach, size, x.device)

    def convolve(y: torch.Tensor) -> torch.Tensor:
        padded = F.pad(y.reshape(-1, 1, h, w), (reach,) * 4, mode="replicate").reshape(*y.shape[:-2], h + 2 * reach,
                                                                                          w + 2 * reach)
        return torch.fft.irfft2(torch.fft.rfft2(padded, size) * spectrum, size)[..., 2 * reach:h + 2 * reach,
                                                                                2 * reach:w + 2 * reach]

    return convolve(rim * x.double()), convolve(rim)


@_images_with_holes
def interpolate_holes(x: torch.Tensor, hole: torch.Tensor, reach: int = HOLE_REACH,
                      where: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``[..., H, W]`` with each pixel of ``hole`` (bool, broadcast to ``x``) interpolated from the rim of its
    hole (the pixels outside the holes next to one, 8-connected): their mean weighted by ``1 / d²`` (``d`` px, the
    distance, up to ``reach``). Across a band-shaped hole (a crack's or fold's mask) that is the linear ramp
    between its two sides (a side at distance ``d`` weighs ``~pi / d``), so a field that differs across the band
    changes gradually through it, as a fold's true field does, instead of stepping in its middle (a step that
    moves backwards folds the map over). Pixels no rim reaches within ``reach`` px take ``fill_from_around``'s
    value; other pixels are returned as they are, and only the images (along the first dim) with a hole are
    touched. ``1 / d²`` is convolved by FFT (float64, ``_rim_sums``), the image's edges replicated.

    where: bool broadcast to ``hole``, or None (all of it): only the pixels of ``hole`` in ``where`` are
    interpolated, the others of ``hole`` are returned as they are too (e.g. where a hole did not change). The sums
    run only in a box (one per image along the first dim, when ``hole`` has one per image): the bounding box of
    those pixels widened by ``reach + 1`` px, within that of ``hole`` widened by 2 px. It holds every rim pixel
    they reach, and its own edges, replicated, weigh nothing where it stops inside the image (no rim pixel on
    them, or beyond ``reach``) and are the image's where it meets them, so the values are those of the whole
    image. If a pixel of ``where`` is not reached, the whole hole is interpolated (``fill_from_around`` leaves
    out every pixel that is not reached) and the pixels of ``where`` taken. The FFT's length is the box's padded
    to a product of 2, 3 and 5."""
    todo = hole if where is None else hole & where
    if not todo.any():
        return x
    if hole.dim() == x.dim() > 2 and len(hole) == len(x) > 1:  # one box per image (along the first dim)
        one = where is not None and where.dim() == hole.dim() and len(where) == len(hole)
        return torch.stack([interpolate_holes(x[i], hole[i], reach, where[i] if one else where) for i in range(len(x))])
    (top, bottom, left, right), (top2, bottom2, left2, right2) = _bounding_box(todo, reach + 1), _bounding_box(hole, 2)
    box = (..., slice(max(top, top2), min(bottom, bottom2)), slice(max(left, left2), min(right, right2)))
    total, weight = _rim_sums(x[box], hole[box], reach)
    reached = todo[box] & (weight > 1e-9)
    unreached = todo.clone()
    unreached[box] &= ~reached
    if where is not None and unreached.any():
        return torch.where(todo, interpolate_holes(x, hole, reach), x)
    out = x.clone()
    out[box] = torch.where(reached, (total / weight.clamp(min=1e-12)).to(x.dtype), x[box])
    return torch.where(unreached, fill_from_around(x, unreached), out)


def smoothness_weights(mask: torch.Tensor, lambda2: float, lambda3: float,
                       smooth_radius: int = 0) -> torch.Tensor:
    """Per-pixel weight float32 ``[N, 1, H, W]`` of the field's smoothness penalty.

    mask: ternary uint8 ``[N, 1, H, W]`` (``ternary_mask``). Classes 0 / 1 / 2 weigh
    1 / ``lambda2`` (near a defect) / ``lambda3`` (inside one), then the weights
    are box-averaged over radius ``smooth_radius`` px (``mask_smooth_radius``;
    0 leaves them as they are).
    """
    return box_mean(_class_weights(mask, 1.0, lambda2, lambda3), smooth_radius)


def similarity_weights(mask: torch.Tensor, missing: torch.Tensor, lambda4: float,
                       lambda5: float) -> torch.Tensor:
    """Per-pixel weight float32 ``[N, 1, H, W]`` of the image similarity penalty.

    mask: ternary uint8 ``[N, 1, H, W]``; classes 0 / 1 / 2 weigh 1 / ``lambda4``
    (near a defect) / ``lambda5`` (inside one). missing: bool ``[N, 1, H, W]``, True
    where either image has no data; those pixels weigh 0.
    """
    weights = _class_weights(mask, 1.0, lambda4, lambda5)
    return weights.masked_fill_(torch.as_tensor(missing, device=weights.device).bool(), 0.0)


def pool_mask(mask: torch.Tensor, level: int) -> torch.Tensor:
    """A float mask ``[N, 1, H, W]`` at pyramid ``level`` (``2^level`` times smaller): the max of each block.

    mask: float ``[N, 1, H, W]`` (a ternary mask, or 0/1 for missing data), ``H``
    and ``W`` divisible by ``2^level``. A coarse pixel takes the worst class of
    the ``2^level x 2^level`` pixels it covers; level 0 returns ``mask`` itself.
    """
    return mask if level == 0 else F.max_pool2d(mask, 2 ** level)


def border_weights(h: int, w: int, padding: int, device=None) -> torch.Tensor:
    """float32 ``[1, 1, h, w]``: 0 in a border band ``padding`` px wide, 1 inside."""
    out = torch.zeros(1, 1, h, w, device=device)
    out[..., padding:h - padding, padding:w - padding] = 1
    return out
