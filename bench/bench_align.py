"""Alignment speed: Mpx/s of align.py on the demo volume, in-process and as tasks on a file queue.

    .venv/bin/python -m bench.bench_align [--archive pt/demo.pt] [--sections 12] [--block 5] [--queue_workers 1 2] \
        [--threads T]

Aligns ``--sections`` held-out demo sections (512 x 512 px) into a fresh temporary
destination per configuration: in-process as one block (the serial alignment), in-process in
blocks of ``--block``, and through an ``fq://`` queue with each number of ``--queue_workers``
(``align.py worker`` processes started, and polling, before the driver). Torch threads per
process: ``--threads``, or by default torch's own choice in-process and ``cores / workers`` in
each worker (on a busy machine one thread per process can be several times faster: a thread
that waits for its descheduled partner wastes its core). The figure is align.py's own: sections x pixels over the
time from the first task to the last, so it includes queue polling but not process start-up.
The load average is printed beside it: on a shared machine it says how much of it was ours.
"""
from __future__ import annotations

if not __package__:  # run as a file: our modules are not importable from bench/
    raise SystemExit("run it from the repository root as: python -m bench.bench_align [flags]")

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start_workers(spec: str, count: int, threads: int) -> list[subprocess.Popen]:
    """``count`` workers on the queue ``spec`` with ``threads`` torch threads each; returns once all poll."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    workers = [subprocess.Popen([sys.executable, "align.py", "worker", "--queue", spec], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
               for _ in range(count)]
    for worker in workers:
        assert worker.stdout.readline().startswith("worker"), "a worker did not start"
    return workers


def one(common: list[str], dest: Path, extra: list[str], workers: int = 0, threads: int | None = None) -> dict:
    """align.py's result dict for one configuration (``workers`` > 0: through a fresh queue)."""
    import align
    import tasks

    running = []
    if workers:
        spec = f"fq://{dest}-queue"
        tasks.open_queue(spec, create=True)
        running = start_workers(spec, workers, threads or max(os.cpu_count() // workers, 1))
        extra = extra + ["--queue", spec]
    try:
        return align.main(common + ["--dest", str(dest)] + extra)
    finally:
        for worker in running:
            worker.kill()
            worker.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archive", default=str(ROOT / "pt" / "demo.pt"))
    p.add_argument("--sections", type=int, default=12)
    p.add_argument("--block", type=int, default=5)
    p.add_argument("--queue_workers", "--workers", type=int, nargs="+", default=[1, 2],
                   help="align.py worker processes on the queue, one run per number")
    p.add_argument("--threads", type=int, help="torch threads of every process (default: see above)")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    import demo

    demo.ensure_demo()
    z_start = demo.TEST_RANGE[0]
    common = ["--archive", args.archive, "--source", "demo", "--z_start", str(z_start), "--z_stop",
              str(z_start + args.sections)]
    configs = [("in-process, one block (serial)", [], 0),
               (f"in-process, blocks of {args.block}", ["--block", str(args.block)], 0)]
    configs += [(f"queue, {n} worker{'s' * (n > 1)}, blocks of {args.block}", ["--block", str(args.block)], n)
                for n in args.queue_workers]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_align_") as tmp:
        for i, (label, extra, workers) in enumerate(configs):
            load = os.getloadavg()[0]
            result = one(common, Path(tmp) / f"run{i}", extra, workers, args.threads)
            rows.append((label, result["mpx_per_s"], result["seconds"], load, os.getloadavg()[0]))
    threads = args.threads or "default"
    print(f"\n{args.sections} demo sections of 512 x 512 px, {os.cpu_count()} cores, threads {threads}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'configuration':44s} {'Mpx/s':>6s} {'s':>6s}  load avg before / after")
    for label, mpx, seconds, before, after in rows:
        print(f"{label:44s} {mpx:6.3f} {seconds:6.1f}  {before:.1f} / {after:.1f}")


if __name__ == "__main__":
    main()
