"""Penalties: exact values on hand-built fields and images, weights that exclude pixels, the total cost, and
the training objective (``pair_loss``) on hand-built batches with a stand-in network."""
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import helpers as h
import loss
from helpers import UserError
from models.pyramid import PyramidOutput

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


# ------------------------------------------------------------------ the training objective
def objective(**changes):
    settings = dict(similarity="mse", smoothness="jacob", lambda0=1.0, lambda1=0.5, lambda2=0.25, lambda3=0.0,
                    lambda4=4.0, lambda5=0.0, lambda6=0.0, lambda_gt=0.0, mask_smooth_radius=0, padding=0)
    return loss.Objective(**{**settings, **changes})


class FixedField:
    """A stand-in for ``models.Pyramid``: the field ``make(level)`` ``[1, 2, h, w]`` whatever the pair; counts calls."""

    def __init__(self, make):
        self.make, self.calls = make, 0

    def __call__(self, src, tgt, trunc):
        self.calls += 1
        field = self.make(trunc).expand(len(src), -1, -1, -1)
        return PyramidOutput(field, trunc, {trunc: field})


def constant(x, y, size=32):
    """``FixedField`` of the translation ``(x, y)`` px at every level (``size`` px at level 0)."""
    return FixedField(lambda level: torch.tensor([x, y]).view(1, 2, 1, 1).expand(1, 2, *(2 * [size >> level])))


def pair_batch(src, tgt=None):
    """data.py's batch of the pairs ``(src, tgt)`` ``[N, 1, H, W]``: no defect, no missing data, zero true fields."""
    tgt = src.clone() if tgt is None else tgt
    none = torch.zeros_like(src, dtype=torch.bool)
    return dict(src=src, tgt=tgt, src_missing=none, tgt_missing=none.clone(), src_mask=none.to(torch.uint8),
                tgt_mask=none.to(torch.uint8), field=torch.zeros(len(src), 2, *src.shape[-2:]),
                has_field=torch.ones(len(src), dtype=torch.bool))


@pytest.mark.parametrize("level", [0, 1])
def test_identical_images_and_the_zero_field_cost_nothing(level):
    model = constant(0.0, 0.0)
    cost, log, pictures = loss.pair_loss(model, pair_batch(texture(2)), objective(lambda6=1.0), level)
    assert cost == 0 and log == {"similarity": 0, "smoothness": 0, "consensus": 0, "total": 0, "identity": 0,
                                 "field_px": 0, "data_share": 1}
    assert model.calls == 2  # the pair, and the pair turned by 180 degrees for the consensus
    assert pictures["field"].shape == (2, 32 >> level, 32 >> level)


def test_a_translation_costs_no_smoothness_and_its_length_is_logged_in_full_resolution_pixels():
    _, log, _ = loss.pair_loss(constant(1.5, 2.0), pair_batch(texture(1)), objective(), 1)
    assert log["smoothness"] == 0 and log["similarity"] > 0 and log["identity"] == 0
    assert log["field_px"] == pytest.approx(2 * 2.5)  # 2.5 px at level 1


def test_identity_scores_the_unaligned_pair_where_both_sections_have_data():
    src = texture(1)
    batch = pair_batch(src.clone(), src)
    batch["src"][..., :16] = 0  # no data in the left half of the source
    batch["src_missing"][..., :16] = True
    _, log, _ = loss.pair_loss(constant(8.0, 0.0), batch, objective(), 0)  # pulls the gap 8 px to the left
    assert log["identity"] == 0 and log["similarity"] > 0
    assert log["data_share"] == pytest.approx(16 / 32, abs=1 / 32)  # x 8..23: the gap pulled left, none past the edge
    batch["src_missing"][:] = True
    assert loss.pair_loss(constant(0.0, 0.0), batch, objective(), 0)[1]["data_share"] == 0


def test_the_lambdas_weigh_the_terms_as_stated():
    ramp = FixedField(lambda level: torch.stack([0.1 * torch.arange(32.0).expand(32, 32),
                                                 torch.full((32, 32), 0.5)])[None])
    batch = pair_batch(texture(2, seed=0), texture(2, seed=1))
    batch["field"][:, 1] = 1.0
    lambdas = dict(lambda0=0.5, lambda1=3.0, lambda6=0.25, lambda_gt=2.0)
    cost, log, _ = loss.pair_loss(ramp, batch, objective(**lambdas), 0)
    assert log["smoothness"] == pytest.approx(0.01)  # the x displacement grows 0.1 px per px along x
    assert log["consensus"] == pytest.approx(3.1 ** 2 + 1.0 ** 2)  # f(p) + f(turned p) = (0.1 * 31, 2 * 0.5)
    expected = sum(lambdas[loss.LAMBDAS[name]] * log[name] for name in loss.LAMBDAS)
    assert float(cost) == pytest.approx(expected) == pytest.approx(log["total"])
    cost, log, _ = loss.pair_loss(ramp, batch, objective(**{**lambdas, "lambda1": 6.0}), 0)
    assert float(cost) == pytest.approx(expected + 3.0 * 0.01)


