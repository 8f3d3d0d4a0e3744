"""Network archives: one torch file holding a Pyramid's config, weights and the trainer's state.

An archive is a dict ``{'kind': 'seamless-archive', 'version': 1, 'config':
model.config, 'state_dict': ..., **state}`` where ``state`` is whatever the
trainer passes (optimizer state, rng state, args, loss history, lineage, code
version). ``load_archive`` rebuilds the model from the file alone.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from helpers import UserError, atomic_output, check_device, one_line
from models.pyramid import Pyramid

KIND = "seamless-archive"
VERSION = 1
_RESERVED = ("kind", "version", "config", "state_dict")
_GROWABLE = ("size", "skip")  # config keys that may differ when growing a net
_REFUSED = re.compile(r"GLOBAL ([\w.]*\w)")  # how torch's weights-only unpickler names an object it will not build
_DETAIL = re.compile(r"^\s*((?:trying to load )?unsupported .*?)\s*$", re.IGNORECASE | re.MULTILINE)


def _load_error(path: Path, err: Exception) -> UserError:
    """The one-line error for a file ``torch.load(..., weights_only=True)`` failed on.

    The weights-only unpickler refuses any Python object but tensors and plain
    data (a pickled object can run code as it is built): such a file is named
    unsafe, with the object it holds; anything else is an unreadable file, with
    the line of torch's message that says what it met.
    """
    text = str(err) if isinstance(err, pickle.UnpicklingError) else ""
    refused, detail = _REFUSED.search(text), _DETAIL.search(text)
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):  # torch writes a zip file, or (before 1.6) a pickle
        start = f"it starts with {head!r}" if head else "it is empty"
        return UserError(f"{path}: not a torch file ({start}: neither a zip nor a pickle)")
    if refused:
        return UserError(f"{path}: not a safe network archive: it holds the Python object {refused[1]}, which "
                         "loading would run (refused: an archive holds only tensors and plain data)")
    return UserError(f"{path}: not a readable torch file ({detail[1] if detail else one_line(err)})")


def save_archive(path: str | Path, model: Pyramid, **state: Any) -> Path:
    """Write ``model`` and ``state`` to ``path`` atomically; returns the path.

    The archive is written to a temporary file in the same directory, flushed to
    disk (fsync) and renamed over ``path`` (``helpers.atomic_output``), so a crash
    never leaves a partial archive and a failed save leaves the old one untouched.
    Weights are stored on the CPU. ``state`` keys may not be ``kind``, ``version``, ``config`` or ``state_dict``.
    """
    clash = sorted(set(state) & set(_RESERVED))
    if clash:
        raise ValueError(f"archive state may not use the reserved keys {clash}")
    path = Path(path)
    archive = {"kind": KIND, "version": VERSION, "config": dict(model.config),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **state}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp, open(tmp, "wb") as f:
            torch.save(archive, f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:  # the folder made read-only, the disk full: the old archive is kept
        raise UserError(f"{path}: cannot write the archive ({err.strerror or one_line(err)})") from None
    return path


def read_archive(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """The archive dict stored at ``path``, tensors on ``device``; a ``UserError`` if it is not one of ours.

    Loaded with ``weights_only=True``: a file holding any other Python object
    than tensors and plain data (which could run code as it is unpickled) is
    refused before anything in it is built. Archives need no other type.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {'a folder, not an archive file' if path.is_dir() else 'no such archive file'}")
    check_device(device)
    try:
        with warnings.catch_warnings():  # torch warns of pickle protocols it may not read: the error says it
            warnings.simplefilter("ignore")
            archive = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a corrupt file can fail in any of pickle's or zipfile's ways
        raise _load_error(path, err) from err
    if isinstance(archive, dict) and isinstance(archive.get("kind"), str) and archive["kind"] != KIND:
        raise UserError(f"{path}: a {archive['kind']} file, not an aligner's archive ('{KIND}')")
    if not isinstance(archive, dict) or archive.get("kind") != KIND:
        raise UserError(f"{path}: a torch file but not a SEAMLeSS archive (no kind '{KIND}')")
    if archive.get("version") != VERSION:
        raise UserError(f"{path}: archive version {archive.get('version')!r} is not supported "
                        f"(this code reads version {VERSION})")
    if not isinstance(archive.get("config"), dict) or not isinstance(archive.get("state_dict"), dict):
        raise UserError(f"{path}: archive lacks its config or its state_dict")
    return archive


