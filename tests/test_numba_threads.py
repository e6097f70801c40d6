"""torch's thread count survives the numba thread pool that napari's labels rendering starts.

numba's OpenMP layer starts its pool with ``omp_set_num_threads(cpu_count)`` on the libgomp it
shares with torch, so torch's count in that thread followed it (session 41: 1 -> 2 after the ihc
demo). ``napari_nephi`` picks numba's threading layer before the pool starts, unless the user did.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

from napari_nephi import _numba_threads

# napari imports numba before it loads a plugin; its labels colormap then starts numba's pool from
# numba's on-disk cache, where numba does not reread the environment (hence numba.config).
GUI_ORDER = """
import numpy as np
import torch
from napari.utils.colormaps import DirectLabelColormap
import numba
import napari_nephi

before = torch.get_num_threads()
DirectLabelColormap(color_dict={1: "red", None: "black"}).map(np.array([0, 1], dtype=np.uint8))
print(before, torch.get_num_threads(), numba.threading_layer())
"""


def test_torch_keeps_one_thread_after_napari_starts_numbas_pool():
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_THREADING_LAYER")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", GUI_ORDER], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    before, after, layer = done.stdout.split()
    assert (before, after) == ("1", "1"), done.stdout
    assert layer != "omp", done.stdout


def test_a_layer_the_user_chose_is_kept(monkeypatch):
    monkeypatch.setenv("NUMBA_THREADING_LAYER", "omp")
    monkeypatch.delenv("NUMBA_THREADING_LAYER_PRIORITY", raising=False)
    monkeypatch.delitem(sys.modules, "numba", raising=False)
    _numba_threads.keep_torch_threads()
    assert os.environ["NUMBA_THREADING_LAYER"] == "omp"
    assert "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ


def test_before_numba_is_imported_the_environment_picks_the_layer(monkeypatch):
    monkeypatch.delenv("NUMBA_THREADING_LAYER", raising=False)
    monkeypatch.delenv("NUMBA_THREADING_LAYER_PRIORITY", raising=False)
    monkeypatch.delitem(sys.modules, "numba", raising=False)
    _numba_threads.keep_torch_threads()
    assert os.environ["NUMBA_THREADING_LAYER_PRIORITY"] == "tbb workqueue omp"


def _fake_numba(started: bool, layer: str = "default"):
    """A stand-in for an imported numba: its config and ``threading_layer()`` (ValueError before the pool)."""

    def threading_layer():
        if not started:
            raise ValueError("Threading layer is not initialized.")
        return "omp"

    config = types.SimpleNamespace(
        THREADING_LAYER=layer, THREADING_LAYER_PRIORITY=["tbb", "omp", "workqueue"]
    )
    return types.SimpleNamespace(config=config, threading_layer=threading_layer)


@pytest.mark.parametrize(
    ("started", "layer", "changed"),
    [(False, "default", True), (True, "default", False), (False, "omp", False)],
)
def test_an_imported_numba_is_set_only_before_its_pool_starts_and_unless_its_config_chose(
    monkeypatch, started, layer, changed
):
    """numba imported first (napari's order): its config gets OpenMP last if the pool has not started and
    neither the environment nor numba's config (e.g. a .numba_config.yaml) chose a layer."""
    monkeypatch.delenv("NUMBA_THREADING_LAYER", raising=False)
    monkeypatch.delenv("NUMBA_THREADING_LAYER_PRIORITY", raising=False)
    fake = _fake_numba(started, layer)
    monkeypatch.setitem(sys.modules, "numba", fake)
    _numba_threads.keep_torch_threads()
    expected = ["tbb", "workqueue", "omp"] if changed else ["tbb", "omp", "workqueue"]
    assert fake.config.THREADING_LAYER_PRIORITY == expected
    assert ("NUMBA_THREADING_LAYER_PRIORITY" in os.environ) is changed
