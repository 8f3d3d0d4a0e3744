"""CloudVolume round trips through volume.py."""
import numpy as np
import pytest

import volume
from helpers import UserError


def test_write_pyramid_round_trip(tiny_volume):
    paths, arrays = tiny_volume
    vol = volume.open_volume(paths["image"], mip=0)
    assert np.array_equal(volume.read(vol, (0, 0, 0), (64, 64, 12)), arrays["image"])
    vol1 = volume.open_volume(paths["image"], mip=1)
    assert tuple(volume.bounds(vol1)[1]) == (32, 32, 12)
    expected = arrays["image"][:, :, :2, :2].astype(float).mean((2, 3)).round()
    assert np.array_equal(volume.read(vol1, (0, 0, 0), (1, 1, 12))[:, :, 0, 0], expected)


def test_field_layer_is_in_pixels_of_each_mip(tiny_volume):
    paths, arrays = tiny_volume
    vol1 = volume.open_volume(paths["field"], mip=1)
    got = volume.read(vol1, (0, 0, 0), (32, 32, 12))
    expected = arrays["field"].reshape(12, 2, 32, 2, 32, 2).mean((3, 5)) / 2
    assert np.allclose(got, expected, atol=1e-5)


def test_labels_downsample_keeps_any_defect(tiny_volume):
    paths, _ = tiny_volume
    vol1 = volume.open_volume(paths["defects"], mip=1)
    got = volume.read(vol1, (0, 0, 3), (32, 32, 1))[0, 0]
    assert got[5].min() == 1 and got[4].max() == 0 and got[6].max() == 0


def test_build_mips_makes_the_coarse_mips_of_a_region_what_its_fine_mip_holds(tmp_path):
    rng = np.random.default_rng(3)
    vol = volume.create_volume("file://" + str(tmp_path / "l"), (50, 40, 2), "uint8", 1, mips=3, chunk=(8, 8, 1))
    base = rng.integers(0, 3, (2, 1, 40, 50), dtype=np.uint8)
    volume.write_pyramid(vol, base, (0, 0, 0), "labels")
    stale = np.full((1, 1, 10, 13), 7, np.uint8)
    volume.write(vol, stale, (0, 0, 1), 2)  # an earlier write's coarse values, over section 1's whole mip 2
    new = rng.integers(0, 3, (1, 1, 19, 23), dtype=np.uint8)
    volume.write(vol, new, (5, 3, 1), 0)  # a write at odd corners: write_pyramid would stop at mip 0
    volume.build_mips(vol, 1, (5, 3, 28, 22), "labels", 0, tile=6)  # tiles smaller than the region
    fine = volume.read(vol, (0, 0, 1), (50, 40, 1))
    expected = [volume.downsample(fine, "labels")]
    expected.append(volume.downsample(expected[0], "labels"))
    for mip, want in ((1, expected[0]), (2, expected[1])):
        got = volume.read(vol, (0, 0, 1), want.shape[:1:-1] + (1,), mip)
        inside = (slice(None), slice(None), slice(3 >> mip, -(-22 >> mip)), slice(5 >> mip, -(-28 >> mip)))
        assert np.array_equal(got[inside], want[inside])  # the region, grown to each mip's grid
    assert (volume.read(vol, (0, 0, 1), (13, 10, 1), 2)[0, 0, 7:, :] == 7).all()  # beyond it: left as it was
    assert np.array_equal(volume.read(vol, (0, 0, 0), (25, 20, 1), 1), volume.downsample(base[:1], "labels"))


def test_missing_cloud_credentials_are_one_line_that_says_how_to_give_them(monkeypatch, capsys):
    import cloudfiles
    import cloudvolume

    class DefaultCredentialsError(Exception):  # google.auth's, as a machine without credentials raises it
        pass

    class NoCredentials:
        create_new_info = cloudvolume.CloudVolume.create_new_info

        def __new__(cls, *args, **kwargs):
            print("Using default Google credentials. There is no ~/.cloudvolume/secrets/google-secret.json set.")
            raise DefaultCredentialsError("Your default credentials were not found.\nTo set up ...")

    monkeypatch.setattr(cloudvolume, "CloudVolume", NoCredentials)
    monkeypatch.setattr(cloudfiles, "CloudFiles", NoCredentials)
    with pytest.raises(UserError, match=r"cannot open volume gs://b/img: no Google credentials on this machine "
                                        r"\(give a service account key in GOOGLE_APPLICATION_CREDENTIALS"):
        volume.open_volume("gs://b/img")
    with pytest.raises(UserError, match="cannot write gs://b/new: no Google credentials"):
        volume.create_volume("gs://b/new", (8, 8, 1), "uint8")
    assert capsys.readouterr().out == ""  # CloudFiles' banner is not shown


