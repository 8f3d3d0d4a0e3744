"""shifts.py: whole-section shifts and rigid matches by cross-correlation, on sections moved by known amounts."""
import numpy as np
import pytest
import torch

from conftest import moved_windows, turned_phantom
from helpers import UserError, affine_field, normalise, rigid_matrix, warp
from shifts import best_shifts, match_motion, match_r, rigid_search


def test_best_shifts_pull_each_source_onto_its_target_batched():
    moves = [(6, -4), (0, 0), (-11, 9), (2, 0)]
    stack = moved_windows(moves, size=128)
    sources, targets = stack[[0, 2, 3]], stack[[1, 1, 1]]
    shifts = best_shifts(sources, targets, reach=16, factor=1)
    assert shifts.shape == (3, 2)
    assert np.allclose(shifts, [[6, -4], [-11, 9], [2, 0]], atol=0.25)
    # the helpers convention: the constant field of the shift pulls the source onto the target
    field = torch.tensor(shifts[1]).view(1, 2, 1, 1).expand(1, 2, 128, 128)
    pulled = warp(torch.from_numpy(sources[1:2, None]).float(), field)[0, 0, 16:-16, 16:-16]
    assert torch.allclose(pulled, torch.from_numpy(targets[1, 16:-16, 16:-16]).float(), atol=3)


def test_best_shifts_see_past_missing_data_when_it_holds_the_mean():
    source, target = moved_windows([(9, 5), (0, 0)], size=128)
    source = source.copy()
    source[:, :40] = 0  # a third of the source is missing
    normalised = normalise(np.stack([source, target]))[0]  # missing pixels -> 0, the tissue's mean
    assert np.allclose(best_shifts(normalised[:1], normalised[1:], reach=16), [[9, 5]], atol=0.6)


def test_best_shifts_reject_sections_too_small_for_the_reach():
    with pytest.raises(UserError, match="too small"):
        best_shifts(np.ones((1, 40, 40), np.uint8), np.ones((1, 40, 40), np.uint8), reach=16, factor=2)


@pytest.fixture(scope="module")
def phantom_sections():
    """Normalised ``[5, 160, 160]``: a phantom section moved by a known rigid map (``TURN``), the section itself,
    its neighbour, a section of another phantom, a blank section; and the map's true match (shift px, angle rad)."""
    sections, match = turned_phantom(160, *TURN)
    return normalise(np.concatenate([sections, np.full_like(sections[:1], 90)]))[0], match


TURN = ((-25.0, 8.0), -0.05)  # px (x, y), rad: the known rigid map of the phantom section


def test_rigid_search_recovers_a_known_shift_and_rotation(phantom_sections):
    sections, (shift, angle) = phantom_sections
    match = rigid_search(sections[:1], sections[1:2])
    assert np.allclose(match.shift[0], shift, atol=1.0) and abs(float(match.angle[0]) - angle) < 0.005
    assert not match.poor[0]
    # the helpers convention: the match's field pulls the moved section onto the section
    pulled = warp(sections[None, :1], match.field(160, 160))[0, 0, 30:-30, 30:-30]
    assert float(torch.corrcoef(torch.stack([pulled.flatten(), sections[1, 30:-30, 30:-30].flatten()]))[0, 1]) > 0.97
    # the old search, a shift only, is off by the rotation: up to 0.05 x 80 = 4 px at the sides
    assert rigid_search(sections[:1], sections[1:2], angles=[0.0]).lead[0] < match.lead[0]
    assert np.allclose(rigid_search(sections[:1], sections[2:3]).shift[0], shift, atol=2.0)  # to its neighbour


def test_a_blank_or_foreign_section_is_a_poor_match_with_a_one_line_warning(phantom_sections):
    sections = phantom_sections[0]
    match = rigid_search(sections[[0, 0, 0]], sections[[2, 3, 4]])  # neighbour, other tissue, blank
    assert match.poor.tolist() == [False, True, True]
    field = match.field(160, 160)
    assert field[0].abs().max() > 10 and torch.equal(field[2], torch.zeros(2, 160, 160))  # no tissue: no field
    assert match.warning(1).startswith("warning: no whole-section match stands out")
    assert "tissue on only 0 %" in match.warning(2)  # normalised, a blank section is all missing data
    assert "\n" not in match.warning(1) + match.warning(2)
    mostly_missing = sections[1].clone()
    mostly_missing[:130] = 0
    sparse = rigid_search(sections[:1], mostly_missing[None])
    assert sparse.poor[0] and "tissue on only 19 %" in sparse.warning(0)


def test_rigid_search_batched_equals_one_by_one(phantom_sections):
    sections = phantom_sections[0]
    sources, targets = sections[[0, 2, 0, 1]], sections[[1, 1, 2, 3]]
    batched = rigid_search(sources, targets)
    for i in range(4):
        alone = rigid_search(sources[i:i + 1], targets[i:i + 1])
        for name in ("shift", "angle", "score", "lead", "tissue", "edge"):
            assert torch.allclose(getattr(batched, name)[i], getattr(alone, name)[0], atol=1e-4), name


def test_a_best_shift_beyond_the_reach_is_at_its_edge(phantom_sections):
    sections, (shift, _) = phantom_sections  # 25 px away in x
    assert not rigid_search(sections[:1], sections[1:2]).edge[0]
    assert rigid_search(sections[:1], sections[1:2], reach=16).edge[0]


def test_match_r_scores_the_true_match_above_a_wrong_one(phantom_sections):
    sections, (shift, angle) = phantom_sections
    true = affine_field(rigid_matrix(torch.tensor([angle]), *torch.tensor(shift)), 160, 160)
    zero = torch.zeros_like(true)
    r = match_r(sections[[0, 0, 1]], sections[[1, 1, 1]], torch.cat([true, zero, zero]))
    assert r[2] > 0.999 and r[0] > 0.9 and r[1] < 0.5


def test_match_motion_gives_match_r_and_the_turn_that_a_shift_leaves(phantom_sections):
    sections, (shift, angle) = phantom_sections  # turned by 0.05 rad
    true = affine_field(rigid_matrix(torch.tensor([angle]), *torch.tensor(shift)), 160, 160)
    shifted = torch.tensor(shift, dtype=torch.float32).view(1, 2, 1, 1).expand(1, 2, 160, 160)  # the turn left
    fields = torch.cat([true, shifted])
    r, motion = match_motion(sections[[0, 0]], sections[[1, 1]], fields)
    assert torch.equal(r, match_r(sections[[0, 0]], sections[[1, 1]], fields))
    y, x = torch.meshgrid(*(torch.arange(160.0) - 79.5,) * 2, indexing="ij")
    turn_left = 2 * np.sin(abs(angle) / 2) * float(torch.hypot(x, y).median())  # ~3.2 px: the turn's median move
    assert float(motion[0]) < 0.5 and abs(float(motion[1]) - turn_left) < 0.5
