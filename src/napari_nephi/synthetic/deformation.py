"""Random smooth diffeomorphic displacement fields with a known bound: ground truth for tests.

A random stationary velocity field ``v`` (Gaussian-filtered white noise, optionally tapered to
zero at the image border) is integrated by scaling and squaring, ``phi = exp(v)``. The flow of a
smooth velocity field is a diffeomorphism, and every trajectory has length at most ``max |v|``, so
``|phi(x) - x| <= max |v|``. ``exp(-v)`` is the inverse; the returned field is polished (Newton
steps) into the exact voxel-wise inverse of ``exp(-v)``, so the pair inverts to about 1e-4 voxel.
The discrete result is checked with :func:`napari_nephi.core.jacobian.jacobian_determinant`
(``det > 0`` everywhere) before it is returned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..core.errors import InputError
from ..core.grid import check_spacing
from ..core.jacobian import jacobian_determinant

__all__ = ["random_smooth_displacement", "integrate_velocity"]


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shp = tuple(int(s) for s in shape)
    except TypeError as exc:
        raise InputError(f"shape must be a sequence of 2 or 3 integers, got {shape!r}.") from exc
    if len(shp) not in (2, 3):
        raise InputError(f"shape must have 2 or 3 axes, (y, x) or (z, y, x); got {shp}.")
    if min(shp) < 4:
        raise InputError(f"Every axis of shape needs at least 4 voxels, got {shp}.")
    return shp


def _smooth_noise(shape, sigma_vox, rng) -> np.ndarray:
    """Unit-scale Gaussian random field of ``shape`` with correlation length ``sigma_vox``.

    Noise is drawn on a coarse grid (about 4 coarse voxels per sigma), filtered there and
    interpolated with cubic splines, so large sigmas stay cheap.
    """
    sigma_vox = np.asarray(sigma_vox, dtype=np.float64)
    factor = np.maximum(1.0, sigma_vox / 4.0)
    coarse = tuple(int(math.ceil((n - 1) / f)) + 1 for n, f in zip(shape, factor))
    noise = rng.standard_normal(coarse)
    noise = ndimage.gaussian_filter(noise, sigma_vox / factor, mode="reflect")
    if coarse == tuple(shape):
        return noise
    axes = [np.arange(n, dtype=np.float64) * (c - 1) / max(n - 1, 1) for n, c in zip(shape, coarse)]
    coords = np.meshgrid(*axes, indexing="ij")
    return ndimage.map_coordinates(noise, coords, order=3, mode="reflect")


def _taper(shape, ramp_vox) -> np.ndarray:
    """Smooth window, 1 inside and 0 on the outermost voxels, rising over ``ramp_vox``."""
    win = np.ones(shape, dtype=np.float64)
    for axis, (n, ramp) in enumerate(zip(shape, ramp_vox)):
        pos = np.arange(n, dtype=np.float64)
        dist = np.minimum(pos, n - 1 - pos)
        t = np.clip(dist / max(ramp, 1e-6), 0.0, 1.0)
        prof = t * t * t * (t * (6 * t - 15) + 10)  # smootherstep, C2
        view = [1] * len(shape)
        view[axis] = n
        win = win * prof.reshape(view)
    return win


class _Sampler:
    """Samples a ``(C, *shape)`` field at ``x + u(x)`` for every voxel ``x``.

    Linear interpolation with border extension. Arithmetic stays in numpy; only the
    interpolation itself is torch's ``grid_sample`` (faster than scipy's ``map_coordinates``).
    """

    def __init__(self, shape):
        self.shape = tuple(shape)
        d = len(self.shape)
        half = np.asarray([(n - 1) / 2.0 for n in self.shape], dtype=np.float32)
        # grid_sample wants normalised coordinates, last axis in reversed (x, y[, z]) order
        self.scale = (1.0 / half).reshape((-1,) + (1,) * d)
        self.base = np.indices(self.shape, dtype=np.float32) * self.scale - 1.0

    def __call__(self, field: np.ndarray, u: np.ndarray) -> np.ndarray:
        g = np.clip(self.base + u * self.scale, -1.0, 1.0)
        g = np.ascontiguousarray(np.moveaxis(g[::-1], 0, -1))[None]
        with torch.no_grad():
            out = F.grid_sample(
                torch.from_numpy(np.ascontiguousarray(field, dtype=np.float32))[None],
                torch.from_numpy(g),
                mode="bilinear",
                padding_mode="border",
                align_corners=True,
            )
        return out[0].numpy()


def _max_norm(u: np.ndarray) -> float:
    return float(np.sqrt(np.einsum("i...,i...->...", u, u).max()))


def integrate_velocity(velocity, steps: int | None = None) -> np.ndarray:
    """``exp(v) - id`` of a stationary velocity field ``(D, *shape)`` in voxels, by squaring.

    ``u_0 = v / 2**steps``; ``u_{k+1}(x) = u_k(x) + u_k(x + u_k(x))`` with linear interpolation
    and border extension. Linear interpolation takes convex combinations, so ``max |u| <= max |v|``
    holds exactly in every step.
    """
    v = np.asarray(velocity, dtype=np.float32)
    shape = tuple(v.shape[1:])
    if steps is None:
        vmax = _max_norm(v)
        steps = max(4, int(math.ceil(math.log2(max(vmax, 1e-6) / 0.25))))
    u = v / np.float32(2**steps)
    sampler = _Sampler(shape)
    for _ in range(steps):
        u = u + sampler(u, u)
    return u.astype(np.float32, copy=False)


def _norm(field: np.ndarray, spacing) -> np.ndarray:
    sp = np.asarray(spacing, dtype=np.float64).reshape((-1,) + (1,) * (field.ndim - 1))
    return np.sqrt(((field.astype(np.float64) * sp) ** 2).sum(axis=0))


def random_smooth_displacement(
    shape: Sequence[int],
    max_displacement: float,
    smoothness: float,
    seed: int | None = 0,
    spacing: Sequence[float] | None = None,
    *,
    zero_boundary: bool = True,
    return_inverse: bool = False,
):
    """A random smooth diffeomorphic displacement ``(D, *shape)`` float32 in voxel units.

    Parameters
    ----------
    shape
        Grid ``(y, x)`` or ``(z, y, x)``.
    max_displacement
        Upper bound on the length of every displacement vector, in physical units (voxels when
        ``spacing`` is None). The field typically reaches 95-100 % of it, never more.
    smoothness
        Correlation length (standard deviation of the Gaussian filter applied to the noise), in
        the same units. Larger is smoother; ``max_displacement`` up to about ``smoothness`` is
        safe, much larger ratios fold and are refused.
    seed
        Seed of :func:`numpy.random.default_rng`; the same seed gives the same field.
    spacing
        Physical voxel spacing, one per axis; the field is still returned in voxels of the grid.
    zero_boundary
        Taper the velocity to 0 at the border (over about two ``smoothness``), so the field
        vanishes on the outermost voxels and no content is pushed out of the grid.
    return_inverse
        Also return the inverse field ``u_inverse = exp(-v) - id`` (same shape).

    Returns
    -------
    ``u`` or ``(u, u_inverse)``. ``x -> x + u(x)`` is a diffeomorphism: its Jacobian determinant
    (central differences) is positive on every voxel, and ``|u(x)|`` (physical) never exceeds
    ``max_displacement``. As a pull-back transform (package convention) ``DisplacementTransform(u)
    .warp(image)`` samples ``image(x + u(x))``. ``u_inverse`` undoes it:
    ``x + u(x) + u_inverse(x + u(x)) = x`` on every voxel (to about 1e-4 voxel), so
    ``DisplacementTransform(u).warp(DisplacementTransform(u_inverse).warp(image)) ~= image``.
    ``u`` is the same with or without ``return_inverse``.

    Raises
    ------
    InputError
        Bad arguments, or a field that would fold on this grid (lower ``max_displacement`` or
        raise ``smoothness``).
    """
    shp = _check_shape(shape)
    d = len(shp)
    sp = np.asarray(check_spacing(spacing, d), dtype=np.float64)
    max_displacement = float(max_displacement)
    smoothness = float(smoothness)
    if not (np.isfinite(max_displacement) and max_displacement >= 0):
        raise InputError(f"max_displacement must be a finite number >= 0, got {max_displacement}.")
    if not (np.isfinite(smoothness) and smoothness > 0):
        raise InputError(f"smoothness must be a finite number > 0, got {smoothness}.")
    if max_displacement == 0:
        zero = np.zeros((d, *shp), dtype=np.float32)
        return (zero, zero.copy()) if return_inverse else zero

    rng = np.random.default_rng(seed)
    sigma_vox = smoothness / sp
    v = np.stack([_smooth_noise(shp, sigma_vox, rng) for _ in range(d)])
    if zero_boundary:
        ramp = np.minimum(2.0 * sigma_vox, (np.asarray(shp) - 1) / 3.0)
        v = v * _taper(shp, ramp)[None]
    vnorm = _norm(v, sp).max()
    if vnorm <= 0:
        raise InputError("The grid is too small for a smooth field with this smoothness.")
    v_unit = (v / vnorm / sp.reshape((-1,) + (1,) * d)).astype(np.float32)  # max physical norm 1

    # Scale the velocity until exp(v) reaches 95-100 % of the bound (|exp(v)| <= |v| always).
    amp = max_displacement
    for _ in range(8):
        u = integrate_velocity(v_unit * amp)
        reach = float(_norm(u, sp).max())
        if reach >= 0.97 * max_displacement or reach <= 0:
            break
        amp *= min(4.0, 0.985 * max_displacement / reach)
    # exp(-v) is the inverse up to about 0.1 voxel; polish u into the exact grid-wise inverse of
    # it, u(x) = -u_inv(x + u(x)), so that warping by u_inv then by u is the identity.
    u_inv = integrate_velocity(-v_unit * amp)
    u = _solve_inverse(u_inv, u)
    reach = float(_norm(u, sp).max())
    if reach > max_displacement:  # |u(x)| = |u_inv(x + u(x))| <= max |v|; float32 rounding only
        u = u * np.float32(max_displacement / reach * (1 - 1e-6))
    det = jacobian_determinant(u)
    if not np.all(det > 0):
        raise InputError(
            f"A random field with max_displacement={max_displacement} and smoothness={smoothness} "
            "folds on this grid; lower max_displacement or raise smoothness."
        )
    return (u, u_inv) if return_inverse else u


def _solve_inverse(w: np.ndarray, start: np.ndarray, iterations: int = 12, tol: float = 1e-4) -> np.ndarray:
    """Solve ``u(x) + w(x + u(x)) = 0`` on every grid voxel by damped Newton steps from ``start``.

    Then ``x + u(x) + w(x + u(x)) = x``: the map of ``u`` followed by the map of ``w`` is the
    identity at every voxel. The Jacobian ``I + grad w`` (central differences, interpolated) is
    invertible because ``w`` does not fold; a voxel whose residual would grow takes half a step,
    then none, so the result is never worse than ``start``.
    """
    w = np.asarray(w, dtype=np.float32)
    d = w.shape[0]
    shape = tuple(w.shape[1:])
    sampler = _Sampler(shape)
    grad = np.stack([np.stack(np.gradient(w[i]), axis=0) for i in range(d)])  # (d, d, *shape)
    both = np.concatenate([w, grad.reshape(d * d, *shape)])
    eye = np.eye(d, dtype=np.float64)

    def evaluate(u):
        vals = sampler(both, u)
        res = u + vals[:d]
        return res, vals[d:], np.einsum("i...,i...->...", res, res)

    u = np.asarray(start, dtype=np.float32).copy()
    res, g, r2 = evaluate(u)
    for _ in range(iterations):
        if float(r2.max()) < tol * tol:
            break
        jac = np.moveaxis(g.reshape(d, d, -1), -1, 0).astype(np.float64) + eye  # (N, d, d)
        singular = np.abs(np.linalg.det(jac)) < 1e-6  # only where w folds; the caller refuses it
        jac[singular] = eye
        rhs = np.moveaxis(res.reshape(d, -1), -1, 0).astype(np.float64)[..., None]
        step = np.moveaxis(np.linalg.solve(jac, rhs)[..., 0], 0, -1).reshape(u.shape).astype(np.float32)
        best_u, best_res, best_g, best_r2 = u, res, g, r2
        for frac in (1.0, 0.5):
            cand = u - np.float32(frac) * step
            c_res, c_g, c_r2 = evaluate(cand)
            better = c_r2 < best_r2
            if np.any(better):
                best_u = np.where(better, cand, best_u)
                best_res = np.where(better, c_res, best_res)
                best_g = np.where(better, c_g, best_g)
                best_r2 = np.where(better, c_r2, best_r2)
        if not np.any(best_r2 < r2):
            break
        u, res, g, r2 = best_u, best_res, best_g, best_r2
    return u
