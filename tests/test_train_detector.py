"""train_detector.py: the training crops can be put over the folds, which random crops seldom show."""
import torch

import misalign
import phantom
import train_detector


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
