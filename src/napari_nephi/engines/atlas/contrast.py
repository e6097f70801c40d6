"""Contrast matching and a contrast-invariant judge for the deformable step after a plate's affine map.

A section may show another stain than the atlas (fluorescence against Nissl: region levels
redrawn, partly inverted), so intensities of the plate and the section need not correlate.
:func:`match_contrast` maps the plate's intensities to the section's through the conditional mean
of the section given the plate (the correlation-ratio fit), measured where the affinely aligned
tissues overlap; the deformable engine then compares like with like. :func:`edge_agreement`
scores an alignment by how well the image edges line up whatever their polarity (squared
normalised gradient fields), so a deformable map is judged by a measure it did not optimise.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

#: Intensity bins of the plate for :func:`match_contrast`, and the fewest pixels a bin needs.
CONTRAST_BINS = 24
MIN_BIN_PIXELS = 4
#: Edge scale of :func:`edge_agreement`: Gaussian derivative sigma in pixels of the working grid.
EDGE_SIGMA = 1.0
#: Gradients weaker than this fraction of the tissue's median gradient count as flat (NGF epsilon).
EDGE_EPSILON = 0.5


def match_contrast(plate: np.ndarray, section: np.ndarray, overlap: np.ndarray) -> np.ndarray:
    """``plate`` (already on the section's grid) with its intensities mapped to the section's.

    Each plate-intensity bin takes the mean section intensity of the ``overlap`` pixels in it
    (bins with fewer than :data:`MIN_BIN_PIXELS` are interpolated from their neighbours), and the
    map is read linearly between bin centres. Pixels outside ``overlap``'s plate range keep the
    nearest bin's value; with too little overlap the plate is returned unchanged (a copy).
    """
    p = plate[overlap].astype(np.float64)
    s = section[overlap].astype(np.float64)
    if p.size < MIN_BIN_PIXELS * 4:
        return plate.astype(np.float32, copy=True)
    lo, hi = np.percentile(p, [0.5, 99.5])
    if hi - lo < 1e-6:
        return plate.astype(np.float32, copy=True)
    idx = np.clip(((p - lo) / (hi - lo) * CONTRAST_BINS).astype(int), 0, CONTRAST_BINS - 1)
    counts = np.bincount(idx, minlength=CONTRAST_BINS)
    sums = np.bincount(idx, weights=s, minlength=CONTRAST_BINS)
    centres = lo + (np.arange(CONTRAST_BINS) + 0.5) * (hi - lo) / CONTRAST_BINS
    valid = counts >= MIN_BIN_PIXELS
    if valid.sum() < 2:
        return plate.astype(np.float32, copy=True)
    lut = np.interp(centres, centres[valid], sums[valid] / counts[valid])
    return np.interp(plate, centres, lut).astype(np.float32)


def _gradient(image: np.ndarray) -> np.ndarray:
    return np.stack([ndi.gaussian_filter(image, EDGE_SIGMA, order=o) for o in ((1, 0), (0, 1))])


def edge_agreement(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Mean over ``mask`` of the squared cosine between the edges of ``a`` and ``b`` (0 to 1).

    Normalised gradient fields (Haber and Modersitzki): the squared cosine ignores the edges'
    polarity, so a stain that inverts some regions scores as its Nissl twin; flat areas (gradient
    below :data:`EDGE_EPSILON` times the median over ``mask``) weigh little.
    """
    if not mask.any():
        return float("nan")
    ga, gb = _gradient(a.astype(np.float64)), _gradient(b.astype(np.float64))
    na, nb = (ga**2).sum(axis=0), (gb**2).sum(axis=0)
    ea = (EDGE_EPSILON * np.sqrt(np.median(na[mask])) + 1e-12) ** 2
    eb = (EDGE_EPSILON * np.sqrt(np.median(nb[mask])) + 1e-12) ** 2
    dot = (ga * gb).sum(axis=0)
    return float(np.mean((dot**2 / ((na + ea) * (nb + eb)))[mask]))
