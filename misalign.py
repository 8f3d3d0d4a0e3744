"""The generative model of section misalignment and defects, with its exact ground truth.

Physical model. The true (registered) section ``A`` is (1) torn or folded, giving ``B``, then (2)
misaligned as a whole on the grid (shift, rotation, smooth elastic stretch), giving the image ``M``.
With the pull convention of ``helpers``::

    B = warp(A, d)          M = warp(B, g)

and the ground-truth field that re-aligns ``M`` onto ``A`` is::

    f = compose(g_inv, d_inv)      g_inv = invert_field(g),  d_inv = the defect's analytic inverse

so ``warp(M, f) == A`` wherever there is tissue.

Defects. Both kinds sit on a *seam*: in a frame turned by a random angle, with ``u`` along the seam
and ``v`` across it (unit normal ``n``), the seam is ``v = c(u)``, ``c`` a smooth random curve, and
a taper ``t(u)`` in 0..1 fades the defect out at its two ends (which may lie off the canvas, so
that it spans the section). ``s = v - c(u)`` is the signed distance along ``n`` past the seam.

* Crack: the tissue past the seam is pulled away along ``n`` by the gap ``g(u) = G t(u)``. The gap
  shows no tissue (``crack_fill``) and is marked 1 in the defect map. ``d_inv(p) = g(u) n`` where
  ``s > 0``, else 0: the ground truth jumps by the gap at the seam.
* Fold: a band of tissue of width ``W(u) = W t(u)`` past the seam folds over into an image band of
  width ``w = W / ratio`` (ratio 3-5) that shows it compressed and much darker (``fold_darkness``),
  marked 2; the tissue beyond moves toward the seam by ``W - w``.
  ``d_inv(p) = -(1 - 1/ratio) clamp(s, 0, W(u)) n``: continuous.

Every step acts on a triple ``(image, defects, field)`` that keeps the invariant: ``image`` is a
deformation of the aligned truth ``A``, ``defects`` (uint8 ``[N, 1, H, W]``: 0 none, 1 crack,
2 fold) is in the image's frame, and ``field`` ``[N, 2, H, W]`` px re-aligns it:
``warp(image, field) == A``. A deformation with forward field ``e`` and inverse ``e_inv`` maps the
triple to ``(warp(image, e), warp(defects, e), compose(e_inv, field))``; a defect's ``e_inv`` is
evaluated analytically at the points ``p + field(p)``, so its jump stays sharp. Start from
``(A, zeros, zeros)``. ``add_cracks`` / ``add_folds`` / ``add_misalignment`` are the steps (data
augmentations), ``misalign`` the whole model; ``draw`` makes all its random draws for a stack first, so that
the stack can be misaligned a slab of sections at a time (``Draws``).

Images are uint8 (0..255) or float on a 0..1 scale, ``[N, C, H, W]``, and come back in their
dtype; 0 is missing data. All work is batched torch on the image's device; random draws come from
a CPU ``torch.Generator`` (or an int seed), so results are reproducible on any device. Tissue
pulled in from outside the canvas reads 0, so to avoid missing borders give ``misalign`` a canvas
padded by ``pad`` px on each side: it returns the central crop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from helpers import (UserError, affine_field, compose, downsample_field, finite_float, invert_field, pixel_grid,
                     rigid_matrix, smoothstep, uniform, upsample_field, warp, warp_labels)

CRACK, FOLD = 1, 2  # defect-map values
SEAM_MODES = 3      # sinusoids in a seam's curve

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class MisalignParams:
    """Parameters of the model; lengths in pixels, defaults for 8 nm/px ssEM sections."""

    max_shift: float = 10.0                         # translation, uniform in +-max per axis
    max_rotation: float = 0.02                      # radians about the centre, uniform in +-max
    elastic_amplitude: float = 2.5                  # RMS length of the smooth elastic field
    elastic_wavelength: float = 200.0               # its feature size
    crack_prob: float = 0.15                        # per section
    crack_gap: tuple[float, float] = (4.0, 12.0)    # gap G, uniform in this range
    crack_fill: float = 1.0                         # value shown in a gap, fraction of white
    fold_prob: float = 0.1                          # per section
    fold_width: tuple[float, float] = (10.0, 30.0)  # folded tissue width W
    fold_ratio: tuple[float, float] = (3.0, 5.0)    # W / w: compression of the folded band
    fold_darkness: float = 0.35                     # the band's brightness is multiplied by this
    seam_wander: float = 6.0                        # RMS sideways wander of a seam's curve


def add_fold_width_flag(parser, what: str) -> None:
    """``--fold_width LO HI`` (px of tissue each fold holds; the demo's by default) on ``parser`` (a parser or a
    group), its help starting with ``what``; ``with_fold_width`` turns it into parameters."""
    parser.add_argument("--fold_width", type=finite_float, nargs=2, metavar=("LO", "HI"),
                        default=MisalignParams.fold_width,
                        help=f"{what} px of tissue each fold holds, drawn between LO and HI (the demo's folds: the "
                             "default)")


def with_fold_width(lo_hi, params: MisalignParams = MisalignParams()) -> MisalignParams:
    """``params`` with folds of ``lo_hi`` = (LO, HI) px of tissue (``--fold_width``); a one-line ``UserError``
    unless 0 < LO <= HI."""
    lo, hi = lo_hi
    if not 0 < lo <= hi:
        raise UserError(f"--fold_width {lo:g} {hi:g}: expected 0 < LO <= HI px")
    return replace(params, fold_width=(float(lo), float(hi)))


# ----------------------------------------------------------------------- random fields
def smooth_field(n: int, h: int, w: int, amplitude: float, wavelength: float,
                 generator: torch.Generator | int | None = None) -> torch.Tensor:
    """A random smooth elastic field ``[N, 2, H, W]`` px (float32, CPU).

    Gaussian random vectors on a grid of spacing ~``wavelength / 2`` px spanning the image,
    interpolated bicubically, then scaled so that each section's RMS displacement length is
    exactly ``amplitude`` px.
    """
    return _smooth(_elastic_grid(n, h, w, wavelength, _generator(generator)), h, w, amplitude)


def _elastic_grid(n: int, h: int, w: int, wavelength: float, gen: torch.Generator) -> torch.Tensor:
    """``smooth_field``'s draw: Gaussian random vectors ``[N, 2, gh, gw]`` on a grid of spacing
    ~``wavelength / 2`` px spanning an ``H x W`` image."""
    spacing = wavelength / 2
    grid = (max(2, round((h - 1) / spacing) + 1), max(2, round((w - 1) / spacing) + 1))
    return torch.randn(n, 2, *grid, generator=gen)


def _smooth(grid: torch.Tensor, h: int, w: int, amplitude: float) -> torch.Tensor:
    """``smooth_field`` ``[N, 2, H, W]`` px from its draw ``grid`` ``[N, 2, gh, gw]``: interpolated
    bicubically, each section scaled to an RMS displacement length of ``amplitude`` px."""
    field = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=True)
    rms = field.pow(2).sum(1).mean((1, 2)).sqrt().view(-1, 1, 1, 1)
    return amplitude * field / rms.clamp_min(1e-12)


def random_misalignment(n: int, h: int, w: int, max_shift: float, max_rotation: float,
                        elastic_amplitude: float, elastic_wavelength: float,
                        generator: torch.Generator | int | None = None) -> torch.Tensor:
    """A random global misalignment ``[N, 2, H, W]`` px (float32, CPU).

    Translation uniform in ``+-max_shift`` px per axis, plus a rotation about the centre uniform in
    ``+-max_rotation`` rad, plus ``smooth_field(elastic_amplitude, elastic_wavelength)``.
    """
    draws = _draw_misalignment(n, h, w, max_shift, max_rotation, elastic_wavelength, _generator(generator))
    return _misalignment(*draws, h, w, elastic_amplitude)


def _draw_misalignment(n: int, h: int, w: int, max_shift: float, max_rotation: float, elastic_wavelength: float,
                       gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``random_misalignment``'s draws: shifts ``[N, 2]`` px, angles ``[N]`` rad, the elastic grid
    (``_elastic_grid``)."""
    shift = (2 * torch.rand(n, 2, generator=gen) - 1) * max_shift
    angle = (2 * torch.rand(n, generator=gen) - 1) * max_rotation
    return shift, angle, _elastic_grid(n, h, w, elastic_wavelength, gen)


