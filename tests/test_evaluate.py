"""evaluate.py on hand-built cases with known answers."""
import numpy as np
import pytest
import torch

import alignment
import evaluate
import volume
from conftest import moved_windows, run_script
from helpers import UserError, warp


def test_cpc_of_identical_and_inverted_sections():
    rng = np.random.default_rng(0)
    a = rng.integers(1, 255, size=(64, 64)).astype(np.uint8)
    stack = np.stack([a, a, 255 - a])
    r = evaluate.cpc(stack, chunk=16)
    assert len(r) == 2 * 16
    assert np.allclose(np.sort(r)[:16], -1) and np.allclose(np.sort(r)[16:], 1)


def test_cpc_drops_chunks_with_missing_data_but_not_for_a_dark_speck():
    rng = np.random.default_rng(1)
    stack = rng.integers(1, 255, size=(2, 32, 32)).astype(np.uint8)
    stack[0, 20, 5], stack[1, 8, 24:26] = 0, 0  # dark specks of tissue: every chunk pair is kept
    assert len(evaluate.cpc(stack, chunk=16)) == 4
    stack[1, 3:8, 2:7] = 0  # a 5 px square of missing data removes the top-left chunk pair
    assert len(evaluate.cpc(stack, chunk=16)) == 3


def test_pair_cpc_is_each_neighbour_pairs_mean_and_nan_where_no_square_counts():
    rng = np.random.default_rng(0)
    a = rng.integers(1, 255, size=(64, 64)).astype(np.uint8)
    stack = np.stack([a, a, 255 - a, np.zeros_like(a)])  # the last section: missing data
    r = evaluate.pair_cpc(stack, chunk=16)
    assert r.shape == (3,) and r[0] == pytest.approx(1) and r[1] == pytest.approx(-1) and np.isnan(r[2])


def test_where_to_look_names_the_least_correlated_pairs_those_worse_than_raw_and_the_folded_sections():
    aligned, raw = np.array([0.9, 0.2, np.nan, 0.5, 0.8]), np.array([0.3, 0.35, np.nan, 0.1, 0.795])
    folds = np.array([0, 0, 0.004, 0, 0.0005, 0])
    lines = evaluate.where_to_look(aligned, raw, folds, list(range(10, 16)))
    assert lines[0] == "neighbours that correlate least (CPC aligned, raw): 11|12 0.200 (0.350), 13|14 0.500 " \
                       "(0.100), 14|15 0.800 (0.795)"
    assert lines[1].startswith("warning: 1 neighbour pair(s) correlate less aligned than raw: 11|12 (0.200 vs 0.350)")
    assert lines[2].startswith("sections whose field folds over on more than 0.1% of their pixels: 12 (0.40%)")
    assert len(lines) == 3
    assert evaluate.where_to_look(aligned, None, np.zeros(6), [0, 1, 2, 3, 6, 7]) == \
        ["neighbours that correlate least (CPC aligned): 1|2 0.200, 3|6 0.500, 6|7 0.800"]  # a gap: 4..5


def test_summarize():
    s = evaluate.summarize(np.arange(101, dtype=float))
    assert s["mean"] == 50 and s["p5"] == 5 and s["p99"] == 99 and s["var"] == pytest.approx(850)


def test_epe_split_far_near_inside():
    truth = torch.zeros(1, 2, 40, 40)
    defects = torch.zeros(1, 40, 40)
    defects[0, :, 20] = 1  # a vertical defect in column 20
    field = torch.zeros(1, 2, 40, 40)
    field[0, 0] = 1.0                    # 1 px off everywhere ...
    field[0, 0, :, 10:31] = 3.0          # ... 3 px within 10 px of the defect ...
    field[0, 0, :, 20] = 5.0             # ... 5 px on it
    out = evaluate.epe(field, truth, defects, near=10.5)
    assert out["far_median"] == 1 and out["near_median"] == 3 and out["inside_median"] == 5


