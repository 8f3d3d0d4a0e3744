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
(float32, 2 channels: x, y in pixels of the mip; ``warp(raw, field) == aligned``)
with the archive and arguments as provenance. Each finished section is marked
in ``DEST/progress/``, so a re-run resumes where it stopped; ``--overwrite``
redoes the range.

Serial alignment runs as the tasks of ``tasks.py``: blocks of ``--block``
sections aligned independently (default: the whole range, one block, i.e. the
serial alignment), a stitch that chains the blocks' frames, and renders of
``--task_chunk``-sized xy chunks. Without ``--queue`` they run here, in order;
with ``--queue`` this command enqueues them phase by phase and waits while
``python align.py worker`` processes (any number, anywhere that sees the queue
and DEST) run them; both give the same result, bit for bit. ``--solve`` runs here only.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import tasks
import volume
from alignment import DETAIL_PULL, TRUNC, align_solved, stride
from helpers import UserError, check_writable, run_main

SERIAL_LAYERS = ("block_field", "block_frame")  # tasks.py's intermediate layers, beside image and field


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--archive", required=True, help="network archive (pt/NAME.pt)")
    p.add_argument("--source", required=True, help="image volume (any CloudVolume path, or 'demo')")
    p.add_argument("--dest", required=True, help="destination folder or cloudpath for image/ and field/")
    p.add_argument("--z_start", type=int, required=True, help="first section (the fixed reference)")
    p.add_argument("--z_stop", type=int, required=True, help="one past the last section")
    p.add_argument("--mip", type=int, default=0, help="resolution level to align at")
    p.add_argument("--bbox", type=int, nargs=4, metavar=("X0", "Y0", "X1", "Y1"),
                   help="region in voxels of --mip (default: the whole section)")
    p.add_argument("--chunk", type=int, default=1024,
                   help="chunk size in px fed to the network (a multiple of its coarsest stride, 2^(levels-1))")
    p.add_argument("--overlap", type=int, default=128, help="context in px around each chunk, cropped away")
    p.add_argument("--raw_neighbour", action="store_true",
                   help="align each section to its raw neighbour and chain the fields")
    p.add_argument("--vote", type=int, default=1,
                   help="align each section to the K aligned sections before it and vote (1 = plain serial)")
    p.add_argument("--solve", action="store_true",
                   help="stack-wide solve over raw neighbour pairs instead of serial alignment")
    p.add_argument("--neighbours", type=int, default=1, help="--solve: neighbours on each side of a section")
    p.add_argument("--pull", type=float, default=0.03,
                   help="--solve: weight of the pull toward zero displacement (a pair pixel weighs 1)")
    p.add_argument("--robust", type=float, default=4.0,
                   help="--solve: px scale of the robust re-weighting of disagreeing pairs (0 = plain least squares)")
    p.add_argument("--smooth", type=int, default=0,
                   help="low-pass every pair field with a box of this radius in px, twice (0 = off)")
    p.add_argument("--prealign", type=int, default=32,
                   help="before the network, move each source by the whole-section shift (found by cross-correlation, "
                        "up to this many px) that best matches its target (0 = off)")
    p.add_argument("--trunc", type=int, default=TRUNC,
                   help="stop the network this many levels short of full resolution and upsample its field "
                        "(fewer levels run: faster)")
    p.add_argument("--detail_pull", type=float, default=DETAIL_PULL,
                   help="--solve --smooth R: pull on the detail the low-pass removes, solved apart from the coarse "
                        "part (inf = drop the detail)")
    p.add_argument("--block", type=int,
                   help="sections per block aligned independently, consecutive blocks sharing one (>= 2); "
                        "None: the whole range, one block")
    p.add_argument("--task_chunk", type=int, default=512,
                   help=f"xy size in px of the stitch and render tasks (a multiple of {tasks.LAYER_CHUNK})")
    p.add_argument("--queue", help="enqueue the tasks into fq://FOLDER or sqs://NAME and wait while "
                                   "'align.py worker' processes run them; None: run them here")
    p.add_argument("--overwrite", action="store_true", help="redo sections already aligned in the range")
    p.add_argument("--bucket", help="prefix for bare source paths")
    p.add_argument("--device", help="cpu or cuda; None: cuda where the alignment runs, if it has one")
    return p.parse_args(argv)


def parse_worker_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="align.py worker", description="Run the alignment tasks of a queue.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--queue", required=True, help="fq://FOLDER or sqs://NAME, as given to align.py --queue")
    p.add_argument("--lease_seconds", type=int, default=600,
                   help="a leased task not finished by then (failed, or its worker died) is run again; "
                        "choose it longer than the longest task (a block)")
    return p.parse_args(argv)