def _misalignment(shift: torch.Tensor, angle: torch.Tensor, grid: torch.Tensor, h: int, w: int,
                  elastic_amplitude: float) -> torch.Tensor:
    """``random_misalignment`` ``[N, 2, H, W]`` px from its draws (``_draw_misalignment``)."""
    field = affine_field(rigid_matrix(angle, shift[:, 0], shift[:, 1]), h, w)
    return field + _smooth(grid, h, w, elastic_amplitude)


# ----------------------------------------------------------------------- the model
@dataclass
class Draws:
    """Every random draw of ``misalign`` for N sections. All are small (numbers and seams per section, the
    elastic fields' coarse grids), so a stack's draws can be made at once (``draw``) and its sections
    misaligned a few at a time (``misalign(slab, draws=draws[z0:z1])``), bit for bit as in one call, in slabs
    of at least two sections (torch sums a lone section's elastic field, for its RMS, in another order: over
    threads)."""

    cracks: tuple        # which [N] bool, seams, gaps [N] px: _draw_cracks
    folds: tuple         # which [N] bool, seams, widths [N] px, ratios [N]: _draw_folds
    misalignment: tuple  # shifts [N, 2] px, angles [N] rad, elastic grids [N, 2, gh, gw]: _draw_misalignment

    def __len__(self) -> int:
        return len(self.cracks[0])

    def __getitem__(self, index: slice) -> Draws:
        """The draws of sections ``index``."""
        return Draws(*(tuple(x.select(index) if isinstance(x, _Seam) else x[index] for x in part)
                       for part in (self.cracks, self.folds, self.misalignment)))


