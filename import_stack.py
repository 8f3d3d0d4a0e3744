"""Import a folder of section images (one PNG or TIFF per section) into a precomputed image layer.

    python import_stack.py --dest data/isbi --resolution 4 4 50 FOLDER
    python import_stack.py --dest file:///abs/path/snemi --resolution 6 6 30 --mips 3 FOLDER

Sections are ordered by the number in their file names (the last run of digits:
``2.png`` before ``10.png``; ``train-input_0007.tif`` is section 7) and become
z = 0, 1, 2, ... A gap in the numbering is an error; with ``--allow_gaps`` z is
the file number and the missing sections are written as zeros (missing data).
Sections must be grey (an RGB file with three equal channels counts as grey),
all one size and one dtype. ``uint8`` is written as is; ``uint16`` / float need
``--rescale``, which maps the stack's non-zero range onto 1..255 and keeps 0
(missing data) at 0. ``--reregister`` shifts each section by whole pixels until
neighbours' content matches (``content_shifts``), for a "registered" folder
whose registration is off; the shifts are recorded in the provenance.

DEST (``--dest``) is the layer itself (it holds ``info``): a local folder, or any
CloudVolume path. Headers are checked before anything is written. A local
(``file://``) layer is written into a temporary sibling folder that is renamed
to DEST at the end, so a failure leaves nothing behind. ``gs://`` / ``s3://``
layers are written in place (object stores cannot rename a folder): a file
that fails to decode halfway leaves the sections before it written.
"""
from __future__ import annotations

import argparse
import itertools
import re
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import tifffile
from PIL import Image
from tqdm import tqdm

import volume
from helpers import (HelpFormatter, UserError, atomic_output, check_memory, finite_float, machine_memory, one_line,
                     run_main)

SUFFIXES = (".png", ".tif", ".tiff")
REREGISTER_SIDE = 128  # px: the least side content_shifts matches sections on (shifts.best_shifts' reach is 32 px)
SECTION_BYTES = 16  # peak bytes per pixel of a section while it is read, scaled and written with its mips (13 measured)
CHUNK = (256, 256, 1)
MIN_SIDE, MAX_MIPS = 64, 6  # default mips: as many as keep the smaller side >= MIN_SIDE px
Image.MAX_IMAGE_PIXELS = None  # EM sections are often larger than Pillow's decompression-bomb limit


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("folder", help="folder of section images (.png, .tif, .tiff), numbered in their names")
    p.add_argument("--dest", help="the image layer to write: a local folder or a cloudpath (file://, gs://, "
                                  "s3://); default: DATA/<folder name> ($SEAMLESS_DATA or the repository's data/)")
    p.add_argument("--resolution", type=finite_float, nargs=3, required=True, metavar=("X", "Y", "Z"),
                   help="voxel size in nm")
    p.add_argument("--mips", type=int, help=f"resolution levels (default: as many as keep the smaller side "
                                            f">= {MIN_SIDE} px, at most {MAX_MIPS})")
    p.add_argument("--rescale", action="store_true",
                   help="stretch uint16 / float sections min-max onto 1..255 (0 stays 0 = missing data)")
    p.add_argument("--reregister", action="store_true",
                   help="shift each section by whole pixels until neighbours' content matches (for a folder "
                        "whose registration is off; the shifts go into the provenance)")
    p.add_argument("--allow_gaps", action="store_true",
                   help="write missing section numbers as zeros (missing data); z is then the file number")
    p.add_argument("--overwrite", action="store_true", help="replace an existing layer at DEST")
    return p.parse_args(argv)


def _listing(numbers: list[int], most: int = 20, total: int | None = None) -> str:
    """``1, 5, 9`` (the first ``most`` numbers, then how many more of ``total``, by default ``len(numbers)``)."""
    total = len(numbers) if total is None else total
    more = f" and {total - most} more" if total > most else ""
    return ", ".join(map(str, numbers[:most])) + more


