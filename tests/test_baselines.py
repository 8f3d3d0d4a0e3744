"""The classical baselines recover known fields in our convention (skipped where not installed).

Every stack is one random texture misaligned by known fields ``g_z`` (``sections[z] = warp(A,
g_z)``, section 0 untouched), so the serial alignment of section ``z`` onto section 0 is exactly
``invert_field(g_z)``. Fields are compared away from the borders, where tissue was pulled in from
outside the canvas. elastix needs ``itk-elastix``; SOFIMA needs ``$SOFIMA_PATH`` (a checkout).
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench import baselines
from helpers import UserError, affine_field, invert_field, pixel_grid, rigid_matrix, warp

pytestmark = pytest.mark.filterwarnings("ignore:builtin type:DeprecationWarning")  # itk's SWIG types

SIZE = 128
MARGIN = 16  # px left out at each border


def texture(seed: int = 0) -> torch.Tensor:
    """A ``[1, 1, SIZE, SIZE]`` float texture with features of ~4 px, values 1..255 (all tissue)."""
    gen = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(1, 1, SIZE // 4, SIZE // 4, generator=gen), size=(SIZE, SIZE),
                      mode="bicubic", align_corners=False)
    return 1 + 254 * (x - x.min()) / (x.max() - x.min())


def translation() -> torch.Tensor:
    """A shift by (3.3, -2.1) px: ``[1, 2, SIZE, SIZE]``."""
    return affine_field(rigid_matrix(0.0, 3.3, -2.1), SIZE, SIZE)


def rotation() -> torch.Tensor:
    """A rotation by 0.05 rad about the centre (up to 4.5 px at the corners) and a small shift."""
    return affine_field(rigid_matrix(0.05, -1.4, 0.6), SIZE, SIZE)


def smooth_warp() -> torch.Tensor:
    """A smooth non-affine field: one period of a sine per axis, amplitudes 2 and 1.5 px."""
    x, y = pixel_grid(SIZE, SIZE)[0]
    return torch.stack([2 * torch.sin(2 * math.pi * y / SIZE),
                        1.5 * torch.cos(2 * math.pi * x / SIZE)])[None]


def stack(misalignments: list[torch.Tensor | None]) -> tuple[np.ndarray, list[torch.Tensor | None]]:
    """Sections ``[Z, SIZE, SIZE]`` uint8 after section 0 = the texture; None gives an empty section.

    Returns the sections and, per section, the true field (None for an empty one).
    """
    image = texture()
    sections, truths = [image], [torch.zeros(1, 2, SIZE, SIZE)]
    for g in misalignments:
        sections.append(torch.zeros_like(image) if g is None else warp(image, g))
        truths.append(None if g is None else invert_field(g))
    return torch.cat(sections)[:, 0].round().clamp(0, 255).to(torch.uint8).numpy(), truths


def end_point_error(field: np.ndarray, truth: torch.Tensor) -> float:
    """Mean end-point error (px) of a ``[2, H, W]`` field against a ``[1, 2, H, W]`` truth, inside."""
    diff = torch.from_numpy(field)[None] - truth
    return diff[..., MARGIN:-MARGIN, MARGIN:-MARGIN].norm(dim=1).mean().item()


def aligned_difference(sections: np.ndarray, fields: np.ndarray, z: int) -> float:
    """Mean |warp(sections[z], fields[z]) - sections[0]| inside: the contract of the fields."""
    image = torch.from_numpy(sections[z]).float()[None, None]
    aligned = warp(image, torch.from_numpy(fields[z])[None])[0, 0].numpy()
    inside = np.s_[MARGIN:-MARGIN, MARGIN:-MARGIN]
    return float(np.abs(aligned - sections[0])[inside].mean())


def skip_unless_available(method: str) -> None:
    reason = baselines.available()[method]
    if reason:
        pytest.skip(reason)


# --------------------------------------------------------------------------- always run
def test_every_method_has_settings_and_a_status():
    status = baselines.available()
    assert set(status) == set(baselines.BASELINES) == {"elastix", "sofima"}
    assert all(reason is None or "\n" not in reason for reason in status.values())
    assert all(baselines.BASELINES.values())


def test_sofima_says_why_it_is_skipped(monkeypatch, tmp_path, request):
    baselines._sofima.cache_clear()
    request.addfinalizer(baselines._sofima.cache_clear)  # forget these failures afterwards
    monkeypatch.delenv("SOFIMA_PATH", raising=False)
    assert "SOFIMA_PATH is not set" in baselines.available()["sofima"]
    monkeypatch.setenv("SOFIMA_PATH", str(tmp_path))
    assert "is not a SOFIMA checkout" in baselines.available()["sofima"]


def test_bad_requests_are_user_errors():
    sections = np.ones((2, 32, 32), np.uint8)
    with pytest.raises(UserError, match="unknown baseline"):
        baselines.align_stack("ants", sections, "affine")
    with pytest.raises(UserError, match="unknown elastix setting 'rigid'"):
        baselines.align_stack("elastix", sections, "rigid")
    with pytest.raises(UserError, match="unknown sofima setting"):
        baselines.align_stack("sofima", sections, "affine")
    with pytest.raises(ValueError, match="uint8"):
        baselines.align_stack("elastix", sections.astype(np.float32), "affine")
    with pytest.raises(ValueError, match="multiple of stride"):
        baselines.SofimaSetting(patch=32, stride=5)


# --------------------------------------------------------------------------- elastix
def test_elastix_recovers_translation_and_rotation_past_an_empty_section():
    skip_unless_available("elastix")
    sections, truths = stack([translation(), None, rotation()])
    fields = baselines.align_stack_elastix(sections, "affine")
    assert fields.shape == (4, 2, SIZE, SIZE) and fields.dtype == np.float32
    assert not fields[0].any() and not fields[2].any()  # the reference and the empty section
    for z in (1, 3):
        assert end_point_error(fields[z], truths[z]) < 0.1
        assert aligned_difference(sections, fields, z) < 4  # of 1..255; unaligned: 28 and 44


def test_elastix_bspline_recovers_a_smooth_warp():
    skip_unless_available("elastix")
    sections, truths = stack([smooth_warp()])
    fields = baselines.align_stack_elastix(sections, "bspline-32")
    assert end_point_error(fields[1], truths[1]) < 0.25


# --------------------------------------------------------------------------- SOFIMA
def test_sofima_recovers_translation_rotation_and_smooth_warp():
    skip_unless_available("sofima")
    sections, truths = stack([translation(), None, rotation(), smooth_warp()])
    fields = baselines.align_stack_sofima(sections, "patch32-soft")
    assert fields.shape == (5, 2, SIZE, SIZE) and fields.dtype == np.float32
    assert not fields[0].any() and not fields[2].any()
    errors = [end_point_error(fields[z], truths[z]) for z in (1, 3, 4)]
    # SOFIMA's flow is whole-pixel: the translation (3.3, -2.1) comes back as (3, -2).
    assert end_point_error(fields[1], truths[1].round()) < 0.15
    assert errors[0] < 0.5 and errors[1] < 0.5 and errors[2] < 0.75
