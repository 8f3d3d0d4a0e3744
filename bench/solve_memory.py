"""Peak memory and time of one solve task: the whole-volume solve (one z block and one xy chunk, which is what
``align_solved`` holds in one process) against the tasks' ``--block`` and ``--task_chunk``, under a memory limit.

    .venv/bin/python -m bench.solve_memory --shape 100 2048 2048 [--smooth 96] [--block 8] [--task_chunk 512] \
        [--task_memory 8] [--limit_gb 12] [--scratch DIR]

The script writes a stack of ``--shape`` sections into a scratch folder, one section at a time: a textured image
(the solve weighs pairs where the target shows tissue) and, in place of the pair phase, pair fields
``F_s - F_t`` of smooth random fields ``F`` (as the pair tasks lay them out in ``DEST/pair_field``, with the scan's
markers): a solve task's memory and time do not depend on where its pair fields come from, and the network's
pairs of a 100 x 2048² stack take hours on 2 cores. Each configuration runs one solve task
(``tasks.solve_task``, on the middle z block and the xy chunk nearest the centre) in a fresh process whose address space is
capped at ``--limit_gb`` (``RLIMIT_AS``, as ``prlimit --as``); the script prints its peak RSS and seconds, or that
it ran out of memory. ``Mpx/s`` counts the block's sections x the chunk's pixels.
"""
from __future__ import annotations

if not __package__:  # run as a file: our modules are not importable from bench/
    raise SystemExit("run it from the repository root as: python -m bench.solve_memory [flags]")

import argparse
import dataclasses
import json
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from helpers import finite_float, run_main

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


def write_stack(job, sections: int, seed: int = 0) -> None:
    """Write ``sections`` textured uint8 sections to ``job.source`` and their pair fields ``F_s - F_t`` (``F``:
    random fields of up to ~8 px, smooth over ~1/8 of the section) to ``DEST/pair_field``, with the scan's
    markers (every section usable), one section at a time."""
    import tasks
    from alignment import section_stats, tissue_moments
    from helpers import box_mean

    generator = torch.Generator().manual_seed(seed)
    _, _, width, height = job.bbox
    fields = {}

    def field(z: int) -> torch.Tensor:
        if z not in fields:
            coarse = 4 * torch.randn(1, 2, 9, 9, generator=generator)
            fields[z] = torch.nn.functional.interpolate(coarse, (height, width), mode="bicubic", align_corners=True)
        return fields[z]

    for z in tqdm(range(sections), desc="stack", unit="section"):
        texture = box_mean(torch.randn(1, 1, height, width, generator=generator), 2)
        image = (128 + 60 * texture / texture.std()).clamp(1, 255).to(torch.uint8)[0].numpy()
        tasks._write(tasks._layer(job.source), image, z, job.bbox)
        pairs = [field(z) - field(z + d) if 0 <= z + d < sections else torch.zeros(1, 2, height, width)
                 for d in tasks.pair_offsets(job)]
        tasks._write(tasks._dest(job, "pair_field"), torch.cat(pairs).reshape(-1, height, width).numpy(), z, job.bbox)
        fields.pop(z - job.solve.neighbours, None)
        mean, std = section_stats(tissue_moments(image[0]))
        tasks._progress(job).put_json(f"solve/scan/{z}", {"blank": False, "mean": mean, "std": std})


