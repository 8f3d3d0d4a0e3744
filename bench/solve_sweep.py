"""The stack-wide solve's settings, swept: the network's pair fields are computed once, then solved many ways.

    .venv/bin/python -m bench.solve_sweep --archive pt/real_tissue.pt --real ../shared/data/snemi3d-train \\
        --z_start 60 --sections 40 --seed 0 1 2 --pull 0.01 0.03 0.1 --smooth 192 --detail_pull 3 5 10 inf

The same held-out stack as ``bench/align_quality.py`` (the demo's test
sections, or ``--real DIR`` or ``--phantom KIND`` misaligned with known fields,
once per ``--seed``).
Each raw section is paired with its ``max(--neighbours)`` nearest sections on
each side (both directions, ``alignment.pair_field`` without smoothing; with
``--defects``, a section that ``--pieces`` placed also with the one further,
as ``alignment.solved_pairs`` pairs them for ``align.py``); every
combination of the settings then solves them (``alignment.solve_pairs``) and is
scored as align_quality scores ``--ours solveK``. Only the network's time is
shared, so this is how to choose ``align.py --solve``'s flags for a new kind of
data without running the network once per setting. The table gives each
setting's figures averaged over the draws, its EPE far as a fraction of the
identity's (mean and worst draw, in the first section's frame and in a common
frame), the excess near and inside defects (mean and worst draw: ``evaluate.epe``)
and the oracle's CPC, sorted by the EPE far in a common frame: one draw
is not enough to choose by (bench/RESULTS.md, real tissue).

It first says how good the network's part is: for the pairs of neighbours,
the median end-point error of the pair fields against the true relative
fields (and of the zero field), and the least-squares slope of the pair fields
on the true ones (1: the network recovers all of the motion; below 1: it
hedges toward zero), per smoothing radius; and what that low-pass alone costs:
the median EPE far from defects of the low-passed true fields (the floor of
any setting with that radius). With ``--true_pairs`` every setting also solves the
true relative fields (``true_pair_fields``): its rows "on true pairs" are what the
solve's settings cost with a perfect network, in every column (near and inside
defects too).
"""
from __future__ import annotations

if not __package__:  # run as a file: our modules are not importable from bench/
    raise SystemExit("run it from the repository root as: python -m bench.solve_sweep [flags]")

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import evaluate
from bench.align_quality import (DEFECT_MASKS, add_misalignment_flags, check_stack_args, held_out_stack,
                                 registration_check)
from alignment import (SolveSettings, add_flags, apply_field, for_inference, settings_from_args, solve_pairs,
                       solved_pairs, warnings_condensed)
from demo import PHANTOMS
from helpers import (UserError, atomic_output, check_writable, compose, file_sha256, folder, in_frame_of,
                     invert_field, one_line, random_seed, run_main, vector_length)
from models.archive import load_archive
from solve import low_pass

SWEPT = ["neighbours", "pull", "smooth", "detail_pull", "robust"]  # the settings swept: several values each


