"""Which training carries over to real tissue: self-supervised, supervised or mixed; which smoothness and similarity penalty.

    .venv/bin/python -m bench.train_ablation --dataset data/snemi_train_mip0.h5 \\
        --val_dataset data/snemi_test_mip0.h5 --real ../shared/data/snemi3d-train --z_start 60 --sections 30

Every variant fine-tunes the same starting network (``--start``, by default the
demo network, which knows the phantom but has never seen real tissue) with
train.py for the same number of steps, on the same data, seed and augmentation
(registered sections misaligned with known fields, as ``--registered`` datasets
are), and differs from the mixed baseline (similarity + ``--lambda1``
smoothness + ``--lambda_gt`` supervised end-point error) only in its loss:

- ``supervised``: end-point error against the known field only (``--lambda0 0``);
- ``self-supervised, SIM, SMOOTH``: similarity + smoothness, no known field
  (``--lambda_gt 0``), once per smoothness penalty (with MSE) and per
  similarity penalty (with ``jacob``): the seed's two open questions, asked
  where the penalties alone decide what the net learns.

Each is then scored twice: ``val_epe`` on held-out pairs (train.py's own
validation, mean px), and on ``bench/align_quality.py``'s benchmark (``--real
DIR``: held-out registered sections misaligned with known fields, cracks and
folds; aligned with the stack-wide solve) beside no alignment and the oracle.
Runs live in ``--out`` (``pt/``, ``runs/``, ``out/`` of each variant); a
finished variant is not trained again.
"""
from __future__ import annotations

if not __package__:  # run as a file: our modules are not importable from bench/
    raise SystemExit("run it from the repository root as: python -m bench.train_ablation [flags]")

import argparse
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from bench import align_quality
import evaluate
from helpers import UserError, folder, run_main
from models.archive import load_archive

VARIANTS = {  # name -> train.py flags on top of the mixed baseline
    "mixed": [],
    "supervised": ["--lambda0", "0"],
    **{f"self-supervised, mse, {smooth}": ["--lambda_gt", "0", "--smoothness", smooth]
       for smooth in ("jacob", "cjacob", "lap", "tv", "rigidity")},
    "self-supervised, ncc, jacob": ["--lambda_gt", "0", "--similarity", "ncc"],
}


def schedule(steps: int, most: int = 50) -> tuple[int, int]:
    """``(steps per epoch, epochs)`` of about ``steps`` training steps in all: epochs of ``most`` steps (one of
    ``steps`` when fewer), as many as come nearest."""
    per_epoch = min(steps, most)
    return per_epoch, max(1, round(steps / per_epoch))


def train_flags(args, variant: str) -> list[str]:
    """train.py's command line for one variant (run from the variant's own folder)."""
    per_epoch, epochs = schedule(args.steps)
    return ["--dataset", str(Path(args.dataset).resolve()), "--val_dataset", str(Path(args.val_dataset).resolve()),
            "--state_archive", str(Path(args.start).resolve()), "--crop", str(args.crop), "--batch_size", "8",
            "--epoch_size", str(8 * per_epoch), "--epochs", str(epochs),
            "--fall_time", "0", "--lr", "0.0005", "--clip", "1", "--lambda1", "0.1", "--lambda_gt", "1",
            "--max_shift", "16", "--p_jitter", "1", "--max_angle", "0.02", "--elastic", "2.5",
            "--val_pairs", "16", "--num_workers", "0", "--vis_interval", "100000", "--seed", "0",
            *VARIANTS[variant], slug(variant)]


def slug(variant: str) -> str:
    """The variant's experiment name: its folder and archive name (``pt/SLUG.pt``)."""
    return variant.replace(", ", "_").replace(" ", "_")


def train_variant(args, variant: str) -> Path:
    """The variant's finished archive, training it first unless an earlier run finished it."""
    run_folder = Path(args.out) / slug(variant)
    archive = run_folder / "pt" / f"{slug(variant)}.pt"
    if archive.is_file() and load_archive(archive)[1].get("finished"):
        return archive
    run_folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(ROOT / "train.py"), *train_flags(args, variant), "--overwrite"]
    print(f"training {variant}: {' '.join(command[2:])}", flush=True)
    with open(run_folder / "train.log", "w") as log:
        if subprocess.run(command, cwd=run_folder, stdout=log, stderr=subprocess.STDOUT).returncode:
            raise UserError(f"training {variant} failed: see {run_folder / 'train.log'}")
    return archive


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, help="training HDF5 with known fields (gen_stack.py --registered)")
    p.add_argument("--val_dataset", required=True, help="held-out HDF5 of the same kind")
    p.add_argument("--real", type=folder,
                   help="folder of registered sections for the alignment benchmark (none: no alignment benchmark)")
    p.add_argument("--z_start", type=int, default=60, help="first held-out section of --real")
    p.add_argument("--sections", type=int, default=30)
    p.add_argument("--size", type=int, default=384, help="section size (px) in the alignment benchmark")
    p.add_argument("--steps", type=int, default=300, help="training steps (batches of 8) per variant: epochs of 50 "
                   "(one of fewer), as many as come nearest (the table says how many ran)")
    p.add_argument("--start", default=str(ROOT / "pt" / "demo.pt"), help="archive every variant starts from")
    p.add_argument("--crop", type=int, default=128, help="training crop (px)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT")
    p.add_argument("--out", default="out/train_ablation")
    args = p.parse_args(argv)
    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: must be >= 1")
    for path in (args.dataset, args.val_dataset):
        if not Path(path).is_file():
            raise UserError(f"{path} does not exist (make it with gen_stack.py --registered)")

    archives = {variant: train_variant(args, variant) for variant in args.variants}
    rows = {}
    for variant, archive in archives.items():
        history = load_archive(archive)[1]["history"]
        rows[variant] = {"val_epe": history["val_epe"][-1], "val_epe_zero_field": history["val_epe_zero_field"][-1],
                         "field_px": history["field_px"][-1]}
    if args.real:
        scored = align_quality.main(["--real", args.real, "--z_start", str(args.z_start), "--sections",
                                     str(args.sections), "--size", str(args.size), "--ours", "solve1",
                                     "--smooth", "96", "--methods", "none",
                                     "--archive", *map(str, archives.values())])
        for name in ("no alignment", "oracle (ground truth)"):
            rows[name] = scored.get(name, {})
        for variant in archives:
            rows[variant].update(scored.get(f"ours ({slug(variant)}, solve1, smooth 96)", {}))
    print(f"\n{math.prod(schedule(args.steps))} steps each from {Path(args.start).name}, {args.crop} px crops; "
          f"val_epe = mean px on held-out pairs; alignment: --solve --smooth 96 on {args.real or '(no --real)'}")
    evaluate.print_table(rows, ["val_epe", "val_epe_zero_field", "field_px", "far_median", "near_median",
                                "drift_mean", "cpc_mean", "oracle_cpc", "foldovers"])
    return rows


if __name__ == "__main__":
    run_main(main)
