"""train.py end to end on a tiny HDF5: outputs, resume, refusals, lineage; net_hist.py on the result."""
import io
import math
import os
import socket
import sys
import threading

import h5py
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

import data
import demo
import gen_stack
import loss
import net_hist
import train
from conftest import corrupt_chunk, run_script
from helpers import UserError, warp
from models import Pyramid
from models.archive import load_archive, save_archive


def write_toy(path, n=2, s=4, d=32, shift=(1.5, -1.0), **storage):
    """Sections of one smooth texture, section k moved by k * shift; ``fields`` re-align each one.

    ``storage``: h5py's ``create_dataset`` options for ``images`` (e.g. chunks and compression, as gen_stack.py's).
    """
    g = torch.Generator().manual_seed(0)
    texture = torch.nn.functional.interpolate(torch.rand(1, 1, d // 4, d // 4, generator=g), size=(d, d),
                                              mode="bicubic", align_corners=False)
    k = (torch.arange(n * s) % s).float().view(-1, 1, 1, 1)
    fields = torch.tensor(shift).view(1, 2, 1, 1) * k * torch.ones(1, 2, d, d)
    images = warp(texture.expand(n * s, -1, -1, -1), -fields, padding_mode="border")
    images = (images - images.min()) / (images.max() - images.min()) * 200 + 30
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images.round().to(torch.uint8).view(n, s, d, d).numpy(), **storage)
        f["fields"] = fields.view(n, s, 2, d, d).numpy()
    return path


@pytest.fixture
def toy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return write_toy(tmp_path / "toy.h5")


def run(toy, name, *extra):
    return train.main(["--dataset", str(toy), "--val_dataset", str(toy), "--size", "2", "--batch_size", "2",
                       "--fall_time", "1", "--vis_interval", "2", "--no_augment", *extra, name])


def test_training_writes_archive_logs_and_pictures(toy, tmp_path):
    path = run(toy, "exp", "--epochs", "3")
    model, archive = load_archive(path)
    assert archive["epoch"] == 3 and archive["finished"]
    assert len(archive["history"]["similarity"]) == 3 and "val_epe" in archive["history"]
    assert archive["args"]["size"] == 2 and model.config["size"] == 2
    assert list((tmp_path / "runs" / "exp").glob("events.out.tfevents.*"))
    assert list((tmp_path / "out" / "exp").glob("*_flicker.gif")) and list((tmp_path / "out" / "exp").glob("*_field.png"))
    logs = EventMultiplexer().AddRunsFromDirectory(str(tmp_path / "runs")).Reload()
    text = {tag: logs.Tensors("exp", tag)[0].tensor_proto.string_val[0].decode()
            for tag in logs.Runs()["exp"]["tensors"] if tag.startswith("run/")}
    assert text["run/command/text_summary"].startswith("`python ")
    assert "| lambda1 | `0.1` |" in text["run/arguments/text_summary"]  # the arguments as a markdown table
    hparams = logs.PluginRunToTagToContent("hparams")["exp"]  # in the run itself, not a sub-run
    assert b"epoch/val_epe" in hparams["_hparams_/experiment"] and b"lambda1" in hparams["_hparams_/session_start_info"]
    assert "pair/field" in logs.PluginRunToTagToContent("images")["exp"]  # the field picture with its key


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_an_epoch_draws_a_progress_bar_on_a_terminal_only_and_clears_it(toy, monkeypatch, capsys):
    run(toy, "quiet", "--epochs", "1", "--vis_interval", "0")
    assert capsys.readouterr().err == ""  # not a terminal (a log file, CI): no bar
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    run(toy, "shown", "--epochs", "1", "--vis_interval", "0")
    drawn = terminal.getvalue()
    assert "epoch 0:" in drawn and "/3 " in drawn  # 6 pairs, 2 a step
    *_, last, end = drawn.split("\r")
    assert last.strip() == "" and end == ""  # the bar's line is blanked: the epoch's line prints on a clean line
    assert capsys.readouterr().out.splitlines()[-3].startswith("epoch 0 level 1: similarity")


