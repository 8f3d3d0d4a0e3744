"""Training pairs from a ``gen_stack.py`` HDF5 file and their augmentation.

HDF5 layout (written by ``gen_stack.py``):

* ``images`` uint8 ``(N, S, D, D)``: N stacks of S consecutive sections, 0 = missing data;
* ``masks`` uint8 ``(N, S, D, D)``, optional: defect maps (0 none, 1 crack, 2 fold);
* ``fields`` float32 ``(N, S, 2, D, D)``, optional: per-section ground-truth fields
  (pixels at the dataset's mip) with ``warp(images[n, s], fields[n, s])`` = the true section;
* ``slice_std`` float32 ``(N, S)``, optional: std of each section's tissue pixels;
* attribute ``registered`` (``gen_stack.py --registered``): the source was registered, so
  the true fields are zero and known even without a ``fields`` dataset.

A *sample* is one pair (source = section s, target = section s + 1) of one stack.
While it is augmented it is a dict of batch-free tensors in raw intensities:

* ``src``, ``tgt`` float32 ``[1, H, W]``: grey values 1..255 on tissue, 0 where missing;
* ``src_defects``, ``tgt_defects`` uint8 ``[1, H, W]``: defect maps;
* ``field`` float32 ``[2, H, W]``: pixels, ``warp(src, field) ~ tgt``;
* ``has_field`` bool ``[]``: whether ``field`` is known (zeros otherwise).

``StackDataset`` then normalises the images (``helpers.normalise``) and adds ``src_missing``,
``tgt_missing`` (bool ``[1, H, W]``) and ``src_mask``, ``tgt_mask`` (ternary uint8
``[1, H, W]``, ``masks.ternary_mask``). Augmentations work on raw intensities so the
network always sees images normalised exactly as at alignment time.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

import masks
import misalign
from helpers import (UserError, affine_field, compose, gaussian_blur, invert_field, normalise, rigid_matrix, slice_std,
                     to_tensor, uniform, warp_labels, warp_tissue)

Sample = dict[str, torch.Tensor]
SLICES = ("src", "tgt")


# --------------------------------------------------------------------------- the dataset
def _open_h5(path: Path) -> h5py.File:
    """Open ``path`` read-only, or raise ``UserError`` saying in one line why it cannot be."""
    if not path.is_file():
        raise UserError(f"dataset {path} does not exist")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise UserError(f"dataset {path} is not a readable HDF5 file ({err})") from None


def _check_layout(f: h5py.File, path: Path) -> None:
    """Raise ``UserError`` unless ``f`` holds ``images`` (N, S, D, D) uint8 and matching optional datasets."""
    if "images" not in f:
        raise UserError(f"dataset {path} has no 'images' (expected a file written by gen_stack.py)")
    for name in ("images", "masks", "fields", "slice_std"):
        if name in f and not isinstance(f[name], h5py.Dataset):
            raise UserError(f"dataset {path}: '{name}' is an HDF5 group, not an array (expected a gen_stack.py file)")
    shape = f["images"].shape
    if len(shape) != 4 or f["images"].dtype != np.uint8:
        raise UserError(f"dataset {path}: 'images' must be uint8 (N, S, H, W), got {f['images'].dtype} {shape}")
    if shape[0] < 1 or shape[1] < 2:
        raise UserError(f"dataset {path} holds {shape[0]} stacks of {shape[1]} sections: no pair to train or score on")
    expected = {"masks": shape, "fields": (*shape[:2], 2, *shape[2:]), "slice_std": shape[:2]}
    for name, want in expected.items():
        if name in f and f[name].shape != want:
            raise UserError(f"dataset {path}: '{name}' has shape {f[name].shape}, expected {want}")
    if "masks" in f and f["masks"].dtype != np.uint8:
        raise UserError(f"dataset {path}: 'masks' must be uint8 defect maps (0 none, 1 crack, 2 fold), got "
                        f"{f['masks'].dtype}")


class StackDataset(Dataset):
    """Consecutive section pairs of every stack of a ``gen_stack.py`` HDF5 file.

    ``dataset[i]`` is a dict of tensors for pair ``pairs[i] = (stack n, section s)``,
    source = section s, target = section s + 1:

    * ``src``, ``tgt`` float32 ``[1, H, W]``: normalised (``helpers.normalise``);
    * ``src_missing``, ``tgt_missing`` bool ``[1, H, W]``: no data there;
    * ``src_mask``, ``tgt_mask`` uint8 ``[1, H, W]``: ternary masks (0 normal, 1 within
      ``mask_radius`` px of a defect, 2 in one); zeros without a ``masks`` dataset;
    * ``src_defects``, ``tgt_defects`` uint8 ``[1, H, W]``: the defect maps themselves;
    * ``field`` float32 ``[2, H, W]``: ground truth with ``warp(src, field) ~ tgt``
      (pixels), ``compose(f_src, invert_field(f_tgt))`` of the per-section fields;
    * ``has_field`` bool ``[]``: False (and ``field`` zeros) without a ``fields`` dataset,
      unless the file is ``registered`` (true fields zero and known).

    Pairs where either section is blank or near-constant (tissue std below
    ``min_std`` grey levels) are left out. ``crop`` (px) takes a random square of
    that size from each pair; ``augment`` (e.g. an ``Augmenter``) is called as
    ``augment(sample, generator)`` on the raw sample (see the module docstring).
    Random draws come from a generator seeded from torch's global RNG, which
    DataLoader seeds per worker: seed torch for reproducible epochs; with ``seed``
    the generator of pair ``i`` is seeded from ``(seed, i)`` instead, so every
    read of a pair is the same (held-out pairs).

    The file is opened lazily, once per process, so the dataset works with
    ``DataLoader(num_workers > 0)``. A missing, corrupt or foreign file raises
    ``UserError``.
    """

    def __init__(self, path: str | Path, mask_radius: float = 75, augment=None, min_std: float = 2.0,
                 crop: int | None = None, seed: int | None = None):
        self.path, self.mask_radius, self.augment, self.crop = Path(path), mask_radius, augment, crop
        self.seed = seed
        with _open_h5(self.path) as f:
            _check_layout(f, self.path)
            self.shape = tuple(f["images"].shape)
            self.has_masks, self.has_field_data = "masks" in f, "fields" in f
            self.has_fields = self.has_field_data or bool(f.attrs.get("registered", False))
            name = "slice_std" if "slice_std" in f else "images"
            try:
                stds = (f["slice_std"][:] if name == "slice_std"
                        else np.stack([slice_std(f["images"][n]).numpy() for n in range(self.shape[0])]))
            except OSError as err:  # a corrupt chunk
                raise UserError(f"dataset {self.path}: cannot read '{name}' ({err})") from None
        if crop is not None and not 0 < crop <= min(self.shape[2:]):
            raise UserError(f"crop {crop} must be between 1 and the section size {self.shape[2]}")
        usable = (stds[:, :-1] >= min_std) & (stds[:, 1:] >= min_std)
        self.pairs = np.argwhere(usable)  # [P, 2] rows of (stack n, source section s)
        if len(self.pairs) == 0:
            raise UserError(f"dataset {self.path} has no pair of sections with tissue std >= {min_std}")
        self._file, self._pid = None, None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_pid": None}  # handles do not cross processes

    def _h5(self) -> h5py.File:
        """This process's read handle, opened on first use (a forked worker opens its own)."""
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = _open_h5(self.path), os.getpid()
        return self._file

    def _window(self, generator: torch.Generator) -> tuple[slice, slice]:
        """Rows and columns to read: all, or a random ``crop`` square."""
        h, w = self.shape[2:]
        if self.crop is None:
            return slice(0, h), slice(0, w)
        y0, x0 = (int(torch.randint(n - self.crop + 1, (), generator=generator)) for n in (h, w))
        return slice(y0, y0 + self.crop), slice(x0, x0 + self.crop)

    def _read(self, name: str, n: int, s: int, *window: slice) -> np.ndarray:
        """``name[n, s:s + 2, *window]``: sections s and s + 1 of stack n; a ``UserError`` naming the file, the
        dataset and the sections where HDF5 cannot read them (a corrupt chunk)."""
        try:
            return self._h5()[name][(n, slice(s, s + 2), *window)]
        except OSError as err:
            raise UserError(f"dataset {self.path}: cannot read '{name}' of stack {n}, sections {s}..{s + 1} "
                            f"({err})") from None

    def raw_sample(self, i: int, generator: torch.Generator) -> Sample:
        """Pair ``i`` in raw intensities, before augmentation (see the module docstring)."""
        n, s = (int(v) for v in self.pairs[i])
        rows, cols = self._window(generator)
        images = to_tensor(self._read("images", n, s, rows, cols))
        size = images.shape[-2:]
        defects = (masks.check_defect_map(torch.from_numpy(self._read("masks", n, s, rows, cols)),
                                          f"dataset {self.path}: 'masks' of stack {n}, sections {s}..{s + 1}")
                   if self.has_masks else torch.zeros(2, *size, dtype=torch.uint8))
        if self.has_field_data:
            fields = to_tensor(self._read("fields", n, s, slice(None), rows, cols))
            if not fields.isfinite().all():  # else the supervised term and the held-out EPE turn NaN (or 0)
                raise UserError(f"dataset {self.path}: 'fields' of stack {n}, sections {s}..{s + 1} hold values "
                                "that are not finite (NaN or inf)")
            field = compose(fields[:1], invert_field(fields[1:]))[0]
        else:
            field = torch.zeros(2, *size)
        return {"src": images[:1], "tgt": images[1:], "src_defects": defects[:1], "tgt_defects": defects[1:],
                "field": field, "has_field": torch.tensor(self.has_fields)}

    def __getitem__(self, i: int) -> Sample:
        seed = int(torch.randint(2 ** 62, ())) if self.seed is None else self.seed * 1_000_003 + i
        generator = torch.Generator().manual_seed(seed)
        sample = self.raw_sample(i, generator)
        if self.augment is not None:
            sample = self.augment(sample, generator)
        return finish(sample, self.mask_radius)


