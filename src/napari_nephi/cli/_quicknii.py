"""QuickNII / DeepSlice anchoring JSON for sections placed on plates of a brainglobe atlas.

QuickNII, VisuAlign, DeepSlice and ABBA share one JSON "series" format: per section an
``anchoring`` vector ``[ox, oy, oz, ux, uy, uz, vx, vy, vz]`` in the atlas's voxel space: ``o`` is
the section image's top-left corner, ``u`` runs along its width (to the top-right corner) and
``v`` along its height (to the bottom-left corner). QuickNII's axes are ``x`` left-right (the
brainglobe left-right index as it is), ``y`` posterior to anterior and ``z`` inferior to superior,
so the brainglobe ``asr`` indices of anterior-posterior and dorsal-ventral are mirrored. The Allen
mouse atlas is shipped to QuickNII at 25 um only; other resolutions are written in that grid.
"""

from __future__ import annotations

import numpy as np

#: brainglobe atlas name prefix -> (QuickNII target, its grid (LR, AP, DV) in voxels, its voxel size um).
TARGETS = {
    "allen_mouse": ("ABA_Mouse_CCFv3_2017_25um.cutlas", (456, 528, 320), 25.0),
    "whs_sd_rat": ("WHS_SD_Rat_v4_39um.cutlas", (512, 1024, 512), 39.0),
}


def quicknii_target(atlas_name: str, resolution_um, shape_asr) -> tuple[str, tuple, float]:
    """(target name, grid (LR, AP, DV), factor from this atlas's voxels to the target's voxels).

    ``resolution_um``: the atlas's voxel size (a number, or a list whose first entry is used; None
    when unknown: the atlas is then written in its own voxels).
    """
    if isinstance(resolution_um, (list, tuple)):
        resolution_um = resolution_um[0] if resolution_um else None
    for prefix, (target, grid, voxel) in TARGETS.items():
        if atlas_name.startswith(prefix) and resolution_um is not None:
            return target, grid, float(resolution_um) / voxel
    ap, dv, lr = (int(s) for s in shape_asr)
    return atlas_name, (lr, ap, dv), 1.0


def section_corners(height: int, width: int) -> np.ndarray:
    """Top-left, top-right and bottom-left corners of a ``(height, width)`` image, pixel-centre ``(y, x)``."""
    return np.array([[-0.5, -0.5], [-0.5, width - 0.5], [height - 0.5, -0.5]], dtype=np.float64)


def anchoring(
    corners_on_plate: np.ndarray,
    plate_position: float,
    plate_scale: tuple[float, float],
    shape_asr,
    factor: float = 1.0,
) -> list[float]:
    """The anchoring vector of a section whose corners lie at ``corners_on_plate`` on a plate.

    ``corners_on_plate``: ``(3, 2)`` plate pixel ``(row, column)`` of the section's top-left,
    top-right and bottom-left corners (:func:`section_corners` mapped through the registration).
    ``plate_position``: the plate's index along the atlas's anterior-posterior axis (voxels);
    ``plate_scale``: atlas voxels per plate pixel along (dorsal-ventral, left-right);
    ``shape_asr``: the atlas volume's shape in brainglobe ``asr`` order; ``factor``: atlas voxels
    to QuickNII target voxels.
    """
    ap_n, dv_n, _ = (float(s) for s in shape_asr)
    c = np.asarray(corners_on_plate, dtype=np.float64)
    dv = (c[:, 0] + 0.5) * plate_scale[0]  # continuous voxel coordinates: voxel i spans [i, i + 1]
    lr = (c[:, 1] + 0.5) * plate_scale[1]
    ap = np.full(3, float(plate_position) + 0.5)
    points = np.stack([lr, ap_n - ap, dv_n - dv], axis=1) * factor  # QuickNII x, y, z
    o, top_right, bottom_left = points
    return [float(v) for v in (*o, *(top_right - o), *(bottom_left - o))]


def series_json(target: str, grid, slices: list[dict]) -> dict:
    """The QuickNII / DeepSlice series; ``slices`` hold filename, nr, width, height and anchoring."""
    return {
        "name": "napari-nephi atlas lookup",
        "target": target,
        "target-resolution": [float(v) for v in grid],
        "aligner": "napari-nephi",
        "slices": slices,
    }
