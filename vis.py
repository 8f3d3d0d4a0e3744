"""Pictures of training and alignment: flickers, field colour maps, weights, loss curves (matplotlib / PIL).

All functions take one sample (no batch axis) and write files; none is on a hot path.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from helpers import field_to_rgb, save_chunk, to_numpy


def save_pair_pictures(out_dir: Path, tag: str, source, target, warped, field, weights=None) -> list[Path]:
    """Write ``tag_flicker.gif`` (target / warped source / source), ``tag_field.png`` and ``tag_weights.png``.

    source, target, warped: ``[H, W]`` (or ``[1, H, W]``) float; field ``[2, H, W]`` pixels;
    weights ``[H, W]`` float or None.
    """
    out_dir = Path(out_dir)
    frames = np.stack([np.squeeze(to_numpy(a)) for a in (target, warped, source)])
    lo, hi = np.percentile(frames, [1, 99])
    frames = np.clip((frames - lo) / max(hi - lo, 1e-6), 0, 1)
    written = [save_chunk(frames, out_dir / f"{tag}_flicker"),
               save_chunk(field_to_rgb(field), out_dir / f"{tag}_field")]
    if weights is not None:
        written.append(save_chunk(np.squeeze(to_numpy(weights)), out_dir / f"{tag}_weights"))
    return written


def plot_loss_curves(curves: list[tuple[str, dict[str, list[float]]]], path: Path) -> Path:
    """One panel per loss term; each ``(name, {term: values})`` is a line, consecutive along x.

    Used by net_hist.py to draw a whole lineage, root first.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = sorted({t for _, history in curves for t in history})
    fig, axes = plt.subplots(len(terms), 1, figsize=(8, 2.5 * len(terms)), squeeze=False, sharex=True)
    start = 0
    for name, history in curves:
        length = max((len(v) for v in history.values()), default=0)
        for ax, term in zip(axes[:, 0], terms):
            values = history.get(term, [])
            ax.plot(range(start, start + len(values)), values, label=name)
            ax.set_ylabel(term)
        start += length
    for ax in axes[:, 0]:
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize="small")
    axes[-1, 0].set_xlabel("epoch (whole lineage)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