def test_resume_gives_the_same_network_as_an_uninterrupted_run(toy):
    # on the CPU: CUDA's grid_sample backward adds in a varying order, so on a GPU the two differ by rounding
    straight, _ = load_archive(run(toy, "straight", "--epochs", "3", "--device", "cpu"))
    saved = load_archive(run(toy, "interrupted", "--epochs", "2", "--device", "cpu"))[1]["iteration"]
    resumed, archive = load_archive(train.main(["--resume", "--epochs", "3", "--device", "cpu", "interrupted"]))
    assert archive["epoch"] == 3
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    starts = [event.step for path in sorted((toy.parent / "runs" / "interrupted").glob("events.*"))
              for event in EventFileLoader(str(path)).Load()
              if event.HasField("session_log") and event.session_log.status == SessionLog.START]
    assert starts == [saved]  # the resume hides from TensorBoard what an interrupted run logged past its last save


def test_resume_applies_the_flags_given_again_and_records_them_in_the_lineage(toy, capsys):
    _, first = load_archive(run(toy, "exp", "--epochs", "1", "--fall_time", "0"))  # one stage: Adam's state is kept
    path = train.main(["--resume", "--epochs", "2", "--lr", "0.0001", "--lambda1", "0.2", "--size", "2", "--dataset",
                       str(toy), "exp"])  # --size and --dataset as archived: accepted
    assert "resuming pt/exp.pt at epoch 1 with --epochs 1 -> 2, --lambda1 0.1 -> 0.2, --lr 0.0003 -> 0.0001" \
        in capsys.readouterr().out
    _, archive = load_archive(path)
    assert archive["epoch"] == 2 and archive["optimizer"]["state"]  # Adam's moments came through the resume
    assert [group["lr"] for group in archive["optimizer"]["param_groups"]] == [0.0001]
    assert archive["args"]["lr"] == 0.0001 and archive["args"]["lambda1"] == 0.2
    assert archive["args"]["batch_size"] == 2 and archive["args"]["vis_interval"] == 2  # not given: as archived
    resume, = archive["summary"]["resumes"]
    assert resume["epoch"] == 1 and resume["iteration"] == first["iteration"]
    assert resume["changed"] == {"epochs": [1, 2], "lambda1": [0.1, 0.2], "lr": [0.0003, 0.0001]}
    assert archive["summary"]["params"]["lr"] == 0.0001
    net_hist.main([str(path)])
    assert "resumed at epoch 1" in capsys.readouterr().out


def test_resume_refuses_to_change_the_network(toy):
    path = run(toy, "exp", "--epochs", "1")
    before = path.read_bytes()
    result = run_script(train.__file__, "--resume", "--epochs", "2", "--size", "3", "exp", cwd=toy.parent)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --size 3 differs from the run's 2: a resumed run keeps its --size; to change it, start a new "
        "experiment with --state_archive pt/exp.pt"]
    for flags in (["--k", "5"], ["--trunc", "1"], ["--dataset", str(write_toy(toy.parent / "other.h5"))]):
        with pytest.raises(UserError, match=f"{flags[0]} .* differs from the run's"):
            train.main(["--resume", "--epochs", "2", *flags, "exp"])
    assert path.read_bytes() == before


def test_reusing_a_name_is_refused_and_loses_nothing(toy):
    path = run(toy, "exp", "--epochs", "1")
    before = path.read_bytes()
    result = run_script(train.__file__, "--dataset", toy, "--size", "2", "--epochs", "1", "exp", cwd=toy.parent)
    assert result.returncode == 2 and "exists" in result.stderr.strip().splitlines()[-1]
    assert path.read_bytes() == before


