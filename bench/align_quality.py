"""Alignment quality, side by side, on held-out sections with known ground-truth fields.

    .venv/bin/python -m bench.align_quality --archive pt/demo.pt                 # the demo test stack
    .venv/bin/python -m bench.align_quality --archive pt/demo.pt --sections 10 --size 256   # quicker

``--real DIR`` does the same on a folder of registered real sections, misaligned
with known fields, cracks and folds exactly as the demo is (``misalign.py``);
``--phantom KIND`` on a fresh phantom stack misaligned the same way, whose tissue
changes from section to section as the demo's does (``default``), without the
phantom's smooth bending of space (``unbent``), or not at all (``static``: one
section repeated): what is left of the error on ``static`` is the aligner's own.

Methods: no alignment, the oracle (ground truth), our network (serial, as
``align.py``), and the classical aligners of ``bench/baselines.py`` (elastix,
SOFIMA; install with ``pip install -r bench/requirements.txt``, SOFIMA from a
source checkout named by ``$SOFIMA_PATH``), each at its best of a few settings
(best = lowest median EPE far from defects). Every method aligns serially to the
first section; its fields are scored against the truth in that section's frame
(``helpers.in_frame_of``). EPE is the primary figure: a CPC above the
oracle's means the method warps tissue to look like its neighbour. ``--missing frame|holes`` makes part of each
raw section missing data (0), as a lab's own volume has it (``with_missing_data``); ``--bad Z:noise|inverted``
replaces a section by one that matches nowhere (``with_bad_sections``). ``--adapt MINUTES``
first adapts our network for that long to the misaligned raw stack alone (``adapt.py``,
as ``align.py --adapt``); a row per value, 0 = as it is.
"""
from __future__ import annotations

if not __package__:  # run as a file: our modules are not importable from bench/
    raise SystemExit("run it from the repository root as: python -m bench.align_quality [flags]")

import argparse
import dataclasses
import itertools
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import evaluate
import misalign
from alignment import (PairSettings, SolveSettings, add_flags, align_serial, align_solved, apply_field,
                       check_fits, for_inference, network_bias, settings_from_args, warnings_condensed)
from demo import PHANTOMS
from helpers import UserError, check_writable, finite_float, folder, in_frame_of, random_seed, run_main


def detected_defects(stack: dict) -> np.ndarray:
    """The defect maps ``[Z, H, W]`` uint8 that ``detect_defects.py``'s network (``pt/defects.pt``) finds in the raw
    sections ``stack["raw"]`` ``[Z, H, W]``."""
    from detect_defects import detect, load_detector
    return detect(load_detector(), torch.from_numpy(stack["raw"][:, None])).numpy()[:, 0]


DEFECT_MASKS = {"given": lambda stack: stack["defects"],  # the true masks
                "detected": detected_defects,  # what a user without a defect layer can have
                "none": lambda stack: None}  # --defects WHICH: the masks our network aligns with
COLUMNS = evaluate.EPE_COLUMNS + ["cpc_mean", "oracle_cpc", "foldovers", "foldovers_spurious", "mpx_per_s"]


def demo_stack(z_start: int, count: int, size: int) -> dict[str, np.ndarray]:
    """Held-out demo sections: ``raw`` [Z,H,W] uint8, ``truth`` [Z,2,H,W] (own frames), ``defects`` [Z,H,W]."""
    import demo
    import volume

    layers = demo.ensure_demo()
    vols = {name: volume.open_volume(layers[name]) for name in ("image", "field", "defects")}
    start, stop = volume.bounds(vols["image"])
    if z_start < start[2] or z_start + count > stop[2] or size > min(stop[:2] - start[:2]):
        raise UserError(f"--z_start {z_start} --sections {count} --size {size}: outside the demo volume (sections "
                        f"{start[2]}..{stop[2] - 1}, {stop[0] - start[0]} x {stop[1] - start[1]} px)")
    read = {name: volume.read(vol, (0, 0, z_start), (size, size, count)) for name, vol in vols.items()}
    return {"raw": read["image"][:, 0], "truth": read["field"], "defects": read["defects"][:, 0]}


