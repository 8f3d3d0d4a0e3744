"""Aligning a large volume as tasks on a queue (python-task-queue): blocks, a stitch, renders.

    python align.py ... --block 10 --queue fq:///shared/queue   # the driver: enqueues each phase, waits for it
    python align.py worker --queue fq:///shared/queue           # any number of workers that see the queue and DEST

The z range ``[z_start, z_stop)`` is cut into blocks of ``block`` sections that share their boundary
section: block b holds sections ``s_b..e_b``, with ``s_0 = z_start`` and ``s_{b+1} = e_b``.

Frames. A field pulls a raw section into a frame (``helpers``: ``warp(raw_z, field)`` lies in it). The
*reference* ``r_b`` of block b is its first non-blank section (usually ``s_b``; one before it where ``s_b`` matches
nowhere, below); ``r_0`` is the fixed
section of the whole range, as in a serial alignment. ``G_z`` pulls raw z into the raw frame of its
block's reference (``G_{r_b} = 0``), ``C_b`` pulls raw ``r_b`` into the frame of ``r_0``, and
``F_z = compose(G_z, C_b)`` pulls raw z into the frame of ``r_0``: the output.

1. **Block tasks**, one per block, in parallel. ``alignment.align_serial`` (with ``vote`` or
   ``raw_neighbour``) aligns the block's raw sections one after another, keeping ``r_b`` fixed, and
   writes each ``G_z`` (z > s_b, z != r_b) to ``DEST/block_field``; the network runs on overlapping xy
   chunks whose overlap is cropped (``alignment.pair_field``). A block whose last section is blank
   carries on to the next non-blank one, so the next block's reference is always aligned by a block.
   Sections that match nowhere (noise, other tissue) are aligned past (``alignment.PASS_OVER``), and
   marked so that a resumed block does the same. Where the section after the block's first matches it nowhere but
   matches a section up to ``PASS_OVER`` before it, the block starts there (``_block_start``): block b-1 aligned that
   section and passed over those after it, and ``r_b`` is that section.
2. **Stitch tasks**, one per xy chunk, each a short sequential chain over the block boundaries:
   ``C_0 = 0``, ``C_b = compose(G^{b-1}_{r_b}, C_{b-1})`` where ``G^{b-1}_{r_b}`` is the field block b-1
   found for ``r_b`` (zero when ``r_b = r_{b-1}``, i.e. block b-1 had only blank sections), written to
   ``DEST/block_frame`` at z = ``s_b``.
3. **Render tasks**, one per section and xy chunk, in parallel: ``F_z = compose(G_z, C_b)`` for the block b
   that owns z (block 0 owns ``s_0..e_0``, block b > 0 owns ``s_b+1..e_b``); the raw chunk, read with a
   margin of the largest ``|F_z|`` in the chunk plus 1 px, is warped by ``F_z`` into ``DEST/image``, and
   ``F_z`` goes to ``DEST/field``, each with its mips 1..``job.mips`` (``_write``); with ``job.defects``, the
   section's defect labels go through ``F_z`` by nearest sampling into ``DEST/defects``. Blank sections come out
   blank with the zero field.

No seam shows at block boundaries. The boundary section ``s_b`` is aligned once, by block b-1, and
block b aligns its sections onto that same raw section, so ``F`` chains the two fields by composition,
which is exact up to interpolation: there is no correction to fade in over a few sections. (A fade
is what a per-block *solve* would need, whose blocks each end up in their own frame and disagree at
the shared section.) What differs from one serial run: section ``s_b+1`` is aligned onto raw ``s_b``
rather than onto ``s_b`` resampled into the first frame, and with ``vote`` K the first sections of a
block vote over fewer than K targets. With one block (``block`` = the whole range) the result is the
serial alignment: ``C_0 = 0`` and ``compose(G, 0)`` is skipped, so ``F = G`` exactly.

``align.py --solve`` runs the stack-wide solve of ``alignment.align_solved`` as seven phases of tasks instead (eight
with defect maps and ``--pieces``), made of the functions it calls; the z range is cut into z blocks of ``block``
sections (none shared, ``solve_blocks``):

1. **Scan tasks**, one per section: whether it is blank (``alignment.is_blank``, from its ``tissue_moments``
   added up over the xy chunks) and its tissue's mean and std (``alignment.section_stats``), marked in
   ``solve/scan/Z``, and its ``alignment.thumbnail`` (the section, and its defect map where there is one, averaged
   down to no less than ``alignment.THUMBNAIL`` px; itself below twice that), put together chunk by chunk, in
   ``solve/thumbnail/Z``.
   The usable sections give the pairs (``solve.neighbour_pairs``): each section with its K nearest usable ones
   on each side.
2. **Prealign tasks**, one per usable section s: the pre-alignment of s onto each of its targets
   (``alignment.pair_prealignment``, on the two thumbnails: a rigid match, or where defects cut the tissue apart
   one per piece), found once for the whole section, in ``solve/prealign/S`` (and ``solve/pieces/S/T``), with
   whether it matches nowhere (``alignment.matching``) or only with the source's contrast inverted (then the pair
   tasks invert it too). Then the pairs past the sections that match neither
   nearest neighbour (``alignment.passed_over``, from those markers: noise, other tissue) are pre-aligned,
   added to the markers (a phase of no tasks where there are none): from here on those sections are left out of
   the pairs as blank ones are, and moved as the section before them. With defect maps and ``--pieces``, a phase
   more: the sections placed by pieces on both sides (``alignment.placed_by_pieces``, from those markers) are
   also paired with the usable section one neighbour further on each side, both ways, and those pairs
   pre-aligned.
3. **Pair tasks**, one per usable section s and xy chunk: the pair fields of s onto its targets
   (``alignment.pair_field``, unsmoothed; on the chunk grown by ``alignment.pair_context`` px, cropped) into
   ``DEST/pair_field`` at z = s, 2 channels per neighbour offset -K..-1, +1..+K (then -(K+1), K+1 with defect
   maps and ``--pieces``: zero but for the placed sections' pairs). Each section is normalised by
   its whole section's mean and std and the source moved by the pair's rigid match, both read from the markers:
   a chunk's pair field is the whole section's there, up to what lies past ``overlap`` (by default the network's
   reach, ``Pyramid.reach``) and a rigid match beyond ``prealign`` px (a wide search's turn).
4. **Solve tasks**, one per z block and xy chunk: the block grown by ``solve_margin`` usable sections each side
   (the chain cut there changes the block's fields by at most ``CUT_EFFECT`` of the change at the cut:
   ``solve.chain_decay``) and the chunk grown by ``2 smooth + overlap`` px are solved as ``align_solved`` does
   (``alignment.solve_fields``); the block's sections over the chunk go to ``DEST/solved``, each section's
   field into the solve's own frame. With ``task_memory`` (GB) where that would hold more, only the block and
   ``detail_margin`` (4) sections each side are solved at full resolution; what the rest of the window changes
   comes from solves at ``1 / coarse_factor`` the resolution (``solve_task``), so a task's memory is set by its
   block and chunk, not by the 38-section margin.
5. **Frame tasks**, one per xy chunk: ``invert_field(S_r)`` (``S`` the solved fields, ``r`` the range's first usable
   section), the way back from the solve's frame to ``r``'s, into ``DEST/solved_frame`` at z = r; once per chunk,
   not once per section (as the serial stitch).
6. **Render tasks**, one per section and xy chunk: ``F_z = compose(S_z, invert_field(S_r))`` (``helpers.in_frame_of``),
   then as the serial render tasks.

With one z block and one xy chunk covering the bbox every task sees what ``align_solved`` sees: the result is
``align_solved``'s, bit for bit. Smaller chunks and blocks bound each task's memory by the chunk and block sizes
(plus their margins), whatever the volume's size; the cost is the margins' work done twice, and with
``task_memory`` fields within ~0.07 px of the whole solve's at the 99th percentile (demo, with or without its
defects; what is left: detail of the pair fields finer than the coarse solves' pixels, which the robust
re-weighting sees at full resolution only).

Progress markers under ``DEST/progress/`` (tasks are idempotent: they write their output chunks and
these markers, nothing else, so a task run twice does no harm):

* ``block/S/Z``: section Z of the block that starts at S is aligned (``done``, ``blank``, or ``passed``: passed
  over, not aligned to; Z < S ``done``: the block starts there, its first section matching nowhere); an
  interrupted block task resumes after the last marked section;
* ``block/S-E``: the block S..E is finished; JSON ``{"reference": r_b or null, "blank": [...]}``;
* ``Z``: section Z is rendered (written by the driver once phase 3 is over; ``align.py`` skips it);
* the solve's: ``solve/scan/Z`` (JSON ``{"blank": ..., "mean": ..., "std": ...}``, with ``solve/thumbnail/Z``),
  ``solve/prealign/Z`` (JSON ``{"targets": [...], "rigid": [...], "unmatched": [...], "inverted": [...]}``, with
  ``solve/pieces/Z/T``), ``solve/pair/Z/X_Y`` (JSON ``{"targets": [...]}``) and ``solve/block/FIRST/X_Y`` (JSON
  ``{"window": [w0, w1], "blank": [...], "placed": [...], "passed": [...]}``): a task whose marker holds its
  arguments is skipped, so a run that extends the range redoes only what its new sections change.

Running. ``run_in_process`` runs the phases' tasks one after another in this process, in order (a phase whose
tasks follow from the phases before, as the solve's after the scan, is made when its turn comes);
``run_queued`` inserts a phase into a queue (``fq://FOLDER``: files in a folder every worker sees;
``sqs://NAME``: Amazon SQS), waits until the queue is empty, then inserts the next. ``work`` leases a
task for ``lease_seconds`` and runs it; a task whose worker dies stays on the queue and is leased again
once its lease runs out, and a finished one is deleted. A task that fails (its traceback is printed)
is counted in ``DEST/progress/failures/NAME`` (JSON: the task, its failures, the last error) and also
leased again, until it has failed ``job.max_failures`` times: then it is dead-lettered (deleted from
the queue, its record marked ``dead``) and the driver stops with its error in one line. A new driver
starts every task's count afresh. Choose the lease longer than the longest task (a block), or a second
worker starts the same task meanwhile (harmless but wasted). One queue per run: the driver waits for
the queue to empty.

``SEAMLESS_TASK_SLEEP`` (seconds; for tests): a worker sleeps that long after leasing each task and
before running it, so a test can kill it in the middle of a task.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import math
import os
import random
import time
import traceback
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from cloudfiles import CloudFiles
from taskqueue import QueueEmptyError, TaskQueue, queueable
from taskqueue.file_queue_api import FileQueueAPI
from taskqueue.lib import jsonify, toiter
from tqdm import tqdm

import volume
import alignment
from alignment import (PASS_OVER, PairSettings, SolveSettings, aligned_defects, align_serial, apply_field,
                       for_inference, inverted_stats, is_blank, matching, naming, pair_context, pair_prealignment,
                       passed_over, piece_factor, placed_by_pieces, rigid_field, section_stats, solve_fields,
                       thumbnail, thumbnail_factor, tissue_moments, warn_all_defect, warn_passed_over, with_context)
from helpers import (UserError, check_device, check_memory, compose, downsample_field, invert_field, machine_memory,
                     missing_data, one_line, upsample_field)
from masks import check_defect_map
from models.archive import load_archive
from solve import chain_decay, neighbour_pairs

LAYER_CHUNK = 256  # xy storage chunk of the layers align.py creates; task chunks are multiples of it
POLL_SECONDS = 1.0  # the driver looks at the queue this often once a phase has run a while (run_queued)
FIRST_POLL_SECONDS = 0.05  # ... and first this soon after inserting a phase, the wait doubling each time
WORKER_BACKOFF_SECONDS = 0.25  # a worker that found the queue empty looks again within this long (work)
MAX_FAILURES = 3  # default failures of a queued task before it is dead-lettered
SLEEP_VARIABLE = "SEAMLESS_TASK_SLEEP"
CUT_EFFECT = 0.01  # solve tasks: the fraction of a change at a z window's edge left at the block (solve_margin)
COARSE_SAMPLES = 32  # solve tasks: coarse pixels per smooth radius of the coarse tier (coarse_factor)
SOLVE_BYTES = 400  # a solve task's peak memory per pixel of each section it solves (bench/solve_memory.py: ~360)
SERIAL_BYTES = 45  # a block task's per pixel of a section (it holds whole ones; bench/RESULTS.md: 1.8 GB at 4096² px)
VOTE_BYTES = 30  # and per pixel for each further section it votes over (--vote)

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in voxels (x1, y1 exclusive)
Phase = tuple[str, list[Callable[[], None]] | Callable[[], list]]  # a name and its tasks (or what makes them,
# once the phases before are over)


@dataclass(frozen=True)
class Job:
    """Everything a task needs; its ``dataclasses.asdict`` is plain JSON values (each task's payload carries it)."""

    archive: str  # network archive (absolute path)
    source: str  # raw image volume (cloudpath)
    dest: str  # destination folder (cloudpath): image, field, block_field, block_frame, progress
    mip: int  # the source's mip to align at
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 of the region (voxels of mip)
    z_start: int
    z_stop: int  # one past the last section
    block: int  # sections per block, >= 2 (serial: consecutive blocks share one; solve: z block of a solve task)
    pair: PairSettings  # how alignment.pair_field computes each pair field
    vote: int  # alignment.align_serial's vote and to_raw_neighbour
    raw_neighbour: bool
    xy_chunk: int  # xy size of stitch, render and every solve task (px, a multiple of LAYER_CHUNK)
    solve: SolveSettings | None = None  # the stack-wide solve's (solve tasks); None: serial tasks (vote, raw_neighbour)
    device: str | None = None  # None: cuda where the task runs if it has one, else cpu
    max_failures: int = MAX_FAILURES  # a queued task that fails this many times is dead-lettered
    task_memory: float | None = None  # GB a solve task may hold (solve_task); None: no limit
    mips: int = 0  # DEST/image and DEST/field also hold mips 1..mips (each write writes its chunk's, _write)
    defects: str | None = None  # defect layer (cloudpath; uint8 0 none / 1 crack / 2 fold) the fields are made with
    bias: tuple[float, float] = (0.0, 0.0)  # px off every serial pair field (alignment.network_bias, stack_bias)

    def __post_init__(self):  # a payload read back from JSON holds lists and dicts
        object.__setattr__(self, "bbox", tuple(self.bbox))
        object.__setattr__(self, "bias", tuple(self.bias))
        if isinstance(self.pair, dict):
            object.__setattr__(self, "pair", PairSettings(**self.pair))
        if isinstance(self.solve, dict):
            object.__setattr__(self, "solve", SolveSettings(**self.solve))
        if self.pair.overlap is None:  # by default the network's reach, set once where the job is made
            object.__setattr__(self, "pair", with_context(self.pair, model_of(self)))

    def blocks(self) -> list[tuple[int, int]]:
        """``(s_b, e_b)`` of every block (inclusive); a range of one section is one block of one section."""
        last = self.z_stop - 1
        return [(s, min(s + self.block - 1, last)) for s in range(self.z_start, max(last, self.z_start + 1),
                                                                  self.block - 1)]

    def solve_blocks(self) -> list[tuple[int, int]]:
        """``(first, last)`` (inclusive) of every z block of the solve: ``block`` sections each, none shared."""
        return [(s, min(s + self.block, self.z_stop) - 1) for s in range(self.z_start, self.z_stop, self.block)]

    def owner(self, z: int) -> int:
        """Index of the block that owns section z (block 0 owns ``s_0..e_0``, block b > 0 ``s_b+1..e_b``)."""
        return max(z - self.z_start - 1, 0) // (self.block - 1)

    def chunk_corners(self) -> list[tuple[int, int]]:
        """Corners ``(x, y)`` of the ``xy_chunk``-sized chunks that tile ``bbox``."""
        x0, y0, x1, y1 = self.bbox
        return [(x, y) for y in range(y0, y1, self.xy_chunk) for x in range(x0, x1, self.xy_chunk)]

    def chunk_box(self, x: int, y: int) -> Box:
        """The chunk at corner ``(x, y)``, clipped to ``bbox`` (the last row and column may be smaller)."""
        return x, y, min(x + self.xy_chunk, self.bbox[2]), min(y + self.xy_chunk, self.bbox[3])


# ------------------------------------------------------------------------------ reading and writing
@functools.lru_cache(maxsize=32)
def _layer(cloudpath: str, mip: int = 0, shaped_by: tuple = ()):
    """The volume at ``cloudpath``, opened once per process for each ``shaped_by`` (what its info follows from)."""
    return volume.open_volume(cloudpath, mip)


def _dest(job: Job, name: str):
    """``DEST/name`` at its mip 0 (the source's ``job.mip``), opened anew for a job whose run may have made it
    again (``align.py --overwrite``: another source, mip, bbox or mips) or grown its sections (``z_start``,
    ``z_stop``): the layer is opened knowing bounds that hold every section the job writes."""
    return _layer(f"{job.dest}/{name}", 0, (job.source, job.mip, job.bbox, job.z_start, job.z_stop, job.mips))


def _progress(job: Job) -> CloudFiles:
    return CloudFiles(f"{job.dest}/progress")


def _put_array(marks: CloudFiles, name: str, array: np.ndarray) -> None:
    """``array`` as ``.npy`` at ``name`` under ``marks``, gzipped at level 1 (a thumbnail: 9 ms, 12 % of its
    bytes; the default level 9 took 87 ms for 10 %)."""
    saved = io.BytesIO()
    np.save(saved, array)
    marks.put(name, saved.getvalue(), compress="gzip", compression_level=1)


def _get_array(marks: CloudFiles, name: str) -> np.ndarray:
    """The array ``_put_array`` wrote at ``name``."""
    return np.load(io.BytesIO(marks.get(name)))


def _read(vol, z: int, box: Box) -> np.ndarray:
    """``[C, Y, X]`` of section z over ``box``."""
    x0, y0, x1, y1 = box
    return volume.read(vol, (x0, y0, z), (x1 - x0, y1 - y0, 1))[0]


def _read_field(vol, z: int, box: Box) -> torch.Tensor:
    return torch.from_numpy(_read(vol, z, box))


def read_defects(job: Job, z: int, box: Box) -> np.ndarray:
    """uint8 ``[Y, X]``: section z's defect map over ``box`` from ``job.defects``; a ``UserError`` for any other value
    than a defect map's (``masks.check_defect_map``), e.g. an image layer given as ``--defects``."""
    return check_defect_map(_read(_layer(job.defects, job.mip), z, box)[0], f"--defects {job.defects}, section {z},")


def _write(vol, array: np.ndarray, z: int, box: Box) -> None:
    """Write ``[C, Y, X]`` as section z at the corner of ``box`` (or ``[Z, C, Y, X]`` as sections z, z + 1, ...),
    and its downsamplings at every further mip of ``vol`` (``volume.write_pyramid``: a uint8 image by 2x2 mean, a
    float field with its vectors halved per mip). Each task's box covers whole chunks of every mip (align.py
    checks ``--task_chunk`` and the bbox corner against ``--mips``), so no two tasks write one chunk."""
    array = np.ascontiguousarray(array)
    volume.write_pyramid(vol, array.reshape(-1, *array.shape[-3:]), (box[0], box[1], z),
                         "image" if array.dtype == np.uint8 else "field")


# ----------------------------------------------------------------------------- fields on chunks
def _shape(box: Box) -> tuple[int, int]:
    """``(rows, columns)`` of a box."""
    return box[3] - box[1], box[2] - box[0]


def _margin(field: torch.Tensor) -> int:
    """The largest ``|displacement|`` of a field ``[2, h, w]`` (px) rounded up, plus 1 px."""
    return math.ceil(float(field.abs().max())) + 1


def _grown(box: Box, margin: int, bbox: Box) -> Box:
    """``box`` grown by ``margin`` px on every side, clipped to ``bbox``."""
    return (max(box[0] - margin, bbox[0]), max(box[1] - margin, bbox[1]),
            min(box[2] + margin, bbox[2]), min(box[3] + margin, bbox[3]))


def _embed(field: torch.Tensor, box: Box, window: Box) -> torch.Tensor:
    """A field ``[2, h, w]`` over ``box`` placed in zeros ``[2, H, W]`` over ``window`` (which contains box)."""
    out = torch.zeros(2, *_shape(window))
    out[:, box[1] - window[1]:box[3] - window[1], box[0] - window[0]:box[2] - window[0]] = field
    return out


def _crop(array, box: Box, window: Box):
    """The part over ``box`` of an array or tensor ``[..., H, W]`` over ``window``."""
    return array[..., box[1] - window[1]:box[3] - window[1], box[0] - window[0]:box[2] - window[0]]


def compose_chunk(first_layer, z: int, then: torch.Tensor, box: Box, bbox: Box) -> torch.Tensor:
    """``helpers.compose(f, then)`` over ``box``, ``f`` the field ``[2, ...]`` of ``first_layer`` at section z.

    then: ``[2, h, w]`` px over ``box``. ``f`` is read over ``box`` grown by the
    largest ``|then|`` plus 1 px (clipped to ``bbox``, where ``compose`` reads
    the border as it does on a whole section). ``then == 0`` returns ``f`` as read.
    """
    if not then.any():
        return _read_field(first_layer, z, box)
    window = _grown(box, _margin(then), bbox)
    first = _read_field(first_layer, z, window)
    return _crop(compose(first[None], _embed(then, box, window)[None])[0], box, window)


def warp_chunk(source, z: int, field: torch.Tensor, box: Box, bbox: Box, pull=apply_field) -> np.ndarray:
    """Section z of ``source`` over ``box`` pulled through ``field`` ``[2, h, w]`` (px): uint8 ``[h, w]``.

    The raw section is read over ``box`` grown by the largest ``|field|`` plus 1 px
    (clipped to ``bbox``; beyond it is missing data, as for a whole section).
    ``pull(raw [H, W], field [2, H, W])`` warps it (``alignment.aligned_defects`` for a defect layer).
    """
    window = _grown(box, _margin(field), bbox)
    raw = _read(source, z, window)[0]
    return _crop(pull(raw, _embed(field, box, window)), box, window)


# ------------------------------------------------------------------------------------- the tasks
@functools.lru_cache(maxsize=2)
def _load(archive: str, modified_ns: int, device: str):
    model, _ = load_archive(archive, device)
    return for_inference(model)


def model_of(job: Job):
    """The job's network on its device (loaded once per process, again if the archive file changes)."""
    device = check_device(job.device)
    archive = Path(job.archive)
    return _load(job.archive, archive.stat().st_mtime_ns if archive.is_file() else 0, device)


def _summary(job: Job, first: int) -> dict:
    """The finished-block marker of the block starting at ``first``; ``RuntimeError`` if it is not finished."""
    last = dict(job.blocks())[first]
    summary = _progress(job).get_json(f"block/{first}-{last}")
    if summary is None:
        raise RuntimeError(f"block {first}..{last} of {job.dest} is not aligned yet")
    return summary


@queueable
def block_task(job: dict, first: int) -> None:
    """Phase 1: align the block starting at section ``first`` into ``DEST/block_field`` (module docstring).

    Skipped if the block is marked finished; resumes after its last marked section.
    """
    job = Job(**job)
    last = dict(job.blocks())[first]
    marks = _progress(job)
    if marks.exists(f"block/{first}-{last}"):
        return
    check_task_memory(job, machine_memory())
    names = list(marks.list(prefix=f"block/{first}/"))
    found = {int(name.rsplit("/", 1)[1]): content  # b"done", b"blank" or b"passed" (not aligned to)
             for name, content in zip(names, volume.get_many(marks, names, as_json=False))}
    model = model_of(job)
    if not found:
        origin = _block_start(job, model, first)
        if origin < first:  # its first section matches nowhere: the block starts at one the block before aligned
            marks.put(f"block/{first}/{origin}", b"done")
            found[origin] = b"done"
        for z in range(first, origin):  # the range's first sections match nowhere: written unmoved, passed over
            warn_passed_over(z)
            marks.put(f"block/{first}/{z}", b"passed")
            found[z] = b"passed"
    origin = min(found, default=first)  # the section the block starts at: its first, or one before (_block_start)
    start = next(z for z in itertools.count(origin) if z not in found)
    blank = {z: found[z] == b"blank" for z in range(origin, start)}  # z -> blank, of the sections aligned or read
    reference = min((z for z in blank if not blank[z]), default=None)
    passed = 0  # sections passed over since the last one aligned to (align_serial's)
    for z in (z for z in blank if not blank[z]):
        passed = passed + 1 if found[z] == b"passed" else 0
    source, fields = _layer(job.source, job.mip), _dest(job, "block_field")

    def defects(z: int):  # section z's defect map, or None without a defect layer
        return read_defects(job, z, job.bbox) if job.defects else None

    def checked_defects(z: int):  # of a section this task aligns: a warning where it marks every pixel
        marks = defects(z)
        if marks.all():
            warn_all_defect(z)
        return marks

    def aligned_before(z: int) -> tuple:  # (raw, aligned, G_z, defects) of a section this block aligned before
        raw = _read(source, z, job.bbox)[0]
        g = torch.zeros(2, *raw.shape) if z == reference else _read_field(fields, z, job.bbox)
        return raw, apply_field(raw, g), g, defects(z)

    before = [aligned_before(z) for z in [z for z in blank if found[z] == b"done"][-job.vote:]]

    def sections():  # raw sections from ``start``; past ``last`` only while the one before is blank
        z = start
        while z < job.z_stop and (z <= last or blank[z - 1]):
            raw = _read(source, z, job.bbox)[0]
            blank[z] = is_blank(raw)  # as align_serial decides
            yield raw
            z += 1

    results = align_serial(model, sections(), before, job.raw_neighbour, job.vote, job.pair,
                           defects=map(checked_defects, itertools.count(start)) if job.defects else None, first=start,
                           passed=passed, bias=job.bias)
    for z, (_, g, kept) in enumerate(results, start):
        if reference is None and not blank[z]:
            reference = z
        if z > first and z != reference:
            _write(fields, g.numpy().astype(np.float32), z, job.bbox)
        marks.put(f"block/{first}/{z}", b"blank" if blank[z] else b"done" if kept else b"passed")
    marks.put_json(f"block/{first}-{last}", {"reference": reference, "blank": [z for z in blank if blank[z]]})


BIAS_CROP = 1024  # px: stack_bias reads the central square of each section this big (or the bbox, where smaller)


def stack_bias(job: Job, model) -> tuple[float, float]:
    """``alignment.network_bias`` of the serial job's range, on the central ``BIAS_CROP`` px square of its bbox: the
    network's bias on this stack, which serial tasks take off every pair field (``(0, 0)`` for a solve: its pairs
    both ways cancel it), rounded to 1e-3 px (the run record keeps it)."""
    if job.solve:
        return 0.0, 0.0
    x0, y0, x1, y1 = job.bbox
    w, h = min(BIAS_CROP, x1 - x0), min(BIAS_CROP, y1 - y0)
    box = (x0 + (x1 - x0 - w) // 2, y0 + (y1 - y0 - h) // 2)
    box = (*box, box[0] + w, box[1] + h)
    source = _layer(job.source, job.mip)
    bias = alignment.network_bias(model, lambda i: _read(source, job.z_start + i, box)[0], job.z_stop - job.z_start,
                                  job.pair)
    return tuple(round(float(b), 3) for b in bias)


def _block_start(job: Job, model, first: int) -> int:
    """The section the serial block that starts at ``first`` keeps fixed: ``first``, or where the section after it
    matches it nowhere (``alignment.matches_nowhere``: noise, other tissue), the nearest of the ``PASS_OVER``
    sections before it that the section after does match (within the block before, which aligned it);
    ``align_serial`` then passes over those between, as the block before did. The range's first block has no
    section before: there the first of ``first`` and the ``PASS_OVER`` sections after it that the section after it
    matches (the sections before it match nowhere, so they are noise: passed over, and never aligned to). ``first``
    where a section read is blank, where none matches, or for a later block with ``--vote`` (which does not pass
    over: the section it starts at would be voted onto)."""
    if first + 1 >= job.z_stop or job.vote > 1 and first > job.z_start:
        return first
    source = _layer(job.source, job.mip)

    @functools.cache  # a section is in two of the pairs tried forward
    def section(z: int) -> tuple:  # (raw, defect map or None)
        return _read(source, z, job.bbox)[0], read_defects(job, z, job.bbox) if job.defects else None

    def matches(z: int, t: int) -> bool | None:  # whether section z matches section t; None where either is blank
        (raw, marks), (target, target_marks) = section(z), section(t)
        if is_blank(raw) or is_blank(target):
            return None
        return not alignment.matches_nowhere(model, raw, target, job.pair, (marks, target_marks))
    if first == job.z_start:  # forward: each section onto the one before, up to the range's last but one
        pairs = [(z + 1, z) for z in range(first, min(first + PASS_OVER, job.z_stop - 2) + 1)]
    else:  # back: the section after onto the block before's
        pairs = [(first + 1, z) for z in range(first, max(first - PASS_OVER, first - job.block + 1) - 1, -1)]
    for z, t in pairs:
        match = matches(z, t)
        if match is None:
            return first
        if match:
            return t
    return first


@queueable
def stitch_task(job: dict, x: int, y: int) -> None:
    """Phase 2: every block's ``C_b`` over the xy chunk at corner ``(x, y)``, into ``DEST/block_frame``."""
    job = Job(**job)
    box = job.chunk_box(x, y)
    fields, frames = _dest(job, "block_field"), _dest(job, "block_frame")
    frame, previous = torch.zeros(2, *_shape(box)), None
    for first, _ in job.blocks():
        reference = _summary(job, first)["reference"]
        if reference is None:  # only blank sections from here on
            break
        if previous is not None and reference != previous:
            frame = compose_chunk(fields, reference, frame, box, job.bbox)
        _write(frames, frame.numpy(), first, box)
        previous = reference


@queueable
def render_task(job: dict, z: int, x: int, y: int) -> None:
    """Phase 3: section z over the xy chunk at corner ``(x, y)`` into ``DEST/image`` and ``DEST/field`` (and, with a
    defect layer, its labels pulled through the field by nearest sampling into ``DEST/defects``)."""
    job = Job(**job)
    box = job.chunk_box(x, y)
    first = job.blocks()[job.owner(z)][0]
    summary = _summary(job, first)
    field = None
    if z not in summary["blank"]:
        frame, fields = _read_field(_dest(job, "block_frame"), first, box), _dest(job, "block_field")
        field = frame if z == summary["reference"] else compose_chunk(fields, z, frame, box, job.bbox)
    _render(job, z, box, field)


def _render(job: Job, z: int, box: Box, field: torch.Tensor | None) -> None:
    """Section z over ``box`` pulled through ``field`` ``[2, h, w]`` (px) into ``DEST/image``, ``field`` into
    ``DEST/field`` and, with ``job.defects``, the section's labels pulled through it (nearest) into ``DEST/defects``;
    ``field`` None: a blank section (blank image and labels, zero field)."""
    blank = field is None
    if blank:
        image, field = np.zeros(_shape(box), np.uint8), torch.zeros(2, *_shape(box))
    else:
        image = warp_chunk(_layer(job.source, job.mip), z, field, box, job.bbox)
    _write(_dest(job, "image"), image[None], z, box)
    _write(_dest(job, "field"), field.numpy().astype(np.float32), z, box)
    if job.defects:
        marks = np.zeros_like(image) if blank else \
            warp_chunk(_layer(job.defects, job.mip), z, field, box, job.bbox, aligned_defects)
        _write(_dest(job, "defects"), marks[None], z, box)


# ------------------------------------------------------------------------------------ the solve's tasks
def pair_offsets(job: Job) -> list[int]:
    """The neighbour offsets ``-K..-1, 1..K`` (K = ``job.solve.neighbours``), then with defect maps and ``--pieces``
    ``-(K+1), K+1`` (the pairs of sections placed by pieces: ``alignment.placed_by_pieces``): the order of
    ``DEST/pair_field``'s channel pairs."""
    k = job.solve.neighbours
    return [*range(-k, 0), *range(1, k + 1), *([-k - 1, k + 1] if job.defects and job.pair.pieces else [])]


def _prealigned(job: Job, usable: list[int]) -> dict:
    """``{(z, t): (rigid, unmatched)}``: every pair of the ``usable`` sections' prealign markers (a section with no
    pair, the only usable one, has none)."""
    markers = volume.get_many(_progress(job), [f"solve/prealign/{z}" for z in usable])
    return {(z, t): (rigid, unmatched) for z, marker in zip(usable, markers) if marker is not None
            for t, rigid, unmatched in zip(marker["targets"], marker["rigid"],
                                           marker.get("unmatched", [False] * len(marker["targets"])))}  # or older


def _placed(job: Job, usable: list[int]) -> set[int]:
    """``alignment.placed_by_pieces`` of the ``usable`` sections (those passed over left out), from their prealign
    markers."""
    return placed_by_pieces(usable, {pair: rigid for pair, (rigid, _) in _prealigned(job, usable).items()})


def _passed(job: Job, usable: list[int]) -> set[int]:
    """``alignment.passed_over`` of the ``usable`` sections, from their prealign markers."""
    return passed_over(usable, {pair for pair, (_, unmatched) in _prealigned(job, usable).items() if unmatched})


def solve_margin(job: Job) -> int:
    """Usable sections a solve task solves beyond each side of its z block: enough that cutting the chain there
    leaves at most ``CUT_EFFECT`` of a change at the cut on the block's sections (``solve.chain_decay``)."""
    return math.ceil(math.log(CUT_EFFECT) / math.log(chain_decay(job.solve.pull, job.solve.neighbours)))


def _defect_maps(job: Job, sections, box: Box) -> dict | None:
    """``{z: uint8 [h, w]}``: the defect maps of ``sections`` over ``box``; None without a defect layer."""
    return {z: read_defects(job, z, box) for z in sections} if job.defects else None


@queueable
def scan_task(job: dict, z: int) -> None:
    """Solve phase 1: whether section z is blank (``alignment.is_blank``, from its ``tissue_moments`` added up chunk
    by chunk) and its tissue's mean and std (``alignment.section_stats``, how its pair fields normalise it), into the
    marker ``solve/scan/Z``, and its ``alignment.thumbnail`` (with its defect map's where the job has one; put together
    chunk by chunk) into ``solve/thumbnail/Z`` (``.npy``); skipped if the marker is there."""
    job = Job(**job)
    marks, name = _progress(job), f"solve/scan/{z}"
    if marks.exists(name):
        return
    source, factor = _layer(job.source, job.mip), thumbnail_factor(_shape(job.bbox))
    moments, thumb = 0, np.zeros((3, *(n // factor for n in _shape(job.bbox))), np.float32)
    all_defect = bool(job.defects)  # so far: every chunk's defect map marks every pixel
    for x, y in job.chunk_corners():
        box = job.chunk_box(x, y)
        raw = _read(source, z, box)[0]
        moments = moments + tissue_moments(raw)
        defects = read_defects(job, z, box) if job.defects else None
        all_defect = all_defect and bool(defects.all())
        # the chunk's corner is a multiple of the factor (a power of two) from bbox's
        part = thumbnail(raw, factor, defects)
        row, column = (y - job.bbox[1]) // factor, (x - job.bbox[0]) // factor
        thumb[:, row:row + part.shape[1], column:column + part.shape[2]] = part
    if all_defect:
        warn_all_defect(z)
    _put_array(marks, f"solve/thumbnail/{z}", thumb)
    mean, std = section_stats(moments)
    marks.put_json(name, {"blank": is_blank(moments=moments), "mean": mean, "std": std})


def _scans(job: Job, sections) -> list[dict | None]:
    """The scan markers of ``sections`` (None for a section not scanned yet)."""
    return volume.get_many(_progress(job), [f"solve/scan/{z}" for z in sections])


def _stats(scan: dict) -> tuple[float, float]:
    """A section's ``(mean, std)`` from its scan marker."""
    return scan["mean"], scan["std"]


@queueable
def prealign_task(job: dict, z: int, targets: list) -> None:
    """Solve phase 2: the pre-alignment (``alignment.pair_prealignment``, on the scan's thumbnails and stats) of
    section z onto each of ``targets`` (as ``pair_task``'s; None: no target) that the marker ``solve/prealign/Z``
    does not hold yet, found once for the whole section, added to it (JSON ``{"targets": [...], "rigid": [matrix
    [2, 3] or "pieces", ...], "unmatched": [...], "inverted": [...]}``: float64 survives JSON; "pieces": the field
    on the pieces' grid is in ``solve/pieces/Z/T``, ``.npy``; "unmatched": whether the pair matches nowhere,
    ``alignment.matching``; "inverted": whether it matches with the source's contrast inverted, and ``pair_task``
    inverts it so).
    Later phases add the pairs past sections passed over and one neighbour further: the nearest pairs stay, so the
    sections passed over (``alignment.passed_over``) and placed by pieces read the same from the markers."""
    job = Job(**job)
    marks, name = _progress(job), f"solve/prealign/{z}"
    marker = marks.get_json(name) or {"targets": [], "rigid": [], "unmatched": [], "inverted": []}
    for key in ("unmatched", "inverted"):  # an older run's marker has neither
        marker.setdefault(key, [False] * len(marker["targets"]))
    todo = [t for t in targets if t is not None and t not in marker["targets"]]
    if not todo:
        return
    sections = [z, *todo]
    stats = dict(zip(sections, map(_stats, _scans(job, sections))))
    thumbs = {t: _get_array(marks, f"solve/thumbnail/{t}") for t in sections}
    factor = thumbnail_factor(_shape(job.bbox))
    for t in todo:
        with naming(z, t), matching() as poor:
            match, inverted = pair_prealignment(model_of(job), thumbs[z], thumbs[t], (stats[z], stats[t]), job.pair,
                                                factor)
        if match.shape != (2, 3):
            _put_array(marks, f"solve/pieces/{z}/{t}", match)
        marker["targets"].append(t)
        marker["rigid"].append(match.tolist() if match.shape == (2, 3) else "pieces")
        marker["unmatched"].append(any(poor))
        marker["inverted"].append(inverted)
    marks.put_json(name, marker)


@queueable
def pair_task(job: dict, z: int, targets: list, x: int, y: int) -> None:
    """Solve phase 3: the pair fields of section z onto ``targets`` (the usable sections at ``_offsets``, None
    where there is none) over the xy chunk at corner ``(x, y)``, into ``DEST/pair_field`` at z (2 channels per
    offset, zero where None); skipped if the marker ``solve/pair/Z/X_Y`` holds these targets.

    Each is ``alignment.pair_field`` (unsmoothed, with the two sections' defect maps) on the chunk grown by
    ``alignment.pair_context`` px (clipped to the bbox), cropped to the chunk: the network's context, the
    whole-section shift's reach and, with ``refine``, the first pass's low-pass. Each section is normalised by its
    whole section's stats (its scan marker) and the source moved by the pair's whole-section rigid match (the
    prealign marker), so the network sees on the chunk what it sees there on the whole section. With one chunk
    covering the bbox: ``align_solved``'s pair fields exactly.
    """
    job = Job(**job)
    marks, name = _progress(job), f"solve/pair/{z}/{x}_{y}"
    if marks.get_json(name) == {"targets": targets}:
        return
    box = job.chunk_box(x, y)
    window = _grown(box, pair_context(job.pair, model_of(job)), job.bbox)
    sections = [z, *(t for t in targets if t is not None)]
    source, unsmoothed = _layer(job.source, job.mip), dataclasses.replace(job.pair, smooth=0)
    raw, defects = {t: _read(source, t, window)[0] for t in sections}, _defect_maps(job, sections, window)
    stats = dict(zip(sections, map(_stats, _scans(job, sections))))
    prealigned = marks.get_json(f"solve/prealign/{z}")
    rigid = dict(zip(prealigned["targets"], prealigned["rigid"]))
    inverted = dict(zip(prealigned["targets"], prealigned.get("inverted", [])))  # an older run's marker: none
    corner = window[0] - job.bbox[0], window[1] - job.bbox[1]
    fields = np.zeros((len(targets), 2, *_shape(box)), np.float32)
    for i, t in enumerate(targets):
        if t is not None:
            match = _get_array(marks, f"solve/pieces/{z}/{t}") if rigid[t] == "pieces" else rigid[t]
            given = (stats[z], stats[t])
            field = alignment.pair_field(model_of(job), raw[z], raw[t], unsmoothed,
                                         None if defects is None else (defects[z], defects[t]),
                                         inverted_stats(given) if inverted.get(t) else given,
                                         rigid_field(match, corner, _shape(window), piece_factor(_shape(job.bbox))))
            fields[i] = _crop(field, box, window).numpy()
    _write(_dest(job, "pair_field"), fields.reshape(-1, *_shape(box)), z, box)
    marks.put_json(name, {"targets": targets})


@queueable
def solve_task(job: dict, first: int, window: list, blank: list, placed: list, passed: list, x: int, y: int) -> None:
    """Solve phase 4: the fields of the z block starting at ``first`` over the xy chunk at corner ``(x, y)``, in the
    solve's own frame, into ``DEST/solved``; skipped if the marker ``solve/block/FIRST/X_Y`` holds this window.

    ``window``: ``[w0, w1)``, the block grown by ``solve_margin`` usable sections each side (to the range's ends
    where fewer are left); ``blank``: its blank sections; ``placed``: its sections paired one neighbour further
    (``alignment.placed_by_pieces``); ``passed``: those passed over (``alignment.passed_over``: in no pair, moved
    as the section before them). Its pairs (``solve.neighbour_pairs``) are solved jointly
    as ``align_solved`` does (``alignment.solve_fields``) on the chunk grown by ``2 smooth + overlap`` px (the
    low-pass's reach and the reach of the warp by the fields; clipped to the bbox), from ``DEST/pair_field``, the
    raw sections (the weights) and the defect maps; the block's own sections are kept, cropped to the chunk.

    Where that would hold more than ``job.task_memory`` GB, in two tiers, so that memory is set by the block, not
    by ``solve_margin`` (38 sections each side at the default pull): at full resolution only the *tier*, the block
    grown by ``detail_margin`` usable sections each side (``_solve_tier``: the detail, pulled hard, feels a cut
    that far away no more than ``CUT_EFFECT``); where the tier cuts the window, what the sections beyond change
    (the slow coarse part) is added: the solve of the whole window less that of the tier, both at
    ``1 / coarse_factor`` the resolution (their shared error of resolution cancels; ``_changes``), and each round of
    the tier's solve is linearised where the whole window's is (at its fields plus that change at the round before),
    so that it reads the pair fields, weighs the pairs and carries the defects where the whole solve does. Without
    ``task_memory``, or with one block and one chunk: ``align_solved``'s solve exactly.
    """
    job = Job(**job)
    marks, name = _progress(job), f"solve/block/{first}/{x}_{y}"
    record = {"window": window, "blank": blank, "placed": placed, "passed": passed}
    if marks.get_json(name) == record:
        return
    check_task_memory(job, machine_memory())
    box, last = job.chunk_box(x, y), dict(job.solve_blocks())[first]
    usable = [z for z in range(*window) if z not in blank]
    inner = [i for i, z in enumerate(usable) if first <= z <= last]  # the block's usable sections (positions)
    solved = torch.zeros(last + 1 - first, 2, *_shape(box))
    if len(usable) > 1 and inner:
        grown = _grown(box, 2 * job.pair.smooth + job.pair.overlap, job.bbox)
        margin = detail_margin(job) if _needs_tiers(job, len(usable), math.prod(_shape(grown))) else len(usable)
        start, stop = inner[0] - margin, inner[-1] + 1 + margin
        tier = range(usable[start] if start > 0 else window[0],
                     usable[stop - 1] + 1 if stop < len(usable) else window[1])
        if tier == range(*window):
            fields = _solve_tier(job, tier, blank, placed, passed, _tier_inputs(job, tier, blank + passed, grown, 1), 1)
        else:  # what the sections beyond the tier change, at each round and at the end, from coarse solves
            factor, (h, w) = coarse_factor(job), _shape(grown)
            changes = _changes(job, range(*window), tier, blank, placed, passed, grown, factor)

            def full(change):  # at full resolution, over ``grown``
                return upsample_field(change, factor)[..., :h, :w]
            fields = _solve_tier(job, tier, blank, placed, passed, _tier_inputs(job, tier, blank + passed, grown, 1), 1,
                                 lambda round_, solution: solution + full(changes[round_])) + full(changes[-1])
        solved[[usable[i] - first for i in inner]] = _crop(fields[[usable[i] - tier[0] for i in inner]], box, grown)
    _write(_dest(job, "solved"), solved.numpy(), first, box)
    marks.put_json(name, record)


def _needs_tiers(job: Job, sections: int, pixels: int) -> bool:
    """Whether solving ``sections`` of ``pixels`` px each at full resolution would hold more than ``job.task_memory``
    GB (``SOLVE_BYTES`` per pixel of each section)."""
    return job.task_memory is not None and sections * pixels * SOLVE_BYTES > job.task_memory * 2 ** 30


def task_bytes(job: Job) -> int:
    """About the most memory one task of ``job`` holds, in bytes. A block task: ``SERIAL_BYTES`` per pixel of a whole
    section, and ``VOTE_BYTES`` more for each further section voted over. A solve task: ``SOLVE_BYTES`` per pixel of
    each section it solves at full resolution, over the largest window (an xy chunk grown as ``solve_task`` grows it,
    its z block grown by ``solve_margin`` sections each side, or by ``detail_margin`` where ``job.task_memory`` asks
    for tiers; blank sections counted in)."""
    if not job.solve:
        return math.prod(_shape(job.bbox)) * (SERIAL_BYTES + VOTE_BYTES * (job.vote - 1))
    grow, (x0, y0, x1, y1) = 2 * job.pair.smooth + job.pair.overlap, job.bbox
    pixels = min(job.xy_chunk + 2 * grow, x1 - x0) * min(job.xy_chunk + 2 * grow, y1 - y0)
    sections = min(job.block + 2 * solve_margin(job), job.z_stop - job.z_start)
    if _needs_tiers(job, sections, pixels):
        sections = min(job.block + 2 * detail_margin(job), sections)
    return sections * pixels * SOLVE_BYTES


def check_task_memory(job: Job, memory: int | None) -> None:
    """A ``UserError`` where a task of ``job`` would hold more than ``memory`` bytes (``task_bytes``; None: not
    known): killed for it with no word, it would be leased again and again. The message names flags that make it
    fit: for a solve ``--block`` 8 with ``--task_memory`` at half the memory, then a smaller ``--task_chunk``; for
    serial alignment, whose tasks hold whole sections, ``--solve``."""
    need = task_bytes(job)
    if memory is None or need <= memory:
        return
    if not job.solve:
        width, height = _shape(job.bbox)[::-1]
        check_memory(need, memory, f"a block task (whole sections of {width} x {height} px)",
                     "align with --solve (its tasks hold xy chunks of --task_chunk px), or a smaller --bbox or a "
                     "coarser --mip")
    cap = max(1, int(memory / 2 ** 30 / 2))
    hint = "--block 8 and --task_memory (GB), or a smaller --task_chunk"
    for chunk in (job.xy_chunk, 256, 128):
        capped = dataclasses.replace(job, block=min(job.block, 8), task_memory=cap, xy_chunk=min(job.xy_chunk, chunk))
        if task_bytes(capped) <= memory:
            hint = f"--block {capped.block} --task_memory {cap}" + (
                f" --task_chunk {capped.xy_chunk}" if capped.xy_chunk != job.xy_chunk else "")
            break
    check_memory(need, memory, "--solve: a solve task", f"add {hint} (README: --solve as tasks)")


def detail_margin(job: Job) -> int:
    """Usable sections a solve task solves at full resolution beyond each side of its z block: enough that the
    detail (``SolveSettings.detail_pull``), held at 0 at the cuts, keeps ``CUT_EFFECT`` of its change there at
    most (``solve.chain_decay``); ``solve_margin`` (no cut within the window) where the fields are not split into
    a coarse part and detail (``coarse_factor`` 1) or the detail is dropped."""
    if coarse_factor(job) == 1 or not math.isfinite(job.solve.detail_pull):
        return solve_margin(job)
    return math.ceil(math.log(CUT_EFFECT) / math.log(chain_decay(job.solve.detail_pull, job.solve.neighbours)))


def coarse_factor(job: Job) -> int:
    """How much coarser than the sections ``solve_task``'s coarse solves are: ``smooth // COARSE_SAMPLES`` (the
    low-pass's box then spans ``2 COARSE_SAMPLES + 1`` coarse pixels), at least 1."""
    return max(1, job.pair.smooth // COARSE_SAMPLES)


def _tier_inputs(job: Job, sections: range, blank: list, grown: Box, factor: int) -> dict[int, tuple]:
    """``{z: (pair fields [2K, 2, h, w] or None where blank, tissue [h, w], defects uint8 [h, w] or None)}`` of
    ``sections`` over ``grown`` at ``1 / factor`` the resolution: ``DEST/pair_field`` by ``helpers.downsample_field``,
    the tissue (non-zero) fraction and the defects by the mean and the max over each ``factor`` square. One read of
    each section, one at a time."""
    source, pair_layer, inputs = _layer(job.source, job.mip), _dest(job, "pair_field"), {}
    for z in sections:
        fields = None if z in blank else \
            downsample_field(_read_field(pair_layer, z, grown).view(-1, 2, *_shape(grown)), factor)
        tissue = F.avg_pool2d((~missing_data(_read_field(source, z, grown))).float(), factor, ceil_mode=True)[0]
        defects = None if not job.defects else F.max_pool2d(
            torch.from_numpy(read_defects(job, z, grown))[None].float(), factor, ceil_mode=True)[0].to(torch.uint8)
        inputs[z] = fields, tissue, defects
    return inputs


def _changes(job: Job, window: range, tier: range, blank: list, placed: list, passed: list, grown: Box,
             factor: int) -> list[torch.Tensor]:
    """What the sections of ``window`` beyond ``tier`` change on the tier's fields: ``[len(tier), 2, h, w]`` (px of
    ``1 / factor`` the resolution) at the fields each round of the solve is linearised at (``solve.solve_stack``'s
    rounds; zero at round 0), then at the end. The solve of the whole window less that of the tier, both at that
    resolution, the tier's linearised each round at the window's fields (so that both weigh the pairs alike)."""
    inputs = _tier_inputs(job, window, blank + passed, grown, factor)
    cut = slice(tier.start - window.start, tier.stop - window.start)
    points, own = [], []  # per round: the window's fields over the tier, and the tier's own

    def window_round(_, fields):  # the window's solve, as it is: its fields over the tier noted
        points.append(fields[cut])
        return fields

    def tier_round(round_, fields):  # the tier's solve, linearised where the window's was
        own.append(fields)
        return points[round_]

    whole = _solve_tier(job, window, blank, placed, passed, inputs, factor, window_round)
    short = _solve_tier(job, tier, blank, placed, passed, inputs, factor, tier_round)
    return [point - at for point, at in zip(points, own)] + [whole[cut] - short]


def _solve_tier(job: Job, sections: range, blank: list, placed: list, passed: list, inputs: dict[int, tuple],
                factor: int, around=None) -> torch.Tensor:
    """``[len(sections), 2, h, w]`` (px of the inputs' resolution): ``alignment.solve_fields`` of the consecutive
    ``sections`` (those in ``blank`` left out, and those in ``passed`` moved as the section before them; each other
    one paired with its K nearest such ones on each side, those in ``placed`` with the one further too)
    from their ``_tier_inputs`` at ``1 / factor`` the resolution, with the settings in px (``smooth``, ``robust``)
    scaled to it: split at ``round(smooth / factor)`` px, the robust scale ``robust / factor`` px, so that a pair's
    residual weighs it as at full resolution (a scale left in px of the sections kept pairs the full-resolution
    solve stops: fields ~1 px p99 from the whole solve's on the demo, against 0.06). ``around``:
    ``solve.solve_stack``'s."""
    skip = {i for i, z in enumerate(sections) if z in blank or z in passed}
    further = {i for i, z in enumerate(sections) if z in placed}
    pairs, slot = neighbour_pairs(len(sections), job.solve.neighbours, skip, further), pair_offsets(job)
    place = {i: n for n, i in enumerate(i for i in range(len(sections)) if i not in skip)}  # position among paired
    fields = [inputs[sections[s]][0][slot.index(place[t] - place[s])] for s, t in pairs]
    tissue = torch.stack([inputs[z][1] for z in sections])
    defects = torch.stack([inputs[z][2] for z in sections]) if job.defects else None
    settings = dataclasses.replace(job.solve, robust=job.solve.robust / factor)
    return solve_fields(tissue, pairs, torch.stack(fields), settings, round(job.pair.smooth / factor), defects,
                        around, [i for i, z in enumerate(sections) if z in passed])


def invert_chunk(layer, z: int, box: Box, bbox: Box) -> torch.Tensor:
    """``helpers.invert_field`` over ``box`` of the field ``[2, ...]`` of ``layer`` at section z: ``[2, h, w]`` px.

    The inversion reads the field at ``p + inverse(p)``, about ``-field``: the field is read over ``box`` grown by
    its largest ``|displacement|`` plus 1 px, grown again while what it read asks for more (clipped to ``bbox``,
    where the inversion reads the border as it does on a whole section).
    """
    margin = _margin(_read_field(layer, z, box))
    while True:
        window = _grown(box, margin, bbox)
        field = _read_field(layer, z, window)
        if _margin(field) <= margin:
            return _crop(invert_field(field[None])[0], box, window)
        margin = _margin(field)


@queueable
def solved_frame_task(job: dict, reference: int, x: int, y: int) -> None:
    """Solve phase 5: ``invert_field`` of the solved field of ``reference`` (the range's first usable section) over
    the xy chunk at corner ``(x, y)`` (``invert_chunk``), into ``DEST/solved_frame`` at z = ``reference``. Always
    redone (one per chunk): a run that extends the range may have changed the reference's solved field."""
    job = Job(**job)
    box = job.chunk_box(x, y)
    inverse = invert_chunk(_dest(job, "solved"), reference, box, job.bbox)
    _write(_dest(job, "solved_frame"), inverse.numpy(), reference, box)


@queueable
def solved_render_task(job: dict, z: int, reference: int | None, x: int, y: int) -> None:
    """Solve phase 6: section z over the xy chunk at corner ``(x, y)``, pulled into the frame of ``reference`` (the
    range's first usable section; None: z is blank) as ``helpers.in_frame_of`` does, ``F_z = compose(solved_z,
    invert_field(solved_ref))`` (the inverse from ``DEST/solved_frame``, ``compose_chunk``), into ``DEST/image``,
    ``field`` (and ``defects``) as ``render_task`` writes them."""
    job = Job(**job)
    box = job.chunk_box(x, y)
    field = None if reference is None else compose_chunk(
        _dest(job, "solved"), z, _read_field(_dest(job, "solved_frame"), reference, box), box, job.bbox)
    _render(job, z, box, field)


def usable_sections(job: Job) -> list[int]:
    """The range's sections the scan found not blank; ``RuntimeError`` if one is not scanned yet."""
    sections = range(job.z_start, job.z_stop)
    scans = _scans(job, sections)
    if None in scans:
        raise RuntimeError(f"section {sections[scans.index(None)]} of {job.dest} is not scanned yet")
    return [z for z, scan in zip(sections, scans) if not scan["blank"]]


def solve_window(job: Job, usable: list[int], first: int, last: int) -> list[int]:
    """``[w0, w1)``: the z block ``first..last`` grown by ``solve_margin`` of the ``usable`` sections on each side,
    to the range's end on a side with fewer."""
    margin = solve_margin(job)
    before, after = [z for z in usable if z < first], [z for z in usable if z > last]
    return [before[-margin] if len(before) >= margin else job.z_start,
            after[margin - 1] + 1 if len(after) >= margin else job.z_stop]


def solve_phases(job: Job, sections: list[int]) -> list[Phase]:
    """The solve's seven phases (eight where ``pair_offsets`` pairs further; module docstring) that align ``job`` and
    render ``sections``; each after the scan is made when it starts (from the markers of the phases before)."""
    payload, corners, offsets = asdict(job), job.chunk_corners(), pair_offsets(job)
    near = job.solve.neighbours
    further = len(offsets) > 2 * near  # sections placed by pieces may be paired one neighbour further

    def targets(far=frozenset(), passed=frozenset()):  # (z, its targets) of every usable section not ``passed``
        # over, when there is a pair; one neighbour further (the last two offsets, where there are) only for a pair
        # with a section in ``far``
        usable = [z for z in usable_sections(job) if z not in passed]
        return [(z, [usable[i + d] if 0 <= i + d < len(usable) and (abs(d) <= near or {z, usable[i + d]} & far)
                     else None for d in offsets]) for i, z in enumerate(usable)] if len(usable) > 1 else []

    @functools.cache
    def passed() -> frozenset:  # the sections passed over, read once the prealign phase is over
        found = _passed(job, usable_sections(job))
        for z in sorted(found):
            warn_passed_over(z)
        return frozenset(found)

    @functools.cache
    def placed() -> frozenset:  # the sections paired one neighbour further, read once the pairs past are prealigned
        return frozenset(_placed(job, [z for z in usable_sections(job) if z not in passed()]) if further else ())

    def prealigns():
        return [functools.partial(prealign_task, payload, z, these) for z, these in targets()]

    def prealigns_past():  # the pairs past the sections passed over: of the sections whose targets they change
        before = dict(targets()) if passed() else {}
        return [functools.partial(prealign_task, payload, z, these) for z, these in targets(passed=passed())
                if these != before.get(z, these)]

    def prealigns_further():  # the placed sections' and their partners' pairs one neighbour further
        return [functools.partial(prealign_task, payload, z, these) for z, these in targets(placed(), passed())
                if any(these[2 * near:])]

    def pairs():
        return [functools.partial(pair_task, payload, z, these, x, y) for z, these in targets(placed(), passed())
                for x, y in corners]

    def solves():
        usable = usable_sections(job)
        windows = [(first, solve_window(job, usable, first, last)) for first, last in job.solve_blocks()]
        return [functools.partial(solve_task, payload, first, window, [z for z in range(*window) if z not in usable],
                                  *(sorted(z for z in kind() if window[0] <= z < window[1])
                                    for kind in (placed, passed)), x, y)
                for first, window in windows for x, y in corners]

    def frames():
        usable = usable_sections(job)
        return [functools.partial(solved_frame_task, payload, usable[0], x, y) for x, y in corners] if usable else []

    def renders():
        usable = usable_sections(job)
        return [functools.partial(solved_render_task, payload, z, usable[0] if z in usable else None, x, y)
                for z in sections for x, y in corners]

    return [("scan", [functools.partial(scan_task, payload, z) for z in range(job.z_start, job.z_stop)]),
            ("prealign", prealigns), ("prealign past", prealigns_past),
            *([("prealign further", prealigns_further)] if further else []),
            ("pairs", pairs), ("solve", solves), ("frame", frames), ("render", renders)]


# ------------------------------------------------------------------------------------ the driver
def phases(job: Job, sections: list[int]) -> list[Phase]:
    """The phases' tasks (each a call with no arguments) that align ``job`` and render ``sections``: the serial
    tasks' three, or the solve's seven (``solve_phases``)."""
    if job.solve:
        return solve_phases(job, sections)
    payload, corners = asdict(job), job.chunk_corners()
    return [("blocks", [functools.partial(block_task, payload, first) for first, _ in job.blocks()]),
            ("stitch", [functools.partial(stitch_task, payload, x, y) for x, y in corners]),
            ("render", [functools.partial(render_task, payload, z, x, y) for z in sections for x, y in corners])]


def blank_sections(job: Job) -> list[int]:
    """The blank sections of the range (left blank, zero field), once every block is finished (or scanned)."""
    if job.solve:
        return sorted(set(range(job.z_start, job.z_stop)) - set(usable_sections(job)))
    return sorted({z for first, _ in job.blocks() for z in _summary(job, first)["blank"]})


def run_in_process(all_phases: list[Phase]) -> None:
    """Run every task here, phase after phase, in order (a phase of no tasks says nothing)."""
    for name, calls in all_phases:
        made = calls() if callable(calls) else calls
        for call in tqdm(made, desc=name, unit="task") if made else ():
            call()


def _failures(dest: str) -> CloudFiles:
    """``DEST/progress/failures``: one JSON record per queued task that failed (module docstring)."""
    return CloudFiles(f"{dest}/progress/failures")


def _task_name(task) -> str:
    """A leased task as ``function(arguments after the job,)``, e.g. ``block_task(2,)``."""
    return f"{task.key[1]}{tuple(task.args[1:])}"


def record_failure(queue: TaskQueue, task, err: BaseException) -> str:
    """Count a failure of the leased ``task`` (one of ours: its first argument is the job) with error ``err``;
    dead-letter it (delete it from ``queue``) at the job's ``max_failures``. Returns a line saying which."""
    job = Job(**task.args[0])
    name = _task_name(task)
    key = "-".join(map(str, [task.key[1], *task.args[1:]]))
    failures = _failures(job.dest)
    count = (failures.get_json(key) or {}).get("failures", 0) + 1
    dead = count >= job.max_failures
    failures.put_json(key, {"task": name, "failures": count, "error": one_line(err), "dead": dead})
    if dead:
        queue.delete(task)
        return f"task {name} failed {count} times: dead-lettered (taken off the queue)"
    return f"task {name} failed ({count} of {job.max_failures}); it is retried once its lease runs out"


def _check_dead_letters(failures: CloudFiles) -> None:
    """``UserError`` with the error of a dead-lettered task, if any has a record in ``failures``."""
    for record in volume.get_many(failures, list(failures.list())):
        if record and record["dead"]:
            raise UserError(f"task {record['task']} failed {record['failures']} times and was dead-lettered "
                            f"(last error: {record['error']}); fix the cause and run again")


def run_queued(queue: TaskQueue, all_phases: list[Phase], dest: str) -> None:
    """Insert each phase into ``queue`` (``open_queue``) and wait until the workers have emptied it.

    The driver looks at the queue ``FIRST_POLL_SECONDS`` after inserting a phase, then after twice as long each
    time up to ``POLL_SECONDS``, so a short phase (a small stack) ends soon after its last task and a long one is
    not polled more than once a second. An ``fq://`` queue's count is exact, so one look at an empty queue ends
    the phase; an SQS queue's counts are approximate and lag, so it must also be empty ``POLL_SECONDS`` later.

    dest: the job's DEST (cloudpath). Its failure records are cleared first; a ``UserError`` once a task is
    dead-lettered (module docstring).
    """
    failures = _failures(dest)
    failures.delete(list(failures.list()))
    settle = 0.0 if queue.path.protocol == "fq" else POLL_SECONDS  # how long an empty count must last
    for name, calls in all_phases:
        made = calls() if callable(calls) else calls
        queue.insert(made)
        total = queue.enqueued  # this phase's tasks and any left by an interrupted run before
        if not made and not total:  # a phase of no tasks says nothing
            continue
        with tqdm(total=total, desc=f"{name} (queued)", unit="task") as bar:
            wait, empty_since = FIRST_POLL_SECONDS, None
            while True:
                _check_dead_letters(failures)
                left = queue.enqueued
                bar.update(max(total - left - bar.n, 0))
                empty_since = None if left else empty_since or time.monotonic()
                if empty_since and time.monotonic() - empty_since >= settle:
                    break
                time.sleep(wait)
                wait = min(2 * wait, POLL_SECONDS)


class WholeFileQueue(FileQueueAPI):
    """python-task-queue's ``fq://`` queue (``FileQueueAPI``) whose ``insert`` puts each task in the queue whole.

    The stock insert creates a task's file in ``queue/``, then writes it, then writes the task's lease record in
    ``movement/``. A worker that leased the task in between read an empty file (the task failed and stayed
    leased), or had its lease record overwritten (the finished task's file was not deleted): either way the
    phase waited out the lease (600 s by default) and the task ran again. Here the lease record comes first, and
    the task's file is written in ``inserting/`` and renamed into ``queue/`` (atomic within a file system), so a
    worker sees no task file that is not whole. Same files, names and format as the stock queue's otherwise.
    """

    def insert(self, tasks, delay_seconds: int = 0) -> int:
        staging = Path(self.path) / "inserting"
        staging.mkdir(exist_ok=True)
        timestamp = int(time.time()) + delay_seconds if delay_seconds > 0 else 0  # leasable from then (0: now)
        count = 0
        for task in toiter(tasks):
            task["id"] = identifier = str(uuid.uuid4())
            name = f"{timestamp}--{identifier}.json"
            (Path(self.movement_path) / identifier).write_text(name + "\n")
            (staging / name).write_text(jsonify(task))
            os.replace(staging / name, Path(self.queue_path) / name)
            count += 1
        return count


def check_queue_spec(spec: str) -> None:
    """Refuse a ``--queue`` that is neither ``fq://FOLDER`` nor ``sqs://NAME`` (nothing is opened or made)."""
    if not spec.startswith(("fq://", "sqs://")) or not spec.partition("://")[2].strip():  # e.g. fq://$UNSET
        raise UserError(f"--queue {spec}: use fq://FOLDER (a folder every worker sees) or sqs://NAME (Amazon SQS)")


def open_queue(spec: str, create: bool) -> TaskQueue:
    """The task queue ``fq://FOLDER`` (its inserts whole: ``WholeFileQueue``) or ``sqs://NAME``; an ``fq://``
    folder must exist unless ``create``."""
    check_queue_spec(spec)
    if spec.startswith("fq://") and not create and not (Path(spec[len("fq://"):]).expanduser() / "queue").is_dir():
        raise UserError(f"no queue at {spec} (align.py --queue {spec} creates it)")
    try:
        queue = TaskQueue(spec, progress=False)
    except Exception as err:  # credentials, network, a path that cannot be created: one line
        raise UserError(f"cannot open queue {spec}: {type(err).__name__}: {err}") from None
    if isinstance(queue.api, FileQueueAPI):
        queue.api = WholeFileQueue(queue.api.path)
    return queue


def work(spec: str, lease_seconds: int) -> None:
    """A worker: lease tasks from the queue ``spec`` and run them until interrupted (Ctrl-C or SIGTERM, raised as
    ``KeyboardInterrupt``: the task it holds returns to the queue when its lease ends).

    Its own loop, not ``TaskQueue.poll``: that one takes Ctrl-C over, and an idle worker stopped by it ended with
    exit 0, as if it had finished.
    """
    queue = open_queue(spec, create=False)
    pause = float(os.environ.get(SLEEP_VARIABLE, 0))
    print(f"worker {os.getpid()} polling {spec}", flush=True)
    while True:
        try:
            task = queue.lease(seconds=lease_seconds)
        except QueueEmptyError:
            time.sleep(random.uniform(0, WORKER_BACKOFF_SECONDS))  # workers started together look apart
            continue
        except Exception:  # the queue itself (a file half-written, the network): look again
            traceback.print_exc()
            print("polling the queue failed", flush=True)
            time.sleep(random.uniform(0, WORKER_BACKOFF_SECONDS))
            continue
        print(f"running {_task_name(task)}", flush=True)
        time.sleep(pause)
        try:
            task.execute()
        except Exception as err:  # a failed task stays on the queue (record_failure), leased again later
            traceback.print_exc()
            print(record_failure(queue, task, err), flush=True)
            continue
        try:
            queue.delete(task, tally=True)
        except Exception:  # done, but still on the queue: run again when its lease ends, to the same result
            traceback.print_exc()
            print(f"{_task_name(task)} is done but could not be taken off the queue", flush=True)
