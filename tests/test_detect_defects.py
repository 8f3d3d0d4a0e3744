"""detect_defects.py: the shipped detector finds misalign.py's cracks and folds; the command writes the defect layer
chunk by chunk, in the source's frame, and refuses bad input in one line."""
import numpy as np
import pytest
import torch

import detect_defects
import misalign
import phantom
import volume
from bench.detect_quality import match_counts, scores
from helpers import UserError, run_main


@pytest.fixture(scope="module")
def net():
    return detect_defects.load_detector()


@pytest.fixture(scope="module")
def damaged_section():
    """``(image, defects)`` ``[1, 1, 192, 192]`` uint8: a phantom section torn by a crack and then folded, by
    misalign.py's own steps."""
    section = torch.from_numpy(phantom.make_phantom((1, 192, 192), seed=11))[:, None]
    defects, field = torch.zeros_like(section), torch.zeros(1, 2, 192, 192)
    one = torch.tensor([True])
    triple = misalign.add_cracks(section, defects, field, generator=3, which=one)
    image, defects, _ = misalign.add_folds(*triple, generator=4, which=one)
    assert (defects == misalign.CRACK).sum() > 300 and (defects == misalign.FOLD).sum() > 150
    return image, defects


@pytest.mark.parametrize("kind", [misalign.CRACK, misalign.FOLD])
def test_the_detector_finds_a_crack_and_a_fold(net, damaged_section, kind):
    image, defects = damaged_section
    found = detect_defects.detect(net, image)
    assert found.shape == image.shape and found.dtype == torch.uint8
    s = scores(match_counts(found.numpy(), defects.numpy(), kind, 3))
    assert s["precision_tol"] > 0.7 and s["recall_tol"] > 0.7, s
    assert s["precision"] > 0.5 and s["recall"] > 0.5, s


def test_scores_fail_an_all_zero_and_an_all_one_detector(damaged_section):
    _, defects = damaged_section
    for kind in (misalign.CRACK, misalign.FOLD):
        nothing = scores(match_counts(np.zeros_like(defects.numpy()), defects.numpy(), kind, 3))
        everything = scores(match_counts(np.full_like(defects.numpy(), kind), defects.numpy(), kind, 3))
        assert nothing["recall_tol"] == 0 and everything["precision_tol"] < 0.5


def test_missing_data_is_never_a_defect(net, damaged_section):
    image, _ = damaged_section
    blanked = image.clone()
    blanked[..., :, :96] = 0
    assert (detect_defects.detect(net, blanked)[..., :, :96] == 0).all()


def test_the_command_writes_the_layer_chunk_by_chunk_in_the_source_frame(tiny_volume, tmp_path, net, capsys):
    paths, arrays = tiny_volume
    dest = tmp_path / "found"
    out = detect_defects.main(["--source", paths["image"], "--dest", str(dest), "--chunk", "32",
                               "--z_start", "3", "--z_stop", "5"])
    layer, source = volume.open_volume(str(dest)), volume.open_volume(paths["image"])
    assert layer.num_channels == 1 and layer.dtype == "uint8"
    for mip in (0, 1):
        assert [tuple(b) for b in volume.bounds(layer, mip)] == [tuple(b) for b in volume.bounds(source, mip)]
    whole = detect_defects.detect(net, torch.from_numpy(arrays["image"][3:5])).numpy()
    assert np.array_equal(volume.read(layer, (0, 0, 3), (64, 64, 2)), whole)  # the chunks change nothing
    layer.mip = 1
    assert np.array_equal(volume.read(layer, (0, 0, 3), (32, 32, 2)), volume.downsample(whole, "labels"))
    assert out["coarsest_mip"] == 1
    assert whole[:, :, :, :25].any() and whole[:, :, :, 25:].any()  # defects on both sides of the first 25 px
    detect_defects.main(["--source", paths["image"], "--dest", str(tmp_path / "odd"), "--chunk", "25",
                         "--z_start", "3", "--z_stop", "5"])  # every corner but the first off mip 1's grid
    assert "warning: --chunk 25 against the detector's reach of 64 px: each section is read 9 times over" in \
        capsys.readouterr().err  # nine 25 px chunks of a 64 px square, each read with 64 px around it
    odd = volume.open_volume(str(tmp_path / "odd"))
    assert np.array_equal(volume.read(odd, (0, 0, 3), (64, 64, 2)), whole)
    assert np.array_equal(volume.read(odd, (0, 0, 3), (32, 32, 2), mip=1), volume.downsample(whole, "labels"))


