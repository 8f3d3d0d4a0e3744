"""gen_stack.py: a file:// CloudVolume into HDF5, and its refusals."""
import functools
import os
import signal
import socket
import subprocess
import sys
import time
import weakref

import h5py
import numpy as np
import pytest
import torch

import gen_stack
import helpers
import volume
from data import StackDataset
from conftest import ROOT, ended_pid, run_script
from helpers import UserError, normalise


def make(tmp_path, paths, *extra):
    argv = ["--count", "3", "--source", paths["image"], "--mip", "1", "--dim", "16", "--stack_height", "4",
            "--train_range", "0", "8", "--out_dir", str(tmp_path / "out"), *extra, "toy"]
    return gen_stack.main(argv)


def test_round_trip_matches_the_volume(tmp_path, tiny_volume):
    paths, arrays = tiny_volume
    path = make(tmp_path, paths, "--defects", paths["defects"], "--truth", paths["field"])
    assert path.name == "toy_train_mip1.h5"
    image1 = arrays["image"].reshape(12, 1, 32, 2, 32, 2).astype(float).mean((3, 5)).round()
    field1 = arrays["field"].reshape(12, 2, 32, 2, 32, 2).mean((3, 5)) / 2
    with h5py.File(path) as f:
        assert f["images"].shape == (3, 4, 16, 16) and f["images"].dtype == np.uint8
        assert f["masks"].shape == (3, 4, 16, 16) and f["fields"].shape == (3, 4, 2, 16, 16)
        assert f.attrs["mip"] == 1 and list(f.attrs["z_range"]) == [0, 8]
        for n, (x, y, z) in enumerate(f["coords"][:]):
            assert 0 <= z <= 4 and x + 16 <= 32 and y + 16 <= 32
            assert np.array_equal(f["images"][n], image1[z:z + 4, 0, y:y + 16, x:x + 16])
            assert np.allclose(f["fields"][n], field1[z:z + 4, :, y:y + 16, x:x + 16], atol=1e-5)
            # the right quarter is missing: at most 25 % zeros accepted by default
            assert np.mean(f["images"][n] == 0) <= 0.25
        assert np.all(f["slice_std"][:] > 0)
        first = f["images"][0, :2]
    # ... and back through data.py: the pair (0, 0) is the first two sections, normalised
    sample = StackDataset(path, mask_radius=2)[0]
    expected, missing = normalise(first)
    assert torch.allclose(sample["src"][0], expected[0]) and torch.allclose(sample["tgt"][0], expected[1])
    assert torch.equal(sample["src_missing"][0], missing[0])


def test_write_dataset_is_what_the_command_runs(tmp_path, tiny_volume):
    paths, _ = tiny_volume
    command = make(tmp_path, paths, "--defects", paths["defects"], "--seed", "5")
    sampling = gen_stack.Sampling(source=paths["image"], count=3, defects=paths["defects"], mip=1, dim=16,
                                  stack_height=4, train_range=(0, 8), seed=5)
    library = gen_stack.write_dataset("toy", sampling, tmp_path / "library")
    assert library == tmp_path / "library" / command.name
    with h5py.File(command) as a, h5py.File(library) as b:
        assert set(a) == set(b) == {"images", "masks", "coords", "slice_std"}
        assert all(np.array_equal(a[name][:], b[name][:]) for name in a)


def test_the_old_flag_names_still_set_the_new_settings():
    common = ["--source", "s", "toy"]
    old = gen_stack.parse_args(common + ["--mask_source", "d", "--field_source", "f", "--workers", "2"])
    new = gen_stack.parse_args(common + ["--defects", "d", "--truth", "f", "--read_threads", "2"])
    assert old == new and gen_stack.Sampling.from_args(new) == gen_stack.Sampling(source="s", defects="d", truth="f",
                                                                                  read_threads=2)


def test_coords_replay_reproduces_the_file(tmp_path, tiny_volume):
    paths, _ = tiny_volume
    first = make(tmp_path, paths, "--seed", "3")
    again = gen_stack.main(["--coords", str(first), "--source", paths["image"], "--mip", "1", "--dim", "16",
                            "--stack_height", "4", "--train_range", "0", "8", "--out_dir", str(tmp_path / "o2"),
                            "toy"])
    with h5py.File(first) as a, h5py.File(again) as b:
        assert np.array_equal(a["images"][:], b["images"][:])


