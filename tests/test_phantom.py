"""The neuropil phantom: a deterministic 3-D object whose sections look like ssEM."""
import numpy as np
import pytest

import phantom as ph


def pearson(a, b):
    a, b = a.astype(np.float64) - a.mean(), b.astype(np.float64) - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.mark.parametrize("shape", [(4, 64, 64), (3, 50, 70)])
def test_shape_dtype_and_range(shape):
    volume = ph.make_phantom(shape, seed=0)
    assert volume.shape == shape and volume.dtype == np.uint8
    assert volume.min() >= 1  # 0 means missing data: the phantom has tissue everywhere
    assert volume.std() > 20  # not a flat picture


def test_deterministic_from_the_seed():
    first = ph.make_phantom((3, 64, 64), seed=5)
    assert np.array_equal(first, ph.make_phantom((3, 64, 64), seed=5))
    assert not np.array_equal(first, ph.make_phantom((3, 64, 64), seed=6))
    labels = ph.neurite_labels((3, 64, 64), seed=5)
    assert np.array_equal(labels, ph.neurite_labels((3, 64, 64), seed=5))


def test_neighbouring_sections_are_related_but_not_copies():
    volume = ph.make_phantom((12, 128, 128), seed=1)
    near = np.mean([pearson(volume[k], volume[k + 1]) for k in range(11)])
    far = np.mean([pearson(volume[k], volume[k + 8]) for k in range(4)])
    assert 0.2 < near < 0.85
    assert far < near - 0.15


def test_neurites_persist_over_sections_and_end():
    labels = ph.neurite_labels((12, 128, 128), seed=1)
    same = np.mean(labels[1:] == labels[:-1])
    assert 0.6 < same < 1.0  # most of a section is the same neurites as the one before
    assert len(set(np.unique(labels[0])) ^ set(np.unique(labels[-1]))) > 0  # some start or end


def test_membranes_are_dark():
    volume = ph.make_phantom((4, 128, 128), seed=2).astype(np.float64)
    labels = ph.neurite_labels((4, 128, 128), seed=2)
    boundary = np.zeros(labels.shape, bool)
    boundary[:, :, 1:] |= labels[:, :, 1:] != labels[:, :, :-1]
    boundary[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    interior = ~boundary
    for _ in range(5):  # pixels at least 5 px from a boundary
        interior[:, 1:-1, 1:-1] &= (interior[:, :-2, 1:-1] & interior[:, 2:, 1:-1]
                                    & interior[:, 1:-1, :-2] & interior[:, 1:-1, 2:])
    assert boundary.mean() > 0.02 and interior.mean() > 0.2
    assert volume[boundary].mean() < volume[interior].mean() - 40
