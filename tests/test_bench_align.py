"""bench/bench_align.py: its flags are checked before the demo is built or any configuration runs."""
import sys

import pytest

import demo
from bench import bench_align
from helpers import UserError


@pytest.mark.parametrize("flags, message", [(["--threads", "-1"], "--threads -1: must be >= 1"),
                                            (["--queue_workers", "2", "0"], "--queue_workers 0: must be >= 1"),
                                            (["--block", "1"], "--block 1: must be >= 2"),
                                            (["--sections", "1"], "--sections 1: must be >= 2")])
def test_bad_flags_are_one_line_before_any_run(monkeypatch, flags, message):
    monkeypatch.setattr(demo, "ensure_demo", lambda: pytest.fail("the demo was built before the flags were checked"))
    monkeypatch.setattr(bench_align, "in_child", lambda *args: pytest.fail("a configuration ran"))
    monkeypatch.setattr(sys, "argv", ["bench_align", *flags, "--", "--solve"])
    with pytest.raises(UserError, match=message):
        bench_align.main()
