"""The section of the "Atlas lookup" widget: the plane on screen, from a pyramid level that fits in memory.

A whole-slide section comes as a multiscale layer whose finest level may not fit in memory. The
lookup works on a few hundred pixels and the registration on at most 512
(:data:`napari_nephi.engines.atlas.register.MAX_WORK_SIDE`), so the finest level whose longer side
is at most :data:`MAX_SECTION_SIDE` pixels is read (the coarsest when none is), and the results are
shown with that level's pixel size, where napari draws that level.
"""

from __future__ import annotations

import numpy as np

#: Longest side (pixels) of the pyramid level of a multiscale section that the widget reads.
MAX_SECTION_SIDE = 4096


def _yx(shape, rgb: bool) -> np.ndarray:
    return np.asarray(shape[-3:-1] if rgb else shape[-2:], dtype=np.float64)


def section_level(layer) -> tuple[object, np.ndarray]:
    """``(data, factor)``: the layer's data (a level of a multiscale one, still lazy) and its pixel size
    in level-0 pixels along ``(y, x)`` (1 for a plain layer)."""
    if not layer.multiscale:
        return layer.data, np.ones(2)
    levels = list(layer.data)
    full = _yx(levels[0].shape, layer.rgb)
    chosen = levels[-1]
    for level in levels:
        if _yx(level.shape, layer.rgb).max() <= MAX_SECTION_SIDE:
            chosen = level
            break
    return chosen, full / _yx(chosen.shape, layer.rgb)


def plane_of(data, layer, point) -> object:
    """The 2D (or RGB) plane of ``data`` (a level of ``layer``) shown at the viewer's ``point``;
    ``data`` itself when it is 2D. None when it is neither 2D nor a stack of 2D planes."""
    spatial = data.ndim - (1 if layer.rgb else 0)
    if spatial == 2:
        return data
    if spatial != 3:
        return None
    plane0 = float(layer.world_to_data(point[-layer.ndim :])[0])  # in level-0 planes
    plane = int(round(plane0 * data.shape[0] / layer.data.shape[0]))
    return data[min(max(plane, 0), data.shape[0] - 1)]
