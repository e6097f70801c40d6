"""Stage 5: instance optimisation of the composed map at a finer level, one tile at a time.

On overlapping tiles of the fixed tissue, a smooth correction ``r`` (a cubic B-spline with control
points every ``control`` pixels) is optimised so that the moving slide under the current map
matches the fixed slide at ``x + r(x)`` by local NCC with a diffusion penalty: first by Adam with a
decaying step on smoothed images (capture range), then by L-BFGS on the images themselves (the NCC
summed in double precision) until no control moves by more than ``tol`` px. Adam's steps have a
fixed size whatever the gradient, so it jitters around the optimum by about its last step
(0.025 px) and stopped wherever that left it (more steps made some tiles worse); L-BFGS converges
to the optimum. The moving slide is sampled once, bicubically, through the composed map (the
current map's coordinates at ``x + r(x)``): resampling an already warped image, or bilinear
sampling, blurs it by an amount that depends on the sub-pixel position, which biased the optimum
by ~0.05 px.
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
    ``iterations``: objective evaluations, at most half of them Adam steps on smoothed images (a
    wider window), the rest L-BFGS on the images themselves; ``smooth``: weight of the diffusion
    penalty on the control points; ``lr``: first Adam step (pixels), decayed geometrically to
    ``lr * decay``; when the Adam loss has not dropped by ``stall`` for ``patience`` steps, it takes
    ``patience`` more steps at the final step size and hands over; ``window``: side of the local NCC
    window; ``tol``: L-BFGS stops after an iteration in which no control moved by more than this (px).
    """

    tile: int = 512
    overlap: int = 128
    control: int = 24
    margin: int = 24
    iterations: int = 40
    smooth: float = 2.0
    lr: float = 0.5
    decay: float = 0.05
    window: int = 21
    stall: float = 2e-5
    patience: int = 8
    tol: float = 1e-3


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