def test_foldovers_and_drift():
    field = torch.zeros(1, 2, 10, 10)
    assert evaluate.foldovers(field) == 0
    field[0, 0, :, 5:] = -3.0  # columns 5.. read from 3 px to their left: the map goes backwards once
    assert evaluate.foldovers(field) == pytest.approx(9 / 81)
    offset = torch.zeros(2, 2, 10, 10)
    offset[:, 0], offset[1, 1] = 3.0, 4.0
    d = evaluate.drift(offset, torch.zeros_like(offset))
    assert d["drift_mean"] == pytest.approx((3 + 5) / 2) and d["drift_max"] == pytest.approx(5)


def test_foldovers_spurious_counts_only_folds_away_from_the_truths():
    field = torch.zeros(2, 2, 20, 20)
    field[1, 0, :, 10:] = -3.0  # section 1 folds between columns 9 and 10: 19 of its 19 x 19 determinants
    truth = torch.zeros_like(field)
    assert evaluate.foldovers(field) == evaluate.foldovers_spurious(field, truth) == pytest.approx(19 / (2 * 19 * 19))
    truth[1, 0, :, 14:] = -3.0  # the true field of section 1 folds 4 px away (columns 13-14): not spurious
    assert evaluate.foldovers_spurious(field, truth) == 0
    truth[1], truth[0] = 0, field[1]  # the truth folds there, but in the other section: spurious
    assert evaluate.foldovers_spurious(field, truth) == pytest.approx(19 / (2 * 19 * 19))
    truth[0], truth[1, 0, :, 16:] = 0, -3.0  # 6 px away: beyond the margin
    assert evaluate.foldovers_spurious(field, truth) == pytest.approx(19 / (2 * 19 * 19))


def test_common_frame_removes_an_error_shared_by_every_section():
    truth = torch.randn(3, 2, 8, 8)
    shared = torch.zeros(1, 2, 8, 8)
    shared[0, 0] = 2.0                                   # every section 2 px off in x: equally well aligned
    own = torch.zeros(3, 2, 8, 8)
    own[0, 1], own[1, 1], own[2, 1] = 1.0, -1.0, 0.0     # each section's own error (mean zero)
    field = truth + shared + own
    fixed = evaluate.common_frame(field, truth)
    assert torch.allclose(fixed - truth, own, atol=1e-6)
    scored = evaluate.score(np.full((3, 8, 8), 128, np.uint8), field, truth)
    assert scored["far_median"] == pytest.approx(5 ** 0.5) and scored["far_common"] == pytest.approx(1)


def test_near_and_inside_defects_in_a_common_frame():
    truth = torch.zeros(3, 2, 40, 40)
    defects = torch.zeros(3, 40, 40, dtype=torch.uint8)
    defects[1, :, 20] = 1                                # a crack in column 20 of section 1 only
    field = truth.clone()
    field[:, 0] = 2.0                                    # every section 2 px off in x: equally well aligned
    field[1, 1, :, 10:31] = 3.0                          # section 1 also 3 px off in y within 10 px of it ...
    field[1, 1, :, 20] = 6.0                             # ... and 6 px on it
    scored = evaluate.score(np.full((3, 40, 40), 128, np.uint8), field, truth, defects, near=10.5)
    assert scored["near_median"] == pytest.approx(13 ** 0.5) and scored["inside_median"] == pytest.approx(40 ** 0.5)
    # the mean error over the 3 sections is removed: (2, 1) px near, (2, 2) inside; section 1 keeps 2 and 4 px in y
    assert scored["far_common"] == pytest.approx(0, abs=1e-6)
    assert scored["near_common"] == pytest.approx(2) and scored["inside_common"] == pytest.approx(4)
    assert scored["near_excess"] == pytest.approx(2) and scored["inside_excess"] == pytest.approx(4)
    assert "near_common" not in evaluate.score(np.full((3, 40, 40), 128, np.uint8), field, truth)


def test_the_excess_compares_defects_with_their_own_section():
    truth = torch.zeros(3, 2, 40, 40)
    defects = torch.zeros(3, 40, 40, dtype=torch.uint8)
    defects[2, :, 20] = 2                                # a fold in column 20 of section 2 only
    field = truth.clone()
    field[2, 0] = 6.0                                    # section 2 is 6 px off everywhere, beside its fold too
    scored = evaluate.score(np.full((3, 40, 40), 128, np.uint8), field, truth, defects, near=10.5)
    # a common frame: sections 0 and 1 are 2 px off, section 2 is 4 px off, near its fold as far from it
    assert scored["far_common"] == pytest.approx(2) and scored["near_common"] == pytest.approx(4)
    assert scored["near_excess"] == pytest.approx(0) and scored["inside_excess"] == pytest.approx(0)
    section = evaluate.epe(field[2:], truth[2:], defects[2:], near=10.5)  # the excess of one section is its gap
    assert section["near_excess"] == pytest.approx(section["near_median"] - section["far_median"]) == 0