def draw(n: int, h: int, w: int, params: MisalignParams = MisalignParams(),
         generator: torch.Generator | int | None = None) -> Draws:
    """``misalign``'s draws for N sections on an ``H x W`` canvas (the padded one ``misalign`` is given)."""
    gen = _generator(generator)
    cracks = _draw_cracks(n, h, w, params, gen)
    folds = _draw_folds(n, h, w, params, gen)
    return Draws(cracks, folds, _draw_misalignment(n, h, w, params.max_shift, params.max_rotation,
                                                   params.elastic_wavelength, gen))


def misalign(aligned: torch.Tensor, params: MisalignParams = MisalignParams(),
             generator: torch.Generator | int | None = None, pad: int = 0, draws: Draws | None = None) -> Triple:
    """Apply the whole model to aligned sections.

    aligned: ``[N, C, H, W]`` uint8 or float (0..1), the truth on a canvas padded by ``pad`` px
    on each side. Returns ``(image, defects, field)`` cropped to ``[.., H - 2 pad, W - 2 pad]``:
    the image (the input's dtype), its defect map (uint8, 0 / 1 crack / 2 fold, in the image's frame)
    and the float32 ground-truth field with ``warp(image, field) == aligned`` (cropped) wherever
    there is tissue. Deterministic given ``generator`` (a ``torch.Generator`` or a seed), or given
    ``draws``, the N sections' draws (``draw``; ``generator`` is then unused).
    """
    image, dtype = _to_float(aligned)
    n, _, h, w = image.shape
    draws = draw(n, h, w, params, generator) if draws is None else draws
    if len(draws) != n:
        raise ValueError(f"draws for {len(draws)} sections, {n} sections given")
    defects = torch.zeros(n, 1, h, w, dtype=torch.uint8, device=image.device)
    field = torch.zeros(n, 2, h, w, device=image.device)
    triple = _crack(image, defects, field, *draws.cracks, params.crack_fill)
    triple = _fold(*triple, *draws.folds, params.fold_darkness)
    image, defects, field = _misalign(*triple, *draws.misalignment, params.elastic_amplitude)
    crop = (..., slice(pad, h - pad), slice(pad, w - pad))
    return _from_float(image[crop], dtype), defects[crop].contiguous(), field[crop].contiguous()


