"""train.py under torchrun: 2 DDP processes (gloo, CPU) train the network one process trains, rank 0 alone writes.

The toy stacks have no missing data and no defects, and the field stays far below
half a pixel, so every pixel of every pair weighs the same in the loss: the
batch's weighted mean is then the mean of the two ranks' weighted means, and the
averaged DDP gradient is the one-process gradient. (With missing data or defects
each rank divides by its own weight sum, and the two differ slightly.)
"""
import contextlib
import os
import subprocess
import sys

import pytest
import torch

import distributed
import train
from models.archive import load_archive
from test_train import write_toy

FLAGS = ["--size", "2", "--batch_size", "2", "--epoch_size", "8", "--fall_time", "1", "--vis_interval", "4",
         "--no_augment", "--lambda6", "0.1", "--device", "cpu"]  # 3 stages (re-wrapped each), 4 steps each,
# two forwards a step; on the CPU also where a GPU is, so that 2 processes never need 2 GPUs


def torchrun(cwd, *argv) -> subprocess.CompletedProcess:
    """``train.py ARGV`` as 2 processes on this machine, one thread each."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           train.__file__, *map(str, argv)], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """3 epochs in one process (in ``one/``); the same in 2 processes, stopped after 2 epochs and resumed (``ddp/``)."""
    root = tmp_path_factory.mktemp("ddp")
    toy = write_toy(root / "toy.h5")
    flags = ["--dataset", toy, "--val_dataset", toy, *FLAGS]
    (root / "one").mkdir()
    (root / "ddp").mkdir()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # as each rank: 2 cores shared with the 2 ranks' runs, no oversubscription
        with contextlib.chdir(root / "one"):
            one = train.main([*map(str, flags), "--epochs", "3", "exp"])
    finally:
        torch.set_num_threads(threads)
    first = torchrun(root / "ddp", *flags, "--epochs", "2", "exp")
    resumed = torchrun(root / "ddp", "--resume", "--epochs", "3", "--device", "cpu", "exp")
    return dict(root=root, toy=toy, one=root / "one" / one, first=first, resumed=resumed)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_rank_0_alone_writes_one_archive_that_loads(runs):
    ddp = runs["root"] / "ddp"
    for result in (runs["first"], runs["resumed"]):
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("saved pt/exp.pt") == 1 and result.stdout.count("training exp") == 1
    assert sorted(p.name for p in (ddp / "pt").iterdir()) == ["exp.best.pt", "exp.pt"]  # no rank's temp files
    model, archive = load_archive(ddp / "pt" / "exp.pt")
    assert archive["epoch"] == 3 and archive["finished"] and archive["iteration"] == 12
    assert model.config["size"] == 2 and archive["args"]["batch_size"] == 2
    assert len(list((ddp / "runs" / "exp").glob("events.out.tfevents.*"))) == 2  # one per launch, rank 0's
    assert sorted(p.name for p in (ddp / "out" / "exp").glob("*_field.png")) == [
        f"it{i:06d}_field.png" for i in (4, 8, 12)]  # the resumed run keeps --vis_interval 4


def test_two_processes_train_the_network_one_process_trains(runs):
    ddp, ddp_archive = load_archive(runs["root"] / "ddp" / "pt" / "exp.pt")
    one, one_archive = load_archive(runs["one"])
    assert one_archive["iteration"] == ddp_archive["iteration"] == 12
    # Adam divides by the root of each gradient's running square: elements near its eps (1e-8) turn the
    # rounding of a different summation order into weight differences of ~1e-5 after 12 steps (gradients
    # agree to 1e-6 relative); a wrong split of the batch, or no gradient sync, moves weights by ~2e-3.
    for (name, a), b in zip(one.state_dict().items(), ddp.state_dict().values()):
        assert torch.allclose(a, b, rtol=0, atol=1e-4), name
    assert sorted(one_archive["history"]) == sorted(ddp_archive["history"])
    for key, values in one_archive["history"].items():  # per-epoch means over the whole batches
        assert ddp_archive["history"][key] == pytest.approx(values, rel=1e-5, abs=1e-9), key
    train.seed_everything(0)  # the initial weights, as train.py draws them
    start = train.Pyramid(size=2, k=3, corr_radius=3).state_dict().values()
    assert max(float((a - b).abs().max()) for a, b in zip(one.state_dict().values(), start)) > 1e-3  # 100x atol


def test_a_reused_name_is_one_line_and_a_failure_for_the_whole_run(runs):
    archive = runs["root"] / "ddp" / "pt" / "exp.pt"
    before = archive.read_bytes()
    result = torchrun(archive.parent.parent, "--dataset", runs["toy"], *FLAGS, "--epochs", "1", "exp")
    assert result.returncode != 0
    assert len(error_lines(result)) == 1 and "exists" in error_lines(result)[0]
    assert "train.py\", line" not in result.stderr  # no traceback through our code
    assert archive.read_bytes() == before


def test_a_global_batch_that_does_not_divide_is_one_line(runs, tmp_path):
    result = torchrun(tmp_path, "--dataset", runs["toy"], *FLAGS, "--batch_size", "3", "odd")
    assert result.returncode != 0
    assert len(error_lines(result)) == 1 and "--batch_size 3" in error_lines(result)[0]
    assert not (tmp_path / "pt").exists()


@pytest.mark.parametrize("n, epoch_size", [(6, 0), (6, 8), (5, 0), (7, 3)])
def test_each_step_of_the_ranks_is_one_step_of_one_process(n, epoch_size):
    one = train.epoch_pairs(n, epoch_size, seed=11)
    assert len(one) == (epoch_size or n) and set(one) <= set(range(n))
    ranks = [train.epoch_pairs(n, epoch_size, 11, rank, 2) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(one) // 2
    for k in range(len(one) // 2):  # global batch 2 = 1 pair from each rank
        assert sorted(r[k] for r in ranks) == sorted(one[2 * k:2 * k + 2])


def test_more_processes_than_gpus_is_one_line_before_any_group(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit) as exit_, distributed.process_group("cuda"):
        pass
    assert exit_.value.code == 2 and not torch.distributed.is_initialized()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "2 processes" in err[0] and "has 1" in err[0] and err[0].startswith("error:")


@pytest.mark.parametrize("environ, interfaces, expected", [
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, ["lo", "eth0"], "lo"),  # one machine: the loopback
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, ["lo0", "en0"], "lo0"),  # macOS names it lo0
    ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, ["lo", "eth0"], None),  # several machines: gloo decides
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GLOO_SOCKET_IFNAME": "eth0"}, ["lo"], "eth0"),  # the user's
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, ["eth0"], None),  # no loopback
])
def test_gloo_uses_the_loopback_when_every_rank_is_on_this_machine(environ, interfaces, expected):
    distributed.use_loopback_for_gloo(environ, interfaces)
    assert environ.get("GLOO_SOCKET_IFNAME") == expected
