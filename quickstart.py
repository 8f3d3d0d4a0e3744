"""The main job on the embedded demo data, end to end, offline (README command 1).

1. build the demo volume and its train / test datasets (once; cached in data/);
2. a short training run from scratch (a new pt/quickstart_<time>.pt, a few minutes);
3. align the held-out demo sections with the shipped network ``pt/demo.pt`` (the stack-wide solve
   over raw neighbour pairs, low-passed: ``align.py --solve --smooth 96``, the demo's best setting);
4. print the before / after neighbour correlation (CPC) and end-point error (EPE).

    .venv/bin/python quickstart.py [--train_epochs 3] [--archive pt/demo.pt]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import demo
import evaluate
import train
import volume
from helpers import UserError, run_main
from models.archive import read_archive


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archive", default="pt/demo.pt", help="network that aligns the demo test stack")
    p.add_argument("--train_epochs", type=int, default=3, help="epochs of the short training run (0 = skip)")
    args = p.parse_args(argv)
    if args.train_epochs < 0:
        p.error(f"--train_epochs must be >= 0 (got {args.train_epochs})")
    if args.archive == "pt/demo.pt" and not Path(args.archive).is_file():
        raise UserError(f"{args.archive} is missing: it ships with the repository (git checkout pt/demo.pt)")
    read_archive(args.archive)  # a missing or corrupt --archive says so now, not after the training

    print("== 1. demo volume and datasets")
    demo.ensure_demo()
    for split in ("train", "test"):
        print(f"{split}: {train.resolve_dataset('demo', split=split)}")

    if args.train_epochs:
        name = time.strftime("quickstart_%Y%m%d_%H%M%S")
        print(f"\n== 2. a short training run: pt/{name}.pt (runs/{name} for TensorBoard)")
        trained = train.main(["--epochs", str(args.train_epochs), "--epoch_size", "64", "--crop", "128",
                              "--fall_time", "0", "--lambda_gt", "1", "--lr", "0.001", "--vis_interval", "20",
                              "--val_pairs", "16", name])
        print(short_run_note(read_archive(trained)["history"], args.train_epochs, args.archive))

    z_start, z_stop = demo.TEST_RANGE
    dest = volume.data_dir() / f"demo_aligned_{Path(args.archive).stem}_solve_smooth96"
    print(f"\n== 3. align the held-out sections {z_start}..{z_stop - 1} with {args.archive} into {dest}")
    import align
    align.main(["--archive", args.archive, "--source", "demo", "--dest", str(dest), "--z_start", str(z_start),
                "--z_stop", str(z_stop), "--solve", "--smooth", "96"])

    print("\n== 4. before / after (EPE in px against the ground truth: in the first section's frame; *_common and "
          "*_excess in a common frame)")
    return evaluate.main(["--aligned", str(dest), "--raw", "demo", "--truth", "demo", "--z_start", str(z_start),
                          "--z_stop", str(z_stop), "--plots", str(dest / "plots")])


def short_run_note(history: dict[str, list[float]], epochs: int, archive: str) -> str:
    """What the short training run shows, from its ``history`` (the archive's: ``val_epe`` and
    ``val_epe_zero_field`` per epoch, px): that training runs, not a network that aligns."""
    return (f"({epochs} epochs from scratch show that training runs, not a network: held-out EPE "
            f"{min(history['val_epe']):.2f} px against the zero field's {history['val_epe_zero_field'][-1]:.2f}. "
            f"Step 3 aligns with {archive}, a trained network: `python net_hist.py {archive}` prints its own)")


if __name__ == "__main__":
    run_main(main)
