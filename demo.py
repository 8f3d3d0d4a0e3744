"""The embedded demo volume: a synthetic ssEM stack with ground truth, built offline on first use.

A 3-D neuropil phantom (``phantom.py``) is sliced into sections, each section is
misaligned and some are cracked or folded (``misalign.py``), and four
precomputed layers are written under ``DATA/demo/`` (``volume.data_dir()``):

* ``image``   uint8, the misaligned sections (what an aligner sees), mips 0-2;
* ``defects`` uint8, 0 none / 1 crack / 2 fold, in the image's frame;
* ``field``   float32, 2 channels: the ground-truth field that re-aligns each
  section, ``warp(image_z, field_z) == aligned_z``, in pixels of each mip;
* ``aligned`` uint8, the phantom before misalignment (the truth).

Sections ``0 <= z < 70`` are for training, ``70 <= z < 100`` are held out. The
build is deterministic (seed 0) and atomic (a temporary directory renamed at
the end), so concurrent or interrupted builds never leave a half volume.

The same recipe builds other phantom volumes anywhere, of any shape and seed,
and of any ``PHANTOMS`` kind (e.g. held-out or training data for a benchmark)::

    python demo.py --phantom static --seed 20000 --shape 8 2048 2048 data/static_train

A volume is generated and written a slab of sections at a time (``slabs``, ``SLAB_PIXELS``), bit for bit as
if whole, so its memory does not grow with its depth: ``--shape 100 2048 2048`` peaks at 4.5 GB (the
default shape at 2.3 GB).
"""
from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

import volume
from helpers import HelpFormatter, UserError, atomic_output, check_writable, local_path, random_seed, run_main

SHAPE = (100, 512, 512)  # sections, rows, columns at mip 0
PAD = 48  # margin generated around each section so misalignment pulls in tissue, not zeros
MIPS = 3
RESOLUTION = (8, 8, 40)  # nm
SEED = 0
TRAIN_RANGE, TEST_RANGE = (0, 70), (70, 100)
LAYERS = ("image", "defects", "field", "aligned")
LAYER_KINDS = {"image": "image", "defects": "labels", "field": "field", "aligned": "image"}  # volume.downsample's
# gen_stack flags that fit the demo volume (the seed's mip 5 x 1152 px needs a real dataset)
GEN_STACK_DEFAULTS = dict(mip=0, dim=256, stack_height=10, train_range=TRAIN_RANGE, test_range=TEST_RANGE)
DATASET_COUNT = {"train": 32, "test": 8}
SLAB_PIXELS = 2 ** 24  # canvas pixels (a slab of sections) generated and written at a time: bounds a build's memory
# how the phantom's tissue changes from section to section: as the demo's (new tissue every section, space
# bent smoothly), without the bending, or not at all (one section repeated: what is left of an aligner's
# error there is its own)
PHANTOMS = ("default", "unbent", "static")


def demo_dir() -> Path:
    return volume.data_dir() / "demo"


def is_built(path: Path | None = None) -> bool:
    """Whether every layer of the demo volume (or of a volume ``build`` wrote at ``path``) is there."""
    path = path or demo_dir()
    return all((path / layer / "info").is_file() for layer in LAYERS)


def describe(shape=SHAPE) -> str:
    z, h, w = shape
    return f"{z} sections of {w} x {h} px at {RESOLUTION[0]} nm, mips 0-{MIPS - 1}"


def ensure_demo() -> dict[str, str]:
    """Build the demo volume if it is not there yet; return ``{layer: file:// path}``."""
    if not is_built():
        build()
    return {layer: "file://" + str(demo_dir() / layer) for layer in LAYERS}


def resolve(path: str | None, layer: str = "image") -> str | None:
    """``path`` as it is, or for the word ``demo`` the ``file://`` path of the demo volume's ``layer`` (one of
    ``LAYERS``; the volume is built on first use). Scripts call it on every volume flag that accepts ``demo``."""
    return ensure_demo()[layer] if path == "demo" else path


