"""The whole-section pre-alignment's gate, on raw neighbour pairs: how often the wide search runs, is taken, warns.

    python -m bench.prealign_gate --isbi $ISBI_DIR --snemi $SNEMI_DIR --seed 0 1 2

For every pair of neighbours (each way, as ``--solve`` with one neighbour pairs
them) of the demo's held-out sections 70..99 (512 px), ISBI 2012 sections 0..29
(``--isbi``: 416 px, re-registered), SNEMI3D sections 60..99 (``--snemi``: 512 px)
and the +-40 px phantom (``bench.large_misalignment``'s, 12 sections of 512 px),
each misaligned by draw ``--seed`` as ``bench.align_quality`` does (the demo has
one draw), ``alignment._prealignment`` runs on the normalised pair as
``alignment.pair_field`` does: a line per stack gives how many pairs ran the wide
search (``shifts.rigid_search``), took its result over the whole-pixel shift, and
warned (``alignment.PoorMatchWarning``), and the pre-alignment's mean CPU seconds
per pair. Last, ``alignment.pair_field``'s median CPU seconds on one 512 px demo
pair (``--archive``, align.py's defaults) over ``--repeats`` runs. CPU seconds:
on a shared machine they are far steadier than wall time; run it with one
thread (``OMP_NUM_THREADS=1``), where they are the wall time of an idle machine.
"""
from __future__ import annotations

if not __package__:  # run as a file: our modules are not importable from bench/
    raise SystemExit("run it from the repository root as: python -m bench.prealign_gate [flags]")

import argparse
import time
import warnings

import numpy as np
import torch

import alignment
from bench.align_quality import demo_stack, real_stack
from bench.large_misalignment import misaligned_stack
from helpers import HelpFormatter, folder, normalise, random_seed, run_main, to_tensor


def stacks(args):
    """``(name, raw [Z, H, W] uint8)`` of each stack the flags ask for."""
    yield "demo 70..99", demo_stack(70, 30, 512)["raw"]
    for seed in args.seed:
        if args.isbi:
            yield f"ISBI 0..29 seed {seed}", real_stack(args.isbi, 0, 30, 416, seed, reregister=True)["raw"]
        if args.snemi:
            yield f"SNEMI3D 60..99 seed {seed}", real_stack(args.snemi, 60, 40, 512, seed)["raw"]
        yield f"+-40 px phantom seed {seed}", misaligned_stack("default", 12, 512, seed, 40.0, 0.03)["raw"]


def gate_counts(raw: np.ndarray, reach: int) -> dict[str, float]:
    """Over the neighbour pairs of ``raw`` ``[Z, H, W]`` uint8, each way: ``pairs``, how many ran the wide search
    (``searched``), took its result (``taken``) and warned (``warned``), and the mean CPU ``seconds`` per pair."""
    searches, real_search = [], alignment.rigid_search
    alignment.rigid_search = lambda *a, **k: searches.append(1) or real_search(*a, **k)
    counts = dict(pairs=0, taken=0, warned=0, seconds=0.0)
    try:
        for z in range(len(raw) - 1):
            for a, b in ((z + 1, z), (z, z + 1)):
                source, target = (normalise(to_tensor(raw[i]))[0] for i in (a, b))
                start = time.process_time()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", alignment.PoorMatchWarning)
                    field, _ = alignment._prealignment(source, target, reach)
                counts["seconds"] += time.process_time() - start
                counts["pairs"] += 1
                counts["taken"] += field.shape[-1] > 1
                counts["warned"] += any(issubclass(w.category, alignment.PoorMatchWarning) for w in caught)
    finally:
        alignment.rigid_search = real_search
    return {**counts, "searched": len(searches), "seconds": counts["seconds"] / max(counts["pairs"], 1)}


def pair_seconds(archive: str, repeats: int) -> float:
    """``alignment.pair_field``'s median CPU seconds on the demo's 512 px sections 71 onto 70, align.py's defaults."""
    from models.archive import load_archive

    model = alignment.for_inference(load_archive(archive)[0])
    raw = demo_stack(70, 2, 512)["raw"]
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first run warms up
            start = time.process_time()
            alignment.pair_field(model, raw[1], raw[0])
            times.append(time.process_time() - start)
    return float(np.median(times[1:]))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--isbi", type=folder, help="folder of ISBI 2012's training sections (skipped if not given)")
    p.add_argument("--snemi", type=folder, help="folder of SNEMI3D's training sections (skipped if not given)")
    p.add_argument("--seed", type=random_seed, nargs="+", default=[0], help="one draw of the misalignment per seed")
    p.add_argument("--prealign", type=int, default=alignment.PairSettings().prealign, help="align.py's")
    p.add_argument("--archive", default="pt/demo.pt", help="the network pair_field is timed with")
    p.add_argument("--repeats", type=int, default=5, help="pair_field runs timed (0: none)")
    args = p.parse_args(argv)
    rows = {}
    for name, raw in stacks(args):
        rows[name] = row = gate_counts(raw, args.prealign)
        print(f"{name}: of {row['pairs']} pairs {row['searched']} searched wide, {row['taken']} took it, "
              f"{row['warned']} warned; pre-alignment {row['seconds']:.3f} CPU s per pair", flush=True)
    if args.repeats:
        rows["pair_field_s"] = pair_seconds(args.archive, args.repeats)
        print(f"pair_field on a 512 px demo pair: {rows['pair_field_s']:.3f} CPU s (median of {args.repeats}, "
              f"{torch.get_num_threads()} threads)")
    return rows


if __name__ == "__main__":
    run_main(main)