def test_consensus_and_supervision_are_computed_only_when_weighed():
    model = constant(0.5, -0.25)
    _, log, _ = loss.pair_loss(model, pair_batch(texture(1)), objective(), 0)
    assert model.calls == 1 and "consensus" not in log and "epe" not in log
    _, log, _ = loss.pair_loss(model, pair_batch(texture(1)), objective(lambda6=1.0, lambda_gt=1.0), 0)
    assert model.calls == 3
    assert log["consensus"] == pytest.approx(4 * (0.5 ** 2 + 0.25 ** 2))  # a drift that does not turn with the pair
    assert log["epe"] == pytest.approx(math.hypot(0.5, 0.25))


def test_the_supervised_error_is_taken_at_the_level_where_the_field_is_known():
    batch = pair_batch(texture(2))
    batch["field"][0, 0] = 2.0  # 2 px at full resolution: 1 px at level 1
    batch["field"][1] = 100.0  # a field that is not known ...
    batch["has_field"][1] = False  # ... weighs nothing
    batch["tgt_missing"][0, 0, :, :16] = True  # nor do pixels without data
    batch["field"][0, 0, :, :16] = 50.0
    _, log, _ = loss.pair_loss(constant(1.0, 0.0), batch, objective(lambda_gt=1.0), 1)
    assert log["epe"] == pytest.approx(0, abs=1e-6)
    _, log, _ = loss.pair_loss(constant(0.0, 0.0), batch, objective(lambda_gt=1.0), 1)
    assert log["epe"] == pytest.approx(1)


def test_the_supervised_error_weighs_defects_as_the_similarity_does():
    batch = pair_batch(texture(1))
    batch["field"][..., :8] = 3.0  # the true field: (3, 3) px in the 8 left columns ...
    batch["tgt_mask"][..., :8] = 1  # ... which lie near a defect: they weigh lambda4
    batch["src_mask"][..., 24:] = 2  # inside a defect: lambda5 (0 here), whatever the error there
    batch["field"][..., 24:] = 100.0
    _, log, _ = loss.pair_loss(constant(0.0, 0.0), batch, objective(lambda_gt=1.0, lambda4=4.0, lambda5=0.0), 0)
    assert log["epe"] == pytest.approx(4 * 8 * math.hypot(3, 3) / (4 * 8 + 16))
    _, log, _ = loss.pair_loss(constant(0.0, 0.0), batch, objective(lambda_gt=1.0, lambda4=1.0, lambda5=0.0), 0)
    assert log["epe"] == pytest.approx(8 * math.hypot(3, 3) / 24)


def test_images_are_mean_pooled_and_masks_max_pooled_to_the_level():
    batch = pair_batch(texture(1))
    batch["tgt_mask"][0, 0, 2, 3] = 1  # near a defect: the level-1 pixel (1, 1) weighs lambda4
    batch["tgt_missing"][0, 0, 5, 0] = True  # the level-1 pixel (2, 0) has no data
    batch["src_mask"][0, 0, 8, 9] = 2  # inside a defect: (4, 4) weighs lambda5
    _, _, pictures = loss.pair_loss(constant(0.0, 0.0), batch, objective(lambda4=4.0, lambda5=0.0), 1)
    expected = torch.ones(16, 16)
    expected[1, 1], expected[2, 0], expected[4, 4] = 4.0, 0.0, 0.0
    assert torch.equal(pictures["weights"], expected)
    assert torch.allclose(pictures["target"], F.avg_pool2d(batch["tgt"], 2)[0, 0])


def test_the_border_band_is_padding_pixels_wide_at_full_resolution():
    src = texture(1)
    tgt = src.clone()
    tgt[..., :, :3] = 0  # differs in the 3 px band
    batch = pair_batch(src, tgt)
    _, log, pictures = loss.pair_loss(constant(0.0, 0.0), batch, objective(padding=3), 1)
    assert log["similarity"] == 0 and log["identity"] == 0
    band = torch.ones(16, 16)
    band[:2], band[-2:], band[:, :2], band[:, -2:] = 0, 0, 0, 0  # 3 px at level 1: 1.5, rounded up to 2
    assert torch.equal(pictures["weights"], band)
    _, log, _ = loss.pair_loss(constant(0.0, 0.0), batch, objective(padding=0), 1)
    assert log["similarity"] > 0


def test_objective_settings_come_from_the_flags_and_name_known_penalties():
    flags = SimpleNamespace(**objective(similarity="ncc").__dict__, lr=1e-3, size=5)  # train.py's flags and more
    settings = loss.Objective.from_args(flags)
    assert settings == objective(similarity="ncc")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.lambda1 = 2.0
    with pytest.raises(UserError, match="unknown penalty 'l1'"):
        objective(smoothness="l1")


def test_collapse_is_a_zero_field_with_the_similarity_of_the_unaligned_pair():
    assert loss.collapsed(field_px=0.01, similarity=0.99, identity=1.0)
    assert not loss.collapsed(field_px=0.01, similarity=0.5, identity=1.0)  # the similarity improved
    assert not loss.collapsed(field_px=1.0, similarity=0.99, identity=1.0)  # the field moves
    assert not loss.collapsed(field_px=0.01, similarity=0.95, identity=1.0)  # just at the bound
