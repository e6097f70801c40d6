"""Resample images, labels and points through a coordinate map, in chunks.

A *map* is a function taking voxel coordinates of the output (fixed) grid, a torch tensor
``(N, D)``, and returning voxel coordinates in the input (moving) image. Output is computed a
slab of rows at a time, so the full coordinate grid is never held in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .device import memory_guard
from .errors import Cancelled, DimensionMismatchError, InputError
from .grid import to_grid_sample
from .progress import CancelFlag, Progress, is_cancelled

PointMap = Callable[[torch.Tensor], torch.Tensor]

#: Output voxels computed per chunk (about 12 MB of float32 coordinates in 3D).
CHUNK_VOXELS = 1 << 20


def _slab_rows(shape: Sequence[int], chunk_voxels: int) -> int:
    per_row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return max(1, chunk_voxels // max(per_row, 1))


def iter_slabs(shape: Sequence[int], chunk_voxels: int = CHUNK_VOXELS):
    """Yield ``(start, stop)`` ranges along axis 0 whose slabs hold about ``chunk_voxels``."""
    rows = _slab_rows(shape, chunk_voxels)
    for start in range(0, shape[0], rows):
        yield start, min(shape[0], start + rows)


def slab_count(shape: Sequence[int], chunk_voxels: int = CHUNK_VOXELS) -> int:
    """How many slabs :func:`iter_slabs` yields (without making them)."""
    return len(range(0, shape[0], _slab_rows(shape, chunk_voxels)))


def slab_grid(shape: Sequence[int], start: int, stop: int, device, dtype=torch.float32):
    """Voxel coordinates ``(n, D)`` of rows ``start:stop`` of a grid of ``shape``."""
    axes = [torch.arange(start, stop, device=device, dtype=dtype)]
    axes += [torch.arange(n, device=device, dtype=dtype) for n in shape[1:]]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape))


def sample(volume: torch.Tensor, points: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Sample ``volume`` (C, *spatial) at voxel ``points`` (N, D); zero outside. Returns (C, N)."""
    d = points.shape[-1]
    spatial = volume.shape[1:]
    grid = to_grid_sample(points, spatial).reshape((1,) + (1,) * (d - 1) + (-1, d))
    out = F.grid_sample(
        volume[None].to(points.dtype), grid, mode=mode, padding_mode="zeros", align_corners=True
    )
    return out.reshape(volume.shape[0], -1)


#: Most channels a channels-last image may have (RGB(A) has 3 or 4).
MAX_CHANNELS = 4


def channels_last(shape: Sequence[int], ndim: int) -> bool:
    """Whether an array of ``shape`` is an ``ndim``-D image with channels last (else it is plain ``ndim``-D).

    Channels last means one axis more than ``ndim``, at most :data:`MAX_CHANNELS` long (RGB(A)).
    Anything else raises :class:`DimensionMismatchError`: a 3D volume is never warped by a 2D
    transform as if its x axis were channels.
    """
    shape = tuple(shape)
    if len(shape) == ndim:
        return False
    if len(shape) == ndim + 1 and 1 <= shape[-1] <= MAX_CHANNELS:
        return True
    if len(shape) == ndim + 1:
        raise DimensionMismatchError(
            f"Cannot warp an array of shape {shape} with a {ndim}D transform: it has {len(shape)} axes and "
            f"its last axis ({shape[-1]}) is too long to be colour channels (at most {MAX_CHANNELS}). "
            f"Give a {ndim}D image (or {ndim}D with RGB(A) channels last), e.g. warp each section of a "
            f"stack separately, or use a {len(shape)}D transform."
        )
    raise DimensionMismatchError(
        f"Cannot warp a {len(shape)}D array of shape {shape} with a {ndim}D transform; the image must "
        f"be {ndim}D, or {ndim}D with RGB(A) channels last."
    )


def _as_channels(image: np.ndarray, ndim: int) -> tuple[np.ndarray, bool]:
    if channels_last(image.shape, ndim):
        return np.moveaxis(image, -1, 0), True  # channels last, as RGB histology
    return image[None], False


#: A warp's ``progress``: called with ``(done, total)`` chunks of the output, first ``(0, total)``.
ChunkProgress = Callable[[int, int], object]


class _StopFlag:
    """A warp's ``cancel`` and ``progress``, checked when made (``cancel``: an Event, a callable or None;
    ``progress``: a callable or None; else :class:`InputError`)."""

    def __init__(self, cancel: CancelFlag, progress: ChunkProgress | None = None):
        Progress(cancel=cancel)  # its check of what ``cancel`` is
        if progress is not None and not callable(progress):
            raise InputError(
                "progress must be a function taking (done, total) chunks of the warp (or None), "
                f"got {type(progress).__name__}."
            )
        self.cancel, self.progress = cancel, progress
        self.total = 0

    def check(self) -> None:
        """Raise :class:`Cancelled` once the flag is set (checked before each chunk)."""
        if is_cancelled(self.cancel):
            raise Cancelled("Warp cancelled.")

    def start(self, out_shape: Sequence[int], chunk_voxels: int) -> None:
        """With a ``progress``: count the chunks and report ``(0, total)``. Without one, nothing."""
        if self.progress is not None:
            self.total = slab_count(out_shape, chunk_voxels)
            self.progress(0, self.total)

    def done(self, chunks: int) -> None:
        """With a ``progress``: ``chunks`` of the output are written."""
        if self.progress is not None:
            self.progress(chunks, self.total)


