"""Cubic B-spline smoothing of a deformation field (SINR, Song et al.), differentiable to any order.

A *spline-enhanced* neural field evaluates its network only on a regular grid of control points
and interpolates the control displacements with uniform cubic B-splines: the field is C2 by
construction, and its smoothness is set by the knot spacing instead of by the network's spectrum.

Geometry, per axis, in normalised coordinates ([-1, 1], voxel centres, ``align_corners=True``):
``intervals`` knot intervals of width ``h = 2 / intervals`` cover the domain; control point ``j``
sits at ``-1 + (j - MARGIN) * h`` for ``j = 0 .. intervals + 2 * MARGIN``. A cubic B-spline needs one
control point beyond each end of the domain; the extra one (``MARGIN = 2``) keeps the spline exact
on ``[-1 - h, 1 + h]``, where maps composed near the border (``phi_inv(phi(x))``) land. Beyond that
the position is clamped (constant extension), as :func:`.interp.interpolate` does.

:func:`bspline_interpolate` is written with gathers and polynomials only, so autograd takes first,
second and higher derivatives with respect to both the points and the control values, on CPU and
GPU (``grid_sample`` has no double backward and no cubic B-spline mode in 3D).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from ...core.errors import InputError

#: Control points beyond each end of the domain, per axis.
MARGIN = 2


def control_shape(intervals: Sequence[int]) -> tuple[int, ...]:
    """Number of control points per axis for ``intervals`` knot intervals across [-1, 1]."""
    return tuple(int(k) + 2 * MARGIN + 1 for k in intervals)


def control_points(intervals: Sequence[int], device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Normalised coordinates of every control point, ``(*control_shape, D)`` (``ij`` order)."""
    axes = [
        -1 + (torch.arange(int(k) + 2 * MARGIN + 1, device=device, dtype=dtype) - MARGIN) * (2.0 / int(k))
        for k in intervals
    ]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def intervals_for_spacing(shape: Sequence[int], spacing: float) -> tuple[int, ...]:
    """Knot intervals per axis so that knots are at most ``spacing`` voxels apart on a grid of ``shape``."""
    if spacing <= 0:
        raise InputError("The B-spline control-point spacing must be a positive number of voxels.")
    return tuple(max(1, math.ceil((int(n) - 1) / float(spacing))) for n in shape)


def cubic_weights(t: torch.Tensor) -> torch.Tensor:
    """The four uniform cubic B-spline basis values at ``t`` in [0, 1], stacked on a new last axis."""
    t2 = t * t
    t3 = t2 * t
    s = 1 - t
    return torch.stack(
        [s * s * s / 6, (3 * t3 - 6 * t2 + 4) / 6, (-3 * t3 + 3 * t2 + 3 * t + 1) / 6, t3 / 6], dim=-1
    )


def _knot_span(x: torch.Tensor, intervals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised positions ``x`` in control-point units: ``first`` (one past the first of the four
    control points that carry ``x``) and ``frac`` in [0, 1], differentiable in ``x``. The spline is
    exact on ``[1, intervals + 2 * MARGIN - 1]``; beyond it the position is clamped."""
    pos = (x + 1) * (0.5 * intervals) + MARGIN
    pos = torch.minimum(pos.clamp_min(1.0), intervals + (2 * MARGIN - 1))
    first = torch.minimum(pos.detach().floor(), intervals + (2 * MARGIN - 2))
    return first, pos - first


def bspline_interpolate(control: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Cubic B-spline with control values ``control`` evaluated at normalised ``points``.

    ``control`` is ``(B, C, *control_shape)`` (see :func:`control_shape`, at least ``2 * MARGIN + 2``
    per axis) and ``points`` ``(B, N, D)`` (or either with batch 1, broadcast), returning
    ``(B, N, C)``; or unbatched ``(C, *control_shape)`` with ``(N, D)``, returning ``(N, C)``.
    """
    if points.dim() == 2 and control.dim() == points.shape[-1] + 1:
        return bspline_interpolate(control[None], points[None])[0]
    spatial = control.shape[2:]
    d = len(spatial)
    if (
        points.dim() != 3
        or points.shape[-1] != d
        or min(spatial) < 2 * MARGIN + 2
        or (points.shape[0] != control.shape[0] and 1 not in (points.shape[0], control.shape[0]))
    ):
        raise InputError(
            f"Points of shape {tuple(points.shape)} do not fit B-spline control values of shape "
            f"{tuple(control.shape)}."
        )
    b = max(points.shape[0], control.shape[0])
    if points.shape[0] != b:
        points = points.expand(b, -1, -1)
    if control.shape[0] != b:
        control = control.expand(b, *control.shape[1:])
    c, n = control.shape[1], points.shape[1]
    dev = points.device
    intervals = torch.as_tensor([s - 2 * MARGIN - 1 for s in spatial], dtype=points.dtype, device=dev)
    first, frac = _knot_span(points, intervals)
    weights = cubic_weights(frac)  # (B, N, D, 4)
    base = first.long() - 1  # first of the four control points per axis
    strides = [1] * d
    for a in range(d - 2, -1, -1):
        strides[a] = strides[a + 1] * spatial[a + 1]
    # Flat index and weight of every one of the 4**D control points of each point: (B, N, 4**D).
    offsets = torch.as_tensor(list(itertools.product(range(4), repeat=d)), device=dev)  # (4**D, D)
    idx = torch.zeros(b, n, 4**d, dtype=torch.long, device=dev)
    w = None
    for a in range(d):
        idx = idx + (base[..., a, None] + offsets[:, a]) * strides[a]
        wa = weights[..., a, :][..., offsets[:, a]]  # (B, N, 4**D)
        w = wa if w is None else w * wa
    flat = control.reshape(b, c, -1)
    vals = torch.gather(flat, 2, idx.reshape(b, 1, -1).expand(b, c, -1)).reshape(b, c, n, 4**d)
    out = (vals * w[:, None].to(vals.dtype)).sum(-1)  # (B, C, N)
    return out.transpose(1, 2)


def grid_weights(n: int, intervals: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Basis values ``(n, intervals + 2 * MARGIN + 1)`` of one axis at ``n`` voxel centres on [-1, 1].

    Row ``i`` holds the weights of the control points at voxel ``i``, as in
    :func:`bspline_interpolate` (the same clamping), so a spline on a whole grid is a product of
    one such matrix per axis (:func:`bspline_on_grid`).
    """
    x = torch.linspace(-1, 1, int(n), device=device, dtype=dtype) if n > 1 else torch.zeros(1, device=device)
    k = int(intervals)
    first, frac = _knot_span(x, torch.tensor(float(k), device=device, dtype=x.dtype))
    w = cubic_weights(frac)  # (n, 4)
    out = torch.zeros(int(n), k + 2 * MARGIN + 1, device=device, dtype=dtype)
    rows = torch.arange(int(n), device=device)
    base = first.long() - 1
    for j in range(4):
        out.index_put_((rows, base + j), w[:, j].to(dtype), accumulate=True)
    return out


def bspline_on_grid(control: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """The spline with control values ``(B, C, *control_shape)`` on a whole voxel grid, ``(B, C, *shape)``.

    ``weights`` holds :func:`grid_weights` of each axis; separable, so it costs a few matrix
    products instead of ``4**D`` gathers per voxel, and autograd differentiates it to any order.
    """
    out = control
    for a, w in enumerate(weights):
        out = torch.movedim(torch.tensordot(out, w, dims=([2 + a], [1])), -1, 2 + a)
    return out
