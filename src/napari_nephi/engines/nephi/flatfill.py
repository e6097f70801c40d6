"""Fill the coarse velocity where the images carry no texture (the coarse stage's last step).

Where both images are flat the similarity says nothing about the motion, and the coarse stage's
B-spline there is whatever its optimiser left: the coarsest level fits the surrounding texture
with knots wider than the flat region's depth and extrapolates it inwards (on the issue-13
benchmark's flat disc at 1 % the first level's error inside the disc was 2.84 px, three times that
of no motion at all), and the finer levels only partly undo it. :func:`fill_textureless` replaces
the velocity on the flat voxels of the last coarse grid by the smooth extension of its values
around them that minimises ``||(I / length^2 - Laplacian) v||^2`` (a thin-plate energy with a
membrane term and a pull towards the global map, the posterior mean of a Matern-like prior of
correlation ``length``): it interpolates a flat region enclosed by texture and relaxes towards
the global map over ``length`` away from it. The coarse stage (:func:`.coarse.optimize_velocity`)
fills the grid voxels flat (:func:`flat_share`) in the fixed image and in the moving image carried
through the map with :func:`fill_flat`: relaxing towards the mean of the velocity on the textured
voxels, over the length of its own correlation there (:func:`correlation_length`), at most the last
grid's knot spacing (16 px on 256^2 and 512^2 images; until session 16 the length was the spacing
and the relaxation went towards the global map). Pure extensions of the true field from the disc's
rim (benchmark, 1 / 2 / 4 %) reach
0.85 / 1.08 / 2.92 px (harmonic) and 0.93 / 0.69 / 1.56 px (thin plate) inside it: what the rim
tells is limited, and the harmonic extension wins when the field varies faster than the region is
deep, the thin plate when it is smoother; this energy sits between them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.fft import dctn, idctn, irfftn, rfftn
from scipy.special import k1

from .smoothing import blur_axis_lean

#: Textureless below this local RMS gradient (intensities in [0, 1] per voxel) of both images. Half
#: the benchmark's textureless threshold: the retina's faint texture between 0.005 and 0.01 still
#: carries motion (0.31 px error there, 0.77 without registration), which 0.01 filled over (0.33).
FLAT_GRADIENT = 0.005
#: Gaussian window of the gradient energy, voxels.
WINDOW_SIGMA = 2.0
#: The second test, for noisy images: the image blurred by a Gaussian of ``SMOOTH_SIGMA`` voxels
#: first (white noise's RMS gradient falls to about 0.03 of its standard deviation, 0.0009 at
#: noise 0.03), then flat below ``SMOOTH_GRADIENT``, well under the first test's threshold because
#: the blur also lowers the gradient of real texture: scikit-image's cell, whose faint texture the
#: coarse stage uses, stays 93-95 % textured at noise 0 to 0.03 (1.1 % flat with 0.001, 18 % with
#: 0.002), while the noisy flat disc is found at noise up to 0.03 (0.02: 92 %, 0.03: 89 %).
SMOOTH_SIGMA = 3.0
SMOOTH_GRADIENT = 0.0015
#: A voxel of the coarse grid is filled when at least this share of the image voxels it covers is
#: flat, in the fixed image and in the moving image carried through the map.
FLAT_SHARE = 0.99


def local_texture(image: torch.Tensor) -> torch.Tensor:
    """RMS gradient ``(1, 1, *spatial)`` of ``image`` in a Gaussian window of ``WINDOW_SIGMA`` voxels
    (central differences, edges replicated)."""
    d = image.dim() - 2
    s = image.float()
    energy = torch.zeros_like(s)
    for a in range(d):
        if s.shape[2 + a] > 1:
            energy = energy + torch.gradient(s, dim=2 + a)[0] ** 2
    for a in range(d):
        energy = blur_axis_lean(energy, 2 + a, WINDOW_SIGMA, int(3 * WINDOW_SIGMA))
    return energy.sqrt()


def smoothed(image: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """``image`` ``(1, 1, *spatial)`` blurred by a Gaussian of ``sigma`` voxels (edges replicated)."""
    if sigma is None:  # read at the call (session 40)
        sigma = SMOOTH_SIGMA
    s = image.float()
    for a in range(s.dim() - 2):
        if s.shape[2 + a] > 1:
            s = blur_axis_lean(s, 2 + a, sigma, int(3 * sigma))
    return s


def flat_share(
    image: torch.Tensor,
    shape,
    noisy: bool = False,
    gradient: float | None = None,
    empty: float | None = None,
) -> torch.Tensor:
    """Share ``(1, 1, *shape)`` of the voxels of ``image`` (``(1, 1, *spatial)``, intensities in
    [0, 1]) under each voxel of a ``shape`` grid that are flat: :func:`local_texture` below
    ``gradient`` (None: ``FLAT_GRADIENT``), or, with ``noisy`` (opt-in, engine option
    ``coarse_flat_noisy``), that of the image blurred by ``SMOOTH_SIGMA`` (:func:`smoothed`) below
    ``SMOOTH_GRADIENT``.

    The first test alone finds no flat voxel on a noisy image (noise 0.01 and more). The second
    is opt-in because the blur removes texture finer than about 8 voxels whatever its contrast: a
    disc filled with a sinusoid of wavelength 6 px is flat to it, and filling such a disc took the
    coarse stage's error there from 0.03 to 0.31 px; scikit-image's moon lost 25-40 % in the 24 %
    it called flat (session-16 review). The second
    sees the scale the last coarse grid resolves (its voxels are 2 image voxels at 256^2-512^2),
    where the noise has mostly gone, with a threshold low enough not to take faint texture for
    flat: a version whose threshold rose with the image's estimated noise (twice its gradient
    energy) marked 85 % of scikit-image's cell with noise 0.02 flat and lost 20-27 % of its
    accuracy there (session-15 review): the coarse stage pools faint texture under the noise
    over a knot cell.

    ``empty`` (None: off; predict+refine's :func:`.predict.refine_flat_empty`), with a ``gradient`` under
    ``FLAT_GRADIENT``: a region of the grid flat by ``FLAT_GRADIENT`` of which at least that share is flat
    by ``gradient`` too counts whole (:func:`empty_regions`)."""
    texture = local_texture(image)
    smooth = local_texture(smoothed(image)) < SMOOTH_GRADIENT if noisy else None

    def share(threshold: float) -> torch.Tensor:
        flat = texture < threshold
        if smooth is not None:  # opt-in: it also calls texture finer than ~8 voxels flat (session-16 review)
            flat |= smooth
        return F.interpolate(flat.float(), size=tuple(shape), mode="area")

    low = share(FLAT_GRADIENT if gradient is None else float(gradient))
    if empty is None or gradient is None or float(gradient) >= FLAT_GRADIENT:
        return low
    return empty_regions(low, share(FLAT_GRADIENT), empty)


def empty_regions(low: torch.Tensor, high: torch.Tensor, empty: float) -> torch.Tensor:
    """Flat shares ``(1, 1, *shape)``: ``low`` (by a lowered texture threshold), but ``high`` (by
    ``FLAT_GRADIENT``) on every connected region of the voxels ``high`` calls flat (``>= FLAT_SHARE``,
    face neighbours) of which at least an ``empty`` share is flat by ``low`` too.

    A lowered threshold keeps faint texture out of the fill (the cell's, the camera's sky at 512 px:
    0-49 % of their regions are flat by it), but it also takes a rim off empty background, whose local
    RMS gradient there is the texture next to it seen through the window (``WINDOW_SIGMA``): the fill then
    starts from that rim's velocity, which the coarse stage got from little texture (IHC's empty patches
    at 512 px: 85 % of the region flat by 0.0025, the retina's black surround 98 %; session 30,
    docs/nephi.md)."""
    high_flat = (high >= FLAT_SHARE)[0, 0].cpu().numpy()
    labels, n = ndimage.label(high_flat)
    if n == 0:
        return low
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    low_flat = (low >= FLAT_SHARE)[0, 0].cpu().numpy()
    cores = np.bincount(labels.ravel(), weights=low_flat.ravel().astype(np.float64), minlength=n + 1)
    whole = np.concatenate([[False], cores[1:] >= empty * sizes[1:]])[labels]
    return torch.where(torch.from_numpy(whole).to(low.device)[None, None], torch.maximum(low, high), low)


def _matern_half_lag(d: int) -> float:
    """Lag, in units of the length, at which the correlation of the field whose precision is
    ``(1 / length^2 - L)^2`` falls to one half: ``x K1(x) = 1/2`` in 2D (Matern 1), ``exp(-x)`` in
    3D (Matern 1/2)."""
    if d != 2:
        return math.log(2.0)
    lo, hi = 0.1, 10.0
    for _ in range(60):  # bisection: x K1(x) falls from 1 at 0
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mid * k1(mid) > 0.5 else (lo, mid)
    return 0.5 * (lo + hi)  # 1.2572


def correlation_length(v: torch.Tensor, known: torch.Tensor) -> float | None:
    """The length (voxels of the grid) of the fill's prior whose correlation halves at the lag where
    that of ``v`` ``(1, D, *shape)`` on the ``known`` voxels does (its products at each lag summed
    over components and pairs of known voxels, by FFT with zero padding, averaged over lags of equal
    rounded length); None when it does not halve within half the grid's shortest axis or ``v`` is 0
    there. On the true fields of the issue-13 benchmark (Gaussian correlation of sigma 7.7 / 11.5 /
    15.4 px at 1 / 2 / 4 %) it reads 9-10 / 14-16 / 17-24 px on the textured part, 1.32 sigma as the
    shapes predict; on the coarse stage's velocity 10-11 / 14-17 / 17-22 px."""
    shape = tuple(v.shape[2:])
    axes = tuple(range(len(shape)))
    pad = [2 * n for n in shape]
    reach = min(shape) // 2
    # only lags under ``reach`` matter: keep those of each product (float32, a few grid copies)
    lags = [np.r_[0:reach, p - reach + 1 : p] for p in pad]  # per axis: indices of lags 0..reach-1, -1..
    keep = np.ix_(*lags)

    def lagged(x: np.ndarray) -> np.ndarray:  # sum over pairs at each lag (autocorrelation)
        return irfftn(np.abs(rfftn(x, pad, axes=axes, workers=1)) ** 2, pad, axes=axes, workers=1)[keep]

    m = known.detach().cpu().numpy().astype(np.float32)
    pairs = lagged(m).ravel()
    prod = sum(lagged(v[0, c].detach().cpu().numpy().astype(np.float32) * m) for c in range(v.shape[1]))
    lag2 = sum(
        (np.minimum(i, p - i).astype(np.float64) ** 2).reshape([-1 if b == a else 1 for b in axes])
        for a, (i, p) in enumerate(zip(lags, pad))
    )
    ring = np.rint(np.sqrt(lag2)).astype(np.int64).ravel()
    use = (pairs > 0.5) & (ring < reach)
    num = np.bincount(ring[use], prod.ravel()[use].astype(np.float64), minlength=reach)
    den = np.bincount(ring[use], pairs[use].astype(np.float64), minlength=reach)
    if den[0] <= 0 or num[0] <= 0:
        return None
    profile = num / np.maximum(den, 1e-30) / (num[0] / den[0])
    below = np.nonzero((profile < 0.5) & (den > 0))[0]
    if len(below) == 0:
        return None
    k = int(below[0])
    j = int(np.nonzero(den[:k] > 0)[0][-1])  # the last ring before k with pairs (ring 0 has some)
    half = j + (k - j) * (profile[j] - 0.5) / (profile[j] - profile[k])
    return float(half / _matern_half_lag(len(shape)))


