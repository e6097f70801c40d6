"""Similarity points in chunks: the same loss and gradient as one autograd pass, in bounded memory."""

import pytest
import torch

from napari_nephi.engines.nephi.field import Codes, FieldConfig, NeuralDeformationField, zero_codes
from napari_nephi.engines.nephi.optimize import Maps, OptimizeSettings, step_backward


@pytest.fixture(autouse=True)
def float64():
    """Double precision throughout (random points included), so the comparison can be tight."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _problem(d: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = FieldConfig(ndim=d, hidden=16, layers=2, n_frequencies=8, global_dim=4, local_dim=2, seed=seed)
    field = NeuralDeformationField(cfg).double()
    with torch.no_grad():  # away from the identity, so every layer has a gradient
        for p in field.parameters():
            p.add_(0.05 * torch.randn_like(p))
    zero = zero_codes(cfg, (3,) * d)
    codes = Codes(*(0.1 * torch.randn_like(t).double() for t in (zero.global_code, zero.local_code)))
    shape = (1, 1) + (12,) * d
    fixed = torch.rand(shape, dtype=torch.float64)
    moving = torch.roll(fixed, 1, dims=-1) + 0.1 * torch.rand(shape, dtype=torch.float64)
    mask = (torch.rand(shape, dtype=torch.float64) > 0.3).double()
    return field, codes, fixed, moving, mask


def _grads(d, similarity, chunk, masks):
    field, codes, fixed, moving, mask = _problem(d)
    for t in codes.tensors():
        t.requires_grad_(True)
    settings = OptimizeSettings(sample_points=2000, reg_points=16, similarity=similarity, reg_weight=0.1)
    gen = torch.Generator().manual_seed(3)
    m = (mask, mask) if masks else (None, None)
    loss = step_backward(Maps(field, codes), fixed, moving, settings, gen, *m, chunk=chunk)
    params = list(field.parameters()) + list(codes.tensors())
    return loss, [p.grad.clone() for p in params]


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize(("similarity", "masks"), [("ncc", False), ("ncc", True), ("mse", True)])
def test_chunked_points_give_the_same_loss_and_gradient(d, similarity, masks):
    whole_loss, whole = _grads(d, similarity, chunk=10**6, masks=masks)
    part_loss, parts = _grads(d, similarity, chunk=700, masks=masks)  # 3 uneven chunks
    assert part_loss == pytest.approx(whole_loss, rel=1e-10)
    assert all(g.abs().max() > 0 for g in whole)
    for a, b in zip(whole, parts, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-12)
