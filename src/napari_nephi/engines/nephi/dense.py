"""Dense results of a field: displacement on a grid in chunks, inverse consistency, previews."""

from __future__ import annotations

import time

import numpy as np
import torch

from ...core.grid import normalized_to_voxel, voxel_to_normalized
from ...core.registration import Pair
from ...core.transform import DisplacementTransform
from ...core.warp import displacement_field, iter_slabs, slab_grid, warp_image
from .coarse import grid_sample_points

#: Points evaluated at once when a field is made dense.
DENSE_CHUNK = 1 << 14
#: Output voxels per slab when the result warps the moving image (:func:`warped_image`): a quarter of
#: :data:`napari_nephi.core.warp.CHUNK_VOXELS`, whose slabs of 2^20 points held about 40 MiB of coordinate
#: temporaries at once (session 43: the 2048^2 peak of ``benchmarks/nephi_memory.py``).
WARP_CHUNK = 1 << 18


def dense_displacement(point_map, shape, device, chunk: int | None = None) -> np.ndarray:
    """``phi(x) - x`` in voxels on every voxel of ``shape`` for a map in normalised coordinates."""
    if chunk is None:  # read at the call (session 40)
        chunk = DENSE_CHUNK

    def voxel_map(v: torch.Tensor) -> torch.Tensor:
        y = point_map(voxel_to_normalized(v, shape)[None])[0]
        return normalized_to_voxel(y, shape)

    return displacement_field(voxel_map, shape, device, chunk_voxels=chunk)


def warped_image(transform, image, shape, device, chunk: int | None = None) -> np.ndarray:
    """``transform.warp(image, output_shape=shape, device=device)`` in slabs of ``chunk`` output voxels (None:
    :data:`WARP_CHUNK`, read at the call): every voxel is sampled alone, so the values do not depend on it.
    Unlike ``Transform.warp`` it skips the output-memory check: the output has the fixed image's shape, of
    which the registration that made ``transform`` already held several fields."""
    if chunk is None:
        chunk = WARP_CHUNK
    return warp_image(np.asarray(image), transform.for_moving_image(), transform.ndim, shape, device, chunk)


def inverse_consistency(transform: DisplacementTransform, chunk: int | None = None) -> dict:
    """Mean and max of ``|phi_inv(phi(x)) - x|`` (voxels) over the voxels ``phi`` keeps inside."""
    if chunk is None:  # read at the call (session 40)
        chunk = DENSE_CHUNK
    shape = transform.shape
    inverse = transform.inverse()
    upper = torch.as_tensor(shape, dtype=torch.float32) - 1
    total, count, worst = 0.0, 0, 0.0
    with torch.no_grad():
        for a, b in iter_slabs(shape, chunk):
            x = slab_grid(shape, a, b, "cpu")
            y = transform(x)
            err = (inverse(y) - x).norm(dim=1)[((y >= 0) & (y <= upper)).all(1)]
            if err.numel():
                total, count = total + float(err.sum()), count + err.numel()
                worst = max(worst, float(err.max()))
    mean = total / count if count else float("nan")
    return {"inverse_consistency_mean": mean, "inverse_consistency_max": worst}


class Previewer:
    """Warped moving image for progress previews, self-throttled to ~10% of the run time."""

    def __init__(self, pair: Pair, moving_on_fixed: np.ndarray, shape, device):
        self.pair, self.shape, self.device = pair, tuple(shape), device
        self.moving = None
        self.raw = moving_on_fixed
        self.next_ok = 0.0

    def maybe(self, point_map):
        if point_map is None or not self.pair.progress.wants_preview or time.monotonic() < self.next_ok:
            return None
        t0 = time.monotonic()
        if self.moving is None:
            self.moving = torch.as_tensor(np.asarray(self.raw, np.float32), device=self.device)[None, None]
        out = np.empty(self.shape, np.float32)
        with torch.no_grad():
            for a, b in iter_slabs(self.shape, DENSE_CHUNK):
                v = slab_grid(self.shape, a, b, self.device)
                y = point_map(voxel_to_normalized(v, self.shape)[None])
                vals = grid_sample_points(self.moving, y, padding="zeros")
                out[a:b] = vals.reshape(b - a, *self.shape[1:]).cpu().numpy()
        self.next_ok = time.monotonic() + 9 * (time.monotonic() - t0)
        return out


def mask_tensor(mask, device) -> torch.Tensor | None:
    """A mask as a float tensor of shape (1, 1, *shape) on ``device``, or None."""
    if mask is None:
        return None
    return torch.as_tensor(np.asarray(mask, np.float32), device=device)[None, None]


def inside_mask(displacement: np.ndarray, shape) -> np.ndarray:
    """Voxels of the fixed grid whose image ``x + u(x)`` lies inside a grid of ``shape``."""
    d = displacement.shape[0]
    ok = np.ones(displacement.shape[1:], bool)
    for s, e in iter_slabs(ok.shape, 1 << 16):  # slabs: float32 temporaries stay small
        for a in range(d):
            n = displacement.shape[1 + a] if a else e - s
            idx = np.arange(n, dtype=np.float32) + (s if a == 0 else 0)
            y = idx.reshape([-1 if k == a else 1 for k in range(d)]) + displacement[a, s:e]
            ok[s:e] &= (y >= 0) & (y <= shape[a] - 1)
    return ok