def phantom_stack(kind: str, count: int, size: int, seed: int = 0, misalignment=None) -> dict[str, np.ndarray]:
    """A fresh phantom stack of ``kind`` (``demo.PHANTOMS``), misaligned as the demo is (or by ``misalignment``,
    a ``misalign.MisalignParams``).

    ``count`` sections of ``size`` px; the phantom's seed is ``1000 + seed`` (the
    demo volume's is 0, so the tissue is held out), the misalignment's ``seed``.
    """
    import demo

    arrays = demo.make_arrays((count, size, size), 48, seed, kind, phantom_seed=1000 + seed,
                              misalignment=misalignment)
    return {"raw": arrays["image"][:, 0], "truth": arrays["field"], "defects": arrays["defects"][:, 0]}


MISSING = ("none", "frame", "holes")  # --missing: what part of each raw section is missing data


def add_misalignment_flags(p: argparse.ArgumentParser) -> None:
    """The flags that change how the held-out stack is misaligned (``--real``, ``--phantom``) and what of it is
    missing data (``held_out_stack``)."""
    misalign.add_fold_width_flag(p, "--real, --phantom:")
    p.add_argument("--missing", choices=MISSING, default="none",
                   help="make part of each raw section missing data (0): 'frame', a margin of 40-120 px on each "
                        "side, drawn per section (tissue imaged in a window that wanders); 'holes', 30 squares of "
                        "8-40 px (debris, saturated blobs); drawn with --seed")
    p.add_argument("--bad", nargs="+", default=[], metavar="Z:KIND",
                   help="replace raw section Z (counted from 0 in the stack) by noise ('noise': uniform grey levels) "
                        "or by its own inverse ('inverted': 256 - grey level): a section that matches nowhere")


def with_missing_data(raw: np.ndarray, kind: str, seed: int) -> np.ndarray:
    """A copy of ``raw`` ``[Z, H, W]`` (uint8) with part of each section made missing data (0), as ``--missing``
    says; ``none``: ``raw`` itself."""
    if kind == "none":
        return raw
    out, draw = raw.copy(), np.random.default_rng(seed)
    h, w = raw.shape[1:]
    for section in out:
        if kind == "frame":
            top, bottom, left, right = draw.integers(40, 121, 4)
            section[:top], section[h - bottom:], section[:, :left], section[:, w - right:] = 0, 0, 0, 0
        else:
            for _ in range(30):
                side = int(draw.integers(8, 41))
                y, x = draw.integers(0, h - side + 1), draw.integers(0, w - side + 1)
                section[y:y + side, x:x + side] = 0
    return out


def with_bad_sections(raw: np.ndarray, bad: list[str], seed: int) -> np.ndarray:
    """A copy of ``raw`` ``[Z, H, W]`` (uint8) with the sections ``bad`` names (``Z:KIND``, ``--bad``) replaced by
    noise (uniform 1..255, drawn with ``seed``) or inverted (256 - grey level where not missing); none: ``raw``."""
    if not bad:
        return raw
    out, draw = raw.copy(), np.random.default_rng(seed)
    for z, kind in (spec.split(":") for spec in bad):  # checked by check_stack_args
        section = out[int(z)]
        section[:] = (draw.integers(1, 256, section.shape) if kind == "noise"
                      else np.where(section > 0, 256 - section.astype(int), 0))
    return out


