"""HDF5 training pairs: normalisation, pair selection, ground-truth pair fields, workers, augmentation."""
import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import data
from conftest import corrupt_chunk
from helpers import UserError, warp, warp_tissue

SIZE = 64
SHIFTS = [[(0, 0), (3, -2), (-1, 4), (2, 2)], [(1, 1), (0, -3), (0, 0), (-2, 0)]]  # (tx, ty) per section


def texture(size, seed=0, margin=0):
    """Smooth grey texture float32 ``[size + 2 margin]^2`` in 20..235 (features ~size/8 px)."""
    g = torch.Generator().manual_seed(seed)
    n = size + 2 * margin
    coarse = torch.rand(1, 1, n // 8 + 1, n // 8 + 1, generator=g)
    t = torch.nn.functional.interpolate(coarse, size=(n, n), mode="bicubic", align_corners=False)[0, 0]
    return 20 + 215 * (t - t.min()) / (t.max() - t.min())


def write_stacks(path, with_masks=True, with_fields=True, with_std=True, compression=None):
    """2 stacks x 4 sections x 64 px: section s of stack n is the truth shifted so that
    ``warp(image, (tx, ty)) == truth`` with ``(tx, ty) = SHIFTS[n][s]``; stack 1 section 2 is blank.

    compression: of the chunked datasets (None, or e.g. ``"lzf"`` as gen_stack.py writes)."""
    m = 8
    images = np.zeros((2, 4, SIZE, SIZE), np.uint8)
    fields = np.zeros((2, 4, 2, SIZE, SIZE), np.float32)
    for n in range(2):
        truth = texture(SIZE, seed=n, margin=m).round().numpy().astype(np.uint8)
        for s, (tx, ty) in enumerate(SHIFTS[n]):
            images[n, s] = truth[m - ty:m - ty + SIZE, m - tx:m - tx + SIZE]  # image(p) = truth(p - shift)
            fields[n, s, 0], fields[n, s, 1] = tx, ty
    images[0, 1, :, :10] = 0  # missing data on the left of one section
    images[1, 2] = 0  # a blank section: pairs (1, 1) and (1, 2) are unusable
    defects = np.zeros((2, 4, SIZE, SIZE), np.uint8)
    defects[0, 0, 20, :] = 1  # a crack along row 20
    defects[0, 1, 40:43, 30:34] = 2  # a small fold
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images, chunks=(1, 1, SIZE, SIZE), compression=compression)
        if with_masks:
            f.create_dataset("masks", data=defects, chunks=(1, 1, SIZE, SIZE), compression=compression)
        if with_fields:
            f.create_dataset("fields", data=fields, chunks=(1, 1, 2, SIZE, SIZE), compression=compression)
        if with_std:
            f.create_dataset("slice_std", data=data.slice_std(images).numpy())
    return path


@pytest.fixture
def h5(tmp_path):
    return write_stacks(tmp_path / "stacks.h5")


def interior_error(a, b, border=8):
    """Mean |a - b| over the interior where both are non-zero."""
    a, b = a[..., border:-border, border:-border], b[..., border:-border, border:-border]
    both = (a != 0) & (b != 0)
    return float((a - b).abs()[both].mean())


# --------------------------------------------------------------------------- the dataset
def test_pairs_skip_blank_sections_and_samples_have_the_documented_shapes(h5):
    ds = data.StackDataset(h5, mask_radius=3)
    assert ds.pairs.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0]]
    assert len(ds) == 4
    sample = ds[1]
    shapes = {"src": ((1, SIZE, SIZE), torch.float32), "tgt": ((1, SIZE, SIZE), torch.float32),
              "src_missing": ((1, SIZE, SIZE), torch.bool), "tgt_missing": ((1, SIZE, SIZE), torch.bool),
              "src_mask": ((1, SIZE, SIZE), torch.uint8), "tgt_mask": ((1, SIZE, SIZE), torch.uint8),
              "field": ((2, SIZE, SIZE), torch.float32), "has_field": ((), torch.bool)}
    for key, (shape, dtype) in shapes.items():
        assert sample[key].shape == shape and sample[key].dtype == dtype, key
    assert sample["src_missing"][0, :, :10].all() and not sample["src_missing"][0, :, 10:].any()
    tissue = sample["src"][~sample["src_missing"]].double()
    assert float(tissue.mean()) == pytest.approx(0, abs=1e-5)
    assert float(tissue.std(unbiased=False)) == pytest.approx(1, abs=1e-5)