def add_misalignment(image: torch.Tensor, defects: torch.Tensor, field: torch.Tensor,
                     params: MisalignParams = MisalignParams(),
                     generator: torch.Generator | int | None = None) -> Triple:
    """Misalign every section by its own ``random_misalignment`` g (see the module docstring).

    Returns ``(warp(image, g), warp(defects, g), compose(invert_field(g), field))``; the inverse is
    taken on a 4x coarser grid (``_invert_smooth``).
    """
    n, _, h, w = image.shape
    draws = _draw_misalignment(n, h, w, params.max_shift, params.max_rotation, params.elastic_wavelength,
                               _generator(generator))
    return _misalign(image, defects, field, *draws, params.elastic_amplitude)


def _misalign(image: torch.Tensor, defects: torch.Tensor, field: torch.Tensor, shift: torch.Tensor,
              angle: torch.Tensor, grid: torch.Tensor, elastic_amplitude: float) -> Triple:
    """``add_misalignment`` with its draws (``_draw_misalignment``)."""
    g = _misalignment(shift, angle, grid, *image.shape[-2:], elastic_amplitude).to(image.device)
    x, dtype = _to_float(image)
    return (_from_float(warp(x, g), dtype), warp_labels(defects, g),
            compose(_invert_smooth(g), field))


def add_cracks(image: torch.Tensor, defects: torch.Tensor, field: torch.Tensor,
               params: MisalignParams = MisalignParams(),
               generator: torch.Generator | int | None = None,
               which: torch.Tensor | None = None) -> Triple:
    """Tear the sections ``which`` (bool ``[N]``; default each with ``params.crack_prob``).

    See the module docstring for the model and the triple; returns the updated triple.
    """
    drawn, seam, gap = _draw_cracks(image.shape[0], *image.shape[-2:], params, _generator(generator))
    return _crack(image, defects, field, drawn if which is None else which, seam, gap, params.crack_fill)


def _draw_cracks(n: int, h: int, w: int, params: MisalignParams, gen: torch.Generator) -> tuple:
    """``add_cracks``' draws for N sections of ``H x W`` px: which to tear (``_draw_seams``), the seams, the gaps
    ``[N]`` px."""
    drawn, seam = _draw_seams(n, h, w, params.crack_prob, params.seam_wander, gen)
    return drawn, seam, uniform(params.crack_gap, gen, n)


def _crack(image: torch.Tensor, defects: torch.Tensor, field: torch.Tensor, which: torch.Tensor, seam: _Seam,
           gap: torch.Tensor, fill: float) -> Triple:
    """``add_cracks`` with its draws: tear the sections ``which`` (bool ``[N]``) along their seams, opening gaps of
    ``gap`` ``[N]`` px that show ``fill``."""
    index, seam, gap = _chosen(which, seam, gap, device=image.device)

    def forward(s, taper):
        return -gap * taper * (s >= gap * taper), (s >= 0) & (s < gap * taper)

    def inverse(s, taper):
        return gap * taper * (s > 0)

    return _tear(image, defects, field, index, seam, forward, inverse,
                 lambda x: torch.full_like(x, fill), CRACK)


def add_folds(image: torch.Tensor, defects: torch.Tensor, field: torch.Tensor,
              params: MisalignParams = MisalignParams(),
              generator: torch.Generator | int | None = None,
              which: torch.Tensor | None = None) -> Triple:
    """Fold the sections ``which`` (bool ``[N]``; default each with ``params.fold_prob``).

    See the module docstring for the model and the triple; returns the updated triple.
    """
    drawn, seam, width, ratio = _draw_folds(image.shape[0], *image.shape[-2:], params, _generator(generator))
    return _fold(image, defects, field, drawn if which is None else which, seam, width, ratio,
                 params.fold_darkness)


def _draw_folds(n: int, h: int, w: int, params: MisalignParams, gen: torch.Generator) -> tuple:
    """``add_folds``' draws for N sections of ``H x W`` px: which to fold (``_draw_seams``), the seams, the folded
    widths ``[N]`` px and compression ratios ``[N]``."""
    drawn, seam = _draw_seams(n, h, w, params.fold_prob, params.seam_wander, gen)
    width = uniform(params.fold_width, gen, n)
    return drawn, seam, width, uniform(params.fold_ratio, gen, n)


