"""The suite's worker processes (pytest-xdist, ``tests/conftest.py``): how many ``-n auto`` starts, each one's
share of threads, and torch's thread count given back before every test (session 45)."""

import os
import threading
import types

import pytest
import torch

GIB = 1024**3


def _memory(monkeypatch, available):
    psutil = pytest.importorskip("psutil")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=available))


def test_auto_starts_one_worker_per_core_within_the_cap_and_the_memory(suite_setup, monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_AUTO_NUM_WORKERS", raising=False)
    auto = suite_setup.pytest_xdist_auto_num_workers
    _memory(monkeypatch, 64 * GIB)
    for cores, workers in ((1, 1), (2, 2), (6, 6), (16, 8), (64, 8)):
        monkeypatch.setattr(suite_setup, "_cores", lambda cores=cores: cores)
        assert auto(None) == workers
    for available, workers in ((9 * GIB, 4), (3 * GIB, 1), (GIB, 1)):  # one per 2 GiB, at least one
        _memory(monkeypatch, available)
        assert auto(None) == workers
    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "3")  # xdist's own override
    assert auto(None) == 3


def test_each_worker_gets_its_share_of_the_cores(suite_setup, monkeypatch):
    share = suite_setup.thread_share
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for cores, workers, threads in ((2, 2, 1), (2, 1, 2), (16, 8, 2), (16, 2, 8), (3, 2, 1), (1, 4, 1)):
        monkeypatch.setattr(suite_setup, "_cores", lambda cores=cores: cores)
        assert share(workers) == threads
    monkeypatch.setattr(suite_setup, "_cores", lambda: 16)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the caller's own limit lowers the share, never raises it
    assert share(2) == 4 and share(1) == 4 and share(8) == 2
    for ignored in ("0", "", "two"):
        monkeypatch.setenv("OMP_NUM_THREADS", ignored)
        assert share(2) == 8


def test_a_test_starts_with_the_session_s_thread_count_on_every_thread(suite_setup):
    """In a worker: its share in torch, in a fresh thread (libgomp read it from the environment when torch
    loaded it, so the controller set it before the worker started) and in OpenCV; one process: the count
    torch started with."""
    fresh = []
    reader = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    reader.start()
    reader.join()
    if "PYTEST_XDIST_WORKER" not in os.environ:
        assert suite_setup._SHARE is None and torch.get_num_threads() == suite_setup._THREADS
        return
    import cv2

    share = suite_setup.thread_share(int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    assert suite_setup._SHARE == suite_setup._THREADS == share
    assert torch.get_num_threads() == fresh[0] == cv2.getNumThreads() == share
    assert all(os.environ[name] == str(share) for name in suite_setup.THREAD_VARIABLES)


def test_a_changed_thread_count_is_given_back_before_the_next_test(suite_setup):
    """What numba's OpenMP pool (napari's labels colouring) or a fixture that set one thread left behind."""
    threads = suite_setup._THREADS
    try:
        torch.set_num_threads(threads + 1)
        suite_setup._restore_threads()
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(threads)


def test_the_controller_counts_cores_without_importing_torch(suite_setup, tmp_path):
    """``tests/conftest.py`` takes ``cores()`` from ``napari_nephi/core/system.py``, loaded by its path
    (session 46): in xdist's controller neither torch nor the package is imported."""
    import subprocess
    import sys

    from napari_nephi.batch.cluster import cores
    from napari_nephi.core import system

    assert cores is system.cores and suite_setup._cores() == cores() >= 1
    assert suite_setup._cores.__code__.co_filename.endswith(os.path.join("napari_nephi", "core", "system.py"))
    probe = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('probe_conftest', {suite_setup.__file__!r})\n"
        "conftest = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(conftest)\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'napari', 'napari_nephi') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "print(conftest._cores())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == cores()
