"""Pictures: the pair flicker's frames and their order, the field and weight PNGs, the loss-curve figure."""
import numpy as np
import torch
from PIL import Image, ImageSequence

import vis


def test_pair_pictures_flicker_is_target_warped_source_on_one_grey_scale(tmp_path):
    target, warped, source = torch.zeros(8, 10), torch.full((8, 10), 0.5), torch.ones(8, 10)
    field = torch.zeros(2, 8, 10)
    field[0] = 3.0  # every pixel reads 3 px to the right
    written = vis.save_pair_pictures(tmp_path, "pair", source, target, warped, field, torch.rand(8, 10))
    assert [p.name for p in written] == ["pair_flicker.gif", "pair_field.png", "pair_weights.png"]
    frames = [np.asarray(f.convert("L")) for f in ImageSequence.Iterator(Image.open(written[0]))]
    assert [f.shape for f in frames] == [(8, 10)] * 3
    assert [int(f.mean().round()) for f in frames] == [0, 127, 255]  # one stretch for all three frames
    rgb = np.asarray(Image.open(written[1]))
    assert rgb.shape == (8, 10, 3) and rgb.max() > 0  # a uniform non-zero field is coloured
    assert np.asarray(Image.open(written[2])).shape == (8, 10)


def test_pair_pictures_without_weights_write_two_files(tmp_path):
    image = torch.rand(1, 6, 6)
    written = vis.save_pair_pictures(tmp_path, "t", image, image, image, torch.zeros(2, 6, 6))
    assert sorted(p.name for p in written) == ["t_field.png", "t_flicker.gif"]
    assert all(p.is_file() for p in written)


def test_loss_curves_figure_has_a_panel_per_term(tmp_path):
    curves = [("parent", {"similarity": [1.0, 0.5], "epe": [3.0, 2.0]}), ("child", {"similarity": [0.4]})]
    path = vis.plot_loss_curves(curves, tmp_path / "sub" / "curves.png")
    assert path == tmp_path / "sub" / "curves.png" and path.is_file()
    width, height = Image.open(path).size
    assert (width, height) == (800, 500)  # 8 x 2.5 inches per term, two terms, 100 dpi