def test_common_frame_counts_only_valid_sections():
    truth = torch.zeros(2, 2, 4, 4)
    field = torch.zeros(2, 2, 4, 4)
    field[1, 0] = 6.0                                    # section 1 is off, but counts nowhere
    valid = torch.zeros(2, 4, 4, dtype=torch.bool)
    valid[0] = True
    assert torch.equal(evaluate.common_frame(field, truth, valid), field)


def test_content_offsets_find_a_shifted_section_and_nothing_in_a_registered_stack():
    stack = moved_windows([(6, -4), (0, 0), (0, 0)], size=96)  # section 0 pulled by (6, -4) shows section 1
    offsets = evaluate.content_offsets(stack, reach=16, factor=1)
    assert offsets.shape == (2, 2)
    assert np.allclose(offsets[0], [6, -4], atol=0.25) and np.allclose(offsets[1], 0, atol=0.01)
    # the helpers convention: the constant field of the offset pulls the first section onto the second
    field = torch.tensor(offsets[0]).view(1, 2, 1, 1).expand(1, 2, 96, 96)
    pulled = warp(torch.from_numpy(stack[:1, None]).float(), field)[0, 0, 8:-8, 8:-8]
    assert torch.allclose(pulled, torch.from_numpy(stack[1, 8:-8, 8:-8]).float(), atol=3)
    assert np.allclose(evaluate.content_offsets(stack, reach=16, factor=2)[0], [6, -4], atol=0.6)


def test_warnings_flag_an_alignment_that_is_hardly_better_than_none_and_one_above_the_oracle():
    rows = {"none": {"far_median": 10.0, "cpc_mean": 0.2}, "oracle (ground truth)": {"far_median": 0, "cpc_mean": 0.5},
            "good": {"far_median": 2.0, "cpc_mean": 0.45}, "collapsed": {"far_median": 8.5, "cpc_mean": 0.25},
            "warper": {"far_median": 3.0, "cpc_mean": 0.6}}
    lines = evaluate.warnings(rows, "none", oracle_cpc=0.5)
    assert len(lines) == 2
    assert lines[0].startswith("warning: collapsed is hardly better than no alignment (EPE far 8.50 vs 10.00 px)")
    assert lines[1].startswith("warning: warper has a CPC above the oracle's (0.600 vs 0.500)")
    # without a ground truth the CPC decides; and 7.9 px of 10 passes (over a fifth removed)
    lines = evaluate.warnings({"none": {"cpc_mean": 0.3}, "same": {"cpc_mean": 0.3}, "better": {"cpc_mean": 0.4}},
                              "none")
    assert len(lines) == 1 and lines[0].startswith("warning: same correlates no better than no alignment")
    rows = {"none": {"far_median": 10.0, "cpc_mean": 0.2}, "ok": {"far_median": 7.9, "cpc_mean": 0.3}}
    assert evaluate.warnings(rows, "none") == []
    nan = float("nan")  # e.g. a 100 px stack with missing data at its edges: no CPC square free of it
    lines = evaluate.warnings({"none": {"cpc_mean": nan}, "aligned": {"far_median": 1.0, "cpc_mean": nan}}, "none",
                              oracle_cpc=nan)
    assert [line.split(" has no CPC")[0] for line in lines] == ["warning: none", "warning: aligned"]


