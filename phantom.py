"""A synthetic 3-D phantom of neuropil cut into serial sections: the demo volume's aligned truth.

Model. Lengths are image pixels (~8 nm); a section is ``section_px`` = 5 px (40 nm) thick, and
section ``k`` is the plane ``z = k * section_px`` of one 3-D object, so neighbouring sections differ
the way real ones do.

* Neurites are the cells of a 3-D power diagram (a weighted Voronoi diagram) of seeds on a jittered
  grid, taken in a space squeezed ``cell_length`` times along z: each neurite persists over many
  sections, drifts sideways, starts and ends. A share of 2x2x2 blocks of cells are merged into one
  fat, irregular neurite. Space is bent by a smooth random warp (random Fourier modes, at two
  scales) before the diagram is taken, so membranes curve and wobble. A point's nearest seeds lie
  in the 3x3x3 grid cells around it, so the diagram is one vectorised pass.
* Membranes are dark within ``membrane_width`` of a face between two neurites; a face that crosses
  the section obliquely is smeared over its projection through the section's thickness (fainter,
  wider); corners where three neurites meet round into small dark gaps.
* Mitochondria are dark spheroids with striped cristae, running mostly along z, centred on the
  seeds of a share of the neurites and kept inside them, away from their membrane.
* Vesicles are small dark rings, drawn independently in each section (a 40 nm vesicle lives in one
  section), packed inside some neurites (boutons).
* Nuclei are occasional large light spheroids with a double envelope in a shell of soma cytoplasm.
* Imaging: brightness ``exp(-stain density)``, uneven illumination and gain per section, a slight
  blur and shot noise.

The smooth geometry is computed on a grid ``lowres`` times coarser and upsampled; the distance to
the membrane, which has a kink on the membrane, is evaluated exactly at full resolution for the few
candidate neurites found on the coarse grid.

With the defaults, grey levels have mean ~131 and std ~43 and consecutive sections a Pearson r of
~0.45-0.5 (whole images), falling to ~0.1 five sections apart; real registered ssEM has 126 / 44 /
0.2 (ISBI 2012: 4 nm px, 50 nm sections) and 131 / 48 / 0.5 (SNEMI3D: 6 nm px, 30 nm sections).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from helpers import gaussian_blur, smoothstep

CANDIDATES = 3  # neurite seeds kept per coarse pixel: enough near a junction of three
NEIGHBOURS = torch.stack(torch.meshgrid(*[torch.arange(-1, 2)] * 3, indexing="ij")).reshape(3, -1).T
SOMA_SHELL = 25.0  # px of soma cytoplasm around a nucleus
MITO_MARGIN = 4.0  # px between a mitochondrion and its neurite's membrane


@dataclass(frozen=True)
class PhantomParams:
    """Knobs of the phantom; lengths in pixels, defaults for ssEM at 8 nm x 40 nm."""

    cell_size: float = 42.0         # seed spacing across neurites
    cell_length: float = 1.5        # neurites are this many times longer along z than across
    merge_fraction: float = 0.25    # share of 2x2x2 seed blocks merged into one fat neurite
    section_px: float = 5.0         # section thickness (40 nm / 8 nm)
    bend: float = 12.0              # RMS per axis of the warp that curves membranes
    bend_wavelength: float = 160.0  # its wavelength
    wobble: float = 2.0             # RMS per axis of a finer warp that makes membranes wavy
    wobble_wavelength: float = 45.0
    membrane_width: float = 2.0     # full width at half darkness
    mito_fraction: float = 0.3      # share of neurite seeds that hold a mitochondrion
    vesicle_fraction: float = 0.1   # share of neurites that are boutons full of vesicles
    nucleus_spacing: float = 700.0  # at most one nucleus per grid cell of this size
    nucleus_fraction: float = 0.5   # share of those grid cells that hold one
    noise: float = 0.05             # shot noise: std = noise * sqrt(brightness), brightness 0..1
    lowres: int = 4                 # coarse-grid factor for the smooth geometry


@dataclass
class _Grid:
    """One seed per cell of a jittered grid covering some points, with per-seed attributes."""

    spacing: torch.Tensor  # [3] (x, y, z) px
    lo: torch.Tensor       # [3] int64: index of the grid's first cell
    dims: torch.Tensor     # [3] int64: cells along x, y, z
    pos: torch.Tensor      # [3, S] seed positions, px
    attr: dict = field(default_factory=dict)  # name -> [S] or [3, S] tensor

    def cell(self, q: torch.Tensor) -> torch.Tensor:
        """Integer grid cell ``[3, ...]`` holding points ``q`` ``[3, ...]`` px."""
        return torch.floor(q / self.spacing.view(3, *[1] * (q.dim() - 1))).long()

    def seed(self, cell: torch.Tensor) -> torch.Tensor:
        """Seed index ``[...]`` of grid cells ``[3, ...]`` (clamped into the grid)."""
        shape = (3, *[1] * (cell.dim() - 1))
        cell = torch.minimum((cell - self.lo.view(shape)).clamp_min(0), self.dims.view(shape) - 1)
        return (cell[2] * self.dims[1] + cell[1]) * self.dims[0] + cell[0]


def make_phantom(shape: tuple[int, int, int] = (16, 256, 256), seed: int = 0,
                 params: PhantomParams = PhantomParams()) -> np.ndarray:
    """Aligned ssEM-like sections of one 3-D neuropil phantom: uint8 ``[Z, H, W]``, values 1..255.

    Deterministic in ``seed``. Section ``k`` is the plane ``z = k * params.section_px`` (px).
    Vectorised over chunks of ~1 Mpx: (4, 64, 64) takes ~0.01 s and (100, 608, 608) ~9 s of one
    CPU core, 0.7 GB.
    """
    out = np.empty(shape, np.uint8)
    for start, sections in phantom_chunks(shape, seed, params):
        out[start:start + len(sections)] = sections
    return out


def phantom_chunks(shape: tuple[int, int, int] = (16, 256, 256), seed: int = 0,
                   params: PhantomParams = PhantomParams()) -> Iterator[tuple[int, np.ndarray]]:
    """``make_phantom(shape, seed, params)`` a few sections at a time, in order: ``(first section, uint8
    [z, H, W])`` for chunks of ~1 Mpx (at least one section). Memory: the chunk's, plus the coarse 3-D
    geometry of the whole stack (~``Z * H * W / lowres**2 * 24`` bytes).
    """
    for start, geometry, cells, gen in _sections(shape, seed, params):
        yield start, _render(geometry, cells, params, gen).numpy()


def neurite_labels(shape: tuple[int, int, int] = (16, 256, 256), seed: int = 0,
                   params: PhantomParams = PhantomParams()) -> np.ndarray:
    """The ground-truth segmentation of ``make_phantom(shape, seed, params)``: uint32 ``[Z, H, W]``.

    One id (>= 1) per neurite, the same in every section it crosses; 0 in nuclei and their soma
    shells. Neighbouring neurites meet in the middle of the dark membrane between them.
    """
    out = np.empty(shape, np.uint32)
    for start, geometry, _, _ in _sections(shape, seed, params):
        label = torch.where(geometry["nucleus"] < SOMA_SHELL, 0, geometry["label"] + 1)
        out[start:start + len(label)] = label.numpy().astype(np.uint32)
    return out


def _sections(shape: tuple[int, int, int], seed: int, params: PhantomParams):
    """Yield ``(first section, geometry, neurite grid, generator)`` for chunks of sections.

    The 3-D object is drawn first from ``seed``; the generator then serves the rendering noise.
    """
    z_n, height, width = shape
    gen = torch.Generator().manual_seed(seed)
    f = params.lowres
    p = _coarse_points(z_n, -(-height // f), -(-width // f), f, params.section_px)
    q = (p + _bend(p, params.bend, params.bend_wavelength, gen)
         + _bend(p, params.wobble, params.wobble_wavelength, gen))  # [3, Z, h, w] px
    cells = _cell_grid(q, params, gen)
    _add_mitos(cells, params, gen)
    nuclei = _nucleus_grid(q, params, gen)
    chunk = max(1, 2 ** 20 // (height * width))
    for start in range(0, z_n, chunk):
        yield start, _geometry(q[:, start:start + chunk], cells, nuclei, params, height, width), \
            cells, gen


# ------------------------------------------------------------------------------ geometry
def _coarse_points(z_n: int, h: int, w: int, f: int, section_px: float) -> torch.Tensor:
    """Positions ``[3, Z, h, w]`` (x, y, z px) of the coarse pixels' centres in all sections."""
    x = torch.arange(w) * f + (f - 1) / 2
    y = torch.arange(h) * f + (f - 1) / 2
    z = torch.arange(z_n) * section_px
    zz, yy, xx = torch.meshgrid(z.float(), y.float(), x.float(), indexing="ij")
    return torch.stack([xx, yy, zz])


