"""The field convention: warps of known fields, composition, inversion, resampling; plain names, all-or-nothing
outputs."""
import argparse
import math
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers as h
from conftest import ended_pid
from models.archive import load_archive


def smooth_image(n=1, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 5, 5, generator=g)  # features ~size/5 px: bilinear-exact enough
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


def test_warp_translation_pulls_from_p_plus_field():
    img = torch.rand(2, 3, 16, 20)
    field = torch.zeros(2, 2, 16, 20)
    field[:, 0], field[:, 1] = 3, -2  # read 3 px to the right, 2 px up
    out = h.warp(img, field)
    assert torch.allclose(out[..., 2:, :-3], img[..., :-2, 3:], atol=1e-5)
    assert torch.all(out[..., :, -3:] == 0)  # outside the image is missing data


def test_the_zero_field_warps_an_image_to_itself():
    img = torch.rand(1, 1, 9, 7)
    assert torch.allclose(h.warp(img, torch.zeros(1, 2, 9, 7)), img, atol=1e-6)


def test_warp_rotation_matches_analytic_rotation():
    size, angle = 65, math.radians(10)
    field = h.affine_field(h.rigid_matrix(torch.tensor([angle]), 0.0, 0.0), size, size)
    grid = h.pixel_grid(size, size)
    c = (size - 1) / 2
    image = torch.cos((grid[:, :1] - c) / 5) + torch.sin((grid[:, 1:] - c) / 7)
    out = h.warp(image, field)
    x, y = grid[0, 0] - c, grid[0, 1] - c
    xs = math.cos(angle) * x - math.sin(angle) * y
    ys = math.sin(angle) * x + math.cos(angle) * y
    expected = torch.cos(xs / 5) + torch.sin(ys / 7)
    inner = (x ** 2 + y ** 2) < (c - 2) ** 2
    assert (out[0, 0] - expected)[inner].abs().max() < 0.02


def test_compose_equals_sequential_warps():
    img = smooth_image()
    f = h.affine_field(h.rigid_matrix(torch.tensor([0.03]), 1.5, -2.0), 64, 64)
    g = h.affine_field(h.rigid_matrix(torch.tensor([-0.02]), -0.5, 1.0, 1.02), 64, 64)
    twice = h.warp(h.warp(img, f), g)
    once = h.warp(img, h.compose(f, g))
    assert (twice - once)[..., 8:-8, 8:-8].abs().max() < 0.01  # two interpolations vs one


def test_compose_of_affine_fields_is_the_affine_field_of_the_composed_map():
    # compose(f, g)(p) = g(p) + f(p + g(p)): the map p -> p + g(p) followed by q -> q + f(q)
    a = h.rigid_matrix(torch.tensor([0.03]), 1.5, -2.0)
    b = h.rigid_matrix(torch.tensor([-0.02]), -0.5, 1.0, 1.02)
    composed = torch.zeros(1, 2, 3)
    composed[:, :, :2] = a[:, :, :2] @ b[:, :, :2]
    composed[:, :, 2] = (a[:, :, :2] @ b[:, :, 2:])[..., 0] + a[:, :, 2]
    expected = h.affine_field(composed, 64, 64)
    got = h.compose(h.affine_field(a, 64, 64), h.affine_field(b, 64, 64))
    assert (got - expected)[..., 4:-4, 4:-4].abs().max() < 1e-3


def test_invert_field_undoes_the_warp():
    img = smooth_image()
    f = h.affine_field(h.rigid_matrix(torch.tensor([0.05]), 2.5, -1.0), 64, 64)
    inv = h.invert_field(f)
    assert h.compose(f, inv)[..., 4:-4, 4:-4].abs().max() < 1e-3
    back = h.warp(h.warp(img, f), inv)
    assert (back - img)[..., 8:-8, 8:-8].abs().max() < 0.01  # two interpolations