@pytest.mark.parametrize("rows, says", [
    ("1 2\n", r"expected one 'x y z' row per stack, got shape \(1, 2\)"),
    ("", "expected one 'x y z' row per stack, got shape"),
    ("0 0 0\n-5 0 0\n", r"row 2 \(-5 0 0\) puts a stack of 16 x 16 x 4 voxels outside the volume \(0 0 0 to 32 32 12\)"),
    ("17 0 0\n", "row 1 .* outside the volume"),  # 17 + 16 > 32: the stack's far edge counts
    ("0 0 9\n", "row 1 .* outside the volume"),
])
def test_coords_outside_the_volume_or_malformed_are_refused_before_writing(tmp_path, tiny_volume, rows, says):
    paths, _ = tiny_volume
    (tmp_path / "corners.txt").write_text(rows)
    with pytest.raises(UserError, match=f"^--coords {tmp_path / 'corners.txt'}: {says}"):
        gen_stack.main(["--coords", str(tmp_path / "corners.txt"), "--source", paths["image"], "--mip", "1", "--dim",
                        "16", "--stack_height", "4", "--train_range", "0", "8", "--out_dir", str(tmp_path / "o"),
                        "toy"])
    assert not list(tmp_path.glob("o/*.h5"))


def test_layers_of_another_kind_and_corners_of_another_mip_are_refused(tmp_path, tiny_volume):
    paths, _ = tiny_volume
    with pytest.raises(UserError, match=f"^--defects {paths['field']} is not"):
        make(tmp_path, paths, "--defects", paths["field"])
    with pytest.raises(UserError, match=f"^--truth {paths['image']} is not"):
        make(tmp_path, paths, "--truth", paths["image"])
    with pytest.raises(UserError, match=f"^--defects {paths['image']}, stack 0, holds the value .*; a defect map"):
        make(tmp_path, paths, "--defects", paths["image"])  # an image is no defect map: nothing is written
    other = "file://" + str(tmp_path / "coarse")  # the same voxel bounds at another resolution
    volume.write_pyramid(volume.create_volume(other, (64, 64, 12), "uint8", resolution=(16, 16, 40), mips=2,
                                              chunk=(32, 32, 1)), np.zeros((12, 1, 64, 64), np.uint8), (0, 0, 0),
                         "labels")
    with pytest.raises(UserError, match=rf"^--defects {other} covers \(0, 0, 0\)..\(32, 32, 12\) at resolution "
                                        r"\[32.0, 32.0, 40.0\], not the source's .* at \[16.0, 16.0, 40.0\]"):
        make(tmp_path, paths, "--defects", other)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    first = make(tmp_path, paths)  # at mip 1
    with pytest.raises(UserError, match=f"^--coords {first} holds corners at mip 1: give --mip 1, not 0"):
        gen_stack.main(["--coords", str(first), "--source", paths["image"], "--mip", "0", "--dim", "16",
                        "--stack_height", "4", "--train_range", "0", "8", "--out_dir", str(tmp_path / "o2"), "toy"])
    assert [p.name for p in (tmp_path / "out").iterdir()] == [first.name] and not list(tmp_path.glob("o2/*.h5"))


def test_existing_output_is_not_replaced(tmp_path, tiny_volume):
    paths, _ = tiny_volume
    path = make(tmp_path, paths)
    before = path.read_bytes()
    with pytest.raises(UserError, match="exists"):
        make(tmp_path, paths, "--seed", "9")
    assert path.read_bytes() == before
    make(tmp_path, paths, "--seed", "9", "--overwrite")
    assert path.read_bytes() != before


def test_interrupted_run_leaves_no_file(tmp_path, tiny_volume, monkeypatch):
    paths, _ = tiny_volume
    calls = []

    def failing_read(vol, start, size):
        calls.append(start)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return np.ones((size[2], 1, size[1], size[0]), np.uint8)

    monkeypatch.setattr(gen_stack.volume, "read", failing_read)
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path, paths, "--read_threads", "1")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("extra, message", [
    (["--count", "0"], "--count"),
    (["--count", str(10 ** 15)], "the dataset would take about 1.02e+09 GB, more than the"),  # before any draw
    (["--mip", "3"], "no mip 3"),
    (["--dim", "64"], "larger than the volume"),
    (["--train_range", "0", "40"], "--train_range 0..40 is outside the sections"),
    (["--stack_height", "20"], "does not fit"),
    (["--dim", "32", "--max_missing", "0.1"], "missing data"),  # every stack is 25 % missing
    (["--max_missing", "2"], "--max_missing 2.0 is a fraction"),
    (["--coords", "corners.txt"], "--count and --coords: choose one"),
    (["--train_range", "6", "2"], "--train_range 6..2 is empty"),
])
def test_bad_flags_are_one_line_errors(tmp_path, tiny_volume, extra, message, run_command):
    paths, _ = tiny_volume
    argv = ["--count", "2", "--source", paths["image"], "--mip", "1", "--dim", "16",
            "--stack_height", "4", "--train_range", "0", "8", "--out_dir", str(tmp_path / "out"), *extra, "toy"]
    result = run_command(gen_stack, *argv)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]  # a progress bar may stand above it
    assert last.startswith("error:") and message in last and "Traceback" not in result.stderr
    assert not any((tmp_path / "out").glob("*.h5"))


