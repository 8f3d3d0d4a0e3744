"""Train (or fine-tune) a SEAMLeSS pyramid on pairs of consecutive sections.

    python train.py [--lambda1 2 --lr 0.0003 ...] EXPERIMENT_NAME
    python train.py --resume [--lr 0.0001 ...] EXPERIMENT_NAME   # continue a run (with new flags)
    torchrun --standalone --nproc_per_node N train.py ...   # N processes (GPUs), one model

One step: ``data.py`` gives a batch of (source, target) pairs with masks ->
``models/`` predicts the field that pulls the source onto the target -> ``loss.py``
scores it with weights from ``masks.py``. Outputs: ``pt/EXPERIMENT.pt`` (written
atomically after every epoch; with a held-out ``--val_dataset`` also
``pt/EXPERIMENT.best.pt``, the epoch with the lowest held-out EPE so far; with
``--average_from E`` also ``pt/EXPERIMENT.avg.pt``, the mean of the weights of epochs E on),
TensorBoard logs in ``runs/EXPERIMENT`` and pictures in ``out/EXPERIMENT``. A run
that fails (or is interrupted) before it saves its first epoch removes the
``runs/`` and ``out/`` folders it made; nothing an earlier run left is touched,
except that ``--overwrite``, once it has saved an epoch, deletes the logs and
pictures of the network it replaced.

Staged training (``--fall_time N``; the default without the supervised term):
the coarsest level trains first; every N epochs training moves one level finer
(that level's aligner and the shared encoder train, the coarser aligners are
frozen); after the finest level all levels train together. ``--fine_tuning``
trains all levels at once from ``--state_archive`` at a reduced learning rate.

Under ``torchrun`` (``distributed.py``) N processes train one model with
``DistributedDataParallel``: ``--batch_size`` is the global batch, each process
takes ``batch_size / N`` pairs of it, and rank 0 alone decides (name check,
resume, data), validates, prints and writes outputs.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import random
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler
from tqdm import tqdm

import distributed
import loss
import misalign
from data import Augmenter, StackDataset, batches, held_out_misalignment
from helpers import (HelpFormatter, UserError, check_device, check_name, check_writable, code_version, finite_float,
                     held, random_seed, run_main, upsample_field, vector_length)
from models import Pyramid
from models.archive import load_archive, load_weights, save_archive

KEY_PARAMS = ("lambda0", "lambda1", "lambda2", "lambda3", "lambda4", "lambda5", "lambda6", "lambda_gt",
              "mask_neighborhood_radius", "mask_smooth_radius", "lr", "size", "trunc", "skip", "k", "corr",
              "similarity", "smoothness", "dataset")
# flags a resumed run keeps: the network's shape, the schedule's start, the data it trains and is judged on; every
# other flag given again with --resume takes its new value (the device is always this machine's)
FIXED_ON_RESUME = ("size", "trunc", "skip", "k", "corr", "state_archive", "fine_tuning", "dataset", "hm",
                   "val_dataset", "val_pairs")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("name", help="experiment name: pt/NAME.pt, runs/NAME, out/NAME")
    g = p.add_argument_group("loss")
    g.add_argument("--lambda0", type=finite_float, default=1.0,
                   help="weight of the similarity penalty (0 = supervised only, with --lambda_gt)")
    g.add_argument("--lambda1", type=finite_float, default=0.1,
                   help="weight of the smoothness penalty against similarity")
    g.add_argument("--lambda2", type=finite_float, default=0.04, help="relative smoothness weight near defects")
    g.add_argument("--lambda3", type=finite_float, default=0.0, help="relative smoothness weight inside defects")
    g.add_argument("--lambda4", type=finite_float, default=5.0,
                   help="relative similarity (and supervised) weight near defects")
    g.add_argument("--lambda5", type=finite_float, default=0.0,
                   help="relative similarity (and supervised) weight inside defects")
    g.add_argument("--lambda6", type=finite_float, default=0.0,
                   help="weight of the consensus penalty (the pair rotated by 180 degrees must agree)")
    g.add_argument("--lambda_gt", type=finite_float, default=None,
                   help="weight of the supervised end-point error against a known field (0 = self-supervised; "
                        "default: 1 where the training data has true fields, the demo's or --registered sections', "
                        "else 0: the image penalties alone reward following tissue change, docs/design.md)")
    g.add_argument("--mask_neighborhood_radius", type=finite_float, default=20,
                   help="radius in pixels (at the dataset's mip) of the 'near a defect' region")
    g.add_argument("--mask_smooth_radius", type=finite_float, default=10,
                   help="radius in pixels of the box filter that smooths the smoothness weights")
    g.add_argument("--similarity", default="mse", choices=sorted(loss.SIMILARITY),
                   help="similarity penalty")
    g.add_argument("--smoothness", default="jacob", choices=sorted(loss.SMOOTHNESS),
                   help="smoothness penalty")
    g.add_argument("--padding", type=int, default=0,
                   help="border in pixels excluded from the loss (content there comes from outside)")
    g = p.add_argument_group("network")
    g.add_argument("--size", type=int, default=5, help="number of pyramid levels")
    g.add_argument("--trunc", type=int, default=0, help="output level: the finest level that is trained")
    g.add_argument("--skip", type=int, default=0, help="number of finest levels that run no aligner")
    g.add_argument("--k", type=int, default=3, help="aligner kernel size")
    g.add_argument("--corr", type=int, default=3, help="local correlation radius of each aligner's input (0 = off)")
    g.add_argument("--state_archive", help="archive to start from (a smaller net grows into --size levels)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=finite_float, default=0.0003, help="learning rate (Adam)")
    g.add_argument("--fine_tuning", action="store_true",
                   help="train all levels at once from --state_archive at lr x --fine_tuning_lr_factor")
    g.add_argument("--fine_tuning_lr_factor", type=finite_float, default=0.2, help="lr factor when fine-tuning")
    g.add_argument("--clip", type=finite_float, default=1.0,
                   help="clip the gradient norm to this (0 = off); guards against the field blowing up")
    g.add_argument("--epochs", type=int, default=20, help="epochs in all")
    g.add_argument("--minutes", type=finite_float, default=0,
                   help="stop after this many minutes of training, mid-epoch, and save the network there as that "
                        "epoch (0 = no limit; --epochs still stops it first)")
    g.add_argument("--fall_time", type=int, default=None,
                   help="epochs per level in staged training (0 = all levels together from the start; default: 0 "
                        "with the supervised term, which learned faster so, else 2, the seed's staged way)")
    g.add_argument("--epoch_size", type=int, default=0,
                   help="pairs per epoch (0 = one pass over the dataset)")
    g.add_argument("--batch_size", type=int, default=8, help="pairs per step")
    g.add_argument("--seed", type=random_seed, default=0, help="random seed (weights, data order, augmentation)")
    g.add_argument("--average_from", type=int,
                   help="from this epoch on, also keep pt/NAME.avg.pt: the mean of the network's weights at the end "
                        "of each epoch (stochastic weight averaging: at a constant --lr the weights wander from "
                        "epoch to epoch, and so does how well they carry to other data; their mean swings less)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", action="append",
                   help="HDF5 from gen_stack.py, or a dataset NAME (data/NAME_train_mipM.h5); default: the demo "
                        "dataset, built on first use. Repeat the flag to mix several: pairs are drawn from all in "
                        "proportion to their sizes (give one twice to weigh it double); different section sizes "
                        "need --crop")
    g.add_argument("--hm", action="store_true", help="with a dataset NAME: use its highest-mip file")
    g.add_argument("--val_dataset", help="held-out HDF5 with ground-truth fields, scored every epoch: a path, or a "
                                         "NAME (its NAME_test_mip*.h5, gen_stack.py --test) (default: the demo test "
                                         "set when training on the demo)")
    g.add_argument("--val_pairs", type=int, default=32,
                   help="held-out pairs scored per epoch (0: none, and no pt/NAME.best.pt)")
    g.add_argument("--crop", type=int, default=0, help="train on random crops of this size (0 = whole stacks)")
    g.add_argument("--no_augment", action="store_true", help="turn data augmentation off")
    g.add_argument("--max_shift", type=finite_float, default=16,
                   help="largest per-section jitter (px at the dataset's mip) the augmentation adds")
    g.add_argument("--max_angle", type=finite_float, default=0.01, help="largest per-section jitter rotation (radians)")
    g.add_argument("--p_jitter", type=finite_float, default=None,
                   help="probability that each section of a pair is jittered (1: no pair keeps its true field; "
                        "default: 1 with a --registered dataset, whose pairs left alone have a true field of zero, "
                        "else 0.5)")
    g.add_argument("--elastic", type=finite_float, default=0.0,
                   help="RMS length (px) of a smooth elastic field (feature size 200 px) added to each jitter, "
                        "as misalign.py misaligns the demo; for --registered datasets")
    g.add_argument("--tissue_change", type=finite_float, default=0.0,
                   help="RMS length (px) of a fine field (feature size 24 px) that moves each target's content but "
                        "not its true field, as tissue changes between sections (data.tissue_change); for pairs of "
                        "a section with itself (adapt.py)")
    g.add_argument("--fold_prob", type=finite_float, default=Augmenter.p_fold,
                   help="probability that the augmentation folds each pair's source (misalign.add_folds)")
    misalign.add_fold_width_flag(g, "the augmentation's folds:")
    g.add_argument("--blur", type=finite_float, default=0.0,
                   help="largest Gaussian blur (sigma, px) of each section's image, drawn per section from 0 to it "
                        "(data.blur_and_grain: focus differs from volume to volume; 0 = none)")
    g.add_argument("--grain", type=finite_float, default=0.0,
                   help="largest white noise added to each section's image, in units of its tissue's std, drawn per "
                        "section from 0 to it (data.blur_and_grain; 0 = none)")
    g.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    g = p.add_argument_group("run")
    g.add_argument("--device", default=check_device(), help="torch device")
    g.add_argument("--vis_interval", type=int, default=100, help="write pictures every N steps (0 = never)")
    g.add_argument("--collapse_after", type=int, default=300,
                   help="steps before the zero-field collapse check starts (the top level may sit at zero "
                        "for a while)")
    g.add_argument("--resume", action="store_true",
                   help="continue the interrupted run pt/NAME.pt; flags given with it (--lr, --epochs, ...) replace "
                        "the archived ones, except the network's shape and the data (" +
                        ", ".join(f"--{k}" for k in FIXED_ON_RESUME) + ")")
    g.add_argument("--overwrite", action="store_true", help="replace an existing pt/NAME.pt")
    args = p.parse_args(argv)
    if args.resume and args.overwrite:
        raise UserError("--resume continues pt/NAME.pt and --overwrite replaces it: choose one")
    for action in p._actions:  # parsed again without defaults: the flags the command line gives (what --resume changes)
        action.default = argparse.SUPPRESS
    args.given = sorted(vars(p.parse_args(argv)))
    return args


def check_args(args) -> None:
    """One-line errors for impossible flag combinations."""
    for i in range(7):
        if getattr(args, f"lambda{i}") < 0:
            raise UserError(f"--lambda{i} must be >= 0 (got {getattr(args, f'lambda{i}')})")
    if args.lambda_gt is not None and args.lambda_gt < 0:
        raise UserError("--lambda_gt must be >= 0")
    if args.size < 1:
        raise UserError("--size must be at least 1")
    if not 0 <= args.trunc < args.size:
        raise UserError(f"--trunc {args.trunc} must be >= 0 and below --size {args.size}")
    if not 0 <= args.skip < args.size:
        raise UserError(f"--skip {args.skip} must be >= 0 and below --size {args.size}")
    if args.fine_tuning and not args.state_archive:
        raise UserError("--fine_tuning needs --state_archive")
    if args.k < 1 or args.k % 2 == 0:
        raise UserError(f"--k must be odd (got {args.k})")
    if min(args.epochs, args.batch_size) < 1 or (args.fall_time or 0) < 0 \
            or min(args.lr, args.fine_tuning_lr_factor) <= 0 or args.minutes < 0:
        raise UserError("--epochs, --batch_size, --lr and --fine_tuning_lr_factor must be positive, --fall_time and "
                        "--minutes >= 0")
    if args.name.endswith(".pt"):
        raise UserError(f"experiment name {args.name!r}: give it without .pt (the network is written to "
                        f"{archive_of(args.name[:-3])})")
    if args.name.endswith((".best", ".avg")):
        raise UserError(f"experiment name {args.name!r}: a name ending .best or .avg would share its files with "
                        f"experiment {args.name.rsplit('.', 1)[0]!r} (its {args.name.rsplit('.', 1)[1]} network, "
                        f"{archive_of(args.name)}); choose another")
    if 0 < args.epoch_size < args.batch_size:
        raise UserError(f"--epoch_size {args.epoch_size} is smaller than --batch_size {args.batch_size}: an epoch "
                        "would train no step")
    if args.average_from is not None and not 0 <= args.average_from < args.epochs:
        raise UserError(f"--average_from {args.average_from} is an epoch: 0 or more, and below --epochs "
                        f"{args.epochs} (epochs 0..{args.epochs - 1} run), or no mean is kept")
    negative = [name for name in ("clip", "padding", "corr", "crop", "epoch_size", "val_pairs", "num_workers",
                                  "vis_interval", "collapse_after", "max_shift", "max_angle", "elastic",
                                  "tissue_change", "blur", "grain", "mask_neighborhood_radius", "mask_smooth_radius")
                if getattr(args, name) < 0]
    if negative:
        raise UserError(f"{', '.join('--' + name for name in negative)} must be >= 0")
    for name in ("p_jitter", "fold_prob"):
        if getattr(args, name) is not None and not 0 <= getattr(args, name) <= 1:
            raise UserError(f"--{name} {getattr(args, name)} is a probability: between 0 and 1")
    misalign.with_fold_width(args.fold_width)
    if args.crop and args.crop % 2 ** (args.size - 1):
        raise UserError(f"--crop {args.crop} is not divisible by 2^(size-1) = {2 ** (args.size - 1)}")
    if args.batch_size % distributed.world_size():
        raise UserError(f"--batch_size {args.batch_size} (the global batch) does not divide over "
                        f"{distributed.world_size()} processes")


def resolve_dataset(spec: str | None, hm: bool = False, split: str = "train") -> Path:
    """The HDF5 file for ``--dataset``: a path, a NAME in the data directory, or the demo (built if needed)."""
    import volume

    if spec and Path(spec).suffix in (".h5", ".hdf5"):
        if not Path(spec).is_file():
            raise UserError(f"dataset {spec} does not exist")
        return Path(spec)
    if spec and Path(spec).name != spec:  # a path, but not to an .h5 file
        raise UserError(f"--dataset {spec}: expected an .h5 file or a NAME of the data directory's NAME_*_mip*.h5")
    name = spec or "demo"
    found = sorted(volume.data_dir().glob(f"{name}_{split}_mip*.h5"),
                   key=lambda p: int(p.stem.rsplit("mip", 1)[1]))
    if not found and name == "demo":
        import demo
        import gen_stack
        sampling = gen_stack.Sampling(source="demo", count=demo.DATASET_COUNT[split], test=split == "test")
        return gen_stack.write_dataset("demo", sampling)
    if not found:
        raise UserError(f"no dataset '{name}': no file {volume.data_dir()}/{name}_{split}_mip*.h5 "
                        "(make one with gen_stack.py, or give an .h5 path)")
    return found[-1] if hm else found[0]


# ------------------------------------------------------------------ the schedule
@dataclass(frozen=True)
class Stage:
    """What one epoch trains: the loss is computed at ``level``; ``train_levels`` aligners are trained."""
    level: int
    train_levels: tuple[int, ...]


def stage_for_epoch(epoch: int, size: int, trunc: int, skip: int, fall_time: int, fine_tuning: bool) -> Stage:
    """Staged schedule: coarsest level first, one level finer every ``fall_time`` epochs, then all together.

    ``fall_time == 0`` (or fine-tuning) trains all levels together from the start.
    """
    aligned = tuple(range(max(trunc, skip), size))  # levels that have an aligner and are trained
    out = min(aligned, default=trunc)
    if fine_tuning or fall_time == 0:
        return Stage(out, aligned)
    staged = sorted(aligned, reverse=True)
    stage = epoch // fall_time
    if stage < len(staged):
        return Stage(staged[stage], (staged[stage],))
    return Stage(out, aligned)


def set_trainable(model: Pyramid, stage: Stage) -> list[torch.nn.Parameter]:
    """Freeze every aligner outside ``stage.train_levels``; the shared encoder always trains."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.encoder.parameters())
    for level in stage.train_levels:
        params += list(model.level_parameters(level))
    for p in params:
        p.requires_grad_(True)
    return params


