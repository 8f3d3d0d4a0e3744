"""The one field convention of SEAMLeSS, and small helpers every module shares.

Field convention (used by every module, never redefined elsewhere)
------------------------------------------------------------------
A displacement field is a float tensor ``[N, 2, H, W]``:

* values are in **pixels of the field's own resolution** (a field at mip 2 is
  measured in mip-2 pixels);
* channel 0 is the x (column) displacement, channel 1 the y (row) displacement;
* pixel ``(row i, col j)`` has its centre at ``p = (x=j, y=i)``;
* warping *pulls*: ``warp(image, field)(p) = image(p + field(p))``. A field that
  aligns a source onto a target therefore points, at each target pixel, to where
  that tissue sits in the source.

Sampling uses ``grid_sample`` with ``align_corners=False``: the image is a grid of
pixel *areas*, so a 2x2 average-pooled image is the same picture at half the
resolution, and coarse pixel ``i`` covers fine pixels ``2i, 2i+1``. Fields are
resampled between resolutions only with ``upsample_field`` / ``downsample_field``,
which also rescale the vectors.

This module imports nothing of ours; everything else imports it.
"""
from __future__ import annotations

import argparse
import errno
import functools
import glob
import hashlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

ALIGN_CORNERS = False


class UserError(Exception):
    """A mistake in the user's input (a flag, a path, a file): reported in one line."""


def run_main(main: Callable[[], object]) -> None:
    """Run a script's ``main``; a ``UserError`` becomes one line on stderr and exit 2.

    A reader that stops early (``| head``) ends the run quietly, as it would end ``cat``'s. A SIGTERM (a batch
    scheduler's stop, ``kill``) ends it as Ctrl-C does: what it was writing is discarded and its temporary files
    deleted, then exit 143; so does one that Python dropped, or turned into another error, on its way.
    """
    signal.signal(signal.SIGTERM, functools.partial(_terminated, os.getpid()))
    try:
        main()
        sys.stdout.flush()  # inside the try: a closed pipe is met here, not at exit
        if _TERMINATION.is_set():  # a SIGTERM Python dropped on its way (printed as "Exception ignored")
            raise Terminated
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left for Python to flush at exit
        sys.exit(141)  # what a shell reports for a writer killed by SIGPIPE
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, Exception) as err:  # after a SIGTERM, any error is its (Python may turn it into
        terminated = isinstance(err, Terminated) or _TERMINATION.is_set()  # another: a KeyError inside an import)
        if not (terminated or isinstance(err, KeyboardInterrupt)):
            raise
        tqdm.write("terminated" if terminated else "interrupted", file=sys.stderr)  # below any progress bar
        sys.exit(143 if terminated else 130)


class Terminated(KeyboardInterrupt):
    """A SIGTERM, in a process ``run_main`` runs: handled as Ctrl-C is (``stop_if_interrupted`` too), exit 143."""


_TERMINATION = threading.Event()  # set once a SIGTERM reached run_main's process (_terminated)


def _terminated(main_pid: int, signum, frame) -> None:
    """SIGTERM's handler in ``run_main``'s process ``main_pid``: ``Terminated`` raised where the main thread is, so
    every ``finally`` and ``with`` on the way out runs (``atomic_output`` discards its partial output), and recorded
    for ``stop_if_interrupted`` where Python drops it (in a callback). A process forked from it (a DataLoader worker)
    dies of the signal as it would have."""
    if os.getpid() != main_pid:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    _SIGINTS.append(signum)
    _TERMINATION.set()
    raise Terminated