def open_dest(args, source, box, names=("image", "field")) -> dict:
    """Create (or re-open and check) the layers ``DEST/NAME`` over ``box`` of ``source``'s mip.

    ``image`` is uint8; every other name is a float32 field of 2 channels.
    """
    (x0, y0, z0), (x1, y1, z1) = box
    size, offset = (x1 - x0, y1 - y0, z1 - z0), (x0, y0, z0)
    resolution = list(source.resolution)
    provenance = {"description": "aligned by SEAMLeSS align.py", "method": {
        "archive": args.archive, "source": args.source, "mip": args.mip, "args": vars(args),
        "command": " ".join(sys.argv)}}
    layers = {}
    for name in names:
        dtype, channels = ("uint8", 1) if name == "image" else ("float32", 2)
        path = args.dest.rstrip("/") + "/" + name
        cloudpath = volume.resolve_path(path)
        try:
            vol = volume.open_volume(path)
        except UserError:
            vol = volume.create_volume(cloudpath, size, dtype, channels, resolution, 1,
                                       (tasks.LAYER_CHUNK, tasks.LAYER_CHUNK, 1), provenance=provenance, offset=offset)
        got = (tuple(volume.bounds(vol)[0]), tuple(volume.bounds(vol)[1]), vol.num_channels, str(vol.dtype))
        want = ((x0, y0, z0), (x1, y1, z1), channels, dtype)
        if got != want or list(vol.resolution) != resolution:
            raise UserError(f"destination {cloudpath} exists with another shape (bounds {got[0]}..{got[1]}, "
                            f"{got[2]} channels, {got[3]}, resolution {list(vol.resolution)}; this run needs "
                            f"{want[0]}..{want[1]}, {channels} channels, {dtype}, {resolution})")
        layers[name] = vol
    return layers


def progress_files(dest: str):
    from cloudfiles import CloudFiles
    return CloudFiles(volume.resolve_path(dest.rstrip("/") + "/progress"))


def worker(argv) -> None:
    """``python align.py worker --queue Q``: run the queue's tasks until interrupted."""
    args = parse_worker_args(argv)
    if args.lease_seconds < 1:
        raise UserError("--lease_seconds must be >= 1")
    tasks.work(args.queue, args.lease_seconds)


def check_args(args) -> None:
    """One-line errors for flags that do not go together (before anything is read or written)."""
    if args.vote < 1 or args.neighbours < 1 or args.pull <= 0 or args.detail_pull <= 0 or args.robust < 0 \
            or args.smooth < 0 or args.prealign < 0 or args.trunc < 0:
        raise UserError("--vote and --neighbours must be >= 1, --pull and --detail_pull > 0, --robust, --smooth, "
                        "--prealign and --trunc >= 0")
    if args.chunk < 1 or args.overlap < 0:
        raise UserError("--chunk must be >= 1 and --overlap >= 0")
    if sum([args.raw_neighbour, args.vote > 1, args.solve]) > 1:
        raise UserError("choose one of --raw_neighbour, --vote K, --solve")
    if args.solve and (args.queue or args.block):
        raise UserError("--solve runs in this process over the whole range: drop --queue and --block")
    if args.block is not None and args.block < 2:
        raise UserError("--block must be >= 2 (consecutive blocks share a section)")
    if args.task_chunk < 1 or args.task_chunk % tasks.LAYER_CHUNK:
        raise UserError(f"--task_chunk must be a positive multiple of {tasks.LAYER_CHUNK} (the layers' chunk)")


