"""tasks.py and align.py --block / --queue / worker: the block layout, chunked composition, a blocked run equal
to the serial one, and a queued run (a worker and the driver killed on the way) equal to the in-process one; the
solve's tasks: equal to align_solved with one block and one chunk, close to it with several, queued as in-process."""
import dataclasses
import functools
import io
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from taskqueue.lib import jsonify
from taskqueue.queueablefns import totask

import align
import alignment
import evaluate
import tasks
import volume
from alignment import PairSettings, SolveSettings
from conftest import ROOT, moved_windows, run_script
import helpers
import solve
from helpers import UserError, compose
from models.archive import save_archive
from test_alignment import noisy_stack, random_net

SHIFTS = [(0, 0), (2, -1), (3, 1), (1, 4), (-2, 3), (0, 0), (4, -2), (5, 1), (3, 3), (-1, 2)]  # px (x, y) of z
BLANK = [2, 4, 5, 6]  # --block 3 on 0..9: blocks 0-2, 2-4, 4-6, 6-8, 8-9; block 2-4 starts blank and carries on
USABLE = [0, 1, 3, 7, 8, 9]  # to 7 (its end is blank too), block 4-6 is all blank, block 6-8's reference is 7


def job(**changes) -> tasks.Job:
    values = dict(archive="a.pt", source="file:///s", dest="file:///d", mip=0, bbox=(0, 0, 64, 64), z_start=2,
                  z_stop=8, block=3, pair=PairSettings(chunk=32, overlap=32, prealign=32, trunc=0, smooth=0), vote=1,
                  raw_neighbour=False, xy_chunk=256)
    return tasks.Job(**{**values, **changes})


def test_block_layout_shares_boundary_sections_and_each_section_has_one_owner():
    assert job().blocks() == [(2, 4), (4, 6), (6, 7)]
    assert [job().owner(z) for z in range(2, 8)] == [0, 0, 0, 1, 1, 2]
    assert job(block=6).blocks() == [(2, 7)] and job(block=2).blocks() == [(2, 3), (3, 4), (4, 5), (5, 6), (6, 7)]
    assert job(z_start=5, z_stop=6, block=2).blocks() == [(5, 5)]
    assert job(bbox=(0, 100, 600, 300)).chunk_corners() == [(0, 100), (256, 100), (512, 100)]
    assert job(bbox=(0, 100, 600, 300)).chunk_box(512, 100) == (512, 100, 600, 300)


@pytest.mark.parametrize("solve", [None, SolveSettings(neighbours=2, pull=0.5)])
def test_a_job_comes_back_from_a_queued_payload_as_it_was(solve):
    original = job(pair=PairSettings(chunk=64, overlap=16, prealign=0, trunc=1, smooth=3), solve=solve)
    call = tasks.phases(original, [2])[0][1][0]  # the first block task
    payload = jsonify(totask(call).payload())  # as a queue stores it, and reads it back
    assert tasks.Job(**totask(payload).args[0]) == original


def smooth(shape, seed, scale):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(shape[0], 1, 6, 6, generator=g) * 2 - 1
    return scale * torch.nn.functional.interpolate(coarse, size=shape[1:], mode="bicubic", align_corners=False)[:, 0]


def layer(path, array):
    """A file:// layer holding ``array [Z, C, Y, X]`` with 32 px chunks."""
    vol = volume.create_volume("file://" + str(path), array.shape[:1:-1] + array.shape[:1], str(array.dtype),
                               array.shape[1], chunk=(32, 32, 1))
    volume.write(vol, array, (0, 0, 0))
    return vol


def test_chunked_compose_and_warp_equal_whole_section(tmp_path):
    """Chunks read with a margin of the largest displacement + 1 px give the whole-section result."""
    f, g = smooth((2, 96, 96), 0, 12.0)[None], smooth((2, 96, 96), 1, 9.0)[None]
    raw = (smooth((1, 96, 96), 2, 100.0) + 128).round().clamp(1, 255).to(torch.uint8)
    raw[:, :, 80:] = 0  # missing data
    f_layer, raw_layer = layer(tmp_path / "f", f.numpy()), layer(tmp_path / "raw", raw[None].numpy())
    whole_field = compose(f, g)[0]
    whole_image = alignment.apply_field(raw[0].numpy(), whole_field)
    bbox = (0, 0, 96, 96)
    for x in (0, 32, 64):
        for y in (0, 32, 64):
            box = (x, y, x + 32, y + 32)
            part = tasks.compose_chunk(f_layer, 0, g[0, :, y:y + 32, x:x + 32], box, bbox)
            assert (part - whole_field[:, y:y + 32, x:x + 32]).abs().max() < 1e-3
            image = tasks.warp_chunk(raw_layer, 0, whole_field[:, y:y + 32, x:x + 32], box, bbox)
            assert np.abs(image.astype(int) - whole_image[y:y + 32, x:x + 32]).max() <= 1
    zero = torch.zeros(2, 32, 32)
    assert torch.equal(tasks.compose_chunk(f_layer, 0, zero, (32, 0, 64, 32), bbox), f[0, :, :32, 32:64])


def shifted_stack():
    """Raw sections 64 x 64: one random texture moved by SHIFTS (periodically), BLANK sections all 0."""
    base = np.random.default_rng(0).integers(1, 256, (64, 64), dtype=np.uint8)
    stack = np.stack([np.roll(base, (dy, dx), axis=(0, 1)) for dx, dy in SHIFTS])
    stack[BLANK] = 0
    return stack


