"""Aligning sections with a trained pyramid: one pair in overlapping chunks, and whole stacks (serially,
with vector voting, or by the stack-wide solve of ``solve.py``).

``chunk_field`` is the one per-chunk function every aligner calls (in-process or
as a queued task). A section is cut into ``chunk`` x ``chunk`` squares, each read
with ``overlap`` px of context on every side where the section has it, and only
each square's centre is kept, so no seam shows where chunks meet and the result
does not depend on the chunk size once ``overlap`` exceeds the network's reach.

Sections are uint8 ``[H, W]`` (0 = missing); fields follow ``helpers``:
``[2, H, W]`` pixels, pulling: ``warp(source, field)`` lands on the target.
"""
from __future__ import annotations

import sys
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from data import normalise, slice_std
from helpers import compose, in_frame_of, to_tensor, warp, warp_tissue
from models import Pyramid
from shifts import rigid_search
from solve import low_pass, neighbour_pairs, solve_stack, vector_vote

TRUNC = 2  # default pyramid level the network stops at (pair_field); measured in the README
DETAIL_PULL = 5.0  # default pull on the pair fields' detail (solve.solve_stack); measured in the README


def for_inference(model: Pyramid) -> Pyramid:
    """``model`` in eval mode with channels-last weights (in place), as every aligner loads it.

    Its convolutions then run ~1.6x faster on the CPU (a 512 px pair at ``trunc``
    2: 0.086 -> 0.052 s); the field is the same to ~1e-5 px.
    """
    return model.eval().to(memory_format=torch.channels_last)


@torch.no_grad()
def chunk_field(model: Pyramid, source: torch.Tensor, target: torch.Tensor, trunc: int) -> torch.Tensor:
    """Field ``[N, 2, h, w]`` (full-resolution px) pulling ``source`` onto ``target``, both normalised ``[N, 1, h, w]``.

    trunc: the pyramid stops at this level (``Pyramid.forward``) and its field is upsampled.
    """
    return model(source, target, trunc).full_resolution()


def stride(model: Pyramid) -> int:
    """The network's coarsest stride ``2^(size-1)`` px: what it reads has sides that are multiples of it."""
    return 2 ** (model.config["size"] - 1)


def _window(start: int, length: int, chunk: int, overlap: int) -> tuple[int, int]:
    """The span read for the chunk at ``start``: ``overlap`` px of context each side, clipped to ``[0, length)``."""
    return max(start - overlap, 0), min(start + chunk + overlap, length)