# ----------------------------------------------------------------------- the files
def list_sections(folder: Path) -> list[tuple[int, Path]]:
    """``(section number, path)`` of every image in ``folder``, in section order.

    Images are the files ending in ``.png``, ``.tif`` or ``.tiff`` (any case),
    hidden files excepted; the number is the last run of digits in the name.
    Raises ``UserError`` for a missing folder, no images, a name without a number
    or two files with the same number.
    """
    if not folder.is_dir():
        raise UserError(f"no folder {folder}")
    try:
        files = [p for p in folder.iterdir()  # a broken link is kept: reading it says so
                 if p.suffix.lower() in SUFFIXES and not p.name.startswith(".") and not p.is_dir()]
    except OSError as err:
        raise UserError(f"cannot list {folder}: {one_line(err)}") from None
    if not files:
        raise UserError(f"no images ({', '.join(SUFFIXES)}) in {folder}")
    sections = []
    for path in files:
        digits = re.findall(r"\d+", path.stem)
        if not digits:
            raise UserError(f"{path} has no section number in its name (expected e.g. 0007.png)")
        sections.append((int(digits[-1]), path))
    sections.sort()
    for (number, first), (other, second) in zip(sections, sections[1:]):
        if number == other:
            raise UserError(f"{first.name} and {second.name} in {folder} are both section {number}")
    return sections


def arrange(sections: list[tuple[int, Path]], allow_gaps: bool) -> tuple[int, list[Path | None]]:
    """The volume's sections: ``(first z, [path per z, None where a section is missing])``.

    Without ``allow_gaps`` z is the position in ``sections`` (from 0) and a gap
    in the numbering raises ``UserError`` naming the missing numbers; with it, z
    is the file number, unless the gaps hold over 1000 sections and 10 per file (a file numbered apart from the
    others, e.g. by a date: a ``UserError`` naming the widest gap).
    """
    numbers = [number for number, _ in sections]
    gaps = [(a, b) for a, b in zip(numbers, numbers[1:]) if b > a + 1]  # counted, not listed: a stray number is huge
    missing = sum(b - a - 1 for a, b in gaps)
    if missing and not allow_gaps:
        first = list(itertools.islice((n for a, b in gaps for n in range(a + 1, b)), 20))
        raise UserError(f"section {_listing(first, total=missing)} missing from the numbering {numbers[0]}.."
                        f"{numbers[-1]} (pass --allow_gaps to write missing sections as zeros)")
    if missing > max(1000, 10 * len(numbers)):  # not a few lost sections: a file numbered apart from the others
        a, b = max(gaps, key=lambda gap: gap[1] - gap[0])
        raise UserError(f"--allow_gaps: the numbering {numbers[0]}..{numbers[-1]} of {len(numbers)} files would "
                        f"write {missing} missing sections (the widest gap: between {a} and {b}); rename the file "
                        "whose number is off")
    if not allow_gaps:
        return 0, [path for _, path in sections]
    if numbers[-1] >= 2 ** 31:
        raise UserError(f"--allow_gaps: {sections[-1][1].name} is section {numbers[-1]}, beyond the z a layer holds "
                        "(2^31 - 1): rename it, or import without --allow_gaps (z then counts the files from 0)")
    by_number = dict(sections)
    return numbers[0], [by_number.get(n) for n in range(numbers[0], numbers[-1] + 1)]


def probe(path: Path) -> tuple[tuple[int, ...], str]:
    """``(shape, dtype name)`` of one image file from its header, without decoding the pixels.

    shape is ``(H, W)`` for grey, ``(H, W, C)`` for C channels (a palette PNG
    counts as RGB), or whatever a TIFF holds (``(pages, H, W)`` for a stack).
    """
    try:
        if path.suffix.lower() == ".png":
            with Image.open(path) as im:
                template = np.asarray(Image.new("RGB" if im.mode == "P" else im.mode, (1, 1)))
                return (im.height, im.width) + template.shape[2:], template.dtype.name
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return tuple(series.shape), series.dtype.name
    except Exception as err:  # every decoder error (corrupt, truncated, unreadable) is the user's file
        raise UserError(f"cannot read {path}: {one_line(err)}") from None


