"""shifts.py: whole-section shifts by cross-correlation, on textures moved by known amounts."""
import numpy as np
import pytest
import torch

from conftest import moved_windows
from helpers import UserError, normalise, warp
from shifts import best_shifts


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
