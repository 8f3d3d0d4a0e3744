"""Drift control: combining many pair fields into one field per section.

A serial aligner chains pair fields, so each pair's error adds to every section
after it (a random walk). Two remedies, both on fields in the ``helpers``
convention (``[.., 2, H, W]`` pixels, x then y, pulling):

* ``vector_vote``: several candidate fields for one section (e.g. onto each of the
  K aligned sections before it) are combined per pixel, favouring the candidates
  that agree with the others, so one folded, torn or blank neighbour cannot
  derail the section.
* ``solve_stack``: fields between raw sections and their neighbours on both
  sides are solved jointly for one field per section (least squares over the
  section graph, with a pull toward zero displacement, since imaging
  misalignment does not accumulate physically), so errors stay bounded.

Why a pull, and why one per band of spatial detail: a pair field between
neighbours sees the misalignment of both sections (independent from section to
section: white along z) plus the tissue's own change between them, which the
network partly follows and which adds up along z (a random walk). Per pixel
and z-frequency the least-squares solve with pull ``p`` keeps
``D / (D + p)`` of the signal (``D`` the section graph's Laplacian eigenvalue),
which is the Wiener filter for exactly that mixture with ``p`` = (tissue
change per section / misalignment) in power. Misalignment is smooth and tissue
change fine-grained, so that ratio is small for the coarse part of the fields
and large for the fine detail: ``solve_stack`` low-passes the pair fields
(``low_pass``) and solves the coarse part and the detail with a pull each.

Everything is per pixel and batched over the whole section; the only loops are
over sections and pairs.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from helpers import box_mean, dilated, jacobian_determinant, to_tensor, vector_length, warp, warp_labels
from masks import HOLE_REACH, interpolate_holes, tissue_box_mean


MISSING_REACH, MISSING_SHARE = 64, 0.15  # px, fraction: where the network's field reads missing data's zeros


def beside_missing(missing: torch.Tensor) -> torch.Tensor:
    """bool ``[..., H, W]``: ``missing`` (bool, missing data) and the pixels where more than ``MISSING_SHARE`` of the
    ``(2 MISSING_REACH + 1)²`` px square around them (clipped to the image: ``helpers.box_mean``) is missing data,
    where the network's field reads its zeros: beside a straight edge of it (a frame) the 44 px next to it, beside
    a lone hole of 40² px none (bench/RESULTS.md, 2026-12-07: a fixed width cost dense holes what it gained at frames).
    An image (along the leading dims) whose every pixel is marked keeps ``missing`` alone (a small piece of tissue
    keeps its own field)."""
    near = missing | (box_mean(missing.float(), MISSING_REACH) > MISSING_SHARE)
    return torch.where((~near).flatten(-2).any(-1)[..., None, None], near, missing)


def low_pass(field: torch.Tensor, radius: int, defects: torch.Tensor | None = None,
             untrusted: torch.Tensor | None = None) -> torch.Tensor:
    """``field`` ``[..., 2, H, W]`` (px) averaged over a box of ``radius`` px twice (a triangle of half-width
    2 ``radius``); ``radius`` 0 returns it as it is.

    defects: ``[..., H, W]`` (0 none, 1 crack, 2 fold; in the field's grid) or None: the defects of the section
    whose field this is. Where it marks one, the boxes run within the tissue (``masks.tissue_box_mean``: never
    across a crack or fold, so the field keeps its jump there). untrusted: bool ``[..., H, W]`` or None: pixels
    whose value is not used (e.g. a neighbour's defect, where a pair field is garbage) without stopping the boxes:
    each box averages the other pixels (normalised convolution). Each defect or untrusted pixel that no box
    reaches is then interpolated from the tissue around its hole (``masks.interpolate_holes``: across a band, the
    ramp between its sides), ``radius`` 0 included; where that ramp would fold the map over (a fold's field changes
    by more than the fold is wide in the image), the hole widens into the tissue beside it until it does not
    (``_unfolded``). Without a defect or untrusted pixel the result is the plain low-pass, bit for bit, and so is
    each image (along the leading dims; ``defects`` and ``untrusted`` have the same) without one.
    """
    marked = torch.zeros(field.shape[:-3], dtype=torch.bool, device=field.device)  # per image: a defect or untrusted
    for where in (defects, untrusted):
        marked = marked if where is None else marked | where.flatten(-2).any(-1).bool()
    if not marked.any():
        return box_mean(box_mean(field, radius), radius) if radius else field
    if not marked.all():  # the images (along the leading dims) without either: the plain low-pass
        images = field.reshape(-1, *field.shape[-3:])
        marked, out = marked.reshape(-1), torch.empty(images.shape, dtype=torch.float32, device=field.device)
        out[~marked] = low_pass(images[~marked], radius)
        maps = (None if m is None else m.reshape(-1, *m.shape[-2:])[marked] for m in (defects, untrusted))
        out[marked] = low_pass(images[marked], radius, *maps)
        return out.reshape(field.shape)
    tissue = torch.ones_like(field[..., :1, :, :], dtype=torch.bool) if defects is None else \
        (defects == 0).unsqueeze(-3)
    known = tissue if untrusted is None or not untrusted.any() else tissue & ~untrusted.unsqueeze(-3)
    if radius and known is tissue:
        field = tissue_box_mean(field, tissue, radius, passes=2)
    for _ in range(2 if radius and known is not tissue else 0):  # normalised: the untrusted pixels weigh 0
        count = known.expand_as(field[..., :1, :, :]).float()  # one channel more: the windows are found once
        both = tissue_box_mean(torch.cat([field * known, count], -3), tissue, radius)
        field, count = both[..., :-1, :, :] / both[..., -1:, :, :].clamp(min=1e-12), both[..., -1:, :, :]
        known = count > 0
    return _unfolded(field, ~known)


def _unfolded(field: torch.Tensor, hole: torch.Tensor, steps: int = 12, reach: int = 32) -> torch.Tensor:
    """``field`` ``[..., 2, H, W]`` (px) interpolated in ``hole`` (bool ``[..., 1, H, W]``; ``masks.interpolate_holes``),
    each hole grown by 2 px within ``reach`` px of where the result folds over (``helpers.jacobian_determinant``
    <= 0) within 2 px of a hole, until it folds nowhere there (at most ``steps`` times): a fold's field changes by
    more than the fold's width in the image, and spread over a hole that narrow it would run backwards; the grown
    hole spreads it wide enough (as the true field, which runs through the fold's band widened to the width of the
    tissue folded in it). Each widening re-interpolates only the holes' pixels within ``HOLE_REACH`` + 1 px of
    where they grew (no other pixel's rim within reach changed: the others keep their values)."""
    shape = field.shape
    out = interpolate_holes(field, hole)
    field, hole, out = (x.reshape(-1, *x.shape[-3:]) for x in (field, hole, out))  # [N, C, H, W]
    active = hole.flatten(1).any(1).nonzero()[:, 0]  # the images still widening: one that stops never changes
    for _ in range(steps):
        fold = F.pad((jacobian_determinant(out[active]) <= 0)[:, None].float(), (0, 1, 0, 1)) > 0
        near = fold & dilated(hole[active], 2)
        some = near.flatten(1).any(1)  # only the images that fold at a hole
        active, near = active[some], near[some]
        if not len(active):
            break
        grown = hole[active] | (dilated(hole[active], 2) & dilated(near, reach))
        redo = dilated(grown & ~hole[active], HOLE_REACH + 1)  # the pixels within reach of a rim pixel that changed
        out[active] = torch.where(redo, interpolate_holes(field[active], grown, where=redo), out[active])
        hole = hole.clone()
        hole[active] = grown
    return out.reshape(shape)


def vector_vote(candidates: torch.Tensor, valid: torch.Tensor | None = None, softness: float = 1.0) -> torch.Tensor:
    """Per-pixel robust combination of K candidate fields ``[K, 2, H, W]`` (px) into one ``[2, H, W]``.

    Each candidate scores the mean distance (px) to its ``ceil((K - 1) / 2)``
    nearest valid fellow candidates at that pixel (so a majority that agrees
    scores low however far an outlier lies); the result is the softmin-weighted
    mean of the candidates with temperature ``softness`` px (-> 0: the best
    scorer; large: the plain mean). ``valid`` (bool ``[K, H, W]``) leaves
    candidates out where they saw no data; a pixel with no valid candidate gets
    their plain mean. Two candidates score the same, so the result is their mean.
    """
    k = candidates.shape[0]
    if valid is None:
        valid = torch.ones(k, *candidates.shape[-2:], dtype=torch.bool, device=candidates.device)
    distance = vector_length(candidates[:, None] - candidates[None])  # [K, K, H, W]
    usable = valid[None] & ~torch.eye(k, dtype=torch.bool, device=candidates.device)[:, :, None, None]
    nearest = distance.masked_fill(~usable, float("inf")).sort(dim=1).values[:, :max(1, k // 2)]
    finite = nearest.isfinite()
    score = nearest.masked_fill(~finite, 0).sum(1) / finite.sum(1).clamp_min(1)  # [K, H, W]
    logits = (-score / softness).masked_fill(~valid, float("-inf"))
    logits[:, ~valid.any(0)] = 0.0
    weights = torch.softmax(logits, dim=0)
    return (weights[:, None] * candidates).sum(0)


def neighbour_pairs(count: int, neighbours: int, skip: set[int] = frozenset(),
                    further: set[int] = frozenset()) -> list[tuple[int, int]]:
    """Directed pairs ``(z, j)`` between each section and its ``neighbours`` nearest usable sections on each side.

    Sections in ``skip`` (blank, missing) take no part; the neighbours of the
    others are counted among the usable sections only, so a gap is bridged.
    Sections in ``further`` are also paired, both ways, with the usable section
    one neighbour further on each side; those pairs come after the others.
    """
    usable = [z for z in range(count) if z not in skip]
    near = [(usable[i], usable[i + d]) for i in range(len(usable)) for d in range(-neighbours, neighbours + 1)
            if d != 0 and 0 <= i + d < len(usable)]
    far = neighbours + 1
    return near + [(usable[i], usable[i + d]) for i in range(len(usable)) for d in (-far, far)
                   if 0 <= i + d < len(usable) and {usable[i], usable[i + d]} & set(further)]


def _normal_matrix(count: int, sources: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                   pull: float) -> torch.Tensor:
    """The lower band ``[Z, B+1, H, W]`` of every pixel's normal matrix ``pull I + sum_e w_e (1_s - 1_t)(1_s - 1_t)^T``.

    ``band[z, k]`` is the matrix entry ``(z, z - k)``; ``B`` is the largest ``|s - t|``
    over the pairs; weights ``[E, 1, H, W]``.
    """
    width = int((sources - targets).abs().max())
    band = torch.zeros(count, width + 1, *weights.shape[-2:], dtype=weights.dtype, device=weights.device)
    band[:, 0] = pull
    for e, (s, t) in enumerate(zip(sources.tolist(), targets.tolist())):
        band[s, 0] += weights[e, 0]
        band[t, 0] += weights[e, 0]
        band[max(s, t), abs(s - t)] -= weights[e, 0]
    return band


def _banded_cholesky_solve(band: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve every pixel's symmetric positive definite banded system at once.

    band: ``[Z, B+1, H, W]`` lower band (``_normal_matrix``); rhs: ``[Z, C, H, W]``.
    Cholesky ``A = L L^T`` then two substitutions; the loops run over sections and
    the band, each step batched over all pixels.
    """
    count, width = band.shape[0], band.shape[1] - 1
    chol = torch.zeros_like(band)  # chol[i, k] = L[i, i - k]
    for i in range(count):
        for k in range(min(i, width), 0, -1):  # L[i, j], j = i - k, from the left
            j = i - k
            total = band[i, k] - sum(chol[i, k + m] * chol[j, m] for m in range(1, min(j, width - k) + 1))
            chol[i, k] = total / chol[j, 0]
        chol[i, 0] = (band[i, 0] - sum(chol[i, k] ** 2 for k in range(1, min(i, width) + 1))).sqrt()
    y = torch.zeros_like(rhs)
    for i in range(count):  # L y = rhs
        y[i] = (rhs[i] - sum(chol[i, k, None] * y[i - k] for k in range(1, min(i, width) + 1))) / chol[i, 0, None]
    x = torch.zeros_like(rhs)
    for i in reversed(range(count)):  # L^T x = y
        x[i] = (y[i] - sum(chol[i + k, k, None] * x[i + k] for k in range(1, min(count - 1 - i, width) + 1))) \
            / chol[i, 0, None]
    return x


def pair_defects(field: torch.Tensor, source_defects, target_defects) -> torch.Tensor | None:
    """The defects of a pair in its field's grid (the target's): uint8 ``[H, W]``, the larger label of the
    target's and of the source's pulled through ``field`` ``[2, H, W]`` (px; nearest sampling). Either map
    (uint8 ``[H, W]``) may be None; None when both are."""
    maps = ([] if target_defects is None else [to_tensor(target_defects, dtype=torch.uint8)]) + \
        ([] if source_defects is None else
         [warp_labels(to_tensor(source_defects, dtype=torch.uint8)[None, None], field[None])[0, 0]])
    return torch.stack(maps).amax(0) if maps else None


def solve_stack(count: int, pairs: list[tuple[int, int]], fields: torch.Tensor, weights: torch.Tensor | None = None,
                *, pull: float, robust: float | None, rounds: int = 3, smooth: int = 0,
                detail_pull: float = math.inf, defects: torch.Tensor | None = None,
                around: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """One field per section ``[Z, 2, H, W]`` (px) from pair fields between raw sections.

    pairs: ``E`` directed pairs ``(s, t)``; fields ``[E, 2, H, W]``: pair field
    ``r`` pulling raw section s onto raw section t (``warp(raw_s, r) ~ raw_t``);
    weights ``[E, H, W]`` (or None: all 1) say how much to trust each pixel of
    each pair (0 where it saw no tissue). The unknowns ``F_z`` pull raw section z
    into a common frame; a pair asks ``F_s = compose(r, F_t)``. Each round
    linearises that around the current estimate (``F_s - F_t = warp(r, F_t)``)
    and minimises, per pixel,

        sum_e w_e |F_s - F_t - warp(r_e, F_t)|^2 + pull * sum_z |F_z|^2

    exactly (per pixel, a banded system over the sections: ``_banded_cholesky_solve``);
    ``pull`` > 0 keeps the frame at zero mean displacement and the errors bounded. With ``robust`` (px), later rounds
    re-weight each pair pixel by ``robust^2 / (robust^2 + residual^2)`` (Cauchy),
    so a pair that disagrees with the rest (a fold, a blank neighbour) stops
    pulling. Sections in no pair get the zero field.

    With ``smooth`` > 0 (px) the pair fields are split into their coarse part
    ``low_pass(r, smooth)`` and the detail ``r - low_pass(r, smooth)``; the coarse
    part is solved with ``pull``, the detail with ``detail_pull`` (module
    docstring), and the two added. ``detail_pull`` inf drops the detail (the
    pair fields are simply low-passed). ``pull`` and ``robust`` (None: off) have
    no default here: ``alignment.SolveSettings`` holds the tuned ones. A pair's pixels of weight 0 (its target saw
    no tissue there, where the network's field is garbage) and the pixels beside them (``beside_missing``) are left
    out of that low-pass (normalised, as a target's defects are: ``low_pass``'s
    ``untrusted``), and its weights are low-passed the same way: a coarse part weighs the
    share of the pixels it averages that saw tissue (weights that switched per pixel would make the solved field
    jump, and fold over, at every hole in the tissue).

    defects: uint8 ``[Z, H, W]`` (0 none, 1 crack, 2 fold), each section's defects in its raw grid, or None. A pair
    weighs 0 on the defects of either section (``pair_defects``, carried into the common frame with ``F_t`` each
    round, as the pair field is). The split then
    low-passes each section's solved field for the coarse part, not the pair fields: the whole pair fields are
    solved with ``pull``, and each section's solution is ``low_pass``-ed across all defects (no jump anywhere: the
    share of a neighbour's jump the pull gives it is spread), plus the jumps at its own defects (its defects carried
    into the common frame by its field), whole: each pair's low-pass within the tissue of the one section less that
    across all defects, averaged over the section's pairs (``_own_jumps``). So a section's coarse field jumps at its
    own defects only, by what its pairs show there, never at a neighbour's. Without defects the two orders give the
    same (the solve is the same linear map at every pixel). The detail is the pair fields' less their low-pass within the
    pair's tissue (of both sections: no jump at a defect leaks into the detail), solved with ``detail_pull``; the
    robust re-weighting compares with the whole pair field (with ``detail_pull`` inf too). Where every pair of a
    section weighs 0 (a defect, or no tissue: the pull alone would make it 0 there) or lies beside missing data
    (``beside_missing``: the network's field there reads its zeros, as in the pair fields' low-pass without defects;
    these maps and the weights are carried into the common frame each round, as the pair fields are), its coarse
    part comes from where some pair weighs away from it (``low_pass``'s ``untrusted``), so that neither is averaged
    into the tissue beside it.
    Inside its own defects each section's whole field (coarse part and detail) is then ``low_pass``'s interpolation
    from the tissue around, widened where the jump would fold the map over. A ``defects`` without any defect is
    None, bit for bit.

    around: None, or ``around(round, solution)``: the fields ``[Z, 2, H, W]`` (px) each round linearises at (warps
    the pair fields by, judges the pairs and carries the defects with) instead of ``solution``, the round before's
    (zero at round 0); the round still solves for the sections' own fields (``tasks.solve_task``: a solve of some
    sections linearised where the solve of more sections is).
    """
    if pull <= 0 or detail_pull <= 0:
        raise ValueError("pull and detail_pull must be > 0 (without a pull the common frame is undetermined)")
    if defects is not None and not defects.any():
        defects = None
    edges, (h, w) = len(pairs), fields.shape[-2:]
    sources = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=fields.device)
    targets = torch.tensor([t for _, t in pairs], dtype=torch.long, device=fields.device)
    marks = None if defects is None else \
        torch.stack([pair_defects(f, defects[s], defects[t]) for (s, t), f in zip(pairs, fields)])[:, None]
    pulls = [pull] + ([detail_pull] if smooth and math.isfinite(detail_pull) else [])
    lacking = None if weights is None or not smooth or bool((weights > 0).all()) else beside_missing(weights <= 0)
    coarse = low_pass(fields, smooth, None if marks is None else marks[:, 0], lacking)
    detail = fields - coarse if marks is None else (fields - coarse) * (marks == 0)  # none inside the pair's defects
    bands = [coarse if marks is None else fields] + ([detail] if len(pulls) > 1 else [])
    if marks is not None:  # each pair's jumps at its source's and at its target's defects: r's low-pass within
        # the one's tissue less that across every defect (0 beyond 2 smooth of them, and in a pair without a defect)
        has = (marks > 0).flatten(1).any(1)
        garbage = marks[has, 0] > 0 if lacking is None else (marks[has, 0] > 0) | lacking[has]
        across = low_pass(fields[has], smooth, untrusted=garbage)
        at_source = torch.stack([pair_defects(f, defects[s], None) for (s, _), f in zip(pairs, fields)])
        jumps = [torch.zeros_like(fields) for _ in range(2)]
        for jump, at in zip(jumps, (at_source[has], defects[targets[has]])):
            jump[has] = low_pass(fields[has], smooth, at, garbage) - across
    trusted = torch.ones(edges, 1, h, w, device=fields.device) if weights is None else weights[:, None].float()
    seen = trusted > 0  # where each pair's target saw tissue
    if lacking is not None:  # a coarse part's weight: the share of the pixels it averages that saw tissue
        trusted = box_mean(box_mean(trusted, smooth), smooth)
    solution = torch.zeros(count, 2, h, w, device=fields.device)
    base = current = trusted
    for round_ in range(rounds):
        point = solution if around is None else around(round_, solution)
        observed = [warp(band, point[targets], padding_mode="border") for band in bands]  # r_e(p + F_t(p))
        if defects is not None:  # F_t is smooth and filled everywhere (below): it carries the pairs' defects
            kept = warp_labels(marks, point[targets]) == 0
            own = warp_labels(defects[:, None], point)[:, 0]  # each section's defects in the common frame
            saw, weight, beside = seen, trusted, None
            if lacking is not None:  # carried as the pair fields are: the weights, where each target saw tissue and
                # what lies beside its missing data (left in its own grid, garbage would weigh beside the moved edge)
                weight = warp(trusted, point[targets], padding_mode="border")
                saw, beside = (warp(where.float(), point[targets], mode="nearest", padding_mode="border") > 0
                               for where in (seen, lacking[:, None]))
            base = current = weight * kept
            held = _section_sums(count, sources, targets, (saw & kept).float()) > 0  # a pair of it saw tissue there
            unheld = (_section_sums(count, sources, targets, saw.float()) > 0) & ~held  # a defect zeroed them all
            read = held if beside is None else \
                _section_sums(count, sources, targets, (saw & kept & ~beside).float()) > 0  # not beside missing data
        if round_ > 0 and robust:
            asked = sum(observed) if defects is None else observed[0]  # the whole pair field
            residual = vector_length(point[sources] - point[targets] - asked)[:, None]
            current = base * robust ** 2 / (robust ** 2 + residual ** 2)
        parts = [_solve_band(count, sources, targets, current, part, band_pull)
                 for part, band_pull in zip(observed, pulls)]
        if defects is not None:  # each section's coarse part: smooth across all defects, plus its own jumps
            smooth_part = low_pass(parts[0], smooth, untrusted=(own > 0) | ~read[:, 0])  # nor the pull's zeros
            jump = _own_jumps(count, sources, targets, current,
                              *(warp(j, point[targets], padding_mode="border") for j in jumps))
            parts[0] = smooth_part + jump
        solution = sum(parts)
        if defects is not None:  # inside its defects: from the tissue around, wide enough not to fold over
            solution = low_pass(solution, 0, own, unheld[:, 0])
    return solution


def _own_jumps(count: int, sources: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
               at_source: torch.Tensor, at_target: torch.Tensor) -> torch.Tensor:
    """``[Z, 2, H, W]`` (px): per section, the mean over its pairs (weights ``[E, 1, H, W]``) of the pairs' jumps at
    its own defects: ``at_source`` ``[E, 2, H, W]`` where it is the pair's source, ``-at_target`` where it is the
    target (``F_s - F_t = r``); 0 where its pairs weigh 0."""
    total = torch.zeros(count, *at_source.shape[1:], dtype=at_source.dtype, device=at_source.device)
    total.index_add_(0, sources, weights * at_source).index_add_(0, targets, -weights * at_target)
    return total / _section_sums(count, sources, targets, weights).clamp(min=1e-12)


def _section_sums(count: int, sources: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[Z, 1, H, W]``: per section and pixel, the sum of the pair weights ``[E, 1, H, W]`` of the pairs it is in."""
    total = torch.zeros(count, *weights.shape[1:], dtype=weights.dtype, device=weights.device)
    return total.index_add_(0, sources, weights).index_add_(0, targets, weights)


def _solve_band(count: int, sources: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                observed: torch.Tensor, pull: float) -> torch.Tensor:
    """Per pixel, the ``F`` ``[Z, 2, H, W]`` minimising ``sum_e w_e |F_s - F_t - observed_e|^2 + pull sum_z |F_z|^2``."""
    rhs = torch.zeros(count, *observed.shape[1:], dtype=observed.dtype, device=observed.device)
    rhs.index_add_(0, sources, weights * observed).index_add_(0, targets, -weights * observed)
    return _banded_cholesky_solve(_normal_matrix(count, sources, targets, weights, pull), rhs)


def chain_decay(pull: float, neighbours: int) -> float:
    """λ in (0, 1): how much of a change at one section the coarse band of ``solve_stack`` passes on to the next.

    With every pair weighing 1 in both directions (``neighbour_pairs``; a weight below 1 passes on less), the
    normal matrix is ``pull I + 2 sum_{d=1..K} L_d`` (``L_d`` the Laplacian of the pairs d sections apart, K =
    ``neighbours``), whose homogeneous solutions ``x_z = λ^z`` have ``pull / 2 + sum_d (2 - λ^d - λ^-d) = 0``;
    the root in (0, 1) (found by bisection: the sum rises with λ there) is how an edit, e.g. cutting the chain
    (``tasks.solve_margin``), fades section by section. K = 1: ``λ = 1 + p/4 - sqrt(p/2 + p²/16)``.
    """
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        rising = pull / 2 + sum(2 - middle ** d - middle ** -d for d in range(1, neighbours + 1))
        low, high = (low, middle) if rising > 0 else (middle, high)
    return (low + high) / 2
