"""Archives: a saved net comes back identical from the file alone; bad files are one-line user errors."""
import os
import pickle
from pathlib import Path

import pytest
import torch

from conftest import run_script
from helpers import UserError, vector_length, warp
from models import Pyramid, load_archive, load_weights, read_archive, save_archive


def random_pyramid(size=3, k=3, seed=0, **kwargs):
    """A small pyramid whose every weight is random (the last convs too), so it outputs non-zero fields."""
    torch.manual_seed(seed)
    net = Pyramid(size=size, k=k, corr_radius=1, aligner_widths=(8,), encoder_base=4, encoder_step=2, **kwargs)
    with torch.no_grad():
        for aligner in net.aligners:
            aligner.net[-1].weight.normal_(0, 0.01)
            aligner.net[-1].bias.normal_(0, 0.1)
    return net


def pair(seed=1, side=32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 1, side, side, generator=g), torch.rand(2, 1, side, side, generator=g)


def test_save_then_load_gives_identical_outputs_and_keeps_the_state(tmp_path):
    net = random_pyramid()
    opt = torch.optim.Adam(net.parameters())
    path = save_archive(tmp_path / "net.pt", net, optimizer=opt.state_dict(), loss_history=[0.5, 0.25],
                        args={"lambda1": 0.1})
    loaded, archive = load_archive(path)
    src, tgt = pair()
    assert torch.equal(loaded(src, tgt).field, net(src, tgt).field)
    assert loaded.config == net.config
    assert archive["kind"] == "seamless-archive" and archive["version"] == 1
    assert archive["loss_history"] == [0.5, 0.25] and archive["args"] == {"lambda1": 0.1}
    opt2 = torch.optim.Adam(loaded.parameters())
    opt2.load_state_dict(archive["optimizer"])


def test_no_temp_file_is_left_and_a_failed_save_keeps_the_old_archive(tmp_path):
    net = random_pyramid()
    path = save_archive(tmp_path / "net.pt", net, step=1)
    save_archive(path, net, step=2)
    assert [p.name for p in tmp_path.iterdir()] == ["net.pt"]
    with pytest.raises(Exception):
        save_archive(path, net, step=3, hook=lambda: None)  # a lambda cannot be pickled
    assert [p.name for p in tmp_path.iterdir()] == ["net.pt"]
    assert read_archive(path)["step"] == 2
    with pytest.raises(ValueError, match="reserved"):
        save_archive(path, net, config={})
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="cannot write the archive"):  # an OSError is one line
        save_archive(tmp_path / "a_file" / "net.pt", net, step=4)


def test_missing_corrupt_and_foreign_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="nope.pt: no such archive file"):
        load_archive(tmp_path / "nope.pt")
    with pytest.raises(UserError, match="a folder, not an archive file"):
        load_archive(tmp_path)
    good = save_archive(tmp_path / "good.pt", random_pyramid())
    for name, content, says in (("junk.pt", b"\x00not a torch file\xff" * 10, r"it starts with b'\\x00not'"),
                                ("notes.pt", b"some text", "it starts with b'some'"), ("empty.pt", b"", "it is empty"),
                                ("cut.pt", good.read_bytes()[:300], None)):  # a zip cut short: torch's words
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError, match=f"{name}: not a torch file \\({says}" if says else
                           f"{name}: not a readable torch file") as err:
            load_archive(tmp_path / name)
        assert "\n" not in str(err.value)
    for name, foreign in (("dict.pt", {"state_dict": {}}), ("tensor.pt", torch.zeros(3))):
        torch.save(foreign, tmp_path / name)
        with pytest.raises(UserError, match=f"{name}: a torch file but not a SEAMLeSS archive"):
            load_archive(tmp_path / name)
    torch.save({"kind": "seamless-defect-detector", "version": 1}, tmp_path / "detector.pt")
    with pytest.raises(UserError, match="detector.pt: a seamless-defect-detector file, not an aligner's archive"):
        load_archive(tmp_path / "detector.pt")


