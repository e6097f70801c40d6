"""Fixtures shared by every test folder, and the suite's worker processes and their threads.

The suite runs in worker processes (pytest-xdist; ``addopts`` in ``pyproject.toml``: ``-n auto --dist
loadfile``); ``pytest -n 0`` runs it in one process. See :func:`pytest_xdist_auto_num_workers` for the
number of workers and :func:`thread_share` for each one's threads.
"""

from __future__ import annotations

import gc
import os
import sys

import pytest

#: At most this many workers for ``-n auto``: the slowest files decide the end of the run beyond it.
MAX_WORKERS = 8
#: Each worker holds torch, napari and Qt (1.1-1.4 GB resident on a 2-worker run): one worker per 2 GiB
#: of available memory at most.
WORKER_MEMORY = 2 * 1024**3
#: The thread pools a worker's share is given to before any is started: OpenMP (torch and numba share
#: libgomp), MKL, OpenBLAS, numba and OpenCV.
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMBA_NUM_THREADS",
    "OPENCV_FOR_THREADS_NUM",
)


def _light_module(name: str):
    """``napari_nephi.<name>`` loaded by its file's path, without the package: importing the package would
    import torch in xdist's controller. Only for modules that import nothing from the package.

    The file of this checkout's ``src`` is taken first, so a run against another tree on the path
    (``PYTHONPATH=<frozen tree>/src``, which may predate the module) still starts."""
    import importlib.util

    rel = os.path.join(*name.split(".")) + ".py"
    path = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src", "napari_nephi", rel
    )
    if not os.path.exists(path):  # an installed package without this checkout's sources
        path = os.path.join(importlib.util.find_spec("napari_nephi").submodule_search_locations[0], rel)
    spec = importlib.util.spec_from_file_location(f"_conftest_napari_nephi_{name.replace('.', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: The cores this process may run on: :func:`napari_nephi.core.system.cores` (``batch.cluster.cores``).
_cores = _light_module("core.system").cores


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core, at most :data:`MAX_WORKERS` and one per :data:`WORKER_MEMORY`
    of available memory (xdist's ``PYTEST_XDIST_AUTO_NUM_WORKERS`` overrides it, as in xdist)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS", "").isdigit():
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    workers = min(_cores(), MAX_WORKERS)
    try:
        import psutil

        workers = min(workers, int(psutil.virtual_memory().available // WORKER_MEMORY))
    except ImportError:
        pass
    return max(1, workers)


def thread_share(workers: int) -> int:
    """Each of ``workers`` processes' threads: the cores divided among them (``OMP_NUM_THREADS`` set by
    the caller lowers it).

    Each worker with torch's default (one thread per core) would oversubscribe the cores, and libgomp's
    threads spin while they wait for each other, so a descheduled one stalls its team: NePhi tests ran
    7-14x slower in two workers than alone (session 45).
    """
    share = max(1, _cores() // workers)
    asked = os.environ.get("OMP_NUM_THREADS", "")
    return min(share, int(asked)) if asked.isdigit() and int(asked) > 0 else share


def pytest_configure(config):
    """Before xdist starts the workers (in ``pytest_sessionstart``): their share of threads in the
    environment they inherit, which the pools read once when they start (libgomp's for every thread,
    the widgets' worker threads too, not just the main one). Set here because napari's pytest plugin
    imports numba in each worker before this file is imported there."""
    workers = getattr(config.option, "numprocesses", None)
    if isinstance(workers, int) and workers > 0 and "PYTEST_XDIST_WORKER" not in os.environ:
        os.environ.update(dict.fromkeys(THREAD_VARIABLES, str(thread_share(workers))))


#: In a worker, its share of threads (put in its environment by the controller's :func:`pytest_configure`);
#: else None.
_SHARE = None
if "PYTEST_XDIST_WORKER" in os.environ:
    _SHARE = thread_share(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


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
    global _THREADS
    import torch

    _THREADS = torch.get_num_threads() if _SHARE is None else _SHARE


#: torch's thread count every test starts with (:func:`_restore_threads`), read once tests are collected.
_THREADS: int | None = None


def _restore_threads() -> None:
    """Give this thread torch's count of the session's start (a worker: its share) before each test.

    Left alone, the count depended on the tests that ran before: numba's OpenMP pool, which napari
    starts when it first colours a labels layer, sets this thread's count to the number of cores
    (session 41), and a few module fixtures set one thread and left it so.
    """
    import torch

    if _THREADS is not None and torch.get_num_threads() != _THREADS:
        torch.set_num_threads(_THREADS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """For a test that takes :func:`gc_unfrozen`: unfrozen before its first fixture is set up, frozen
    again after its last one is torn down (a viewer closed and its garbage collected first), whatever
    the order of its fixtures."""
    _restore_threads()
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
def suite_setup():
    """This module: its worker count, thread share and thread restore, for ``tests/test_suite_workers.py``."""
    return sys.modules[__name__]


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