def test_a_sigterm_that_cloudvolume_turned_into_another_error_still_stops_the_run(monkeypatch):
    import signal

    import cloudvolume
    from cloudvolume.exceptions import InfoUnavailableError

    import helpers

    class Swallowing:  # CloudVolume's zarr fallback: `except: raise err`, whatever interrupted it
        def __new__(cls, *args, **kwargs):
            helpers._SIGINTS.append(signal.SIGTERM)  # what run_main's handler records before it raises
            raise InfoUnavailableError("no info")

    monkeypatch.setattr(cloudvolume, "CloudVolume", Swallowing)
    try:
        with pytest.raises(helpers.Terminated):  # not "no volume at ...", after which align.py made DEST
            volume.open_volume("file:///nowhere/new")
    finally:
        helpers._SIGINTS.clear()


def test_missing_volume_and_mip_are_user_errors(tmp_path, tiny_volume):
    paths, _ = tiny_volume
    with pytest.raises(UserError, match="no volume"):
        volume.open_volume("file://" + str(tmp_path / "nothing"))
    with pytest.raises(UserError, match="no mip 4"):
        volume.open_volume(paths["image"], mip=4)


def test_create_refuses_existing_layer(tiny_volume):
    paths, _ = tiny_volume
    with pytest.raises(UserError, match="already exists"):
        volume.create_volume(paths["image"], (64, 64, 12), "uint8")


def test_a_layer_that_cannot_be_written_is_a_user_error(tmp_path):
    (tmp_path / "a_file").touch()
    with pytest.raises(UserError, match="cannot write file://.*a_file/layer: Not a directory"):
        volume.create_volume("file://" + str(tmp_path / "a_file" / "layer"), (32, 32, 1), "uint8")
    vol = volume.create_volume("file://" + str(tmp_path / "layer"), (32, 32, 1), "uint8")
    (tmp_path / "layer" / "8_8_40").touch()  # where the chunks of mip 0 go: not a folder
    with pytest.raises(UserError, match=r"cannot write file://.*/layer at \(0, 0, 0\) mip 0: Not a directory"):
        volume.write(vol, np.ones((1, 1, 32, 32), np.uint8), (0, 0, 0))
    assert vol.mip == 0


def test_resolve_path():
    assert volume.resolve_path("gs://b/x") == "gs://b/x"
    assert volume.resolve_path("basil_v0/raw_image", bucket="s3://lab") == "s3://lab/basil_v0/raw_image"
    assert volume.resolve_path("/tmp").startswith("file:///")


def test_a_missing_path_under_a_local_folder_is_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert volume.resolve_path("data/typo") == "file://" + str(tmp_path / "data" / "typo")  # not the bucket's
    assert volume.resolve_path("basil_v0/raw_image", bucket="s3://lab") == "s3://lab/basil_v0/raw_image"
    with pytest.raises(UserError, match=f"no volume at file://{tmp_path}/data/typo"):
        volume.open_volume("data/typo")


@pytest.mark.parametrize("path", [
    "zarr://gs://lab/stack", "zarr2://file:///data/stack", "n5://s3://lab/stack.n5", "precomputed://gs://lab/em",
    "graphene://https://host/segmentation/table/x", "boss://collection/experiment/channel",
    "middleauth+https://host/em", "gs://lab/em/|zarr2:"])
def test_every_cloudpath_scheme_passes_through_unchanged(path):
    assert volume.resolve_path(path, bucket="s3://elsewhere") == path


def test_a_zarr_path_is_opened_as_given(tmp_path):
    path = "zarr://file://" + str(tmp_path / "nothing.zarr")
    with pytest.raises(UserError) as err:
        volume.open_volume(path, bucket="s3://elsewhere")
    assert path in str(err.value) and "elsewhere" not in str(err.value)


def test_odd_sizes_fill_every_mip(tmp_path):
    image = np.full((2, 1, 65, 67), 7, np.uint8)
    vol = volume.create_volume("file://" + str(tmp_path / "odd"), (67, 65, 2), "uint8", mips=2)
    volume.write_pyramid(vol, image, (0, 0, 0), "image")
    mip1 = volume.open_volume("file://" + str(tmp_path / "odd"), mip=1)
    assert tuple(volume.bounds(mip1)[1]) == (34, 33, 2)
    assert np.all(volume.read(mip1, (0, 0, 0), (34, 33, 2)) == 7)  # the last row and column too


def test_float_layers_are_written_raw_and_integer_layers_gzipped_whether_created_or_reopened(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"float32": rng.normal(0, 3, (2, 2, 32, 32)).astype(np.float32),
              "uint8": rng.integers(1, 256, (2, 1, 32, 32), dtype=np.uint8)}
    for dtype, array in arrays.items():
        path = "file://" + str(tmp_path / dtype)
        channels = array.shape[1]
        volume.write(volume.create_volume(path, (32, 32, 2), dtype, channels, chunk=(32, 32, 1)), array[:1], (0, 0, 0))
        volume.write(volume.open_volume(path), array[1:], (0, 0, 1))  # as a resumed run writes
        names = sorted(p.name for p in (tmp_path / dtype / "8_8_40").iterdir())
        suffix = "" if dtype == "float32" else ".gz"
        assert names == [f"0-32_0-32_0-1{suffix}", f"0-32_0-32_1-2{suffix}"]
        reopened = volume.open_volume(path)
        assert np.array_equal(volume.read(reopened, (0, 0, 0), (32, 32, 2)), array)
        assert volume.missing_sections(reopened, (0, 0, 0), (32, 32, 2)) == []