@pytest.mark.parametrize("flags, message", [
    (["--size", "2", "--trunc", "2"], "--trunc"),
    (["--lambda1", "-1"], "--lambda1"),
    (["--lambda0", "0", "--lambda_gt", "0"], "--lambda_gt"),  # supervised only, with no supervision
    (["--lambda0", "-1"], "--lambda0"),
    (["--fine_tuning"], "--state_archive"),
    (["--state_archive", "missing.pt"], "missing.pt"),
    (["--size", "7"], "2^(size-1)"),  # 32 px sections
    (["--minutes", "-1"], "--minutes"),
    (["--fine_tuning_lr_factor", "-1"], "--fine_tuning_lr_factor must be positive"),
    (["--clip", "-1"], "--clip must be >= 0"),  # a negative norm would flip the gradients: ascent
    (["--epoch_size", "-1", "--num_workers", "-1"], "--epoch_size, --num_workers must be >= 0"),
    (["--blur", "-1", "--grain", "-0.5"], "--blur, --grain must be >= 0"),
    (["--average_from", "-1"], "--average_from -1 is an epoch: 0 or more"),
    (["--average_from", "5", "--epochs", "5"], "below --epochs 5 (epochs 0..4 run), or no mean is kept"),
    (["--p_jitter", "2"], "--p_jitter 2.0 is a probability"),
    (["--fold_prob", "-0.5"], "--fold_prob -0.5 is a probability"),
    (["--fold_width", "30", "10"], "--fold_width 30 10: expected 0 < LO <= HI px"),
    (["--padding", "16"], "--padding 16 px leaves nothing of the 32 px sections"),  # the loss would be 0
    (["--resume", "--overwrite"], "--resume continues pt/NAME.pt and --overwrite replaces it: choose one"),
    (["--hm"], "--hm picks a dataset NAME's highest-mip file"),  # was ignored: the .h5 given was used as it is
    (["--epoch_size", "2", "--batch_size", "8"], "--epoch_size 2 is smaller than --batch_size 8: an epoch would "
                                                 "train no step"),  # it was saved as trained, 0 iterations
])
def test_bad_flags_are_one_line_errors(toy, flags, message, run_command):
    result = run_command(train, "--dataset", toy, *flags, "bad", cwd=toy.parent)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and last.startswith("error:") and message in last
    assert "Traceback" not in result.stderr and not (toy.parent / "pt" / "bad.pt").exists()


def test_an_experiment_named_like_its_archive_is_one_line(toy, run_command):
    result = run_command(train, "--dataset", toy, "bad.pt", cwd=toy.parent)
    assert result.returncode == 2 and result.stderr.strip() == ("error: experiment name 'bad.pt': give it without .pt "
                                                                "(the network is written to pt/bad.pt)")
    assert not (toy.parent / "pt").exists()


def test_an_experiment_named_like_another_s_best_or_mean_network_is_refused(toy, run_command):
    """``exp.best`` would share ``pt/exp.best.pt`` with experiment ``exp`` (whose resumed run deletes it, or which
    ``--resume exp.best`` would write over)."""
    for name in ("exp.best", "exp.avg"):
        result = run_command(train, "--dataset", toy, name, cwd=toy.parent)
        assert result.returncode == 2 and result.stderr.strip() == (
            f"error: experiment name '{name}': a name ending .best or .avg would share its files with experiment "
            f"'exp' (its {name[4:]} network, pt/{name}.pt); choose another")
    assert not (toy.parent / "pt").exists()


def test_a_copied_archive_resumes_under_its_own_name_and_the_same_data_spelled_otherwise(toy, capsys):
    """``cp pt/exp.pt pt/copy.pt; train.py --resume copy``: the run is ``copy`` (its logs, its archive), not the
    name stored inside; ``--dataset`` given again as another spelling of the same file is no change."""
    path = run(toy, "exp", "--epochs", "1")
    (path.parent / "copy.pt").write_bytes(path.read_bytes())
    before, _ = path.read_bytes(), capsys.readouterr()
    train.main(["--resume", "--epochs", "2", "--dataset", toy.name, "copy"])  # archived: its absolute path
    out = capsys.readouterr().out
    assert "resuming pt/copy.pt at epoch 1 with --epochs 1 -> 2\ntraining copy:" in out  # --dataset: no change
    _, archive = load_archive(path.parent / "copy.pt")
    assert archive["epoch"] == 2 and archive["summary"]["name"] == "copy" and path.read_bytes() == before
    assert (toy.parent / "runs" / "copy").is_dir()


def test_an_experiment_another_process_is_training_is_refused(toy, run_command):
    """Two runs of one name at once wrote the same files: the second is refused while the first holds
    ``pt/.NAME.lock``, which goes when a run ends."""
    lock = toy.parent / "pt" / ".exp.lock"
    lock.parent.mkdir()
    lock.write_text(f"{os.getpid()}@{socket.gethostname()}")  # this test's process: alive
    result = run_command(train, "--dataset", toy, "--size", "2", "--epochs", "1", "exp", cwd=toy.parent)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        f"error: experiment exp is in use by process {os.getpid()}@{socket.gethostname()} (pt/.exp.lock): wait for "
        "it to end, or delete pt/.exp.lock if that process is gone")
    assert sorted(p.name for p in lock.parent.iterdir()) == [".exp.lock"] and not (toy.parent / "runs").exists()
    lock.unlink()
    run(toy, "exp", "--epochs", "1")
    assert not lock.exists()


