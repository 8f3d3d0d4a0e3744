"""Pictures: the pair flicker's frames and their order, the field colours and their key, the loss-curve figure."""
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
    rgb = np.asarray(Image.open(written[1]).convert("RGB"))
    assert rgb.shape == (420, 700, 3)  # the field_figure: 7 x 4.2 inches at 100 dpi
    assert (np.abs(rgb.astype(int) - (255, 0, 0)).sum(-1) < 30).sum() > 1000  # +x is red, in the field and the key
    assert np.asarray(Image.open(written[2])).shape == (8, 10)


def test_pair_pictures_without_weights_write_two_files(tmp_path):
    image = torch.rand(1, 6, 6)
    written = vis.save_pair_pictures(tmp_path, "t", image, image, image, torch.zeros(2, 6, 6))
    assert sorted(p.name for p in written) == ["t_field.png", "t_flicker.gif"]
    assert all(p.is_file() for p in written)


def test_save_chunk_png_and_gif(tmp_path):
    png = vis.save_chunk(torch.rand(1, 1, 8, 10), tmp_path / "a")
    gif = vis.save_chunk(np.random.rand(3, 8, 10), tmp_path / "b")
    assert png.suffix == ".png" and Image.open(png).size == (10, 8)
    assert gif.suffix == ".gif" and Image.open(gif).n_frames == 3


def test_field_colours_are_raft_s_wheel_hue_direction_saturation_length():
    field = torch.zeros(2, 1, 4)  # four pixels: +x, +y (down), half of +x, zero
    field[0, 0, 0], field[1, 0, 1], field[0, 0, 2] = 3.0, 3.0, 1.5
    rgb = vis.field_to_rgb(field, rim=3.0)
    assert rgb.shape == (1, 4, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [255, 0, 0]  # +x at the rim: pure red
    assert rgb[0, 1].tolist() == [255, 229, 0]  # +y at the rim: yellow (RAFT's flow_viz colours)
    assert rgb[0, 2].tolist() == [255, 127, 127]  # half the rim: half as saturated
    assert rgb[0, 3].tolist() == [255, 255, 255]  # no displacement: white
    assert (vis.field_to_rgb(2 * field, rim=3.0)[0, 0] == [191, 0, 0]).all()  # beyond the rim: darkened


def test_colour_wheel_is_the_key_of_the_field_colours():
    wheel = vis.colour_wheel(101, reach=1.0)  # x to the right, y down; the rim at the edge
    field = torch.zeros(2, 1, 2)
    field[0, 0, 0], field[1, 0, 1] = 2.0, 2.0  # +x, +y
    rgb = vis.field_to_rgb(field, rim=2.0)
    assert wheel[50, 100].tolist() == rgb[0, 0].tolist()  # the right of the wheel: the colour of +x
    assert wheel[100, 50].tolist() == rgb[0, 1].tolist()  # its bottom: the colour of +y
    assert wheel[50, 50].tolist() == [255, 255, 255] and wheel[0, 0].tolist() == [255, 255, 255]


def test_field_figure_states_the_largest_length_and_carries_the_key():
    field = torch.full((2, 16, 16), 0.5)
    field[:, 3, 4] = torch.tensor([3.0, 4.0])  # one vector of length 5 px
    fig = vis.field_figure(field, "it000100 field")
    picture, key = fig.axes
    assert picture.get_title() == "it000100 field: largest length 5 px"
    assert picture.images[0].get_array().shape == (16, 16, 3)
    assert key.images[0].get_array().shape == (101, 101, 3) and "rim 0.707 px" in key.get_title()
    assert key.get_xlabel() == "x (px)" and key.images[0].get_extent()[1] > 0.707  # the wheel's axes in px
    vis.pyplot().close(fig)


def test_loss_curves_draw_val_epe_with_its_zero_field_baseline_and_label_every_panel():
    curves = [("parent", {"similarity": [1.0, 0.5], "val_epe": [3.0, 2.0], "val_epe_zero_field": [4.0, 4.0]}),
              ("child", {"similarity": [0.4], "val_epe": [1.5], "val_epe_zero_field": [4.0]})]
    fig = vis.loss_curves_figure(curves)
    fig.canvas.draw()
    assert [ax.get_title(loc="left").split(":")[0] for ax in fig.axes] == ["similarity", "val_epe"]
    epe = fig.axes[1]
    assert epe.get_ylabel() == "px"
    baselines = [line for line in epe.get_lines() if line.get_linestyle() == "--"]
    assert [list(line.get_ydata()) for line in baselines] == [[4.0, 4.0], [4.0]]
    assert list(baselines[1].get_xdata()) == [2]  # the child's epochs follow the parent's
    for ax in fig.axes:  # tick labels on every panel, both axes
        assert any(t.get_text() for t in ax.get_xticklabels()) and any(t.get_text() for t in ax.get_yticklabels())
    vis.pyplot().close(fig)


def test_loss_curves_figure_has_a_panel_per_term(tmp_path):
    curves = [("parent", {"similarity": [1.0, 0.5], "epe": [3.0, 2.0]}), ("child", {"similarity": [0.4]})]
    path = vis.plot_loss_curves(curves, tmp_path / "sub" / "curves.png")
    assert path == tmp_path / "sub" / "curves.png" and path.is_file()
    width, height = Image.open(path).size
    assert (width, height) == (800, 500)  # 8 x 2.5 inches per term, two terms, 100 dpi


def test_a_vector_that_is_not_finite_is_drawn_as_zero():
    field = torch.ones(2, 4, 4)
    field[:, 1, 2], field[:, 3, 3] = float("nan"), float("inf")  # a diverged network's
    picture = vis.field_to_rgb(field)
    assert (picture[1, 2] == 255).all() and (picture[3, 3] == 255).all()  # white: the zero vector
    assert np.array_equal(picture[0, 0], vis.field_to_rgb(torch.ones(2, 4, 4))[0, 0])


def test_an_image_that_is_not_finite_is_stretched_by_its_finite_values_and_draws_the_others_black(recwarn):
    image = np.array([[0.5, 1.0], [np.nan, np.inf]], np.float32)
    assert np.array_equal(vis.to_uint8(image), [[0, 255], [0, 0]])
    assert np.array_equal(vis.to_uint8(np.full((2, 2), np.nan, np.float32)), np.zeros((2, 2), np.uint8))
    assert not recwarn.list  # numpy's all-NaN and invalid-cast warnings were printed in a diverged run
