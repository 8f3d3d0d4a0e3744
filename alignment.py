"""Aligning sections with a trained pyramid: one pair in overlapping chunks, and whole stacks (serially,
with vector voting, or by the stack-wide solve of ``solve.py``).

``chunk_field`` is the one per-chunk function every aligner calls (in-process or
as a queued task). A section is cut into ``chunk`` x ``chunk`` squares, each read
with ``overlap`` px of context on every side where the section has it, and only
each square's centre is kept, so no seam shows where chunks meet and the result
does not depend on the chunk size once ``overlap`` exceeds the network's reach
(its default, ``Pyramid.reach``: chunked fields then move ~0.01 px at the 99th
percentile on real tissue).

Sections are uint8 ``[H, W]`` (0 = missing); fields follow ``helpers``:
``[2, H, W]`` pixels, pulling: ``warp(source, field)`` lands on the target.

Every alignment setting and its default is defined once, in ``PairSettings``
(how one pair field is computed) and ``SolveSettings`` (how the stack-wide
solve combines pair fields); ``add_flags`` gives a parser their flags
(``align.py``, the benches) and ``settings_from_args`` reads them back.
"""
from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
import itertools
import math
import sys
import warnings
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from helpers import (WHOLE, UserError, compose, finite_float, in_frame_of, missing_data, normalise, number,
                     to_tensor, warp, warp_labels, warp_tissue)
from models import Pyramid
from pieces import GRID, piece_field
from shifts import MIN_TISSUE, best_shifts, match_motion, match_r, pearson, rigid_search
from solve import beside_missing, low_pass, neighbour_pairs, pair_defects, solve_stack, vector_vote


def _setting(default, kind, text: str, least: float = 0, strict: bool = False):
    """A settings field: its default, the ``argparse`` type and the help text of its flag (``add_flags``), and the
    least value it takes (``strict``: only values above it; ``_check_settings``)."""
    return dataclasses.field(default=default, metadata={"type": kind, "help": text, "least": least, "strict": strict})


def _check_settings(settings) -> None:
    """A one-line ``UserError`` naming the flag of the first field of ``settings`` below its least value."""
    for setting in dataclasses.fields(settings):
        value, least, strict = getattr(settings, setting.name), setting.metadata["least"], setting.metadata["strict"]
        if value is not None and (value <= least if strict else value < least):
            raise UserError(f"--{setting.name} {value:g}: must be {'>' if strict else '>='} {least:g}")


@dataclasses.dataclass(frozen=True)
class PairSettings:
    """How ``pair_field`` computes the field between two sections; each is the ``align.py`` flag of its name."""

    chunk: int = _setting(1024, int, "chunk size in px fed to the network (a multiple of its coarsest stride, "
                                     "2^(levels-1))", least=1)
    overlap: int | None = _setting(None, int, "context in px around each chunk, cropped away (default: the "
                                              "network's reach, Pyramid.reach, up to its grid: 192 px for "
                                              "pt/real_tissue.pt)")
    prealign: int = _setting(32, int, "before the network, move each source by the whole-pixel shift (found by "
                                      "cross-correlation, up to this many px) that best matches its target, or by "
                                      "the shift and turn of a wide search (a quarter of the section, 0.06 rad) "
                                      "where that matches clearly better (0 = neither)")
    # measured in bench/RESULTS.md, as detail_pull's
    trunc: int = _setting(2, int, "stop the network this many levels short of full resolution and upsample its field "
                                  "(fewer levels run: faster)")
    smooth: int = _setting(96, int, "low-pass every pair field with a box of this radius in px, twice (0 = off: only "
                                    "for sections that hardly change, as the network follows every change between "
                                    "neighbours)")
    refine: int = _setting(0, int, "a second network pass: the source moved by the first pass's field, low-passed "
                                   "with a box of this radius in px (twice), and the network's field on what remains "
                                   "added (0 = one pass)")
    pieces: int = _setting(12, int, "with defect maps: where they cut a section's tissue into pieces whose own "
                                    "shifts differ by more than this many px, the network runs on the source placed "
                                    "piece by piece, if its field then matches clearly better (0 = never)")

    def __post_init__(self):
        _check_settings(self)


@dataclasses.dataclass(frozen=True)
class SolveSettings:
    """How ``align_solved`` / ``solve_pairs`` combine pair fields (``solve.solve_stack``); each is the ``align.py``
    flag of its name. ``PairSettings.smooth`` is where the solve splits the fields into coarse part and detail."""

    neighbours: int = _setting(1, int, "--solve: neighbours on each side of a section", least=1)
    pull: float = _setting(0.03, finite_float,
                           "--solve: weight of the pull toward zero displacement (a pair pixel weighs 1)", strict=True)
    robust: float = _setting(4.0, finite_float, "--solve: px scale of the robust re-weighting of disagreeing pairs "
                                                "(0 = plain least squares)")
    # measured in bench/RESULTS.md, as trunc's
    detail_pull: float = _setting(5.0, number, "--solve --smooth R: pull on the detail the low-pass removes, solved "
                                               "apart from the coarse part (inf = drop the detail)", strict=True)

    def __post_init__(self):
        _check_settings(self)


def add_flags(parser: argparse.ArgumentParser, several=(), without=()) -> None:
    """Add a flag ``--NAME`` for every field of ``PairSettings`` and ``SolveSettings`` to ``parser``, its default the
    field's (shown once in the help); ``several``: names whose flag takes one or more values (a list, the default
    one item), ``without``: names left out. ``settings_from_args`` reads them back."""
    for setting in dataclasses.fields(PairSettings) + dataclasses.fields(SolveSettings):
        if setting.name in without:
            continue
        many = setting.name in several
        parser.add_argument(f"--{setting.name}", type=setting.metadata["type"], nargs="+" if many else None,
                            default=[setting.default] if many else setting.default,
                            help=setting.metadata["help"] + (" (several: each is tried)" if many else "")
                            + ("" if setting.default is None else " (default: %(default)s)"))  # None: its help says


def settings_from_args(args: argparse.Namespace, **values) -> tuple[PairSettings, SolveSettings]:
    """``(PairSettings, SolveSettings)`` from the flags ``add_flags`` added to ``args``: ``values`` (e.g. one of a
    flag's several values) before them, the defaults for those left out."""
    given = {**vars(args), **values}
    return tuple(kind(**{s.name: given[s.name] for s in dataclasses.fields(kind) if s.name in given})
                 for kind in (PairSettings, SolveSettings))


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


def chunked_field(model: Pyramid, source: torch.Tensor, target: torch.Tensor, chunk: int, overlap: int,
                  trunc: int) -> torch.Tensor:
    """``chunk_field`` over a whole pair ``[1, 1, H, W]`` (normalised; sides multiples of ``stride(model)``), square
    by square of side ``chunk`` px, each read with ``overlap`` px of context where the pair has it: ``[1, 2, H, W]``."""
    height, width = source.shape[-2:]
    field = torch.zeros(1, 2, height, width, device=source.device)
    for y in range(0, height, chunk):
        for x in range(0, width, chunk):
            (y0, y1), (x0, x1) = _window(y, height, chunk, overlap), _window(x, width, chunk, overlap)
            part = chunk_field(model, source[..., y0:y1, x0:x1], target[..., y0:y1, x0:x1], trunc)
            field[..., y:y + chunk, x:x + chunk] = part[..., y - y0:y - y0 + chunk, x - x0:x - x0 + chunk]
    return field


