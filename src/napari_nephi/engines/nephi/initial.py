"""The global stage of the ``nephi`` engine: a linear map found before the deformable field.

With ``initial="rigid"`` (or ``"translation"``, ``"similarity"``, ``"affine"``) the project's
affine engine (:func:`napari_nephi.engines.affine.register_affine`) first finds the linear map
``A`` between the images; the moving image (and its mask) is resampled onto the fixed grid through
``A`` and the deformable stages register the fixed image to that. The result is
``ComposedTransform([field, A])``: ``phi(x) = A(x + u(x))``, so a shift or rotation is held by
``A`` exactly and the field only holds what is really non-linear.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from scipy import ndimage

from ...core.progress import Progress
from ...core.registration import Pair
from ...core.transform import AffineTransform

#: Values of the ``initial`` option: no global stage, or the affine engine's ``kind``.
INITIALS = ("none", "translation", "rigid", "similarity", "affine")


class GlobalStage:
    """The linear map found first and the moving image (and mask) resampled onto the fixed grid."""

    def __init__(self, transform: AffineTransform, moving: np.ndarray, moving_mask, steps: int, metrics):
        self.transform, self.moving, self.moving_mask = transform, moving, moving_mask
        self.steps, self.metrics = steps, metrics


def run_global_stage(pair: Pair, kind: str, remaining_steps: int, resample: bool = True) -> GlobalStage:
    """Run the affine engine of ``kind`` on ``pair``; its progress goes to ``pair.progress`` as
    stage ``"affine"``, each step counted once, with ``remaining_steps`` added to its total.

    With ``resample`` the moving image and mask are resampled onto the fixed grid through the map
    (``GlobalStage.moving``); without, the caller composes the map into its own sampling
    (:func:`normalized_matrix`) and ``moving`` is the moving image itself.
    """
    from ..affine import register_affine

    outer = pair.progress
    done = {"steps": 0}

    def forward(event) -> None:
        done["steps"] += 1
        preview = event.preview if outer.wants_preview else None
        total = event.total + remaining_steps
        outer.step(done["steps"], total, event.loss, stage=f"{kind} ({event.stage})", preview=preview)

    inner = replace(pair, progress=Progress(forward), notes=[])
    reg = register_affine(inner, kind=kind)
    t = reg.transform
    moving, mask = pair.moving, pair.moving_mask
    if resample:
        moving, mask = resample_border(pair.moving, t.matrix, pair.fixed.shape), None
    if resample and pair.moving_mask is not None:
        mask = t.warp_labels(np.asarray(pair.moving_mask, np.uint8), output_shape=pair.fixed.shape) > 0
    metrics = {
        "affine_matrix": t.matrix.tolist(),
        "affine_ncc_after": reg.metrics.get("ncc_after"),
    }
    return GlobalStage(t, moving, mask, done["steps"], metrics)


def normalized_matrix(matrix: np.ndarray, shape) -> torch.Tensor:
    """A voxel map between two grids of ``shape`` in normalised [-1, 1] coordinates (same axes)."""
    d = len(shape)
    half = np.array([max(int(n) - 1, 1) / 2 for n in shape] + [1.0])
    centre = np.array([(int(n) - 1) / 2 for n in shape] + [0.0])
    to_vox = np.diag(half)
    to_vox[:d, d] = centre[:d]
    return torch.as_tensor(
        np.linalg.inv(to_vox) @ np.asarray(matrix, np.float64) @ to_vox, dtype=torch.float32
    )


def resample_border(image: np.ndarray, matrix: np.ndarray, shape) -> np.ndarray:
    """``image(A x)`` on every voxel ``x`` of ``shape``: cubic B-spline interpolation, the edge
    value outside ``image``.

    Cubic, not linear: linear interpolation blurs by an amount that follows the sub-voxel part of
    ``A x``, which varies across the image under a rotation or scaling, and the deformable stages
    would fit that varying blur (on the benchmark it cost up to 0.3 px of endpoint error). Edge
    values, not zeros: a shifted image keeps its edge where it left the frame, so the similarity is
    not pulled towards an artificial black strip.
    """
    d = len(shape)
    m = np.asarray(matrix, np.float64)
    out = ndimage.affine_transform(
        np.asarray(image, np.float32), m[:d, :d], m[:d, d], output_shape=tuple(shape), order=3,
        mode="nearest", output=np.float32,
    )  # fmt: skip
    return out
