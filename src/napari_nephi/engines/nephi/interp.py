"""N-linear interpolation of a grid at continuous points, differentiable to any order.

``torch.nn.functional.grid_sample`` has no double backward, but GradICON and the Jacobian
regularisers differentiate the deformation with respect to the points and then back-propagate
through that derivative. This version is built from gathers and products only, so autograd can
take derivatives of any order with respect to both the grid values and the points, on CPU and GPU.

Points are normalised coordinates in [-1, 1] in the grid's own axis order (``(y, x)`` or
``(z, y, x)``), voxel centre 0 at -1 and voxel centre ``n - 1`` at +1 (``align_corners=True``).
Points outside are clamped to the border (border extension).
"""

from __future__ import annotations

import itertools

import torch

from ...core.errors import InputError


def interpolate(grid: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Values of ``grid`` at ``points``.

    ``grid`` is ``(B, C, *spatial)`` with ``points`` ``(B, N, D)``, returning ``(B, N, C)``; or
    unbatched ``(C, *spatial)`` with ``(N, D)``, returning ``(N, C)``.
    """
    if points.dim() == 2:
        return interpolate(grid[None], points[None])[0]
    b, c = grid.shape[:2]
    spatial = grid.shape[2:]
    d = len(spatial)
    if points.dim() != 3 or points.shape[-1] != d or points.shape[0] not in (b, 1):
        raise InputError(
            f"Points of shape {tuple(points.shape)} do not fit a grid of shape {tuple(grid.shape)}."
        )
    if points.shape[0] != b:
        points = points.expand(b, -1, -1)
    n = points.shape[1]
    sizes = torch.as_tensor(spatial, dtype=points.dtype, device=points.device)
    # NaN points would index out of bounds; a diverged run is stopped by the optimisation.
    points = torch.nan_to_num(points, nan=0.0, posinf=1.0, neginf=-1.0)
    pos = (points + 1) * (0.5 * (sizes - 1))
    pos = torch.minimum(pos.clamp_min(0), sizes - 1)
    upper = torch.as_tensor([max(s - 2, 0) for s in spatial], device=points.device)
    i0 = torch.minimum(pos.detach().floor().long(), upper)
    frac = pos - i0.to(pos.dtype)  # differentiable in the points; 0 on a size-1 axis
    i1 = torch.minimum(i0 + 1, torch.as_tensor(spatial, device=points.device) - 1)
    strides = [1] * d
    for a in range(d - 2, -1, -1):
        strides[a] = strides[a + 1] * spatial[a + 1]
    flat = grid.reshape(b, c, -1)
    out = None
    for corner in itertools.product((0, 1), repeat=d):
        idx = torch.zeros(b, n, dtype=torch.long, device=points.device)
        w = None
        for a, bit in enumerate(corner):
            idx = idx + (i1[..., a] if bit else i0[..., a]) * strides[a]
            wa = frac[..., a] if bit else 1 - frac[..., a]
            w = wa if w is None else w * wa
        vals = torch.gather(flat, 2, idx[:, None, :].expand(b, c, n))  # (B, C, N)
        term = vals * w[:, None, :].to(vals.dtype)
        out = term if out is None else out + term
    return out.transpose(1, 2)