def test_epe_maps_show_a_raw_panel_of_tens_of_px_beside_an_aligned_one_of_tenths_on_one_scale_in_px():
    ramp = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    errors = {"raw": 2 + 18 * ramp, "aligned": 0.2 + 0.8 * ramp}  # e.g. a rotation, and what is left of it
    fig = evaluate.epe_figure(errors)
    *panels, bar = fig.axes
    for ax, error in zip(panels, errors.values()):
        shown = ax.images[0]
        colours = np.clip(shown.norm(error), 0, 1)  # 0..1 along the colour bar
        assert colours.max() - colours.min() > 0.2  # each panel spans a fifth of the colours, or more
        assert shown.norm is panels[0].images[0].norm  # one scale for all panels
    assert [ax.get_title() for ax in panels] == ["raw: median 11 px", "aligned: median 0.6 px"]
    assert bar.get_ylabel() == "end-point error (px)"
    evaluate.pyplot().close(fig)


MOVES = [(0, 0), (3, 0), (3, 2), (1, -2)]  # section z shows section 0's content moved by MOVES[z] (x, y) px


def write_layer(path, array, kind, sections=None):
    """A layer of ``array [Z, C, 64, 64]`` in 32 px chunks; only ``sections`` (default: all) written."""
    vol = volume.create_volume("file://" + str(path), (64, 64, len(array)), str(array.dtype),
                               num_channels=array.shape[1], chunk=(32, 32, 1))
    for z in range(len(array)) if sections is None else sections:
        volume.write_pyramid(vol, array[z:z + 1], (0, 0, z), kind)
    return "file://" + str(path)


@pytest.fixture
def misaligned(tmp_path):
    """Raw sections (``conftest.moved_windows``), their true fields (constant MOVES[z]: pull z onto section 0)."""
    raw = moved_windows(MOVES, size=64)
    truth = np.broadcast_to(np.array(MOVES, np.float32)[:, :, None, None], (4, 2, 64, 64)).copy()
    return (raw, truth, write_layer(tmp_path / "raw", raw[:, None], "image"),
            write_layer(tmp_path / "truth", truth, "field"))


@pytest.mark.parametrize("perfect", [True, False])
def test_evaluate_command_scores_a_perfect_and_a_collapsed_alignment_against_the_oracle(tmp_path, misaligned, capsys,
                                                                                        perfect):
    raw, truth, raw_path, truth_path = misaligned
    field = truth if perfect else np.zeros_like(truth)  # collapsed: the zero field, the raw sections
    write_layer(tmp_path / "dest" / "image", alignment.apply_field(raw, field)[:, None], "image")
    write_layer(tmp_path / "dest" / "field", field, "field")
    rows = evaluate.main(["--aligned", str(tmp_path / "dest"), "--raw", raw_path, "--truth", truth_path,
                          "--z_start", "0", "--z_stop", "4", "--cpc_window", "16", "--plots", str(tmp_path / "plots")])
    out = capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["cpc.png", "epe.png"]
    assert list(rows) == [evaluate.RAW, "oracle (ground truth)", "aligned"]
    assert rows["oracle (ground truth)"]["far_median"] == 0
    assert rows[evaluate.RAW]["far_median"] == pytest.approx(np.median([np.hypot(*m) for m in MOVES]))  # all tissue
    assert "neighbours that correlate least (CPC aligned, raw): " in out
    if perfect:
        assert rows["aligned"]["far_median"] < 1e-4 and rows["aligned"]["drift_mean"] < 1e-4
        assert rows["aligned"]["cpc_mean"] == pytest.approx(rows["oracle (ground truth)"]["cpc_mean"])
        assert rows["aligned"]["cpc_mean"] > rows[evaluate.RAW]["cpc_mean"] + 0.3
        assert "warning" not in out
    else:
        assert rows["aligned"]["far_median"] == rows[evaluate.RAW]["far_median"]
        assert "warning: aligned is hardly better than no alignment" in out


def test_evaluate_command_points_at_the_one_section_left_unaligned(tmp_path, misaligned, capsys):
    raw, truth, raw_path, _ = misaligned
    field = truth.copy()
    field[2] = 0  # section 2 left where it was: its two pairs correlate least
    write_layer(tmp_path / "dest" / "image", alignment.apply_field(raw, field)[:, None], "image")
    write_layer(tmp_path / "dest" / "field", field, "field")
    evaluate.main(["--aligned", str(tmp_path / "dest"), "--raw", raw_path, "--z_start", "0", "--z_stop", "4",
                   "--cpc_window", "16"])
    least = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("neighbours"))
    assert {pair.split()[0] for pair in least.split(": ")[1].split(", ")[:2]} == {"1|2", "2|3"}


