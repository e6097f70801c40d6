"""Stage 5: instance optimisation of the composed map at a finer level, one tile at a time.

On overlapping tiles of the fixed tissue, a smooth correction ``r`` (a cubic B-spline with control
points every ``control`` pixels) is optimised so that the moving slide under the current map
matches the fixed slide at ``x + r(x)`` by local NCC with a diffusion penalty, by Adam with a
decaying step (a constant step leaves the controls jittering by a fraction of a pixel). The moving
slide is sampled once, bicubically, through the composed map (the current map's coordinates at
``x + r(x)``): resampling an already warped image, or bilinear sampling, blurs it by an amount that
depends on the sub-pixel position, which biased the optimum by ~0.05 px.
Tiles are as few as the tile size allows, evenly spread; their fields are blended with smooth
windows (no seams); tiles without tissue add a zero correction. Memory: one tile (plus a margin)
at a time and the correction field.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...core.progress import Progress
from .predict import sample_at


@dataclass(frozen=True)
class RefineSettings:
    """How one tile is refined.

    ``tile`` / ``overlap`` / ``margin``: tile side, overlap of neighbours and extra moving pixels
    read around a tile; ``control``: spacing of the cubic B-spline control points (pixels);
    ``iterations``: optimiser steps (half on smoothed images, half on the images themselves);
    ``smooth``: weight of the diffusion penalty on the control points; ``lr``: first Adam step
    (pixels), decayed geometrically to ``lr * decay`` within each pass; ``window``: side of the local
    NCC window; when the loss has not dropped by ``tol`` for ``patience`` steps, a pass takes
    ``patience`` more steps at the final step size and stops.
    """

    tile: int = 512
    overlap: int = 128
    control: int = 24
    margin: int = 24
    iterations: int = 60
    smooth: float = 2.0
    lr: float = 0.5
    decay: float = 0.05
    window: int = 21
    tol: float = 2e-5
    patience: int = 8


def _starts(n: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the fewest tiles of at most ``tile`` px covering ``0 .. n`` with ``overlap``,
    all of one size (evenly spread: no tile mostly inside its neighbour)."""
    if n <= tile:
        return [(0, n)]
    count = math.ceil((n - overlap) / (tile - overlap))
    size = math.ceil((n + (count - 1) * overlap) / count)
    starts = np.linspace(0, n - size, count).round().astype(int)
    return [(int(s), int(s) + size) for s in starts]


