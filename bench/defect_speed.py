"""Speed of the defect-mask path: Mpx/s of ``solve.low_pass`` and ``solve.solve_stack`` with and without masks.

    .venv/bin/python -m bench.defect_speed [--sections 8] [--size 512] [--smooth 96] [--threads 1]

On ``--sections`` phantom sections of ``--size`` px with the demo's cracks and folds
(``demo.make_arrays``, seed 7) and random pair fields between neighbours (``solve1``'s
pairs): the low-pass of the pair fields at radius ``--smooth`` (plain, within the pairs'
tissue, and leaving a neighbour's defects out), and the whole stack-wide solve at the
defaults of ``alignment.SolveSettings`` (without masks, with the sections' masks).
Section-pixels per second, the best of 3 runs.
"""
from __future__ import annotations

if not __package__:  # run as a file: our modules are not importable from bench/
    raise SystemExit("run it from the repository root as: python -m bench.defect_speed [flags]")

import argparse
import time

import torch

from alignment import SolveSettings
from helpers import run_main
from solve import low_pass, neighbour_pairs, pair_defects, solve_stack


def best_seconds(work, repeats: int = 3) -> float:
    """The shortest wall time (s) of ``repeats`` calls of ``work()``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", type=int, default=8)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--smooth", type=int, default=96, help="the low-pass radius in px (align.py --smooth)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    if args.sections < 2 or args.size < 64 or args.smooth < 0 or args.threads < 1:
        p.error("--sections must be >= 2, --size >= 64, --smooth >= 0 and --threads >= 1")
    import demo

    torch.set_num_threads(args.threads)
    defects = torch.from_numpy(demo.make_arrays((args.sections, args.size, args.size), 48, 7, "default",
                                                phantom_seed=1007)["defects"][:, 0])
    pairs = neighbour_pairs(args.sections, 1)
    fields = torch.randn(len(pairs), 2, args.size, args.size, generator=torch.Generator().manual_seed(0)) + 3
    union = torch.stack([pair_defects(f, defects[s], defects[t]) for (s, t), f in zip(pairs, fields)])
    source = torch.stack([pair_defects(f, defects[s], None) for (s, _), f in zip(pairs, fields)])
    settings = SolveSettings()
    solve = dict(pull=settings.pull, robust=settings.robust, smooth=args.smooth, detail_pull=settings.detail_pull)
    pair_px, section_px = len(pairs) * args.size ** 2 / 1e6, args.sections * args.size ** 2 / 1e6
    cases = {"low_pass, pair fields, no masks": (pair_px, lambda: low_pass(fields, args.smooth)),
             "low_pass, within the pairs' tissue": (pair_px, lambda: low_pass(fields, args.smooth, union)),
             "low_pass, the source's tissue, the target's defects left out":
                 (pair_px, lambda: low_pass(fields, args.smooth, source, union > 0)),
             "solve_stack, no masks": (section_px, lambda: solve_stack(args.sections, pairs, fields, **solve)),
             "solve_stack, the sections' masks":
                 (section_px, lambda: solve_stack(args.sections, pairs, fields, **solve, defects=defects))}
    print(f"{args.sections} sections of {args.size} px ({len(pairs)} pairs), defects on "
          f"{float((defects > 0).float().mean()):.2%} of pixels, smooth {args.smooth}, {args.threads} threads")
    rates = {}
    for name, (mpx, work) in cases.items():
        rates[name] = mpx / best_seconds(work)
        print(f"  {name}: {rates[name]:.2f} Mpx/s")
    return rates


if __name__ == "__main__":
    run_main(main)
