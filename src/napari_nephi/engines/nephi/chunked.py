"""Divide-and-downsample registration of volumes too large for memory (after DDR-Net, Joshi & Hong).

1. **Global pass.** The pair is downsampled (Gaussian anti-aliasing, slab by slab) by an integer
   factor and registered whole: the coarse velocity stage, then a NePhi field. Its map ``G`` lives in
   normalised coordinates, which the downsampled grid shares with the full one (voxel ``j`` of the
   small grid sits on full voxel ``j * (n - 1) / (m - 1)``), so ``G`` applies at full resolution as is.
2. **Local passes.** The full-resolution grid is split into overlapping chunks. For each chunk the
   moving image is resampled through ``G`` onto the chunk (``moving o G``, read from a crop of the
   moving image around ``G(chunk)``), and a fresh NePhi field ``L_k`` (identity at the start) registers
   the fixed chunk to it: on the chunk, ``phi = G o L_k`` and ``phi_inv = L_k^-1 o G^-1``.
3. **Fusion.** The chunk weights are products of per-axis raised-cosine ramps over the overlap (1
   inside and up to image borders), normalised per axis, so they are a smooth partition of unity.
   Forward: the residual ``r(x) = sum_k w_k(x) (L_k(x) - x)`` is blended on the fixed grid, then
   ``phi(x) = G(x + r(x))`` slab by slab, in place. Backward: ``phi_inv(y) = sum_k w_k(x')
   L_k^-1(x')`` with ``x' = G^-1(y)``, the weights taken at ``x'`` (the frame in which ``L_k^-1`` was
   optimised), accumulated chunk by chunk over the points ``y`` that can reach the chunk.

Only one chunk's tensors live on the device at a time (its fixed and resampled moving crops, points
and field); besides them the process holds the inputs, the global pass (``max_voxels / 8`` voxels by
default) and the two output fields, accumulated in place, so memory stays bounded however large
the volume grows. Intensities are normalised with percentiles of a strided subsample, identical on
every chunk. A chunk (almost) outside the fixed mask keeps the global map.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from ...core.errors import InputError
from ...core.grid import normalized_to_voxel, voxel_to_normalized
from ...core.warp import iter_slabs, slab_grid
from .bspline import intervals_for_spacing
from .coarse import grid_sample_points, level_iterations, optimize_velocity, pyramid_shapes
from .dense import DENSE_CHUNK, dense_displacement
from .field import FieldConfig, NeuralDeformationField, local_grid_shape, zero_codes
from .optimize import Maps, OptimizeSettings, optimize_field
from .smoothing import blur_axis

#: In chunked mode one chunk, and the downsampled global pass, hold at most ``max_voxels / 8`` voxels.
PIECE_FRACTION = 8
#: Voxels of an input read at once when downsampling or sampling crops.
SLAB_VOXELS = 1 << 22
#: A chunk with less of its volume inside the fixed mask keeps the global map (no local pass).
MIN_MASK_FRACTION = 0.01


@dataclass
class ChunkPlan:
    """How a grid of ``shape`` is divided: the global pass's grid and the chunks' boxes."""

    shape: tuple[int, ...]
    global_factor: int
    global_shape: tuple[int, ...]
    chunk_size: tuple[int, ...]
    overlap: int
    ranges: list[list[tuple[int, int]]]  # per axis
    boxes: list[tuple[tuple[int, int], ...]]

    def to_dict(self) -> dict:
        return {
            "global_factor": self.global_factor,
            "global_shape": list(self.global_shape),
            "chunk_size": list(self.chunk_size),
            "chunk_overlap": self.overlap,
            "chunks": len(self.boxes),
        }


def axis_ranges(n: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Ranges ``[start, stop)`` of length ``size`` covering ``0..n`` with at least ``overlap`` in common."""
    if n <= size:
        return [(0, n)]
    count = math.ceil((n - size) / (size - overlap)) + 1
    starts = [round(i * (n - size) / (count - 1)) for i in range(count)]
    return [(s, s + size) for s in starts]


