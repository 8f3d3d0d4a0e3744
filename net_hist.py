"""Print the training history of a network archive, root ancestor first.

    python net_hist.py pt/EXPERIMENT.pt [--plot curves.png]
    python net_hist.py                  # list the archives in pt/
"""
from __future__ import annotations

import argparse
from pathlib import Path

from helpers import UserError, check_writable, run_main
from models.archive import lineage, load_archive, read_archive, save_archive

SHOWN = ("lambda1", "lambda2", "lambda3", "lambda4", "lambda5", "lambda6", "lambda_gt",
         "mask_neighborhood_radius", "mask_smooth_radius", "lr", "size", "trunc", "dataset")


def format_entry(depth: int, entry: dict) -> str:
    """A few lines describing one run of a lineage: its settings, the flags each resume changed, its final losses."""
    params = entry.get("params", {})
    shown = " ".join(f"{k}={params[k]}" for k in SHOWN if params.get(k) is not None)
    final = " ".join(f"{k}={v:.4g}" for k, v in entry.get("final", {}).items())
    resumes = "".join(f"\n{'  ' * depth}   resumed at epoch {r['epoch']} ({r.get('date', '?')}): "
                      + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in r["changed"].items())
                      for r in entry.get("resumes", []))
    return (f"{'  ' * depth}{'└─ ' if depth else ''}{entry['name']}  ({entry.get('date', '?')}, "
            f"{entry.get('iterations', 0)} iterations)\n"
            f"{'  ' * depth}   {shown}{resumes}\n{'  ' * depth}   final: {final or '-'}")


def _other_kind(path: Path) -> str:
    """What a ``.pt`` file that is no aligner's archive is, in a few words."""
    from detect_defects import load_detector

    try:
        load_detector(path)
    except UserError:
        return "not a readable SEAMLeSS archive"
    return "a defect detector: detect_defects.py --archive"


def list_archives(folder: Path) -> str:
    rows = []
    for path in sorted(folder.glob("*.pt")):
        try:
            entry = read_archive(path)["summary"]
            rows.append(f"{path.name:32s} {entry.get('date', '?'):17s} {entry.get('iterations', 0):7d} it")
        except (UserError, KeyError):
            rows.append(f"{path.name:32s} ({_other_kind(path)})")
    return "\n".join(rows) or f"no archives in {folder}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("archive", nargs="?", help="network archive (.pt); without it, list pt/")
    p.add_argument("--plot", help="also draw the loss curves of the whole lineage to this PNG")
    p.add_argument("--export", help="write a copy without the optimizer state to this path (to ship: a third "
                                    "of the size; it aligns and fine-tunes as the original does, and a --resume "
                                    "from it starts the optimizer afresh)")
    args = p.parse_args(argv)
    if args.archive is None:
        print(list_archives(Path("pt")))
        return
    if args.export and Path(args.export).exists():
        raise UserError(f"--export {args.export} exists: choose a new path (an archive is never overwritten)")
    for flag, path in (("--export", args.export), ("--plot", args.plot)):
        if path:
            check_writable(path, flag)
    if args.plot:
        from matplotlib.backend_bases import FigureCanvasBase
        if Path(args.plot).suffix.lower().lstrip(".") not in FigureCanvasBase.get_supported_filetypes():
            raise UserError(f"--plot {args.plot}: not a picture file matplotlib writes (e.g. .png, .pdf, .svg)")
    archive = read_archive(args.archive)
    if "summary" not in archive:
        raise UserError(f"{args.archive} holds weights but no training history")
    entries = lineage(archive)
    print("\n".join(format_entry(depth, entry) for depth, entry in enumerate(entries)))
    if "averaged" in archive:  # train.py --average_from's pt/NAME.avg.pt
        mean = archive["averaged"]
        print(f"   these weights: the mean of epochs {mean['from']}..{mean['from'] + mean['epochs'] - 1}"
              + (f", val_epe={mean['val_epe']:.4g}" if "val_epe" in mean else ""))
    if args.export:
        model, _ = load_archive(args.archive)
        keep = {k: v for k, v in archive.items() if k not in ("kind", "version", "config", "state_dict")}
        print(f"wrote {save_archive(args.export, model, **{**keep, 'optimizer': None})}")
    if args.plot:
        from vis import plot_loss_curves
        path = plot_loss_curves([(e["name"], e.get("history", {})) for e in entries], args.plot)
        print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main)
