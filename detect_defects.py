"""Detect cracks and folds in image sections: a defect layer from the images alone.

    python detect_defects.py --source IMAGES --dest LAYER [--mip M] [--z_start Z0 --z_stop Z1] [--bbox X0 Y0 X1 Y1]

Writes ``LAYER`` in the demo's convention: uint8, 1 channel, 0 none / 1 crack / 2 fold, in the
images' frame, with the source's bounds, resolution and mips (mip M and every coarser mip are
written; a coarser pixel is the worst class of the 2 x 2 pixels it covers, as ``volume.downsample``
``labels``). Sections are read and written in ``--chunk`` squares with the network's context
(``DefectNet.radius`` px) read around each, so the layer does not depend on the chunk size. Each finished
section leaves a marker in ``LAYER/progress/detect/Z`` (the source, mip, bbox and the detector's sha256, and its
counts): a run stopped part way, run again, detects only the sections that have none with its own settings.

The detector (``DefectNet``, archived in ``pt/defects.pt``, recipe in ``train_detector.py``) is a
small fully convolutional network: 3 x 3 convolutions of growing dilation over the image on its
0..1 scale and its tissue flag (0 is missing data), then per-pixel scores of the three classes.
It learnt the cracks (a gap showing white) and folds (a compressed, darkened band) of
``misalign.py`` on the demo phantom and on registered real sections (SNEMI3D, ISBI 2012).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from cloudfiles import CloudFiles
from tqdm import tqdm

import demo
import volume
from masks import check_image
from helpers import (HelpFormatter, UserError, atomic_output, check_device, check_writable, code_version,
                     file_sha256, one_line, run_main)

KIND = "seamless-defect-detector"
VERSION = 1
ARCHIVE = Path(__file__).resolve().parent / "pt" / "defects.pt"
DETECTED_BY = "defects detected by SEAMLeSS detect_defects.py"


class DefectNet(nn.Module):
    """Per-pixel defect classes of image sections.

    A stack of 3 x 3 convolutions (``channels`` wide, ReLU) with the given ``dilations``, then a
    1 x 1 convolution to the scores of none / crack / fold. Input ``[N, 1, H, W]`` on a 0..1 scale
    (0 = missing data); output logits ``[N, 3, H, W]``. A pixel's scores depend on the input within
    ``radius`` px (Chebyshev) of it.
    """

    def __init__(self, channels: int = 16, dilations: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 1)):
        super().__init__()
        self.config = {"channels": channels, "dilations": list(dilations)}
        layers, width = [], 2  # the image and its tissue flag
        for d in dilations:
            layers += [nn.Conv2d(width, channels, 3, padding=d, dilation=d), nn.ReLU(inplace=True)]
            width = channels
        layers.append(nn.Conv2d(width, 3, 1))
        self.body = nn.Sequential(*layers)
        self.radius = sum(dilations)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([image, (image > 0).to(image.dtype)], 1))


def save_detector(path: str | Path, net: DefectNet, **state) -> Path:
    """Write ``net`` (config and weights, on the CPU) and plain-data ``state`` to ``path`` atomically (its folder made
    where missing, as a network archive's)."""
    archive = {"kind": KIND, "version": VERSION, "config": net.config,
               "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}, **state}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        torch.save(archive, tmp)
    return path


def load_detector(path: str | Path = ARCHIVE, device: str | torch.device = "cpu") -> DefectNet:
    """The ``DefectNet`` archived at ``path`` (weights only: a file holding any other Python object is refused), in
    eval mode on ``device``; a ``UserError`` (one line) for anything else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such detector archive")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            archive = torch.load(path, map_location=device, weights_only=True)
        if archive.get("kind") != KIND or archive.get("version") != VERSION:
            raise ValueError(f"not a {KIND} archive of version {VERSION}")
        net = DefectNet(**archive["config"])
        net.load_state_dict(archive["state_dict"])
    except Exception as err:
        raise UserError(f"{path}: not a readable defect detector ({one_line(err)})") from None
    return net.to(device).eval()


def detect(net: DefectNet, images: torch.Tensor) -> torch.Tensor:
    """Defect map uint8 ``[N, 1, H, W]`` (0 none / 1 crack / 2 fold) of ``images`` uint8 ``[N, 1, H, W]``.

    Missing data (0) is never a defect. Beyond ``net.radius`` px of the border the result is the one
    a larger cutout would give.
    """
    device = next(net.parameters()).device
    with torch.no_grad():
        x = images.to(device).float() / 255
        classes = net(x).argmax(1, keepdim=True)
    return torch.where(x > 0, classes, 0).to(torch.uint8).cpu()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--source", required=True, help="image volume (any CloudVolume path, or 'demo')")
    p.add_argument("--dest", required=True, help="the defect layer to write (a folder or cloudpath); an existing "
                                                 "one must have the source's bounds, and its sections are replaced "
                                                 "but those an earlier run with the same settings finished")
    p.add_argument("--mip", type=int, default=0, help="resolution level to detect at")
    p.add_argument("--z_start", type=int, help="first section; None: the volume's first")
    p.add_argument("--z_stop", type=int, help="one past the last section; None: the volume's end")
    p.add_argument("--bbox", type=int, nargs=4, metavar=("X0", "Y0", "X1", "Y1"),
                   help="region in voxels of --mip (default: the whole section)")
    p.add_argument("--chunk", type=int, default=1024, help="xy size in px of the squares detected at once")
    p.add_argument("--archive", default=str(ARCHIVE), help="the detector (a DefectNet archive)")
    p.add_argument("--bucket", help="prefix for bare source paths")
    p.add_argument("--device", help="cpu or cuda; None: cuda if present")
    return p.parse_args(argv)


def region(args, source) -> tuple[int, int, int, int, int, int]:
    """``(x0, y0, x1, y1, z0, z1)`` in voxels of ``--mip``: the bbox and z range asked for, checked against the
    source's bounds (``UserError``)."""
    x0, y0, x1, y1 = volume.check_bbox(args.bbox, source)
    (_, _, sz0), (_, _, sz1) = volume.bounds(source)
    z0 = sz0 if args.z_start is None else args.z_start
    z1 = sz1 if args.z_stop is None else args.z_stop
    volume.check_z_range(z0, z1, sz0, sz1, vol=source)
    return x0, y0, x1, y1, z0, z1


def open_dest(args, source):
    """The defect layer at ``--dest`` with the source's bounds, resolution and mips: created, or an existing one of
    that shape that this tool wrote (any other is a ``UserError``: a typo in ``--dest`` never overwrites images or
    another tool's layer); this run is appended to its provenance."""
    entry = {"description": DETECTED_BY, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "code_version": code_version(), "method": {"archive": args.archive, "args": vars(args),
                                                        "command": " ".join(sys.argv)}}
    start, stop = volume.bounds(source, 0)
    mips = len(source.info["scales"])
    try:
        vol, created = volume.open_volume(args.dest), False
    except UserError:
        vol, created = volume.create_volume(args.dest, tuple(stop - start), "uint8", 1, source.meta.resolution(0),
                                            mips, (256, 256, 1), provenance=entry, offset=tuple(start)), True
    want, got = ([tuple(tuple(map(int, corner)) for corner in volume.bounds(layer, m))
                  for m in range(len(layer.info["scales"]))] for layer in (source, vol))
    if got != want or vol.num_channels != 1 or np.dtype(vol.dtype) != np.uint8 \
            or list(vol.meta.resolution(0)) != list(source.meta.resolution(0)):
        raise UserError(f"--dest {vol.cloudpath} exists with another shape ({vol.num_channels} channels of "
                        f"{np.dtype(vol.dtype)}, bounds {got[0][0]}..{got[0][1]}, {len(got)} mips): it must have the "
                        f"source's ({want[0][0]}..{want[0][1]}, {mips} mips, 1 channel of uint8)")
    if not created:
        ours = any(run.get("description") == DETECTED_BY for run in vol.provenance.processing)
        what = ("the source" if vol.cloudpath == source.cloudpath
                else None if ours else "a layer that detect_defects.py did not write")
        if what:
            raise UserError(f"--dest {vol.cloudpath} is {what}: refusing to overwrite it (give a new --dest)")
        vol.provenance.processing.append(entry)
    if source.cloudpath not in vol.provenance.sources:
        vol.provenance.sources.append(source.cloudpath)
    vol.commit_provenance()
    vol.non_aligned_writes = True
    return vol


def detect_chunk(net: DefectNet, source, z: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Defect map ``[1, 1, Y, X]`` uint8 of section ``z`` in ``box = (x0, y0, x1, y1)`` (voxels of the source's mip),
    detected on the box grown by ``net.radius`` px (within the source's bounds)."""
    (sx0, sy0, _), (sx1, sy1, _) = volume.bounds(source)
    x0, y0, x1, y1 = box
    r = net.radius
    rx0, ry0, rx1, ry1 = max(x0 - r, sx0), max(y0 - r, sy0), min(x1 + r, sx1), min(y1 + r, sy1)
    image = check_image(volume.read(source, (rx0, ry0, z), (rx1 - rx0, ry1 - ry0, 1)),
                        f"--source {source.cloudpath}, section {z} at {box},")
    found = detect(net, torch.from_numpy(image)).numpy()
    return found[:, :, y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.chunk < 1:
        raise UserError("--chunk must be >= 1")
    if not volume.is_cloudpath(args.dest):  # a folder here, even before it exists
        args.dest = str(Path(args.dest).expanduser().resolve())
        check_writable(args.dest, "--dest", folder=True)
        if Path(args.dest).is_dir() and any(Path(args.dest).iterdir()) and not (Path(args.dest) / "info").exists():
            raise UserError(f"--dest {args.dest} is a folder of other files, not a layer (an align.py DEST? its "
                            "layers are folders in it): give a new folder")
    source = volume.open_volume(demo.resolve(args.source), args.mip, args.bucket)
    volume.check_kind(source, "image", "--source")
    x0, y0, x1, y1, z0, z1 = region(args, source)
    device = check_device(args.device)
    net = load_detector(args.archive, device)
    dest = open_dest(args, source)
    boxes = [(x, y, min(x + args.chunk, x1), min(y + args.chunk, y1))
             for y in range(y0, y1, args.chunk) for x in range(x0, x1, args.chunk)]
    r, area = net.radius, (x1 - x0) * (y1 - y0)  # each chunk is detected with the detector's reach around it
    read = sum((min(bx1 + r, x1) - max(bx0 - r, x0)) * (min(by1 + r, y1) - max(by0 - r, y0))
               for bx0, by0, bx1, by1 in boxes)
    if read > 4 * area:
        print(f"warning: --chunk {args.chunk} against the detector's reach of {r} px: each section is read "
              f"{read / area:.0f} times over (a larger --chunk does the same work once)", file=sys.stderr)
    key = {"source": volume.canonical(source.cloudpath), "mip": args.mip, "bbox": [x0, y0, x1, y1],
           "archive_sha256": file_sha256(args.archive),  # what a section's labels depend on, and the source's
           "source_sample": volume.sample_sha(source, z0, (x0, y0, x1, y1))}  # content: not rewritten since
    marks = CloudFiles(f"{dest.cloudpath}/progress/detect")
    done = {z: mark for z, mark in zip(range(z0, z1), volume.get_many(marks, [str(z) for z in range(z0, z1)]))
            if mark and mark["key"] == key}
    if done:
        print(f"resuming: {len(done)} of {z1 - z0} sections were detected by an earlier run with these settings")
    todo = [z for z in range(z0, z1) if z not in done]
    with tqdm(total=len(todo) * len(boxes), desc="chunks", unit="chunk") as bar:
        for z in todo:
            found, coarsest = np.zeros(3, dtype=np.int64), len(dest.info["scales"]) - 1
            for box in boxes:
                labels = detect_chunk(net, source, z, box)
                found += np.bincount(labels.ravel(), minlength=3)[:3]
                coarsest = min(coarsest, volume.write_pyramid(dest, labels, (box[0], box[1], z), "labels", args.mip))
                bar.update()
            if coarsest < len(dest.info["scales"]) - 1:  # a --chunk off the coarser mips' grid: build them whole
                d = coarsest - args.mip
                volume.build_mips(dest, z, (x0 >> d, y0 >> d, -(-x1 >> d), -(-y1 >> d)), "labels", coarsest)
            done[z] = {"key": key, "counts": found.tolist()}
            marks.put_json(str(z), done[z])  # the section is whole
    counts = np.sum([mark["counts"] for mark in done.values()], axis=0, dtype=np.int64)
    coarsest = len(dest.info["scales"]) - 1
    print(f"detected defects in sections {z0}..{z1 - 1} ({x1 - x0} x {y1 - y0} px at mip {args.mip}): "
          f"{counts[1]} crack px, {counts[2]} fold px; written to {dest.cloudpath} at mips {args.mip}..{coarsest}")
    return {"crack_px": int(counts[1]), "fold_px": int(counts[2]), "coarsest_mip": coarsest}


if __name__ == "__main__":
    run_main(main)