def stride(model: Pyramid) -> int:
    """The network's coarsest stride ``2^(size-1)`` px: what it reads has sides that are multiples of it."""
    return 2 ** (model.config["size"] - 1)


def check_fits(pair: PairSettings, model: Pyramid, archive) -> None:
    """A one-line ``UserError`` unless ``pair``'s ``trunc`` is below ``model``'s levels and its ``chunk`` a multiple of
    its coarsest stride (``archive``: the network's path, for the message)."""
    if pair.trunc >= model.size:
        raise UserError(f"--trunc {pair.trunc} must be below the {model.size} levels of {archive}")
    if pair.chunk % stride(model):
        raise UserError(f"--chunk {pair.chunk} must be a multiple of {stride(model)} px, the coarsest stride of the "
                        f"{model.size} levels of {archive}")


def on_grid(px: int, model: Pyramid) -> int:
    """``px`` rounded up to a multiple of the network's coarsest stride: sizes and offsets on its pooling grid."""
    return -(-px // stride(model)) * stride(model)


def with_context(settings: PairSettings, model: Pyramid) -> PairSettings:
    """``settings`` with its ``overlap`` given: as set, or where None the network's reach (``Pyramid.reach``) rounded
    up to its stride, so a chunk's field is the whole section's there (to ~0.01 px) whatever the chunk size."""
    if settings.overlap is not None:
        return settings
    return dataclasses.replace(settings, overlap=on_grid(model.reach(), model))


def pair_context(settings: PairSettings, model: Pyramid) -> int:
    """px of a pair around a part of it that ``pair_field`` reads to give the whole pair's field on that part (up to
    what lies past the network's reach), on ``model``'s grid: ``settings.overlap`` (set: ``with_context``) and the
    whole-section shift's reach; with ``refine``, the first pass's low-pass (twice its radius) and reach again."""
    second_pass = settings.overlap + 2 * settings.refine if settings.refine else 0
    return on_grid(settings.overlap + settings.prealign + second_pass, model)


def _window(start: int, length: int, chunk: int, overlap: int) -> tuple[int, int]:
    """The span read for the chunk at ``start``: ``overlap`` px of context each side, clipped to ``[0, length)``."""
    return max(start - overlap, 0), min(start + chunk + overlap, length)


THUMBNAIL = 2048  # px: the rigid pre-alignment runs on sections averaged down to no less than this (thumbnail_factor)
# _prealignment's gate: the wide rigid search runs only where the whole-pixel shift is in doubt (at its reach's edge,
# on too little tissue, or as below; from the raw neighbour pairs of the demo, ISBI, SNEMI3D and the +-40 px phantom):
DOUBT_R = 0.17  # its Pearson r (shifts.match_r) is under this (true neighbours: demo >= 0.21, SNEMI3D >= 0.32, ISBI
# >= 0.14, and >= 0.18 where no wide match stands out; other tissue, or 20 sections apart, <= 0.16: a poor wide
# match there warns),
DOUBT_DEPARTURE = 8.0  # px: or a rigid match would still move it by more (shifts.match_motion; true neighbours
# 0-14 px, every pair whose shift the search replaced >= 9 px). The search replaces the shift only where its field
# departs from the shift by over
WIDE_DEPARTURE = 12.0  # px (median over the section: beyond what the network recovers; demo, ISBI, SNEMI3D pairs <= 10)
WIDE_MARGIN = 0.02  # and it matches better by this much Pearson r (shifts.match_r)


NAMED: contextvars.ContextVar[str | None] = contextvars.ContextVar("NAMED", default=None)  # ``naming``'s


@contextlib.contextmanager
def naming(source: int, target: int | None = None) -> Iterator[None]:
    """Within it, each ``CondensedWarning`` is about section ``source`` (its z) aligned onto ``target`` (or onto the
    sections before it, for None): ``warnings_condensed`` lists them as ``S->T`` (or ``S``)."""
    token = NAMED.set(str(source) if target is None else f"{source}->{target}")
    try:
        yield
    finally:
        NAMED.reset(token)


UNMATCHED: contextvars.ContextVar[list | None] = contextvars.ContextVar("UNMATCHED", default=None)  # ``matching``'s


@contextlib.contextmanager
def matching() -> Iterator[list]:
    """Within it, each pair pre-aligned (``pair_prealignment``) whose sections both show tissue but match nowhere
    appends True to the list it gives, each other pair False: its whole-pixel shift matches weakly (Pearson r under
    ``DOUBT_R``, ``_prealignment``), and the network's field on the two thumbnails leaves them correlating by less
    than ``MATCHED_R``. ``align_serial`` and ``solved_pairs`` read it to align past a section of noise or of other
    tissue (a pair that matches with the source's contrast inverted is matched so: ``pair_prealignment``). A pair
    not pre-aligned (``prealign`` 0) appends nothing."""
    found: list = []
    token = UNMATCHED.set(found)
    try:
        yield found
    finally:
        UNMATCHED.reset(token)


class CondensedWarning(UserWarning):
    """A warning that may come once per section or pair: ``warnings_condensed`` shows the first of its kind in one
    line, with how many there were (``counted``, e.g. ``"section pair{s} matched poorly"``) and the sections they
    were about (``where``: given, or ``naming``'s where it was raised; None: not named)."""
    counted = "time{s}"

    def __init__(self, message: str, where: str | None = None):
        super().__init__(message)
        self.where = NAMED.get() if where is None else where


class PoorMatchWarning(CondensedWarning):
    """A pair's whole-section match is poor (``shifts.RigidMatch.poor``): its message is one line, why."""
    counted = "section pair{s} matched poorly"


class InvertedWarning(CondensedWarning):
    """A pair matches only with the source's contrast inverted (``pair_prealignment``)."""
    counted = "section pair{s} matched inverted"


class PassedOverWarning(CondensedWarning):
    """A section matches the sections beside it nowhere (``align_serial``, ``passed_over``): moved as the one before."""
    counted = "section{s} passed over"


def warn_passed_over(z: int) -> None:
    """The ``PassedOverWarning`` of section ``z``."""
    warnings.warn(PassedOverWarning("warning: a section matches its neighbours nowhere (noise, a damaged section, "
                                    "other tissue?): it is moved as the section before it, and the sections beside "
                                    f"it are aligned past it (serially, up to {PASS_OVER} in a row)", str(z)))


class AllDefectWarning(CondensedWarning):
    """A section's defect map marks every pixel a crack or fold: nothing of it is aligned by its own tissue."""
    counted = "section{s} all defect"


def warn_all_defect(z: int) -> None:
    """The ``AllDefectWarning`` of section ``z``, whose defect map marks every pixel."""
    warnings.warn(AllDefectWarning(f"warning: --defects marks every pixel of section {z} a crack or fold: it is "
                                   "aligned by no tissue of its own (the solve gives it the pull's zero field); is it "
                                   "the right layer?", str(z)))


@contextlib.contextmanager
def warnings_condensed(stream=None) -> Iterator[None]:
    """Within it, every ``CondensedWarning`` is kept, not shown (other warnings are shown on leaving); on leaving,
    even by an error or an interrupt, one line per kind on ``stream`` (default stderr) gives the first one's message
    and how many there were of that kind, however many, and the sections they were about (the first 12). One about
    sections already named for its kind is a repeat (two tasks that saw one section, the pairs of one section's
    vote), not counted again."""
    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CondensedWarning)
            yield
    finally:
        kinds: dict[type, list] = {}
        for found in caught:
            if issubclass(found.category, CondensedWarning):
                same = kinds.setdefault(found.category, [])
                where = found.message.where
                if where is None or all(where != w.message.where for w in same):
                    same.append(found)
            else:
                warnings.showwarning(found.message, found.category, found.filename, found.lineno)
        for kind, found in kinds.items():
            named = [w.message.where for w in found if w.message.where is not None]
            listed = f": {' '.join(named[:12])}{' ...' if len(named) > 12 else ''}" if named else ""
            print(f"{found[0].message} [{len(found)} {kind.counted.format(s='s' if len(found) > 1 else '')}{listed}]",
                  file=stream or sys.stderr)


