"""Shared fixtures: small volumes built in a temp dir (never the network, never ../shared)."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import volume

ROOT = Path(__file__).resolve().parent.parent


def moved_windows(moves, size: int = 160, seed: int = 3) -> np.ndarray:
    """``[Z, size, size]`` uint8 windows of one smooth random texture, section z's content moved by ``moves[z]``
    (x, y) px: section z at p shows what section 0 shows at p - moves[z]."""
    rng = np.random.default_rng(seed)
    reach = max(max(abs(m) for m in move) for move in moves) + 1
    texture = rng.random((size + 2 * reach + 1, size + 2 * reach + 1))
    texture = (texture[:-1, :-1] + texture[1:, :-1] + texture[:-1, 1:] + texture[1:, 1:]) / 4  # a little smooth
    texture = (texture * 200 + 30).astype(np.uint8)
    return np.stack([texture[reach - dy:reach - dy + size, reach - dx:reach - dx + size] for dx, dy in moves])


def turned_phantom(size: int, shift, angle: float, seed: int = 3) -> tuple[np.ndarray, tuple[np.ndarray, float]]:
    """uint8 ``[4, size, size]``: a phantom section moved by the rigid map ``p -> R(angle) (p - c) + c + shift``
    about its centre ``c`` (``helpers.rigid_matrix``; ``shift`` px x then y, ``angle`` rad), the section itself,
    its neighbour, and a section of another phantom; and the true match of the moved section onto the section
    ``(shift [2] px at the centre, angle rad)``, as ``shifts.RigidMatch`` gives it."""
    import phantom
    from helpers import affine_field, rigid_matrix, warp

    pad = 64
    pair = torch.from_numpy(phantom.make_phantom((2, size + 2 * pad, size + 2 * pad), seed=seed)).float()
    other = phantom.make_phantom((1, size, size), seed=seed + 1)[0]
    (tx, ty) = shift
    moved = warp(pair[:1, None], affine_field(rigid_matrix(torch.tensor([angle]), tx, ty), *pair.shape[1:]))[0, 0]
    crop = (slice(pad, -pad),) * 2
    sections = np.stack([moved[crop].round().clamp(0, 255).to(torch.uint8).numpy(), *pair[:, pad:-pad, pad:-pad]
                         .to(torch.uint8).numpy(), other])
    # moved(p) = section(R p + t) about the centre, so the match of moved onto the section is R^-1 (p - t)
    cos, sin = np.cos(angle), np.sin(angle)
    return sections, (-np.array([cos * tx + sin * ty, -sin * tx + cos * ty]), -angle)


def corrupt_chunk(path, name: str, coord: tuple) -> None:
    """Overwrite the stored bytes of the chunk at ``coord`` of the compressed, chunked dataset ``name`` of an HDF5 file
    with garbage, so that reading it fails (a disk error in the middle of a file)."""
    with h5py.File(path, "r") as f:
        info = f[name].id.get_chunk_info_by_coord(coord)
    assert info.filter_mask == 0, "the chunk is stored uncompressed: garbage would read as data"
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(b"\xff" * info.size)


def run_script(*argv, cwd=ROOT, env=None):
    """Run one of the repo's scripts as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


@pytest.fixture
def run_command(capsys, monkeypatch):
    """``run_command(module, *argv, cwd=None)``: the script ``module`` run on ``argv`` in this process as its
    command line runs it (``helpers.run_main(module.main)``), with ``sys.argv[0]`` its file name (argparse's
    messages name it) and the working folder ``cwd``; returns a ``subprocess.CompletedProcess`` as
    ``run_script``'s (returncode, stdout, stderr), without the seconds of a new interpreter. ``run_script`` stays
    the check that a script's file runs ``main`` so; an unexpected exception raises here (a traceback there)."""
    from helpers import run_main

    def run(module, *argv, cwd=None):
        argv = [str(arg) for arg in argv]
        if cwd is not None:
            monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", [Path(module.__file__).name, *argv])
        capsys.readouterr()
        try:
            run_main(lambda: module.main(argv))
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([module.__file__, *argv], code, out, err)
    return run


def ended_pid() -> int:
    """The process id of a process that has ended (what a run killed with ``kill -9`` leaves in its temp names)."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


@pytest.fixture
def python_sigint():
    """Python's own Ctrl-C handling (``KeyboardInterrupt``) during the test, whatever the test runner set."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def tiny_volume(tmp_path):
    """A 64 x 64 x 12 image volume with 2 mips, a defect layer and a field layer, as file:// paths: each section is
    one random texture (a little smooth: the whole-section match runs on 2 x 2 px means) shifted by up to 2 px, a
    fifth of its pixels drawn afresh.

    Returns ``(paths, arrays)``; arrays are mip-0 ``[Z, C, Y, X]``.
    """
    rng = np.random.default_rng(0)
    texture = rng.random((65, 65))
    texture = (texture[:-1, :-1] + texture[1:, :-1] + texture[:-1, 1:] + texture[1:, 1:]) / 4  # a little smooth
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    base, shifts = (texture * 254 + 1).astype(np.uint8), rng.integers(-2, 3, size=(12, 2))
    image = np.stack([np.roll(base, tuple(shift), (0, 1)) for shift in shifts])[:, None]  # neighbours match
    changed = rng.random(image.shape) < 0.2  # but are not copies
    image[changed] = rng.integers(1, 256, size=int(changed.sum()), dtype=np.uint8)
    image[:, :, :, 48:] = 0  # the right quarter is missing data
    defects = np.zeros_like(image)
    defects[3, 0, 10:12, :] = 1
    field = rng.normal(size=(12, 2, 64, 64)).astype(np.float32)
    paths, arrays = {}, {"image": image, "defects": defects, "field": field}
    for name, array, kind in (("image", image, "image"), ("defects", defects, "labels"),
                              ("field", field, "field")):
        path = "file://" + str(tmp_path / "vol" / name)
        vol = volume.create_volume(path, (64, 64, 12), str(array.dtype), num_channels=array.shape[1],
                                   mips=2, chunk=(32, 32, 1), provenance={"description": "test"})
        volume.write_pyramid(vol, array, (0, 0, 0), kind)
        paths[name] = path
    return paths, arrays
