"""Stage 5: instance optimisation of the composed map at a finer level, one tile at a time.

On overlapping tiles of the fixed tissue, a smooth correction ``r`` (a low-resolution displacement
on control points every ``control`` pixels, upsampled bilinearly) is optimised so that the moving
slide, already warped by the current map, matches the fixed slide at ``x + r(x)`` by local NCC with
a diffusion penalty. Tile fields are blended with smooth windows (no seams); tiles without tissue
add a zero correction. Memory: one tile (plus a margin) at a time and the correction field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...core.progress import Progress
from .predict import sample_at


@dataclass(frozen=True)
class RefineSettings:
    """Tile side and overlap, control-point spacing and margin (pixels), iterations, penalty, step."""

    tile: int = 320
    overlap: int = 64
    control: int = 12
    margin: int = 24
    iterations: int = 60
    smooth: float = 2.0
    lr: float = 0.5
    window: int = 9


def _starts(n: int, tile: int, stride: int) -> list[int]:
    if n <= tile:
        return [0]
    out = list(range(0, n - tile, stride))
    return out + [n - tile]


def tile_boxes(shape, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """``(y0, y1, x0, x1)`` of overlapping tiles covering ``shape``."""
    stride = max(1, tile - overlap)
    h, w = shape
    return [
        (y, min(y + tile, h), x, min(x + tile, w))
        for y in _starts(h, tile, stride)
        for x in _starts(w, tile, stride)
    ]


def _window(h: int, w: int) -> np.ndarray:
    ty = np.sin(np.pi * (np.arange(h) + 0.5) / h) ** 2
    tx = np.sin(np.pi * (np.arange(w) + 0.5) / w) ** 2
    return np.outer(ty + 1e-3, tx + 1e-3)  # floor per axis: no seams at the image border either


class LocalNCC:
    """Weighted mean of the windowed NCC against a fixed tile (its local statistics computed once)."""

    def __init__(self, fixed: torch.Tensor, weight: torch.Tensor, window: int = 9):
        self.window, self.weight = window, weight / weight.sum().clamp_min(1e-6)
        self.f, self.fm = fixed, self.mean(fixed)
        self.fv = (self.mean(fixed * fixed) - self.fm**2).clamp_min(0)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.window, stride=1, padding=self.window // 2, count_include_pad=False)

    def __call__(self, moving: torch.Tensor) -> torch.Tensor:
        mm = self.mean(moving)
        mv = (self.mean(moving * moving) - mm**2).clamp_min(0)
        cov = self.mean(self.f * moving) - self.fm * mm
        return ((cov / torch.sqrt(self.fv * mv + 1e-5)) * self.weight).sum()


def optimise_tile(
    fixed: np.ndarray,
    moving: np.ndarray,
    weight: np.ndarray,
    settings: RefineSettings,
    margin: int,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, float, float]:
    """The correction ``(2, h, w)`` of one tile: ``moving[margin + x + r(x)] ~ fixed[x]``.

    ``moving`` is the tile with ``margin`` pixels more on every side. Coarse to fine: a first pass
    on smoothed images with a wider window (larger capture range), then the images themselves.
    Returns the field and the local NCC before and after (a tile that does not improve gets a zero
    field).
    """
    from scipy.ndimage import gaussian_filter

    h, w = fixed.shape
    wt = torch.as_tensor(weight, dtype=torch.float32, device=device)[None, None]
    axes = [torch.arange(n, dtype=torch.float32, device=device) + margin for n in (h, w)]
    base = torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]
    ctrl_shape = (max(2, h // settings.control + 2), max(2, w // settings.control + 2))
    ctrl = torch.zeros((1, 2, *ctrl_shape), device=device, requires_grad=True)

    def field() -> torch.Tensor:
        return F.interpolate(ctrl, size=(h, w), mode="bilinear", align_corners=True).clamp(-margin, margin)

    def level(sigma: float, window: int):
        f, m = (gaussian_filter(a, sigma) if sigma else a for a in (fixed, moving))
        ncc = LocalNCC(torch.as_tensor(f, dtype=torch.float32, device=device)[None, None], wt, window)
        mt = torch.as_tensor(m, dtype=torch.float32, device=device)[None, None]
        return lambda: ncc(sample_at(mt, base + field(), padding="border"))

    fine = level(0.0, settings.window)
    with torch.no_grad():
        before = float(fine())
    for similarity in (level(2.0, 2 * settings.window + 1), fine):
        opt = torch.optim.Adam([ctrl], lr=settings.lr)
        for _ in range(settings.iterations // 2):
            opt.zero_grad()
            dy = ctrl[:, :, 1:] - ctrl[:, :, :-1]
            dx = ctrl[:, :, :, 1:] - ctrl[:, :, :, :-1]
            penalty = (dy**2).mean() + (dx**2).mean()
            loss = -similarity() + settings.smooth * penalty / settings.control**2
            loss.backward()
            opt.step()
    with torch.no_grad():
        after = float(fine())
        if after <= before:  # never make a tile worse
            return np.zeros((2, h, w), np.float32), before, before
        return field()[0].cpu().numpy().astype(np.float32), before, after


def refine_field(
    shape: tuple[int, int],
    read_fixed: Callable[[tuple[int, int, int, int]], np.ndarray],
    read_moving: Callable[[tuple[int, int, int, int]], np.ndarray],
    tissue: Callable[[tuple[int, int, int, int]], np.ndarray],
    settings: RefineSettings,
    progress: Progress,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, dict]:
    """The blended correction field ``(2, *shape)`` over all tiles, and a summary.

    ``read_fixed(box)`` / ``read_moving(box)`` return the stain channel of the fixed slide and of
    the currently warped moving slide on a box ``(y0, y1, x0, x1)`` of the grid (the moving box may
    reach outside the grid: it is padded); ``tissue(box)`` the fixed tissue mask there (float).
    """
    boxes = tile_boxes(shape, settings.tile, settings.overlap)
    total = np.zeros((2, *shape), np.float32)
    weight = np.zeros(shape, np.float32)
    gains, used = [], 0
    mg = settings.margin
    for i, box in enumerate(boxes):
        y0, y1, x0, x1 = box
        win = _window(y1 - y0, x1 - x0).astype(np.float32)
        weight[y0:y1, x0:x1] += win
        mask = tissue(box)
        if mask.mean() > 0.05 and min(y1 - y0, x1 - x0) >= 2 * settings.window:
            fixed = read_fixed(box)
            moving = read_moving((y0 - mg, y1 + mg, x0 - mg, x1 + mg))
            if fixed.std() > 1e-6 and moving.std() > 1e-6:
                field, before, after = optimise_tile(fixed, moving, mask, settings, mg, device)
                total[:, y0:y1, x0:x1] += win * field
                gains.append(after - before)
                used += 1
        progress.step(i + 1, len(boxes), stage="refine", tiles_used=used)
    out = np.divide(total, weight, out=np.zeros_like(total), where=weight > 0)
    summary = {
        "tiles": len(boxes),
        "tiles_refined": used,
        "mean_lncc_gain": float(np.mean(gains)) if gains else 0.0,
    }
    return out, summary


__all__ = ["LocalNCC", "RefineSettings", "optimise_tile", "refine_field", "tile_boxes"]