def warp_image(
    image,
    point_map: PointMap,
    ndim: int,
    output_shape: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    chunk_voxels: int = CHUNK_VOXELS,
    *,
    cancel: CancelFlag = None,
    progress: ChunkProgress | None = None,
) -> np.ndarray:
    """Linearly resample ``image`` at ``point_map(x)`` for every voxel ``x`` of the output grid.

    Channels-last images are warped channel by channel. Values outside are 0. Returns float32.
    ``cancel`` (a ``threading.Event`` or a callable) is checked before each chunk; once it is set,
    :class:`~napari_nephi.core.errors.Cancelled` is raised. Anything else raises :class:`InputError`.
    ``progress`` (a callable or None) is called with ``(0, total)`` before the first chunk and
    ``(done, total)`` after each one (:data:`ChunkProgress`); None leaves the warp as it was.
    """
    stop_flag = _StopFlag(cancel, progress)
    img = np.asarray(image)
    if img.dtype == bool:
        img = img.astype(np.float32)
    chans, has_channels = _as_channels(img, ndim)
    out_shape = tuple(output_shape) if output_shape is not None else chans.shape[1:]
    with memory_guard("warp"), torch.no_grad():
        vol = torch.as_tensor(np.ascontiguousarray(chans, dtype=np.float32), device=device)
        out = np.empty((chans.shape[0], *out_shape), dtype=np.float32)
        stop_flag.start(out_shape, chunk_voxels)
        for k, (start, stop) in enumerate(iter_slabs(out_shape, chunk_voxels), 1):
            stop_flag.check()
            pts = point_map(slab_grid(out_shape, start, stop, device))
            vals = sample(vol, pts)
            out[:, start:stop] = vals.reshape(chans.shape[0], stop - start, *out_shape[1:]).cpu()
            stop_flag.done(k)
    return np.moveaxis(out, 0, -1) if has_channels else out[0]


def warp_labels(
    labels,
    point_map: PointMap,
    ndim: int,
    output_shape: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    chunk_voxels: int = CHUNK_VOXELS,
    *,
    cancel: CancelFlag = None,
    progress: ChunkProgress | None = None,
) -> np.ndarray:
    """Nearest-neighbour resampling that keeps dtype and label values exactly; 0 outside.

    ``cancel``, ``progress``: as for :func:`warp_image`.
    """
    stop_flag = _StopFlag(cancel, progress)
    lab = np.asarray(labels)
    if lab.ndim != ndim:
        raise DimensionMismatchError(
            f"Labels are {lab.ndim}D but the transform is {ndim}D; give labels of the moving image."
        )
    if lab.dtype.kind not in "biu":
        if not np.all(np.isfinite(lab)) or np.any(lab != np.round(lab)):
            raise InputError("Labels must hold integer values; got non-integer numbers.")
    out_shape = tuple(output_shape) if output_shape is not None else lab.shape
    flat = lab.reshape(-1)
    strides = torch.as_tensor([int(np.prod(lab.shape[i + 1 :])) for i in range(ndim)], dtype=torch.int64)
    upper = torch.as_tensor(lab.shape, dtype=torch.int64)
    with memory_guard("label warp"), torch.no_grad():
        out = np.zeros(out_shape, dtype=lab.dtype)
        stop_flag.start(out_shape, chunk_voxels)
        for k, (start, stop) in enumerate(iter_slabs(out_shape, chunk_voxels), 1):
            stop_flag.check()
            pts = point_map(slab_grid(out_shape, start, stop, device)).cpu()
            idx = torch.floor(pts + 0.5).to(torch.int64)
            inside = ((idx >= 0) & (idx < upper)).all(dim=1) & torch.isfinite(pts).all(dim=1)
            lin = (idx.clamp_min(0) * strides).sum(dim=1)
            slab = np.zeros(lin.shape[0], dtype=lab.dtype)
            ins = inside.numpy()
            slab[ins] = flat[lin.numpy()[ins]]
            out[start:stop] = slab.reshape(stop - start, *out_shape[1:])
            stop_flag.done(k)
    return out


def map_points_chunked(
    points, point_map: PointMap, device: torch.device | str = "cpu", chunk: int = CHUNK_VOXELS
) -> np.ndarray:
    """Apply a map to an ``(N, D)`` array of points, returning float64 numpy."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2:
        raise InputError(f"Points must be an (N, D) array, got shape {pts.shape}.")
    with memory_guard("point mapping"), torch.no_grad():
        out = np.empty_like(pts)
        for s in range(0, len(pts), chunk):
            t = torch.as_tensor(pts[s : s + chunk], dtype=torch.float32, device=device)
            out[s : s + chunk] = point_map(t).cpu().numpy()
    return out


def displacement_field(
    point_map: PointMap,
    shape: Sequence[int],
    device: torch.device | str = "cpu",
    chunk_voxels: int = CHUNK_VOXELS,
) -> np.ndarray:
    """``point_map(x) - x`` on every voxel of ``shape``, as ``(D, *shape)`` float32."""
    shape = tuple(int(s) for s in shape)
    with memory_guard("dense displacement field"), torch.no_grad():
        out = np.empty((len(shape), *shape), dtype=np.float32)
        for start, stop in iter_slabs(shape, chunk_voxels):
            x = slab_grid(shape, start, stop, device)
            u = (point_map(x) - x).T.reshape(len(shape), stop - start, *shape[1:])
            out[:, start:stop] = u.cpu().numpy()
    return out