def test_slice_std_is_computed_when_the_file_lacks_it(tmp_path):
    ds = data.StackDataset(write_stacks(tmp_path / "nostd.h5", with_std=False))
    assert ds.pairs.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0]]


def test_no_usable_pair_is_a_user_error(h5):
    with pytest.raises(UserError, match="no pair"):
        data.StackDataset(h5, min_std=1e6)


@pytest.mark.parametrize("i", range(4))
def test_pair_field_recovers_the_known_translation_and_aligns_source_onto_target(h5, i):
    ds = data.StackDataset(h5)
    n, s = ds.pairs[i]
    (sx, sy), (tx, ty) = SHIFTS[n][s], SHIFTS[n][s + 1]
    sample = ds.raw_sample(i, torch.Generator())
    assert bool(sample["has_field"])
    assert torch.allclose(sample["field"][0], torch.full((SIZE, SIZE), float(sx - tx)), atol=1e-4)
    assert torch.allclose(sample["field"][1], torch.full((SIZE, SIZE), float(sy - ty)), atol=1e-4)
    aligned = warp(sample["src"][None], sample["field"][None])[0]
    assert interior_error(aligned, sample["tgt"]) < 1e-3  # integer shifts: exact


def test_pair_field_of_rotated_sections_aligns_source_onto_target(tmp_path):
    g = torch.Generator().manual_seed(0)
    truth = texture(SIZE, seed=5)[None]
    rigid = [data.random_rigid(SIZE, SIZE, g, 4.0, 0.25, 0.03) for _ in range(2)]  # (field, inverse) per section
    images = torch.stack([warp_tissue(truth[None], inverse[None])[0] for _, inverse in rigid]).round()
    with h5py.File(tmp_path / "rotated.h5", "w") as f:
        f.create_dataset("images", data=images[None, :, 0].numpy().astype(np.uint8))
        f.create_dataset("fields", data=torch.stack([field for field, _ in rigid])[None].numpy())
    sample = data.StackDataset(tmp_path / "rotated.h5").raw_sample(0, g)
    assert interior_error(warp_tissue(sample["src"][None], sample["field"][None])[0], sample["tgt"], border=10) < 0.8
    assert interior_error(sample["src"], sample["tgt"], border=10) > 10  # the sections were misaligned


def test_ternary_masks_from_defect_maps(h5):
    sample = data.StackDataset(h5, mask_radius=3)[0]  # pair (0, 0): crack in the source, fold in the target
    src_mask, tgt_mask = sample["src_mask"][0], sample["tgt_mask"][0]
    assert torch.all(src_mask[20] == 2)
    assert torch.all(src_mask[17:20] == 1) and torch.all(src_mask[21:24] == 1)
    assert torch.all(src_mask[:17] == 0) and torch.all(src_mask[24:] == 0)
    assert torch.all(tgt_mask[40:43, 30:34] == 2)
    assert int((tgt_mask == 1).sum()) > 0 and tgt_mask[40, 36] == 1 and tgt_mask[40, 37] == 0


def test_without_masks_and_fields_masks_are_zero_and_has_field_is_false(tmp_path):
    ds = data.StackDataset(write_stacks(tmp_path / "bare.h5", with_masks=False, with_fields=False))
    sample = ds[0]
    assert not bool(sample["has_field"]) and torch.all(sample["field"] == 0)
    assert torch.all(sample["src_mask"] == 0) and torch.all(sample["tgt_mask"] == 0)


def test_crop_takes_the_same_window_of_both_sections(h5):
    torch.manual_seed(0)
    ds = data.StackDataset(h5, crop=32)
    sample = ds[3]
    assert sample["src"].shape == (1, 32, 32) and sample["field"].shape == (2, 32, 32)
    (sx, sy), (tx, ty) = SHIFTS[1][0], SHIFTS[1][1]
    assert torch.allclose(sample["field"][0], torch.full((32, 32), float(sx - tx)), atol=1e-4)
    with pytest.raises(UserError, match="crop"):
        data.StackDataset(h5, crop=SIZE + 1)


