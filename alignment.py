"""Aligning sections with a trained pyramid: one pair in overlapping chunks, and whole stacks serially.

``chunk_field`` is the one per-chunk function every aligner calls (in-process or
as a queued task). A section is cut into ``chunk`` x ``chunk`` squares, each read
with ``overlap`` px of context on every side (zeros, i.e. missing data, beyond
the section), and only each square's centre is kept, so no seam shows where
chunks meet and the result does not depend on the chunk size once ``overlap``
exceeds the network's reach.

Sections are uint8 ``[H, W]`` (0 = missing); fields follow ``helpers``:
``[2, H, W]`` pixels, pulling: ``warp(source, field)`` lands on the target.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from data import normalise
from helpers import compose, to_tensor, warp_tissue
from models import Pyramid


@torch.no_grad()
def chunk_field(model: Pyramid, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Field ``[N, 2, h, w]`` (full-resolution px) pulling ``source`` onto ``target``, both normalised ``[N, 1, h, w]``."""
    return model(source, target).full_resolution()


def _padded(section: torch.Tensor, pad: int, multiple: int) -> torch.Tensor:
    """``[1, 1, H, W]`` normalised section with ``pad`` zeros around it and its size rounded up to ``multiple``."""
    h, w = section.shape[-2:]
    bottom, right = -h % multiple, -w % multiple
    return F.pad(section, (pad, pad + right, pad, pad + bottom))


def pair_field(model: Pyramid, source, target, chunk: int = 1024, overlap: int = 128) -> torch.Tensor:
    """The field ``[2, H, W]`` (px) that pulls section ``source`` onto section ``target``.

    source, target: ``[H, W]`` uint8 (0 = missing). Each section is normalised
    once as a whole (``data.normalise``), then processed in chunks (module
    docstring). ``chunk`` and ``overlap`` are rounded up to multiples of
    ``2^(size-1)``; the model's device is used.
    """
    device = next(model.parameters()).device
    unit = 2 ** (model.config["size"] - 1)
    chunk, overlap = -(-chunk // unit) * unit, -(-overlap // unit) * unit
    h, w = source.shape[-2:]
    chunk = min(chunk, -(-max(h, w) // unit) * unit)
    src, tgt = (_padded(normalise(to_tensor(s))[0].view(1, 1, h, w).to(device), overlap, chunk)
                for s in (source, target))
    field = torch.zeros(1, 2, src.shape[-2] - 2 * overlap, src.shape[-1] - 2 * overlap, device=device)
    size = chunk + 2 * overlap
    for y in range(0, field.shape[-2], chunk):
        for x in range(0, field.shape[-1], chunk):
            window = (..., slice(y, y + size), slice(x, x + size))
            part = chunk_field(model, src[window], tgt[window])
            field[..., y:y + chunk, x:x + chunk] = part[..., overlap:overlap + chunk, overlap:overlap + chunk]
    return field[0, :, :h, :w].cpu()


def apply_field(section, field: torch.Tensor) -> np.ndarray:
    """``helpers.warp_tissue`` of a uint8 ``[H, W]`` section, as uint8 (0 where it reads missing data)."""
    out = warp_tissue(to_tensor(section)[None, None], field[None])[0, 0]
    return out.round().clamp(0, 255).to(torch.uint8).numpy()


def align_serial(model: Pyramid, sections, before: tuple | None = None, to_raw_neighbour: bool = False,
                 chunk: int = 1024, overlap: int = 128) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Align sections one after another; yields ``(aligned uint8 [H, W], field [2, H, W])`` per section.

    sections: an iterable of uint8 ``[H, W]``. The first section is the fixed
    reference (field zero) unless ``before = (raw, aligned, field)`` describes the
    section before the first (when resuming). Each section is pulled onto the
    aligned section before it; with ``to_raw_neighbour`` it is aligned to the raw
    section before it instead and the fields are chained with ``helpers.compose``.
    """
    previous_raw, previous_aligned, previous_field = before or (None, None, None)
    for section in sections:
        if previous_aligned is None:
            field = torch.zeros(2, *section.shape[-2:])
        elif to_raw_neighbour:
            pair = pair_field(model, section, previous_raw, chunk, overlap)
            field = compose(pair[None], previous_field[None])[0]
        else:
            field = pair_field(model, section, previous_aligned, chunk, overlap)
        aligned = apply_field(section, field)
        yield aligned, field
        previous_raw, previous_aligned, previous_field = section, aligned, field