def one_line(err: BaseException) -> str:
    """``'Type: first line of the message'`` of an exception."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def machine_memory() -> int | None:
    """Bytes of memory this process may use: the machine's, or its cgroup's limit where lower (a container); None
    where neither can be read."""
    try:
        found = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    except (AttributeError, ValueError, OSError):
        found = []
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            found.append(int(Path(limit).read_text()))
        except (OSError, ValueError):  # absent, or "max"
            pass
    return min(found, default=None)


def check_memory(need: int, memory: int | None, what: str, remedy: str) -> None:
    """A ``UserError`` where ``what`` (e.g. "a solve task") would hold ``need`` bytes, more than ``memory`` (the
    ``machine_memory``; None: not known): killed for it, a process says nothing. The line ends with ``remedy``."""
    if memory is not None and need > memory:
        raise UserError(f"{what} would hold about {need / 2 ** 30:.1f} GB, more than the {memory / 2 ** 30:.1f} GB "
                        f"this machine has; {remedy}")


# --------------------------------------------------------------------------- provenance
def code_version() -> str:
    """``git describe --always --dirty`` of this checkout (a commit, ``-dirty`` if edited), or ``unknown``."""
    try:
        return subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- flag types
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """The scripts' ``--help``: a flag's text ends with ``(default: X)``, unless the text states its default itself
    or there is none (``None``)."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


def number(text: str) -> float:
    """``argparse`` type: a float, infinities allowed; NaN is refused (argparse: usage, one error line, exit 2)."""
    value = float(text)  # a ValueError is argparse's "invalid number value"
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    return value


def finite_float(text: str) -> float:
    """``argparse`` type: a finite float; ``number``'s, infinities refused too, and numbers beyond float32's range
    (every tensor's: 3.4e38)."""
    value = number(text)
    if math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    if abs(value) > float(np.finfo(np.float32).max):
        raise argparse.ArgumentTypeError(f"{text!r} is beyond float32's range (3.4e38)")
    return value


def random_seed(text: str) -> int:
    """``argparse`` type: a random seed, an integer 0 .. 2^63 - 1 (torch's and numpy's generators take those)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"{text!r}: a seed is an integer from 0 to 2^63 - 1")
    return value


def folder(text: str) -> str:
    """``argparse`` type: a folder that exists (a mistyped one is a usage error before any work, not a late skip)."""
    if not Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder")
    return text


def check_device(device: str | torch.device | None = None) -> str:
    """``device`` (``cpu``, ``cuda``, ``cuda:N``; None: ``cuda`` if this machine has it, else ``cpu``) as a string, once
    this machine is known to have it; a one-line ``UserError`` naming ``--device`` if it is not a torch device or
    not here (before an archive is blamed for it)."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device}: not a torch device (cpu, cuda or cuda:N)") from None
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices")
    if parsed.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: only cpu and cuda are supported")
    return str(device)


def local_path(path: str | Path, flag: str) -> Path:
    """``path`` (``file://`` or none) as a local ``Path``, ``~`` expanded; a one-line ``UserError`` naming ``flag`` for
    a ``gs://``, ``s3://`` or other remote one, where only a local file or folder can be written (else it would
    become a folder named ``gs:`` here)."""
    text = str(path)
    if "://" in text and not text.startswith("file://"):
        raise UserError(f"{flag} {text}: needs a local path (this writes local files, not a cloud volume)")
    return Path(text.removeprefix("file://")).expanduser()


def check_writable(path: str | Path, flag: str, folder: bool = False) -> Path:
    """``path`` as a ``Path``, once it is known that it can be written: a ``UserError`` naming ``flag`` if not.

    ``path`` is a file to write, or with ``folder`` a folder to write files into.
    Nothing is created: the nearest folder on the way that exists must take a new
    file (a temporary one, gone at once), and ``path`` itself, if it exists, must
    be a folder (``folder``) or a writable file. Local paths only (``local_path``).
    """
    path = local_path(path, flag)
    start = path if folder else path.parent
    nearest = next(p for p in (start, *start.absolute().parents) if p.exists())
    if path.exists() and path.is_dir() != folder:
        reason = os.strerror(errno.EISDIR if path.is_dir() else errno.ENOTDIR)
    elif path.is_file() and not os.access(path, os.W_OK):
        reason = os.strerror(errno.EACCES)
    elif not nearest.is_dir():
        reason = f"{nearest} is not a directory"
    else:
        try:
            tempfile.TemporaryFile(dir=nearest).close()
            return path
        except OSError as err:
            reason = err.strerror or str(err)
    raise UserError(f"{flag} {path}: cannot write there ({reason})")


