"""Classical baselines for the alignment benchmark: elastix and SOFIMA, serial, in our field convention.

Both align a stack the way the network does: section 0 is the fixed reference (its field is zero)
and each later section ``z`` is registered to the already aligned section before it, so that
``helpers.warp(sections[z], fields[z])`` is the aligned section ``z``. Fields are ``[Z, 2, H, W]``
float32 pixels, x then y, pulling (``helpers``' convention). A section with no tissue (all 0) keeps
a zero field and is skipped as a reference: the next section is aligned to the last one with tissue.

* elastix (``itk-elastix``): an affine then a B-spline registration of the aligned previous section
  (fixed) and the raw section (moving), each a multi-resolution stochastic gradient descent on
  mutual information; pixels that read 0 are masked out. Elastix's transform maps fixed-image
  points to moving-image points, which is exactly a pulling field: ``transformix`` samples it at
  every pixel (``T(p) - p``, x then y).
* SOFIMA (google-research/sofima, run from a source checkout named by ``$SOFIMA_PATH``), as in its
  ``em_alignment`` notebook: block cross-correlation flow between neighbouring raw sections at full
  and half resolution, ``flow_utils.clean_flow`` / ``reconcile_flows``, then an elastic spring mesh
  per section relaxed (``mesh.relax_mesh``) towards the flow composed with the previous section's
  mesh. A mesh is a forward map (raw section -> aligned space) sampled every ``stride`` px; it is
  inverted on its node grid (``map_utils.invert_map``) and interpolated to every pixel, giving a
  pulling field. SOFIMA's flow is whole-pixel (the cross-correlation peak), so its fields are only
  as exact as the mesh's averaging of rounded vectors.

``BASELINES`` names each method's settings (the benchmark reports each at its best setting),
``available()`` says which can run here, and ``align_stack`` runs one. Install with
``pip install --no-deps -r bench/requirements.txt``; SOFIMA also needs ``SOFIMA_PATH`` set to the
directory of its checkout (the one holding ``flow_field.py``).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from helpers import UserError, warp_tissue

if TYPE_CHECKING:
    import itk


@dataclass(frozen=True)
class ElastixSetting:
    """One elastix configuration: an affine stage, then a B-spline stage unless ``grid_spacing`` is None."""

    grid_spacing: float | None  # final B-spline control-point spacing, px
    resolutions: int            # levels of the smoothing pyramid
    iterations: int             # optimiser iterations per level and stage
    samples: int                # random pixels drawn per iteration


@dataclass(frozen=True)
class SofimaSetting:
    """One SOFIMA configuration; ``patch // 2`` must be a multiple of ``stride``."""

    patch: int                      # side of the cross-correlated patches, px (at every scale)
    stride: int                     # spacing of flow vectors and of mesh nodes, px
    scales: tuple[int, ...] = (1, 2)  # flows at these downsamplings, reconciled finest first
    k0: float = 0.01                # spring constant pulling a node to its flow target
    k: float = 0.1                  # spring constant between neighbouring nodes (stiffness)

    def __post_init__(self):
        if self.patch // 2 % self.stride:
            raise ValueError(f"patch // 2 ({self.patch // 2}) must be a multiple of stride ({self.stride})")


ELASTIX_SETTINGS: dict[str, ElastixSetting] = {
    "affine": ElastixSetting(grid_spacing=None, resolutions=4, iterations=256, samples=2048),
    "bspline-128": ElastixSetting(grid_spacing=128.0, resolutions=4, iterations=256, samples=2048),
    "bspline-64": ElastixSetting(grid_spacing=64.0, resolutions=4, iterations=256, samples=2048),
    "bspline-32": ElastixSetting(grid_spacing=32.0, resolutions=4, iterations=256, samples=2048),
}
SOFIMA_SETTINGS: dict[str, SofimaSetting] = {  # "-soft": the mesh follows the flow more closely
    "patch32": SofimaSetting(patch=32, stride=8),
    "patch32-soft": SofimaSetting(patch=32, stride=8, k0=0.1),
    "patch64": SofimaSetting(patch=64, stride=16),
    "patch64-soft": SofimaSetting(patch=64, stride=16, k0=0.1),
    "patch128": SofimaSetting(patch=128, stride=32),
}
BASELINES: dict[str, list[str]] = {"elastix": list(ELASTIX_SETTINGS), "sofima": list(SOFIMA_SETTINGS)}


# ------------------------------------------------------------------------------ entry points
def available() -> dict[str, str | None]:
    """Per method of ``BASELINES``: None when it can run here, else why it is skipped (one line)."""
    try:
        importlib.metadata.version("itk-elastix")
        elastix = None
    except importlib.metadata.PackageNotFoundError:
        elastix = "itk-elastix is not installed (pip install --no-deps -r bench/requirements.txt)"
    try:
        _sofima()
        sofima = None
    except ImportError as err:
        sofima = str(err)
    return {"elastix": elastix, "sofima": sofima}


