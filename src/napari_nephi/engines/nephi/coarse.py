"""The cheap coarse stage: a stationary velocity field on a low-resolution grid.

``v`` is a sum of cubic B-splines with knots halving level by level (:func:`optimize_velocity`),
sampled on a grid a few times coarser than the image; scaling and squaring turns ``v`` into a
forward displacement and ``-v`` into its inverse, both diffeomorphic, so the stage is fast and
cannot fold. The result, :class:`DenseMaps`, is interpolated with :func:`.interp.interpolate`
(differentiable to any order), so the neural field that follows can be regularised by autograd
through it. Coordinates are normalised [-1, 1] in the image's axis order.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ...core import regularizers as R
from ...core.errors import InputError
from ...core.jacobian import jacobian_determinant
from ...core.similarity import lncc, lncc_map, ncc
from .bspline import bspline_on_grid, control_shape, grid_weights, intervals_for_spacing
from .cubic import cubic_sample, spline_coefficients
from .edgedamp import damped, edge_projector
from .flatfill import FLAT_SHARE, fill_flat, flat_share
from .interp import interpolate
from .matchblur import (
    _second_difference,
    blur_pattern,
    blurred_similarity,
    estimate_blur,
    noise_variance,
    patterned_variance,
)
from .smoothing import gaussian_smoothed


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
    # A non-finite grid crashes the CPU backward pass (segmentation fault); the optimisation
    # stops such runs with an error (optimize.DivergenceWatch), this keeps torch safe until then.
    grid = torch.nan_to_num(grid, nan=0.0, posinf=2.0, neginf=-2.0)
    out = F.grid_sample(
        volume, grid.to(volume.dtype), mode="bilinear", padding_mode=padding, align_corners=True
    )
    return out.reshape(b, volume.shape[1], *lead)


def _integrate_xy(v: torch.Tensor, steps: int) -> torch.Tensor:
    """Scaling and squaring: the displacement of ``exp(v)`` for a stationary velocity ``(B, D, *S)``
    whose components are in ``grid_sample``'s order (x, y[, z]), so no step flips them."""
    ident = normalized_grid(v.shape[2:], v.device, v.dtype).flip(-1)[None]
    u = v / (2**steps)
    for _ in range(steps):
        pts = ident + torch.movedim(u, 1, -1)
        u = u + F.grid_sample(u, pts, mode="bilinear", padding_mode="border", align_corners=True)
    return u


def velocity_maps(v: torch.Tensor, affine: torch.Tensor | None = None, steps: int = 6) -> DenseMaps:
    """The maps of a stationary velocity ``v`` ``(1, D, *S)`` (normalised, components in grid_sample's
    order, as the coarse stage holds it): ``exp(v)`` and ``exp(-v)`` by ``steps`` squarings, then
    ``affine``."""
    with torch.no_grad():
        return DenseMaps(_integrate_xy(v, steps).flip(1), _integrate_xy(-v, steps).flip(1), affine)


def global_maps(ndim: int, device, affine: torch.Tensor | None = None) -> DenseMaps:
    """The global map alone (``affine``; None: the identity) as :class:`DenseMaps`: zero displacement
    grids of two knots an axis."""
    zero = torch.zeros(1, ndim, *[2] * ndim, device=device)
    return DenseMaps(zero, zero, affine)


