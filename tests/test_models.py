"""The network: encoder, local correlation, aligners and the pyramid; and that it learns a translation."""
import pytest
import torch
import torch.nn.functional as F

import helpers as h
import loss
from models import Aligner, Encoder, Pyramid, correlation_offsets, local_correlation
from models.correlation import unit_vectors


def smooth_images(n, size, seed, margin=0):
    """``[n, 1, size + 2 margin, size + 2 margin]`` random smooth images (features ~6 px)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, size // 6 + 2, size // 6 + 2, generator=g)
    return F.interpolate(coarse, size=(size + 2 * margin,) * 2, mode="bicubic", align_corners=False)


def randomise_outputs(net: Pyramid, seed=0):
    """Give every aligner's last (zero-initialised) conv small random weights, so the net outputs non-zero fields."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for aligner in net.aligners:
            last = aligner.net[-1]
            last.weight.copy_(0.01 * torch.randn(last.weight.shape, generator=g))
            last.bias.copy_(0.1 * torch.randn(last.bias.shape, generator=g))
    return net


def small_pyramid(size=3, **kwargs):
    torch.manual_seed(0)
    return Pyramid(size=size, k=3, corr_radius=1, aligner_widths=(8,), encoder_base=4, encoder_step=2, **kwargs)


# ---------------------------------------------------------------------------- encoder
def test_encoder_levels_halve_resolution_and_add_channels():
    feats = Encoder(3, base=12, step=6)(torch.rand(2, 1, 16, 24))
    assert [tuple(f.shape) for f in feats] == [(2, 12, 16, 24), (2, 18, 8, 12), (2, 24, 4, 6)]


# ------------------------------------------------------------------------ correlation
def test_correlation_of_a_map_with_itself_is_one_at_offset_zero():
    a = torch.randn(2, 5, 7, 9)
    corr = local_correlation(a, a, 2)
    assert corr.shape == (2, 25, 7, 9)
    assert correlation_offsets(2)[12] == (0, 0)
    assert torch.allclose(corr[:, 12], torch.ones(2, 7, 9), atol=1e-6)
    assert corr.abs().max() <= 1 + 1e-6


def test_correlation_matches_hand_computation_and_reads_zero_outside():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 4, 6, 8, generator=g), torch.randn(1, 4, 6, 8, generator=g)
    corr = local_correlation(a, b, 1)
    offsets = correlation_offsets(1)
    assert offsets == [(-1, -1), (0, -1), (1, -1), (-1, 0), (0, 0), (1, 0), (-1, 1), (0, 1), (1, 1)]
    y, x = 2, 5
    for c, (dx, dy) in enumerate(offsets):
        u, v = a[0, :, y, x], b[0, :, y + dy, x + dx]
        assert torch.isclose(corr[0, c, y, x], (u @ v) / (u.norm() * v.norm()), atol=1e-6)
    assert torch.all(corr[0, offsets.index((1, 0)), :, -1] == 0)  # b(p + (1, 0)) is outside on the last column
    assert torch.all(corr[0, offsets.index((0, -1)), 0, :] == 0)  # and b(p - (0, 1)) on the first row


def test_correlation_finds_a_shifted_map():
    a = torch.randn(1, 6, 8, 8)
    b = torch.zeros_like(a)
    b[..., 2:, :-1] = a[..., :-2, 1:]  # b(p + d) = a(p) for d = (dx, dy) = (-1, 2)
    corr = local_correlation(a, b, 2)
    d = correlation_offsets(2).index((-1, 2))
    assert torch.all(corr[0, :, :-2, 1:].argmax(0) == d)  # wherever p + d lies in the image
    assert torch.allclose(corr[0, d, :-2, 1:], torch.ones(6, 7), atol=1e-6)


def test_correlation_of_zero_features_is_zero_not_nan():
    corr = local_correlation(torch.zeros(1, 3, 4, 4), torch.randn(1, 3, 4, 4), 1)
    assert torch.all(corr == 0)


def test_correlation_gradient_is_the_true_one_for_either_input():
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda x, y: local_correlation(x, y, 1), (a, b))
    weights = torch.randn(2, 9, 4, 5, generator=g, dtype=torch.float64)
    (local_correlation(a, b, 1) * weights).sum().backward()
    b_only = b.detach().clone().requires_grad_()
    (local_correlation(a.detach(), b_only, 1) * weights).sum().backward()  # the backward skips a's share
    assert torch.allclose(b_only.grad, b.grad)