def test_dataloader_with_two_workers_gives_what_the_dataset_gives(h5):
    ds = data.StackDataset(h5, mask_radius=2)
    _ = ds[0]  # the parent holds an open handle: the workers must open their own
    batches = list(DataLoader(ds, batch_size=2, num_workers=2))
    assert len(batches) == 2 and batches[0]["src"].shape == (2, 1, SIZE, SIZE)
    for b, batch in enumerate(batches):
        for k in range(2):
            expected = ds[2 * b + k]
            for key, value in expected.items():
                assert torch.equal(batch[key][k], value), key


@pytest.mark.parametrize("content", ["missing", "text", "truncated", "no_images", "bad_shape", "group", "no_stacks"])
def test_unreadable_files_are_user_errors(tmp_path, h5, content):
    path = tmp_path / "bad.h5"
    if content == "text":
        path.write_text("not an hdf5 file\n")
    elif content == "truncated":
        path.write_bytes(h5.read_bytes()[:2000])
    elif content == "no_images":
        with h5py.File(path, "w") as f:
            f.create_dataset("masks", data=np.zeros((1, 2, 8, 8), np.uint8))
    elif content == "bad_shape":
        with h5py.File(path, "w") as f:
            f.create_dataset("images", data=np.ones((1, 2, 8, 8), np.uint8))
            f.create_dataset("fields", data=np.zeros((1, 2, 8, 8), np.float32))
    elif content == "group":
        with h5py.File(path, "w") as f:
            f.create_group("images")
    elif content == "no_stacks":
        with h5py.File(path, "w") as f:
            f.create_dataset("images", data=np.ones((0, 2, 8, 8), np.uint8))
    with pytest.raises(UserError) as err:
        data.StackDataset(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["images", "masks", "fields"])
def test_a_corrupt_chunk_is_a_user_error_naming_the_file_the_dataset_and_the_sections(tmp_path, name):
    path = write_stacks(tmp_path / "stacks.h5", compression="lzf")
    corrupt_chunk(path, name, (0, 1, 0, 0, 0) if name == "fields" else (0, 1, 0, 0))  # stack 0, section 1
    ds = data.StackDataset(path)
    assert tuple(ds.pairs[0]) == (0, 0) and tuple(ds.pairs[3]) == (1, 0)
    ds[3]  # stack 1 reads well
    with pytest.raises(UserError) as err:
        ds[0]
    assert str(err.value).startswith(f"dataset {path}: cannot read '{name}' of stack 0, sections 0..1 (")
    assert "\n" not in str(err.value)
    loader = DataLoader(ds, batch_size=1, num_workers=1)  # raised again in this process with the worker's traceback
    with pytest.raises(UserError) as err:
        list(data.batches(loader))
    assert str(err.value).startswith(f"dataset {path}: cannot read '{name}' of stack 0, sections 0..1 (")
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- augmentation
def raw_pair(shift=(3, -2), size=SIZE, seed=0):
    """A raw sample (no missing data) whose target is the source pulled through an integer translation."""
    m, (sx, sy) = 8, shift
    big = texture(size, seed, margin=m)
    src, tgt = big[None, m:m + size, m:m + size], big[None, m + sy:m + sy + size, m + sx:m + sx + size]
    field = torch.zeros(2, size, size)
    field[0], field[1] = sx, sy
    defects = torch.zeros(1, size, size, dtype=torch.uint8)
    defects[0, 10, 5:20] = 1
    return {"src": src, "tgt": tgt, "src_defects": defects, "tgt_defects": defects.clone(),
            "field": field, "has_field": torch.tensor(True)}


def always(fn, **kw):
    return lambda sample, g: fn(sample, g, 1.0, **kw)


def consistent(sample, tol):
    """warp(src, field) matches tgt away from the borders and from the source's defects."""
    aligned = warp_tissue(sample["src"][None], sample["field"][None])[0]  # missing where it reads missing data
    in_defect = warp((sample["src_defects"] > 0).float()[None], sample["field"][None])[0] > 0
    return interior_error(aligned.masked_fill(in_defect, 0), sample["tgt"], border=10) < tol