def test_resuming_what_is_not_a_network_is_one_line(toy, run_command):
    result = run_command(train, "--dataset", toy, "--resume", "none", cwd=toy.parent)
    assert result.returncode == 2 and result.stderr.strip() == "error: nothing to resume: pt/none.pt does not exist"
    (toy.parent / "pt" / "folder.pt").mkdir(parents=True)
    result = run_command(train, "--dataset", toy, "--resume", "folder", cwd=toy.parent)
    assert result.stderr.strip() == "error: nothing to resume: pt/folder.pt is a directory, not a network archive"


def test_an_experiment_whose_outputs_cannot_be_written_stops_before_training(toy):
    (toy.parent / "runs").write_text("a file where the logs' folder goes")
    result = run_script(train.__file__, "--dataset", toy, "--epochs", "1", "exp", cwd=toy.parent)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "experiment exp:" in last and "cannot write there" in last
    assert "Traceback" not in result.stderr and not (toy.parent / "pt" / "exp.pt").exists()


FLOAT_FLAGS = ("--lambda0", "--lambda1", "--lambda2", "--lambda3", "--lambda4", "--lambda5", "--lambda6",
               "--lambda_gt", "--mask_neighborhood_radius", "--mask_smooth_radius", "--lr", "--fine_tuning_lr_factor",
               "--clip", "--max_shift", "--max_angle", "--p_jitter", "--elastic", "--minutes", "--fold_prob")