def test_missing_source_and_unwritable_output(tmp_path, tiny_volume):
    result = run_script("gen_stack.py", "--count", "1", "--source", str(tmp_path / "none"), "--out_dir",
                        str(tmp_path), "toy")
    assert result.returncode == 2 and "no volume" in result.stderr and "Traceback" not in result.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_script("gen_stack.py", "--count", "1", "--source", tiny_volume[0]["image"], "--out_dir",
                        str(blocker / "x"), "toy")
    assert result.returncode == 2 and "cannot write" in result.stderr


def test_a_registered_source_gives_known_zero_fields(tmp_path, tiny_volume):
    paths, _ = tiny_volume
    path = make(tmp_path, paths, "--registered")
    with h5py.File(path) as f:
        assert bool(f.attrs["registered"]) and "fields" not in f
    sample = StackDataset(path)[0]
    assert bool(sample["has_field"]) and torch.all(sample["field"] == 0)
    with pytest.raises(UserError, match="--registered"):
        make(tmp_path, paths, "--registered", "--truth", paths["field"], "--overwrite")


def test_an_escaping_name_is_refused(tmp_path, tiny_volume):
    result = run_script("gen_stack.py", "--count", "1", "--source", tiny_volume[0]["image"], "--mip", "1", "--dim",
                        "16", "--stack_height", "4", "--train_range", "0", "8", "--out_dir", str(tmp_path / "out"),
                        "../escaped")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: dataset name '../escaped' must be a plain name (no '/', not '..'): it names files inside a folder"]
    assert not list(tmp_path.rglob("*.h5"))


def test_left_overs_of_killed_runs_are_removed_but_not_a_live_runs(tmp_path, tiny_volume):
    out = tmp_path / "out"
    out.mkdir()
    killed = out / f".toy_train_mip1.h5.partial-{ended_pid()}"  # what kill -9 left
    live = out / f".toy_train_mip1.h5.partial-{os.getppid()}@{socket.gethostname()}"  # a concurrent run's
    killed.write_bytes(b"half")
    live.write_bytes(b"half")
    make(tmp_path, tiny_volume[0])
    assert sorted(p.name for p in out.iterdir()) == sorted([live.name, "toy_train_mip1.h5"])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped exception
@pytest.mark.parametrize("signum, stops", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, helpers.Terminated)])
def test_a_signal_dropped_in_a_callback_still_stops_the_write(tmp_path, python_sigint, signum, stops):
    """A Ctrl-C (or a SIGTERM, run_main's handler) raised in a weakref callback is printed and dropped by Python: the
    run once ended 0."""

    class Thing:
        pass

    def stacks():
        for _ in range(3):
            thing = Thing()
            ref = weakref.ref(thing, lambda _: (signal.raise_signal(signum), sum(range(10))))
            del thing  # the signal lands in the callback
            assert ref() is None
            yield np.zeros(3), {"images": np.full((4, 1, 16, 16), 7, np.uint8)}

    sampling = gen_stack.Sampling(source="x", mip=1, dim=16, stack_height=4, train_range=(0, 8))
    previous = signal.signal(signal.SIGTERM, functools.partial(helpers._terminated, os.getpid()))
    try:
        with pytest.raises(stops):
            gen_stack.write_stacks(tmp_path / "toy.h5", stacks(), 3, sampling)
    finally:
        signal.signal(signal.SIGTERM, previous)
        helpers._SIGINTS.clear()  # the records a run's process keeps of a SIGTERM
        helpers._TERMINATION.clear()
    assert list(tmp_path.iterdir()) == []


SLOW_GEN_STACK = """import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if the tests ignore SIGINT
import gen_stack, helpers
read = gen_stack.volume.read
gen_stack.volume.read = lambda *a: (time.sleep(0.1), read(*a))[1]
helpers.run_main(gen_stack.main)
"""


def test_ctrl_c_during_the_write_leaves_nothing_and_fails(tmp_path, tiny_volume):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_GEN_STACK, "--count", "8", "--read_threads", "1", "--source",
                             tiny_volume[0]["image"], "--mip", "1", "--dim", "16", "--stack_height", "4",
                             "--train_range", "0", "8", "--out_dir", str(out), "toy"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(out.glob(".toy_train_mip1.h5.partial-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stderr.strip().splitlines()[-1] == "interrupted"
    assert list(out.iterdir()) == []