def _bend(p: torch.Tensor, amplitude: float, wavelength: float, gen: torch.Generator,
          modes: int = 6) -> torch.Tensor:
    """Smooth random displacement ``[3, ...]`` px at points ``p`` ``[3, ...]``: Fourier modes.

    RMS ``amplitude`` per axis; wavelengths 0.7-1.4x ``wavelength``, random directions.
    """
    out = torch.zeros_like(p)
    for axis in range(3):
        direction = F.normalize(torch.randn(modes, 3, generator=gen), dim=1)
        length = wavelength * (0.7 + 0.7 * torch.rand(modes, generator=gen))
        omega = 2 * math.pi * direction / length[:, None]
        phase = 2 * math.pi * torch.rand(modes, generator=gen)
        for k in range(modes):
            out[axis] += torch.sin(torch.einsum("c,c...->...", omega[k], p) + phase[k])
    return out * amplitude * math.sqrt(2 / modes)


def _jittered_grid(q: torch.Tensor, spacing: tuple[float, float, float], jitter: float,
                   gen: torch.Generator) -> tuple[_Grid, torch.Tensor]:
    """A grid of ``spacing`` px covering points ``q`` ``[3, ...]`` with one cell of margin.

    Each seed sits at its cell's centre plus ``U(-jitter, jitter)`` cells per axis. Returns the
    grid and the integer cell coordinates ``[3, S]`` of its seeds.
    """
    spacing_t = torch.tensor(spacing, dtype=torch.float32)
    flat_q = q.reshape(3, -1)
    lo = torch.floor(flat_q.min(1).values / spacing_t).long() - 1
    dims = torch.floor(flat_q.max(1).values / spacing_t).long() + 2 - lo
    iz, iy, ix = torch.meshgrid(*[torch.arange(int(d)) for d in dims.flip(0)], indexing="ij")
    index = torch.stack([ix, iy, iz]).reshape(3, -1) + lo[:, None]
    offset = (2 * torch.rand(index.shape, generator=gen) - 1) * jitter
    return _Grid(spacing_t, lo, dims, (index + 0.5 + offset) * spacing_t[:, None]), index


