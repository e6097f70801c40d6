"""Fixtures shared by every test folder."""

from __future__ import annotations

import pytest


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only (0o555) folder; skips the test where permission bits are ignored (root)."""
    path = tmp_path / "ro"
    path.mkdir()
    path.chmod(0o555)
    try:
        (path / "probe").touch()
    except PermissionError:
        yield path
        path.chmod(0o755)
        return
    (path / "probe").unlink()
    path.chmod(0o755)
    pytest.skip("permission bits are ignored here (root with CAP_DAC_OVERRIDE)")