def check_stack(paths: list[Path], rescale: bool) -> tuple[int, int, str]:
    """``(height, width, dtype name)`` shared by every file in ``paths`` (headers only).

    Raises ``UserError`` for a file that is not one section (``[H, W]``, or
    ``[H, W, 3]`` RGB), mixed sizes, mixed dtypes, or a dtype other than uint8
    without ``rescale`` (a non-numeric one even with it).
    """
    first = None
    for path in tqdm(paths, desc="checking", unit="file", leave=False):
        shape, dtype = probe(path)
        if len(shape) not in (2, 3) or len(shape) == 3 and shape[2] != 3:
            raise UserError(f"{path} has shape {shape}: expected one grey section, [H, W] "
                            "(or RGB [H, W, 3] with equal channels)")
        if first is None:
            first = (shape[:2], dtype, path)
        elif shape[:2] != first[0]:
            raise UserError(f"{path.name} is {shape[1]} x {shape[0]} px but {first[2].name} is "
                            f"{first[0][1]} x {first[0][0]} px: all sections must be one size")
        elif dtype != first[1]:
            raise UserError(f"{path.name} is {dtype} but {first[2].name} is {first[1]}: "
                            "all sections must have one dtype")
    (height, width), dtype, _ = first
    kind = np.dtype(dtype)
    if not (np.issubdtype(kind, np.integer) or np.issubdtype(kind, np.floating)):
        raise UserError(f"the sections are {dtype}: only integer or float images can be imported")
    if dtype != "uint8" and not rescale:
        raise UserError(f"the sections are {dtype}, not uint8: pass --rescale to stretch them onto 1..255")
    return height, width, dtype


def read_section(path: Path) -> np.ndarray:
    """One section ``[H, W]`` in the file's dtype; an RGB file with three equal channels becomes grey.

    Raises ``UserError`` for a file that cannot be decoded or a colour image.
    """
    try:
        if path.suffix.lower() == ".png":
            with Image.open(path) as im:
                section = np.array(im.convert("RGB") if im.mode == "P" else im)
        else:
            section = tifffile.imread(path)
    except Exception as err:  # every decoder error (corrupt, truncated, unreadable) is the user's file
        raise UserError(f"cannot read {path}: {one_line(err)}") from None
    if section.ndim == 3:
        if not (section == section[..., :1]).all():
            raise UserError(f"{path} is a colour image (its channels differ): sections must be grey")
        section = section[..., 0]
    return section


def read_registered(folder: str | Path, start: int, stop: int | None = None) -> np.ndarray:
    """Sections ``start`` to ``stop`` - 1 (natural file order; None: to the last) of a folder of registered 8-bit
    sections, as the benchmarks and the detector's training read them: uint8 ``[Z, H, W]``, 0 raised to 1 (0 means
    missing data). Raises ``UserError`` for fewer than 2 sections there, and as ``check_stack`` does (mixed sizes
    or dtypes), also for a dtype other than uint8: no stretch is guessed for a benchmark's truth."""
    paths = [p for _, p in list_sections(Path(folder))][start:stop]
    if len(paths) < 2:
        raise UserError(f"{folder}: fewer than 2 sections from {start}")
    dtype = check_stack(paths, rescale=True)[2]
    if dtype != "uint8":
        raise UserError(f"{folder}: the sections are {dtype}, not uint8: convert them to 8-bit images first")
    return np.maximum(np.stack([read_section(p) for p in paths]), 1)


def read_scaled(path: Path, stretch: tuple[float, float] | None) -> np.ndarray:
    """``read_section``, mapped onto uint8 by ``rescale`` when ``stretch`` (the stack's value range) is given."""
    section = read_section(path)
    return section if stretch is None else rescale(section, *stretch)


# ----------------------------------------------------------------------- re-registration
def content_shifts(sections: Iterable[np.ndarray]) -> np.ndarray:
    """Whole-pixel shifts ``[Z, 2]`` (px, x then y) that make neighbouring sections' content match.

    sections: ``[H, W]`` arrays, read one after another (two in memory at a time).
    The ``shifts.best_shifts`` of each neighbour pair, added up along the
    stack (into the first section's frame), less their mean (the stack stays
    centred), rounded: section z pulled by ``shifts[z]`` (``shift_section``). A
    translation per section, nothing learned: for a registered folder whose
    registration fails ``bench/align_quality.py``'s check.
    """
    from shifts import best_shifts

    offsets, previous = [np.zeros(2)], None
    for section in sections:
        if previous is not None:
            offsets.append(offsets[-1] - best_shifts(previous[None], section[None])[0])
        previous = section
    shifts = np.stack(offsets)
    return np.round(shifts - shifts.mean(0)).astype(np.int64)


