"""``ncc`` and ``metric`` after session 43's memory cuts: the same values and gradients, bit for bit."""

import numpy as np
import pytest
import torch

from napari_nephi.core.errors import InputError
from napari_nephi.core.similarity import EPS, _all_finite, metric, ncc


def ncc_before(a, b, mask=None):
    """``ncc`` as it was before session 43 (the reference)."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    w = torch.ones_like(a) if mask is None else mask.reshape(a.shape[0], -1).to(a.dtype)
    n = w.sum(1, keepdim=True).clamp_min(1)
    am, bm = a - (w * a).sum(1, keepdim=True) / n, b - (w * b).sum(1, keepdim=True) / n  # (in this order)
    cov = (w * am * bm).sum(1)
    var = ((w * am * am).sum(1) * (w * bm * bm).sum(1)).clamp_min(EPS**2)
    return (cov / var.sqrt()).mean()


def _inputs(seed, shape, mask_kind, grads):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g) * 3 - 1
    b = 0.7 * a + 0.3 * torch.rand(shape, generator=g)
    mask = {
        None: None,
        "bool": torch.rand(shape, generator=g) > 0.3,
        "float": torch.rand(shape, generator=g),  # fractional weights (the coarse stage's pooled ones)
    }[mask_kind]
    return a.requires_grad_("a" in grads), b.requires_grad_("b" in grads), mask


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("grads", ["", "a", "b", "ab"])
@pytest.mark.parametrize("shape", [(1, 1, 37, 53), (2, 1, 9, 11, 13), (3, 4097)])
def test_ncc_values_and_gradients_are_those_before_bit_for_bit(mask_kind, grads, shape):
    for seed in range(3):
        outs = []
        for fn in (ncc_before, ncc):
            a, b, mask = _inputs(seed, shape, mask_kind, grads)
            value = fn(a, b, mask)
            if grads:
                value.backward()
            outs.append((value.detach(), *(t.grad for t in (a, b) if t.requires_grad)))
        assert all(torch.equal(x, y) for x, y in zip(*outs)), (seed, shape, mask_kind, grads)


def test_ncc_keeps_its_inputs():
    a, b, mask = _inputs(0, (1, 1, 16, 16), "bool", "b")
    copies = [t.detach().clone() for t in (a, b, mask)]
    ncc(a, b, mask)
    assert all(torch.equal(t, c) for t, c in zip((a, b, mask), copies))


def test_metric_checks_every_slab_for_non_finite_values():
    """The finite check runs in slabs of 2^18 voxels: a NaN in the last slab (or the only one) is found."""
    a = np.random.default_rng(0).random((600, 600)).astype(np.float32)
    assert metric("ncc", a, a) == pytest.approx(1.0)
    for where in ((599, 599), (0, 0), (300, 17)):
        bad = a.copy()
        bad[where] = np.nan
        with pytest.raises(InputError, match="NaN"):
            metric("ncc", a, bad)


@pytest.mark.parametrize("where", [(0, 0), (-1, -1), (7, 3)])
def test_the_finite_check_reads_non_contiguous_views_in_slabs(where):
    """metric's NaN check (session 43, review 2 B-3): a strided view is read in row slabs, not copied
    whole, and a NaN anywhere in it, in the first or last slab or between, is found."""
    base = np.random.default_rng(0).random((64, 80), dtype=np.float32)
    view = base[:, ::2]  # non-contiguous
    assert not view.flags.c_contiguous and _all_finite(view, slab=100)
    bad = base.copy()
    bad[:, ::2][where] = np.nan
    assert not _all_finite(bad[:, ::2], slab=100)
    assert not _all_finite(bad[:, ::2])  # one slab
    bad[:, ::2][where] = np.inf
    assert not _all_finite(bad[:, ::2], slab=100)
    assert _all_finite(np.float32(1.0)) and not _all_finite(np.float32(np.nan))
