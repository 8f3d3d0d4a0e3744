"""bench/solve_memory.py: one solve task runs under the memory limit on a small stack, and a failing task is an
error, not a row of figures."""
import pytest

from bench import solve_memory


def test_a_solve_task_and_the_whole_solve_are_measured_on_a_small_stack(tmp_path, capsys):
    solve_memory.main(["--shape", "4", "256", "256", "--task_chunk", "256", "--block", "2", "--smooth", "8",
                       "--scratch", str(tmp_path)])
    rows = [line for line in capsys.readouterr().out.splitlines() if "--block" in line]
    assert len(rows) == 2 and all(": ok, peak RSS " in row for row in rows), rows


def test_a_task_that_fails_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(solve_memory, "CHILD", "raise ValueError('broken')")
    with pytest.raises(SystemExit, match="a solve task failed"):
        solve_memory.main(["--shape", "4", "256", "256", "--task_chunk", "256", "--block", "2", "--smooth", "8",
                           "--scratch", str(tmp_path)])


def test_the_reason_a_task_failed_is_printed_and_a_temporary_scratch_is_deleted(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(solve_memory, "CHILD", "import sys; print('ValueError: broken', file=sys.stderr); "
                                               "print('\\x1b[m', file=sys.stderr); sys.exit(1)")  # a colour code last
    monkeypatch.setattr(solve_memory.tempfile, "mkdtemp", lambda prefix: str(tmp_path / "scratch"))
    with pytest.raises(SystemExit, match="a solve task failed"):
        solve_memory.main(["--shape", "4", "256", "256", "--task_chunk", "256", "--block", "2", "--smooth", "8"])
    assert "failed: ValueError: broken, peak RSS" in capsys.readouterr().out and not (tmp_path / "scratch").exists()


@pytest.mark.parametrize("flags, says", [(["--smooth", "-1"], "--smooth >= 0"),
                                         (["--task_chunk", "100"], "multiple of 256 px"),
                                         (["--task_memory", "0"], "above 0"),
                                         (["--limit_gb", "nan"], "'nan' is not a number")])
def test_bad_flags_are_usage_errors(flags, says, capsys):
    with pytest.raises(SystemExit, match="2"):
        solve_memory.main(["--shape", "4", "256", "256", "--task_chunk", "256", *flags])
    assert says in capsys.readouterr().err
