"""train_detector.py: the training crops can be put over the folds, which random crops seldom show; bad flags and an
existing --out are one-line errors before any data is built; a short run writes a detector that loads."""
import numpy as np
import pytest
import torch
from PIL import Image

import misalign
import phantom
import train_detector
from detect_defects import DefectNet, load_detector
from helpers import UserError


def test_fold_share_puts_every_crop_over_a_fold():
    stack = train_detector.damaged(phantom.make_phantom((6, 160, 160), seed=5), 64, seed=1000)
    image, defects, folds = stack
    assert image.shape == defects.shape == (6, 1, 64, 64)
    assert len(folds) and (defects[folds[:, 0], 0, folds[:, 1], folds[:, 2]] == misalign.FOLD).all()
    assert len(folds) == (defects == misalign.FOLD).sum()
    gen = torch.Generator().manual_seed(0)
    has_fold = lambda labels: (labels == misalign.FOLD).flatten(1).any(1)  # noqa: E731
    images, labels = train_detector.batch([stack], 24, 16, gen, fold_share=1.0)
    assert images.shape == (16, 1, 24, 24) and labels.shape == (16, 24, 24)
    assert has_fold(labels).all()
    assert not has_fold(train_detector.batch([stack], 24, 16, gen)[1]).all()  # random crops miss some


def test_blank_share_makes_one_side_of_every_crop_missing_data():
    stack = train_detector.damaged(phantom.make_phantom((2, 160, 160), seed=5), 64, seed=1000)
    images, labels = train_detector.batch([stack], 32, 8, torch.Generator().manual_seed(0), blank_share=1.0)
    missing = images[:, 0] == 0
    assert (missing.flatten(1).float().mean(1) > 1 / 16).all() and not missing.all()
    assert (labels[missing] == 0).all()
    sides = torch.stack([missing[:, 0].all(1), missing[:, -1].all(1),
                         missing[:, :, 0].all(1), missing[:, :, -1].all(1)])
    assert (sides.sum(0) == 1).all()  # one whole side, a wavy edge within


def _no_data(args):
    raise AssertionError("the training data was built before the flags were checked")


def test_an_existing_out_is_refused_without_overwrite_and_kept(tmp_path, monkeypatch):
    out = tmp_path / "defects.pt"
    out.write_bytes(b"a trained detector")
    monkeypatch.setattr(train_detector, "pool", _no_data)
    with pytest.raises(UserError, match="--overwrite"):
        train_detector.main(["--out", str(out), "--steps", "1"])
    assert out.read_bytes() == b"a trained detector"


@pytest.mark.parametrize("flags", [["--crop", "0"], ["--steps", "0"], ["--minutes", "-1"], ["--lr", "-1"],
                                   ["--fold_share", "2"], ["--blank_share", "-0.5"], ["--class_weights", "0", "0", "0"],
                                   ["--init", "no_such_detector.pt"], ["--device", "tpu"]])
def test_bad_flags_are_one_line_errors_before_any_data_is_built(tmp_path, monkeypatch, flags):
    monkeypatch.setattr(train_detector, "pool", _no_data)
    with pytest.raises(UserError):
        train_detector.main([*flags, "--out", str(tmp_path / "new.pt")])
    assert not (tmp_path / "new.pt").exists()


def test_real_sections_too_small_for_the_crop_are_one_line(tmp_path, monkeypatch):
    for z in range(3):
        Image.fromarray(np.full((64, 64), 9 + z, np.uint8)).save(tmp_path / f"{z}.png")
    monkeypatch.setattr(train_detector, "demo_sections", lambda z_range: np.ones((2, 512, 512), np.uint8))
    with pytest.raises(UserError, match=r"--crop 160: the snemi sections \(64 x 64 px\) leave 0 px within a margin "
                                        r"of 48 px on each side"):
        train_detector.main(["--snemi", str(tmp_path), "--crop", "160", "--out", str(tmp_path / "new.pt")])
    assert not (tmp_path / "new.pt").exists()


def test_a_short_run_trains_and_writes_a_detector_that_loads(tmp_path, monkeypatch):
    stack = train_detector.damaged(phantom.make_phantom((3, 160, 160), seed=5), 64, seed=1000)
    monkeypatch.setattr(train_detector, "pool", lambda args: [stack])
    out = train_detector.main(["--steps", "3", "--crop", "32", "--batch_size", "2", "--device", "cpu",
                               "--out", str(tmp_path / "new" / "d.pt")])  # its folder made (it was a traceback)
    archive = torch.load(out, weights_only=True)
    assert archive["steps"] == 3 and "--device cpu" in archive["recipe"]
    torch.manual_seed(0)  # main's --seed: the network it started from
    trained, fresh = load_detector(out).state_dict(), DefectNet().state_dict()
    assert trained.keys() == fresh.keys() and all(v.device.type == "cpu" for v in trained.values())
    assert any(not torch.equal(trained[k], fresh[k]) for k in trained)
    tiny = train_detector.main(["--minutes", "1e-9", "--crop", "32", "--batch_size", "2", "--device", "cpu",
                                "--out", str(tmp_path / "tiny.pt")])
    assert torch.load(tiny, weights_only=True)["steps"] == 1  # a budget spent before the first step still trains one
