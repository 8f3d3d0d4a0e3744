"""bench/align_quality.py's real-tissue stack: registered sections misaligned with known fields, and the check of
their registration."""
import numpy as np
import pytest
from PIL import Image

import alignment
from bench import align_quality, solve_sweep
from conftest import moved_windows
from helpers import UserError


def write_sections(folder, moves):
    """PNG sections 0.png, 1.png, ... (``conftest.moved_windows``)."""
    for z, section in enumerate(moved_windows(moves)):
        Image.fromarray(section).save(folder / f"{z}.png")


def test_real_stack_misaligns_registered_sections_and_finds_them_registered(tmp_path):
    write_sections(tmp_path, [(0, 0)] * 4)
    stack = align_quality.real_stack(str(tmp_path), 0, 4, 64)
    assert stack["raw"].shape == (4, 64, 64) and stack["truth"].shape == (4, 2, 64, 64)
    assert np.abs(stack["truth"]).max() > 1                      # misaligned with known fields
    assert np.allclose(stack["content_offsets"], 0, atol=0.01)   # measured on the registered sections
    assert "warning" not in align_quality.registration_check(stack["content_offsets"])


def test_registration_check_warns_when_content_jumps_between_registered_sections(tmp_path):
    write_sections(tmp_path, [(0, 0), (8, 0), (16, 0), (16, -8)])
    offsets = align_quality.real_stack(str(tmp_path), 0, 4, 64)["content_offsets"]
    assert np.allclose(np.hypot(*offsets.T), 8, atol=1)
    line = align_quality.registration_check(offsets)
    assert "median 8.0 px" in line and "3 of 3 pairs" in line and "warning" in line
    assert "ends a median 16.0 px (largest 17.9 px)" in line  # the content walks 8, 16, |(16, -8)| px away



def test_phantom_stack_static_repeats_one_section_and_default_changes_from_section_to_section():
    def realigned(kind):
        stack = align_quality.phantom_stack(kind, 3, 64, seed=1)
        assert stack["raw"].shape == (3, 64, 64) and stack["truth"].shape == (3, 2, 64, 64)
        oracle = alignment.apply_field(stack["raw"], stack["truth"]).astype(float)
        both = (oracle[0] > 0) & (oracle[2] > 0) & (stack["defects"][[0, 2]] == 0).all(0)
        return np.median(np.abs(oracle[0] - oracle[2])[both])

    assert realigned("static") < 3 < 10 < realigned("default")  # grey levels: interpolation only vs new tissue


def test_a_real_folder_that_is_not_there_is_a_usage_error(tmp_path, capsys):
    for bench in (align_quality, solve_sweep):
        with pytest.raises(SystemExit) as exit_:
            bench.main(["--archive", "pt/demo.pt", "--real", str(tmp_path / "nope")])
        assert exit_.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(
            f"argument --real: '{tmp_path / 'nope'}' is not a folder")


@pytest.mark.parametrize("flags, message", [
    (["--smooth", "-1"], "--smooth -1: must be >= 0"), (["--pull", "0"], "--pull 0: must be > 0"),
    (["--chunk", "0"], "--chunk 0: must be >= 1"), (["--ours", "solve0"], "--ours solve0: expected"),
    (["--sections", "1"], "--sections 1: a stack to align needs at least 2"),
    (["--size", "0"], "--size 0: the sections' size in px must be at least 1"),
    (["--bad", "30:noise"], "--bad 30:noise: expected Z:noise or Z:inverted, 0 <= Z < --sections 30"),
    (["--bad", "3:blur"], "--bad 3:blur: expected"),
    (["--methods", "bogus"], "--methods bogus: not a classical aligner"),
    (["--settings", "affine", "bogus"], "--settings bogus: not a classical aligner or setting"),
    (["--out", "README.md"], "--out README.md: cannot write there"),
    (["--missing", "holes", "--size", "16"], "--missing holes needs --size 40 px or more"),  # was a traceback
    (["--missing", "frame", "--size", "100"], "--missing frame needs --size 304 px"),  # was a table of NaN
    (["--reregister"], "--reregister re-registers --real sections")])  # was ignored on the demo
def test_bad_flags_are_one_line_errors_before_the_stack_is_built(monkeypatch, flags, message):
    def no_stack(*args):
        raise AssertionError("the stack was built before the flags were checked")

    monkeypatch.setattr(align_quality, "held_out_stack", no_stack)
    with pytest.raises(UserError, match=message):
        align_quality.main(["--archive", "pt/demo.pt", *flags])


