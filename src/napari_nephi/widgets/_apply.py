"""Apply a saved transform to a layer: what the GUI thread reads, and the worker thread's job.

The register widget's "Apply saved transform to layer…" runs :func:`apply_saved_transform` in a
worker (its :class:`~napari_nephi.widgets._runner.RegistrationRunner`), so napari keeps drawing
and answering while a large image or volume is warped, and torch runs with its own thread count
(napari's thread may have had its count set to the number of cores by numba's OpenMP pool when a
labels layer was first coloured).
"""

from __future__ import annotations

import traceback
from pathlib import Path

import numpy as np
from napari.layers import Image, Labels, Layer, Points

from ..core.errors import Cancelled, InputError, RegistrationError
from ..core.progress import ProgressEvent, is_cancelled
from ..core.transform_io import load_transform

#: The layer types a saved transform can be applied to, by napari's layer kind.
KINDS = {Labels: "labels", Points: "points", Image: "image"}


def layer_job(layer) -> dict | None:
    """What the worker needs from ``layer``, read on the GUI thread; None for a layer type it cannot take.

    No numerical work here: an image's (possibly lazy) array is read in the worker. Labels and
    points are copied, since the user may paint or move them while the warp runs.
    """
    kind = next((k for cls, k in KINDS.items() if isinstance(layer, cls)), None)
    if kind is None:
        return None
    if kind == "image":
        data = layer.data[0] if layer.multiscale else layer.data
    else:
        data = layer.data.copy() if isinstance(layer.data, np.ndarray) else layer.data
    return {
        "kind": kind,
        "data": data,
        "name": f"{layer.name} (transformed)",
        "layer_scale": np.array(layer.scale, float),
        "layer_translate": np.array(layer.translate, float),
        "rgb": bool(getattr(layer, "rgb", False)),
    }


def apply_saved_transform(
    progress, cancel, folder: str | Path, kind: str, data, name: str, layer_scale, layer_translate, rgb=False
) -> Layer:
    """Worker-thread job: load the transform in ``folder``, warp ``data`` and make the new (hidden) layer.

    Results lie on the transform's fixed grid (the layer's scale is the transform's spacing); a
    layer of another spacing than the registered moving image is rescaled to it when the transform
    carries its moving frame. Raises :class:`Cancelled` when ``cancel`` is set: between the steps,
    and inside an image's or labels' warp before each of its chunks (about 2^20 output voxels
    each); points are mapped to their end. Raises :class:`RegistrationError` for every failure,
    with the message the user sees. ``progress`` (the runner's) receives a
    :class:`~napari_nephi.core.progress.ProgressEvent` per chunk of an image's or labels' warp:
    ``step`` of ``total`` chunks, from 0 (session 46); points are mapped at once.
    """
    chunks = (
        None if progress is None else lambda done, total: progress(ProgressEvent(done, total, stage="apply"))
    )
    try:
        t = load_transform(folder)
        _check(cancel)
        frame = {"image_spacing": tuple(layer_scale[-t.ndim :])} if t.has_moving_frame else {}
        meta = {"name": name, "scale": t.spacing, "visible": False}
        if kind == "labels":
            warped = t.warp_labels(np.asarray(data), **frame, cancel=cancel, progress=chunks)
        elif kind == "points":
            # moving world coordinates -> moving voxels -> fixed voxels
            world = np.asarray(data, float) * layer_scale + layer_translate
            warped = t.inverse().map_points(world / np.asarray(t.moving_spacing))
        else:
            warped = t.warp(np.asarray(data), **frame, cancel=cancel, progress=chunks)
            meta["rgb"] = rgb
        _check(cancel)
        return Layer.create(warped, meta, kind)  # napari's scan of the data happens here too
    except RegistrationError:
        raise
    except NotImplementedError as exc:  # e.g. a transform without an inverse, for points
        raise InputError(str(exc)) from exc
    except Exception as exc:
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        raise RegistrationError(f"Applying the transform failed unexpectedly: {detail}") from exc


def _check(cancel) -> None:
    if is_cancelled(cancel):
        raise Cancelled("Cancelled.")
