"""Penalties: exact values on hand-built fields and images, weights that exclude pixels, the total cost."""
import math

import pytest
import torch
import torch.nn.functional as F

import helpers as h
import loss
from helpers import UserError

SMOOTHNESS = sorted(loss.SMOOTHNESS)


def texture(n=1, size=32, seed=0):
    """A textured image ``[n, 1, size, size]`` in [0, 1] (features ~3 px)."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 1, size // 3, size // 3, generator=g), size=(size, size), mode="bilinear")


def affine(angle=0.0, tx=0.0, ty=0.0, scale=1.0, size=16):
    matrix = h.rigid_matrix(torch.tensor([angle]), tx, ty, scale)
    return h.affine_field(matrix, size, size), matrix[0, :, :2] - torch.eye(2)


def checkerboard(a=0.25, size=8):
    """x-displacement ``+-a`` alternating pixel by pixel, y-displacement 0."""
    i, j = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    field = torch.zeros(1, 2, size, size)
    field[0, 0] = a * (1 - 2 * ((i + j) % 2))
    return field


# ------------------------------------------------------------------------- smoothness
@pytest.mark.parametrize("name", SMOOTHNESS)
def test_every_smoothness_penalty_is_zero_on_a_translation(name):
    field = torch.zeros(2, 2, 12, 10)
    field[:, 0], field[:, 1] = 2.5, -1.25
    assert loss.SMOOTHNESS[name](field, torch.ones(2, 1, 12, 10)) == 0


@pytest.mark.parametrize("name", SMOOTHNESS)
def test_every_smoothness_penalty_is_positive_on_noise_and_has_finite_gradients(name):
    field = torch.randn(2, 2, 12, 10, requires_grad=True)
    value = loss.SMOOTHNESS[name](field, torch.ones(2, 1, 12, 10))
    value.backward()
    assert value > 0.01 and torch.isfinite(field.grad).all()


def test_penalties_of_affine_fields():
    ones = torch.ones(1, 1, 16, 16)
    rotation, a = affine(angle=0.1, tx=1.5, ty=-2.0)
    assert torch.isclose(loss.jacob(rotation, ones), (a ** 2).sum(), rtol=1e-4)  # |A - I|_F^2
    assert torch.isclose(loss.tv(rotation, ones), a.abs().sum(), rtol=1e-4)
    for name in ("rigidity", "cjacob", "lap"):  # blind to rotation (and cjacob, lap to any affine map)
        assert loss.SMOOTHNESS[name](rotation, ones) < 1e-9
    scaling, _ = affine(scale=1.1)
    assert torch.isclose(loss.rigidity(scaling, ones), torch.tensor(6 * 0.1 ** 2), rtol=1e-4)  # 4 springs
    assert loss.cjacob(scaling, ones) < 1e-9 and loss.lap(scaling, ones) < 1e-9


def test_penalties_of_a_checkerboard_field():
    a, field, ones = 0.25, checkerboard(0.25), torch.ones(1, 1, 8, 8)
    assert torch.isclose(loss.jacob(field, ones), torch.tensor(8 * a ** 2))  # (2a)^2 along x and along y
    assert torch.isclose(loss.tv(field, ones), torch.tensor(4 * a))
    assert torch.isclose(loss.lap(field, ones), torch.tensor(4 * a ** 2))  # centre a, neighbour mean -a
    expected = 4 * a ** 2 + (math.sqrt(1 + 4 * a ** 2) - 1) ** 2  # x springs stretch 2a, y springs tilt
    assert torch.isclose(loss.rigidity(field, ones), torch.tensor(expected))
    assert loss.cjacob(field, ones) > 7 * a ** 2


@pytest.mark.parametrize("name", SMOOTHNESS)
def test_a_tear_inside_zero_weights_costs_nothing(name):
    field = torch.zeros(1, 2, 16, 16)
    field[..., 8:] = 1.0  # a step of 1 px between columns 7 and 8 ...
    weights = torch.ones(1, 1, 16, 16)
    assert loss.SMOOTHNESS[name](field, weights) > 0
    weights[..., 8] = 0  # ... where a crack (weight 0) runs
    assert loss.SMOOTHNESS[name](field, weights) == 0


def test_smoothness_does_not_depend_on_image_size():
    small, _ = affine(angle=0.05, scale=1.05, size=16)
    large, _ = affine(angle=0.05, scale=1.05, size=64)
    for name in ("jacob", "tv", "rigidity"):
        penalty = loss.SMOOTHNESS[name]
        assert torch.isclose(penalty(small, torch.ones(1, 1, 16, 16)), penalty(large, torch.ones(1, 1, 64, 64)),
                             rtol=1e-4)


# ------------------------------------------------------------------------- similarity
def test_mse_is_the_weighted_mean_squared_difference():
    warped, target, weights = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    warped[0, 0, 0, :2] = torch.tensor([1.0, 2.0])
    warped[0, 0, 3, 3] = 100.0  # where the weight is zero
    weights[0, 0, 0, :2] = torch.tensor([1.0, 3.0])
    weights[0, 0, 2, 2] = 4.0  # an equal pixel
    assert loss.mse(warped, target, weights) == (1 * 1 + 3 * 4) / 8
    assert loss.mse(target, target, torch.ones_like(weights)) == 0
    for side in (16, 64):  # a constant difference costs the same at any size
        assert loss.mse(torch.full((1, 1, side, side), 0.5), torch.zeros(1, 1, side, side),
                        torch.ones(1, 1, side, side)) == 0.25


def test_ncc_is_zero_for_identical_or_rescaled_images_and_two_for_inverted():
    x, ones = texture(2), torch.ones(2, 1, 32, 32)
    assert loss.ncc(x, x, ones).abs() < 1e-3
    assert loss.ncc(2 * x + 0.3, x, ones).abs() < 1e-3  # contrast and brightness changes are forgiven
    assert (loss.ncc(1 - x, x, ones) - 2).abs() < 1e-3
    assert 0.5 < loss.ncc(texture(2, seed=1), x, ones) < 1.5  # unrelated images: about uncorrelated


@pytest.mark.parametrize("name", ["mse", "ncc"])
def test_similarity_ignores_pixels_of_weight_zero(name):
    target, other = texture(1, seed=0), texture(1, seed=1)
    warped = torch.cat([other[..., :16], target[..., 16:]], -1)  # wrong on the left half only
    weights = torch.ones(1, 1, 32, 32)
    assert loss.SIMILARITY[name](warped, target, weights) > 0.01
    weights[..., :16] = 0
    assert loss.SIMILARITY[name](warped, target, weights).abs() < 1e-3


# -------------------------------------------------------------------------- consensus
def test_rotate180_field_brings_a_field_on_turned_images_back():
    image = texture(1)
    field, _ = affine(angle=0.05, tx=1.5, ty=-0.5, size=32)
    turned = loss.rotate180_field(field)  # the same misalignment, seen on the turned pair
    on_turned = h.warp(image.flip((-2, -1)), turned)
    assert torch.allclose(on_turned, h.warp(image, field).flip((-2, -1)), atol=1e-4)
    assert torch.equal(loss.rotate180_field(turned), field)
    assert loss.consensus(field, turned) == 0


def test_consensus_of_translations():
    t = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1).expand(1, 2, 8, 8)
    assert loss.consensus(t, -t) == 0  # t on the pair, -t on the turned pair: equivariant
    assert loss.consensus(t, t) == 4 * (2 ** 2 + 1 ** 2)  # a drift that did not turn with the images


# ------------------------------------------------------------------------ supervision
def test_epe_is_the_weighted_mean_end_point_error():
    true = torch.zeros(1, 2, 4, 4)
    field = true.clone()
    field[:, 0], field[:, 1] = 3.0, 4.0
    field[..., 0, 0] = 100.0
    weights = torch.ones(1, 1, 4, 4)
    weights[..., 0, 0] = 0
    assert loss.epe(field, true, weights) == 5


# ------------------------------------------------------------------ choosing, total
def test_penalties_are_chosen_by_name():
    assert loss.pick(loss.SMOOTHNESS, "jacob") is loss.jacob
    assert loss.pick(loss.SIMILARITY, "ncc") is loss.ncc
    with pytest.raises(UserError, match="unknown penalty 'l2': choose one of mse, ncc"):
        loss.pick(loss.SIMILARITY, "l2")


def test_total_cost_weighs_each_term():
    terms = {name: torch.tensor(v, requires_grad=True) for name, v in
             (("similarity", 1.0), ("smoothness", 2.0), ("consensus", 3.0), ("epe", 4.0))}
    lambdas = {"lambda0": 1.0, "lambda1": 0.5, "lambda6": 0.25, "lambda_gt": 2.0, "lr": 3e-4}
    cost, log = loss.total_cost(terms, lambdas)
    assert cost == 1 + 0.5 * 2 + 0.25 * 3 + 2 * 4
    assert log == {"similarity": 1.0, "smoothness": 2.0, "consensus": 3.0, "epe": 4.0, "total": 10.75}
    cost.backward()
    assert terms["smoothness"].grad == 0.5
    supervised, log = loss.total_cost(terms, {**lambdas, "lambda0": 0.0})  # similarity logged, not weighed
    assert supervised == 0.5 * 2 + 0.25 * 3 + 2 * 4 and log["similarity"] == 1.0
    with pytest.raises(ValueError, match="lambda0"):
        loss.total_cost({"similarity": terms["similarity"]}, {})
    with pytest.raises(ValueError, match="lambda6"):
        loss.total_cost({"consensus": terms["consensus"]}, {"lambda1": 1})
    with pytest.raises(ValueError, match="terms must be"):
        loss.total_cost({"sharpness": terms["similarity"]}, lambdas)