def test_fold_width_misaligns_real_and_phantom_stacks_with_wider_folds_and_is_refused_for_the_demo(tmp_path,
                                                                                                    monkeypatch):
    import demo
    import misalign

    seen = []
    monkeypatch.setattr(demo, "make_arrays", lambda *args, misalignment=None, **kwargs: seen.append(misalignment) or
                        {layer: np.zeros((2, 1, 8, 8)) for layer in ("image", "field", "defects")})
    for bench in (align_quality, solve_sweep):  # both parse it; the stack is held_out_stack's
        def args(*flags):
            return align_quality.argparse.Namespace(**{**vars(parse(bench, flags)), "seed": 0})
        align_quality.held_out_stack(args("--phantom", "default", "--fold_width", "60", "120"), 0)
        assert seen.pop() == misalign.MisalignParams(fold_width=(60.0, 120.0))
        align_quality.held_out_stack(args("--phantom", "default"), 0)
        assert seen.pop() == misalign.MisalignParams()  # the demo's folds by default
        with pytest.raises(UserError, match="--fold_width: the demo volume's folds are made; give --real or"):
            align_quality.held_out_stack(args("--fold_width", "60", "120"), 0)
        with pytest.raises(UserError, match=r"--fold_width 30 10: expected 0 < LO <= HI px"):
            align_quality.held_out_stack(args("--phantom", "default", "--fold_width", "30", "10"), 0)
    write_sections(tmp_path, [(0, 0)] * 4)
    wide = align_quality.real_stack(str(tmp_path), 0, 4, 64, misalignment=misalign.MisalignParams(
        fold_prob=1.0, crack_prob=0.0, fold_width=(40.0, 40.0), fold_ratio=(4.0, 4.0)))
    assert ((wide["defects"] == 2).sum(-1).max(-1) >= 9).all()  # every section's fold: a band ~10 px wide


def parse(bench, flags):
    """``bench``'s flags as its ``main`` parses them (without running it)."""
    parsed = {}
    original = bench.argparse.ArgumentParser.parse_args

    def keep(parser, argv=None, namespace=None):
        parsed["args"] = original(parser, argv, namespace)
        raise SystemExit(0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench.argparse.ArgumentParser, "parse_args", keep)
        with pytest.raises(SystemExit):
            bench.main(["--archive", "pt/demo.pt", *flags])
    return parsed["args"]


def test_missing_data_makes_a_margin_or_holes_of_each_raw_section_zero_drawn_by_the_seed():
    raw = np.full((3, 256, 256), 100, np.uint8)
    assert align_quality.with_missing_data(raw, "none", 0) is raw
    frame = align_quality.with_missing_data(raw, "frame", 0)
    for section in frame:  # a margin of 40-120 px on each side, the rest untouched
        rows, columns = np.nonzero(section)
        assert 40 <= rows[0] <= 120 and 40 <= 255 - rows[-1] <= 121 and 40 <= columns[0] <= 120
        assert (section[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1] == 100).all()
    holes = align_quality.with_missing_data(raw, "holes", 0)
    assert all(0.01 < (section == 0).mean() < 0.5 for section in holes) and (raw == 100).all()
    assert np.array_equal(holes, align_quality.with_missing_data(raw, "holes", 0))
    assert not np.array_equal(holes, align_quality.with_missing_data(raw, "holes", 1))


def test_bad_sections_are_noise_or_the_inverse_of_the_section_missing_data_kept():
    raw = np.full((3, 64, 64), 100, np.uint8)
    raw[:, :8] = 0
    assert align_quality.with_bad_sections(raw, [], 0) is raw
    out = align_quality.with_bad_sections(raw, ["0:noise", "2:inverted"], 0)
    assert out[0].min() >= 1 and out[0].std() > 50 and np.array_equal(out[1], raw[1])
    assert (out[2, :8] == 0).all() and (out[2, 8:] == 156).all() and (raw[2, 8:] == 100).all()


def test_held_out_stacks_take_missing_data_in_both_benches(monkeypatch):
    import demo

    monkeypatch.setattr(demo, "make_arrays", lambda *args, misalignment=None, **kwargs:
                        {layer: np.full((2, 1, 256, 256), 7) for layer in ("image", "field", "defects")})
    for bench in (align_quality, solve_sweep):
        args = align_quality.argparse.Namespace(**{**vars(parse(bench, ["--phantom", "default", "--missing",
                                                                        "frame"])), "seed": 0})
        raw = align_quality.held_out_stack(args, 0)["raw"]
        assert raw[:, 0].max() == 0 and raw[:, 128, 128].min() == 7
