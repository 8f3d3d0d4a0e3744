"""The penalties SEAMLeSS trains with, each a small pure function, chosen by name.

Shapes and units everywhere: images ``[N, 1, H, W]`` float intensities (the same
scale for both images of a pair); fields ``[N, 2, H, W]`` in pixels (x then y, as
in helpers.py); weights ``[N, 1, H, W]`` float ``>= 0`` from masks.py (already
zero on missing data; a batch of 1 applies to every sample). Every weighted
penalty is a weighted *mean* over pixels (the weighted sum divided by the weight
sum), so its value does not depend on image size and ``lambda1`` keeps its
meaning at any crop size; a penalty whose weights are all zero is 0. A
smoothness term that involves several pixels weighs as little as the least of
their weights, so the field may tear across a defect of weight 0.

The total cost is ``lambda0 * similarity + lambda1 * smoothness + lambda6 *
consensus (+ lambda_gt * epe)`` (``total_cost``); ``lambda0`` is 1 but for
purely supervised training (0).

Training's objective has one entry point, ``pair_loss(model, batch, objective,
level)``: the cost of a batch of pairs from data.py at one pyramid level, with
the weights of masks.py, under the frozen settings ``Objective`` (train.py's
loss flags, ``Objective.from_args``). ``collapsed`` tells from its logged
figures when the network has fallen into the zero field.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

import masks
from helpers import UserError, downsample_field, vector_length, warp, warp_labels

_TINY = 1e-12  # guards divisions by a weight sum that may be zero
_NCC_EPS = 1e-8  # (intensity units)^4: the least variance product ncc divides by
_AXES = ((1, 0), (0, 1))  # neighbour offsets (dx, dy): along x, along y
_NEIGHBOURS = _AXES + ((1, 1), (1, -1))  # plus both diagonals: every 8-neighbour pair once


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scalar: ``values [N, C, h, w]`` summed over C, then averaged over pixels with ``weights [N or 1, 1, h, w]``."""
    weights = weights.expand(len(values), 1, *values.shape[2:])
    return (weights * values).sum() / weights.sum().clamp_min(_TINY)


