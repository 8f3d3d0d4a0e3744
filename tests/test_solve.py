"""solve.py: vector voting and the stack-wide solve on fields with known answers."""
import math

import pytest
import torch

from helpers import affine_field, compose, in_frame_of, invert_field, rigid_matrix, vector_length
from masks import interpolate_holes
from solve import (_banded_cholesky_solve, _normal_matrix, _unfolded, beside_missing, low_pass,
                   neighbour_pairs, solve_stack, vector_vote)


def constant(vectors) -> torch.Tensor:
    """``[K, 2, 8, 8]`` fields, each a constant vector."""
    return torch.tensor(vectors, dtype=torch.float32).view(-1, 2, 1, 1).expand(-1, 2, 8, 8).clone()


def test_vote_follows_the_agreeing_candidates():
    out = vector_vote(constant([[1.0, 0.0], [1.2, 0.0], [15.0, -9.0]]), softness=0.5)
    assert torch.allclose(out, torch.tensor([1.1, 0.0]).view(2, 1, 1).expand(2, 8, 8), atol=1e-3)


def test_vote_of_two_is_their_mean_and_invalid_candidates_are_ignored():
    assert torch.allclose(vector_vote(constant([[2.0, 0.0], [0.0, 4.0]])), constant([[1.0, 2.0]])[0])
    valid = torch.ones(3, 8, 8, dtype=torch.bool)
    valid[2] = False
    out = vector_vote(constant([[2.0, 0.0], [0.0, 4.0], [50.0, 50.0]]), valid)
    assert torch.allclose(out, constant([[1.0, 2.0]])[0])


