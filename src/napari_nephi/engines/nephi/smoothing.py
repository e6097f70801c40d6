"""Separable Gaussian smoothing of tensors (edges replicated): along one axis, or along every axis."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _kernel(t: torch.Tensor, sigma: float, radius: int) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=t.dtype, device=t.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def blur_axis(t: torch.Tensor, axis: int, sigma: float, radius: int) -> torch.Tensor:
    """``t`` convolved along ``axis`` with a Gaussian of ``sigma`` voxels cut at ``radius`` voxels
    (normalised to sum 1; the edges replicated)."""
    k = _kernel(t, sigma, radius).reshape(1, 1, -1)
    moved = t.movedim(axis, -1)
    flat = moved.reshape(-1, 1, moved.shape[-1])
    flat = F.conv1d(F.pad(flat, (radius, radius), mode="replicate"), k)
    return flat.reshape(moved.shape).movedim(-1, axis)


def blur_axis_lean(t: torch.Tensor, axis: int, sigma: float, radius: int) -> torch.Tensor:
    """:func:`blur_axis` summed as shifted copies of the edge-padded ``t`` (the same kernel, equal
    up to rounding): three copies of ``t`` at most, where ``conv1d`` on the CPU unfolds one per
    kernel tap (19 copies at ``radius`` 9: 300 MiB more on a 2048^2 image)."""
    k = _kernel(t, sigma, radius)
    n = t.shape[axis]
    first, last = t.narrow(axis, 0, 1), t.narrow(axis, n - 1, 1)
    sizes = [radius if a == axis % t.dim() else -1 for a in range(t.dim())]
    padded = torch.cat([first.expand(*sizes), t, last.expand(*sizes)], dim=axis)
    out = padded.narrow(axis, 0, n) * k[0]
    for i in range(1, 2 * radius + 1):
        out.add_(padded.narrow(axis, i, n), alpha=float(k[i]))
    return out


def gaussian_smoothed(grid: torch.Tensor, sigma) -> torch.Tensor:
    """``grid`` ``(1, C, *spatial)`` filtered by a Gaussian of ``sigma`` voxels per axis (edges
    replicated); a sigma under 0.3 leaves that axis as it is."""
    out = grid
    for axis, sg in enumerate(sigma):
        n = out.shape[2 + axis]
        if sg < 0.3 or n < 2:
            continue
        out = blur_axis(out, 2 + axis, sg, min(int(math.ceil(3 * sg)), n - 1))
    return out.contiguous()