def test_unit_vectors_follow_normalize_and_keep_zero_vectors_zero():
    x = torch.randn(2, 5, 3, 4)
    x[1, :, 2, 3] = 0
    assert torch.allclose(unit_vectors(x), torch.nn.functional.normalize(x, dim=1), atol=1e-6)
    assert torch.all(unit_vectors(x)[1, :, 2, 3] == 0)
    grads = []
    for fn in (unit_vectors, lambda v: torch.nn.functional.normalize(v, dim=1)):
        v = x.clone().requires_grad_()
        (fn(v) * torch.arange(5.0).view(1, 5, 1, 1)).sum().backward()
        grads.append(v.grad)
    assert torch.isfinite(grads[0]).all()  # warped features read 0 outside the image: no 0 x inf there
    assert torch.allclose(grads[0], grads[1], rtol=1e-4)


# ---------------------------------------------------------------------------- aligner
def test_aligner_starts_at_zero_and_checks_its_kernel():
    aligner = Aligner(5, k=7, widths=(32, 64, 32, 16), corr_radius=3)
    convs = [m for m in aligner.net if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (2 * 5 + 49, 32, (7, 7)), (32, 64, (7, 7)), (64, 32, (7, 7)), (32, 16, (7, 7)), (16, 2, (7, 7))]
    out = aligner(torch.randn(2, 5, 12, 10), torch.randn(2, 5, 12, 10))
    assert out.shape == (2, 2, 12, 10) and torch.all(out == 0)
    assert Aligner(5, k=3, corr_radius=0).net[0].in_channels == 10
    with pytest.raises(ValueError, match="odd"):
        Aligner(5, k=4)


# ---------------------------------------------------------------------------- pyramid
def test_untrained_pyramid_returns_exactly_zero_fields():
    net = Pyramid(size=3)
    src, tgt = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    for trunc, side in ((0, 32), (1, 16), (2, 8)):
        out = net(src, tgt, trunc=trunc)
        assert out.field.shape == (2, 2, side, side) and torch.all(out.field == 0)
        assert out.level == trunc and sorted(out.residuals) == list(range(trunc, 3))
        assert out.full_resolution().shape == (2, 2, 32, 32)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
def test_shapes_for_every_size(size):
    net = randomise_outputs(small_pyramid(size))
    out = net(torch.rand(1, 1, 32, 48), torch.rand(1, 1, 32, 48))
    assert out.field.shape == (1, 2, 32, 48)
    assert {level: tuple(r.shape) for level, r in out.residuals.items()} == {
        level: (1, 2, 32 >> level, 48 >> level) for level in range(size)}
    assert out.field.abs().max() > 0


def test_sizes_not_divisible_by_the_coarsest_level_are_refused():
    with pytest.raises(ValueError, match="divisible by 2\\^\\(size-1\\) = 8"):
        Pyramid(size=4)(torch.rand(1, 1, 32, 36), torch.rand(1, 1, 32, 36))
    with pytest.raises(ValueError, match="trunc"):
        Pyramid(size=2)(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), trunc=2)


def test_field_is_the_upsampled_coarse_field_plus_the_residual():
    net = randomise_outputs(small_pyramid(3))
    src, tgt = smooth_images(1, 32, 1), smooth_images(1, 32, 2)
    out, coarse = net(src, tgt), net(src, tgt, trunc=1)
    assert torch.allclose(out.field, h.upsample_field(coarse.field) + out.residuals[0], atol=1e-6)
    assert torch.equal(coarse.residuals[2], out.residuals[2])


def test_skipped_levels_only_upsample():
    net = randomise_outputs(small_pyramid(3))
    skipping = Pyramid(**{**net.config, "skip": 1})
    skipping.load_state_dict(net.state_dict())
    src, tgt = smooth_images(1, 32, 1), smooth_images(1, 32, 2)
    out = skipping(src, tgt)
    assert sorted(out.residuals) == [1, 2]
    assert torch.equal(out.field, h.upsample_field(net(src, tgt, trunc=1).field))
    assert not torch.allclose(out.field, net(src, tgt).field)  # level 0's aligner did something there
    with pytest.raises(ValueError, match="skip"):
        Pyramid(size=3, skip=3)


def test_gradients_flow_into_every_aligner_and_level_parameters_split_them():
    net = small_pyramid(3)
    src = smooth_images(2, 32, 1)
    tgt = h.warp(src, torch.ones(2, 2, 32, 32))
    weights = torch.ones(2, 1, 32, 32)
    loss.mse(h.warp(src, net(src, tgt).field), tgt, weights).backward()
    for level in range(3):
        last = net.aligners[level].net[-1]  # the only layer with a gradient while the last conv is zero
        assert last.weight.grad.abs().max() > 0 and last.bias.grad.abs().max() > 0
        assert {id(p) for p in net.level_parameters(level)} == {id(p) for p in net.aligners[level].parameters()}
    net.zero_grad()
    randomise_outputs(net)
    loss.mse(h.warp(src, net(src, tgt).field), tgt, weights).backward()
    assert all(p.grad.abs().max() > 0 for p in net.parameters())


