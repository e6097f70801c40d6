"""Multi-resolution intensity-based linear registration in torch.

The map is optimised in centred physical coordinates (``(v - centre) * spacing``), so rotations
stay rotations on anisotropic grids: ``y = A x + t``. ``kind`` picks the parameterisation:
``translation``, ``rigid`` (rotation by the exponential of a skew-symmetric matrix),
``similarity`` (plus isotropic scale) or ``affine`` (free matrix).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...core.device import choose_device, memory_guard, reset_peak_memory
from ...core.errors import InputError
from ...core.inputs import normalize_intensity
from ...core.metrics import memory_report, similarity_report
from ...core.registration import Pair, Registration
from ...core.similarity import loss as similarity_loss
from ...core.similarity import ncc
from ...core.transform import AffineTransform
from ...core.warp import sample
from ..registry import register_engine

KINDS = ("translation", "rigid", "similarity", "affine")


def _pyramid(image: torch.Tensor, levels: int, min_size: int = 16) -> list[torch.Tensor]:
    """Images from coarse to fine (each (1, 1, *spatial)), halving until ``min_size``."""
    out = [image]
    pool = F.avg_pool2d if image.dim() == 4 else F.avg_pool3d
    for _ in range(levels - 1):
        if min(out[-1].shape[2:]) < 2 * min_size:
            break
        out.append(pool(out[-1], 2, ceil_mode=True))
    return out[::-1]


def _centred_frame(shape, spacing) -> np.ndarray:
    """Homogeneous map from voxel coordinates to centred physical coordinates."""
    d = len(shape)
    m = np.eye(d + 1)
    m[:d, :d] = np.diag(spacing)
    m[:d, d] = -np.asarray(spacing) * (np.asarray(shape) - 1) / 2.0
    return m


class _LinearMap(torch.nn.Module):
    def __init__(self, d: int, kind: str, extent: float):
        super().__init__()
        self.d, self.kind, self.extent = d, kind, extent
        self.t = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))
        n_rot = 1 if d == 2 else 3
        self.rot = torch.nn.Parameter(torch.zeros(n_rot, dtype=torch.float64))
        self.log_scale = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.delta = torch.nn.Parameter(torch.zeros(d, d, dtype=torch.float64))

    def matrix(self) -> torch.Tensor:
        d = self.d
        dev = self.t.device
        eye = torch.eye(d, dtype=torch.float64, device=dev)
        if self.kind == "translation":
            a = eye
        elif self.kind == "affine":
            a = eye + self.delta
        else:
            skew = torch.zeros(d, d, dtype=torch.float64, device=dev)
            if d == 2:
                zero, one = torch.tensor([0], device=dev), torch.tensor([1], device=dev)
                skew = skew.index_put((zero, one), -self.rot[:1])
                skew = skew.index_put((one, zero), self.rot[:1])
            else:
                i, j = torch.tensor([0, 0, 1], device=dev), torch.tensor([1, 2, 2], device=dev)
                skew = skew.index_put((i, j), -self.rot).index_put((j, i), self.rot)
            a = torch.linalg.matrix_exp(skew)
            if self.kind == "similarity":
                a = a * torch.exp(self.log_scale)
        top = torch.cat([a, (self.t * self.extent)[:, None]], dim=1)
        bottom = torch.cat(
            [
                torch.zeros(1, d, dtype=torch.float64, device=dev),
                torch.ones(1, 1, dtype=torch.float64, device=dev),
            ],
            1,
        )
        return torch.cat([top, bottom], dim=0)


@register_engine("affine", description="Linear: translation, rigid, similarity or affine; fast")
def register_affine(
    pair: Pair,
    kind: str = "affine",
    similarity: str = "ncc",
    levels: int = 3,
    iterations: int | list[int] = 150,
    learning_rate: float = 0.01,
    init: str = "identity",
    moving_spacing=None,
) -> Registration:
    """Optimise a linear map that pulls ``pair.moving`` onto ``pair.fixed``.

    ``iterations`` per level (one number or one per level, coarse first); ``init="center"``
    starts from the translation aligning the intensity centres of mass.
    """
    if kind not in KINDS:
        raise InputError(f"Unknown affine kind {kind!r}; choose one of {', '.join(KINDS)}.")
    if init not in ("identity", "center"):
        raise InputError("init must be 'identity' or 'center'.")
    if levels < 1:
        raise InputError("levels must be at least 1.")
    device = choose_device(pair.device)
    reset_peak_memory(device)
    d = pair.fixed.ndim
    fsp = np.asarray(pair.spacing, float)
    msp = np.asarray(moving_spacing if moving_spacing is not None else pair.spacing, float)
    if msp.shape != (d,) or not np.all(np.isfinite(msp) & (msp > 0)):
        raise InputError("moving_spacing must be one positive number per axis.")
    fshape, mshape = pair.fixed.shape, pair.moving.shape
    iters = [iterations] * levels if np.isscalar(iterations) else list(iterations)
    if len(iters) != levels:
        raise InputError(f"Give one iteration count per level ({levels}), got {len(iters)}.")

    to_fixed = _centred_frame(fshape, fsp)  # fixed voxel -> centred physical
    from_moving = np.linalg.inv(_centred_frame(mshape, msp))  # centred physical -> moving voxel
    fmask = pair.fixed_mask
    with memory_guard("affine registration"):
        fix = torch.as_tensor(normalize_intensity(pair.fixed), device=device)[None, None]
        mov = torch.as_tensor(normalize_intensity(pair.moving), device=device)[None, None]
        fmask_t = (
            None if fmask is None else torch.as_tensor(fmask, device=device, dtype=torch.float32)[None, None]
        )
        fix_pyr = _pyramid(fix, levels)
        mov_pyr = _pyramid(mov, levels)
        mask_pyr = None if fmask_t is None else _pyramid(fmask_t, levels)
        mmask = pair.moving_mask
        mmask_pyr = None
        if mmask is not None:
            mmask_t = torch.as_tensor(mmask, device=device, dtype=torch.float32)[None, None]
            mmask_pyr = _pyramid(mmask_t, levels)
        n_levels = min(len(fix_pyr), len(mov_pyr))  # align pyramids at the finest level
        fix_pyr, mov_pyr = fix_pyr[-n_levels:], mov_pyr[-n_levels:]
        mask_pyr = None if mask_pyr is None else mask_pyr[-n_levels:]
        mmask_pyr = None if mmask_pyr is None else mmask_pyr[-n_levels:]
        extent = float(np.max(np.asarray(fshape) * fsp) / 2)
        model = _LinearMap(d, kind, extent).to(device)
        if init == "center":
            com_f = _centre_of_mass(pair.fixed, to_fixed)
            com_m = _centre_of_mass(pair.moving, _centred_frame(mshape, msp))
            with torch.no_grad():
                model.t.copy_(torch.as_tensor((com_m - com_f) / extent))
        levels_used = len(fix_pyr)
        iters = iters[-levels_used:]
        total, step = sum(iters), 0
        for level, (f_l, m_l, n_it) in enumerate(zip(fix_pyr, mov_pyr, iters)):
            opt = torch.optim.Adam(model.parameters(), lr=learning_rate)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(n_it, 1), learning_rate * 0.02)
            shape_l = f_l.shape[2:]
            # level voxel i averages fine voxels [i * 2^k, (i + 1) * 2^k): centre (i + 0.5) * 2^k - 0.5
            zoom = np.full(d, 2.0 ** (levels_used - 1 - level))
            grid = _level_grid(shape_l, zoom, to_fixed, device)
            mzoom = zoom
            weights = None if mask_pyr is None else mask_pyr[level].reshape(1, -1)
            for _ in range(n_it):
                opt.zero_grad()
                mat = model.matrix().to(torch.float32)
                phys = grid @ mat[:d, :d].T + mat[:d, d]
                mvox = phys @ torch.as_tensor(
                    from_moving[:d, :d].T, dtype=torch.float32, device=device
                ) + torch.as_tensor(from_moving[:d, d], dtype=torch.float32, device=device)
                mvox_l = (mvox + 0.5) / torch.as_tensor(mzoom, dtype=torch.float32, device=device) - 0.5
                warped = sample(m_l[0], mvox_l).reshape(1, 1, *shape_l)
                upper = torch.as_tensor(m_l.shape[2:], dtype=torch.float32, device=device) - 1
                w = ((mvox_l >= 0) & (mvox_l <= upper)).all(1).to(torch.float32)[None]
                if weights is not None:
                    w = w * weights
                if mmask_pyr is not None:  # only moving voxels inside the moving mask count
                    w = w * (sample(mmask_pyr[level][0], mvox_l) > 0.5).to(torch.float32)
                value = _weighted_loss(similarity, f_l, warped, w)
                value.backward()
                opt.step()
                sched.step()
                step += 1
                preview = None
                if pair.progress.wants_preview:
                    preview = warped.detach()[0, 0].cpu().numpy()
                pair.progress.step(
                    step,
                    total,
                    float(value.detach()),
                    stage=f"level {level + 1}/{levels_used}",
                    preview=preview,
                    preview_zoom=tuple(float(z) for z in zoom),
                )
        m_final = model.matrix().detach().cpu().numpy()
    voxel_matrix = from_moving @ m_final @ to_fixed
    transform = AffineTransform(
        voxel_matrix,
        shape=fshape,
        spacing=pair.spacing,
        moving_spacing=moving_spacing,
        moving_shape=pair.moving.shape,
    )
    warped = transform.warp(pair.moving, output_shape=fshape, device=device)
    metrics = {
        "iterations": total,
        "levels": levels_used,
        "final_loss": pair.progress.history[-1] if pair.progress.history else None,
    }
    metrics.update(similarity_report(pair.fixed, pair.moving, warped, fmask, transform))
    metrics.update(memory_report(device))
    settings = {
        "kind": kind,
        "similarity": similarity,
        "levels": levels,
        "iterations": iters,
        "learning_rate": learning_rate,
        "init": init,
        "moving_spacing": msp.tolist(),
    }
    return Registration(warped=warped, transform=transform, metrics=metrics, settings=settings)


def _weighted_loss(name: str, fixed: torch.Tensor, warped: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Similarity loss over the voxels with weight ``w`` (overlap with the moving image and mask)."""
    if float(w.sum()) < 16:
        raise InputError(
            "The images no longer overlap; check that fixed and moving show the same region, "
            "or start from init='center'."
        )
    f, m = fixed.reshape(1, -1), warped.reshape(1, -1)
    if name == "ncc":
        return 1 - ncc(f, m, w)
    if name == "mse":
        return ((f - m) ** 2 * w).sum() / w.sum()
    if name == "nmi":
        keep = w[0] > 0
        return similarity_loss("nmi", f[0, keep], m[0, keep])
    wm = w.reshape(fixed.shape)
    return similarity_loss(name, fixed * wm, warped * wm)


def _level_grid(shape_l, zoom, to_fixed, device) -> torch.Tensor:
    """Centred physical coordinates of the voxel centres of a pyramid level, ``(N, D)``."""
    axes = [(torch.arange(n, dtype=torch.float64) + 0.5) * z - 0.5 for n, z in zip(shape_l, zoom)]
    vox = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(shape_l))
    t = torch.as_tensor(to_fixed)
    phys = vox @ t[:-1, :-1].T + t[:-1, -1]
    return phys.to(device=device, dtype=torch.float32)


def _centre_of_mass(image: np.ndarray, frame: np.ndarray) -> np.ndarray:
    w = normalize_intensity(image).astype(np.float64)
    total = w.sum()
    idx = np.indices(image.shape).reshape(image.ndim, -1)
    com = (idx * w.reshape(1, -1)).sum(1) / total
    return (frame @ np.append(com, 1.0))[:-1]