def epoch_pairs(n: int, epoch_size: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """The indices of the pairs that process ``rank`` of ``world`` trains on in one epoch, in order.

    One process draws ``epoch_size`` (0: ``n``) of the ``n`` pairs in the order of
    a ``RandomSampler`` seeded with ``seed``. ``world`` processes cut that order to a
    multiple of ``world`` and rank ``r`` takes every ``world``-th pair from the
    ``r``-th, so in step ``k`` the ranks' batches of ``B / world`` pairs together
    hold exactly the one-process batch ``k`` of ``B``, and every rank takes the same
    number of steps. (torch's ``DistributedSampler`` has no ``epoch_size`` and
    shuffles differently, so N processes would not train on one process's pairs.)
    """
    order = list(RandomSampler(range(n), num_samples=epoch_size or n,
                               generator=torch.Generator().manual_seed(seed)))
    return order[rank:len(order) - len(order) % world:world]


# ------------------------------------------------------------------ evaluation on held-out pairs
@torch.no_grad()
def validate(model: Pyramid, loader, trunc: int, device) -> dict:
    """Mean end-point error (px) of the predicted and of the zero field against the true pair fields."""
    errors, zero = [], []
    model.eval()
    for batch in loader:
        batch = to_device(batch, device)
        keep = batch["has_field"] & ~batch["tgt_missing"].flatten(1).all(1)
        if not keep.any():
            continue
        field = upsample_field(model(batch["src"], batch["tgt"], trunc=trunc).field, 2 ** trunc)
        valid = ~(batch["src_missing"] | batch["tgt_missing"])[:, 0] & keep.view(-1, 1, 1)
        errors.append(vector_length(field - batch["field"])[valid])
        zero.append(vector_length(batch["field"])[valid])
    model.train()
    if not errors:
        return {}
    return {"epe": float(torch.cat(errors).mean()), "epe_zero_field": float(torch.cat(zero).mean())}


def out_of_time(deadline: float) -> bool:
    """Whether ``time.time()`` has passed ``deadline`` on any rank (every rank gets the same answer)."""
    return distributed.mean_over_ranks({"late": float(time.time() >= deadline)})["late"] > 0


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ------------------------------------------------------------------ the run
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def summary(args, history: dict, iterations: int, resumes: list[dict]) -> dict:
    """The entry of this run in an archive's lineage (what net_hist.py prints).

    ``params`` are the run's latest; ``resumes`` lists each resume that changed flags: ``{'epoch', 'iteration',
    'date', 'changed': {flag: [old, new]}}``, the first epoch and iteration trained with the new values.
    """
    return {"name": args.name, "date": time.strftime("%Y-%m-%d %H:%M"),
            "params": {k: getattr(args, k, None) for k in KEY_PARAMS}, "iterations": iterations,
            "final": {k: v[-1] for k, v in history.items() if v}, "history": history, "resumes": resumes}


def archive_of(name: str) -> Path:
    """The network archive ``pt/NAME.pt`` of experiment ``name``."""
    return Path("pt") / f"{name}.pt"


def log_dirs(name: str) -> tuple[Path, Path]:
    """``runs/NAME`` (TensorBoard logs) and ``out/NAME`` (pictures) of experiment ``name``."""
    return Path("runs") / name, Path("out") / name


@contextlib.contextmanager
def logs_follow_the_network(name: str, replacing: bool = False) -> Iterator[None]:
    """Run the ``with`` body; the ``log_dirs(name)`` follow the network ``archive_of(name)``. If the body fails
    before it saves an epoch there, the folders it created are deleted (a failed run leaves no logs of a network
    that does not exist). Once it has saved one, the files those folders held before are deleted where they were
    no network's (no archive stood there: the logs of a run killed before it saved) or, with ``replacing``
    (``--overwrite``), the replaced network's: their curves would mix with the new run's. Otherwise what the folders
    held before is kept whatever happens."""
    def saved() -> tuple[int, int] | None:  # the archive's inode and modification time: a save replaces the file
        return (archive.stat().st_ino, archive.stat().st_mtime_ns) if archive.exists() else None

    archive = archive_of(name)
    made, before = [folder for folder in log_dirs(name) if not folder.exists()], saved()
    old = [path for folder in log_dirs(name) if (replacing or before is None) and folder.is_dir()
           for path in folder.iterdir()]
    try:
        yield
    except BaseException:
        if saved() == before:
            for folder in made:
                shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        if saved() != before:
            for path in old:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def best_path(archive_path: Path) -> Path:
    """Where the epoch with the lowest held-out EPE is kept: ``pt/NAME.best.pt`` beside ``pt/NAME.pt``."""
    return archive_path.with_suffix(".best.pt")


def average_path(archive_path: Path) -> Path:
    """Where the average of the epochs' weights is kept (``--average_from``): ``pt/NAME.avg.pt``."""
    return archive_path.with_suffix(".avg.pt")


def add_to_average(average: Pyramid | None, count: int, model: Pyramid) -> Pyramid:
    """``average``, the uniform mean of ``count`` networks' weights (None when ``count`` is 0), with ``model``'s
    added: the mean of ``count + 1`` (stochastic weight averaging; the network has no batch statistics to redo)."""
    if average is None:
        return copy.deepcopy(model)
    with torch.no_grad():
        for mean, new in zip(average.state_dict().values(), model.state_dict().values()):
            if mean.is_floating_point():
                mean += (new.to(mean.device) - mean) / (count + 1)
    return average


def with_data_defaults(args, parts: list[StackDataset]) -> None:
    """The flags left at None whose defaults depend on the training data ``parts``, set in ``args`` (the archive
    records them): ``--lambda_gt`` 1 where some part has true fields (the image penalties alone reward following
    tissue change: docs/design.md), else 0; ``--p_jitter`` 1 where a part is ``--registered`` (a pair left alone has
    a true field of zero, and a network that sees many learns to under-reach), else 0.5; ``--fall_time`` 0 with the
    supervised term (all levels together learned faster), else 2 (the seed's staged training). A ``UserError`` for
    a supervised term without true fields, and for neither it nor the similarity penalty."""
    has_fields = any(part.has_fields for part in parts)
    if args.lambda_gt is None:
        args.lambda_gt = 1.0 if has_fields else 0.0
    if args.p_jitter is None:
        args.p_jitter = 1.0 if any(part.has_fields and not part.has_field_data for part in parts) else 0.5
    if args.fall_time is None:
        args.fall_time = 0 if args.lambda_gt > 0 else 2
    if args.lambda_gt > 0 and not has_fields:
        raise UserError(f"--lambda_gt {args.lambda_gt} needs true fields: no --dataset has them (nor is --registered)")
    if args.lambda0 == 0 and args.lambda_gt == 0:
        raise UserError("--lambda0 0 (no similarity penalty) needs --lambda_gt > 0: nothing else teaches the net"
                        + ("" if has_fields else " (and true fields: no --dataset has them, nor is --registered)"))


def resume_changes(args, stored: dict) -> dict:
    """``{flag: new value}``: the flags given again with ``--resume`` whose values differ from the archived ``stored``.

    A ``UserError`` for one that a resumed run keeps (``FIXED_ON_RESUME``); ``--dataset`` is compared as
    resolved (a NAME or a path, as the archive records it).
    """
    changes = {}
    for key in sorted(set(args.given) - {"name", "resume", "overwrite", "device"}):
        value = getattr(args, key)
        if key == "dataset":
            hm = args.hm if "hm" in args.given else stored.get("hm", False)
            paths = [str(resolve_dataset(spec, hm)) for spec in value]
            value = paths if len(paths) > 1 else paths[0]
            recorded = stored.get(key)
            if [Path(p).resolve() for p in paths] == [Path(p).resolve() for p in
                                                      (recorded if isinstance(recorded, list) else [recorded or ""])]:
                continue  # the same files, spelled otherwise
        if value == stored.get(key):
            continue
        if key in FIXED_ON_RESUME:
            raise UserError(f"--{key} {value} differs from the run's {stored.get(key)}: a resumed run keeps its "
                            f"--{key}; to change it, start a new experiment with --state_archive pt/{args.name}.pt")
        changes[key] = value
    return changes


def prepare(args) -> tuple:
    """Model (on the CPU), optimizer state, history, start epoch and lineage for a new, grown, or resumed run."""
    archive_path = archive_of(check_name(args.name, "experiment name"))  # runs/NAME, out/NAME too
    for folder in (archive_path.parent, *log_dirs(args.name)):  # before an epoch is trained that could not be saved
        check_writable(folder, f"experiment {args.name}:", folder=True)
    if args.resume:
        if not archive_path.is_file():
            raise UserError(f"nothing to resume: {archive_path} " + ("is a directory, not a network archive"
                                                                     if archive_path.is_dir() else "does not exist"))
        model, archive = load_archive(archive_path, "cpu")
        stored = {k: v for k, v in archive["args"].items() if k not in ("given", "typed")}
        changes = resume_changes(args, stored)
        args.__dict__.update({**stored, **changes, "name": args.name, "device": args.device, "resume": True})
        if changes:
            archive["resumes"] = archive.get("resumes", []) + [{
                "epoch": archive["epoch"], "iteration": archive["iteration"], "date": time.strftime("%Y-%m-%d %H:%M"),
                "changed": {k: [stored.get(k), v] for k, v in changes.items()}}]
            print(f"resuming {archive_path} at epoch {archive['epoch']} with "
                  + ", ".join(f"--{k} {stored.get(k)} -> {v}" for k, v in changes.items()))
        if archive.get("epoch", 0) >= args.epochs:
            raise UserError(f"{archive_path} already finished {archive['epoch']} epochs "
                            f"(pass a larger --epochs to train on)")
        return model, archive, archive_path
    existing = [path for path in (archive_path, best_path(archive_path), average_path(archive_path)) if path.exists()]
    if existing and not args.overwrite:
        raise UserError(f"{existing[0]} exists: pass --resume to continue it, --overwrite to replace it, "
                        "or choose another experiment name")
    seed_everything(args.seed)
    model = Pyramid(size=args.size, k=args.k, corr_radius=args.corr, skip=args.skip)
    archive = {"epoch": 0, "iteration": 0, "history": {}, "lineage": [], "optimizer": None}
    if args.state_archive:
        parent_model, parent = load_archive(args.state_archive, "cpu")
        copied = load_weights(model, parent, f"--state_archive {args.state_archive}")
        print(f"started from {args.state_archive} (levels {copied} copied)")
        archive["lineage"] = list(parent.get("lineage", [])) + [parent["summary"]] if "summary" in parent \
            else list(parent.get("lineage", []))
    return model, archive, archive_path


def setup(args) -> tuple:
    """Everything decided and checked before training (on rank 0 alone under ``torchrun``).

    Returns ``(args, model, archive, archive_path, dataset, val_pairs)``: ``args``
    as a resume updates it, with ``dataset`` and ``val_dataset`` resolved to paths
    (the demo's built if needed); ``prepare``'s model (CPU), archive and path; the
    training ``StackDataset`` (a ``ConcatDataset`` of several); and ``--val_pairs``
    fixed held-out pairs spread evenly over ``val_dataset`` (a ``Subset``), or None without one.
    """
    if not args.resume:  # a resumed run's flags are checked once the archive's are in
        check_args(args)
        if args.hm and any(Path(spec).suffix in (".h5", ".hdf5") for spec in args.dataset or []):
            raise UserError("--hm picks a dataset NAME's highest-mip file: an .h5 --dataset is a file already")
    model, archive, archive_path = prepare(args)
    specs = args.dataset if isinstance(args.dataset, list) else [args.dataset]  # None, or one path (a resumed run)
    paths = [resolve_dataset(spec, args.hm) for spec in specs]
    args.dataset = [str(path) for path in paths] if len(paths) > 1 else str(paths[0])
    check_args(args)
    parts = [StackDataset(path, mask_radius=args.mask_neighborhood_radius, crop=args.crop or None) for path in paths]
    sizes = sorted({tuple(part.shape[2:]) for part in parts})
    if len(sizes) > 1 and not args.crop:
        raise UserError(f"--dataset: sections of different sizes ({', '.join(f'{h}x{w}' for h, w in sizes)}) "
                        "can only be mixed with --crop")
    with_data_defaults(args, parts)
    augment = None if args.no_augment else Augmenter(p_jitter=args.p_jitter, max_shift=args.max_shift,
                                                     max_angle=args.max_angle, elastic_amplitude=args.elastic,
                                                     change_amplitude=args.tissue_change, p_fold=args.fold_prob,
                                                     defect_params=misalign.with_fold_width(args.fold_width),
                                                     max_blur=args.blur, max_grain=args.grain)
    for part in parts:
        part.augment = augment
    dataset = parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)
    side = args.crop or min(sizes[0])
    if side % 2 ** (args.size - 1):
        raise UserError(f"sections of {side} px do not divide by 2^(size-1) = {2 ** (args.size - 1)}: "
                        "choose a --crop that does, or a smaller --size")
    if 2 * args.padding >= side:
        raise UserError(f"--padding {args.padding} px leaves nothing of the {side} px sections for the loss")
    val_path = resolve_dataset(args.val_dataset, split="test") if args.val_dataset else \
        resolve_dataset("demo", split="test") if "demo_train" in paths[0].name else None
    args.val_dataset = str(val_path) if val_path else None
    val_pairs = None
    if val_path:
        val_set = StackDataset(val_path, mask_radius=args.mask_neighborhood_radius, seed=0)
        if not val_set.has_fields:
            raise UserError(f"--val_dataset {val_path} has no true fields (nor is it --registered): held-out pairs "
                            "are scored against them")
        if not val_set.has_field_data and val_set.has_fields:  # registered: misalign it as the demo is
            val_set.augment = held_out_misalignment()
        pick = torch.linspace(0, len(val_set) - 1, min(args.val_pairs, len(val_set))).long().tolist()
        val_pairs = torch.utils.data.Subset(val_set, pick)
    return args, model, archive, archive_path, dataset, val_pairs