def check_name(name: str, what: str) -> str:
    """``name`` if it can stand as one file name inside an output folder, else a ``UserError`` saying ``what`` it is.

    Refused: empty, ``.``, ``..`` and any name holding a path separator (it would write outside the folder).
    """
    separators = {"/", os.sep, os.altsep} - {None}
    if name in ("", ".", "..") or any(sep in name for sep in separators) or "\0" in name:
        raise UserError(f"{what} {name!r} must be a plain name (no '/', not '..'): it names files inside a folder")
    return name


# --------------------------------------------------------------------------- outputs
def temp_sibling(path: Path, tag: str) -> Path:
    """``DIR/.NAME.TAG-PID@HOST``: where this process builds ``DIR/NAME`` before renaming it into place."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}@{socket.gethostname()}")


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (another user's counts; a zombie, killed but not yet reaped by
    its parent, does not)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (not Linux): os.kill's answer
        return True


def _gone(owner: str) -> bool:
    """Whether the process ``PID[@HOST]`` that left a file ran on this machine (or names none) and runs no more:
    killed (``kill -9``), its leftovers can be taken over. Another machine's cannot be asked, so it is not gone."""
    pid, _, host = owner.partition("@")
    return host in ("", socket.gethostname()) and pid.isdigit() and int(pid) != 0 and not _running(int(pid))


