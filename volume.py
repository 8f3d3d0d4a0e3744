"""Volumes through CloudVolume (Neuroglancer precomputed): open, read, create, write.

Any CloudVolume path works unchanged: whatever starts with a scheme ``NAME://``
(``gs://``, ``s3://``, ``file://``, ``precomputed://gs://...``, ``zarr://``,
``n5://``, ``graphene://``, ``boss://``, ...); ``file://`` is the offline default. A bare path such as
``basil_v0/raw_image`` is a local directory if it or its first folder (``basil_v0``) exists here
(so a mistyped local path is reported as missing here), else it is resolved
against the bucket prefix (``--bucket`` / ``$SEAMLESS_BUCKET``, default
``gs://neuroglancer/``). The word ``demo`` (the embedded demo volume) is the
scripts' to resolve, with ``demo.resolve``, before a path reaches this module.

Arrays cross this module's boundary as ``[Z, C, Y, X]`` (sections, channels,
rows, columns) at the requested mip; CloudVolume's own order is ``[x, y, z, c]``.
All CloudVolume errors become ``helpers.UserError`` with one line.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from helpers import UserError, atomic_output, one_line, stop_if_interrupted

DEFAULT_BUCKET = "gs://neuroglancer/"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # a URL scheme (RFC 3986), e.g. middleauth+https://


def is_cloudpath(path: str) -> bool:
    """Whether ``path`` starts with a scheme ``NAME://`` (a cloudpath, passed to CloudVolume unchanged)."""
    return bool(_SCHEME.match(path))


def data_dir() -> Path:
    """Where generated data lives: ``$SEAMLESS_DATA`` or ``data/`` beside this file."""
    return Path(os.environ.get("SEAMLESS_DATA", Path(__file__).resolve().parent / "data"))


def resolve_path(path: str, bucket: str | None = None) -> str:
    """A CloudVolume cloudpath for ``path`` (see the module docstring); ``demo`` is resolved by ``demo.resolve``."""
    if is_cloudpath(path):
        return path
    first = Path(path).parts[:1]  # a relative path's first folder: here, the path is local
    if Path(path).exists() or (first and Path(first[0]).is_dir()) or path.startswith(("/", "./", "../", "~")):
        return "file://" + str(Path(path).expanduser().resolve())
    bucket = bucket or os.environ.get("SEAMLESS_BUCKET", DEFAULT_BUCKET)
    return bucket.rstrip("/") + "/" + path


def chunk_compression(dtype) -> str | bool:
    """CloudVolume's ``compress`` for writing a layer of ``dtype``: ``gzip`` for integers (images, defect maps),
    ``False`` (none) for floats.

    A float32 field's chunk gzips to ~85 % of its bytes at ~60 MB/s of one core, which made 12 % of the demo's
    alignment time (bench/RESULTS.md); integer layers shrink more (a defect map to a few %). Readers take either.
    """
    return False if np.issubdtype(np.dtype(dtype), np.floating) else "gzip"


def _cloud_volume(cloudpath: str, **kwargs):
    """``CloudVolume(cloudpath, **kwargs)`` without the banner CloudFiles prints where it finds no credentials file
    (a failure says what is missing in one line: ``_cloud_error``). A SIGTERM that CloudVolume's bare ``except``
    turned into another error (a volume that does not exist yet) stops the run all the same."""
    from cloudvolume import CloudVolume

    with contextlib.redirect_stdout(io.StringIO()):
        try:
            return CloudVolume(cloudpath, **kwargs)
        finally:
            stop_if_interrupted()


def _cloud_error(err: Exception) -> str:
    """What went wrong opening or writing a cloud volume, in one line; missing credentials say how to give them."""
    if type(err).__name__ == "DefaultCredentialsError":
        return ("no Google credentials on this machine (give a service account key in GOOGLE_APPLICATION_CREDENTIALS "
                "or ~/.cloudvolume/secrets/google-secret.json, or run `gcloud auth application-default login`; a "
                "public bucket also reads as https://storage.googleapis.com/BUCKET/PATH)")
    return one_line(err)