def tile_boxes(shape, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """``(y0, y1, x0, x1)`` of overlapping tiles covering ``shape``: at most ``tile`` px, neighbours
    sharing at least ``overlap`` px."""
    overlap = min(overlap, tile - 1)
    h, w = shape
    return [(y0, y1, x0, x1) for y0, y1 in _starts(h, tile, overlap) for x0, x1 in _starts(w, tile, overlap)]


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
        """Mean over the window, as two 1D passes (a box over the pixels inside the image)."""
        k, p = self.window, self.window // 2
        x = F.avg_pool2d(x, (k, 1), stride=1, padding=(p, 0), count_include_pad=False)
        return F.avg_pool2d(x, (1, k), stride=1, padding=(0, p), count_include_pad=False)

    def __call__(self, moving: torch.Tensor) -> torch.Tensor:
        mm = self.mean(moving)
        mv = (self.mean(moving * moving) - mm**2).clamp_min(0)
        cov = self.mean(self.f * moving) - self.fm * mm
        return ((cov / torch.sqrt(self.fv * mv + 1e-5)) * self.weight).sum()


def bspline_basis(n: int, spacing: float) -> np.ndarray:
    """``(n, m)`` cubic B-spline weights at pixels ``0 .. n-1`` of control points every ``spacing`` px.

    Control ``j`` sits at pixel ``(j - 1) * spacing``: one beyond each end, so every pixel has its four
    controls and the weights of each pixel sum to one.
    """
    m = int(np.ceil((n - 1) / spacing)) + 3
    d = np.abs(np.arange(n)[:, None] / spacing + 1.0 - np.arange(m)[None, :])
    near = 2.0 / 3.0 - d**2 + d**3 / 2.0
    far = (2.0 - d) ** 3 / 6.0
    return np.where(d < 1, near, np.where(d < 2, far, 0.0)).astype(np.float32)


def sample_cubic(image: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bicubic samples of ``image`` (N, C, H, W) at pixel ``coords`` (N, 2, h, w) in (y, x) order
    (the border value continued outside; pixel centres as :func:`predict.sample_at`)."""
    h, w = image.shape[-2:]
    gy = coords[:, 0] * (2.0 / max(h - 1, 1)) - 1.0
    gx = coords[:, 1] * (2.0 / max(w - 1, 1)) - 1.0
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(image, grid, mode="bicubic", padding_mode="border", align_corners=True)


def optimise_tile(
    fixed: np.ndarray,
    moving: np.ndarray,
    weight: np.ndarray,
    settings: RefineSettings,
    margin: int,
    device: torch.device | str = "cpu",
    coords: np.ndarray | None = None,
) -> tuple[np.ndarray, float, float, int]:
    """The correction ``(2, h, w)`` of one tile: ``moving[margin + x + r(x)] ~ fixed[x]``.

    ``moving`` is the tile with ``margin`` pixels more on every side, already warped; or, with
    ``coords`` ``(2, h + 2 margin, w + 2 margin)`` (where those pixels fall in ``moving`` under the
    current map), a region of the unwarped slide, sampled at ``coords`` interpolated at
    ``margin + x + r(x)`` (one interpolation of the image in all). Coarse to fine: a first pass
    on smoothed images with a wider window (larger capture range), then the images themselves.
    Returns the field, the local NCC before and after (a tile that does not improve gets a zero
    field) and the number of optimiser steps taken.
    """
    from scipy.ndimage import gaussian_filter

    h, w = fixed.shape
    wt = torch.as_tensor(weight, dtype=torch.float32, device=device)[None, None]
    axes = [torch.arange(n, dtype=torch.float32, device=device) + margin for n in (h, w)]
    base = torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]
    by, bx = (torch.as_tensor(bspline_basis(n, settings.control), device=device) for n in (h, w))
    ctrl = torch.zeros((1, 2, by.shape[1], bx.shape[1]), device=device, requires_grad=True)

    def field() -> torch.Tensor:
        return torch.einsum("yi,ncij,xj->ncyx", by, ctrl, bx).clamp(-margin, margin)

    ct = None if coords is None else torch.as_tensor(coords, dtype=torch.float32, device=device)[None]

    def where() -> torch.Tensor:  # sampling positions in ``moving``
        p = base + field()
        return p if ct is None else sample_at(ct, p, padding="border")

    def level(sigma: float, window: int):
        f, m = (gaussian_filter(a, sigma) if sigma else a for a in (fixed, moving))
        ncc = LocalNCC(torch.as_tensor(f, dtype=torch.float32, device=device)[None, None], wt, window)
        mt = torch.as_tensor(m, dtype=torch.float32, device=device)[None, None]
        return lambda: ncc(sample_cubic(mt, where()))

    fine = level(0.0, settings.window)
    with torch.no_grad():
        before = float(fine())
    steps = 0

    def objective(similarity) -> torch.Tensor:
        dy = ctrl[:, :, 1:] - ctrl[:, :, :-1]
        dx = ctrl[:, :, :, 1:] - ctrl[:, :, :, :-1]
        penalty = (dy**2).mean() + (dx**2).mean()
        return -similarity() + settings.smooth * penalty / settings.control**2

    n = settings.iterations // 2
    for similarity in (level(2.0, 2 * settings.window + 1), fine):
        opt = torch.optim.Adam([ctrl], lr=settings.lr)
        decay, final = settings.decay ** (1.0 / max(1, n - 1)), settings.lr * settings.decay
        best, stale, finishing = np.inf, 0, False
        for _ in range(n):
            opt.zero_grad()
            loss = objective(similarity)
            loss.backward()
            opt.step()
            steps += 1
            value = loss.item()
            stale = 0 if value < best - settings.tol else stale + 1
            best = min(best, value)
            if stale >= settings.patience:
                if finishing:
                    break
                # stalled: a few steps at the final (smallest) step, then stop; stopping at a large
                # step would leave the controls wherever Adam's jitter put them
                finishing, stale = True, 0
            for g in opt.param_groups:
                g["lr"] = final if finishing else g["lr"] * decay
    with torch.no_grad():
        after = float(fine())
        if after <= before:  # never make a tile worse
            return np.zeros((2, h, w), np.float32), before, before, steps
        return field()[0].cpu().numpy().astype(np.float32), before, after, steps


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

    ``read_fixed(box)`` returns the stain channel of the fixed slide on a box ``(y0, y1, x0, x1)``
    of the grid; ``read_moving(box)`` the moving slide's, either warped by the current map onto the
    box (which may reach outside the grid: it is padded) or as ``(region, coords)``: an unwarped
    region and where the box's pixels fall in it (see :func:`optimise_tile`); ``tissue(box)`` the
    fixed tissue mask there (float).
    """
    boxes = tile_boxes(shape, settings.tile, settings.overlap)
    total = np.zeros((2, *shape), np.float32)
    weight = np.zeros(shape, np.float32)
    gains, steps, used = [], [], 0
    mg = settings.margin
    for i, box in enumerate(boxes):
        y0, y1, x0, x1 = box
        win = _window(y1 - y0, x1 - x0).astype(np.float32)
        weight[y0:y1, x0:x1] += win
        mask = tissue(box)
        if mask.mean() > 0.05 and min(y1 - y0, x1 - x0) >= 2 * settings.window:
            fixed = read_fixed(box)
            moving = read_moving((y0 - mg, y1 + mg, x0 - mg, x1 + mg))
            moving, coords = moving if isinstance(moving, tuple) else (moving, None)
            if fixed.std() > 1e-6 and moving.std() > 1e-6:
                field, before, after, n = optimise_tile(fixed, moving, mask, settings, mg, device, coords)
                total[:, y0:y1, x0:x1] += win * field
                gains.append(after - before)
                steps.append(n)
                used += 1
        progress.step(i + 1, len(boxes), stage="refine", tiles_used=used)
    out = np.divide(total, weight, out=np.zeros_like(total), where=weight > 0)
    summary = {
        "tiles": len(boxes),
        "tiles_refined": used,
        "mean_lncc_gain": float(np.mean(gains)) if gains else 0.0,
        "mean_steps": float(np.mean(steps)) if steps else 0.0,
    }
    return out, summary


__all__ = ["LocalNCC", "RefineSettings", "optimise_tile", "refine_field", "sample_cubic", "tile_boxes"]