class RunsCode:
    """Pickles as a call of ``os.system(command)``: unpickling it (``weights_only=False``) runs the command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def malicious_archive(folder: Path) -> tuple[Path, Path]:
    """``(archive, sentinel)``: a real archive plus an entry whose unpickling would create ``sentinel``."""
    sentinel = folder / "SENTINEL"
    archive = read_archive(save_archive(folder / "good.pt", random_pyramid(), summary={"name": "good"}))
    torch.save({**archive, "payload": RunsCode(f"touch {sentinel}")}, folder / "evil.pt")
    return folder / "evil.pt", sentinel


def test_an_archive_that_would_run_code_is_refused_and_runs_nothing(tmp_path, recwarn):
    evil, sentinel = malicious_archive(tmp_path)
    for load in (read_archive, load_archive):
        with pytest.raises(UserError, match=r"evil.pt: not a safe network archive: .*\.system") as err:
            load(evil)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="evil.pt: not a safe network archive"):
        load_weights(random_pyramid(), evil)
    plain = tmp_path / "plain.pt"  # a bare pickle (protocol 4), not torch's zip format
    plain.write_bytes(pickle.dumps(RunsCode(f"touch {sentinel}"), protocol=4))
    with pytest.raises(UserError, match="plain.pt: not a readable torch file"):
        read_archive(plain)
    assert not sentinel.exists() and not recwarn.list  # torch's warning of the protocol is not shown


@pytest.mark.parametrize("command", [
    ["net_hist.py", "{evil}"],
    ["align.py", "--archive", "{evil}", "--source", "{source}", "--dest", "{tmp}/d", "--z_start", "0",
     "--z_stop", "2"],
    ["train.py", "--state_archive", "{evil}", "--dataset", "{tmp}/none.h5", "child"],
    ["train.py", "--resume", "--epochs", "9", "evil"],  # pt/evil.pt, in the working directory
])
def test_every_command_refuses_an_archive_that_would_run_code(tmp_path, tiny_volume, command):
    evil, sentinel = malicious_archive(tmp_path)
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "evil.pt").write_bytes(evil.read_bytes())
    root = Path(__file__).resolve().parent.parent
    argv = [a.format(evil=evil, source=tiny_volume[0]["image"], tmp=tmp_path) for a in command]
    result = run_script(root / argv[0], *argv[1:], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "evil.pt: not a safe network archive" in lines[0]
    assert not sentinel.exists() and not (tmp_path / "d").exists()


def test_weights_that_do_not_match_the_config_are_user_errors(tmp_path):
    path = save_archive(tmp_path / "net.pt", random_pyramid(size=3))
    archive = read_archive(path)
    archive["config"]["size"] = 4
    torch.save(archive, tmp_path / "bigger.pt")
    with pytest.raises(UserError, match="bigger.pt: weights do not match the config: .*missing"):
        load_archive(tmp_path / "bigger.pt")
    archive["config"].update(size=3, k=5)
    torch.save(archive, tmp_path / "k5.pt")
    with pytest.raises(UserError, match=r"k5.pt: weights do not match the config: aligners.0.net.0.weight "
                                        r"has shape \(8, 17, 3, 3\), the config needs \(8, 17, 5, 5\)"):
        load_archive(tmp_path / "k5.pt")
    archive["config"].update(k=3, colour="red")
    torch.save(archive, tmp_path / "odd.pt")
    with pytest.raises(UserError, match="odd.pt: invalid config"):
        load_archive(tmp_path / "odd.pt")


def test_a_three_level_archive_grows_into_a_four_level_pyramid(tmp_path):
    old = random_pyramid(size=3, seed=0)
    path = save_archive(tmp_path / "old.pt", old)
    torch.manual_seed(5)
    grown = Pyramid(**{**old.config, "size": 4})  # level 3 fresh: its aligner outputs zero
    fresh_stage3 = {k: v.clone() for k, v in grown.encoder.stages[3].state_dict().items()}
    assert load_weights(grown, path) == [0, 1, 2]
    for level in range(3):
        for name, value in old.aligners[level].state_dict().items():
            assert torch.equal(grown.aligners[level].state_dict()[name], value)
        for name, value in old.encoder.stages[level].state_dict().items():
            assert torch.equal(grown.encoder.stages[level].state_dict()[name], value)
    assert all(torch.equal(v, fresh_stage3[k]) for k, v in grown.encoder.stages[3].state_dict().items())
    src, tgt = pair()
    # the grown net computes what the old one did (up to level 2 now warping by a zero field)
    assert torch.allclose(grown(src, tgt).field, old(src, tgt).field, atol=1e-5)
    assert load_weights(grown, read_archive(path)) == [0, 1, 2]


def test_growing_refuses_other_kernels_and_fewer_levels(tmp_path):
    path = save_archive(tmp_path / "old.pt", random_pyramid(size=3, k=3))
    with pytest.raises(UserError, match="old.pt: config differs .*k 3 vs 5"):
        load_weights(random_pyramid(size=4, k=5), path)
    with pytest.raises(UserError, match="old.pt: has 3 levels, more than the model's 2"):
        load_weights(random_pyramid(size=2, k=3), path)
    with pytest.raises(UserError, match="^--state_archive X: has 3 levels"):  # named as the caller's flag
        load_weights(random_pyramid(size=2, k=3), read_archive(path), "--state_archive X")


@pytest.mark.parametrize("name, within", [("demo.pt", 1.5), ("real_tissue.pt", 1.5), ("static_phantom.pt", 0.5)])
def test_each_shipped_network_loads_and_recovers_a_known_shift(name, within):
    """The archives in pt/ work with today's code: a phantom section shifted by (5.5, -3.25) px is found again."""
    import phantom
    from alignment import for_inference, pair_field

    model, _ = load_archive(Path(__file__).resolve().parent.parent / "pt" / name)
    section = torch.from_numpy(phantom.make_phantom((1, 256, 256), seed=3)).float()[None]
    truth = torch.tensor([5.5, -3.25]).view(1, 2, 1, 1).expand(1, 2, 256, 256)
    target = warp(section, truth).round().clamp(1, 255)  # warp(source, field) = target: the field is the shift
    field = pair_field(for_inference(model), section[0, 0].byte().numpy(), target[0, 0].byte().numpy())
    error = vector_length(field[None] - truth)[0, 32:-32, 32:-32]  # away from the edges the shift pulls in
    assert float(error.median()) < within < float(vector_length(truth).mean())