def align_stack(method: str, sections: np.ndarray, setting: str) -> np.ndarray:
    """Align ``sections`` ``[Z, H, W]`` uint8 with ``method``, a key of ``BASELINES``.

    Returns the ``[Z, 2, H, W]`` float32 pulling fields (px) of ``align_stack_<method>``.
    """
    aligners = {"elastix": align_stack_elastix, "sofima": align_stack_sofima}
    if method not in aligners:
        raise UserError(f"unknown baseline {method!r}; choose from {', '.join(aligners)}")
    return aligners[method](sections, setting)


def align_stack_elastix(sections: np.ndarray, setting: str) -> np.ndarray:
    """Serial elastix alignment of ``sections`` ``[Z, H, W]`` uint8 (0 = missing).

    ``setting`` is a key of ``ELASTIX_SETTINGS``. Returns ``[Z, 2, H, W]`` float32 pulling fields in
    pixels: ``warp(sections[z], fields[z])`` is section ``z`` aligned to the aligned section before it.
    """
    chosen = _pick(ELASTIX_SETTINGS, setting, "elastix")
    fields = np.zeros((len(sections), 2, *_check(sections).shape[1:]), np.float32)
    params = _elastix_parameters(chosen)
    for ref, z in _chain(sections):
        if ref is not None:
            fixed, fixed_valid = _warp_section(sections[ref], fields[ref])
            fields[z] = _elastix_pair(fixed, fixed_valid, sections[z], params)
    return fields


def align_stack_sofima(sections: np.ndarray, setting: str) -> np.ndarray:
    """Serial SOFIMA alignment (flow, then elastic mesh) of ``sections`` ``[Z, H, W]`` uint8 (0 = missing).

    ``setting`` is a key of ``SOFIMA_SETTINGS``. Returns ``[Z, 2, H, W]`` float32 pulling fields in
    pixels, as ``align_stack_elastix``. Raises ``ImportError`` when SOFIMA cannot be loaded.
    """
    chosen = _pick(SOFIMA_SETTINGS, setting, "sofima")
    h, w = _check(sections).shape[1:]
    sofima = _sofima()
    # The integration parameters of SOFIMA's em_alignment notebook; only the springs vary.
    config = sofima.mesh.IntegrationConfig(
        dt=0.001, gamma=0.0, k0=chosen.k0, k=chosen.k, stride=(chosen.stride, chosen.stride),
        num_iters=1000, max_iters=100000, stop_v_max=0.005, dt_max=1000, start_cap=0.01,
        final_cap=10, prefer_orig_order=True)
    fields = np.zeros((len(sections), 2, h, w), np.float32)
    meshes: dict[int, np.ndarray] = {}
    # SOFIMA's map interpolation makes one tiny LAPACK call per triangle: multi-threaded BLAS
    # turns those into seconds of thread hand-offs on a busy machine.
    with sofima.threadpool_limits(limits=1, user_api="blas"):
        for ref, z in _chain(sections):
            if ref is None:
                meshes[z] = np.zeros((2, 1, *_node_grid((h, w), chosen)), np.float32)
                continue
            flow = _sofima_flow(sections[ref], sections[z], chosen)
            target = sofima.map_utils.compose_maps_fast(flow, (0.0, 0.0), chosen.stride,
                                                        meshes[ref], (0.0, 0.0), chosen.stride)
            meshes[z] = np.array(sofima.mesh.relax_mesh(np.zeros_like(flow), target, config)[0])
            fields[z] = _mesh_to_field(meshes[z], chosen.stride, h, w)
    return fields


# ------------------------------------------------------------------------------ shared
def _check(sections: np.ndarray) -> np.ndarray:
    """``sections`` itself after checking it is a ``[Z, H, W]`` uint8 array."""
    if sections.ndim != 3 or sections.dtype != np.uint8:
        raise ValueError(f"sections must be [Z, H, W] uint8, got {sections.dtype} {sections.shape}")
    return sections


def _pick(settings: dict, name: str, method: str):
    """``settings[name]``, or a ``UserError`` naming the choices."""
    if name not in settings:
        raise UserError(f"unknown {method} setting {name!r}; choose from {', '.join(settings)}")
    return settings[name]


def _chain(sections: np.ndarray) -> Iterator[tuple[int | None, int]]:
    """``(reference, z)`` for each section ``z`` with tissue, in order.

    ``reference`` is the last earlier section with tissue, None for the first one (the fixed
    reference of the stack). Sections without tissue are left out: their fields stay zero.
    """
    ref = None
    for z in range(len(sections)):
        if sections[z].any():
            yield ref, z
            ref = z