def batches(loader) -> Iterator:
    """The batches of a ``DataLoader``; a ``UserError`` raised in one of its worker processes keeps its one line
    (DataLoader raises it again here with the worker's whole traceback as its message)."""
    try:
        yield from loader
    except UserError as err:
        lines = str(err).strip().splitlines()
        if len(lines) == 1:
            raise
        raise UserError(lines[-1].partition("UserError: ")[2] or lines[-1]) from None


def finish(sample: Sample, mask_radius: float) -> Sample:
    """The network's view of a raw sample: normalised images, missing flags and ternary masks."""
    out = dict(sample)
    for name in SLICES:
        out[name], out[f"{name}_missing"] = normalise(sample[name])
        out[f"{name}_mask"] = masks.ternary_mask(sample[f"{name}_defects"], mask_radius)
    return out


# --------------------------------------------------------------------------- augmentation
# Each takes a raw sample and a torch.Generator and returns a new sample (inputs untouched).
def _chance(generator: torch.Generator, p: float) -> bool:
    """True with probability ``p``."""
    return float(torch.rand((), generator=generator)) < p


def _draw(generator: torch.Generator, low: float, high: float) -> float:
    """One draw from U(low, high) (``helpers.uniform``, scaled in float64)."""
    return float(uniform((low, high), generator, dtype=torch.float64))