def _squeeze(q: torch.Tensor, params: PhantomParams, inverse: bool = False) -> torch.Tensor:
    """Points ``[3, ...]`` px with z divided (``inverse``: multiplied) by ``cell_length``:
    neurites are isotropic cells in this squeezed space."""
    z_scale = params.cell_length if inverse else 1 / params.cell_length
    return q * torch.tensor([1.0, 1.0, z_scale]).view(3, *[1] * (q.dim() - 1))


def _cell_grid(q: torch.Tensor, params: PhantomParams, gen: torch.Generator) -> _Grid:
    """Neurite seeds in squeezed space, with power weights, neurite labels and per-label looks."""
    s = params.cell_size
    grid, index = _jittered_grid(_squeeze(q, params), (s, s, s), 0.35, gen)
    n = index.shape[1]
    grid.attr["weight"] = (s * 0.3 * torch.rand(n, generator=gen) ** 2) ** 2
    block = torch.unique(torch.div(index, 2, rounding_mode="floor"), dim=1, return_inverse=True)[1]
    merged = torch.rand(int(block.max()) + 1, generator=gen) < params.merge_fraction
    grid.attr["label"] = torch.where(merged[block], n + block, torch.arange(n))
    labels = n + len(merged)  # per-label looks, indexed by label
    dark = torch.rand(labels, generator=gen) < 0.06
    grid.attr["density"] = torch.where(dark, 0.75 + 0.2 * torch.rand(labels, generator=gen),
                                       0.4 + 0.15 * torch.rand(labels, generator=gen))
    grid.attr["texture"] = 0.1 + 0.1 * torch.rand(labels, generator=gen)
    grid.attr["bouton"] = (torch.rand(labels, generator=gen) < params.vesicle_fraction).float()
    return grid


