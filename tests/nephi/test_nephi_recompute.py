"""Session 45 (B): the coarse stage's per-direction comparison, recomputed in the backward pass on large
images (``coarse.RECOMPUTE_MIN_VOXELS``), gives the displacement bit for bit.

The digests were read on the frozen tree before the change (fb0cc16, ``PYTHONPATH=/tmp/f45/src``,
``/tmp/s45/B/digest.py``): the same pair, with and without the recomputation forced on a 64^2 pair.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from scipy import ndimage
from skimage import data

import napari_nephi
from napari_nephi.engines.nephi import coarse

# sha256 (first 16 hex digits) of the forward displacement at fb0cc16
FROZEN = {"plain": "5b959dcde3ba4ec5", "masked": "9ee229029af256ce"}


def _digest(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, np.float32).tobytes()).hexdigest()[:16]


def _pair(n=64, shift=(1.3, -0.7)):
    f = ndimage.zoom(data.camera().astype(np.float32) / 255, n / 512, order=1)
    yy, xx = np.mgrid[:n, :n].astype(np.float32)
    coords = [yy + shift[0] + 1.5 * np.sin(xx / n * 6), xx + shift[1]]
    return f, ndimage.map_coordinates(f, coords, order=1, mode="nearest").astype(np.float32)


def _options(kind):
    if kind == "masked":
        return dict(
            fixed_mask=np.pad(np.ones((48, 48), bool), 8), moving_mask=np.pad(np.ones((56, 56), bool), 4)
        )
    return {}


@pytest.mark.parametrize("kind", ["plain", "masked"])
@pytest.mark.parametrize("recompute", [False, True])
def test_recomputed_comparison_is_bit_for_bit(monkeypatch, kind, recompute):
    if recompute:  # the large-image path forced on the small pair
        monkeypatch.setattr(coarse, "RECOMPUTE_MIN_VOXELS", 0)
    else:
        monkeypatch.setattr(coarse, "RECOMPUTE_MIN_VOXELS", 1 << 40)
    f, m = _pair()
    r = napari_nephi.register(f, m, method="nephi", device="cpu", seed=0, **_options(kind))
    assert _digest(r.transform.displacement(f.shape)) == FROZEN[kind]


def test_recompute_only_where_asked(monkeypatch):
    """The segment is checkpointed only with ``recompute`` and autograd on (a graph to save)."""
    import torch

    calls = []
    monkeypatch.setattr(coarse, "checkpoint", lambda fn, *a, **k: calls.append(1) or fn(*a))
    u = torch.zeros(3, requires_grad=True)
    coarse._recomputed(lambda x, fw: x.sum(), u, True, False)
    with torch.no_grad():
        coarse._recomputed(lambda x, fw: x.sum(), u, True, True)
    assert calls == []
    coarse._recomputed(lambda x, fw: x.sum(), u, True, True)
    assert calls == [1]