def shift_section(section: np.ndarray, shift) -> np.ndarray:
    """``section`` ``[H, W]`` pulled by the whole-pixel shift ``shift`` (x, y px): ``out(p) = section(p + shift)``, 0
    (missing data) where that falls outside. A copy of the overlap: no more memory than the section's own."""
    (dx, dy), (h, w) = (int(v) for v in shift), section.shape
    out = np.zeros_like(section)
    if abs(dx) < w and abs(dy) < h:
        out[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)] = \
            section[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)]
    return out


def register_rigidly(sections: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``sections`` ``[Z, H, W]`` moved by their ``content_shifts``; returns them and the shifts ``[Z, 2]`` (px)."""
    shifts = content_shifts(sections)
    return np.stack([shift_section(s, d) for s, d in zip(sections, shifts)]), shifts


# ----------------------------------------------------------------------- intensities
def value_range(paths: list[Path]) -> tuple[float, float]:
    """``(lo, hi)``: the smallest and largest values of the stack, ignoring 0 and NaN (missing data).

    Reads one section at a time; ``(0, 0)`` if nothing but missing data.
    """
    lo, hi = np.inf, -np.inf
    for path in tqdm(paths, desc="value range", unit="section", leave=False):
        section = read_section(path)
        values = section[(section != 0) & np.isfinite(section)]
        if values.size:
            lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
    return (lo, hi) if lo <= hi else (0.0, 0.0)


def rescale(section: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``[H, W]`` uint8: ``lo..hi`` mapped linearly onto 1..255 (rounded); 0 and NaN stay 0 (missing data).

    section: ``[H, W]`` of any integer or float dtype. A flat stack (``hi == lo``) maps to 1.
    """
    values = section.astype(np.float32)
    tissue = (values != 0) & np.isfinite(values)
    scale = 254 / (hi - lo) if hi > lo else 0.0
    stretched = np.clip(1 + np.round((np.where(tissue, values, lo) - lo) * scale), 1, 255)
    return np.where(tissue, stretched, 0).astype(np.uint8)


def default_mips(height: int, width: int) -> int:
    """How many 2x levels keep the smaller side ``>= MIN_SIDE`` px (at least 1, at most ``MAX_MIPS``)."""
    side, mips = min(height, width), 1
    while mips < MAX_MIPS and side >> mips >= MIN_SIDE:
        mips += 1
    return mips


# ----------------------------------------------------------------------- destination
def dest_cloudpath(dest: str) -> str:
    """The CloudVolume path of ``--dest``: a path without a scheme is a local folder (relative to the cwd)."""
    return volume.resolve_path(dest if volume.is_cloudpath(dest) else str(Path(dest).expanduser().resolve()))


def local_folder(cloudpath: str) -> Path | None:
    """The folder of a ``file://`` (or ``precomputed://file://``) path; None for remote storage."""
    path = cloudpath.removeprefix("precomputed://")
    return Path(path.removeprefix("file://")) if path.startswith("file://") else None


def check_dest(folder: Path, overwrite: bool) -> None:
    """Refuse an existing local DEST without ``overwrite``, and anything there but a precomputed layer with it."""
    if not folder.exists():
        return
    if not overwrite:
        raise UserError(f"{folder} already exists (pass --overwrite to replace it)")
    if not (folder / "info").is_file():
        raise UserError(f"{folder} exists and is not a precomputed layer (no 'info' file): not replacing it")


@contextmanager
def staged(folder: Path) -> Iterator[str]:
    """A ``file://`` path beside ``folder`` to write into; on success it replaces ``folder``, else it is deleted
    (``helpers.atomic_output``, which also deletes what killed imports left beside it)."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {folder.parent}: {one_line(err)}") from None
    with atomic_output(folder, "importing") as tmp:
        yield "file://" + str(tmp)


@contextmanager
def in_place(cloudpath: str) -> Iterator[str]:
    """Remote storage cannot rename a folder: write straight to ``cloudpath``."""
    yield cloudpath


# ----------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    if not all(1e-3 <= r <= 1e6 for r in args.resolution):  # the layer's bounds in nm must stay exact integers
        raise UserError(f"--resolution {' '.join(f'{r:g}' for r in args.resolution)}: a voxel size in nm, "
                        "from 0.001 to 1e6 (1 mm)")
    folder = Path(args.folder).expanduser()
    cloudpath = dest_cloudpath(args.dest or str(volume.data_dir() / folder.resolve().name))
    local = local_folder(cloudpath)
    if local is not None:
        check_dest(local, args.overwrite)

    sections = list_sections(folder)
    z0, slots = arrange(sections, args.allow_gaps)
    paths = [path for path in slots if path is not None]
    missing = [z0 + i for i, path in enumerate(slots) if path is None]
    height, width, dtype = check_stack(paths, args.rescale)
    check_memory(height * width * SECTION_BYTES, machine_memory(), f"a section of {width} x {height} px",
                 "cut the sections into smaller tiles first (a volume is written a section at a time)")
    mips = default_mips(height, width) if args.mips is None else args.mips
    if mips < 1 or min(height, width) >> (mips - 1) < 1:
        raise UserError(f"--mips {mips} does not fit {width} x {height} px sections "
                        f"(1 to {min(height, width).bit_length()})")
    stretch = value_range(paths) if dtype != "uint8" else None
    shifts = np.zeros((len(slots), 2), np.int64)
    if args.reregister:
        if min(height, width) < REREGISTER_SIDE:
            raise UserError(f"--reregister matches sections over their centre, shifted up to 32 px: it needs sections "
                            f"of {REREGISTER_SIDE} px or more (these are {width} x {height} px)")
        if missing:
            raise UserError(f"--reregister needs a stack without gaps ({len(missing)} missing: {_listing(missing)})")
        shifts = content_shifts(read_scaled(path, stretch) for path in tqdm(paths, desc="matching", unit="section"))

    resolution = [int(r) if r.is_integer() else r for r in args.resolution]
    provenance = {"description": f"sections imported from {folder.resolve()} by import_stack.py", "method": {
        "source": str(folder.resolve()), "files": [p.name if p else None for p in slots], "first_z": z0,
        "missing": missing, "resolution": resolution, "dtype": dtype,
        "value_range": list(stretch) if stretch else None,
        "shifts": shifts.tolist() if args.reregister else None,
        "command": shlex.join(["import_stack.py", *(sys.argv[1:] if argv is None else argv)])}}
    with (in_place(cloudpath) if local is None else staged(local)) as write_path:
        vol = volume.create_volume(write_path, (width, height, len(slots)), "uint8", 1, resolution, mips, CHUNK,
                                   provenance=provenance, overwrite=args.overwrite, offset=(0, 0, z0))
        blank = []  # sections all zero: missing data from end to end
        for i, path in enumerate(tqdm(slots, desc="sections", unit="section")):
            section = np.zeros((height, width), np.uint8) if path is None else read_scaled(path, stretch)
            if path is not None and not section.any():
                blank.append(z0 + i)
            volume.write_pyramid(vol, shift_section(section, shifts[i])[None, None], (0, 0, z0 + i), "image")
    seconds = time.time() - start
    gaps = f" ({len(missing)} missing, written as zeros: {_listing(missing)})" if missing else ""
    if blank:
        print(f"warning: {len(blank)} of {len(paths)} sections hold only zeros, which read as missing data: "
              f"z {_listing(blank)}", file=sys.stderr)
    print(f"imported {len(paths)} sections{gaps} of {width} x {height} px ({dtype}), z {z0}..{z0 + len(slots) - 1}, "
          f"{mips} mips, into {cloudpath} in {seconds:.1f} s")
    return {"path": cloudpath, "sections": len(paths), "missing": missing, "size": (width, height, len(slots)),
            "mips": mips, "seconds": seconds}


if __name__ == "__main__":
    run_main(main)