def fill_flat(v: torch.Tensor, flat: torch.Tensor, spacing: float, info: dict | None = None) -> torch.Tensor:
    """The coarse stage's fill: :func:`fill_textureless` of ``v`` on the ``flat`` voxels, relaxing
    towards the mean of ``v`` on the other voxels (not towards the global map), with the length
    :func:`correlation_length` measured on those voxels around that mean, at most ``spacing`` (the
    last grid's knot spacing, in its voxels; also when no length is measured) and at least half of it
    (a rough field reads under a voxel, and a fill that drops within one voxel risks folds).
    Uncapped, the longer
    length measured at 4 % extrapolated the camera's open sky further (issue-13 benchmark, set 10:
    1.37 -> 1.59 px there); the mean instead of the global map brought set 20's sky at 4 % from
    2.02 back to 1.87 (session 15's loss). ``info`` receives the solver's keys and ``length`` (used)
    and ``measured_length`` (None: not measured)."""
    if not bool(flat.any()) or bool(flat.all()):
        return v
    known = ~flat.bool()
    k = known.to(v.dtype)
    mean = (v * k).sum(dim=tuple(range(2, v.dim())), keepdim=True) / k.sum()
    measured = correlation_length(v - mean, known)
    length = spacing if measured is None else min(max(measured, 0.5 * spacing), spacing)
    if info is not None:
        info.update(length=round(length, 3), measured_length=None if measured is None else round(measured, 3))
    return fill_textureless(v - mean, flat, length, info=info) + mean