def test_upsample_of_affine_field_is_affine_field_at_double_resolution():
    m = h.rigid_matrix(torch.tensor([0.04]), 1.5, -0.75, 1.01)
    coarse = h.affine_field(m, 32, 32)
    m_fine = m.clone()
    m_fine[:, :, 2] *= 2
    fine = h.affine_field(m_fine, 64, 64)
    up = h.upsample_field(coarse)
    assert up.shape == fine.shape
    assert (up - fine)[..., 2:-2, 2:-2].abs().max() < 1e-4
    assert (h.downsample_field(fine) - coarse).abs().max() < 1e-4


def test_downsampled_field_warps_downsampled_image_consistently():
    img = smooth_image(size=128)
    f = h.affine_field(h.rigid_matrix(torch.tensor([0.02]), 4.0, -6.0), 128, 128)
    fine_then_down = torch.nn.functional.avg_pool2d(h.warp(img, f), 2)
    down_then_warp = h.warp(torch.nn.functional.avg_pool2d(img, 2), h.downsample_field(f))
    assert (fine_then_down - down_then_warp)[..., 8:-8, 8:-8].abs().max() < 0.01


def test_jacobian_determinant_detects_foldover():
    field = torch.zeros(1, 2, 5, 5)
    assert torch.allclose(h.jacobian_determinant(field), torch.ones(1, 4, 4))
    field[0, 0, :, 3:] = -2.0  # columns 3.. read from 2 px to their left: x-map goes backwards
    det = h.jacobian_determinant(field)
    assert det[0, :, 2].max() < 0 and det[0, :, 0].min() == 1


def test_vector_length_is_the_euclidean_length_with_a_zero_gradient_at_zero():
    field = torch.tensor([[3.0, 0.0, -1.5], [4.0, 0.0, 2.0]]).view(1, 2, 1, 3).requires_grad_()
    length = h.vector_length(field)
    assert length.shape == (1, 1, 3) and torch.equal(length.detach(), torch.tensor([[[5.0, 0.0, 2.5]]]))
    length.sum().backward()
    assert torch.allclose(field.grad.view(2, 3), torch.tensor([[0.6, 0.0, -0.6], [0.8, 0.0, 0.8]]))
    stack = torch.randn(4, 3, 2, 8, 8)  # any leading axes: vectors on the third axis from the end
    assert torch.allclose(h.vector_length(stack), torch.linalg.vector_norm(stack, dim=-3))


def test_type_conversions_do_not_share_memory():
    a = np.arange(6, dtype=np.uint8).reshape(2, 3)
    t = h.to_tensor(a)
    a[0, 0] = 99
    assert t.dtype == torch.float32 and t[0, 0] == 0
    assert np.array_equal(h.to_numpy(torch.ones(2, requires_grad=True)), np.ones(2))


def test_warp_rejects_mismatched_sizes():
    with pytest.raises(ValueError):
        h.warp(torch.rand(1, 1, 8, 8), torch.zeros(1, 2, 4, 4))


def test_warp_tissue_never_blends_with_missing_data():
    image = torch.full((1, 1, 8, 8), 100.0)
    image[..., :, 4:] = 0  # right half missing
    field = torch.zeros(1, 2, 8, 8)
    field[:, 0] = 0.5  # half a pixel to the right: column 3 would read 50 with plain warp
    out = h.warp_tissue(image, field)
    assert torch.all(out[..., :, :3] == 100) and torch.all(out[..., :, 3:] == 0)
    assert h.warp(image, field)[0, 0, 0, 3] == 50


def test_warp_labels_keeps_values_and_dtype():
    labels = torch.zeros(1, 1, 6, 6, dtype=torch.uint8)
    labels[..., 2, 2] = 2
    field = torch.zeros(1, 2, 6, 6)
    field[:, 0] = 1.0
    out = h.warp_labels(labels, field)
    assert out.dtype == torch.uint8 and out[0, 0, 2, 1] == 2 and out.sum() == 2


def test_in_frame_of_is_in_the_reference_frame():
    shifts = torch.tensor([[1.0, 2.0], [4.0, -1.0], [-2.0, 0.5]])
    truth = shifts.view(3, 2, 1, 1) * torch.ones(3, 2, 16, 16)
    rel = h.in_frame_of(truth, reference=0)
    assert rel[0].abs().max() < 1e-5
    expected = (shifts - shifts[0]).view(3, 2, 1, 1)
    assert (rel - expected)[..., 4:-4, 4:-4].abs().max() < 1e-4