def test_vote_is_per_pixel():
    candidates = constant([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    candidates[0, :, :4] = 30.0  # the first candidate is wrong in the top half only
    out = vector_vote(candidates, softness=0.5)
    assert torch.allclose(out, constant([[1.0, 0.0]])[0], atol=1e-4)


def test_neighbour_pairs_bridge_skipped_sections():
    assert neighbour_pairs(3, 1) == [(0, 1), (1, 0), (1, 2), (2, 1)]
    assert neighbour_pairs(4, 1, skip={1}) == [(0, 2), (2, 0), (2, 3), (3, 2)]
    assert len(neighbour_pairs(10, 3)) == 2 * (3 * 10 - 6)


def test_sections_further_are_paired_one_neighbour_further_both_ways_after_the_others():
    near = neighbour_pairs(6, 1, skip={3})  # usable 0 1 2 4 5
    assert neighbour_pairs(6, 1, skip={3}, further={2}) == near + [(0, 2), (2, 0), (2, 5), (5, 2)]
    assert neighbour_pairs(6, 1, further={0}) == neighbour_pairs(6, 1) + [(0, 2), (2, 0)]  # one side only at an end
    assert neighbour_pairs(6, 2, further={3}) == neighbour_pairs(6, 2) + [(0, 3), (3, 0)]  # one further than 2


def exact_pairs(truth: torch.Tensor, pairs) -> torch.Tensor:
    """The pair fields that truth fields ``[Z, 2, H, W]`` imply: ``r = compose(F_s, invert_field(F_t))``."""
    return torch.cat([compose(truth[s:s + 1], invert_field(truth[t:t + 1])) for s, t in pairs])


def test_solve_recovers_shifts_up_to_the_common_frame():
    truth = constant([[3.0, -1.0], [-4.0, 2.0], [0.5, 5.0], [2.0, 2.0], [-6.0, 0.0]])
    pairs = neighbour_pairs(5, 2)
    fields = exact_pairs(truth, pairs)
    assert torch.allclose(in_frame_of(solve_stack(5, pairs, fields, pull=1e-4, robust=None)), in_frame_of(truth),
                          atol=1e-3)
    # the pull pins the common frame at zero mean displacement (and shrinks the fields by ~pull / degree)
    assert torch.allclose(solve_stack(5, pairs, fields, pull=1e-2, robust=None), truth - truth.mean(0), atol=0.03)


def test_solve_recovers_rotations_by_relinearising():
    m = rigid_matrix(torch.tensor([0.1, -0.08, 0.05, 0.0]), torch.tensor([2.0, -3.0, 1.0, 0.0]),
                     torch.tensor([0.0, 4.0, -2.0, 1.0]))
    truth = affine_field(m, 48, 48)
    pairs = neighbour_pairs(4, 2)
    fields = exact_pairs(truth, pairs)
    core = (..., slice(8, -8), slice(8, -8))
    error = (in_frame_of(solve_stack(4, pairs, fields, pull=1e-3, robust=None)) - in_frame_of(truth))[core]
    once = (in_frame_of(solve_stack(4, pairs, fields, pull=1e-3, robust=None, rounds=1)) - in_frame_of(truth))[core]
    assert error.norm(dim=1).max() < 0.05 < once.norm(dim=1).max()


def test_solve_beats_chaining_on_noisy_pairs():
    gen = torch.Generator().manual_seed(0)
    z = 20
    truth = constant((torch.rand(z, 2, generator=gen) * 16 - 8).tolist())
    pairs = neighbour_pairs(z, 2)
    noisy = exact_pairs(truth, pairs) + constant((torch.randn(len(pairs), 2, generator=gen)).tolist())
    solved_error = (in_frame_of(solve_stack(z, pairs, noisy, pull=0.01, robust=4.0)) - in_frame_of(truth))[:, :, 0, 0]
    # chaining the (z, z - 1) pairs: F_z = r(z, z-1) + F_{z-1}
    step = {(s, t): noisy[i, :, 0, 0] for i, (s, t) in enumerate(pairs)}
    chained = torch.stack([sum((step[(k, k - 1)] for k in range(1, i + 1)), torch.zeros(2)) for i in range(z)])
    chained_error = chained - (truth[:, :, 0, 0] - truth[0, :, 0, 0])
    assert solved_error.norm(dim=1).mean() < 0.6 * chained_error.norm(dim=1).mean()


def test_solve_is_robust_to_one_wrong_pair_and_trusts_weights():
    truth = constant([[3.0, -1.0], [-4.0, 2.0], [0.5, 5.0], [2.0, 2.0], [-6.0, 0.0]])
    pairs = neighbour_pairs(5, 2)
    fields = exact_pairs(truth, pairs)
    fields[pairs.index((2, 3))] += 25.0

    def error(solved):
        return (in_frame_of(solved) - in_frame_of(truth)).norm(dim=1).max()

    assert error(solve_stack(5, pairs, fields, pull=1e-2, robust=2.0)) < 0.1
    assert error(solve_stack(5, pairs, fields, pull=1e-2, robust=None)) > 5
    weights = torch.ones(len(pairs), 8, 8)
    weights[pairs.index((2, 3))] = 0
    assert error(solve_stack(5, pairs, fields, weights, pull=1e-4, robust=None)) < 1e-3


def test_solve_needs_a_pull():
    with pytest.raises(ValueError):
        solve_stack(2, [(0, 1)], torch.zeros(1, 2, 4, 4), pull=0, robust=None)


def test_banded_solve_equals_a_dense_solve_per_pixel():
    pairs = [(0, 1), (1, 0), (1, 3), (3, 1), (2, 3), (4, 2), (4, 3)]  # bandwidth 2, sections 5
    sources, targets = (torch.tensor(side) for side in zip(*pairs))
    weights = torch.rand(len(pairs), 1, 3, 4, generator=torch.Generator().manual_seed(0))
    rhs = torch.randn(5, 2, 3, 4, generator=torch.Generator().manual_seed(1))
    solved = _banded_cholesky_solve(_normal_matrix(5, sources, targets, weights, 0.1), rhs)
    for y, x in [(0, 0), (2, 3), (1, 2)]:
        dense = 0.1 * torch.eye(5)
        for (s, t), w in zip(pairs, weights[:, 0, y, x]):
            d = torch.zeros(5)
            d[s], d[t] = 1, -1
            dense += w * torch.outer(d, d)
        assert torch.allclose(solved[:, :, y, x], torch.linalg.solve(dense, rhs[:, :, y, x]), atol=1e-5)


def test_detail_band_split_loses_nothing_and_inf_drops_the_detail():
    gen = torch.Generator().manual_seed(1)
    truth = torch.randn(6, 2, 24, 24, generator=gen)
    pairs = neighbour_pairs(6, 2)
    fields = exact_pairs(truth, pairs)
    whole = solve_stack(6, pairs, fields, pull=0.1, robust=4.0)
    assert torch.allclose(solve_stack(6, pairs, fields, pull=0.1, robust=4.0, smooth=3, detail_pull=0.1), whole,
                          atol=1e-4)
    assert torch.allclose(solve_stack(6, pairs, fields, pull=0.1, robust=4.0, smooth=3),
                          solve_stack(6, pairs, low_pass(fields, 3), pull=0.1, robust=4.0), atol=1e-5)
    with pytest.raises(ValueError):
        solve_stack(6, pairs, fields, pull=0.1, robust=4.0, smooth=3, detail_pull=0)


def test_detail_pull_keeps_fine_misalignment_and_stops_fine_drift():
    """Pairs see coarse and fine misalignment (both white in z) and fine tissue change that adds up along z (a
    random walk): a detail pull in between beats dropping the detail and beats the coarse part's weak pull."""
    gen = torch.Generator().manual_seed(2)
    z, size = 24, 48
    wave = torch.cos(torch.arange(size) * 2 * math.pi / 12)  # a 12 px period: gone after low_pass(., 6)
    fine = wave[None, None, :, None] * wave
    truth = torch.randn(z, 2, 1, 1, generator=gen) * 0.5 + torch.randn(z, 2, 1, 1, generator=gen) * fine
    drift = torch.randn(z, 2, 1, 1, generator=gen).mul(0.3).cumsum(0) * fine
    pairs = neighbour_pairs(z, 1)
    fields = torch.stack([(truth[s] + drift[s]) - (truth[t] + drift[t]) for s, t in pairs])

    def error(detail_pull):  # in the common frame (the stack's mean removed)
        solved = solve_stack(z, pairs, fields, pull=0.01, robust=None, smooth=6, detail_pull=detail_pull)
        return float((solved - solved.mean(0) - truth + truth.mean(0))[..., 12:-12, 12:-12].norm(dim=1).mean())

    assert error(0.3) < 0.85 * min(error(float("inf")), error(0.01))


def test_unfolded_widens_a_fold_and_equals_interpolating_its_final_holes_on_the_whole_image():
    field = 0.1 * torch.randn(1, 2, 48, 400, generator=torch.Generator().manual_seed(0))
    field[:, 0, :, 32:] -= 20  # across a 3 px band the ramp runs 20 px backwards: it folds the map over
    hole = torch.zeros(1, 1, 48, 400, dtype=torch.bool)
    hole[..., 30:33] = True
    hole[..., 20:24, 80:83] = True  # within reach of the band's rim: re-interpolated as the band grows
    hole[..., 20:24, 350:353] = True  # beyond its reach: not
    out = _unfolded(field, hole)
    final = hole | (out != field).any(1, keepdim=True)  # the holes as widened (noise: every value changes)
    assert final[0, 0, 0, 20:45].sum() > 3 and not final[..., 100:340].any()  # widened near the fold only
    assert torch.allclose(out, interpolate_holes(field, final), atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_where_a_target_saw_no_tissue_its_pair_field_stays_out_of_the_low_pass(masked):
    """Sections 3 px apart in x; every target is missing data in its left 16 columns, where the pair fields are
    garbage (40 px), and the network's field beside it (``beside_missing``) is off by 2 px. With ``smooth`` 8 the
    coarse parts (the detail dropped) average the tissue beyond: the solved fields in the tissue are the shifts'.
    The same with defect maps (a crack far from the missing data): each section's coarse part leaves those pixels out
    too (solved whole, with the weights carried into the common frame as the pair fields are); what remains comes
    through the sections' coupling where a neighbour's pair lies beside missing data (before: 11 px off, 0.66 mean)."""
    pairs, size = neighbour_pairs(3, 1), 112
    fields = torch.stack([torch.tensor([3.0 * (t - s), 0.0]).view(2, 1, 1).expand(2, size, size) for s, t in pairs])
    weights = torch.ones(len(pairs), size, size)
    weights[..., :16] = 0
    beside = beside_missing(weights[0] <= 0) & (weights[0] > 0)
    assert beside[:, 16].all() and not beside[:, 60:].any()  # some tissue is beside, most is not
    clean = fields[..., 16:].clone()
    fields = torch.where(beside, fields + 2.0, fields)
    fields[..., :16] = 40.0
    defects = torch.zeros(3, size, size, dtype=torch.uint8) if masked else None
    if masked:
        defects[1, 40:70, 95] = 1
    solved = solve_stack(3, pairs, fields, weights, pull=0.03, robust=None, smooth=8, detail_pull=math.inf,
                         defects=defects)
    expected = solve_stack(3, pairs, clean, pull=0.03, robust=None, smooth=8, detail_pull=math.inf)
    error = vector_length(solved[..., 16:] - expected)
    if masked:
        assert error.max() < 1 and error.mean() < 0.25
    else:
        assert error.max() < 0.05


def test_beside_missing_follows_the_share_of_missing_data_around_each_pixel():
    """The pixels where more than 15 % of the 129² px square around them is missing data join it: the 44 px beside
    a frame's straight edge, none beside a lone 40² px hole; an image all of whose tissue is that close keeps its
    own missing data."""
    missing = torch.zeros(3, 300, 300, dtype=torch.bool)
    missing[0, :, :100] = True  # a frame's edge: at column c the share is (164 - c) / 129
    missing[1, 130:170, 130:170] = True  # a lone hole: at most 1600 / 129² = 0.096
    missing[2] = True
    missing[2, 140:160, 140:160] = False  # a 20 px piece of tissue
    out = beside_missing(missing)
    assert out[0, :, :145].all() and not out[0, :, 145:].any()
    assert torch.equal(out[1], missing[1])
    assert torch.equal(out[2], missing[2])