def open_volume(path: str, mip: int = 0, bucket: str | None = None):
    """Open an existing volume at ``mip``.

    Missing data inside the bounds reads as zeros. Raises ``UserError`` for a path
    that is not a volume or a mip the volume lacks.
    """
    from cloudvolume.exceptions import InfoUnavailableError, ScaleUnavailableError

    cloudpath = resolve_path(path, bucket)
    try:
        vol = _cloud_volume(cloudpath, mip=0, fill_missing=True, bounded=True, progress=False)
        vol.config.compress = chunk_compression(vol.dtype)
    except InfoUnavailableError:
        raise UserError(f"no volume at {cloudpath} (no readable 'info' file)") from None
    except Exception as err:  # network, credentials, malformed info: all one line
        raise UserError(f"cannot open volume {cloudpath}: {_cloud_error(err)}") from None
    mips = available_mips(vol)
    if mip not in mips:
        raise UserError(f"volume {cloudpath} has no mip {mip} (it has mips {mips})")
    try:
        vol.mip = mip
    except ScaleUnavailableError:
        raise UserError(f"volume {cloudpath} has no mip {mip} (it has mips {mips})") from None
    return vol


def available_mips(vol) -> list[int]:
    """The mip levels listed in the volume's info."""
    return list(range(len(vol.info["scales"])))