def warp_slice(sample: Sample, which: str, field: torch.Tensor, inverse: torch.Tensor | None = None) -> Sample:
    """Pull slice ``which`` (``'src'`` or ``'tgt'``) of ``sample`` through ``field`` ``[2, H, W]`` (pixels).

    The image is warped bilinearly, its defect map with nearest sampling, and the
    pair field is updated so that ``warp(src, field) ~ tgt`` still holds:
    ``compose(field, w)`` when the target moves by ``w``, and
    ``compose(inverse, field)`` when the source does, with ``inverse`` the inverse
    of ``w`` (``invert_field(w)`` unless given, e.g. exactly for an affine ``w``).
    """
    out = dict(sample)
    out[which] = warp_tissue(sample[which][None], field[None])[0]
    defects = sample[f"{which}_defects"]
    out[f"{which}_defects"] = warp_labels(defects[None], field[None])[0]
    pair = sample["field"][None]
    if which == "tgt":
        out["field"] = compose(pair, field[None])[0]
    else:
        inverse = invert_field(field[None]) if inverse is None else inverse[None]
        out["field"] = compose(inverse, pair)[0]
    return out


def random_rigid(h: int, w: int, generator: torch.Generator, max_shift: float, max_angle: float,
                 max_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Field float32 ``[2, H, W]`` (pixels) of a random rotation, scale and shift about the image centre,
    and the field of its exact inverse.

    Shift uniform in ``±max_shift`` px per axis, angle uniform in ``±max_angle``
    radians, scale uniform in ``1 ± max_scale``. The map ``p -> A (p - c) + c + t``
    has the inverse ``q -> A^-1 (q - c) + c - A^-1 t``.
    """
    angle, tx, ty, scale = (_draw(generator, -m, m) for m in (max_angle, max_shift, max_shift, max_scale))
    matrix = rigid_matrix(torch.tensor([angle]), tx, ty, 1 + scale)
    a_inv = torch.linalg.inv(matrix[:, :, :2])
    inverse = torch.cat([a_inv, -a_inv @ matrix[:, :, 2:]], 2)
    return affine_field(matrix, h, w)[0], affine_field(inverse, h, w)[0]


def jitter(sample: Sample, generator: torch.Generator, p: float, max_shift: float = 32.0,
           max_angle: float = 0.01, max_scale: float = 0.01, elastic_amplitude: float = 0.0,
           elastic_wavelength: float = 200.0) -> Sample:
    """Each slice, with probability ``p``, moved by its own ``random_rigid`` map (``warp_slice``),
    plus, when ``elastic_amplitude`` > 0, a ``misalign.smooth_field`` of that RMS length (px) and
    feature size (px): the demo's misalignment model, for registered data with zero true fields."""
    for which in SLICES:
        if _chance(generator, p):
            h, w = sample[which].shape[-2:]
            field, inverse = random_rigid(h, w, generator, max_shift, max_angle, max_scale)
            if elastic_amplitude > 0:
                field = field + misalign.smooth_field(1, h, w, elastic_amplitude, elastic_wavelength, generator)[0]
                inverse = None  # no longer exact: warp_slice inverts numerically
            sample = warp_slice(sample, which, field, inverse)
    return sample


def tissue_change(sample: Sample, generator: torch.Generator, amplitude: float, wavelength: float = 24.0) -> Sample:
    """The target's content moved by a fine ``misalign.smooth_field`` of RMS length ``amplitude`` px and feature
    size ``wavelength`` px that the pair field does not follow: as tissue changes from one section to the next, so
    that a pair of one section with itself (``adapt.py``) does not teach the network to follow such change."""
    if amplitude <= 0:
        return sample
    h, w = sample["tgt"].shape[-2:]
    change = misalign.smooth_field(1, h, w, amplitude, wavelength, generator)
    return {**sample, "tgt": warp_tissue(sample["tgt"][None], change)[0],
            "tgt_defects": warp_labels(sample["tgt_defects"][None], change)[0]}


def _map_pair(sample: Sample, image_fn, field_fn) -> Sample:
    """Apply ``image_fn`` to every image-like tensor of ``sample`` and ``field_fn`` to its field."""
    out = {name: image_fn(t) for name, t in sample.items() if name not in ("field", "has_field")}
    return {**out, "field": field_fn(sample["field"]), "has_field": sample["has_field"]}


def flip(sample: Sample, generator: torch.Generator, p: float = 0.5) -> Sample:
    """Mirror both slices left-right with probability ``p``, then up-down with probability ``p``.

    Mirroring x negates the field's x channel (0); mirroring y its y channel (1).
    """
    sign_x, sign_y = torch.tensor([-1.0, 1.0]).view(2, 1, 1), torch.tensor([1.0, -1.0]).view(2, 1, 1)
    for dim, sign in ((-1, sign_x), (-2, sign_y)):
        if _chance(generator, p):
            sample = _map_pair(sample, lambda t: t.flip(dim), lambda f: f.flip(dim) * sign)
    return sample


def transpose(sample: Sample, generator: torch.Generator, p: float = 0.5) -> Sample:
    """Swap rows and columns of both slices with probability ``p``; the field's channels swap too."""
    if _chance(generator, p):
        sample = _map_pair(sample, lambda t: t.transpose(-1, -2), lambda f: f.transpose(-1, -2).flip(0))
    return sample


def swap(sample: Sample, generator: torch.Generator, p: float = 0.5) -> Sample:
    """Exchange source and target with probability ``p`` (the stack read backwards); field inverted."""
    if not _chance(generator, p):
        return sample
    out = {f"{a}{key}": sample[f"{b}{key}"] for a, b in (("src", "tgt"), ("tgt", "src"))
           for key in ("", "_defects")}
    return {**out, "field": invert_field(sample["field"][None])[0], "has_field": sample["has_field"]}


def _tear_source(add, sample: Sample, generator: torch.Generator, p: float,
                 params: misalign.MisalignParams) -> Sample:
    """With probability ``p``, the source damaged by ``misalign.add_cracks`` or ``add_folds``.

    Their triple ``(image, defects, field)`` keeps ``field`` re-aligning the damaged
    image onto what it was aligned to, which is exactly the pair field of the
    source: ``compose(e_inv, field)`` with ``e_inv`` the defect's analytic inverse.
    """
    if not _chance(generator, p):
        return sample
    image, defects, field = add(sample["src"][None] / 255, sample["src_defects"][None], sample["field"][None],
                                params, generator, which=torch.tensor([True]))
    return {**sample, "src": image[0] * 255, "src_defects": defects[0], "field": field[0]}


def crack(sample: Sample, generator: torch.Generator, p: float,
          params: misalign.MisalignParams = misalign.MisalignParams()) -> Sample:
    """With probability ``p``, tear the source along a random seam (``misalign.add_cracks``).

    The gap is marked 1 in ``src_defects`` and the pair field gains the jump that closes it.
    """
    return _tear_source(misalign.add_cracks, sample, generator, p, params)


def fold(sample: Sample, generator: torch.Generator, p: float,
         params: misalign.MisalignParams = misalign.MisalignParams()) -> Sample:
    """With probability ``p``, fold the source along a random seam (``misalign.add_folds``).

    The dark folded band is marked 2 in ``src_defects``; the pair field unfolds it.
    """
    return _tear_source(misalign.add_folds, sample, generator, p, params)


def brightness_gradient(sample: Sample, generator: torch.Generator, p: float,
                        max_strength: float = 0.5) -> Sample:
    """Each slice, with probability ``p``, multiplied by a linear ramp of gain across the image.

    Gain ``1 + a * d / R`` with ``a`` uniform in ``±max_strength``, ``d`` the signed
    distance from the centre along a random direction and ``R`` half the image
    diagonal; tissue stays in 1..255 and missing data stays 0.
    """
    out = dict(sample)
    for which in SLICES:
        if _chance(generator, p):
            image = sample[which]
            h, w = image.shape[-2:]
            angle, strength = _draw(generator, 0, 2 * math.pi), _draw(generator, -max_strength, max_strength)
            y, x = torch.meshgrid(torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2, indexing="ij")
            ramp = (x * math.cos(angle) + y * math.sin(angle)) / (math.hypot(h, w) / 2)
            out[which] = torch.where(image > 0, (image * (1 + strength * ramp)).clamp(1, 255), image)
    return out


def blur_and_grain(sample: Sample, generator: torch.Generator, max_sigma: float, max_grain: float) -> Sample:
    """Each slice blurred by a Gaussian of ``sigma`` px, then white Gaussian noise of ``grain`` times its tissue's
    std added, ``sigma`` and ``grain`` drawn per slice uniform in ``[0, max_sigma]`` and ``[0, max_grain]``: real
    sections differ from the phantom, and from each other, in focus and grain. The blur runs within the tissue
    (normalised: missing data weighs 0); tissue stays in 1..255, missing data stays 0. Both 0: the sample as it is,
    without a draw."""
    if max_sigma <= 0 and max_grain <= 0:
        return sample
    out = dict(sample)
    for which in SLICES:
        image = sample[which].float()
        tissue = image > 0
        sigma, grain = _draw(generator, 0, max_sigma), _draw(generator, 0, max_grain)
        if sigma > 0:
            weight = gaussian_blur(tissue.float(), sigma)
            image = gaussian_blur(image, sigma) / weight.clamp(min=1e-6)
        image = image.masked_fill(~tissue, 0)
        std = slice_std(image)[..., None, None]  # the tissue's (0 for a slice without any)
        noisy = image + grain * std * torch.randn(image.shape, generator=generator)
        out[which] = torch.where(tissue, noisy.clamp(1, 255), 0.0)
    return out


def _random_box(generator: torch.Generator, h: int, w: int, max_fraction: float) -> tuple[slice, slice]:
    """A random rectangle with sides from 1 px to ``max_fraction`` of the image's, inside the image."""
    bh, bw = (max(1, round(_draw(generator, 1, max_fraction * n))) for n in (h, w))
    y0, x0 = (int(torch.randint(n - b + 1, (), generator=generator)) for n, b in ((h, bh), (w, bw)))
    return slice(y0, y0 + bh), slice(x0, x0 + bw)


def _cutout(sample: Sample, generator: torch.Generator, p: float, max_fraction: float, fill) -> Sample:
    """Each slice, with probability ``p``, gets one ``_random_box`` replaced by ``fill(patch, generator)``."""
    out = dict(sample)
    for which in SLICES:
        if _chance(generator, p):
            image = sample[which].clone()
            rows, cols = _random_box(generator, *image.shape[-2:], max_fraction)
            image[..., rows, cols] = fill(image[..., rows, cols], generator)
            out[which] = image
    return out


def noise_patch(sample: Sample, generator: torch.Generator, p: float, max_fraction: float = 0.25) -> Sample:
    """Cutout of uniform noise (grey 1..255, counted as tissue) in a random box of each slice."""
    return _cutout(sample, generator, p, max_fraction,
                   lambda patch, g: 1 + 254 * torch.rand(patch.shape, generator=g))


def contrast_patch(sample: Sample, generator: torch.Generator, p: float, max_fraction: float = 0.25,
                   max_factor: float = 4.0) -> Sample:
    """Cutout whose contrast about its tissue mean is scaled by a factor in ``[1/max_factor, max_factor]``.

    Tissue stays in 1..255, missing data stays 0.
    """
    def fill(patch: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        factor = math.exp(_draw(g, -math.log(max_factor), math.log(max_factor)))
        tissue = patch > 0
        mean = (patch * tissue).sum() / tissue.sum().clamp(min=1)
        return torch.where(tissue, (mean + factor * (patch - mean)).clamp(1, 255), patch)
    return _cutout(sample, generator, p, max_fraction, fill)


def missing_patch(sample: Sample, generator: torch.Generator, p: float, max_fraction: float = 0.25) -> Sample:
    """Cutout of missing data (0) in a random box of each slice."""
    return _cutout(sample, generator, p, max_fraction, lambda patch, g: torch.zeros_like(patch))


@dataclass
class Augmenter:
    """The seed's training augmentation, as probabilities and ranges; ``augmenter(sample, generator)``.

    Order: swap (its ``invert_field`` needs a smooth field, so before any tear),
    ``tissue_change`` of the target (``change_amplitude`` px; 0 = none), synthetic
    defects on the source (``crack``, ``fold``, sized by ``defect_params``),
    per-slice jitter, flips and transpose (the field follows every step), then
    intensities (brightness ramps, cutouts, blur and grain). Shifts are in pixels of the dataset,
    angles in radians.
    """
    p_swap: float = 0.5
    change_amplitude: float = 0.0
    p_crack: float = 0.15
    p_fold: float = 0.1
    defect_params: misalign.MisalignParams = misalign.MisalignParams()
    p_jitter: float = 0.5
    max_shift: float = 32.0
    max_angle: float = 0.01
    max_scale: float = 0.01
    elastic_amplitude: float = 0.0
    elastic_wavelength: float = 200.0
    p_flip: float = 0.5
    p_transpose: float = 0.5
    p_gradient: float = 0.5
    max_gradient: float = 0.5
    p_noise: float = 0.1
    p_contrast: float = 0.2
    p_missing: float = 0.1
    max_patch_fraction: float = 0.25
    max_blur: float = 0.0
    max_grain: float = 0.0

    def __call__(self, sample: Sample, generator: torch.Generator) -> Sample:
        sample = swap(sample, generator, self.p_swap)
        sample = tissue_change(sample, generator, self.change_amplitude)
        sample = crack(sample, generator, self.p_crack, self.defect_params)
        sample = fold(sample, generator, self.p_fold, self.defect_params)
        sample = jitter(sample, generator, self.p_jitter, self.max_shift, self.max_angle, self.max_scale,
                        self.elastic_amplitude, self.elastic_wavelength)
        sample = flip(sample, generator, self.p_flip)
        sample = transpose(sample, generator, self.p_transpose)
        sample = brightness_gradient(sample, generator, self.p_gradient, self.max_gradient)
        sample = noise_patch(sample, generator, self.p_noise, self.max_patch_fraction)
        sample = contrast_patch(sample, generator, self.p_contrast, self.max_patch_fraction)
        sample = blur_and_grain(sample, generator, self.max_blur, self.max_grain)
        return missing_patch(sample, generator, self.p_missing, self.max_patch_fraction)


def held_out_misalignment(params: misalign.MisalignParams = misalign.MisalignParams()) -> Augmenter:
    """The augmentation that turns registered held-out pairs into a benchmark: each slice misaligned as
    ``misalign.py`` misaligns the demo (shift, rotation, elastic field), the source cracked or folded with the
    demo's probabilities, and nothing else (use with ``StackDataset(seed=...)`` for fixed pairs)."""
    return Augmenter(p_swap=0, p_crack=params.crack_prob, p_fold=params.fold_prob, defect_params=params,
                     p_jitter=1, max_shift=params.max_shift, max_angle=params.max_rotation, max_scale=0,
                     elastic_amplitude=params.elastic_amplitude, elastic_wavelength=params.elastic_wavelength,
                     p_flip=0, p_transpose=0, p_gradient=0, p_noise=0, p_contrast=0, p_missing=0)
