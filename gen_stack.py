"""Sample random stacks of consecutive sections from a CloudVolume into an HDF5 training file.

    python gen_stack.py --count 100 --source basil_v0/raw_image basil_v0
    python gen_stack.py --count 8 --source demo demo          # the embedded demo volume
    python gen_stack.py --count 8 --source demo --test demo   # its held-out sections

Writes ``OUT_DIR/NAME_{train,test}_mip{M}.h5`` (see ``write_stacks`` for the layout). Other modules
make datasets with ``write_dataset(NAME, Sampling(...))``, what the command runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import shlex
import shutil
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

import demo
import volume
from helpers import (HelpFormatter, UserError, atomic_output, check_name, finite_float, local_path, random_seed,
                     run_main, slice_std, stop_if_interrupted)
from masks import check_defect_map

SEED_DEFAULTS = dict(mip=5, dim=1152, stack_height=50, train_range=(1, 800), test_range=(800, 1000))


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What ``write_dataset`` samples, under the names of the command's flags (see ``parse_args``).

    ``source``, ``defects``, ``truth``: volume paths, or ``demo`` for the demo volume's layer. ``count``
    stacks are drawn at random with ``seed``, or the corners in the ``coords`` file are replayed. ``None``
    for a size or a z range is the seed's default (``SEED_DEFAULTS``), or with ``source='demo'`` the one
    that fits the demo volume (``fill_defaults``).
    """
    source: str
    count: int | None = None
    defects: str | None = None
    truth: str | None = None
    registered: bool = False
    bucket: str | None = None
    stack_height: int | None = None
    dim: int | None = None
    mip: int | None = None
    test: bool = False
    train_range: tuple[int, int] | None = None
    test_range: tuple[int, int] | None = None
    max_missing: float = 0.25
    coords: str | None = None
    seed: int = 0
    read_threads: int = 4

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Sampling:
        """The settings of parsed flags (``parse_args``)."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def parse_args(argv=None) -> argparse.Namespace:
    """The command's flags; each ``Sampling`` setting is the flag of its name (an old name is accepted too)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("name", help="dataset name: the output is OUT_DIR/NAME_{train|test}_mipM.h5")
    p.add_argument("--count", type=int, help="number of stacks to sample (not with --coords)")
    p.add_argument("--source", required=True,
                   help="image volume: a CloudVolume path (gs://, s3://, file://, precomputed://), a local "
                        "directory, a bare path resolved against --bucket, or 'demo'")
    p.add_argument("--defects", "--mask_source",
                   help="defect volume (0 none, 1 crack, 2 fold) sampled at the same places, or 'demo' (the demo's "
                        "defects by default with --source demo)")
    p.add_argument("--truth", "--field_source",
                   help="ground-truth field volume (2 channels; each mip in its own pixels) sampled at the same "
                        "places, or 'demo' (the demo's by default with --source demo)")
    p.add_argument("--registered", action="store_true",
                   help="the source is already registered (e.g. a published alignment): its true fields are zero, "
                        "so training can add known misalignment and use the supervised term (--lambda_gt)")
    p.add_argument("--bucket", help=f"prefix for bare paths (default $SEAMLESS_BUCKET or {volume.DEFAULT_BUCKET})")
    p.add_argument("--stack_height", type=int, help=f"sections per stack (default {SEED_DEFAULTS['stack_height']}; "
                                                    "demo: fitted to the demo volume)")
    p.add_argument("--dim", type=int, help=f"stack width and height in pixels (default {SEED_DEFAULTS['dim']})")
    p.add_argument("--mip", type=int, help=f"resolution level to sample at (default {SEED_DEFAULTS['mip']})")
    p.add_argument("--test", action="store_true", help="sample the test z range instead of the train range")
    p.add_argument("--train_range", type=int, nargs=2, metavar=("Z0", "Z1"),
                   help="z range Z0 <= z < Z1 for train stacks (default 1 800)")
    p.add_argument("--test_range", type=int, nargs=2, metavar=("Z0", "Z1"),
                   help="z range for --test stacks (default 800 1000)")
    p.add_argument("--max_missing", type=finite_float, default=Sampling.max_missing,
                   help="redraw a stack whose fraction of missing (zero) pixels exceeds this")
    p.add_argument("--coords", help="replay the stack corners of an earlier gen_stack HDF5, or of a text file "
                                    "with one 'x y z' line per stack (voxels at --mip)")
    p.add_argument("--seed", type=random_seed, default=Sampling.seed, help="random seed for the sample positions")
    p.add_argument("--read_threads", "--workers", type=int, default=Sampling.read_threads,
                   help="parallel reader threads")
    p.add_argument("--out_dir", default=None,
                   help="output directory (default $SEAMLESS_DATA or the repository's data/)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p.parse_args(argv)


def fill_defaults(sampling: Sampling) -> tuple[Sampling, list[str]]:
    """``sampling`` with its unset sizes and z ranges filled: the seed's defaults, or for ``source='demo'`` the ones
    that fit the demo volume, whose defects and truth it then samples too (unless given).

    Also returns the flags that were filled in from the demo, to tell the user.
    """
    defaults, paths = dict(SEED_DEFAULTS), {}
    if sampling.source == "demo":
        defaults.update(demo.GEN_STACK_DEFAULTS)
        paths = dict(defects=demo.resolve(sampling.defects or "demo", "defects"),
                     truth=demo.resolve(sampling.truth or "demo", "field"))
    unset = {key: value for key, value in defaults.items() if getattr(sampling, key) is None}
    filled = [f"--{key} {' '.join(map(str, value)) if isinstance(value, tuple) else value}"
              for key, value in unset.items()] if sampling.source == "demo" else []
    return dataclasses.replace(sampling, **unset, **paths), filled


def check_args(sampling: Sampling, bounds) -> tuple[int, int]:
    """Validate the settings (``fill_defaults``'s) against the volume; return the z range to sample."""
    (x0, y0, z0), (x1, y1, z1) = bounds
    if sampling.coords is None and (sampling.count is None or sampling.count <= 0):
        raise UserError(f"--count must be a positive number of stacks (got {sampling.count})")
    if sampling.coords is not None and sampling.count is not None:
        raise UserError("--count and --coords: choose one (--coords replays the stacks of its file)")
    if not 0 <= sampling.max_missing <= 1:
        raise UserError(f"--max_missing {sampling.max_missing} is a fraction of a stack's pixels: between 0 and 1")
    if sampling.dim <= 0 or sampling.stack_height < 2:
        raise UserError("--dim must be positive and --stack_height at least 2")
    if sampling.dim > min(x1 - x0, y1 - y0):
        raise UserError(f"--dim {sampling.dim} is larger than the volume at mip {sampling.mip} "
                        f"({x1 - x0} x {y1 - y0} px)")
    lo, hi = sampling.test_range if sampling.test else sampling.train_range
    which = "--test_range" if sampling.test else "--train_range"
    volume.check_z_range(lo, hi, z0, z1, which)
    if hi - lo < sampling.stack_height:
        raise UserError(f"--stack_height {sampling.stack_height} does not fit in {which} {lo} {hi}")
    return lo, hi


def read_coords(path: str, mip: int, bounds, size: tuple[int, int, int]) -> np.ndarray:
    """Stack corners ``[N, 3]`` (x, y, z; voxels of ``mip``) from a gen_stack HDF5 (a ``UserError`` if it was
    sampled at another mip: its corners would be replayed in the wrong place) or a text file of 'x y z' lines.
    Each stack (``size``: x, y, z voxels) must lie within the volume's ``bounds`` (``volume.bounds``)."""
    if not Path(path).is_file():
        raise UserError(f"--coords file {path} does not exist")
    try:
        if h5py.is_hdf5(path):
            with h5py.File(path, "r") as f:
                coords = f["coords"][:]
                if int(f.attrs.get("mip", mip)) != mip:
                    raise UserError(f"--coords {path} holds corners at mip {int(f.attrs['mip'])}: give --mip "
                                    f"{int(f.attrs['mip'])}, not {mip}")
        else:
            with warnings.catch_warnings():  # an empty file: numpy's warning, then the error below
                warnings.simplefilter("ignore", UserWarning)
                coords = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except (OSError, KeyError, ValueError) as err:
        raise UserError(f"--coords: cannot read stack positions from {path}: {err}") from None
    if coords.ndim != 2 or coords.shape[1] != 3 or len(coords) == 0:
        raise UserError(f"--coords {path}: expected one 'x y z' row per stack, got shape {coords.shape}")
    (lo, hi), size = np.asarray(bounds), np.asarray(size)
    outside = np.flatnonzero(((coords < lo) | (coords + size > hi)).any(1))
    if len(outside):
        row = outside[0]
        raise UserError(f"--coords {path}: row {row + 1} ({' '.join(map(str, coords[row]))}) puts a stack of "
                        f"{' x '.join(map(str, size))} voxels outside the volume ({' '.join(map(str, lo))} to "
                        f"{' '.join(map(str, hi))}); {len(outside)} of {len(coords)} rows are outside")
    return coords.astype(np.int64)


def sample_stacks(vols: dict, sampling: Sampling, bounds, z_range, coords=None):
    """Yield ``(corner, {layer: array})`` for each accepted stack, reading in parallel.

    Random corners are drawn with ``sampling.seed``; a stack whose image has more than
    ``sampling.max_missing`` zero pixels is rejected and redrawn (given ``coords``, none is).
    Arrays are ``[S, C, D, D]``.
    """
    rng = np.random.default_rng(sampling.seed)
    (x0, y0, _), (x1, y1, _) = bounds
    size = (sampling.dim, sampling.dim, sampling.stack_height)

    def draw():
        return np.array([rng.integers(x0, x1 - sampling.dim + 1), rng.integers(y0, y1 - sampling.dim + 1),
                         rng.integers(z_range[0], z_range[1] - sampling.stack_height + 1)])

    def read(corner):
        return corner, {name: volume.read(vol, corner, size) for name, vol in vols.items()}

    wanted = len(coords) if coords is not None else sampling.count
    corners = iter(coords) if coords is not None else (draw() for _ in itertools.count())  # drawn as read
    accepted, tries, batch = 0, 0, 4 * max(1, sampling.read_threads)
    with ThreadPoolExecutor(max(1, sampling.read_threads)) as pool:
        while accepted < wanted:
            if coords is None and tries > 20 * wanted:
                raise UserError(f"found only {accepted} of {wanted} stacks with at most "
                                f"{sampling.max_missing:.0%} missing data after {tries} draws "
                                "(raise --max_missing or choose another region)")
            for corner, arrays in pool.map(read, itertools.islice(corners, batch)):
                tries += 1
                missing = float(np.mean(arrays["images"] == 0))
                if coords is None and (missing > sampling.max_missing or accepted == wanted):
                    continue
                accepted += 1
                yield corner, arrays


def write_stacks(path: Path, stacks, count: int, sampling: Sampling) -> float:
    """Write the sampled stacks to ``path`` atomically; return the bytes written.

    Layout: ``images`` uint8 (N, S, D, D); ``masks`` uint8 (N, S, D, D) defect maps
    when ``defects`` are given; ``fields`` float32 (N, S, 2, D, D) ground-truth
    fields in pixels of the dataset's mip when a ``truth`` is given; ``coords``
    int64 (N, 3) stack corners (x, y, z) at the mip; ``slice_std`` float32 (N, S); attribute
    ``registered`` when the source is registered (true fields zero, see ``data.py``).
    Chunks hold one section, compressed with lzf (fast to read). Attributes record
    the sources, mip, z range, seed and command line.
    """
    shape = (count, sampling.stack_height, sampling.dim, sampling.dim)
    slice_chunk = (1, 1, sampling.dim, sampling.dim)
    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w") as f:
            images = f.create_dataset("images", shape, np.uint8, chunks=slice_chunk, compression="lzf")
            masks = (f.create_dataset("masks", shape, np.uint8, chunks=slice_chunk, compression="lzf")
                     if sampling.defects else None)
            fields = (f.create_dataset("fields", (count, sampling.stack_height, 2, sampling.dim, sampling.dim),
                                       np.float32, chunks=(1, 1, 2, sampling.dim, sampling.dim), compression="lzf")
                      if sampling.truth else None)
            coords = f.create_dataset("coords", (count, 3), np.int64)
            stds = f.create_dataset("slice_std", (count, sampling.stack_height), np.float32)
            for i, (corner, arrays) in enumerate(tqdm(stacks, total=count, desc="stacks", unit="stack")):
                stop_if_interrupted()  # a Ctrl-C that Python dropped (see helpers.atomic_output)
                images[i] = arrays["images"][:, 0]
                stds[i] = slice_std(arrays["images"][:, 0]).numpy()
                coords[i] = corner
                if masks is not None:
                    masks[i] = check_defect_map(arrays["masks"][:, 0], f"--defects {sampling.defects}, stack {i},")
                if fields is not None:
                    fields[i] = arrays["fields"]
            f.attrs.update(dict(
                source=sampling.source, registered=bool(sampling.registered), mask_source=sampling.defects or "",
                field_source=sampling.truth or "",
                mip=sampling.mip, dim=sampling.dim, stack_height=sampling.stack_height,
                split="test" if sampling.test else "train",
                z_range=sampling.test_range if sampling.test else sampling.train_range, seed=sampling.seed,
                max_missing=sampling.max_missing, command=" ".join(map(shlex.quote, sys.argv)),
                created=time.strftime("%Y-%m-%dT%H:%M:%S")))
    return path.stat().st_size


def check_space(out_dir: Path, count: int, sampling: Sampling) -> None:
    """A one-line ``UserError`` where ``count`` stacks would not fit in the space free at ``out_dir``: their images
    and fields (lzf hardly compresses either; the defect maps it does), before any is drawn or read."""
    need = count * sampling.stack_height * sampling.dim ** 2 * (1 + (8 if sampling.truth else 0))
    free = shutil.disk_usage(out_dir).free
    if need > free:
        raise UserError(f"--count {count}: the dataset would take about {need / 1e9:.3g} GB, more than the "
                        f"{free / 1e9:.3g} GB free in {out_dir} (lower --count or --dim, or give another --out_dir)")


def write_dataset(name: str, sampling: Sampling, out_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """Sample ``sampling``'s stacks into ``OUT_DIR/NAME_{train|test}_mipM.h5`` (``write_stacks``); return its path.

    ``out_dir``: default ``volume.data_dir()``. An existing file is replaced only with ``overwrite``;
    every refusal (a name, a flag, a volume, a place that cannot be written) is a ``UserError``.
    """
    check_name(name, "dataset name")
    sampling, filled = fill_defaults(sampling)
    if filled:
        print("demo volume: using " + " ".join(filled))
    out_dir = local_path(out_dir, "--out_dir") if out_dir else volume.data_dir()
    split = "test" if sampling.test else "train"
    path = out_dir / f"{name}_{split}_mip{sampling.mip}.h5"
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists (pass --overwrite to replace it, or choose another NAME)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to {out_dir}: {err.strerror}") from None

    if sampling.registered and sampling.truth:
        raise UserError("--registered says the true fields are zero: do not also give --truth")
    vols = {"images": volume.open_volume(demo.resolve(sampling.source), sampling.mip, sampling.bucket)}
    if sampling.defects:
        vols["masks"] = volume.open_volume(demo.resolve(sampling.defects, "defects"), sampling.mip, sampling.bucket)
    if sampling.truth:
        vols["fields"] = volume.open_volume(demo.resolve(sampling.truth, "field"), sampling.mip, sampling.bucket)
    for layer, kind, flag in (("images", "image", "--source"), ("masks", "defects", "--defects"),
                              ("fields", "field", "--truth")):
        if layer in vols:
            volume.check_kind(vols[layer], kind, flag)
            if layer != "images":
                volume.check_same_frame(vols[layer], vols["images"], flag)
    bounds = volume.bounds(vols["images"])
    z_range = check_args(sampling, bounds)
    size = (sampling.dim, sampling.dim, sampling.stack_height)
    coords = read_coords(sampling.coords, sampling.mip, bounds, size) if sampling.coords else None
    count = len(coords) if coords is not None else sampling.count
    check_space(out_dir, count, sampling)

    start = time.time()
    with closing(sample_stacks(vols, sampling, bounds, z_range, coords)) as stacks:  # stopped: no more reads queued
        size = write_stacks(path, stacks, count, sampling)
    seconds = time.time() - start
    print(f"wrote {path}: {count} stacks of {sampling.stack_height} x {sampling.dim} x {sampling.dim} at mip {sampling.mip}, "
          f"{size / 1e6:.1f} MB in {seconds:.1f} s ({count / seconds:.2f} stacks/s)")
    return path


def main(argv=None) -> Path:
    args = parse_args(argv)
    return write_dataset(args.name, Sampling.from_args(args), args.out_dir, args.overwrite)


if __name__ == "__main__":
    run_main(main)
