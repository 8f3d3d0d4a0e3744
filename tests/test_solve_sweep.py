"""bench/solve_sweep.py's score of the network's part: pair fields against the true relative fields."""
import numpy as np
import pytest
import torch

import alignment
from bench import align_quality, solve_sweep
from helpers import UserError
from models import Pyramid
from models.archive import save_archive


def stack_with_shifts():
    """Three sections pulled into the registered frame by known shifts (x px): 0, 2, 5."""
    truth = torch.zeros(3, 2, 16, 16)
    truth[1, 0], truth[2, 0] = 2.0, 5.0
    return np.full((3, 16, 16), 100, np.uint8), truth


def test_true_pair_fields_score_zero_error_and_slope_one():
    raw, truth = stack_with_shifts()
    pairs = [(0, 1), (1, 0), (1, 2), (2, 1), (0, 2)]           # (0, 2) is not a neighbour pair: ignored
    fields = torch.zeros(len(pairs), 2, 16, 16)
    for e, (s, t) in enumerate(pairs):
        fields[e, 0] = truth[s, 0, 0, 0] - truth[t, 0, 0, 0]  # shifts compose by adding
    fields[4] = 100.0
    out = solve_sweep.pair_accuracy(raw, pairs, fields, solve_sweep.true_pair_fields(truth, pairs))
    assert out["pair_epe"] == pytest.approx(0, abs=1e-4) and out["slope"] == pytest.approx(1)
    assert out["pair_epe_zero_field"] == pytest.approx(2.5)  # median of 2, 2, 3, 3


def test_true_pair_fields_are_the_differences_of_shifts():
    _, truth = stack_with_shifts()
    pairs = [(0, 1), (2, 1), (0, 2)]
    fields = solve_sweep.true_pair_fields(truth, pairs)
    assert fields.shape == (3, 2, 16, 16)
    assert torch.allclose(fields[:, 0, 8, 8], torch.tensor([-2.0, 3.0, -5.0]), atol=1e-4)
    assert torch.allclose(fields[:, 1], torch.zeros(3, 16, 16), atol=1e-4)


def test_the_solve_on_true_pairs_recovers_the_truth_where_the_network_does_not(tmp_path):
    """``--true_pairs``: each setting's row again on perfect pair fields (here: an untrained network's beside)."""
    torch.manual_seed(0)
    archive = save_archive(tmp_path / "net.pt", Pyramid(size=3, k=3, corr_radius=1, aligner_widths=(8, 8)),
                           summary={"name": "net"})
    rows = solve_sweep.main(["--archive", str(archive), "--phantom", "static", "--sections", "3", "--size", "96",
                             "--smooth", "0", "--pull", "0.0003", "--prealign", "0", "--true_pairs"])
    setting = "solve1 smooth 0 pull 0.0003 robust 4"
    ours, perfect = rows[setting], rows[setting + " on true pairs"]
    assert perfect["far_median"] < 0.2 < rows["no alignment"]["far_median"]
    assert perfect["far_median"] < ours["far_median"]


def test_half_the_motion_scores_slope_one_half():
    raw, truth = stack_with_shifts()
    pairs = [(0, 1), (1, 2)]
    fields = torch.zeros(2, 2, 16, 16)
    fields[0, 0], fields[1, 0] = -1.0, -1.5
    out = solve_sweep.pair_accuracy(raw, pairs, fields, solve_sweep.true_pair_fields(truth, pairs))
    assert out["slope"] == pytest.approx(0.5) and out["pair_epe"] == pytest.approx(1.25)


def test_summarise_averages_draws_and_scores_each_against_its_own_identity():
    draws = [{"no alignment": {"far_median": 10.0, "far_common": 8.0},
              "solve": {"far_median": 4.0, "far_common": 2.0}},
             {"no alignment": {"far_median": 20.0, "far_common": 4.0},
              "solve": {"far_median": 12.0, "far_common": 2.0}}]
    out = solve_sweep.summarise(draws)
    assert out["solve"]["far_median"] == pytest.approx(8.0) and out["solve"]["far_common"] == pytest.approx(2.0)
    assert out["solve"]["far_ratio"] == pytest.approx(0.5) and out["solve"]["far_ratio_max"] == pytest.approx(0.6)
    assert out["solve"]["common_ratio"] == pytest.approx(0.375) and out["solve"]["common_ratio_max"] == pytest.approx(0.5)
    assert out["no alignment"]["far_ratio"] == pytest.approx(1.0)
    assert "near_excess_max" not in out["solve"]  # no defects: no excess