def _add_mitos(cells: _Grid, params: PhantomParams, gen: torch.Generator) -> None:
    """Give a share of neurite seeds a mitochondrion (in place): a spheroid on the seed's axis.

    Its centre is the seed, moved along z by up to half a cell; its long axis runs mostly along z;
    its radius leaves ``MITO_MARGIN`` px to the seed's nearest face within the section.
    """
    n = cells.pos.shape[1]
    radius = torch.minimum(12 + 12 * torch.rand(n, generator=gen),
                           0.8 * _seed_room(cells) - MITO_MARGIN)
    length = radius * (2 + 3 * torch.rand(n, generator=gen))
    tilt = torch.cat([0.4 * torch.randn(2, n, generator=gen), torch.ones(1, n)])
    axis = F.normalize(tilt, dim=0)
    shift = torch.tensor([0.0, 0.0, 1.0])[:, None] * (torch.rand(n, generator=gen) - 0.5)
    centre = _squeeze(cells.pos + shift * cells.spacing[2], params, inverse=True)
    cross = torch.linalg.cross(axis, torch.randn(3, n, generator=gen), dim=0)
    cells.attr.update(
        mito=(torch.rand(n, generator=gen) < params.mito_fraction) & (radius > 4),
        mito_centre=centre, mito_radius=radius, mito_length=length, mito_axis=axis,
        cristae=F.normalize(cross, dim=0))  # cristae stripes run across this direction


def _seed_room(cells: _Grid) -> torch.Tensor:
    """In-plane px ``[S]`` from each neurite seed to the nearest face of its own cell."""
    room = torch.full((cells.pos.shape[1],), float("inf"))
    own_power = -cells.attr["weight"]
    home = cells.cell(cells.pos)
    for offset in NEIGHBOURS[(NEIGHBOURS != 0).any(1), :, None]:
        other = cells.seed(home + offset)
        normal = cells.pos[:, other] - cells.pos
        power = (normal ** 2).sum(0) - cells.attr["weight"][other]
        across = normal[:2].norm(dim=0).clamp_min(1e-6)  # 0 where the grid's edge clamps: room 0
        room = torch.minimum(room, (power - own_power) / (2 * across))
    return room


def _nucleus_grid(q: torch.Tensor, params: PhantomParams, gen: torch.Generator) -> _Grid:
    """Nuclei: large, rare spheroids, at most one per grid cell.

    Across, a nucleus stays inside its grid cell; along z it may reach into the cells above and
    below (it is shorter than one cell).
    """
    s = params.nucleus_spacing
    grid, _ = _jittered_grid(q, (s, s, s), 0.0, gen)
    n = grid.pos.shape[1]
    radius = 70 + 50 * torch.rand(n, generator=gen)
    length = radius * (1 + 0.5 * torch.rand(n, generator=gen))
    axis = F.normalize(torch.randn(3, n, generator=gen), dim=0)
    extent = torch.sqrt(radius ** 2 + (length ** 2 - radius ** 2) * axis ** 2)  # [3, S] half-size
    room = torch.cat([s / 2 - extent[:2], torch.full((1, n), s / 2)])
    grid.pos = grid.pos + (2 * torch.rand(grid.pos.shape, generator=gen) - 1) * room
    grid.attr.update(present=torch.rand(n, generator=gen) < params.nucleus_fraction,
                     radius=radius, length=length, axis=axis)
    return grid