def bounds(vol, mip: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(start, stop)`` voxel corners ``(x, y, z)`` of the volume at ``mip`` (stop exclusive)."""
    box = vol.meta.bounds(vol.mip if mip is None else mip)
    return np.asarray(box.minpt, dtype=np.int64), np.asarray(box.maxpt, dtype=np.int64)


def canonical(cloudpath: str) -> str:
    """``cloudpath`` with a ``file://`` path resolved (symlinks, ``..``), so that two spellings of one local folder
    compare equal; any other protocol's as it is."""
    if cloudpath.startswith("file://"):
        return "file://" + os.path.realpath(cloudpath[len("file://"):])
    return cloudpath


def check_same_frame(vol, like, what: str, like_what: str = "the source's") -> None:
    """A one-line ``UserError`` naming ``what`` (e.g. ``--defects``) unless ``vol`` covers the voxel bounds of ``like``
    at the same resolution (each at the mip it was opened at): a layer sampled as if in another's frame."""
    got, want = [tuple(map(int, np.concatenate(bounds(v)))) + tuple(float(r) for r in v.resolution)
                 for v in (vol, like)]  # plain numbers: the message shows no numpy types
    if got != want:
        raise UserError(f"{what} {vol.cloudpath} covers {got[:3]}..{got[3:6]} at resolution {list(got[6:])}, "
                        f"not {like_what} {want[:3]}..{want[3:6]} at {list(want[6:])}")


KINDS = {"image": "an image (1 channel of uint8)", "field": "a field (2 channels of float: x, y in px)",
         "labels": "a label layer (1 channel of integers)",
         "defects": "a defect layer (1 channel of uint8: 0 none, 1 crack, 2 fold)"}


def check_kind(vol, kind: str, what: str) -> None:
    """``UserError`` naming ``what`` unless ``vol`` holds ``kind`` (a key of ``KINDS``), told by its channels and
    dtype (every layer of this repo, fields included, has the layer type ``image``)."""
    channels, dtype = vol.num_channels, np.dtype(vol.dtype)
    fits = {"image": channels == 1 and dtype == np.uint8, "field": channels == 2 and dtype.kind == "f",
            "labels": channels == 1 and dtype.kind in "ui", "defects": channels == 1 and dtype == np.uint8}[kind]
    if not fits:
        raise UserError(f"{what} {vol.cloudpath} is not {KINDS[kind]}: it has {channels} channels of {dtype}")


def _written(vol, mip: int) -> bool:
    """Whether ``vol`` holds any chunk at ``mip`` (one listing call: the first name found ends it)."""
    from cloudfiles import CloudFiles

    try:
        return next(iter(CloudFiles(vol.cloudpath).list(prefix=vol.info["scales"][mip]["key"] + "/")), None) is not None
    except Exception as err:
        raise UserError(f"cannot list the chunks of {vol.cloudpath}: {one_line(err)}") from None


def check_written(vol, what: str) -> None:
    """A one-line ``UserError`` naming ``what`` (e.g. ``--defects``) where ``vol`` holds no chunk at ``vol.mip``: a
    layer written at other mips only reads as zeros there (a defect layer as no defect anywhere)."""
    if not _written(vol, vol.mip):
        others = [mip for mip in available_mips(vol) if mip != vol.mip and _written(vol, mip)]
        held = f"it holds mips {', '.join(map(str, others))}" if others else "it holds no data at any mip"
        raise UserError(f"{what} {vol.cloudpath} holds no data at mip {vol.mip} ({held})")


def missing_sections(vol, start, size, every_chunk: bool = True) -> list[int]:
    """The sections z of the cutout ``start``, ``size`` (as ``read``'s) at ``vol.mip`` that were never written.

    ``read`` fills chunks that were never written with zeros and cannot tell; this
    asks the storage which chunk files exist (``CloudVolume.exists``: any
    protocol). A section is missing when any of its chunks in the cutout is
    absent (``every_chunk``: a layer written whole, as align.py writes its own),
    or when all of them are (a raw volume may leave chunks without tissue out).
    """
    (x, y, z), (sx, sy, sz) = start, size
    try:
        found = vol.exists(np.s_[x:x + sx, y:y + sy, z:z + sz])
    except Exception as err:
        raise UserError(f"cannot list the chunks of {vol.cloudpath}: {type(err).__name__}: {err}") from None
    written: dict[int, list[bool]] = {k: [] for k in range(z, z + sz)}
    for name, exists in found.items():  # NAME ends in x0-x1_y0-y1_z0-z1
        z0, z1 = map(int, name.rsplit("_", 1)[1].split("-"))
        for k in range(max(z0, z), min(z1, z + sz)):
            written[k].append(exists)
    complete = all if every_chunk else any
    return [k for k, chunks in written.items() if not chunks or not complete(chunks)]


@contextlib.contextmanager
def _at_mip(vol, mip: int | None):
    """``vol`` at ``mip`` (None: as it is) within the ``with``, then back at its own mip."""
    previous = vol.mip
    vol.mip = previous if mip is None else mip
    try:
        yield
    finally:
        vol.mip = previous


def read(vol, start, size, mip: int | None = None) -> np.ndarray:
    """Cutout ``[Z, C, Y, X]`` from corner ``start = (x, y, z)`` of ``size = (X, Y, Z)`` voxels at ``mip`` (None:
    ``vol.mip``)."""
    (x, y, z), (sx, sy, sz) = start, size
    try:
        with _at_mip(vol, mip):
            cut = vol[x:x + sx, y:y + sy, z:z + sz]
    except Exception as err:
        raise UserError(f"cannot read {vol.cloudpath} at {tuple(start)} size {tuple(size)}: "
                        f"{type(err).__name__}: {err}") from None
    return np.ascontiguousarray(np.asarray(cut).transpose(2, 3, 1, 0))


SAMPLE = 512  # px: sample_sha reads a square of one section this big (or the bbox, where smaller)


def sample_sha(vol, z: int, bbox) -> str:
    """The sha256 (16 hex digits) of section z of ``vol`` over the ``SAMPLE`` px square at the corner of ``bbox = (x0,
    y0, x1, y1)`` (voxels of ``vol.mip``): a volume rewritten at the same path (another export, another stitch) most
    likely reads differently there, and a resumed run must not mix its sections with those made before."""
    x0, y0, x1, y1 = bbox
    square = read(vol, (x0, y0, z), (min(SAMPLE, x1 - x0), min(SAMPLE, y1 - y0), 1))
    return hashlib.sha256(square).hexdigest()[:16]


def check_z_range(start: int, stop: int, first: int, end: int, what: str = "z range", vol=None) -> None:
    """A one-line ``UserError`` naming ``what`` (and the volume ``vol``, where given) unless sections ``start .. stop
    - 1`` lie within the volume's ``first .. end - 1``; an empty or reversed range says so rather than that it is
    outside."""
    if stop <= start:
        raise UserError(f"{what} {start}..{stop} is empty: its stop must be above its start")
    if start < first or stop > end:
        raise UserError(f"{what} {start}..{stop} is outside the sections {first}..{end - 1} of the volume"
                        + (f" {vol.cloudpath}" if vol is not None else ""))


def check_bbox(bbox, vol) -> tuple[int, int, int, int]:
    """``bbox`` (``--bbox X0 Y0 X1 Y1``, voxels at the mip ``vol`` is open at; None: the whole section) as plain
    ints, once it is known to be non-empty and inside ``vol``'s bounds; else a one-line ``UserError`` that says
    which (an empty or reversed box rather than that it is outside)."""
    (sx0, sy0, _), (sx1, sy1, _) = (map(int, corner) for corner in bounds(vol))
    x0, y0, x1, y1 = bbox or (sx0, sy0, sx1, sy1)
    if x1 <= x0 or y1 <= y0:
        raise UserError(f"--bbox {x0} {y0} {x1} {y1} is empty: X1 must be above X0 and Y1 above Y0")
    if not (sx0 <= x0 and x1 <= sx1 and sy0 <= y0 and y1 <= sy1):
        raise UserError(f"--bbox {x0} {y0} {x1} {y1} is outside the volume ({sx0} {sy0} {sx1} {sy1} at mip "
                        f"{vol.mip})")
    return int(x0), int(y0), int(x1), int(y1)


def create_volume(path: str, size, dtype: str, num_channels: int = 1,
                  resolution=(8, 8, 40), mips: int = 1, chunk=(256, 256, 1),
                  layer_type: str = "image", provenance: dict | None = None,
                  overwrite: bool = False, offset=(0, 0, 0)):
    """Create a new precomputed layer with ``mips`` scales (2x2 in x, y each) and return it at mip 0.

    size: ``(X, Y, Z)`` voxels at mip 0 from voxel corner ``offset``; resolution in
    nm ``(x, y, z)``. Refuses an
    existing layer unless ``overwrite``, and a place it cannot write (``UserError``
    both). ``provenance`` is recorded in the layer's provenance file (what made it,
    with which arguments).
    """
    from cloudvolume import CloudVolume

    cloudpath = resolve_path(path)
    info = CloudVolume.create_new_info(
        num_channels=num_channels, layer_type=layer_type, data_type=dtype, encoding="raw",
        resolution=list(resolution), voxel_offset=list(offset), volume_size=list(size),
        chunk_size=list(chunk), max_mip=mips - 1, factor=(2, 2, 1))
    try:
        if not overwrite and _exists(cloudpath):
            raise UserError(f"a volume already exists at {cloudpath} (pass --overwrite to replace it)")
        vol = _cloud_volume(cloudpath, info=info, progress=False, non_aligned_writes=True, fill_missing=True,
                          compress=chunk_compression(dtype))
        if provenance:  # before the info, which makes the layer exist: an existing layer always has its provenance
            vol.provenance.description = provenance.get("description", "")
            vol.provenance.processing.append(provenance)
            vol.commit_provenance()
        vol.commit_info()
    except OSError as err:
        raise UserError(f"cannot write {cloudpath}: {err.strerror or err}") from None
    except UserError:
        raise
    except Exception as err:  # a cloud's network, credentials or permissions: one line
        raise UserError(f"cannot write {cloudpath}: {_cloud_error(err)}") from None
    return vol


def include_sections(vol, z_start: int, z_stop: int) -> None:
    """Grow the z bounds of ``vol`` (at every mip) to include sections ``z_start..z_stop-1``; nothing if they do.

    The info is written once, whole (``file://``: a new file renamed over the old one, so a reader sees the old
    bounds or the new ones, never a mix; a cloud object is replaced whole). Every chunk already written stays
    valid: a chunk is one section deep and named by its voxel coordinates, which do not move.
    """
    from cloudfiles import paths
    from cloudvolume.lib import jsonify

    (_, _, z0), (_, _, z1) = bounds(vol, 0)
    low, high = min(int(z0), z_start), max(int(z1), z_stop)
    if (low, high) == (z0, z1):
        return
    for scale in vol.info["scales"]:
        if scale["chunk_sizes"][0][2] != 1:
            raise ValueError(f"{vol.cloudpath}: chunks deeper than one section would move")
        scale["voxel_offset"][2], scale["size"][2] = low, high - low
    where = paths.extract(vol.cloudpath)
    if where.protocol == "file":
        with atomic_output(Path(where.path) / "info") as tmp:
            tmp.write_text(jsonify(vol.info))
    else:
        vol.commit_info()


def _exists(cloudpath: str) -> bool:
    from cloudfiles import CloudFiles

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # CloudFiles' banner where it finds no credentials
            return CloudFiles(cloudpath).exists("info")
    except Exception:
        return False


def write(vol, array: np.ndarray, start, mip: int = 0) -> None:
    """Write ``array [Z, C, Y, X]`` at voxel corner ``start = (x, y, z)`` of ``mip``.

    A float array holding NaN or Inf is refused before anything is written
    (``UserError`` naming its first such section): no layer ever holds one. The
    aligners write a section's field before anything else of it, so a network
    (or any stage after it) whose field is not finite stops the run there. A
    write the storage refuses (a read-only or full disk) is a ``UserError`` too.
    """
    x, y, z = start
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array).reshape(len(array), -1).all(axis=1)
        if not finite.all():
            raise UserError(f"section {z + int(np.argmin(finite))}: its field for {vol.cloudpath} is not finite "
                            "(NaN or Inf): the network or a stage after it failed; nothing of the section is written")
    _, _, sy, sx = array.shape
    try:
        with _at_mip(vol, mip):
            vol[x:x + sx, y:y + sy, z:z + array.shape[0]] = np.ascontiguousarray(array.transpose(3, 2, 0, 1))
    except OSError as err:
        raise UserError(f"cannot write {vol.cloudpath} at {tuple(start)} mip {mip}: {err.strerror or err}") from None