def log_step(writer, out_dir: Path, iteration: int, scalars: dict[str, float], pictures: dict,
             vis_interval: int) -> None:
    """TensorBoard ``scalars`` of one step; every ``vis_interval`` steps the pictures of its first pair too."""
    from vis import field_figure, save_pair_pictures

    for key, value in scalars.items():
        writer.add_scalar(key, value, iteration)
    if vis_interval and iteration % vis_interval == 0:
        save_pair_pictures(out_dir, f"it{iteration:06d}", **pictures)
        writer.add_figure("pair/field", field_figure(pictures["field"], f"step {iteration}"), iteration)
        writer.add_image("pair/flicker_target_warped_source",
                         torch.stack([pictures[k] for k in ("target", "warped", "source")]).nan_to_num(0.0).clamp(-3, 3)
                         .div(6).add(0.5), iteration, dataformats="CHW")


def log_arguments(writer, args, step: int) -> None:
    """TensorBoard text at ``step``: the command line that started this process and ``args`` as a markdown table."""
    rows = "\n".join(f"| {key} | `{value}` |" for key, value in sorted(vars(args).items()))
    writer.add_text("run/command", f"`python {shlex.join(sys.argv)}`", step)
    writer.add_text("run/arguments", "| argument | value |\n|---|---|\n" + rows, step)


