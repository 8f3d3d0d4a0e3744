"""alignment.py and align.py: chunking does not change the result, serial chaining, resume, refusals."""
import argparse
import dataclasses
import io
import json
import os
import socket
import warnings
from urllib.parse import unquote

import numpy as np
import pytest
import torch

import align
import alignment
import data
import helpers
import shifts
import volume
from alignment import PairSettings, SolveSettings
from helpers import HelpFormatter, UserError
from conftest import moved_windows, run_script, turned_phantom
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


@pytest.mark.parametrize("trunc", [0, 1])
def test_chunked_equals_unchunked(trunc):
    net = random_net()
    a, b = sections(2)
    whole = alignment.pair_field(net, a, b, PairSettings(chunk=1024, overlap=64, trunc=trunc))
    chunked = alignment.pair_field(net, a, b, PairSettings(chunk=64, overlap=64, trunc=trunc))
    assert whole.shape == (2, 128, 128) and whole.abs().max() > 0.05
    assert (whole - chunked).abs().max() < 1e-4


def test_for_inference_keeps_the_field():
    a, b = sections(2)
    plain = alignment.pair_field(random_net(), a, b)
    fast = alignment.pair_field(alignment.for_inference(random_net()), a, b)
    assert plain.abs().max() > 0.05 and torch.allclose(plain, fast, atol=1e-4)


def test_trunc_stops_the_network_short_and_upsamples_its_field():
    net = random_net()
    a, b = sections(2)
    coarse = alignment.pair_field(net, a, b, PairSettings(prealign=0, trunc=1, smooth=0))
    src, tgt = (data.normalise(torch.from_numpy(x))[0].view(1, 1, 128, 128) for x in (a, b))
    expected = helpers.upsample_field(net(src, tgt, trunc=1).field, 2)[0]
    assert torch.allclose(coarse, expected, atol=1e-5)
    finest = alignment.pair_field(net, a, b, PairSettings(prealign=0, smooth=0))
    assert (coarse - finest).abs().max() > 0.05  # level 0 adds detail


def test_serial_alignment_at_the_defaults_leaves_out_what_the_network_adds_from_pixel_to_pixel(monkeypatch):
    """A network whose every field is a shift of (1, -0.5) px plus +-3 px alternating row by row (detail that follows
    the tissue, which a serial chain would add up): at the default low-pass each section's field onto the aligned
    section before it is the shift, without the detail (the box leaves out the target's missing edge, so an odd
    number of rows averages to 3/63 px)."""
    shift = torch.tensor([1.0, -0.5]).view(1, 2, 1, 1)
    detail = 3.0 * (-1.0) ** torch.arange(64).view(1, 1, 64, 1)
    monkeypatch.setattr(alignment, "chunk_field", lambda model, s, t, trunc: (shift + detail).expand(1, 2, 64, 64))
    serial = alignment.align_serial(random_net(), sections(4, 64), settings=PairSettings(prealign=0))
    for z, (_, field, _) in enumerate(serial):
        assert (field - min(z, 1) * shift[0]).abs().max() < 0.06


def test_serial_chaining(monkeypatch):
    shift = torch.tensor([1.0, -2.0]).view(2, 1, 1) * torch.ones(2, 16, 16)
    monkeypatch.setattr(alignment, "pair_field", lambda *a, **k: shift.clone())
    stack = sections(4, 16)
    to_aligned = [f for _, f, _ in alignment.align_serial(None, stack)]
    to_raw = [f for _, f, _ in alignment.align_serial(None, stack, to_raw_neighbour=True)]
    assert to_aligned[0].abs().max() == 0 and torch.allclose(to_aligned[3], shift)
    for z in range(4):
        assert torch.allclose(to_raw[z][:, 6:-6, 6:-6], z * shift[:, 6:-6, 6:-6], atol=1e-4)


def nan_net():
    """``random_net`` whose every field is NaN (its aligners' output biases are)."""
    net = random_net()
    with torch.no_grad():
        for aligner in net.aligners:
            aligner.net[-1].bias.fill_(float("nan"))
    return net


@pytest.fixture
def setup(tmp_path, tiny_volume):
    archive = save_archive(tmp_path / "net.pt", random_net(), summary={"name": "net"})
    return tmp_path, tiny_volume[0], archive


def aligned_arrays(dest, mip=0):
    """``(image, field)`` of an align.py destination at ``mip``, over the layers' bounds (the bbox, the sections from
    the first aligned)."""
    arrays = []
    for name in ("image", "field"):
        vol = volume.open_volume(str(dest / name), mip)
        start, stop = volume.bounds(vol)
        arrays.append(volume.read(vol, start, stop - start))
    return arrays


def test_align_writes_layers_and_resumes_to_the_same_result(setup):
    tmp, paths, archive = setup
    common = ["--archive", str(archive), "--source", paths["image"], "--chunk", "32", "--overlap", "32"]
    align.main(common + ["--dest", str(tmp / "straight"), "--z_start", "2", "--z_stop", "8"])
    align.main(common + ["--dest", str(tmp / "resumed"), "--z_start", "2", "--z_stop", "5"])
    out = align.main(common + ["--dest", str(tmp / "resumed"), "--z_start", "2", "--z_stop", "8"])
    assert out["sections"] == 3
    (i1, f1), (i2, f2) = aligned_arrays(tmp / "straight"), aligned_arrays(tmp / "resumed")
    assert np.array_equal(i1, i2) and np.allclose(f1, f2, atol=1e-5)
    assert np.abs(f1[1:]).max() > 0 and np.abs(f1[0]).max() == 0  # section 2 is the fixed reference
    assert align.main(common + ["--dest", str(tmp / "straight"), "--z_start", "2", "--z_stop", "8"])["sections"] == 0
    assert align.main(common + ["--dest", str(tmp / "straight"), "--z_start", "2", "--z_stop", "8",
                                "--overwrite"])["sections"] == 6


def dest_bounds(dest, name, mip=0):
    return [list(map(int, corner)) for corner in volume.bounds(volume.open_volume(str(dest / name), mip))]


def test_dest_bounds_are_the_aligned_sections_and_bbox_and_a_later_run_grows_them(setup):
    tmp, paths, archive = setup
    dest = tmp / "d"
    common = ["--archive", str(archive), "--source", paths["image"], "--dest", str(dest), "--chunk", "32",
              "--overlap", "32", "--z_start", "3", "--bbox", "0", "32", "64", "64", "--mips", "1"]
    align.main(common + ["--z_stop", "6"])
    before = [aligned_arrays(dest, mip) for mip in (0, 1)]
    for z_stop in (6, 9):  # the second run grows the bounds
        for name in ("image", "field") + align.SERIAL_LAYERS:  # no --defects: no defects layer
            assert dest_bounds(dest, name) == [[0, 32, 3], [64, 64, z_stop]], name
        for name in ("image", "field"):
            assert dest_bounds(dest, name, 1) == [[0, 16, 3], [32, 32, z_stop]]
            for mip in (0, 1):  # every chunk within the bounds is written: igneous and CloudVolume read them all
                vol = volume.open_volume(str(dest / name), mip)
                start, stop = volume.bounds(vol)
                assert volume.missing_sections(vol, start, stop - start) == []
        if z_stop == 6:
            assert align.main(common + ["--z_stop", "9"])["sections"] == 3
    for mip, (image, field) in enumerate(before):  # the sections written before stay as they were
        grown_image, grown_field = aligned_arrays(dest, mip)
        assert np.array_equal(grown_image[:3], image) and np.array_equal(grown_field[:3], field)


