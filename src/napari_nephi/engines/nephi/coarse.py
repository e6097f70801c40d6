"""The cheap coarse stage: a stationary velocity field on a low-resolution grid.

``v`` lives on a grid a few times coarser than the image; scaling and squaring turns ``v`` into a
forward displacement and ``-v`` into its inverse, both diffeomorphic, so the stage is fast and
cannot fold. The result, :class:`DenseMaps`, is interpolated with :func:`.interp.interpolate`
(differentiable to any order), so the neural field that follows can be regularised by autograd
through it. Coordinates are normalised [-1, 1] in the image's axis order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...core import regularizers as R
from ...core.similarity import lncc, ncc
from .interp import interpolate


def normalized_grid(shape, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Normalised coordinates of every voxel centre, ``(*shape, D)``."""
    axes = [
        torch.linspace(-1, 1, n, device=device, dtype=dtype) if n > 1 else torch.zeros(1, device=device)
        for n in shape
    ]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def grid_sample_points(volume: torch.Tensor, points: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """Sample ``volume`` ``(B, C, *spatial)`` at normalised ``points`` ``(B, *P, D)``; ``(B, C, *P)``."""
    d = points.shape[-1]
    b = points.shape[0]
    lead = points.shape[1:-1]
    grid = points.reshape(b, -1, *([1] * (d - 1)), d).flip(-1)
    out = F.grid_sample(
        volume, grid.to(volume.dtype), mode="bilinear", padding_mode=padding, align_corners=True
    )
    return out.reshape(b, volume.shape[1], *lead)


def compose_displacement(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Displacement of ``(x + u) o (x + w)``: ``w(x) + u(x + w(x))``. Fields ``(B, D, *S)``."""
    shape = u.shape[2:]
    ident = normalized_grid(shape, u.device, u.dtype)
    pts = ident[None] + torch.movedim(w, 1, -1)
    return w + grid_sample_points(u, pts)


def integrate_velocity(v: torch.Tensor, steps: int = 6) -> torch.Tensor:
    """Scaling and squaring: the displacement of ``exp(v)`` for a stationary velocity ``(B, D, *S)``."""
    u = v / (2**steps)
    for _ in range(steps):
        u = compose_displacement(u, u)
    return u


class DenseMaps:
    """Forward and backward maps ``x + u(x)`` from displacement grids ``(1, D, *S)``."""

    def __init__(self, forward: torch.Tensor, backward: torch.Tensor):
        self.forward_grid = forward
        self.backward_grid = backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + interpolate(self.forward_grid.to(x.dtype), x)

    def backward(self, x: torch.Tensor) -> torch.Tensor:
        return x + interpolate(self.backward_grid.to(x.dtype), x)


#: Voxels of the finest coarse grid. The coarse stage keeps autograd tensors for every
#: scaling-and-squaring step, so a grid half the size of a 256^3 volume would cost more memory than
#: the neural field; grids above this are replaced by the largest downsampling under it.
COARSE_MAX_VOXELS = 1 << 17


def pyramid_shapes(shape, factors, max_voxels: int = COARSE_MAX_VOXELS) -> list[tuple[int, ...]]:
    """Coarse grids of ``shape`` downsampled by each factor (coarse first), none above ``max_voxels``."""
    out: list[tuple[int, ...]] = []
    for f in factors:
        f = int(f)
        while True:
            s = tuple(max(4, min(int(n), -(-int(n) // f))) for n in shape)
            if math.prod(s) <= max_voxels or all(n <= 4 for n in s):
                break
            f += 1
        if s not in out:
            out.append(s)
    return out


def _similarity(name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if name == "lncc":
        return 1 - lncc(a, b, window=5)
    if name == "mse":
        return ((a - b) ** 2).mean()
    return 1 - ncc(a, b)


def optimize_velocity(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    shapes: list[tuple[int, ...]],
    iterations: int,
    reg_weight: float,
    similarity: str,
    on_step,
    learning_rate: float = 0.02,
    steps: int = 6,
) -> DenseMaps:
    """Optimise a velocity field on each grid of ``shapes`` (coarse first), upsampling between.

    ``fixed`` and ``moving`` are ``(1, 1, *spatial)`` on the same grid; ``on_step(loss)`` is called
    every iteration (it reports progress and may raise ``Cancelled``). The regulariser is the
    diffusion energy of ``v`` in voxels of the current grid, which does not depend on the grid size.
    """
    d = fixed.dim() - 2
    v = None
    for shape in shapes:
        f_l = F.interpolate(fixed, size=shape, mode="area")
        m_l = F.interpolate(moving, size=shape, mode="area")
        if v is None:
            v0 = torch.zeros(1, d, *shape, device=fixed.device)
        else:
            mode = "bilinear" if d == 2 else "trilinear"
            v0 = F.interpolate(v.detach(), size=shape, mode=mode, align_corners=True)
        v = torch.nn.Parameter(v0)
        to_vox = torch.as_tensor([(n - 1) / 2 for n in shape], device=fixed.device).reshape(1, d, *[1] * d)
        ident = normalized_grid(shape, fixed.device)[None]
        opt = torch.optim.Adam([v], lr=learning_rate)
        for _ in range(iterations):
            opt.zero_grad()
            u_f = integrate_velocity(v, steps)
            u_b = integrate_velocity(-v, steps)
            wm = grid_sample_points(m_l, ident + torch.movedim(u_f, 1, -1))
            wf = grid_sample_points(f_l, ident + torch.movedim(u_b, 1, -1))
            sim = 0.5 * (_similarity(similarity, f_l, wm) + _similarity(similarity, m_l, wf))
            loss = sim + reg_weight * R.diffusion_grid(v * to_vox)
            loss.backward()
            opt.step()
            on_step(float(loss.detach()))
    with torch.no_grad():
        return DenseMaps(integrate_velocity(v, steps), integrate_velocity(-v, steps))
