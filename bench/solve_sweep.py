"""The stack-wide solve's settings, swept: the network's pair fields are computed once, then solved many ways.

    .venv/bin/python bench/solve_sweep.py --archive pt/real_tissue.pt --real ../shared/data/snemi3d-train \\
        --z_start 60 --sections 40 --neighbours 1 2 --pull 0.03 0.1 0.3 --smooth 0 96 192 --detail_pull 1 3 inf

The same held-out stack as ``bench/align_quality.py`` (the demo's test
sections, or ``--real DIR`` misaligned with known fields). Each raw section is
paired with its ``max(--neighbours)`` nearest sections on each side (both
directions, ``alignment.pair_field`` without smoothing); every combination of
the settings then solves them (``alignment.solve_pairs``) and is scored as
align_quality scores ``--ours solveK``, sorted by the median EPE far from
defects. Only the network's time is shared, so this is how to choose
``align.py --solve``'s flags for a new kind of data without running the
network once per setting.

It first says how good the network's part is: for the pairs of neighbours,
the median end-point error of the pair fields against the true relative
fields (and of the zero field), and the least-squares slope of the pair fields
on the true ones (1: the network recovers all of the motion; below 1: it
hedges toward zero), per smoothing radius; and what that low-pass alone costs:
the median EPE far from defects of the low-passed true fields (the floor of
any setting with that radius).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import evaluate  # noqa: E402
from align_quality import COLUMNS, demo_stack, real_stack, registration_check  # noqa: E402
from alignment import pair_field, solve_pairs  # noqa: E402
from helpers import UserError, compose, in_frame_of, invert_field, run_main  # noqa: E402
from models.archive import load_archive  # noqa: E402
from solve import low_pass, neighbour_pairs  # noqa: E402


def pair_accuracy(raw, truth, pairs, fields) -> dict[str, float]:
    """How well pair fields ``[E, 2, H, W]`` (px) match the truth, over the pairs of neighbours.

    raw: uint8 ``[Z, H, W]``; truth ``[Z, 2, H, W]``: the fields that pull each raw
    section into one common frame (any: it cancels), so pair ``(s, t)`` truly is
    ``compose(truth_s, invert(truth_t))``. Medians over the pairs of each pair's
    median EPE (where both sections show tissue), of the zero field's, and of the
    least-squares slope of the pair field on the true one.
    """
    epe, zero, slope = [], [], []
    for (s, t), field in zip(pairs, fields):
        if abs(s - t) != 1:
            continue
        true = compose(truth[s:s + 1], invert_field(truth[t:t + 1]))[0]
        valid = torch.from_numpy((raw[s] > 0) & (raw[t] > 0))
        epe.append(float((field - true).norm(dim=0)[valid].median()))
        zero.append(float(true.norm(dim=0)[valid].median()))
        slope.append(float((field * true).sum(0)[valid].sum() / (true * true).sum(0)[valid].sum()))
    return {"pair_epe": float(np.median(epe)), "pair_epe_zero_field": float(np.median(zero)),
            "slope": float(np.median(slope))}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archive", required=True, help="our network")
    p.add_argument("--real", help="a folder of registered real sections (as in align_quality.py)")
    p.add_argument("--seed", type=int, default=0, help="as in align_quality.py")
    p.add_argument("--reregister", action="store_true", help="as in align_quality.py")
    p.add_argument("--z_start", type=int, default=70)
    p.add_argument("--sections", type=int, default=30)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--neighbours", type=int, nargs="+", default=[1], help="raw neighbours on each side")
    p.add_argument("--pull", type=float, nargs="+", default=[0.03], help="weight of the pull toward zero")
    p.add_argument("--smooth", type=int, nargs="+", default=[0, 96], help="low-pass radii (px) of the pair fields")
    p.add_argument("--detail_pull", type=float, nargs="+", default=[10.0],
                   help="pulls on the detail the low-pass removes (inf = drop it)")
    p.add_argument("--prealign", type=int, default=32, help="px reach of the pre-alignment shift (align.py's)")
    p.add_argument("--robust", type=float, nargs="+", default=[4.0], help="robust scale in px (0 = off)")
    p.add_argument("--best", type=int, default=15, help="rows to print")
    p.add_argument("--cache", help="keep the pair fields in this file and reuse them when the stack and network match")
    args = p.parse_args(argv)
    if args.real and not Path(args.real).is_dir():
        print(f"skipped: {args.real} is not a folder")
        return {}
    if min(args.neighbours) < 1:
        raise UserError("--neighbours must be at least 1")
    stack = (real_stack(args.real, args.z_start, args.sections, args.size, args.seed, args.reregister) if args.real
             else demo_stack(args.z_start, args.sections, args.size))
    raw = stack["raw"]
    if args.real:
        print(registration_check(stack["content_offsets"]))
    truth = in_frame_of(torch.from_numpy(stack["truth"]))  # [Z, 2, H, W] px, in the first section's frame
    model, _ = load_archive(args.archive)
    model.eval()

    pairs = neighbour_pairs(len(raw), max(args.neighbours))
    key = [str(Path(args.archive).resolve()), args.real, args.seed, args.reregister, args.z_start, args.sections,
           args.size, args.prealign, pairs]
    cached = torch.load(args.cache) if args.cache and Path(args.cache).is_file() else {}
    if cached.get("key") == key:
        fields = cached["fields"]
    else:
        start = time.time()
        fields = torch.stack([pair_field(model, raw[s], raw[t], prealign=args.prealign)
                              for s, t in tqdm(pairs, desc="pairs", unit="pair")])
        print(f"{len(pairs)} pair fields in {time.time() - start:.0f} s")
        if args.cache:
            torch.save({"key": key, "fields": fields}, args.cache)

    defects = evaluate.defects_in_output_frame(stack["defects"], truth)
    for smooth in args.smooth:
        accuracy = pair_accuracy(raw, truth, pairs, low_pass(fields, smooth))
        floor = evaluate.epe(low_pass(truth, smooth), truth, defects, raw > 0)["far_median"]
        print(f"pair fields, smooth {smooth}: median EPE {accuracy['pair_epe']:.2f} px "
              f"(zero field {accuracy['pair_epe_zero_field']:.2f}), slope on the truth {accuracy['slope']:.2f}; "
              f"the low-pass alone costs {floor:.2f} px far on the true fields")

    rows = {}
    settings = [(n, smooth, pull, detail, robust) for n, smooth, pull, detail, robust in itertools.product(
        args.neighbours, args.smooth, args.pull, args.detail_pull, args.robust) if smooth or detail == args.detail_pull[0]]
    for n, smooth, pull, detail, robust in tqdm(settings, desc="settings"):
        keep = [i for i, (s, t) in enumerate(pairs) if abs(s - t) <= n]
        aligned, solved = solve_pairs(raw, [pairs[i] for i in keep], fields[keep], pull, robust or None, (),
                                      smooth, detail)
        name = f"solve{n} smooth {smooth}{f' detail {detail:g}' if smooth else ''} pull {pull:g} robust {robust:g}"
        rows[name] = evaluate.score(aligned, solved.numpy(), truth, stack["defects"])
    rows = dict(sorted(rows.items(), key=lambda item: item[1]["far_median"])[:args.best])
    evaluate.print_table(rows, [c for c in COLUMNS if c not in ("oracle_cpc", "mpx_per_s")])
    return rows


if __name__ == "__main__":
    run_main(main)
