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
