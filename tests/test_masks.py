"""Ternary masks and weights: exact distances, classes and weights on small hand-built maps."""
import math

import numpy as np
import pytest
import torch

import masks
from helpers import UserError


def one_defect(size=7, at=(3, 3), value=1):
    d = torch.zeros(1, 1, size, size, dtype=torch.uint8)
    d[0, 0, at[0], at[1]] = value
    return d


def brute_force_distance(defects, cap):
    """Distance to the nearest defect by comparing every pixel with every defect pixel."""
    out = torch.empty(defects.shape)
    h, w = defects.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    for n in range(defects.shape[0]):
        pts = (defects[n, 0] > 0).nonzero().float()
        d2 = (ys[..., None] - pts[:, 0]) ** 2 + (xs[..., None] - pts[:, 1]) ** 2
        out[n, 0] = d2.min(-1).values.sqrt().clamp(max=cap) if len(pts) else cap
    return out


def test_distance_to_one_defect_pixel_is_euclidean_and_capped():
    dist = masks.distance_to_defect(one_defect(), max_distance=2.5)
    assert dist.dtype == torch.float32 and dist.shape == (1, 1, 7, 7)
    d = dist[0, 0]
    assert d[3, 3] == 0
    assert d[3, 4] == 1 and d[2, 3] == 1
    assert d[4, 4] == pytest.approx(math.sqrt(2))
    assert d[3, 5] == 2 and d[1, 3] == 2
    assert d[4, 5] == pytest.approx(math.sqrt(5)) == d[1, 2]
    assert d[5, 5] == 2.5  # sqrt(8) > 2.5: capped
    assert d[0, 0] == 2.5
    assert int((d < 2.5).sum()) == 21  # the 21 pixels with dx^2 + dy^2 <= 6


def test_distance_is_exact_on_random_maps_and_batch_items_are_independent():
    g = torch.Generator().manual_seed(0)
    defects = (torch.rand(3, 1, 23, 31, generator=g) > 0.97).to(torch.uint8) * 2
    defects[2] = 0  # no defect at all: everything is at the cap
    dist = masks.distance_to_defect(defects, 9.5)
    assert torch.equal(dist, brute_force_distance(defects, 9.5))
    assert torch.all(dist[2] == 9.5)


def test_distance_accepts_any_dtype_and_any_positive_value():
    a = masks.distance_to_defect(one_defect(value=2), 4)
    b = masks.distance_to_defect(one_defect().bool(), 4)
    c = masks.distance_to_defect(one_defect().float() * 0.5, 4)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_ternary_mask_classes_around_one_defect():
    mask = masks.ternary_mask(one_defect(value=2), radius=2)
    assert mask.dtype == torch.uint8 and mask.shape == (1, 1, 7, 7)
    expected = torch.tensor([[0, 0, 0, 0, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0, 0],
                             [0, 0, 1, 1, 1, 0, 0],
                             [0, 1, 1, 2, 1, 1, 0],
                             [0, 0, 1, 1, 1, 0, 0],
                             [0, 0, 0, 1, 0, 0, 0],
                             [0, 0, 0, 0, 0, 0, 0]], dtype=torch.uint8)
    assert torch.equal(mask[0, 0], expected)


def test_ternary_mask_cracks_and_folds_are_both_inside_and_radius_zero_has_no_neighbourhood():
    defects = torch.zeros(1, 1, 5, 5, dtype=torch.uint8)
    defects[0, 0, 0, 0], defects[0, 0, 4, 4] = 1, 2
    mask = masks.ternary_mask(defects, radius=0)
    assert torch.equal(mask, (defects > 0).to(torch.uint8) * 2)
    assert torch.equal(masks.ternary_mask(torch.zeros(2, 1, 4, 4), 3), torch.zeros(2, 1, 4, 4, dtype=torch.uint8))


def test_smoothness_weights_per_class_without_smoothing():
    mask = torch.tensor([[[[0, 1, 2]]]], dtype=torch.uint8)
    weights = masks.smoothness_weights(mask, lambda2=0.04, lambda3=0.0, smooth_radius=0)
    assert weights.dtype == torch.float32
    assert torch.equal(weights, torch.tensor([[[[1.0, 0.04, 0.0]]]]))


def test_smoothness_weights_box_filter_averages_the_part_inside_the_image():
    mask = torch.zeros(1, 1, 3, 3, dtype=torch.uint8)
    mask[0, 0, 1, 1] = 2  # weight 0 at the centre, 1 elsewhere
    weights = masks.smoothness_weights(mask, lambda2=0.5, lambda3=0.0, smooth_radius=1)[0, 0]
    # a corner averages its 2x2 window, an edge pixel 2x3 (or 3x2), the centre all 3x3
    expected = torch.tensor([[3 / 4, 5 / 6, 3 / 4],
                             [5 / 6, 8 / 9, 5 / 6],
                             [3 / 4, 5 / 6, 3 / 4]])
    assert torch.allclose(weights, expected, atol=1e-6)


def test_similarity_weights_per_class_and_zero_where_missing():
    mask = torch.tensor([[[[0, 1, 2], [0, 1, 2]]]], dtype=torch.uint8)
    missing = torch.tensor([[[[False, False, False], [True, True, False]]]])
    weights = masks.similarity_weights(mask, missing, lambda4=5.0, lambda5=0.25)
    assert weights.dtype == torch.float32
    assert torch.equal(weights, torch.tensor([[[[1.0, 5.0, 0.25], [0.0, 0.0, 0.25]]]]))


