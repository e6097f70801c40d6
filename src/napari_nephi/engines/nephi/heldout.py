"""Held-out check of the coarse stage's levels on noisy pairs (engine option ``noise_heldout``, session 21).

Under noise the coarse stage's finer knots fit the noise: small smooth deformations ended worse than not
registering them (``benchmarks/nephi_large.py``, 256 px, noise 0.05: camera at 0.25 % of the size 0.475 px
against 0.19 before registering) and a pure shift kept a field whose Jacobian determinant ranged
0.80-1.27. What the data support is decided by cross-validation on a split of the pixels:

* the voxels are split like a checkerboard (:func:`split_mask`); a first coarse stage is fitted to images
  that hold only the "fit" half (:func:`fill_from`: every other voxel is the mean of its face neighbours,
  which all belong to the fit half), filtered as the engine compares them;
* each candidate, the global map alone and the map after each coarse level of that fit, is scored on the
  other half (:func:`heldout_scores`): NCC of each image's raw held-out voxels with the other image,
  filtered, warped through the candidate. White noise on the held-out voxels (the noise estimate's
  model) is independent of everything the fit saw, so fitting the noise gains nothing there; only motion
  the data support does. The raw held-out voxels' noise variance is the same for every candidate and the
  warped image is smooth (the filtered one, whose interpolation keeps nearly all of its variance at any
  sub-voxel position), so the half-voxel bias of comparing two noisy images (docs/nephi.md, "Noise")
  rewards no candidate either. NCC is linear in the held-out noise, so the standard error of a
  difference of scores follows from the noise estimate;
* a level is kept only if it beats the best coarser candidate by more than :data:`Z` standard errors over
  the whole image; then, near each voxel (a Gaussian window of the level's knot width,
  :data:`KNOT_WIDTH`), where its held-out gain there is positive (:data:`Z_LOCAL`): its increment is
  multiplied by a smooth gate, 1 where it passed, 0 where it did not (:func:`level_gates`), and the engine
  runs the coarse stage on all voxels with those gates (none kept anywhere: the global map alone, and no
  neural stage).

No constant is fitted to a case: ``Z`` is the usual two standard errors (whether the data hold the level
at all), ``Z_LOCAL`` the sign of the gain's estimate (which of two estimates is better in a region), the
window a B-spline's width.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .coarse import DenseMaps, in_frame, normalized_grid


def split_mask(shape) -> np.ndarray:
    """Bool, ``shape``: the checkerboard's "fit" half (voxels whose indices sum to an even number);
    every face neighbour of a held-out voxel is in it."""
    return (np.indices(shape).sum(0) % 2) == 0


def fill_from(image: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``image`` (float32) with every voxel outside ``keep`` replaced by the mean of its face neighbours
    in ``keep`` (itself where it has none): an image that depends on the ``keep`` voxels only."""
    x = np.asarray(image, np.float64)
    k = np.asarray(keep, bool)
    total, count = np.zeros_like(x), np.zeros_like(x)
    xk, kf = np.where(k, x, 0.0), k.astype(np.float64)
    for axis in range(x.ndim):
        n = x.shape[axis]
        if n < 2:
            continue
        lo = [slice(None)] * x.ndim
        hi = [slice(None)] * x.ndim
        lo[axis], hi[axis] = slice(0, n - 1), slice(1, n)
        lo, hi = tuple(lo), tuple(hi)
        total[lo] += xk[hi]  # the neighbour after
        count[lo] += kf[hi]
        total[hi] += xk[lo]  # the neighbour before
        count[hi] += kf[lo]
    filled = np.where(count > 0, total / np.maximum(count, 1), x)
    return np.where(k, x, filled).astype(np.float32)