def two_by_two_mean(array):
    """``[Z, C, Y, X]`` averaged over 2 x 2 pixels (Y, X even)."""
    z, c, y, x = array.shape
    return array.astype(np.float64).reshape(z, c, y // 2, 2, x // 2, 2).mean((3, 5))


@pytest.mark.parametrize("mode", [[], ["--solve"]])
def test_mips_of_the_image_are_2x2_means_and_of_the_field_halved_vectors(setup, mode):
    tmp, paths, archive = setup
    align.main(["--archive", str(archive), "--source", paths["image"], "--dest", str(tmp / "d"), "--chunk", "32",
                "--overlap", "32", "--z_start", "2", "--z_stop", "5", "--mips", "2", "--task_chunk", "1024", *mode])
    finer_image, finer_field = aligned_arrays(tmp / "d")
    for mip in (1, 2):
        image, field = aligned_arrays(tmp / "d", mip)
        assert image.shape == (3, 1, 64 >> mip, 64 >> mip) and field.shape == (3, 2, 64 >> mip, 64 >> mip)
        assert np.array_equal(image, np.round(two_by_two_mean(finer_image)).astype(np.uint8))
        assert np.allclose(field, two_by_two_mean(finer_field) / 2, atol=1e-5)  # px of the coarser mip
        assert np.abs(field).max() > 0.01
        finer_image, finer_field = image, field


def test_a_dest_another_run_is_writing_is_refused_and_the_lock_goes_with_the_run(setup):
    tmp, paths, archive = setup
    argv = ["--archive", str(archive), "--source", paths["image"], "--dest", str(tmp / "d"), "--chunk", "32",
            "--overlap", "32", "--z_start", "2", "--z_stop", "4"]
    (tmp / "d").mkdir()
    (tmp / "d" / align.LOCK).write_text(f"{os.getpid()}@{socket.gethostname()}")  # a run of this machine, alive
    with pytest.raises(UserError, match=f"--dest {tmp / 'd'} is in use by process {os.getpid()}@"):
        align.main(argv)  # two at once mixed their sections' fields (up to 47 px apart)
    (tmp / "d" / align.LOCK).unlink()
    align.main(argv)
    assert not (tmp / "d" / align.LOCK).exists() and (tmp / "d" / "image").is_dir()


def test_mips_need_tasks_and_a_bbox_corner_that_cover_whole_chunks_of_every_mip(setup):
    tmp, paths, archive = setup
    common = ["--archive", str(archive), "--source", paths["image"], "--dest", str(tmp / "d"), "--chunk", "32",
              "--overlap", "32", "--z_start", "2", "--z_stop", "4"]
    for extra, message in ((["--mips", "-1"], "--mips must be >= 0"),
                           (["--mips", "2"], "--mips 2 needs --task_chunk a multiple of 1024 "),
                           (["--mips", "1", "--bbox", "1", "0", "64", "64"], "--mips 1 needs the bbox corner at "
                                                                           "multiples of 2 px .*, not 1 0$")):
        with pytest.raises(UserError, match=message):
            align.main(common + extra)
    align.main(common)
    with pytest.raises(UserError, match="was aligned with --mips 0, not 1; give --mips 0 to go on with it, or use "
                                        "--overwrite"):
        align.main(common + ["--z_stop", "5", "--mips", "1"])


def test_a_resume_takes_the_source_by_another_path_to_the_same_folder(setup):
    tmp, paths, archive = setup
    (tmp / "link").symlink_to(tmp / "vol")  # e.g. data/ a symlink, and the source named through it or not
    common = ["--archive", str(archive), "--dest", str(tmp / "d"), "--chunk", "32", "--overlap", "32", "--z_start",
              "2"]
    align.main(common + ["--source", paths["image"], "--z_stop", "4"])
    assert align.main(common + ["--source", f"file://{tmp}/link/image", "--z_stop", "5"])["sections"] == 1
    (tmp / "other").mkdir()
    (tmp / "other" / "image").symlink_to(tmp / "vol" / "defects")  # another folder: still refused
    with pytest.raises(UserError, match="was aligned with source"):
        align.main(common + ["--source", f"file://{tmp}/other/image", "--z_stop", "5"])


def test_a_resume_refuses_a_source_rewritten_at_the_same_path(setup):
    """The run record holds the sha256 of a square of the first section: a source written anew at the same path
    (another export) is refused in one line; the same content again resumes."""
    tmp, paths, archive = setup
    common = ["--archive", str(archive), "--dest", str(tmp / "d"), "--chunk", "32", "--overlap", "32", "--z_start",
              "2", "--source", paths["image"]]
    align.main(common + ["--z_stop", "4"])
    vol = volume.open_volume(paths["image"])
    section = volume.read(vol, (0, 0, 2), (64, 64, 1))
    volume.write(vol, np.roll(section, 1, axis=-1), (0, 0, 2))
    with pytest.raises(UserError, match=r"aligned from a source whose section 2 read differently \(sha256 \w{16}"
                                        r"\.\.\. of its first 512 px square, not \w{16}\.\.\.\): it was rewritten "
                                        "at the same path; use --overwrite"):
        align.main(common + ["--z_stop", "5"])
    volume.write(vol, section, (0, 0, 2))
    assert align.main(common + ["--z_stop", "5"])["sections"] == 1


def test_provenance_has_one_entry_per_run_that_aligns_with_the_archive_sha256_and_lineage(tmp_path, tiny_volume):
    parent = {"name": "parent", "date": "2024-01-02 03:04", "iterations": 50, "params": {"lr": 0.001},
              "final": {"total": 0.5}, "history": {"total": [0.9, 0.5]}, "resumes": []}
    child = {**parent, "name": "child", "iterations": 20, "history": {"total": [0.4, 0.3]}}
    archive = save_archive(tmp_path / "net.pt", random_net(), summary=child, lineage=[parent])
    dest = tmp_path / "d"
    common = ["--archive", str(archive), "--source", tiny_volume[0]["image"], "--dest", str(dest), "--chunk", "32",
              "--overlap", "32", "--z_start", "2"]
    align.main(common + ["--z_stop", "4"])
    align.main(common + ["--z_stop", "5", "--max_failures", "5"])
    before = dest_files(dest)
    assert align.main(common + ["--z_stop", "5"])["sections"] == 0  # nothing to do: nothing is written
    assert dest_files(dest) == before
    without_curves = [{key: value for key, value in run.items() if key != "history"} for run in (parent, child)]
    for name in ("image", "field") + align.SERIAL_LAYERS:  # no --defects: no defects layer
        provenance = volume.open_volume(str(dest / name)).provenance
        runs = provenance.processing
        assert [(run["method"]["args"]["z_stop"], run["method"]["args"]["max_failures"]) for run in runs] == [
            (4, 3), (5, 5)]
        for run in runs:
            assert run["method"]["run"]["archive_sha256"] == helpers.file_sha256(archive)
            assert run["method"]["archive_lineage"] == without_curves
            assert run["method"]["run"]["source"] == tiny_volume[0]["image"] and run["date"] and run["code_version"]
        assert provenance.sources == [tiny_volume[0]["image"]]


def test_the_run_ends_with_a_neuroglancer_state_of_the_image_and_the_coloured_field(setup, capsys, monkeypatch):
    tmp, paths, archive = setup
    align.main(["--archive", str(archive), "--source", paths["image"], "--dest", str(tmp / "d"), "--chunk", "32",
                "--overlap", "32", "--z_start", "2", "--z_stop", "4"])
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    state = json.loads(unquote(next(line for line in lines if line.startswith(align.VIEWER))[len(align.VIEWER):]))
    assert state == json.loads((tmp / "d" / align.NEUROGLANCER_STATE).read_text())
    image, field = state["layers"]
    assert (image["name"], field["name"]) == ("image", "field") and image["type"] == field["type"] == "image"
    assert image["source"] == "precomputed://http://localhost:1337/image" and field["source"].endswith("/field")
    assert "void main()" in field["shader"] and "getDataValue(0)" in field["shader"] and "emitRGB" in field["shader"]
    # the printed command serves DEST, where Neuroglancer finds both layers
    served = []
    monkeypatch.setattr("cloudvolume.server.view", lambda path, port: served.append((path, port)))
    command = next(line for line in lines if line.startswith("python -c "))
    exec(command.split('"')[1])
    assert served == [("file://" + str(tmp / "d"), 1337)]
    assert all(align.CloudFiles(served[0][0]).exists(f"{name}/info") for name in ("image", "field"))
    # Neuroglancer reads a cloud DEST itself: no server
    for dest in ("gs://lab/aligned", "precomputed://gs://lab/aligned"):
        state, lines = align.viewer(dest)
        assert [layer["source"] for layer in state["layers"]] == ["precomputed://gs://lab/aligned/image",
                                                                  "precomputed://gs://lab/aligned/field"]
        assert not any("cloudvolume.server" in line for line in lines)


@pytest.mark.parametrize("extra, message", [
    (["--z_start", "5", "--z_stop", "40"], "z range 5..40 is outside the sections 0..11 of the volume file://"),
    (["--z_start", "2", "--z_stop", "0"], "z range 2..0 is empty"),
    (["--z_start", "0", "--z_stop", "2", "--mip", "5"], "no mip 5"),
    (["--z_start", "0", "--z_stop", "2", "--bbox", "0", "0", "99", "10"], "outside the volume"),
    (["--z_start", "0", "--z_stop", "2", "--bbox", "20", "0", "10", "10"], "--bbox 20 0 10 10 is empty: X1 must be "
                                                                           "above X0"),
    (["--z_start", "0", "--z_stop", "2", "--prealign", "-1"], "--prealign -1: must be >= 0"),
    (["--z_start", "0", "--z_stop", "2", "--solve", "--detail_pull", "0"], "--detail_pull 0: must be > 0"),
    (["--z_start", "0", "--z_stop", "2", "--neighbours", "3", "--pull", "5"],
     "--neighbours 3, --pull 5.0: a setting of --solve, which this run does not use"),
    (["--z_start", "0", "--z_stop", "3", "--solve", "--neighbours", "3"], "--neighbours 3: the range 0..2 has 3 "
                                                                          "sections, so a section has at most 2"),
    (["--z_start", "0", "--z_stop", "2", "--task_memory", "4"], "--task_memory 4: a setting of --solve's tasks"),
    (["--z_start", "0", "--z_stop", "2", "--trunc", "-1"], "--trunc -1: must be >= 0"),
    (["--z_start", "0", "--z_stop", "2", "--refine", "-5"], "--refine -5: must be >= 0"),
    (["--z_start", "0", "--z_stop", "2", "--trunc", "3"], "below the 3 levels"),
    (["--z_start", "0", "--z_stop", "2", "--chunk", "0"], "--chunk 0: must be >= 1"),
    (["--z_start", "0", "--z_stop", "2", "--overlap", "-4"], "--overlap -4: must be >= 0"),
    (["--z_start", "0", "--z_stop", "2", "--chunk", "30"], "--chunk 30 must be a multiple of 4 px, the coarsest "
                                                           "stride of the 3 levels"),
])
def test_bad_input_is_a_one_line_error(setup, extra, message, run_command):
    tmp, paths, archive = setup
    result = run_command(align, "--archive", archive, "--source", paths["image"], "--dest", tmp / "d", *extra)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and message in last and "Traceback" not in result.stderr


def written(dest) -> list[str]:
    """The data chunks in an align.py destination's layers (not their info and provenance files)."""
    return sorted(str(p.relative_to(dest)) for layer in ("image", "field") + align.SERIAL_LAYERS + align.SOLVE_LAYERS
                  for p in (dest / layer).rglob("*") if p.is_file() and p.name not in ("info", "provenance"))


@pytest.mark.parametrize("mode, section", [
    ([], 3), (["--vote", "2"], 3), (["--raw_neighbour"], 3), (["--block", "2"], 3),
    (["--solve"], 2),  # the solve's first pair field, of section 2, is NaN
])
def test_a_network_whose_field_is_not_finite_stops_before_the_section_is_written(setup, mode, section):
    tmp, paths, _ = setup
    archive = save_archive(tmp / "nan.pt", nan_net(), summary={"name": "nan"})
    with pytest.raises(UserError, match=f"^section {section}: its field for .* is not finite") as err:
        align.main(["--archive", str(archive), "--source", paths["image"], "--dest", str(tmp / "d"),
                    "--z_start", "2", "--z_stop", "5", *mode])
    assert "\n" not in str(err.value)
    assert written(tmp / "d") == []
    scans = {f"solve/{kind}/{z}" for kind in ("scan", "thumbnail", "prealign") for z in range(2, 5)}  # those are over
    assert set(align.progress_files(str(tmp / "d")).list()) <= {"block/2/2"} | scans  # the fixed reference, unwritten


@pytest.mark.parametrize("mode, section", [([], 3), (["--solve"], 2)])
def test_a_network_whose_field_is_not_finite_is_one_line_from_the_command(setup, mode, section, run_command):
    tmp, paths, _ = setup
    archive = save_archive(tmp / "nan.pt", nan_net(), summary={"name": "nan"})
    result = run_command(align, "--archive", archive, "--source", paths["image"], "--dest", tmp / "d",
                         "--z_start", "2", "--z_stop", "5", *mode)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert last.startswith(f"error: section {section}: its field for ") and "not finite" in last
    assert written(tmp / "d") == []


@pytest.mark.parametrize("flag, value, message", [
    ("--pull", "nan", "'nan' is not a number"), ("--pull", "inf", "'inf' is not a finite number"),
    ("--robust", "nan", "'nan' is not a number"), ("--robust", "-inf", "'-inf' is not a finite number"),
    ("--detail_pull", "nan", "'nan' is not a number"),
])
def test_a_float_flag_that_is_not_a_number_is_refused_when_parsed(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        align.parse_args(["--archive", "a.pt", "--source", "s", "--dest", "d", "--z_start", "0", "--z_stop", "2",
                          f"{flag}={value}"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"argument {flag}: {message}")


def test_detail_pull_may_be_infinite():
    args = align.parse_args(["--archive", "a.pt", "--source", "s", "--dest", "d", "--z_start", "0", "--z_stop", "2",
                             "--detail_pull", "inf"])
    assert args.detail_pull == float("inf")


MINIMAL = ["--archive", "a.pt", "--source", "s", "--dest", "d", "--z_start", "0", "--z_stop", "2"]


def test_align_flags_are_the_settings_fields_with_their_defaults():
    assert alignment.settings_from_args(align.parse_args(MINIMAL)) == (PairSettings(), SolveSettings())
    args = align.parse_args(MINIMAL + ["--chunk", "64", "--smooth", "3", "--robust", "0", "--detail_pull", "inf"])
    assert alignment.settings_from_args(args) == (PairSettings(chunk=64, smooth=3),
                                                  SolveSettings(robust=0.0, detail_pull=float("inf")))


@pytest.mark.parametrize("formatter", [argparse.HelpFormatter, HelpFormatter])
def test_add_flags_shows_each_default_once_and_takes_several_values_where_asked(formatter):
    parser = argparse.ArgumentParser(formatter_class=formatter)
    alignment.add_flags(parser, several=["pull"], without=["chunk"])
    text = " ".join(parser.format_help().split())
    assert text.count("(default: ") == 10 and "--chunk" not in text and "(default: [0.03])" in text
    args = parser.parse_args(["--pull", "0.1", "0.2", "--overlap", "8"])
    assert args.pull == [0.1, 0.2]
    assert alignment.settings_from_args(args, pull=0.2) == (PairSettings(overlap=8), SolveSettings(pull=0.2))


@pytest.mark.parametrize("mode, name, own", [
    ([], "serial", {"block": None, "task_chunk": 512}),
    (["--mips", "1"], "serial", {"block": None, "task_chunk": 512, "mips": 1}),
    (["--vote", "2", "--block", "3"], "vote", {"vote": 2, "block": 3, "task_chunk": 512}),
    (["--solve"], "solve", {"neighbours": 1, "pull": 0.03, "robust": 4.0, "detail_pull": 5.0, "block": None,
                            "task_chunk": 512}),
    (["--solve", "--refine", "192"], "solve", {"refine": 192, "neighbours": 1, "pull": 0.03, "robust": 4.0,
                                              "detail_pull": 5.0, "block": None, "task_chunk": 512}),
    (["--solve", "--smooth", "8", "--detail_pull", "inf", "--block", "4"], "solve",
     {"smooth": 8, "neighbours": 1, "pull": 0.03, "robust": 4.0, "detail_pull": "inf", "block": 4,
      "task_chunk": 512}),
])
def test_the_run_record_holds_the_settings_its_mode_reads_by_their_flags_names(tmp_path, mode, name, own):
    """The keys and values of the records DESTs already hold (a resume compares them), in their order."""
    (tmp_path / "a.pt").write_bytes(b"net")
    args = align.parse_args(MINIMAL[2:] + ["--archive", str(tmp_path / "a.pt"), "--overlap", "96", *mode])
    record = align.run_record(args, align.job_of(args, "file:///s", (0, 0, 64, 32)))
    expected = {"archive_sha256": helpers.file_sha256(tmp_path / "a.pt"), "source": "file:///s", "mode": name,
                "z_start": 0, "mip": 0, "bbox": [0, 0, 64, 32], "chunk": 1024, "overlap": 96, "prealign": 32,
                "trunc": 2, "smooth": 96, **own}
    assert record == expected and list(record) == list(expected)


def test_a_destination_that_cannot_be_written_is_one_line_before_anything_runs(setup):
    tmp, paths, archive = setup
    (tmp / "a_file").touch()
    common = ["--archive", str(archive), "--source", paths["image"], "--z_start", "0", "--z_stop", "2"]
    result = run_script("align.py", *common, "--dest", tmp / "a_file")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == f"error: --dest {tmp / 'a_file'}: cannot write there (Not a directory)"
    for dest in (str(tmp / "a_file" / "sub"), "file://" + str(tmp / "a_file" / "sub")):
        with pytest.raises(helpers.UserError, match="a_file is not a directory"):
            align.main(common + ["--dest", dest])
    (tmp / "d").mkdir()
    (tmp / "d" / "image").touch()  # the folder is writable, its image layer's place is not
    with pytest.raises(helpers.UserError, match="cannot write file://.*d/image: "):
        align.main(common + ["--dest", str(tmp / "d")])


def test_archive_volume_and_destination_mismatches(setup, run_command):
    tmp, paths, archive = setup
    result = run_command(align, "--archive", archive, "--source", paths["field"], "--dest", tmp / "d",
                         "--z_start", "0", "--z_stop", "2")
    assert result.returncode == 2 and "channels" in result.stderr
    result = run_command(align, "--archive", tmp / "none.pt", "--source", paths["image"], "--dest",
                         tmp / "d", "--z_start", "0", "--z_stop", "2")
    assert result.returncode == 2 and "none.pt" in result.stderr
    align.main(["--archive", str(archive), "--source", paths["image"], "--dest", str(tmp / "d"), "--z_start", "0",
                "--z_stop", "2"])
    result = run_command(align, "--archive", archive, "--source", paths["image"], "--dest", tmp / "d",
                         "--z_start", "0", "--z_stop", "2", "--mip", "1")
    assert result.returncode == 2 and "was aligned with --mip 0, not 1" in result.stderr
    assert volume.open_volume(str(tmp / "d" / "image"))  # what was aligned is still there


def dest_files(dest):
    """Every file under ``dest``, with its bytes."""
    return {path: path.read_bytes() for path in dest.rglob("*") if path.is_file()}


def test_a_dest_made_by_another_run_is_refused_untouched_and_overwrite_redoes_it(setup):
    tmp, paths, archive = setup
    other = save_archive(tmp / "other.pt", random_net(seed=1), summary={"name": "other"})
    dest = tmp / "d"
    common = ["--source", paths["image"], "--dest", str(dest), "--chunk", "32", "--overlap", "32", "--z_stop", "6"]
    align.main(["--archive", str(archive), "--z_start", "2", *common[:-1], "5"])
    before = dest_files(dest)
    result = run_script("align.py", "--archive", other, "--z_start", "2", *common)
    sha = {path: helpers.file_sha256(path) for path in (archive, other)}
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: {dest} was aligned with archive sha256 {sha[archive][:12]}... ({archive}), not "
        f"{sha[other][:12]}... ({other}); use --overwrite to redo it (deletes DEST's layers and progress)")
    for extra, difference in ((["--z_start", "3"], "--z_start 2, not 3; give --z_start 2 to go on with it, or"),
                              (["--solve"], "mode serial, not solve;"), (["--vote", "2"], "mode serial, not vote;"),
                              (["--block", "3"], "--block None, not 3;"),
                              (["--trunc", "1"], "--trunc 2, not 1; give --trunc 2 to go on with it, or")):
        with pytest.raises(align.UserError, match=f"was aligned with {difference} use --overwrite"):
            align.main(["--archive", str(archive), "--z_start", "2", *common, *extra])
    assert dest_files(dest) == before
    # flags that do not change the result do not block the resume; each run that aligns is in the provenance
    assert align.main(["--archive", str(archive), "--z_start", "2", *common, "--device", "cpu",
                       "--max_failures", "5"])["sections"] == 1
    runs = volume.open_volume(str(dest / "field")).provenance.processing
    assert [run["method"]["run"]["archive_sha256"] for run in runs] == [sha[archive]] * 2
    assert all(run["date"] and run["code_version"] for run in runs) and runs[1]["method"]["args"]["max_failures"] == 5
    # --overwrite deletes the first run's sections: the result is the other archive's alone
    assert align.main(["--archive", str(other), "--z_start", "2", *common, "--overwrite"])["sections"] == 4
    align.main(["--archive", str(other), "--z_start", "2", *common[:3], str(tmp / "fresh"), *common[4:]])
    (image, field), (fresh_image, fresh_field) = aligned_arrays(dest), aligned_arrays(tmp / "fresh")
    assert np.array_equal(image, fresh_image) and np.array_equal(field, fresh_field)
    runs = volume.open_volume(str(dest / "image")).provenance.processing
    assert [run["method"]["run"]["archive_sha256"] for run in runs] == [sha[other]]
    with pytest.raises(align.UserError, match="was aligned with archive sha256"):
        align.main(["--archive", str(archive), "--z_start", "2", *common])


def test_a_solve_whose_record_holds_inf_resumes(setup):
    tmp, paths, archive = setup
    common = ["--archive", str(archive), "--source", paths["image"], "--dest", str(tmp / "d"), "--chunk", "32",
              "--overlap", "32", "--z_start", "2", "--solve", "--smooth", "2", "--detail_pull", "inf"]
    align.main(common + ["--z_stop", "4"])
    assert align.main(common + ["--z_stop", "5"])["sections"] == 3  # the solve redoes its whole range


def test_layers_align_py_did_not_write_are_never_reused_nor_deleted(setup):
    tmp, paths, archive = setup
    common = ["--archive", str(archive), "--source", paths["image"], "--z_start", "0", "--z_stop", "2"]
    foreign = tmp / "foreign"
    volume.create_volume(str(foreign / "field"), (64, 64, 12), "float32", 2, provenance={"description": "not ours"})
    unrecorded = tmp / "unrecorded"  # by an align.py that kept no run record
    volume.create_volume(str(unrecorded / "image"), (64, 64, 12), "uint8", provenance={"description": align.ALIGNED_BY})
    before = dest_files(tmp)
    for extra in ([], ["--overwrite"]):
        with pytest.raises(align.UserError, match="foreign/field exists and was not written by align.py"):
            align.main(common + ["--dest", str(foreign), *extra])
    with pytest.raises(align.UserError, match="older align.py that kept no run record; use --overwrite"):
        align.main(common + ["--dest", str(unrecorded)])
    with pytest.raises(align.UserError, match="lies inside it"):
        align.main(common + ["--dest", str(tmp / "vol"), "--overwrite"])  # the source's folder
    with pytest.raises(align.UserError, match="is --dest"):
        align.main(common + ["--dest", str(tmp / "vol" / "image"), "--overwrite"])  # the source layer itself
    assert dest_files(tmp) == before


def test_vote_outvotes_one_bad_target(monkeypatch):
    """Section 3's pair field onto aligned section 1 is 20 px off; voting over 3 targets ignores it."""
    stack = sections(4, 16)
    good = torch.tensor([1.0, -2.0]).view(2, 1, 1) * torch.ones(2, 16, 16)

    def pair(model, source, target, *args):
        bad = source is stack[3] and np.array_equal(target, alignment.apply_field(stack[1], good))
        return good + 20 if bad else good.clone()

    monkeypatch.setattr(alignment, "pair_field", pair)
    voted = [f for _, f, _ in alignment.align_serial(None, list(stack), vote=3, softness=0.5)]
    assert torch.allclose(voted[3], good, atol=1e-3)
    serial = [f for _, f, _ in alignment.align_serial(None, [stack[1], stack[3]])]
    assert (serial[1] - good).abs().max() == 0  # the monkeypatch is only bad for the voted pair (1 -> 3)


def labelled_sections(count, size=32):
    """Textured sections whose top-left pixel is 10 + 10 z, so a fake pair_field can tell them apart."""
    out = sections(count, size)
    out[:, 0, 0] = 10 + 10 * np.arange(count)
    return out


def test_solved_alignment_recovers_known_shifts_and_skips_blank_sections(monkeypatch):
    truth = torch.tensor([[0.0, 0.0], [3.0, -1.0], [0.0, 0.0], [-2.0, 4.0], [1.0, 1.0]]).view(5, 2, 1, 1)
    stack = labelled_sections(5)
    stack[2] = 0  # blank
    pairs = []

    def pair(model, source, target, *args):
        s, t = (int(x[0, 0]) // 10 - 1 for x in (source, target))
        pairs.append((s, t))
        return (truth[s] - truth[t]).expand(2, 32, 32).clone()

    monkeypatch.setattr(alignment, "pair_field", pair)
    aligned, fields, skipped = alignment.align_solved(None, stack, solve=SolveSettings(neighbours=2, pull=1e-3))
    assert skipped == [2] and not aligned[2].any() and 2 not in {z for p in pairs for z in p}
    expected = (truth - truth[0]).expand(5, 2, 32, 32)
    usable = [0, 1, 3, 4]
    assert torch.allclose(fields[usable], expected[usable], atol=0.05)


def test_align_vote_and_solve_run_and_resume(setup):
    tmp, paths, archive = setup
    common = ["--archive", str(archive), "--source", paths["image"], "--chunk", "32", "--overlap", "32"]
    align.main(common + ["--dest", str(tmp / "vote"), "--z_start", "2", "--z_stop", "8", "--vote", "3"])
    align.main(common + ["--dest", str(tmp / "vote2"), "--z_start", "2", "--z_stop", "6", "--vote", "3"])
    assert align.main(common + ["--dest", str(tmp / "vote2"), "--z_start", "2", "--z_stop", "8",
                                "--vote", "3"])["sections"] == 2
    (i1, f1), (i2, f2) = aligned_arrays(tmp / "vote"), aligned_arrays(tmp / "vote2")
    assert np.array_equal(i1, i2) and np.allclose(f1, f2, atol=1e-5)
    out = align.main(common + ["--dest", str(tmp / "solve"), "--z_start", "2", "--z_stop", "8", "--solve",
                               "--neighbours", "2"])
    image, field = aligned_arrays(tmp / "solve")
    # section 2 is the reference: its field is zero, but within 2 px of the missing right quarter (x >= 48), where
    # the solve's field is inverted inexactly
    assert out["sections"] == 6 and np.abs(field[0, ..., :44]).max() < 1e-4 and np.abs(field[1:]).max() > 0
    with pytest.raises(align.UserError, match="choose one"):
        align.main(common + ["--dest", str(tmp / "x"), "--z_start", "2", "--z_stop", "8", "--solve", "--vote", "3"])


def test_prealign_shift_is_found_and_added_to_the_networks_field(monkeypatch):
    """Section 1's content is moved by (13, -9) px, beyond what the network is asked to find (here: nothing)."""
    seen = []

    def network(model, source, target, trunc):  # the pair the network sees: already matched, so it adds nothing
        seen.append((source, target))
        return torch.zeros(1, 2, *source.shape[-2:])

    monkeypatch.setattr(alignment, "chunk_field", network)
    moved, still = moved_windows([(13, -9), (0, 0)])
    field = alignment.pair_field(random_net(), moved, still, PairSettings(chunk=1024, overlap=0))
    assert torch.equal(field, torch.tensor([13.0, -9.0]).view(2, 1, 1).expand(2, 160, 160))
    source, target = seen[-1]
    assert torch.allclose(source[0, 0, 20:-20, 20:-20], target[0, 0, 20:-20, 20:-20], atol=0.05)
    unmoved = alignment.pair_field(random_net(), moved, still, PairSettings(prealign=0))
    assert torch.equal(unmoved, torch.zeros(2, 160, 160))
    mostly_missing = moved.copy()
    mostly_missing[:130] = 0  # tissue on under a quarter of the section: no whole-section shift is trusted
    with pytest.warns(alignment.PoorMatchWarning, match="tissue on only 19 %"):
        assert torch.equal(alignment.pair_field(random_net(), mostly_missing, still), torch.zeros(2, 160, 160))


def test_where_the_source_moved_by_a_wide_match_shows_no_tissue_the_pair_field_is_the_matchs(monkeypatch):
    """Where the source, moved by a wide match (shift and turn), reads missing data (its own, or beyond its edge after
    a long move) the network sees nothing to match: the pair field there is the match's, not the network's guess. A
    whole-pixel shift (strips within its 32 px reach) keeps the network's field everywhere."""
    network = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1)
    monkeypatch.setattr(alignment, "chunk_field", lambda model, s, t, trunc: network.expand(1, 2, *s.shape[-2:]))
    source, target = sections(2, 64)
    source[:, :8] = 0  # its first 8 columns are missing data
    wide = helpers.affine_field(helpers.rigid_matrix(torch.tensor([0.01]), torch.tensor([-20.0]), torch.tensor([0.0])),
                                64, 64)  # pixel x reads the source's column x - 20 (+-0.3)
    field = alignment.pair_field(random_net(), source, target, PairSettings(smooth=0), rigid=wide)
    assert torch.allclose(field[:, :, :27], wide[0, :, :, :27], atol=1e-4)  # source columns < 7: none there
    inside = (slice(None), slice(1, -1), slice(29, None))  # the turn reads above the first row, below the last
    assert torch.allclose(field[inside], (wide + network)[0][inside], atol=0.05)  # turned by 0.01 rad
    shift = torch.tensor([-20.0, 0.0]).view(1, 2, 1, 1)
    field = alignment.pair_field(random_net(), source, target, PairSettings(smooth=0), rigid=shift)
    assert torch.equal(field, (shift + network)[0].expand(2, 64, 64))


def prealigned(monkeypatch, source, target, **settings) -> torch.Tensor:
    """``pair_field`` of uint8 ``[H, W]`` sections with a network that adds nothing: the pre-alignment's field."""
    monkeypatch.setattr(alignment, "chunk_field", lambda model, s, t, trunc: torch.zeros(1, 2, *s.shape[-2:]))
    return alignment.pair_field(random_net(), source, target, PairSettings(chunk=1024, overlap=0, **settings))


def test_a_section_40_px_away_and_turned_003_rad_is_found_at_the_defaults(monkeypatch):
    sections, (shift, angle) = turned_phantom(256, (40.0, -36.0), 0.03)
    true = helpers.affine_field(helpers.rigid_matrix(torch.tensor([angle]), *torch.tensor(shift)), 256, 256)[0]
    field = prealigned(monkeypatch, sections[0], sections[1])
    assert float((field - true)[:, 32:-32, 32:-32].norm(dim=0).max()) < 1.0


def test_the_pre_alignment_found_on_thumbnails_holds_on_every_part_of_the_section(monkeypatch):
    """``prealignment`` on thumbnails averaged by 2 still finds a section 40 px away and turned 0.03 rad (pair_field
    uses them on sections of 2 THUMBNAIL px and more); its field on a part of the section is the whole's part, and a
    section's thumbnail is its halves' thumbnails side by side."""
    monkeypatch.setattr(alignment, "THUMBNAIL", 128)
    sections, (shift, angle) = turned_phantom(256, (40.0, -36.0), 0.03)
    true = helpers.affine_field(helpers.rigid_matrix(torch.tensor([angle]), *torch.tensor(shift)), 256, 256)[0]
    stats = tuple(alignment.section_stats(alignment.tissue_moments(s)) for s in sections[:2])
    thumbnails = [alignment.thumbnail(s, 2) for s in sections[:2]]
    matrix, _ = alignment.prealignment(*thumbnails, stats, 32, 2)
    field = alignment.rigid_field(matrix, (0, 0), (256, 256))[0]
    assert float((field - true)[:, 32:-32, 32:-32].norm(dim=0).max()) < 1.5
    assert torch.equal(prealigned(monkeypatch, sections[0], sections[1]), field)  # pair_field's own, by 2 here
    assert torch.allclose(alignment.rigid_field(matrix, (48, 16), (100, 64))[0], field[:, 16:116, 48:112], atol=1e-4)
    halves = [alignment.thumbnail(sections[0][:, x:x + 128], 2) for x in (0, 128)]
    assert np.array_equal(np.concatenate(halves, 2), alignment.thumbnail(sections[0], 2))


def test_the_run_record_holds_pieces_only_with_defects(tmp_path):
    """``--pieces`` changes the result only where defect maps are given: a DEST made without them resumes as before."""
    (tmp_path / "a.pt").write_bytes(b"net")
    common = MINIMAL[2:] + ["--archive", str(tmp_path / "a.pt"), "--overlap", "96"]
    runs = (([], None), ([], "file:///m"), (["--pieces", "0"], "file:///m"))
    records = [align.run_record(args, align.job_of(args, "file:///s", (0, 0, 64, 32), defects))
               for args, defects in ((align.parse_args(common + more), layer) for more, layer in runs)]
    assert "pieces" not in records[0] and records[1]["pieces"] == 12 and records[2]["pieces"] == 0


def test_a_pieces_field_is_read_on_its_grid_and_its_parts_are_the_wholes_parts():
    """``rigid_field`` of a field on a grid of 4 px (``piece_factor``): grid pixel q covers section pixels 4q..4q+3, so
    a field that is its grid's x coordinate reads ``(p + 0.5) / 4 - 0.5`` at section pixel p (inside), a constant
    field reads that constant, and the field over a part of the section is the whole's part."""
    grid = torch.arange(16.0).expand(16, 16)
    match = torch.stack([grid, torch.full((16, 16), 3.0)]).numpy()
    field = alignment.rigid_field(match, (0, 0), (64, 64), 4)[0]
    inside = slice(2, 62)
    assert torch.allclose(field[0, :, inside], ((torch.arange(64.0) + 0.5) / 4 - 0.5)[inside].expand(64, 60))
    assert (field[1] == 3).all()
    assert torch.allclose(alignment.rigid_field(match, (20, 8), (24, 40), 4)[0], field[:, 8:32, 20:60])
    assert alignment.piece_factor((512, 512)) == 4 and alignment.piece_factor((8192, 6000)) == 2 * 23


def test_without_defects_the_pre_alignment_is_the_rigid_match(monkeypatch):
    """``pair_prealignment`` is ``prealignment``'s matrix, bit for bit, where no defect map marks a defect or with
    ``pieces`` 0 (nothing runs the network for it)."""
    sections, _ = turned_phantom(256, (13.0, -9.0), 0.01)
    stats = tuple(alignment.section_stats(alignment.tissue_moments(s)) for s in sections[:2])
    plain = [alignment.thumbnail(s, 1) for s in sections[:2]]
    band = np.pad(np.ones((256, 8), np.uint8), ((0, 0), (124, 124)))  # a crack down the middle
    marked = [alignment.thumbnail(s, 1, band) for s in sections[:2]]
    matrix, _ = alignment.prealignment(*plain, stats, 32, 1)
    monkeypatch.setattr(alignment, "_placed_r", None)  # the network is not run
    assert np.array_equal(alignment.pair_prealignment(None, *plain, stats, PairSettings(), 1)[0], matrix)
    assert np.array_equal(alignment.pair_prealignment(None, *marked, stats, PairSettings(pieces=0), 1)[0],
                          matrix)


def test_neighbours_within_the_shifts_reach_keep_exactly_todays_whole_pixel_shift(monkeypatch):
    """Moved by (13, -9) px and turned 0.01 rad: the wide search finds the turn, but the network recovers what the
    shift leaves, so the field is the whole-pixel shift as before it (normal stacks align bit-identically)."""
    sections, (shift, _) = turned_phantom(256, (13.0, -9.0), 0.01)
    field = prealigned(monkeypatch, sections[0], sections[1])
    source, target = (helpers.normalise(helpers.to_tensor(x))[0] for x in sections[:2])
    expected = torch.from_numpy(shifts.best_shifts(source[None], target[None], 32, 2)[0].round())
    assert torch.equal(field, expected.view(2, 1, 1).expand(2, 256, 256)) and np.allclose(expected, shift, atol=1)


def is_shift(field: torch.Tensor, shift) -> bool:
    """Whether ``field`` ``[2, H, W]`` (px) is one whole-pixel shift within 1 px of ``shift`` (x, y)."""
    return torch.equal(field, field[:, :1, :1].expand_as(field)) and np.allclose(field[:, 0, 0], shift, atol=1.0)


def counted_searches(monkeypatch, lead: float | None = None) -> list:
    """A list that grows by one at each ``shifts.rigid_search`` that ``alignment`` runs; with ``lead``, every
    match found gets that lead (``shifts.RigidMatch``: below ``shifts.MIN_LEAD``, a match that stands out little)."""
    calls, search = [], alignment.rigid_search

    def counted(*args, **kwargs):
        calls.append(1)
        match = search(*args, **kwargs)
        return match if lead is None else dataclasses.replace(match, lead=torch.full_like(match.lead, lead))

    monkeypatch.setattr(alignment, "rigid_search", counted)
    return calls


def test_the_wide_search_runs_only_where_the_shift_is_in_doubt(monkeypatch):
    """Not on neighbours the shift matches well within its reach; on a pair beyond its reach, or turned by more than
    the network recovers (0.05 rad on 512 px sections: ~10 px at the median pixel)."""
    calls = counted_searches(monkeypatch)
    near, (shift, _) = turned_phantom(256, (13.0, -9.0), 0.01)
    assert is_shift(prealigned(monkeypatch, near[0], near[1]), shift) and calls == []
    far, _ = turned_phantom(256, (40.0, -36.0), 0.03)
    assert prealigned(monkeypatch, far[0], far[1]).abs().max() > 40 and calls == [1]
    turned, _ = turned_phantom(512, (5.0, 3.0), 0.05)
    prealigned(monkeypatch, turned[0], turned[1])
    assert calls == [1, 1]


def test_a_neighbour_that_the_shift_matches_does_not_warn_where_no_wide_match_stands_out(monkeypatch):
    """As between true neighbours of ISBI 2012, whose coarse maps peak little (leads 0.01-0.03, r after the shift
    0.19-0.25): the wide search is run (forced here) and stands out little, but the shift matches as neighbours do."""
    calls = counted_searches(monkeypatch, lead=0.01)
    monkeypatch.setattr(alignment, "DOUBT_DEPARTURE", -1.0)
    sections, _ = turned_phantom(200, (13.0, -9.0), 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", alignment.PoorMatchWarning)
        field = prealigned(monkeypatch, sections[0], sections[1])
    assert calls == [1] and is_shift(field, (-13.0, 9.0))
    with pytest.warns(alignment.PoorMatchWarning, match="^warning: no whole-section match stands out"):
        prealigned(monkeypatch, sections[0], sections[3])  # a section of another phantom


def test_a_foreign_or_mostly_blank_target_warns_in_one_line_and_keeps_todays_shift(monkeypatch):
    sections, _ = turned_phantom(200, (13.0, -9.0), 0.0)
    with pytest.warns(alignment.PoorMatchWarning, match="^warning: no whole-section match stands out") as caught:
        field = prealigned(monkeypatch, sections[0], sections[3])  # a section of another phantom
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert field.abs().max() <= 32 and torch.equal(field, field[:, :1, :1].expand_as(field))  # a shift at most
    mostly_blank = sections[1].copy()
    mostly_blank[:160] = 0  # missing data
    with pytest.warns(alignment.PoorMatchWarning, match="tissue on only 20 % of its area"):
        assert torch.equal(prealigned(monkeypatch, sections[0], mostly_blank), torch.zeros(2, 200, 200))


def test_poor_matches_and_all_defect_sections_are_reported_in_one_line_per_kind_however_many(capsys):
    with pytest.warns(UserWarning, match="something else") as others, alignment.warnings_condensed():
        for lead in (0.01, 0.02, 0.03):
            warnings.warn(f"warning: poor {lead}", alignment.PoorMatchWarning)
        warnings.warn("something else")  # shown as ever
    assert capsys.readouterr().err == "warning: poor 0.01 [3 section pairs matched poorly]\n" and len(others) == 1
    with alignment.warnings_condensed():
        pass
    assert capsys.readouterr().err == ""
    with alignment.warnings_condensed():  # one line per kind
        warnings.warn("warning: poor", alignment.PoorMatchWarning)
        alignment.warn_all_defect(7)  # which sections warn: test_align_defects, serial and solve
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "warning: poor [1 section pair matched poorly]" and len(lines) == 2
    assert lines[1].startswith("warning: --defects marks every pixel of section 7 ")
    assert lines[1].endswith("[1 section all defect: 7]")


def test_condensed_warnings_name_the_sections_they_are_about(capsys):
    with alignment.warnings_condensed():
        with alignment.naming(5, 4):
            warnings.warn("warning: poor", alignment.PoorMatchWarning)
        with alignment.naming(6):  # aligned onto the sections before it (serial)
            warnings.warn("warning: poorer", alignment.PoorMatchWarning)
            warnings.warn("warning: poorer", alignment.PoorMatchWarning)  # a repeat (another target of its vote)
        warnings.warn("warning: poorest", alignment.PoorMatchWarning)  # not named
    assert capsys.readouterr().err == "warning: poor [3 section pairs matched poorly: 5->4 6]\n"
    with alignment.warnings_condensed():
        for z in range(20):
            alignment.warn_all_defect(z)
    assert capsys.readouterr().err.endswith("[20 sections all defect: 0 1 2 3 4 5 6 7 8 9 10 11 ...]\n")


def noisy_stack(noise=(2,), count: int = 5, inverted=()) -> np.ndarray:
    """uint8 ``[count, 96, 96]``: windows of one texture moved by up to 1 px, the sections ``noise`` replaced by
    noise (they match nowhere) and those ``inverted`` by their inverse (256 - grey level)."""
    stack = moved_windows([(z % 3 - 1, 2 * z % 3 - 1) for z in range(count)], size=96)
    rng = np.random.default_rng(1)
    for z in noise:
        stack[z] = rng.integers(1, 256, stack[z].shape, dtype=np.uint8)
    for z in inverted:
        stack[z] = 256 - stack[z].astype(int)
    return stack


def test_a_section_of_inverted_contrast_is_matched_on_its_inverse(capsys):
    """Section 2 inverted: each pair with it matches only with the source inverted (``pair_prealignment``), and
    is aligned so, serially and in the solve: nothing passed over, one line names the pairs."""
    stack, model = noisy_stack(noise=(), inverted=(2,)), alignment.for_inference(random_net())
    stats = [alignment.section_stats(alignment.tissue_moments(section)) for section in stack]
    thumbnails = [alignment.thumbnail(section, 1) for section in stack]
    for s, t, expected in ((1, 0, False), (2, 1, True), (1, 2, True), (3, 2, True), (4, 3, False)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", alignment.InvertedWarning)
            _, inverted = alignment.pair_prealignment(model, thumbnails[s], thumbnails[t], (stats[s], stats[t]),
                                                      PairSettings(), 1)
        assert inverted == expected
    with alignment.warnings_condensed():
        out = list(alignment.align_serial(model, stack, first=10))
    assert all(kept for *_, kept in out) and not torch.equal(out[2][1], out[1][1])
    assert capsys.readouterr().err.strip().endswith("[2 section pairs matched inverted: 12 13]")
    with alignment.warnings_condensed(io.StringIO()):
        pairs, _, _, passed = alignment.solved_pairs(model, stack, 1)
    assert passed == set() and len(pairs) == 8


def test_matching_notes_whether_each_prealigned_pair_matches_nowhere():
    stack, model = noisy_stack(), alignment.for_inference(random_net())
    for source, target, settings, expected in ((1, 0, PairSettings(), [False]), (2, 1, PairSettings(), [True]),
                                               (3, 2, PairSettings(), [True]), (2, 1, PairSettings(prealign=0), [])):
        with warnings.catch_warnings(), alignment.matching() as poor:
            warnings.simplefilter("ignore", alignment.PoorMatchWarning)
            alignment.pair_field(model, stack[source], stack[target], settings)
        assert poor == expected
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # it says nothing
            assert alignment.matches_nowhere(model, stack[source], stack[target], settings) == any(expected)


def test_serial_alignment_passes_over_a_section_that_matches_nowhere(monkeypatch, capsys):
    """A section of noise: it is moved as the section before it (that section's field), the next is pulled onto the
    section before it, and one line names it; with ``--vote`` the vote outvotes it instead."""
    stack, model, targets = noisy_stack(), alignment.for_inference(random_net()), []
    pair_field = alignment.pair_field
    monkeypatch.setattr(alignment, "pair_field", lambda m, source, target, *a: targets.append(target) or
                        pair_field(m, source, target, *a))
    with alignment.warnings_condensed():
        out = list(alignment.align_serial(model, stack, first=10))
    assert [kept for *_, kept in out] == [True, True, False, True, True]
    assert torch.equal(out[2][1], out[1][1]) and np.array_equal(targets[2], out[1][0])  # 13 onto 11
    assert capsys.readouterr().err.strip().endswith("[1 section passed over: 12]")
    with alignment.warnings_condensed():
        assert all(kept for *_, kept in alignment.align_serial(model, stack, vote=2))
    assert "passed over" not in capsys.readouterr().err


def test_serial_alignment_passes_over_at_most_pass_over_sections_in_a_row():
    """Three sections of noise after the first: the first two are passed over, the third is aligned to (after two,
    the tissue is taken to have changed); all three are moved as the first. The next two do not match the third,
    and are passed over in turn; the one after them is aligned to, and the last is aligned onto it."""
    stack, model = noisy_stack(noise=(1, 2, 3), count=8), alignment.for_inference(random_net())
    with alignment.warnings_condensed(io.StringIO()):
        out = list(alignment.align_serial(model, stack))
    assert alignment.PASS_OVER == 2 and [kept for *_, kept in out] == [True, False, False, True, False, False, True,
                                                                       True]
    assert all(out[z][1].abs().max() == 0 for z in range(7)) and out[7][1].abs().max() > 0


def test_the_solve_pairs_past_a_section_that_matches_neither_neighbour(capsys):
    """A section of noise is left out of the pairs (its neighbours paired with each other) and moved as the section
    before it; one at an end of the stack is not (its one neighbour cannot tell which of the two is foreign)."""
    stack, model = noisy_stack(), alignment.for_inference(random_net())
    with alignment.warnings_condensed(io.StringIO()):
        pairs, _, _, passed = alignment.solved_pairs(model, stack, 1)
    with alignment.warnings_condensed():
        _, fields, _ = alignment.align_solved(model, stack)
    assert passed == {2} and pairs == [(0, 1), (1, 0), (1, 3), (3, 1), (3, 4), (4, 3)]
    assert torch.equal(fields[2], fields[1]) and fields[3].abs().max() > 0
    assert capsys.readouterr().err.strip().endswith("[1 section passed over: 2]")
    with alignment.warnings_condensed(io.StringIO()):
        assert alignment.solved_pairs(model, noisy_stack(noise=(4,)), 1)[3] == set()


def test_serial_and_solved_alignment_name_the_pair_onto_a_foreign_section_in_their_warning(capsys):
    """A stack whose first section is of another phantom: each mode's poor-match line names the pair aligned onto
    it (by z in serial mode, from ``first``; as source->target in the solve). The network's field still matches it
    (``alignment.MATCHED_R``): not passed over."""
    sections, _ = turned_phantom(200, (0.0, 0.0), 0.0)
    stack = np.stack([sections[3], sections[1], sections[1]])  # section 0 is foreign
    model = alignment.for_inference(Pyramid(size=3))
    with alignment.warnings_condensed():
        list(alignment.align_serial(model, stack, first=10))
    assert capsys.readouterr().err.strip().endswith("[1 section pair matched poorly: 11]")
    with alignment.warnings_condensed():
        alignment.align_solved(model, stack, solve=SolveSettings(neighbours=1))
    assert capsys.readouterr().err.strip().endswith("[1 section pair matched poorly: 1->0]")


def test_smooth_removes_pixel_detail_and_keeps_a_smooth_field(monkeypatch):
    shift = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1)
    checker = 3.0 * (-1.0) ** torch.arange(64).view(1, 1, 64, 1)  # +-3 px, alternating by row

    def network(model, source, target, trunc):
        return shift.expand_as(checker.expand(1, 2, 64, 64)) + checker

    monkeypatch.setattr(alignment, "chunk_field", network)
    model = random_net()
    a, b = sections(2, 64)
    raw = alignment.pair_field(model, a, b, PairSettings(chunk=64, overlap=0, prealign=0, smooth=0))
    smoothed = alignment.pair_field(model, a, b, PairSettings(chunk=64, overlap=0, smooth=3, prealign=0))
    assert (raw - shift[0]).abs().max() == pytest.approx(3.0)
    assert (smoothed - shift[0])[:, 8:-8].abs().max() < 0.1  # the box is clipped at the edges


def test_refine_runs_the_network_again_on_the_source_moved_by_the_first_fields_smooth_part(monkeypatch):
    """First pass: a shift of (2, -1) px plus +-3 px of row-by-row detail; the second pass, on the source moved by the
    first's low-passed field, finds the (0.5, 0.25) px left: the result is their composition, without that detail."""
    shift = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1)
    first = shift + 3.0 * (-1.0) ** torch.arange(64).view(1, 1, 64, 1)
    seen = []

    def network(model, source, target, trunc):
        seen.append(source)
        return first.expand(1, 2, 64, 64) if len(seen) == 1 else torch.tensor([0.5, 0.25]).view(1, 2, 1, 1)

    monkeypatch.setattr(alignment, "chunk_field", network)
    a, b = sections(2, 64)
    field = alignment.pair_field(random_net(), a, b, PairSettings(chunk=64, overlap=0, prealign=0, refine=3))
    assert len(seen) == 2
    assert (field - torch.tensor([2.5, -0.75]).view(2, 1, 1))[:, 8:-8, 8:-8].abs().max() < 0.1
    smooth, raw = (helpers.warp(seen[0], f.expand(1, 2, 64, 64)) for f in (shift, first))
    assert (seen[1] - smooth)[..., 8:-8, 8:-8].abs().max() < 0.1 < (seen[1] - raw)[..., 8:-8, 8:-8].abs().max()
    seen.clear()
    alignment.pair_field(random_net(), a, b, PairSettings(chunk=64, overlap=0, prealign=0))
    assert len(seen) == 1  # refine 0: one pass


def test_chunks_get_the_networks_reach_as_context_by_default():
    net = random_net()
    assert net.reach() == 30 and alignment.with_context(PairSettings(), net).overlap == 32  # up to its stride, 4
    assert alignment.with_context(PairSettings(overlap=8), net).overlap == 8
    a, b = sections(2)
    whole = alignment.pair_field(net, a, b, PairSettings(chunk=1024, smooth=0))
    chunked, short = (alignment.pair_field(net, a, b, PairSettings(chunk=32, overlap=overlap, smooth=0))
                      for overlap in (None, 8))
    assert (whole - chunked).abs().max() < 1e-3 and (whole - short).abs().max() > 0.02


def test_a_dark_speck_in_every_section_weighs_in_the_solve_as_tissue():
    """Three sections 3 px apart in x, a zero pixel (dark tissue, not missing data) at the same place in each: the
    solved field there is the tissue's around it, not the pull's zero (a spike that folds the map over)."""
    stack = np.full((3, 24, 24), 120, np.uint8)
    stack[:, 12, 12] = 0
    pairs = [(0, 1), (1, 0), (1, 2), (2, 1)]
    fields = torch.stack([torch.tensor([3.0 * (t - s), 0.0]).view(2, 1, 1).expand(2, 24, 24) for s, t in pairs])
    solved = alignment.solve_fields(stack, pairs, fields, SolveSettings(robust=0), 0)
    assert solved[0, 0, 12, 11] > 2.5 and torch.allclose(solved[:, :, 12, 12], solved[:, :, 12, 11])


def test_with_smooth_the_pair_weights_are_the_share_of_tissue_the_coarse_field_saw():
    """A 10 px hole of missing data at the same place in three sections 3 px apart: with ``smooth`` 8 the hole
    weighs the tissue around it, so the field runs on through it (per-pixel weights left it the pull's zero: a
    jump that folds the map over)."""
    stack = np.full((3, 40, 40), 120, np.uint8)
    stack[:, 15:25, 15:25] = 0
    pairs = [(0, 1), (1, 0), (1, 2), (2, 1)]
    fields = torch.stack([torch.tensor([3.0 * (t - s), 0.0]).view(2, 1, 1).expand(2, 40, 40) for s, t in pairs])
    solved = alignment.solve_fields(stack, pairs, fields, SolveSettings(robust=0), 8)
    assert solved[0, 0, 5, 5] > 2.5 and torch.allclose(solved[:, :, 20, 20], solved[:, :, 5, 5], atol=0.05)
    assert helpers.jacobian_determinant(solved).min() > 0


def test_the_network_s_bias_is_half_the_loop_of_a_pair_s_two_fields_and_serial_alignment_takes_it_off(monkeypatch):
    """A network whose every field is a constant c: each pair's loop is 2c, so the bias is c (none under MIN_BIAS),
    from 3 pairs spread over the stack, or 9 (the 3 among them) where the 3 show half of MIN_BIAS or more (pairs
    with a blank section or that match nowhere left out); serial alignment with it taken off moves no section, onto
    aligned or raw neighbours."""
    stack, model = noisy_stack(noise=(), count=19), alignment.for_inference(random_net())
    stack[9] = 0  # blank: the pair (9, 8) is left out
    read = []

    def constant(c):
        def field(model, source, target, *args, **kwargs):
            return torch.tensor(c, dtype=torch.float32).view(2, 1, 1).expand(2, *source.shape).clone()
        return field

    def section(i):
        read.append(i)
        return stack[i]
    assert alignment.BIAS_PAIRS == (3, 9) and alignment.MIN_BIAS == 0.25
    monkeypatch.setattr(alignment, "pair_field", constant((0.05, -0.1)))
    assert alignment.network_bias(model, section, 19).tolist() == [0, 0]  # under MIN_BIAS / 2: 3 pairs read
    assert sorted(read) == [2, 3, 8, 9, 14, 15]  # the pairs (3, 2), (9, 8), (15, 14), read only there
    monkeypatch.setattr(alignment, "pair_field", constant((0.3, -0.4)))
    read.clear()
    assert alignment.network_bias(model, section, 19).tolist() == pytest.approx([0.3, -0.4])
    assert sorted(read) == list(range(18))  # 9 pairs: (1, 0), (3, 2) .. (17, 16), each read once
    assert alignment.network_bias(model, stack.__getitem__, 1).tolist() == [0, 0]  # no pair
    monkeypatch.setattr(alignment, "pair_field", constant((0.1, -0.2)))
    assert alignment.network_bias(model, stack.__getitem__, 19).tolist() == [0, 0]  # 9 pairs, under MIN_BIAS

    def noise_at_5(model, source, target, *args, **kwargs):  # the pairs of section 5 match nowhere: their loop 20 px
        noise = any(np.shares_memory(s, stack[5]) for s in (source, target))
        alignment.UNMATCHED.get().append(noise)
        return constant((10.0, 10.0) if noise else (0.3, -0.4))(model, source, target)
    monkeypatch.setattr(alignment, "pair_field", noise_at_5)
    assert alignment.network_bias(model, stack.__getitem__, 19).tolist() == pytest.approx([0.3, -0.4])  # left out
    monkeypatch.setattr(alignment, "pair_field", constant((0.3, -0.4)))
    for raw in (False, True):
        fields = [f for _, f, _ in alignment.align_serial(model, stack[4:], to_raw_neighbour=raw, bias=(0.3, -0.4))]
        assert max(float(f.abs().max()) for f in fields) < 1e-6
