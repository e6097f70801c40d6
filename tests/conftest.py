"""Fixtures shared by every test folder."""

from __future__ import annotations

import gc

import pytest


def pytest_collection_finish(session):
    """Freeze the objects that exist once the tests are collected (``gc.freeze``).

    Collecting imports torch, napari and the package: about 500 000 objects that live to the end.
    Every full collection walks all of them, and napari runs one each time a viewer is closed (its
    layer removal), so each GUI test's teardown took about 0.5-1 s. Frozen, they are skipped. What
    the tests make afterwards is collected as before.

    So the widgets' ``FullCollectionPause`` and ``remove_layer`` take their "something else froze
    objects" branch (they freeze nothing) in every test but those that take the :func:`gc_unfrozen`
    fixture, which are the only tests of their own freeze, the branch users run.
    """
    gc.collect()
    gc.freeze()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """For a test that takes :func:`gc_unfrozen`: unfrozen before its first fixture is set up, frozen
    again after its last one is torn down (a viewer closed and its garbage collected first), whatever
    the order of its fixtures."""
    unfrozen = "gc_unfrozen" in getattr(item, "fixturenames", ())
    if unfrozen:
        gc.unfreeze()
    yield
    if unfrozen:
        gc.collect()
        gc.freeze()


@pytest.fixture
def gc_unfrozen():
    """This test runs with the session's frozen objects unfrozen (``gc.get_freeze_count() == 0``), as in
    an application that froze nothing. The work is done by :func:`pytest_runtest_protocol`."""
    assert gc.get_freeze_count() == 0
    yield


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
