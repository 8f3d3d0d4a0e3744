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
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

import volume

SHAPE = (100, 512, 512)  # sections, rows, columns at mip 0
PAD = 48  # margin generated around each section so misalignment pulls in tissue, not zeros
MIPS = 3
RESOLUTION = (8, 8, 40)  # nm
SEED = 0
TRAIN_RANGE, TEST_RANGE = (0, 70), (70, 100)
LAYERS = ("image", "defects", "field", "aligned")
# gen_stack flags that fit the demo volume (the seed's mip 5 x 1152 px needs a real dataset)
GEN_STACK_DEFAULTS = dict(mip=0, dim=256, stack_height=10, train_range=TRAIN_RANGE, test_range=TEST_RANGE)
DATASET_COUNT = {"train": 32, "test": 8}


def demo_dir() -> Path:
    return volume.data_dir() / "demo"


def is_built() -> bool:
    return all((demo_dir() / layer / "info").is_file() for layer in LAYERS)


def describe(shape=SHAPE) -> str:
    z, h, w = shape
    return f"{z} sections of {w} x {h} px at {RESOLUTION[0]} nm, mips 0-{MIPS - 1}"


def ensure_demo() -> dict[str, str]:
    """Build the demo volume if it is not there yet; return ``{layer: file:// path}``."""
    if not is_built():
        build()
    return {layer: "file://" + str(demo_dir() / layer) for layer in LAYERS}


def make_arrays(shape=SHAPE, pad=PAD, seed=SEED) -> dict[str, np.ndarray]:
    """The demo's layers as arrays ``[Z, C, Y, X]`` at mip 0 (see the module docstring)."""
    import misalign
    import phantom

    z, h, w = shape
    aligned = phantom.make_phantom((z, h + 2 * pad, w + 2 * pad), seed=seed)
    image, defects, field = misalign.misalign(torch.from_numpy(aligned)[:, None], misalign.MisalignParams(),
                                              torch.Generator().manual_seed(seed), pad=pad)
    return {"image": image.numpy(), "defects": defects.numpy(), "field": field.numpy().astype(np.float32),
            "aligned": aligned[:, None, pad:pad + h, pad:pad + w]}


def build(shape=SHAPE, seed=SEED) -> None:
    """Write the demo layers to ``demo_dir()`` (atomically: a temporary sibling directory, then a rename)."""
    start, path = time.time(), demo_dir()
    print(f"building the demo volume in {path} ({describe(shape)}); this happens once")
    arrays = make_arrays(shape, PAD, seed)
    tmp = path.with_name(f".{path.name}.building-{time.time_ns()}")
    kinds = {"image": "image", "defects": "labels", "field": "field", "aligned": "image"}
    provenance = {"description": "SEAMLeSS demo volume: synthetic neuropil phantom, misaligned, with cracks "
                                 "and folds; 'field' re-aligns 'image' onto 'aligned'",
                  "method": {"generator": "demo.py", "shape": list(shape), "pad": PAD, "seed": seed}}
    try:
        for layer, array in arrays.items():
            vol = volume.create_volume("file://" + str(tmp / layer), (shape[2], shape[1], shape[0]),
                                       str(array.dtype), num_channels=array.shape[1], resolution=RESOLUTION,
                                       mips=MIPS, chunk=(256, 256, 1), provenance=provenance)
            volume.write_pyramid(vol, array, (0, 0, 0), kinds[layer])
        path.parent.mkdir(parents=True, exist_ok=True)
        if not is_built():  # else a concurrent build finished first: keep it
            shutil.rmtree(path, ignore_errors=True)  # an interrupted build that was not atomic
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"demo volume ready in {time.time() - start:.0f} s")
