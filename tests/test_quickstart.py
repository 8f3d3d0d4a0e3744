"""quickstart.py (README command 1): what it refuses before it builds or trains anything."""
import pytest

import quickstart
from helpers import UserError


def test_a_bad_archive_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(quickstart.demo, "ensure_demo", lambda: pytest.fail("built the demo before reading --archive"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="junk.pt"):
        quickstart.main(["--archive", str(junk)])
    with pytest.raises(UserError, match="missing.pt: no such archive file"):
        quickstart.main(["--archive", str(tmp_path / "missing.pt")])