def clear_progress(progress, z_start: int, z_stop: int) -> None:
    """Forget the sections and the blocks that start in ``z_start..z_stop-1`` (``--overwrite``)."""
    blocks = [key for key in progress.list(prefix="block/")
              if z_start <= int(key.split("/")[1].split("-")[0]) < z_stop]
    progress.delete([str(z) for z in range(z_start, z_stop)] + blocks)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["worker"]:
        worker(argv[1:])
        return {}
    args = parse_args(argv)
    check_args(args)
    if not args.dest.startswith(volume.SCHEMES):  # a folder here, even before it exists
        args.dest = str(Path(args.dest).expanduser().resolve())
    if volume.resolve_path(args.dest).startswith("file://"):  # a folder here: writable before anything is read
        check_writable(volume.resolve_path(args.dest).removeprefix("file://"), "--dest", folder=True)
    queue = tasks.open_queue(args.queue, create=True) if args.queue else None
    source = volume.open_volume(args.source, args.mip, args.bucket)
    volume.check_kind(source, "image", "--source")  # what the network aligns
    (sx0, sy0, sz0), (sx1, sy1, sz1) = volume.bounds(source)
    x0, y0, x1, y1 = args.bbox or (sx0, sy0, sx1, sy1)
    if not (sx0 <= x0 < x1 <= sx1 and sy0 <= y0 < y1 <= sy1):
        raise UserError(f"--bbox {x0} {y0} {x1} {y1} is outside the volume ({sx0} {sy0} {sx1} {sy1} at mip "
                        f"{args.mip})")
    if not sz0 <= args.z_start < args.z_stop <= sz1:
        raise UserError(f"z range {args.z_start}..{args.z_stop} is outside the volume's sections {sz0}..{sz1 - 1}")
    job = tasks.Job(archive=str(Path(args.archive).resolve()), source=source.cloudpath,
                    dest=volume.resolve_path(args.dest.rstrip("/")), mip=args.mip, bbox=(x0, y0, x1, y1),
                    z_start=args.z_start, z_stop=args.z_stop, block=args.block or max(args.z_stop - args.z_start, 2),
                    chunk=args.chunk, overlap=args.overlap, vote=args.vote, raw_neighbour=args.raw_neighbour,
                    smooth=args.smooth, prealign=args.prealign, trunc=args.trunc, xy_chunk=args.task_chunk,
                    device=args.device)
    model = tasks.model_of(job)  # a readable archive, before anything is written or enqueued
    if args.trunc >= model.size:
        raise UserError(f"--trunc {args.trunc} must be below the {model.size} levels of {args.archive}")
    if args.chunk % stride(model):
        raise UserError(f"--chunk {args.chunk} must be a multiple of {stride(model)} px, the coarsest stride of the "
                        f"{model.size} levels of {args.archive}")
    layers = open_dest(args, source, ((x0, y0, sz0), (x1, y1, sz1)),
                       ("image", "field") + (() if args.solve else SERIAL_LAYERS))
    progress = progress_files(args.dest)
    if args.overwrite:
        clear_progress(progress, args.z_start, args.z_stop)
    finished = progress.exists([str(z) for z in range(args.z_start, args.z_stop)])
    todo = [z for z in range(args.z_start, args.z_stop) if not finished[str(z)]]
    if not todo:
        print(f"sections {args.z_start}..{args.z_stop - 1} are already aligned in {args.dest} "
              "(--overwrite to redo)")
        return {"sections": 0}
    if len(todo) < args.z_stop - args.z_start and not args.solve:
        print(f"resuming: {args.z_stop - args.z_start - len(todo)} sections of the range are already aligned")

    width, height = x1 - x0, y1 - y0
    start = time.time()
    if args.solve:
        todo = list(range(args.z_start, args.z_stop))  # one joint step over the whole range
        raw = np.stack([volume.read(source, (x0, y0, z), (width, height, 1))[0, 0] for z in todo])
        aligned, fields, skipped = align_solved(
            model, raw, args.neighbours, args.pull, args.robust or None, args.chunk, args.overlap, args.smooth,
            args.detail_pull, args.prealign, args.trunc,
            progress=lambda pairs: tqdm(pairs, desc="pairs", unit="pair"))
        for z, image, field in zip(todo, aligned, fields):
            volume.write(layers["image"], image[None, None], (x0, y0, z))
            volume.write(layers["field"], field.numpy()[None].astype(np.float32), (x0, y0, z))
        skipped = [todo[i] for i in skipped]
    else:
        all_phases = tasks.phases(job, todo)
        if queue is None:
            tasks.run_in_process(all_phases)
        else:
            tasks.run_queued(queue, all_phases)
        skipped = [z for z in tasks.blank_sections(job) if z in set(todo)]
    progress.puts([(str(z), b"done") for z in todo])
    if skipped:
        print(f"skipped blank sections: {' '.join(map(str, skipped))}")
    seconds = time.time() - start
    mpx = len(todo) * width * height / 1e6
    print(f"aligned {len(todo)} sections of {width} x {height} px at mip {args.mip} into {args.dest} in "
          f"{seconds:.1f} s ({mpx / seconds:.2f} Mpx/s)")
    return {"sections": len(todo), "seconds": seconds, "mpx_per_s": mpx / seconds}


if __name__ == "__main__":
    run_main(main)
