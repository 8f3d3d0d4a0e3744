"""Volumes through CloudVolume (Neuroglancer precomputed): open, read, create, write.

Any CloudVolume path works unchanged (``gs://``, ``s3://``, ``file://``,
``precomputed://...``); ``file://`` is the offline default. A bare path such as
``basil_v0/raw_image`` is a local directory if one exists, else it is resolved
against the bucket prefix (``--bucket`` / ``$SEAMLESS_BUCKET``, default
``gs://neuroglancer/``). The word ``demo`` names the embedded demo volume
(``demo.py``), built on first use.

Arrays cross this module's boundary as ``[Z, C, Y, X]`` (sections, channels,
rows, columns) at the requested mip; CloudVolume's own order is ``[x, y, z, c]``.
All CloudVolume errors become ``helpers.UserError`` with one line.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from helpers import UserError

DEFAULT_BUCKET = "gs://neuroglancer/"
SCHEMES = ("gs://", "s3://", "file://", "precomputed://", "http://", "https://", "matrix://",
           "mem://", "graphene://", "boss://")


def data_dir() -> Path:
    """Where generated data lives: ``$SEAMLESS_DATA`` or ``data/`` beside this file."""
    return Path(os.environ.get("SEAMLESS_DATA", Path(__file__).resolve().parent / "data"))


def resolve_path(path: str, bucket: str | None = None) -> str:
    """A CloudVolume cloudpath for ``path`` (see the module docstring); ``demo`` is not handled here."""
    if path.startswith(SCHEMES):
        return path
    if Path(path).exists() or path.startswith(("/", "./", "../", "~")):
        return "file://" + str(Path(path).expanduser().resolve())
    bucket = bucket or os.environ.get("SEAMLESS_BUCKET", DEFAULT_BUCKET)
    return bucket.rstrip("/") + "/" + path


def open_volume(path: str, mip: int = 0, bucket: str | None = None):
    """Open an existing volume at ``mip`` (``demo`` builds the demo volume's image layer).

    Missing data inside the bounds reads as zeros. Raises ``UserError`` for a path
    that is not a volume or a mip the volume lacks.
    """
    from cloudvolume import CloudVolume
    from cloudvolume.exceptions import InfoUnavailableError, ScaleUnavailableError

    if path == "demo":
        import demo
        path = demo.ensure_demo()["image"]
    cloudpath = resolve_path(path, bucket)
    try:
        vol = CloudVolume(cloudpath, mip=0, fill_missing=True, bounded=True, progress=False)
    except InfoUnavailableError:
        raise UserError(f"no volume at {cloudpath} (no readable 'info' file)") from None
    except Exception as err:  # network, credentials, malformed info: all one line
        raise UserError(f"cannot open volume {cloudpath}: {type(err).__name__}: {err}") from None
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


def read(vol, start, size) -> np.ndarray:
    """Cutout ``[Z, C, Y, X]`` from corner ``start = (x, y, z)`` of ``size = (X, Y, Z)`` voxels at ``vol.mip``."""
    (x, y, z), (sx, sy, sz) = start, size
    try:
        cut = vol[x:x + sx, y:y + sy, z:z + sz]
    except Exception as err:
        raise UserError(f"cannot read {vol.cloudpath} at {tuple(start)} size {tuple(size)}: "
                        f"{type(err).__name__}: {err}") from None
    return np.ascontiguousarray(np.asarray(cut).transpose(2, 3, 1, 0))


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
    if not overwrite and _exists(cloudpath):
        raise UserError(f"a volume already exists at {cloudpath} (pass --overwrite to replace it)")
    info = CloudVolume.create_new_info(
        num_channels=num_channels, layer_type=layer_type, data_type=dtype, encoding="raw",
        resolution=list(resolution), voxel_offset=list(offset), volume_size=list(size),
        chunk_size=list(chunk), max_mip=mips - 1, factor=(2, 2, 1))
    try:
        vol = CloudVolume(cloudpath, info=info, progress=False, non_aligned_writes=True, fill_missing=True)
        vol.commit_info()
        if provenance:
            vol.provenance.description = provenance.get("description", "")
            vol.provenance.processing.append(provenance)
            vol.commit_provenance()
    except OSError as err:
        raise UserError(f"cannot write {cloudpath}: {err.strerror or err}") from None
    return vol


def _exists(cloudpath: str) -> bool:
    from cloudfiles import CloudFiles

    try:
        return CloudFiles(cloudpath).exists("info")
    except Exception:
        return False


def write(vol, array: np.ndarray, start, mip: int = 0) -> None:
    """Write ``array [Z, C, Y, X]`` at voxel corner ``start = (x, y, z)`` of ``mip``; ``UserError`` if the
    storage refuses it (a read-only or full disk)."""
    previous, vol.mip = vol.mip, mip
    x, y, z = start
    _, _, sy, sx = array.shape
    try:
        vol[x:x + sx, y:y + sy, z:z + array.shape[0]] = np.ascontiguousarray(array.transpose(3, 2, 0, 1))
    except OSError as err:
        raise UserError(f"cannot write {vol.cloudpath} at {tuple(start)} mip {mip}: {err.strerror or err}") from None
    finally:
        vol.mip = previous


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


def write_pyramid(vol, array: np.ndarray, start, kind: str) -> None:
    """Write ``array [Z, C, Y, X]`` at mip 0 and its downsamplings at every further mip of ``vol``.

    ``start`` is the mip-0 corner ``(x, y, z)``; x, y must be divisible by 2^(mips-1).
    """
    x, y, z = start
    for mip in range(len(vol.info["scales"])):
        if mip:
            array = downsample(array, kind)
        write(vol, array, (x >> mip, y >> mip, z), mip)
