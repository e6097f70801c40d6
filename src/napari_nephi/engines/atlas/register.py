"""Registering a chosen atlas plate onto a section and carrying its labels.

The section is the fixed image and the plate the moving one, so the plate's labels land on the
section grid with their values kept. Both are made bright tissue on a dark background (a
brightfield section is inverted; its background set to 0). A section larger than
:data:`MAX_WORK_SIDE` pixels is registered on a downsampled copy and the map is scaled back. The
plate's scale is first guessed from the tissue extents (a section imaged at another resolution),
then the ``affine`` engine aligns it, with the section's tissue mask as ``fixed_mask`` so missing
regions do not pull the plate; then the deformable ``method`` refines the affinely pre-warped
plate, and the two maps are composed.

The result is a :class:`~napari_nephi.Registration`: ``warped`` is the plate on the section grid,
``transform`` maps section pixels to plate pixels, ``metrics["labels"]`` holds the carried labels
(or None when the atlas has none) and ``metrics["regions"]`` ``{value: name}`` of the regions on
the section.
"""

from __future__ import annotations

import time

import cv2
import numpy as np

from ...core.errors import InputError
from ...core.registration import Registration
from ...core.transform import AffineTransform, ComposedTransform
from ..registry import engine_info, register
from .preprocess import background_is_bright, tissue_mask, to_grey

#: Longest side of the grid the registration runs on (larger sections are downsampled for it).
MAX_WORK_SIDE = 512
#: Options of the affine step when the deformable method follows (``affine_options`` overrides).
AFFINE_DEFAULTS = {"kind": "affine"}
_SCALARS = (int, float, str, bool, type(None))


def _working_image(section) -> tuple[np.ndarray, np.ndarray, tuple[float, float], tuple[int, int]]:
    """(grey work image with dark background, its tissue mask, zoom full/work per axis, full shape)."""
    grey = to_grey(section, "section")
    full = grey.shape
    scale = min(1.0, MAX_WORK_SIDE / max(full))
    if scale < 1.0:
        size = (max(1, round(full[1] * scale)), max(1, round(full[0] * scale)))
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
    zoom = (full[0] / grey.shape[0], full[1] / grey.shape[1])
    mask = tissue_mask(grey)
    if mask.sum() < 16:
        raise InputError(
            "The section has no tissue: nothing stands out from its background. Pass a section that shows "
            "the brain slice."
        )
    if background_is_bright(grey):
        grey = 1.0 - grey
    return np.where(mask, grey, np.float32(0.0)).astype(np.float32), mask, zoom, full


def _extent(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([ys.max() - ys.min() + 1, xs.max() - xs.min() + 1], dtype=np.float64)


def plate_scale(section_mask: np.ndarray, plate: np.ndarray) -> float:
    """Section pixels per plate pixel from the tissue extents (the larger ratio: robust to crops)."""
    pmask = tissue_mask(plate)
    if not pmask.any():
        return 1.0
    return float(np.clip(np.max(_extent(section_mask) / _extent(pmask)), 0.05, 50.0))


def _work_to_full(full: tuple[int, int], zoom: tuple[float, float]) -> AffineTransform:
    """Map full-section pixel coordinates to working-grid pixel coordinates (pixel centres kept)."""
    mat = np.eye(3)
    for a in range(2):
        mat[a, a] = 1.0 / zoom[a]
        mat[a, 2] = 0.5 / zoom[a] - 0.5
    return AffineTransform(mat, shape=full)


def _scalar_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, _SCALARS) or k == "notes"}


def register_plate(
    lk,
    section,
    plate_index: int,
    method: str = "nephi",
    *,
    device: str = "auto",
    progress=None,
    cancel=None,
    affine_options: dict | None = None,
    **reg_options,
):
    """Register plate ``plate_index`` of ``lk`` onto ``section``; see the module docstring.

    ``method="affine"`` gives the affine map only (``reg_options`` then go to the affine engine);
    another registered method refines it (``reg_options`` go to that method, ``affine_options``
    to the affine step).
    """
    engine_info(method)  # an unknown method fails before any work
    start = time.perf_counter()
    plate = lk.plate_image(plate_index)
    labels = lk.plate_labels(plate_index)
    work, mask, zoom, full = _working_image(section)
    s = plate_scale(mask, plate)
    common = {"device": device, "progress": progress, "cancel": cancel, "fixed_mask": mask}
    aff_opts = {**AFFINE_DEFAULTS, **(affine_options or {}), **(reg_options if method == "affine" else {})}
    aff_opts.setdefault("moving_spacing", (s, s))
    aff = register(work, plate, method="affine", **common, **aff_opts)
    steps = [aff.transform]
    metrics = {"affine": _scalar_metrics(aff.metrics)}
    if method != "affine":
        deform = register(work, aff.warped, method=method, **common, **reg_options)
        steps.insert(0, deform.transform)
        metrics[method] = _scalar_metrics(deform.metrics)
    if zoom != (1.0, 1.0):
        steps.insert(0, _work_to_full(full, zoom))
    transform = ComposedTransform(steps, shape=full, moving_shape=plate.shape)
    warped = transform.warp(plate, full)
    carried = None if labels is None else transform.warp_labels(labels, full)
    values = [] if carried is None else [int(v) for v in np.unique(carried) if v != 0]
    metrics.update(
        labels=carried,
        regions={v: lk.region_name(v) for v in values},
        plate_index=int(plate_index),
        plate_scale=s,
        work_zoom=list(zoom),
        seconds=time.perf_counter() - start,
    )
    settings = {
        "method": method,
        "plate_index": int(plate_index),
        "affine_options": _scalar_metrics(aff_opts),
    }
    transform.settings = dict(settings)
    return Registration(warped=warped, transform=transform, metrics=metrics, settings=settings)
