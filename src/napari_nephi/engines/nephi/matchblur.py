"""Matched blur for the coarse stage, corrected for noise (:func:`.coarse.optimize_velocity`).

A resampled moving image is blurrier than the fixed one; the coarse stage learns per axis a 3-tap
blur ``[s/2, 1 - s, s/2]`` (variance ``s``) of the sharper image (:func:`blur_pair`) so the velocity
does not fit that blur. Blurring also removes noise, which raises any similarity by itself: learned
from the similarity alone, ``s`` grew to its bound on noisy pairs that were equally sharp. The
similarity here (:func:`matched_similarity`) adds back the noise variance that the blur removed, a
white-noise variance per image estimated by :func:`noise_variance` (Immerkaer's operator, median
form), so only a blur that matches the signal is rewarded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...core.similarity import EPS, lncc_map
from .noise import second_difference_product


def _second_difference(t: torch.Tensor, axis: int) -> torch.Tensor:
    """``t[i-1] - 2 t[i] + t[i+1]`` along ``axis`` (edges replicated)."""
    n = t.shape[axis]
    if n < 2:
        return torch.zeros_like(t)
    prev = torch.cat([t.narrow(axis, 0, 1), t.narrow(axis, 0, n - 1)], axis)
    nxt = torch.cat([t.narrow(axis, 1, n - 1), t.narrow(axis, n - 1, 1)], axis)
    return prev - 2 * t + nxt


def blur(t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``t`` (``(B, C, *spatial)``) blurred along each spatial axis ``i`` by ``[r/2, 1 - r, r/2]``."""
    for i in range(r.shape[0]):
        t = t + 0.5 * r[i] * _second_difference(t, 2 + i)
    return t


