"""Precision and recall of the defect detector (``detect_defects.py``) on held-out sections.

    python -m bench.detect_quality --snemi $SNEMI_DIR --isbi $ISBI_DIR

Held-out stacks, none seen in training (``train_detector.py``): the demo's test sections 70..99
(its one draw), and three draws (misalignment seeds 0, 1, 2; training used 1000 on) of a fresh
``--phantom default`` stack (``align_quality.phantom_stack``: held-out tissue), of SNEMI3D sections
60..99 and of ISBI 2012 sections 20..29 (``align_quality.real_stack``: registered sections damaged
and misaligned exactly as the demo is, cracks and folds at their usual rates). Per kind (crack,
fold): pixel precision (found pixels that are truly of that kind) and recall (true pixels found),
and the tolerant versions, where a found pixel within ``--tolerance`` px of a true one of the kind
counts as right and a true pixel within that distance of a found one as found.
"""
from __future__ import annotations

if not __package__:  # run as a file: our modules are not importable from bench/
    raise SystemExit("run it from the repository root as: python -m bench.detect_quality [flags]")

import argparse
import time

import numpy as np
import torch

from bench.align_quality import demo_stack, phantom_stack, real_stack
from detect_defects import ARCHIVE, detect, load_detector
from helpers import HelpFormatter, UserError, finite_float, folder, run_main
from masks import distance_to_defect
from misalign import CRACK, FOLD

KINDS = {"crack": CRACK, "fold": FOLD}


def match_counts(found: np.ndarray, truth: np.ndarray, kind: int, tolerance: float) -> np.ndarray:
    """``[found, found right, true, true found, found near a true, true near a found]`` pixel counts of one ``kind``
    (``misalign.CRACK`` or ``FOLD``) in defect maps ``found`` and ``truth`` (uint8, same shape ``[..., H, W]``);
    "near" is within ``tolerance`` px (Euclidean)."""
    f, t = torch.from_numpy(found == kind), torch.from_numpy(truth == kind)
    near_t = distance_to_defect(t, tolerance + 1) <= tolerance
    near_f = distance_to_defect(f, tolerance + 1) <= tolerance
    return np.array([f.sum(), (f & t).sum(), t.sum(), (t & f).sum(), (f & near_t).sum(), (t & near_f).sum()],
                    dtype=np.int64)


def scores(counts: np.ndarray) -> dict[str, float]:
    """Precision, recall and their tolerant versions from ``match_counts`` (summed); NaN where nothing to divide."""
    n_found, right, n_true, hit, right_near, hit_near = counts.astype(float)
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    return {"precision": ratio(right, n_found), "recall": ratio(hit, n_true),
            "precision_tol": ratio(right_near, n_found), "recall_tol": ratio(hit_near, n_true)}


def stacks(args):
    """``(name, draw, stack)`` of every held-out stack (``stack``: align_quality's dict, ``raw`` and ``defects``)."""
    yield "demo 70..99", "-", demo_stack(70, 30, 512)
    for seed in args.seeds:
        yield "phantom default, 10 sections", seed, phantom_stack("default", 10, 512, seed)
    for name, folder, z_start, count in (("SNEMI3D 60..99", args.snemi, 60, 40), ("ISBI 2012 20..29", args.isbi, 20, 10)):
        if folder:
            for seed in args.seeds:
                yield name, seed, real_stack(folder, z_start, count, 512, seed)


def fmt(value: float) -> str:
    return "–" if np.isnan(value) else f"{value:.3f}"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--snemi", type=folder, help="folder of the registered SNEMI3D sections (held out: 60..99)")
    p.add_argument("--isbi", type=folder, help="folder of the registered ISBI 2012 sections (held out: 20..29)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="misalignment draws")
    p.add_argument("--tolerance", type=finite_float, default=3.0, help="px: the tolerant scores' reach")
    p.add_argument("--archive", default=str(ARCHIVE))
    args = p.parse_args(argv)
    if args.tolerance < 0:
        raise UserError(f"--tolerance {args.tolerance:g}: a reach in px, >= 0")
    net = load_detector(args.archive)
    header = ("| stack | draw | sections with crack / fold | crack P / R | crack P / R (±3 px) | fold P / R | "
              "fold P / R (±3 px) | Mpx/s |")
    print(header.replace("±3", f"±{args.tolerance:g}"))
    print("|" + "---|" * (header.count("|") - 1))
    totals: dict[str, dict[str, np.ndarray]] = {}
    for name, draw, stack in stacks(args):
        start = time.time()
        found = detect(net, torch.from_numpy(stack["raw"])[:, None])[:, 0].numpy()
        mpx = stack["raw"].size / 1e6 / (time.time() - start)
        truth = stack["defects"]
        row = {kind: match_counts(found, truth, value, args.tolerance) for kind, value in KINDS.items()}
        for kind in KINDS:
            totals.setdefault(name, {}).setdefault(kind, np.zeros(6, np.int64))
            totals[name][kind] += row[kind]
        with_kind = [int((truth == value).any(axis=(1, 2)).sum()) for value in KINDS.values()]
        print(table_row(name, str(draw), f"{with_kind[0]} / {with_kind[1]} of {len(truth)}", row, f"{mpx:.2f}"))
    for name, row in totals.items():
        print(table_row(f"**{name}**", "all", "", row, ""))
    return {name: {kind: scores(c) for kind, c in row.items()} for name, row in totals.items()}


def table_row(name: str, draw: str, count: str, row: dict[str, np.ndarray], speed: str) -> str:
    cells = [name, draw, count]
    for kind in KINDS:
        s = scores(row[kind])
        cells += [f"{fmt(s['precision'])} / {fmt(s['recall'])}", f"{fmt(s['precision_tol'])} / {fmt(s['recall_tol'])}"]
    return "| " + " | ".join(cells + [speed]) + " |"


if __name__ == "__main__":
    run_main(main)