def test_distance_at_full_training_size_and_radius():
    defects = torch.zeros(1, 1, 1152, 1152, dtype=torch.uint8)
    defects[0, 0, 500:504, :] = 1  # a crack across the section, rows 500..503
    dist = masks.distance_to_defect(defects, 100)
    assert dist[0, 0, 450, 7] == 50 and dist[0, 0, 553, 1000] == 50 and dist[0, 0, 502, 3] == 0
    assert dist[0, 0, 399, 3] == 100 and dist[0, 0, 0, 0] == 100


def test_pool_mask_keeps_the_worst_class_of_each_block():
    mask = torch.zeros(1, 1, 4, 6)
    mask[0, 0, 0, 1] = 1  # block (0, 0): near a defect
    mask[0, 0, 1, 3], mask[0, 0, 0, 2] = 2, 1  # block (0, 1): inside one beats near one
    mask[0, 0, 3, 5] = 1  # block (1, 2)
    assert torch.equal(masks.pool_mask(mask, 1), torch.tensor([[[[1.0, 2.0, 0.0], [0.0, 0.0, 1.0]]]]))
    assert torch.equal(masks.pool_mask(mask[..., :4], 2), torch.tensor([[[[2.0]]]]))
    assert masks.pool_mask(mask, 0) is mask


def test_border_weights_are_zero_in_a_band_of_padding_pixels():
    expected = torch.tensor([[0, 0, 0, 0, 0],
                             [0, 1, 1, 1, 0],
                             [0, 1, 1, 1, 0],
                             [0, 1, 1, 1, 0],
                             [0, 1, 1, 1, 0],
                             [0, 0, 0, 0, 0]], dtype=torch.float32)
    weights = masks.border_weights(6, 5, 1)
    assert weights.shape == (1, 1, 6, 5) and torch.equal(weights[0, 0], expected)
    assert torch.equal(masks.border_weights(3, 4, 0), torch.ones(1, 1, 3, 4))
    assert torch.equal(masks.border_weights(4, 4, 2), torch.zeros(1, 1, 4, 4))


def rim_mean_directly(x, hole, reach):
    """``interpolate_holes``' ``1 / d²`` mean of the rim (the image's edges replicated) at every pixel, straight from
    its definition on the whole image: one offset at a time. x ``[N, C, H, W]``, hole bool ``[N, 1, H, W]``."""
    h, w = x.shape[-2:]
    rim = ((torch.nn.functional.max_pool2d(hole.float(), 3, 1, 1) > 0) & ~hole).double()
    padded = [torch.nn.functional.pad(y, (reach,) * 4, mode="replicate") for y in (rim * x.double(), rim)]
    total, weight = torch.zeros(x.shape, dtype=torch.float64), torch.zeros(rim.shape, dtype=torch.float64)
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            if 0 < dx * dx + dy * dy <= reach * reach:
                shifted = [y[..., reach + dy:reach + dy + h, reach + dx:reach + dx + w] for y in padded]
                total += shifted[0] / (dx * dx + dy * dy)
                weight += shifted[1] / (dx * dx + dy * dy)
    return (total / weight).float()


def holes_near_an_edge_and_in_the_middle():
    """``(x [2, 2, 48, 64], hole [2, 1, 48, 64])``: a band 2 px from the left edge, a block on the top edge, a block
    in the middle of the second image; every hole pixel within 8 px of a rim."""
    hole = torch.zeros(2, 1, 48, 64, dtype=torch.bool)
    hole[0, 0, 10:30, 2:5] = True
    hole[0, 0, 0:4, 30:40] = True
    hole[1, 0, 20:27, 28:37] = True
    return torch.randn(2, 2, 48, 64, generator=torch.Generator().manual_seed(0)), hole


def test_interpolate_holes_in_its_box_equals_the_whole_image_evaluation():
    x, hole = holes_near_an_edge_and_in_the_middle()
    assert masks._bounding_box(hole, 2) != (0, 48, 0, 64)  # the sums run in a box smaller than the image
    out = masks.interpolate_holes(x, hole, 8)
    assert torch.allclose(out, torch.where(hole, rim_mean_directly(x, hole, 8), x), atol=1e-5)


def test_interpolate_holes_where_computes_only_those_pixels_as_the_whole_image_would():
    x, hole = holes_near_an_edge_and_in_the_middle()
    where = torch.zeros_like(hole)
    where[:, :, 12:40, 0:30] = True  # part of the band, none of the top block, part of the middle block
    out = masks.interpolate_holes(x, hole, 8, where=where)
    assert torch.allclose(out, torch.where(hole & where, rim_mean_directly(x, hole, 8), x), atol=1e-5)


def test_the_fft_length_is_the_next_product_of_2_3_and_5():
    assert [masks._fast_length(n) for n in (1, 7, 11, 768, 601, 4097)] == [1, 8, 12, 768, 625, 4320]



def test_an_image_holding_only_a_defect_maps_values_is_refused_a_few_dim_pixels_are_not():
    marks = np.zeros((10, 10), np.uint8)
    marks[3] = 2  # a fold across 10 % of the pixels: a defect map
    with pytest.raises(UserError, match="--raw X holds only the values 0 \\(none\\), 1 \\(crack\\) and 2 \\(fold\\)"):
        masks.check_image(marks, "--raw X")
    dim = np.zeros((10, 10), np.uint8)
    dim[0, 0] = 1  # 1 % of the pixels, at the edge of missing data
    assert masks.check_image(dim, "--raw X") is dim and masks.check_image(marks * 50, "--raw X") is not None