@pytest.mark.parametrize("flag", FLOAT_FLAGS)
def test_a_float_flag_that_is_not_finite_is_refused_when_parsed(flag, capsys):
    assert getattr(train.parse_args([flag, "0.5", "x"]), flag[2:]) == 0.5
    for value in ("nan", "inf", "-inf", "NaN"):
        with pytest.raises(SystemExit) as exit_:
            train.parse_args([f"{flag}={value}", "x"])  # '--lr -inf' would read '-inf' as a flag
        last = capsys.readouterr().err.strip().splitlines()[-1]
        kind = "a number" if value.lower() == "nan" else "a finite number"
        assert exit_.value.code == 2 and last.endswith(f"argument {flag}: '{value}' is not {kind}")


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "1e39", "'1e39' is beyond float32's range (3.4e38)"),  # was an overflow traceback
    ("--seed", "-1", "'-1': a seed is an integer from 0 to 2^63 - 1"),
    ("--seed", str(2 ** 64), f"'{2 ** 64}': a seed is an integer from 0 to 2^63 - 1"),  # an overflow traceback
])
def test_a_number_out_of_range_is_refused_when_parsed(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.parse_args([f"{flag}={value}", "x"])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip().endswith(f"argument {flag}: {message}")


def test_a_learning_rate_that_is_not_a_number_is_one_line_and_writes_nothing(toy):
    result = run_script(train.__file__, "--dataset", toy, "--lr", "nan", "bad", cwd=toy.parent)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "train.py: error: argument --lr: 'nan' is not a number"
    assert not (toy.parent / "pt").exists() and not (toy.parent / "runs").exists()


def test_an_escaping_experiment_name_is_refused(toy):
    result = run_script(train.__file__, "--dataset", toy, "--epochs", "1", "../escaped", cwd=toy.parent)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: experiment name '../escaped' must be a plain name (no '/', not '..'): it names files inside a folder"]
    assert not list(toy.parent.glob("escaped*")) and not (toy.parent / "pt").exists()


def test_true_fields_asked_of_a_dataset_without_them_is_a_one_line_error(toy):
    bare = toy.parent / "bare.h5"
    with h5py.File(toy) as f, h5py.File(bare, "w") as g:
        g["images"] = f["images"][:]  # the same sections, no fields, not --registered
    for flags, message in ((["--dataset", bare, "--lambda_gt", "1"], "--lambda_gt 1.0 needs true fields: no "
                            "--dataset has them (nor is --registered)"),
                           (["--dataset", toy, "--val_dataset", bare], f"--val_dataset {bare} has no true fields")):
        result = run_script(train.__file__, *flags, "--epochs", "1", "bad", cwd=toy.parent)
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [
            "error: " + message + ("" if "lambda_gt" in message else
                                   " (nor is it --registered): held-out pairs are scored against them")]
    assert not (toy.parent / "pt" / "bad.pt").exists()


def test_the_defaults_that_depend_on_the_data_follow_it(toy):
    """Not given: ``--lambda_gt`` 1 on a dataset with true fields, 0 (self-supervised) on one without; ``--fall_time``
    0 (all levels at once) with the supervised term, 2 (staged) without; ``--p_jitter`` 1 on a --registered
    dataset (a pair left alone has a true field of zero), else 0.5. The archive records what was used."""
    bare, registered = toy.parent / "bare.h5", toy.parent / "registered.h5"
    with h5py.File(toy) as f, h5py.File(bare, "w") as g, h5py.File(registered, "w") as r:
        g["images"] = r["images"] = f["images"][:]
        r.attrs["registered"] = True

    def args_of(dataset, name):
        return load_archive(train.main(["--dataset", str(dataset), "--size", "2", "--batch_size", "2",
                                        "--vis_interval", "0", "--epochs", "1", name]))[1]["args"]

    chosen = {name: {key: args[key] for key in ("lambda_gt", "fall_time", "p_jitter")}
              for name, args in (("fields", args_of(toy, "a")), ("bare", args_of(bare, "b")),
                                 ("registered", args_of(registered, "c")))}
    assert chosen == {"fields": {"lambda_gt": 1.0, "fall_time": 0, "p_jitter": 0.5},
                      "bare": {"lambda_gt": 0.0, "fall_time": 2, "p_jitter": 0.5},
                      "registered": {"lambda_gt": 1.0, "fall_time": 0, "p_jitter": 1.0}}


def test_a_folder_as_dataset_is_a_one_line_error(tmp_path):
    result = run_script(train.__file__, "--dataset", tmp_path, "x", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: --dataset {tmp_path}: expected an .h5 file or a NAME of the data directory's NAME_*_mip*.h5"]


def test_corrupt_dataset_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5 at all")
    result = run_script(train.__file__, "--dataset", bad, "x", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "bad.h5" in result.stderr


def test_a_missing_demo_dataset_is_made_with_gen_stack_write_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("SEAMLESS_DATA", str(tmp_path))
    calls = []
    monkeypatch.setattr(gen_stack, "write_dataset", lambda *args: calls.append(args) or tmp_path / "made.h5")
    assert train.resolve_dataset("demo", split="test") == tmp_path / "made.h5"
    assert calls == [("demo", gen_stack.Sampling(source="demo", count=demo.DATASET_COUNT["test"], test=True))]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_chunk_in_the_middle_of_the_dataset_is_one_line_and_leaves_no_run(tmp_path, workers):
    toy = write_toy(tmp_path / "toy.h5", chunks=(1, 1, 32, 32), compression="lzf")  # as gen_stack.py writes
    with h5py.File(toy, "a") as f:
        f["slice_std"] = data.slice_std(f["images"][:]).numpy()
    corrupt_chunk(toy, "images", (1, 2, 0, 0))  # stack 1, section 2: read by pairs (1, 1) and (1, 2)
    (tmp_path / "runs" / "earlier").mkdir(parents=True)  # another run's logs: left alone
    result = run_script(train.__file__, "--dataset", toy, "--size", "2", "--batch_size", "2", "--no_augment",
                        "--vis_interval", "1", "--num_workers", workers, "exp", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert f"error: dataset {toy}: cannot read 'images' of stack 1, sections " in result.stderr
    assert not (tmp_path / "pt" / "exp.pt").exists()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["earlier"]
    assert not (tmp_path / "out" / "exp").exists()


def test_a_failed_run_removes_only_the_folders_it_made_and_only_before_it_saves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "a").mkdir(parents=True)  # an earlier run's pictures
    with pytest.raises(KeyboardInterrupt), train.logs_follow_the_network("a"):
        (tmp_path / "runs" / "a").mkdir(parents=True)
        (tmp_path / "out" / "a" / "new.png").touch()
        raise KeyboardInterrupt
    assert not (tmp_path / "runs" / "a").exists() and (tmp_path / "out" / "a" / "new.png").exists()
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "b.pt").touch()
    with pytest.raises(UserError), train.logs_follow_the_network("b"):  # fails after an epoch was saved: logs kept
        (tmp_path / "runs" / "b").mkdir()
        (tmp_path / "pt" / "b.pt").unlink()
        (tmp_path / "pt" / "b.pt").touch()  # a save replaces the archive
        raise UserError("diverged")
    assert (tmp_path / "runs" / "b").exists()


def test_overwrite_deletes_the_replaced_networks_logs_once_it_saves_and_not_before(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for folder in ("runs/c/old_run", "out/c"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "runs" / "c" / "events.old").touch()
    (tmp_path / "out" / "c" / "old.png").touch()
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "c.pt").write_bytes(b"the old network")
    with pytest.raises(UserError), train.logs_follow_the_network("c", replacing=True):
        (tmp_path / "runs" / "c" / "events.new").touch()
        raise UserError("diverged before its first epoch")  # the old network stays: so do its logs
    assert sorted(p.name for p in (tmp_path / "runs" / "c").iterdir()) == ["events.new", "events.old", "old_run"]
    with train.logs_follow_the_network("c", replacing=True):
        (tmp_path / "runs" / "c" / "events.newer").touch()
        (tmp_path / "pt" / "c.pt").unlink()
        (tmp_path / "pt" / "c.pt").write_bytes(b"the new network")
    assert [p.name for p in (tmp_path / "runs" / "c").iterdir()] == ["events.newer"]
    assert not list((tmp_path / "out" / "c").iterdir())


def test_a_run_killed_before_it_saved_leaves_logs_the_next_run_of_its_name_replaces(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "d").mkdir(parents=True)
    (tmp_path / "runs" / "d" / "events.killed").touch()  # no pt/d.pt: a run killed (SIGKILL) before its first save
    with train.logs_follow_the_network("d"):
        (tmp_path / "runs" / "d" / "events.new").touch()
        (tmp_path / "pt").mkdir()
        (tmp_path / "pt" / "d.pt").write_bytes(b"the network")
    assert [p.name for p in (tmp_path / "runs" / "d").iterdir()] == ["events.new"]


def test_fine_tuning_grows_the_net_and_records_the_lineage(toy, capsys):
    parent = run(toy, "parent", "--epochs", "2")
    child = train.main(["--dataset", str(toy), "--state_archive", str(parent), "--size", "3", "--fine_tuning",
                        "--epochs", "1", "--batch_size", "2", "--no_augment", "--vis_interval", "0", "child"])
    model, archive = load_archive(child)
    assert model.config["size"] == 3
    assert [e["name"] for e in net_hist.lineage(archive)] == ["parent", "child"]
    net_hist.main([str(child)])
    printed = capsys.readouterr().out
    assert printed.index("parent") < printed.index("child") and "lambda1=" in printed
    # --export: the same network and lineage, no optimizer state, smaller
    lean = child.parent / "lean.pt"
    net_hist.main([str(child), "--export", str(lean)])
    exported_model, exported = load_archive(lean)
    assert exported["optimizer"] is None and lean.stat().st_size < child.stat().st_size
    assert [e["name"] for e in net_hist.lineage(exported)] == ["parent", "child"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), exported_model.state_dict().values()))
    with pytest.raises(UserError, match="--plot .*curves.xyz: not a picture file matplotlib writes"):
        net_hist.main([str(child), "--plot", str(child.parent / "curves.xyz")])
    before = parent.read_bytes()
    with pytest.raises(UserError, match="exists"):  # an export never replaces a network
        net_hist.main([str(child), "--export", str(parent)])
    assert parent.read_bytes() == before


