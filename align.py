"""Align a stack of sections with a trained network and write it as precomputed layers.

    python align.py --archive pt/demo.pt --source demo --dest data/demo_aligned --z_start 70 --z_stop 100

Sections are aligned serially: section z+1 is pulled onto the already aligned
section z; the first section of the range is the fixed reference
(``--raw_neighbour`` aligns each to its raw neighbour and chains the fields).
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
from alignment import align_serial
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
    before = None
    if first > args.z_start:  # resume: the section before `first` is already aligned
        before = (read(source, first - 1)[0], read(layers["image"], first - 1)[0],
                  torch.from_numpy(read(layers["field"], first - 1)))
        print(f"resuming at section {first}")
    sections = (read(source, z)[0] for z in range(first, args.z_stop))
    start = time.time()
    bar = tqdm(zip(range(first, args.z_stop), align_serial(model, sections, before, args.raw_neighbour,
                                                          args.chunk, args.overlap)),
               total=args.z_stop - first, desc="sections", unit="section")
    for z, (aligned, field) in bar:
        volume.write(layers["image"], aligned[None, None], (x0, y0, z))
        volume.write(layers["field"], field.numpy()[None].astype(np.float32), (x0, y0, z))
        progress.put(str(z), b"done")
    seconds = time.time() - start
    count = args.z_stop - first
    mpx = count * width * height / 1e6
    print(f"aligned {count} sections of {width} x {height} px at mip {args.mip} into {args.dest} in "
          f"{seconds:.1f} s ({mpx / seconds:.2f} Mpx/s)")
    return {"sections": count, "seconds": seconds, "mpx_per_s": mpx / seconds}


if __name__ == "__main__":
    run_main(main)