def test_in_frame_of_of_rotations():
    m = h.rigid_matrix(torch.tensor([0.02, -0.01]), torch.tensor([1.0, -2.0]), torch.tensor([0.0, 1.0]))
    truth = h.affine_field(m, 32, 32)
    rel = h.in_frame_of(truth, reference=1)
    assert rel[1].abs().max() < 1e-3 and rel[0].abs().max() > 0.5


def test_check_writable_names_the_flag_and_creates_nothing(tmp_path):
    (tmp_path / "a_file").touch()
    assert h.check_writable(tmp_path / "new" / "deeper", "--dest", folder=True) == tmp_path / "new" / "deeper"
    assert h.check_writable(tmp_path / "a_file", "--plot") == tmp_path / "a_file"  # a file may be replaced
    for path, folder, reason in ((tmp_path / "a_file", True, "Not a directory"),
                                 (tmp_path / "a_file" / "sub", True, f"{tmp_path / 'a_file'} is not a directory"),
                                 (tmp_path / "a_file" / "x.png", False, f"{tmp_path / 'a_file'} is not a directory"),
                                 (tmp_path, False, "Is a directory")):
        with pytest.raises(h.UserError) as err:
            h.check_writable(path, "--flag", folder)
        assert str(err.value) == f"--flag {path}: cannot write there ({reason})"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_check_writable_refuses_a_read_only_folder(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(h.UserError, match="cannot write there .Permission denied"):
        h.check_writable(tmp_path / "ro" / "dest", "--dest", folder=True)


@pytest.mark.parametrize("name", ["../up", "a/b", "/abs", "..", ".", ""])
def test_a_name_that_is_not_one_plain_file_name_is_refused(name):
    with pytest.raises(h.UserError, match="experiment name .* must be a plain name"):
        h.check_name(name, "experiment name")
    assert h.check_name("run..2", "experiment name") == "run..2"


def test_left_overs_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    dead_pid, live_pid = ended_pid(), os.getppid()  # a process that has ended; the one that started pytest
    path = tmp_path / "toy.h5"
    stale = [tmp_path / f".toy.h5.partial-{dead_pid}",  # as gen_stack named its temp file before
             tmp_path / f".toy.h5.partial-{dead_pid}@{socket.gethostname()}", h.temp_sibling(path, "partial")]
    kept = [tmp_path / f".toy.h5.partial-{live_pid}@{socket.gethostname()}",  # a concurrent live run's
            tmp_path / f".toy.h5.partial-{dead_pid}@another-machine",  # cannot tell: kept
            tmp_path / f".toy.h5.old-{dead_pid}", tmp_path / ".toy.h5.partial-notes"]
    for left in stale + kept:
        left.write_text("")
    (tmp_path / f".toy.h5.importing-{dead_pid}").mkdir()
    (tmp_path / f".toy.h5.importing-{dead_pid}" / "info").write_text("")
    assert sorted(h.remove_stale(path, "partial")) == sorted(stale)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([p.name for p in kept] + [f".toy.h5.importing-{dead_pid}"])  # another tag: not touched
    assert h.remove_stale(path, "importing") == [tmp_path / f".toy.h5.importing-{dead_pid}"]


def test_atomic_output_keeps_the_old_file_on_an_error_and_replaces_it_on_success(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(ValueError):
        with h.atomic_output(path) as tmp:
            tmp.write_text("half")
            raise ValueError
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    with h.atomic_output(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    folder = tmp_path / "layer"
    folder.mkdir()
    (folder / "old").write_text("")
    with h.atomic_output(folder, "importing") as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("")
    assert [p.name for p in folder.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer", "out.txt"]  # the old layer is gone


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped KeyboardInterrupt
def test_a_ctrl_c_that_python_drops_in_a_callback_still_stops_an_atomic_output(tmp_path, python_sigint):
    """Python prints and drops an exception raised in a weakref callback: a Ctrl-C landing there was lost."""

    class Thing:
        pass

    def callback(_):
        signal.raise_signal(signal.SIGINT)  # the KeyboardInterrupt is raised here, inside the callback
        sum(range(10))

    path = tmp_path / "out.txt"
    with pytest.raises(KeyboardInterrupt):
        with h.atomic_output(path) as tmp:
            tmp.write_text("all of it")
            thing = Thing()
            ref = weakref.ref(thing, callback)
            del thing  # the callback runs, its KeyboardInterrupt is dropped ("Exception ignored in ...")
            assert ref() is None
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# --------------------------------------------------------------------------- images
def test_normalise_zero_mean_unit_std_over_tissue_and_missing_flagged():
    images = np.array([[[0, 1], [3, 0]], [[5, 5], [5, 5]], [[0, 0], [0, 0]]], np.uint8)  # [3, 2, 2]
    out, missing = h.normalise(images)
    assert out.dtype == torch.float32 and missing.dtype == torch.bool and out.shape == (3, 2, 2)
    assert torch.equal(out[0], torch.tensor([[0.0, -1.0], [1.0, 0.0]]))  # mean 2, std 1; missing -> 0
    assert torch.equal(missing[0], torch.tensor([[True, False], [False, True]]))
    assert torch.equal(out[1], torch.zeros(2, 2)) and not missing[1].any()  # constant: zeros, not NaN
    assert torch.equal(out[2], torch.zeros(2, 2)) and missing[2].all()


def test_normalise_by_a_negative_std_inverts_the_contrast_and_keeps_missing_data_zero():
    images = np.array([[0, 1], [3, 0]], np.uint8)
    out, missing = h.normalise(images, (2.0, -1.0))
    assert torch.equal(out, torch.tensor([[0.0, 1.0], [-1.0, 0.0]])) and missing.sum() == 2
    assert torch.equal(h.normalise(images, (2.0, -1e-9))[0], -h.normalise(images, (2.0, 1e-9))[0])


def test_normalise_per_slice_on_a_tensor_batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 16, 16), generator=g, dtype=torch.uint8)
    out, missing = h.normalise(images)
    tissue = out[~missing].numel()
    assert tissue == int((images > 0).sum())
    for slice_, miss in zip(out.reshape(6, 16, 16), missing.reshape(6, 16, 16)):
        values = slice_[~miss].double()
        assert float(values.mean()) == pytest.approx(0, abs=1e-6)
        assert float(values.pow(2).mean()) == pytest.approx(1, abs=1e-5)


def test_slice_std_is_the_std_of_tissue_pixels():
    images = np.array([[[0, 1], [3, 0]], [[0, 0], [0, 0]], [[2, 4], [6, 8]]], np.uint8)
    assert torch.allclose(h.slice_std(images), torch.tensor([1.0, 0.0, float(np.std([2, 4, 6, 8]))]))


def test_box_mean_keeps_constants_and_matches_a_direct_average():
    assert torch.allclose(h.box_mean(torch.full((2, 1, 9, 13), 0.3), 4), torch.full((2, 1, 9, 13), 0.3))
    x = torch.rand(1, 1, 10, 12, generator=torch.Generator().manual_seed(1))
    r = 3
    out = h.box_mean(x, r)
    for i, j in ((0, 0), (4, 7), (9, 11), (2, 10)):
        window = x[0, 0, max(0, i - r):i + r + 1, max(0, j - r):j + r + 1]
        assert out[0, 0, i, j] == pytest.approx(float(window.mean()), abs=1e-6)
    assert torch.allclose(h.box_mean(x, 20), x.mean().expand_as(x))  # a window past every edge: the whole image
    assert torch.equal(h.box_mean(x, 10 ** 30), h.box_mean(x, 20))  # train.py --mask_smooth_radius 1e30 overflowed


def test_gaussian_blur_keeps_constants_and_spreads_an_impulse_as_a_normalised_gaussian():
    assert torch.allclose(h.gaussian_blur(torch.full((2, 3, 9, 13), 0.7), 1.5), torch.full((2, 3, 9, 13), 0.7))
    x = torch.zeros(21, 21)
    x[10, 10] = 1
    out = h.gaussian_blur(x, 1.0)
    assert out.shape == x.shape and float(out.sum()) == pytest.approx(1, abs=1e-5)
    assert torch.allclose(out, out.flip(0)) and torch.allclose(out, out.T)
    assert float(out[10, 11] / out[10, 10]) == pytest.approx(math.exp(-0.5), rel=1e-4)  # exp(-d² / 2 sigma²)
    assert float(out[10, 13]) > 0 and float(out[10, 14]) == 0  # truncated at ceil(2.5 sigma) px
    wide = h.gaussian_blur(x, 1e6)  # truncated at the image's side (21 px), not at 2.5e6 px: flat, and quick
    assert torch.allclose(wide, torch.full_like(x, 1 / 43 ** 2))  # the impulse once in each window of 43 x 43 px


def test_smoothstep_is_0_below_1_above_and_a_smooth_cubic_between():
    x = torch.tensor([-1.0, 0.0, 0.25, 0.5, 1.0, 2.0])
    assert torch.equal(h.smoothstep(x), torch.tensor([0.0, 0.0, 0.15625, 0.5, 1.0, 1.0]))
    assert torch.equal(h.smoothstep(3 + 2 * x, lo=3.0, hi=5.0), h.smoothstep(x))  # the same ramp from 3 to 5


def test_uniform_draws_in_its_bounds_one_number_per_value_in_float32_or_as_python_floats():
    draws = h.uniform((2.0, 5.0), torch.Generator().manual_seed(4), 1000)
    assert draws.shape == (1000,) and draws.dtype == torch.float32 and 2 <= draws.min() < draws.max() <= 5
    g = torch.Generator().manual_seed(4)
    first = [float(h.uniform((2.0, 5.0), g, dtype=torch.float64)) for _ in range(3)]
    raw = torch.rand(3, generator=torch.Generator().manual_seed(4))
    assert first == [2.0 + 3.0 * float(r) for r in raw]  # Python float arithmetic on the float32 draws
    assert torch.allclose(draws[:3], torch.tensor(first))


def test_help_prints_each_default_once():
    p = argparse.ArgumentParser(formatter_class=h.HelpFormatter)
    p.add_argument("--size", type=int, default=3, help="pixels")
    p.add_argument("--dest", help="where (default: beside the source)")
    p.add_argument("--mip", type=int, help="resolution level")
    text = " ".join(p.format_help().split())
    assert "pixels (default: 3)" in text and text.count("default") == 2 and "None" not in text


def test_a_device_this_machine_lacks_is_a_one_line_error_naming_the_flag():
    assert h.check_device("cpu") == "cpu"
    for device, message in (("tpu", "not a torch device"), (f"cuda:{torch.cuda.device_count()}", "this machine has"),
                            ("meta", "only cpu and cuda")):
        with pytest.raises(h.UserError, match=f"^--device {device}: {message}"):
            h.check_device(device)
    with pytest.raises(h.UserError, match="^--device"):  # before the archive is read (and blamed)
        load_archive(Path(__file__).resolve().parent.parent / "pt" / "demo.pt", "tpu")


def test_a_remote_path_where_local_files_are_written_is_refused(tmp_path, monkeypatch):
    assert h.local_path("file:///tmp/x", "--f") == Path("/tmp/x") and h.local_path("~/x", "--f") == Path.home() / "x"
    monkeypatch.chdir(tmp_path)
    for path in ("gs://bucket/x", "s3://bucket/x"):
        with pytest.raises(h.UserError, match=f"^--plots {path}: needs a local path"):
            h.check_writable(path, "--plots", folder=True)
    import demo
    with pytest.raises(h.UserError, match="^DEST gs://bucket/x: needs a local path"):
        demo.main(["gs://bucket/x"])
    assert not list(tmp_path.iterdir())  # no folder named 'gs:' here


def test_missing_data_is_a_zero_region_a_5_px_square_fits_in_not_a_dark_speck():
    x = torch.full((1, 12, 16), 100, dtype=torch.uint8)
    x[0, 2, 3] = 0  # a speck
    x[0, 5:7, 5:9] = 0  # a 2 px line
    x[0, :, 11:] = 0  # a 5 px band at the right edge
    x[0, 9:, :4] = 0  # a 3 x 4 px corner: beyond the image's edges counts as missing
    x[0, :2, :9] = 0  # a 2 px sliver along the top edge
    x[0, 4, 0] = 0  # a speck on the left edge
    expected = torch.zeros(1, 12, 16, dtype=torch.bool)
    expected[0, :, 11:] = expected[0, 9:, :4] = expected[0, :2, :9] = True
    assert torch.equal(h.missing_data(x), expected)
    assert torch.equal(h.missing_data(x.numpy(), speck=0), x == 0)
    image = torch.full((1, 1, 8, 8), 100.0)
    image[0, 0, 4, 4] = 0  # a dark speck: blended as tissue, not a hole that grows
    assert (h.warp_tissue(image, torch.full((1, 2, 8, 8), 0.5))[0, 0, :7, :7] > 0).all()


def test_dilated_is_the_square_max_filter():
    mask = torch.rand(2, 1, 13, 21, generator=torch.Generator().manual_seed(0)) > 0.93
    for radius in (0, 1, 2, 5):
        square = torch.nn.functional.max_pool2d(mask.float(), 2 * radius + 1, 1, radius) > 0
        assert torch.equal(h.dilated(mask, radius), square)


def test_machine_memory_is_the_lower_of_the_machine_s_and_its_container_s(monkeypatch):
    limits = {"/sys/fs/cgroup/memory.max": "max\n"}  # cgroup v2 without a limit

    def read_text(path, *args, **kwargs):
        if str(path) in limits:
            return limits[str(path)]
        raise FileNotFoundError(path)
    monkeypatch.setattr(h.Path, "read_text", read_text)
    monkeypatch.setattr(h.os, "sysconf", {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 1000}.__getitem__)
    assert h.machine_memory() == 4096 * 1000
    limits["/sys/fs/cgroup/memory.max"] = "1000000\n"
    assert h.machine_memory() == 1000000
    def unknown(name):
        raise ValueError(f"unrecognized configuration name {name}")
    monkeypatch.setattr(h.os, "sysconf", unknown)  # neither can be read
    limits.clear()
    assert h.machine_memory() is None


def test_a_lock_is_held_by_one_live_process_and_taken_over_from_a_killed_one(tmp_path):
    """``held``: a second holder is refused in one line naming the first; the lock goes when the body ends (also on
    an error); one naming a process that no longer runs on this machine is taken over; one of another machine is
    not (it cannot be asked); a folder made for it goes with it, if left empty."""
    lock = tmp_path / "pt" / ".exp.lock"
    with h.held(lock, "experiment exp"):
        pass
    assert not lock.parent.exists()
    lock.parent.mkdir()
    with h.held(lock, "experiment exp"):
        assert lock.read_text() == f"{os.getpid()}@{socket.gethostname()}"
        with pytest.raises(h.UserError, match=rf"experiment exp is in use by process {os.getpid()}@.* \({lock}\)"):
            with h.held(lock, "experiment exp"):
                pass
    assert not lock.exists()
    with pytest.raises(ValueError), h.held(lock, "experiment exp"):
        raise ValueError
    assert not lock.exists()
    lock.write_text(f"{ended_pid()}@{socket.gethostname()}")  # killed: its lock left behind
    with h.held(lock, "experiment exp"):
        assert lock.read_text().startswith(f"{os.getpid()}@")
    zombie = subprocess.Popen(["sleep", "60"])
    zombie.kill()  # killed, and not yet reaped by its parent (a driver killed in a test, a supervisor that lags)
    wait_until = time.time() + 10
    while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z" and time.time() < wait_until:
        time.sleep(0.01)
    lock.write_text(f"{zombie.pid}@{socket.gethostname()}")
    with h.held(lock, "experiment exp"):  # its lock is taken over
        assert lock.read_text().startswith(f"{os.getpid()}@")
    zombie.wait()
    lock.write_text("1@another-machine")
    with pytest.raises(h.UserError, match="in use by process 1@another-machine"), h.held(lock, "experiment exp"):
        pass
    assert lock.read_text() == "1@another-machine"
    (tmp_path / "file").write_text("")
    with pytest.raises(h.UserError, match="experiment exp: cannot write its lock file"):
        with h.held(tmp_path / "file" / ".exp.lock", "experiment exp"):
            pass


def test_a_reader_that_stops_early_ends_the_run_quietly():
    """``python net_hist.py ... | head -1``: Python's BrokenPipeError traceback is not shown."""
    writer = subprocess.Popen([sys.executable, "-c", "import helpers; helpers.run_main(lambda: print('x' * 10 ** 6))"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(h.__file__).parent)
    writer.stdout.close()  # the reader is gone before the writer's second pipe buffer
    assert writer.wait(timeout=60) == 141 and writer.stderr.read() == b""


def test_a_sigterm_ends_a_run_as_ctrl_c_does_its_partial_output_discarded(tmp_path):
    script = ("import pathlib, sys, time, helpers\n"
              "def main():\n"
              "    with helpers.atomic_output(sys.argv[1]) as tmp:\n"
              "        tmp.mkdir()\n"
              "        (tmp / 'part').write_text('half')\n"
              "        print('writing', flush=True)\n"
              "        time.sleep(60)\n"
              "helpers.run_main(main)\n")
    run = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out")], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=Path(h.__file__).parent)
    assert run.stdout.readline() == "writing\n"
    run.send_signal(signal.SIGTERM)  # a batch scheduler's stop
    assert run.wait(timeout=60) == 143
    assert run.stderr.read().strip() == "terminated" and list(tmp_path.iterdir()) == []  # no half output left


def run_python(script: str) -> subprocess.CompletedProcess:
    """``python -c script`` beside helpers.py, its output captured as text."""
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=Path(h.__file__).parent)


def test_a_sigterm_that_python_turned_into_another_error_or_dropped_still_ends_the_run_as_terminated():
    """A SIGTERM inside an import: importlib's clean-up turns it into a ``KeyError``, or drops it; either way the
    run ends as terminated, not with a traceback or exit 0."""
    run = run_python("import os, signal, helpers\n"
                     "def main():\n"
                     "    try:\n"
                     "        os.kill(os.getpid(), signal.SIGTERM)\n"
                     "    except helpers.Terminated:\n"
                     "        raise KeyError('numpy')\n"
                     "helpers.run_main(main)\n")
    assert run.returncode == 143 and run.stderr.strip() == "terminated"
    dropped = run_python("import os, signal, helpers\n"
                         "def main():\n"
                         "    try:\n"
                         "        os.kill(os.getpid(), signal.SIGTERM)\n"
                         "    except helpers.Terminated:\n"
                         "        pass  # as Python drops it in a callback\n"
                         "helpers.run_main(main)\n")
    assert dropped.returncode == 143 and dropped.stderr.strip() == "terminated"  # not 0, as if never stopped
    plain = run_python("import helpers; helpers.run_main(lambda: {}['x'])")
    assert plain.returncode == 1 and "KeyError" in plain.stderr  # with no SIGTERM, an error is still a bug's


def test_a_process_forked_from_a_run_dies_of_sigterm_as_it_would_have():
    """A DataLoader worker forked from a run: SIGTERM kills it (its parent sees the signal); it prints nothing."""
    run = run_python("import os, signal, sys, time, helpers\n"
                     "def main():\n"
                     "    child = os.fork()\n"
                     "    if child == 0:\n"
                     "        time.sleep(60)\n"
                     "        os._exit(0)\n"
                     "    time.sleep(0.5)\n"
                     "    os.kill(child, signal.SIGTERM)\n"
                     "    print(os.waitpid(child, 0)[1] & 0x7f)\n"
                     "helpers.run_main(main)\n")
    assert run.returncode == 0 and run.stdout.strip() == str(int(signal.SIGTERM)) and run.stderr == ""