def test_net_hist_refuses_an_unwritable_plot_or_export_in_one_line(tmp_path):
    archive = save_archive(tmp_path / "net.pt", Pyramid(size=2), summary={"name": "net", "history": {"loss": [1.0]}})
    a_file = tmp_path / "a_file"
    a_file.touch()
    for flag, path, reason in (("--plot", a_file / "curves.png", f"{a_file} is not a directory"),
                               ("--plot", tmp_path, "Is a directory"),
                               ("--export", a_file / "lean.pt", f"{a_file} is not a directory")):
        result = run_script(net_hist.__file__, archive, flag, path)
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.strip() == f"error: {flag} {path}: cannot write there ({reason})"


def test_staged_schedule():
    stages = [train.stage_for_epoch(e, size=3, trunc=0, skip=0, fall_time=2, fine_tuning=False) for e in range(8)]
    assert [s.level for s in stages] == [2, 2, 1, 1, 0, 0, 0, 0]
    assert stages[0].train_levels == (2,) and stages[-1].train_levels == (0, 1, 2)
    tuned = train.stage_for_epoch(0, size=3, trunc=1, skip=0, fall_time=2, fine_tuning=True)
    assert tuned.level == 1 and tuned.train_levels == (1, 2)


@pytest.mark.slow
def test_the_seeds_fine_tuning_command_runs(tmp_path, monkeypatch):
    """The seed README's fine-tuning line, as written, with pt/demo.pt for pt/matriarch_na3.pt.

    Only ``--epochs 1 --epoch_size 8`` are appended to keep it short; it needs the demo
    dataset (built on first use).
    """
    from pathlib import Path
    archive = Path(train.__file__).resolve().parent / "pt" / "demo.pt"
    monkeypatch.chdir(tmp_path)
    seed_line = (f"--state_archive {archive} --size 8 --lambda1 2 --lambda2 0.04 --lambda3 0 --lambda4 5 "
                 "--lambda5 0 --mask_smooth_radius 75 --mask_neighborhood_radius 75 --lr 0.0003 --trunc 0 "
                 "--fine_tuning --hm --padding 0 --vis_interval 5 --lambda6 1 fine_tune_example").split()
    path = train.main(seed_line[:-1] + ["--epochs", "1", "--epoch_size", "8", seed_line[-1]])
    model, archive_dict = load_archive(path)
    assert model.config["size"] == 8 and archive_dict["args"]["lambda6"] == 1
    assert [e["name"] for e in net_hist.lineage(archive_dict)][-1] == "fine_tune_example"


