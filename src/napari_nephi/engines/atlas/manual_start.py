"""A user's start for registering a plate onto a section: landmark pairs, or a rotation and scale.

When the automatic start of :meth:`AtlasLookup.register <napari_nephi.AtlasLookup.register>`
lands wrong (a section far from the plate's orientation, a crop that fools the scale guess), the
user gives a start: landmark pairs on the section and the plate, or a rotation and scale applied
to the plate about its tissue centre. :func:`start_matrix` makes it a map from section pixels to
plate pixels; :func:`register_from_start` resamples the section onto the plate's grid through it,
registers there with the lookup's own registration, and composes the two maps, so the result is
the same kind of :class:`~napari_nephi.Registration` (section pixels -> plate pixels, labels
carried with their values kept).
"""

from __future__ import annotations

import math

import numpy as np

from ...core.errors import InputError
from ...core.registration import Registration
from ...core.transform import AffineTransform, ComposedTransform
from .preprocess import background_is_bright, tissue_mask, to_grey

#: (y, x) <-> (x, y) in homogeneous 2D coordinates.
_SWAP = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=np.float64)


def _box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centre, extent) of a mask's bounding box in (y, x) pixels; the whole image when empty."""
    if not mask.any():
        shape = np.asarray(mask.shape, np.float64)
        return (shape - 1) / 2, shape
    ys, xs = np.nonzero(mask)
    lo = np.array([ys.min(), xs.min()], np.float64)
    hi = np.array([ys.max(), xs.max()], np.float64)
    return (lo + hi) / 2, hi - lo + 1


def landmark_matrix(section_points, plate_points) -> np.ndarray:
    """``(3, 3)`` section -> plate pixel map fitted to landmark pairs (2: similarity, 3+: affine)."""
    from skimage.transform import estimate_transform

    s = np.asarray(section_points, np.float64).reshape(-1, 2)
    p = np.asarray(plate_points, np.float64).reshape(-1, 2)
    if len(s) != len(p):
        raise InputError(
            f"The landmarks hold {len(s)} section and {len(p)} plate points; give pairs in the same "
            "order (as many points on the plate as on the section)."
        )
    if len(s) < 2:
        raise InputError(f"Landmarks need at least 2 pairs, got {len(s)}; add points on both.")
    for points in (s, p):  # 2 pairs fix a similarity, more an affine: they must not be on one line
        spread = np.linalg.svd(points - points.mean(axis=0), compute_uv=False)
        if spread[0] < 1e-9 or (len(points) > 2 and spread[1] <= 1e-6 * spread[0]):
            raise InputError("The landmarks do not define a map (all on one line?); move or add some.")
    fitted = estimate_transform("similarity" if len(s) == 2 else "affine", s[:, ::-1], p[:, ::-1])
    m = _SWAP @ np.asarray(fitted.params, np.float64) @ _SWAP  # skimage works in (x, y)
    if not np.all(np.isfinite(m)) or abs(np.linalg.det(m[:2, :2])) < 1e-9:
        raise InputError("The landmarks do not define a map (all on one line?); move or add some.")
    return m


def nudge_matrix(section, plate, rotation: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """``(3, 3)`` section -> plate pixel map: tissue centres matched, tissue extents matched (the
    larger ratio, as the automatic start), then the plate turned ``rotation`` degrees
    counter-clockwise on screen and enlarged ``scale`` times about its centre."""
    if not (math.isfinite(rotation) and math.isfinite(scale) and scale > 0):
        raise InputError(
            f"The rotation and scale must be finite and the scale positive, got {rotation}, {scale}."
        )
    cs, es = _box(tissue_mask(to_grey(section, "section")))
    cp, ep = _box(tissue_mask(to_grey(plate, "plate")))
    section_per_plate = float(np.clip(np.max(es / ep), 0.05, 50.0))
    t = math.radians(rotation)
    c, s = math.cos(t), math.sin(t)
    # (y, x) with y down: turning the plate by +t on screen sends a section offset d to R(-t) d
    turn = np.array([[c, s], [-s, c]]) / (section_per_plate * float(scale))
    m = np.eye(3)
    m[:2, :2] = turn
    m[:2, 2] = cp - turn @ cs
    return m


def start_matrix(
    section, plate, rotation: float = 0.0, scale: float = 1.0, section_points=None, plate_points=None
) -> np.ndarray | None:
    """The user's start as a section -> plate pixel map, or None when nothing is set.

    Landmark pairs win (``(N, 2)`` pixel ``(y, x)`` of the section and of the plate, same order);
    else the rotation and scale (:func:`nudge_matrix`); rotation 0 and scale 1 with no landmarks
    is no start.
    """
    if section_points is not None and plate_points is not None and len(section_points) + len(plate_points):
        return landmark_matrix(section_points, plate_points)
    if rotation == 0.0 and scale == 1.0:
        return None
    return nudge_matrix(section, plate, rotation, scale)


def register_from_start(
    lookup, section, plate_index: int, start: np.ndarray, method: str = "nephi", **options
) -> Registration:
    """Register plate ``plate_index`` onto ``section`` from the map ``start`` (section -> plate pixels).

    The section (grey, dark background) is resampled onto the plate's grid through ``start``;
    ``lookup.register`` aligns the plate to it (``options``: its options); the result maps section
    pixels through ``start`` and then through that registration.
    """
    m = np.asarray(start, np.float64)
    if m.shape != (3, 3) or not np.all(np.isfinite(m)) or abs(np.linalg.det(m[:2, :2])) < 1e-12:
        raise InputError(f"The start must be an invertible 3x3 map of finite numbers, got {m.tolist()}.")
    plate = lookup.plate_image(plate_index)
    grey = to_grey(section, "section")
    if background_is_bright(grey):
        grey = 1.0 - grey
    shape = tuple(grey.shape)
    to_plate = AffineTransform(m, shape=shape, moving_shape=plate.shape)
    moved = to_plate.inverse().warp(grey, plate.shape)  # the section on the plate's grid
    inner = lookup.register(moved, plate_index, method=method, **options)
    transform = ComposedTransform([to_plate, inner.transform], shape=shape, moving_shape=plate.shape)
    labels = lookup.plate_labels(plate_index)
    carried = None if labels is None else transform.warp_labels(labels, shape)
    values = [] if carried is None else [int(v) for v in np.unique(carried) if v != 0]
    metrics = {
        **inner.metrics,
        "labels": carried,
        "regions": {v: lookup.region_name(v) for v in values},
        "start": m.tolist(),
    }
    settings = {**inner.settings, "start": m.tolist()}
    transform.settings = dict(settings)
    return Registration(
        warped=transform.warp(plate, shape), transform=transform, metrics=metrics, settings=settings
    )