def held_out_stack(args, seed: int) -> dict[str, np.ndarray]:
    """The stack ``args`` ask for (``--real``, ``--phantom``, else the demo's test sections), draw ``seed``;
    ``--real`` and ``--phantom`` misaligned with ``add_misalignment_flags``' settings, and any of them with part of
    each raw section missing data (``--missing``) and sections that match nowhere (``--bad``)."""
    if args.real and args.phantom:
        raise UserError("choose --real or --phantom")
    misalignment = misalign.with_fold_width(args.fold_width)
    if args.real:
        stack = real_stack(args.real, args.z_start, args.sections, args.size, seed, args.reregister, misalignment)
    elif args.phantom:
        stack = phantom_stack(args.phantom, args.sections, args.size, seed, misalignment)
    elif misalignment != misalign.MisalignParams():
        raise UserError("--fold_width: the demo volume's folds are made; give --real or --phantom")
    else:
        stack = demo_stack(args.z_start, args.sections, args.size)  # the demo has one draw
    return {**stack, "raw": with_bad_sections(with_missing_data(stack["raw"], args.missing, seed), args.bad, seed)}


def stack_name(args, count: int) -> str:
    """E.g. ``demo sections 70..99`` or ``phantom static (seed 7), 30 sections, missing data: holes``."""
    missing = ("" if args.missing == "none" else f", missing data: {args.missing}") + \
        (f", matching nowhere: {' '.join(args.bad)}" if args.bad else "")
    if args.phantom:
        return f"phantom {args.phantom} (seed {args.seed}), {count} sections{missing}"
    return f"{args.real or 'demo'} sections {args.z_start}..{args.z_start + count - 1}{missing}"