def test_summarise_keeps_the_worst_draws_excess_near_and_inside_defects():
    draws = [{"no alignment": {"far_median": 10.0, "far_common": 8.0, "near_excess": 1.0, "inside_excess": 2.0},
              "solve": {"far_median": 4.0, "far_common": 2.0, "near_excess": 0.2, "inside_excess": 1.5}},
             {"no alignment": {"far_median": 20.0, "far_common": 4.0, "near_excess": 3.0, "inside_excess": 0.0},
              "solve": {"far_median": 12.0, "far_common": 2.0, "near_excess": 1.2, "inside_excess": -0.5}}]
    out = solve_sweep.summarise(draws)["solve"]
    assert out["near_excess"] == pytest.approx(0.7) and out["near_excess_max"] == pytest.approx(1.2)
    assert out["inside_excess"] == pytest.approx(0.5) and out["inside_excess_max"] == pytest.approx(1.5)


def test_the_cache_is_reused_for_the_same_archive_and_not_for_a_new_one_at_its_path(tmp_path, monkeypatch):
    """``--cache``: the pair fields are computed once per network and stack; an archive re-trained to the same path
    (other bytes), or a stack misaligned otherwise (``--fold_width``), computes them again instead of scoring the
    old fields."""
    calls = []
    real_pair_field = alignment.pair_field
    monkeypatch.setattr(alignment, "pair_field", lambda *a, **k: calls.append(1) or real_pair_field(*a, **k))
    archive = tmp_path / "net.pt"
    argv = ["--archive", str(archive), "--phantom", "static", "--sections", "3", "--size", "64", "--smooth", "0",
            "--prealign", "0", "--cache", str(tmp_path / "fields.pt")]
    counts = []
    for seed in (0, 0, 1):  # the same network twice, then another one written to the same path
        torch.manual_seed(seed)
        save_archive(archive, Pyramid(size=3, k=3, corr_radius=1, aligner_widths=(8, 8)), summary={"name": "net"})
        solve_sweep.main(argv)
        counts.append(len(calls))
    assert counts[0] == 4 and counts[1] == 4 and counts[2] == 8
    solve_sweep.main([*argv, "--fold_width", "60", "120"])
    assert len(calls) == 12


@pytest.mark.parametrize("flags, message", [(["--neighbours", "0"], "--neighbours 0: must be >= 1"),
                                            (["--pull", "0.03", "0"], "--pull 0: must be > 0"),
                                            (["--sections", "1"], "--sections 1: a stack to align needs at least 2"),
                                            (["--cache", "pt/demo.pt"], "--cache pt/demo.pt: not a cache of pair "
                                                                        "fields \\(it would be overwritten\\)"),
                                            (["--cache", "tests"], "--cache tests: cannot write there")])
def test_a_swept_setting_out_of_range_is_one_line_before_the_network_is_read(flags, message, monkeypatch):
    monkeypatch.setattr(solve_sweep, "load_archive", lambda path: pytest.fail("read before the flags were checked"))
    with pytest.raises(UserError, match=message):
        solve_sweep.main(["--archive", "pt/demo.pt", *flags])


def test_a_cache_file_it_did_not_write_is_refused_and_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(solve_sweep, "load_archive", lambda path: pytest.fail("read before the cache was checked"))
    for seeds, name in ((["0"], "x.pt"), (["0", "1"], "x.seed1.pt")):  # several draws: one file per draw
        other = tmp_path / name
        other.write_bytes(b"a truncated network")
        with pytest.raises(UserError, match=f"--cache {other}: not a cache of pair fields"):
            solve_sweep.main(["--archive", "pt/demo.pt", "--seed", *seeds, "--cache", str(tmp_path / "x.pt")])
        assert other.read_bytes() == b"a truncated network"
        other.unlink()


def test_a_demo_stack_outside_the_demo_volume_is_one_line(tmp_path, monkeypatch):
    import demo

    monkeypatch.setenv("SEAMLESS_DATA", str(tmp_path))
    demo.build(shape=(4, 64, 64))
    assert align_quality.demo_stack(1, 3, 64)["raw"].shape == (3, 64, 64)
    for z_start, count, size in ((2, 3, 64), (0, 2, 65), (-1, 2, 32)):
        with pytest.raises(UserError, match=rf"--z_start {z_start} --sections {count} --size {size}: outside the demo "
                                            r"volume \(sections 0\.\.3, 64 x 64 px\)"):
            align_quality.demo_stack(z_start, count, size)