def _fold(image: torch.Tensor, defects: torch.Tensor, field: torch.Tensor, which: torch.Tensor, seam: _Seam,
          width: torch.Tensor, ratio: torch.Tensor, darkness: float) -> Triple:
    """``add_folds`` with its draws: fold the sections ``which`` (bool ``[N]``) along their seams, bands of
    ``width`` ``[N]`` px into ``width / ratio``, darkened by ``darkness``."""
    index, seam, width, ratio = _chosen(which, seam, width, ratio, device=image.device)

    def forward(s, taper):
        band = width * taper / ratio
        return (ratio - 1) * torch.minimum(s.clamp_min(0), band), (s >= 0) & (s < band)

    def inverse(s, taper):
        return -(1 - 1 / ratio) * torch.minimum(s.clamp_min(0), width * taper)

    def darken(x):  # tissue stays tissue: at least one grey level
        return torch.where(x > 0, (x * darkness).clamp_min(1 / 255), x)

    return _tear(image, defects, field, index, seam, forward, inverse, darken, FOLD)


# ----------------------------------------------------------------------- seams
@dataclass
class _Seam:
    """Random seams, one per section: geometry of cracks and folds (see the module docstring)."""

    angle: torch.Tensor       # [N] direction of u, rad; n is u turned by +90 degrees
    origin: torch.Tensor      # [N, 2] px (x, y): the point u = v = 0
    amplitude: torch.Tensor   # [N, K] px, sinusoids of the curve c(u)
    frequency: torch.Tensor   # [N, K] rad / px
    phase: torch.Tensor       # [N, K] rad
    centre: torch.Tensor      # [N] px: middle of the defect along u
    length: torch.Tensor      # [N] px: its length; the taper ramps over a quarter at each end

    @staticmethod
    def random(n: int, h: int, w: int, wander: float, gen: torch.Generator) -> _Seam:
        """Seams that cross the canvas within a quarter of its size from the centre."""
        size = math.sqrt(h * w)
        angle = 2 * math.pi * torch.rand(n, generator=gen)
        centre = torch.tensor([(w - 1) / 2, (h - 1) / 2])
        offset = (0.5 * torch.rand(n, 1, generator=gen) - 0.25) * size
        origin = centre + offset * torch.stack([-torch.sin(angle), torch.cos(angle)], 1)
        wavelength = size * (0.3 + 0.7 * torch.rand(n, SEAM_MODES, generator=gen))
        return _Seam(angle, origin,
                     amplitude=torch.full((n, SEAM_MODES), wander * math.sqrt(2 / SEAM_MODES)),
                     frequency=2 * math.pi / wavelength,
                     phase=2 * math.pi * torch.rand(n, SEAM_MODES, generator=gen),
                     centre=(0.6 * torch.rand(n, generator=gen) - 0.3) * size,
                     length=(0.6 + torch.rand(n, generator=gen)) * size)

    def to(self, device) -> _Seam:
        """The same seams on ``device``."""
        return _Seam(*(getattr(self, k).to(device) for k in self.__dataclass_fields__))

    def select(self, index: torch.Tensor) -> _Seam:
        """The seams of sections ``index``."""
        return _Seam(*(getattr(self, k)[index] for k in self.__dataclass_fields__))

    def normal(self) -> torch.Tensor:
        """Unit normals ``n`` ``[N, 2, 1, 1]`` (x, y): the side ``s > 0`` is the one that moves."""
        return torch.stack([-torch.sin(self.angle), torch.cos(self.angle)], 1)[:, :, None, None]

    def coordinates(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``s`` (px past the seam along ``n``) and taper ``t(u)`` in 0..1, both ``[N, H, W]``,
        at points ``[N, 2, H, W]`` (absolute px, x and y)."""
        rel = points - self.origin[:, :, None, None]
        cos, sin = torch.cos(self.angle)[:, None, None], torch.sin(self.angle)[:, None, None]
        u = rel[:, 0] * cos + rel[:, 1] * sin
        v = rel[:, 1] * cos - rel[:, 0] * sin
        curve = torch.zeros_like(u)
        for k in range(SEAM_MODES):
            curve += self.amplitude[:, k, None, None] * torch.sin(
                self.frequency[:, k, None, None] * u + self.phase[:, k, None, None])
        ramp = (self.length / 4)[:, None, None]
        start = (self.centre - self.length / 2)[:, None, None]
        end = (self.centre + self.length / 2)[:, None, None]
        taper = smoothstep((u - start) / ramp) * smoothstep((end - u) / ramp)
        return v - curve, taper


def _draw_seams(n: int, h: int, w: int, prob: float, wander: float,
                gen: torch.Generator) -> tuple[torch.Tensor, _Seam]:
    """Which of N sections to damage, each with ``prob`` (bool ``[N]``), and random seams for all N (so that
    the draws do not depend on which sections a caller damages)."""
    drawn = torch.rand(n, generator=gen) < prob
    return drawn, _Seam.random(n, h, w, wander, gen)


def _chosen(which: torch.Tensor, seam: _Seam, *values: torch.Tensor, device) -> tuple:
    """Indices ``[M]`` (CPU) of the sections ``which`` (bool ``[N]``), their seams and their ``values`` (each
    ``[N]`` -> ``[M, 1, 1]``) on ``device``."""
    index = which.cpu().bool().nonzero().flatten()
    return index, seam.select(index).to(device), *(v[index].to(device)[:, None, None] for v in values)


def _tear(image: torch.Tensor, defects: torch.Tensor, field: torch.Tensor, index: torch.Tensor,
          seam: _Seam, forward, inverse, paint, mark: int) -> Triple:
    """Apply seam defects to sections ``index`` ``[M]``; the rest pass through unchanged.

    ``forward(s, taper) -> (shift, band)``, ``[M, H, W]`` each: the forward field along ``n`` (px)
    and the image band (bool) that ``paint(image values) -> values`` repaints and ``mark`` labels.
    ``inverse(s, taper) -> shift``: the inverse field along ``n``, evaluated at ``p + field(p)``.
    """
    if len(index) == 0:
        return image, defects, field
    index = index.to(image.device)
    x, dtype = _to_float(image[index])
    h, w = x.shape[-2:]
    normal = seam.normal()
    grid = pixel_grid(h, w, x.device)
    shift, band = forward(*seam.coordinates(grid.expand(len(index), -1, -1, -1)))
    e = shift[:, None] * normal
    x = warp(x, e)
    x = torch.where(band[:, None], paint(x), x)
    d = warp_labels(defects[index], e).masked_fill(band[:, None], mark)
    f = field[index] + inverse(*seam.coordinates(grid + field[index]))[:, None] * normal
    image, defects, field = image.clone(), defects.clone(), field.clone()
    image[index], defects[index], field[index] = _from_float(x, dtype), d, f
    return image, defects, field


# ----------------------------------------------------------------------- small helpers
def _generator(generator: torch.Generator | int | None) -> torch.Generator:
    """A CPU generator: the one given, a fresh one seeded with an int, or torch's default."""
    if isinstance(generator, torch.Generator):
        return generator
    if generator is None:
        return torch.default_generator
    return torch.Generator().manual_seed(int(generator))


def _to_float(image: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    """A float32 image on a 0..1 scale, and the dtype it had."""
    scale = 255 if image.dtype == torch.uint8 else 1
    return image.float() / scale, image.dtype


def _from_float(image: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float32 image on a 0..1 scale back to ``dtype`` (uint8: rounded to 0..255)."""
    if dtype == torch.uint8:
        return (image * 255).round().clamp(0, 255).to(torch.uint8)
    return image.to(dtype)


def _invert_smooth(field: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """``invert_field`` of a smooth field ``[N, 2, H, W]`` px, computed ``factor`` x coarser (the
    largest of 4, 2, 1 that divides H and W) and upsampled: ``factor**2`` times cheaper, and for
    the default misalignments within ~0.02 px of the full-resolution inverse (~0.15 px in the
    outermost 4 px)."""
    while factor > 1 and (field.shape[-1] % factor or field.shape[-2] % factor):
        factor //= 2
    return upsample_field(invert_field(downsample_field(field, factor)), factor)