def make_arrays(shape=SHAPE, pad=PAD, seed=SEED, kind: str = "default",
                phantom_seed: int | None = None, misalignment=None) -> dict[str, np.ndarray]:
    """The demo's layers as arrays ``[Z, C, Y, X]`` at mip 0 (see the module docstring): ``slabs`` concatenated.

    ``kind``: one of ``PHANTOMS``; ``seed`` draws the misalignment and, unless
    ``phantom_seed`` is given, the phantom's tissue; ``misalignment``: the
    ``misalign.MisalignParams`` (None: the defaults, the demo's).
    """
    parts = [arrays for _, arrays in slabs(shape, pad, seed, kind, phantom_seed, misalignment)]
    return {layer: np.concatenate([part[layer] for part in parts]) for layer in LAYERS}


def slabs(shape=SHAPE, pad=PAD, seed=SEED, kind: str = "default", phantom_seed: int | None = None,
          misalignment=None, slab: int | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """``make_arrays``' layers a slab of sections at a time, in order: ``(first section, {layer: [z, C, Y, X]})``.

    ``slab``: sections per slab, at least 2 (the last may have one more or fewer: ``_slab_stops``); None: as many
    as fit ``SLAB_PIXELS``, at least 2. The phantom's coarse 3-D geometry and every random draw of the
    misalignment are made for the whole stack first (``phantom.phantom_chunks``, ``misalign.draw``), so the slabs
    are the same bit for bit whatever their size; memory is a slab's, not the stack's.
    """
    import misalign
    import phantom

    if kind not in PHANTOMS:
        raise UserError(f"unknown phantom kind {kind!r} (one of {', '.join(PHANTOMS)})")
    z, h, w = shape
    canvas = (h + 2 * pad, w + 2 * pad)
    params = phantom.PhantomParams(bend=0.0, wobble=0.0) if kind == "unbent" else phantom.PhantomParams()
    misalignment = misalignment or misalign.MisalignParams()
    draws = misalign.draw(z, *canvas, misalignment, torch.Generator().manual_seed(seed))
    chunks = phantom.phantom_chunks((1 if kind == "static" else z, *canvas),
                                    seed=seed if phantom_seed is None else phantom_seed, params=params)
    sections = (chunk for _, chunk in chunks)
    if kind == "static":  # one section, repeated
        section = next(sections)
        sections = (section for _ in range(z))
    stops = _slab_stops(z, slab or max(2, SLAB_PIXELS // (canvas[0] * canvas[1])))
    for start, aligned in _restack(sections, stops):
        image, defects, field = misalign.misalign(torch.from_numpy(aligned)[:, None], misalignment, pad=pad,
                                                  draws=draws[start:start + len(aligned)])
        yield start, {"image": image.numpy(), "defects": defects.numpy(), "field": field.numpy(),
                      "aligned": aligned[:, None, pad:pad + h, pad:pad + w]}


def _slab_stops(z: int, slab: int) -> list[int]:
    """Where the slabs of ``slab`` sections (at least 2) that cover ``z`` sections end. A last slab of one section
    joins the one before it (``misalign.Draws``: a one-section batch is not misaligned bit for bit as in a stack)."""
    if slab < 2:
        raise ValueError(f"slabs of {slab} sections: at least 2")
    stops = [*range(slab, z, slab), z]
    if len(stops) > 1 and stops[-1] - stops[-2] == 1:
        del stops[-2]
    return stops


def _restack(chunks: Iterable[np.ndarray], stops: Iterable[int]) -> Iterator[tuple[int, np.ndarray]]:
    """Consecutive chunks ``[z_i, ...]`` of a stack regrouped into slabs that end at ``stops`` (the last: the
    stack's end): ``(first section, [stop - first, ...])``."""
    start, rest, stops = 0, None, iter(stops)
    stop = next(stops)
    for chunk in chunks:
        rest = chunk if rest is None else np.concatenate([rest, chunk])
        while start + len(rest) >= stop:
            yield start, rest[:stop - start]
            start, rest = stop, rest[stop - start:]
            stop = next(stops, math.inf)


def build(shape=SHAPE, seed=SEED, kind: str = "default", path: Path | None = None, slab: int | None = None) -> None:
    """Write the demo layers (or another phantom's, ``make_arrays``) to ``path`` (default ``demo_dir()``).

    A slab of sections at a time (``slabs``), so a large volume needs a slab's memory. Atomically
    (``helpers.atomic_output``): a temporary sibling directory, then a rename; a half volume left at ``path``
    by an older build is replaced.
    """
    start, path = time.time(), Path(path or demo_dir())
    is_demo = path == demo_dir()
    foreign = sorted(entry.name for entry in path.iterdir() if entry.name not in LAYERS) if path.is_dir() else []
    if foreign:  # the rebuild replaces the folder whole
        raise UserError(f"{path} is to be rebuilt (a layer of it is missing or unreadable), but it also holds "
                        f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, which is not the volume's: "
                        "move that elsewhere, then run again")
    what = "the demo volume" if is_demo else f"a {kind} phantom volume (seed {seed})"
    print(f"building {what} in {path} ({describe(shape)})" + ("; this happens once" if is_demo else ""))
    provenance = {"description": f"SEAMLeSS {kind} phantom volume: synthetic neuropil, misaligned, with cracks "
                                 "and folds; 'field' re-aligns 'image' onto 'aligned'",
                  "method": {"generator": "demo.py", "kind": kind, "shape": list(shape), "pad": PAD, "seed": seed}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, "building") as tmp:
        vols = {}
        for z0, arrays in slabs(shape, PAD, seed, kind, slab=slab):
            vols = vols or {layer: volume.create_volume(
                "file://" + str(tmp / layer), (shape[2], shape[1], shape[0]), str(array.dtype),
                num_channels=array.shape[1], resolution=RESOLUTION, mips=MIPS, chunk=(256, 256, 1),
                provenance=provenance) for layer, array in arrays.items()}
            for layer, array in arrays.items():
                volume.write_pyramid(vols[layer], array, (0, 0, z0), LAYER_KINDS[layer])
    print(f"{what} ready in {time.time() - start:.0f} s: layers {', '.join(LAYERS)}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Build a phantom volume as the demo's (layers image, defects, field, "
                                            "aligned) at DEST.",
                                formatter_class=HelpFormatter)
    p.add_argument("dest", help="a local directory that does not exist yet")
    p.add_argument("--phantom", default="default", choices=PHANTOMS, help="how the tissue changes between sections")
    p.add_argument("--seed", type=random_seed, default=SEED, help="draws the tissue and the misalignment")
    p.add_argument("--shape", type=int, nargs=3, default=SHAPE, metavar=("Z", "H", "W"),
                   help="sections, rows, columns at mip 0")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    dest = local_path(args.dest, "DEST").resolve()
    if dest.exists():
        raise UserError(f"{dest} exists: choose a new directory (a phantom volume is never overwritten)")
    z, h, w = args.shape
    step = 2 ** (MIPS - 1)  # each mip halves H and W
    if z < 1 or min(h, w) < step or h % step or w % step:
        raise UserError(f"--shape {z} {h} {w}: needs at least one section, H and W multiples of {step} (mips "
                        f"0-{MIPS - 1})")
    try:
        build(tuple(args.shape), args.seed, args.phantom, check_writable(dest, "DEST", folder=True))
    except (MemoryError, RuntimeError) as err:  # torch's allocator raises a RuntimeError
        if not isinstance(err, MemoryError) and "alloc" not in str(err):
            raise
        raise UserError(f"--shape {z} {h} {w}: not enough memory for its sections (the phantom is drawn on a square "
                        f"of the longer side, {max(h, w)} px): build smaller or squarer sections") from None
    return dest


if __name__ == "__main__":
    run_main(main)
