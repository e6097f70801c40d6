"""The predict modes' maps: a trained model's field on a grid, and the coarse stage started from it.

A model trained on small inputs (``input_shape``, e.g. 128 x 128 for ``general2d``) predicts a field
that varies on the scale of its input grid, so evaluating its networks on that grid and
interpolating (:func:`prediction_maps`) gives the same map as evaluating them at every pixel of a
large image, for a fraction of the cost (512 x 512: 0.15 against about 1 CPU s; endpoint error
1.566 against 1.568 px on the camera at 2 %, benchmarks/nephi_general2d.py).

``predict+refine`` with a coarse stage (:func:`refine_grids`): the prediction is low-passed by a
Gaussian of :data:`LOW_PASS_VOXELS` voxels of its grid (:func:`low_passed_maps`: it keeps what the
model gets right, the large scale, and drops detail the B-spline would have to undo), the moving
image is resampled once through it (:func:`warp_through`) and the coarse stage registers what is
left, with optimize's knots on grids twice as coarse, then the finer-knot level on optimize's own last
grid (:data:`FINER_ON_OPTIMIZE_GRID`, session 22; that level compares at full resolution, the coarser
ones on their grids), each level's rate ramped up over its first steps (:data:`REFINE_WARMUP`, session 23);
the map is the coarse map followed by the prediction (:class:`ComposedMaps`). Since session 28 (2D,
:data:`SAMPLE_ONCE`) the coarse stage instead starts from the low-passed prediction as a velocity
(:func:`velocity_of`) and samples the moving image once through the whole map, as optimize does; its
levels' bending and flat fill act on what they add, and the map is inverse-consistent. Since session 29
the flat fill's texture threshold falls with the image's size above 256 px (:func:`refine_flat_gradient`);
since session 31 the model predicts a second time from the moving image resampled through its first
prediction, and the two composed are the start (:data:`REFINE_PREDICT_TWICE`).
On the benchmark (512 px, 60 coarse steps) the low-pass lowered the error on every probed case, e.g.
coins 2 % 0.167 -> 0.113 px, cell 1 % 0.090 -> 0.077 px, camera 2 % 0.490 -> 0.457 px (benchmarks/README.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import coarse, flatfill
from .coarse import (
    DenseMaps,
    _integrate_xy,
    _resample,
    knot_spacings,
    normalized_grid,
    pyramid_shapes,
)
from .field import Codes, NeuralDeformationField
from .smoothing import gaussian_smoothed

#: Points per call when a field is evaluated on its grid.
_CHUNK = 1 << 15

#: ``predict+refine``: the coarse stage's grids are this many times coarser per axis than
#: optimize's for the same ``levels``, with optimize's knot spacings (16 px knots on a 128^2
#: grid of a 512^2 image): the same endpoint error as on optimize's grids at 60 % of the CPU time
#: (camera 2 %, 30 steps: 0.620 against 0.619 px; benchmarks/README.md).
REFINE_GRID_FACTOR = 2

#: ``predict+refine`` runs the finer-knot level (half the last spacing, ``coarse_finer_level``) on
#: optimize's last grid, twice as fine as its own last grid (session 22): on the coarser grid the finest
#: knots' velocity, integrated and interpolated at four pixels a voxel of a 512^2 image, could not follow
#: what the prediction leaves where that is much. benchmarks/nephi_general2d.py, seed 0, same CPU (3.4-3.9
#: against 3.7-4.1 s): better on 16 of 18 cases (cell 2 % 0.453 -> 0.215 px, optimize 0.201; cell 4 %
#: 1.012 -> 0.468; retina 4 % 1.779 -> 1.256), level on coins 1 %, worse on camera 1 % (0.378 -> 0.411)
#: and 2 % (0.489 -> 0.518); docs/nephi.md has seed 70. Steps a level: ``level_iterations`` of three
#: levels (16 / 33 / 50 for 50); only the last compares at full resolution, hence the same CPU. 2D only
#: (not measured on volumes, whose last grid would cost the 3D refinement memory and time).
FINER_ON_OPTIMIZE_GRID = True

#: ``predict+refine``: each coarse level's learning rate ramps up linearly over this share of its steps
#: (session 23; 0: none, as before), on images where the rate moves a knot by at least
#: :data:`REFINE_WARMUP_MIN_KICK` px a step (:func:`refine_warmup`). A level starts a fresh Adam, whose first
#: steps move every knot by about the full rate (1.3 px at 512^2) whatever its gradient; from a prediction,
#: or from the level before, that kick knocks an aligned map off and 50 steps do not bring it back: started
#: from the true field itself (no low-pass) the refinement ended at 0.058 px on IHC 1 % (optimize from the
#: identity: 0.039), with the ramp 0.045. benchmarks/nephi_general2d.py, 512 px, seeds 0 / 70 / 74 / 75 (a
#: ramp of 10 steps a level): better on 70 of 72 cases, worse on none, the same CPU (retina 4 % seed 74 1.083
#: -> 0.751 px, optimize 0.836; docs/nephi.md). A share, not a step count, so a run with fewer coarse steps
#: still reaches the full rate (review 1 of session 23, B2). 2D only (not measured on volumes).
REFINE_WARMUP = 0.2

#: The ramp runs where the coarse stage's rate moves a knot by at least this many pixels a step along the
#: longest side (``coarse.COARSE_LEARNING_RATE * (longest side - 1) / 2``, the rate read at the call since
#: session 41: images of at least 341 px). Camera /
#: retina / IHC at 1 / 2 / 4 % (review 2 of session 23, B7; docs/nephi.md), better / worse, seeds 0 / 70 /
#: 74 / 75:
#: 384 px 32 / 4 of 36 (at most +0.007 px), 352 px 32 / 4 (+0.010), 320 px 28 / 8 (retina 1 % +0.015, as
#: 288 px on seeds 74 / 75: 14 / 3, +0.021; 256 px lost on the retina too, review 1, B1). On the longest side:
#: 1024 x 200 (short axis 0.5 px a step) 10 / 1 of 11 (retina 1 % +0.020), 200 x 1024 4 / 0.
REFINE_WARMUP_MIN_KICK = 0.85


def refine_warmup(shape) -> float:
    """The ramp's share of each coarse level's steps in ``predict+refine`` for an image of ``shape``:
    :data:`REFINE_WARMUP` where the coarse rate moves a knot by at least :data:`REFINE_WARMUP_MIN_KICK` px a
    step, else 0."""
    kick = coarse.COARSE_LEARNING_RATE * (max(int(n) for n in shape) - 1) / 2  # read here, not at import
    return float(REFINE_WARMUP) if kick >= REFINE_WARMUP_MIN_KICK else 0.0


#: ``predict+refine``, where the ramp runs (:func:`refine_warmup`): the last coarse level runs this share of
#: its steps more (rounded: 5 after 50), over which its rate falls linearly towards 0 (session 24; 0: none,
#: as before). Adam at the full rate keeps every knot moving by about the rate whatever its gradient; on a
#: map that is nearly right that jitter was the refinement's floor on IHC (1 % at 512 px, seeds 76 / 77:
#: 0.050 / 0.050 -> 0.041 / 0.041 px). Steps added, not taken from the level: a decay over the last 30 % of
#: its 50 steps gained as much on IHC but lost up to 0.02 px where the residual is still large (astronaut and
#: camera 4 %). A share of 0.2 (10 steps) gained a little more for twice the CPU (docs/nephi.md). 2D only.
REFINE_COOLDOWN = 0.1


def refine_cooldown(shape) -> float:
    """The share of the last coarse level's steps that ``predict+refine`` adds to it with a falling rate
    (:data:`REFINE_COOLDOWN`) on an image of ``shape``: where the ramp runs (:func:`refine_warmup`), else
    0."""
    return float(REFINE_COOLDOWN) if refine_warmup(shape) > 0 else 0.0


def prediction_grid(model_shape, image_shape) -> tuple[int, ...]:
    """Grid on which a model's field is evaluated: its input grid, or the image's where that is not
    finer on every axis (``model_shape`` None: the image's)."""
    if model_shape is None or len(model_shape) != len(image_shape):
        return tuple(int(n) for n in image_shape)
    if all(int(m) <= int(n) for m, n in zip(model_shape, image_shape)):
        return tuple(int(m) for m in model_shape)
    return tuple(int(n) for n in image_shape)


@torch.no_grad()
def prediction_maps(field: NeuralDeformationField, codes: Codes, grid_shape) -> DenseMaps:
    """The field's forward and backward maps sampled on ``grid_shape`` (normalised coordinates),
    interpolated N-linearly in between."""
    device = codes.global_code.device
    pts = normalized_grid(grid_shape, device=device).reshape(1, -1, len(grid_shape))
    out = []
    for direction in ("forward", "backward"):
        parts = [
            field.map(pts[:, a : a + _CHUNK], codes, direction) - pts[:, a : a + _CHUNK]
            for a in range(0, pts.shape[1], _CHUNK)
        ]
        u = torch.cat(parts, dim=1).reshape(1, *grid_shape, len(grid_shape))
        out.append(torch.movedim(u, -1, 1).contiguous())
    return DenseMaps(out[0], out[1])


#: ``predict+refine`` low-passes the prediction by a Gaussian of this many voxels of the grid it is
#: sampled on (the model's input grid; 16 px on a 512^2 image for general2d's 128^2): the model is
#: right on the large scale, its finer detail is mostly error the coarse stage would have to undo.
LOW_PASS_VOXELS = 4.0


def low_passed_maps(maps: DenseMaps, sigma: float | None = None) -> DenseMaps:
    """``maps`` on a grid, both directions filtered by a Gaussian of ``sigma`` grid voxels."""
    if sigma is None:  # read at the call (session 40)
        sigma = LOW_PASS_VOXELS
    sig = [sigma] * (maps.forward_grid.dim() - 2)
    return DenseMaps(gaussian_smoothed(maps.forward_grid, sig), gaussian_smoothed(maps.backward_grid, sig))


#: ``predict+refine`` (2D): the coarse stage starts from the low-passed prediction as a velocity
#: (:func:`velocity_of`) and samples the moving image once through the whole map, as optimize does,
#: instead of registering the moving image resampled through the prediction first (False: as before,
#: :func:`warp_through` then the coarse map followed by the prediction; ``settings["refine_start"]``).
#: The resampling blurred the moving image once more than optimize's, and the two images' unequal blur
#: moved the optimum off the truth (session 26's diagnosis). The levels' bending and flat fill act on
#: their increments only: the prediction is the start, not a map to smooth (on the whole velocity, camera
#: / cell / retina 2-4 % lost up to 0.06 px, the flat background filled from the textured parts). 512 px,
#: seeds 70 and fresh 89 / 90 (/tmp/s28/B/ab.py, table.py; docs/nephi.md "Session 28"): better than before on
#: 48 of 54 cases (astronaut 1 % seed 70 0.121 -> 0.096, optimize 0.098; IHC 4 % seed 89 0.343 -> 0.245),
#: worse on camera 4 % (seed 89 1.290 -> 1.407, optimize 1.539), retina 4 % (seed 90 0.925 -> 0.999, optimize
#: 1.053) and by at most 0.007 px on four more; as accurate as optimize on 30 of 54 (before 19), CPU ratio the
#: same (0.28-0.32 of optimize's in one process, seed 90). The inverse-consistency error falls from about 1
#: px at most to 0.1 (the backward map is exp(-v)).
SAMPLE_ONCE = True

#: ``predict+refine`` from the prediction as a velocity (:data:`SAMPLE_ONCE`, 2D): on images whose side
#: ``sqrt(h w)`` exceeds this many pixels the flat fill's texture threshold (an RMS gradient per voxel,
#: :data:`.flatfill.FLAT_GRADIENT`) falls as that side grows (:func:`refine_flat_gradient`; None: optimize's
#: threshold at every size). The same faint texture upsampled has a smaller gradient per voxel: at 512 px
#: the cell's texture and the camera's sky read flat on 25-28 % of the last coarse grid, where the fill
#: replaced what the coarse stage had learned from them by an extension from around (session 29,
#: docs/nephi.md).
REFINE_FLAT_SIDE: int | None = 256

#: The lowest share of :data:`.flatfill.FLAT_GRADIENT` :func:`refine_flat_gradient` goes down to: a third,
#: reached at a side of 768 px, the largest measured (session 30; half, 512 px, in session 29). Sides
#: 632-768 px (768^2, 400 x 1000, 512 x 1024; camera, cell, retina, IHC, astronaut at 2 %;
#: /tmp/s30/B/sizes.py), against the bound of a half: seed 94 better on 12 of 15, fresh seeds 96 / 97 on 25
#: of 30 (camera 768^2 seed 96 0.553 -> 0.433 px), worse on 6 of 45 (retina and IHC, at most +0.0047:
#: retina 768^2 seed 96); docs/nephi.md.
REFINE_FLAT_FLOOR = 1 / 3


def refine_flat_gradient(shape) -> float | None:
    """The flat fill's texture threshold in ``predict+refine`` from the prediction as a velocity on an
    image of ``shape``: :data:`.flatfill.FLAT_GRADIENT` (read at call time) times :data:`REFINE_FLAT_SIDE`
    over the image's side ``sqrt(h w)`` where that is longer, at least :data:`REFINE_FLAT_FLOOR` of it
    (0.00167 from 768 px: measured up to 768 px, not extrapolated; review 2 of session 29, B1), else None
    (the fill's own threshold, as optimize's)."""
    side = math.sqrt(math.prod(int(n) for n in shape))
    if REFINE_FLAT_SIDE is None or side <= REFINE_FLAT_SIDE:
        return None
    return flatfill.FLAT_GRADIENT * max(REFINE_FLAT_SIDE / side, REFINE_FLAT_FLOOR)


#: ``predict+refine`` where :func:`refine_flat_gradient` lowers the flat fill's threshold: a region of the
#: last grid flat by :data:`.flatfill.FLAT_GRADIENT` of which at least this share is flat by the lowered
#: threshold too is empty background and is filled whole (:func:`.flatfill.empty_regions`; None: off, the
#: default). The lowered threshold takes a rim of about one grid voxel off such a region, and the fill then
#: starts from that rim's poorly constrained velocity: with 0.8 at 512 px (session 30, seeds 94 / 95 / 89 /
#: 90 / 70) IHC better on 11 of 12 cases (4 % seed 95 0.0628 -> 0.0577 px), the retina on 10 of 15, the cell
#: identical, but the astronaut's black background worse on 9 of 12 (4 % seed 95 0.3976 -> 0.4022); fresh
#: seeds 96 / 97: IHC 3 better / 3 worse, astronaut 1 / 5: opt-in (docs/nephi.md, "Session 30").
REFINE_FLAT_EMPTY: float | None = None


def refine_flat_empty(shape) -> float | None:
    """The share :data:`REFINE_FLAT_EMPTY` where ``predict+refine`` lowers the fill's threshold on an image of
    ``shape`` (:func:`refine_flat_gradient` not None), else None."""
    if REFINE_FLAT_EMPTY is None or refine_flat_gradient(shape) is None:
        return None
    return float(REFINE_FLAT_EMPTY)


#: ``predict+refine`` from the prediction as a velocity (2D), where the ramp runs (:func:`refine_warmup`):
#: each coarse level's steps as a share of ``coarse_iterations`` (coarse first; None: ``level_iterations``'
#: thirds, 16 / 33 / 50 for 50).
REFINE_LEVEL_SHARES: tuple[float, ...] | None = None


def refine_schedule(iterations: int, levels: int, shape) -> list[int] | None:
    """Steps of each of ``levels`` coarse levels in ``predict+refine`` on an image of ``shape`` for
    ``iterations`` coarse steps: :data:`REFINE_LEVEL_SHARES` where set, of the same length, and the ramp
    runs (:func:`refine_warmup`); else None (``level_iterations``). Shares of another length than ``levels``
    raise ``ValueError`` (an experiment would otherwise measure the default; review 1 of session 31, B3)."""
    shares = REFINE_LEVEL_SHARES
    if shares is not None and len(shares) != levels and levels > 0:
        raise ValueError(f"REFINE_LEVEL_SHARES has {len(shares)} shares for {levels} coarse levels.")
    if shares is None or refine_warmup(shape) <= 0 or iterations <= 0:
        return None
    return [max(1, round(iterations * float(s))) for s in shares]


#: ``predict+refine`` from the prediction as a velocity (2D), where the ramp runs (:func:`refine_warmup`): the
#: model predicts a second time, from the moving image resampled through its low-passed first prediction,
#: and the two low-passed predictions composed are the coarse stage's start (:func:`predict_again`; False:
#: one prediction, as before; default since session 31). The model recovers a share of what it is shown each
#: time (astronaut 4 %, seed 98: the start 4.465 -> 4.097 px), and at 4 % the coarse levels started from
#: one prediction ended up to 0.8 px behind optimize's. benchmarks/nephi_general2d.py cases at 512 px, both
#: in one process (/tmp/s31/B/diag.py; docs/nephi.md "Session 31"): development seeds 98 / 99 better on 20,
#: level on 7, worse on 9 of 36 (sum -0.41 px; astronaut 4 % 1.090 -> 1.024, optimize 0.978), fresh seeds
#: 102 / 103 24 / 3 / 9 (sum -0.49 px; retina 4 % s103 0.980 -> 0.797); the losses are mostly at 1 %
#: (retina 1 % on every seed, up to +0.009 px; the largest, retina 2 % s98, +0.011 px). 0.1 CPU s more (2 %
#: of predict+refine's at 512 px).
REFINE_PREDICT_TWICE = True

#: :data:`REFINE_PREDICT_TWICE` only on images whose longest side is at least this (px): its evidence is at
#: 512 px; between 341 and 511 px (where the ramp runs) review 2 of session 31 measured 4 better, 5 worse of
#: 9 cases (camera 352^2 4 % +0.016 px) at 5-10 % more CPU (/tmp/s31/R/r2_pr.py). Above 512 px unmeasured.
REFINE_PREDICT_TWICE_SIDE = 512


def refine_predict_twice(shape) -> bool:
    """:data:`REFINE_PREDICT_TWICE` where the ramp runs on an image of ``shape`` (:func:`refine_warmup`) and
    its longest side is at least :data:`REFINE_PREDICT_TWICE_SIDE`."""
    side = max(int(n) for n in shape)
    return bool(REFINE_PREDICT_TWICE) and refine_warmup(shape) > 0 and side >= REFINE_PREDICT_TWICE_SIDE


def _sample_grid(u: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """A displacement grid ``(1, D, *S)`` (normalised, numpy axis order) sampled at normalised ``points``
    ``(1, *S, D)`` (numpy axis order), bilinear, border values outside."""
    return F.grid_sample(u, points.flip(-1), mode="bilinear", padding_mode="border", align_corners=True)


def compose_maps(first: DenseMaps, then: DenseMaps) -> DenseMaps:
    """Displacement grids of ``first`` then ``then`` (:class:`ComposedMaps` order: forward
    ``then(first(x))`` is ``moving(x + u_t(x) + u_f(x + u_t(x)))``, i.e. the moving image resampled through
    ``first`` registered by ``then``) on ``then``'s grid; no global maps."""
    shape = tuple(then.forward_grid.shape[2:])
    ident = normalized_grid(shape, then.forward_grid.device, then.forward_grid.dtype)[None]
    u_t, u_f = then.forward_grid, _resample(first.forward_grid, shape)
    b_t, b_f = _resample(then.backward_grid, shape), _resample(first.backward_grid, shape)
    forward = u_t + _sample_grid(u_f, ident + torch.movedim(u_t, 1, -1))
    backward = b_f + _sample_grid(b_t, ident + torch.movedim(b_f, 1, -1))
    return DenseMaps(forward, backward)


@torch.no_grad()
def predict_again(model, fixed: torch.Tensor, moving: torch.Tensor, first: DenseMaps) -> DenseMaps:
    """:data:`REFINE_PREDICT_TWICE`: ``model`` (a :class:`.model.NePhiModel`) predicts from ``fixed`` and
    ``moving`` resampled through ``first`` (a low-passed prediction, :func:`warp_through`); its prediction,
    low-passed as the first (:func:`low_passed_maps`) on the same grid, is composed after ``first``
    (:func:`compose_maps`)."""
    codes = model.codes(fixed, warp_through(moving, first))
    second = low_passed_maps(prediction_maps(model.field, codes, tuple(first.forward_grid.shape[2:])))
    return compose_maps(first, second)


#: Fixed-point steps of :func:`velocity_of`.
VELOCITY_STEPS = 8


@torch.no_grad()
def velocity_of(maps: DenseMaps, steps: int = 6, iterations: int | None = None) -> torch.Tensor:
    """A stationary velocity whose exponential (``steps`` squarings) is the forward map of ``maps``
    (displacement grid, normalised, numpy axis order), on its grid, with components in grid_sample's
    order as the coarse stage holds them: ``v <- v + (u - exp(v))`` from ``v = u``."""
    if iterations is None:  # read at the call (session 40)
        iterations = VELOCITY_STEPS
    u = maps.forward_grid.flip(1).float()
    v = u.clone()
    for _ in range(iterations):
        v = v + (u - _integrate_xy(v, steps))
    return v


class ComposedMaps:
    """``first`` then ``then``: forward ``then(first(x))``, backward ``first^-1(then^-1(y))``."""

    def __init__(self, first, then):
        self.first, self.then = first, then

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.then.forward(self.first.forward(x))

    def backward(self, x: torch.Tensor) -> torch.Tensor:
        return self.first.backward(self.then.backward(x))


@torch.no_grad()
def warp_through(image: torch.Tensor, maps: DenseMaps) -> torch.Tensor:
    """``image(phi(x))`` on its own grid for a map on a grid (``(1, 1, *spatial)``; bicubic in 2D,
    whose smoothing biases the next stage's similarity less than bilinear's, trilinear in 3D)."""
    shape = tuple(image.shape[2:])
    d = len(shape)
    u = maps.forward_grid.to(image.dtype)
    if tuple(u.shape[2:]) != shape:
        u = F.interpolate(u, size=shape, mode="bilinear" if d == 2 else "trilinear", align_corners=True)
    pts = normalized_grid(shape, image.device, image.dtype)[None] + torch.movedim(u, 1, -1)
    mode = "bicubic" if d == 2 else "bilinear"
    return F.grid_sample(image, pts.flip(-1), mode=mode, padding_mode="border", align_corners=True)


#: ``predict+refine`` from the prediction as a velocity (2D), where the ramp runs (:func:`refine_warmup`): its
#: coarser levels (grids twice as coarse as optimize's) compare the images on the grid they warp them on,
#: twice as fine as their own, instead of averaged down to their own (False: as before). The warp costs
#: the same; only the similarity is taken on four times the voxels.
REFINE_COMPARE_ON_WARP_GRID = False


def refine_compare_on_warp_grid(shape) -> bool:
    """:data:`REFINE_COMPARE_ON_WARP_GRID` where the ramp runs on an image of ``shape``
    (:func:`refine_warmup`), else False."""
    return bool(REFINE_COMPARE_ON_WARP_GRID) and refine_warmup(shape) > 0


def refine_grids(shape, levels: int, finer: bool = False) -> tuple[list[tuple[int, ...]], list[float]]:
    """Grids (coarse first) and knot spacings (voxels) of the coarse stage after a prediction:
    optimize's knot spacings for ``levels`` on grids :data:`REFINE_GRID_FACTOR` times coarser; with
    ``finer`` the finer-knot level follows on optimize's own last grid (half the last spacing, at least
    one voxel of that grid), not on the last coarser grid (see :data:`FINER_ON_OPTIMIZE_GRID`)."""
    factors = [2**k for k in range(levels - 1, 0, -1)]
    if not factors:
        return [], []
    optimize = pyramid_shapes(shape, factors)
    spacings = knot_spacings(shape, optimize)
    grids = pyramid_shapes(shape, [f * REFINE_GRID_FACTOR for f in factors])
    if len(grids) != len(spacings):  # small images: coarser grids collapse onto the smallest one
        grids = pyramid_shapes(shape, factors)
    if finer:
        last = optimize[-1]
        grids = [*grids, last]
        spacings = [*spacings, max(spacings[-1] / 2, max(n / m for n, m in zip(shape, last)))]
    return grids, spacings
