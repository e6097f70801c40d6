"""Resolution levels of the affine engine: pooled images, their frames and the sample points.

Every level is a box-average of the full-resolution image by a power of two per axis (``zoom``).
Level voxel ``i`` averages full voxels ``[i * z, (i + 1) * z)``, so its centre is the full voxel
``(i + 0.5) * z - 0.5``. Maps between frames are homogeneous ``(D + 1, D + 1)`` float64 matrices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def centred_frame(shape, spacing) -> np.ndarray:
    """Homogeneous map from voxel coordinates to centred physical coordinates."""
    d = len(shape)
    m = np.eye(d + 1)
    m[:d, :d] = np.diag(spacing)
    m[:d, d] = -np.asarray(spacing, float) * (np.asarray(shape, float) - 1) / 2.0
    return m


def zoom_frame(zoom) -> np.ndarray:
    """Homogeneous map from level voxels to full-resolution voxels."""
    z = np.asarray(zoom, float)
    m = np.eye(len(z) + 1)
    m[:-1, :-1] = np.diag(z)
    m[:-1, -1] = 0.5 * z - 0.5
    return m


def grid_sample_frame(shape) -> np.ndarray:
    """Homogeneous map from voxels of ``shape`` to ``grid_sample``'s [-1, 1] (``align_corners=True``)."""
    n = np.asarray(shape, float)
    half = np.where(n > 1, (n - 1) / 2.0, 1.0)
    m = np.eye(len(n) + 1)
    m[:-1, :-1] = np.diag(1 / half)
    m[:-1, -1] = -(n - 1) / 2.0 / half
    return m


def plan_zooms(shape, spacing, levels: int | None, coarse_size: int, min_side: int = 8) -> list[np.ndarray]:
    """Per-axis zoom of each level, coarse first.

    An axis is halved while it keeps ``min_side`` voxels and its voxels are not already twice as
    large as the smallest halvable ones (so anisotropic voxels become rounder). Without ``levels``
    halving stops once every axis has at most ``coarse_size`` voxels.
    """
    shape = np.asarray(shape, float)
    sp = np.asarray(spacing, float)
    zooms = [np.ones(len(shape))]
    while levels is None or len(zooms) < levels:
        z = zooms[-1]
        size = shape / z
        if levels is None and size.max() <= coarse_size:
            break
        can = size >= 2 * min_side
        if not can.any():
            break
        level_sp = sp * z
        halve = can & (level_sp < 2 * level_sp[can].min() * 0.999)
        zooms.append(np.where(halve, 2 * z, z))
    return zooms[::-1]


def moving_zoom(mshape, mspacing, target_spacing, min_side: int = 4) -> np.ndarray:
    """Largest power-of-two zoom per axis whose moving voxel is no larger than ``target_spacing``."""
    z = np.ones(len(mshape))
    msp = np.asarray(mspacing, float)
    for a in range(len(z)):
        while msp[a] * z[a] * 2 <= target_spacing[a] * 1.001 and mshape[a] / (2 * z[a]) >= min_side:
            z[a] *= 2
    return z


def pool(image: torch.Tensor, zoom) -> torch.Tensor:
    """Box average of ``(1, 1, *spatial)`` by ``zoom`` (ints) per axis (a last partial box: what it has)."""
    k = tuple(int(v) for v in zoom)
    if all(v == 1 for v in k):
        return image
    op = F.avg_pool2d if image.dim() == 4 else F.avg_pool3d
    return op(image, k, stride=k, ceil_mode=True)