def test_flip_mirrors_a_known_field_and_negates_the_flipped_axis():
    sample = raw_pair()
    x = torch.arange(SIZE).float().expand(SIZE, SIZE)
    sample["field"] = torch.stack([x, torch.full((SIZE, SIZE), 2.0)])
    assert data.flip(sample, torch.Generator(), p=0.0) is sample  # p = 0 changes nothing
    out = data.flip(sample, torch.Generator(), p=1.0)  # left-right, then up-down
    assert torch.equal(out["field"][0], -(SIZE - 1 - x))  # x(p) read at the mirrored column, negated
    assert torch.equal(out["field"][1], torch.full((SIZE, SIZE), -2.0))
    for name in ("src", "tgt", "src_defects", "tgt_defects"):
        assert torch.equal(out[name], sample[name].flip(-1).flip(-2))


def test_transpose_swaps_the_field_channels():
    sample = raw_pair(shift=(3, -2))
    out = data.transpose(sample, torch.Generator(), p=1.0)
    assert torch.equal(out["field"][0], torch.full((SIZE, SIZE), -2.0))
    assert torch.equal(out["field"][1], torch.full((SIZE, SIZE), 3.0))
    assert torch.equal(out["tgt"], sample["tgt"].transpose(-1, -2))


@pytest.mark.parametrize("augment", [always(data.flip), always(data.transpose), always(data.swap),
                                     always(data.jitter, max_shift=6.0, max_angle=0.05, max_scale=0.05),
                                     always(data.jitter, max_shift=3.0, elastic_amplitude=2.0,
                                            elastic_wavelength=32.0)])
def test_geometric_augmentations_keep_the_pair_field_consistent(augment):
    for seed in range(3):
        sample = raw_pair(shift=(2, -1), seed=seed)
        assert consistent(sample, 1e-4)
        field, inverse = data.random_rigid(SIZE, SIZE, torch.Generator().manual_seed(9), 6.0, 0.15, 0.05)
        sample = data.warp_slice(sample, "src", field, inverse)  # a pair field that is not a translation
        assert consistent(sample, 1.0)  # bilinear interpolation error only (grey levels)
        out = augment(sample, torch.Generator().manual_seed(seed))
        assert consistent(out, 1.2)
        assert not torch.equal(out["src"], sample["src"]) or not torch.equal(out["tgt"], sample["tgt"])


@pytest.mark.parametrize("tear, mark", [(data.crack, 1), (data.fold, 2)])
def test_synthetic_defects_tear_the_source_mark_it_and_keep_the_field_consistent(tear, mark):
    for seed in range(3):
        sample = raw_pair(seed=seed)
        sample["src_defects"].zero_()
        assert tear(sample, torch.Generator().manual_seed(seed), p=0.0) is sample
        out = tear(sample, torch.Generator().manual_seed(seed), p=1.0)
        assert set(out["src_defects"].unique().tolist()) == {0, mark}
        assert float((out["src"] - sample["src"]).abs().mean()) > 10  # the tissue moved
        assert torch.equal(out["tgt"], sample["tgt"]) and torch.equal(out["tgt_defects"], sample["tgt_defects"])
        assert consistent(out, 1.2)


def test_jitter_moves_each_slice_and_warps_defect_maps_with_nearest_sampling():
    sample = raw_pair()
    field, inverse = data.random_rigid(SIZE, SIZE, torch.Generator().manual_seed(0), 5.0, 0.1, 0.05)
    out = data.warp_slice(sample, "src", field, inverse)
    assert set(out["src_defects"].unique().tolist()) <= {0, 1}
    assert int(out["src_defects"].sum()) > 0 and not torch.equal(out["src_defects"], sample["src_defects"])
    assert torch.equal(out["tgt"], sample["tgt"]) and torch.equal(out["tgt_defects"], sample["tgt_defects"])
    exact = data.warp_slice(sample, "src", field)  # the inverse found by invert_field instead
    inner = (slice(None), slice(8, -8), slice(8, -8))  # invert_field clamps at the border
    assert torch.allclose(exact["field"][inner], out["field"][inner], atol=1e-2)


