"""Measure an alignment: neighbour correlation (CPC), end-point error, foldovers, drift.

    python evaluate.py --aligned DEST --z_start 70 --z_stop 100 [--raw demo] [--truth demo] [--plots out/eval]

Library functions take arrays (``[Z, H, W]`` stacks, ``[Z, 2, H, W]`` fields in
pixels, the ``helpers`` convention) and return plain numbers; the command reads
an aligned stack written by ``align.py`` (``DEST/image``, ``DEST/field``) and
prints a table. It scores only what was written: a section of the range missing
from the aligned stack or ``--truth`` (a chunk never stored; from ``--raw``: all
of its chunks), or a layer of the wrong kind (an image, a field, a label layer:
told by channels and dtype), is refused in one line before anything is scored.
Blank aligned sections (no tissue, or never written in the source) are left out,
with a line that says so, and the sections beside each gap are scored as
neighbours (``--raw`` may lack them).
Below the table it names where to look (``where_to_look``): the neighbour pairs that
correlate least, those that correlate less aligned than raw, and the sections whose field folds over.

* CPC: sections cut into ``chunk`` x ``chunk`` squares (``--cpc_window``), Pearson r of each square
  with the same square of the next section; squares with any missing (zero)
  pixel or no contrast are dropped (as the SEAMLeSS paper measured).
* EPE: ``|field - truth|`` per pixel, split into far from defects, near (within
  ``near`` px) and inside defects; median and 95th percentile.
* foldovers: fraction of pixels where ``p -> p + field(p)`` folds (Jacobian
  determinant <= 0); ``foldovers_spurious``: the fraction of pixels that fold
  more than ``margin`` px from every pixel where the true field of the same
  section folds (a fold's true field folds over: the tissue doubled in it, and
  fields into a common frame inherit the reference's folds, the true ones too).
* drift: per section, the length of the mean of ``field - truth``; mean and
  largest over the stack (a random walk of pairwise errors shows here).
* excess near / inside defects: their EPE minus the EPE far from defects in the same
  section (a common frame): whether defects are aligned as well as the rest of their
  section, wherever in the stack they are (the error grows with the distance from
  the reference section, so ``near`` against ``far`` also compares sections).
* far / near / inside (common frame): the median EPEs once the stack's mean
  error field is removed (``common_frame``). The truth is given in the frame of
  the first section, which charges that one section's error to every other
  section; a stack aligned into any common frame is equally well aligned, and
  the mean error is the common frame that fits the truth best (as trajectory
  errors are measured after the best common alignment).
* the oracle: the raw sections pulled by the true fields. Its CPC is what perfect
  alignment scores: a CPC above it means the aligner warps tissue to look like
  its neighbour (a flexible warp can do that while its fields are pixels wrong),
  and EPE, not CPC, is the primary figure. ``warnings`` flags such rows, and rows
  hardly better than no alignment (an aligner that drifts, a network collapsed
  to the zero field or trained on other data).
* content offsets: the shift that best matches each section's content onto the
  next one's; on a registered stack, a check of the registration that a
  ground truth is built on (``bench/align_quality.py --real`` prints it).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import masks
from alignment import apply_field
from helpers import (HelpFormatter, UserError, check_memory, check_writable, dilated, finite_float, in_frame_of,
                     jacobian_determinant, machine_memory, missing_data, run_main, to_tensor, vector_length,
                     warp_labels)
from shifts import best_shifts
from vis import plain_log_ticks, pyplot, save_figure

PERCENTILES = (1, 5, 95, 99)
RAW = "raw (no alignment)"  # the unaligned stack's row in evaluate.py's table


def square_correlations(stack, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Pearson r of every ``chunk``-square with the same square of the next section, float64 ``[Z-1, T]`` (T squares
    a section), and which squares count, bool ``[Z-1, T]``.

    stack: ``[Z, H, W]`` (0 = missing data, ``helpers.missing_data``: a speck of zeros is dark tissue). Squares with
    missing data or zero variance in either section do not count. Vectorised over all squares of all pairs.
    """
    a = to_tensor(stack, dtype=torch.float64)
    z, h, w = a.shape

    def tiled(x: torch.Tensor) -> torch.Tensor:  # [Z, T, chunk^2]: the whole squares
        x = x[:, :h - h % chunk, :w - w % chunk]
        return x.reshape(z, h // chunk, chunk, w // chunk, chunk).permute(0, 1, 3, 2, 4).flatten(1, 2).flatten(2)

    tiles, whole = tiled(a), (~tiled(missing_data(a))).all(-1)
    x, y = tiles[:-1], tiles[1:]  # [Z-1, T, chunk^2]
    xc, yc = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
    sx, sy = xc.norm(dim=-1), yc.norm(dim=-1)
    keep = whole[:-1] & whole[1:] & (sx > 0) & (sy > 0)
    return (xc * yc).sum(-1) / (sx * sy).clamp_min(1e-12), keep


def cpc(stack, chunk: int = 64) -> np.ndarray:
    """The r of every square that counts (``square_correlations``), all neighbour pairs together, ``[K]``."""
    r, keep = square_correlations(stack, chunk)
    return r[keep].numpy()


def pair_cpc(stack, chunk: int = 64) -> np.ndarray:
    """Each neighbour pair's mean r over its squares that count (``square_correlations``), ``[Z-1]``; NaN where none
    does."""
    r, keep = square_correlations(stack, chunk)
    count = keep.sum(-1)
    return torch.where(count > 0, (r * keep).sum(-1) / count.clamp_min(1), torch.nan).numpy()


def summarize(values: np.ndarray) -> dict[str, float]:
    """Mean, variance and the 1st/5th/95th/99th percentiles of ``values`` (NaN when empty)."""
    if len(values) == 0:
        return {"mean": float("nan"), "var": float("nan"), **{f"p{q}": float("nan") for q in PERCENTILES}}
    return {"mean": float(np.mean(values)), "var": float(np.var(values)),
            **{f"p{q}": float(v) for q, v in zip(PERCENTILES, np.percentile(values, PERCENTILES))}}


def defects_in_output_frame(defects, true_fields) -> torch.Tensor:
    """Defect maps ``[Z, H, W]`` (image frame) carried into the frame of the fields (nearest sampling)."""
    return warp_labels(torch.as_tensor(np.asarray(defects), dtype=torch.uint8)[:, None], to_tensor(true_fields))[:, 0]


def epe(field, truth, defects=None, valid=None, near: float = 20) -> dict[str, float]:
    """End-point error (px) medians and 95th percentiles far from / near / inside defects, and the excess near and
    inside defects over the same sections' error far from them.

    field, truth: ``[Z, 2, H, W]``; defects: ``[Z, H, W]`` in the fields' frame (``> 0``
    defect) or None; valid: bool ``[Z, H, W]``, pixels to count (e.g. tissue), or None.
    ``near_excess`` / ``inside_excess``: the median over the region's pixels of their error minus the median error
    far from defects in their own section (sections with no pixel far from one left out). The error grows with
    distance from the reference section (drift), and only the sections with a defect have pixels near one, so
    ``near_median`` against ``far_median`` also compares sections; the excess compares within each section.
    """
    error = vector_length(to_tensor(field) - to_tensor(truth))
    regions = defect_regions(defects, torch.ones_like(error, dtype=torch.bool) if valid is None else valid, near)
    return {**_medians(error, regions), **_excess(error, regions)}


def defect_regions(defects, valid, near: float = 20) -> dict[str, torch.Tensor]:
    """The pixels far from defects (``"far"``) and, with ``defects``, within ``near`` px of one (``"near"``) and
    inside one (``"inside"``): bool ``[Z, H, W]`` each. defects: ``[Z, H, W]`` (``> 0`` defect) or None; valid:
    bool ``[Z, H, W]``, the pixels that count."""
    valid = torch.as_tensor(valid, dtype=torch.bool)
    if defects is None:
        return {"far": valid}
    distance = masks.distance_to_defect(to_tensor(defects)[:, None], near)[:, 0]
    inside = distance == 0
    return {"far": valid & (distance >= near), "near": valid & ~inside & (distance < near), "inside": valid & inside}


def _medians(error: torch.Tensor, regions: dict[str, torch.Tensor]) -> dict[str, float]:
    """``{region}_median`` and ``{region}_p95`` of ``error`` ``[Z, H, W]`` (px) over each of ``regions``."""
    out = {}
    for name, region in regions.items():
        values = error[region].numpy()
        out[f"{name}_median"] = float(np.median(values)) if len(values) else float("nan")
        out[f"{name}_p95"] = float(np.percentile(values, 95)) if len(values) else float("nan")
    return out


def _excess(error: torch.Tensor, regions: dict[str, torch.Tensor]) -> dict[str, float]:
    """``near_excess`` and ``inside_excess`` of ``error`` ``[Z, H, W]`` (px; ``epe``), none without defects."""
    if "near" not in regions:
        return {}
    far = np.array([np.median(e[f].numpy()) if f.any() else np.nan for e, f in zip(error, regions["far"])])
    excess = error.numpy() - far[:, None, None]  # per section: the median error far from defects (nan: none there)
    out = {}
    for name in ("near", "inside"):
        values = excess[regions[name].numpy()]
        values = values[np.isfinite(values)]
        out[f"{name}_excess"] = float(np.median(values)) if len(values) else float("nan")
    return out


def common_frame(field, truth, valid=None) -> torch.Tensor:
    """``field`` ``[Z, 2, H, W]`` minus its mean error over the stack (per pixel, over ``valid`` sections).

    valid: bool ``[Z, H, W]`` (pixels that count) or None. Removing one field
    common to all sections changes no section's alignment to any other, so
    ``epe(common_frame(field, truth), truth)`` measures the alignment without the
    choice of reference frame (linearised: fields compose by adding).
    """
    field, error = to_tensor(field), to_tensor(field) - to_tensor(truth)
    weight = torch.ones_like(error[:, :1]) if valid is None else torch.as_tensor(valid, dtype=torch.float32)[:, None]
    return field - (error * weight).sum(0, keepdim=True) / weight.sum(0, keepdim=True).clamp_min(1)


def section_foldovers(field) -> np.ndarray:
    """Per section of ``field`` ``[Z, 2, H, W]`` (px), the fraction of its pixels whose map ``p -> p + field(p)`` has
    Jacobian determinant <= 0, ``[Z]``."""
    return (jacobian_determinant(to_tensor(field)) <= 0).float().mean((-2, -1)).numpy()


def foldovers(field) -> float:
    """Fraction of the stack's pixels whose map ``p -> p + field(p)`` has Jacobian determinant <= 0."""
    return float(section_foldovers(field).mean())


def where_to_look(aligned_pairs: np.ndarray, raw_pairs: np.ndarray | None, folds: np.ndarray, zs: list[int],
                  least: int = 3, fold_share: float = 1e-3) -> list[str]:
    """Lines that point at the sections to look at in an aligned stack, with no truth needed.

    aligned_pairs, raw_pairs: ``[Z-1]`` each neighbour pair's CPC (``pair_cpc``) aligned and raw (None: not read);
    folds: ``[Z]`` each section's ``section_foldovers``; zs: the sections' z (a gap between two: they were scored
    as neighbours). The ``least`` pairs that correlate least aligned (their raw CPC beside); a warning for the pairs
    that correlate less aligned than raw (by over 0.01: alignment made them worse); the sections whose field folds
    over on more than ``fold_share`` of their pixels (a fold in the tissue folds the true field too).
    """
    name = [f"{a}|{b}" for a, b in zip(zs, zs[1:])]
    scored = [i for i in np.argsort(aligned_pairs, kind="stable") if not np.isnan(aligned_pairs[i])]
    lines = []
    if scored:
        lines.append("neighbours that correlate least (CPC aligned" + (", raw" if raw_pairs is not None else "")
                     + "): " + ", ".join(f"{name[i]} {aligned_pairs[i]:.3f}"
                                         + (f" ({raw_pairs[i]:.3f})" if raw_pairs is not None else "")
                                         for i in scored[:least]))
    if raw_pairs is not None:
        worse = [i for i in range(len(name)) if aligned_pairs[i] < raw_pairs[i] - 0.01]
        if worse:
            shown = ", ".join(f"{name[i]} ({aligned_pairs[i]:.3f} vs {raw_pairs[i]:.3f})" for i in worse[:5])
            lines.append(f"warning: {len(worse)} neighbour pair(s) correlate less aligned than raw: {shown}"
                         + (f" and {len(worse) - 5} more" if len(worse) > 5 else "") + "; look at them")
    folded = [z for z in range(len(folds)) if folds[z] > fold_share]
    if folded:
        lines.append(f"sections whose field folds over on more than {fold_share:.1%} of their pixels: "
                     + ", ".join(f"{zs[z]} ({folds[z]:.2%})" for z in folded)
                     + " (a fold in the tissue folds the true field too)")
    return lines


def foldovers_spurious(field, truth, margin: int = 5) -> float:
    """The fraction of pixels whose map folds (``foldovers``) more than ``margin`` px (a square) from every pixel
    where the true field of the same section folds. field, truth: ``[Z, 2, H, W]`` px, in one frame."""
    fold = jacobian_determinant(to_tensor(field)) <= 0
    true_fold = dilated(jacobian_determinant(to_tensor(truth)) <= 0, margin)
    return float((fold & ~true_fold).float().mean())


def drift(field, truth, valid=None) -> dict[str, float]:
    """Length (px) of each section's mean displacement error: mean and max over the stack."""
    difference = to_tensor(field) - to_tensor(truth)
    if valid is None:
        mean = difference.mean((2, 3))
    else:
        weight = torch.as_tensor(valid, dtype=torch.float32)[:, None]
        mean = (difference * weight).sum((2, 3)) / weight.sum((2, 3)).clamp_min(1)
    length = mean.norm(dim=1)
    return {"drift_mean": float(length.mean()), "drift_max": float(length.max())}


def score(aligned, field=None, truth=None, defects=None, near: float = 20, chunk: int = 64) -> dict[str, float]:
    """Every measure of one aligned stack (those that need a truth only when it is given).

    aligned: ``[Z, H, W]``; field, truth: ``[Z, 2, H, W]`` (truth already in the frame
    of the alignment, see ``helpers.in_frame_of``); defects: ``[Z, H, W]`` image frame.
    The EPEs ``*_median`` and ``*_p95`` are in the first section's frame, ``*_common`` and ``*_excess`` in a
    common frame (``common_frame``: no section's error charged to the others).
    """
    out = {f"cpc_{k}": v for k, v in summarize(cpc(aligned, chunk)).items()}
    if field is not None:
        out["foldovers"] = foldovers(field)
    if field is not None and truth is not None:
        valid = ~missing_data(aligned)
        regions = defect_regions(defects_in_output_frame(defects, truth) if defects is not None else None, valid, near)
        out.update(_medians(vector_length(to_tensor(field) - to_tensor(truth)), regions))
        common = vector_length(common_frame(field, truth, valid) - to_tensor(truth))
        medians = _medians(common, regions)
        out.update({f"{region}_common": medians[f"{region}_median"] for region in regions})
        out.update(_excess(common, regions))
        out["foldovers_spurious"] = foldovers_spurious(field, truth)
        out.update(drift(field, truth, valid))
    return out


def warnings(rows: dict[str, dict[str, float]], reference: str, oracle_cpc: float | None = None,
             keep: float = 0.8) -> list[str]:
    """One line per suspect row of a table of ``score`` results (name -> measures).

    A row is suspect when it is no real improvement on the row ``reference`` (the
    unaligned stack): with a ground truth, its EPE far from defects is still at
    least ``keep`` of the reference's (it removed less than a fifth of the
    misalignment); without one, its mean CPC is not above the reference's. Also
    when its mean CPC is above ``oracle_cpc`` (by over 1e-3): it warps tissue.
    The reference itself and rows named "oracle..." are not judged, but any row
    without a CPC (no square free of missing data: a stack smaller than the CPC
    window, or mostly empty) is named, as the comparisons that need it are not made.
    """
    base, lines = rows[reference], []
    for name, row in rows.items():
        if np.isnan(row.get("cpc_mean", 0.0)):
            lines.append(f"warning: {name} has no CPC: no square of the CPC window is free of missing data in two "
                         "neighbouring sections (sections smaller than the window, or mostly without data)")
        if name == reference or name.startswith("oracle"):
            continue
        if "far_median" in row and "far_median" in base:
            if row["far_median"] >= keep * base["far_median"]:
                lines.append(f"warning: {name} is hardly better than no alignment (EPE far {row['far_median']:.2f} "
                             f"vs {base['far_median']:.2f} px): it drifts, or its network collapsed to the zero field "
                             "or was trained on other data")
        elif row["cpc_mean"] <= base["cpc_mean"]:
            lines.append(f"warning: {name} correlates no better than no alignment (CPC {row['cpc_mean']:.3f} vs "
                         f"{base['cpc_mean']:.3f}): its network may have collapsed to the zero field or been trained "
                         "on other data")
        if oracle_cpc is not None and row["cpc_mean"] > oracle_cpc + 1e-3:
            lines.append(f"warning: {name} has a CPC above the oracle's ({row['cpc_mean']:.3f} vs "
                         f"{oracle_cpc:.3f}): it warps tissue to match its neighbour")
    return lines


def content_offsets(stack, reach: int = 32, factor: int = 2) -> np.ndarray:
    """The shift ``[Z-1, 2]`` (px, x then y) that best matches each section's content onto the next one's.

    stack: ``[Z, H, W]`` whole sections (no missing data); ``shifts.best_shifts`` of
    each neighbour pair ``(z, z+1)``: the constant field that pulls section z onto
    z+1 (``helpers`` convention). On a registered stack it checks the
    registration: real tissue changes from section to section, but not by one
    shift of the whole section, so offsets well above a pixel or two mean the
    registration is off there, and an end-point error measured against it cannot
    be trusted below that.
    """
    return best_shifts(stack[:-1], stack[1:], reach, factor)


EPE_COLUMNS = ["far_median", "far_common", "far_p95", "near_median", "near_common", "near_excess", "inside_median",
               "inside_common", "inside_excess", "drift_mean"]  # score's EPE figures, as the tables print them


def print_table(rows: dict[str, dict[str, float]], columns: list[str], width: int = 120) -> str:
    """A fixed-width table of ``rows`` (name -> measures), printed; returns it as text too. Columns that would run
    past ``width`` characters go on in another block below, the names repeated, so a terminal does not wrap it."""
    widths = [max(10, len(c) + 2) for c in columns]
    first = max([28, *map(len, rows)]) + 1
    blocks, used = [[]], first
    for column, w in zip(columns, widths):
        if blocks[-1] and used + w > width:
            blocks.append([])
            used = first
        blocks[-1].append((column, w))
        used += w
    text = "\n\n".join(_table_block(rows, block, first) for block in blocks)
    print(text)
    return text


def _table_block(rows: dict[str, dict[str, float]], block: list[tuple[str, int]], first: int) -> str:
    """``print_table``'s lines for the columns ``block`` (name, width), after a name column ``first`` wide."""
    header = f"{'method':{first}s}" + "".join(f"{c:>{w}s}" for c, w in block)
    lines = [header, "-" * len(header)]
    for name, row in rows.items():
        lines.append(f"{name:{first}s}" + "".join(f"{row.get(c, float('nan')):{w}.4g}" for c, w in block))
    return "\n".join(lines)


def plot_cpc(histograms: dict[str, np.ndarray], path: Path) -> Path:
    """Overlaid CPC histograms, one per method."""
    fig, ax = pyplot().subplots(figsize=(7, 4))
    for name, values in histograms.items():
        ax.hist(values, bins=50, range=(-0.2, 1), histtype="step", density=True, label=name)
    ax.set_xlabel("Pearson r of neighbouring chunks")
    ax.set_ylabel("density")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return save_figure(fig, path)


def epe_figure(errors: dict[str, np.ndarray], decades: float = 2):
    """One panel per method: the end-point error map ``[H, W]`` (px) of one section, on one colour scale.

    The scale is logarithmic, from the 99th percentile of all panels (the raw's,
    as a rule) down ``decades`` powers of ten, so an aligned panel of tenths of
    a pixel shows beside a raw one of tens; lower and higher errors take the end
    colours. Each title states its panel's median; the colour bar is in px.
    """
    from matplotlib.colors import LogNorm

    top = max(float(np.percentile(np.concatenate([e.ravel() for e in errors.values()]), 99)), 1e-3)
    norm = LogNorm(vmin=top / 10 ** decades, vmax=top, clip=False)
    fig, axes = pyplot().subplots(1, len(errors), figsize=(3.2 * len(errors) + 1, 3.4), squeeze=False)
    for ax, (name, error) in zip(axes[0], errors.items()):
        image = ax.imshow(np.maximum(error, norm.vmin), norm=norm, cmap="magma")
        ax.set_title(f"{name}: median {np.median(error):.3g} px", fontsize="small")
        ax.axis("off")
    bar = fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, extend="both", label="end-point error (px)")
    plain_log_ticks(bar.ax.yaxis)
    return fig


