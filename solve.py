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

Everything is per pixel and batched over the whole section; the only loops are
over a handful of solver iterations.
"""
from __future__ import annotations

import torch

from helpers import warp


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
    distance = (candidates[:, None] - candidates[None]).norm(dim=2)  # [K, K, H, W]
    usable = valid[None] & ~torch.eye(k, dtype=torch.bool, device=candidates.device)[:, :, None, None]
    nearest = distance.masked_fill(~usable, float("inf")).sort(dim=1).values[:, :max(1, k // 2)]
    finite = nearest.isfinite()
    score = nearest.masked_fill(~finite, 0).sum(1) / finite.sum(1).clamp_min(1)  # [K, H, W]
    logits = (-score / softness).masked_fill(~valid, float("-inf"))
    logits[:, ~valid.any(0)] = 0.0
    weights = torch.softmax(logits, dim=0)
    return (weights[:, None] * candidates).sum(0)


def neighbour_pairs(count: int, neighbours: int, skip: set[int] = frozenset()) -> list[tuple[int, int]]:
    """Directed pairs ``(z, j)`` between each section and its ``neighbours`` nearest usable sections on each side.

    Sections in ``skip`` (blank, missing) take no part; the neighbours of the
    others are counted among the usable sections only, so a gap is bridged.
    """
    usable = [z for z in range(count) if z not in skip]
    return [(usable[i], usable[i + d]) for i in range(len(usable)) for d in range(-neighbours, neighbours + 1)
            if d != 0 and 0 <= i + d < len(usable)]


def _graph_apply(fields: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                 pull: float) -> torch.Tensor:
    """The normal-equation operator ``pull F + sum_e w_e (F_s - F_t)`` at ``s`` and ``-`` it at ``t``."""
    flow = weights * (fields[sources] - fields[targets])
    return pull * fields + torch.zeros_like(fields).index_add_(0, sources, flow).index_add_(0, targets, -flow)


def _conjugate_gradient(rhs: torch.Tensor, start: torch.Tensor, apply, diagonal: torch.Tensor,
                        iterations: int, tolerance: float) -> torch.Tensor:
    """Jacobi-preconditioned CG on independent per-pixel, per-channel systems (sums over dim 0 only)."""
    x = start.clone()
    r = rhs - apply(x)
    z = r / diagonal
    p = z.clone()
    rz = (r * z).sum(0)
    for _ in range(iterations):
        if float(r.abs().max()) < tolerance:
            break
        ap = apply(p)
        alpha = rz / (p * ap).sum(0).clamp_min(1e-20)
        x += alpha * p
        r -= alpha * ap
        z = r / diagonal
        rz_new = (r * z).sum(0)
        p = z + (rz_new / rz.clamp_min(1e-20)) * p
        rz = rz_new
    return x


def solve_stack(count: int, pairs: list[tuple[int, int]], fields: torch.Tensor, weights: torch.Tensor | None = None,
                pull: float = 1.0, robust: float | None = 4.0, rounds: int = 3, iterations: int = 200,
                tolerance: float = 1e-3) -> torch.Tensor:
    """One field per section ``[Z, 2, H, W]`` (px) from pair fields between raw sections.

    pairs: ``E`` directed pairs ``(s, t)``; fields ``[E, 2, H, W]``: pair field
    ``r`` pulling raw section s onto raw section t (``warp(raw_s, r) ~ raw_t``);
    weights ``[E, H, W]`` (or None: all 1) say how much to trust each pixel of
    each pair (0 where it saw no tissue). The unknowns ``F_z`` pull raw section z
    into a common frame; a pair asks ``F_s = compose(r, F_t)``. Each round
    linearises that around the current estimate (``F_s - F_t = warp(r, F_t)``)
    and minimises, per pixel,

        sum_e w_e |F_s - F_t - warp(r_e, F_t)|^2 + pull * sum_z |F_z|^2

    by conjugate gradients; ``pull`` > 0 keeps the frame at zero mean
    displacement and the errors bounded. With ``robust`` (px), later rounds
    re-weight each pair pixel by ``robust^2 / (robust^2 + residual^2)`` (Cauchy),
    so a pair that disagrees with the rest (a fold, a blank neighbour) stops
    pulling. Sections in no pair get the zero field.
    """
    if pull <= 0:
        raise ValueError("pull must be > 0 (without it the common frame is undetermined)")
    edges, (h, w) = len(pairs), fields.shape[-2:]
    sources = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=fields.device)
    targets = torch.tensor([t for _, t in pairs], dtype=torch.long, device=fields.device)
    base = torch.ones(edges, 1, h, w, device=fields.device) if weights is None else weights[:, None].float()
    solution = torch.zeros(count, 2, h, w, device=fields.device)
    current = base
    for round_ in range(rounds):
        observed = warp(fields, solution[targets], padding_mode="border")  # r_e(p + F_t(p))
        if round_ > 0 and robust:
            residual = (solution[sources] - solution[targets] - observed).norm(dim=1, keepdim=True)
            current = base * robust ** 2 / (robust ** 2 + residual ** 2)
        rhs = torch.zeros_like(solution).index_add_(0, sources, current * observed)
        rhs.index_add_(0, targets, -current * observed)
        degree = torch.zeros(count, 1, h, w, device=fields.device)
        degree.index_add_(0, sources, current).index_add_(0, targets, current)
        solution = _conjugate_gradient(rhs, solution, lambda f: _graph_apply(f, sources, targets, current, pull),
                                       pull + degree, iterations, tolerance)
    return solution
