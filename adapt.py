"""Adapt a network to the sections it is about to align, without labels (``align.py --adapt MINUTES``).

A copy of the archive is fine-tuned by ``train.py`` on *self-pairs*: each of up to
``MAX_SECTIONS`` raw sections of the range (evenly spread; the central square of at
most ``MAX_SIDE`` px of the region) is paired with itself, and train.py's augmentation
with the real-tissue recipe's flags (``RECIPE``: ``--p_jitter 1``, so each slice is
moved by its own random shift, rotation and elastic field, and the source is cracked
or folded) makes a pair whose true field is known. The supervised term then teaches
the network the misalignment on the user's own texture; since the two slices are the
same section, the similarity penalty cannot reward following tissue change; but
a pair without any change teaches the network to follow every difference (the CPC
rises on ISBI, bench/RESULTS.md), so ``--tissue_change`` moves the target's content
by a fine field that the true field leaves out. Nothing but the raw sections goes
in: no true field, no defect map, no other stack.

The result is written atomically to ``out`` (``models.archive.save_archive``, without
the optimizer state): its lineage is the parent's followed by this run (``adapted``),
and ``adapted_from`` names the parent archive, its sha256 and the minutes. The parent
archive is only read.
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

import gen_stack
import train
from helpers import UserError, file_sha256
from models.archive import load_archive, read_archive, save_archive

MAX_SECTIONS = 32  # self-pairs made from at most this many sections of the range
MAX_SIDE = 512  # px: each from the central square of at most this side of the region
CROP = 192  # px: train.py --crop (less on smaller sections)
# train.py's flags: pt/README.md's real-tissue recipe at a fine-tuning lr (0.0002, not 0.0005), plus --tissue_change;
# --minutes stops it
RECIPE = ["--lambda1", "0.1", "--lambda_gt", "1", "--max_shift", "16", "--p_jitter", "1", "--max_angle", "0.02",
          "--elastic", "2.5", "--tissue_change", "2", "--fall_time", "0", "--lr", "0.0002", "--clip", "1",
          "--batch_size", "8", "--epoch_size", "200", "--epochs", "1000000", "--vis_interval", "0",
          "--num_workers", "0"]


def section_sample(z_start: int, z_stop: int) -> list[int]:
    """Up to ``MAX_SECTIONS`` sections of ``z_start .. z_stop - 1``, evenly spread, first and last included."""
    count = min(MAX_SECTIONS, z_stop - z_start)
    return sorted({int(z) for z in np.linspace(z_start, z_stop - 1, count).round()})


def central_square(width: int, height: int) -> tuple[int, int, int]:
    """``(dx, dy, side)``: the central square of a ``width`` x ``height`` px region, of side at most ``MAX_SIDE``."""
    side = min(width, height, MAX_SIDE)
    return (width - side) // 2, (height - side) // 2, side


def self_pair_sections(read: Callable[[int, int, int, int], np.ndarray], z_start: int, z_stop: int, width: int,
                       height: int) -> np.ndarray:
    """The sections ``adapt`` trains on, uint8 ``[P, D, D]``: ``section_sample``'s, each its ``central_square``.

    ``read(dx, dy, z, side)`` returns uint8 ``[side, side]`` of section ``z`` from ``(dx, dy)`` px of the region.
    """
    dx, dy, side = central_square(width, height)
    return np.stack([np.asarray(read(dx, dy, z, side), dtype=np.uint8) for z in section_sample(z_start, z_stop)])


def write_self_pairs(path: Path, sections: np.ndarray) -> Path:
    """``sections`` ``[P, D, D]`` uint8 as a registered ``gen_stack.py`` dataset of P stacks of 2: each twice."""
    count, dim = len(sections), sections.shape[-1]
    sampling = gen_stack.Sampling(source="self-pairs", count=count, registered=True, stack_height=2, dim=dim, mip=0,
                                   train_range=(0, count))
    stacks = ((np.zeros(3, np.int64), {"images": np.stack([section, section])[:, None]}) for section in sections)
    gen_stack.write_stacks(path, stacks, count, sampling)
    return path


def recipe(archive: Path, parent: dict, dataset: Path, side: int, minutes: float, seed: int,
           device: str | None) -> list[str]:
    """train.py's command line: ``RECIPE`` from ``archive`` (``parent``, its dict), on ``dataset`` (sections of
    ``side`` px) for ``minutes``."""
    config = parent["config"]
    step = 2 ** (config["size"] - 1)
    crop = min(CROP, side) // step * step
    if crop < step:
        raise UserError(f"--adapt: sections of {side} px are smaller than the network's coarsest stride {step} px")
    shape = ["--size", config["size"], "--k", config["k"], "--corr", config["corr_radius"], "--skip", config["skip"],
             "--trunc", parent.get("args", {}).get("trunc", 0)]
    run = ["--crop", crop, "--minutes", minutes, "--seed", seed, "--state_archive", archive, "--dataset", dataset]
    return [str(flag) for flag in [*shape, *RECIPE, *run, *(["--device", device] if device else []), "adapted"]]


def adapt(archive: str | Path, sections: np.ndarray, minutes: float, out: str | Path, seed: int = 0,
          device: str | None = None) -> Path:
    """Fine-tune a copy of ``archive`` for ``minutes`` on self-pairs of ``sections`` and write it to ``out``.

    sections: uint8 ``[P, D, D]`` raw sections (``self_pair_sections``); ``device``: train.py's default when None.
    Training runs in a temporary folder (its dataset, archive and logs go with it); ``out`` is written
    atomically, ``archive`` only read. Returns ``out``.
    """
    archive, out = Path(archive).resolve(), Path(out).resolve()
    parent = read_archive(archive)
    with tempfile.TemporaryDirectory(prefix="seamless-adapt-") as tmp, contextlib.chdir(tmp):
        dataset = write_self_pairs(Path(tmp) / "self_pairs.h5", sections)
        flags = recipe(archive, parent, dataset, sections.shape[-1], minutes, seed, device)
        model, state = load_archive(train.main(flags))
    keep = {key: value for key, value in state.items() if key not in ("kind", "version", "config", "state_dict")}
    origin = {"archive": str(archive), "sha256": file_sha256(archive), "minutes": minutes,
              "sections": len(sections), "side": int(sections.shape[-1])}
    return save_archive(out, model, **{**keep, "optimizer": None, "adapted_from": origin})