# ------------------------------------------------------------------------ similarity
def mse(warped: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of the squared difference ``(warped - target)^2`` (intensity units squared).

    warped, target: ``[N, 1, H, W]``; weights ``[N, 1, H, W]``. 0 for identical images.
    """
    return _weighted_mean((warped - target) ** 2, weights)


def ncc(warped: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
        window: int = 9) -> torch.Tensor:
    """``1 -`` the weighted mean of the *local* normalised cross-correlation of two images (unitless, in [0, 2]).

    warped, target: ``[N, 1, H, W]``; weights ``[N, 1, H, W]``. For each pixel, the
    means, variances and covariance of both images are taken over the
    ``window x window`` box around it (odd ``window``), each pixel of the box
    counted with its weight (outside the image weighs 0), and
    ``ncc = cov / sqrt(max(var_w * var_t, 1e-8))``; the local values are then averaged
    with ``weights``. Local rather than global because section brightness and
    contrast drift across a section (staining, charging, uneven beam): a global
    NCC forgives only one brightness/contrast change for the whole image and is
    dominated by low frequencies, a local one forgives it window by window and
    scores the texture that alignment must match. 0 for identical images
    wherever the windows hold texture (variance product >= 1e-8, e.g. a local
    standard deviation of 0.01 for intensities in [0, 1]); flat windows count as
    uncorrelated (loss 1 there): they carry nothing to align.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"ncc window must be odd and positive, got {window}")

    def box(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, window, stride=1, padding=window // 2)

    norm = box(weights).clamp_min(_TINY)
    mean_w, mean_t = box(weights * warped) / norm, box(weights * target) / norm
    var_w = (box(weights * warped ** 2) / norm - mean_w ** 2).clamp_min(0)
    var_t = (box(weights * target ** 2) / norm - mean_t ** 2).clamp_min(0)
    cov = box(weights * warped * target) / norm - mean_w * mean_t
    return 1 - _weighted_mean(cov / torch.sqrt((var_w * var_t).clamp_min(_NCC_EPS)), weights)


# ------------------------------------------------------------------------ smoothness
def _pair(x: torch.Tensor, dx: int, dy: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x(p), x(p + d))`` for ``d = (dx, dy)``, over the pixels ``p`` where both lie in the image."""
    h, w = x.shape[-2:]
    r0, r1, c0, c1 = max(0, -dy), h - max(0, dy), max(0, -dx), w - max(0, dx)
    return x[..., r0:r1, c0:c1], x[..., r0 + dy:r1 + dy, c0 + dx:c1 + dx]


def _differences(field: torch.Tensor, weights: torch.Tensor,
                 offsets: Sequence[tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each offset ``d``: ``(field(p + d) - field(p)`` ``[N, 2, h, w]``, ``min(weights(p), weights(p + d))``).

    A difference weighs as little as the lesser of its two pixels, so one that
    reaches into a defect (weight 0) costs nothing: the field may tear there.
    """
    out = []
    for dx, dy in offsets:
        f0, f1 = _pair(field, dx, dy)
        w0, w1 = _pair(weights, dx, dy)
        out.append((f1 - f0, torch.minimum(w0, w1)))
    return out


def jacob(field: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean squared gradient of the field (px^2 per px^2): the default smoothness penalty.

    field ``[N, 2, H, W]`` pixels, weights ``[N, 1, H, W]``. The sum over the x
    and y directions of the weighted mean of ``|field(p + d) - field(p)|^2``
    (both vector components), i.e. the squared Frobenius norm of the field's
    Jacobian: exactly ``||B||_F^2`` for the affine field ``field(p) = B p + t``. The
    differences are taken between neighbours (centred on the half-pixel between
    them), not as ``f(p+1) - f(p-1)``, which would not see a field that
    alternates pixel by pixel. 0 for any translation.
    """
    return sum(_weighted_mean(d ** 2, w) for d, w in _differences(field, weights, _AXES))


def cjacob(field: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``jacob`` of the field's deviation from its mean gradient: only the non-affine part costs (px^2 per px^2).

    For each sample, vector component and direction (x, y), the weighted mean of
    the neighbour differences ``field(p + d) - field(p)`` over the image (the
    field's average Jacobian column) is subtracted from every difference before
    squaring; the result is averaged like ``jacob``. 0 for any affine field
    (translation, rotation, scaling, shear), positive for any bending.
    """
    total = 0
    for d, w in _differences(field, weights, _AXES):
        mean = (w * d).sum((2, 3), keepdim=True) / w.sum((2, 3), keepdim=True).clamp_min(_TINY)
        total = total + _weighted_mean((d - mean) ** 2, w)
    return total


def tv(field: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Total variation (px per px): sum over x and y of the weighted mean ``|field(p + d) - field(p)|_1``.

    field ``[N, 2, H, W]`` pixels, weights ``[N, 1, H, W]``; the L1 norm is over
    both vector components. Forgives sharp steps more than ``jacob`` does.
    """
    return sum(_weighted_mean(d.abs(), w) for d, w in _differences(field, weights, _AXES))


def lap(field: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean squared deviation of the field from the mean of its 4 neighbours (px^2).

    field ``[N, 2, H, W]`` pixels, weights ``[N, 1, H, W]``; over interior pixels,
    each weighted by the least weight of its 5-pixel stencil. 0 for any affine
    field (it penalises curvature, not gradient).
    """
    def cross(x: torch.Tensor) -> list[torch.Tensor]:
        return [x[..., 1:-1, 1:-1], x[..., 1:-1, :-2], x[..., 1:-1, 2:], x[..., :-2, 1:-1], x[..., 2:, 1:-1]]

    centre, *around = cross(field)
    w = torch.stack(cross(weights)).amin(0)
    return _weighted_mean((centre - sum(around) / 4) ** 2, w)


def rigidity(field: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean stretch of springs between neighbours (px^2): 0 for any rigid motion.

    field ``[N, 2, H, W]`` pixels, weights ``[N, 1, H, W]``. For every pair of
    4- and diagonal neighbours ``p, p + d``, the spring's length after the warp
    is ``|d + field(p + d) - field(p)|`` and at rest ``|d|`` (1 or sqrt 2 px); the
    penalty sums, over the four neighbour directions, the weighted mean of
    ``(length - rest)^2``. Translations and rotations cost 0; scaling, shear and
    bending do not.
    """
    total = 0
    for (dx, dy), (d, w) in zip(_NEIGHBOURS, _differences(field, weights, _NEIGHBOURS)):
        length = vector_length(torch.stack([d[:, 0] + dx, d[:, 1] + dy], 1))[:, None]  # |spring + d|
        total = total + _weighted_mean((length - math.hypot(dx, dy)) ** 2, w)
    return total


# ------------------------------------------------------------------ consensus, supervision
def rotate180_field(field: torch.Tensor) -> torch.Tensor:
    """Bring a field computed on 180-degree-rotated images back to the original frame.

    field ``[N, 2, H, W]`` pixels, predicted for the pair ``(s.flip((-2, -1)),
    t.flip((-2, -1)))``; returns ``-field.flip((-2, -1))``: the picture turned by
    180 degrees and every vector reversed. It is its own inverse.
    """
    return -field.flip((-2, -1))


def consensus(field: torch.Tensor, field_on_rotated: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of ``|field - rotate180_field(field_on_rotated)|^2`` (px^2).

    field: ``[N, 2, H, W]`` predicted on a pair; field_on_rotated: predicted on the
    same pair turned by 180 degrees. 0 when the prediction is 180-degree
    equivariant (a translation ``t`` predicted as ``t`` and, on the turned pair,
    ``-t``); penalising it cancels the drift a net adds in a fixed direction.
    """
    return ((field - rotate180_field(field_on_rotated)) ** 2).sum(1).mean()


def epe(field: torch.Tensor, true_field: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean end-point error ``|field - true_field|`` (px).

    field, true_field: ``[N, 2, H, W]`` pixels; weights ``[N, 1, H, W]``.
    """
    return _weighted_mean(vector_length(field - true_field)[:, None], weights)


# ---------------------------------------------------------------------- choosing, total
SIMILARITY: dict[str, Callable[..., torch.Tensor]] = {"mse": mse, "ncc": ncc}
SMOOTHNESS: dict[str, Callable[..., torch.Tensor]] = {
    "jacob": jacob, "lap": lap, "cjacob": cjacob, "tv": tv, "rigidity": rigidity}
LAMBDAS = {"similarity": "lambda0", "smoothness": "lambda1", "consensus": "lambda6", "epe": "lambda_gt"}


def pick(table: Mapping[str, Callable[..., torch.Tensor]], name: str) -> Callable[..., torch.Tensor]:
    """``table[name]`` (``SIMILARITY`` or ``SMOOTHNESS``), or a ``UserError`` listing the choices."""
    if name not in table:
        raise UserError(f"unknown penalty {name!r}: choose one of {', '.join(table)}")
    return table[name]


def total_cost(terms: Mapping[str, torch.Tensor],
               lambdas: Mapping[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
    """``(cost, log)``: ``cost = lambda0 * similarity + lambda1 * smoothness + lambda6 * consensus + lambda_gt * epe``.

    terms: scalar tensors named ``similarity``, ``smoothness``, ``consensus``,
    ``epe`` (any subset, at least one); lambdas: ``lambda0``, ``lambda1``,
    ``lambda6``, ``lambda_gt`` for the terms given (e.g. ``vars(args)``). log: each term and
    the ``total`` as floats, for logging.
    """
    unknown = sorted(set(terms) - set(LAMBDAS))
    if unknown or not terms:
        raise ValueError(f"terms must be some of {list(LAMBDAS)}, got {list(terms)}")
    missing = sorted(LAMBDAS[name] for name in terms if LAMBDAS[name] not in lambdas)
    if missing:
        raise ValueError(f"no value for {', '.join(missing)}")
    cost = sum(value * lambdas[LAMBDAS[name]] for name, value in terms.items())
    log = {name: float(value.detach()) for name, value in terms.items()}
    log["total"] = float(cost.detach())
    return cost, log


# ------------------------------------------------------------------ the training objective
@dataclass(frozen=True)
class Objective:
    """The settings of the training cost: train.py's loss flags, under the same names (their defaults live there).

    similarity, smoothness: penalty names (keys of ``SIMILARITY``, ``SMOOTHNESS``).
    lambda0, lambda1, lambda6, lambda_gt: the weights of the similarity,
    smoothness, consensus and supervised terms (``total_cost``); the last two
    are computed only when their weight is > 0, the first two always.
    lambda2 .. lambda5: the relative weights near and inside defects (masks.py);
    lambda4 and lambda5 weigh the supervised term too.
    mask_smooth_radius: px at full resolution, the box filter of the smoothness
    weights. padding: px at full resolution, the border band that weighs 0.
    """
    similarity: str
    smoothness: str
    lambda0: float
    lambda1: float
    lambda2: float
    lambda3: float
    lambda4: float
    lambda5: float
    lambda6: float
    lambda_gt: float
    mask_smooth_radius: float
    padding: int

    def __post_init__(self):
        pick(SIMILARITY, self.similarity)
        pick(SMOOTHNESS, self.smoothness)

    @classmethod
    def from_args(cls, args) -> Objective:
        """The settings from any object with attributes of these names (train.py's parsed flags)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def _pool_image(image: torch.Tensor, level: int) -> torch.Tensor:
    """An image ``[N, 1, H, W]`` at pyramid ``level``: the mean of each ``2^level x 2^level`` block."""
    return image if level == 0 else F.avg_pool2d(image, 2 ** level)


def _level_masks(batch: Mapping[str, torch.Tensor], field: torch.Tensor,
                 level: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(region, missing, unaligned_missing)`` of a batch at ``level``, in the target's frame.

    field: ``[N, 2, h, w]`` pixels of ``level``, pulling the source onto the target.
    region: ternary uint8 ``[N, 1, h, w]``, the worse of the warped source mask and
    the target mask. missing: bool ``[N, 1, h, w]``, no data in the target or in
    the warped source; unaligned_missing: the same for the unwarped source.
    """
    src_valid = 1 - masks.pool_mask(batch["src_missing"].float(), level)
    tgt_missing = masks.pool_mask(batch["tgt_missing"].float(), level) > 0
    missing = tgt_missing | (warp(src_valid, field) < 0.5)
    region = torch.maximum(warp_labels(masks.pool_mask(batch["src_mask"].float(), level), field),
                           masks.pool_mask(batch["tgt_mask"].float(), level)).to(torch.uint8)
    return region, missing, tgt_missing | (src_valid < 0.5)


def _border(objective: Objective, region: torch.Tensor, level: int) -> torch.Tensor:
    """float32 ``[1, 1, h, w]`` for ``region`` ``[N, 1, h, w]`` at ``level``: 0 in the ``padding`` band (rounded up)."""
    return masks.border_weights(*region.shape[-2:], math.ceil(objective.padding / 2 ** level), region.device)


def _similarity_weights(objective: Objective, region: torch.Tensor, missing: torch.Tensor,
                        level: int) -> torch.Tensor:
    """float32 ``[N, 1, h, w]``: ``masks.similarity_weights`` at ``level``, 0 in the border band."""
    weights = masks.similarity_weights(region, missing, objective.lambda4, objective.lambda5)
    return weights * _border(objective, region, level)


def _smoothness_weights(objective: Objective, region: torch.Tensor, level: int) -> torch.Tensor:
    """float32 ``[N, 1, h, w]``: ``masks.smoothness_weights`` at ``level``, 0 in the border band."""
    weights = masks.smoothness_weights(region, objective.lambda2, objective.lambda3,
                                       round(objective.mask_smooth_radius / 2 ** level))
    return weights * _border(objective, region, level)


def pair_loss(model: Callable, batch: Mapping[str, torch.Tensor], objective: Objective,
              level: int) -> tuple[torch.Tensor, dict, dict]:
    """The training cost of one batch of pairs at pyramid ``level``; returns ``(cost, log, pictures)``.

    model: ``(src, tgt, trunc=level) -> PyramidOutput`` (a ``models.Pyramid`` or its
    DDP wrapper), run once, and again on the pair turned by 180 degrees when
    ``lambda6 > 0``. batch: data.py's ``src``, ``tgt`` float ``[N, 1, H, W]``,
    ``src_missing``, ``tgt_missing`` bool and ``src_mask``, ``tgt_mask`` ternary uint8
    ``[N, 1, H, W]``, ``field`` ``[N, 2, H, W]`` px and ``has_field`` bool ``[N]``.
    The images are mean-pooled and the masks max-pooled to ``level``; the
    similarity compares the warped source with the target, the supervised term
    (``lambda_gt > 0``) scores the field against ``field`` where ``has_field``, each
    pixel weighed as in the similarity (``lambda4`` near a defect, ``lambda5``
    inside one, 0 without data): near a crack or fold is where the field jumps
    and the network errs most, and the few pixels there would otherwise count
    for little (bench/RESULTS.md, 2026-12-05).
    cost: scalar tensor. log: floats ``similarity``, ``smoothness``, ``consensus``,
    ``epe`` (those in use), ``total``, and the diagnostics ``identity`` (similarity
    of the unaligned pair), ``field_px`` (mean |field| in full-resolution
    pixels) and ``data_share`` (the share of pixels the similarity scores: 0 where
    no pixel holds data in both sections, and nothing trains). pictures: tensors
    of the first pair for visualisation, and ``residuals`` (level -> residual
    field) for logging.
    """
    src, tgt = batch["src"], batch["tgt"]
    out = model(src, tgt, trunc=level)
    field, scale = out.field, 2 ** level
    src_l, tgt_l = _pool_image(src, level), _pool_image(tgt, level)
    warped = warp(src_l, field)
    region, missing, unaligned_missing = _level_masks(batch, field, level)
    sim_w = _similarity_weights(objective, region, missing, level)
    smooth_w = _smoothness_weights(objective, region, level)
    similarity = pick(SIMILARITY, objective.similarity)
    terms = {"similarity": similarity(warped, tgt_l, sim_w),
             "smoothness": pick(SMOOTHNESS, objective.smoothness)(field, smooth_w)}
    if objective.lambda6 > 0:
        rotated = model(src.flip(-1, -2), tgt.flip(-1, -2), trunc=level).field
        terms["consensus"] = consensus(field, rotated)
    if objective.lambda_gt > 0 and bool(batch["has_field"].any()):
        known = batch["has_field"].view(-1, 1, 1, 1).float() * sim_w  # defects weigh as in the similarity
        terms["epe"] = epe(field, downsample_field(batch["field"], scale), known)
    total, log = total_cost(terms, asdict(objective))
    with torch.no_grad():
        identity_w = _similarity_weights(objective, region, unaligned_missing, level)
        log["identity"] = float(similarity(src_l, tgt_l, identity_w))
        log["field_px"] = float(vector_length(field).mean()) * scale
        log["data_share"] = float((sim_w > 0).float().mean())
    pictures = dict(source=src_l[0, 0], target=tgt_l[0, 0], warped=warped[0, 0].detach(),
                    field=field[0].detach(), weights=sim_w[0, 0],
                    residuals={level: r.detach() for level, r in out.residuals.items()})
    return total, log, pictures


def collapsed(field_px: float, similarity: float, identity: float) -> bool:
    """The seed's pathological minimum: a near-zero field while similarity stays at the unaligned level.

    field_px: mean |field| (px); similarity, identity: the similarity penalty of the
    aligned and of the unaligned pair (``pair_loss``'s log). True when the field is
    under 0.05 px and the similarity above 95 % of the unaligned one.
    """
    return field_px < 0.05 and similarity > 0.95 * identity
