"""Cubic B-spline interpolation of volumes for the coarse stage (``grid_sample`` has no 3D cubic mode).

Trilinear interpolation smooths a volume by a variance ``f (1 - f)`` per axis that depends on the
sampling point's sub-voxel position ``f``: where a map moves the voxels by a fraction of a voxel, the
similarity can gain by moving them to where the warped image is blurred less or more like the fixed
one, and the coarse stage bends a shift or rotation at strong edges (session 32, docs/nephi.md). The
interpolating cubic spline reproduces polynomials up to degree 3, so its smoothing has no second
moment at any sub-voxel position. It is evaluated as in Sigg & Hadwiger (GPU Gems 2, ch. 20): the
image's spline coefficients (:func:`spline_coefficients`, a separable FIR approximation of the
recursive prefilter) read by 2^D linear fetches at shifted points, weighted per axis
(:func:`cubic_sample`); differentiable in the points through ``grid_sample``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Pole of the cubic B-spline's prefilter; its inverse filter is ``sqrt(3) POLE^|k|``.
POLE = math.sqrt(3.0) - 2.0
#: Taps each side of the truncated prefilter (``|POLE|^10`` is 2e-6).
PREFILTER_HALF_WIDTH = 10


def spline_coefficients(image: torch.Tensor) -> torch.Tensor:
    """Cubic B-spline coefficients of ``image`` ``(B, C, *spatial)`` (2D or 3D), the image mirrored
    at its edges (scipy's ``mode="mirror"``): the inverse of the sampled B-spline ``[1, 4, 1] / 6``
    along every axis. One coefficient more on each side of every axis (the mirror of the second),
    which :func:`cubic_sample` reads at the edges."""
    d = image.dim() - 2
    half = PREFILTER_HALF_WIDTH
    k = torch.arange(-half, half + 1, device=image.device, dtype=image.dtype)
    taps = math.sqrt(3.0) * POLE ** k.abs()
    b, c = image.shape[:2]
    out = image.reshape(b * c, 1, *image.shape[2:])
    conv = F.conv2d if d == 2 else F.conv3d
    for axis in range(d):
        shape = [1, 1] + [1] * d
        shape[2 + axis] = 2 * half + 1
        out = conv(_mirror(out, 2 + axis, half + 1), taps.reshape(shape))
    return out.reshape(b, c, *out.shape[2:])


def _mirror(t: torch.Tensor, dim: int, width: int) -> torch.Tensor:
    """``t`` extended by ``width`` on both sides of ``dim`` by mirroring about its edge voxels
    (period ``2 (n - 1)``; a size-1 axis repeats its value)."""
    n = t.shape[dim]
    if n == 1:
        return torch.cat([t] * (2 * width + 1), dim)
    period = 2 * (n - 1)
    idx = torch.arange(-width, n + width, device=t.device) % period
    idx = torch.where(idx >= n, period - idx, idx)
    return t.index_select(dim, idx)


def cubic_sample(coefficients: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``grid_sample(..., align_corners=True)`` with the cubic B-spline of ``coefficients``
    (:func:`spline_coefficients`) in place of linear interpolation: ``points`` ``(B, *P, D)``
    normalised, components in grid_sample's order (x, y[, z]); points outside the frame take the
    edge's value (``padding_mode="border"``)."""
    spatial = coefficients.shape[2:]  # the image's shape plus 2 per axis (spline_coefficients)
    d = len(spatial)
    sizes = torch.as_tensor(list(spatial)[::-1], dtype=points.dtype, device=points.device) - 2  # x, y[, z]
    scale = (sizes - 1).clamp_min(1) / 2
    # voxels of the coefficients; outside the frame the edge's value (padding "border")
    pos = torch.minimum(((points + 1) * scale).clamp_min(0), sizes - 1) + 1
    i = pos.detach().floor()
    f = pos - i
    f2, f3 = f * f, f * f * f
    w0 = (1 - f) ** 3 / 6
    w1 = (4 - 6 * f2 + 3 * f3) / 6
    w2 = (1 + 3 * f + 3 * f2 - 3 * f3) / 6
    w3 = f3 / 6
    g = (w0 + w1, w2 + w3)
    h = (i - 1 + w1 / g[0], i + 1 + w3 / g[1])  # where a linear fetch gives each pair's weighted sum
    hn = tuple(t / ((sizes + 1) / 2) - 1 for t in h)  # normalised on the coefficients' grid
    out = None
    for corner in range(2**d):
        bits = [(corner >> a) & 1 for a in range(d)]
        pts = torch.stack([hn[b][..., a] for a, b in enumerate(bits)], -1)
        weight = g[bits[0]][..., 0]
        for a in range(1, d):
            weight = weight * g[bits[a]][..., a]
        term = weight[:, None] * F.grid_sample(
            coefficients, pts, mode="bilinear", padding_mode="border", align_corners=True
        )
        out = term if out is None else out + term
    return out