def test_evaluate_command_scores_a_region_and_refuses_what_would_not_fit_in_memory(tmp_path, misaligned, capsys,
                                                                                 monkeypatch):
    """Sections 1-3 aligned but for the right half of section 2 (4 px off): ``--bbox`` over the left half scores a
    perfect alignment there; a stack whose scoring would not fit in the machine's memory is refused in one line that
    points to ``--bbox``."""
    raw, truth, raw_path, truth_path = misaligned
    field = truth.copy()
    field[2, 0, :, 32:] += 4
    write_layer(tmp_path / "dest" / "image", alignment.apply_field(raw, field)[:, None], "image")
    write_layer(tmp_path / "dest" / "field", field, "field")
    common = ["--aligned", str(tmp_path / "dest"), "--raw", raw_path, "--truth", truth_path, "--z_start", "0",
              "--z_stop", "4", "--cpc_window", "16"]
    whole = evaluate.main(common)["aligned"]
    left = evaluate.main(common + ["--bbox", "0", "0", "32", "64"])["aligned"]
    assert "mip 0, sections 0..3, region 0 0 32 64" in capsys.readouterr().out
    assert left["far_p95"] < 1e-4 < 3 < whole["far_p95"]
    with pytest.raises(UserError, match="outside the volume"):
        evaluate.main(common + ["--bbox", "0", "0", "32", "65"])
    monkeypatch.setattr(evaluate, "machine_memory", lambda: 4 * 64 * 64 * 80)  # 85 B per voxel with --truth
    with pytest.raises(UserError, match=r"scoring 4 sections of 64 x 64 px would hold about .* GB, more than the .*; "
                                        r"score a part: --bbox X0 Y0 X1 Y1, or fewer sections"):
        evaluate.main(common)
    assert evaluate.main(common + ["--bbox", "0", "0", "32", "64"])["aligned"] == left


def test_the_cpc_window_is_also_given_by_its_old_name():
    required = ["--aligned", "dest", "--z_start", "0", "--z_stop", "4"]
    assert evaluate.parse_args(required + ["--chunk", "16"]) == evaluate.parse_args(required + ["--cpc_window", "16"])
    assert evaluate.parse_args(required + ["--chunk", "16"]).cpc_window == 16


def test_evaluate_command_refuses_a_bad_z_range_a_missing_stack_or_truth_in_one_line(tmp_path, misaligned,
                                                                                     run_command):
    raw, truth, raw_path, _ = misaligned
    write_layer(tmp_path / "dest" / "image", raw[:, None], "image")
    write_layer(tmp_path / "dest" / "field", np.zeros_like(truth), "field")
    small = "file://" + str(tmp_path / "small")  # a raw stack of other sections
    volume.write(volume.create_volume(small, (10, 10, 2), "uint8", chunk=(10, 10, 1)), raw[:2, None, :10, :10],
                 (0, 0, 0))
    (tmp_path / "cpc.png").mkdir()
    dest, z = ["--aligned", tmp_path / "dest", "--raw", raw_path], ["--z_start", "0", "--z_stop", "4"]
    for argv, says in ((dest + ["--z_start", "0", "--z_stop", "9"], "outside the sections 0..3 of the volume file://"),
                       (dest + ["--z_start", "3", "--z_stop", "1"], "z range 3..1 is empty"),
                       (dest + z + ["--cpc_window", "1"], "--cpc_window >= 8 px"),
                       (dest + z + ["--cpc_window", "100000"], "--cpc_window 100000 px: larger than the sections"),
                       (dest + z + ["--near", "600"], "--near 600 px: every pixel of the 64 x 64 px sections"),
                       (dest + z + ["--plots", tmp_path], "--plots " + str(tmp_path / "cpc.png") + ": cannot write "
                        "there (Is a directory)"),  # was a traceback after the whole scoring
                       (dest + ["--z_start", "1", "--z_stop", "2"], "give at least 2"),
                       (["--aligned", tmp_path / "nothing"] + z, "nothing"),
                       (dest + ["--truth", "file://" + str(tmp_path / "no_truth")] + z, "no_truth"),
                       (["--aligned", tmp_path / "dest", "--raw", small] + z, f"--raw {small} covers x 0..9, y 0..9, "
                        f"sections 0..1 at mip 0, not all of the aligned stack's x 0..{raw.shape[2] - 1}")):
        result = run_command(evaluate, *argv)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and says in result.stderr


