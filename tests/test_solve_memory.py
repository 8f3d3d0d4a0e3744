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
