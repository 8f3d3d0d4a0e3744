"""Training speed: iterations/s and peak memory of train.py's step, at a small and the default size.

    .venv/bin/python bench/bench_train.py [--steps 10] [--device cpu|cuda]

Each configuration runs in a fresh process (so peak memory is its own): the
demo dataset (built on first use), batch 8, Adam, the full cost of train.py
(similarity + smoothness + supervised EPE), all levels trained.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS = [  # (label, train.py flags)
    ("small: size 3, k 3, 128 px", ["--size", "3", "--k", "3", "--crop", "128"]),
    ("default: size 5, k 3, corr 3, 256 px", ["--size", "5", "--k", "3", "--crop", "256"]),
    ("seed aligner: size 5, k 7, corr 3, 256 px", ["--size", "5", "--k", "7", "--crop", "256"]),
]


def one(flags: list[str], steps: int, device: str) -> dict:
    import torch
    from torch.utils.data import DataLoader

    import train
    from data import StackDataset
    from models import Pyramid

    args = train.parse_args(flags + ["--lambda_gt", "1", "--device", device, "bench"])
    dataset = StackDataset(train.resolve_dataset(None), mask_radius=args.mask_neighborhood_radius, crop=args.crop)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)
    model = Pyramid(size=args.size, k=args.k, corr_radius=args.corr).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    batches = [train.to_device(b, device) for b, _ in zip(loader, range(steps + 2))]
    times = []
    for batch in batches:
        start = time.time()
        cost, _, _ = train.pair_terms(model, batch, args, 0)
        optimizer.zero_grad()
        cost.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - start)
    out = {"it_per_s": 1 / (sum(times[2:]) / len(times[2:])), "threads": torch.get_num_threads(),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default=None)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.one:
        print(json.dumps(one(json.loads(args.one), args.steps, device)))
        return
    import train
    train.resolve_dataset(None)  # build the demo data outside the timed processes
    print(f"device {device}, batch 8, {args.steps} timed steps each")
    for label, flags in CONFIGS:
        result = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--device", device,
                                 "--one", json.dumps(flags)], capture_output=True, text=True)
        if result.returncode:
            print(f"{label}: failed\n{result.stderr[-2000:]}")
            continue
        r = json.loads(result.stdout.strip().splitlines()[-1])
        extra = f", peak GPU {r['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in r else ""
        print(f"{label:44s} {r['it_per_s']:6.2f} it/s  peak RSS {r['peak_rss_mb']:6.0f} MB{extra} "
              f"({r['threads']} threads)")


if __name__ == "__main__":
    main()
