"""adapt.py and align.py --adapt: fine-tuning on self-pairs of the raw sections alone, written atomically, recorded."""
import json
import os

import h5py
import numpy as np
import pytest
import torch

import adapt
import align
import train
from conftest import ROOT, run_script
from helpers import file_sha256
from models import Pyramid
from models.archive import lineage, load_archive, save_archive

ONE_STEP = "0.000001"  # minutes: train.py stops after its first step


@pytest.fixture
def parent(tmp_path):
    torch.manual_seed(0)
    return save_archive(tmp_path / "parent.pt", Pyramid(size=3, k=3, corr_radius=1),
                        summary={"name": "parent", "iterations": 7}, args={"trunc": 0})


def textures(count=3, side=64, seed=0):
    """uint8 ``[count, side, side]`` smooth random sections (grey 30..230)."""
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(count, 1, side // 4, side // 4, generator=g),
                                             size=(side, side), mode="bicubic", align_corners=False)
    return (smooth[:, 0].clamp(0, 1) * 200 + 30).to(torch.uint8).numpy()


def test_adapt_changes_a_copy_of_the_weights_names_its_parent_and_leaves_it_untouched(parent, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = parent.read_bytes()
    out = adapt.adapt(parent, textures(), float(ONE_STEP), tmp_path / "dest" / "adapted.pt")
    assert parent.read_bytes() == before
    model, archive = load_archive(out)
    original, _ = load_archive(parent)
    changed = [name for name, value in model.state_dict().items()
               if not torch.equal(value, original.state_dict()[name])]
    assert changed and archive["iteration"] == 1 and archive["optimizer"] is None
    assert [entry["name"] for entry in lineage(archive)] == ["parent", "adapted"]
    assert archive["adapted_from"] == {"archive": str(parent), "sha256": file_sha256(parent), "minutes": 1e-6,
                                       "sections": 3, "side": 64}
    assert sorted(os.listdir(tmp_path / "dest")) == ["adapted.pt"]  # no partial file left
    assert sorted(os.listdir(tmp_path)) == ["dest", "parent.pt"]  # training's dataset, pt/, runs/ went with it


def test_adapt_trains_on_the_sections_alone_each_paired_with_itself(parent, tmp_path, monkeypatch):
    seen = {}

    def fake_main(flags):  # what train.py is given: its dataset, and a finished archive
        path = flags[flags.index("--dataset") + 1]
        with h5py.File(path, "r") as f:
            seen.update(images=f["images"][:], names=sorted(f), registered=bool(f.attrs["registered"]))
        seen["flags"] = flags
        return parent

    monkeypatch.setattr(train, "main", fake_main)
    sections = textures(count=2, side=48)
    adapt.adapt(parent, sections, 2.5, tmp_path / "adapted.pt")
    assert np.array_equal(seen["images"], np.stack([sections, sections], 1))  # [P, 2, D, D]: each twice
    assert seen["names"] == ["coords", "images", "slice_std"] and seen["registered"]  # no fields, no defect maps
    flags = seen["flags"]
    assert flags[flags.index("--minutes") + 1] == "2.5" and flags[flags.index("--p_jitter") + 1] == "1"
    assert float(flags[flags.index("--tissue_change") + 1]) > 0  # the pair of a section with itself changes too
    assert flags[flags.index("--crop") + 1] == "48" and flags[flags.index("--state_archive") + 1] == str(parent)


def test_a_failed_adaptation_leaves_the_previous_adapted_archive_as_it_was(parent, tmp_path, monkeypatch):
    out = tmp_path / "adapted.pt"
    out.write_bytes(b"previous")

    def interrupted(flags):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "main", interrupted)
    with pytest.raises(KeyboardInterrupt):
        adapt.adapt(parent, textures(), 1, out)
    assert out.read_bytes() == b"previous" and sorted(os.listdir(tmp_path)) == ["adapted.pt", "parent.pt"]


def test_sections_are_spread_over_the_range_and_cropped_to_the_central_square(monkeypatch):
    monkeypatch.setattr(adapt, "MAX_SECTIONS", 3)
    monkeypatch.setattr(adapt, "MAX_SIDE", 4)
    assert adapt.section_sample(10, 20) == [10, 14, 19] and adapt.section_sample(5, 7) == [5, 6]
    assert adapt.central_square(10, 6) == (3, 1, 4) and adapt.central_square(3, 8) == (0, 2, 3)
    raw = np.arange(10 * 6 * 10, dtype=np.uint8).reshape(10, 6, 10)
    got = adapt.self_pair_sections(lambda dx, dy, z, side: raw[z, dy:dy + side, dx:dx + side], 0, 10, 10, 6)
    assert np.array_equal(got, raw[[0, 4, 9], 1:5, 3:7])


