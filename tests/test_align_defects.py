"""Defect masks at alignment time: the low-pass within the tissue, zero pair weights, align.py --defects."""
import numpy as np
import pytest
import torch

import align
import alignment
import volume
from alignment import SolveSettings
from conftest import run_script
from helpers import jacobian_determinant
from masks import box_mean, tissue_box_mean
from solve import low_pass, solve_stack
from test_alignment import random_net, sections
from models.archive import save_archive


def crack_field(size=48, right_of=(5.0, -4.0)):
    """A field ``[2, H, W]`` of (2, -1) px left of a diagonal crack and ``right_of`` px right of it, and the defect map
    ``[H, W]`` (1 on the crack: an 8-connected line, one pixel per row). The default jumps by 3 px each way along the
    crack's normal (1, -1) / sqrt 2, away from the left: a crack's re-aligning field, which never folds over."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    right = x > y
    field = torch.where(right, torch.tensor(right_of).view(2, 1, 1), torch.tensor([2.0, -1.0]).view(2, 1, 1))
    return field, (x == y).to(torch.uint8)


def test_without_defects_the_low_pass_is_the_old_one_bit_for_bit():
    field = torch.randn(3, 2, 40, 40)
    old = box_mean(box_mean(field, 5), 5)
    assert torch.equal(low_pass(field, 5, torch.zeros(3, 40, 40, dtype=torch.uint8)), old)
    assert torch.equal(low_pass(field, 5, None), old)
    assert torch.allclose(tissue_box_mean(field, torch.ones(40, 40, dtype=torch.bool), 5), box_mean(field, 5),
                          atol=1e-6)


def test_a_field_constant_on_each_side_of_a_crack_stays_so():
    field, crack = crack_field()
    smoothed = low_pass(field, 8, crack)
    tissue = crack == 0
    assert torch.allclose(smoothed[:, tissue], field[:, tissue], atol=1e-5)
    blurred = low_pass(field, 8)  # the old low-pass averages across the crack
    assert (blurred - field)[:, tissue].abs().max() > 1
    inside = smoothed[:, crack > 0]  # filled from the tissue around: between the two sides
    assert (inside[0] >= 2 - 1e-5).all() and (inside[0] <= 5 + 1e-5).all()


def fold_field(size=48, jump=10.0):
    """A field ``[2, H, W]`` of 0 above a fold across rows 20..23 (4 px, the defect map ``[H, W]``, 2 there) and
    ``(0, -jump)`` px below it, ``jump`` > 4: the tissue below the fold moved toward it by more than the fold's
    width in the image, as under a real fold (misalign.py: ``W - w`` for a band of width ``w = W / ratio``)."""
    field = torch.zeros(2, size, size)
    field[1, 24:] = -jump
    fold = torch.zeros(size, size, dtype=torch.uint8)
    fold[20:24] = 2
    return field, fold


@pytest.mark.parametrize("radius", [0, 6])
def test_a_fold_s_field_runs_through_its_band_without_folding_over(radius):
    """Filled from the nearest side (a step of 10 px backwards in the band's middle) the map folds over; the field
    runs from one side's value to the other's instead, its band widened until it does not fold, and leaves the
    tissue farther away as it was (with ``radius``: as the low-pass within the tissue left it)."""
    field, fold = fold_field()
    filled = low_pass(field, radius, fold)
    assert (jacobian_determinant(filled[None]) > 0).all()  # before: 47 pixels of the band's middle folded
    column = filled[1, :, 24]
    assert (column.diff() <= 1e-5).all() and column.diff().min() > -1  # from 0 down to -10, never backwards
    kept = torch.ones(48, dtype=torch.bool)
    kept[8:36] = False
    assert torch.allclose(filled[:, kept], field[:, kept], atol=1e-4)
    crack, line = crack_field(right_of=(-3.0, 4.0))  # a jump backwards at a crack: unfolded the same way
    assert (jacobian_determinant(low_pass(crack, 0, line)[None]) > 0).all()


def test_a_section_s_fold_does_not_fold_its_solved_field_over():
    """Section 1 has the fold of ``fold_field``; its pairs show the field 10 px lower below it. The solve takes the
    whole jump into section 1's field (``_own_jumps``), through a band wide enough not to fold over."""
    field, fold = fold_field()
    pairs = [(0, 1), (1, 0), (1, 2), (2, 1)]
    fields = torch.stack([-field, field, field, -field])  # F_s - F_t, in the target's grid (the fold: rows 20..23)
    folds = torch.zeros(3, 48, 48, dtype=torch.uint8)
    folds[1] = fold
    solved = solve_stack(3, pairs, fields, pull=0.03, robust=4.0, smooth=6, detail_pull=5.0, defects=folds)
    assert (jacobian_determinant(solved) > 0).all()  # before: 235 pixels of section 1's fold folded over
    relative = solved[1, 1] - solved[0, 1]
    assert 9 < relative[40:].mean() - relative[:8].mean() + 20 < 11  # the jump (-10 px), all in section 1


@pytest.mark.parametrize("radius", [0, 6])
def test_a_folds_inside_is_filled_from_the_tissue_around(radius):
    field = torch.tensor([1.5, -2.5]).view(2, 1, 1).repeat(1, 40, 40)
    fold = torch.zeros(40, 40, dtype=torch.uint8)
    fold[:, 17:23] = 2  # a band across the section
    field[:, fold > 0] = 50.0  # what the network made of the folded tissue
    filled = low_pass(field, radius, fold)
    assert torch.allclose(filled, torch.tensor([1.5, -2.5]).view(2, 1, 1).expand(2, 40, 40), atol=1e-5)


def test_untrusted_pixels_are_left_out_without_stopping_the_boxes():
    """A neighbour's fold (untrusted: the pair field is garbage there) is filled across from both sides, smoothly:
    the field has no jump there, unlike at the section's own fold (``defects``)."""
    y = torch.arange(40.0).view(40, 1).expand(40, 40)
    field = torch.stack([torch.zeros(40, 40), 0.1 * y])  # a smooth ramp
    band = torch.zeros(40, 40, dtype=torch.bool)
    band[18:22] = True
    garbage = field.masked_fill(band, 50.0)
    assert torch.allclose(low_pass(garbage, 0, untrusted=band), field, atol=0.21)  # filled from around
    smoothed = low_pass(garbage, 4, untrusted=band)
    assert smoothed[1].diff(dim=0).abs().max() < 0.2 and (smoothed - field)[:, 8:32].abs().max() < 0.3
    own = low_pass(garbage, 4, band.to(torch.uint8))[1]  # a defect of its own: each side its own tissue's mean, a jump
    assert (own[22] - own[17]).min() > 1 > (smoothed[1, 22] - smoothed[1, 17]).max()  # across the band (the ramp: 0.5)
    assert torch.equal(low_pass(field, 4, untrusted=torch.zeros_like(band)), low_pass(field, 4))


def test_each_image_of_a_batch_is_low_passed_as_on_its_own():
    """Only the images with a defect or untrusted pixel take the masked path: the others are the plain low-pass bit for
    bit, and the masked ones are what they are alone (a section's defects never change its neighbour's)."""
    field, crack = crack_field()
    fields = torch.stack([field, field.flip(-1), field + 1])  # [3, 2, H, W]: a crack in the first only
    defects, untrusted = torch.zeros(3, *crack.shape, dtype=torch.uint8), torch.zeros(3, *crack.shape, dtype=torch.bool)
    defects[0], untrusted[1, 20:24] = crack, True  # and an untrusted band in the second
    batch = low_pass(fields, 8, defects, untrusted)
    assert torch.equal(batch[2], box_mean(box_mean(fields[2:], 8), 8)[0])
    assert torch.allclose(batch[0], low_pass(field, 8, crack), atol=1e-6)
    assert torch.allclose(batch[1], low_pass(fields[1], 8, untrusted=untrusted[1]), atol=1e-6)
    tissue = defects[:, None] == 0  # the same within masks.tissue_box_mean, per image
    boxed = tissue_box_mean(fields, tissue, 8)
    assert torch.equal(boxed[1:], box_mean(fields[1:], 8))
    assert torch.allclose(boxed[0], tissue_box_mean(field, tissue[0], 8), atol=1e-6)


def test_a_stack_without_a_defect_solves_bit_for_bit_as_without_masks():
    pairs = [(0, 1), (1, 0), (1, 2), (2, 1)]
    fields = torch.randn(4, 2, 32, 32)
    plain = solve_stack(3, pairs, fields, pull=0.03, robust=4.0, smooth=4, detail_pull=5.0)
    masked = solve_stack(3, pairs, fields, pull=0.03, robust=4.0, smooth=4, detail_pull=5.0,
                         defects=torch.zeros(3, 32, 32, dtype=torch.uint8))
    assert torch.equal(plain, masked)


@pytest.mark.parametrize("detail_pull", [5.0, float("inf")])
def test_a_section_s_field_jumps_at_its_own_fold_only(detail_pull):
    """Section 1 has a fold across rows 20..23 and its field jumps there by about 3 px (its pairs disagree: 2 to
    4 px); sections 0 and 2 are whole. Their solved fields have no jump at section 1's fold (the pull's share of
    the jump is spread over the low-pass's width there), section 1's has it."""
    size, jump = 48, torch.zeros(48, 48)
    jump[22:] = 1.0
    pairs = [(0, 1), (1, 0), (1, 2), (2, 1)]
    told = {(0, 1): -2.0, (1, 0): 4.0, (1, 2): 3.0, (2, 1): -3.5}  # the y step each pair field shows at the fold
    fields = torch.stack([torch.stack([torch.zeros(size, size), told[p] * jump]) for p in pairs])
    fold = torch.zeros(3, size, size, dtype=torch.uint8)
    fold[1, 20:24] = 2
    solved = solve_stack(3, pairs, fields, pull=0.03, robust=None, smooth=6, detail_pull=detail_pull, defects=fold)
    steps = solved[:, 1].diff(dim=-2).abs().amax(dim=(-1, -2))  # the largest step between neighbouring rows
    assert steps[0] < 0.15 and steps[2] < 0.15, steps  # smooth across the neighbour's fold
    assert solved[1, 1, 24:].min() - solved[1, 1, :20].max() > 1.5  # section 1 keeps its jump, sharp
    relative = (solved[1, 1] - solved[0, 1])  # in section 0's frame, as in_frame_of: the jump is all section 1's
    assert 2.5 < relative[40:].mean() - relative[:8].mean() < 3.6
    # and sharp: no ramp beside the fold (the neighbours' share of the jump spread over the low-pass's width)
    assert (relative[14:20] - relative[:14].mean()).abs().max() < 0.15  # before _own_jumps: 0.30
    assert (relative[24:30] - relative[30:].mean()).abs().max() < 0.15


def test_pair_weights_are_zero_in_the_defects_of_either_section():
    """Section 1 lies 2 px above section 0 and has a fold (raw rows 8..11) where the pair field onto it is garbage;
    the solve's frame is their mean, where the fold lies in rows 9..12."""
    truth = torch.tensor([[0.0, 0.0], [0.0, -2.0]]).view(2, 2, 1, 1).expand(2, 2, 24, 24)
    pairs = [(0, 1), (1, 0)]
    fields = torch.stack([truth[s] - truth[t] for s, t in pairs]).clone()
    fields[0, :, 8:12] = 40.0  # pair 0 -> 1, in the grid of section 1
    fold = torch.zeros(2, 24, 24, dtype=torch.uint8)
    fold[1, 8:12] = 2
    mean_frame = truth - truth.mean(0)
    solved = solve_stack(2, pairs, fields, pull=1e-3, robust=None, defects=fold)
    assert torch.allclose(solved, mean_frame, atol=0.01)  # the garbage weighs 0; inside: the tissue around
    assert solve_stack(2, pairs, fields, pull=1e-3, robust=None)[:, :, 9:13].abs().max() > 10
    stack = np.full((2, 24, 24), 100, np.uint8)
    _, out = alignment.solve_pairs(stack, pairs, fields, SolveSettings(pull=1e-3, robust=0), 0, defects=fold.numpy())
    assert torch.allclose(out[1], truth[1], atol=0.01)


def test_where_no_pair_weighs_the_pull_s_zeros_do_not_shrink_the_field_in_the_tissue():
    """Tissue in the centre 48² of a 96² frame only (the pairs weigh 0 around it: no tissue) and a crack in a corner
    of section 1's: away from the crack the masked solve's fields are the plain solve's, up to the border too (the
    two orders of solve and low-pass differ a little where the weights vary)."""
    size, shifts = 96, torch.tensor([[0.0, 0.0], [5.0, 0.0], [10.0, 3.0]])
    pairs = [(0, 1), (1, 0), (1, 2), (2, 1)]
    fields = torch.stack([(shifts[s] - shifts[t]).view(2, 1, 1).expand(2, size, size) for s, t in pairs])
    weights = torch.zeros(len(pairs), size, size)
    weights[:, 24:72, 24:72] = 1
    crack = torch.zeros(3, size, size, dtype=torch.uint8)
    crack[1, 26:28, 26:40] = 1
    settings = dict(pull=0.03, robust=4.0, smooth=16, detail_pull=5.0)
    plain = solve_stack(3, pairs, fields, weights, **settings)
    masked = solve_stack(3, pairs, fields, weights, defects=crack, **settings)
    assert plain[:, :, 48, 48].abs().max() > 4.5  # what the pull leaves of the 5 px shifts
    # was 15-57 % short; now within the pull's share where the weights (shares of tissue) fall below 1
    assert torch.allclose(masked[:, :, 36:72, 36:72], plain[:, :, 36:72, 36:72], atol=0.15)  # 0.10 at the corner


@pytest.fixture
def setup(tmp_path, tiny_volume):
    """tiny_volume (a crack in section 3), a random network's archive, and the common align.py arguments."""
    archive = save_archive(tmp_path / "net.pt", random_net(), summary={"name": "net"})
    paths = tiny_volume[0]
    return tmp_path, paths, tiny_volume[1], ["--archive", str(archive), "--source", paths["image"], "--chunk", "32",
                                             "--overlap", "32"]


def read(dest, name, z0, z1):
    return volume.read(volume.open_volume(str(dest / name)), (0, 0, z0), (64, 64, z1 - z0))


@pytest.mark.parametrize("mode", [[], ["--vote", "2"], ["--solve"]])
def test_a_stack_without_defects_aligns_bit_for_bit_as_without_the_layer(setup, mode):
    tmp, paths, _, common = setup
    span = ["--z_start", "4", "--z_stop", "8"] + mode  # tiny_volume's only defect is in section 3
    align.main(common + span + ["--dest", str(tmp / "plain")])
    align.main(common + span + ["--dest", str(tmp / "masked"), "--defects", paths["defects"]])
    assert np.array_equal(read(tmp / "plain", "field", 4, 8), read(tmp / "masked", "field", 4, 8))
    assert not read(tmp / "masked", "defects", 4, 8).any()


@pytest.mark.parametrize("mode", [[], ["--solve"]])
def test_the_defect_layer_is_written_in_the_aligned_frame(setup, mode):
    tmp, paths, arrays, common = setup
    align.main(common + ["--z_start", "2", "--z_stop", "6", "--dest", str(tmp / "d"), "--defects",
                         paths["defects"]] + mode)
    fields, written = read(tmp / "d", "field", 2, 6), read(tmp / "d", "defects", 2, 6)
    expected = np.stack([alignment.aligned_defects(arrays["defects"][z, 0], torch.from_numpy(f))
                         for z, f in zip(range(2, 6), fields)])
    assert np.array_equal(written[:, 0], expected) and written[1].any() and np.abs(fields[1]).max() > 0.05
    with pytest.raises(align.UserError, match="--defects file:.*, not None"):  # the layer is part of the run record
        align.main(common + ["--z_start", "2", "--z_stop", "7", "--dest", str(tmp / "d")] + mode)


def test_bad_defect_layers_are_one_line_before_anything_is_written(setup, run_command):
    tmp, paths, _, common = setup
    small = volume.create_volume("file://" + str(tmp / "small"), (32, 64, 12), "uint8", 1, mips=1,
                                 chunk=(32, 32, 1), provenance={"description": "test"})
    coarse = volume.create_volume("file://" + str(tmp / "coarse"), (64, 64, 12), "uint8", 1, mips=2,
                                  chunk=(32, 32, 1))  # detect_defects.py --mip 1 wrote mip 1 alone
    volume.write(coarse, np.ones((12, 1, 32, 32), np.uint8), (0, 0, 0), 1)
    for layer, message in ((paths["field"], "is not a defect layer (1 channel of uint8"),
                           (small.cloudpath, "covers (0, 0, 0)..(32, 64, 12) at resolution [8.0, 8.0, 40.0], not "
                                             "the source's (0, 0, 0)..(64, 64, 12) at [8.0, 8.0, 40.0]"),
                           (str(tmp / "nothing"), "no volume at"),
                           (coarse.cloudpath, "holds no data at mip 0 (it holds mips 1)"),  # read as no defect
                           (paths["image"], "section 0, holds the value")):  # an image is no defect layer
        result = run_command(align, *common, "--dest", tmp / "out", "--z_start", "0", "--z_stop", "3",
                             "--defects", layer)
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 2 and message in last and "Traceback" not in result.stderr, result.stderr
        assert not (tmp / "out" / "image").exists()


@pytest.mark.parametrize("mode", [[], ["--solve"]])
def test_a_section_marked_all_defect_is_aligned_with_a_warning_in_one_line(setup, mode, capsys):
    tmp, paths, arrays, common = setup
    marks = arrays["defects"].copy()
    marks[4] = 2  # section 4 one fold: nothing of it is tissue to align by (a wrong layer, most likely)
    layer = "file://" + str(tmp / "folds")
    volume.write_pyramid(volume.create_volume(layer, (64, 64, 12), "uint8", 1, chunk=(32, 32, 1)), marks, (0, 0, 0),
                         "labels")
    align.main(common + ["--z_start", "2", "--z_stop", "6", "--dest", str(tmp / "d"), "--defects", layer] + mode)
    lines = [line for line in capsys.readouterr().err.splitlines() if "--defects marks" in line]
    assert lines == ["warning: --defects marks every pixel of section 4 a crack or fold: it is aligned by no tissue "
                     "of its own (the solve gives it the pull's zero field); is it the right layer? "
                     "[1 section all defect: 4]"]
