"""How much blurrier one image is than the other, as the neural stage compares them (session 34).

The neural stage (:mod:`.optimize`) compares ``fixed(x)`` with ``moving(phi(x))`` on random points, both
interpolated, so the two carry the same interpolation blur on average. Where the moving image carries more
(it was resampled linearly, e.g. by a rigid map), a deformation that compresses it across edges raises that
similarity, on points it never saw as well (docs/nephi.md, "Session 34"): the stage then bends a rigid map.
This reads the blur of one image that best matches the other through the coarse maps: the stage's own
symmetric similarity on :data:`POINTS` fixed random points with the fixed image blurred by a separable 3-tap
kernel of variance ``beta`` voxel^2 per axis (and, in turn, the moving image), over :data:`BETAS`, refined
by a parabola through the best three. ``excess`` is the fixed image's best blur minus the moving image's: >
0 where the moving image is the blurrier one.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .coarse import DenseMaps, grid_sample_points
from .matchblur import blur
from .optimize import OptimizeSettings, _SimilarityPoints, inside_frame

#: Blur variances tried, voxel^2 per axis (a linear resampling at sub-voxel fraction f blurs by f (1 - f):
#: 0-0.25).
BETAS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
#: Random points of the reading (the same points for every blur).
POINTS = 1 << 14


def blur3(image: torch.Tensor, beta: float) -> torch.Tensor:
    """``image`` ``(1, 1, *S)`` blurred along every axis by the kernel ``[beta/2, 1 - beta, beta/2]``
    (variance ``beta`` voxel^2, edge voxels repeated): the coarse stage's matched blur
    (:func:`.matchblur.blur`) with the same variance on every axis."""
    return blur(image, torch.full((image.dim() - 2,), float(beta), device=image.device))


def _best(values: list[float]) -> float:
    """The blur of the highest value, refined by the parabola through it and its neighbours (concave only)."""
    k = max(range(len(values)), key=values.__getitem__)
    if not 0 < k < len(values) - 1:
        return BETAS[k]
    (x0, x1, x2), (y0, y1, y2) = BETAS[k - 1 : k + 2], values[k - 1 : k + 2]
    den = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / den
    b = (x2**2 * (y0 - y1) + x1**2 * (y2 - y0) + x0**2 * (y1 - y2)) / den
    return -b / (2 * a) if a < 0 else BETAS[k]


def excess_blur(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    maps: DenseMaps,
    settings: OptimizeSettings,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    seed: int = 0,
) -> dict:
    """``{"fixed": beta, "moving": beta, "excess": fixed - moving}``: the blur (voxel^2 per axis) of each
    image that best matches the other through ``maps`` in the neural stage's similarity
    (``settings.similarity``, frame weights as ``settings.frame_mask``), on :data:`POINTS` random points
    drawn from ``seed``. Images ``(1, 1, *S)`` as the stage compares them."""
    gen = torch.Generator(device=fixed.device).manual_seed(int(seed) + 2)
    pts = _SimilarityPoints(
        fixed, moving, replace(settings, sample_points=POINTS), gen, fixed_mask, moving_mask
    )
    with torch.no_grad():
        px, py = maps.forward(pts.x), maps.backward(pts.y)
        frame = (inside_frame(px), inside_frame(py)) if settings.frame_mask else ()

        def score(f: torch.Tensor, m: torch.Tensor) -> float:
            pts.fx, pts.my = grid_sample_points(f, pts.x)[:, 0], grid_sample_points(m, pts.y)[:, 0]
            wm, wf = grid_sample_points(m, px)[:, 0], grid_sample_points(f, py)[:, 0]
            return -float(pts.loss(wm, wf, *frame))

        best = {
            "fixed": _best([score(blur3(fixed, b), moving) for b in BETAS]),
            "moving": _best([score(fixed, blur3(moving, b)) for b in BETAS]),
        }
    best["excess"] = best["fixed"] - best["moving"]
    return {k: round(float(v), 5) for k, v in best.items()}
