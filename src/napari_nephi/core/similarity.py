"""Similarity measures usable as torch losses and as numpy metrics.

All torch functions take tensors of equal shape ``(B, C, *spatial)`` or flat ``(B, N)`` and return
a scalar where *higher is more similar* for NCC/LNCC/NMI; :func:`loss` turns them into minimisable
losses. :func:`metric` evaluates on numpy arrays.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .device import memory_guard
from .errors import DimensionMismatchError, InputError

EPS = 1e-6


def ncc(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Global normalised cross-correlation per batch item, averaged; in [-1, 1]."""
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    w = torch.ones_like(a) if mask is None else mask.reshape(a.shape[0], -1).to(a.dtype)
    n = w.sum(1, keepdim=True).clamp_min(1)
    am = a - (w * a).sum(1, keepdim=True) / n
    bm = b - (w * b).sum(1, keepdim=True) / n
    wam = w * am
    cov = (wam * bm).sum(1)
    if wam.requires_grad:  # as it always was: (w * am * am), the same graph
        va = (w * am * am).sum(1)
    else:  # no graph on this side (a fixed image): (w * am) is wam exactly, multiplied into am's memory
        va = torch.mul(wam, am, out=am).sum(1)
    var = (va * (w * bm * bm).sum(1)).clamp_min(EPS**2)
    return (cov / var.sqrt()).mean()


def lncc(a: torch.Tensor, b: torch.Tensor, window: int = 9) -> torch.Tensor:
    """Local NCC over ``window``-wide boxes, averaged over voxels. Inputs ``(B, C, *spatial)``."""
    if a.dim() - 2 not in (2, 3):
        raise InputError("Local NCC needs (B, C, H, W) or (B, C, D, H, W) tensors.")
    return lncc_map(a, b, window).mean()


def lncc_map(a: torch.Tensor, b: torch.Tensor, window: int, add_a=0.0, add_b=0.0) -> torch.Tensor:
    """Squared local NCC of every voxel (``window``-wide boxes; 2D or 3D), the map :func:`lncc`
    averages; ``add_a`` / ``add_b`` are added to the local variances of ``a`` / ``b`` (noise a blur
    removed, :mod:`napari_nephi.engines.nephi.matchblur`)."""
    pool = F.avg_pool2d if a.dim() == 4 else F.avg_pool3d

    def mean(x):
        return pool(x, window, stride=1, padding=window // 2, count_include_pad=False)

    ma, mb = mean(a), mean(b)
    va = (mean(a * a) - ma * ma).clamp_min(0) + add_a
    vb = (mean(b * b) - mb * mb).clamp_min(0) + add_b
    cov = mean(a * b) - ma * mb
    return cov * cov / (va * vb + EPS)


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).mean()


def nmi(a: torch.Tensor, b: torch.Tensor, bins: int = 32) -> torch.Tensor:
    """Normalised mutual information ``(H(a) + H(b)) / H(a, b)`` with Parzen windows; in [1, 2]."""
    a = a.reshape(-1)
    b = b.reshape(-1)

    def scale(x):
        lo, hi = x.min().detach(), x.max().detach()
        return (x - lo) / (hi - lo).clamp_min(EPS)

    centres = torch.linspace(0, 1, bins, device=a.device, dtype=a.dtype)
    sigma = 1.0 / bins
    wa = torch.exp(-0.5 * ((scale(a)[:, None] - centres) / sigma) ** 2)
    wb = torch.exp(-0.5 * ((scale(b)[:, None] - centres) / sigma) ** 2)
    wa = wa / wa.sum(1, keepdim=True).clamp_min(EPS)
    wb = wb / wb.sum(1, keepdim=True).clamp_min(EPS)
    joint = wa.T @ wb / a.shape[0]
    pa, pb = joint.sum(1), joint.sum(0)

    def entropy(p):
        return -(p * torch.log(p.clamp_min(1e-12))).sum()

    return (entropy(pa) + entropy(pb)) / entropy(joint).clamp_min(EPS)