def test_warped_missing_data_stays_missing():
    sample = raw_pair()
    field = torch.zeros(2, SIZE, SIZE)
    field[0] = 4.5  # reads 4.5 px to the right: the last 5 columns read outside
    out = data.warp_slice(sample, "tgt", field)
    assert torch.all(out["tgt"][..., -5:] == 0) and torch.all(out["tgt"][..., :-5] >= 1)


def test_missing_patch_sets_missing_data_in_a_box_only():
    sample = raw_pair()
    out = data.missing_patch(sample, torch.Generator().manual_seed(0), p=1.0, max_fraction=0.5)
    for name in ("src", "tgt"):
        zero = out[name] == 0
        assert 0 < int(zero.sum()) < SIZE * SIZE
        rows, cols = zero[0].any(1), zero[0].any(0)
        assert int(zero.sum()) == int(rows.sum()) * int(cols.sum())  # one full rectangle
        assert torch.equal(out[name][~zero], sample[name][~zero])
        assert torch.equal(data.finish(out, 2)[f"{name}_missing"], zero)


def test_noise_and_contrast_patches_change_a_box_and_keep_tissue_values_valid():
    sample = raw_pair()
    sample["src"][..., :8] = 0  # some missing data that must stay missing
    for fn in (data.noise_patch, data.contrast_patch):
        out = fn(sample, torch.Generator().manual_seed(3), p=1.0, max_fraction=0.5)
        changed = out["src"] != sample["src"]
        assert changed.any()
        rows, cols = changed[0].nonzero()[:, 0], changed[0].nonzero()[:, 1]
        box = torch.zeros_like(changed)
        box[0, rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert not (changed & ~box).any()
        tissue = out["src"][..., 8:]
        assert float(tissue.min()) >= 1 and float(tissue.max()) <= 255
        if fn is data.contrast_patch:
            assert torch.all(out["src"][..., :8] == 0)


def test_blur_and_grain_blur_within_the_tissue_add_grain_and_keep_missing_data():
    sample = raw_pair()
    for which in data.SLICES:
        sample[which] = sample[which].clone()  # (views of one texture)
        sample[which][..., :6] = 0  # missing data
    g = torch.Generator().manual_seed(0)
    assert data.blur_and_grain(sample, g, 0, 0) is sample  # off: the sample as it is, no number drawn
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())

    def roughness(image):  # the mean squared step between neighbouring tissue pixels
        return float(image[..., 6:].diff(dim=-1).pow(2).mean())
    blurred = data.blur_and_grain(sample, torch.Generator().manual_seed(1), max_sigma=3, max_grain=0)
    grainy = data.blur_and_grain(sample, torch.Generator().manual_seed(1), max_sigma=0, max_grain=0.5)
    for out in (blurred, grainy):
        assert out["field"] is sample["field"] and out["src_defects"] is sample["src_defects"]
        for which in data.SLICES:
            assert torch.equal(out[which] == 0, sample[which] == 0)  # missing stays missing, tissue >= 1
            assert float(out[which].max()) <= 255
    for which in data.SLICES:
        assert roughness(blurred[which]) < roughness(sample[which]) < roughness(grainy[which])
        change = (grainy[which] - sample[which])[..., 6:]
        assert 0 < float(change.std()) < 0.55 * float(sample[which][..., 6:].std())  # grain <= 0.5 of the std
    flat = {**sample, "src": torch.where(sample["src"] > 0, 100.0, 0.0)}  # tissue beside missing data
    out = data.blur_and_grain(flat, torch.Generator().manual_seed(2), max_sigma=3, max_grain=0)
    assert torch.allclose(out["src"][..., 6:], torch.tensor(100.0))  # the blur does not read the missing data


def test_brightness_gradient_is_a_linear_gain_ramp():
    sample = raw_pair()
    sample["src"] = torch.full((1, SIZE, SIZE), 100.0)
    sample["src"][..., :4, :] = 0
    out = data.brightness_gradient(sample, torch.Generator().manual_seed(2), p=1.0, max_strength=0.5)
    gain = out["src"][0, 4:] / 100
    assert torch.all(out["src"][..., :4, :] == 0)
    assert float((gain - 1).abs().max()) > 0.01  # it did change
    assert float(gain.diff(dim=0).diff(dim=0).abs().max()) < 1e-4  # planar: zero second differences
    assert float(gain.diff(dim=1).diff(dim=1).abs().max()) < 1e-4


