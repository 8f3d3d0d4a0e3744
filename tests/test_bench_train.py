"""bench/bench_train.py's refusals: what it cannot time is one line and a non-zero exit, never 'failed' and 0."""
from conftest import run_script


def test_a_device_that_is_not_here_is_one_line_and_exit_2():
    result = run_script("-m", "bench.bench_train", "--device", "tpu", "--steps", "1")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --device tpu: not a torch device (cpu, cuda or cuda:N)"]