def measure(job, limit_gb: float) -> dict:
    """Run one solve task of ``job`` (its middle z block, the xy chunk nearest the centre) in a fresh process capped at
    ``limit_gb``: ``{"outcome", "seconds", "peak_gb", "task"}``."""
    import tasks

    blocks, corners = job.solve_blocks(), job.chunk_corners()
    first, last = blocks[len(blocks) // 2]
    x0, y0, x1, y1 = job.bbox
    x, y = min(corners, key=lambda c: abs(2 * c[0] + job.xy_chunk - x0 - x1) + abs(2 * c[1] + job.xy_chunk - y0 - y1))
    window = tasks.solve_window(job, tasks.usable_sections(job), first, last)
    args = [dataclasses.asdict(job), int(first), [int(v) for v in window], [], [], [], int(x), int(y)]  # none blank,
    # placed by pieces or passed over (the stack has none)
    tasks._progress(job).delete(f"solve/block/{first}/{x}_{y}")  # a task measured before (--scratch) would be skipped
    limit = int(limit_gb * 2 ** 30)
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    lines = done.stdout.strip().splitlines()
    said = [line for line in re.sub(r"\x1b\[[0-9;]*m", "", done.stderr).splitlines() if line.strip()]  # no colours
    result = json.loads(lines[-1]) if lines else {"outcome": f"failed: {said[-1] if said else 'no output'}"}
    box = job.chunk_box(x, y)
    result["task"] = f"sections {first}..{last} (window {window[0]}..{window[1] - 1}), chunk {box}"
    result["mpx"] = (last + 1 - first) * (box[2] - box[0]) * (box[3] - box[1]) / 1e6
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=3, default=(100, 2048, 2048), metavar=("Z", "H", "W"))
    p.add_argument("--smooth", type=int, default=96)
    p.add_argument("--block", type=int, default=8)
    p.add_argument("--task_chunk", type=int, default=512)
    p.add_argument("--task_memory", type=finite_float, default=8.0, help="the tasks' --task_memory (GB)")
    p.add_argument("--limit_gb", type=finite_float, default=12.0, help="the address space each task may use (GB)")
    p.add_argument("--scratch", help="where the stack and its DEST go (default: a temporary folder, deleted at the "
                   "end; one given is kept, and the stack the script filled before is used again)")
    args = p.parse_args(argv)
    import tasks

    if args.shape[0] < 2 or min(args.shape[1:]) < args.task_chunk or args.block < 2:
        p.error("--shape needs 2 sections or more and sides of --task_chunk px or more; --block >= 2")
    if args.task_chunk < 1 or args.task_chunk % tasks.LAYER_CHUNK or args.smooth < 0:
        p.error(f"--task_chunk must be a positive multiple of {tasks.LAYER_CHUNK} px, --smooth >= 0")
    if min(args.task_memory, args.limit_gb) <= 0:
        p.error("--task_memory and --limit_gb are GB: above 0")
    if args.scratch and Path(args.scratch).exists() and not Path(args.scratch).is_dir():
        p.error(f"--scratch {args.scratch} is not a folder")
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="solve_memory-"))
    try:
        measure_all(args, scratch)
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def measure_all(args, scratch: Path) -> None:
    """Write the stack into ``scratch`` (unless a run before did), then measure a task of ``--task_memory`` and the
    whole solve at once."""

    import tasks
    import volume
    from alignment import PairSettings, SolveSettings

    sections, height, width = args.shape
    job = tasks.Job(archive=str(ROOT / "pt" / "demo.pt"), source=volume.resolve_path(str(scratch / "image")),
                    dest=volume.resolve_path(str(scratch / "dest")), mip=0, bbox=(0, 0, width, height), z_start=0,
                    z_stop=sections, block=args.block, pair=PairSettings(smooth=args.smooth), vote=1,
                    raw_neighbour=False, xy_chunk=args.task_chunk, solve=SolveSettings())
    if not tasks._progress(job).exists(f"solve/scan/{sections - 1}"):
        for path, channels, dtype in ((job.source, 1, "uint8"), (f"{job.dest}/pair_field", 4 * job.solve.neighbours,
                                                                    "float32"), (f"{job.dest}/solved", 2, "float32")):
            volume.create_volume(path, (width, height, sections), dtype, channels, overwrite=True,
                                 chunk=(tasks.LAYER_CHUNK, tasks.LAYER_CHUNK, 1))
        write_stack(job, sections)
    whole = -(-max(width, height) // tasks.LAYER_CHUNK) * tasks.LAYER_CHUNK
    print(f"{sections} x {height} x {width} px, --smooth {args.smooth}, limit {args.limit_gb} GB "
          f"(scratch {scratch})")
    failed = False
    for name, block, chunk, memory in (("tasks", args.block, args.task_chunk, args.task_memory),
                                       ("whole (align_solved)", sections, whole, None)):
        result = measure(dataclasses.replace(job, block=block, xy_chunk=chunk, task_memory=memory), args.limit_gb)
        speed = f", {result['mpx'] / result['seconds']:.2f} Mpx/s" if result["outcome"] == "ok" else ""
        print(f"{name:22s} --block {block} --task_chunk {chunk} --task_memory {memory}: {result['outcome']}, "
              f"peak RSS {result.get('peak_gb', float('nan')):.2f} GB, {result.get('seconds', float('nan')):.0f} s"
              f"{speed}; {result['task']}", flush=True)
        failed |= result["outcome"].startswith("failed")
    if failed:  # an error, not the memory limit: the figures above are not measurements
        raise SystemExit("error: a solve task failed (above)")


if __name__ == "__main__":
    run_main(main)