def test_several_datasets_are_mixed_and_different_sizes_need_a_crop(toy, tmp_path):
    large = write_toy(tmp_path / "large.h5", n=1, d=48, shift=(-1.0, 0.5))
    common = ["--dataset", str(toy), "--dataset", str(large), "--size", "2", "--batch_size", "2", "--epochs", "1",
              "--vis_interval", "0", "--no_augment"]
    with pytest.raises(UserError, match="different sizes .*32x32, 48x48.* --crop"):
        train.main([*common, "mixed"])
    args, _, _, _, dataset, _ = train.setup(train.parse_args([*common, "--crop", "32", "mixed"]))
    assert args.dataset == [str(toy), str(large)] and len(dataset) == 2 * 3 + 1 * 3  # pairs of 4-section stacks
    assert {dataset[i]["src"].shape[-1] for i in range(len(dataset))} == {32}
    _, archive = load_archive(train.main([*common, "--crop", "32", "mixed"]))
    assert archive["args"]["dataset"] == [str(toy), str(large)] and archive["epoch"] == 1


@pytest.mark.parametrize("prob", [0, 1])
def test_the_augmentation_folds_as_often_and_as_wide_as_asked(toy, prob):
    flags = ["--dataset", str(toy), "--size", "2", "--p_jitter", "0", "--fold_prob", str(prob),
             "--fold_width", "12", "12"]
    dataset = train.setup(train.parse_args([*flags, "folds"]))[4]
    assert dataset.augment.p_fold == prob and dataset.augment.defect_params.fold_width == (12, 12)
    folded = [bool((dataset[i]["src_defects"] == 2).any()) for i in range(len(dataset))]
    assert folded == [bool(prob)] * len(dataset)


def test_the_epoch_with_the_lowest_held_out_epe_is_kept(toy, tmp_path, capsys):
    path = run(toy, "exp", "--epochs", "4", "--lr", "0.003")  # too large a step: the held-out EPE goes down, then up
    _, last = load_archive(path)
    _, archive = load_archive(tmp_path / "pt" / "exp.best.pt")
    val = last["history"]["val_epe"]
    assert archive["epoch"] == int(np.argmin(val)) + 1 and archive["history"]["val_epe"] == val[:archive["epoch"]]
    assert f"lowest held-out EPE {min(val):.4g} px at epoch {archive['epoch'] - 1}" in capsys.readouterr().out
    with pytest.raises(UserError, match="exp.best.pt exists"):  # the best of a run is as safe as its last epoch
        (tmp_path / "pt" / "exp.pt").unlink()
        run(toy, "exp", "--epochs", "1")
    run(toy, "exp", "--epochs", "1", "--overwrite", "--val_dataset", "")
    assert not (tmp_path / "pt" / "exp.best.pt").exists()  # no held-out data: no best, and not the old one