def _remove(path: Path) -> None:
    """Delete a file or a folder tree, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale(path: Path, tag: str) -> list[Path]:
    """Delete the ``temp_sibling(path, tag)`` files or folders that killed runs (``kill -9``) left; returns them.

    A sibling ``.NAME.TAG-PID[@HOST]...`` is stale when it was made on this machine (or names no machine)
    by a process that no longer runs, or by this process, which calls this before it makes its own. Another
    live run's, or another machine's, is kept.
    """
    prefix, removed = f".{path.name}.{tag}-", []
    mine = (str(os.getpid()), f"{os.getpid()}@{socket.gethostname()}")
    for left in path.parent.glob(glob.escape(prefix) + "*"):
        if left.name[len(prefix):] in mine or _gone(left.name[len(prefix):]):
            _remove(left)
            removed.append(left)
    return removed


@contextmanager
def held(path: Path, what: str) -> Iterator[None]:
    """Run the ``with`` body holding the lock file ``path`` (it names this process, ``PID@HOST``), deleted after: a
    one-line ``UserError`` naming ``what`` where a live process holds it (or one of another machine, which cannot
    be asked); one left by a killed process of this machine is taken over. A folder made for it goes too, if the
    body left it empty."""
    made = not path.parent.exists()
    for _ in range(2):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "x") as lock:
                lock.write(f"{os.getpid()}@{socket.gethostname()}")
            break
        except FileExistsError:
            if not path.is_file():  # a file where its folder goes, or a folder at its path
                raise UserError(f"{what}: cannot write its lock file {path}") from None
            holder = path.read_text().strip()
            if not _gone(holder):
                raise UserError(f"{what} is in use by process {holder or '?'} ({path}): wait for it to end, or "
                                f"delete {path} if that process is gone") from None
            path.unlink(missing_ok=True)  # its process was killed
        except OSError as err:
            raise UserError(f"{what}: cannot write its lock file {path}: {one_line(err)}") from None
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        if made and not any(path.parent.iterdir()):
            path.parent.rmdir()


_SIGINTS: list[int] = []  # the Ctrl-Cs (and SIGTERMs) that reached the running atomic_output (_recording_sigint)


@contextmanager
def _recording_sigint() -> Iterator[None]:
    """Within it, a Ctrl-C (SIGINT) raises ``KeyboardInterrupt`` as Python's default does, and is also recorded.

    Python prints and drops an exception raised in a weakref callback or a ``__del__``, and C code (an
    extension module's import) may drop one too: a Ctrl-C that lands there is lost but for the record, which
    ``stop_if_interrupted`` reads. Outside the main thread, or where SIGINT is handled otherwise (ignored, a
    custom handler, an enclosing ``atomic_output``), nothing changes.
    """
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return

    def handler(signum, frame):
        _SIGINTS.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _SIGINTS.clear()


def stop_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if a Ctrl-C reached the running ``atomic_output`` but was dropped on its way
    (``Terminated`` for a SIGTERM).

    Call it between the steps of a long write, so that such a Ctrl-C stops it at once, not at its end.
    """
    if _SIGINTS:
        raise Terminated if signal.SIGTERM in _SIGINTS else KeyboardInterrupt


@contextmanager
def atomic_output(path: str | Path, tag: str = "partial") -> Iterator[Path]:
    """Write ``path`` (a file or a folder) all or nothing: yields the sibling ``temp_sibling(path, tag)`` to write.

    When the body ends, the sibling is renamed to ``path`` (a folder already at ``path`` is moved aside,
    then deleted). If the body raises, or a Ctrl-C arrived while it ran (even one Python dropped in a
    callback), the sibling is deleted, ``path`` stays as it was and the error (``KeyboardInterrupt``)
    goes on. Siblings that killed runs left (``remove_stale``) are deleted first.
    """
    path = Path(path)
    for kind in (tag, "old"):
        remove_stale(path, kind)
    tmp = temp_sibling(path, tag)
    with _recording_sigint():
        try:
            yield tmp
            stop_if_interrupted()
            if tmp.is_dir() and path.is_dir():
                old = temp_sibling(path, "old")
                path.rename(old)
                tmp.rename(path)
                _remove(old)
            else:
                os.replace(tmp, path)
        finally:
            _remove(tmp)


# --------------------------------------------------------------------------- fields
def pixel_grid(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Absolute pixel-centre coordinates ``[1, 2, H, W]``: channel 0 = x = column, 1 = y = row."""
    y, x = torch.meshgrid(torch.arange(h, device=device, dtype=dtype),
                          torch.arange(w, device=device, dtype=dtype), indexing="ij")
    return torch.stack([x, y])[None]


def _normalised_grid(field: torch.Tensor) -> torch.Tensor:
    """Sampling positions ``p + field(p)`` as the ``[N, H, W, 2]`` normalised grid of grid_sample."""
    _, _, h, w = field.shape
    pos = pixel_grid(h, w, field.device, field.dtype) + field
    return ((2 * pos + 1) / _grid_size(w, h, field.device, field.dtype) - 1).permute(0, 2, 3, 1)


@functools.lru_cache(maxsize=16)
def _grid_size(w: int, h: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[1, 2, 1, 1]`` holding ``(w, h)``, kept: made anew, a tensor on a GPU is a copy that waits for the GPU."""
    return torch.tensor([w, h], device=device, dtype=dtype).view(1, 2, 1, 1)


def warp(image: torch.Tensor, field: torch.Tensor, mode: str = "bilinear",
         padding_mode: str = "zeros") -> torch.Tensor:
    """Pull ``image`` through ``field``: ``out(p) = image(p + field(p))``.

    image: ``[N, C, H, W]``; field: ``[N, 2, H, W]`` in pixels (N may be 1 for
    either, to broadcast). Outside the image reads ``0`` (missing data) with the
    default ``padding_mode="zeros"``; use ``"border"`` to warp fields.
    """
    if image.shape[-2:] != field.shape[-2:]:
        raise ValueError(f"image {tuple(image.shape)} and field {tuple(field.shape)} differ in size")
    if field.shape[0] != image.shape[0]:
        n = max(field.shape[0], image.shape[0])
        image, field = image.expand(n, *image.shape[1:]), field.expand(n, *field.shape[1:])
    grid = _normalised_grid(field.to(image.dtype))
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode,
                         align_corners=ALIGN_CORNERS)


WHOLE = 0.999  # a tissue mask (1 tissue, 0 missing) pulled by ``warp`` is whole tissue where it reaches this


def missing_data(images, speck: int = 2) -> torch.Tensor:
    """bool ``[..., H, W]``: where ``images`` ``[..., H, W]`` (raw grey values) hold missing data, on their device.

    0 means missing data. But where contrast was stretched, dark tissue holds zeros too (SNEMI3D: 0.04-0.6 % of its
    pixels), as specks and thin lines. So a zero is missing data only within a zero region that a square of
    ``2 speck + 1`` px fits in (the zeros' opening by that square), beyond the image's edges counted as missing (a
    sliver of missing data along an edge, e.g. where a section was moved, is missing data): an isolated zero is
    dark tissue. ``speck`` 0: every zero.
    """
    zero = torch.as_tensor(images) == 0
    if not speck or not zero.any():
        return zero
    beyond = F.pad(zero, (2 * speck,) * 4, value=True)
    whole = ~dilated(~beyond, speck)  # the all-zero squares, centred up to ``speck`` px beyond the edges
    return dilated(whole, speck)[..., 2 * speck:-2 * speck, 2 * speck:-2 * speck]


def dilated(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """bool ``mask`` ``[..., H, W]`` grown by ``radius`` px (a square of side ``2 radius + 1``, clipped to the image):
    a row pass, then a column pass, each ORing shifted copies whose span doubles (O(log radius) steps)."""
    out = mask.bool()
    for _ in range(2):  # the rows, then (transposed) the columns
        zeros = out.new_zeros(*out.shape[:-1], radius)
        out, span = torch.cat([zeros, out, zeros], -1), 1  # out[..., i]: OR of the padded row over [i, i + span)
        while span < 2 * radius + 1:
            step = min(span, 2 * radius + 1 - span)
            out, span = out[..., :-step] | out[..., step:], span + step
        out = out.transpose(-1, -2)
    return out


def warp_tissue(image: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """``warp`` of raw intensities ``[N, C, H, W]`` (0 = missing data: ``missing_data``) that keeps missing data
    missing.

    A pixel interpolated from any missing pixel (or from outside the image) is 0,
    so tissue is never blended with the 0 of missing data.
    """
    out = warp(image, field)
    tissue = warp((~missing_data(image)).to(out.dtype), field)
    return out.masked_fill(tissue < WHOLE, 0.0)


def warp_labels(labels: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """A label map ``[N, C, H, W]`` (e.g. uint8 defects) pulled through ``field`` by nearest sampling, same dtype."""
    return warp(labels.float(), field, mode="nearest").round().to(labels.dtype)


def compose(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The field of ``f`` applied first, then ``g``: ``warp(warp(x, f), g) == warp(x, compose(f, g))``.

    ``compose(f, g)(p) = g(p) + f(p + g(p))``; both ``[N, 2, H, W]`` pixels.
    """
    return g + warp(f, g, padding_mode="border")


def invert_field(field: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """The field ``h`` with ``compose(field, h) == 0``, i.e. ``warp(warp(x, field), h) == x``.

    Fixed-point iteration ``h <- -field(p + h(p))``; converges for fields whose
    spatial gradient is below 1 (smooth misalignments). ``[N, 2, H, W]`` pixels.
    """
    inverse = -field
    for _ in range(iterations):
        inverse = -warp(field, inverse, padding_mode="border")
    return inverse


def in_frame_of(fields: torch.Tensor, reference: int = 0) -> torch.Tensor:
    """Fields ``[Z, 2, H, W]`` that pull sections into one frame, re-expressed in the frame of section ``reference``.

    ``compose(F_z, invert_field(F_ref))``: re-align section z, then misalign it as
    the reference is. The reference gets the zero field; this is what an aligner
    that keeps its first section fixed can at best produce, given true fields.
    """
    inverse = invert_field(fields[reference:reference + 1])
    return compose(fields, inverse.expand_as(fields))


def upsample_field(field: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Field at ``factor``x the resolution; vectors are scaled by ``factor`` (pixels change size)."""
    if factor == 1:
        return field
    return factor * F.interpolate(field, scale_factor=factor, mode="bilinear",
                                  align_corners=ALIGN_CORNERS)


def downsample_field(field: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Field at 1/``factor`` the resolution (area average); vectors divided by ``factor``. A last row or column
    of coarse pixels that the field only partly covers averages the fine pixels it has."""
    if factor == 1:
        return field
    return F.avg_pool2d(field, factor, ceil_mode=True) / factor


def affine_field(matrix: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Field of the affine map ``p -> A (p - c) + c + t`` about the image centre ``c``.

    matrix: ``[N, 2, 3]`` with ``A = matrix[:, :, :2]`` and ``t = matrix[:, :, 2]``
    in pixels (x, y). Returns ``[N, 2, H, W]``: ``field(p) = A (p - c) + c + t - p``.
    """
    grid = pixel_grid(h, w, matrix.device, matrix.dtype)
    rel = torch.stack([grid[:, 0] - (w - 1) / 2, grid[:, 1] - (h - 1) / 2], 1)  # p - c
    mapped = torch.einsum("nij,njhw->nihw", matrix[:, :, :2], rel.expand(len(matrix), -1, -1, -1))
    return mapped + matrix[:, :, 2, None, None] - rel


def rigid_matrix(angle: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor,
                 scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``[N, 2, 3]`` matrix of a rotation by ``angle`` (radians), ``scale`` and shift ``(tx, ty)`` px."""
    angle = torch.as_tensor(angle, dtype=torch.float32).reshape(-1)
    scale = torch.as_tensor(scale, dtype=torch.float32).expand_as(angle)
    cos, sin = scale * torch.cos(angle), scale * torch.sin(angle)
    tx = torch.as_tensor(tx, dtype=torch.float32).expand_as(angle)
    ty = torch.as_tensor(ty, dtype=torch.float32).expand_as(angle)
    return torch.stack([torch.stack([cos, -sin, tx], -1), torch.stack([sin, cos, ty], -1)], 1)


def vector_length(field: torch.Tensor) -> torch.Tensor:
    """Length ``[..., H, W]`` (px) of every vector of a field ``[..., 2, H, W]`` (px).

    Elementwise on the two channels: ``torch.linalg.vector_norm(field, dim=-3)``
    is ~40x slower on CPU for this layout (a reduction over a short strided axis:
    2.6 s for the solve's 58 demo pair fields of 512 px). Exactly 0 on a zero
    vector, with gradient 0 there (not NaN as ``torch.hypot``'s).
    """
    x, y = field.unbind(-3)
    square = x * x + y * y
    nonzero = square > 0
    return torch.where(nonzero, square, 1.0).sqrt() * nonzero


def jacobian_determinant(field: torch.Tensor) -> torch.Tensor:
    """Determinant ``[N, H-1, W-1]`` of the Jacobian of ``p -> p + field(p)`` (forward differences).

    ``<= 0`` where the map folds over itself.
    """
    dx = field[:, :, :-1, 1:] - field[:, :, :-1, :-1]  # d/dx of (u, v)
    dy = field[:, :, 1:, :-1] - field[:, :, :-1, :-1]  # d/dy of (u, v)
    return (1 + dx[:, 0]) * (1 + dy[:, 1]) - dx[:, 1] * dy[:, 0]


# --------------------------------------------------------------------------- images
def _tissue_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std float64 ``[..., 1, 1]`` of each slice's non-zero (tissue) pixels; 0 for an empty slice."""
    tissue = images != 0
    count = tissue.sum((-2, -1), keepdim=True).clamp(min=1)
    mean = (images * tissue).sum((-2, -1), keepdim=True) / count
    var = ((images - mean) * tissue).square().sum((-2, -1), keepdim=True) / count
    return mean, var.sqrt()


def normalise(images, stats: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """THE normalisation of SEAMLeSS (training, alignment and evaluation alike).

    images: ``[..., H, W]`` tensor or array, raw grey values with 0 = missing data
    (uint8 on disk; float raw intensities from augmentation work too). Each slice
    gets zero mean and unit variance over its non-missing pixels; missing pixels
    are 0.0. A constant slice becomes all zeros (never NaN). ``stats``: the
    ``(mean, std)`` (grey levels) to use instead of each slice's own, e.g. a whole
    section's for a part of it (``alignment.section_stats``); a negative std
    inverts the contrast (``alignment.inverted_stats``). Returns
    ``(float32 [..., H, W], missing bool [..., H, W])`` on the input's device.
    """
    x = to_tensor(images, dtype=torch.float64)
    missing = x == 0  # every zero, a dark speck's too (missing_data's tissue): the network sees the mean grey there
    mean, std = _tissue_stats(x) if stats is None else (torch.tensor(v, dtype=torch.float64) for v in stats)
    scale = std.abs().clamp(min=1e-6) * torch.where(std < 0, -1.0, 1.0).to(std.dtype)  # a negative std: inverted
    out = ((x - mean) / scale).masked_fill_(missing, 0.0)
    return out.float(), missing


def slice_std(images) -> torch.Tensor:
    """Std float32 ``[...]`` of each slice's non-missing pixels of ``images`` ``[..., H, W]`` (0 if none)."""
    return _tissue_stats(to_tensor(images, dtype=torch.float64))[1][..., 0, 0].float()


def _box_mean_1d(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Mean of ``x`` over the window ``[i - radius, i + radius]`` along ``dim``, clipped to the array.

    Cumulative sums (float64) make it O(1) per element: with ``C[j]`` the sum of
    the first ``j`` elements (0 for ``j <= 0``, the total for ``j >= n``), the
    window sums are ``C[i + radius + 1] - C[i - radius]``, two shifted slices of
    ``C`` padded by ``radius`` on each side. Near the edges the mean is over the
    part of the window inside the array.
    """
    n = x.shape[dim]
    csum = x.cumsum(dim)
    before = [radius + 1 if d == dim % x.dim() else size for d, size in enumerate(x.shape)]
    after = [radius if d == dim % x.dim() else -1 for d in range(x.dim())]
    padded = torch.cat([x.new_zeros(before), csum, csum.narrow(dim, n - 1, 1).expand(after)], dim)  # C[k - radius]
    i = torch.arange(n, device=x.device)
    count = ((i + radius + 1).clamp(max=n) - (i - radius).clamp(min=0)).to(x.dtype)
    shape = [1] * x.dim()
    shape[dim] = n
    return (padded.narrow(dim, 2 * radius + 1, n) - padded.narrow(dim, 0, n)) / count.view(shape)


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean of ``x`` ``[..., H, W]`` over a ``(2 radius + 1)²`` square around each pixel, clipped to the image.

    Separable cumulative sums, O(1) per pixel whatever the radius; at the edges
    each pixel averages the part of its square that lies inside the image.
    Returns float32 of the shape of ``x``; ``radius = 0`` returns ``x`` as float32. A radius beyond the image's
    larger side averages nothing more than that side does.
    """
    if radius <= 0:
        return x.float()
    radius = min(radius, max(x.shape[-2:]))
    x = x.double()
    return _box_mean_1d(_box_mean_1d(x, radius, -1), radius, -2).float()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x`` ``[..., H, W]`` (float32) blurred by a Gaussian of ``sigma`` px: separable, truncated at ``ceil(2.5
    sigma)`` px or at the image's larger side, whichever is less (a wider one averages nothing more), the borders
    replicated."""
    r = max(1, min(int(math.ceil(2.5 * sigma)), max(x.shape[-2:])))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32, device=x.device) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).view(1, 1, 1, -1)
    out = F.conv2d(F.pad(x.reshape(-1, 1, *x.shape[-2:]), (r, r, 0, 0), mode="replicate"), k)
    return F.conv2d(F.pad(out, (0, 0, r, r), mode="replicate"), k.transpose(-1, -2)).reshape(x.shape)


def smoothstep(x: torch.Tensor, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """0 below ``lo``, 1 above ``hi``, a smooth cubic in between (same shape as ``x``)."""
    t = ((x - lo) / (hi - lo)).clamp(0, 1)
    return t * t * (3 - 2 * t)


def uniform(bounds: tuple[float, float], generator: torch.Generator, n: int | tuple = (),
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n`` draws ``[n]`` (one, 0-d, by default) uniform in ``[lo, hi]`` = ``bounds``, scaled in ``dtype``.

    The draw itself is float32 either way (one number of ``generator`` per value);
    ``torch.float64`` scales it as Python floats do.
    """
    lo, hi = bounds
    return lo + (hi - lo) * torch.rand(n, generator=generator).to(dtype)


# ----------------------------------------------------------------- type conversion
def to_numpy(x) -> np.ndarray:
    """A tensor (any device, with or without grad) or array as a NumPy array."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def to_tensor(x, device=None, dtype=torch.float32) -> torch.Tensor:
    """An array or tensor as a *copy* of dtype ``dtype`` (never shares memory with NumPy)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=device, dtype=dtype, copy=True)
    return torch.tensor(np.asarray(x), device=device, dtype=dtype)