def plan_chunks(
    shape: Sequence[int],
    max_voxels: int,
    chunk_size: int | None = None,
    overlap: int | None = None,
    global_factor: int | None = None,
) -> ChunkPlan:
    """Chunks and global downsampling for ``shape`` within a budget of ``max_voxels``.

    Defaults: chunks are cubes (squares) of ``max_voxels / 8`` voxels, overlapping by a quarter of
    their edge (at least 4); the global pass is downsampled by the smallest integer factor, at least
    2, that brings it to ``max_voxels / 8`` voxels.
    """
    shape = tuple(int(n) for n in shape)
    d = len(shape)
    piece = max(int(max_voxels) // PIECE_FRACTION, 1)
    size = int(chunk_size) if chunk_size is not None else max(16, int(round(piece ** (1 / d))))
    ov = int(overlap) if overlap is not None else max(4, size // 4)
    if size < 8 or not 0 <= ov <= size // 2:
        raise InputError(
            f"chunk_size must be at least 8 voxels and chunk_overlap between 0 and half of it; "
            f"got chunk_size={size}, chunk_overlap={ov}."
        )
    if global_factor is None:
        global_factor = max(2, math.ceil((math.prod(shape) / piece) ** (1 / d)))
    factor = int(global_factor)
    if factor < 1:
        raise InputError("global_factor must be a positive integer.")
    gshape = tuple(min(n, max(4, math.ceil((n - 1) / factor) + 1)) for n in shape)
    per_axis = [axis_ranges(n, size, ov) for n in shape]
    boxes = list(itertools.product(*per_axis))
    return ChunkPlan(shape, factor, gshape, tuple(min(n, size) for n in shape), ov, per_axis, boxes)


# -- intensities and downsampling ---------------------------------------------------------


def intensity_range(image: np.ndarray, max_samples: int = 1 << 21, low=0.5, high=99.5) -> tuple[float, float]:
    """Percentiles ``low``/``high`` of a strided subsample (all voxels when they are few)."""
    step = max(1, math.ceil((image.size / max_samples) ** (1 / image.ndim)))
    sub = np.asarray(image[(slice(None, None, step),) * image.ndim], dtype=np.float64)
    lo, hi = np.percentile(sub, [low, high])
    if hi <= lo:
        lo, hi = float(sub.min()), float(sub.max())
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _normalise(block: np.ndarray, rng: tuple[float, float], device) -> torch.Tensor:
    lo, hi = rng
    t = torch.as_tensor(np.asarray(block, dtype=np.float32), device=device)
    return ((t - lo) / (hi - lo)).clamp_(0, 1)


def _blur_axis(t: torch.Tensor, axis: int, sigma: float) -> torch.Tensor:
    if sigma <= 0 or t.shape[axis] < 2:
        return t
    return blur_axis(t, axis, sigma, max(1, math.ceil(3 * sigma)))


def _resample_axis(t: torch.Tensor, axis: int, pos: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``t`` along ``axis`` at positions ``pos`` (voxels of that axis)."""
    n = t.shape[axis]
    if n == 1:
        return t.index_select(axis, torch.zeros(len(pos), dtype=torch.long, device=t.device))
    i0 = pos.floor().clamp(0, n - 2)
    w = (pos - i0).clamp(0, 1)
    i0 = i0.long()
    a = t.index_select(axis, i0)
    b = t.index_select(axis, i0 + 1)
    view = [1] * t.dim()
    view[axis] = len(pos)
    return a + (b - a) * w.reshape(view).to(t.dtype)


def downsample(image: np.ndarray, out_shape: Sequence[int], rng, device, slab_voxels: int | None = None):
    """``image`` normalised with ``rng`` and resampled to ``out_shape`` on the align-corners grid.

    Gaussian anti-aliasing (sigma ``(scale - 1) / 2`` voxels per axis) then linear sampling at full
    voxels ``j * (n - 1) / (m - 1)``; read slab by slab, so only a slab of the input is on the
    device. Returns ``(1, 1, *out_shape)`` float32.
    """
    if slab_voxels is None:  # read at the call (session 40)
        slab_voxels = SLAB_VOXELS
    shape = image.shape
    out_shape = tuple(int(m) for m in out_shape)
    scale = [(n - 1) / (m - 1) if m > 1 else 1.0 for n, m in zip(shape, out_shape)]
    sigma = [max(0.0, (s - 1) / 2) for s in scale]
    pos = [torch.arange(m, dtype=torch.float64, device=device) * s for m, s in zip(out_shape, scale)]
    rad0 = math.ceil(3 * sigma[0]) + 1 if sigma[0] > 0 else 1
    row_voxels = max(1, math.prod(shape[1:]))
    rows = max(1, int(slab_voxels // (row_voxels * max(scale[0], 1.0))))
    out = torch.empty(out_shape, dtype=torch.float32, device=device)
    for j0 in range(0, out_shape[0], rows):
        j1 = min(out_shape[0], j0 + rows)
        lo = max(0, int(math.floor(float(pos[0][j0]))) - rad0)
        hi = min(shape[0], int(math.floor(float(pos[0][j1 - 1]))) + 2 + rad0)
        slab = _normalise(image[lo:hi], rng, device)
        for a, s in enumerate(sigma):
            slab = _blur_axis(slab, a, s)
        slab = _resample_axis(slab, 0, pos[0][j0:j1] - lo)
        for a in range(1, len(shape)):
            slab = _resample_axis(slab, a, pos[a])
        out[j0:j1] = slab
    return out[None, None]


def _sample_crop(volume: np.ndarray, points: torch.Tensor, rng, channels: bool = False) -> torch.Tensor:
    """Sample a (normalised, if ``rng``) numpy ``volume`` at voxel ``points`` ``(N, D)``; ``(C, N)``.

    Only the bounding box of the points (plus one voxel) is read; points outside the volume take
    the border value. ``channels``: ``volume`` is ``(C, *spatial)``.
    """
    spatial = volume.shape[1:] if channels else volume.shape
    d = len(spatial)
    upper = torch.as_tensor(spatial, dtype=points.dtype, device=points.device) - 1
    p = torch.minimum(points.clamp_min(0), upper)
    lo = [max(0, int(math.floor(float(v))) - 1) for v in p.min(0).values]
    hi = [min(n, int(math.ceil(float(v))) + 2) for n, v in zip(spatial, p.max(0).values)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    crop = volume[(slice(None),) + box] if channels else volume[box]
    if rng is not None:
        t = _normalise(crop, rng, points.device)
    else:
        t = torch.as_tensor(np.asarray(crop, dtype=np.float32), device=points.device)
    t = t if channels else t[None]
    local = p - torch.as_tensor(lo, dtype=p.dtype, device=p.device)
    crop_shape = tuple(b - a for a, b in zip(lo, hi))
    pts = voxel_to_normalized(local, crop_shape)
    # a size-1 axis of the crop: any normalised coordinate samples its only voxel
    for a in range(d):
        if crop_shape[a] == 1:
            pts[:, a] = 0
    return grid_sample_points(t[None], pts[None])[0]


def _map_voxels(point_map, vox: torch.Tensor, shape) -> torch.Tensor:
    """A map in normalised coordinates of ``shape`` applied to voxel points ``(N, D)``."""
    out = torch.empty_like(vox)
    for s in range(0, len(vox), DENSE_CHUNK):
        x = voxel_to_normalized(vox[s : s + DENSE_CHUNK], shape)
        out[s : s + DENSE_CHUNK] = normalized_to_voxel(point_map(x[None])[0], shape)
    return out


def _box_grid(box, device) -> torch.Tensor:
    axes = [torch.arange(a, b, device=device, dtype=torch.float32) for a, b in box]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(box))


def _ramp(pos, lo: int, hi: int, n: int, overlap: int):
    """Raised-cosine ramp of the range ``[lo, hi)`` at (continuous) positions ``pos`` of an axis of ``n``.

    1 farther than ``overlap`` voxels from an edge that another range continues (edges on the
    image border keep 1), falling to 0 one voxel beyond the range; C1 at both ends of the ramp.
    """
    lib = torch if isinstance(pos, torch.Tensor) else np
    dist = lib.full_like(pos, math.inf)
    if lo > 0:
        dist = lib.minimum(dist, pos - lo)
    if hi < n:
        dist = lib.minimum(dist, hi - 1 - pos)
    t = lib.clip((dist + 1) / (overlap + 1), 0, 1) if overlap > 0 else (dist > -1) * 1.0
    return 0.5 - 0.5 * lib.cos(math.pi * t)


def axis_weight(pos, ranges, index: int, n: int, overlap: int):
    """Weight of range ``ranges[index]`` of an axis at ``pos``, normalised over all ``ranges``.

    The normalised weights of an axis sum to 1 wherever a range covers ``pos``; the weight of a
    chunk is the product of its ranges' weights, so chunk weights are a partition of unity too.
    """
    ramps = [_ramp(pos, lo, hi, n, overlap) for lo, hi in ranges]
    total = sum(ramps)
    return ramps[index] / (
        total.clamp_min(1e-12) if isinstance(total, torch.Tensor) else np.maximum(total, 1e-12)
    )


def blend_weights(plan: ChunkPlan, k: int) -> np.ndarray:
    """Normalised weight of chunk ``k`` of ``plan`` on the voxels of its box (float32)."""
    box = plan.boxes[k]
    w = np.ones([b - a for a, b in box], np.float32)
    for axis, (a, b) in enumerate(box):
        ranges = plan.ranges[axis]
        prof = axis_weight(
            np.arange(a, b, dtype=np.float64), ranges, ranges.index((a, b)), plan.shape[axis], plan.overlap
        )
        view = [1] * len(box)
        view[axis] = b - a
        w = w * prof.astype(np.float32).reshape(view)
    return w


def _point_weights(plan: ChunkPlan, k: int, pos: torch.Tensor) -> torch.Tensor:
    """Normalised weight of chunk ``k`` at voxel points ``pos`` ``(N, D)`` inside the grid."""
    w = torch.ones(len(pos), dtype=pos.dtype, device=pos.device)
    for axis, (a, b) in enumerate(plan.boxes[k]):
        ranges = plan.ranges[axis]
        w = w * axis_weight(pos[:, axis], ranges, ranges.index((a, b)), plan.shape[axis], plan.overlap)
    return w


# -- the passes ---------------------------------------------------------------------------


def point_counts(nvox: int, sample_fraction: float, sample_points, reg_points, caps: dict) -> tuple[int, int]:
    """Similarity and regulariser points for a problem of ``nvox`` voxels (the engine's rule;
    ``caps``: the preset's ``min_sample_points``, ``max_sample_points`` and ``max_reg_points``)."""
    if sample_points is None:
        low = min(nvox, caps["min_sample_points"])
        sample_points = min(max(round(sample_fraction * nvox), low), caps["max_sample_points"])
    if reg_points is None:
        reg_points = min(max(round(1e-4 * nvox), 64), caps["max_reg_points"])
    return int(max(sample_points, 16)), int(reg_points)


def optimize_pair(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    cfg: FieldConfig,
    settings: OptimizeSettings,
    levels: int,
    coarse_iterations: int,
    coarse_reg_weight: float,
    local_stride: int,
    seed: int,
    report: Callable[[str, float, object], None],
    stage: str,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    finer_level: bool = True,
    match_blur: bool | str | None = None,
    flat_fill: bool = True,
    flat_noisy: bool = False,
    warp_blur: bool | str | None = None,
) -> tuple[Maps, list[float]]:
    """The optimise mode on one pair ``(1, 1, *shape)``: coarse stage (``levels > 1``) + NePhi field;
    ``warp_blur`` as :func:`.coarse.optimize_velocity`'s (None: ``coarse.WARP_BLUR_3D``)."""
    shape = tuple(fixed.shape[2:])
    factors = [2**k for k in range(levels - 1, 0, -1)]
    shapes = pyramid_shapes(shape, factors) if levels > 1 else []
    coarse = None
    if shapes and coarse_iterations > 0:
        coarse = optimize_velocity(
            fixed,
            moving,
            shapes,
            coarse_iterations,
            coarse_reg_weight,
            settings.similarity,
            lambda loss: report(f"{stage}: coarse", loss, None),
            fixed_mask=fixed_mask,
            moving_mask=moving_mask,
            finer_level=finer_level,
            match_blur=match_blur,
            flat_fill=flat_fill,
            flat_noisy=flat_noisy,
            frame_mask=settings.frame_mask,
            warp_blur=warp_blur,
        )
    field = NeuralDeformationField(cfg).to(fixed.device)
    codes = zero_codes(cfg, local_grid_shape(shape, local_stride), device=fixed.device)
    maps, history = Maps(field, codes, coarse), []
    if settings.iterations > 0:
        maps, history = optimize_field(
            field,
            codes,
            fixed,
            moving,
            settings,
            coarse=coarse,
            on_step=lambda loss, m: report(stage, loss, m),
            seed=seed,
            fixed_mask=fixed_mask,
            moving_mask=moving_mask,
        )
    return maps, history


def total_steps(
    plan: ChunkPlan,
    levels: int,
    coarse_iterations: int,
    iterations: int,
    chunk_iterations: int,
    finer_level: bool = True,
) -> int:
    """Progress steps of :func:`register_chunked` (``finer_level``: whether the finer-knot level runs)."""
    shapes = pyramid_shapes(plan.global_shape, [2**k for k in range(levels - 1, 0, -1)]) if levels > 1 else []
    return (
        sum(level_iterations(coarse_iterations, len(shapes), finer_level))
        + iterations
        + chunk_iterations * len(plan.boxes)
    )


def register_chunked(
    fixed: np.ndarray,
    moving: np.ndarray,
    plan: ChunkPlan,
    cfg: FieldConfig,
    settings: OptimizeSettings,
    chunk_settings: Callable[[int], OptimizeSettings],
    levels: int,
    coarse_iterations: int,
    coarse_reg_weight: float,
    local_stride: int,
    bspline_spacing: float,
    device,
    report: Callable[[str, float, object], None],
    check: Callable[[], None],
    seed: int = 0,
    fixed_mask: np.ndarray | None = None,
    moving_mask: np.ndarray | None = None,
    backward: bool = True,
    coarse_finer_level: bool = True,
    coarse_match_blur: bool | str | None = None,
    coarse_flat_fill: bool = True,
    coarse_flat_noisy: bool = False,
    coarse_warp_blur: bool | str | None = None,
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Divide-and-downsample registration of ``moving`` onto ``fixed`` (same grid, numpy arrays).

    ``settings`` drive the global pass; ``chunk_settings(voxels)`` gives those of a chunk with that
    many voxels. ``report(stage, loss, map)`` is called every step (it may raise ``Cancelled``);
    ``check()`` between chunks. Returns the forward displacement, the backward one (or None) in
    voxels of the grid, ``(D, *shape)`` float32, and a dict of information for the metrics.
    """
    shape = tuple(fixed.shape)
    d = len(shape)
    frng, mrng = intensity_range(fixed), intensity_range(moving)

    # 1. global pass on the downsampled pair
    with torch.no_grad():
        fix_g = downsample(fixed, plan.global_shape, frng, device)
        mov_g = downsample(moving, plan.global_shape, mrng, device)
        fm_g = None if fixed_mask is None else downsample(fixed_mask, plan.global_shape, (0.0, 1.0), device)
        mm_g = None if moving_mask is None else downsample(moving_mask, plan.global_shape, (0.0, 1.0), device)
    gcfg = cfg
    if bspline_spacing > 0:
        gcfg = replace(cfg, bspline_intervals=intervals_for_spacing(plan.global_shape, bspline_spacing))
    gmaps, ghistory = optimize_pair(
        fix_g,
        mov_g,
        gcfg,
        settings,
        levels,
        coarse_iterations,
        coarse_reg_weight,
        local_stride,
        seed,
        report,
        "global",
        fm_g,
        mm_g,
        finer_level=coarse_finer_level,
        match_blur=coarse_match_blur,
        flat_fill=coarse_flat_fill,
        flat_noisy=coarse_flat_noisy,
        warp_blur=coarse_warp_blur,
    )
    del fix_g, mov_g, fm_g, mm_g
    gforward, gbackward = _frozen(gmaps.forward), _frozen(gmaps.backward)
    # matched-blur variances and the flat fill of the global pass's coarse stage (None / {}: not run)
    gcoarse = getattr(gmaps, "coarse", None)
    gblur = getattr(gcoarse, "blur_variance", None)
    gflat_share, gflat_info = getattr(gcoarse, "flat_share", None), getattr(gcoarse, "flat_fill_info", {})

    # 2. local passes. Forward: the blended residual sum_k w_k(x) (L_k(x) - x) on the fixed grid.
    # Backward: phi_inv(y) - y = sum_k w_k(x') (L_k^-1(x') - y), x' = G^-1(y), weights taken at x'
    # (the chunk whose frame x' lies in); y within max|G^-1 - id| of chunk k's box.
    fwd = np.zeros((d, *shape), np.float32)
    bwd = np.zeros((d, *shape), np.float32) if backward else None
    reach = _max_displacement(gbackward, shape, device) if backward else 0.0
    histories = []
    for k, box in enumerate(plan.boxes):
        check()
        sl = tuple(slice(a, b) for a, b in box)
        cshape = tuple(b - a for a, b in box)
        with torch.no_grad():
            fix_c = _normalise(fixed[sl], frng, device)[None, None]
            y = _map_voxels(gforward, _box_grid(box, device), shape)  # G(x) in full voxels
            mov_c = _sample_crop(moving, y, mrng).reshape(1, 1, *cshape)
            fm_c = None
            if fixed_mask is not None:
                fm_c = torch.as_tensor(np.asarray(fixed_mask[sl], np.float32), device=device)[None, None]
            mm_c = None if moving_mask is None else _sample_crop(moving_mask, y, None).reshape(1, 1, *cshape)
            del y
        stage = f"chunk {k + 1}/{len(plan.boxes)}"
        local_settings = chunk_settings(math.prod(cshape))
        if fm_c is not None and float(fm_c.mean()) < MIN_MASK_FRACTION:
            # (almost) outside the fixed mask: nothing to align, the global map stands
            for _ in range(local_settings.iterations):
                report(stage, None, None)
            local_settings = replace(local_settings, iterations=0)
        ccfg = replace(cfg, seed=cfg.seed + 1 + k)
        if bspline_spacing > 0:
            ccfg = replace(ccfg, bspline_intervals=intervals_for_spacing(cshape, bspline_spacing))
        maps, history = optimize_pair(
            fix_c,
            mov_c,
            ccfg,
            local_settings,
            1,
            0,
            coarse_reg_weight,
            local_stride,
            seed + 1 + k,
            report,
            stage,
            fm_c,
            mm_c,
        )
        del fix_c, mov_c, fm_c, mm_c
        histories.append(history)
        with torch.no_grad():
            fwd[(slice(None),) + sl] += blend_weights(plan, k) * dense_displacement(
                maps.forward, cshape, device
            )
            if backward:
                _add_backward(bwd, plan, k, maps.backward, gbackward, reach, device)
        del maps
    check()

    # 3. fusion of the forward map, in place: phi(x) = G(x + residual(x)), slab by slab
    with torch.no_grad():
        for a, b in iter_slabs(shape, DENSE_CHUNK):
            x = slab_grid(shape, a, b, device)
            res = torch.as_tensor(fwd[:, a:b].reshape(d, -1), device=device).T
            y = _map_voxels(gforward, x + res, shape)
            fwd[:, a:b] = (y - x).T.reshape(d, b - a, *shape[1:]).cpu().numpy()
    info = {
        **plan.to_dict(),
        "global_final_loss": ghistory[-1] if ghistory else None,
        "coarse_blur_variance": gblur,
        "coarse_flat_share": gflat_share,
        "coarse_flat_fill_info": gflat_info,
        "chunk_final_losses": [h[-1] if h else None for h in histories],
    }
    return fwd, bwd, info


def _max_displacement(point_map, shape, device) -> float:
    """Largest ``|point_map(y) - y|`` along any axis over the voxels of ``shape`` (voxels)."""
    worst = 0.0
    for a, b in iter_slabs(shape, DENSE_CHUNK):
        y = slab_grid(shape, a, b, device)
        worst = max(worst, float((_map_voxels(point_map, y, shape) - y).abs().max()))
    return worst


def _add_backward(out: np.ndarray, plan: ChunkPlan, k: int, local_backward, gbackward, reach: float, device):
    """Add chunk ``k``'s share ``w_k(x') (L_k^-1(x') - y)``, ``x' = G^-1(y)``, to ``out`` in place."""
    shape, box = plan.shape, plan.boxes[k]
    d = len(shape)
    pad = int(math.ceil(reach)) + 1
    ybox = tuple((max(0, a - pad), min(n, b + pad)) for (a, b), n in zip(box, shape))
    yshape = tuple(b - a for a, b in ybox)
    start = torch.as_tensor([a for a, _ in box], dtype=torch.float32, device=device)
    cshape = tuple(b - a for a, b in box)
    upper = torch.as_tensor(shape, dtype=torch.float32, device=device) - 1
    acc = torch.zeros(d, math.prod(yshape), device=device)
    grid = _box_grid(ybox, device)
    for s in range(0, len(grid), DENSE_CHUNK):
        y = grid[s : s + DENSE_CHUNK]
        xp = _map_voxels(gbackward, y, shape)
        w = _point_weights(plan, k, torch.minimum(xp.clamp_min(0), upper))
        keep = torch.nonzero(w > 0).squeeze(1)
        if len(keep) == 0:
            continue
        local = xp[keep] - start  # chunk voxels
        back = _map_voxels(local_backward, local, cshape) + start
        acc[:, s + keep] = (w[keep, None] * (back - y[keep])).T
    sl = (slice(None),) + tuple(slice(a, b) for a, b in ybox)
    out[sl] += acc.reshape(d, *yshape).cpu().numpy()


def _frozen(point_map):
    def run(x):
        with torch.no_grad():
            return point_map(x)

    return run
