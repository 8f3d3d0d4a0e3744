"""alignment.py and align.py: chunking does not change the result, serial chaining, resume, refusals."""
import numpy as np
import pytest
import torch

import align
import alignment
import volume
from conftest import run_script
from models import Pyramid
from models.archive import save_archive


def random_net(size=3, seed=0):
    """A pyramid with random, non-zero output layers (an untrained net outputs exactly zero)."""
    torch.manual_seed(seed)
    net = Pyramid(size=size, k=3, corr_radius=1, aligner_widths=(8, 8))
    for p in net.aligners.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return net.eval()


def sections(n=3, size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, 1, size // 8, size // 8, generator=g), size=(size, size),
                                        mode="bicubic", align_corners=False)
    return (x.clamp(0, 1) * 200 + 30).round().to(torch.uint8)[:, 0].numpy()


def test_chunked_equals_unchunked():
    net = random_net()
    a, b = sections(2)
    whole = alignment.pair_field(net, a, b, chunk=1024, overlap=64)
    chunked = alignment.pair_field(net, a, b, chunk=64, overlap=64)
    assert whole.shape == (2, 128, 128) and whole.abs().max() > 0.05
    assert (whole - chunked).abs().max() < 1e-4


def test_serial_chaining(monkeypatch):
    shift = torch.tensor([1.0, -2.0]).view(2, 1, 1) * torch.ones(2, 16, 16)
    monkeypatch.setattr(alignment, "pair_field", lambda *a, **k: shift.clone())
    stack = sections(4, 16)
    to_aligned = [f for _, f in alignment.align_serial(None, stack)]
    to_raw = [f for _, f in alignment.align_serial(None, stack, to_raw_neighbour=True)]
    assert to_aligned[0].abs().max() == 0 and torch.allclose(to_aligned[3], shift)
    for z in range(4):
        assert torch.allclose(to_raw[z][:, 6:-6, 6:-6], z * shift[:, 6:-6, 6:-6], atol=1e-4)


@pytest.fixture
def setup(tmp_path, tiny_volume):
    archive = save_archive(tmp_path / "net.pt", random_net(), summary={"name": "net"})
    return tmp_path, tiny_volume[0], archive


def aligned_arrays(dest):
    image = volume.open_volume(str(dest / "image"))
    field = volume.open_volume(str(dest / "field"))
    return volume.read(image, (0, 0, 0), (64, 64, 12)), volume.read(field, (0, 0, 0), (64, 64, 12))


def test_align_writes_layers_and_resumes_to_the_same_result(setup):
    tmp, paths, archive = setup
    common = ["--archive", str(archive), "--source", paths["image"], "--chunk", "32", "--overlap", "32"]
    align.main(common + ["--dest", str(tmp / "straight"), "--z_start", "2", "--z_stop", "8"])
    align.main(common + ["--dest", str(tmp / "resumed"), "--z_start", "2", "--z_stop", "5"])
    out = align.main(common + ["--dest", str(tmp / "resumed"), "--z_start", "2", "--z_stop", "8"])
    assert out["sections"] == 3
    (i1, f1), (i2, f2) = aligned_arrays(tmp / "straight"), aligned_arrays(tmp / "resumed")
    assert np.array_equal(i1, i2) and np.allclose(f1, f2, atol=1e-5)
    assert np.abs(f1[3:8]).max() > 0 and np.abs(f1[2]).max() == 0  # section 2 is the fixed reference
    assert align.main(common + ["--dest", str(tmp / "straight"), "--z_start", "2", "--z_stop", "8"])["sections"] == 0
    assert align.main(common + ["--dest", str(tmp / "straight"), "--z_start", "2", "--z_stop", "8",
                                "--overwrite"])["sections"] == 6


@pytest.mark.parametrize("extra, message", [
    (["--z_start", "5", "--z_stop", "40"], "outside the volume"),
    (["--z_start", "0", "--z_stop", "2", "--mip", "5"], "no mip 5"),
    (["--z_start", "0", "--z_stop", "2", "--bbox", "0", "0", "99", "10"], "outside the volume"),
])
def test_bad_input_is_a_one_line_error(setup, extra, message):
    tmp, paths, archive = setup
    result = run_script("align.py", "--archive", archive, "--source", paths["image"], "--dest", tmp / "d", *extra)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and message in last and "Traceback" not in result.stderr


def test_archive_volume_and_destination_mismatches(setup):
    tmp, paths, archive = setup
    result = run_script("align.py", "--archive", archive, "--source", paths["field"], "--dest", tmp / "d",
                        "--z_start", "0", "--z_stop", "2")
    assert result.returncode == 2 and "channels" in result.stderr
    result = run_script("align.py", "--archive", tmp / "none.pt", "--source", paths["image"], "--dest",
                        tmp / "d", "--z_start", "0", "--z_stop", "2")
    assert result.returncode == 2 and "none.pt" in result.stderr
    align.main(["--archive", str(archive), "--source", paths["image"], "--dest", str(tmp / "d"), "--z_start", "0",
                "--z_stop", "2"])
    result = run_script("align.py", "--archive", archive, "--source", paths["image"], "--dest", tmp / "d",
                        "--z_start", "0", "--z_stop", "2", "--mip", "1")
    assert result.returncode == 2 and "another shape" in result.stderr
    assert volume.open_volume(str(tmp / "d" / "image"))  # what was aligned is still there