def smooth(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(1, 1, *spatial)`` by ``sigma`` voxels (edges replicated).

    Every level is blurred by one of its voxels (elastix smooths its levels too): without it the
    aliasing of sharp images pulls a linearly interpolated similarity towards whole-voxel shifts
    (a 7.3 voxel shift of the camera image was found as 7.25; with it as 7.29).
    """
    if sigma <= 0:
        return image
    if image.device.type == "cpu":  # scipy's separable filter is several times faster on a CPU
        return torch.from_numpy(
            ndimage.gaussian_filter(image[0, 0].numpy(), sigma, mode="nearest", truncate=2.5)
        )[None, None]
    radius = max(1, int(math.ceil(2.5 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    d = image.dim() - 2
    conv = F.conv2d if d == 2 else F.conv3d
    out = image
    for axis in range(d):
        if image.shape[2 + axis] <= radius:
            continue
        shape = [1] * d
        shape[axis] = k.numel()
        pad = [0] * (2 * d)
        pad[2 * (d - 1 - axis)] = pad[2 * (d - 1 - axis) + 1] = radius
        out = conv(F.pad(out, pad, mode="replicate"), k.reshape(1, 1, *shape))
    return out


@dataclass
class Level:
    """One resolution level: pooled images and the maps from centred physical coordinates."""

    fixed: torch.Tensor  # (1, 1, *shape)
    moving: torch.Tensor  # (1, 1, *mshape)
    fixed_mask: torch.Tensor | None  # float (1, 1, *shape): fraction of each voxel inside the mask
    moving_mask: torch.Tensor | None  # float (1, 1, *mshape)
    zoom: np.ndarray
    moving_zoom: np.ndarray
    to_grid: np.ndarray  # centred physical (moving frame) -> moving level grid_sample coordinates

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.fixed.shape[2:])


class Pyramid:
    """Box averages of one ``(1, 1, *spatial)`` image by power-of-two zooms per axis, each pooled
    from the finest one already made that divides it (so the full image is read once)."""

    def __init__(self, image: torch.Tensor):
        self.cache = {(1,) * (image.dim() - 2): image}

    def __call__(self, zoom) -> torch.Tensor:
        key = tuple(int(v) for v in zoom)
        if key not in self.cache:
            bases = [k for k in self.cache if all(z % c == 0 for z, c in zip(key, k))]
            base = max(bases, key=lambda k: int(np.prod(k)))
            self.cache[key] = pool(self.cache[base], [z // c for z, c in zip(key, base)])
        return self.cache[key]


def build_levels(
    fix: Pyramid,
    mov: Pyramid,
    fixed_mask: Pyramid | None,
    moving_mask: Pyramid | None,
    fspacing,
    mspacing,
    zooms: list[np.ndarray],
    sigma: float = 1.0,
) -> list[Level]:
    """Levels coarse first for fixed zooms ``zooms``; the moving image is pooled to match each."""
    out = []
    mshape = tuple(mov.cache[(1,) * len(mspacing)].shape[2:])
    from_moving = np.linalg.inv(centred_frame(mshape, mspacing))
    for z in zooms[::-1]:  # fine first, so each level is pooled from the one before
        mz = moving_zoom(mshape, mspacing, np.asarray(fspacing) * z)
        m_l = mov(mz)
        fm = None if fixed_mask is None else fixed_mask(z)
        mm = None if moving_mask is None else moving_mask(mz)
        to_grid = grid_sample_frame(m_l.shape[2:]) @ np.linalg.inv(zoom_frame(mz)) @ from_moving
        out.append(Level(smooth(fix(z), sigma), smooth(m_l, sigma), fm, mm, z, mz, to_grid))
    return out[::-1]


def level_points(level: Level, to_fixed: np.ndarray, vox: torch.Tensor | None = None) -> torch.Tensor:
    """Centred physical coordinates ``(N, D)`` float32 of level voxels ``vox`` (default: every voxel)."""
    if vox is None:
        axes = [torch.arange(n, device=level.fixed.device, dtype=torch.float32) for n in level.shape]
        vox = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(level.shape))
    m = torch.as_tensor(to_fixed @ zoom_frame(level.zoom), dtype=torch.float32, device=vox.device)
    return vox @ m[:-1, :-1].T + m[:-1, -1]


def to_unit(vox: torch.Tensor, shape) -> torch.Tensor:
    """Voxel coordinates of a grid of ``shape`` as ``grid_sample`` coordinates in [-1, 1] (numpy order)."""
    m = torch.as_tensor(grid_sample_frame(shape), dtype=torch.float32, device=vox.device)
    return vox @ m[:-1, :-1].T + m[:-1, -1]


def choose_samples(level: Level, samples: int, generator: torch.Generator) -> torch.Tensor:
    """``samples`` random level voxel coordinates ``(N, D)``, uniform over the grid (inside the fixed mask).

    Continuous positions, as elastix's ``RandomCoordinate`` sampler: the fixed image is then
    interpolated like the moving one, so the loss has no pull towards whole-voxel shifts.
    """
    shape = torch.as_tensor(level.shape, dtype=torch.float32) - 1
    d = len(level.shape)
    picked, have = [], 0
    for _ in range(20):
        vox = (torch.rand((2 * samples, d), generator=generator) * shape).to(level.fixed.device)
        if level.fixed_mask is not None:
            vox = vox[sample_moving(level.fixed_mask, to_unit(vox, level.shape)) > 0.5]
        picked.append(vox)
        have += len(vox)
        if have >= samples:
            break
    return torch.cat(picked)[:samples]


def sample_moving(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear/trilinear values of ``image`` (1, 1, *s) at ``grid`` (N, D) in [-1, 1], numpy axis order."""
    d = grid.shape[1]
    g = grid.flip(-1).reshape((1,) + (1,) * (d - 1) + (-1, d))
    return F.grid_sample(image, g, mode="bilinear", padding_mode="zeros", align_corners=True).reshape(-1)
