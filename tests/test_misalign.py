"""The misalignment model: its ground truth re-aligns what it misaligned, defects as asked."""
import math

import pytest
import torch
import torch.nn.functional as F

import helpers as h
import misalign as m

NONE = m.MisalignParams(max_shift=0, max_rotation=0, elastic_amplitude=0, crack_prob=0,
                        fold_prob=0)
PAD = 16


def smooth_image(n=3, size=96, seed=0):
    """uint8 ``[n, 1, size, size]``, values ~30..230, features ~16 px: bilinear-exact enough."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, size // 16 + 1, size // 16 + 1, generator=g)
    fine = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (30 + 200 * fine.clamp(0, 1)).round().to(torch.uint8)


def reconstruction_error(aligned, image, defects, field, margin=14):
    """Mean |warp(image, field) - truth| (grey levels) away from defects and the crop's border."""
    truth = aligned[..., PAD:-PAD, PAD:-PAD].float()
    back = h.warp(image.float(), field)
    damaged = h.warp((defects > 0).float(), field) > 0  # pixels that read a defect (bilinear)
    near = F.max_pool2d(damaged.float(), 5, 1, 2) > 0
    keep = torch.zeros_like(near)
    keep[..., margin:-margin, margin:-margin] = True
    return (back - truth).abs()[keep & ~near].mean().item()


def max_jump(field):
    """Largest length of the field's difference between 4-neighbours, px."""
    dx = (field[..., :, 1:] - field[..., :, :-1]).norm(dim=1)
    dy = (field[..., 1:, :] - field[..., :-1, :]).norm(dim=1)
    return torch.maximum(dx.flatten(1).amax(1), dy.flatten(1).amax(1))


def test_zero_parameters_give_zero_field_and_unchanged_image():
    aligned = smooth_image()
    image, defects, field = m.misalign(aligned, NONE, 0)
    assert torch.equal(image, aligned)
    assert not defects.any() and not field.any()
    as_float = aligned.float() / 255
    image, _, _ = m.misalign(as_float, NONE, 0)
    assert image.dtype == torch.float32 and torch.allclose(image, as_float, atol=1e-6)


def test_pure_misalignment_is_undone_by_the_ground_truth():
    aligned = smooth_image()
    params = m.MisalignParams(max_shift=6, max_rotation=0.03, elastic_amplitude=2,
                              elastic_wavelength=60, crack_prob=0, fold_prob=0)
    image, defects, field = m.misalign(aligned, params, 1, pad=PAD)
    assert image.shape == (3, 1, 64, 64) and field.shape == (3, 2, 64, 64)
    assert not defects.any()
    moved = (image.float() - aligned[..., PAD:-PAD, PAD:-PAD].float()).abs().mean().item()
    assert moved > 10  # it did misalign
    assert reconstruction_error(aligned, image, defects, field) < 1.0


def test_crack_ground_truth_jumps_by_the_gap_across_the_seam():
    aligned = smooth_image(n=4)
    params = m.MisalignParams(max_shift=0, max_rotation=0, elastic_amplitude=0, crack_prob=1,
                              crack_gap=(8.0, 8.0), fold_prob=0)
    image, defects, field = m.misalign(aligned, params, 2, pad=PAD)
    assert torch.allclose(max_jump(field), torch.full((4,), 8.0), atol=1e-4)
    lengths = field.norm(dim=1)
    assert torch.all((lengths < 1e-6) | (lengths <= 8 + 1e-4))  # 0 or g(u) n: a pure jump
    gap = defects == m.CRACK
    assert gap.flatten(1).any(1).all() and not (defects == m.FOLD).any()
    assert torch.all(image[gap] == 255)  # crack_fill = 1.0: white
    assert reconstruction_error(aligned, image, defects, field) < 0.5


def test_fold_ground_truth_is_continuous_and_shifts_by_w_minus_w():
    aligned = smooth_image(n=4)
    params = m.MisalignParams(max_shift=0, max_rotation=0, elastic_amplitude=0, crack_prob=0,
                              fold_prob=1, fold_width=(18.0, 18.0), fold_ratio=(3.0, 3.0))
    image, defects, field = m.misalign(aligned, params, 3, pad=PAD)
    assert torch.allclose(field.norm(dim=1).flatten(1).amax(1), torch.full((4,), 12.0), atol=1e-3)
    assert torch.all(max_jump(field) < 1.5)  # no jump: the 12 px are spread over the band
    band = defects == m.FOLD
    assert band.flatten(1).any(1).all() and not (defects == m.CRACK).any()
    assert image[band].float().mean() < 0.5 * image[~band].float().mean()  # much darker
    assert reconstruction_error(aligned, image, defects, field) < 0.5


