"""Pictures of training and alignment: flickers, field colour maps with their key, weights, loss curves.

Fields are coloured as RAFT's ``flow_viz`` colours optical flow (the Middlebury
colour wheel of Baker et al.): hue is the direction of a vector, saturation its
length (white: no displacement, the pure hue: the wheel's rim length), and a
vector longer than the rim is drawn in the darkened hue. Every field picture
carries its key: the wheel with its axes in pixels and the largest length.

All functions take one sample (no batch axis) and write files or return figures;
none is on a hot path. matplotlib and PIL are imported where they are used.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from helpers import to_numpy

_WHEEL_SEGMENTS = (15, 6, 4, 11, 13, 6)  # red-yellow, yellow-green, green-cyan, cyan-blue, blue-magenta, magenta-red
_BEYOND_RIM = 0.75  # brightness of a vector longer than the rim (RAFT's)
_WHEEL_REACH = 1.25  # the key shows lengths up to this many rims
# a training history's term -> (the term holding its value with no alignment, drawn dashed on its panel; legend)
BASELINES = {"val_epe": ("val_epe_zero_field", "zero field"), "similarity": ("identity", "unaligned pair")}
# a training history's term -> (panel title, y-axis unit)
TERMS = {"similarity": ("similarity penalty", "cost"), "smoothness": ("smoothness penalty", "cost"),
         "consensus": ("consensus penalty", "px²"), "total": ("total cost", "cost"),
         "epe": ("end-point error against the known field", "px (at the loss level)"),
         "field_px": ("mean field length", "px"), "val_epe": ("held-out end-point error", "px"),
         "data_share": ("share of pixels the similarity scores", "fraction")}


# ----------------------------------------------------------------- files and figures
def to_uint8(image) -> np.ndarray:
    """Stretch a float image (any shape) to ``uint8`` by the min and max of its finite values (others: 0); ``uint8``
    passes through."""
    a = to_numpy(image)
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float32)
    finite = np.isfinite(a)
    lo, hi = (float(a[finite].min()), float(a[finite].max())) if finite.any() else (0.0, 0.0)
    return np.where(finite, np.clip((a - lo) / max(hi - lo, 1e-8) * 255, 0, 255), 0).astype(np.uint8)


def save_chunk(chunk, path: str | Path, frame_ms: int = 400) -> Path:
    """Save a picture, whatever its type (tensor or array, float or uint8).

    ``[H, W]`` (or ``[1, H, W]`` / ``[1, 1, H, W]``) grey, or ``[H, W, 3]`` RGB, as a
    PNG; ``[T, H, W]`` as an animated GIF of T frames (a flicker). The extension
    is set from what is saved.
    """
    from PIL import Image

    a = to_numpy(chunk)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if a.ndim == 3 and a.shape[-1] != 3:
        frames = [Image.fromarray(f) for f in to_uint8(a)]
        path = path.with_suffix(".gif")
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    else:
        path = path.with_suffix(".png")
        Image.fromarray(to_uint8(a)).save(path)
    return path


def pyplot():
    """``matplotlib.pyplot`` drawing off screen (the Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plain_log_ticks(axis) -> None:
    """Label a logarithmic matplotlib ``axis`` at 1, 2, 3 and 5 times each power of ten, as plain numbers."""
    from matplotlib import ticker

    axis.set_major_locator(ticker.LogLocator(subs=(1, 2, 3, 5)))
    axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    axis.set_minor_formatter(ticker.NullFormatter())


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure to ``path`` (PNG, 100 dpi; folders made), close it, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


# ----------------------------------------------------------------- field colours
def _wheel_colours() -> np.ndarray:
    """The 55 colours ``[55, 3]`` (0..1) of the Middlebury colour wheel, in RAFT's order (red first)."""
    up = [np.floor(255 * np.arange(n) / n) / 255 for n in _WHEEL_SEGMENTS]  # each segment's rising ramp
    one, zero = np.ones_like, np.zeros_like
    segments = [(one(up[0]), up[0], zero(up[0])), (1 - up[1], one(up[1]), zero(up[1])),  # red-yellow-green
                (zero(up[2]), one(up[2]), up[2]), (zero(up[3]), 1 - up[3], one(up[3])),  # green-cyan-blue
                (up[4], zero(up[4]), one(up[4])), (one(up[5]), zero(up[5]), 1 - up[5])]  # blue-magenta-red
    return np.concatenate([np.stack(channels, 1) for channels in segments])


def field_to_rgb(field, rim: float | None = None) -> np.ndarray:
    """Colour picture ``[H, W, 3]`` uint8 of one field ``[2, H, W]`` (px): hue = direction, saturation = length.

    rim: the length (px) drawn in the pure hue; shorter vectors are paler (0 is
    white), longer ones darker. Default: the field's 99th-percentile length
    (``rim_length``), so the picture shows shape, not scale. A vector pointing
    +x is red, +y (down the rows) yellow, -x sky blue, -y violet. A vector that is not finite (a diverged
    network's) is drawn as 0.
    """
    u, v = _components(field)
    rim = rim_length(field) if rim is None else rim
    length = np.hypot(u, v) / max(rim, 1e-6)
    colours = _wheel_colours()
    position = (np.arctan2(-v, -u) / np.pi + 1) / 2 * (len(colours) - 1)
    k0 = np.floor(position).astype(int)
    f = (position - k0)[..., None]
    rgb = (1 - f) * colours[k0] + f * colours[(k0 + 1) % len(colours)]
    inside = (length <= 1)[..., None]
    rgb = np.where(inside, 1 - length[..., None] * (1 - rgb), rgb * _BEYOND_RIM)
    return np.floor(255 * rgb).astype(np.uint8)


# RAFT's colour wheel in GLSL, for a Neuroglancer image layer of a field (2 channels: x, y in px): as field_to_rgb,
# the wheel's six ramps (_WHEEL_SEGMENTS) interpolated, white at 0, the pure hue at the rim, darkened beyond it.
FIELD_SHADER = """#uicontrol float rim slider(min=0.5, max=100, step=0.5, default=10)
vec3 wheel(float p) {
  if (p < 15.0) return vec3(1.0, p / 15.0, 0.0);
  if (p < 21.0) return vec3(1.0 - (p - 15.0) / 6.0, 1.0, 0.0);
  if (p < 25.0) return vec3(0.0, 1.0, (p - 21.0) / 4.0);
  if (p < 36.0) return vec3(0.0, 1.0 - (p - 25.0) / 11.0, 1.0);
  if (p < 49.0) return vec3((p - 36.0) / 13.0, 0.0, 1.0);
  return vec3(1.0, 0.0, 1.0 - (p - 49.0) / 6.0);
}
void main() {
  float u = getDataValue(0);
  float v = getDataValue(1);
  float reach = sqrt(u * u + v * v) / rim;
  vec3 hue = wheel((atan(-v, -u) / 3.14159265 + 1.0) / 2.0 * 54.0);
  emitRGB(reach <= 1.0 ? vec3(1.0) - reach * (vec3(1.0) - hue) : hue * %s);
}
""" % _BEYOND_RIM


def neuroglancer_state(image: str, field: str) -> dict:
    """A Neuroglancer viewer state (JSON values) of an aligned stack: the layer ``image`` and, half transparent over
    it, ``field`` coloured as ``field_to_rgb`` colours one (``FIELD_SHADER``; its rim is a slider, 10 px at first).

    image, field: Neuroglancer data sources, e.g. ``precomputed://gs://bucket/dest/image``.
    """
    return {"layers": [{"type": "image", "source": image, "name": "image"},
                       {"type": "image", "source": field, "name": "field", "shader": FIELD_SHADER, "opacity": 0.5}],
            "layout": "xy", "selectedLayer": {"layer": "field", "visible": True}}


def _components(field) -> tuple[np.ndarray, np.ndarray]:
    """``(u, v)`` float32 ``[H, W]`` (px) of a field ``[2, H, W]``, a value that is not finite as 0."""
    u, v = np.nan_to_num(to_numpy(field).astype(np.float32)[-2:], nan=0, posinf=0, neginf=0)
    return u, v


def rim_length(field) -> float:
    """The default rim of ``field_to_rgb``: the 99th-percentile length (px) of a field ``[2, H, W]``."""
    u, v = _components(field)
    return max(float(np.percentile(np.hypot(u, v), 99)), 1e-6)


def colour_wheel(size: int = 101, reach: float = _WHEEL_REACH) -> np.ndarray:
    """The key of ``field_to_rgb``: ``[size, size, 3]`` uint8, the picture of the field whose vector is the position.

    Positions run from ``-reach`` to ``reach`` rims along x (to the right) and y
    (down, as in every picture of an image): the centre pixel is the zero vector,
    the circle of radius 1 the rim, the ring beyond it the darkened longer
    vectors; outside the disc of radius ``reach`` is white.
    """
    axis = np.linspace(-reach, reach, size, dtype=np.float32)
    position = np.stack(np.meshgrid(axis, axis, indexing="xy"))  # [2, size, size]: x, y
    rgb = field_to_rgb(position, rim=1.0)
    rgb[np.hypot(*position) > reach] = 255
    return rgb


def field_figure(field, title: str = "field"):
    """A matplotlib figure of one field ``[2, H, W]`` (px) with its key.

    Left, the field coloured by ``field_to_rgb`` (axes in px of the field); right,
    the colour wheel with axes in px (its rim: the 99th-percentile length). The
    title states the largest length in px.
    """
    plt = pyplot()
    u, v = to_numpy(field).astype(np.float32)[-2:]
    rim, largest = rim_length(field), float(np.hypot(u, v).max())
    fig, (ax, key) = plt.subplots(1, 2, figsize=(7, 4.2), gridspec_kw=dict(width_ratios=(3, 1)))
    ax.imshow(field_to_rgb(field, rim), interpolation="nearest")
    ax.set_title(f"{title}: largest length {largest:.3g} px", fontsize="medium")
    ax.set_xlabel("x (px)")
    ax.set_ylabel("y (px)")
    reach = _WHEEL_REACH * rim
    key.imshow(colour_wheel(), extent=(-reach, reach, reach, -reach))
    key.set_title(f"key: rim {rim:.3g} px\n(99th percentile)", fontsize="small")
    key.set_xlabel("x (px)", fontsize="small")
    key.set_ylabel("y (px)", fontsize="small")
    key.tick_params(labelsize="small")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------- training pictures
def save_pair_pictures(out_dir: Path, tag: str, source, target, warped, field, weights=None) -> list[Path]:
    """Write ``tag_flicker.gif`` (target / warped source / source), ``tag_field.png`` and ``tag_weights.png``.

    source, target, warped: ``[H, W]`` (or ``[1, H, W]``) float; field ``[2, H, W]`` pixels,
    drawn by ``field_figure`` (with its key); weights ``[H, W]`` float or None.
    """
    out_dir = Path(out_dir)
    frames = np.stack([np.squeeze(to_numpy(a)) for a in (target, warped, source)])
    lo, hi = np.percentile(frames, [1, 99])
    frames = np.clip((frames - lo) / max(hi - lo, 1e-6), 0, 1)
    written = [save_chunk(frames, out_dir / f"{tag}_flicker"),
               save_figure(field_figure(field, f"{tag} field"), out_dir / f"{tag}_field.png")]
    if weights is not None:
        written.append(save_chunk(np.squeeze(to_numpy(weights)), out_dir / f"{tag}_weights"))
    return written


def plot_loss_curves(curves: list[tuple[str, dict[str, list[float]]]], path: Path) -> Path:
    """``loss_curves_figure`` of ``curves`` written to ``path``."""
    return save_figure(loss_curves_figure(curves), path)


def loss_curves_figure(curves: list[tuple[str, dict[str, list[float]]]]):
    """One panel per loss term; each ``(name, {term: values})`` is a line, consecutive along x.

    Used by net_hist.py to draw a whole lineage, root first. A term's zero-field
    value (``BASELINES``: ``val_epe_zero_field`` for ``val_epe``) is drawn dashed on
    its panel, so a net that collapsed to the zero field shows as the two lines
    meeting. Every panel has its tick labels, its unit and a logarithmic y axis
    where all its values are positive.
    """
    from matplotlib import ticker

    plt = pyplot()
    drawn = {t for _, history in curves for t in history}
    terms = sorted(drawn - {baseline for term, (baseline, _) in BASELINES.items() if term in drawn})
    fig, axes = plt.subplots(len(terms), 1, figsize=(8, 2.5 * len(terms)), squeeze=False)
    start = 0
    for name, history in curves:
        length = max((len(v) for v in history.values()), default=0)
        for ax, term in zip(axes[:, 0], terms):
            values = history.get(term, [])
            line, = ax.plot(range(start, start + len(values)), values, label=name)
            baseline, meaning = BASELINES.get(term, (None, ""))
            if history.get(baseline):
                ax.plot(range(start, start + len(history[baseline])), history[baseline], "--",
                        color=line.get_color(), label=f"{name}: {meaning}")
        start += length
    for ax, term in zip(axes[:, 0], terms):
        meaning, unit = TERMS.get(term, ("", ""))
        ax.set_title(f"{term}: {meaning}" if meaning else term, fontsize="medium", loc="left")
        ax.set_ylabel(unit)
        if all(y > 0 for line in ax.get_lines() for y in line.get_ydata()):
            ax.set_yscale("log")
            plain_log_ticks(ax.yaxis)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[-1, 0].set_xlabel("epoch (whole lineage)")
    fig.tight_layout()
    return fig
