"""The demo volume: built atomically, layers consistent, the ground-truth field re-aligns the image."""
import numpy as np
import torch

import demo
import volume
from helpers import warp


def test_tiny_demo_volume_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("SEAMLESS_DATA", str(tmp_path))
    demo.build(shape=(4, 96, 96))
    assert demo.is_built() and not list(tmp_path.glob(".demo.building-*"))
    layers = demo.ensure_demo()  # already built: nothing is rebuilt
    read = {name: volume.read(volume.open_volume(path), (0, 0, 0), (96, 96, 4)) for name, path in layers.items()}
    assert read["image"].dtype == np.uint8 and read["field"].shape == (4, 2, 96, 96)
    assert set(np.unique(read["defects"])) <= {0, 1, 2}
    image, field, aligned = (torch.from_numpy(read[k]).float() for k in ("image", "field", "aligned"))
    realigned = warp(image, field)
    tissue = torch.from_numpy(read["defects"][:, 0] == 0) & (realigned[:, 0] > 0)
    tissue[:, :12], tissue[:, -12:], tissue[:, :, :12], tissue[:, :, -12:] = False, False, False, False
    before = (image - aligned)[:, 0][tissue].abs().mean()
    after = (realigned - aligned)[:, 0][tissue].abs().mean()
    assert after < 8 and after < before / 3  # two interpolations blur the phantom's grain a little
    mip1 = volume.open_volume(layers["field"], mip=1)
    assert np.allclose(volume.read(mip1, (0, 0, 0), (48, 48, 4)),
                       read["field"].reshape(4, 2, 48, 2, 48, 2).mean((3, 5)) / 2, atol=1e-4)
