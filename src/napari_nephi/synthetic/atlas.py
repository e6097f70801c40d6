"""A toy 3D brain atlas and oblique, partial sections cut from it.

Test and demo data for the ``atlas`` engine (find the atlas plate that matches a section, then
register it). Axes are napari's ``(z, y, x)``: ``z`` runs anterior (0) to posterior, so every
``z`` index is a coronal *plate*; ``y`` runs dorsal (0, top of the screen) to ventral; ``x`` runs
across the two hemispheres, which meet at the midline ``x = (X - 1) / 2``. Structures change
along ``z`` (olfactory bulbs in front, striatum, thalamus and hippocampus in the middle,
cerebellum and brainstem behind), so neighbouring plates look alike and distant ones do not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from ..core.errors import InputError
from .atlas_sections import atlas_queries, plane_axes
from .brain_phantom import PHANTOM_REGIONS, brain_phantom

__all__ = [
    "ATLAS_REGIONS",
    "PHANTOM_REGIONS",
    "atlas_queries",
    "brain_phantom",
    "plane_axes",
    "section_from_atlas",
    "toy_atlas",
]

#: Label value -> region name of :func:`toy_atlas` (0 is background).
ATLAS_REGIONS = {
    0: "background",
    1: "cortex left",
    2: "cortex right",
    3: "white matter",
    4: "striatum left",
    5: "striatum right",
    6: "thalamus",
    7: "hippocampus left",
    8: "hippocampus right",
    9: "ventricles",
    10: "cerebellum",
    11: "olfactory bulb",
    12: "brainstem",
    13: "other grey matter",
}

_INTENSITY = {
    1: 0.70,
    2: 0.70,
    3: 0.95,
    4: 0.52,
    5: 0.52,
    6: 0.62,
    7: 0.88,
    8: 0.88,
    9: 0.10,
    10: 0.76,
    11: 0.66,
    12: 0.48,
    13: 0.42,
}


def _ellipsoid(z, y, x, centre, radii) -> np.ndarray:
    """Normalised radius: < 1 inside the ellipsoid."""
    return np.sqrt(
        ((z - centre[0]) / radii[0]) ** 2
        + ((y - centre[1]) / radii[1]) ** 2
        + ((x - centre[2]) / radii[2]) ** 2
    )


def toy_atlas(shape: Sequence[int] = (48, 64, 64), seed: int | None = 0):
    """A brain-like reference volume with region labels.

    Parameters
    ----------
    shape
        ``(z, y, x)`` size; structures are defined in normalised coordinates, so any size works
        (at least 16 voxels per axis).
    seed
        Perturbs positions and sizes by a few percent and draws the tissue texture.

    Returns
    -------
    reference : ``(z, y, x)`` float32 in [0, 1], 0 outside the brain.
    labels : ``(z, y, x)`` uint16, values of :data:`ATLAS_REGIONS`; left and right structures
        have different values, the hemispheres are split by a thin midline fissure.
    """
    try:
        shp = tuple(int(s) for s in shape)
    except TypeError as exc:
        raise InputError(f"shape must be three integers (z, y, x), got {shape!r}.") from exc
    if len(shp) != 3 or min(shp) < 16:
        raise InputError(f"shape must be three integers (z, y, x), each >= 16; got {shape!r}.")
    rng = np.random.default_rng(seed)

    def jit(values, amount=0.04):
        return np.asarray(values, dtype=np.float64) + rng.uniform(-amount, amount, len(values))

    z, y, x = np.meshgrid(*(np.linspace(-1.0, 1.0, n) for n in shp), indexing="ij", sparse=True)
    ax = np.abs(x)  # mirrored structures use |x|
    labels = np.zeros(shp, dtype=np.uint16)
    side = np.where(x < 0, 0, 1).astype(np.uint16)  # 0 left, 1 right

    cereb_c, cereb_r = jit((0.62, 0.05, 0.0)), jit((0.3, 0.45, 0.62))
    brain_c, brain_r = jit((-0.12, 0.0, 0.0)), jit((0.72, 0.72, 0.88))
    cerebrum = _ellipsoid(z, y, x, brain_c, brain_r)
    inside = cerebrum < 1
    labels[inside] = 13
    # cortex: outer shell, dorsal and lateral; white matter just beneath it
    cortex = inside & (cerebrum > 0.8) & (y < 0.45)
    labels[cortex] = (1 + side * np.ones(shp, dtype=np.uint16))[cortex]
    wm = inside & (cerebrum > 0.72) & (cerebrum <= 0.8) & (y < 0.2) & (np.abs(z - brain_c[0]) < 0.55)
    labels[wm] = 3
    stri = _ellipsoid(z, y, ax, jit((-0.35, -0.02, 0.36)), jit((0.28, 0.26, 0.2))) < 1
    labels[inside & stri] = (4 + side * np.ones(shp, dtype=np.uint16))[inside & stri]
    thal = _ellipsoid(z, y, x, jit((0.12, 0.15, 0.0)), jit((0.24, 0.22, 0.3))) < 1
    labels[inside & thal] = 6
    hc = _ellipsoid(z, y, ax, jit((0.3, -0.1, 0.34)), jit((0.3, 0.3, 0.3)))
    hippo = inside & (hc > 0.72) & (hc < 1) & (y < 0.05) & (z > 0.1)
    labels[hippo] = (7 + side * np.ones(shp, dtype=np.uint16))[hippo]
    vent = _ellipsoid(z, y, ax, jit((-0.15, -0.12, 0.13)), (0.3, 0.06, 0.045)) < 1
    labels[inside & vent] = 9
    # midline fissure between the hemispheres, dorsally
    fissure = (np.abs(x) < 1.0 / shp[2] + 0.02) & (y < -0.25)
    labels[fissure & (labels > 0)] = 0
    # cerebellum behind, brainstem below, olfactory bulbs in front
    cb = _ellipsoid(z, y, x, cereb_c, cereb_r) < 1
    labels[cb & (labels == 0)] = 10
    bs = _ellipsoid(z, y, x, jit((0.45, 0.55, 0.0)), jit((0.45, 0.2, 0.18))) < 1
    labels[bs & (labels == 0)] = 12
    ob = _ellipsoid(z, y, ax, jit((-0.86, -0.1, 0.14)), jit((0.13, 0.16, 0.12))) < 1
    labels[ob & (labels == 0)] = 11

    lut = np.zeros(max(ATLAS_REGIONS) + 1, dtype=np.float32)
    for k, v in _INTENSITY.items():
        lut[k] = v
    ref = lut[labels]
    # cortical layers, cerebellar folia, striatal fibre bundles and a tissue texture
    is_ctx = (labels == 1) | (labels == 2)
    ref = np.where(is_ctx, ref + 0.08 * np.cos(cerebrum * 60.0), ref)
    cr = _ellipsoid(z, y, x, cereb_c, cereb_r)
    ref = np.where(labels == 10, ref + 0.12 * np.cos(cr * 45.0 + 3 * y), ref)
    speck = ndimage.gaussian_filter(rng.standard_normal(shp), 0.8) > 0.35
    ref = np.where(((labels == 4) | (labels == 5)) & speck, ref + 0.25, ref)
    texture = ndimage.gaussian_filter(rng.standard_normal(shp), 1.0)
    ref = ref + 0.04 * texture / max(float(texture.std()), 1e-6) * (labels > 0)
    ref = ndimage.gaussian_filter(ref, 0.6)
    return np.clip(ref, 0.0, 1.0).astype(np.float32), labels


def section_from_atlas(
    atlas,
    index: float,
    tilt_degrees: float | Sequence[float] = 0.0,
    crop: Sequence[float] | None = None,
    labels=None,
    return_coords: bool = False,
):
    """Cut a (possibly oblique and partial) 2D section from a 3D atlas.

    The cutting plane passes through ``(index, (Y - 1) / 2, (X - 1) / 2)``. With
    ``tilt_degrees = 0`` it is the coronal plate ``atlas[index]``. A number tilts it about the
    ``x`` axis (the dorsal edge moves towards larger ``z``); a pair ``(about_x, about_y)`` also
    turns it about the ``y`` axis (the right edge moves towards larger ``z``). In-plane pixels stay
    one voxel apart, so the section has the atlas's ``(Y, X)`` size before cropping.

    Parameters
    ----------
    atlas
        ``(z, y, x)`` reference volume, or a ``(reference, labels)`` pair as :func:`toy_atlas`
        returns.
    index
        Plate position along ``z`` (may be fractional).
    tilt_degrees
        Obliqueness, see above.
    crop
        ``(top, bottom, left, right)`` fractions of the section to cut away, each in ``[0, 1)``;
        e.g. ``(0, 0, 0, 0.5)`` keeps the left half (a damaged or partial section).
    labels
        Label volume to cut along the same plane (nearest neighbour).
    return_coords
        Also return the atlas ``(z, y, x)`` voxel coordinates of every section pixel, ``(3, h, w)``,
        the ground truth for plate lookup and registration.

    Returns
    -------
    ``image`` (float32 ``(h, w)``; linear interpolation, 0 outside the atlas), then
    ``section_labels`` when labels were given, then ``coords`` when asked for, as a tuple when
    more than the image is returned.
    """
    if isinstance(atlas, tuple | list):
        if len(atlas) != 2:
            raise InputError("atlas must be a volume or a (reference, labels) pair.")
        atlas, pair_labels = atlas
        labels = pair_labels if labels is None else labels
    ref = np.asarray(atlas)
    if ref.ndim != 3:
        raise InputError(f"The atlas must be a 3D (z, y, x) volume, got shape {ref.shape}.")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != ref.shape:
            raise InputError(f"labels shape {labels.shape} differs from the atlas shape {ref.shape}.")
    tilt = np.atleast_1d(np.asarray(tilt_degrees, dtype=np.float64))
    if tilt.size == 1:
        tilt = np.array([tilt[0], 0.0])
    if tilt.size != 2 or not np.all(np.isfinite(tilt)) or np.any(np.abs(tilt) >= 80):
        raise InputError(
            f"tilt_degrees must be one or two finite angles below 80 degrees, got {tilt_degrees!r}."
        )
    if crop is None:
        crop = (0.0, 0.0, 0.0, 0.0)
    crop = tuple(float(c) for c in crop)
    if (
        len(crop) != 4
        or any(not 0 <= c < 1 for c in crop)
        or crop[0] + crop[1] >= 1
        or crop[2] + crop[3] >= 1
    ):
        raise InputError(
            f"crop must be four fractions (top, bottom, left, right) in [0, 1) leaving something, got {crop}."
        )
    nz, ny, nx = ref.shape
    cy, cx = (ny - 1) / 2.0, (nx - 1) / 2.0
    e_row, e_col = plane_axes(tilt)
    r0, r1 = round(crop[0] * ny), ny - round(crop[1] * ny)
    c0, c1 = round(crop[2] * nx), nx - round(crop[3] * nx)
    rows = np.arange(r0, r1, dtype=np.float64) - cy
    cols = np.arange(c0, c1, dtype=np.float64) - cx
    origin = np.array([float(index), cy, cx])
    coords = (
        origin[:, None, None]
        + e_row[:, None, None] * rows[None, :, None]
        + e_col[:, None, None] * cols[None, None, :]
    )
    image = ndimage.map_coordinates(ref.astype(np.float32), coords, order=1, mode="constant", cval=0.0)
    out = [image.astype(np.float32)]
    if labels is not None:
        out.append(ndimage.map_coordinates(labels, coords, order=0, mode="constant", cval=0))
    if return_coords:
        out.append(coords.astype(np.float32))
    return out[0] if len(out) == 1 else tuple(out)