def _laplacian(t: torch.Tensor) -> torch.Tensor:
    """The grid Laplacian of ``t`` ``(C, *shape)`` (2d + 1 points; reflecting borders, as if each
    voxel beyond the border repeated its neighbour inside)."""
    out = torch.zeros_like(t)
    for a in range(1, t.dim()):
        if t.shape[a] < 2:
            continue
        diff = torch.diff(t, dim=a)
        out.narrow(a, 0, t.shape[a] - 1).add_(diff)
        out.narrow(a, 1, t.shape[a] - 1).sub_(diff)
    return out


def _spectrum(shape, kappa2: float) -> np.ndarray:
    """Eigenvalues of ``(kappa2 - L)^2`` for the reflecting-border Laplacian, in the DCT-II basis."""
    total = np.full(shape, kappa2)
    for a, n in enumerate(shape):
        lam = 2 - 2 * np.cos(np.pi * np.arange(n) / n)
        total = total + lam.reshape([-1 if b == a else 1 for b in range(len(shape))])
    return total**2


def fill_textureless(
    v: torch.Tensor,
    flat: torch.Tensor,
    length: float,
    tolerance: float = 1e-5,
    max_steps: int = 500,
    info: dict | None = None,
) -> torch.Tensor:
    """``v`` ``(1, D, *shape)`` with its values on the ``flat`` voxels replaced by the minimiser of
    ``||(I / length^2 - L) v||^2`` (``L`` the grid Laplacian with reflecting borders, ``length`` in
    voxels of the grid) that keeps every other voxel; ``v`` itself when nothing or everything is flat.

    Conjugate gradients on the flat voxels, matrix-free, preconditioned by the inverse of the same
    operator on the whole grid (diagonal in the cosine basis: 46-78 steps on 128^2-342^2 and 50^3
    grids half flat), until the residual falls below ``tolerance`` of the right-hand side (at most
    ``max_steps``); float32 on the CPU (a few copies of ``v``). ``info``, when given, receives
    ``steps`` (CG steps taken) and ``converged`` (False when ``max_steps`` ran out first: the result
    is then still closer to the minimiser than ``v`` in the operator's norm, CG descends it).
    """
    if not bool(flat.any()) or bool(flat.all()):
        return v
    kappa2 = 1.0 / float(length) ** 2
    shape = tuple(v.shape[2:])
    axes = tuple(range(1, len(shape) + 1))
    mask = flat.cpu().numpy()[None].astype(np.float32)  # (1, *shape), broadcast over the components
    inverse = (1.0 / _spectrum(shape, kappa2)).astype(np.float32)

    def operator(x: np.ndarray) -> np.ndarray:  # mask B^T B x = mask B^2 x, B = kappa2 - L (L symmetric)
        t = torch.from_numpy(x)
        b = kappa2 * t - _laplacian(t)
        lb = _laplacian(b)
        return (b.mul_(kappa2).sub_(lb)).numpy() * mask

    def precondition(r: np.ndarray) -> np.ndarray:
        z = dctn(r, axes=axes, norm="ortho", workers=1)
        z *= inverse
        z = idctn(z, axes=axes, norm="ortho", workers=1)
        z *= mask
        return z

    def dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        flat_a, flat_b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        return np.einsum("ci,ci->c", flat_a, flat_b, dtype=np.float64).reshape(-1, *[1] * len(shape))

    x0 = v[0].detach().cpu().float().numpy()
    known = x0 * (1 - mask)
    r = -operator(known)  # the right-hand side, then the residual
    stop = tolerance**2 * np.maximum(dot(r, r), 1e-30)
    x = x0 * mask
    r -= operator(x)
    z = precondition(r)
    p = z.copy()
    rz = dot(r, z)
    steps, converged = 0, False
    while True:
        if (dot(r, r) <= stop).all():
            converged = True
            break
        if steps == max_steps:
            break
        steps += 1
        ap = operator(p)
        alpha = (rz / np.maximum(dot(p, ap), 1e-30)).astype(np.float32)
        x += alpha * p
        r -= alpha * ap
        z = precondition(r)
        rz_new = dot(r, z)
        p *= (rz_new / np.maximum(rz, 1e-30)).astype(np.float32)
        p += z
        rz = rz_new
    if info is not None:
        info.update(steps=steps, converged=converged)
    out = torch.from_numpy(known + x * mask).to(v.dtype)
    return out.to(v.device)[None]
