"""Similarity measures: known values, invariances, usable as losses."""

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr

from napari_nephi.core.errors import InputError
from napari_nephi.core.similarity import lncc, loss, metric, ncc, nmi


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    a = rng.random((24, 24)).astype(np.float32)
    b = (0.6 * a + 0.4 * rng.random((24, 24))).astype(np.float32)
    return a, b


def test_ncc_equals_pearson(pair):
    a, b = pair
    assert metric("ncc", a, b) == pytest.approx(pearsonr(a.ravel(), b.ravel())[0], abs=1e-5)


def test_ncc_invariant_to_affine_intensity(pair):
    a, _ = pair
    assert metric("ncc", a, 3 * a + 7) == pytest.approx(1.0, abs=1e-5)
    assert metric("ncc", a, -a) == pytest.approx(-1.0, abs=1e-5)


def test_ncc_mask(pair):
    a, b = pair
    mask = np.zeros_like(a, bool)
    mask[:12] = True
    ref = pearsonr(a[:12].ravel(), b[:12].ravel())[0]
    assert metric("ncc", a, b, mask) == pytest.approx(ref, abs=1e-5)


@pytest.mark.parametrize("shape", [(20, 20), (10, 10, 10)])
def test_lncc_identical_is_one_and_lower_for_noise(shape):
    rng = np.random.default_rng(1)
    a = torch.from_numpy(rng.random(shape).astype(np.float32))[None, None]
    b = torch.from_numpy(rng.random(shape).astype(np.float32))[None, None]
    assert float(lncc(a, a, 5)) > 0.99
    assert float(lncc(a, b, 5)) < 0.2


def test_mse(pair):
    a, b = pair
    assert metric("mse", a, b) == pytest.approx(np.mean((a - b) ** 2), rel=1e-5)


def test_nmi_orders_dependence(pair):
    a, b = pair
    rng = np.random.default_rng(2)
    noise = rng.random(a.shape).astype(np.float32)
    same = metric("nmi", a, a)
    related = metric("nmi", a, b)
    unrelated = metric("nmi", a, noise)
    assert same > related > unrelated >= 1.0
    # NMI is invariant to monotone intensity maps, unlike NCC
    assert metric("nmi", a, a**3) == pytest.approx(same, rel=0.05)


@pytest.mark.parametrize("name", ["ncc", "lncc", "mse", "nmi"])
def test_losses_have_gradients_and_decrease(name):
    torch.manual_seed(0)
    target = torch.rand(1, 1, 16, 16)
    x = torch.rand(1, 1, 16, 16, requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.05)
    kw = {"window": 5} if name == "lncc" else {}
    first = float(loss(name, target, x, **kw))
    for _ in range(30):
        opt.zero_grad()
        value = loss(name, target, x, **kw)
        value.backward()
        opt.step()
    assert float(loss(name, target, x, **kw)) < first


def test_unknown_measure():
    with pytest.raises(InputError, match="Unknown similarity"):
        metric("foo", np.zeros(3), np.zeros(3))
    with pytest.raises(InputError):
        loss("foo", torch.zeros(1), torch.zeros(1))


def test_batch_ncc_shapes():
    a = torch.rand(3, 50)
    assert ncc(a, a).shape == ()
    assert float(nmi(a[0], a[0])) > float(nmi(a[0], a[1]))


@pytest.mark.parametrize("chunk", [1 << 18, 1000, 7])
def test_numpy_ncc_in_chunks_matches_pearson(chunk):
    from napari_nephi.core.similarity import _ncc_numpy

    rng = np.random.default_rng(5)
    a = rng.random((30, 20, 10)).astype(np.float32)
    b = (a + rng.random(a.shape)).astype(np.float32)
    mask = rng.random(a.shape) > 0.4
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    inside = pearsonr(a64[mask], b64[mask])[0]
    assert _ncc_numpy(a, b, mask, chunk=chunk) == pytest.approx(inside, abs=1e-12)
    assert _ncc_numpy(a, b, None, chunk=chunk) == pytest.approx(
        pearsonr(a64.ravel(), b64.ravel())[0], abs=1e-12
    )
    assert metric("ncc", a, b, mask) == pytest.approx(inside, abs=1e-12)
