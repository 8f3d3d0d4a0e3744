"""bench/cuda_parity.py: the comparison is exact where both sides are the CPU, and a device not here is one line."""
import pytest

from bench import cuda_parity
from conftest import run_script
from helpers import UserError


def test_the_cpu_against_itself_differs_by_nothing_and_counts_no_syncs():
    rows = cuda_parity.main(["--device", "cpu", "--pairs", "1", "--size", "128"])
    assert [row["settings"] for row in rows] == ["defaults", "--refine 96"]
    assert all(row["max px"] == 0 and row["host syncs/pair"] == 0 and row["cpu s/pair"] > 0 for row in rows)


def test_phantom_pairs_are_misaligned_neighbours():
    pairs = cuda_parity.phantom_pairs(2, 96)
    assert len(pairs) == 2 and pairs[0][0].shape == (96, 96)
    assert (pairs[0][1] == pairs[1][1]).mean() < 0.5 and (pairs[0][0] == pairs[1][1]).all()  # z1 in both


@pytest.mark.parametrize("flags", [["--pairs", "0"], ["--size", "32"]])
def test_bad_flags_are_one_line_errors(flags):
    with pytest.raises(UserError):
        cuda_parity.main(flags + ["--device", "cpu"])


def test_a_device_that_is_not_here_is_one_line_and_exit_2():
    result = run_script("-m", "bench.cuda_parity", "--device", "tpu")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --device tpu: not a torch device (cpu, cuda or cuda:N)"]
