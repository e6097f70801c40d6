"""Fixtures shared by every test folder."""

from __future__ import annotations

import gc

import pytest


def pytest_collection_finish(session):
    """Freeze the objects that exist once the tests are collected (``gc.freeze``).

    Collecting imports torch, napari and the package: about 500 000 objects that live to the end.
    Every full collection walks all of them, and napari runs one each time a viewer is closed (its
    layer removal), so each GUI test's teardown took about 0.5-1 s. Frozen, they are skipped. What
    the tests make afterwards is collected as before; a test that checks the collector's freeze
    (the widgets' ``FullCollectionPause``, ``remove_layer``) takes the :func:`gc_unfrozen` fixture.
    """
    gc.collect()
    gc.freeze()


@pytest.fixture
def gc_unfrozen():
    """The session's frozen objects unfrozen for this test (``gc.get_freeze_count() == 0``), as in an
    application that froze nothing; frozen again afterwards. List it before the other fixtures, so
    that it is torn down last (after the viewer is closed and its garbage collected)."""
    gc.unfreeze()
    yield
    gc.collect()
    gc.freeze()


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
