"""Damping of the coarse stage's increments along coherent edges (opt-in ``coarse_edge_damp``, session 44).

A straight edge between two flat regions tells the similarity nothing about motion along it (the aperture
problem). The coarse stage's optimiser (:class:`.coarse.FlooredAdam`) still moves every knot by about its
rate, so a level whose knots sit on such an edge can slide a patch of it along itself: on the camera shifted
by (1.00, -0.76) px at 512 px the finer-knot level's 8 px knots slid the man's coat against the sky by up to
1.4 px and det J read 0.874..1.090 (docs/nephi.md, "Session 43 (B)").

Here each level's B-spline increment ``w`` is replaced by ``w - P w`` with ``P = s c a b e e^T`` per voxel of
the level's grid (:func:`edge_projector`), from the fixed image's structure tensor ``J`` (eigenvalues
``l1 >= l2``, the windowed mean squared gradient across and along the local orientation, per image voxel^2):
``e`` the unit direction along the edge (the eigenvector of ``l2``), ``c = ((l1 - l2) / (l1 + l2))^2`` the
coherence (1 on a straight edge, 0 on isotropic texture), ``a = l1 / (l1 + g^2)`` (the image does vary across)
and ``b = g^2 / (l2 + g^2)`` (it does not vary along: the aperture problem), ``g`` the flat fill's texture
threshold :data:`.flatfill.FLAT_GRADIENT` (the project's bound under which an image says nothing), and ``s``
the option's strength in (0, 1]. At ``s = 1`` an edge between two flat regions keeps no motion along itself
from any level; the motion normal to it, which the image does determine, is kept whole, and motion along it
comes from where the edge ends or turns, or from texture beside it, through the B-spline and the bending
penalty. An edge with texture along it (``l2`` over ``g^2``: the retina's rim crossed by vessels) is damped
less.
(Development, session 44: weighting by the coherence and ``a`` alone, without ``b``, lost the camera's
deformations at 512 px: 2 % field of set 10 0.735 -> 0.863 px.)

The scales have physical reasons fixed before any reading: the gradients are central differences of the
fixed image averaged down to the level's grid (what that level compares; in image voxels), and the tensor's
window is a Gaussian with the cubic B-spline's own standard deviation, ``sqrt(1/3)`` of the level's knot
spacing (:data:`BSPLINE_SIGMA`): the coherence is that of what one knot of the level sees.
"""

from __future__ import annotations

import math

import torch

from .flatfill import FLAT_GRADIENT
from .smoothing import blur_axis_lean

#: The standard deviation of the cubic B-spline (four unit boxes convolved: variance 4 / 12), in knot
#: spacings: the window of the structure tensor of a level with that knot spacing.
BSPLINE_SIGMA = math.sqrt(1.0 / 3.0)


def edge_projector(image: torch.Tensor, knot_spacing: float, factor: float, strength: float) -> torch.Tensor:
    """``P = s c a b e e^T`` (see the module) of a 2D ``image`` ``(1, 1, H, W)`` on a level's grid, whose
    voxels are ``factor`` image voxels wide, for knots ``knot_spacing`` image voxels apart: ``(1, 3, H, W)``,
    the components ``(xx, xy, yy)`` in grid_sample's axis order (x the last numpy axis). Detached."""
    if image.dim() != 4:
        raise ValueError("edge_projector takes a 2D image (1, 1, H, W)")
    with torch.no_grad():
        s = image.detach().double()
        gy = torch.gradient(s, dim=2)[0] / factor if s.shape[2] > 1 else torch.zeros_like(s)
        gx = torch.gradient(s, dim=3)[0] / factor if s.shape[3] > 1 else torch.zeros_like(s)
        tensor = torch.cat([gx * gx, gx * gy, gy * gy], dim=1)
        sigma = BSPLINE_SIGMA * knot_spacing / factor  # grid voxels
        for axis in (2, 3):
            n = tensor.shape[axis]
            radius = min(int(math.ceil(3 * sigma)), n - 1)
            if sigma >= 0.3 and radius > 0:
                tensor = blur_axis_lean(tensor, axis, sigma, radius)
        jxx, jxy, jyy = tensor[:, 0:1], tensor[:, 1:2], tensor[:, 2:3]
        trace = jxx + jyy
        diff = torch.sqrt((jxx - jyy) ** 2 + 4 * jxy**2)  # l1 - l2
        l1 = 0.5 * (trace + diff)
        l2 = (0.5 * (trace - diff)).clamp_min(0)
        g2 = FLAT_GRADIENT**2
        # e e^T = (l1 I - J) / (l1 - l2) and c = ((l1 - l2) / trace)^2, so
        # P = s c a b e e^T = s (l1 - l2) (l1 I - J) l1 g^2 / (trace^2 (l1 + g^2) (l2 + g^2))
        scale = strength * diff * l1 * g2 / (trace**2 * (l1 + g2) * (l2 + g2)).clamp_min(1e-30)
        out = torch.cat([(l1 - jxx) * scale, -jxy * scale, (l1 - jyy) * scale], dim=1)
        return out.to(image.dtype)


def damped(w: torch.Tensor, projector: torch.Tensor | None) -> torch.Tensor:
    """``w - P w`` for a 2D velocity ``(1, 2, H, W)`` (components x, y) and :func:`edge_projector`'s ``P``
    on the same grid (None: ``w`` itself)."""
    if projector is None:
        return w
    pxx, pxy, pyy = projector[:, 0:1], projector[:, 1:2], projector[:, 2:3]
    wx, wy = w[:, 0:1], w[:, 1:2]
    return torch.cat([wx - (pxx * wx + pxy * wy), wy - (pxy * wx + pyy * wy)], dim=1)
