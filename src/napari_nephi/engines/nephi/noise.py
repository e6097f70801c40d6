"""Noise adaptation of the deformable stages (engine option ``noise_adapt``, session 20).

On noisy pairs the coarse stage fits the noise: with independent Gaussian noise of 0.05 (intensities in
[0, 1]) on both images, a pure shift left a field whose Jacobian determinant ranged 0.74-1.27 and small
smooth deformations ended worse than not registering them (benchmarks/nephi_large.py, 256 px). Two
causes: the similarity's gradient carries the noise of both images, which the finest knots follow; and
warping interpolates the moving image's noise, keeping a share of its variance that depends on each
sampling point's sub-voxel position (bicubic: all of it at a voxel centre, about half per axis half-way
between two), so NCC rises where the map puts points half-way between voxels, a bias towards
half-voxel shifts that a smoothness penalty does not hold (a uniform offset has no bending energy).

What adapts, from each image's estimated noise (:func:`estimate_noise`, intensities normalised to
[0, 1] as the engine compares them):

* both images are compared after a Wiener filter (:func:`wiener_filter`): per spatial frequency band
  the signal's power over signal plus noise, so bands the noise dominates are removed (they carry the
  bias above and nothing of the motion) and bands of texture above the noise are kept;
* the coarse stage's bending weight grows with the noise variance (:func:`regularizer_weight`): the
  similarity's information about the motion falls as the noise rises, the prior's does not.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

#: ``noise_adapt="auto"`` adapts where the estimated noise (standard deviation, intensities in
#: [0, 1]) of either image is at least this. Clean photographs read 0.0000-0.0054 (at 256 and 512 px:
#: scikit-image's astronaut, brick, camera, cat, coins, page, text and others up to 0.0043; the
#: lead's held-out clock 0.0042 and moon 0.0054, session-20 review B1); added noise of 0.01 / 0.02 /
#: 0.05 reads 0.009-0.012 / 0.018-0.026 / 0.044-0.056 on the benchmark's five images. Read as noise
#: and adapted although clean: images with texture in every block (gravel 0.019-0.032, grass
#: 0.042-0.044) and images with their own noise (the IHC photograph 0.005-0.015, the Hubble deep field
#: 0.008-0.015).
NOISE_MIN = 0.008


def adapts(mode: bool | str, sigmas) -> bool:
    """Whether the noise adaptation runs: ``mode`` as ``noise_adapt`` (True always, False never, "auto"
    where either of ``sigmas``, the images' estimated noise, is at least :data:`NOISE_MIN`)."""
    return bool(mode) and (mode is True or max(sigmas) >= NOISE_MIN)


#: The coarse stage's bending weight is ``coarse_reg_weight * min(NOISE_GROWTH_MAX, max(1, (sigma /
#: NOISE_REF) ** 2))``. No cap: a cap of 16 (sigma 0.06; 1c4a274, against texture read as noise) lost
#: where the noise is higher. Capped -> uncapped, 256 px, fast preset: fresh field set 150 at noise
#: 0.08 / 0.1 better on 10 / 12 of 15 (e.g. retina 0.5 % 0.854 -> 0.715, cell 0.5 % 1.120 -> 0.968 px
#: at 0.1), worse on 5 / 3 (the IHC at 1 and 2 %, 0.238 -> 0.266 and 0.329 -> 0.390, whose own noise
#: raises the estimate; cell 2 %); five photographs never used for it (astronaut, coins, page, text,
#: brick; shift + rotation or a 1 % field) at noise 0.1 better on 9 of 10 (text 0.604 -> 0.391), equal
#: at 0.05; field set 120 at noise 0.1 (session-20 review 2) 4 better, 2 worse; the lead's held-out moon
#: at noise 0.05 (reads 0.087-0.091) 0.931 / 1.521 -> 0.748 / 1.297 (session 20, benchmarks/README.md).
NOISE_REF = 0.015
NOISE_GROWTH_MAX = math.inf

#: Side of the blocks (pixels) whose noise :func:`estimate_noise` estimates, and the percentile of
#: the block estimates it returns.
BLOCK = 32
PERCENTILE = 10.0


#: Input voxels per slab of :func:`second_difference_product` (along the first axis, at least three
#: rows; read at the call). One 3-tap ``conv2d`` over a whole 2048^2 image peaked at about 260 MiB on CPU
#: for 16 MiB of output, and ``estimate_noise`` held 530 MiB of ``benchmarks/nephi_memory.py``'s 2048^2
#: peak (session 41); slabs of 2^18 voxels give the same values bit for bit (each output voxel sees the
#: same input voxels).
SLAB_VOXELS = 1 << 18


def _second_differences(x: torch.Tensor) -> torch.Tensor:
    d = x.dim() - 2
    k = torch.tensor([1.0, -2.0, 1.0], device=x.device)
    conv = F.conv2d if d == 2 else F.conv3d
    for i in range(d):
        x = conv(x, k.reshape([1, 1] + [3 if j == i else 1 for j in range(d)]))
    return x


def second_difference_product(t: torch.Tensor) -> torch.Tensor:
    """Immerkaer's operator on ``t`` ``(1, 1, *spatial)`` (2D or 3D): the product over axes of second
    differences (``[1, -2, 1]``), on the interior (each axis 2 shorter). It cancels signals linear along
    any axis; on white noise of variance ``v`` its output has variance ``6^d v``. Shared by
    :func:`estimate_noise` and the matched blur's :func:`.matchblur.noise_variance`. Computed in slabs of
    at most :data:`SLAB_VOXELS` input voxels along the first axis (session 41: memory)."""
    x = t.float()
    n = x.shape[2]
    row = x[0, 0, 0].numel()
    out_rows = max(1, SLAB_VOXELS // max(row, 1) - 2)  # output rows a slab: input rows - 2
    if n - 2 <= out_rows:
        return _second_differences(x)
    parts = [
        _second_differences(x[:, :, s : min(s + out_rows, n - 2) + 2]) for s in range(0, n - 2, out_rows)
    ]
    return torch.cat(parts, dim=2)


def _second_difference_product(image: np.ndarray) -> np.ndarray:
    """:func:`second_difference_product` of a numpy image (float32)."""
    x = torch.as_tensor(np.ascontiguousarray(image, np.float32))[None, None]
    return second_difference_product(x)[0, 0].numpy()


def estimate_noise(image: np.ndarray, block: int | None = None, percentile: float | None = None) -> float:
    """Standard deviation of white noise in ``image`` (2D or 3D, in the image's intensity units).

    Immerkaer's operator (:func:`_second_difference_product`) in blocks of ``block`` voxels a side
    (smaller on images under ``4 * block`` voxels along an axis: at least 4 blocks an axis);
    in each block its median magnitude gives a robust estimate (``0.6745`` standard deviations of
    Gaussian noise); the image's estimate is the ``percentile`` of the blocks'. Fine texture leaks
    through the operator (its median over the whole image reads 0.018 on scikit-image's IHC and 0.028
    on its gravel without added noise); noise covers every block alike, texture rarely does, so a low
    percentile reads the noise (IHC 0.015, its own noise; the gravel with a flat disc 0.000; with
    added noise 0.05: 0.044-0.056 on the benchmark's five images at 256 px). Constant voxels count
    (as no noise): where a constant background (saturated, padded) covers more than the percentile's
    share of the blocks the estimate is 0 and nothing adapts, as before. An image smaller than 3
    voxels along an axis reads 0.
    """
    if block is None:  # read at the call (session 40)
        block = BLOCK
    if percentile is None:  # read at the call (session 40)
        percentile = PERCENTILE
    x = np.asarray(image, np.float32)
    d = x.ndim
    if any(n < 3 for n in x.shape):
        return 0.0
    r = np.abs(_second_difference_product(x))
    # at least 4 blocks an axis where the image is small (a single block would be the global median)
    side = max(3, min(block, *(n // 4 for n in r.shape)))
    counts = [max(1, n // side) for n in r.shape]
    estimates = []
    for index in np.ndindex(*counts):
        sl = tuple(
            slice(i * side, (i + 1) * side if i < c - 1 else n) for i, c, n in zip(index, counts, r.shape)
        )
        estimates.append(float(np.median(r[sl])))
    if not estimates:
        return 0.0
    return float(np.percentile(estimates, percentile)) / (0.6745 * 6 ** (d / 2))


def _rings(shape, bands: int) -> np.ndarray:
    """Ring (shell) index of every frequency of ``np.fft.rfftn`` on ``shape``: ``bands`` rings up to
    the Nyquist frequency along an axis (more towards the corners)."""
    freqs = [np.fft.fftfreq(n) for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1])]
    radius = np.sqrt(sum(f**2 for f in np.meshgrid(*freqs, indexing="ij", sparse=True)))
    return np.minimum((radius * (2 * bands)).astype(np.int64), int(bands * np.sqrt(len(shape))) + 1)


def wiener_filter(images: list[np.ndarray], sigmas: list[float], bands: int = 64) -> list[np.ndarray]:
    """``images`` (float, 2D or 3D, one shape) filtered by one radial Wiener filter for white noise
    of standard deviations ``sigmas``: the power spectrum averaged over the images and over rings
    (shells) of spatial frequency, ``bands`` of them up to the Nyquist frequency, gives the signal's
    power ``S = max(P - N, 0)`` per ring (``N`` the mean noise variance), and each ring of every image
    is multiplied by ``S / (S + N)``. One filter for both images of a pair, so neither ends up
    blurrier than the other (the matched blur would take that for resampling blur). Means are kept.
    With no noise the images are returned unchanged (float32 copies)."""
    xs = [np.asarray(x, np.float32) for x in images]
    noise = float(np.mean(np.square(sigmas)))
    if noise <= 0:
        return [x.copy() for x in xs]
    ring = _rings(xs[0].shape, bands)
    n_rings = int(ring.max()) + 1
    count = np.maximum(np.bincount(ring.ravel(), None, n_rings), 1)
    means, spectra, mean_power = [], [], np.zeros(n_rings)
    for x in xs:
        means.append(float(x.mean()))
        spectrum = np.fft.rfftn(x - means[-1])
        power = (spectrum.real**2 + spectrum.imag**2) / x.size
        mean_power += np.bincount(ring.ravel(), power.ravel(), n_rings) / count / len(xs)
        spectra.append(spectrum)
    signal = np.maximum(mean_power - noise, 0.0)
    gain = signal / (signal + noise)
    gain[0] = 1.0  # the lowest ring holds the mean (removed above) and the slowest variations
    return [
        (np.fft.irfftn(spectrum * gain[ring], s=x.shape) + m).astype(np.float32)
        for x, m, spectrum in zip(xs, means, spectra)
    ]


def regularizer_weight(weight: float, sigma: float) -> float:
    """The coarse stage's bending weight for noise of standard deviation ``sigma``: ``weight`` up to
    :data:`NOISE_REF`, then growing with the noise variance (no cap: :data:`NOISE_GROWTH_MAX`)."""
    return float(weight) * min(NOISE_GROWTH_MAX, max(1.0, (float(sigma) / NOISE_REF) ** 2))