def test_missing_sections_are_told_by_the_chunks_stored(tmp_path):
    vol = volume.open_volume(write_layer(tmp_path / "layer", np.ones((4, 1, 64, 64), np.uint8), "image", [0, 2, 3]))
    (tmp_path / "layer" / "8_8_40" / "32-64_0-32_2-3.gz").unlink()  # one chunk of section 2 lost
    assert volume.missing_sections(vol, (0, 0, 0), (64, 64, 4)) == [1, 2]
    assert volume.missing_sections(vol, (0, 0, 0), (64, 64, 4), every_chunk=False) == [1]
    assert volume.missing_sections(vol, (0, 0, 0), (32, 32, 4)) == [1]  # only the cutout's chunks count
    assert evaluate.spans([0, 1, 2, 5, 7, 8]) == "0..2 5 7..8"


@pytest.mark.parametrize("written, z_range, says", [
    ([0], (0, 4), "lacks sections 1..3 of 0..3 (align.py never finished them): nothing to score"),  # crashed
    ([0, 1], (2, 4), "lacks sections 2..3 of 2..3"),  # a range never aligned
])
def test_evaluate_refuses_sections_never_aligned_in_one_line(tmp_path, misaligned, written, z_range, says):
    raw, truth, raw_path, truth_path = misaligned
    write_layer(tmp_path / "dest" / "image", raw[:, None], "image", written)
    write_layer(tmp_path / "dest" / "field", truth, "field", written)
    result = run_script("evaluate.py", "--aligned", tmp_path / "dest", "--raw", raw_path, "--truth", truth_path,
                        "--z_start", z_range[0], "--z_stop", z_range[1])
    assert result.returncode == 2 and result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
    assert says in result.stderr and "dest/image" in result.stderr and "align.py" in result.stderr


def test_evaluate_refuses_inputs_of_the_wrong_kind_or_with_sections_missing(tmp_path, misaligned):
    raw, truth, raw_path, truth_path = misaligned
    write_layer(tmp_path / "dest" / "image", raw[:, None], "image")
    write_layer(tmp_path / "dest" / "field", truth, "field")
    short_truth = write_layer(tmp_path / "short_truth", truth, "field", [0, 1, 3])
    empty_raw = write_layer(tmp_path / "empty_raw", raw[:, None], "image", [0, 1, 2])
    sevens = write_layer(tmp_path / "sevens", np.full((4, 1, 64, 64), 7, np.uint8), "labels")
    marks = write_layer(tmp_path / "marks", np.eye(64, dtype=np.uint8)[None, None].repeat(4, 0), "labels")
    coarse = "file://" + str(tmp_path / "coarse")  # a defect layer at another resolution
    volume.create_volume(coarse, (64, 64, 4), "uint8", resolution=(16, 16, 40), chunk=(32, 32, 1))
    unwritten = "file://" + str(tmp_path / "unwritten")  # made, never written: every pixel would read as no defect
    volume.create_volume(unwritten, (64, 64, 4), "uint8", chunk=(32, 32, 1))
    dest = ["--aligned", str(tmp_path / "dest"), "--z_start", "0", "--z_stop", "4"]
    for argv, says in ((["--raw", truth_path], r"--raw .*/truth is not an image \(1 channel of uint8\): it has 2 "),
                       (["--defects", unwritten], r"--defects .*/unwritten holds no data at mip 0 \(it holds no data "
                                                  r"at any mip\)$"),
                       (["--defects", sevens], "--defects .*/sevens holds the value 7; a defect map holds"),
                       (["--raw", marks], r"--raw .*/marks holds only the values 0 \(none\), 1 \(crack\) and 2 "
                                          r"\(fold\): a defect layer, not images"),
                       (["--defects", coarse], r"the defects volume .*/coarse has no mip at resolution "
                                               r"\[8.0, 8.0, 40.0\]$"),
                       (["--truth", raw_path], r"--truth .*/raw is not a field \(2 channels of float"),
                       (["--defects", truth_path], "--defects .*/truth is not a label layer"),
                       (["--truth", short_truth], "--truth .*/short_truth lacks sections 2 of 0..3"),
                       (["--raw", empty_raw], r"--raw .*/empty_raw lacks sections 3 of 0..3 \(the aligned stack "
                                               r"holds tissue there\): score the runs it holds one at a time \(0..2; "
                                               r"e.g. --z_start 0 --z_stop 3\)$")):
        with pytest.raises(evaluate.UserError, match=says) as err:
            evaluate.main(dest + argv)
        assert "\n" not in str(err.value)
    write_layer(tmp_path / "swapped" / "image", truth, "field")  # a field where the aligned image belongs
    write_layer(tmp_path / "swapped" / "field", truth, "field")
    with pytest.raises(evaluate.UserError, match="--aligned .*/swapped/image is not an image"):
        evaluate.main(["--aligned", str(tmp_path / "swapped"), "--z_start", "0", "--z_stop", "4"])