def downsample(array: np.ndarray, kind: str) -> np.ndarray:
    """Half-resolution ``[Z, C, ceil(Y/2), ceil(X/2)]`` of ``[Z, C, Y, X]`` (as CloudVolume sizes mips).

    An odd last row or column is averaged (or maxed) over the pixels it has.
    kind: ``image`` (2x2 mean, rounded for integer types), ``labels`` (2x2 max: a
    defect anywhere in the 2x2 block marks it) or ``field`` (mean, vectors halved
    as ``helpers.downsample_field``: pixels double in size).
    """
    t = torch.from_numpy(np.ascontiguousarray(array)).float()
    if kind == "labels":
        out = F.max_pool2d(t, 2, ceil_mode=True)
    elif kind == "image":
        out = F.avg_pool2d(t, 2, ceil_mode=True).round()
    elif kind == "field":
        out = F.avg_pool2d(t, 2, ceil_mode=True) / 2
    else:
        raise ValueError(f"unknown downsample kind {kind!r}")
    return out.numpy().astype(array.dtype)


def write_pyramid(vol, array: np.ndarray, start, kind: str, mip: int = 0) -> int:
    """Write ``array [Z, C, Y, X]`` at ``start`` (``(x, y, z)``, voxels of ``mip``) and its downsamplings
    (``downsample(..., kind)``) at each coarser mip of ``vol`` whose grid the corner falls on; returns the
    coarsest mip written. A corner divisible by 2^(mips-1) reaches every mip."""
    x, y, z = start
    write(vol, array, start, mip)
    level = mip
    while level + 1 < len(vol.info["scales"]) and not (x | y) % 2 ** (level + 1 - mip):
        level += 1
        array = downsample(array, kind)
        write(vol, array, (x >> (level - mip), y >> (level - mip), z), level)
    return level


