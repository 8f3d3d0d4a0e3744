"""Training speed: iterations/s and peak memory of train.py's step, at a small and the default size.

    .venv/bin/python -m bench.bench_train [--steps 10] [--device cpu|cuda] [--ddp N]

Each configuration runs in a fresh process (so peak memory is its own): the
demo dataset (built on first use), batch 8, Adam, the full training cost
(``loss.pair_loss``: similarity + smoothness + supervised EPE), all levels trained. ``--ddp N``
also runs each configuration as N ``torchrun`` processes with
``DistributedDataParallel`` (gloo on the CPU, nccl on GPUs), each taking 8 / N
pairs of every batch; on the CPU the cores are split evenly (threads per
process = cores / processes, and the 1-process run gets all of them).
"""
from __future__ import annotations

if not __package__:  # run as a file: our modules are not importable from bench/
    raise SystemExit("run it from the repository root as: python -m bench.bench_train [flags]")

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from helpers import UserError, check_device, run_main

ROOT = Path(__file__).resolve().parent.parent

CONFIGS = [  # (label, train.py flags)
    ("small: size 3, k 3, 128 px", ["--size", "3", "--k", "3", "--crop", "128"]),
    ("default: size 5, k 3, corr 3, 256 px", ["--size", "5", "--k", "3", "--crop", "256"]),
    ("seed aligner: size 5, k 7, corr 3, 256 px", ["--size", "5", "--k", "7", "--crop", "256"]),
]


def one(flags: list[str], steps: int, device: str) -> dict:
    """Time ``steps`` training steps (after 2 warm-up steps) in this process, or this rank under torchrun.

    Returns ``it_per_s`` (steps of the whole batch per second), ``samples_per_s``, ``threads``
    and ``peak_rss_mb`` (this process), and ``peak_gpu_mb`` on CUDA.
    """
    import torch
    from torch.utils.data import DataLoader

    import distributed
    import loss
    import train
    from data import StackDataset
    from models import Pyramid

    args = train.parse_args(flags + ["--lambda_gt", "1", "--device", device, "bench"])
    objective = loss.Objective.from_args(args)
    dataset = StackDataset(train.resolve_dataset(None), mask_radius=args.mask_neighborhood_radius, crop=args.crop)
    loader = DataLoader(dataset, batch_size=args.batch_size // distributed.world_size(), shuffle=True,
                        drop_last=True)
    model = Pyramid(size=args.size, k=args.k, corr_radius=args.corr).to(device)
    stepper = distributed.wrap(model, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    batches = [train.to_device(b, device) for b, _ in zip(loader, range(steps + 2))]
    times = []
    for batch in batches:
        start = time.time()
        cost, _, _ = loss.pair_loss(stepper, batch, objective, 0)
        optimizer.zero_grad()
        cost.backward()
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.time() - start)
    it_per_s = 1 / (sum(times[2:]) / len(times[2:]))
    out = {"it_per_s": it_per_s, "samples_per_s": it_per_s * args.batch_size, "threads": torch.get_num_threads(),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.startswith("cuda"):
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def launch(flags: list[str], steps: int, device: str, processes: int) -> subprocess.CompletedProcess:
    """``one(flags)`` in a fresh process, or in ``processes`` > 1 torchrun processes sharing the cores."""
    script = ["-m", "bench.bench_train", "--steps", str(steps), "--device", device, "--one", json.dumps(flags)]
    if processes == 1:
        return subprocess.run([sys.executable, *script], capture_output=True, text=True, cwd=ROOT)
    threads = max(1, len(os.sched_getaffinity(0)) // processes)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(processes), *script], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default=None)
    p.add_argument("--ddp", type=int, default=1, help="also time N DDP processes (torchrun) per configuration")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < 1 or args.ddp < 1:
        p.error("--steps and --ddp must be at least 1")
    import distributed
    device = check_device(args.device)
    if args.one:
        with distributed.process_group(device) as device:
            result = one(json.loads(args.one), args.steps, device)
            if distributed.is_main():
                print(json.dumps(result))
        return
    import train
    train.resolve_dataset(None)  # build the demo data outside the timed processes
    print(f"device {device}, batch 8, {args.steps} timed steps each")
    failed = 0
    for label, flags in CONFIGS:
        for processes in sorted({1, args.ddp}):
            result = launch(flags, args.steps, device, processes)
            name = label if processes == 1 else f"  {processes} DDP processes"
            if result.returncode:
                print(f"{name}: failed\n{result.stderr[-2000:]}")
                failed += 1
                continue
            r = json.loads(result.stdout.strip().splitlines()[-1])
            extra = f", peak GPU {r['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in r else ""
            print(f"{name:44s} {r['it_per_s']:6.2f} it/s {r['samples_per_s']:6.1f} samples/s  "
                  f"peak RSS {r['peak_rss_mb']:6.0f} MB{extra} ({r['threads']} threads"
                  + (" per process)" if processes > 1 else ")"))
    if failed:
        raise UserError(f"{failed} of the configurations failed (above)")


if __name__ == "__main__":
    run_main(main)