def apply_affine(points: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``A p + t`` for points ``(..., D)`` and a homogeneous ``(D+1, D+1)`` matrix (same axis order)."""
    d = points.shape[-1]
    m = matrix.to(points.dtype)
    return points @ m[:d, :d].T + m[:d, d]


class DenseMaps:
    """Forward and backward maps ``A(x + u(x))`` and ``y + u_b(y)`` at ``y = A^-1 x`` from
    displacement grids ``(1, D, *S)`` and an optional global map ``A`` (normalised coordinates,
    numpy axis order; None: the identity)."""

    def __init__(self, forward: torch.Tensor, backward: torch.Tensor, affine: torch.Tensor | None = None):
        self.forward_grid = forward
        self.backward_grid = backward
        self.affine = affine
        self.affine_inverse = None if affine is None else torch.linalg.inv(affine)
        #: matched-blur variances of the coarse stage that made these maps (None: not used)
        self.blur_variance = None
        #: pattern_blur: the matched blur's uniform and patterned parts (direction, part, axis; None: off)
        self.blur_pattern = None
        #: matched blur "auto": the coarser levels' displacement spread, voxels (None: not measured)
        self.blur_gate_spread = None
        #: matched blur "auto": RMS of det J - 1 of the coarser levels' map (None: not measured)
        self.blur_gate_detj_rms = None
        #: share of the last coarse grid the flat fill replaced (None: the fill did not run)
        self.flat_share = None
        #: the flat fill's conjugate-gradient steps and whether it converged ({}: it did not run)
        self.flat_fill_info: dict = {}
        #: the optimisation steps of the coarse stage that made these maps (None: not made by one)
        self.steps_run: int | None = None
        #: ``first_gate``: the first level's RMS of det J - 1 and whether it was kept (None: no gate)
        self.first_gate_reading: float | None = None
        self.first_kept: bool | None = None
        #: ``finer_gate``: RMS of det J - 1 of the map before the finer-knot level and whether that level
        #: ran (None: no gate, or no finer-knot level)
        self.finer_gate_reading: float | None = None
        self.finer_kept: bool | None = None
        #: volumes: {"cubic": warp, "exact_area": bins} of the stage, "warp_blur": True or "all" where
        #: WARP_BLUR_3D ran (volume_sampling; None: 2D or none)
        self.volume_sampling: dict | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + interpolate(self.forward_grid.to(x.dtype), x)
        return y if self.affine is None else apply_affine(y, self.affine)

    def backward(self, x: torch.Tensor) -> torch.Tensor:
        if self.affine_inverse is not None:
            x = apply_affine(x, self.affine_inverse)
        return x + interpolate(self.backward_grid.to(x.dtype), x)


#: Voxels of the finest coarse grid. The coarse stage keeps autograd tensors for every
#: scaling-and-squaring step, so a grid half the size of a 256^3 volume would cost more memory than
#: the neural field; grids above this are replaced by the largest downsampling under it.
COARSE_MAX_VOXELS = 1 << 17


def _downsampled_under(shape, factor: int, max_voxels: int, minimum: int) -> tuple[int, ...]:
    """``shape`` downsampled by ``factor`` or more (at least ``minimum`` voxels an axis), the first
    such grid with at most ``max_voxels`` voxels."""
    f = int(factor)
    while True:
        s = tuple(max(minimum, min(int(n), -(-int(n) // f))) for n in shape)
        if math.prod(s) <= max_voxels or all(n <= minimum for n in s):
            return s
        f += 1


def pyramid_shapes(shape, factors, max_voxels: int | None = None) -> list[tuple[int, ...]]:
    """Coarse grids of ``shape`` downsampled by each factor (coarse first), none above ``max_voxels`` (None:
    :data:`COARSE_MAX_VOXELS`, read at the call)."""
    if max_voxels is None:
        max_voxels = COARSE_MAX_VOXELS
    out: list[tuple[int, ...]] = []
    for f in factors:
        s = _downsampled_under(shape, f, max_voxels, 4)
        if s not in out:
            out.append(s)
    return out


def _similarity(name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if name == "lncc":
        return 1 - lncc(a, b, window=5)
    if name == "mse":
        return ((a - b) ** 2).mean()
    return 1 - ncc(a, b)


def _weighted_similarity(name: str, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """:func:`_similarity` with each voxel weighted by ``w`` in [0, 1] (None: unweighted)."""
    if w is None:
        return _similarity(name, a, b)
    if w.dtype == torch.bool:
        if name == "ncc":  # 0/1 already: ncc makes its float weights from it
            return 1 - ncc(a, b, w)
        w = w.to(a.dtype)
    total = w.sum().clamp_min(1e-6)
    if name == "lncc":
        return 1 - (w * lncc_map(a, b, 5)).sum() / total
    if name == "mse":
        return (w * (a - b) ** 2).sum() / total
    # ncc's weighted means divide by sum(w) clamped at 1 (made for 0/1 masks); scaled to a maximum
    # of 1, pooled fractional weights summing to less than 1 stay exact
    top = float(w.max())
    return 1 - ncc(a, b, w if top == 1.0 else w / max(top, 1e-12))


#: Voxels of the grid on which the coarse stage warps the images: the full image up to this size
#: (1024^2, 101^3), else its finest integer downsampling under it.
WARP_MAX_VOXELS = 1 << 20


def comparison_shape(shape, max_voxels: int | None = None) -> tuple[int, ...]:
    """The image ``shape``, or its finest integer downsampling with at most ``max_voxels`` voxels (None:
    :data:`WARP_MAX_VOXELS`, read at the call, so setting the module constant takes effect; session 40)."""
    if max_voxels is None:
        max_voxels = WARP_MAX_VOXELS
    return _downsampled_under(shape, 1, max_voxels, 1)


def knot_spacings(shape, grids) -> list[float]:
    """Default B-spline knot spacing of each coarse level, in voxels of ``shape``.

    The last level: eight voxels of its grid, but at most a quarter of the shortest axis (so a
    small volume still gets a few knots) and at least two voxels of its grid; each coarser level
    scales it by its grid's extra downsampling (the spacing doubles as the grid halves).
    """
    if not grids:
        return []
    factors = [max(n / m for n, m in zip(shape, g)) for g in grids]
    last = max(2 * factors[-1], min(8 * factors[-1], (min(shape) - 1) / 4))
    return [last * f / factors[-1] for f in factors]


def in_frame(points: torch.Tensor) -> torch.Tensor:
    """Bool, over the last axis of normalised ``points`` ``(..., D)``: whether each lies inside the
    image frame (bool, not float: one byte a point, and no float temporaries of the points' size)."""
    p = points.detach()
    return ((p >= -1 - 1e-6) & (p <= 1 + 1e-6)).all(-1)


def _times_frame(
    w: torch.Tensor | None, inside: torch.Tensor, shape, exact: bool = False
) -> torch.Tensor | None:
    """Weights ``w`` (None: none) times the frame weight ``inside`` on ``shape`` (averaged down to
    it as float, else kept bool: ncc turns it into the float weights it would otherwise make as
    ones); ``w`` itself where every point is inside (an unmasked pair stays unweighted there)."""
    if bool(inside.all()):
        return w
    if tuple(inside.shape[2:]) != tuple(shape):
        inside = _area(inside.float(), shape, exact)
    return inside if w is None else w * inside


#: Volumes of at most :data:`VOLUME_SAMPLING_MAX_VOXELS` are averaged down to a grid whose size does
#: not divide theirs by exact fractional bins (:func:`_area_exact`), not by ``F.interpolate(mode="area")``'s
#: whole-voxel bins of varying width, whose centres lie unevenly (session 32, docs/nephi.md).
EXACT_AREA_3D = False
#: Volumes of at most this many voxels take :data:`EXACT_AREA_3D` and :data:`CUBIC_3D` (2^18: 64^3);
#: larger ones (e.g. 256^3, the memory benchmark's) are sampled as before.
VOLUME_SAMPLING_MAX_VOXELS = 1 << 18


def volume_sampling(full) -> tuple[bool, bool]:
    """``(cubic warp, exact bins)`` of the coarse stage on an image of shape ``full``
    (:data:`CUBIC_3D`, :data:`EXACT_AREA_3D`; volumes of at most :data:`VOLUME_SAMPLING_MAX_VOXELS`)."""
    small = len(full) == 3 and math.prod(full) <= VOLUME_SAMPLING_MAX_VOXELS
    return bool(CUBIC_3D and small), bool(EXACT_AREA_3D and small)


def _area(t: torch.Tensor, shape, exact: bool = False) -> torch.Tensor:
    """``t`` averaged down to ``shape`` (itself when it has that shape already); with ``exact``, over
    exact fractional bins where an axis of ``shape`` does not divide ``t``'s (:func:`_area_exact`)."""
    if tuple(t.shape[2:]) == tuple(shape):
        return t
    if exact and any(n % m for n, m in zip(t.shape[2:], shape)):
        return _area_exact(t, shape)
    return F.interpolate(t, size=tuple(shape), mode="area")


def _area_exact(t: torch.Tensor, shape) -> torch.Tensor:
    """``t`` ``(B, C, *spatial)`` averaged over bins ``[i n / m, (i + 1) n / m)`` of each axis (``n``
    voxels down to ``m``; a voxel counts by its overlap): the bins' centres lie evenly spaced, so the
    averaged image is the original one scaled, not distorted."""
    out = t
    for a, m in enumerate(shape):
        n = out.shape[2 + a]
        if n == m:
            continue
        edges = torch.arange(m + 1, dtype=torch.float64, device=t.device) * (n / m)
        j = torch.arange(n, dtype=torch.float64, device=t.device)
        overlap = torch.minimum(edges[1:, None], j[None] + 1) - torch.maximum(edges[:-1, None], j[None])
        w = (overlap.clamp_min(0) * (m / n)).to(t.dtype)  # (m, n), rows sum to 1
        out = torch.movedim(torch.movedim(out, 2 + a, -1) @ w.T, -1, 2 + a)
    return out


def _resample(t: torch.Tensor, shape) -> torch.Tensor:
    if tuple(t.shape[2:]) == tuple(shape):
        return t
    mode = "bilinear" if t.dim() == 4 else "trilinear"
    return F.interpolate(t, size=tuple(shape), mode=mode, align_corners=True)


class FlooredAdam:
    """Adam on one tensor whose per-entry second moment is floored at ``floor`` times its mean.

    Plain Adam moves every control point by about the learning rate whatever the size of its
    gradient, so points over textureless regions, whose only gradient is noise (interpolation,
    blur), wander as far as points over texture. With the floor, a point whose gradient is small
    against the level's typical one steps in proportion to it, and the bending penalty carries the
    surroundings' motion in; over texture it is Adam. In probes (coarse stage alone, 256 px,
    benchmarks/nephi_large.py cases) a floor of 0.3 lowered the endpoint error in the camera's sky
    from 1.95 to 1.34 px at 2 % and from 1.89 to 1.75 px at 4 %, at a cost of up to 0.015 px
    elsewhere (flat disc, IHC).
    """

    def __init__(self, param: torch.Tensor, lr: float, floor: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.param, self.lr, self.floor = param, lr, floor
        self.b1, self.b2, self.eps = betas[0], betas[1], eps
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.t = 0

    def zero_grad(self) -> None:
        self.param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        g = self.param.grad
        self.t += 1
        self.m.mul_(self.b1).add_(g, alpha=1 - self.b1)
        self.v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
        m = self.m / (1 - self.b1**self.t)
        v = self.v / (1 - self.b2**self.t)
        if self.floor > 0:
            v = torch.clamp(v, min=self.floor * float(v.mean()))
        self.param.sub_(self.lr * m / (v.sqrt() + self.eps))


#: Floor of the coarse optimiser's second moment, as a fraction of its mean (0: plain Adam); see
#: :class:`FlooredAdam` and benchmarks/README.md (``nephi_large.py``).
MOMENT_FLOOR = 0.3


#: The finer-knot level (option ``finer_level`` of :func:`optimize_velocity`, the engine's
#: ``coarse_finer_level``): after the last grid, one more level on the same grid with half its knot
#: spacing (at least one voxel of the grid), running as many steps. Fields that vary over about
#: eight pixels at 256 px (1 % deformations of the issue-13 benchmark) need knots that close (IHC
#: 1 %: 0.167 -> 0.044 px, flat disc 1 %: 0.462 -> 0.243 px, benchmarks/README.md). Halving the
#: knots of every level instead (16 and 8 px) lost the disc's textureless part at 4 % (3.26 px
#: against 2.81), and giving the finer level half of the last level's steps instead of its own left
#: the coarser level unconverged. On 512 px images it changed little (nephi_general2d.py cases,
#: cell 2 % 0.202 -> 0.197 px); it doubles the coarse stage's CPU time. A membrane energy beside
#: the bending one was tried and left off (benchmarks/README.md).


#: ``optimize`` on 2D images (the engine passes it as ``first_blur`` to :func:`optimize_velocity`, read at
#: each call; session 26): the first coarse level compares the images blurred by a Gaussian of this many
#: voxels of its grid (4 px on a 512^2 image, whose first grid is 128^2). Averaged down to that grid, a
#: texture of repeated blobs (stained nuclei) still matches a neighbouring blob, and a large displacement
#: settled there: IHC at 4 % (benchmarks/nephi_general2d.py, 512 px) ended with patches 20-34 px wrong
#: (docs/nephi.md, session 25). Blurred, the first level sees the blobs' layout, not the blobs; the finer
#: levels compare the images as they are. With 1.0 (/tmp/s26/B/ihc_blur.py), IHC 4 %, seeds 78 / 77 / 71 /
#: 76 / 79: 0.530 / 0.137 / 0.093 / 0.0445 / 0.0553 -> 0.041 / 0.045 / 0.048 / 0.043 / 0.057 px. Opt-in (0:
#: none, the default): on other images it also lost, at 256 px cell 4 % 0.173 -> 0.207 px (seed 82), and
#: the fresh seeds at 512 px are not measured (docs/nephi.md, session 26).
FIRST_LEVEL_BLUR = 0.0


def finer_level_runs(finer_level: bool, reg_weight: float) -> bool:
    """Whether the finer-knot level runs: asked for and with a bending penalty. Unregularised, its
    knots fit noise (128 px astronaut, 4 px field on 32 px: endpoint error 0.049 px without the
    level, 0.142 with it)."""
    return bool(finer_level) and reg_weight > 0


def level_iterations(iterations: int, levels: int, finer: bool = True) -> list[int]:
    """Steps of each coarse level (coarse first) for ``levels`` grids: the finest grid runs
    ``iterations``, level ``k`` a ``(k + 1) / levels`` share, since a coarse level's few knots
    converge sooner; with ``finer`` the finer-knot level on the last grid follows with
    ``iterations`` more (``levels + 1`` entries)."""
    if levels <= 0:
        return []
    steps = [max(1, iterations * (k + 1) // levels) if iterations > 0 else 0 for k in range(levels)]
    return steps + steps[-1:] if finer else steps


def cooldown_steps(cooldown: float, last_steps: int) -> int:
    """Steps the cooldown (option ``cooldown`` of :func:`optimize_velocity`) adds to a last level of
    ``last_steps`` steps: that share of them, rounded (5 after 50 for :data:`.predict.REFINE_COOLDOWN`)."""
    return round(cooldown * last_steps)


def level_spacings(shape, grids, spacings=None, finer: bool = True) -> list[float]:
    """Knot spacing (voxels of ``shape``) of every coarse level run on ``grids``: ``spacings`` (default
    :func:`knot_spacings`), then with ``finer`` the finer-knot level's, half the last one but at
    least one voxel of the last grid."""
    if not grids:
        return []
    out = knot_spacings(shape, grids) if spacings is None else [float(s) for s in spacings[: len(grids)]]
    if finer:
        last_factor = max(n / m for n, m in zip(shape, grids[-1]))
        out.append(max(out[-1] / 2, last_factor))
    return out


#: Matched blur (option ``match_blur`` of :func:`optimize_velocity`, the engine's
#: ``coarse_match_blur``; off by default, :func:`match_blur_runs`): the levels that compare
#: on the full grid also learn, per direction and per axis, how much blurrier one image is than the
#: other, and blur the sharper one by that much before the similarity (:mod:`.matchblur`, which adds
#: back the noise the blur removed, so noise is not mistaken for sharpness). A resampled moving
#: image is blurrier than the fixed one (the resampling that made it, and the bicubic warp here,
#: whose smoothing depends on the sub-voxel shift); without a term for it the velocity "explains"
#: the blur by compressing and stretching edges. On the camera shifted by (3.75, -2) px at 256 px
#: (``benchmarks/nephi_large.py``) the Jacobian determinant inside the image ranged 0.951-1.135
#: without it and 0.971-1.020 with it; rotated by 5 degrees 0.944-1.196 and 0.9497-1.024. Each
#: side's blur is a 3-tap kernel ``[s/2, 1 - s, s/2]`` (variance ``s``) along each axis, ``s``
#: learned by Adam from the loss and held in [0, MATCH_BLUR_MAX_VARIANCE].
MATCH_BLUR_MAX_VARIANCE = 0.5
#: Largest image (voxels) on which the matched blur runs: its blurred copies and noise probes cost
#: memory on the full comparison grid (``benchmarks/nephi_memory.py``, fast preset: 1024^2 peak 239
#: -> 593 MiB, above a dense displacement pair's 353; 2048^2, compared on 1024^2, 291 -> 678 MiB).
#: Larger images, and images compared on a downsampled grid, run without it.
MATCH_BLUR_MAX_VOXELS = 1 << 18
#: Adam's learning rate for the matched-blur variances (voxels^2 per step).
MATCH_BLUR_LR = 0.005


#: Values of ``match_blur`` (:func:`optimize_velocity`) and the engine's ``coarse_match_blur``.
MATCH_BLUR_MODES = (None, False, True, "once", "auto")


def match_blur_mode(match_blur: bool | str | None) -> str | None:
    """``"learned"`` (True: the variances learned with the velocity at every step), ``"once"``
    (estimated once at the start of the full-grid levels, then held: :func:`.matchblur.estimate_blur`),
    ``"auto"`` (``"once"`` on 2D images where the coarser levels found the pair near-rigid,
    :data:`MATCH_BLUR_NEAR_RIGID`, else off; None, the default since session 18), or None (False: off)."""
    if match_blur not in MATCH_BLUR_MODES:
        raise InputError(f"coarse_match_blur must be one of {MATCH_BLUR_MODES}, not {match_blur!r}.")
    if match_blur is None:
        return "auto"
    return None if not match_blur else ("learned" if match_blur is True else match_blur)


#: Mode ``"auto"``: on 2D images the matched blur is estimated once (mode ``"once"``) when the
#: Jacobian determinant of the coarser levels' map deviates from 1 by at most this RMS
#: (:func:`displacement_detj_rms`), else it is off. Unitless, so one threshold serves every image
#: size (session 19): 2D shifts and rotations read 0.0014-0.011 at 256 and 512 px, noise 0.02
#: included, smooth deformations of 1 % of the size 0.031 and more. Until session 18 the gate was
#: the displacement's spread, 0.4 voxel, which grows with the size (the retina shift read 0.32 at
#: 256 px, 0.398 at 512 and 0.447 with noise). Volumes stay off: on the MRI no measure of the
#: coarser levels told a shift or rotation (0.089-0.090) from 0.5-2 voxels of deformation (0.080-0.109).
MATCH_BLUR_NEAR_RIGID = 0.02


def _in_voxels(u: torch.Tensor, sizes) -> torch.Tensor:
    """A normalised displacement ``(1, D, *S)`` as ``(1, D, prod(S))`` in voxels; ``sizes``: the image's
    size along each component, in the components' order."""
    scale = torch.as_tensor([(n - 1) / 2 for n in sizes], dtype=u.dtype, device=u.device)
    return u.flatten(2) * scale[None, :, None]


def displacement_spread(u: torch.Tensor, full) -> float:
    """RMS distance (voxels of ``full``) of a displacement ``(1, D, *S)`` (normalised, components in
    grid_sample's order) from its mean over the grid."""
    vox = _in_voxels(u, full[::-1])
    return float((vox - vox.mean(-1, keepdim=True)).pow(2).sum(1).mean().sqrt())


def displacement_rms(maps: DenseMaps, full) -> float:
    """RMS length (voxels of ``full``) over the grid of ``maps``' forward displacement ``u`` (the global
    map not included: ``A(x + u(x))``)."""
    vox = _in_voxels(maps.forward_grid, full)  # forward_grid: (1, D, *S), numpy component order
    return float(vox.pow(2).sum(1).mean().sqrt())


def displacement_detj_rms(u: torch.Tensor, full) -> float:
    """RMS over the grid of ``det(I + grad u) - 1`` for a displacement ``(1, D, *S)`` (normalised,
    components in grid_sample's order) on a grid spanning an image of shape ``full``: central
    differences (one-sided at the edges) in voxels of ``full``. Unitless: a shift or rotation gives 0
    whatever the image size."""
    d = len(full)
    scale = np.array([(n - 1) / 2 for n in full]).reshape(d, *[1] * d)
    un = u[0].flip(0).detach().double().cpu().numpy() * scale  # numpy component order, voxels
    steps = [(n - 1) / max(m - 1, 1) for n, m in zip(full, un.shape[1:])]  # grid step, voxels of full
    det = jacobian_determinant(un, spacing=steps, units="physical")
    return float(np.sqrt(np.mean((det.astype(np.float64) - 1) ** 2)))


def match_blur_runs(match_blur: bool | str | None) -> bool:
    """Whether the coarse stage may compare at matched blur (None: ``"auto"``, where the map is near-rigid).

    Learned with the velocity (True) it stays opt-in. Learned from the similarity alone, the
    variances also learned noise (with independent noise in the two images blurring either side
    raises NCC); :mod:`.matchblur` adds the noise the blur
    removed back, so on two equally sharp copies with noise 0.03 they stay below 0.002 (0.17-0.31
    before). Learned so, it stays opt-in (session-14 review): at 256 px it cost the retina up to 0.036
    px (``nephi_large.py``, 4 %: 0.279 -> 0.315), 46-98 % more CPU and 2.5x the peak memory on 512^2
    images, and it is unmeasured on pairs of two stains or modalities (it lowered the atlas's
    restained-section test by 0.004 Dice). On volumes it also lost: MRI 0.110 / 0.149 /
    0.274 -> 0.110 / 0.150 / 0.285 voxels at 2 / 4 / 6 voxels of motion."""
    return match_blur_mode(match_blur) is not None


#: Volumes of at most :data:`VOLUME_SAMPLING_MAX_VOXELS` are warped by the interpolating cubic spline
#: (:mod:`.cubic`) instead of trilinear interpolation, whose smoothing varies with the sub-voxel shift
#: (session 32, docs/nephi.md; :func:`optimize_velocity`).
CUBIC_3D = False


#: Volumes warped trilinearly: with True, on the levels that compare on the grid they warp on, the image
#: compared with a warped one is blurred by the warp's own smoothing, per voxel and axis the variance
#: ``f (1 - f)`` of linear interpolation at the sub-voxel part ``f`` of where that voxel was sampled
#: (:func:`interpolation_variance`, :func:`blur_by_variance`; session 35, docs/nephi.md): a sharp image is
#: then not compared with a blurred one, whose difference the velocity would fit by compressing and
#: stretching around edges. ``"all"``: on the coarser levels too (blurred on the grid they warp on, then
#: averaged down like the warped image). The stage's default where its ``warp_blur`` is None; False here,
#: but the engine's fast preset asks for ``"all"`` on volumes of at most ``engine.VOLUME_DEFAULT_MAX_VOXELS``
#: in ``optimize`` mode (not chunked) since session 37 (``engine.PRESETS["fast"]["coarse_warp_blur_3d"]``,
#: option ``coarse_warp_blur``). Set truthy, this switch overrides the engine's default wherever the engine
#: leaves ``coarse_warp_blur`` to it.
WARP_BLUR_3D: bool | str = False


def _axis_interpolation_variance(pts: torch.Tensor, a: int, n: int) -> torch.Tensor:
    """``f (1 - f)`` of component ``a`` of the normalised points ``pts`` ``(1, *S, D)`` along an axis of
    ``n`` voxels, ``(1, *S)``, detached (:func:`interpolation_variance`'s component ``a``, the same values bit
    for bit: the same operations on one component, in place, so no ``(1, *S, D)`` temporary is made)."""
    # clamped: outside the frame grid_sample (padding "border") reads the edge voxel as it is, unsmoothed
    c = (pts.detach()[..., a] + 1).mul_(0.5).mul_(n - 1).clamp_(0, n - 1)
    f = c.sub_(torch.floor(c))
    return f.mul_(1 - f)


def interpolation_variance(pts: torch.Tensor, shape) -> torch.Tensor:
    """The smoothing of linear interpolation at the normalised points ``pts`` ``(1, *S, D)`` (grid_sample's
    axis order, ``align_corners=True``) in an image of spatial ``shape`` (numpy order): per point and axis
    ``f (1 - f)`` (voxel^2), ``f`` the sub-voxel part of the point (0 outside the frame, where the edge
    voxel is read as it is), ``(1, D, *S)`` in ``pts``' axis order. Detached: the blur follows the map, it
    is not a way for the map to lower the loss."""
    d = pts.shape[-1]
    return torch.stack([_axis_interpolation_variance(pts, a, shape[d - 1 - a]) for a in range(d)], 1)


def blur_by_variance(image: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``image`` ``(1, 1, *S)`` blurred per voxel along each axis by the 3-tap kernel ``[s/2, 1 - s, s/2]``
    of variance ``s`` (``var`` ``(1, D, *S)``, components in grid_sample's order as
    :func:`interpolation_variance` gives them; edges repeated), the axes' blurs summed to first order."""
    d = image.dim() - 2
    out = image
    for a in range(d):  # numpy axis of component a: 2 + d - 1 - a (x is the last)
        out = out + 0.5 * var[:, a : a + 1] * _second_difference(image, 2 + d - 1 - a)
    return out


def blur_by_interpolation(image: torch.Tensor, pts: torch.Tensor, shape=None) -> torch.Tensor:
    """``image`` ``(1, 1, *S)`` blurred by the smoothing of linear interpolation at ``pts`` ``(1, *S, D)`` in
    an image of spatial ``shape`` (default: ``image``'s): the values of ``blur_by_variance(image,
    interpolation_variance(pts, shape))`` bit for bit, one axis at a time, so the ``(1, D, *S)`` variance
    is never held (its memory on large comparison grids; session 38, docs/nephi.md). Gradients with respect
    to ``image`` may differ from that formulation's by an ulp (the coarse stage never takes them: its compared
    images are constants and the variance is detached)."""
    d = image.dim() - 2
    shape = tuple(image.shape[2:]) if shape is None else tuple(shape)
    out = image
    for a in range(d):  # numpy axis of component a: 2 + d - 1 - a (x is the last)
        term = _axis_interpolation_variance(pts, a, shape[d - 1 - a])[:, None].mul_(0.5)
        term = term.mul_(_second_difference_inplace(image, 2 + d - 1 - a))
        out = out + term if a == 0 else out.add_(term)
        del term
    return out


def _second_difference_inplace(t: torch.Tensor, axis: int) -> torch.Tensor:
    """The values of :func:`.matchblur._second_difference` bit for bit (``(-2 t + t[i-1]) + t[i+1]`` is
    ``(t[i-1] - 2 t) + t[i+1]`` in floating point) with one temporary of ``t``'s size instead of four (its
    gradient may differ by an ulp; no gradient is taken through it)."""
    n = t.shape[axis]
    if n < 2:
        return torch.zeros_like(t)
    out = t * -2
    out.narrow(axis, 1, n - 1).add_(t.narrow(axis, 0, n - 1))  # + t[i-1] (edges replicated)
    out.narrow(axis, 0, 1).add_(t.narrow(axis, 0, 1))
    out.narrow(axis, 0, n - 1).add_(t.narrow(axis, 1, n - 1))  # + t[i+1]
    out.narrow(axis, n - 1, 1).add_(t.narrow(axis, n - 1, 1))
    return out


#: Images of at least this many voxels (2^21: 1448^2, 128^3; session 45) compare each direction of the coarse
#: stage in its own segment that the backward pass recomputes (:func:`_recomputed`): the comparison grid's
#: warped images, sampling points and similarity terms of one direction are held at a time, not those of both
#: for the whole step. The same values and gradients bit for bit (the graph's nodes and their order are kept;
#: only what they saved is recomputed), at the cost of one more forward pass of the comparisons a step. There
#: the coarse stage's optimisation was the whole call's memory peak (2048^2, ``benchmarks/nephi_memory.py``).
#: Its CPU cost (session 46, ``benchmarks/nephi_recompute_cpu.py``): a default 2048^2 call (100 coarse steps)
#: took 1.38x the CPU seconds with the segment (41.4 -> 57.0 s; the coarse stage 37.6 -> 53.1 s).
RECOMPUTE_MIN_VOXELS = 1 << 21


def _recomputed(fn, u: torch.Tensor, forward: bool, recompute: bool) -> torch.Tensor:
    """``fn(u, forward)``; with ``recompute`` (and autograd on) as a checkpointed segment: what its operations
    save for the backward pass is not kept but recomputed there (``torch.utils.checkpoint``, non-reentrant:
    the same nodes, run in the same order, so the gradients are those of ``fn`` bit for bit)."""
    if not (recompute and torch.is_grad_enabled() and u.requires_grad):
        return fn(u, forward)
    return checkpoint(fn, u, forward, use_reentrant=False, preserve_rng_state=False)


#: Adam's learning rate of the coarse stage, in normalised coordinates (a knot's step: 1.3 px at 512^2).
COARSE_LEARNING_RATE = 0.005


def optimize_velocity(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    shapes: list[tuple[int, ...]],
    iterations: int,
    reg_weight: float,
    similarity: str,
    on_step,
    learning_rate: float | None = None,
    steps: int = 6,
    spacings: list[float] | None = None,
    compare_max_voxels: int | None = None,
    affine: torch.Tensor | None = None,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    finer_level: bool = True,
    match_blur: bool | str | None = None,
    flat_fill: bool = True,
    flat_noisy: bool = False,
    on_level=None,
    frame_mask: bool = True,
    max_levels: int | None = None,
    gates: list | None = None,
    warmup: float = 0.0,
    cooldown: float = 0.0,
    first_blur: float = 0.0,
    initial: torch.Tensor | None = None,
    flat_gradient: float | None = None,
    flat_empty: float | None = None,
    schedule: list[int] | None = None,
    compare_on_warp_grid: bool = False,
    warp_blur: bool | str | None = None,
    first_gate: float | None = None,
    finer_gate: float | None = None,
    edge_damp: float | None = None,
    pattern_blur: bool = False,
    spline_warp: bool = False,
) -> DenseMaps:
    """Optimise a stationary velocity field level by level on the grids ``shapes`` (coarse first).

    At each level the velocity is the previous levels' (frozen) plus a cubic B-spline with knots
    ``spacings[k]`` voxels of the image apart (default :func:`knot_spacings`, halving with the
    grid), evaluated on the level's grid and integrated there by scaling and squaring; the level
    runs :func:`level_iterations` steps of Adam (``learning_rate``, None: :data:`COARSE_LEARNING_RATE`,
    read at the call like every module constant named as a default here, since session 40); with
    ``finer_level`` and ``reg_weight > 0`` (:func:`finer_level_runs`) a last level on the last grid halves
    the knot spacing once more.
    ``reg_weight`` weights the bending energy of ``v`` in voxels of the level's grid: the spline
    alone keeps ``v`` smooth, the penalty fills in regions without texture from their surroundings.

    The last level warps the images on the full grid (or the finest downsampling with at most
    ``compare_max_voxels`` voxels, None: :data:`WARP_MAX_VOXELS`; :func:`comparison_shape`) and compares
    them there, which resolves detail a small volume's coarse grids lose; a coarser level warps them on a
    grid twice as fine as its own per axis (at most the full one) and compares them averaged down to its
    own. Warping
    images downsampled to the level's grid would be cheaper but biased: averaging does not commute
    with a non-uniform warp, which moves each level's optimum by a fraction of a voxel and lands
    the next level in a worse basin.
    2D images are warped with bicubic interpolation, whose smoothing varies less with the
    sub-voxel shift than bilinear's (3D: trilinear, the only choice of ``grid_sample``).

    ``fixed`` and ``moving`` are ``(1, 1, *spatial)`` on grids of the same shape; ``on_step(loss)``
    is called every iteration (it reports progress and may raise ``Cancelled``). ``affine`` (a
    global map found first, normalised coordinates, numpy axis order) is composed into the
    sampling, ``moving(A exp(v)(x))`` and ``fixed(exp(-v)(A^-1 y))``, so the moving image is never
    resampled twice.

    ``fixed_mask`` and ``moving_mask`` (``(1, 1, *spatial)`` like the images, optional) restrict
    the similarity: averaged down with the images, they weight each compared voxel by the fixed
    mask there times the other mask carried through the current map like its image (bilinear, no
    gradient through the weight). With ``frame_mask`` (the default) a voxel also counts only if
    the map takes it inside the other image's frame (its weight times the frame's, 0 or 1): the
    images are sampled there with their edge values, which are no data, and a border the moving
    image lost to a shift pulled the field up to 16 px inside (retina shifted by (3.75, -2) px at
    256 px: det J 0.63-1.62 without it, 0.94-1.15 with it). False: the similarity as before.

    With ``match_blur`` (:func:`match_blur_mode`; None: ``"auto"``, False: off), on images of at most
    :data:`MATCH_BLUR_MAX_VOXELS` compared on their own grid, the levels on the full comparison grid
    compare the images at matched blur (:func:`.matchblur.blur_pair`,
    :data:`MATCH_BLUR_MAX_VARIANCE`): per direction (fixed against warped moving, moving against
    warped fixed) and axis a variance learned with the velocity blurs the sharper image, so the
    velocity does not fit interpolation blur. The returned maps carry the variances learned
    (``blur_variance``, ``(2, D)`` in numpy axis order; None without). ``"once"`` estimates them at
    the first full-grid step with the velocity held (misalignment inflates that estimate: on large
    deformations it costs more than learning them), ``"auto"`` does so only on 2D images where the
    Jacobian determinant of the coarser levels' map deviates from 1 by at most
    :data:`MATCH_BLUR_NEAR_RIGID` RMS (:func:`displacement_detj_rms`, recorded as
    ``blur_gate_detj_rms``; the displacement's spread in voxels as ``blur_gate_spread``): a pair
    related by a shift or rotation, whose resampling blur is one blur over the image. Where the map
    varies by more, the blur varies with its sub-voxel part, and one blur for it cost accuracy even
    at its true mean (retina at 2 %, ``nephi_large.py``: 0.242 -> 0.255 px held at 1/6 voxel²).

    ``max_levels`` (None: all) runs only the first that many levels of the schedule above (the finer-knot
    level counts as one), e.g. the levels a held-out check kept (:mod:`.heldout`); the flat fill then
    works on the last grid's resampling of their velocity. ``gates`` (None: none) holds one entry per
    level: None (the level as above) or an array on the image grid, in [0, 1], that multiplies the
    level's B-spline increment (resampled to its grid), e.g. where a held-out check supports it
    (:func:`.heldout.level_gates`); a level whose gate is 0 everywhere does not run. ``warmup`` (0: none)
    ramps each level's learning rate up linearly over that share of its steps (rounded): a level starts a
    fresh Adam, whose first steps move every knot by the full rate whatever its gradient, which knocks a
    map that is nearly right already off it (predict+refine, :data:`.predict.REFINE_WARMUP`). ``cooldown``
    (0: none) adds that share of its steps (rounded) to the last level, over which its rate falls linearly
    towards 0 (:data:`.predict.REFINE_COOLDOWN`). ``first_blur`` (0: none) blurs the images the first level
    compares, where it compares on a grid coarser than the last levels', by a Gaussian of that many voxels
    of its grid (:data:`FIRST_LEVEL_BLUR`). ``initial`` (None: zero) is a velocity ``(1, D, *S)``
    (normalised, components in grid_sample's order, on any grid) the stage starts from: each level adds
    its increment to it, resampled to the level's grid from its own (not through the coarser levels'
    grids); ``reg_weight`` weights the bending of the increments only, the flat fill replaces only them
    (the start is kept where the images are flat), and the returned maps are those of the sum
    (predict+refine's prediction, :func:`.predict.velocity_of`: the moving image is then sampled once
    through the whole map, as in optimize). ``flat_gradient`` (None: :data:`.flatfill.FLAT_GRADIENT`) is
    the flat fill's texture threshold (:func:`.flatfill.flat_share`; predict+refine's
    :func:`.predict.refine_flat_gradient`); ``flat_empty`` (None: off) counts a region flat by
    :data:`.flatfill.FLAT_GRADIENT` whole where at least that share of it is flat by ``flat_gradient``
    (:func:`.flatfill.empty_regions`; predict+refine's opt-in :data:`.predict.REFINE_FLAT_EMPTY`).
    ``schedule`` (None: :func:`level_iterations`) gives each level's steps, one entry per grid of
    ``shapes`` (predict+refine's :func:`.predict.refine_schedule`). With ``compare_on_warp_grid`` a coarser
    level compares the images on the grid it warps them on (twice as fine as its own per axis), not
    averaged down to its own (predict+refine's :data:`.predict.REFINE_COMPARE_ON_WARP_GRID`).
    ``warp_blur`` (None: :data:`WARP_BLUR_3D`; False, True or ``"all"``): on volumes warped trilinearly, the
    image compared with a warped one is blurred by the warp's own smoothing (see :data:`WARP_BLUR_3D`).
    ``first_gate`` (None: none): the first level's velocity is dropped, and the next level starts from zero as
    if it had not run, where the RMS of det J - 1 of its map (:func:`displacement_detj_rms`) is at most this
    (the engine's ``coarse_capture_gate``; the reading and whether it was kept: ``first_gate_reading``,
    ``first_kept``).
    ``finer_gate`` (None: none): the finer-knot level does not run (its steps are not taken), and the stage
    ends with the last grid's first level as without that level, where the RMS of det J - 1 of the map before
    it (:func:`displacement_detj_rms`) is at most this (the engine's ``coarse_finer_gate``; the reading and
    whether the level ran: ``finer_gate_reading``, ``finer_kept``). A near-rigid map there is the global
    stage's shift or rotation, which leaves the 8 px knots of that level nothing to fit but the slide of a
    straight edge between flat regions along itself (docs/nephi.md, "Session 43 (B)").
    ``edge_damp`` (None: none; 2D): each level's B-spline increment ``w`` becomes ``w - P w``, ``P`` the
    projector on the direction along the fixed image's edges, weighted by the edge's coherence, its contrast
    across and its lack of texture along (the aperture problem), on the level's grid at this strength in
    (0, 1] (:func:`.edgedamp.edge_projector`, window the level's knot footprint), so a level cannot slide a
    straight edge between flat regions along itself (the engine's ``coarse_edge_damp``; session 44).
    ``pattern_blur`` (False: off): where the matched blur is estimated once (``"once"``, or ``"auto"`` on a
    near-rigid pair), each direction's variance is a uniform part plus a part that follows the sub-voxel
    position of the map's sampling points, ``6 f (1 - f)`` per voxel and axis (:mod:`.matchblur`,
    :func:`.matchblur.estimate_blur`): a linear resampling's blur on a rotation varies as a moire
    over the image, which one variance cannot follow (the engine's ``coarse_blur_pattern``; session 46). The
    parts are returned as ``blur_pattern`` ``(2, 2, D)``, ``blur_variance`` the variance fields' means.
    ``spline_warp`` (False: off; 2D): the images are warped with the prefiltered cubic B-spline
    (:func:`.cubic.cubic_sample`, as small volumes are) instead of ``grid_sample``'s bicubic, whose cubic
    convolution (a = -0.75) shifts the image by up to 0.047 voxel and sharpens it by an amount that follows
    the sub-voxel position (the engine's ``coarse_spline_warp``; session 46).
    """
    if learning_rate is None:
        learning_rate = COARSE_LEARNING_RATE
    d = fixed.dim() - 2
    full = tuple(fixed.shape[2:])
    cubic, exact = volume_sampling(full)  # small volumes: cubic warp, exact bins (session 32)
    warp_blur_mode = WARP_BLUR_3D if warp_blur is None else warp_blur
    warp_blur = bool(
        warp_blur_mode and d == 3 and not cubic
    )  # the trilinear warp's smoothing matched (session 35)

    def area(t, shape):
        return _area(t, shape, exact)

    dev = fixed.device
    fine = comparison_shape(full, compare_max_voxels)
    recompute = math.prod(full) >= RECOMPUTE_MIN_VOXELS  # one direction's comparison held at a time
    f_fine, m_fine = area(fixed, fine), area(moving, fine)
    masks_fine = [None if m is None else area(m.to(fixed.dtype), fine) for m in (fixed_mask, moving_mask)]
    masked = masks_fine != [None, None]
    # Fields below have their components in grid_sample's order (x, y[, z]): no flips per step.
    mode = ("cubic" if spline_warp else "bicubic") if d == 2 else ("cubic" if cubic else "bilinear")

    order = [*range(d)][::-1] + [d]  # the matrices in grid_sample's axis order (x, y[, z])
    a_xy = None if affine is None else affine.to(dev, torch.float32)[order][:, order]
    a_inv = None if a_xy is None else torch.linalg.inv(a_xy)

    def sample(image, pts, interp, inside, var=None):
        """``image`` at the normalised points ``pts``; with a list ``inside``, their frame weight (1
        inside the image, 0 outside) is appended to it; with a list ``var``, the points (detached: the
        interpolation's smoothing there is read from them, :func:`blur_by_interpolation`; they are
        held for the backward pass anyway) and the image's shape."""
        if inside is not None:
            inside.append(in_frame(pts)[:, None])
        if var is not None:
            var.append((pts.detach(), image.shape[2:]))
        if interp == "cubic":  # ``image`` holds the spline coefficients (cubic.spline_coefficients)
            return cubic_sample(image, pts)
        return F.grid_sample(image, pts, mode=interp, padding_mode="border", align_corners=True)

    def warp(image, u, ident, interp=mode, inside=None, var=None):
        """``image`` pulled back through ``u`` (and ``A``); ``inside`` and ``var`` as in ``sample``."""
        pts = ident + torch.movedim(_resample(u, ident.shape[1:-1]), 1, -1)
        if a_xy is not None:
            pts = apply_affine(pts, a_xy)
        return sample(image, pts, interp, inside, var)

    def warp_back(image, u, ident, interp=mode, inside=None, var=None):
        if a_inv is None:
            return warp(image, u, ident, interp, inside, var)
        q = apply_affine(ident, a_inv)
        pts = q + torch.movedim(
            F.grid_sample(u, q, mode="bilinear", padding_mode="border", align_corners=True), 1, -1
        )
        return sample(image, pts, interp, inside, var)

    def mask_weights(masks_l, masks_w, u_f, u_b, ident, cmp):
        """Weights of the forward and backward comparisons (None: unweighted)."""
        return (
            direction_weight(masks_l, masks_w, u_f, ident, cmp, True),
            direction_weight(masks_l, masks_w, u_b, ident, cmp, False),
        )

    def direction_weight(masks_l, masks_w, u, ident, cmp, forward):
        """The weight of one direction's comparison (``forward``: of the fixed image against the warped
        moving one, from ``u_f``; else the other, from ``u_b``; None: unweighted)."""
        (fk_l, mk_l), (fk_w, mk_w) = masks_l, masks_w
        own_l, other_w = (fk_l, mk_w) if forward else (mk_l, fk_w)
        with torch.no_grad():
            if other_w is None:
                w = None
            elif forward:
                w = area(warp(other_w, u, ident, "bilinear"), cmp)
            else:
                w = area(warp_back(other_w, u, ident, "bilinear"), cmp)
        return own_l if w is None else (w if own_l is None else w * own_l)

    finer = finer_level_runs(finer_level, reg_weight)
    steps_per = level_iterations(iterations, len(shapes), finer) if schedule is None else list(schedule)
    spacings = level_spacings(full, shapes, spacings, finer)
    if finer and shapes:  # the finer-knot level on the last grid
        shapes = [*shapes, shapes[-1]]
    n_last = len(steps_per) - (2 if finer else 1)  # the first level on the finest grid
    v = None
    # flat shares of both images on the last grid (flatfill), taken before the levels' peak memory
    flat_shares = (
        [flat_share(t, shapes[-1], flat_noisy, flat_gradient, flat_empty) for t in (f_fine, m_fine)]
        if flat_fill and shapes
        else None
    )
    # matched-blur variances: [fixed vs warped moving, moving vs warped fixed] x axis (numpy order);
    # started off zero, where relu's gradient would vanish
    # only on images of up to MATCH_BLUR_MAX_VOXELS, compared on their own grid (its memory cost)
    blur_mode = (
        match_blur_mode(match_blur) if math.prod(full) <= MATCH_BLUR_MAX_VOXELS and fine == full else None
    )
    learn_blur = blur_mode == "learned"
    blur = torch.full((2, d), 1e-4, device=dev, requires_grad=True) if learn_blur else None
    blur_used = False
    warp_blur_used = False  # WARP_BLUR_3D ran on a level with steps (recorded in volume_sampling)
    held = None  # "once": the variances estimated at the first full-grid step, and the probes there
    held_parts = None  # pattern_blur: the uniform and patterned parts estimated with them
    spread = detj_rms = None  # "auto": the coarser levels' displacement spread (voxels), det J RMS
    first_reading = first_kept = None  # first_gate: the first level's det J RMS, whether it was kept
    # finer_gate: the map's det J RMS before the finer level, whether it ran
    finer_reading = finer_kept = None
    steps_run = 0  # the steps the levels ran (a level cut by max_levels or gated off runs none)

    def total(increment, shape):
        """The velocity on ``shape``: the levels' ``increment`` (None: none yet) plus ``initial``."""
        parts = [_resample(t, shape) for t in (initial, increment) if t is not None]
        return None if not parts else parts[0] if len(parts) == 1 else parts[0] + parts[1]

    for k, (shape, n_steps) in enumerate(zip(shapes, steps_per)):
        if max_levels is not None and k >= max_levels:
            break
        cmp = fine if k >= n_last else tuple(shape)
        if blur_mode == "auto" and k == n_last:  # near-rigid after the coarser levels: estimate once
            v_c = total(v, shape)
            u_c = None if v_c is None else _integrate_xy(v_c, steps)
            spread = None if u_c is None else displacement_spread(u_c, full)
            detj_rms = None if u_c is None else displacement_detj_rms(u_c, full)
            near_rigid = d == 2 and detj_rms is not None and detj_rms <= MATCH_BLUR_NEAR_RIGID
            blur_mode = "once" if near_rigid else None
        if finer_gate is not None and finer and k == len(steps_per) - 1 and v is not None:
            # near-rigid before the finer-knot level: it does not run (as a level gated off everywhere)
            with torch.no_grad():
                finer_reading = displacement_detj_rms(_integrate_xy(total(v, shape), steps), full)
            finer_kept = finer_reading > finer_gate
            if not finer_kept:
                v = _resample(v, shape)
                if on_level is not None:
                    on_level(k, total(v, shape))
                continue
        gate = None if gates is None or k >= len(gates) or gates[k] is None else gates[k]
        if gate is not None:
            gate = _resample(
                torch.as_tensor(np.asarray(gate), dtype=torch.float32, device=dev)[None, None], shape
            )
            if not bool((gate > 0).any()):  # kept nowhere: the level does not run
                v = None if v is None else _resample(v, shape)
                if on_level is not None:
                    on_level(k, total(v, shape))
                continue
        warp_grid = fine if cmp == fine else comparison_shape(fine, 2**d * math.prod(shape))
        if compare_on_warp_grid:  # a coarser level compares the images as finely as it warps them
            cmp = warp_grid
        f_l, m_l = area(f_fine, cmp), area(m_fine, cmp)
        f_w, m_w = area(f_fine, warp_grid), area(m_fine, warp_grid)
        if first_blur > 0 and k == 0 and cmp != fine:  # a wider basin for the first level (FIRST_LEVEL_BLUR)
            f_l, m_l = (gaussian_smoothed(t, [first_blur] * d) for t in (f_l, m_l))
            wider = [first_blur * w / c for w, c in zip(warp_grid, cmp)]  # the same blur on the warp grid
            f_w, m_w = (gaussian_smoothed(t, wider) for t in (f_w, m_w))
        if mode == "cubic":  # what the cubic warp reads: the images' spline coefficients
            f_w, m_w = spline_coefficients(f_w), spline_coefficients(m_w)
        masks_l = [None if m is None else area(m, cmp) for m in masks_fine]
        masks_w = [None if m is None else area(m, warp_grid) for m in masks_fine]
        ident = normalized_grid(warp_grid, dev).flip(-1)[None]
        increment = torch.zeros(1, d, *shape, device=dev) if v is None else _resample(v, shape)
        base = increment if initial is None else increment + _resample(initial.to(dev), shape)
        intervals = intervals_for_spacing(full, spacings[k])
        weights = [grid_weights(n, i, device=dev) for n, i in zip(shape, intervals)]
        ctrl = torch.nn.Parameter(torch.zeros(1, d, *control_shape(intervals), device=dev))
        # edge_damp: the level's increment loses its motion along coherent edges of the fixed image
        proj = (
            edge_projector(
                area(f_fine, shape), spacings[k], max(n / m for n, m in zip(full, shape)), edge_damp
            )
            if edge_damp is not None and d == 2
            else None
        )
        to_vox = torch.as_tensor([(n - 1) / 2 for n in shape[::-1]], device=dev).reshape(1, d, *[1] * d)
        opt = FlooredAdam(ctrl, learning_rate, MOMENT_FLOOR)
        blur_opt = torch.optim.Adam([blur], lr=MATCH_BLUR_LR) if blur is not None and cmp == fine else None
        blur_here = blur_opt is not None or (blur_mode == "once" and cmp == fine)
        # WARP_BLUR_3D: trilinear volumes, on the levels that compare on the grid they warp on (matched blur,
        # where it runs, learns the blur instead)
        warp_blur_here = warp_blur and (cmp == warp_grid or warp_blur_mode == "all") and not blur_here
        warp_blur_used = warp_blur_used or (warp_blur_here and n_steps > 0)
        blur_used = blur_used or (blur_here and n_steps > 0)
        if blur_here:  # white-noise variances of the images, unit noise to warp as probes
            noise = noise_variance(f_l), noise_variance(m_l)
            gen = torch.Generator(device=dev).manual_seed(0)
            shape_w = (*f_w.shape[:2], *warp_grid)  # (f_w may hold spline coefficients: cubic)
            noise_f, noise_m = (torch.randn(shape_w, generator=gen, device=dev) for _ in range(2))
            if mode == "cubic":
                noise_f, noise_m = spline_coefficients(noise_f), spline_coefficients(noise_m)
        ramp = round(warmup * n_steps)  # steps over which the rate ramps up (see warmup)
        tail = cooldown_steps(cooldown, n_steps) if k == len(steps_per) - 1 else 0  # the last level's decay
        n_steps += tail
        steps_run += n_steps

        def compare(
            u,
            forward,
            level=(f_l, m_l, f_w, m_w, ident, masks_l, masks_w, cmp, warp_grid, warp_blur_here),
        ):
            """The similarity of one direction (``u``: ``u_f``, fixed against the warped moving image, or
            ``u_b``, moving against the warped fixed one): the values and graph of the two directions
            computed together as before session 45, one direction at a time (:func:`_recomputed`)."""
            f_l, m_l, f_w, m_w, ident, masks_l, masks_w, cmp, warp_grid, blur_warp = level
            ins = [] if frame_mask else None  # frame weight of the comparison
            var = [] if blur_warp else None  # the warp's smoothing (WARP_BLUR_3D)
            if forward:
                warped = area(warp(m_w, u, ident, inside=ins, var=var), cmp)
                ref_l, ref_w = f_l, f_w
            else:
                warped = area(warp_back(f_w, u, ident, inside=ins, var=var), cmp)
                ref_l, ref_w = m_l, m_w
            if var is None:
                ref = ref_l
            elif cmp == warp_grid:
                ref = blur_by_interpolation(ref_l, *var[0])
            else:  # a coarser level ("all"): blurred on the grid it warps on, averaged down like the warp
                ref = area(blur_by_interpolation(ref_w, *var[0]), cmp)
            del var
            weight = direction_weight(masks_l, masks_w, u, ident, cmp, forward) if masked else None
            if ins:
                weight = _times_frame(weight, ins[0], cmp, exact)
            del ins
            return _weighted_similarity(similarity, ref, warped, weight)

        for step in range(n_steps):
            if ramp > 0 or tail > 0:
                down = min(1.0, (n_steps - step) / (tail + 1)) if tail > 0 else 1.0
                opt.lr = learning_rate * min(1.0, (step + 1) / max(ramp, 1)) * down
            opt.zero_grad()
            w = (
                bspline_on_grid(ctrl, weights)
                if proj is None
                else damped(bspline_on_grid(ctrl, weights), proj)
            )
            vk = base + (w if gate is None else gate * w)
            del w
            u_f, u_b = _integrate_xy(vk, steps), _integrate_xy(-vk, steps)
            if blur_here:
                ins = [] if frame_mask else None  # frame weights of the two comparisons
                # pattern_blur, once: the sampling points, whose sub-voxel part the blur follows
                pts = [] if pattern_blur and blur_mode == "once" and held is None else None
                wm = area(warp(m_w, u_f, ident, inside=ins, var=pts), cmp)
                wf = area(warp_back(f_w, u_b, ident, inside=ins, var=pts), cmp)
                w_fwd, w_bwd = (
                    mask_weights(masks_l, masks_w, u_f, u_b, ident, cmp) if masked else (None, None)
                )
                if ins:
                    w_fwd, w_bwd = (
                        _times_frame(w_fwd, ins[0], cmp, exact),
                        _times_frame(w_bwd, ins[1], cmp, exact),
                    )
                del ins
                # the noise a blur removes is added back (matchblur): only matching the signal pays
                w_fwd, w_bwd = (None if w is None else w.to(f_l.dtype) for w in (w_fwd, w_bwd))
                if held is None:
                    with torch.no_grad():
                        probes = (
                            area(warp(noise_m, u_f, ident), cmp),
                            area(warp_back(noise_f, u_b, ident), cmp),
                        )
                if blur_mode == "once" and held is None:
                    pairs = [(f_l, wm.detach(), w_fwd), (m_l, wf.detach(), w_bwd)]
                    if pts is not None:  # pattern_blur: a variance per voxel, held like the variances
                        patterns = tuple(blur_pattern(interpolation_variance(p, n)) for p, n in pts)
                        held_parts = estimate_blur(
                            similarity, pairs, noise, probes, MATCH_BLUR_MAX_VARIANCE, patterns
                        )
                        fields = tuple(
                            patterned_variance(held_parts[i], patterns[i], MATCH_BLUR_MAX_VARIANCE)
                            for i in range(2)
                        )
                        held = fields, probes
                        del patterns
                    else:
                        held = (
                            estimate_blur(similarity, pairs, noise, probes, MATCH_BLUR_MAX_VARIANCE),
                            probes,
                        )
                del pts
                s_now, probes = (blur, probes) if held is None else held
                per_voxel = held_parts is not None  # pattern_blur: a variance per voxel
                sims = (
                    blurred_similarity(similarity, f_l, wm, w_fwd, s_now[0], noise, probes[0], per_voxel),
                    blurred_similarity(
                        similarity, m_l, wf, w_bwd, s_now[1], noise[::-1], probes[1], per_voxel
                    ),
                )
            else:  # each direction on its own, recomputed in the backward pass on large images
                sims = tuple(
                    _recomputed(compare, u, forward, recompute) for u, forward in ((u_f, True), (u_b, False))
                )
            loss = 0.5 * (sims[0] + sims[1])
            if reg_weight > 0:
                # the bending of what the levels add (with ``initial``, not of the start itself)
                moved = vk if initial is None else vk - base + increment
                loss = loss + reg_weight * R.bending_grid(moved * to_vox)
            value = float(loss.detach())
            if not math.isfinite(value):  # before the backward pass, which a NaN grid can crash
                raise InputError(
                    f"The coarse stage diverged at level {k + 1}: its loss became NaN or infinite. "
                    f"Lower coarse_reg_weight (now {reg_weight:g}), or run without it (levels=1)."
                )
            if blur_opt is not None:
                blur_opt.zero_grad()
            loss.backward()
            opt.step()
            if blur_opt is not None:
                blur_opt.step()
                with torch.no_grad():
                    blur.clamp_(-MATCH_BLUR_MAX_VARIANCE, MATCH_BLUR_MAX_VARIANCE)
            on_step(value)
        with torch.no_grad():
            v = increment + (1 if gate is None else gate) * damped(
                bspline_on_grid(ctrl.detach(), weights), proj
            )
            if first_gate is not None and k == 0 and len(steps_per) > 1:  # near-rigid: as if it had not run
                first_reading = displacement_detj_rms(_integrate_xy(total(v, shape), steps), full)
                first_kept = first_reading > first_gate
                if not first_kept:
                    v = None
        if on_level is not None:  # (level, velocity so far on its grid), e.g. for diagnostics
            on_level(k, total(v, shape))
        del f_w, m_w, ident, masks_l, masks_w, compare
    filled, fill_info = None, {}
    if flat_shares is not None and (v is not None or initial is not None):  # where the images say nothing:
        with torch.no_grad():  # a smooth extension (of the levels' increments; the start is kept there)
            v = (
                None if v is None else _resample(v, shapes[-1])
            )  # (unless max_levels stopped on a coarser grid)
            ident = normalized_grid(shapes[-1], dev).flip(-1)[None]
            moved = warp(flat_shares[1], _integrate_xy(total(v, shapes[-1]), steps), ident, "bilinear")
            flat = ((flat_shares[0] >= FLAT_SHARE) & (moved >= FLAT_SHARE))[0, 0]
            length = spacings[n_last] / max(n / m for n, m in zip(full, shapes[-1]))
            if v is not None:
                v = fill_flat(v, flat, length, info=fill_info)
            v = total(v, shapes[-1])
            filled = float(flat.float().mean())
    elif shapes and (v is not None or initial is not None):  # the levels' increments plus the start
        v = total(v, shapes[-1] if v is None else tuple(v.shape[2:]))
    del f_fine, m_fine, masks_fine
    if v is None:
        v = torch.zeros(1, d, *full, device=dev)
    maps = velocity_maps(v, affine, steps)
    s_end = held[0] if held is not None else blur
    if held_parts is not None:  # pattern_blur: the variance fields' means per direction and axis
        s_end = torch.stack([r.flatten(1).mean(1) for r in s_end])
    maps.blur_variance = s_end.detach().cpu().numpy().copy() if blur_used and s_end is not None else None
    maps.blur_pattern = None if held_parts is None else held_parts.cpu().numpy().copy()
    maps.flat_share = filled
    maps.blur_gate_spread = spread
    maps.blur_gate_detj_rms = detj_rms
    maps.volume_sampling = {"cubic": cubic, "exact_area": exact} if d == 3 else None
    if warp_blur_used:  # (recorded where it ran: the default's settings as before)
        maps.volume_sampling["warp_blur"] = "all" if warp_blur_mode == "all" else True
    maps.flat_fill_info = fill_info
    maps.steps_run = steps_run
    maps.first_gate_reading, maps.first_kept = first_reading, first_kept
    maps.finer_gate_reading, maps.finer_kept = finer_reading, finer_kept
    return maps
