"""import_stack.py: a folder of PNG / TIFF sections becomes a precomputed image layer, or nothing at all."""
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import import_stack
import volume
from conftest import ended_pid, moved_windows, run_script
from helpers import UserError

H, W = 64, 96  # tiny sections, not square, so x / y mix-ups show


def sections(count: int, seed: int = 0) -> np.ndarray:
    """``[count, H, W]`` uint8 tissue (1..255) with a missing-data corner (0)."""
    stack = np.random.default_rng(seed).integers(1, 256, size=(count, H, W), dtype=np.uint8)
    stack[:, :8, :8] = 0
    return stack


def save_png(folder: Path, names, stack) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, section in zip(names, stack):
        Image.fromarray(section).save(folder / name)
    return folder


def read_all(path: str, mip: int = 0) -> np.ndarray:
    """The whole layer at ``mip`` as ``[Z, Y, X]``."""
    vol = volume.open_volume(path, mip)
    start, stop = volume.bounds(vol)
    return volume.read(vol, start, stop - start)[:, 0]


def left_behind(dest: Path) -> list[str]:
    """What an import left at DEST or beside it (temporary siblings)."""
    return sorted(p.name for p in dest.parent.iterdir() if dest.name in p.name)


def test_png_folder_becomes_layer_with_mips(tmp_path):
    stack = sections(5)
    folder = save_png(tmp_path / "in", [f"{z}.png" for z in range(5)], stack)
    dest = tmp_path / "out" / "vol"
    out = import_stack.main([str(folder), "--dest", str(dest), "--resolution", "4", "4", "50", "--mips", "2"])
    assert out["size"] == (W, H, 5) and out["mips"] == 2 and out["missing"] == []
    np.testing.assert_array_equal(read_all(str(dest)), stack)
    mip1 = stack.reshape(5, H // 2, 2, W // 2, 2).astype(np.float32).mean((2, 4))
    np.testing.assert_array_equal(read_all(str(dest), 1), np.round(mip1).astype(np.uint8))
    vol = volume.open_volume(str(dest))
    assert list(vol.resolution) == [4, 4, 50] and str(vol.dtype) == "uint8" and vol.num_channels == 1
    method = vol.provenance.processing[-1]["method"]
    assert method["files"] == [f"{z}.png" for z in range(5)] and method["source"] == str(folder.resolve())
    assert method["resolution"] == [4, 4, 50] and "--mips 2" in method["command"]
    assert left_behind(dest) == ["vol"]


def test_natural_order_by_last_number(tmp_path):
    names = ["img_10.png", "img_2.png", "img_1.png", "img_0.png"]
    save_png(tmp_path / "in", names, sections(4))
    listed = import_stack.list_sections(tmp_path / "in")
    assert [(n, p.name) for n, p in listed] == [(0, "img_0.png"), (1, "img_1.png"), (2, "img_2.png"),
                                                (10, "img_10.png")]


def test_tiff_sections_any_case_and_rgb_grey(tmp_path):
    stack = sections(3)
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(folder / "train-input_0000.tif", stack[0])
    tifffile.imwrite(folder / "train-input_0001.TIFF", np.repeat(stack[1][..., None], 3, -1))  # grey as RGB
    tifffile.imwrite(folder / "train-input_0002.Tif", stack[2])
    dest = tmp_path / "vol"
    import_stack.main([str(folder), "--dest", "file://" + str(dest), "--resolution", "6", "6", "30"])
    np.testing.assert_array_equal(read_all(str(dest)), stack)
    assert len(volume.open_volume(str(dest)).info["scales"]) == 1  # 64 px: one mip keeps >= 64


def test_uint16_rescaled_onto_1_255_keeping_missing_zero(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    first = np.full((H, W), 100, np.uint16)
    first[0, :3] = [0, 200, 300]
    tifffile.imwrite(folder / "0.tif", first)
    tifffile.imwrite(folder / "1.tif", np.full((H, W), 300, np.uint16))
    dest = tmp_path / "vol"
    import_stack.main([str(folder), "--dest", str(dest), "--resolution", "4", "4", "40", "--rescale"])
    out = read_all(str(dest))
    assert out[0, 0, :4].tolist() == [0, 128, 255, 1]  # 0 missing; 200 is halfway: 1 + 127
    assert (out[0, 1:] == 1).all() and (out[1] == 255).all()
    assert volume.open_volume(str(dest)).provenance.processing[-1]["method"]["value_range"] == [100, 300]


def test_read_registered_reads_8_bit_sections_in_order_with_0_raised_to_1(tmp_path):
    stack = sections(4)
    folder = save_png(tmp_path / "in", ["s10.png", "s2.png", "s3.png", "s1.png"], stack)
    out = import_stack.read_registered(folder, 1, 3)  # s2, s3
    assert out.dtype == np.uint8 and np.array_equal(out, np.maximum(stack[1:3], 1))


@pytest.mark.parametrize("case, message", [
    ("uint16", "the sections are uint16, not uint8: convert them to 8-bit images first"),
    ("sizes", "s1.png is 40 x 32 px but s0.png is 96 x 64 px: all sections must be one size"),
    ("one", "fewer than 2 sections from 0")])
def test_read_registered_refuses_what_it_cannot_read_as_a_benchmarks_truth(tmp_path, case, message):
    folder = tmp_path / "in"
    folder.mkdir()
    if case == "uint16":  # e.g. 16-bit TIFFs, which read as 8 bits would be garbage
        for z in range(2):
            tifffile.imwrite(folder / f"s{z}.tif", np.full((H, W), 300 + z, np.uint16))
    else:
        save_png(folder, ["s0.png"], sections(1))
        if case == "sizes":
            save_png(folder, ["s1.png"], np.ones((1, 32, 40), np.uint8))
    with pytest.raises(UserError, match=message):
        import_stack.read_registered(folder, 0, 2)


def test_allow_gaps_writes_zeros_at_file_numbers(tmp_path):
    stack = sections(3)
    folder = save_png(tmp_path / "in", ["3.png", "4.png", "6.png"], stack)
    dest = tmp_path / "vol"
    out = import_stack.main([str(folder), "--dest", str(dest), "--resolution", "4", "4", "50", "--allow_gaps"])
    assert out["missing"] == [5] and out["sections"] == 3
    vol = volume.open_volume(str(dest))
    assert [tuple(b) for b in volume.bounds(vol)] == [(0, 0, 3), (W, H, 7)]
    got = read_all(str(dest))
    np.testing.assert_array_equal(got[[0, 1, 3]], stack)
    assert not got[2].any()
    method = vol.provenance.processing[-1]["method"]
    assert method["missing"] == [5] and method["files"] == ["3.png", "4.png", None, "6.png"]


def test_overwrite_replaces_layer(tmp_path):
    dest = tmp_path / "vol"
    for seed in (0, 1):
        stack = sections(2, seed)
        folder = save_png(tmp_path / f"in{seed}", ["0.png", "1.png"], stack)
        import_stack.main([str(folder), "--dest", str(dest), "--resolution", "4", "4", "50", "--overwrite"])
    np.testing.assert_array_equal(read_all(str(dest)), stack)
    assert left_behind(dest) == ["vol"]


def test_default_mips():
    assert [import_stack.default_mips(h, w) for h, w in ((512, 512), (1024, 700), (63, 500), (128, 127),
                                                         (65536, 65536))] == [4, 4, 1, 1, 6]


def bad_folder(case: str, root: Path) -> Path:
    """A folder with one kind of bad input (see ``test_bad_input``)."""
    folder = root / "in"
    stack = sections(3)
    if case == "missing folder":
        return folder
    save_png(folder, ["0.png", "1.png", "2.png"], stack)
    if case == "no images":
        for path in folder.iterdir():
            path.rename(path.with_suffix(".jpg"))
    elif case == "corrupt header":
        (folder / "1.png").write_bytes(b"not an image at all")
    elif case == "truncated pixels":  # the header reads, so it fails while writing: nothing may remain
        data = (folder / "2.png").read_bytes()
        (folder / "2.png").write_bytes(data[:len(data) // 2])
    elif case == "mixed sizes":
        Image.fromarray(stack[1][:, :W // 2]).save(folder / "1.png")
    elif case == "mixed dtypes":
        Image.fromarray(stack[1].astype(np.uint16)).save(folder / "1.png")
    elif case == "colour":  # also only seen while writing
        Image.fromarray(np.stack([stack[2], stack[2], 255 - stack[2]], -1)).save(folder / "2.png")
    elif case == "gap":
        (folder / "1.png").rename(folder / "3.png")
    elif case == "broken link":  # was passed over: one section fewer, silently
        (folder / "1.png").unlink()
        (folder / "1.png").symlink_to(folder / "gone.png")
    elif case == "uint16 without --rescale":
        for z in range(3):
            Image.fromarray(stack[z].astype(np.uint16)).save(folder / f"{z}.png")
    return folder


BAD = {"missing folder": "no folder", "no images": "no images", "corrupt header": "cannot read",
       "truncated pixels": "cannot read", "mixed sizes": "one size", "mixed dtypes": "one dtype",
       "colour": "colour image", "gap": "section 1 missing", "uint16 without --rescale": "--rescale",
       "broken link": "cannot read .*1.png: FileNotFoundError"}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_writes_nothing(tmp_path, case):
    folder, dest = bad_folder(case, tmp_path), tmp_path / "out" / "vol"
    with pytest.raises(UserError, match=BAD[case]) as err:
        import_stack.main([str(folder), "--dest", str(dest), "--resolution", "4", "4", "50"])
    assert "\n" not in str(err.value)
    assert not dest.parent.exists() or left_behind(dest) == []


def test_a_resolution_that_is_not_a_number_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        import_stack.main([str(tmp_path), "--dest", str(tmp_path / "vol"), "--resolution", "nan", "4", "50"])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "argument --resolution: 'nan' is not a number")


def test_script_gap_exits_2_in_one_line(tmp_path):
    folder, dest = bad_folder("gap", tmp_path), tmp_path / "vol"
    proc = run_script("import_stack.py", "--dest", dest, "--resolution", 4, 4, 50, folder)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: section 1 missing from the numbering 0..3 (pass "
                                                "--allow_gaps to write missing sections as zeros)"]
    assert left_behind(dest) == []


def test_script_existing_dest_exits_2_and_keeps_it(tmp_path):
    folder, dest = save_png(tmp_path / "in", ["0.png"], sections(1)), tmp_path / "vol"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    proc = run_script("import_stack.py", "--dest", dest, "--resolution", 4, 4, 50, folder)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {dest} already exists (pass --overwrite to replace it)"]
    with pytest.raises(UserError, match="not a precomputed layer"):  # --overwrite never deletes a non-volume
        import_stack.main([str(folder), "--dest", str(dest), "--resolution", "4", "4", "50", "--overwrite"])
    assert [p.name for p in dest.iterdir()] == ["keep.txt"] and left_behind(dest) == ["vol"]


def test_shift_section_pulls_by_whole_pixels_and_fills_missing():
    section = np.arange(1, 13, dtype=np.uint8).reshape(3, 4)
    out = import_stack.shift_section(section, (1, -1))  # out(p) = section(p + (1, -1))
    np.testing.assert_array_equal(out, [[0, 0, 0, 0], [2, 3, 4, 0], [6, 7, 8, 0]])


def test_register_rigidly_undoes_whole_section_jumps_and_keeps_the_stack_centred():
    stack = moved_windows([(0, 0), (8, 0), (16, 0), (16, -8)])
    moved, shifts = import_stack.register_rigidly(stack)
    # each section pulled by its content's move, (0, 0) (8, 0) (16, 0) (16, -8), less their mean (10, -2)
    np.testing.assert_array_equal(shifts, [[-10, 2], [-2, 2], [6, 2], [6, -6]])
    assert (moved[:, 20:-20, 20:-20] == moved[0, 20:-20, 20:-20]).all()  # the same content everywhere


def test_import_reregister_writes_matching_sections_and_records_the_shifts(tmp_path):
    stack = moved_windows([(0, 0), (6, 0), (6, 6)])
    folder, dest = save_png(tmp_path / "in", [f"{z}.png" for z in range(3)], stack), tmp_path / "vol"
    import_stack.main([str(folder), "--dest", str(dest), "--resolution", "4", "4", "50", "--mips", "1", "--reregister"])
    written = read_all(str(dest))
    assert (written[:, 16:-16, 16:-16] == written[0, 16:-16, 16:-16]).all()
    method = volume.open_volume(str(dest)).provenance.processing[-1]["method"]
    assert method["shifts"] == [[-4, -2], [2, -2], [2, 4]]  # (0, 6, 6 | 0, 0, 6) less their mean (4, 2)
    (folder / "2.png").rename(folder / "4.png")
    with pytest.raises(UserError, match="without gaps"):
        import_stack.main([str(folder), "--dest", str(tmp_path / "v2"), "--resolution", "4", "4", "50",
                           "--reregister", "--allow_gaps"])
    small = save_png(tmp_path / "small", ["0.png", "1.png"], [s[:1, :1] for s in sections(2)])  # was a traceback
    with pytest.raises(UserError, match=r"--reregister .* it needs sections of 128 px or more \(these are 1 x 1 px\)"):
        import_stack.main([str(small), "--dest", str(tmp_path / "v3"), "--resolution", "4", "4", "50", "--reregister"])


def test_left_overs_of_killed_imports_are_removed_but_not_a_live_imports(tmp_path):
    folder, dest = save_png(tmp_path / "in", ["0.png"], sections(1)), tmp_path / "vol"
    killed = [tmp_path / ".vol.importing-1712345678901234567",  # as a killed import named it before
              tmp_path / f".vol.importing-{ended_pid()}@{socket.gethostname()}"]
    live = tmp_path / f".vol.importing-{os.getppid()}@{socket.gethostname()}"  # a concurrent import's
    for left in killed + [live]:
        (left / "image").mkdir(parents=True)
    import_stack.main([str(folder), "--dest", str(dest), "--resolution", "4", "4", "50", "--mips", "1"])
    assert left_behind(dest) == sorted([live.name, "vol"])


def test_a_file_numbered_far_from_the_others_is_named_at_once():
    sections = [(0, Path("s0.png")), (1, Path("s1.png")), (20230501, Path("s20230501.png"))]
    with pytest.raises(UserError, match=r"section 2, 3, .*, 21 and 20230479 more missing from the numbering"):
        import_stack.arrange(sections, allow_gaps=False)
    with pytest.raises(UserError, match="widest gap: between 1 and 20230501"):
        import_stack.arrange(sections, allow_gaps=True)
    assert import_stack.arrange(sections[:2] + [(5, Path("s5.png"))], allow_gaps=True)[1][2:5] == [None] * 3


@pytest.mark.parametrize("resolution", [["0", "4", "50"], ["1e-30", "1e-30", "1e-30"], ["1e30", "4", "40"]])
def test_a_resolution_beyond_any_microscope_is_one_line(tmp_path, resolution):
    folder = tmp_path / "in"
    save_png(folder, ["0.png", "1.png"], sections(2))
    said = f"--resolution {' '.join(f'{float(r):g}' for r in resolution)}: a voxel size in nm, from 0.001 to 1e6"
    with pytest.raises(UserError, match=re.escape(said)):
        import_stack.main([str(folder), "--dest", str(tmp_path / "vol"), "--resolution", *resolution])
    assert not (tmp_path / "vol").exists()


def test_a_section_number_beyond_a_layers_z_is_refused_with_allow_gaps(tmp_path):
    folder = tmp_path / "in"
    save_png(folder, [f"{10 ** 30}.png", f"{10 ** 30 + 2}.png"], sections(2))  # numbered by a date and a time?
    with pytest.raises(UserError, match=f"--allow_gaps: {10 ** 30 + 2}.png is section {10 ** 30 + 2}, beyond the z"):
        import_stack.main([str(folder), "--dest", str(tmp_path / "vol"), "--resolution", "4", "4", "40",
                           "--allow_gaps"])
    assert not (tmp_path / "vol").exists()


def test_sections_of_zeros_are_imported_with_a_warning_that_names_them(tmp_path, capsys):
    stack = sections(3)
    stack[1][:] = 0
    save_png(tmp_path / "in", ["0.png", "1.png", "2.png"], stack)
    import_stack.main([str(tmp_path / "in"), "--dest", str(tmp_path / "vol"), "--resolution", "4", "4", "40"])
    assert "warning: 1 of 3 sections hold only zeros, which read as missing data: z 1" in capsys.readouterr().err


def test_sections_too_large_for_the_machine_are_one_line_before_anything_is_written(tmp_path, monkeypatch):
    save_png(tmp_path / "in", ["0.png", "1.png"], sections(2))
    monkeypatch.setattr(import_stack, "machine_memory", lambda: H * W * import_stack.SECTION_BYTES - 1)
    with pytest.raises(UserError, match=f"a section of {W} x {H} px would hold about .* GB, more than the"):
        import_stack.main([str(tmp_path / "in"), "--dest", str(tmp_path / "vol"), "--resolution", "4", "4", "40"])
    assert not (tmp_path / "vol").exists()
