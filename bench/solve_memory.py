"""Peak memory and time of one solve task: the whole-volume solve (one z block and one xy chunk, which is what
``align_solved`` holds in one process) against the tasks' ``--block`` and ``--task_chunk``, under a memory limit.

    .venv/bin/python -m bench.solve_memory --volume data/big [--z_start 0 --z_stop 100] [--smooth 96] \
        [--block 8] [--task_chunk 512] [--limit_gb 12] [--scratch DIR]

``--volume``: a phantom that ``demo.py --shape Z H W NAME`` built (its ``image`` and true ``field`` layers). The
pair phase is replaced by the true pair fields ``r = compose(F_s, invert_field(F_t))`` (written to a scratch
DEST's ``pair_field``, as the pair tasks lay them out): a solve task's memory and time do not depend on where its
pair fields come from, and the network's pairs of a 100 x 2048² stack take hours on 2 cores. Each configuration
runs one solve task (``tasks.solve_task``, on the middle z block and an inner xy chunk) in a fresh process whose
address space is capped at ``--limit_gb`` (``RLIMIT_AS``, as ``prlimit --as``); the script prints its peak RSS,
its seconds, or that it ran out of memory. ``Mpx/s`` counts the block's sections x the chunk's pixels.
"""
from __future__ import annotations

if not __package__:  # run as a file: our modules are not importable from bench/
    raise SystemExit("run it from the repository root as: python -m bench.solve_memory [flags]")

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
CHILD = """
import json, resource, sys, time
import tasks
args = json.loads(sys.argv[1])
start = time.perf_counter()
try:
    tasks.solve_task(*args)
    outcome = "ok"
except (MemoryError, RuntimeError) as err:  # torch's allocator raises a RuntimeError
    if not isinstance(err, MemoryError) and "alloc" not in str(err):
        raise
    outcome = "out of memory"
print(json.dumps({"outcome": outcome, "seconds": time.perf_counter() - start,
                  "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}))
"""


def true_pair_fields(job, z_start: int, z_stop: int) -> None:
    """Write ``DEST/pair_field`` of ``job`` from the source's true fields, and the scan's markers (every section
    usable, normalised as it is)."""
    import tasks
    from alignment import section_stats, tissue_moments
    from helpers import compose, invert_field

    truth, source = tasks._layer(job.source.rsplit("/", 1)[0] + "/field"), tasks._layer(job.source)
    marks, inverse = tasks._progress(job), {}
    for z in tqdm(range(z_start, z_stop), desc="true pair fields", unit="section"):
        field = tasks._read_field(truth, z, job.bbox)[None]
        for t in range(z - job.solve.neighbours, z + job.solve.neighbours + 1):
            if z_start <= t < z_stop and t not in inverse:
                inverse[t] = invert_field(tasks._read_field(truth, t, job.bbox)[None])
        pairs = [compose(field, inverse[z + d]) if z_start <= z + d < z_stop else torch.zeros_like(field)
                 for d in tasks._offsets(job)]
        tasks._write(tasks._dest(job, "pair_field"), torch.cat(pairs).reshape(-1, *field.shape[-2:]).numpy(),
                     z, job.bbox)
        inverse.pop(z - job.solve.neighbours, None)
        mean, std = section_stats(tissue_moments(tasks._read(source, z, job.bbox)[0]))
        marks.put_json(f"solve/scan/{z}", {"blank": False, "mean": mean, "std": std})


def measure(job, limit_gb: float) -> dict:
    """Run one solve task of ``job`` (its middle z block, an inner xy chunk) in a fresh process capped at
    ``limit_gb``: ``{"outcome", "seconds", "peak_gb", "task"}``."""
    import tasks

    blocks, corners = job.solve_blocks(), job.chunk_corners()
    first, last = blocks[len(blocks) // 2]
    x, y = corners[len(corners) // 2]
    window = tasks.solve_window(job, tasks.usable_sections(job), first, last)
    args = [dataclasses.asdict(job), int(first), [int(v) for v in window], [], int(x), int(y)]
    limit = int(limit_gb * 2 ** 30)
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines else {"outcome": f"failed: {done.stderr.strip().splitlines()[-1]}"}
    box = job.chunk_box(x, y)
    result["task"] = f"sections {first}..{last} (window {window[0]}..{window[1] - 1}), chunk {box}"
    result["mpx"] = (last + 1 - first) * (box[2] - box[0]) * (box[3] - box[1]) / 1e6
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--volume", required=True, help="a demo.py --shape phantom (image and field layers)")
    p.add_argument("--z_start", type=int, default=0)
    p.add_argument("--z_stop", type=int, default=100)
    p.add_argument("--smooth", type=int, default=96)
    p.add_argument("--block", type=int, default=8)
    p.add_argument("--task_chunk", type=int, default=512)
    p.add_argument("--limit_gb", type=float, default=12.0)
    p.add_argument("--scratch", help="where the scratch DEST goes (default: a temporary folder)")
    args = p.parse_args(argv)

    import tasks
    import volume
    from alignment import PairSettings, SolveSettings

    image = volume.resolve_path(str(Path(args.volume).resolve() / "image"))
    width, height = (int(n) for n in volume.open_volume(image).shape[:2])
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="solve_memory-"))
    job = tasks.Job(archive=str(ROOT / "pt" / "demo.pt"), source=image, dest=volume.resolve_path(str(scratch)),
                    mip=0, bbox=(0, 0, width, height), z_start=args.z_start, z_stop=args.z_stop, block=args.block,
                    pair=PairSettings(smooth=args.smooth), vote=1, raw_neighbour=False, xy_chunk=args.task_chunk,
                    solve=SolveSettings())
    for name, channels in (("pair_field", 4 * job.solve.neighbours), ("solved", 2)):
        if not (scratch / name / "info").exists():
            volume.create_volume(f"{job.dest}/{name}", (width, height, args.z_stop), "float32", channels,
                                 chunk=(tasks.LAYER_CHUNK, tasks.LAYER_CHUNK, 1))
    if not tasks._progress(job).exists(f"solve/scan/{args.z_stop - 1}"):
        true_pair_fields(job, args.z_start, args.z_stop)
    whole = -(-max(width, height) // tasks.LAYER_CHUNK) * tasks.LAYER_CHUNK
    print(f"{args.z_stop - args.z_start} x {height} x {width} px, --smooth {args.smooth}, limit {args.limit_gb} GB "
          f"(scratch {scratch})")
    for name, block, chunk in (("tasks", args.block, args.task_chunk),
                               ("whole (align_solved)", args.z_stop - args.z_start, whole)):
        result = measure(dataclasses.replace(job, block=block, xy_chunk=chunk), args.limit_gb)
        speed = f", {result['mpx'] / result['seconds']:.2f} Mpx/s" if result["outcome"] == "ok" else ""
        print(f"{name:22s} --block {block} --task_chunk {chunk}: {result['outcome']}, "
              f"peak RSS {result.get('peak_gb', float('nan')):.2f} GB, {result.get('seconds', float('nan')):.0f} s"
              f"{speed}; {result['task']}", flush=True)


if __name__ == "__main__":
    main()
