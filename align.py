"""Align a stack of sections with a trained network and write it as precomputed layers.

    python align.py --archive pt/demo.pt --source demo --dest data/demo_aligned --z_start 70 --z_stop 100

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
in ``DEST/progress/``, so a re-run resumes after the last finished one;
``--overwrite`` redoes the range.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import volume
from alignment import align_serial, align_solved
from helpers import UserError, run_main
from models.archive import load_archive


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
    p.add_argument("--chunk", type=int, default=1024, help="chunk size in px fed to the network")
    p.add_argument("--overlap", type=int, default=128, help="context in px around each chunk, cropped away")
    p.add_argument("--raw_neighbour", action="store_true",
                   help="align each section to its raw neighbour and chain the fields")
    p.add_argument("--vote", type=int, default=1,
                   help="align each section to the K aligned sections before it and vote (1 = plain serial)")
    p.add_argument("--solve", action="store_true",
                   help="stack-wide solve over raw neighbour pairs instead of serial alignment")
    p.add_argument("--neighbours", type=int, default=2, help="--solve: neighbours on each side of a section")
    p.add_argument("--pull", type=float, default=1.0,
                   help="--solve: weight of the pull toward zero displacement (a pair pixel weighs 1)")
    p.add_argument("--robust", type=float, default=4.0,
                   help="--solve: px scale of the robust re-weighting of disagreeing pairs (0 = plain least squares)")
    p.add_argument("--overwrite", action="store_true", help="redo sections already aligned in the range")
    p.add_argument("--bucket", help="prefix for bare source paths")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def open_dest(args, source, box) -> tuple:
    """Create (or re-open and check) ``DEST/image`` and ``DEST/field`` over ``box`` of ``source``'s mip."""
    (x0, y0, z0), (x1, y1, z1) = box
    size, offset = (x1 - x0, y1 - y0, z1 - z0), (x0, y0, z0)
    resolution = list(source.resolution)
    provenance = {"description": "aligned by SEAMLeSS align.py", "method": {
        "archive": args.archive, "source": args.source, "mip": args.mip, "args": vars(args),
        "command": " ".join(sys.argv)}}
    layers = {}
    for name, dtype, channels in (("image", "uint8", 1), ("field", "float32", 2)):
        path = args.dest.rstrip("/") + "/" + name
        cloudpath = volume.resolve_path(path)
        try:
            vol = volume.open_volume(path)
        except UserError:
            vol = volume.create_volume(cloudpath, size, dtype, channels, resolution, 1, (256, 256, 1),
                                       provenance=provenance, offset=offset)
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


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.vote < 1 or args.neighbours < 1 or args.pull <= 0 or args.robust < 0:
        raise UserError("--vote and --neighbours must be >= 1, --pull > 0, --robust >= 0")
    if sum([args.raw_neighbour, args.vote > 1, args.solve]) > 1:
        raise UserError("choose one of --raw_neighbour, --vote K, --solve")
    model, _ = load_archive(args.archive, args.device)
    model.eval()
    source = volume.open_volume(args.source, args.mip, args.bucket)
    if source.num_channels != 1 or str(source.dtype) != "uint8":
        raise UserError(f"{args.source} has {source.num_channels} channels of {source.dtype}; the network "
                        "aligns 1-channel uint8 images")
    (sx0, sy0, sz0), (sx1, sy1, sz1) = volume.bounds(source)
    x0, y0, x1, y1 = args.bbox or (sx0, sy0, sx1, sy1)
    if not (sx0 <= x0 < x1 <= sx1 and sy0 <= y0 < y1 <= sy1):
        raise UserError(f"--bbox {x0} {y0} {x1} {y1} is outside the volume ({sx0} {sy0} {sx1} {sy1} at mip "
                        f"{args.mip})")
    if not sz0 <= args.z_start < args.z_stop <= sz1:
        raise UserError(f"z range {args.z_start}..{args.z_stop} is outside the volume's sections {sz0}..{sz1 - 1}")
    layers = open_dest(args, source, ((x0, y0, sz0), (x1, y1, sz1)))
    progress = progress_files(args.dest)
    if args.overwrite:
        progress.delete([str(z) for z in range(args.z_start, args.z_stop)])
    first = args.z_start
    while first < args.z_stop and progress.exists(str(first)):
        first += 1
    if first == args.z_stop:
        print(f"sections {args.z_start}..{args.z_stop - 1} are already aligned in {args.dest} "
              "(--overwrite to redo)")
        return {"sections": 0}

    width, height = x1 - x0, y1 - y0
    read = lambda vol, z: volume.read(vol, (x0, y0, z), (width, height, 1))[0]  # noqa: E731
    start = time.time()
    if args.solve:
        first = args.z_start  # one joint step over the whole range
        raw = np.stack([read(source, z)[0] for z in range(first, args.z_stop)])
        aligned, fields, _ = align_solved(
            model, raw, args.neighbours, args.pull, args.robust or None, args.chunk, args.overlap,
            progress=lambda pairs: tqdm(pairs, desc="pairs", unit="pair"))
        results = zip(aligned, fields)
    else:
        done = range(max(args.z_start, first - args.vote), first)  # resume: the sections already aligned
        before = [(read(source, z)[0], read(layers["image"], z)[0], torch.from_numpy(read(layers["field"], z)))
                  for z in done]
        if before:
            print(f"resuming at section {first}")
        sections = (read(source, z)[0] for z in range(first, args.z_stop))
        results = align_serial(model, sections, before, args.raw_neighbour, args.vote, args.chunk, args.overlap)
    bar = tqdm(zip(range(first, args.z_stop), results), total=args.z_stop - first, desc="sections", unit="section")
    skipped = []
    for z, (aligned, field) in bar:
        if not aligned.any():
            skipped.append(z)
        volume.write(layers["image"], aligned[None, None], (x0, y0, z))
        volume.write(layers["field"], field.numpy()[None].astype(np.float32), (x0, y0, z))
        progress.put(str(z), b"done")
    if skipped:
        print(f"skipped blank sections: {' '.join(map(str, skipped))}")
    seconds = time.time() - start
    count = args.z_stop - first
    mpx = count * width * height / 1e6
    print(f"aligned {count} sections of {width} x {height} px at mip {args.mip} into {args.dest} in "
          f"{seconds:.1f} s ({mpx / seconds:.2f} Mpx/s)")
    return {"sections": count, "seconds": seconds, "mpx_per_s": mpx / seconds}


if __name__ == "__main__":
    run_main(main)