def real_stack(folder: str, z_start: int, count: int, size: int, seed: int = 0,
               reregister: bool = False, misalignment=None) -> dict[str, np.ndarray]:
    """Registered real sections from an image folder, misaligned exactly as the demo (``misalign.py``; or by
    ``misalignment``, a ``misalign.MisalignParams``).

    Sections ``z_start .. z_start + count - 1`` (natural file order), the central
    ``size + 2 * 48`` px of each as the canvas, cropped to ``size`` after misalignment;
    with ``reregister``, first ``import_stack.register_rigidly`` (as ``import_stack.py --reregister``).
    """
    from import_stack import read_registered, register_rigidly

    sections = read_registered(folder, z_start, z_start + count)
    margin = 0  # of missing data that re-registering moves in
    if reregister:
        sections, shifts = register_rigidly(sections)
        margin = int(np.abs(shifts).max())
    pad = 48
    h, w = sections.shape[1:]
    side = min(size + 2 * pad, h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    canvas = torch.from_numpy(sections[:, y0:y0 + side, x0:x0 + side])[:, None]
    image, defects, field = misalign.misalign(canvas, misalignment or misalign.MisalignParams(),
                                              torch.Generator().manual_seed(seed), pad=pad)
    return {"raw": image[:, 0].numpy(), "truth": field.numpy(), "defects": defects[:, 0].numpy(),
            "content_offsets": evaluate.content_offsets(canvas[:, 0, margin:side - margin, margin:side - margin])}


def registration_check(offsets: np.ndarray, tolerance: float = 2.0) -> str:
    """One line on how far the registered sections' content moves between neighbours (``evaluate.content_offsets``).

    The misalignment is added to the registration, so the truth is only as good
    as the registration. Tissue changes between sections, but it does not move
    as a whole: where neighbours' content is displaced by more than ``tolerance``
    px, the registration is off there. The line also says where an aligner that
    followed the content exactly (the offsets added up along the stack) would end
    relative to the registration, in the first section's frame.
    """
    length = np.hypot(*offsets.T)
    walk = np.hypot(*np.cumsum(offsets, 0).T)
    line = (f"registration check: the registered sections' content moves from neighbour to neighbour by a median "
            f"{np.median(length):.1f} px (largest {length.max():.1f} px; {int((length > tolerance).sum())} of "
            f"{len(length)} pairs above {tolerance:g} px); followed exactly, it ends a median {np.median(walk):.1f} px "
            f"(largest {walk.max():.1f} px) from the registration")
    if np.median(length) > tolerance:
        line += ("; warning: the registration is off by that much, and EPE against it charges an aligner for "
                 "following the sections' content")
    return line


def run_method(fields_fn, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """``(aligned [Z,H,W], fields [Z,2,H,W], seconds)`` of one method's serial alignment."""
    start = time.time()
    fields = np.asarray(fields_fn(raw), dtype=np.float32)
    seconds = time.time() - start
    aligned = apply_field(raw, fields)
    return aligned, fields, seconds


def network_fields(archive: str, variant: str, pair: PairSettings, solve: SolveSettings, defects=None):
    """``raw [Z,H,W] -> fields [Z,2,H,W]`` of our network aligning as ``variant`` says (e.g. ``vote3``, ``solve2``:
    ``--ours``) with ``pair`` and (``solveK``, K its ``neighbours``) ``solve``, and the stack's defect maps
    ``defects`` (uint8 ``[Z,H,W]``, as ``align.py --defects`` reads them) or None."""
    from models.archive import load_archive

    model = for_inference(load_archive(archive)[0])
    check_fits(pair, model, archive)
    kind, number = re.fullmatch(r"(serial|raw|vote|solve)(\d*)", variant).groups()
    if kind == "solve":
        solve = dataclasses.replace(solve, neighbours=int(number or 1))
        return lambda raw: align_solved(model, raw, pair, solve, defects=defects)[1].numpy()
    vote = int(number or 1) if kind == "vote" else 1

    def serial(raw):  # as align.py's serial tasks: the network's bias on the stack taken off each pair field
        bias = network_bias(model, raw.__getitem__, len(raw), pair)
        return np.stack([f.numpy() for _, f, _ in align_serial(model, raw, to_raw_neighbour=kind == "raw", vote=vote,
                                                               settings=pair, defects=defects, bias=bias)])
    return serial


def adapted_network(archive: str, minutes: float, raw: np.ndarray, folder: Path, seed: int) -> str:
    """``archive``, or with ``minutes`` > 0 a copy adapted for that long (``adapt.adapt``, as ``align.py --adapt``)
    to the misaligned raw sections ``raw`` [Z,H,W] uint8 alone, written into ``folder``."""
    if not minutes:
        return archive
    import adapt
    from models.archive import read_archive

    sections = adapt.self_pair_sections(lambda dx, dy, z, side: raw[z, dy:dy + side, dx:dx + side], 0, len(raw),
                                        raw.shape[2], raw.shape[1])
    path = adapt.adapt(archive, sections, minutes, folder / f"{Path(archive).stem}_adapted_{minutes:g}.pt", seed=seed)
    print(f"  adapted {archive} for {minutes:g} min: {read_archive(path)['iteration']} steps")
    return str(path)


def check_stack_args(args) -> None:
    """One-line ``UserError``s for the held-out stack's ``--sections`` and ``--size`` (``held_out_stack``)."""
    if args.sections < 2:
        raise UserError(f"--sections {args.sections}: a stack to align needs at least 2")
    if args.size < 1:
        raise UserError(f"--size {args.size}: the sections' size in px must be at least 1")
    if getattr(args, "reregister", False) and not getattr(args, "real", None):
        raise UserError("--reregister re-registers --real sections (the demo's and the phantoms' need none)")
    least = {"frame": 2 * 120 + 64, "holes": 40}.get(args.missing, 0)  # margins of up to 120 px; holes of 40 px
    if args.size < least:
        raise UserError(f"--missing {args.missing} needs --size {least} px or more (got {args.size}): it would leave "
                        "no tissue to score")
    for spec in args.bad:
        z, _, kind = spec.partition(":")
        if not z.isdigit() or int(z) >= args.sections or kind not in ("noise", "inverted"):
            raise UserError(f"--bad {spec}: expected Z:noise or Z:inverted, 0 <= Z < --sections {args.sections}")


def check_args(args) -> None:
    """One-line ``UserError``s, before the stack is built: the alignment settings (each ``--smooth``), ``--ours``,
    ``--sections``, ``--size``, and ``--methods`` / ``--settings`` names the classical aligners do not have."""
    from bench.baselines import BASELINES

    for smooth in args.smooth:
        settings_from_args(args, smooth=smooth)  # each setting's least value
    for variant in args.ours:
        if not re.fullmatch(r"serial|raw|vote[1-9]\d*|solve([1-9]\d*)?", variant):
            raise UserError(f"--ours {variant}: expected serial, raw, voteK or solveK (K >= 1)")
    check_stack_args(args)
    unknown = [f"--methods {m}" for m in args.methods or [] if m not in (*BASELINES, "none")]  # none: ours only
    unknown += [f"--settings {s}" for s in args.settings or [] if not any(s in known for known in BASELINES.values())]
    if unknown:
        raise UserError(f"{', '.join(unknown)}: not a classical aligner or setting (methods: {', '.join(BASELINES)}; "
                        f"settings: {', '.join(s for known in BASELINES.values() for s in known)})")


def score_row(stack, aligned, fields, seconds, oracle_cpc) -> dict[str, float]:
    row = evaluate.score(aligned, fields, stack["truth_rel"], stack["defects"])
    row["oracle_cpc"] = oracle_cpc
    # the first section is the reference and is not aligned by anyone
    row["mpx_per_s"] = (len(aligned) - 1) * aligned[0].size / 1e6 / seconds if seconds else float("nan")
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archive", nargs="*", default=[],
                   help="our network(s) (several to compare; omit to score only the baselines)")
    p.add_argument("--real", type=folder, help="a folder of registered real sections (PNG/TIFF), misaligned as the "
                                               "demo is, instead of the demo volume; --z_start counts files from 0")
    p.add_argument("--phantom", choices=PHANTOMS,
                   help="a fresh phantom stack instead of the demo volume (module docstring)")
    p.add_argument("--seed", type=random_seed, default=0,
                   help="--real, --phantom: the seed of the known misalignment, cracks and folds (one stack per seed)")
    add_misalignment_flags(p)
    p.add_argument("--reregister", action="store_true",
                   help="--real: shift the sections by whole pixels until neighbours' content matches before "
                        "misaligning them, as import_stack.py --reregister does (for a volume whose registration "
                        "fails the check printed first)")
    p.add_argument("--z_start", type=int, default=70, help="first held-out demo section")
    p.add_argument("--sections", type=int, default=30, help="sections in the stack")
    p.add_argument("--size", type=int, default=512, help="section size in px (a top-left crop)")
    p.add_argument("--ours", nargs="+", default=["serial"],
                   help="how our network aligns the stack: serial (onto the aligned section before), raw (onto the "
                        "raw section before, fields chained), voteK (onto the K aligned sections before, vector "
                        "voting), solveK (stack-wide solve over K raw neighbours on each side); several to compare")
    add_flags(p, several=["smooth"], without=["neighbours"])  # align.py's; --smooth R1 R2 ...: a row each
    p.add_argument("--defects", nargs="+", choices=list(DEFECT_MASKS), default=["none"],
                   help="the defect masks our network aligns with (align.py --defects): the stack's true ones "
                        "(given), detect_defects.py's (detected) or none; several to compare")
    p.add_argument("--adapt", type=finite_float, nargs="+", default=[0.0],
                   help="minutes our network is first adapted to the misaligned raw stack (align.py --adapt; 0 = "
                        "as it is); several to compare")
    p.add_argument("--methods", nargs="*", help="restrict the classical methods (e.g. elastix sofima)")
    p.add_argument("--settings", nargs="*", help="only these settings of the classical methods (default: all)")
    p.add_argument("--out", help="write the table (markdown) and plots to this folder")
    args = p.parse_args(argv)
    if len({Path(a).stem for a in args.archive}) < len(args.archive):
        raise UserError("--archive: two networks with the same file name would share a row name")
    if min(args.adapt) < 0:
        raise UserError(f"--adapt {min(args.adapt):g}: minutes must be >= 0")
    check_args(args)
    out = check_writable(args.out, "--out", folder=True) if args.out else None
    stack = held_out_stack(args, args.seed)
    stack["truth_rel"] = in_frame_of(torch.from_numpy(stack["truth"])).numpy()
    raw = stack["raw"]
    print(f"{stack_name(args, len(raw))}, {raw.shape[2]} x {raw.shape[1]} px; {torch.get_num_threads()} threads")
    if args.real:
        print(registration_check(stack["content_offsets"]))

    rows, hist = {}, {}
    zero = np.zeros_like(stack["truth_rel"])
    oracle_aligned = apply_field(raw, stack["truth_rel"])
    oracle = evaluate.summarize(evaluate.cpc(oracle_aligned))["mean"]  # NaN, unwarned, on a stack too small
    rows["no alignment"] = score_row(stack, raw, zero, 0, oracle)
    rows["oracle (ground truth)"] = score_row(stack, oracle_aligned, stack["truth_rel"], 0, oracle)
    hist["no alignment"], hist["oracle"] = evaluate.cpc(raw), evaluate.cpc(oracle_aligned)
    with tempfile.TemporaryDirectory(prefix="align-quality-") as tmp, warnings_condensed():
        networks = {(archive, minutes): adapted_network(archive, minutes, raw, Path(tmp), args.seed)
                    for archive in args.archive for minutes in dict.fromkeys(args.adapt)}
        for (archive, minutes), variant, smooth, masks in itertools.product(networks, args.ours, args.smooth,
                                                                            args.defects):
            fields_fn = network_fields(networks[archive, minutes], variant, *settings_from_args(args, smooth=smooth),
                                       DEFECT_MASKS[masks](stack))
            aligned, fields, seconds = run_method(fields_fn, raw)
            name = (f"ours ({Path(archive).stem}{f', adapted {minutes:g} min' if minutes else ''}, {variant}"
                    f"{f', smooth {smooth}' if smooth else ''}{f', refine {args.refine}' if args.refine else ''}"
                    f"{f', defects {masks}' if masks != 'none' else ''})")
            rows[name] = score_row(stack, aligned, fields, seconds, oracle)
            hist[name] = evaluate.cpc(aligned)
            print(f"  {name}: far median {rows[name]['far_median']:.3g} px, {rows[name]['mpx_per_s']:.3g} Mpx/s")

    from bench import baselines
    for method, reason in baselines.available().items():
        if args.methods and method not in args.methods:
            continue
        if reason:
            print(f"skipped {method}: {reason}")
            continue
        best = None
        for setting in [s for s in baselines.BASELINES[method] if not args.settings or s in args.settings]:
            aligned, fields, seconds = run_method(lambda r: baselines.align_stack(method, r, setting), raw)
            row = score_row(stack, aligned, fields, seconds, oracle)
            print(f"  {method} {setting}: far median {row['far_median']:.3g} px, {row['mpx_per_s']:.3g} Mpx/s")
            if best is None or row["far_median"] < best[1]["far_median"]:
                best = (setting, row, aligned)
        if best:
            rows[f"{method} ({best[0]})"] = best[1]
            hist[method] = evaluate.cpc(best[2])

    print()
    table = evaluate.print_table(rows, COLUMNS)
    for line in evaluate.warnings(rows, "no alignment", oracle):
        print(line)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "align_quality.txt").write_text(table + "\n")
        evaluate.plot_cpc(hist, out / "cpc.png")
        print(f"wrote {out}/align_quality.txt and cpc.png")
    return rows


if __name__ == "__main__":
    run_main(main)