def test_average_from_keeps_the_mean_of_the_epochs_weights_across_a_resume(toy, capsys):
    path = run(toy, "avg", "--epochs", "2", "--average_from", "1")
    first = load_archive(path)[0].state_dict()  # epoch 1's weights: the mean of one epoch
    mean, archive = load_archive(train.average_path(path))
    assert archive["averaged"]["epochs"] == 1 and archive["averaged"]["val_epe"] > 0
    assert all(torch.equal(mean.state_dict()[k], first[k]) for k in first)
    run(toy, "avg", "--epochs", "3", "--resume", "--average_from", "2")  # epoch 2, added to the kept mean
    second = load_archive(path)[0].state_dict()
    mean, archive = load_archive(train.average_path(path))
    assert archive["averaged"]["epochs"] == 2 and "the mean of epochs 1..2" in capsys.readouterr().out
    assert not torch.equal(first["encoder.stages.0.0.weight"], second["encoder.stages.0.0.weight"])
    assert all(torch.allclose(mean.state_dict()[k], (first[k] + second[k]) / 2, atol=1e-7) for k in first)
    net_hist.main([str(train.average_path(path))])
    assert "these weights: the mean of epochs 1..2, val_epe=" in capsys.readouterr().out
    with pytest.raises(UserError, match="exists"):  # a new run of the same name is refused, the mean kept
        run(toy, "avg", "--epochs", "1")


def test_a_loss_that_diverges_says_whether_an_epoch_was_kept(toy, monkeypatch):
    pair_loss = loss.pair_loss

    def diverging(*args, **kwargs):  # finite in epoch 0, NaN from epoch 1 on
        total, log, pictures = pair_loss(*args, **kwargs)
        if calls.append(1) or len(calls) > 4:  # 8 pairs, batch 2: 4 steps an epoch
            total, log = total * math.nan, {**log, "total": math.nan}
        return total, log, pictures

    calls = []
    monkeypatch.setattr(loss, "pair_loss", diverging)
    with pytest.raises(UserError, match="epoch 1: the loss is not finite .*pt/a.pt keeps the last finite epoch"):
        run(toy, "a", "--epochs", "3")
    calls[:] = [1] * 4
    with pytest.raises(UserError, match="epoch 0: the loss is not finite .*no epoch was saved: start again"):
        run(toy, "b", "--epochs", "3")
    assert not (toy.parent / "pt" / "b.pt").exists() and not (toy.parent / "runs" / "b").exists()
    # the failed runs' log writers are closed: no thread of theirs writes into the deleted logs' folder
    assert not [t for t in threading.enumerate() if type(t).__module__.startswith("tensorboard")]


def test_pairs_misaligned_past_each_other_are_refused_after_an_epoch_that_trained_nothing(toy):
    with pytest.raises(UserError, match=r"epoch 0: no pixel of its pairs held data in both sections once misaligned "
                                        r"\(--max_shift 1e\+30"):
        train.main(["--dataset", str(toy), "--size", "2", "--batch_size", "2", "--p_jitter", "1", "--max_shift",
                    "1e30", "--epochs", "2", "nothing"])
    assert not (toy.parent / "pt" / "nothing.pt").exists()


def test_val_dataset_takes_a_name_as_dataset_does_its_test_file(toy, tmp_path, monkeypatch):
    monkeypatch.setenv("SEAMLESS_DATA", str(tmp_path))
    write_toy(tmp_path / "tiny_test_mip0.h5")
    path = train.main(["--dataset", str(toy), "--val_dataset", "tiny", "--size", "2", "--batch_size", "2",
                       "--fall_time", "1", "--no_augment", "--epochs", "1", "named"])
    _, archive = load_archive(path)
    assert archive["args"]["val_dataset"] == str(tmp_path / "tiny_test_mip0.h5")
    with pytest.raises(UserError, match="no dataset 'nothing'"):
        train.main(["--dataset", str(toy), "--val_dataset", "nothing", "--size", "2", "--epochs", "1", "other"])


def test_net_hist_lists_a_folder_and_names_a_defect_detector_for_what_it_is(tmp_path):
    from detect_defects import DefectNet, save_detector

    save_detector(tmp_path / "defects.pt", DefectNet())
    (tmp_path / "junk.pt").write_bytes(b"not torch")
    listing = net_hist.list_archives(tmp_path).splitlines()
    assert listing == [f"{'defects.pt':32s} (a defect detector: detect_defects.py --archive)",
                       f"{'junk.pt':32s} (not a readable SEAMLeSS archive)"]