def test_augmenter_in_the_dataset_keeps_shapes_and_the_field_consistent(h5):
    torch.manual_seed(0)
    augment = data.Augmenter(p_jitter=1.0, max_shift=4.0, p_crack=0.5, p_fold=0.5, p_noise=0.0,
                             p_contrast=0.0, p_missing=0.0, p_gradient=0.0)
    ds = data.StackDataset(h5, augment=augment)
    plain = data.StackDataset(h5)[0]
    for i in range(len(ds)):
        sample = ds.raw_sample(i, torch.Generator().manual_seed(i))
        out = augment(sample, torch.Generator().manual_seed(i))
        assert consistent(out, 2.0)
    sample = ds[0]
    assert {k: (v.shape, v.dtype) for k, v in sample.items()} == {k: (v.shape, v.dtype) for k, v in plain.items()}


def test_a_registered_file_has_known_zero_fields_and_held_out_pairs_are_fixed_misalignments(tmp_path):
    path = write_stacks(tmp_path / "registered.h5", with_fields=False)
    with h5py.File(path, "a") as f:
        f.attrs["registered"] = True
    plain = data.StackDataset(path)
    sample = plain[0]
    assert bool(sample["has_field"]) and torch.all(sample["field"] == 0)
    held_out = data.StackDataset(path, augment=data.held_out_misalignment(), seed=3)
    first, again = held_out[0], held_out[0]
    assert torch.equal(first["field"], again["field"]) and torch.equal(first["src"], again["src"])
    assert first["field"].norm(dim=0).mean() > 1 and not torch.equal(first["field"], held_out[1]["field"])
    raw = held_out.raw_sample(0, torch.Generator())
    raw["tgt"] = raw["src"].clone()  # one section against itself: the known field must re-align it
    out = held_out.augment(raw, torch.Generator().manual_seed(0))
    assert consistent(out, 2.0)


def test_tissue_change_moves_the_targets_content_but_not_the_pair_field():
    sample = raw_pair()
    assert data.tissue_change(sample, torch.Generator().manual_seed(0), 0.0) is sample
    out = data.tissue_change(sample, torch.Generator().manual_seed(0), 2.0)
    assert torch.equal(out["field"], sample["field"]) and torch.equal(out["src"], sample["src"])
    assert float((out["tgt"] - sample["tgt"]).abs().mean()) > 5  # the content moved: the field no longer fits it
    assert consistent(sample, 1.2) and not consistent(out, 1.2)
    assert not torch.equal(out["tgt_defects"], sample["tgt_defects"])  # the defect map moves with the content


def test_true_fields_that_are_not_finite_are_a_user_error_naming_the_stack(tmp_path):
    path = write_stacks(tmp_path / "stacks.h5")
    with h5py.File(path, "r+") as f:
        f["fields"][0, 1, 0, 3, 3] = np.nan  # stack 0, section 1
    ds = data.StackDataset(path)
    ds[3]  # stack 1 reads well
    with pytest.raises(UserError, match=f"dataset {path}: 'fields' of stack 0, sections 0..1 hold values that are "
                                        "not finite"):
        ds[0]


def test_masks_that_are_not_defect_maps_are_a_user_error(tmp_path):
    path = write_stacks(tmp_path / "stacks.h5")
    with h5py.File(path, "r+") as f:
        f["masks"][0, 3, 5, 5] = 9  # stack 0, section 3
    ds = data.StackDataset(path)
    assert ds.pairs[2].tolist() == [0, 2]
    ds[0]  # sections 0..1 read well
    with pytest.raises(UserError, match=f"dataset {path}: 'masks' of stack 0, sections 2..3 holds the value 9; a "
                                        "defect map holds"):
        ds[2]
    path = write_stacks(tmp_path / "float.h5")
    with h5py.File(path, "r+") as f:
        masks = f["masks"][:]
        del f["masks"]
        f["masks"] = masks.astype(np.float32)
    with pytest.raises(UserError, match=f"dataset {path}: 'masks' must be uint8 defect maps .*, got float32"):
        data.StackDataset(path)