MEASURES = {"ncc": ncc, "lncc": lncc, "mse": mse, "nmi": nmi}


def loss(name: str, a: torch.Tensor, b: torch.Tensor, **kw) -> torch.Tensor:
    """A minimisable loss: ``1 - ncc``, ``1 - lncc``, ``mse`` or ``2 - nmi``."""
    if name == "ncc":
        return 1 - ncc(a, b, **kw)
    if name == "lncc":
        return 1 - lncc(a, b, **kw)
    if name == "mse":
        return mse(a, b)
    if name == "nmi":
        return 2 - nmi(a, b, **kw)
    raise InputError(f"Unknown similarity {name!r}; choose one of {sorted(MEASURES)}.")


def _ncc_numpy(a: np.ndarray, b: np.ndarray, mask=None, chunk: int = 1 << 18) -> float:
    """:func:`ncc` of two arrays (inside ``mask``), in float64 chunk by chunk to bound memory."""
    a, b = a.reshape(-1), b.reshape(-1)
    m = None if mask is None else np.asarray(mask, bool).reshape(-1)

    def pieces():
        for s in range(0, a.size, chunk):
            pa, pb = a[s : s + chunk].astype(np.float64), b[s : s + chunk].astype(np.float64)
            if m is not None:
                sel = m[s : s + chunk]
                pa, pb = pa[sel], pb[sel]
            yield pa, pb

    sa = sb = 0.0
    n = 0
    for pa, pb in pieces():
        sa, sb, n = sa + float(pa.sum()), sb + float(pb.sum()), n + pa.size
    n = max(n, 1)
    ma, mb = sa / n, sb / n
    cov = va = vb = 0.0
    for pa, pb in pieces():
        pa -= ma
        pb -= mb
        cov, va, vb = cov + float(pa @ pb), va + float(pa @ pa), vb + float(pb @ pb)
    return cov / math.sqrt(max(va * vb, EPS**2))


def _all_finite(x: np.ndarray, slab: int = 1 << 18) -> bool:
    """Whether ``x`` holds no NaN or infinity, read in slabs of about ``slab`` voxels along its first axis
    (no boolean copy of the whole image, and no copy of a non-contiguous view)."""
    if x.ndim == 0 or x.size == 0:
        return bool(np.isfinite(x).all())
    rows = max(1, slab // max(1, x[0].size))
    return all(np.isfinite(x[s : s + rows]).all() for s in range(0, x.shape[0], rows))


def metric(name: str, a, b, mask=None, max_voxels: int = 1 << 20) -> float:
    """Evaluate a measure on numpy arrays (subsampled to ``max_voxels`` for NMI)."""
    if name not in MEASURES:
        raise InputError(f"Unknown similarity {name!r}; choose one of {sorted(MEASURES)}.")
    with memory_guard(f"{name} similarity"):
        a = np.asarray(a, dtype=np.float32)
        b = np.asarray(b, dtype=np.float32)
    if a.shape != b.shape:
        raise DimensionMismatchError(
            f"Shapes differ: {a.shape} vs {b.shape}; compare images on the same grid (warp one first)."
        )
    if mask is not None and np.shape(mask) != a.shape:
        raise DimensionMismatchError(f"The mask has shape {np.shape(mask)} but the images have {a.shape}.")
    for what, x in (("first", a), ("second", b)):
        if not _all_finite(x):
            raise InputError(f"The {what} image holds NaN or infinite values; fill or mask them first.")
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    with torch.no_grad():
        if name == "ncc":
            return _ncc_numpy(a, b, mask)
        if name == "lncc":
            return float(lncc(ta[None, None], tb[None, None]))
        if name == "mse":
            return float(mse(ta, tb))
        step = max(1, a.size // max_voxels)
        return float(nmi(ta.reshape(-1)[::step], tb.reshape(-1)[::step]))
