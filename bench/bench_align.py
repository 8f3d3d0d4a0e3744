"""Alignment speed and memory: Mpx/s and peak RSS of align.py, in-process and as tasks on a file queue.

    .venv/bin/python -m bench.bench_align [--archive pt/demo.pt] [--source demo] [--z_start Z] [--sections 12] \
        [--block 5] [--queue_workers 1 2] [--threads T] [-- ALIGN_FLAGS...]

Aligns ``--sections`` sections from ``--z_start`` of ``--source`` (default: the demo's held-out sections, 512 x 512
px) into a fresh temporary destination per configuration, with ``ALIGN_FLAGS`` (e.g. ``--solve --smooth 96
--task_chunk 256``) added to every run: in-process as one block (without ``--solve``: the serial alignment),
in-process in blocks of ``--block``, and through an ``fq://`` queue with each number of ``--queue_workers``
(``align.py worker`` processes started, and polling, before the driver). Torch threads per process: ``--threads``,
or by default torch's own choice in-process and ``cores / workers`` in each worker (on a busy machine one thread
per process can be several times faster: a thread that waits for its descheduled partner wastes its core). The
figure is align.py's own: sections x pixels over the time from the first task to the last, so it includes queue
polling but not process start-up. The load average is printed beside it: on a shared machine it says how much of it
was ours. Peak memory: the resident set's high-water mark (Linux ``VmHWM``) of the process that ran align.py (each
configuration in a fresh one; in-process: the whole alignment; queued: the driver) and of the largest worker.
"""
from __future__ import annotations

if not __package__:  # run as a file: our modules are not importable from bench/
    raise SystemExit("run it from the repository root as: python -m bench.bench_align [flags]")

import argparse
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from helpers import UserError, run_main

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_gb(pid: int | str = "self") -> float:
    """The high-water mark of process ``pid``'s resident set (GB; Linux ``/proc``, NaN elsewhere)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return float("nan")
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    return int(found.group(1)) / 2 ** 20 if found else float("nan")


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
    """align.py's result dict for one configuration (``workers`` > 0: through a fresh queue), with the peak RSS
    (GB) of the process that ran ``align.main`` (``peak_gb``) and of the largest worker (``worker_peak_gb``, NaN
    in-process). Run it in a fresh process (``in_child``): the peak is the process's own."""
    import align
    import tasks

    running = []
    if workers:
        spec = f"fq://{dest}-queue"
        tasks.open_queue(spec, create=True)
        running = start_workers(spec, workers, threads or max(os.cpu_count() // workers, 1))
        extra = extra + ["--queue", spec]
    try:
        result = align.main(common + ["--dest", str(dest)] + extra)
        return {**result, "peak_gb": peak_rss_gb(),
                "worker_peak_gb": max((peak_rss_gb(w.pid) for w in running), default=float("nan"))}
    finally:
        for worker in running:
            worker.kill()
            worker.wait()


def in_child(work, *args):
    """``work(*args)`` in a forked child process (its memory and peak RSS its own), its result returned."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        try:
            return pool.submit(work, *args).result()
        except UserError as err:  # the user's mistake, raised in the child: one line, as in the parent
            raise UserError(str(err)) from None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archive", default=str(ROOT / "pt" / "demo.pt"))
    p.add_argument("--source", default="demo", help="images to align (a cloudpath or folder; default the demo's)")
    p.add_argument("--z_start", type=int, help="first section (default: the demo's first held-out section)")
    p.add_argument("--sections", type=int, default=12)
    p.add_argument("--block", type=int, default=5)
    p.add_argument("--queue_workers", "--workers", type=int, nargs="+", default=[1, 2],
                   help="align.py worker processes on the queue, one run per number")
    p.add_argument("--threads", type=int, help="torch threads of every process (default: see above)")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, align_flags = p.parse_args(argv[:split]), argv[split + 1:]
    for flag, value, least in (("--sections", args.sections, 2), ("--block", args.block, 2),
                               ("--queue_workers", min(args.queue_workers), 1), ("--threads", args.threads or 1, 1)):
        if value < least:
            raise UserError(f"{flag} {value}: must be >= {least}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    import demo

    if args.source == "demo":
        demo.ensure_demo()
    z_start = demo.TEST_RANGE[0] if args.z_start is None else args.z_start
    common = ["--archive", args.archive, "--source", args.source, "--z_start", str(z_start), "--z_stop",
              str(z_start + args.sections)] + align_flags
    configs = [("in-process, one block", [], 0),
               (f"in-process, blocks of {args.block}", ["--block", str(args.block)], 0)]
    configs += [(f"queue, {n} worker{'s' * (n > 1)}, blocks of {args.block}", ["--block", str(args.block)], n)
                for n in args.queue_workers]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_align_") as tmp:
        for i, (label, extra, workers) in enumerate(configs):
            load = os.getloadavg()[0]
            result = in_child(one, common, Path(tmp) / f"run{i}", extra, workers, args.threads)
            rows.append((label, result["mpx_per_s"], result["seconds"], result["peak_gb"], result["worker_peak_gb"],
                         load, os.getloadavg()[0]))
    threads = args.threads or "default"
    print(f"\n{args.sections} sections of {args.source} from {z_start}, {' '.join(align_flags) or 'default flags'}, "
          f"{os.cpu_count()} cores, threads {threads}, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'configuration':44s} {'Mpx/s':>6s} {'s':>6s}  {'peak GB: process / worker':>26s}  load avg before / after")
    for label, mpx, seconds, peak, worker_peak, before, after in rows:
        worker_peak = "-" if math.isnan(worker_peak) else f"{worker_peak:.2f}"
        print(f"{label:44s} {mpx:6.3f} {seconds:6.1f}  {peak:13.2f} / {worker_peak:>6s}    {before:.1f} / {after:.1f}")


if __name__ == "__main__":
    run_main(main)