def run_cli(argv, capsys):
    """``(exit code, stderr lines)`` of detect_defects.py's main run as the script runs it."""
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: detect_defects.main(argv))
    return exit_.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("case, message", [
    ("missing", "no volume at"), ("field", "is not an image"), ("unwritable", "cannot write there"),
    ("other_shape", "exists with another shape"), ("source", "is the source: refusing to overwrite it"),
    ("not_ours", "a layer that detect_defects.py did not write: refusing"),
    ("folder_of_layers", "is a folder of other files, not a layer"),  # it wrote a layer there, beside them
    ("defect_layer", "section 3 at (0, 0, 64, 64), holds only the values 0 (none), 1 (crack) and 2 (fold): a defect "
                     "layer, not images"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_volume, tmp_path, capsys, case, message):
    paths, arrays = tiny_volume
    (tmp_path / "a_file").write_text("")
    other = volume.create_volume("file://" + str(tmp_path / "other"), (32, 32, 12), "uint8")
    source = {"missing": str(tmp_path / "nothing"), "field": paths["field"],
              "defect_layer": paths["defects"]}.get(case, paths["image"])
    dest = {"unwritable": tmp_path / "a_file" / "defects", "other_shape": other.cloudpath.removeprefix("file://"),
            "source": paths["image"], "not_ours": paths["defects"],  # the source's shape, of another tool
            "folder_of_layers": tmp_path / "vol"}  # the folder of the volume's layers
    code, err = run_cli(["--source", source, "--dest", str(dest.get(case, tmp_path / "d"))], capsys)
    assert code == 2 and message in err[-1] and not any("Traceback" in line for line in err), err
    if case != "defect_layer":  # that one is told by what the sections hold: below a progress bar, in a new layer
        assert len(err) == 1 and not (tmp_path / "d").exists()
    for name in ("image", "defects"):  # nothing written over
        assert np.array_equal(volume.read(volume.open_volume(paths[name]), (0, 0, 0), (64, 64, 12)), arrays[name])


def test_a_second_run_writes_into_its_own_layer(tiny_volume, tmp_path, net):
    paths, _ = tiny_volume
    for z in (3, 4):
        detect_defects.main(["--source", paths["image"], "--dest", str(tmp_path / "found"), "--z_start", str(z),
                             "--z_stop", str(z + 1)])
    runs = volume.open_volume(str(tmp_path / "found")).provenance.processing
    assert len(runs) == 2 and all(run["description"] == detect_defects.DETECTED_BY for run in runs)


def test_the_benchmark_refuses_a_tolerance_that_is_not_a_reach(capsys):
    from bench import detect_quality

    with pytest.raises(UserError, match="--tolerance -1: a reach in px"):
        detect_quality.main(["--tolerance", "-1"])
    with pytest.raises(SystemExit):
        detect_quality.main(["--tolerance", "nan"])
    assert "is not a number" in capsys.readouterr().err


def test_a_stopped_run_run_again_detects_only_the_sections_it_had_not_finished(tiny_volume, tmp_path, monkeypatch,
                                                                             capsys):
    paths, _ = tiny_volume
    argv = ["--source", paths["image"], "--chunk", "32", "--z_start", "3", "--z_stop", "6"]  # 4 chunks a section
    whole = detect_defects.main(argv + ["--dest", str(tmp_path / "whole")])
    calls, real, dies = [], detect_defects.detect_chunk, [True]

    def stopping(net, source, z, box):  # the first run dies in the middle of section 4
        calls.append(z)
        if len(calls) == 6 and dies and dies.pop():
            raise MemoryError
        return real(net, source, z, box)

    monkeypatch.setattr(detect_defects, "detect_chunk", stopping)
    with pytest.raises(MemoryError):
        detect_defects.main(argv + ["--dest", str(tmp_path / "found")])
    calls.clear()
    again = detect_defects.main(argv + ["--dest", str(tmp_path / "found")])
    assert calls == [4] * 4 + [5] * 4 and "resuming: 1 of 3 sections" in capsys.readouterr().out
    assert again == whole  # the counts of the sections the first run finished are kept
    layers = [volume.open_volume(str(tmp_path / name)) for name in ("whole", "found")]
    assert np.array_equal(*(volume.read(layer, (0, 0, 3), (64, 64, 3)) for layer in layers))
    calls.clear()
    detect_defects.main(argv + ["--dest", str(tmp_path / "found"), "--bbox", "0", "0", "32", "64"])
    assert calls == [3, 3, 4, 4, 5, 5]  # other settings: every section again
    calls.clear()
    source = volume.open_volume(paths["image"])
    volume.write(source, 255 - volume.read(source, (0, 0, 3), (64, 64, 1)), (0, 0, 3))  # re-imported in place
    detect_defects.main(argv + ["--dest", str(tmp_path / "found"), "--bbox", "0", "0", "32", "64"])
    assert calls == [3, 3, 4, 4, 5, 5]  # a source rewritten since: every section again, not the old labels kept