def test_evaluate_scores_the_sections_beside_a_gap_as_neighbours(tmp_path, misaligned, capsys):
    """A section the source never held (align.py writes it blank): left out, with a line that says so; the sections
    beside it are scored as neighbours, with and without a raw volume that lacks it; as a stack made without it."""
    raw, truth, _, _ = misaligned
    aligned = raw.copy()
    aligned[2] = 0
    write_layer(tmp_path / "dest" / "image", aligned[:, None], "image")
    write_layer(tmp_path / "dest" / "field", truth, "field")
    gap = write_layer(tmp_path / "gap", raw[:, None], "image", [0, 1, 3])
    dest = ["--aligned", str(tmp_path / "dest"), "--z_start", "0", "--z_stop", "4"]
    rows = evaluate.main(dest + ["--raw", gap])
    out = capsys.readouterr().out
    assert "blank sections (no tissue, or never written) left out: 2; the sections beside each gap" in out
    assert "1|3" in out and "2|3" not in out
    kept = raw[[0, 1, 3]]
    assert rows["aligned"]["cpc_mean"] == pytest.approx(evaluate.score(kept, truth[[0, 1, 3]])["cpc_mean"])
    assert rows[evaluate.RAW]["cpc_mean"] == pytest.approx(evaluate.score(kept)["cpc_mean"])


def test_evaluate_refuses_a_plots_folder_it_cannot_write_before_scoring(tmp_path, misaligned):
    raw, truth, raw_path, _ = misaligned
    write_layer(tmp_path / "dest" / "image", raw[:, None], "image")
    write_layer(tmp_path / "dest" / "field", truth, "field")
    (tmp_path / "a_file").touch()
    result = run_script("evaluate.py", "--aligned", tmp_path / "dest", "--z_start", "0", "--z_stop", "4",
                        "--plots", tmp_path / "a_file" / "eval")
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: --plots {tmp_path / 'a_file' / 'eval'}: cannot write there " \
                                    f"({tmp_path / 'a_file'} is not a directory)"


def test_a_wide_table_goes_on_in_blocks_that_fit_the_width(capsys):
    columns = [f"measure_{i}" for i in range(12)]
    rows = {"raw (no alignment)": {c: float(i) for i, c in enumerate(columns)}, "aligned": {"measure_11": 0.5}}
    text = evaluate.print_table(rows, columns, width=80)
    assert capsys.readouterr().out == text + "\n"
    blocks = [block.splitlines() for block in text.split("\n\n")]
    assert len(blocks) == 3 and all(len(line) <= 80 for block in blocks for line in block)
    headers = [block[0].split() for block in blocks]
    assert [c for header in headers for c in header[1:]] == columns and all(h[0] == "method" for h in headers)
    assert [[line.split("  ")[0] for line in block[2:]] for block in blocks] == [["raw (no alignment)", "aligned"]] * 3
    assert blocks[-1][2].split()[-1] == "11" and blocks[-1][3].split()[-1] == "0.5" and "nan" in blocks[0][3]
    assert "\n\n" not in evaluate.print_table(rows, columns[:3], width=80)  # one block where it fits