def true_pair_fields(truth: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """The true relative fields ``[E, 2, H, W]`` (px) of ``pairs``, as ``pair_field`` would ideally find them.

    truth ``[Z, 2, H, W]``: the fields that pull each raw section into one common
    frame (any: it cancels); pair ``(s, t)``, pulling raw section s onto raw
    section t, is ``compose(truth_s, invert(truth_t))``.
    """
    return torch.cat([compose(truth[s:s + 1], invert_field(truth[t:t + 1])) for s, t in pairs])


def pair_accuracy(raw, pairs, fields, true) -> dict[str, float]:
    """How well pair fields ``[E, 2, H, W]`` (px) match the true ones, over the pairs of neighbours.

    raw: uint8 ``[Z, H, W]``; true: the pairs' true relative fields ``[E, 2, H, W]``
    (``true_pair_fields``). Medians over the pairs of each pair's median EPE (where
    both sections show tissue), of the zero field's, and of the least-squares slope
    of the pair field on the true one.
    """
    epe, zero, slope = [], [], []
    for (s, t), field, exact in zip(pairs, fields, true):
        if abs(s - t) != 1:
            continue
        valid = torch.from_numpy((raw[s] > 0) & (raw[t] > 0))
        epe.append(float(vector_length(field - exact)[valid].median()))
        zero.append(float(vector_length(exact)[valid].median()))
        slope.append(float((field * exact).sum(0)[valid].sum() / (exact * exact).sum(0)[valid].sum()))
    return {"pair_epe": float(np.median(epe)), "pair_epe_zero_field": float(np.median(zero)),
            "slope": float(np.median(slope))}


def summarise(draws: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Each setting's figures averaged over several misalignment draws, with its EPE far relative to the identity's.

    draws: per draw, row name -> ``evaluate.score`` figures, including a row
    ``"no alignment"`` (the identity) and ``oracle_cpc``. Returns, per row, the
    mean of every figure over the draws plus ``far_ratio`` / ``common_ratio``: the
    mean over draws of the row's EPE far (first section's frame / common frame)
    divided by the identity's in the same draw, and ``*_ratio_max``, the worst draw; and for the excess near and
    inside defects (``evaluate.epe``), ``*_excess_max``, the worst draw too (issue 16's bar holds per draw).
    """
    out = {}
    for name in draws[0]:
        rows = [draw[name] for draw in draws]
        mean = {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}
        for column, ratio in (("far_median", "far_ratio"), ("far_common", "common_ratio")):
            ratios = [row[column] / draw["no alignment"][column] for row, draw in zip(rows, draws)]
            mean[ratio], mean[f"{ratio}_max"] = float(np.mean(ratios)), float(np.max(ratios))
        for excess in ("near_excess", "inside_excess"):
            if excess in mean:
                mean[f"{excess}_max"] = float(np.max([row[excess] for row in rows]))
        out[name] = mean
    return out


def cache_path(args, seed: int) -> Path | None:
    """Draw ``seed``'s ``--cache`` file: ``FILE`` itself for one draw, ``FILE.seedS.pt`` for several; None without."""
    if not args.cache:
        return None
    return Path(args.cache) if len(args.seed) == 1 else Path(args.cache).with_suffix(f".seed{seed}.pt")


def read_cache(path: Path) -> dict | None:
    """The pair fields this script kept at ``path`` (``{"key", "fields"}``), None if there is no file yet; a
    ``UserError`` for a file it cannot have written (e.g. a network archive), which it would overwrite, or where
    no file can be written."""
    check_writable(path, "--cache")
    if not path.exists():
        return None
    try:
        cached = torch.load(path, weights_only=True, mmap=True)  # mapped: main's check reads no field
    except Exception as err:  # truncated, not a torch file, another pickle
        raise UserError(f"--cache {path}: not a cache of pair fields ({one_line(err)}); give another file") from None
    if not isinstance(cached, dict) or set(cached) != {"key", "fields"}:
        raise UserError(f"--cache {path}: not a cache of pair fields (it would be overwritten); give another file")
    return cached


def sweep_draw(args, model, seed: int, settings: list[tuple]) -> dict[str, dict[str, float]]:
    """One misalignment draw: its stack, the pair fields (cached), and the scores of every setting."""
    stack = held_out_stack(args, seed)
    raw = stack["raw"]
    print(f"== draw {seed}")
    if args.real:
        print(registration_check(stack["content_offsets"]))
    truth = in_frame_of(torch.from_numpy(stack["truth"]))  # [Z, 2, H, W] px, in the first section's frame
    swept = {name: getattr(args, name)[0] for name in SWEPT}
    pair, _ = settings_from_args(args, **{**swept, "smooth": 0})  # the pair fields: low-passed by each setting's solve
    marks = DEFECT_MASKS[args.defects](stack)  # the defect maps the alignment is given, or None
    pairs, field_of, placed, passed = solved_pairs(model, raw, max(args.neighbours), pair, defects=marks)
    order = {z: i for i, z in enumerate(z for z in range(len(raw)) if z not in passed)}  # as the solve pairs them
    key = [file_sha256(args.archive), args.real, args.phantom, seed, args.reregister, list(args.fold_width),
           args.z_start, args.sections, args.size, pair.prealign, pair.trunc, pair.refine, pair.pieces, pairs,
           args.defects, args.missing, args.bad]
    cache = cache_path(args, seed)
    cached = read_cache(cache) if cache else None
    if cached and cached["key"] == key:
        fields = cached["fields"]
    else:
        start = time.time()
        fields = torch.stack([field_of(s, t) for s, t in tqdm(pairs, desc="pairs", unit="pair")])
        print(f"{len(pairs)} pair fields in {time.time() - start:.0f} s")
        if cache:
            with atomic_output(cache) as tmp:
                torch.save({"key": key, "fields": fields}, tmp)

    defects = evaluate.defects_in_output_frame(stack["defects"], truth)
    true = true_pair_fields(truth, pairs)
    for smooth in args.smooth:
        accuracy = pair_accuracy(raw, pairs, low_pass(fields, smooth), true)
        floor = evaluate.epe(low_pass(truth, smooth), truth, defects, raw > 0)["far_median"]
        print(f"pair fields, smooth {smooth}: median EPE {accuracy['pair_epe']:.2f} px "
              f"(zero field {accuracy['pair_epe_zero_field']:.2f}), slope on the truth {accuracy['slope']:.2f}; "
              f"the low-pass alone costs {floor:.2f} px far on the true fields")

    oracle = evaluate.summarize(evaluate.cpc(apply_field(raw, truth)))["mean"]  # a CPC above it: warping tissue
    rows = {"no alignment": evaluate.score(raw, np.zeros(truth.shape, np.float32), truth, stack["defects"])}
    sources = [("", fields)] + ([(" on true pairs", true)] if args.true_pairs else [])
    for (n, smooth, pull, detail, robust), (which, given) in tqdm(list(itertools.product(settings, sources)),
                                                                  desc="settings"):
        keep = [i for i, (s, t) in enumerate(pairs)
                if abs(order[s] - order[t]) <= n or abs(order[s] - order[t]) == n + 1 and {s, t} & placed]
        solve = SolveSettings(neighbours=n, pull=pull, robust=robust, detail_pull=detail)
        aligned, solved = solve_pairs(raw, [pairs[i] for i in keep], given[keep], solve, smooth, defects=marks,
                                      passed=passed)
        name = f"solve{n} smooth {smooth}{f' detail {detail:g}' if smooth else ''} pull {pull:g} robust {robust:g}"
        rows[name + which] = evaluate.score(aligned, solved.numpy(), truth, stack["defects"])
    for row in rows.values():
        row["oracle_cpc"] = oracle
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archive", required=True, help="our network")
    p.add_argument("--real", type=folder, help="a folder of registered real sections (as in align_quality.py)")
    p.add_argument("--phantom", choices=PHANTOMS, help="a fresh phantom stack (as in align_quality.py)")
    p.add_argument("--seed", type=random_seed, nargs="+", default=[0],
                   help="misalignment draws (as in align_quality.py); several: figures averaged over them")
    p.add_argument("--reregister", action="store_true", help="as in align_quality.py")
    add_misalignment_flags(p)
    p.add_argument("--z_start", type=int, default=70)
    p.add_argument("--sections", type=int, default=30)
    p.add_argument("--size", type=int, default=512)
    add_flags(p, several=SWEPT, without=["chunk", "overlap"])
    p.set_defaults(smooth=[0, 96, 192])  # the sweep's: without a low-pass, align.py's default and real tissue's
    p.add_argument("--defects", choices=list(DEFECT_MASKS), default="none",
                   help="the defect masks the alignment is given (align.py --defects): the stack's true ones or none")
    p.add_argument("--true_pairs", action="store_true",
                   help="also solve the true relative fields with every setting (rows 'on true pairs'): what the "
                        "setting costs with perfect pair fields, e.g. near defects")
    p.add_argument("--best", type=int, default=15, help="rows to print")
    p.add_argument("--cache", help="keep the pair fields in this file (one per draw: FILE.seedS.pt when several) "
                                   "and reuse them when the stack, the settings and the archive's bytes match")
    args = p.parse_args(argv)
    settings = [(n, smooth, pull, detail, robust) for n, smooth, pull, detail, robust in itertools.product(
        args.neighbours, args.smooth, args.pull, args.detail_pull, args.robust) if smooth or detail == args.detail_pull[0]]
    for n, smooth, pull, detail, robust in settings:  # each setting's least value, before any work
        settings_from_args(args, neighbours=n, smooth=smooth, pull=pull, detail_pull=detail, robust=robust)
    check_stack_args(args)
    for seed in args.seed:  # a file it would overwrite, before any work
        if cache_path(args, seed):
            read_cache(cache_path(args, seed))
    model = for_inference(load_archive(args.archive)[0])
    with warnings_condensed():  # one line per kind however many pairs match poorly
        rows = summarise([sweep_draw(args, model, seed, settings) for seed in args.seed])
    ranked = sorted((item for item in rows.items() if item[0] != "no alignment"), key=lambda item: item[1]["far_common"])
    rows = {"no alignment": rows["no alignment"], **dict(ranked[:args.best])}
    print(f"\n{len(args.seed)} draw(s) {' '.join(map(str, args.seed))}: means over the draws; *_ratio: EPE far / the "
          "identity's in the same draw (mean, and the worst draw); sorted by EPE far in a common frame")
    evaluate.print_table(rows, ["far_median", "far_common", "far_ratio", "far_ratio_max", "common_ratio",
                                "common_ratio_max", "near_median", "near_common", "near_excess", "near_excess_max",
                                "inside_median", "inside_common", "inside_excess", "inside_excess_max", "drift_mean",
                                "cpc_mean", "oracle_cpc", "foldovers", "foldovers_spurious"])
    return rows


if __name__ == "__main__":
    run_main(main)