def pair_field(model: Pyramid, source, target, chunk: int = 1024, overlap: int = 128, smooth: int = 0,
               prealign: int | None = None, trunc: int = TRUNC) -> torch.Tensor:
    """The field ``[2, H, W]`` (px) that pulls section ``source`` onto section ``target``.

    source, target: ``[H, W]`` uint8 (0 = missing). Each section is normalised
    once as a whole (``data.normalise``). Unless ``prealign`` is 0 the source is
    first moved by the shift and rotation that best match it onto the target
    (``_prealignment``: up to ``prealign`` px each way, None: a quarter of the
    section): the network recovers ~15 px between real neighbours, and sections
    can lie further apart; the field is composed with it. Then the pair is
    processed in chunks (module docstring): each chunk is read with ``overlap``
    px of context on every side that lies within the section, so a section that
    fits in one chunk is one pass of the network over exactly its own pixels.
    ``chunk`` and ``overlap`` are rounded up to multiples of ``stride(model)`` (and
    the section's size, with zeros); the model's device is used. ``smooth`` > 0
    low-passes the field (``solve.low_pass``): misalignment is smooth, and
    between real neighbours the network's fine detail is mostly tissue change
    (measured in the README). ``trunc`` > 0 stops the network ``trunc`` levels
    short of full resolution (``chunk_field``): the finest levels cost most of
    its time and add little the low-pass and the solve keep (README: ``--trunc``).
    """
    device = next(model.parameters()).device
    unit = stride(model)
    chunk, overlap = -(-chunk // unit) * unit, -(-overlap // unit) * unit
    h, w = source.shape[-2:]
    height, width = -(-h // unit) * unit, -(-w // unit) * unit
    src, tgt = (normalise(to_tensor(s))[0].view(1, 1, h, w).to(device) for s in (source, target))
    rigid = _prealignment(src[0, 0], tgt[0, 0], prealign)
    src = warp(src, rigid)
    src, tgt = (F.pad(x, (0, width - w, 0, height - h)) for x in (src, tgt))
    field = torch.zeros(1, 2, height, width, device=device)
    for y in range(0, height, chunk):
        for x in range(0, width, chunk):
            (y0, y1), (x0, x1) = _window(y, height, chunk, overlap), _window(x, width, chunk, overlap)
            part = chunk_field(model, src[..., y0:y1, x0:x1], tgt[..., y0:y1, x0:x1], trunc)
            field[..., y:y + chunk, x:x + chunk] = part[..., y - y0:y - y0 + chunk, x - x0:x - x0 + chunk]
    return low_pass(compose(rigid, field[..., :h, :w])[0].cpu(), smooth)


def _prealignment(source: torch.Tensor, target: torch.Tensor, reach: int | None) -> torch.Tensor:
    """``[1, 2, H, W]`` (px): the rigid field of ``shifts.rigid_search`` that pulls normalised ``[H, W]`` source onto
    target, its shift up to ``reach`` px each way (None: a quarter of the section; 0: the zero field). Where the
    match is poor (``shifts.RigidMatch``: no match stands out, e.g. a foreign section; or too little tissue, and
    then the field is zero), its one-line warning goes to stderr."""
    if reach == 0:
        return torch.zeros(1, 2, *source.shape, device=source.device)
    match = rigid_search(source[None].cpu(), target[None].cpu(), reach)
    if match.poor[0]:
        print(match.warning(0), file=sys.stderr)
    return match.field(*source.shape).to(source.device)


def apply_field(sections, fields) -> np.ndarray:
    """``helpers.warp_tissue`` of uint8 sections ``[..., H, W]`` by fields ``[..., 2, H, W]`` (px; the same
    leading shape: one section, or a stack ``[Z, H, W]`` with ``[Z, 2, H, W]``), as uint8 (0 where a pixel
    reads missing data)."""
    s, f = to_tensor(sections), to_tensor(fields)
    out = warp_tissue(s.reshape(-1, 1, *s.shape[-2:]), f.reshape(-1, 2, *f.shape[-2:]))
    return out.round().clamp(0, 255).to(torch.uint8).reshape(s.shape).numpy()


def is_blank(section, min_std: float = 2.0) -> bool:
    """Whether a uint8 ``[H, W]`` section has too little tissue contrast to align (std below ``min_std`` grey levels)."""
    return float(slice_std(to_tensor(section))) < min_std


def align_serial(model: Pyramid, sections, before: list | None = None, to_raw_neighbour: bool = False,
                 vote: int = 1, chunk: int = 1024, overlap: int = 128, softness: float = 1.0,
                 smooth: int = 0, prealign: int | None = None,
                 trunc: int = TRUNC) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Align sections one after another; yields ``(aligned uint8 [H, W], field [2, H, W])`` per section.

    sections: an iterable of uint8 ``[H, W]``. The first section is the fixed
    reference (field zero) unless ``before``, a list of ``(raw, aligned, field)``
    of the sections before the first (oldest first), says where the stack stands
    (when resuming). Each section is pulled onto the aligned section before it;
    with ``vote`` K > 1 onto each of the K aligned sections before it, the K
    fields combined by ``solve.vector_vote``; with ``to_raw_neighbour`` it is
    aligned to the raw section before it and the fields are chained with
    ``helpers.compose``. Blank sections (``is_blank``) come out blank with the
    zero field and are not aligned to. ``chunk``, ``overlap``, ``smooth``, ``prealign``, ``trunc``:
    ``pair_field``'s.
    """
    history = list(before or [])[-vote:]  # (raw, aligned, field) of the last usable sections
    for section in sections:
        shape = section.shape[-2:]
        if is_blank(section):
            yield np.zeros(shape, np.uint8), torch.zeros(2, *shape)
            continue
        if not history:
            field = torch.zeros(2, *shape)
        elif to_raw_neighbour:
            previous_raw, _, previous_field = history[-1]
            pair = pair_field(model, section, previous_raw, chunk, overlap, smooth, prealign, trunc)
            field = compose(pair[None], previous_field[None])[0]
        else:
            targets = [aligned for _, aligned, _ in history[-vote:]]
            candidates = torch.stack([pair_field(model, section, t, chunk, overlap, smooth, prealign, trunc)
                                      for t in targets])
            valid = torch.from_numpy(np.stack(targets) > 0)
            field = vector_vote(candidates, valid, softness) if len(targets) > 1 else candidates[0]
        aligned = apply_field(section, field)
        yield aligned, field
        history = (history + [(section, aligned, field)])[-max(vote, 1):]


def align_solved(model: Pyramid, sections, neighbours: int = 1, pull: float = 0.03, robust: float | None = 4.0,
                 chunk: int = 1024, overlap: int = 128, smooth: int = 0, detail_pull: float = DETAIL_PULL,
                 prealign: int | None = None, trunc: int = TRUNC,
                 progress=None) -> tuple[np.ndarray, torch.Tensor, list[int]]:
    """Align a whole stack by the stack-wide solve (``solve.solve_stack``).

    sections: uint8 ``[Z, H, W]``. Every usable section is paired with its
    ``neighbours`` nearest usable sections on each side (raw to raw, both
    directions), the pair fields are solved jointly for one field per section,
    and the result is expressed in the frame of the first usable section (as a
    serial alignment keeps it). Returns ``(aligned uint8 [Z, H, W], fields
    [Z, 2, H, W] px, skipped)``, ``skipped`` the blank sections (left blank, zero
    field). ``chunk``, ``overlap``, ``prealign``, ``trunc``: ``pair_field``'s; ``smooth``, ``detail_pull``:
    ``solve.solve_stack``'s; ``progress(pairs)`` may wrap the iteration over pairs (e.g. tqdm).
    """
    sections = np.asarray(sections)
    count = len(sections)
    skipped = [z for z in range(count) if is_blank(sections[z])]
    pairs = neighbour_pairs(count, neighbours, set(skipped)) if count - len(skipped) > 1 else []
    pair_fields = torch.stack([pair_field(model, sections[s], sections[t], chunk, overlap, 0, prealign, trunc)
                               for s, t in (progress or iter)(pairs)]) if pairs else None
    aligned, fields = solve_pairs(sections, pairs, pair_fields, pull, robust, skipped, smooth, detail_pull)
    return aligned, fields, skipped


def solve_pairs(sections, pairs: list[tuple[int, int]], pair_fields: torch.Tensor | None, pull: float = 0.03,
                robust: float | None = 4.0, skipped=(), smooth: int = 0,
                detail_pull: float = DETAIL_PULL) -> tuple[np.ndarray, torch.Tensor]:
    """The second half of ``align_solved``: from pair fields to the aligned stack.

    sections: uint8 ``[Z, H, W]``; ``pair_fields`` ``[E, 2, H, W]`` (px): field e
    pulls section ``pairs[e][0]`` onto ``pairs[e][1]`` (None when there are no
    pairs); ``skipped``: blank sections; ``pull``, ``robust``, ``smooth``,
    ``detail_pull``: ``solve.solve_stack``'s.
    Each pair weighs where its target shows tissue. Returns ``(aligned uint8
    [Z, H, W], fields [Z, 2, H, W] px)`` in the frame of the first usable section;
    skipped sections stay blank with the zero field.
    """
    count, shape = len(sections), sections.shape[-2:]
    usable = [z for z in range(count) if z not in skipped]
    fields = torch.zeros(count, 2, *shape)
    if pairs:
        weights = torch.from_numpy(sections[[t for _, t in pairs]] > 0).float()  # the target saw tissue
        solved = solve_stack(count, pairs, pair_fields, weights, pull, robust, smooth=smooth, detail_pull=detail_pull)
        fields[usable] = in_frame_of(solved[usable], reference=0)
    aligned = np.stack([apply_field(s, f) if z in usable else np.zeros(shape, np.uint8)
                        for z, (s, f) in enumerate(zip(sections, fields))])
    return aligned, fields