def _warp_section(section: np.ndarray, field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The aligned section ``[H, W]`` float32 (``helpers.warp_tissue``) and where it has tissue ``[H, W]`` bool."""
    out = warp_tissue(torch.from_numpy(section).float()[None, None], torch.from_numpy(field)[None])[0, 0].numpy()
    return out, out > 0


# ------------------------------------------------------------------------------ elastix
def _elastix_parameters(setting: ElastixSetting) -> itk.ParameterObject:
    """The ``itk.ParameterObject`` of an affine (then B-spline) registration for ``setting``."""
    import itk

    params = itk.ParameterObject.New()
    stages = [("affine", ())]
    if setting.grid_spacing is not None:
        stages.append(("bspline", (setting.grid_spacing,)))
    for name, extra in stages:
        stage = params.GetDefaultParameterMap(name, setting.resolutions, *extra)
        stage["MaximumNumberOfIterations"] = [str(setting.iterations)]
        stage["NumberOfSpatialSamples"] = [str(setting.samples)]
        stage["WriteResultImage"] = ["false"]
        params.AddParameterMap(stage)
    return params


def _elastix_pair(fixed: np.ndarray, fixed_valid: np.ndarray, moving: np.ndarray,
                  params: itk.ParameterObject) -> np.ndarray:
    """The pulling field ``[2, H, W]`` float32 px that registers ``moving`` onto ``fixed``.

    fixed: ``[H, W]`` float; fixed_valid: ``[H, W]`` bool, where ``fixed`` has tissue; moving:
    ``[H, W]`` uint8, 0 = missing. Missing pixels of either are masked out of the metric.
    """
    import itk

    moving_image = itk.image_from_array(moving.astype(np.float32))
    masks = {}
    if not fixed_valid.all():
        masks["fixed_mask"] = itk.image_from_array(fixed_valid.astype(np.uint8))
    if not moving.all():
        masks["moving_mask"] = itk.image_from_array((moving > 0).astype(np.uint8))
    _, transform = itk.elastix_registration_method(
        itk.image_from_array(np.ascontiguousarray(fixed, np.float32)), moving_image,
        parameter_object=params, log_to_console=False, **masks)
    with tempfile.TemporaryDirectory() as scratch:  # transformix also writes the field to a file
        field = itk.array_from_image(itk.transformix_deformation_field(
            moving_image, transform, output_directory=scratch, log_to_console=False))
    return np.ascontiguousarray(np.moveaxis(field, -1, 0), np.float32)


# ------------------------------------------------------------------------------ SOFIMA
@cache
def _sofima() -> SimpleNamespace:
    """SOFIMA's modules ``flow_field``, ``flow_utils``, ``map_utils``, ``mesh``, and the helpers
    ``BoundingBox`` (connectomics) and ``threadpool_limits`` (threadpoolctl) that we call with them.

    Loaded from the checkout at ``$SOFIMA_PATH`` (the directory holding ``flow_field.py``) as the
    package ``sofima``. Raises ``ImportError`` with a one-line reason when that fails.
    """
    root = os.environ.get("SOFIMA_PATH")
    if not root:
        raise ImportError("SOFIMA_PATH is not set (the path of a checkout of "
                          "github.com/google-research/sofima)")
    init = Path(root) / "__init__.py"
    if not (Path(root) / "flow_field.py").is_file() or not init.is_file():
        raise ImportError(f"SOFIMA_PATH={root} is not a SOFIMA checkout (no flow_field.py)")
    try:
        if "sofima" not in sys.modules:
            spec = importlib.util.spec_from_file_location("sofima", init,
                                                          submodule_search_locations=[root])
            package = importlib.util.module_from_spec(spec)
            sys.modules["sofima"] = package
            spec.loader.exec_module(package)
        from connectomics.common.bounding_box import BoundingBox
        from sofima import flow_field, flow_utils, map_utils, mesh
        from threadpoolctl import threadpool_limits
    except ImportError as err:
        sys.modules.pop("sofima", None)
        raise ImportError(f"cannot import SOFIMA from {root}: {err} "
                          "(pip install --no-deps -r bench/requirements.txt)") from err
    return SimpleNamespace(flow_field=flow_field, flow_utils=flow_utils, map_utils=map_utils,
                           mesh=mesh, BoundingBox=BoundingBox, threadpool_limits=threadpool_limits)


def _node_grid(shape: tuple[int, int], setting: SofimaSetting, padded: bool = True) -> tuple[int, int]:
    """``(ny, nx)`` flow vectors of SOFIMA's patch grid on an image of ``shape`` ``(H, W)``.

    Patches start every ``stride`` px and must fit; ``padded`` adds the ``patch // 2 // stride``
    nodes on each side whose patch would leave the image, so that node ``k`` sits at ``k * stride``.
    """
    inner = [(size - (setting.patch - setting.stride)) // setting.stride for size in shape]
    if min(inner) < 1:
        raise UserError(f"images of {shape[0]} x {shape[1]} px are too small for SOFIMA patches "
                        f"of {setting.patch} px")
    pad = 2 * (setting.patch // 2 // setting.stride) if padded else 0
    return inner[0] + pad, inner[1] + pad


def _sofima_flow(pre: np.ndarray, post: np.ndarray, setting: SofimaSetting) -> np.ndarray:
    """SOFIMA's cleaned flow from ``post`` to ``pre``: ``[2, 1, ny, nx]`` float32 px, NaN where unknown.

    pre, post: ``[H, W]`` uint8 (0 = missing). Node ``(i, j)`` sits at pixel ``stride * (j, i)`` of
    ``post`` and holds the displacement to the same tissue in ``pre`` (a forward map). Flows at each
    of ``setting.scales`` are cleaned, brought to the full-resolution node grid and reconciled
    (finest first), as in SOFIMA's em_alignment notebook.
    """
    sofima = _sofima()
    flows = [_scaled_flow(pre, post, setting, scale) for scale in setting.scales]
    size = flows[0].shape[-1], flows[0].shape[-2], 1
    for i, scale in enumerate(setting.scales[1:], 1):
        coarse = sofima.BoundingBox(start=(0, 0, 0), size=(flows[i].shape[-1], flows[i].shape[-2], 1))
        flows[i] = scale * sofima.map_utils.resample_map(
            flows[i], coarse, sofima.BoundingBox(start=(0, 0, 0), size=size), scale, 1)
    return sofima.flow_utils.reconcile_flows(flows, max_gradient=0, max_deviation=setting.stride / 2,
                                             min_patch_size=10).astype(np.float32)


def _scaled_flow(pre: np.ndarray, post: np.ndarray, setting: SofimaSetting, scale: int) -> np.ndarray:
    """Cleaned flow ``[2, 1, ny, nx]`` between ``scale`` x downsampled images, in their pixels.

    Node ``k`` sits at downsampled pixel ``k * stride``. The images are area-averaged; a
    downsampled pixel is missing when any of its pixels is.
    """
    sofima = _sofima()
    images = torch.from_numpy(np.stack([pre, post])).float()[:, None]
    missing = F.max_pool2d((images == 0).float(), scale)[:, 0].numpy() > 0
    images = F.avg_pool2d(images, scale)[:, 0].numpy()
    flow = sofima.flow_field.JAXMaskedXCorrWithStatsCalculator().flow_field(
        images[0], images[1], setting.patch, setting.stride,
        pre_mask=missing[0] if missing[0].any() else None,
        post_mask=missing[1] if missing[1].any() else None,
        batch_size=int(np.prod(_node_grid(images.shape[1:], setting, padded=False))))
    pad = setting.patch // 2 // setting.stride
    flow = np.pad(flow[:, None], [(0, 0), (0, 0), (pad, pad), (pad, pad)], constant_values=np.nan)
    return sofima.flow_utils.clean_flow(flow, min_peak_ratio=1.6, min_peak_sharpness=1.6,
                                        max_magnitude=setting.patch / 2,
                                        max_deviation=setting.stride / 2)


def _mesh_to_field(mesh: np.ndarray, stride: int, h: int, w: int) -> np.ndarray:
    """The pulling field ``[2, H, W]`` float32 px of a SOFIMA mesh.

    mesh: ``[2, 1, ny, nx]`` px, a forward map: node ``(i, j)`` is the section's point
    ``(x, y) = stride * (j, i)`` and holds its displacement into aligned space. As in SOFIMA's
    notebook, it is inverted on the node grid (``map_utils.invert_map``: node ``(i, j)`` is now the
    aligned point ``stride * (j, i)``; nodes outside the mesh take their nearest neighbour's value),
    then interpolated bilinearly to every pixel (constant beyond the last node).
    """
    sofima = _sofima()
    box = sofima.BoundingBox(start=(0, 0, 0), size=(mesh.shape[-1], mesh.shape[-2], 1))
    inverse = sofima.map_utils.fill_missing(sofima.map_utils.invert_map(mesh, box, box, stride),
                                            extrapolate=True)
    ny, nx = mesh.shape[-2:]
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                          indexing="ij")
    grid = torch.stack([2 * x / (stride * (nx - 1)) - 1, 2 * y / (stride * (ny - 1)) - 1], -1)
    field = F.grid_sample(torch.from_numpy(inverse[:, 0]).float()[None], grid[None], mode="bilinear",
                          padding_mode="border", align_corners=True)
    return field[0].numpy()
