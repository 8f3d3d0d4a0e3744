"""Data throughput: demo volume build, gen_stack stacks/s, DataLoader samples/s.

    .venv/bin/python -m bench.bench_data [--count 16] [--dim 256] [--stack_height 10]

Prints one line per measurement. Uses a temporary output directory; the demo
volume is built once into the data directory (timed when it had to be built).
"""
from __future__ import annotations

if not __package__:  # run as a file: our modules are not importable from bench/
    raise SystemExit("run it from the repository root as: python -m bench.bench_data [flags]")

import argparse
import tempfile
import time

import torch
from torch.utils.data import DataLoader

import demo
import gen_stack
from data import Augmenter, StackDataset
from helpers import run_main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--stack_height", type=int, default=10)
    p.add_argument("--batches", type=int, default=20)
    args = p.parse_args()
    if min(args.count, args.dim, args.batches) < 1:
        p.error("--count, --dim and --batches must be at least 1")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    start = time.time()
    built = not demo.is_built()
    demo.ensure_demo()
    if built:
        print(f"demo volume built in {time.time() - start:.1f} s ({demo.describe()})")

    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        path = gen_stack.write_dataset("bench", gen_stack.Sampling(source="demo", count=args.count, dim=args.dim,
                                                                   stack_height=args.stack_height), tmp)
        seconds = time.time() - start
        print(f"gen_stack: {args.count / seconds:.2f} stacks/s "
              f"({args.count} x {args.stack_height} x {args.dim}^2, images+defects+fields)")
        for augment in (None, Augmenter()):
            for workers in (0, 2):
                dataset = StackDataset(path, mask_radius=20, augment=augment)
                loader = DataLoader(dataset, batch_size=8, shuffle=True, num_workers=workers)
                n, start = 0, time.time()
                while n < args.batches:
                    for _ in loader:
                        n += 1
                        if n == args.batches:
                            break
                seconds = time.time() - start
                print(f"DataLoader: {n * 8 / seconds:7.1f} samples/s  (batch 8, {args.dim}^2 pairs, "
                      f"workers {workers}, augment {'on' if augment else 'off'})")


if __name__ == "__main__":
    run_main(main)