def blur_pair(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``b`` (``(1, 1, *spatial)``) with, along each spatial axis ``i``, a 3-tap blur of
    variance ``s[i]`` on ``a`` where ``s[i] > 0`` or ``-s[i]`` on ``b`` where ``s[i] < 0``: the
    sharper image blurred to the other's blur."""
    return blur(a, torch.relu(s)), blur(b, torch.relu(-s))


@torch.no_grad()
def noise_variance(t: torch.Tensor) -> float:
    """Variance of white noise in ``t`` (``(1, 1, *spatial)``), Immerkaer's estimator in median form.

    The product of second differences along every axis (2D: Immerkaer's 3 x 3 operator) cancels
    signals that are linear along any axis; on white noise of variance ``v`` its output has variance
    ``6^d v``. The median of its magnitude (``0.6745`` standard deviations for Gaussian noise) is
    robust to the edges and texture that leak through. Voxels whose 3^d neighbourhood is constant
    (a saturated or zero-padded background) are left out: they carry no noise, and where they cover
    half the image they would make the median 0 (session-14 review: noisy tissue on a flat canvas).
    Measured on the issue-13 benchmark images at 256 px (intensities in [0, 1]): standard deviation
    0.003 on the camera, 0.0025 on the retina; with added noise of 0.02 / 0.05: 0.024 / 0.053 and
    0.021 / 0.050. Fine texture reads as noise (gravel 0.028, IHC 0.018).
    """
    x = t.float()
    d = x.dim() - 2
    if any(n < 3 for n in x.shape[2:]):
        return 0.0
    pool = F.max_pool2d if d == 2 else F.max_pool3d
    varying = (pool(x, 3, stride=1) + pool(-x, 3, stride=1)) > 0  # max - min over each 3^d block
    r = second_difference_product(x).abs()[varying]
    if r.numel() == 0:
        return 0.0
    sigma = float(r.median()) / (0.6745 * 6 ** (d / 2))
    return sigma * sigma


def removed_noise(s: torch.Tensor, variance: float) -> torch.Tensor:
    """Variance of white noise (``variance``) that :func:`blur_pair` removes from the image it blurs
    where ``s > 0``: each axis's kernel keeps ``1 - 2 s + 1.5 s^2`` of it."""
    r = torch.relu(s)
    return variance * (1 - torch.prod(1 - 2 * r + 1.5 * r * r))


def removed_warped_noise(s: torch.Tensor, variance: float, probe: torch.Tensor) -> torch.Tensor:
    """The same for the warped image, blurred where ``s < 0``: its noise, white of ``variance``
    before the warp, was smoothed by the warp's interpolation (by how much depends on the sub-voxel
    shift), so what the blur removes is measured on ``probe``, unit white noise warped the same way
    (over the whole grid: with masks the correction is the whole image's)."""
    return variance * (probe.var() - blur(probe, torch.relu(-s)).var())


def matched_similarity(
    name: str,
    a: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor | None,
    add_a: torch.Tensor,
    add_b: torch.Tensor,
) -> torch.Tensor:
    """The coarse stage's similarity loss of ``a`` and ``b`` (weights ``w`` in [0, 1] or None) with
    the noise variances ``add_a`` and ``add_b`` that their blur removed added back to their
    variances (NCC, local NCC) or to the squared difference (MSE); with zeros it is the plain one."""
    if w is not None:
        w = w / w.max().clamp_min(1e-12)

    def wsum(x):  # no full-size weight tensor when unweighted (memory)
        return x.sum() if w is None else (w * x).sum()

    total = torch.tensor(float(a.numel()), device=a.device) if w is None else w.sum().clamp_min(1e-12)
    if name == "mse":
        return wsum((a - b) ** 2) / total + add_a + add_b
    if name == "lncc":
        return 1 - wsum(lncc_map(a, b, 5, add_a, add_b)) / total
    am = a - wsum(a) / total
    bm = b - wsum(b) / total
    var = (wsum(am * am) + add_a * total) * (wsum(bm * bm) + add_b * total)
    return 1 - wsum(am * bm) / var.clamp_min(EPS**2).sqrt()


def blurred_similarity(
    name: str,
    a: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor | None,
    s: torch.Tensor,
    noise: tuple[float, float],
    probe: torch.Tensor,
    per_voxel: bool = False,
) -> torch.Tensor:
    """The similarity loss of ``a`` and the warped ``b`` compared at matched blur ``s``
    (:func:`blur_pair`) with the noise each blur removed added back: ``noise`` holds the white-noise
    variances of ``a`` and of ``b`` before its warp (:func:`noise_variance`), ``probe`` unit white
    noise warped like ``b`` (:func:`removed_warped_noise`). With ``per_voxel``, ``s`` is a variance per
    voxel and axis (:func:`patterned_variance`; the removed noise :func:`removed_noise_field`)."""
    removed = removed_noise_field if per_voxel else removed_noise
    add_a, add_b = removed(s, noise[0]), removed_warped_noise(s, noise[1], probe)
    a, b = blur_pair(a, b, s)
    return matched_similarity(name, a, b, w, add_a, add_b)


#: Adam steps and learning rate of :func:`estimate_blur` (variances in voxels^2).
ESTIMATE_STEPS = 60
ESTIMATE_LR = 0.02


def estimate_blur(
    name: str,
    pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    noise: tuple[float, float],
    probes: tuple[torch.Tensor, torch.Tensor],
    bound: float,
    patterns: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Matched-blur variances ``(2, D)`` for the two comparisons ``pairs`` (image, warped other
    image, weights or None; detached) held still: each row minimises :func:`blurred_similarity` of
    its pair alone, by Adam from 0, within ``[-bound, bound]``. Only the blur moves, so the images
    are warped once (not at every step of the velocity, as learning the blur with it does).
    With ``patterns`` (one per comparison, :func:`blur_pattern`; session 46): ``(2, 2, D)`` (comparison,
    uniform / patterned part, axis), each comparison's variance ``s_u + s_p p`` (:func:`patterned_variance`),
    each part within ``[-bound, bound]``."""
    d = pairs[0][0].dim() - 2
    shape = (2, d) if patterns is None else (2, 2, d)
    s = torch.full(shape, 1e-4, device=pairs[0][0].device, requires_grad=True)
    opt = torch.optim.Adam([s], lr=ESTIMATE_LR)
    noises = (noise, noise[::-1])
    with torch.enable_grad():
        for _ in range(ESTIMATE_STEPS):
            opt.zero_grad()
            if patterns is None:
                loss = sum(
                    blurred_similarity(name, a, b, w, s[i], noises[i], probes[i])
                    for i, (a, b, w) in enumerate(pairs)
                )
            else:
                loss = sum(
                    blurred_similarity(
                        name,
                        a,
                        b,
                        w,
                        patterned_variance(s[i], patterns[i], bound),
                        noises[i],
                        probes[i],
                        True,
                    )
                    for i, (a, b, w) in enumerate(pairs)
                )
            loss.backward()
            opt.step()
            with torch.no_grad():
                s.clamp_(-bound, bound)
    return s.detach()


# The matched blur that follows the map's sub-voxel position (opt-in ``coarse_blur_pattern``, session 46).
#
# A moving image made by linear resampling through a map carries, at each of its voxels, the blur of linear
# interpolation at that voxel's sub-voxel position in the source, ``f (1 - f)`` voxel^2 per axis. Seen from
# the fixed grid through the same map, that position is the sub-voxel part of the map itself (``x`` is a
# voxel, so the fraction of ``phi(x)`` is that of ``phi(x) - x``): constant on a shift, a moire of period
# ``1 / sin(angle)`` voxels on a rotation (33 px at 1.7 degrees, 12 px at 4.8), which one variance per axis
# (:func:`estimate_blur`) cannot follow. Here each direction's variance is ``r = s_u + s_p p`` per voxel and
# axis, ``p = 6 f (1 - f)`` of the current map's sampling points there (mean 1 over uniform fractions; a
# linear resampling reads ``s_p`` about 1/6), ``s_u`` a uniform part (optics, or a pair not made by
# resampling: ``s_p`` about 0); both estimated once by :func:`estimate_blur` (its ``patterns``).


def blur_pattern(variance: torch.Tensor) -> torch.Tensor:
    """``6 f (1 - f)`` per voxel and axis from :func:`.coarse.interpolation_variance`'s ``(1, D, *S)``
    (grid_sample's axis order): ``(D, 1, 1, *S)`` in numpy axis order, as :func:`blur` takes a variance."""
    return (6.0 * variance.detach().flip(1))[0][:, None, None]


def patterned_variance(s: torch.Tensor, pattern: torch.Tensor, bound: float) -> torch.Tensor:
    """The variance ``s[0] + s[1] p`` per axis and voxel (``s`` ``(2, D)``: uniform and patterned parts,
    ``pattern`` :func:`blur_pattern`'s), within ``[-bound, bound]``: ``(D, 1, 1, *S)``."""
    shape = (-1,) + (1,) * (pattern.dim() - 1)
    return (s[0].reshape(shape) + s[1].reshape(shape) * pattern).clamp(-bound, bound)


def removed_noise_field(r: torch.Tensor, variance: float) -> torch.Tensor:
    """:func:`removed_noise` for a variance per voxel ``r`` (``(D, 1, 1, *S)``): the mean over voxels."""
    q = torch.relu(r)
    return variance * (1 - torch.prod(1 - 2 * q + 1.5 * q * q, dim=0)).mean()