def test_full_model_is_undone_away_from_defects():
    aligned = smooth_image(n=4)
    params = m.MisalignParams(max_shift=5, max_rotation=0.02, elastic_amplitude=2,
                              elastic_wavelength=60, crack_prob=1, crack_gap=(4.0, 6.0),
                              fold_prob=1, fold_width=(8.0, 12.0), seam_wander=3)
    image, defects, field = m.misalign(aligned, params, 4, pad=PAD)
    assert set(defects.unique().tolist()) == {0, m.CRACK, m.FOLD}
    assert reconstruction_error(aligned, image, defects, field, margin=16) < 1.0


def test_defects_only_in_the_sections_asked():
    aligned = smooth_image(n=4).float() / 255
    which = torch.tensor([True, False, True, False])
    start = (aligned, torch.zeros(4, 1, 96, 96, dtype=torch.uint8), torch.zeros(4, 2, 96, 96))
    image, defects, field = m.add_cracks(*start, m.MisalignParams(), 0, which=which)
    assert defects.flatten(1).any(1).tolist() == which.tolist()
    assert field.flatten(1).any(1).tolist() == which.tolist()
    assert torch.equal(image[~which], aligned[~which])
    _, defects, field = m.add_folds(*start, m.MisalignParams(), 0, which=~which)
    assert (defects == m.FOLD).flatten(1).any(1).tolist() == (~which).tolist()
    assert field.flatten(1).any(1).tolist() == (~which).tolist()


def test_reproducible_from_a_seed():
    aligned = smooth_image()
    params = m.MisalignParams(crack_prob=0.5, fold_prob=0.5)
    first = m.misalign(aligned, params, 7, pad=PAD)
    again = m.misalign(aligned, params, torch.Generator().manual_seed(7), pad=PAD)
    other = m.misalign(aligned, params, 8, pad=PAD)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[2], other[2])


def test_a_stack_misaligned_in_slabs_with_its_draws_is_the_stack_misaligned_at_once():
    aligned = smooth_image(n=6)
    params = m.MisalignParams(crack_prob=0.5, fold_prob=0.5)
    whole = m.misalign(aligned, params, 7, pad=PAD)
    draws = m.draw(6, 96, 96, params, 7)
    slabs = [m.misalign(aligned[a:b], params, pad=PAD, draws=draws[a:b]) for a, b in ((0, 2), (2, 4), (4, 6))]
    assert all(torch.equal(torch.cat([slab[i] for slab in slabs]), whole[i]) for i in range(3))
    assert (whole[1] == m.CRACK).any() and (whole[1] == m.FOLD).any()  # every kind of draw was used
    with pytest.raises(ValueError, match="draws for 2 sections, 6 sections given"):
        m.misalign(aligned, params, pad=PAD, draws=draws[:2])


def test_smooth_field_has_the_asked_rms_and_feature_size():
    short = m.smooth_field(3, 128, 128, amplitude=2.5, wavelength=20, generator=0)
    long = m.smooth_field(3, 128, 128, amplitude=2.5, wavelength=80, generator=0)
    for field in (short, long):
        assert field.shape == (3, 2, 128, 128)
        rms = field.pow(2).sum(1).mean((1, 2)).sqrt()
        assert torch.allclose(rms, torch.full((3,), 2.5), atol=1e-4)

    def roughness(f):
        return (f[..., 1:] - f[..., :-1]).abs().mean()
    assert roughness(short) > 2.5 * roughness(long)  # 4x shorter wavelength: ~4x steeper


def test_random_misalignment_shift_and_rotation_bounds():
    shift = m.random_misalignment(8, 33, 33, 5.0, 0.0, 0.0, 100.0, generator=0)
    per_section = shift[:, :, :1, :1]
    assert torch.allclose(shift, per_section.expand_as(shift), atol=1e-5)  # a pure translation
    assert per_section.abs().max() <= 5.0 and per_section.abs().max() > 1.0
    turn = m.random_misalignment(8, 33, 33, 0.0, 0.05, 0.0, 100.0, generator=0)
    assert turn[:, :, 16, 16].abs().max() < 1e-5  # rotation about the centre
    corner = turn[:, :, 0, 0].norm(dim=1)
    assert corner.max() <= 0.05 * 16 * math.sqrt(2) + 1e-4 and corner.max() > 0.1


@pytest.mark.parametrize("pad", [0, 8])
def test_pad_is_cropped(pad):
    image, defects, field = m.misalign(smooth_image(n=1, size=48), NONE, 0, pad=pad)
    size = 48 - 2 * pad
    assert image.shape == (1, 1, size, size) and defects.shape == (1, 1, size, size)
    assert field.shape == (1, 2, size, size) and field.dtype == torch.float32


def test_with_fold_width_sets_the_folds_and_refuses_an_empty_or_reversed_range():
    params = m.with_fold_width([60, 120], m.MisalignParams(fold_prob=0.5))
    assert params == m.MisalignParams(fold_prob=0.5, fold_width=(60.0, 120.0))
    for lo, hi in ((30, 10), (0, 10)):
        with pytest.raises(h.UserError, match=rf"--fold_width {lo} {hi}: expected 0 < LO <= HI px"):
            m.with_fold_width((lo, hi))