def _nearest_cells(q: torch.Tensor, cells: _Grid, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed ``[...]`` of least power distance to squeezed points ``q`` ``[3, ...]``, and the
    ``k`` seeds ``[k, ...]`` of least power distance."""
    power, index = [], []
    home = cells.cell(q)
    for offset in NEIGHBOURS.view(27, 3, *[1] * (q.dim() - 1)):
        idx = cells.seed(home + offset)
        power.append(((q - cells.pos[:, idx]) ** 2).sum(0) - cells.attr["weight"][idx])
        index.append(idx)
    best = torch.stack(power, -1).topk(k, dim=-1, largest=False).indices
    nearest = torch.stack(index, -1).gather(-1, best).movedim(-1, 0)
    return nearest[0], nearest


def _spheroid_distance(q: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor,
                       length: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """Approximate px ``[...]`` from points ``q`` ``[3, ...]`` to the surface of spheroids with
    ``centre`` / ``axis`` ``[3, ...]`` and semi-axes ``radius`` across, ``length`` along
    ``[...]`` (negative inside)."""
    rel = q - centre
    along = (rel * axis).sum(0)
    across2 = ((rel ** 2).sum(0) - along ** 2).clamp_min(0)
    return (torch.sqrt(across2 / radius ** 2 + along ** 2 / length ** 2) - 1) * radius


def _nearest_nucleus(q: torch.Tensor, nuclei: _Grid) -> torch.Tensor:
    """Approximate px ``[...]`` from points ``q`` ``[3, ...]`` to the nearest nucleus (negative
    inside, 1e4 where there is none)."""
    best = torch.full(q.shape[1:], 1e4)
    home = nuclei.cell(q)
    for dz in (-1, 0, 1):  # a nucleus reaches at most one grid cell up or down
        idx = nuclei.seed(home + torch.tensor([0, 0, dz]).view(3, *[1] * (q.dim() - 1)))
        a = nuclei.attr
        dist = _spheroid_distance(q, nuclei.pos[:, idx], a["radius"][idx], a["length"][idx],
                                  a["axis"][:, idx])
        best = torch.minimum(best, torch.where(a["present"][idx], dist, 1e4))
    return best


def _upsample(x: torch.Tensor, f: int, height: int, width: int, mode: str) -> torch.Tensor:
    """Coarse ``[C, z, h, w]`` -> ``[C, z, height, width]``, ``bilinear`` or ``nearest``."""
    if mode == "nearest":
        out = x.repeat_interleave(f, -1).repeat_interleave(f, -2)
    else:
        out = F.interpolate(x.transpose(0, 1), scale_factor=f, mode="bilinear",
                            align_corners=False).transpose(0, 1)
    return out[..., :height, :width]


def _membranes(q: torch.Tensor, candidates: torch.Tensor, cells: _Grid, params: PhantomParams,
               height: int, width: int) -> tuple[torch.Tensor, ...]:
    """Neurite label, in-plane px to the nearest membrane, membrane darkness 0..1, own seed.

    ``q``: coarse bent points ``[3, z, h, w]`` px; ``candidates``: ``[K, z, h, w]`` seeds nearest
    to them (``_nearest_cells``); outputs ``[z, height, width]``. A face of the
    power diagram is a plane in squeezed space; its in-plane distance is exact. Its darkness is a
    Gaussian of the 3-D distance, widened by the section's thickness where the face is oblique.
    """
    f = params.lowres
    squeezed = _squeeze(q, params)
    candidates = _upsample(candidates, f, height, width, "nearest")
    fine = _upsample(squeezed, f, height, width, "bilinear")[:, None]  # [3, 1, z, H, W]
    seeds = cells.pos[:, candidates]  # [3, K, z, H, W]
    power = ((fine - seeds) ** 2).sum(0) - cells.attr["weight"][candidates]
    own_power, own = power.min(0, keepdim=True)
    normal = seeds - seeds.gather(1, own[None].expand(3, *own.shape))  # faces' normals, squeezed
    across2 = normal[0] ** 2 + normal[1] ** 2
    upright2 = across2 / (across2 + (normal[2] / params.cell_length) ** 2)  # sin^2 of face tilt
    wall = (power - own_power) / (2 * across2.sqrt())  # in-plane px to each face
    sigma = params.membrane_width / 2.355  # Gaussian of that full width at half maximum
    spread = torch.sqrt(sigma ** 2 + params.section_px ** 2 * (1 - upright2) / 12)
    reach = wall * upright2.sqrt() / spread  # 3-D distance to each face in units of its spread
    labels = cells.attr["label"][candidates]
    own_label = labels.gather(0, own)
    inner = labels == own_label  # own seed, or a seed of the same merged neurite: no membrane
    wall, reach = wall.masked_fill(inner, float("inf")), reach.masked_fill(inner, float("inf"))
    spread = spread.masked_fill(inner, sigma)
    least, nearest = reach.min(0, keepdim=True)
    least = least.clamp(max=1e4)  # finite even where no face is near
    rounding = 2.0  # soft minimum over faces: corners round into dark gaps
    soft = least - rounding * torch.log(torch.exp((least - reach) / rounding).sum(0, keepdim=True))
    darkness = (sigma / spread.gather(0, nearest) * torch.exp(-soft.clamp_min(0) ** 2 / 2))[0]
    return own_label[0], wall.min(0).values, darkness, candidates.gather(0, own)[0]


def _geometry(q: torch.Tensor, cells: _Grid, nuclei: _Grid, params: PhantomParams,
              height: int, width: int) -> dict:
    """Full-resolution geometry ``[z, height, width]`` of sections with coarse bent points ``q``.

    ``label``, ``wall``, ``membrane``: see ``_membranes``; ``mito``: px outside a mitochondrion
    (negative inside); ``cristae``: px along its cristae direction; ``nucleus``: px outside a
    nucleus (negative inside).
    """
    f = params.lowres
    seed, candidates = _nearest_cells(_squeeze(q, params), cells, CANDIDATES)
    label, wall, membrane, own = _membranes(q, candidates, cells, params, height, width)
    a = cells.attr
    mito = _spheroid_distance(q, a["mito_centre"][:, seed], a["mito_radius"][seed],
                              a["mito_length"][seed], a["mito_axis"][:, seed])
    mito = torch.where(a["mito"][seed], mito, 1e4)
    cristae = ((q - a["mito_centre"][:, seed]) * a["cristae"][:, seed]).sum(0)
    smooth = _upsample(torch.stack([mito, cristae, _nearest_nucleus(q, nuclei)]), f, height, width,
                       "bilinear")
    mine = _upsample(seed[None], f, height, width, "nearest")[0] == own  # the mito's own cell
    mito = torch.where(mine, torch.maximum(smooth[0], MITO_MARGIN - wall), 1e4)
    return {"label": label, "wall": wall, "membrane": membrane, "mito": mito,
            "cristae": smooth[1], "nucleus": smooth[2]}


# ------------------------------------------------------------------------------ appearance
def _smooth_noise(z_n: int, height: int, width: int, size: int, gen: torch.Generator,
                  mode: str = "bicubic") -> torch.Tensor:
    """Random texture ``[z, H, W]``, std ~0.8, features ~``size`` px (an upsampled random grid)."""
    coarse = torch.randn(z_n, 1, height // size + 3, width // size + 3, generator=gen)
    up = F.interpolate(coarse, scale_factor=size, mode=mode, align_corners=False)
    return up[:, 0, size:size + height, size:size + width]


def _dot_kernels() -> tuple[torch.Tensor, torch.Tensor]:
    """Stains ``[7, 7]`` of a vesicle (a dark ring ~5 px across) and of a speck (a dot)."""
    y, x = torch.meshgrid(torch.arange(-3.0, 4), torch.arange(-3.0, 4), indexing="ij")
    r = torch.hypot(x, y)
    return 0.8 * torch.exp(-((r - 2.2) / 0.7) ** 2), 0.5 * torch.exp(-r ** 2)


def _stamp(centres: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Sum of copies of ``kernel`` ``[k, k]`` (k odd) centred on the True pixels of ``centres``
    ``[z, H, W]``: a convolution, by scattering, for sparse centres."""
    z, y, x = centres.nonzero(as_tuple=True)
    r = kernel.shape[0] // 2
    dy, dx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    yy, xx = y[:, None] + dy.flatten(), x[:, None] + dx.flatten()
    inside = (yy >= 0) & (yy < centres.shape[1]) & (xx >= 0) & (xx < centres.shape[2])
    out = torch.zeros(centres.shape)
    values = kernel.flatten().expand_as(yy)
    out.index_put_((z[:, None].expand_as(yy)[inside], yy[inside], xx[inside]), values[inside],
                   accumulate=True)
    return out


def _nucleus_layers(nucleus: torch.Tensor, sigma: float, mottle: torch.Tensor,
                    grain: torch.Tensor) -> tuple:
    """Stain of nuclei and their soma shells from ``nucleus`` (px outside a nucleus) ``[z, H, W]``.

    Returns ``(in_nucleus, in_neuropil, density)``: weights 0..1 and the added stain of
    nucleoplasm, the double envelope and the soma membrane; plain numbers where no nucleus is near.
    """
    if bool((nucleus > SOMA_SHELL + 3 * sigma).all()):
        return 0.0, 1.0, 0.0
    in_nucleus = smoothstep(-nucleus, -1.0, 1.0)
    in_neuropil = smoothstep(nucleus, SOMA_SHELL - 1, SOMA_SHELL + 1)
    chromatin = 0.35 + 0.12 * mottle + 0.06 * grain + 0.35 * torch.exp(-((nucleus + 8) / 4) ** 2)
    lines = sum(torch.exp(-((nucleus - at) / sigma) ** 2 / 2) for at in (0.0, -4.0, SOMA_SHELL))
    return in_nucleus, in_neuropil, in_nucleus * chromatin + 1.3 * lines


def _render(geo: dict, cells: _Grid, params: PhantomParams, gen: torch.Generator) -> torch.Tensor:
    """Sections uint8 ``[z, H, W]`` (1..255) of the geometry of ``_geometry``."""
    label, wall = geo["label"], geo["wall"]
    z_n, height, width = label.shape
    grain = _smooth_noise(z_n, height, width, 2, gen, "bilinear")
    mottle = _smooth_noise(z_n, height, width, 10, gen)
    sigma = params.membrane_width / 2.355
    in_nucleus, in_neuropil, nucleus = _nucleus_layers(geo["nucleus"], sigma, mottle, grain)
    outside = 1 - in_nucleus

    cytoplasm = cells.attr["density"][label] * in_neuropil + 0.45 * (1 - in_neuropil)
    cytoplasm = cytoplasm + cells.attr["texture"][label] * (grain + 0.6 * mottle)
    in_mito = smoothstep(-geo["mito"], -0.7, 0.7) * outside
    cristae = 0.5 + 0.5 * torch.cos(2 * math.pi * geo["cristae"] / 7 + 0.7 * grain)
    mito = in_mito * (0.45 + 0.35 * cristae) + 0.7 * torch.exp(-geo["mito"] ** 2) * outside
    density = outside * cytoplasm + 1.3 * geo["membrane"] * in_neuropil + mito + nucleus

    bouton = cells.attr["bouton"][label] * smoothstep(wall, 3, 5) * in_neuropil
    vesicles = 0.04 * bouton * (1 - in_mito) * (0.6 + 0.6 * mottle).clamp(0, 1)
    specks = 0.003 * outside * (1 - in_mito) * smoothstep(wall, 1, 2)
    draw = torch.rand(z_n, height, width, generator=gen)
    ring, dot = _dot_kernels()
    density = density + _stamp(draw < vesicles, ring) + _stamp(draw > 1 - specks, dot)

    gain = torch.exp(0.06 * torch.randn(z_n, 1, 1, generator=gen))
    light = gain * (1 + 0.08 * _smooth_noise(z_n, height, width, max(height, width) // 2, gen,
                                             "bilinear"))
    bright = gaussian_blur(torch.exp(-density) * light, 0.6)
    shot = params.noise * bright.clamp_min(0).sqrt() * torch.randn(bright.shape, generator=gen)
    return ((bright + shot) * 255).round().clamp(1, 255).to(torch.uint8)
