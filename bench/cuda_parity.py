"""The network's pair fields on a GPU against the CPU's, and how often the GPU run waits for the GPU.

    .venv/bin/python -m bench.cuda_parity [--archive pt/demo.pt] [--pairs 4] [--size 512] [--device cuda]

On ``--pairs`` neighbour pairs of a phantom misaligned as the demo is (``--size`` px, no defects), each pair's field
(``alignment.pair_field`` at the defaults, then with ``--refine 96``) on the CPU and on ``--device``: the largest and
the 99th-percentile difference (px), and the pair's seconds on each. On a CUDA device it also counts the host syncs
(``torch.cuda.set_sync_debug_mode``) of one pair's field: each one stops the CPU until the GPU has caught up. TF32
convolutions (cuDNN's default on Ampere and later) are left as they are: the difference is what a user gets.
"""
from __future__ import annotations

if not __package__:  # run as a file: our modules are not importable from bench/
    raise SystemExit("run it from the repository root as: python -m bench.cuda_parity [flags]")

import argparse
import time
import warnings

import torch

import misalign
import phantom
from alignment import PairSettings, for_inference, pair_field
from helpers import UserError, check_device, run_main, vector_length
from models.archive import load_archive


def phantom_pairs(count: int, size: int, seed: int = 0) -> list[tuple]:
    """``count`` (source, target) uint8 ``[size, size]`` neighbour pairs of a phantom misaligned as the demo is."""
    pad = 48
    canvas = torch.from_numpy(phantom.make_phantom((count + 1, size + 2 * pad, size + 2 * pad), seed=seed))[:, None]
    image, _, _ = misalign.misalign(canvas, misalign.MisalignParams(crack_prob=0, fold_prob=0),
                                    torch.Generator().manual_seed(seed), pad=pad)
    sections = image[:, 0].numpy()
    return [(sections[z + 1], sections[z]) for z in range(count)]


def timed_field(model, pair, settings: PairSettings, device: str) -> tuple[torch.Tensor, float]:
    """The pair's field ``[2, H, W]`` (px, on the CPU) and its seconds, ``device`` synchronised before the clock stops."""
    started = time.perf_counter()
    field = pair_field(model, *pair, settings)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return field, time.perf_counter() - started


def host_syncs(model, pair, settings: PairSettings) -> int:
    """The host syncs that ``torch.cuda.set_sync_debug_mode('warn')`` reports in one pair's field on the GPU."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pair_field(model, *pair, settings)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archive", default="pt/demo.pt")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--size", type=int, default=512, help="px, the phantom sections' side")
    p.add_argument("--device", default="cuda", help="the device compared with the CPU")
    args = p.parse_args(argv)
    if args.pairs < 1 or args.size < 64:
        raise UserError("--pairs must be >= 1 and --size >= 64")
    device = check_device(args.device)
    models = {name: for_inference(load_archive(args.archive, name)[0]) for name in ("cpu", device)}
    pairs = phantom_pairs(args.pairs, args.size)
    rows = []
    for label, settings in (("defaults", PairSettings()), ("--refine 96", PairSettings(refine=96))):
        timed_field(models[device], pairs[0], settings, device)  # warm-up: cuDNN picks its kernels
        differences, seconds = [], {"cpu": 0.0, device: 0.0}
        for pair in pairs:
            fields = {}
            for name, model in models.items():
                fields[name], spent = timed_field(model, pair, settings, name)
                seconds[name] += spent
            differences.append(vector_length(fields[device] - fields["cpu"]).flatten())
        difference = torch.cat(differences)
        row = {"settings": label, "max px": float(difference.max()), "p99 px": float(difference.quantile(0.99)),
               "cpu s/pair": seconds["cpu"] / len(pairs), f"{device} s/pair": seconds[device] / len(pairs),
               "host syncs/pair": host_syncs(models[device], pairs[0], settings) if device != "cpu" else 0}
        rows.append(row)
        print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    return rows


if __name__ == "__main__":
    run_main(main)