def build_mips(vol, z: int, box, kind: str, mip: int, tile: int = 4096) -> None:
    """Rewrite section z at every mip of ``vol`` above ``mip`` over ``box = (x0, y0, x1, y1)`` (voxels of ``mip``)
    from what ``mip`` holds, a level at a time (``downsample(..., kind)``), in tiles of ``tile``² px at most.

    ``write_pyramid`` stops below a mip whose grid a corner misses: after writes at such corners this makes the
    coarser mips whole again, where they would keep an earlier write's values. A tile is grown to the even grid
    of the coarser mip, so the pixels it adds (outside ``box``) are read from the layer, not assumed.
    """
    x0, y0, x1, y1 = box
    tile += tile % 2
    for level in range(mip + 1, len(vol.info["scales"])):
        (bx0, by0, _), (bx1, by1, _) = map(lambda corner: corner.tolist(), bounds(vol, level - 1))
        x0, y0 = max(x0 - x0 % 2, bx0), max(y0 - y0 % 2, by0)
        x1, y1 = min(x1 + x1 % 2, bx1), min(y1 + y1 % 2, by1)
        for ty in range(y0, y1, tile):
            for tx in range(x0, x1, tile):
                part = read(vol, (tx, ty, z), (min(tile, x1 - tx), min(tile, y1 - ty), 1), level - 1)
                write(vol, downsample(part, kind), (tx // 2, ty // 2, z), level)
        x0, y0, x1, y1 = x0 // 2, y0 // 2, -(-x1 // 2), -(-y1 // 2)


def get_many(files: CloudFiles, names: list[str], as_json: bool = True) -> list:
    """The files ``names`` under ``files``, in order: decoded JSON, or bytes without ``as_json``; None where one is
    missing. One at a time on local storage: there CloudFiles reads a list in a thread that it polls every 0.1 s,
    while a read takes 0.2 ms (the demo's solve waited 6.6 s of its 24 s, bench/RESULTS.md). Elsewhere in
    CloudFiles' threads, at once."""
    get = files.get_json if as_json else files.get
    if files.protocol in ("file", "mem"):
        return [get(name) for name in names]
    if as_json:
        return get(names)
    contents = get(names, return_dict=True)  # a list comes back in the order its threads finish
    return [contents[name] for name in names]
