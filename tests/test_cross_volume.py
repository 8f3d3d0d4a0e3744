"""bench/cross_volume.py: ratios to no alignment, the bar of issue 19, and one draw end to end on PNG sections."""
import argparse

import pytest

from bench import cross_volume
from conftest import ROOT, run_script
from test_align_quality import write_sections


def row(far, common, drift, cpc, oracle=0.5):
    return {"far_median": far, "far_common": common, "drift_mean": drift, "cpc_mean": cpc, "oracle_cpc": oracle}


def test_ratios_are_to_no_alignment_and_the_bar_needs_every_figure():
    rows = {"no alignment": row(10.0, 8.0, 6.0, 0.1), "oracle (ground truth)": row(0, 0, 0, 0.5),
            "good": row(5.0, 3.2, 2.0, 0.4), "common too high": row(5.0, 4.0, 2.0, 0.4),
            "warps tissue": row(5.0, 3.2, 2.0, 0.6), "drifts": row(5.0, 3.2, 7.0, 0.4)}
    out = cross_volume.ratios(rows)
    assert set(out) == {"good", "common too high", "warps tissue", "drifts"}
    assert out["good"]["first"] == pytest.approx(0.5) and out["good"]["common"] == pytest.approx(0.4)
    assert [out[m]["meets"] for m in out] == [True, False, False, False]


def test_a_test_is_name_folder_and_archive():
    assert cross_volume.parse_test("isbi=/data/fly:pt/x.pt") == ("isbi", "/data/fly", "pt/x.pt")
    for bad in ("fly=/data:pt/x.pt", "isbi=/data", "isbi"):
        with pytest.raises(argparse.ArgumentTypeError):
            cross_volume.parse_test(bad)


def test_a_classical_setting_is_checked_as_its_own_flag(tmp_path, capsys):
    with pytest.raises(SystemExit, match="2"):
        cross_volume.main(["--test", f"isbi={tmp_path}:{ROOT / 'pt' / 'demo.pt'}", "--classical", "patch63"])
    assert "argument --classical: invalid choice: 'patch63'" in capsys.readouterr().err


def test_one_draw_end_to_end(tmp_path, capsys):
    write_sections(tmp_path, [(0, 0), (1, 0), (1, 1), (2, 1)])
    results = cross_volume.main(["--test", f"isbi={tmp_path}:{ROOT / 'pt' / 'demo.pt'}", "--seed", "0",
                                 "--shape=--z_start 0 --sections 4 --size 64"])
    assert len(results) == 1 and results[0]["volume"] == "isbi" and results[0]["method"].startswith("ours (demo")
    assert results[0]["method"].endswith("refine 192)")  # the real-tissue setting's second pass
    assert results[0]["first"] > 0 and "bar met on" in capsys.readouterr().out
    one_pass = cross_volume.main(["--test", f"isbi={tmp_path}:{ROOT / 'pt' / 'demo.pt'}", "--seed", "0",
                                  "--shape=--z_start 0 --sections 4 --size 64", "--refine", "0"])
    assert "refine" not in one_pass[0]["method"] and one_pass[0]["first"] != results[0]["first"]


def test_a_bench_run_as_a_file_says_how_to_run_it_in_one_line():
    result = run_script("bench/cross_volume.py", "--help")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "run it from the repository root as: python -m bench.cross_volume [flags]"