def _weights_problem(model: Pyramid, weights: dict) -> str | None:
    """One line saying how ``weights`` fail to fit ``model``, or None if they fit exactly."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        return f"{len(missing)} weights missing (first: {missing[0]})"
    if unexpected:
        return f"{len(unexpected)} unexpected weights (first: {unexpected[0]})"
    for name, value in expected.items():
        shape = tuple(getattr(weights[name], "shape", ()))
        if shape != tuple(value.shape):
            return f"{name} has shape {shape}, the config needs {tuple(value.shape)}"
    return None


def _build(archive: dict, where: str, device: str | torch.device) -> Pyramid:
    """The Pyramid an archive describes, with its weights; ``where`` names the archive in errors."""
    try:
        model = Pyramid(**archive["config"])
    except (TypeError, ValueError) as err:
        raise UserError(f"{where}: invalid config {archive['config']} ({one_line(err)})") from err
    problem = _weights_problem(model, archive["state_dict"])
    if problem:
        raise UserError(f"{where}: weights do not match the config: {problem}")
    model.load_state_dict(archive["state_dict"])
    return model.to(device)


def load_archive(path: str | Path, device: str | torch.device = "cpu") -> tuple[Pyramid, dict]:
    """``(model, archive)``: the Pyramid rebuilt from the archive at ``path`` alone, and the archive dict.

    Raises ``UserError`` (one line naming ``path``) for a missing file, a file torch
    cannot read or would have to run code to read (``read_archive``), a torch file
    that is not a SEAMLeSS archive, or weights that do not
    match the archive's config. The model is on ``device`` in train mode.
    """
    archive = read_archive(path, device)
    return _build(archive, str(path), device), archive


def lineage(archive: dict) -> list[dict]:
    """Summaries of every training run that made this network (``train.summary``), root first, its own run last;
    an archive of weights alone (no ``summary``) has none of its own."""
    return list(archive.get("lineage", [])) + ([archive["summary"]] if "summary" in archive else [])


def load_weights(model: Pyramid, archive: dict | str | Path, where: str | None = None) -> list[int]:
    """Copy the levels of an archive's net into ``model``, which may have more levels; returns the levels copied.

    archive: an archive dict (from ``read_archive`` / ``load_archive``) or its path; ``where``: how errors name it
    (default: its path, or ``archive``).
    Level ``l`` of the archived net (its encoder stage and its aligner) goes to
    level ``l`` of ``model``; ``model``'s extra, coarser levels keep their
    initialisation (an untrained aligner outputs zero, so the grown net starts by
    computing what the archived one did). A ``UserError`` if the archive has more
    levels than ``model`` or differs in any other config entry than size and skip
    (kernel size, correlation radius, channel widths).
    """
    where = where or (str(archive) if isinstance(archive, (str, Path)) else "archive")
    if isinstance(archive, (str, Path)):
        archive = read_archive(archive)
    old = _build(archive, where, "cpu")
    if old.size > model.size:
        raise UserError(f"{where}: has {old.size} levels, more than the model's {model.size}")
    differ = [f"{key} {old.config[key]} vs {model.config[key]}" for key in model.config
              if key not in _GROWABLE and old.config[key] != model.config[key]]
    if differ:
        raise UserError(f"{where}: config differs from the model's (archive vs model): {', '.join(differ)}")
    levels = list(range(old.size))
    for level in levels:
        model.encoder.stages[level].load_state_dict(old.encoder.stages[level].state_dict())
        model.aligners[level].load_state_dict(old.aligners[level].state_dict())
    return levels
