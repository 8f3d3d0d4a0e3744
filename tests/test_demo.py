"""The demo volume: built atomically, layers consistent, the ground-truth field re-aligns the image."""
import numpy as np
import pytest
import torch

import demo
import volume
from conftest import ended_pid
from helpers import UserError, warp


def test_tiny_demo_volume_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("SEAMLESS_DATA", str(tmp_path))
    (tmp_path / f".demo.building-{ended_pid()}" / "image").mkdir(parents=True)  # what a killed build left
    demo.build(shape=(4, 96, 96))
    assert demo.is_built() and not list(tmp_path.glob(".demo.building-*"))
    layers = demo.ensure_demo()  # already built: nothing is rebuilt
    assert [demo.resolve("demo"), demo.resolve("demo", "field")] == [layers["image"], layers["field"]]
    assert [demo.resolve("gs://b/demo"), demo.resolve(None)] == ["gs://b/demo", None]  # other paths stay as they are
    read = {name: volume.read(volume.open_volume(path), (0, 0, 0), (96, 96, 4)) for name, path in layers.items()}
    assert read["image"].dtype == np.uint8 and read["field"].shape == (4, 2, 96, 96)
    assert set(np.unique(read["defects"])) <= {0, 1, 2}
    image, field, aligned = (torch.from_numpy(read[k]).float() for k in ("image", "field", "aligned"))
    realigned = warp(image, field)
    tissue = torch.from_numpy(read["defects"][:, 0] == 0) & (realigned[:, 0] > 0)
    tissue[:, :12], tissue[:, -12:], tissue[:, :, :12], tissue[:, :, -12:] = False, False, False, False
    before = (image - aligned)[:, 0][tissue].abs().mean()
    after = (realigned - aligned)[:, 0][tissue].abs().mean()
    assert after < 8 and after < before / 3  # two interpolations blur the phantom's grain a little
    mip1 = volume.open_volume(layers["field"], mip=1)
    assert np.allclose(volume.read(mip1, (0, 0, 0), (48, 48, 4)),
                       read["field"].reshape(4, 2, 48, 2, 48, 2).mean((3, 5)) / 2, atol=1e-4)
    (demo.demo_dir() / "my_run").mkdir()  # a user's files kept in the demo's folder
    (demo.demo_dir() / "aligned" / "info").rename(demo.demo_dir() / "aligned" / "info.bak")
    with pytest.raises(demo.UserError, match=r"demo is to be rebuilt .* but it also holds my_run, which is not the "):
        demo.ensure_demo()
    assert (demo.demo_dir() / "my_run").is_dir()  # the rebuild would have deleted it


def test_demo_py_builds_a_static_phantom_volume_elsewhere_and_never_overwrites_one(tmp_path):
    dest = demo.main(["--phantom", "static", "--seed", "3", "--shape", "3", "64", "64", str(tmp_path / "static")])
    assert demo.is_built(dest) and not demo.is_built(tmp_path / "elsewhere")
    read = {layer: volume.read(volume.open_volume("file://" + str(dest / layer)), (0, 0, 0), (64, 64, 3))
            for layer in demo.LAYERS}
    assert (read["aligned"] == read["aligned"][:1]).all()  # one section repeated
    assert not (read["image"] == read["image"][:1]).all()  # each misaligned its own way
    with pytest.raises(UserError, match="exists"):
        demo.main(["--phantom", "static", str(dest)])
    for bad in (["--shape", "0", "64", "64"], ["--shape", "2", "66", "64"]):
        with pytest.raises(UserError, match="--shape"):
            demo.main([*bad, str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()
    (tmp_path / "a_file").touch()
    with pytest.raises(UserError, match=r"DEST .*a_file/sub: cannot write there \(.*a_file is not a directory\)"):
        demo.main(["--shape", "2", "64", "64", str(tmp_path / "a_file" / "sub")])


def test_phantom_kinds_change_the_tissue_as_named():
    arrays = {kind: demo.make_arrays((3, 48, 48), 8, seed=2, kind=kind) for kind in demo.PHANTOMS}
    assert (arrays["static"]["aligned"] == arrays["static"]["aligned"][:1]).all()
    assert not (arrays["default"]["aligned"] == arrays["default"]["aligned"][:1]).all()
    assert not np.array_equal(arrays["unbent"]["aligned"], arrays["default"]["aligned"])
    assert np.array_equal(arrays["static"]["field"], arrays["default"]["field"])  # one seed, one misalignment
    with pytest.raises(UserError, match="unknown phantom kind"):
        demo.make_arrays((1, 48, 48), kind="moving")


def test_a_phantom_built_in_slabs_of_two_sections_is_the_one_built_whole(tmp_path):
    whole = demo.make_arrays((5, 64, 64), seed=4)  # sections this small: one slab
    demo.build((5, 64, 64), seed=4, path=tmp_path / "slabs", slab=2)  # slabs 0-1, 2-4: each at its depth, every mip
    for layer in demo.LAYERS:
        expected = whole[layer]
        for mip in range(demo.MIPS):
            vol = volume.open_volume(f"file://{tmp_path}/slabs/{layer}", mip=mip)
            assert np.array_equal(volume.read(vol, (0, 0, 0), (64 >> mip, 64 >> mip, 5)), expected), (layer, mip)
            expected = volume.downsample(expected, demo.LAYER_KINDS[layer])
    assert [demo._slab_stops(5, 2), demo._slab_stops(6, 2), demo._slab_stops(1, 2)] == [[2, 5], [2, 4, 6], [1]]
    with pytest.raises(ValueError, match="at least 2"):  # a one-section slab is not misaligned as in a stack
        demo._slab_stops(5, 1)


def test_sections_too_large_to_draw_are_one_line(tmp_path, monkeypatch):
    def no_memory(*args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 150288138240 bytes.")

    monkeypatch.setattr(demo, "build", no_memory)
    with pytest.raises(demo.UserError, match=r"--shape 2 100000 8: not enough memory .* a square of the longer side, "
                                             r"100000 px"):
        demo.main(["--shape", "2", "100000", "8", str(tmp_path / "big")])