def _warp_full(image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``image`` ``(1, 1, *S)`` sampled at normalised ``points`` ``(1, *S, D)`` (numpy axis order):
    bicubic in 2D, trilinear in 3D, as the coarse stage warps."""
    mode = "bicubic" if image.dim() == 4 else "bilinear"
    return F.grid_sample(image, points.flip(-1), mode=mode, padding_mode="border", align_corners=True)


#: A finer candidate replaces the best coarser one only where its held-out score is higher by more than
#: this many standard errors of the difference (the spread the held-out voxels' own noise gives it,
#: :func:`heldout_scores`): two, the usual convention for a one-sided test (about 2 % false
#: acceptances where the finer map is no better), not a value fitted to any case.
Z = 2.0


#: Near each voxel a level that passed :data:`Z` over the whole image is kept where its held-out gain
#: over the coarser candidate is positive (more than this many standard errors): where the level exists
#: at all, the better of the two estimates there (the sign of an unbiased estimate of the gain). Two
#: standard errors here as well (the first version) dropped real motion where texture is weak: field set
#: 166, noise 0.05, retina at 2 % 0.813 -> 0.919 px against 0.834 with 0 (docs/nephi.md).
Z_LOCAL = 0.0

#: Width (standard deviation) of the Gaussian window of the local test and of the gate's smoothing, in
#: knot spacings of the level: a cubic B-spline's own (its variance is a third of the spacing squared),
#: so the test sees about what one control point moves.
KNOT_WIDTH = 1 / math.sqrt(3)


def _unit_and_norm(x: torch.Tensor, where: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``x`` (float32, overwritten) centred and scaled to unit norm over ``where``, 0 elsewhere (the
    mean and the norm summed in float64), and the centred norm it was divided by."""
    count = int(where.sum())
    mean = float(x.masked_fill(~where, 0.0).sum(dtype=torch.float64)) / max(count, 1)
    x.sub_(mean).masked_fill_(~where, 0.0)
    norm = float(x.square().sum(dtype=torch.float64).sqrt())
    if norm > 0:
        x /= norm
    return x, norm


#: Points per slab where :func:`heldout_scores` maps and warps the image grid: the maps' interpolation
#: holds about a hundred bytes a point in temporaries, so the whole grid at once was the check's peak
#: (review 2 of session 21, B6).
SLAB_POINTS = 1 << 16


def _warped_slabwise(image: torch.Tensor, through, grid: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """``image`` ``(1, 1, *S)`` warped through the map ``through`` (normalised points ``(1, N, D)`` ->
    points) at every voxel of ``grid`` ``(1, N, D)``, float32 ``(*S)``, a slab of :data:`SLAB_POINTS`
    points at a time; ``inside`` (bool ``(N,)``) is cleared where a mapped point leaves the frame."""
    out = torch.empty(grid.shape[1], dtype=torch.float32, device=grid.device)
    d = grid.shape[-1]
    for a in range(0, grid.shape[1], SLAB_POINTS):
        pts = through(grid[:, a : a + SLAB_POINTS])
        inside[a : a + SLAB_POINTS] &= in_frame(pts)[0]
        out[a : a + SLAB_POINTS] = _warp_full(image, pts.reshape(1, 1, -1, d)).reshape(-1)
    return out.reshape(image.shape[2:])


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """Sum of ``a * b`` (float32 images), accumulated in float64."""
    return float((a * b).sum(dtype=torch.float64))


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> float:
    """Sum of ``(a - b)^2`` (float32 images), accumulated in float64."""
    return float((a - b).square().sum(dtype=torch.float64))


class Heldout:
    """Held-out comparison of candidate maps (:func:`heldout_scores`).

    ``units[k]`` holds candidate ``k``'s warped images (forward, backward) and ``raw`` the raw images,
    each centred and scaled to unit norm over its held-out voxels (0 elsewhere; float32: 8 bytes a
    pixel per candidate and for the raw pair); ``noise[d]`` is the noise's standard deviation in those
    units (``sigma / |raw - mean|``) per direction. :meth:`release` frees the images once the gates are
    made; the scores and standard errors stay.
    """

    def __init__(self, raw, units, noise):
        self.raw, self.units, self.noise = raw, units, noise
        n = len(units)
        #: score of each candidate: the mean over the two directions of NCC with the raw image
        self.scores = [0.5 * sum(_dot(r, a) for r, a in zip(raw, u)) for u in units]
        #: standard error of score i - score j (the held-out voxels' noise)
        self.se = np.zeros((n, n))
        for i in range(n):
            for j in range(i):
                var = sum(nz**2 * _sq_dist(a, b) for nz, a, b in zip(noise, units[i], units[j]))
                self.se[i, j] = self.se[j, i] = 0.5 * var**0.5

    def release(self) -> None:
        """Free the per-voxel images (:meth:`local_z` needs them); ``scores`` and ``se`` stay."""
        self.raw = self.units = None

    def local_z(self, i: int, j: int, sigma: float) -> np.ndarray:
        """Candidate ``i`` against ``j`` near every voxel: the score difference's terms summed with a
        Gaussian weight of ``sigma`` voxels around it, over their standard error (same weights; the
        squared weights are a Gaussian of ``sigma / sqrt(2)`` scaled by ``(4 pi sigma^2)^(-D/2)``); 0
        where no held-out voxel is near. Float32 images, filtered in place."""
        gain = var = None
        for r, a, b, nz in zip(self.raw, self.units[i], self.units[j], self.noise):
            diff = (a - b).cpu().numpy()
            d = diff.ndim
            term = r.cpu().numpy() * diff
            ndimage.gaussian_filter(term, sigma, output=term)
            term *= 0.5
            gain = term if gain is None else np.add(gain, term, out=gain)
            np.square(diff, out=diff)
            ndimage.gaussian_filter(diff, sigma / math.sqrt(2), output=diff)
            diff *= 0.25 * nz**2 * (4 * math.pi * sigma**2) ** (-d / 2)
            var = diff if var is None else np.add(var, diff, out=var)
            del term, diff
        positive = var > 0
        np.sqrt(var, out=var)
        return np.divide(gain, var, out=np.zeros_like(gain), where=positive)


def heldout_scores(
    fixed_raw: torch.Tensor,
    moving_raw: torch.Tensor,
    fixed_cmp: torch.Tensor,
    moving_cmp: torch.Tensor,
    sigmas: tuple[float, float],
    candidates: list[DenseMaps],
    heldout: torch.Tensor,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
) -> Heldout | None:
    """Held-out scores of the candidate maps and the standard errors of their differences.

    A candidate's score is the mean of NCC(raw fixed, moving as compared warped forward) and NCC(raw
    moving, fixed as compared warped backward), each over the ``heldout`` voxels (bool ``(*S)``) that
    every candidate maps inside the other image's frame (and inside the image's own mask, where given).
    Images ``(1, 1, *S)`` on one grid (raw: normalised, unfiltered); maps as the coarse stage returns
    them. The standard error of candidate ``i``'s score minus ``j``'s is the spread that white noise of
    standard deviations ``sigmas`` (fixed, moving) on the raw held-out voxels gives the difference: NCC
    is linear in that noise, ``sum(n a) / |f|`` with ``a`` the warped image centred and scaled to unit
    norm, so the difference's variance is ``sigma^2 |a_i - a_j|^2 / |f|^2`` per direction, a quarter of
    their sum for the mean. None where fewer than 16 held-out voxels remain in either direction.
    """
    shape = tuple(fixed_raw.shape[2:])
    with torch.no_grad():
        grid = normalized_grid(shape, fixed_raw.device).reshape(1, -1, len(shape))
        inside_f, inside_b = heldout.clone().reshape(-1), heldout.clone().reshape(-1)
        warped = [  # float32, slab by slab (review 2 of session 21, B6)
            (
                _warped_slabwise(moving_cmp, maps.forward, grid, inside_f),
                _warped_slabwise(fixed_cmp, maps.backward, grid, inside_b),
            )
            for maps in candidates
        ]
        del grid
        inside_f, inside_b = inside_f.reshape(shape), inside_b.reshape(shape)
        if fixed_mask is not None:
            inside_f &= fixed_mask[0, 0] > 0.5
        if moving_mask is not None:
            inside_b &= moving_mask[0, 0] > 0.5
        if int(inside_f.sum()) < 16 or int(inside_b.sum()) < 16:
            return None
        where = (inside_f, inside_b)
        raw, norms = zip(
            *(_unit_and_norm(x[0, 0].float().clone(), w) for x, w in zip((fixed_raw, moving_raw), where))
        )
        noise = [sig / max(nrm, 1e-12) for sig, nrm in zip(sigmas, norms)]
        units = [tuple(_unit_and_norm(x, w)[0] for x, w in zip(pair, where)) for pair in warped]  # in place
        return Heldout(raw, units, noise)


def level_gates(
    check: Heldout, spacings: list[float], z: float | None = None, z_local: float | None = None
) -> tuple[list[np.ndarray | None], list[int]]:
    """Where each coarse level is kept: ``(gates, compared)``, one entry per level (finer in turn).

    A level is a candidate where it beats the best coarser candidate by more than ``z`` standard errors
    of the difference (:attr:`Heldout.se`) over the whole image; its gate
    is then 1 where its held-out gain over the best coarser candidate, summed with a Gaussian weight of
    the level's knot width (:meth:`Heldout.local_z`), exceeds ``z_local`` standard errors, 0 elsewhere,
    smoothed by the same Gaussian and at most the compared candidate's gate (a finer level only where
    the coarser one it builds on holds). ``None``: kept everywhere (the test passed at every voxel);
    an array of zeros: not kept. ``compared[k]`` is the candidate level ``k + 1`` was compared with
    (0: the global map). ``z`` and ``z_local`` default to :data:`Z` and :data:`Z_LOCAL`, read at the
    call (so a test can change the module's values)."""
    z = Z if z is None else z
    z_local = Z_LOCAL if z_local is None else z_local
    gates: list[np.ndarray | None] = []
    compared: list[int] = []
    best = 0
    shape = check.raw[0].shape
    for k in range(1, len(check.scores)):
        compared.append(best)
        if check.scores[k] - check.scores[best] <= z * check.se[k, best]:
            gates.append(np.zeros(shape, np.float32))
            continue
        width = spacings[k - 1] * KNOT_WIDTH
        passed = check.local_z(k, best, width) > z_local
        gate = None if passed.all() else ndimage.gaussian_filter(passed.astype(np.float32), width)
        if best > 0 and gates[best - 1] is not None:
            gate = gates[best - 1] if gate is None else np.minimum(gate, gates[best - 1])
        gates.append(gate)
        best = k
    return gates, compared
