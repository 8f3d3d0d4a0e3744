"""quickstart.py (README command 1): what it refuses before it builds or trains anything."""
import pytest

import quickstart
from helpers import UserError


def test_bad_flags_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(quickstart.demo, "ensure_demo", lambda: pytest.fail("built the demo before reading --archive"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="junk.pt"):
        quickstart.main(["--archive", str(junk)])
    with pytest.raises(UserError, match="missing.pt: no such archive file"):
        quickstart.main(["--archive", str(tmp_path / "missing.pt")])
    with pytest.raises(SystemExit, match="2"):  # argparse's usage error, naming quickstart's own flag
        quickstart.main(["--train_epochs", "-1"])
    assert "--train_epochs must be >= 0" in capsys.readouterr().err


def test_the_short_run_is_said_to_show_that_training_runs_with_its_figures():
    note = quickstart.short_run_note({"val_epe": [10.44, 10.42, 10.54], "val_epe_zero_field": [10.47] * 3}, 3,
                                     "pt/demo.pt")
    assert note.startswith("(3 epochs from scratch show that training runs")
    assert "held-out EPE 10.42 px against the zero field's 10.47" in note and "with pt/demo.pt" in note