def test_train_stops_after_minutes_and_saves_where_it_stopped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["images"] = np.stack([textures(), textures(seed=1)])  # 2 stacks of 3: 4 pairs
        f.attrs["registered"] = True
    path = train.main(["--dataset", str(tmp_path / "d.h5"), "--size", "2", "--batch_size", "1", "--epochs", "3",
                       "--vis_interval", "0", "--no_augment", "--minutes", ONE_STEP, "x"])
    archive = load_archive(path)[1]
    assert archive["iteration"] == 1 and archive["epoch"] == 1 and not archive["finished"]


def align_flags(tmp_path, paths, archive, *extra):
    return ["--archive", str(archive), "--source", paths["image"], "--dest", str(tmp_path / "dest"), "--chunk", "32",
            "--overlap", "32", "--z_start", "2", "--z_stop", "5", "--bbox", "0", "0", "48", "48", *extra]


def test_align_adapts_on_the_ranges_raw_sections_aligns_with_it_records_it_and_reuses_it_on_resume(
        parent, tmp_path, tiny_volume, monkeypatch):
    paths, arrays = tiny_volume
    calls = []
    real_adapt = adapt.adapt

    def spy(archive, sections, minutes, out, **kwargs):
        calls.append(sections)
        return real_adapt(archive, sections, minutes, out, **kwargs)

    monkeypatch.setattr(adapt, "adapt", spy)
    align.main(align_flags(tmp_path, paths, parent, "--adapt", ONE_STEP, "--z_stop", "4"))
    adapted = tmp_path / "dest" / "adapted.pt"
    assert len(calls) == 1 and np.array_equal(calls[0], arrays["image"][2:4, 0, :48, :48])  # the raw range only
    entry = json.loads((tmp_path / "dest" / "image" / "provenance").read_text())["processing"][-1]["method"]
    assert entry["run"]["adapt"] == 1e-6 and entry["run"]["adapted_sha256"] == file_sha256(adapted)
    assert entry["run"]["archive_sha256"] == file_sha256(parent)
    assert [run["name"] for run in entry["archive_lineage"]] == ["parent", "adapted"]
    align.main(align_flags(tmp_path, paths, parent, "--adapt", ONE_STEP))  # resumed: the same network
    assert len(calls) == 1
    save_archive(adapted, Pyramid(size=3, k=3, corr_radius=1))  # another network in its place
    with pytest.raises(align.UserError, match="adapted network adapted.pt of sha256 .*, not "):
        align.main(align_flags(tmp_path, paths, parent, "--adapt", ONE_STEP, "--z_stop", "6"))
    with pytest.raises(align.UserError, match="--adapt 1e-06, not 0"):  # nor may a resume drop the adaptation
        align.main(align_flags(tmp_path, paths, parent, "--z_stop", "6"))


@pytest.mark.parametrize("value, last", [
    ("-1", "error: --adapt -1: minutes must be >= 0 (0 = no adaptation)"),
    ("nan", "align.py: error: argument --adapt: 'nan' is not a number"),
])
def test_a_bad_adapt_is_one_line_and_exit_2(parent, tmp_path, tiny_volume, value, last):
    result = run_script(align.__file__, *align_flags(tmp_path, tiny_volume[0], parent, f"--adapt={value}"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == last and not (tmp_path / "dest").exists()


def test_the_benchmark_adapts_on_the_misaligned_raw_stack_alone(tmp_path, monkeypatch):
    from bench import align_quality, cross_volume
    from test_align_quality import write_sections

    write_sections(tmp_path, [(0, 0), (1, 0), (1, 1), (2, 1)])
    seen, real_adapt = [], adapt.adapt
    monkeypatch.setattr(adapt, "adapt", lambda archive, sections, *rest, **kwargs:
                        seen.append(sections) or real_adapt(archive, sections, *rest, **kwargs))
    results = cross_volume.main(["--test", f"isbi={tmp_path}:{ROOT / 'pt' / 'demo.pt'}", "--seed", "0",
                                 "--shape=--z_start 0 --sections 4 --size 64", "--adapt", "0", ONE_STEP])
    assert [r["method"] for r in results] == ["ours (demo, solve1, smooth 192, refine 192)",
                                              "ours (demo, adapted 1e-06 min, solve1, smooth 192, refine 192)"]
    assert len(seen) == 1 and np.array_equal(seen[0], align_quality.real_stack(str(tmp_path), 0, 4, 64)["raw"])
