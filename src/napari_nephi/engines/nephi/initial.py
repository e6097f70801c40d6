"""The global stage of the ``nephi`` engine: a linear map found before the deformable field.

With ``initial="rigid"`` (or ``"translation"``, ``"similarity"``, ``"affine"``) the project's
affine engine (:func:`napari_nephi.engines.affine.register_affine`) first finds the linear map
``A`` between the images; the moving image (and its mask) is resampled onto the fixed grid through
``A`` and the deformable stages register the fixed image to that. The result is
``ComposedTransform([field, A])``: ``phi(x) = A(x + u(x))``, so a shift or rotation is held by
``A`` exactly and the field only holds what is really non-linear.

By default (``initial`` not given) a map that leaves less than :data:`MIN_OVERLAP` of the fixed
image (or of its mask) over the moving image is dropped with a note (:attr:`GlobalStage.dropped`):
the deformable stages assume images that roughly overlap, and such a map is what the affine engine
finds when the similarity does not hold (two stains of one slide under NCC: the image moved by
half its size). An ``initial`` the caller asks for is always kept. On 2D images in ``optimize`` mode a
dropped map that keeps at least ``basin.LOW_OVERLAP`` is judged against the identity first and used where it
explains the images far better (a real large shift; :mod:`.basin`, session 27).
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

#: Least share of the fixed image (or its mask) the default global map must keep over the moving
#: image (a shift of a quarter of the image along one axis keeps 0.75).
MIN_OVERLAP = 0.7


class GlobalStage:
    """The linear map found first and the moving image (and mask) resampled onto the fixed grid."""

    def __init__(
        self, transform: AffineTransform, moving, moving_mask, steps: int, metrics, dropped: str = ""
    ):
        self.transform, self.moving, self.moving_mask = transform, moving, moving_mask
        self.steps, self.metrics = steps, metrics
        #: Why the map was dropped (empty when it is used).
        self.dropped = dropped


def overlap_share(matrix: np.ndarray, fixed_shape, moving_shape, fixed_mask=None) -> float:
    """Share of the fixed voxels (inside ``fixed_mask`` when given) that ``matrix`` maps inside
    the moving image (every voxel of grids up to 64 a side, a regular subsample of larger ones)."""
    d = len(fixed_shape)
    steps = [max(1, int(n) // 64) for n in fixed_shape]
    axes = [np.arange(0, int(n), k, dtype=np.float64) for n, k in zip(fixed_shape, steps, strict=True)]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, d)
    if fixed_mask is not None:
        sub = np.asarray(fixed_mask)[tuple(slice(None, None, k) for k in steps)].reshape(-1) != 0
        pts = pts[sub]
    if len(pts) == 0:
        return 1.0
    m = np.asarray(matrix, np.float64)
    mapped = pts @ m[:d, :d].T + m[:d, d]
    upper = np.asarray(moving_shape, np.float64) - 0.5
    inside = np.all((mapped >= -0.5) & (mapped <= upper), axis=1)
    return float(inside.mean())


class _Forwarding(Progress):
    """The affine engine's progress, forwarded to ``outer``: it asks for a preview only when
    ``outer`` does. (A plain :class:`Progress` with a callback asks every 0.5 s, and the affine
    engine's preview samples every voxel of its level: at 256^3 the finest level's preview took
    about 500 MiB, the run's peak, whenever the timer happened to fall on that level.)"""

    def __init__(self, callback, outer: Progress):
        super().__init__(callback)
        self.outer = outer

    @property
    def wants_preview(self) -> bool:
        return self.outer.wants_preview


def run_global_stage(
    pair: Pair, kind: str, remaining_steps: int, resample: bool = True, min_overlap: float = 0.0
) -> GlobalStage:
    """Run the affine engine of ``kind`` on ``pair``; its progress goes to ``pair.progress`` as
    stage ``"affine"``, each step counted once, with ``remaining_steps`` added to its total.

    With ``resample`` the moving image and mask are resampled onto the fixed grid through the map
    (``GlobalStage.moving``); without, the caller composes the map into its own sampling
    (:func:`normalized_matrix`) and ``moving`` is the moving image itself. A map that keeps less
    than ``min_overlap`` of the fixed image over the moving one is returned with ``dropped`` set.
    """
    from ..affine import register_affine

    outer = pair.progress
    done = {"steps": 0}

    def forward(event) -> None:
        done["steps"] += 1
        preview = event.preview if outer.wants_preview else None
        total = event.total + remaining_steps
        outer.step(done["steps"], total, event.loss, stage=f"{kind} ({event.stage})", preview=preview)

    inner = replace(pair, progress=_Forwarding(forward, outer), notes=[])
    reg = register_affine(inner, kind=kind)
    t = reg.transform
    share = overlap_share(t.matrix, pair.fixed.shape, pair.moving.shape, pair.fixed_mask)
    metrics = {
        "affine_matrix": t.matrix.tolist(),
        "affine_ncc_after": reg.metrics.get("ncc_after"),
        "initial_overlap": share,
        # whether the affine search kept a start's centred twin (affine.engine.CENTRED_TWIN_TOLERANCE)
        "affine_twin_kept": any(twin["kept"] for twin in reg.metrics.get("search_twins") or []),
    }
    if share < min_overlap:
        why = (
            f"The {kind} global stage was dropped: its map kept only {share:.0%} of the fixed image "
            f"over the moving image (at least {min_overlap:.0%} needed), which happens when the "
            "similarity does not hold (for example two stains under NCC). Check the images are the "
            "same modality (method='histology' registers stains); pass initial='rigid' (or another kind) "
            "to keep the map anyway."
        )
        return GlobalStage(t, pair.moving, pair.moving_mask, done["steps"], metrics, dropped=why)
    moving, mask = pair.moving, pair.moving_mask
    if resample:
        moving, mask = resample_border(pair.moving, t.matrix, pair.fixed.shape), None
    if resample and pair.moving_mask is not None:
        mask = t.warp_labels(np.asarray(pair.moving_mask, np.uint8), output_shape=pair.fixed.shape) > 0
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