def pair_field(model: Pyramid, source, target, settings: PairSettings = PairSettings(),
               defects: tuple | None = None, stats: tuple | None = None,
               rigid: torch.Tensor | None = None) -> torch.Tensor:
    """The field ``[2, H, W]`` (px) that pulls section ``source`` onto section ``target``.

    source, target: ``[H, W]`` uint8 (0 = missing). Each section is normalised
    once as a whole (``helpers.normalise``) by ``stats``, ``((mean, std) of source,
    of target)`` (``section_stats``), or by its own when None. Unless
    ``settings.prealign`` is 0 the source is first moved by a rigid match onto the
    target (``prealignment`` on the two sections' thumbnails: the whole-pixel shift
    up to ``prealign`` px each way, or a wide search's shift and turn where it
    matches clearly better): the network recovers ~15 px between real neighbours,
    and sections can lie further apart, or turned; the field is composed with it.
    Where that match is a wide one (a shift and turn) and the source so moved
    shows no tissue (its missing data, or beyond its edge: strips up to 80 px
    deep after the moves of a +-40 px stack), the network sees nothing to match
    and the field is the match's alone; a whole-pixel shift keeps the network's
    field there (strips within 32 px of the edge, where the network's context
    also gives the turn the shift misses: bench/RESULTS.md). With ``defects``
    that cut a section's tissue apart, the match may instead place the source
    piece by piece (``pair_prealignment``: beside a wide fold the two sides lie
    further apart than the network reaches), its field composed the same way.
    ``rigid``: that match's ``rigid_field`` over what is given instead (a part of a
    section gets its whole section's: ``tasks.pair_task``). Then the pair is
    processed in chunks (module docstring): each chunk is read with ``overlap``
    px of context on every side that lies within the section, so a section that
    fits in one chunk is one pass of the network over exactly its own pixels.
    ``chunk`` and ``overlap`` are rounded up to multiples of ``stride(model)`` (and
    the section's size, with zeros); the model's device is used. ``smooth`` > 0
    low-passes the field (``solve.low_pass``; without ``defects`` only the part
    added to a wide match, whose shift and turn a low-pass would bend toward the
    section's edges: they are exact), as misalignment is smooth, and
    between real neighbours the network's fine detail is mostly tissue change
    (measured in bench/RESULTS.md); where the target holds missing data
    (``helpers.missing_data``), and beside it (``solve.beside_missing``), the
    field is left out of it, as on the target's defects (below). ``trunc`` > 0
    stops the network ``trunc`` levels short of full resolution (``chunk_field``): the finest levels cost most of
    its time and add little the low-pass and the solve keep (bench/RESULTS.md: ``--trunc``).
    ``refine`` > 0 runs the network twice: the second pass sees the source moved
    by the first's field low-passed at that radius (its smooth part: the rest is
    mostly tissue change; a plain low-pass even beside defects, as it only places
    the source, and the jump is the second pass's to find) and the two are
    composed; on tissue the network never saw
    it under-reaches, and the second pass recovers part of what the first missed
    (bench/RESULTS.md: ``--refine``).
    ``defects``: the uint8 ``[H, W]`` defect maps ``(of source, of target)`` (0 none,
    1 crack, 2 fold; either may be None) or None: the field is the source's, so the
    low-pass runs within the source's tissue (its defects pulled into the target's
    grid), never across one of them, and leaves out the field on the target's
    defects without stopping there (``solve.low_pass``'s ``untrusted``: the
    network sees garbage there, and the source's tissue is whole); the field on
    either's defects then comes from the tissue around it. The stack-wide solve
    treats a section's field the same way (``solve.solve_stack``).
    """
    device = next(model.parameters()).device
    settings = with_context(settings, model)
    chunk, overlap = on_grid(settings.chunk, model), on_grid(settings.overlap, model)
    h, w = source.shape[-2:]
    height, width = on_grid(h, model), on_grid(w, model)
    stats = stats or tuple(section_stats(tissue_moments(s)) for s in (source, target))
    if rigid is None:
        match, inverted = sections_prealignment(model, source, target, stats, settings, defects)
        stats = inverted_stats(stats) if inverted else stats
        rigid = rigid_field(match, (0, 0), (h, w), piece_factor((h, w)))
    (src, missing), (tgt, _) = (normalise(to_tensor(s), given) for s, given in zip((source, target), stats))
    rigid = rigid.to(device)
    src, seen = (warp(x.view(1, 1, h, w).to(device), rigid.expand(1, 2, h, w)) for x in (src, (~missing).float()))
    tgt = tgt.view(1, 1, h, w).to(device)
    src, tgt = (F.pad(x, (0, width - w, 0, height - h)) for x in (src, tgt))
    field = chunked_field(model, src, tgt, chunk, overlap, settings.trunc)
    if settings.refine:
        first = F.pad(low_pass(field[..., :h, :w], settings.refine), (0, width - w, 0, height - h))
        field = compose(first, chunked_field(model, warp(src, first), tgt, chunk, overlap, settings.trunc))
    field = field[..., :h, :w]
    if rigid.shape[-1] == 1:  # a shift: exactly added
        field = (field + rigid)[0].cpu()
    else:  # a wide match: its field alone where the moved source shows no tissue
        field = compose(rigid, field * (seen >= WHOLE))[0].cpu()
    untrusted = beside_missing(missing_data(target)) if settings.smooth else None  # as the target's defects are
    if not defects:  # a wide match's shift and turn are exact: only the network's part is low-passed
        kept = rigid[0].cpu() if rigid.shape[-1] > 1 else 0
        return kept + low_pass(field - kept, settings.smooth, untrusted=untrusted)
    own, both = (pair_defects(field, defects[0], marks) for marks in (None, defects[1]))
    if both is not None:
        untrusted = both > 0 if untrusted is None else (both > 0) | untrusted
    return low_pass(field, settings.smooth, own, untrusted)


def sections_prealignment(model: Pyramid, source, target, stats: tuple, settings: PairSettings,
                          defects: tuple | None = None) -> tuple[np.ndarray, bool]:
    """``pair_prealignment`` of two whole uint8 ``[H, W]`` sections, on their ``thumbnail`` (by ``thumbnail_factor``)
    with their defect maps ``defects`` (``(of source, of target)``, either may be None, or None)."""
    factor = thumbnail_factor(source.shape[-2:])
    thumbnails = (thumbnail(s, factor, d) for s, d in zip((source, target), defects or (None, None)))
    return pair_prealignment(model, *thumbnails, stats, settings, factor)