def log_hparams(writer, args, history: dict[str, list[float]], epoch: int) -> None:
    """TensorBoard's HParams view of this run: the ``KEY_PARAMS`` against the epoch curves' last values.

    Written into the run's own event file, not a sub-run as ``add_hparams`` would;
    the metrics are the ``epoch/...`` curves already logged.
    """
    from torch.utils.tensorboard.summary import hparams

    params = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
              for k in KEY_PARAMS if (v := getattr(args, k, None)) is not None}
    for part in hparams(params, {f"epoch/{k}": v[-1] for k, v in history.items() if v}):
        writer.file_writer.add_summary(part, epoch)


def train(args, device: str | None = None) -> Path:
    """Run (or resume) the experiment ``args.name`` on ``device`` (default ``args.device``); returns the archive path.

    Under ``torchrun`` every rank calls it with its own device; see the module docstring.
    """
    from torch.utils.tensorboard import SummaryWriter

    device = device or args.device
    rank0, rank, world = distributed.is_main(), distributed.rank(), distributed.world_size()
    args, model, archive, archive_path, dataset, val_pairs = distributed.from_main(lambda: setup(args))
    model = model.to(device)
    objective = loss.Objective.from_args(args)
    val_loader = DataLoader(val_pairs, batch_size=args.batch_size) if rank0 and val_pairs is not None else None
    runs_dir, out_dir = log_dirs(args.name)
    # closed however the run ends: a failed run's logs are deleted (logs_follow_the_network) after its last write;
    # a resumed run's purge_step hides what the interrupted run logged past its last save from TensorBoard
    purge = archive["iteration"] if args.resume else None
    with SummaryWriter(str(runs_dir), purge_step=purge) if rank0 else contextlib.nullcontext() as writer:
        history: dict[str, list[float]] = archive["history"]
        iteration, start_epoch = archive["iteration"], archive["epoch"]
        optimizer, stage = None, None
        average_file = average_path(archive_path)  # --average_from's mean, continued by a resumed run
        average, averaged = None, 0
        if rank0 and args.resume and args.average_from is not None and average_file.is_file():
            average, kept = load_archive(average_file, device)
            averaged = kept["averaged"]["epochs"]
        deadline = time.time() + 60 * args.minutes if args.minutes else math.inf
        if rank0:
            log_arguments(writer, args, iteration)
            print(f"training {args.name}: {len(dataset)} pairs from {args.dataset}, {args.size} levels, "
                  f"epochs {start_epoch}..{args.epochs - 1}, device {device}"
                  + (f", {world} processes of {args.batch_size // world} pairs a step" if world > 1 else ""))
        for epoch in range(start_epoch, args.epochs):
            # each epoch reproducible on its own (exact resume); each rank draws its own augmentations
            seed_everything((args.seed * 100003 + epoch) * world + rank)
            new_stage = stage_for_epoch(epoch, args.size, args.trunc, args.skip, args.fall_time, args.fine_tuning)
            if new_stage != stage:
                stage = new_stage
                params = set_trainable(model, stage)
                # DDP syncs the parameters trainable when it wraps, so wrap per stage; each of them reaches the loss
                # (every encoder level runs; a stage's aligners are at or above its level): no unused parameters
                stepper = distributed.wrap(model, device)
                lr = args.lr * (args.fine_tuning_lr_factor if args.fine_tuning else 1)
                optimizer = torch.optim.Adam(params, lr=lr)
                if archive.get("optimizer") and archive.get("stage") == stage.__dict__:
                    optimizer.load_state_dict(archive["optimizer"])
                    for group in optimizer.param_groups:  # the archived lr, or the new one a resume gives
                        group["lr"] = lr
                if rank0:
                    print(f"epoch {epoch}: level {stage.level}, training aligners {list(stage.train_levels)}")
            pairs = epoch_pairs(len(dataset), args.epoch_size, args.seed * 7919 + epoch, rank, world)
            loader = DataLoader(dataset, batch_size=args.batch_size // world, sampler=pairs,
                                num_workers=args.num_workers, drop_last=len(dataset) >= args.batch_size,
                                persistent_workers=False, pin_memory=torch.device(device).type == "cuda")
            sums, count, started = {}, 0, time.time()
            bar = tqdm(batches(loader), total=len(loader), desc=f"epoch {epoch}", unit="step", leave=False,
                       disable=None if rank0 else True)
            for batch in bar:
                batch = to_device(batch, device)
                cost, log, pictures = loss.pair_loss(stepper, batch, objective, stage.level)
                optimizer.zero_grad(set_to_none=True)
                cost.backward()  # under DDP: gradients averaged over the ranks
                if args.clip:
                    torch.nn.utils.clip_grad_norm_(params, args.clip)
                optimizer.step()
                iteration += 1
                count += 1
                log = distributed.mean_over_ranks(log)  # the whole batch's (each rank's share counts equally)
                for key, value in log.items():
                    sums[key] = sums.get(key, 0.0) + value
                residuals = {f"field/level{level}_residual_px": float(vector_length(residual).mean())
                             for level, residual in pictures.pop("residuals").items()}
                scalars = {**{f"loss/{k}": v for k, v in log.items()}, **distributed.mean_over_ranks(residuals)}
                if rank0:
                    bar.set_postfix(total=f"{log['total']:.4g}", refresh=False)
                    log_step(writer, out_dir, iteration, scalars, pictures, args.vis_interval)
                if out_of_time(deadline):
                    break
            means = {k: v / max(count, 1) for k, v in sums.items()}
            if count and means["data_share"] == 0:  # the cause, before what it does to the loss (the true fields')
                raise UserError(f"epoch {epoch}: no pixel of its pairs held data in both sections once misaligned "
                                f"(--max_shift {args.max_shift:g}, --max_angle {args.max_angle:g} against "
                                f"{args.crop or 'whole'} px sections): nothing trained; lower them")
            if not all(math.isfinite(v) for v in means.values()):  # the same on every rank: all stop
                kept = (f"{archive_path} keeps the last finite epoch: resume with a lower --lr or --clip"
                        if epoch > 0 else "no epoch was saved: start again with a lower --lr or --clip")
                raise UserError(f"epoch {epoch}: the loss is not finite (diverged); {kept}")
            if rank0:
                if val_loader is not None:
                    means.update({f"val_{k}": v for k, v in validate(model, val_loader, args.trunc, device).items()})
                for key, value in means.items():
                    history.setdefault(key, []).append(value)
                    writer.add_scalar(f"epoch/{key}", value, epoch)
                writer.add_scalar("epoch/lr", optimizer.param_groups[0]["lr"], epoch)
                print(f"epoch {epoch} level {stage.level}: " + " ".join(f"{k} {v:.4g}" for k, v in means.items())
                      + f" ({count / max(time.time() - started, 1e-9):.2f} it/s)")
                early = iteration < args.collapse_after or (stage.level == args.size - 1 and epoch < args.fall_time)
                if count and not early and loss.collapsed(means["field_px"], means["similarity"], means["identity"]):
                    message = (f"COLLAPSE: epoch {epoch}: mean |field| {means['field_px']:.3f} px while similarity "
                               f"{means['similarity']:.4g} stays at the unaligned {means['identity']:.4g}; the net "
                               "outputs the zero field. Stop and re-tune (e.g. lower --lambda1, raise --lr).")
                    print(message, file=sys.stderr)
                    writer.add_text("warnings/collapse", message, epoch)
                state = dict(args=vars(args).copy(), epoch=epoch + 1, iteration=iteration, history=history,
                             optimizer=optimizer.state_dict(), stage=stage.__dict__, lineage=archive["lineage"],
                             resumes=archive.get("resumes", []), code_version=code_version(),
                             finished=epoch + 1 >= args.epochs)
                state["summary"] = summary(args, history, iteration, state["resumes"])
                save_archive(archive_path, model, **state)
                archive.update(state)
                if "val_epe" in means and means["val_epe"] < min(history["val_epe"][:-1], default=math.inf):
                    save_archive(best_path(archive_path), model, **state)
                elif "val_epe" not in history:  # --overwrite without held-out data: an old best is not this run's
                    best_path(archive_path).unlink(missing_ok=True)
                if args.average_from is not None and epoch >= args.average_from:
                    average, averaged = add_to_average(average, averaged, model), averaged + 1
                    first = epoch + 1 - averaged  # the mean's first epoch (a resume may give another --average_from)
                    scores = validate(average, val_loader, args.trunc, device) if val_loader is not None else {}
                    save_archive(average_file, average, **{**state, "optimizer": None, "averaged": {
                        "from": first, "epochs": averaged, **{f"val_{k}": v for k, v in scores.items()}}})
                    print(f"{average_file}: the mean of epochs {first}..{epoch}"
                          + (f", val_epe {scores['epe']:.4g}" if scores else ""))
                elif not args.resume and epoch == 0:  # --overwrite: an old mean is not this run's
                    average_file.unlink(missing_ok=True)
            distributed.barrier()  # the other ranks wait while rank 0 validates and saves
            if out_of_time(deadline):
                if rank0:
                    print(f"stopped after --minutes {args.minutes:g}, in epoch {epoch}")
                break
        if rank0:
            log_hparams(writer, args, history, args.epochs - 1)
            print(f"saved {archive_path}")
            if history.get("val_epe"):
                epoch = int(np.argmin(history["val_epe"]))
                print(f"lowest held-out EPE {history['val_epe'][epoch]:.4g} px at epoch {epoch}: "
                      f"{best_path(archive_path)}")
        return archive_path


def main(argv=None) -> Path:
    args = parse_args(argv)
    args.device = str(args.device)
    with distributed.process_group(args.device) as device:
        check_device(device)
        if not distributed.is_main():
            return train(args, device)
        lock = archive_of(check_name(args.name, "experiment name")).with_name(f".{args.name}.lock")
        with held(lock, f"experiment {args.name}"), logs_follow_the_network(args.name, args.overwrite):
            return train(args, device)


if __name__ == "__main__":
    run_main(main)