def test_same_input_same_output_and_channels_last_agrees():
    net = randomise_outputs(small_pyramid(3))
    src, tgt = smooth_images(2, 32, 1), smooth_images(2, 32, 2)
    first = net(src, tgt).field
    assert torch.equal(first, net(src, tgt).field)
    net = net.to(memory_format=torch.channels_last)
    cl = net(src.to(memory_format=torch.channels_last), tgt.to(memory_format=torch.channels_last)).field
    assert torch.allclose(cl, first, atol=1e-5)


def test_config_rebuilds_the_same_architecture():
    net = Pyramid(size=2, k=5, corr_radius=2, skip=1, encoder_base=6, encoder_step=4, aligner_widths=(8, 4))
    again = Pyramid(**net.config)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    assert again.config == net.config


# ----------------------------------------------------------------------------- learning
def translated_pairs(shifts, size, seed):
    """Sources, targets ``[n, 1, size, size]`` with ``target(p) = source(p + shift)``; shifts ``[n, 2]`` int (x, y)."""
    m = int(shifts.abs().max())
    big = smooth_images(len(shifts), size, seed, margin=m)
    src = big[..., m:m + size, m:m + size]
    tgt = torch.stack([b[:, m + y:m + y + size, m + x:m + x + size] for b, (x, y) in zip(big, shifts.tolist())])
    return src, tgt


@pytest.fixture
def one_thread():
    """Run on one thread: on a shared 2-core machine two OpenMP threads spin under contention
    (measured, 200 steps: 7 to 40 s with 2 threads as the load varied, a steady 7.5 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_tiny_pyramid_learns_to_recover_a_translation(one_thread):
    torch.manual_seed(0)
    shift = torch.tensor([2, -3])
    net = Pyramid(size=3, k=3, corr_radius=3, aligner_widths=(32, 32))
    opt = torch.optim.Adam(net.parameters(), lr=0.003)
    g = torch.Generator().manual_seed(1)
    weights = torch.zeros(1, 1, 32, 32)
    weights[..., 4:-4, 4:-4] = 1  # the border reads outside the source
    for step in range(150):
        signs = 2 * torch.randint(0, 2, (8, 1), generator=g) - 1  # +shift or -shift: no constant output fits
        src, tgt = translated_pairs(signs * shift, 32, seed=step)
        field = net(src, tgt).field
        cost = loss.mse(h.warp(src, field), tgt, weights) + 0.01 * loss.jacob(field, weights)
        opt.zero_grad()
        cost.backward()
        opt.step()
    shifts = torch.tensor([[2, -3], [-2, 3], [2, -3], [-2, 3]])
    src, tgt = translated_pairs(shifts, 32, seed=10_000)  # images never seen in training
    with torch.no_grad():
        error = net(src, tgt).field[..., 8:-8, 8:-8] - shifts[:, :, None, None]  # away from the borders
    assert error.mean((2, 3)).abs().max() < 0.5  # each pair's mean field is the shift
    assert (error.norm(dim=1) < 1).float().mean() > 0.9  # and nearly every pixel within 1 px of it


@pytest.mark.parametrize("size,k,corr_radius", [(3, 3, 1), (4, 5, 2)])
def test_reach_is_the_coarsest_fields_receptive_field(size, k, corr_radius):
    """The input pixels the coarsest level's field at one pixel depends on (non-zero gradient) lie within
    ``reach()`` px of that pixel's square, and some lie at that distance."""
    net = randomise_outputs(Pyramid(size=size, k=k, corr_radius=corr_radius, aligner_widths=(4, 4)))
    stride, side = 2 ** (size - 1), 768
    images = smooth_images(2, side, seed=1).requires_grad_()
    field = net(images[:1], images[1:], trunc=size - 1).field  # [1, 2, side / stride, side / stride]
    centre = side // stride // 2
    field[0, :, centre, centre].sum().backward()
    rows = images.grad.abs().sum((0, 1, 3)).nonzero()[:, 0]
    first, last = centre * stride, (centre + 1) * stride - 1  # the image rows the coarse pixel covers
    assert max(first - int(rows.min()), int(rows.max()) - last) == net.reach()