def test_include_sections_grows_the_bounds_at_every_mip_and_keeps_the_chunks_written(tmp_path):
    path = "file://" + str(tmp_path / "layer")
    vol = volume.create_volume(path, (64, 64, 2), "uint8", mips=2, chunk=(32, 32, 1), offset=(0, 0, 3))
    image = np.random.default_rng(0).integers(1, 256, (2, 1, 64, 64), dtype=np.uint8)
    volume.write_pyramid(vol, image, (0, 0, 3), "image")
    info = (tmp_path / "layer" / "info").read_bytes()
    volume.include_sections(vol, 3, 5)  # within the bounds: nothing to do
    assert (tmp_path / "layer" / "info").read_bytes() == info
    for z_start, z_stop in ((3, 8), (1, 8)):  # up, then down
        volume.include_sections(vol, z_start, z_stop)
        for mip in (0, 1):
            reopened = volume.open_volume(path, mip)
            assert [list(corner) for corner in volume.bounds(reopened)] == [[0, 0, z_start], [64 >> mip, 64 >> mip, 8]]
            expected = image if mip == 0 else volume.downsample(image, "image")
            assert np.array_equal(volume.read(reopened, (0, 0, 3), (64 >> mip, 64 >> mip, 2)), expected)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_field_that_is_not_finite_is_refused_before_anything_is_written(tmp_path, bad):
    path = "file://" + str(tmp_path / "field")
    vol = volume.create_volume(path, (32, 32, 4), "float32", num_channels=2, chunk=(32, 32, 1))
    field = np.ones((3, 2, 32, 32), np.float32)
    field[1, 0, 5, 7] = bad
    with pytest.raises(UserError, match=r"^section 2: its field for .*field is not finite \(NaN or Inf\)"):
        volume.write(vol, field, (0, 0, 1))
    assert not [p for p in (tmp_path / "field").rglob("*") if p.is_file() and p.name not in ("info", "provenance")]
    volume.write(vol, field[:1], (0, 0, 1))  # a finite section is written
    assert np.array_equal(volume.read(vol, (0, 0, 1), (32, 32, 1)), field[:1])


def test_a_cloud_that_refuses_us_is_one_line_on_create_and_on_align_dest(monkeypatch):
    """No credentials for gs:// (or no network): the storage's own exception, whatever its type, becomes one line."""
    import align

    def refuse(*args, **kwargs):
        raise RuntimeError("Your default credentials were not found.\nTo set up Application Default Credentials ...")

    monkeypatch.setattr(volume, "_exists", refuse)
    with pytest.raises(UserError, match="^cannot write gs://lab/x: RuntimeError: Your default credentials were not "
                                        "found.$"):
        volume.create_volume("gs://lab/x", (8, 8, 1), "uint8")
    monkeypatch.setattr(align, "CloudFiles", lambda path: type("Refusing", (), {"exists": refuse})())
    with pytest.raises(UserError, match="^cannot read --dest gs://lab/out: RuntimeError: Your default credentials"):
        align.recorded_runs("gs://lab/out")


@pytest.mark.parametrize("where", ["file", "mem"])
def test_many_markers_read_one_at_a_time_locally_in_order_with_none_for_a_missing_one(tmp_path, where):
    from cloudfiles import CloudFiles

    files = CloudFiles(f"file://{tmp_path}" if where == "file" else f"mem://{tmp_path.name}")
    files.put_json("a", {"z": 1})
    files.put_json("c", [2])
    expected = files.get_json(["c", "b", "a"])
    assert expected == [[2], None, {"z": 1}]
    asked, get_json = [], files.get_json
    files.get_json = lambda names: asked.append(names) or get_json(names)
    assert volume.get_many(files, ["c", "b", "a"]) == expected
    assert asked == ["c", "b", "a"]  # no list: CloudFiles would read it in a thread polled every 0.1 s
    assert volume.get_many(files, ["c", "b"], as_json=False) == [b"[2]", None]


def test_many_files_read_in_threads_elsewhere_come_back_in_the_order_asked(tmp_path, monkeypatch):
    from cloudfiles import CloudFiles

    files = CloudFiles(f"file://{tmp_path}")
    names = [f"block/{z}" for z in range(40)]
    for z, name in enumerate(names):
        files.put(name, b"blank" if z % 3 else b"aligned")
    files.put_json("scan", {"mean": 1})
    monkeypatch.setattr(CloudFiles, "protocol", "gs")  # as on a cloud: the list goes to CloudFiles' threads
    asked = names[::-1] + ["missing"]
    assert volume.get_many(files, asked, as_json=False) == [b"blank" if z % 3 else b"aligned"
                                                             for z in range(39, -1, -1)] + [None]
    assert volume.get_many(files, ["scan", "missing"]) == [{"mean": 1}, None]
