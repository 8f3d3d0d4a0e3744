"""Align a stack of sections with a trained network and write it as precomputed layers.

    python align.py --archive pt/demo.pt --source demo --dest data/demo_aligned --z_start 70 --z_stop 100
    python align.py ... --block 10 --queue fq:///shared/queue     # as tasks on a queue, run by workers:
    python align.py worker --queue fq:///shared/queue [--lease_seconds 600]

Sections are aligned serially: section z+1 is pulled onto the already aligned
section z; the first section of the range is the fixed reference
(``--raw_neighbour`` aligns each to its raw neighbour and chains the fields;
``--vote K`` aligns each to the K aligned sections before it and combines the K
fields by vector voting). ``--solve`` instead pairs every section with its
``--neighbours`` nearest raw sections on both sides and solves for all fields at
once (``solve.py``: errors stay bounded instead of adding up down the stack),
still in the frame of the first section. Blank sections are skipped and listed.
Large sections go through the network in overlapping chunks whose margins are
cropped (``alignment.py``). Writes ``DEST/image`` (uint8) and ``DEST/field``
(float32, 2 channels: x, y in pixels of the mip; ``warp(raw, field) == aligned``),
whose bounds are the aligned sections and bbox (a later run that aligns more
sections grows them), with ``--mips N`` their mips 1..N (image: 2x2 mean; field:
2x2 mean with its vectors halved per mip, as pixels double), and
``DEST/neuroglancer.json``, a Neuroglancer state of both; the run ends by printing
how to view them. ``--defects LAYER`` (uint8: 0 none, 1 crack, 2 fold, in the
source's frame) makes every field with the defect masks (``alignment.pair_field``,
``solve.solve_stack``: no smoothing across a crack or fold, pairs weigh 0 inside
one, a fold's field comes from the tissue around it) and writes them in the aligned
frame to ``DEST/defects`` (nearest sampling), for segmentation to mask. Every run
that aligns something appends an entry to the layers' provenance: the date, the
code version, the arguments, the archive's lineage and the *run record*
(``run_record``: the archive's sha256, the source and the sha256 of a square of its
first section, the mode and every setting that changes the result); a run that
finds its range aligned writes nothing. Each
finished section is marked in ``DEST/progress/``, so a re-run
resumes where it stopped, but only a run whose record matches DEST's: otherwise
it stops with one line naming the first difference, before writing anything
(a later run may extend ``--z_stop``; ``--device``, ``--queue`` and the workers,
which do not change the result, may differ). A run holds a local DEST
(``DEST/.align.lock``): a second run into it is refused while the first lives
(workers take no lock; a cloud DEST has none). ``--overwrite`` deletes
what align.py wrote in DEST (``DEST_LAYERS`` and ``progress/``, every section,
not only the range) and aligns the range afresh; it never deletes a layer that
align.py did not write.

``--adapt MINUTES`` first fine-tunes a copy of the archive for that long on the
range's own raw sections, each paired with itself under a known random warp
(``adapt.py``: no labels), writes it to ``DEST/adapted.pt`` (atomically; a local
DEST) and aligns with it. The run record holds the minutes and the adapted
network's sha256: a resumed run reuses ``DEST/adapted.pt`` and refuses one that
changed; ``--overwrite`` adapts afresh.

Serial alignment runs as the tasks of ``tasks.py``: blocks of ``--block``
sections aligned independently (default: the whole range, one block, i.e. the
serial alignment), a stitch that chains the blocks' frames, and renders of
``--task_chunk``-sized xy chunks. Without ``--queue`` they run here, in order;
with ``--queue`` this command enqueues them phase by phase and waits while
``python align.py worker`` processes (any number, anywhere that sees the queue
and DEST) run them; both give the same result, bit for bit. ``--solve`` runs as
tasks too (``tasks.py``): a scan and a rigid pre-alignment per section, pair fields
and renders per section and ``--task_chunk`` xy chunk, and a solve per ``--block`` z block and xy chunk, each
with a margin; with one block and a chunk covering the bbox, the stack-wide solve of
the whole range at once (``alignment.align_solved``), bit for bit.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from cloudfiles import CloudFiles

import adapt
import demo
import tasks
import volume
from alignment import SolveSettings, add_flags, check_fits, settings_from_args, warnings_condensed
from helpers import (HelpFormatter, UserError, check_writable, code_version, file_sha256, finite_float, held,
                     machine_memory, one_line, run_main)
from models.archive import lineage, read_archive
from vis import neuroglancer_state

SERIAL_LAYERS = ("block_field", "block_frame")  # tasks.py's intermediate layers, beside image and field
SOLVE_LAYERS = ("pair_field", "solved", "solved_frame")  # those of the solve's tasks
DEST_LAYERS = ("image", "field", "defects") + SERIAL_LAYERS + SOLVE_LAYERS  # every layer align.py writes in DEST
LOCK = ".align.lock"  # in a local DEST while a run (not a worker) writes it: helpers.held
ALIGNED_BY = "aligned by SEAMLeSS align.py"  # the description of align.py's provenance entries
VIEWER = "https://neuroglancer-demo.appspot.com/#!"  # a public Neuroglancer; the state follows the #!
VIEW_PORT = 1337  # where cloudvolume.server.view serves a local DEST (CloudVolume.viewer's port)
NEUROGLANCER_STATE = "neuroglancer.json"  # in DEST, beside the layers
ADAPTED = "adapted.pt"  # in DEST: the network --adapt made and aligned with
# settings run_record leaves out at these values (old records)
UNRECORDED = {"vote": 1, "mips": 0, "adapt": 0, "task_memory": None, "bias": None}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--archive", required=True, help="network archive (pt/NAME.pt)")
    p.add_argument("--source", required=True, help="image volume (any CloudVolume path, or 'demo')")
    p.add_argument("--dest", required=True, help="destination folder or cloudpath for image/ and field/")
    p.add_argument("--z_start", type=int, required=True, help="first section (the fixed reference)")
    p.add_argument("--z_stop", type=int, required=True, help="one past the last section")
    p.add_argument("--mip", type=int, default=0, help="resolution level to align at")
    p.add_argument("--bbox", type=int, nargs=4, metavar=("X0", "Y0", "X1", "Y1"),
                   help="region in voxels of --mip (default: the whole section)")
    p.add_argument("--mips", type=int, default=0,
                   help="also write mips 1..N of DEST/image (2x2 mean) and DEST/field (2x2 mean, vectors halved per "
                        "mip); needs --task_chunk a multiple of 256 * 2^N and the bbox corner at multiples of 2^N")
    add_flags(p)  # --chunk --overlap --prealign --trunc --smooth --neighbours --pull --robust --detail_pull
    p.add_argument("--defects", help="defect layer (uint8: 0 none, 1 crack, 2 fold; the source's frame and size, "
                                     "read at --mip; missing chunks mean no defect): the fields keep their jump at "
                                     "cracks and folds, come from the tissue around inside them, and DEST/defects "
                                     "gets the labels in the aligned frame")
    p.add_argument("--raw_neighbour", action="store_true",
                   help="align each section to its raw neighbour and chain the fields")
    p.add_argument("--vote", type=int, default=1,
                   help="align each section to the K aligned sections before it and vote (1 = plain serial)")
    p.add_argument("--solve", action="store_true",
                   help="stack-wide solve over raw neighbour pairs instead of serial alignment")
    p.add_argument("--block", type=int,
                   help="serial: sections per block aligned independently, consecutive blocks sharing one (>= 2); "
                        "--solve: sections per solve task, each solved with a margin of sections beyond it (its "
                        "memory grows with both); None: the whole range, one block")
    p.add_argument("--task_chunk", type=int, default=512,
                   help=f"xy size in px of the tasks (a multiple of {tasks.LAYER_CHUNK}): serial: of the stitch and "
                        "render tasks; --solve: of every task (pair fields, solve, render), each read with a margin "
                        "(its memory grows with it)")
    p.add_argument("--task_memory", type=float,
                   help="--solve: GB a solve task may hold; one whose block with its margins would hold more solves "
                        "only its block and 4 sections each side at full resolution, the rest at a coarser one "
                        "(fields move ~0.07 px p99 on the demo: bench/RESULTS.md); None: no limit")
    p.add_argument("--queue", help="enqueue the tasks into fq://FOLDER or sqs://NAME and wait while "
                                   "'align.py worker' processes run them; None: run them here")
    p.add_argument("--max_failures", type=int, default=tasks.MAX_FAILURES,
                   help="--queue: a task that fails this many times is dead-lettered (taken off the queue) and "
                        "this command stops with its error")
    p.add_argument("--overwrite", action="store_true",
                   help="first delete what align.py wrote in DEST (its layers image, field, block_field, "
                        "block_frame and progress/, every section, not only this range), then align the range")
    p.add_argument("--adapt", type=finite_float, default=0, metavar="MINUTES",
                   help=f"first fine-tune a copy of --archive for MINUTES on self-pairs of the range's raw sections "
                        f"(adapt.py: each section paired with itself under a known random warp, no labels), write it "
                        f"to DEST/{ADAPTED} (a local DEST) and align with it; a resumed run reuses it (0 = off)")
    p.add_argument("--bucket", help="prefix for bare source paths")
    p.add_argument("--device", help="cpu or cuda; None: cuda where the alignment runs, if it has one")
    return p.parse_args(argv)


def parse_worker_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="align.py worker", description="Run the alignment tasks of a queue.",
                                formatter_class=HelpFormatter)
    p.add_argument("--queue", required=True, help="fq://FOLDER or sqs://NAME, as given to align.py --queue")
    p.add_argument("--lease_seconds", type=int, default=600,
                   help="a leased task not finished by then (failed, or its worker died) is run again; "
                        "choose it longer than the longest task (a block)")
    return p.parse_args(argv)


def open_dest(args, source, box, entry: dict, names=("image", "field"), pair_channels: int = 0) -> None:
    """Create (or re-open and check) the layers ``DEST/NAME`` over ``box`` of ``source``'s mip, and record the run.

    box: ``((x0, y0, z_start), (x1, y1, z_stop))``, the bbox and the sections this
    run aligns: a new layer has these bounds; an existing one must have the same
    xy bounds and grows in z to include them (``volume.include_sections``).
    ``image`` and ``defects`` are uint8; every other name is a float32 field of 2 channels (``pair_field``:
    ``pair_channels``, 2 per ``tasks.pair_offsets``).
    ``image`` and ``field`` have ``1 + args.mips`` mips, the others one. Once
    every layer has the right shape, each grows, ``entry``
    (``provenance_entry``) is appended to its provenance and the source's
    cloudpath to its sources.
    """
    (x0, y0, z0), (x1, y1, z1) = box
    size, offset = (x1 - x0, y1 - y0, z1 - z0), (x0, y0, z0)
    resolution = list(source.resolution)
    layers, created = {}, set()
    for name in names:
        dtype, channels = ("uint8", 1) if name in ("image", "defects") else \
            ("float32", pair_channels if name == "pair_field" else 2)
        mips = 1 + args.mips if name in ("image", "field") else 1
        path = args.dest.rstrip("/") + "/" + name
        cloudpath = volume.resolve_path(path)
        try:
            vol = volume.open_volume(path)
        except UserError:
            vol = volume.create_volume(cloudpath, size, dtype, channels, resolution, mips,
                                       (tasks.LAYER_CHUNK, tasks.LAYER_CHUNK, 1), provenance=entry, offset=offset)
            created.add(name)
        (gx0, gy0, _), (gx1, gy1, _) = volume.bounds(vol)
        got = ((gx0, gy0), (gx1, gy1), vol.num_channels, str(vol.dtype), len(vol.info["scales"]))
        want = ((x0, y0), (x1, y1), channels, dtype, mips)
        if got != want or list(vol.resolution) != resolution:
            raise UserError(f"destination {cloudpath} exists with another shape (x, y {got[0]}..{got[1]}, "
                            f"{got[2]} channels, {got[3]}, {got[4]} mips, resolution {list(vol.resolution)}; this "
                            f"run needs {want[0]}..{want[1]}, {channels} channels, {dtype}, {mips} mips, "
                            f"{resolution})")
        layers[name] = vol
    for name, vol in layers.items():
        volume.include_sections(vol, z0, z1)
        if name not in created:
            vol.provenance.processing.append(entry)
        if source.cloudpath not in vol.provenance.sources:
            vol.provenance.sources.append(source.cloudpath)
        vol.commit_provenance()


def job_of(args, source: str, bbox: tasks.Box, defects: str | None = None) -> tasks.Job:
    """The ``tasks.Job`` the flags ``args`` ask for, of the ``source`` volume (a cloudpath) over ``bbox``, with the
    ``defects`` layer (a cloudpath) or none."""
    pair, solve = settings_from_args(args)
    return tasks.Job(archive=str(Path(args.archive).resolve()), source=source,
                     dest=volume.resolve_path(args.dest.rstrip("/")), mip=args.mip, bbox=bbox, z_start=args.z_start,
                     z_stop=args.z_stop, block=args.block or max(args.z_stop - args.z_start, 2), pair=pair,
                     vote=args.vote, raw_neighbour=args.raw_neighbour, xy_chunk=args.task_chunk,
                     solve=solve if args.solve else None, device=args.device, max_failures=args.max_failures,
                     mips=args.mips, defects=defects, task_memory=args.task_memory)


def run_record(args, job: tasks.Job) -> dict:
    """What DEST's content follows from, as JSON values: the archive's sha256, the source, the mode and each
    setting of that mode that changes the result, keyed by its flag's name: ``--z_start`` (the fixed section),
    ``--mip``, ``--bbox``, ``--defects`` (the layer's cloudpath; only when given), ``job.pair`` (``--refine`` only
    when > 0, ``--pieces`` only with ``--defects``), then ``job.solve`` (``--detail_pull`` only with ``--smooth``) or
    the serial tasks' ``--vote`` (when > 1), then ``--block`` and ``--task_chunk`` (the solve's too: its result
    depends a little on them), then ``--mips`` (when > 0), then ``--adapt`` (when > 0; ``main`` adds the adapted
    network's ``adapted_sha256``, and the source's ``source_sample``), then the serial tasks' ``bias`` (when not 0:
    ``tasks.stack_bias``); a non-finite float is a string.
    Not ``--z_stop`` (a later run may extend the range), nor what only changes how the run goes (``--device``,
    ``--queue``, ``--max_failures``)."""
    settings = {"z_start": job.z_start, "mip": job.mip, "bbox": [int(v) for v in job.bbox],
                **({"defects": job.defects} if job.defects else {}),
                **{key: value for key, value in asdict(job.pair).items()
                   if (key != "refine" or value) and (key != "pieces" or job.defects)}}
    if job.solve:
        settings.update({key: value for key, value in asdict(job.solve).items()
                         if key != "detail_pull" or job.pair.smooth})
    else:
        settings.update({"vote": job.vote} if job.vote > 1 else {})
    settings.update(block=args.block, task_chunk=job.xy_chunk)
    settings.update({"mips": job.mips} if job.mips else {})
    settings.update({"task_memory": job.task_memory} if job.task_memory else {})
    settings.update({"adapt": args.adapt} if args.adapt else {})
    settings.update({"bias": list(job.bias)} if any(job.bias) else {})
    mode = "solve" if job.solve else "raw_neighbour" if job.raw_neighbour else "vote" if job.vote > 1 else "serial"
    record = {"archive_sha256": file_sha256(job.archive), "source": job.source, "mode": mode}
    return {**record, **{key: _json_value(value) for key, value in settings.items()}}


def _json_value(value):
    """``value`` as provenance JSON keeps it: a non-finite float as a string (JSON has no inf)."""
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def provenance_entry(args, run: dict, network: str) -> dict:
    """This run's entry in the provenance of DEST's layers: the date, the code version, the arguments, the lineage of
    the archive ``network`` it aligns with (``archive_lineage``: ``--archive``'s, or ``DEST/adapted.pt``'s, which
    ends with its adaptation) and ``run`` (``run_record``: the archive's sha256, the resolved source, ...)."""
    return {"description": ALIGNED_BY, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "code_version": code_version(), "method": {
                "archive": args.archive, "archive_lineage": archive_lineage(network), "source": args.source,
                "mip": args.mip, "args": vars(args), "command": " ".join(sys.argv), "run": run}}


def archive_lineage(path: str) -> list[dict]:
    """How the network of the archive at ``path`` was trained, root run first (``models.archive.lineage``): each
    run's name, date, iterations, settings, final losses and resumes, without its loss curves."""
    return [{key: value for key, value in entry.items() if key != "history"} for entry in lineage(read_archive(path))]


def recorded_runs(dest: str) -> list[dict] | None:
    """align.py's provenance entries (oldest first) in the first of ``DEST_LAYERS`` that exists in ``dest`` (a
    cloudpath); None if none exists. ``UserError`` for a layer there that align.py did not write (it is neither
    reused nor deleted)."""
    files, runs = CloudFiles(dest), None
    for name in DEST_LAYERS:
        try:
            found = files.exists(f"{name}/info")
            processing = (files.get_json(f"{name}/provenance") or {}).get("processing", []) if found else []
        except Exception as err:  # a cloud's network, credentials or permissions: one line
            raise UserError(f"cannot read --dest {dest}: {one_line(err)}") from None
        if found:
            entries = [entry for entry in processing if entry.get("description") == ALIGNED_BY]
            if not entries:
                raise UserError(f"{dest}/{name} exists and was not written by align.py: choose another --dest")
            runs = entries if runs is None else runs
    return runs


def check_same_run(dest: str, last: dict, run: dict, archive: str) -> None:
    """``UserError`` naming the first difference between ``run`` (``run_record``, of ``archive``) and the record of
    ``last``, the last run in DEST's provenance: a resume must not mix two runs' sections."""
    redo = "use --overwrite to redo it (deletes DEST's layers and progress)"
    recorded = last.get("method", {}).get("run")
    if recorded is None:
        raise UserError(f"{dest} was aligned by an older align.py that kept no run record; {redo}")
    for key in list(run) + [key for key in recorded if key not in run]:
        old, new = (record.get(key, UNRECORDED.get(key)) for record in (recorded, run))
        if old == new or key == "source" and old and new and volume.canonical(old) == volume.canonical(new):
            continue
        if key == "source_sample":
            if old is None:  # an older align.py's record: not sampled
                continue
            raise UserError(f"{dest} was aligned from a source whose section {run['z_start']} read differently "
                            f"(sha256 {old}... of its first {volume.SAMPLE} px square, not {new}...): it was rewritten "
                            f"at the same path; {redo}")
        if key == "archive_sha256":
            difference = (f"archive sha256 {str(old)[:12]}... ({last['method'].get('archive')}), "
                          f"not {str(new)[:12]}... ({archive})")
        elif key == "adapted_sha256":
            difference = (f"the adapted network {ADAPTED} of sha256 {str(old)[:12]}..., not "
                          + (f"{str(new)[:12]}..." if new else "a missing file (or not a file)"))
        else:
            name = key if key in ("source", "mode") else "--" + key
            difference = f"{name} {_typed(old)}, not {_typed(new)}"
            if name.startswith("--") and old is not None:  # the flag's old value goes on (e.g. after a default changed)
                redo = f"give {name} {_typed(old)} to go on with it, or {redo}"
        raise UserError(f"{dest} was aligned with {difference}; {redo}")


def _typed(value) -> str:
    """A recorded value as typed on the command line (a list's items separated by spaces)."""
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def remove_outputs(dest: str) -> None:
    """Delete what align.py wrote in ``dest`` (a cloudpath): the progress markers, then ``DEST_LAYERS``, then the
    Neuroglancer state."""
    files = CloudFiles(dest)
    for name in ("progress",) + DEST_LAYERS:
        files.delete(list(files.list(prefix=name + "/")))
    files.delete(NEUROGLANCER_STATE)


def viewer(dest: str) -> tuple[dict, list[str]]:
    """The Neuroglancer state of ``dest``'s image and field layers (``vis.neuroglancer_state``; ``dest`` a
    cloudpath) and the lines that say how to open it. Neuroglancer reads ``gs://``, ``s3://`` and ``http(s)://``
    itself; any other DEST (a folder here) is first served over http by ``cloudvolume.server.view``."""
    base = dest.removeprefix("precomputed://")
    serve = not base.startswith(("gs://", "s3://", "http://", "https://"))
    base = f"http://localhost:{VIEW_PORT}" if serve else base
    state = neuroglancer_state(f"precomputed://{base}/image", f"precomputed://{base}/field")
    serving = [f"""  python -c "from cloudvolume.server import view; view('{dest}', port={VIEW_PORT})"  """
               "# serves DEST; leave it running"] if serve else []
    return state, [f"view {dest} in Neuroglancer:", *serving,
                   f"  {VIEWER}{quote(json.dumps(state, separators=(',', ':')))}",
                   f"  (that state is also {dest}/{NEUROGLANCER_STATE}; the field's hue is its direction, its "
                   "saturation its length up to the 'rim' slider's px)"]


def progress_files(dest: str):
    return CloudFiles(volume.resolve_path(dest.rstrip("/") + "/progress"))


def worker(argv) -> None:
    """``python align.py worker --queue Q``: run the queue's tasks until interrupted."""
    args = parse_worker_args(argv)
    if args.lease_seconds < 1:
        raise UserError("--lease_seconds must be >= 1")
    with warnings_condensed():
        tasks.work(args.queue, args.lease_seconds)


def check_defects(defects, source) -> None:
    """``UserError`` unless the ``--defects`` volume is a defect layer (``volume.check_kind``) over the bounds and at
    the resolution of ``source``, both at the mip aligned at, with data there (``volume.check_written``)."""
    volume.check_kind(defects, "defects", "--defects")
    volume.check_same_frame(defects, source, "--defects")
    volume.check_written(defects, "--defects")


def adapt_to_range(args, source, job: tasks.Job, out: Path) -> None:
    """``adapt.adapt`` the ``--archive`` for ``--adapt`` minutes to the raw sections of ``job``'s range and bbox in
    ``source`` (at ``--mip``), into ``out``."""
    x0, y0, x1, y1 = job.bbox
    sections = adapt.self_pair_sections(
        lambda dx, dy, z, side: volume.read(source, (x0 + dx, y0 + dy, z), (side, side, 1))[0, 0],
        job.z_start, job.z_stop, x1 - x0, y1 - y0)
    print(f"adapting {args.archive} for {args.adapt:g} minutes to {len(sections)} sections of the range")
    adapt.adapt(args.archive, sections, args.adapt, out, device=args.device)
    print(f"wrote {out}")


def check_args(args) -> None:
    """One-line errors for flags that do not go together (before anything is read or written)."""
    _, solve = settings_from_args(args)  # each setting's least value (alignment.PairSettings, SolveSettings)
    unused = [f"--{name} {value}" for name, value in dataclasses.asdict(solve).items()
              if value != getattr(SolveSettings, name)]
    if unused and not args.solve:
        raise UserError(f"{', '.join(unused)}: a setting of --solve, which this run does not use (add --solve)")
    if args.vote < 1:
        raise UserError(f"--vote {args.vote}: must be >= 1")
    if sum([args.raw_neighbour, args.vote > 1, args.solve]) > 1:
        raise UserError("choose one of --raw_neighbour, --vote K, --solve")
    if args.block is not None and args.block < 2:
        raise UserError("--block must be >= 2 (consecutive blocks share a section)")
    if args.task_chunk < 1 or args.task_chunk % tasks.LAYER_CHUNK:
        raise UserError(f"--task_chunk must be a positive multiple of {tasks.LAYER_CHUNK} (the layers' chunk)")
    if args.mips < 0:
        raise UserError("--mips must be >= 0")
    if args.task_memory is not None and not args.task_memory > 0:
        raise UserError("--task_memory must be > 0 GB")
    if args.task_memory is not None and not args.solve:
        raise UserError(f"--task_memory {args.task_memory:g}: a setting of --solve's tasks, which this run does not "
                        "use (add --solve; a serial task holds whole sections: a smaller --bbox or a coarser --mip)")
    if args.solve and args.neighbours > max(args.z_stop - args.z_start - 1, 1):
        raise UserError(f"--neighbours {args.neighbours}: the range {args.z_start}..{args.z_stop - 1} has "
                        f"{args.z_stop - args.z_start} sections, so a section has at most "
                        f"{max(args.z_stop - args.z_start - 1, 1)} on each side")
    if args.task_chunk % (tasks.LAYER_CHUNK << args.mips):
        raise UserError(f"--mips {args.mips} needs --task_chunk a multiple of {tasks.LAYER_CHUNK << args.mips} "
                        f"(each task writes whole {tasks.LAYER_CHUNK} px chunks of every mip)")
    if args.max_failures < 1:
        raise UserError("--max_failures must be >= 1")
    if args.queue:
        tasks.check_queue_spec(args.queue)  # opened (an fq:// folder made) once every other input is checked
    if args.adapt < 0:
        raise UserError(f"--adapt {args.adapt:g}: minutes must be >= 0 (0 = no adaptation)")


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["worker"]:
        worker(argv[1:])
        return {}
    args = parse_args(argv)
    check_args(args)
    if not volume.is_cloudpath(args.dest):  # a folder here, even before it exists
        args.dest = str(Path(args.dest).expanduser().resolve())
    if volume.resolve_path(args.dest).startswith("file://"):  # a folder here: writable before anything is read
        local = check_writable(volume.resolve_path(args.dest).removeprefix("file://"), "--dest", folder=True)
        with held(local / LOCK, f"--dest {args.dest}"):  # two runs into one DEST mixed their sections
            return align(args)
    if args.adapt:
        raise UserError(f"--adapt writes DEST/{ADAPTED} beside the layers: it needs a local --dest folder, "
                        f"not {args.dest}")
    return align(args)


def align(args) -> dict:
    """The run ``args`` ask for (checked by ``check_args``; DEST held where it is a local folder): read, resume or
    start, align, write; returns ``{"sections", "seconds", "mpx_per_s"}``."""
    args.source = demo.resolve(args.source)  # the word 'demo' is the embedded demo volume
    source = volume.open_volume(args.source, args.mip, args.bucket)
    volume.check_kind(source, "image", "--source")  # what the network aligns
    x0, y0, x1, y1 = volume.check_bbox(args.bbox, source)
    (_, _, sz0), (_, _, sz1) = volume.bounds(source)
    volume.check_z_range(args.z_start, args.z_stop, sz0, sz1, vol=source)
    if x0 % (1 << args.mips) or y0 % (1 << args.mips):
        raise UserError(f"--mips {args.mips} needs the bbox corner at multiples of {1 << args.mips} px (a pixel of "
                        f"mip m covers 2^m px from 0), not {x0} {y0}")
    defects = volume.open_volume(demo.resolve(args.defects, "defects"), args.mip, args.bucket) if args.defects else None
    if defects is not None:
        check_defects(defects, source)
    job = job_of(args, source.cloudpath, (x0, y0, x1, y1), defects and defects.cloudpath)
    if job.source == job.dest or job.source.startswith(job.dest + "/"):
        raise UserError(f"--source {args.source} is --dest {args.dest} or lies inside it: choose another --dest")
    if job.defects:
        tasks.read_defects(job, job.z_start, job.bbox)  # an image layer given as --defects: one line, nothing written
    model = tasks.model_of(job)  # a readable archive, before anything is written or enqueued
    check_fits(settings_from_args(args)[0], model, args.archive)
    if not args.queue:
        tasks.check_task_memory(job, machine_memory())  # before anything is written (workers check at each task)
    else:
        need = tasks.task_bytes(job)
        print(f"each {'solve' if job.solve else 'block'} task holds up to about "
              f"{f'{need / 2 ** 30:.1f} GB' if need >= 2 ** 30 / 10 else f'{need / 2 ** 20:.0f} MB'}: run the workers "
              "where they have that much memory")
    runs = recorded_runs(job.dest)
    resume = runs is not None and not args.overwrite  # None: no layer, so any progress marker left is stale
    queue = tasks.open_queue(args.queue, create=True) if args.queue else None
    if queue is not None and not resume and (left := queue.enqueued):  # before DEST is touched
        raise UserError(f"--queue {args.queue} still holds {left} task{'s' * (left != 1)} of another run, which the "
                        "workers would run into this one: use a new --queue (one per run), or resume that run (its "
                        "flags, without --overwrite)")
    if resume:  # the bias the run being resumed took off (none if it recorded none), whatever --z_stop now reads
        job = dataclasses.replace(job, bias=(runs[-1].get("method", {}).get("run") or {}).get("bias") or (0.0, 0.0))
    elif not args.adapt:  # (an adapted network is another network)
        job = dataclasses.replace(job, bias=tasks.stack_bias(job, model))
    if any(job.bias):
        print(f"the network's bias on this stack, {job.bias[0]:.2f}, {job.bias[1]:.2f} px (x, y) per pair, is taken "
              "off each pair field (a serial chain would add it up; alignment.network_bias)")
    run = {**run_record(args, job), "source_sample": volume.sample_sha(volume.open_volume(job.source, job.mip),
                                                                     job.z_start, job.bbox)}
    adapted = Path(args.dest) / ADAPTED if args.adapt else None
    if resume and adapted is not None and adapted.is_file():  # the network the run being resumed adapted
        run["adapted_sha256"] = file_sha256(adapted)
    if resume:
        check_same_run(args.dest, runs[-1], run, args.archive)
    else:
        remove_outputs(job.dest)
    progress = progress_files(args.dest)
    finished = progress.exists([str(z) for z in range(args.z_start, args.z_stop)])
    todo = [z for z in range(args.z_start, args.z_stop) if not finished[str(z)]]
    state, view = viewer(job.dest)
    if not todo:
        print(f"sections {args.z_start}..{args.z_stop - 1} are already aligned in {args.dest} "
              "(--overwrite to redo)", *view, sep="\n")
        return {"sections": 0}
    if len(todo) < args.z_stop - args.z_start and not args.solve:
        print(f"resuming: {args.z_stop - args.z_start - len(todo)} sections of the range are already aligned")
    if adapted is not None:
        if "adapted_sha256" not in run:
            adapt_to_range(args, source, job, adapted)
            run["adapted_sha256"] = file_sha256(adapted)
        job = dataclasses.replace(job, archive=str(adapted))
    open_dest(args, source, ((x0, y0, args.z_start), (x1, y1, args.z_stop)),
              provenance_entry(args, run, job.archive),
              ("image", "field") + (("defects",) if args.defects else ())
              + (SOLVE_LAYERS if args.solve else SERIAL_LAYERS), 2 * len(tasks.pair_offsets(job)) if job.solve else 0)

    width, height = x1 - x0, y1 - y0
    start = time.time()
    with warnings_condensed():  # one line per kind however many pairs match poorly (or sections are all defect)
        if args.solve:
            todo = list(range(args.z_start, args.z_stop))  # one joint solve over the whole range
        all_phases = tasks.phases(job, todo)
        if queue is None:
            tasks.run_in_process(all_phases)
        else:
            tasks.run_queued(queue, all_phases, job.dest)
    skipped = [z for z in tasks.blank_sections(job) if z in set(todo)]
    progress.puts([(str(z), b"done") for z in todo])
    if skipped:
        print(f"skipped blank sections (no tissue, or never written): {' '.join(map(str, skipped))}")
    reference = next((z for z in todo if z not in skipped), None)
    if not args.solve and todo[0] == args.z_start and reference not in (None, args.z_start):
        print(f"section {reference}, the first with tissue, is the reference (its field is zero)")
    if reference is None:
        print(f"warning: no section of {todo[0]}..{todo[-1]} holds tissue: all were written blank; is the range (or "
              "--source, --bbox) right?")
    seconds = time.time() - start
    mpx = len(todo) * width * height / 1e6
    print(f"{'aligned' if reference is not None else 'wrote'} {len(todo)} section{'s' * (len(todo) != 1)} of {width} x "
          f"{height} px at mip {args.mip} into {args.dest} in {seconds:.1f} s ({mpx / seconds:.2f} Mpx/s)")
    CloudFiles(job.dest).put_json(NEUROGLANCER_STATE, state)
    print(*view, sep="\n")
    return {"sections": len(todo), "seconds": seconds, "mpx_per_s": mpx / seconds}


if __name__ == "__main__":
    run_main(main)