def lbfgs(
    evaluate: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    evaluations: int,
    tol: float,
    history: int = 10,
    first: float = 0.25,
) -> tuple[torch.Tensor, int]:
    """Minimise a smooth function by L-BFGS with a backtracking (Armijo) line search.

    ``evaluate(x)`` returns the value and gradient at a flat ``x``. The first step moves the largest
    coordinate by ``first``; later steps start at the quasi-Newton step. Stops after an iteration in
    which no coordinate moved by more than ``tol``, when a line search finds no decrease, or after
    ``evaluations`` calls. Returns the minimiser and the number of calls.
    """
    f, g = evaluate(x)
    pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (s, y, 1 / y.s)
    calls = 1
    while calls < evaluations:
        d = -g
        alphas = []
        for s, y, rho in reversed(pairs):
            a = rho * s.dot(d)
            d = d - a * y
            alphas.append(a)
        if pairs:
            s, y, _ = pairs[-1]
            d = d * (s.dot(y) / y.dot(y))
        else:
            d = d * (first / d.abs().max().clamp_min(1e-30))
        for (s, y, rho), a in zip(pairs, reversed(alphas), strict=True):
            d = d + (a - rho * y.dot(d)) * s
        slope = g.dot(d)
        if slope >= 0:  # not a descent direction: forget the curvature pairs, go downhill
            pairs.clear()
            d = -g * (first / g.abs().max().clamp_min(1e-30))
            slope = g.dot(d)
        t = 1.0
        while True:
            fn, gn = evaluate(x + t * d)
            calls += 1
            if fn <= f + 1e-4 * t * slope or calls >= evaluations:
                break
            t *= 0.5
        if not fn < f:
            break
        s, y = t * d, gn - g
        if s.dot(y) > 1e-12:
            pairs = [*pairs[-(history - 1) :], (s, y, 1.0 / s.dot(y))]
        x, f, g = x + s, fn, gn
        if s.abs().max() <= tol:
            break
    return x, calls


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
    ``margin + x + r(x)`` (one interpolation of the image in all). Coarse to fine: Adam on smoothed
    images with a wider window (larger capture range), then L-BFGS on the images themselves (NCC
    statistics in double precision), to convergence. Returns the field, the objective (local NCC
    minus the smoothness penalty, which is 0 for the zero field) before and after (a tile that does
    not improve gets a zero field) and the number of objective evaluations.
    """
    from scipy.ndimage import gaussian_filter

    h, w = fixed.shape
    basis = [bspline_basis(n, settings.control) for n in (h, w)]  # (pixels, controls) per axis
    shape = (1, 2, basis[0].shape[1], basis[1].shape[1])

    def objective(sigma: float, window: int, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
        """The loss of control points (``shape``): minus the local NCC + diffusion penalty. The
        image is sampled in float32; the NCC's window statistics and sums are taken in ``dtype``
        (in float32 their rounding hides the loss changes the L-BFGS line search must see)."""

        def tensor(a, kind=torch.float32):
            return torch.as_tensor(np.asarray(a), device=device).to(kind)

        f, m = (gaussian_filter(a, sigma) if sigma else a for a in (fixed, moving))
        ncc = LocalNCC(tensor(f, dtype)[None, None], tensor(weight, dtype)[None, None], window)
        mt, ct = tensor(m)[None, None], None if coords is None else tensor(coords)[None]
        by, bx = (tensor(b) for b in basis)
        axes = (torch.arange(n, dtype=torch.float32, device=device) + margin for n in (h, w))
        base = torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]

        def loss(ctrl: torch.Tensor) -> torch.Tensor:
            p = base + torch.einsum("yi,ncij,xj->ncyx", by, ctrl.float(), bx).clamp(-margin, margin)
            p = p if ct is None else sample_at(ct, p, padding="border")
            dy = ctrl[:, :, 1:] - ctrl[:, :, :-1]
            dx = ctrl[:, :, :, 1:] - ctrl[:, :, :, :-1]
            penalty = (dy**2).mean() + (dx**2).mean()
            moved = sample_at(mt, p, padding="border", mode="bicubic")
            return -ncc(moved.to(dtype)) + settings.smooth * penalty / settings.control**2

        return loss

    fine = objective(0.0, settings.window, torch.float64)
    zero = torch.zeros(shape, dtype=torch.float64, device=device)
    with torch.no_grad():
        before = -float(fine(zero))
    ctrl = torch.zeros(shape, device=device, requires_grad=True)
    coarse = objective(2.0, 2 * settings.window + 1, torch.float32)
    n = settings.iterations // 2
    opt = torch.optim.Adam([ctrl], lr=settings.lr)
    decay, final = settings.decay ** (1.0 / max(1, n - 1)), settings.lr * settings.decay
    best, stale, finishing, steps = np.inf, 0, False, 0
    for _ in range(n):
        opt.zero_grad()
        loss = coarse(ctrl)
        loss.backward()
        opt.step()
        steps += 1
        value = loss.item()
        stale = 0 if value < best - settings.stall else stale + 1
        best = min(best, value)
        if stale >= settings.patience:
            if finishing:
                break
            finishing, stale = True, 0  # a few steps at the smallest step, then hand over
        for g in opt.param_groups:
            g["lr"] = final if finishing else g["lr"] * decay

    def evaluate(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().requires_grad_(True)
        value = fine(x.view(shape))
        (grad,) = torch.autograd.grad(value, x)
        return value.detach(), grad

    start = ctrl.detach().to(torch.float64).reshape(-1)
    found, calls = lbfgs(evaluate, start, settings.iterations - steps, settings.tol)
    found = found.view(shape)
    with torch.no_grad():
        after = -float(fine(found))
        if after <= before:  # never make a tile worse
            return np.zeros((2, h, w), np.float32), before, before, steps + calls
        by, bx = (torch.as_tensor(b, dtype=torch.float64) for b in basis)
        field = torch.einsum("yi,ncij,xj->ncyx", by, found.cpu(), bx).clamp(-margin, margin)
    return field[0].numpy().astype(np.float32), before, after, steps + calls


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


__all__ = [
    "LocalNCC",
    "RefineSettings",
    "lbfgs",
    "optimise_tile",
    "refine_field",
    "tile_boxes",
]