def phase_correlation(model, source, target, *args):
    """A stand-in aligner: the integer shift that pulls ``source`` onto ``target`` (exact for these stacks)."""
    s = torch.from_numpy(source).double()
    t = torch.from_numpy(target).double()
    s, t = s - s.mean(), (t - t[t > 0].mean()) * (t > 0)
    score = torch.fft.irfft2(torch.fft.rfft2(s) * torch.fft.rfft2(t).conj(), s=s.shape)
    dy, dx = np.unravel_index(int(score.argmax()), score.shape)
    size = source.shape[0]
    shift = torch.tensor([(dx + size // 2) % size - size // 2, (dy + size // 2) % size - size // 2])
    return shift.float().view(2, 1, 1).expand(2, *source.shape).clone()


@pytest.fixture
def shifted(tmp_path, monkeypatch):
    monkeypatch.setattr(alignment, "pair_field", phase_correlation)
    layer(tmp_path / "raw", shifted_stack()[:, None])
    archive = save_archive(tmp_path / "net.pt", random_net(), summary={"name": "net"})
    common = ["--archive", str(archive), "--source", str(tmp_path / "raw"), "--z_start", "0", "--z_stop", "10"]
    return lambda dest, *extra: align.main(common + ["--dest", str(tmp_path / dest), *extra])


def test_a_range_that_starts_blank_says_which_section_is_the_reference(shifted, capsys):
    shifted("from2", "--z_start", "2")
    out = capsys.readouterr().out
    assert "skipped blank sections (no tissue, or never written): 2 4 5 6" in out
    assert "section 3, the first with tissue, is the reference (its field is zero)" in out
    shifted("from0")
    assert "the reference" not in capsys.readouterr().out
    shifted("blank", "--z_start", "4", "--z_stop", "7")  # a range of blank sections only
    out = capsys.readouterr().out
    assert "warning: no section of 4..6 holds tissue: all were written blank; is the range" in out
    assert "wrote 3 sections" in out and "aligned 3 sections" not in out


@pytest.mark.parametrize("mode", [[], ["--solve"]])
def test_a_range_of_one_section_is_written_unmoved(shifted, capsys, tmp_path, mode):
    """One section has nothing to be aligned to: serially and with --solve (whose pre-alignment then has no pair) it
    is written as it is, with the zero field."""
    shifted("one", "--z_start", "3", "--z_stop", "4", *mode)
    assert "aligned 1 section of 64 x 64 px" in capsys.readouterr().out
    image, field = read_dest(tmp_path / "one", 3, 4)
    assert np.array_equal(image[0, 0], shifted_stack()[3]) and not field.any()


def test_a_new_run_refuses_a_queue_that_holds_tasks_of_another(shifted, tmp_path):
    """A queue left holding tasks by an interrupted run: their workers would write the old run's settings into a new
    or overwritten DEST, so the driver refuses it in one line before anything is written or deleted."""
    spec = "fq://" + str(tmp_path / "queue")
    tasks.open_queue(spec, create=True).insert([functools.partial(tasks.scan_task, {}, z) for z in range(2)])
    shifted("aligned")
    for dest, flags in (("new", []), ("aligned", ["--overwrite", "--smooth", "2"])):
        with pytest.raises(UserError, match=rf"--queue {spec} still holds 2 tasks of another run, which the workers "
                                            "would run into this one: use a new --queue"):
            shifted(dest, "--queue", spec, *flags)
    assert not (tmp_path / "new" / "image").exists() and read_dest(tmp_path / "aligned")[0].any()


def read_dest(dest, z_start=0, z_stop=10, mip=0):
    """``(image, field)`` of the 64 x 64 sections ``z_start..z_stop-1`` of an align.py destination, at ``mip``."""
    size = (64 >> mip, 64 >> mip, z_stop - z_start)
    return [volume.read(volume.open_volume(str(dest / name), mip), (0, 0, z_start), size)
            for name in ("image", "field")]


def test_blocked_run_equals_serial_run_with_exact_shifts(shifted, tmp_path, monkeypatch):
    shifted("serial")
    shifted("blocked", "--block", "3")
    (serial_image, serial_field), (image, field) = read_dest(tmp_path / "serial"), read_dest(tmp_path / "blocked")
    truth = torch.tensor(SHIFTS, dtype=torch.float32) - torch.tensor(SHIFTS[0], dtype=torch.float32)
    truth[BLANK] = 0
    assert np.allclose(serial_field, truth.view(10, 2, 1, 1).expand(10, 2, 64, 64).numpy(), atol=1e-4)
    assert np.allclose(field, serial_field, atol=1e-4) and np.array_equal(image, serial_image)
    assert not image[BLANK].any() and image[USABLE].reshape(len(USABLE), -1).any(axis=1).all()
    marks = align.progress_files(str(tmp_path / "blocked"))
    assert marks.get_json("block/2-4") == {"reference": 3, "blank": [2, 4, 5, 6]}
    assert marks.get_json("block/4-6") == {"reference": 7, "blank": [4, 5, 6]}

    calls = []  # interrupt block 2-4 at section 7, after its blank 4, 5, 6; the re-run resumes it there

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return phase_correlation(*args)

    monkeypatch.setattr(alignment, "pair_field", interrupted)
    with pytest.raises(KeyboardInterrupt):
        shifted("resumed", "--block", "3")
    monkeypatch.setattr(alignment, "pair_field", phase_correlation)
    assert shifted("resumed", "--block", "3")["sections"] == 10
    resumed_image, resumed_field = read_dest(tmp_path / "resumed")
    assert np.array_equal(resumed_image, image) and np.array_equal(resumed_field, field)


def wait_for(condition, timeout, what):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def wait_for_line(proc, prefix, timeout):
    """Read ``proc``'s stdout (in a thread) until a line starts with ``prefix``, within ``timeout`` s."""
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline = time.time() + timeout
    while not lines.get(timeout=max(deadline - time.time(), 0.01)).startswith(prefix):
        pass


def start(*argv, env=None, **kwargs):
    return subprocess.Popen([sys.executable, "align.py", *map(str, argv)], cwd=ROOT, text=True,
                            env={**os.environ, **(env or {})}, **kwargs)


def killed_and_run_again(tmp_path, common: list, first_task: str, workers: int, timeout: int):
    """``align.py COMMON`` run in-process into ``tmp_path/here`` while a driver enqueues it into ``tmp_path/queued``;
    a worker that sleeps inside its first task (``first_task``, e.g. ``block_task``) is killed there with the
    driver (``kill -9``); then a new driver and ``workers`` workers finish it. Returns the driver's
    ``(return code, output)``: it enqueues again, what is done is skipped, and the killed worker's task is run
    again once its lease has run out."""
    spec = "fq://" + str(tmp_path / "queue")
    driver_argv = [*common, "--dest", tmp_path / "queued", "--queue", spec]
    worker_argv = ["worker", "--queue", spec, "--lease_seconds", "2"]
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = []
    try:
        started.append(start(*driver_argv, **quiet))
        align.main([str(a) for a in common] + ["--dest", str(tmp_path / "here")])  # meanwhile, in-process
        wait_for(lambda: any((tmp_path / "queue" / "queue").glob("*.json")), 60, "the driver to enqueue")
        doomed = start(*worker_argv, env={tasks.SLEEP_VARIABLE: "600"}, stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL)
        started.append(doomed)
        wait_for_line(doomed, f"running {first_task}", 60)
        for proc in started:
            proc.send_signal(signal.SIGKILL)
        driver = start(*driver_argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        started += [driver] + [start(*worker_argv, **quiet) for _ in range(workers)]
        out, _ = driver.communicate(timeout=timeout)
    finally:
        for proc in started:
            proc.kill()
            proc.wait()
    return driver.returncode, out


def test_queued_run_survives_a_killed_worker_and_a_killed_driver(tmp_path, tiny_volume):
    archive = save_archive(tmp_path / "net.pt", random_net(), summary={"name": "net"})
    common = ["--archive", archive, "--source", tiny_volume[0]["image"], "--chunk", "32", "--overlap", "32",
              "--z_start", "2", "--z_stop", "8", "--block", "3", "--mips", "1"]
    code, out = killed_and_run_again(tmp_path, common, "block_task", workers=1, timeout=180)
    assert code == 0 and "aligned 6 sections" in out, out
    for mip in (0, 1):  # the render tasks write each chunk's mip 1 too
        (here_image, here_field), (image, field) = (read_dest(tmp_path / dest, 2, 8, mip)
                                                    for dest in ("here", "queued"))
        assert np.array_equal(image, here_image) and np.array_equal(field, here_field)  # bit for bit
    assert np.abs(field[1:]).max() > 0.05 / 2  # the random net moves things


def test_bad_queue_input_is_a_one_line_error(tmp_path, tiny_volume):
    for folder in (tmp_path / "none", tmp_path):  # a folder that is not a queue is not made one
        result = run_script("align.py", "worker", "--queue", "fq://" + str(folder))
        assert result.returncode == 2 and result.stderr.strip().startswith("error: no queue at")
        assert "\n" not in result.stderr.strip()
    assert not (tmp_path / "queue").exists()
    common = ["--archive", str(tmp_path / "a.pt"), "--source", tiny_volume[0]["image"], "--dest", str(tmp_path / "d"),
              "--z_start", "0", "--z_stop", "4"]
    for extra, message in ((["--queue", "redis://q"], "fq://FOLDER"), (["--queue", str(tmp_path)], "fq://FOLDER"),
                           (["--queue", "fq://"], "--queue fq://: use fq://FOLDER"),  # e.g. fq://$UNSET
                           (["--queue", "sqs:// "], "--queue sqs:// : use fq://FOLDER"),
                           (["--block", "1"], "--block"), (["--task_chunk", "300"], "--task_chunk"),
                           (["--max_failures", "0"], "--max_failures")):
        with pytest.raises(UserError, match=message):
            align.main(common + extra)
    queue = tmp_path / "new_queue"
    with pytest.raises(UserError, match="a.pt"):  # the archive is missing: refused before the queue is made
        align.main(common + ["--queue", f"fq://{queue}"])
    assert not queue.exists()


def test_a_queued_task_that_always_fails_is_dead_lettered_and_stops_the_driver(tmp_path, tiny_volume):
    archive = save_archive(tmp_path / "net.pt", random_net(), summary={"name": "net"})
    spec = "fq://" + str(tmp_path / "queue")
    driver = start("--archive", archive, "--source", tiny_volume[0]["image"], "--dest", tmp_path / "d", "--z_start",
                   "2", "--z_stop", "4", "--queue", spec, "--max_failures", "2", stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE)
    started = [driver]
    try:
        wait_for(lambda: any((tmp_path / "queue" / "queue").glob("*.json")), 60, "the driver to enqueue")
        archive.unlink()  # every try of the block task fails
        started.append(start("worker", "--queue", spec, "--lease_seconds", "1", stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL))
        _, err = driver.communicate(timeout=60)
    finally:
        for proc in started:
            proc.kill()
            proc.wait()
    last = err.strip().splitlines()[-1]
    assert driver.returncode == 2 and last.startswith("error: task block_task(2,) failed 2 times and was "
                                                      "dead-lettered (last error: UserError: "), err
    assert f"{archive}: no such archive file" in last and "Traceback" not in err
    assert tasks.open_queue(spec, create=False).enqueued == 0  # taken off the queue


@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "terminated")])
def test_an_idle_worker_stopped_says_so_and_fails(signum, code, word, tmp_path):
    spec = "fq://" + str(tmp_path / "queue")
    tasks.open_queue(spec, create=True)
    worker = start("worker", "--queue", spec, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_line(worker, "worker", 60)
        time.sleep(0.5)  # polling the empty queue
        worker.send_signal(signum)
        worker.wait(timeout=30)
    finally:
        worker.kill()
        worker.wait()
    err = worker.stderr.read()
    assert worker.returncode == code and err.strip() == word, err  # not exit 0, as if the work were done


class CountingQueue:
    """A queue whose count of tasks left is read off a script, one number per look, on ``protocol`` (fq or sqs)."""

    def __init__(self, protocol: str, counts: list[int]):
        self.path, self.counts = type("Path", (), {"protocol": protocol}), counts

    def insert(self, calls) -> None:
        list(calls)

    @property
    def enqueued(self) -> int:
        return self.counts.pop(0)


@pytest.mark.parametrize("protocol", ["fq", "sqs"])
def test_the_driver_looks_soon_after_inserting_a_phase_then_ever_less_often(protocol, tmp_path, monkeypatch):
    clock, waits = [0.0], []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(tasks.time, "sleep", sleep)
    monkeypatch.setattr(tasks.time, "monotonic", lambda: clock[0])
    # the count after inserting (the bar's total), then one per look: 7 looks at 3 tasks left, then empty
    counts = [3] + [3] * 7 + [0] * 4
    queue = CountingQueue(protocol, counts)
    tasks.run_queued(queue, [("phase", [])], f"file://{tmp_path}/dest")
    busy = [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]  # doubling from FIRST_POLL_SECONDS up to POLL_SECONDS
    # an fq:// count is exact: the first empty look ends the phase; an SQS count must stay 0 for a second
    assert waits == (busy if protocol == "fq" else busy + [1.0])
    assert len(counts) == (3 if protocol == "fq" else 2)


def test_a_file_queue_task_is_whole_when_a_worker_can_first_lease_it(tmp_path, monkeypatch):
    queue = tasks.open_queue("fq://" + str(tmp_path / "queue"), create=True)
    api, looks, rename = queue.api, [], os.replace

    def replace(source, destination):  # a worker leasing, and the lease records, just before each task lands
        looks.append((api.lease(60, 10), len(os.listdir(api.movement_path))))
        rename(source, destination)

    monkeypatch.setattr(tasks.os, "replace", replace)
    queue.insert([functools.partial(tasks.scan_task, {}, z) for z in range(3)])
    leased = [task for tasks_leased, _ in looks for task in tasks_leased] + api.lease(60, 10)
    # each look leases the task before, whole, never the one being inserted; its lease record is there first
    assert [[task["payload"][1][1] for task in got] for got, _ in looks] == [[], [0], [1]]
    assert [records for _, records in looks] == [1, 2, 3] and leased[-1]["payload"][1][1] == 2
    for task in leased:  # a finished task's file is deleted through its lease record
        api.delete(task)
    assert queue.enqueued == 0 and not os.listdir(api.movement_path)


def solve_volume(tmp_path, tiny_volume, blank=5):
    """tiny_volume's image layer with section ``blank`` made blank; returns its path and ``[Z, Y, X]`` sections."""
    paths, arrays = tiny_volume
    image = arrays["image"][:, 0].copy()
    image[blank] = 0
    volume.write(volume.open_volume(paths["image"]), image[blank][None, None], (0, 0, blank))
    return paths["image"], image


def test_solve_tasks_with_one_block_and_one_chunk_are_align_solved_bit_for_bit(tmp_path, tiny_volume):
    source, image = solve_volume(tmp_path, tiny_volume)
    defects = tiny_volume[1]["defects"][:, 0]
    archive = save_archive(tmp_path / "net.pt", random_net(), summary={"name": "net"})
    align.main(["--archive", str(archive), "--source", source, "--dest", str(tmp_path / "d"), "--chunk", "32",
                "--overlap", "32", "--z_start", "2", "--z_stop", "9", "--solve", "--neighbours", "2", "--smooth", "2",
                "--block", "7", "--task_chunk", "256", "--defects", tiny_volume[0]["defects"]])
    pair, solve = PairSettings(chunk=32, overlap=32, smooth=2), SolveSettings(neighbours=2)
    model = tasks.model_of(job(archive=str(archive)))
    aligned, fields, skipped = alignment.align_solved(model, image[2:9], pair, solve, defects=defects[2:9])
    marks = np.stack([alignment.aligned_defects(d, f) for d, f in zip(defects[2:9], fields)])
    marks[skipped] = 0
    read = {name: volume.read(volume.open_volume(str(tmp_path / "d" / name)), (0, 0, 2), (64, 64, 7))
            for name in ("image", "field", "defects")}
    assert skipped == [3] and np.abs(fields.numpy()).max() > 0.05 and marks.any()
    assert np.array_equal(read["field"], fields.numpy()) and np.array_equal(read["image"][:, 0], aligned)
    assert np.array_equal(read["defects"][:, 0], marks)


def test_the_blank_criterion_adds_up_over_chunks():
    section = np.random.default_rng(1).integers(0, 4, (64, 64), dtype=np.uint8)
    parts = sum(alignment.tissue_moments(section[y:y + 16, x:x + 32]) for y in range(0, 64, 16) for x in (0, 32))
    assert np.array_equal(parts, alignment.tissue_moments(section))
    std = float(helpers.slice_std(torch.from_numpy(section)))
    assert alignment.is_blank(moments=parts) == alignment.is_blank(section) == (std < 2.0)
    assert not alignment.is_blank(section, min_std=std - 1e-3) and alignment.is_blank(section, min_std=std + 1e-3)


def test_chain_decay_and_the_solve_margin():
    p = 0.5
    assert solve.chain_decay(p, 1) == pytest.approx(1 + p / 4 - np.sqrt(p / 2 + p * p / 16))
    assert solve.chain_decay(p, 2) > solve.chain_decay(p, 1)  # more neighbours carry a change further
    assert tasks.solve_margin(job(solve=SolveSettings(pull=2.0))) == 5  # 0.382^5 <= 0.01 < 0.382^4
    assert tasks.solve_margin(job(solve=SolveSettings())) == 38  # the default pull, 0.03


def test_a_solve_in_chunks_and_blocks_is_close_to_the_whole_solve(tmp_path, monkeypatch):
    """An aligner that finds whole-pixel shifts (the pre-alignment, the network adding nothing) on a stack moved by
    known shifts: 2 x 2 chunks of 64 px and blocks of 3 sections (the chain cut 5 sections away) keep the fields."""
    monkeypatch.setattr(alignment, "chunk_field", lambda model, source, target, trunc: torch.zeros(
        1, 2, *source.shape[-2:]))
    monkeypatch.setattr(tasks, "LAYER_CHUNK", 32)
    moves = [tuple(2 * v for v in move) for move in np.random.default_rng(4).integers(-2, 3, (12, 2)).tolist()]
    stack = moved_windows(moves, size=128)
    layer(tmp_path / "raw", stack[:, None])
    archive = save_archive(tmp_path / "net.pt", random_net(), summary={"name": "net"})
    common = ["--archive", str(archive), "--source", str(tmp_path / "raw"), "--z_start", "0", "--z_stop", "12",
              "--chunk", "32", "--overlap", "8", "--prealign", "12", "--solve", "--pull", "2"]
    align.main(common + ["--dest", str(tmp_path / "whole"), "--task_chunk", "128"])
    align.main(common + ["--dest", str(tmp_path / "parts"), "--task_chunk", "64", "--block", "3"])
    whole, parts = (volume.read(volume.open_volume(str(tmp_path / d / "field")), (0, 0, 0), (128, 128, 12))
                    for d in ("whole", "parts"))
    truth = torch.tensor(moves, dtype=torch.float32).view(12, 2, 1, 1).expand(12, 2, 128, 128)
    truth = truth - truth[:1]
    difference = np.sqrt(((whole - parts) ** 2).sum(1))
    errors = [evaluate.epe(evaluate.common_frame(f, truth), truth)["far_median"] for f in (whole, parts)]
    assert np.percentile(difference, 99) < 0.1 and abs(errors[0] - errors[1]) < 0.05, (difference.max(), errors)
    windows = align.progress_files(str(tmp_path / "parts")).get_json("solve/block/0/0_0")["window"]
    assert windows == [0, 8]  # the block 0..2 and 5 sections beyond: the chain is cut


def test_a_task_holds_its_window_s_sections_and_pixels():
    """A solve task: ``SOLVE_BYTES`` per pixel of each section of the largest window, the chunk grown by
    ``2 smooth + overlap`` px (clipped to the bbox), the z block by ``solve_margin`` sections each side (clipped to
    the range), and by ``detail_margin`` where ``task_memory`` asks for tiers. A block task: whole sections, more
    with ``--vote``; too much for the machine, one line points to the solve."""
    serial = job(bbox=(0, 0, 1000, 300), vote=3)
    assert tasks.task_bytes(serial) == 1000 * 300 * (tasks.SERIAL_BYTES + 2 * tasks.VOTE_BYTES)
    with pytest.raises(UserError, match=r"a block task \(whole sections of 1000 x 300 px\) would hold about .* GB, "
                                        r"more than .*; align with --solve"):
        tasks.check_task_memory(serial, tasks.task_bytes(serial) - 1)
    whole = job(bbox=(0, 0, 1000, 300), z_start=0, z_stop=100, block=100, xy_chunk=256,
                pair=PairSettings(overlap=32, smooth=64), solve=SolveSettings())
    assert tasks.task_bytes(whole) == 100 * 576 * 300 * tasks.SOLVE_BYTES
    blocks = dataclasses.replace(whole, block=8)
    assert tasks.solve_margin(blocks) == 38 and tasks.detail_margin(blocks) == 4
    assert tasks.task_bytes(blocks) == 84 * 576 * 300 * tasks.SOLVE_BYTES
    assert tasks.task_bytes(dataclasses.replace(blocks, task_memory=0.01)) == 16 * 576 * 300 * tasks.SOLVE_BYTES


def test_a_solve_that_would_not_fit_in_memory_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """100 sections of 2048² px solved in one block need ~44 GB: in a process that has less, one line names flags that
    fit (blocks of 8 with tiers, then smaller chunks), and the run stops before DEST is made; a worker with less
    memory fails its solve task so (the work before it kept)."""
    big = job(bbox=(0, 0, 2048, 2048), z_start=0, z_stop=100, block=100, xy_chunk=512,
              pair=PairSettings(overlap=96, smooth=96), solve=SolveSettings())
    for memory in (tasks.task_bytes(big), None):  # it fits, or the memory cannot be read
        tasks.check_task_memory(big, memory)
    with pytest.raises(UserError, match=r"about 44\.1 GB, more than the 16\.0 GB .*; add --block 8 --task_memory 8 \("):
        tasks.check_task_memory(big, 16 * 2 ** 30)
    with pytest.raises(UserError, match=r"add --block 8 --task_memory 3 --task_chunk 256 \("):
        tasks.check_task_memory(big, 6 * 2 ** 30)
    layer(tmp_path / "raw", noisy_stack(noise=())[:, None])
    archive = save_archive(tmp_path / "net.pt", random_net(), summary={"name": "net"})
    common = ["--archive", str(archive), "--source", str(tmp_path / "raw"), "--z_start", "0", "--z_stop", "5",
              "--solve"]
    refused = r"more than the 0\.0 GB this machine has; add --block 8 and --task_memory \(GB\), or a smaller"
    with monkeypatch.context() as patched:
        patched.setattr(align, "machine_memory", lambda: 2 ** 20)
        with pytest.raises(UserError, match=refused):
            align.main(common + ["--dest", str(tmp_path / "d")])
    assert not (tmp_path / "d").exists()
    monkeypatch.setattr(tasks, "machine_memory", lambda: 2 ** 20)  # a worker with less memory than the driver's
    with pytest.raises(UserError, match=refused):
        align.main(common + ["--dest", str(tmp_path / "worker")])
    assert align.progress_files(str(tmp_path / "worker")).exists("solve/prealign/4")  # the work before is kept


def test_a_solve_task_within_task_memory_is_close_to_the_whole_solve(tmp_path, monkeypatch):
    """Blocks of 3 sections of a 12-section stack at the default pulls, ``--smooth 64`` and a ``--task_memory``
    too small for the whole margin: each solve task solves its block and 4 sections beyond each side
    (``detail_margin``) at full resolution, plus what the sections beyond change at half the resolution; the fields
    are those of the one-block solve. The pair fields (a whole-pixel shift plus a smooth field from the sections'
    difference, plus ~1 px of detail over a few px, which the robust re-weighting and the warps see) are the same in
    every run. (Coarse solves with the robust scale in coarse px and the tier's rounds linearised at its own fields:
    0.14 px p99; now 0.04.)"""
    def rough_field(model, source, target, trunc):
        difference = helpers.box_mean((source - target)[0], 6)
        smooth = torch.cat([difference, helpers.box_mean(difference.flip(-1), 6)])
        return (smooth + 3 * helpers.box_mean(torch.cat([source, target], 1)[0], 3))[None]
    monkeypatch.setattr(alignment, "chunk_field", rough_field)
    monkeypatch.setattr(tasks, "LAYER_CHUNK", 32)
    moves = [tuple(2 * v for v in move) for move in np.random.default_rng(5).integers(-2, 3, (12, 2)).tolist()]
    layer(tmp_path / "raw", moved_windows(moves, size=96)[:, None])
    archive = save_archive(tmp_path / "net.pt", random_net(), summary={"name": "net"})
    common = ["--archive", str(archive), "--source", str(tmp_path / "raw"), "--z_start", "0", "--z_stop", "12",
              "--chunk", "32", "--overlap", "8", "--prealign", "12", "--solve", "--smooth", "64", "--task_chunk", "96"]
    align.main(common + ["--dest", str(tmp_path / "whole")])
    tiers = []
    monkeypatch.setattr(tasks, "_solve_tier", lambda *a, **k: tiers.append(a[6]) or solve_tier(*a, **k))  # factor
    align.main(common + ["--dest", str(tmp_path / "exact"), "--block", "3"])
    assert tiers == [1] * 4  # without --task_memory the blocks are solved with their whole margins
    align.main(common + ["--dest", str(tmp_path / "parts"), "--block", "3", "--task_memory", "0.001"])
    whole, exact, parts = (volume.read(volume.open_volume(str(tmp_path / d / "field")), (0, 0, 0), (96, 96, 12))
                           for d in ("whole", "exact", "parts"))
    assert np.array_equal(whole, exact)
    difference = np.sqrt(((whole - parts) ** 2).sum(1))
    assert np.abs(whole).max() > 1 and np.percentile(difference, 99) < 0.1, np.percentile(difference, 99)
    assert tiers == [1] * 4 + [2, 2, 1] * 4  # coarse (half) with and without the rest, then full resolution
    assert tasks.detail_margin(job(pair=PairSettings(overlap=16, smooth=64), solve=SolveSettings())) == 4
    with pytest.raises(UserError, match="--task_memory must be > 0 GB"):
        align.main(common + ["--dest", str(tmp_path / "bad"), "--task_memory", "0"])
    with pytest.raises(UserError, match="task_memory"):  # the run record holds it: a resume may not change it
        align.main(common + ["--dest", str(tmp_path / "parts"), "--block", "3"])


solve_tier = tasks._solve_tier


def test_pair_fields_in_chunks_see_their_whole_sections_normalisation_and_shift(tmp_path, monkeypatch):
    """A network that reads the normalised grey values pixel by pixel, on a stack moved by known shifts and lit
    unevenly (its chunks' own statistics differ): 2 x 2 chunks of 64 px give the whole section's pair fields, the
    shift from the whole section's prealign marker, and its solved fields."""
    monkeypatch.setattr(alignment, "chunk_field", lambda model, source, target, trunc: torch.cat([source, target], 1))
    monkeypatch.setattr(tasks, "LAYER_CHUNK", 32)
    moves = [(0, 0), (3, -2), (5, 1), (2, 4), (-3, 2), (1, -4)]
    stack = (moved_windows(moves, size=128) * np.linspace(0.3, 1.0, 128)).astype(np.uint8)
    layer(tmp_path / "raw", stack[:, None])
    archive = save_archive(tmp_path / "net.pt", random_net(), summary={"name": "net"})
    common = ["--archive", str(archive), "--source", str(tmp_path / "raw"), "--z_start", "0", "--z_stop", "6",
              "--chunk", "32", "--overlap", "8", "--prealign", "12", "--solve", "--pull", "2"]
    read = {}
    for name, size in (("whole", "128"), ("parts", "64")):
        align.main(common + ["--dest", str(tmp_path / name), "--task_chunk", size])
        read[name] = {layer_name: volume.read(volume.open_volume(str(tmp_path / name / layer_name)), (0, 0, 0),
                                              (128, 128, 6)) for layer_name in ("pair_field", "field")}
    whole, parts = read["whole"], read["parts"]
    assert np.abs(whole["pair_field"]).max() > 1 and np.allclose(whole["pair_field"], parts["pair_field"], atol=1e-4)
    rigid = align.progress_files(str(tmp_path / "parts")).get_json("solve/prealign/1")
    assert rigid["targets"] == [0, 2] and rigid["rigid"][0] == [[0, 0, 3], [0, 0, -2]]  # section 1 onto 0: moved back
    difference = np.sqrt(((whole["field"] - parts["field"]) ** 2).sum(1))
    assert np.percentile(difference, 99) < 1e-3, difference.max()


def test_pair_tasks_read_their_chunks_on_the_networks_grid(tmp_path, monkeypatch):
    """Context (``overlap + prealign`` = 42 px) that is not a multiple of the network's stride (4 px): each chunk's
    window still starts on the whole section's grid of the network's pooling, so 2 x 2 chunks of 64 px give the
    whole section's pair fields (off the grid they differ by px)."""
    monkeypatch.setattr(tasks, "LAYER_CHUNK", 32)
    stack = moved_windows([(0, 0), (3, -2), (5, 1)], size=128)
    layer(tmp_path / "raw", stack[:, None])
    archive = save_archive(tmp_path / "net.pt", random_net(), summary={"name": "net"})
    common = ["--archive", str(archive), "--source", str(tmp_path / "raw"), "--z_start", "0", "--z_stop", "3",
              "--overlap", "30", "--prealign", "12", "--solve"]
    fields = []
    for name, size in (("whole", "128"), ("parts", "64")):
        align.main(common + ["--dest", str(tmp_path / name), "--task_chunk", size])
        fields.append(volume.read(volume.open_volume(str(tmp_path / name / "pair_field")), (0, 0, 0), (128, 128, 3)))
    assert np.abs(fields[0]).max() > 1 and np.abs(fields[0] - fields[1]).max() < 1e-3


def test_pair_tasks_with_refine_read_the_first_passs_low_pass_as_context(tmp_path, monkeypatch):
    """``--refine 8`` with a network that reads the grey values pixel by pixel: a chunk's second pass starts from the
    first pass's field low-passed over 16 px beyond the chunk; with that context (``alignment.pair_context``) 2 x 2
    chunks of 64 px give the whole section's pair fields, with only ``overlap + prealign`` (as without refine) not."""
    monkeypatch.setattr(alignment, "chunk_field", lambda model, source, target, trunc: torch.cat([source, target], 1))
    monkeypatch.setattr(tasks, "LAYER_CHUNK", 32)
    layer(tmp_path / "raw", moved_windows([(0, 0), (3, -2), (5, 1)], size=128)[:, None])
    archive = save_archive(tmp_path / "net.pt", random_net(), summary={"name": "net"})
    common = ["--archive", str(archive), "--source", str(tmp_path / "raw"), "--z_start", "0", "--z_stop", "3",
              "--overlap", "4", "--prealign", "0", "--refine", "8", "--solve"]

    def pair_fields(name, size):
        align.main(common + ["--dest", str(tmp_path / name), "--task_chunk", size])
        return volume.read(volume.open_volume(str(tmp_path / name / "pair_field")), (0, 0, 0), (128, 128, 3))
    whole, parts = pair_fields("whole", "128"), pair_fields("parts", "64")
    assert np.abs(whole).max() > 1 and np.abs(whole - parts).max() < 1e-4
    monkeypatch.setattr(tasks, "pair_context", lambda pair, model: alignment.on_grid(pair.overlap + pair.prealign,
                                                                                     model))
    assert np.abs(whole - pair_fields("short", "64")).max() > 0.1


def cut_stack(tmp_path, monkeypatch, count: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``count`` sections of 128 px whose middle one a fold cuts in two (rows 60-67), its lower piece showing at p
    what the others show at p - (24, 0), as file:// layers, aligned by a network that sees no motion: ``(stack,
    defects, align.py's flags but --dest and --task_chunk)``."""
    monkeypatch.setattr(alignment, "chunk_field", lambda model, source, target, trunc: torch.zeros(len(source), 2,
                                                                                                   *source.shape[2:]))
    monkeypatch.setattr(tasks, "LAYER_CHUNK", 32)
    moved, cut = moved_windows([(0, 0), (24, 0)], size=128), count // 2
    stack = moved[[0] * count].copy()
    stack[cut, 64:] = moved[1, 64:]
    defects = np.zeros_like(stack)
    defects[cut, 60:68] = 2
    layer(tmp_path / "raw", stack[:, None])
    layer(tmp_path / "defects", defects[:, None])
    archive = save_archive(tmp_path / "net.pt", random_net(), summary={"name": "net"})
    return stack, defects, ["--archive", str(archive), "--source", str(tmp_path / "raw"), "--z_start", "0",
                            "--z_stop", str(count), "--chunk", "32", "--overlap", "8", "--prealign", "12", "--solve",
                            "--defects", str(tmp_path / "defects")]


def test_a_section_cut_apart_is_placed_piece_by_piece_in_chunks_as_in_process(tmp_path, monkeypatch):
    """A network that sees no motion, on a stack whose middle section a fold cuts in two, its lower piece 24 px to
    the right: the pair fields onto and from it are the pieces' placements (``alignment.pair_prealignment``), from
    the prealign marker, the same in 2 x 2 chunks as whole and as ``alignment.pair_field`` in process."""
    stack, defects, common = cut_stack(tmp_path, monkeypatch, 3)
    fields = {}
    for name, size in (("whole", "128"), ("parts", "64")):
        align.main(common + ["--dest", str(tmp_path / name), "--task_chunk", size])
        fields[name] = volume.read(volume.open_volume(str(tmp_path / name / "pair_field")), (0, 0, 0), (128, 128, 3))
    marker = align.progress_files(str(tmp_path / "parts")).get_json("solve/prealign/1")
    assert marker["targets"] == [0, 2] and marker["rigid"] == ["pieces"] * 2  # no section two apart
    onto_0, from_0 = fields["whole"][1, :2], fields["whole"][0, 2:]  # 1 -> 0, and 0 -> 1
    # each piece's shift beyond the ramp across the fold (widened where it would fold over: solve.low_pass), where
    # the source shows tissue there
    assert np.abs(onto_0[:, :48]).max() < 0.5 and np.abs(onto_0[0, 84:, :96] - 24).max() < 0.5
    assert np.abs(from_0[:, :48]).max() < 0.5 and np.abs(from_0[0, 84:, 32:] + 24).max() < 0.5
    beside = np.r_[0:48, 84:128]  # the ramp across the fold comes from what each chunk's window sees of its sides
    assert np.abs(fields["whole"] - fields["parts"])[..., beside, :].max() < 1e-4
    model = tasks.model_of(job(archive=common[1]))
    unsmoothed = PairSettings(chunk=32, overlap=8, prealign=12, smooth=0)  # as the pair tasks write them
    in_process = alignment.pair_field(model, stack[1], stack[0], unsmoothed, (defects[1], defects[0]))
    assert np.abs(in_process.numpy() - onto_0).max() < 1e-4
    plain = alignment.pair_field(model, stack[1], stack[0], dataclasses.replace(unsmoothed, pieces=0),
                                 (defects[1], defects[0]))
    assert np.abs(plain.numpy()[0, 72:] - 24).max() > 10  # without the pieces: one shift for both


def test_a_section_placed_by_pieces_is_paired_one_neighbour_further_queued_as_in_process(tmp_path, monkeypatch):
    """Five sections, the middle one cut by a fold with its lower piece 24 px over, a network that sees no motion:
    its pairs with both neighbours are placed by pieces, so it is also paired with sections 0 and 4 (both ways:
    ``DEST/pair_field``'s last two channel pairs), and the queued solve (one block, one chunk) is
    ``align_solved``'s bit for bit."""
    stack, defects, common = cut_stack(tmp_path, monkeypatch, 5)
    align.main(common + ["--smooth", "8", "--dest", str(tmp_path / "d"), "--task_chunk", "128"])
    marks = align.progress_files(str(tmp_path / "d"))
    assert marks.get_json("solve/prealign/2")["targets"] == [1, 3, 0, 4]
    assert marks.get_json("solve/prealign/0")["targets"] == [1, 2]
    assert marks.get_json("solve/prealign/1")["targets"] == [0, 2]
    pair_fields = volume.read(volume.open_volume(str(tmp_path / "d" / "pair_field")), (0, 0, 0), (128, 128, 5))
    assert pair_fields.shape[1] == 8 and np.abs(pair_fields[2, 6, 90:, :96] - 24).max() < 0.5  # 2 -> 4: its piece
    model = tasks.model_of(job(archive=common[1]))
    _, fields, _ = alignment.align_solved(model, stack, PairSettings(chunk=32, overlap=8, prealign=12, smooth=8),
                                          SolveSettings(), defects=defects)
    read = volume.read(volume.open_volume(str(tmp_path / "d" / "field")), (0, 0, 0), (128, 128, 5))
    assert np.array_equal(read, fields.numpy())


def test_a_section_that_matches_nowhere_is_passed_over_queued_as_in_process(tmp_path):
    """A section of noise in the middle of five: the queued solve (one block, one chunk) pairs its neighbours past it
    (a phase more, prealign markers that keep the nearest pairs) and equals ``align_solved`` bit for bit; a serial
    run marks it passed over, and one resumed after it equals one run straight."""
    stack = noisy_stack()
    layer(tmp_path / "raw", stack[:, None])
    archive = save_archive(tmp_path / "net.pt", random_net(), summary={"name": "net"})
    common = ["--archive", str(archive), "--source", str(tmp_path / "raw"), "--z_start", "0", "--chunk", "32",
              "--overlap", "8", "--prealign", "12"]
    align.main(common + ["--z_stop", "5", "--solve", "--smooth", "8", "--dest", str(tmp_path / "solve")])
    marks = align.progress_files(str(tmp_path / "solve"))
    assert marks.get_json("solve/prealign/1") == {**marks.get_json("solve/prealign/1"), "targets": [0, 2, 3],
                                                  "unmatched": [False, True, False]}
    assert marks.get_json("solve/block/0/0_0")["passed"] == [2]
    model = tasks.model_of(job(archive=str(archive)))
    _, fields, _ = alignment.align_solved(model, stack, PairSettings(chunk=32, overlap=8, prealign=12, smooth=8))
    read = volume.read(volume.open_volume(str(tmp_path / "solve" / "field")), (0, 0, 0), (96, 96, 5))
    assert np.array_equal(read, fields.numpy()) and np.array_equal(read[2], read[1])
    for dest, stops in (("straight", ["5"]), ("resumed", ["3", "4", "5"])):
        for z_stop in stops:
            align.main(common + ["--z_stop", z_stop, "--dest", str(tmp_path / dest)])
    assert align.progress_files(str(tmp_path / "resumed")).get("block/0/2") == b"passed"
    straight, resumed = (volume.read(volume.open_volume(str(tmp_path / d / "field")), (0, 0, 0), (96, 96, 5))
                         for d in ("straight", "resumed"))
    assert np.array_equal(straight, resumed) and np.array_equal(straight[2], straight[1])


@pytest.mark.parametrize("noise, block, reference", [((2,), 3, 1), ((2, 3), 4, 1)])
def test_a_block_whose_first_section_matches_nowhere_starts_at_the_section_before(tmp_path, capsys, monkeypatch,
                                                                                   noise, block, reference):
    """Seven sections moved by up to 4 px, one or two of noise ending at the second block's first (blocks of 3: 0-2,
    2-4, ...; of 4: 0-3, 3-6): the second block starts at the section before the noise (its marker says so) and
    passes over the noise, so each section lands where a run in one block puts it, its field the move made."""
    monkeypatch.setattr(alignment, "network_bias", lambda *args: torch.zeros(2))  # a random network's is noise
    moves = [(0, 0), (3, -2), (0, 0), (1, 1), (-4, 3), (2, 2), (0, -3)]
    stack = moved_windows(moves, size=96)
    for z in noise:
        stack[z] = np.random.default_rng(z).integers(1, 256, stack[z].shape, dtype=np.uint8)
    layer(tmp_path / "raw", stack[:, None])
    archive = save_archive(tmp_path / "net.pt", random_net(), summary={"name": "net"})
    common = ["--archive", str(archive), "--source", str(tmp_path / "raw"), "--z_start", "0", "--z_stop", "7",
              "--chunk", "32", "--overlap", "8", "--prealign", "12"]
    named = f"[{len(noise)} section{'s' * (len(noise) > 1)} passed over: {' '.join(map(str, noise))}]"
    for dest, blocks in (("one", []), ("blocks", ["--block", str(block)])):
        align.main(common + ["--dest", str(tmp_path / dest)] + blocks)
        assert named in capsys.readouterr().err  # each named once, though two blocks saw it
    marks, second = align.progress_files(str(tmp_path / "blocks")), block - 1
    assert {z: marks.get(f"block/{second}/{z}") for z in range(reference, second + 1)} == {
        reference: b"done", **{z: b"passed" for z in noise}}
    assert all(marks.get(f"block/0/{z}") == b"passed" for z in noise)
    assert marks.get_json(f"block/{second}-{2 * second}")["reference"] == reference
    one, blocks = (volume.read(volume.open_volume(str(tmp_path / d / "field")), (0, 0, 0), (96, 96, 7))
                   for d in ("one", "blocks"))
    assert np.abs(one - blocks).max() < 1
    moved = np.median(blocks, axis=(2, 3))
    assert np.abs(np.delete(moved - np.array(moves), noise, axis=0)).max() < 1, moved


@pytest.mark.parametrize("noise, mode", [((0,), []), ((0, 1), []), ((0,), ["--vote", "2"])])
def test_a_range_whose_first_sections_match_nowhere_starts_after_them(tmp_path, capsys, monkeypatch, noise, mode):
    """Six sections moved by up to 4 px, the first one or two of noise: they are passed over (named, marked,
    written unmoved; also with --vote, which never aligns to them), and the first that the section after it matches
    is the reference, so each section after lands where the move made puts it in the reference's frame (before, the
    noise was the reference and the sections after it were passed over too)."""
    monkeypatch.setattr(alignment, "network_bias", lambda *args: torch.zeros(2))  # a random network's is noise
    moves = np.array([(0, 0), (0, 0), (3, -2), (1, 1), (-4, 3), (2, 2)])
    stack = moved_windows([tuple(m) for m in moves], size=96)
    for z in noise:
        stack[z] = np.random.default_rng(z).integers(1, 256, stack[z].shape, dtype=np.uint8)
    layer(tmp_path / "raw", stack[:, None])
    archive = save_archive(tmp_path / "net.pt", random_net(), summary={"name": "net"})
    align.main(["--archive", str(archive), "--source", str(tmp_path / "raw"), "--z_start", "0", "--z_stop", "6",
                "--chunk", "32", "--overlap", "8", "--prealign", "12", "--dest", str(tmp_path / "d"), *mode])
    assert f"passed over: {' '.join(map(str, noise))}]" in capsys.readouterr().err
    marks = align.progress_files(str(tmp_path / "d"))
    assert [marks.get(f"block/0/{z}") for z in range(6)] == [b"passed"] * len(noise) + [b"done"] * (6 - len(noise))
    fields = volume.read(volume.open_volume(str(tmp_path / "d" / "field")), (0, 0, 0), (96, 96, 6))
    reference = len(noise)
    assert not fields[:reference + 1].any()
    moved = np.median(fields, axis=(2, 3))[reference:]
    assert np.abs(moved - (moves[reference:] - moves[reference])).max() < 1, moved


def test_a_section_of_inverted_contrast_is_matched_inverted_queued_as_in_process(tmp_path):
    """Section 2 inverted: the prealign markers say which pairs match with the source inverted, the pair tasks
    invert it so, and the queued solve (one block, one chunk) equals ``align_solved`` bit for bit."""
    stack = noisy_stack(noise=(), inverted=(2,))
    layer(tmp_path / "raw", stack[:, None])
    archive = save_archive(tmp_path / "net.pt", random_net(), summary={"name": "net"})
    align.main(["--archive", str(archive), "--source", str(tmp_path / "raw"), "--z_start", "0", "--z_stop", "5",
                "--chunk", "32", "--overlap", "8", "--prealign", "12", "--solve", "--smooth", "8", "--dest",
                str(tmp_path / "d")])
    marker = align.progress_files(str(tmp_path / "d")).get_json("solve/prealign/2")
    assert marker["targets"] == [1, 3] and marker["inverted"] == [True, True] and marker["unmatched"] == [False] * 2
    model = tasks.model_of(job(archive=str(archive)))
    with alignment.warnings_condensed(io.StringIO()):
        _, fields, _ = alignment.align_solved(model, stack, PairSettings(chunk=32, overlap=8, prealign=12, smooth=8))
    read = volume.read(volume.open_volume(str(tmp_path / "d" / "field")), (0, 0, 0), (96, 96, 5))
    assert np.array_equal(read, fields.numpy())


def test_a_queued_solve_survives_a_killed_worker_and_driver_and_equals_the_one_in_process(tmp_path, tiny_volume):
    source, _ = solve_volume(tmp_path, tiny_volume)
    archive = save_archive(tmp_path / "net.pt", random_net(), summary={"name": "net"})
    common = ["--archive", archive, "--source", source, "--chunk", "32", "--overlap", "32", "--z_start", "1",
              "--z_stop", "11", "--solve", "--block", "3", "--pull", "2", "--smooth", "2", "--defects",
              tiny_volume[0]["defects"]]
    code, out = killed_and_run_again(tmp_path, common, "scan_task", workers=2, timeout=300)
    assert code == 0 and "aligned 10 sections" in out, out
    assert re.search(r"each solve task holds up to about [1-9]\d* MB: run the workers where they have that much "
                     r"memory", out)
    assert "skipped blank sections (no tissue, or never written): 5" in out, out
    for name in ("image", "field", "defects"):
        here, queued = (volume.read(volume.open_volume(str(tmp_path / dest / name)), (0, 0, 1), (64, 64, 10))
                        for dest in ("here", "queued"))
        assert np.array_equal(here, queued) and queued.any(), name  # bit for bit
    marks = align.progress_files(str(tmp_path / "queued"))
    assert marks.get_json("solve/block/1/0_0")["window"] == [1, 10]  # blocks cut 5 usable sections away


def test_a_serial_run_takes_the_network_s_bias_off_each_pair_and_its_record_keeps_it(tmp_path, monkeypatch, capsys):
    """A network biased by (0.5, -0.5) px on this stack (``alignment.network_bias``, patched): the run says so, the
    block tasks take it off each pair field (section 1, aligned onto the fixed section 0, exactly), the run record
    keeps it, and a resume that extends the range takes it from there, not from the pairs it would now read."""
    layer(tmp_path / "raw", noisy_stack(noise=())[:, None])
    archive = save_archive(tmp_path / "net.pt", random_net(), summary={"name": "net"})
    common = ["--archive", str(archive), "--source", str(tmp_path / "raw"), "--z_start", "0", "--chunk", "32",
              "--overlap", "8", "--prealign", "12", "--block", "3"]
    with monkeypatch.context() as patched:
        patched.setattr(alignment, "network_bias", lambda *args: torch.tensor([0.0, 0.0]))
        align.main(common + ["--dest", str(tmp_path / "plain"), "--z_stop", "5"])
    assert "bias" not in capsys.readouterr().out
    with monkeypatch.context() as patched:
        patched.setattr(alignment, "network_bias", lambda *args: torch.tensor([0.5, -0.5]))
        align.main(common + ["--dest", str(tmp_path / "biased"), "--z_stop", "4"])
    assert "the network's bias on this stack, 0.50, -0.50 px (x, y) per pair, is taken off" in capsys.readouterr().out
    assert align.recorded_runs(str(tmp_path / "biased"))[-1]["method"]["run"]["bias"] == [0.5, -0.5]
    with monkeypatch.context() as patched:
        patched.setattr(alignment, "network_bias", None)  # not estimated again
        align.main(common + ["--dest", str(tmp_path / "biased"), "--z_stop", "5"])
    assert "0.50, -0.50 px (x, y) per pair" in capsys.readouterr().out
    assert align.recorded_runs(str(tmp_path / "biased"))[-1]["method"]["run"]["bias"] == [0.5, -0.5]
    plain, biased = (volume.read(volume.open_volume(str(tmp_path / d / "field")), (0, 0, 0), (96, 96, 5))
                     for d in ("plain", "biased"))
    assert np.abs(biased[1] - (plain[1] - np.array([0.5, -0.5], np.float32)[:, None, None])).max() < 1e-5
    assert np.abs(biased[2:] - plain[2:]).max() > 0.1