def matches_nowhere(model: Pyramid, source, target, settings: PairSettings = PairSettings(),
                    defects: tuple | None = None) -> bool:
    """Whether ``pair_field`` finds that section ``source`` matches section ``target`` nowhere (``matching``: noise,
    other tissue), its warnings unsaid; ``defects`` as ``pair_field``'s."""
    stats = tuple(section_stats(tissue_moments(s)) for s in (source, target))
    with warnings.catch_warnings(), matching() as poor:
        warnings.simplefilter("ignore")
        sections_prealignment(model, source, target, stats, with_context(settings, model), defects)
    return any(poor)


def aligned_defects(defects, field: torch.Tensor) -> np.ndarray:
    """A section's defect map uint8 ``[H, W]`` carried into the aligned frame by its ``field`` ``[2, H, W]`` (px),
    by nearest sampling (``helpers.warp_labels``): what ``DEST/defects`` holds."""
    return warp_labels(to_tensor(defects, dtype=torch.uint8)[None, None], field[None])[0, 0].numpy()


def thumbnail_factor(shape: tuple[int, int]) -> int:
    """The power of two by which ``thumbnail`` averages ``[H, W]`` sections: the largest that leaves their smaller side
    ``THUMBNAIL`` px or more (1 below ``2 THUMBNAIL`` px: ``prealignment`` then sees the sections themselves)."""
    return 1 << max((int(min(shape)) // THUMBNAIL).bit_length() - 1, 0)


def thumbnail(section, factor: int, defects=None) -> np.ndarray:
    """float32 ``[3, H // factor, W // factor]``: the means over ``factor`` x ``factor`` pixels of a uint8 ``[H, W]``
    section's grey values, of its tissue (non-zero) mask and of its defects (``defects``, its uint8 ``[H, W]`` defect
    map, non-zero; 0 where None), exact (sums of whole numbers over a power of two), so the thumbnails of a
    section's parts at multiples of ``factor`` tile the section's (``tasks.scan_task``)."""
    values = to_tensor(section, dtype=torch.float64)
    marks = torch.zeros_like(values) if defects is None else (to_tensor(defects) != 0).double()
    all_three = torch.stack([values, (values != 0).double(), marks])[None]
    return (F.avg_pool2d(all_three, factor) if factor > 1 else all_three)[0].float().numpy()


def _normalised(thumb: np.ndarray, stats: tuple[float, float]) -> torch.Tensor:
    """float32 ``[h, w]``: a section normalised by its ``stats`` (``(mean, std)``, ``helpers.normalise``) and
    averaged down, from its ``thumbnail``; with factor 1 exactly the normalised section."""
    (mean, std), (values, tissue) = stats, thumb[:2].astype(np.float64)
    return torch.from_numpy((values - mean * tissue) / math.copysign(max(abs(std), 1e-6), std)).float()


def prealignment(source: np.ndarray, target: np.ndarray, stats: tuple, reach: int,
                 factor: int) -> tuple[np.ndarray, bool | None]:
    """``(M, weak)``: float64 ``[2, 3]`` ``M``, the rigid match (``_prealignment``, up to ``reach`` px) that pulls a
    section onto another, found on their thumbnails ``source`` and ``target`` (``thumbnail``, by ``factor``), as the
    affine field ``u(p) = M[:, :2] p + M[:, 2]`` (px) at the section's pixel ``p = (x, y)`` from its corner
    (``rigid_field``); ``weak``: ``_prealignment``'s.

    stats: ``((mean, std) of source, of target)`` (``section_stats``): each thumbnail is the section normalised by
    them (``helpers.normalise``) and averaged down; with ``factor`` 1 exactly that normalised section.
    """
    sections = [_normalised(thumb, given) for thumb, given in zip((source, target), stats)]
    field, weak = _prealignment(*sections, -(-reach // factor))
    field = field[0].double()
    h, w = field.shape[-2:]
    origin = field[:, 0, 0]  # the field is affine: its value at the corner and its slopes along x and y
    slope = torch.stack([(field[:, 0, -1] - origin) / max(w - 1, 1), (field[:, -1, 0] - origin) / max(h - 1, 1)], 1)
    # thumbnail pixel q averages section pixels factor q .. factor q + factor - 1: p = factor q + (factor - 1) / 2
    return torch.cat([slope, (factor * origin - slope.sum(1) * (factor - 1) / 2)[:, None]], 1).numpy(), weak


MATCHED_R = 0.1  # a pair whose whole-pixel shift matches weakly matches nowhere unless the network's field on its
# thumbnails leaves it correlating by this much Pearson r (noise, inverted contrast: <= 0.02 at 128-416 px, up to
# ~0.05 on 96 px; the true neighbour pairs so flagged in misaligned SNEMI3D and ISBI draws: >= 0.27 at 256 and 416 px,
# 0.012-0.335 at 128 px, 7 of 272 pairs under: bench/RESULTS.md)
PIECE_REACH = 128  # px: how far pair_prealignment seeks each piece's own shift (a fold of 120 px of tissue jumps <= 96)
PIECE_GAIN = 0.1  # and it keeps the pieces' placement where the network's field then matches by this much more
# Pearson r (wide folds' cut pairs: +0.08 to +0.22; every pair of the benchmark's folds on the demo, phantom, SNEMI3D
# and ISBI draws: -0.02 to +0.08; bench/RESULTS.md)


def pair_prealignment(model: Pyramid, source: np.ndarray, target: np.ndarray, stats: tuple, settings: PairSettings,
                      factor: int) -> tuple[np.ndarray, bool]:
    """How ``pair_field`` places a section before the network, from the two sections' ``thumbnail`` (by ``factor``)
    and ``stats`` (``prealignment``'s): ``(match, inverted)``. ``match``: ``prealignment``'s matrix ``[2, 3]``, or
    where the defects cut the tissue of either section into pieces whose shifts differ by over ``settings.pieces``
    px (``pieces.piece_field``, up to ``PIECE_REACH`` px, on the sections averaged by ``piece_factor``), and the
    network's field on the source so placed matches the target better by ``PIECE_GAIN`` in Pearson r than on the
    matrix's, that field float32 ``[2, h, w]`` (px) on the pieces' grid. Either goes to ``rigid_field``. Run on the
    thumbnails (the sections themselves below ``2 THUMBNAIL`` px), so a queued pair finds it once for the whole
    section (``tasks.prealign_task``). Within ``matching``, notes whether the pair matches nowhere.

    ``inverted``: the pair matches nowhere as it is but does with the source's contrast inverted
    (``inverted_stats``: a section of inverted contrast, or one beside it), and ``match`` is found so;
    ``pair_field`` then normalises the source inverted, and an ``InvertedWarning`` names the pair."""
    matrix, matched, said = _checked_prealignment(model, source, target, stats, settings, factor)
    inverted = False
    if matched is False:  # perhaps on the source's inverse
        again, matched_inverted, _ = _checked_prealignment(model, source, target, inverted_stats(stats), settings,
                                                           factor)
        if matched_inverted:
            matrix, matched, inverted, stats, said = again, True, True, inverted_stats(stats), []
            warnings.warn(InvertedWarning("warning: a section's contrast is inverted against its neighbour's: the "
                                          "pair is matched with the source inverted (the image is written as it is)"))
    for found in said:
        warnings.warn(found.message)
    noted = UNMATCHED.get()
    if noted is not None and matched is not None:
        noted.append(not matched)
    if not settings.pieces or not (source[2].any() or target[2].any()):
        return matrix, inverted
    grid = _grid(min(source.shape[-2:]))  # thumbnail px per pixel of the pieces' grid
    cells = [F.avg_pool2d(torch.from_numpy(thumb).double()[:, None], grid)[:, 0] for thumb in (source, target)]
    values = [F.avg_pool2d(_normalised(thumb, given)[None, None], grid)[0, 0] for thumb, given in zip((source, target),
                                                                                                  stats)]
    cut = piece_field(*values, *((tissue >= WHOLE) & (marks == 0) for _, tissue, marks in cells),
                      -(-PIECE_REACH // (factor * grid)), settings.pieces / (factor * grid))
    if cut is None:
        return matrix, inverted
    placements = (rigid_field(_on_thumbnail(matrix, factor), (0, 0), source.shape[-2:]),
                  rigid_field(cut * grid, (0, 0), source.shape[-2:], grid))
    plain, pieced = (_placed_r(model, source, target, stats, settings, placed) for placed in placements)
    return ((cut * factor * grid).numpy() if pieced >= plain + PIECE_GAIN else matrix), inverted


def _checked_prealignment(model: Pyramid, source: np.ndarray, target: np.ndarray, stats: tuple,
                          settings: PairSettings, factor: int) -> tuple[np.ndarray, bool | None, list]:
    """``prealignment``'s matrix of two ``thumbnail``s, whether the pair matches (None: not pre-aligned), and the
    warnings it raised, held back: it matches nowhere where its whole-pixel shift matches weakly (``_prealignment``)
    and the network's field on the thumbnails leaves them correlating under ``MATCHED_R``."""
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        matrix, weak = prealignment(source, target, stats, settings.prealign, factor)
    if weak is None:
        return matrix, None, said
    unmatched = weak and _placed_r(model, source, target, stats, settings, rigid_field(
        _on_thumbnail(matrix, factor), (0, 0), source.shape[-2:])) < MATCHED_R
    return matrix, not unmatched, said


def inverted_stats(stats: tuple) -> tuple:
    """A pair's ``((mean, std) of the source, of the target)`` with the source's contrast inverted: its std negated
    (``helpers.normalise`` then gives its negative)."""
    (mean, std), target = stats
    return (mean, -std), target


def _grid(side: int) -> int:
    """Thumbnail px per pixel of the grid ``pair_prealignment`` finds pieces on, for thumbnails whose smaller side is
    ``side`` px: what leaves about ``pieces.GRID`` px (at least 1)."""
    return max(1, (side + GRID // 2) // GRID)


def piece_factor(shape: tuple[int, int]) -> int:
    """px of an ``[H, W]`` section per pixel of the grid ``pair_prealignment`` finds pieces on (``rigid_field``'s
    ``factor`` for its fields): its ``thumbnail_factor`` times ``_grid``."""
    factor = thumbnail_factor(shape)
    return factor * _grid(min(shape) // factor)


def _on_thumbnail(matrix: np.ndarray, factor: int) -> np.ndarray:
    """``prealignment``'s ``matrix`` ``[2, 3]`` (section px) as the matrix of the same field on the thumbnails by
    ``factor`` (thumbnail px at thumbnail pixels: section pixel ``p = factor q + (factor - 1) / 2``)."""
    slope, shift = matrix[:, :2], matrix[:, 2]
    return np.concatenate([slope, ((slope.sum(1) * (factor - 1) / 2 + shift) / factor)[:, None]], 1)


def _placed_r(model: Pyramid, source: np.ndarray, target: np.ndarray, stats: tuple, settings: PairSettings,
              placed: torch.Tensor) -> float:
    """Pearson r of the ``thumbnail`` ``source`` pulled by ``pair_field``'s field (on the thumbnails, ``settings``
    unsmoothed, the source first moved by ``placed``, ``[1, 2, ...]`` thumbnail px) with ``target``, over the
    target's tissue off its defects where the source pulled shows tissue off its own; NaN where the field is not
    finite (a failing network: the check of the fields written says so, ``volume.write``)."""
    field = pair_field(model, source[0], target[0], dataclasses.replace(settings, smooth=0), None, stats, placed)
    if not torch.isfinite(field).all():
        return math.nan
    source_whole, target_whole = (torch.from_numpy((thumb[1] >= WHOLE) & (thumb[2] == 0)) for thumb in (source, target))
    pulled, seen = warp(torch.stack([_normalised(source, stats[0]), source_whole.float()])[None], field[None])[0]
    both = (seen >= WHOLE) & target_whole
    return float(pearson(pulled[None], _normalised(target, stats[1])[None], both[None])[0])


def rigid_field(match, corner: tuple[int, int], shape: tuple[int, int], factor: int = 1) -> torch.Tensor:
    """The field of ``pair_prealignment``'s ``match`` over the ``shape`` ``(h, w)`` px of a section from its pixel
    ``corner`` ``(x, y)``: ``[1, 2, 1, 1]`` (px) where it is a shift, else ``[1, 2, h, w]`` float32. A match that is
    a field on a grid of ``factor`` px (``piece_factor``) is read there bilinearly (grid pixel ``q`` covers section
    pixels ``factor q .. factor q + factor - 1``)."""
    match = torch.as_tensor(np.asarray(match))
    if match.shape != (2, 3):
        along = [(2 * (torch.arange(n, dtype=torch.float64) + c + 0.5) / (factor * m) - 1)
                 for n, c, m in zip(shape, corner[::-1], match.shape[-2:])]
        grid = torch.stack(torch.meshgrid(*along, indexing="ij")[::-1], -1).float()[None]  # x then y
        return F.grid_sample(match.float()[None], grid, padding_mode="border", align_corners=False)
    matrix = match.double()
    if not matrix[:, :2].any():
        return matrix[:, 2].float().view(1, 2, 1, 1)
    y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) + c for n, c in zip(shape, corner[::-1])),
                          indexing="ij")
    return (matrix[:, :1, None] * x + matrix[:, 1:2, None] * y + matrix[:, 2:, None]).float()[None]


def _prealignment(source: torch.Tensor, target: torch.Tensor, reach: int) -> tuple[torch.Tensor, bool | None]:
    """``(field, weak)``: the rigid field that pulls normalised ``[H, W]`` source onto target (px), the shift
    ``[1, 2, 1, 1]`` or the wide match ``[1, 2, H, W]``; ``weak``: whether the shift matches under ``DOUBT_R``
    though both sections show tissue (``matching``'s first test; None with ``reach`` 0).

    The whole-pixel shift of ``_whole_shift`` (up to ``reach`` px). Only where
    it is in doubt (it lies at the edge of its reach, matches under ``DOUBT_R``
    in Pearson r (``shifts.match_r``), a rigid match would still move it by over
    ``DOUBT_DEPARTURE`` px (``shifts.match_motion``: e.g. a turn), or a section
    shows too little tissue) does the wide ``shifts.rigid_search`` (shift over a
    quarter of the section, turn up to 0.06 rad) run, and it replaces the shift
    where it is not poor, does not peak at the edge of its reach, matches better
    by ``WIDE_MARGIN`` in Pearson r, and either departs from the shift by over
    ``WIDE_DEPARTURE`` px (the median length of their difference over the
    section: more than the network recovers) or the shift lies at the edge of
    its own reach: neighbours that the shift brings within the network's reach
    keep exactly that shift. Where neither the shift (``DOUBT_R``) nor the wide
    match (``shifts.RigidMatch.poor``: none stands out, e.g. a foreign section)
    matches, or a section shows too little tissue, a ``PoorMatchWarning`` says
    why in one line.
    """
    shift = _whole_shift(source, target, reach)
    if reach == 0:
        return shift, None
    src, tgt, fixed = source[None].cpu(), target[None].cpu(), shift.expand(1, 2, *source.shape).cpu()
    r, motion = (float(x[0]) for x in match_motion(src, tgt, fixed))
    beyond = float(shift.abs().max()) >= _shift_reach(source.shape, reach) - 1  # the shift may lie further
    enough = _tissue(source, target) >= MIN_TISSUE
    weak = r < DOUBT_R and enough
    if not (beyond or r < DOUBT_R or motion > DOUBT_DEPARTURE or not enough):
        return shift, weak
    match = rigid_search(src, tgt)
    if match.tissue[0] < MIN_TISSUE or (match.poor[0] and r < DOUBT_R):
        warnings.warn(match.warning(0), PoorMatchWarning)
    wide = match.field(*source.shape).to(source.device)
    if match.poor[0] or match.edge[0] or not (beyond or float((wide - shift).norm(dim=1).median()) > WIDE_DEPARTURE):
        return shift, weak
    return (wide if float(match_r(src, tgt, wide.cpu())[0]) > r + WIDE_MARGIN else shift), weak


def _whole_shift(source: torch.Tensor, target: torch.Tensor, reach: int) -> torch.Tensor:
    """``[1, 2, 1, 1]`` (px): the whole-pixel ``shifts.best_shifts`` of normalised ``[H, W]`` source onto target,
    ``reach`` clipped to what the sections' size allows, on sections averaged down to about 1024 px (2x at
    least). Zero when that reach is under 2 px or either section shows tissue (non-zero) on under a quarter
    of its area: too little to trust one shift for the whole section."""
    reach = _shift_reach(source.shape, reach)
    if reach < 2 or _tissue(source, target) < MIN_TISSUE:
        return torch.zeros(1, 2, 1, 1, device=source.device)
    factor = max(2, min(source.shape) // 1024)
    shift = best_shifts(source[None].cpu(), target[None].cpu(), reach, factor)[0].round()
    return torch.from_numpy(shift).view(1, 2, 1, 1).to(source.device)


def _tissue(source: torch.Tensor, target: torch.Tensor) -> float:
    """The smaller of ``[H, W]`` source's and target's fractions of pixels that hold tissue (non-zero)."""
    return min(float((x != 0).float().mean()) for x in (source, target))


def _shift_reach(shape: tuple[int, int], reach: int) -> int:
    """``_whole_shift``'s reach (px) on ``[H, W]`` sections: ``reach`` clipped to what their size allows."""
    return min(reach, (min(shape) // 2 - 1) // 4 * 2)


def apply_field(sections, fields) -> np.ndarray:
    """``helpers.warp_tissue`` of uint8 sections ``[..., H, W]`` by fields ``[..., 2, H, W]`` (px; the same
    leading shape: one section, or a stack ``[Z, H, W]`` with ``[Z, 2, H, W]``), as uint8 (0 where a pixel
    reads missing data)."""
    s, f = to_tensor(sections), to_tensor(fields)
    out = warp_tissue(s.reshape(-1, 1, *s.shape[-2:]), f.reshape(-1, 2, *f.shape[-2:]))
    return out.round().clamp(0, 255).to(torch.uint8).reshape(s.shape).numpy()


def tissue_moments(section) -> np.ndarray:
    """float64 ``[3]``: the count, sum and sum of squares of the non-zero (tissue) pixels of a uint8 ``[..., H, W]``.

    Sums of whole numbers, exact in float64 (up to 2^53), so the moments of a section's parts add up to the
    section's, bit for bit, in any order: ``tasks.scan_task`` adds them chunk by chunk."""
    values = np.asarray(section, np.float64)
    tissue = values[values != 0]
    return np.array([tissue.size, tissue.sum(), np.square(tissue).sum()])


def is_blank(section=None, min_std: float = 2.0, moments: np.ndarray | None = None) -> bool:
    """Whether a uint8 ``[H, W]`` section has too little tissue contrast to align: the std of its tissue pixels (as
    ``helpers.slice_std``) below ``min_std`` grey levels. ``moments``: its ``tissue_moments`` instead of it."""
    return section_stats(tissue_moments(section) if moments is None else moments)[1] < min_std


def section_stats(moments: np.ndarray) -> tuple[float, float]:
    """``(mean, std)`` (grey levels) of a section's tissue pixels from its ``tissue_moments`` (float64): how
    ``pair_field`` normalises it, whole or in parts (``tasks.scan_task`` adds the moments up chunk by chunk)."""
    count, total, squares = moments
    mean = total / max(count, 1)
    return float(mean), math.sqrt(max(squares / max(count, 1) - mean * mean, 0.0))


PASS_OVER = 2  # align_serial aligns past at most this many sections in a row that match nowhere (noise, other
# tissue): after more, the tissue has changed, and the next section is aligned onto the last one
BIAS_PAIRS = (3, 9)  # network_bias reads 3 neighbour pairs spread over the stack, and 9 (those 3 among them) where
# the 3 show half of MIN_BIAS or more: 3 alone were too few on fly tissue (RESULTS.md, 2026-12-07 17:40)
MIN_BIAS = 0.25  # px: a smaller network_bias is taken as none (mouse sections: <= 0.12; fly: 0.53-0.89; RESULTS.md)


def network_bias(model: Pyramid, section: Callable[[int], np.ndarray], count: int,
                 settings: PairSettings = PairSettings()) -> torch.Tensor:
    """The network's bias on a stack of ``count`` sections, float32 ``[2]`` (px, x then y): half the mean, over raw
    neighbour pairs spread over the stack (``section(i)``: section i, uint8 ``[H, W]``; a central part will do, and
    only these pairs are read), of the loop ``compose(f_st, f_ts)`` of each pair's two ``pair_field``s over the inner
    two thirds of the section. An unbiased network's loop is zero; a serial chain adds the bias pair after pair (on
    fly tissue the mouse network never saw, 0.5-0.9 px per pair), where the solve's pairs both ways cancel it. The
    pairs: ``BIAS_PAIRS[0]``, then ``BIAS_PAIRS[1]`` where those show a bias of half ``MIN_BIAS`` or more; a pair with
    a blank section, or one that matches nowhere (``matching``: noise, other tissue), is left out. Zero under
    ``MIN_BIAS`` px (the estimate's noise) or where no pair is left."""
    loops = {}  # z: the mean loop of the pair (z, z - 1), None where it is left out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pairs' own warnings come with the alignment
        for pairs in BIAS_PAIRS:
            for z in sorted({max(1, (2 * i + 1) * count // (2 * pairs)) for i in range(pairs)} - loops.keys()
                            if count > 1 else ()):
                source, target = section(z), section(z - 1)
                if is_blank(source) or is_blank(target):
                    loops[z] = None
                    continue
                with matching() as poor:
                    there, back = pair_field(model, source, target, settings), pair_field(model, target, source,
                                                                                          settings)
                loops[z] = None if any(poor) else _loop(there, back)
            read = [loop for loop in loops.values() if loop is not None]
            bias = torch.stack(read).mean(0) / 2 if read else torch.zeros(2)
            if float(bias.norm()) < MIN_BIAS / 2:
                break
    return bias if float(bias.norm()) >= MIN_BIAS else torch.zeros(2)


def _loop(there: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
    """The mean ``[2]`` px of ``compose(there, back)`` (a pair's two fields ``[2, H, W]``) over the inner two thirds."""
    h, w = there.shape[-2:]
    return compose(there[None], back[None])[0, :, h // 6:h - h // 6, w // 6:w - w // 6].mean(dim=(1, 2))


def align_serial(model: Pyramid, sections, before: list | None = None, to_raw_neighbour: bool = False,
                 vote: int = 1, settings: PairSettings = PairSettings(), softness: float = 1.0,
                 defects=None, first: int = 0, passed: int = 0,
                 bias=(0.0, 0.0)) -> Iterator[tuple[np.ndarray, torch.Tensor, bool]]:
    """Align sections one after another; yields ``(aligned uint8 [H, W], field [2, H, W], kept)`` per section.

    sections: an iterable of uint8 ``[H, W]``. The first section is the fixed
    reference (field zero) unless ``before``, a list of ``(raw, aligned, field,
    defects)`` of the sections before the first (oldest first; ``defects``: its
    raw defect map, or None), says where the stack stands (when resuming). Each
    section is pulled onto the aligned section before it;
    with ``vote`` K > 1 onto each of the K aligned sections before it, the K
    fields combined by ``solve.vector_vote``; with ``to_raw_neighbour`` it is
    aligned to the raw section before it and the fields are chained with
    ``helpers.compose``. Blank sections (``is_blank``) come out blank with the
    zero field and are not aligned to. Without ``vote``, a section that does not
    match its target (``matching``: its shift matches weakly and the network's
    field leaves them uncorrelated, though both show tissue, and not with its
    contrast inverted either: ``pair_prealignment``) is moved as the section it
    was pulled onto and is not aligned to, up to ``PASS_OVER`` in a row: the
    sections after a section of noise are aligned past it (the vote outvotes such
    a section: bench/RESULTS.md; the solve does the same, ``passed_over``). ``kept``: whether later
    sections are aligned to it (False for those two kinds); ``passed``: how many
    sections right before the first were passed over so (when resuming).
    ``settings``: ``pair_field``'s. ``bias``: ``(x, y)`` px taken off every pair field (``network_bias``).
    ``defects``: an iterable of the sections' uint8 ``[H, W]`` defect maps (0 none,
    1 crack, 2 fold), in step with ``sections``, or None: each pair field is then
    made with the defects of its two sections (``pair_field``), the target's
    carried into the frame it is aligned in. ``first``: the first section's z, by which warnings name the sections
    (``naming``).
    """
    history = list(before or [])[-vote:]  # (raw, aligned, field, defects) of the last sections aligned to
    bias = torch.as_tensor(bias, dtype=torch.float32).reshape(2, 1, 1)
    for z, (section, marks) in enumerate(zip(sections, itertools.repeat(None) if defects is None else defects), first):
        shape = section.shape[-2:]
        if is_blank(section):
            yield np.zeros(shape, np.uint8), torch.zeros(2, *shape), False
            continue
        unmatched = False
        if not history:
            field = torch.zeros(2, *shape)
        elif to_raw_neighbour:
            previous_raw, _, previous_field, previous_marks = history[-1]
            with naming(z), matching() as poor:
                pair = pair_field(model, section, previous_raw, settings, _pair_marks(marks, previous_marks)) - bias
            unmatched, field = any(poor), compose(pair[None], previous_field[None])[0]
        else:
            targets = history[-vote:]
            with naming(z), matching() as poor:
                candidates = torch.stack([pair_field(model, section, target, settings,
                                                     _pair_marks(marks, _aligned_marks(target_marks, target_field)))
                                          for _, target, target_field, target_marks in targets]) - bias
            unmatched = vote == 1 and any(poor)
            valid = ~missing_data(np.stack([aligned for _, aligned, _, _ in targets]))
            field = vector_vote(candidates, valid, softness) if len(targets) > 1 else candidates[0]
        if unmatched:  # moved as the section before it: a field onto a section it does not match is noise
            field = history[-1][2]
            warn_passed_over(z)
        kept = not unmatched or passed >= PASS_OVER
        passed = 0 if kept else passed + 1
        aligned = apply_field(section, field)
        yield aligned, field, kept
        if kept:
            history = (history + [(section, aligned, field, marks)])[-max(vote, 1):]


def _pair_marks(source_marks, target_marks) -> tuple | None:
    """``pair_field``'s ``defects`` from the two sections' maps (either None): None when both are."""
    return None if source_marks is None and target_marks is None else (source_marks, target_marks)


def _aligned_marks(marks, field: torch.Tensor):
    """``aligned_defects`` of a raw defect map, or None for None."""
    return None if marks is None else aligned_defects(marks, field)


def align_solved(model: Pyramid, sections, pair: PairSettings = PairSettings(), solve: SolveSettings = SolveSettings(),
                 defects=None) -> tuple[np.ndarray, torch.Tensor, list[int]]:
    """Align a whole stack by the stack-wide solve (``solve.solve_stack``).

    sections: uint8 ``[Z, H, W]``. Every usable section is paired with its
    ``solve.neighbours`` nearest usable sections on each side (raw to raw, both
    directions), and a section a wide defect cuts (``placed_by_pieces``) with the
    one further too; the pair fields (``pair_field`` with ``pair``, not
    low-passed; each pair pre-aligned once, ``pair_prealignment``) are solved
    jointly for one field per section (``solve_pairs``, split at
    ``pair.smooth``), and the result is expressed in the frame of the first
    usable section (as a serial alignment keeps it). Returns ``(aligned uint8
    [Z, H, W], fields [Z, 2, H, W] px, skipped)``, ``skipped`` the blank sections
    (left blank, zero field). ``defects``: the sections' uint8 defect maps ``[Z, H, W]``
    (0 none, 1 crack, 2 fold) or None: the pair fields and the solve use them
    (``pair_field``, ``solve_pairs``).
    """
    sections = np.asarray(sections)
    skipped = [z for z in range(len(sections)) if is_blank(sections[z])]
    pairs, field_of, _, passed = solved_pairs(model, sections, solve.neighbours, pair, skipped, defects)
    pair_fields = torch.stack([field_of(s, t) for s, t in pairs]) if pairs else None
    aligned, fields = solve_pairs(sections, pairs, pair_fields, solve, pair.smooth, skipped, defects, passed)
    return aligned, fields, skipped


def solved_pairs(model: Pyramid, sections, neighbours: int, pair: PairSettings = PairSettings(), skipped=(),
                 defects=None) -> tuple[list[tuple[int, int]], Callable[[int, int], torch.Tensor], set[int], set[int]]:
    """The pairs ``align_solved`` solves and how to make their fields: ``(pairs, field_of, placed, passed)``.

    sections: uint8 ``[Z, H, W]``; ``skipped``: the blank ones; ``defects``: uint8 ``[Z, H, W]`` or None. The pairs
    are each usable section's ``neighbours`` nearest usable ones on each side, both ways, and for the sections
    ``placed_by_pieces`` the one further (``solve.neighbour_pairs``); each is pre-aligned once
    (``pair_prealignment``, on thumbnails made once per section, as the queued prealign tasks do), and
    ``field_of(s, t)`` is its ``pair_field`` ``[2, H, W]`` (px, not low-passed) from that pre-alignment;
    ``placed``: those sections. ``passed``: the usable sections that match neither nearest neighbour
    (``passed_over``: noise, other tissue), left out of the pairs as blank sections are (their
    neighbours paired past them) and moved as the section before them (``solve_pairs``).
    """
    count, shape = len(sections), sections.shape[-2:]
    usable = [z for z in range(count) if z not in skipped]
    if len(usable) < 2:
        return [], None, set(), set()
    unsmoothed, factor = dataclasses.replace(pair, smooth=0), thumbnail_factor(shape)
    stats = {z: section_stats(tissue_moments(sections[z])) for z in usable}
    thumbs = {z: thumbnail(sections[z], factor, None if defects is None else defects[z]) for z in usable}
    matches, unmatched, inverted = {}, set(), set()

    def match(pairs):  # each pair's pre-alignment (pair_prealignment) not found yet, as the queued prealign tasks
        for s, t in (p for p in pairs if p not in matches):
            with naming(s, t), matching() as poor:
                matches[s, t], flip = pair_prealignment(model, thumbs[s], thumbs[t], (stats[s], stats[t]),
                                                        unsmoothed, factor)
            if any(poor):
                unmatched.add((s, t))
            if flip:
                inverted.add((s, t))
    match(neighbour_pairs(count, neighbours, set(skipped)))
    passed = passed_over(usable, unmatched)
    for z in sorted(passed):
        warn_passed_over(z)
    pairs = neighbour_pairs(count, neighbours, set(skipped) | passed)
    match(pairs)
    further = placed_by_pieces([z for z in usable if z not in passed], matches)
    if further:
        pairs = neighbour_pairs(count, neighbours, set(skipped) | passed, further)
        match(pairs)

    def field_of(s: int, t: int) -> torch.Tensor:
        given = (stats[s], stats[t])
        return pair_field(model, sections[s], sections[t], unsmoothed,
                          None if defects is None else (defects[s], defects[t]),
                          inverted_stats(given) if (s, t) in inverted else given,
                          rigid_field(matches[s, t], (0, 0), shape, piece_factor(shape)))
    return pairs, field_of, further, passed


def on_both_sides(usable: list[int], marked: set) -> set[int]:
    """The sections of ``usable`` (ascending) whose pairs with both nearest usable neighbours, in one direction or
    the other, are ``marked`` (a set of pairs ``(s, t)``); none at either end of the stack, where a section's one
    neighbour cannot tell which of the two the mark is about."""
    return {z for before, z, after in zip(usable, usable[1:], usable[2:])
            if all((z, n) in marked or (n, z) in marked for n in (before, after))}


def placed_by_pieces(usable: list[int], matches: dict) -> set[int]:
    """The sections of ``usable`` (ascending) ``on_both_sides`` of pairs that ``pair_prealignment`` placed piece by
    piece (``matches``: ``{(s, t): its match}``, a field where so, or "pieces" as the queued prealign markers say):
    a wide defect cuts them. ``align_solved`` pairs them one neighbour further too (``solve.neighbour_pairs``'s
    ``further``): more views of the jump (bench/RESULTS.md)."""
    return on_both_sides(usable, {pair for pair, match in matches.items() if np.shape(match) != (2, 3)})


def passed_over(usable: list[int], unmatched: set) -> set[int]:
    """The sections of ``usable`` (ascending) ``on_both_sides`` of pairs that match nowhere (``unmatched``: the pairs
    ``(s, t)`` whose pre-alignment ``matching`` noted): a section of noise or of other tissue (one of inverted
    contrast matches inverted: ``pair_prealignment``). The solve pairs their neighbours past them and moves each
    as the usable section before it (``solve_pairs``), as ``align_serial`` does."""
    return on_both_sides(usable, unmatched)


def solve_pairs(sections, pairs: list[tuple[int, int]], pair_fields: torch.Tensor | None, settings: SolveSettings,
                smooth: int, skipped=(), defects=None, passed=()) -> tuple[np.ndarray, torch.Tensor]:
    """The second half of ``align_solved``: from pair fields to the aligned stack.

    sections: uint8 ``[Z, H, W]``; ``pair_fields`` ``[E, 2, H, W]`` (px): field e
    pulls section ``pairs[e][0]`` onto ``pairs[e][1]`` (None when there are no
    pairs); ``skipped``: blank sections; ``settings.pull``, ``robust`` (0: None),
    ``detail_pull`` and ``smooth`` (px, ``PairSettings.smooth``): ``solve.solve_stack``'s
    (``settings.neighbours`` is not read: ``pairs`` are given).
    Each pair weighs where its target shows tissue (``solve_fields``). ``defects``: the sections'
    uint8 defect maps ``[Z, H, W]`` (0 none, 1 crack, 2 fold) or None: each pair
    weighs 0 on the defects of either section (``pair_defects``), each section's
    field is low-passed within its own tissue (it jumps at its own defects only)
    and inside them comes from the tissue around (``solve.solve_stack``). ``passed``: sections in no pair that
    are moved as the section before them (``passed_over``). Returns ``(aligned uint8
    [Z, H, W], fields [Z, 2, H, W] px)`` in the frame of the first usable section;
    skipped sections stay blank with the zero field.
    """
    count, shape = len(sections), sections.shape[-2:]
    usable = [z for z in range(count) if z not in skipped]
    fields = torch.zeros(count, 2, *shape)
    if pairs:
        solved = solve_fields(sections, pairs, pair_fields, settings, smooth, defects, passed=passed)
        fields[usable] = in_frame_of(solved[usable], reference=0)
    aligned = np.stack([apply_field(s, f) if z in usable else np.zeros(shape, np.uint8)
                        for z, (s, f) in enumerate(zip(sections, fields))])
    return aligned, fields


def solve_fields(sections, pairs: list[tuple[int, int]], pair_fields: torch.Tensor, settings: SolveSettings,
                 smooth: int, defects=None, around=None, passed=()) -> torch.Tensor:
    """The solve of ``solve_pairs`` (its arguments, ``pairs`` not empty) before the frame is chosen: ``[Z, 2, H, W]``
    (px), each section's field into the solve's own frame (zero for a section in no pair; a section in ``passed``
    takes the field of the nearest section before it in a pair, where there is one). Each pair weighs where
    its target (uint8 ``sections[t]``) shows tissue (no missing data: ``helpers.missing_data``; with ``smooth``, the
    share of such pixels its coarse part averages, ``solve.solve_stack``), and 0 on the defects of either section;
    ``tasks.solve_task`` runs it on a block of sections and an xy chunk, each with a margin (``around``:
    ``solve.solve_stack``'s)."""
    weights = (~missing_data(np.asarray(sections)))[[t for _, t in pairs]].float()  # each section's mask once
    fields = solve_stack(len(sections), pairs, pair_fields, weights, pull=settings.pull,
                         robust=settings.robust or None, smooth=smooth, detail_pull=settings.detail_pull,
                         defects=None if defects is None else torch.from_numpy(np.asarray(defects)), around=around)
    paired = {z for pair in pairs for z in pair}
    for z in sorted(passed):
        before = [n for n in paired if n < z]
        if before:
            fields[z] = fields[max(before)]
    return fields