def plot_epe_maps(errors: dict[str, np.ndarray], path: Path) -> Path:
    """``epe_figure`` of ``errors`` (method -> ``[H, W]`` px) written to ``path``."""
    return save_figure(epe_figure(errors), path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--aligned", required=True, help="destination of align.py (with image/ and field/ layers)")
    p.add_argument("--raw", help="the unaligned image volume, scored for comparison ('demo' for the demo)")
    p.add_argument("--truth", help="ground-truth field volume ('demo' for the demo's); needs --defects for "
                                   "the near/inside split (implied by 'demo')")
    p.add_argument("--defects", help="defect volume of the raw sections ('demo' for the demo's)")
    p.add_argument("--z_start", type=int, required=True)
    p.add_argument("--z_stop", type=int, required=True)
    p.add_argument("--bbox", type=int, nargs=4, metavar=("X0", "Y0", "X1", "Y1"),
                   help="score this region in voxels of the aligned stack (default: the whole sections): a part of a "
                        "volume too large to score at once")
    p.add_argument("--near", type=finite_float, default=20, help="px from a defect that count as near it")
    p.add_argument("--cpc_window", "--chunk", type=int, default=64,
                   help="side in px of the squares whose correlation with the next section is the CPC")
    p.add_argument("--plots", help="directory for the CPC histogram and EPE map PNGs")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import demo
    import volume

    args = parse_args(argv)
    if args.truth == "demo":
        args.defects = args.defects or "demo"
    args.raw, args.truth, args.defects = (demo.resolve(path, layer) for path, layer in
                                          ((args.raw, "image"), (args.truth, "field"), (args.defects, "defects")))

    if args.near < 0 or args.cpc_window < 8:
        raise UserError("--near must be >= 0 px and --cpc_window >= 8 px (a correlation over fewer pixels says little; "
                        "over 1 none is defined)")
    plots = check_writable(args.plots, "--plots", folder=True) if args.plots else None
    for name in ("cpc.png", "epe.png") if plots else ():  # before the scoring, not after it
        check_writable(plots / name, "--plots")
    aligned_vol = volume.open_volume(args.aligned.rstrip("/") + "/image")
    field_vol = volume.open_volume(args.aligned.rstrip("/") + "/field")
    volume.check_kind(aligned_vol, "image", "--aligned")
    volume.check_kind(field_vol, "field", "--aligned")
    start, stop = volume.bounds(aligned_vol)
    volume.check_z_range(args.z_start, args.z_stop, int(start[2]), int(stop[2]), vol=aligned_vol)
    if args.z_stop - args.z_start < 2:
        raise UserError(f"--z_start {args.z_start} --z_stop {args.z_stop}: CPC and drift compare sections with their "
                        "neighbours: give at least 2")
    mip = aligned_vol.mip
    x0, y0, x1, y1 = volume.check_bbox(args.bbox, aligned_vol)
    corner, size = (x0, y0, args.z_start), (x1 - x0, y1 - y0, args.z_stop - args.z_start)
    if args.cpc_window > min(size[:2]):
        raise UserError(f"--cpc_window {args.cpc_window} px: larger than the sections "
                        f"({size[0]} x {size[1]} px at mip {mip})")
    if args.near >= max(size[:2]):
        raise UserError(f"--near {args.near:g} px: every pixel of the {size[0]} x {size[1]} px sections would be near "
                        "a defect of theirs (far would score only the sections without one)")
    check_scoring_memory(size, bool(args.truth), machine_memory())
    for vol in aligned_vol, field_vol:
        _require_sections(vol, corner, size, "the aligned stack", "align.py never finished them")
    inputs = {name: _matching(path, aligned_vol, name, kind) for name, path, kind in
              (("truth", args.truth, "field"), ("defects", args.defects, "labels"), ("raw", args.raw, "image"))
              if path}
    for name, vol in inputs.items():
        _check_covers(vol, corner, size, f"--{name}")
    if "truth" in inputs:
        _require_sections(inputs["truth"], corner, size, "--truth")
    aligned = volume.read(aligned_vol, corner, size)[:, 0]
    zs = [z for z, section in enumerate(aligned, args.z_start) if section.any()]  # blank: no tissue, or a gap
    blank = sorted(set(range(args.z_start, args.z_stop)) - set(zs))
    if "raw" in inputs:
        _require_sections(inputs["raw"], corner, size, "--raw", "the aligned stack holds tissue there",
                          every_chunk=False, blank=blank)
    kept = [z - args.z_start for z in zs]  # the sections scored, as neighbours in turn
    if blank:
        print(f"blank sections (no tissue, or never written) left out: {spans(blank)}; the sections beside each gap "
              "are scored as neighbours")
    if len(kept) < 2:
        raise UserError(f"--z_start {args.z_start} --z_stop {args.z_stop}: fewer than 2 sections hold tissue")
    rows, hist = {}, {}
    truth = defects = None
    if args.truth:
        truth = in_frame_of(to_tensor(volume.read(inputs["truth"], corner, size)[kept]))
    if args.defects:  # chunks never written hold no defect
        defects = masks.check_defect_map(volume.read(inputs["defects"], corner, size)[kept, 0],
                                         f"--defects {args.defects}")
    oracle_cpc = None
    if args.raw:
        raw = masks.check_image(volume.read(inputs["raw"], corner, size)[kept, 0], f"--raw {args.raw}")
        rows[RAW] = score(raw, torch.zeros(len(raw), 2, *raw.shape[1:]), truth, defects, args.near, args.cpc_window)
        hist["raw"] = cpc(raw, args.cpc_window)
        if truth is not None:
            oracle = apply_field(raw, truth)  # the raw sections pulled by the true fields
            rows["oracle (ground truth)"] = score(oracle, truth, truth, defects, args.near, args.cpc_window)
            hist["oracle"] = cpc(oracle, args.cpc_window)
            oracle_cpc = rows["oracle (ground truth)"]["cpc_mean"]
    aligned, field = aligned[kept], volume.read(field_vol, corner, size)[kept]
    rows["aligned"] = score(aligned, field, truth, defects, args.near, args.cpc_window)
    hist["aligned"] = cpc(aligned, args.cpc_window)
    columns = (EPE_COLUMNS if truth is not None else []) + ["cpc_mean", "cpc_p5", "foldovers"]
    print(f"mip {mip}, sections {args.z_start}..{args.z_stop - 1}"
          + (f", region {x0} {y0} {x1} {y1}" if args.bbox else ""))
    print_table(rows, columns)
    for line in warnings(rows, RAW, oracle_cpc) if args.raw else []:
        print(line)
    raw_pairs = pair_cpc(raw, args.cpc_window) if args.raw else None
    for line in where_to_look(pair_cpc(aligned, args.cpc_window), raw_pairs, section_foldovers(field), zs):
        print(line)
    if plots:
        print(f"wrote {plot_cpc(hist, plots / 'cpc.png')}")
        if truth is not None:
            z = len(aligned) // 2
            maps = {name: vector_length(to_tensor(f[z]) - truth[z]).numpy()
                    for name, f in (("raw", np.zeros_like(field)), ("aligned", field))}
            print(f"wrote {plot_epe_maps(maps, plots / 'epe.png')}")
    return rows


EVALUATE_BYTES = 50  # what scoring holds per pixel of each section (the demo's 30 x 512²: 0.78 GB, 0.36 libraries)
TRUTH_BYTES = 35  # and more with --truth (EPE, the oracle: 1.02 GB)


def check_scoring_memory(size, truth: bool, memory: int | None) -> None:
    """``helpers.check_memory`` of scoring ``size`` ``(X, Y, Z)`` voxels (with a ``truth``): ``EVALUATE_BYTES`` (and
    ``TRUTH_BYTES``) per voxel; the message points to ``--bbox``."""
    check_memory(int(np.prod(size)) * (EVALUATE_BYTES + TRUTH_BYTES * truth), memory,
                 f"scoring {size[2]} sections of {size[0]} x {size[1]} px", "score a part: --bbox X0 Y0 X1 Y1, or "
                 "fewer sections")


def _matching(path: str, like, what: str, kind: str):
    """Open ``path`` (the ``--what`` volume, of ``volume.KINDS`` ``kind``) at the mip whose resolution matches the
    volume ``like``."""
    import volume

    base = volume.open_volume(path, 0)
    volume.check_kind(base, kind, f"--{what}")
    resolution = [float(r) for r in like.resolution]  # plain numbers: the message shows no numpy types
    for mip in range(len(base.info["scales"])):
        if list(base.meta.resolution(mip)) == resolution:
            vol = volume.open_volume(path, mip)
            volume.check_written(vol, f"--{what}")
            return vol
    raise UserError(f"the {what} volume {path} has no mip at resolution {resolution}")


def _check_covers(vol, corner, size, what: str) -> None:
    """``UserError`` naming ``what`` unless the volume ``vol`` covers the cutout (``volume.read``'s ``corner``,
    ``size``) of the aligned stack that is scored."""
    import volume

    start, stop = volume.bounds(vol)
    end = np.add(corner, size)
    if (np.asarray(corner) < start).any() or (end > stop).any():
        def extent(lo, hi):
            return f"x {lo[0]}..{hi[0] - 1}, y {lo[1]}..{hi[1] - 1}, sections {lo[2]}..{hi[2] - 1}"
        raise UserError(f"{what} {vol.cloudpath} covers {extent(start, stop)} at mip {vol.mip}, not all of the "
                        f"aligned stack's {extent(corner, end)} scored")


def _require_sections(vol, corner, size, what: str, why: str = "", every_chunk: bool = True, blank=()) -> None:
    """``UserError`` naming ``what``, the layer and the sections of the cutout (``volume.read``'s ``corner``, ``size``)
    that were never written (``volume.missing_sections``), but for those in ``blank`` (left out of the scores);
    ``why``: a likely cause, for the message."""
    import volume

    missing = [z for z in volume.missing_sections(vol, corner, size, every_chunk) if z not in blank]
    if missing:
        first, last = corner[2], corner[2] + size[2] - 1
        runs = [(a, b) for a, b in _runs(z for z in range(first, last + 1) if z not in missing) if b > a]  # 2 or more
        hint = (f": score the runs it holds one at a time ({' '.join(f'{a}..{b}' for a, b in runs)}; e.g. --z_start "
                f"{runs[0][0]} --z_stop {runs[0][1] + 1})" if runs else ": nothing to score")
        raise UserError(f"{what} {vol.cloudpath} lacks sections {spans(missing)} of {first}..{last}"
                        + (f" ({why})" if why else "") + hint)


def _runs(numbers) -> list[list[int]]:
    """Sorted integers as ``[first, last]`` runs of consecutive ones, e.g. ``[1, 2, 3, 7]`` -> ``[[1, 3], [7, 7]]``."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return runs


def spans(numbers) -> str:
    """Sorted integers as runs, e.g. ``[1, 2, 3, 7]`` -> ``'1..3 7'``."""
    return " ".join(f"{a}..{b}" if b > a else f"{a}" for a, b in _runs(numbers))


if __name__ == "__main__":
    run_main(main)
