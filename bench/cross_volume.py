"""Cross-volume evaluation: each network on a real volume it was not trained on, several draws, both frames.

    python -m bench.cross_volume --test isbi=$ISBI_DIR:pt/real_tissue.pt [--test snemi=$SNEMI_DIR:pt/fly_tissue.pt] \
        [--seed 0 1 2] [--classical affine patch64] [--adapt 0 5 15] [--refine 192]

Each ``--test NAME=FOLDER:ARCHIVE`` aligns draws of the registered sections in FOLDER, misaligned with
known fields as ``bench.align_quality --real`` does (its stack shape for NAME: ``VOLUMES``), with the
network ARCHIVE (``--solve --smooth 192 --refine 192``, the real-tissue setting; ``--refine`` sets the
second pass's radius, 0 for none) and, with ``--classical``, the classical aligners at those settings.
Per draw it prints EPE far in the first section's frame and in a common frame as ratios to no
alignment's, the drift beside no alignment's and the CPC beside the oracle's, and whether the draw
meets the bar of issue 19: ratio <= 0.6 first frame and <= 0.45 common, drift below no alignment's,
CPC below the oracle's. ``--adapt 0 5`` compares the network as it is with a copy adapted for 5
minutes to each misaligned stack (``adapt.py``, as ``align.py --adapt``: from the misaligned raw
sections alone, never their true fields).
"""
from __future__ import annotations

if not __package__:  # run as a file: our modules are not importable from bench/
    raise SystemExit("run it from the repository root as: python -m bench.cross_volume [flags]")

import argparse
from pathlib import Path

import numpy as np

from bench import align_quality
from bench.baselines import BASELINES
from helpers import HelpFormatter, UserError, finite_float, random_seed, run_main

VOLUMES = {"isbi": ["--z_start", "0", "--sections", "30", "--size", "416", "--reregister"],  # ISBI 2012 (fly)
           "snemi": ["--z_start", "60", "--sections", "40"]}  # SNEMI3D's last 40 sections (mouse)
BAR = {"first": 0.6, "common": 0.45}  # EPE far ratio to no alignment's, at most


def parse_test(text: str) -> tuple[str, str, str]:
    """``NAME=FOLDER:ARCHIVE`` -> ``(NAME, FOLDER, ARCHIVE)``; NAME one of ``VOLUMES``."""
    name, _, rest = text.partition("=")
    folder, _, archive = rest.rpartition(":")
    if name not in VOLUMES or not folder or not archive:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=FOLDER:ARCHIVE, NAME one of {', '.join(VOLUMES)}")
    return name, folder, archive


def ratios(rows: dict[str, dict]) -> dict[str, dict]:
    """Per method of ``rows`` (``bench.align_quality.main``'s, with its ``no alignment`` row): EPE far ratios to no
    alignment's in both frames, drift, the CPC beside the oracle's, and whether the draw meets ``BAR``."""
    none = rows["no alignment"]
    out = {}
    for method, row in rows.items():
        if method in ("no alignment", "oracle (ground truth)"):
            continue
        first, common = row["far_median"] / none["far_median"], row["far_common"] / none["far_common"]
        out[method] = {"first": first, "common": common, "drift": row["drift_mean"],
                       "drift_none": none["drift_mean"], "cpc": row["cpc_mean"], "oracle_cpc": row["oracle_cpc"],
                       "meets": bool(first <= BAR["first"] and common <= BAR["common"]
                                     and row["drift_mean"] < none["drift_mean"]
                                     and row["cpc_mean"] < row["oracle_cpc"])}
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--test", type=parse_test, action="append", required=True,
                   help="NAME=FOLDER:ARCHIVE: the volume NAME (isbi, snemi) in FOLDER, aligned by ARCHIVE")
    p.add_argument("--seed", type=random_seed, nargs="+", default=[0, 1, 2], help="one draw per seed")
    p.add_argument("--classical", nargs="*", default=None, metavar="SETTING",
                   choices=[setting for settings in BASELINES.values() for setting in settings],
                   help="also these settings of the classical aligners (bench.align_quality --settings)")
    p.add_argument("--adapt", type=finite_float, nargs="+", default=[0.0],
                   help="minutes each network is first adapted to the misaligned raw stack (align.py --adapt; 0 = as "
                        "it is); several to compare")
    p.add_argument("--refine", type=int, default=192,
                   help="align.py --refine for the networks: the second pass's low-pass radius in px (0: one pass)")
    p.add_argument("--shape", help=argparse.SUPPRESS)  # tests: flags that replace VOLUMES' stack shape
    args = p.parse_args(argv)
    results = []
    for name, folder, archive in args.test:
        if not Path(folder).is_dir() or not Path(archive).is_file():
            raise UserError(f"--test {name}: {folder} is not a folder or {archive} is not a file")
        for seed in args.seed:
            shape = args.shape.split() if args.shape else VOLUMES[name]
            quality = ["--real", folder, *shape, "--seed", str(seed), "--archive", archive, "--ours", "solve1",
                       "--smooth", "192", "--refine", str(args.refine), "--adapt", *map(str, args.adapt),
                       *(["--settings", *args.classical] if args.classical is not None else ["--methods", "none"])]
            for method, r in ratios(align_quality.main(quality)).items():
                results.append({"volume": name, "seed": seed, "method": method, **r})
    print(f"\n{'volume':7s} {'draw':>4s}  {'method':45s} {'far/none':>8s} {'common/none':>11s} {'drift (none)':>14s} "
          f"{'CPC (oracle)':>14s}  bar")
    for r in results:
        print(f"{r['volume']:7s} {r['seed']:4d}  {r['method'][:45]:45s} {r['first']:8.3f} {r['common']:11.3f} "
              f"{r['drift']:6.2f} ({r['drift_none']:5.2f}) {r['cpc']:6.3f} ({r['oracle_cpc']:5.3f})  "
              f"{'met' if r['meets'] else 'not met'}")
    for method in dict.fromkeys(r["method"] for r in results):
        mine = [r for r in results if r["method"] == method]
        print(f"{method}: mean far/none {np.mean([r['first'] for r in mine]):.3f}, common/none "
              f"{np.mean([r['common'] for r in mine]):.3f}; bar met on {sum(r['meets'] for r in mine)} of "
              f"{len(mine)} draws")
    return results


if __name__ == "__main__":
    run_main(main)
