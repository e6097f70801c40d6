"""The planar plate vote: every tissue cell of a section says where it lies along the plate axis.

The network's cell head (:class:`.network.EmbeddingNet`, ``vote_plates > 0``) gives, on a grid of
cells over the prepared input, a distribution over the plates for each cell. A cut, even an oblique
one, is a plane through the atlas: the plate position of a cell at ``(y, x)`` is
``z0 + gy * (y - yc) + gx * (x - xc)`` with ``(yc, xc)`` the centroid of the tissue, so ``z0`` is
the plate at the centre of the tissue (the truth of a lookup). :func:`plane_scores` scores every
``z0`` by the best plane through it: the tissue-weighted mean over cells of ``log p_cell(z(cell))``,
maximised over a grid of gradients ``(gy, gx)``, in one array operation.

Training targets come from the synthesiser's atlas coordinates of every pixel
(:func:`cell_targets`, :func:`soft_targets`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from napari_nephi.core.errors import InputError
from napari_nephi.core.options import check_float, check_int

#: Probability mixed into every cell's distribution (as a uniform share): one confidently wrong cell
#: costs at most ``log(FLOOR / n_plates)`` instead of minus infinity.
FLOOR = 0.05
#: Cells whose tissue share is below this take no part in the vote.
MIN_COVER = 0.15
#: The coarse gradient grid of :func:`section_vote` has this many steps from 0 to the largest gradient.
GRID_STEPS = 4
#: Largest tilt (pitch or yaw, degrees) the vote's planes allow.
MAX_TILT = 15.0


@dataclass(frozen=True)
class VoteResult:
    """Scores of the plates (higher is better: mean log-likelihood per tissue cell), the best plane's
    gradient ``(gy, gx)`` in plates per input pixel at each plate, and the number of cells that voted."""

    scores: np.ndarray
    gradients: np.ndarray
    cells: int


def cell_targets(channels: torch.Tensor, cells: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-cell truth from per-pixel truth: ``channels`` ``(B, 3, S, S)`` holds the tissue share
    ``m``, ``z * m`` and ``z**2 * m`` (``z``: the atlas plate position of the pixel).

    Returns ``(z, var, weight)`` each ``(B, cells, cells)``: the tissue-weighted mean and variance of
    ``z`` in each cell and the cell's tissue share (0 where it holds no tissue).
    """
    pooled = F.adaptive_avg_pool2d(channels, cells)
    weight = pooled[:, 0]
    safe = weight.clamp_min(1e-6)
    z = pooled[:, 1] / safe
    var = (pooled[:, 2] / safe - z * z).clamp_min(0.0)
    z = torch.where(weight > 1e-6, z, torch.zeros_like(z))
    return z, torch.where(weight > 1e-6, var, torch.zeros_like(var)), weight


def soft_targets(z: torch.Tensor, var: torch.Tensor, n_plates: int, sigma: float) -> torch.Tensor:
    """``(B, n_plates, *z.shape[1:])`` Gaussian distributions over the plates centred on ``z``, of
    variance ``sigma**2 + var`` (a cell that spans several plates gets a wider target)."""
    plates = torch.arange(n_plates, dtype=z.dtype, device=z.device).view(1, -1, *([1] * (z.ndim - 1)))
    width = (sigma * sigma + var).unsqueeze(1)
    logits = -((plates - z.unsqueeze(1)) ** 2) / (2 * width)
    return torch.softmax(logits, dim=1)


def cell_loss(
    logits: torch.Tensor, z: torch.Tensor, var: torch.Tensor, weight: torch.Tensor, sigma: float = 1.0
) -> torch.Tensor:
    """Cross-entropy of the cell logits ``(B, P, c, c)`` against :func:`soft_targets`, weighted by the
    cells' tissue share ``weight`` ``(B, c, c)`` (cells below :data:`MIN_COVER` left out)."""
    if logits.ndim != 4 or logits.shape[0] != z.shape[0] or logits.shape[2:] != z.shape[1:]:
        raise InputError(f"Cell logits {tuple(logits.shape)} do not match cell targets {tuple(z.shape)}.")
    target = soft_targets(z, var, logits.shape[1], sigma)
    ce = -(target * F.log_softmax(logits, dim=1)).sum(dim=1)
    w = weight * (weight >= MIN_COVER)
    total = w.sum()
    if float(total) <= 0:
        return logits.sum() * 0.0
    return (ce * w).sum() / total


def floored(log_probs: np.ndarray, floor: float = FLOOR) -> np.ndarray:
    """``(..., P)`` log-probabilities mixed with a uniform share ``floor`` (one confidently wrong cell
    costs at most ``log(floor / P)``)."""
    lp = np.asarray(log_probs, dtype=np.float64)
    return np.log((1 - floor) * np.exp(lp) + floor / lp.shape[-1]).astype(np.float32)


def cell_cover(mask: np.ndarray, cells: int) -> np.ndarray:
    """``(cells, cells)`` tissue share of each cell of a square ``mask`` (area mean)."""
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return F.adaptive_avg_pool2d(m, cells)[0, 0].numpy()


def gradient_grid(max_gradient: float, step: float) -> np.ndarray:
    """``(G, 2)`` gradients ``(gy, gx)`` on a square grid of ``step`` within the disc of ``max_gradient``."""
    max_gradient = check_float("max_gradient", max_gradient, 0.0, 100.0)
    step = check_float("step", step, 0.0, 100.0, low_open=True)
    k = int(math.floor(max_gradient / step + 1e-9))
    g = np.arange(-k, k + 1) * step
    gy, gx = np.meshgrid(g, g, indexing="ij")
    grid = np.stack([gy.ravel(), gx.ravel()], axis=1)
    return grid[np.hypot(grid[:, 0], grid[:, 1]) <= max_gradient + 1e-9]


def _prepare(log_probs, weights, positions, resolution: int):
    """Checked inputs of :func:`plane_scores`: the tissue cells' interpolated log-probability tables
    ``(C, Z)`` at ``1 / resolution`` plate steps, weights summing to 1, offsets from the centroid."""
    lp = np.asarray(log_probs, dtype=np.float32)
    w = np.asarray(weights, dtype=np.float32)
    pos = np.asarray(positions, dtype=np.float32)
    resolution = check_int("resolution", resolution, 1, 16)
    if lp.ndim != 2 or w.shape != (lp.shape[0],) or pos.shape != (lp.shape[0], 2):
        raise InputError(
            f"A plane vote needs log_probs (C, P), weights (C,) and positions (C, 2); got {lp.shape}, "
            f"{w.shape}, {pos.shape}."
        )
    keep = w > 0
    if not keep.any():
        raise InputError("No cell of the section holds tissue: nothing to vote with.")
    lp, w, pos = lp[keep], w[keep] / w[keep].sum(), pos[keep]
    n = lp.shape[1]
    fine = np.arange((n - 1) * resolution + 1, dtype=np.float32) / resolution
    lo = np.minimum(np.floor(fine).astype(np.int64), n - 1)
    hi = np.minimum(lo + 1, n - 1)
    t = fine - lo
    table = lp[:, lo] * (1 - t) + lp[:, hi] * t
    offsets = pos - (w[:, None] * pos).sum(axis=0)
    return table, w, offsets, resolution, float(lp.min())


def _totals(table, w, offsets, grads, resolution: int, floor: float) -> np.ndarray:
    """``(G, P)``: for each gradient and plate ``z0``, the weighted sum over cells of the table at
    ``z0 + g . offset`` (the table's lowest value beyond the atlas)."""
    shifts = np.rint(resolution * (grads @ offsets.T)).astype(np.int64)  # (G, C)
    reach = int(np.abs(shifts).max(initial=0))
    padded = np.pad(table, ((0, 0), (reach, reach)), constant_values=floor)
    cols = np.arange(0, table.shape[1], resolution)  # the plates' own positions
    total = np.zeros((len(grads), len(cols)), dtype=np.float32)
    for c in range(len(w)):  # one gather per cell, over every gradient and plate at once
        total += w[c] * padded[c][(shifts[:, c] + reach)[:, None] + cols[None, :]]
    return total


def _best(total: np.ndarray, grads: np.ndarray, cells: int) -> VoteResult:
    """Each plate's best score over the gradients (rows of ``total``) and that gradient."""
    best = total.argmax(axis=0)
    scores = total[best, np.arange(total.shape[1])]
    return VoteResult(scores.astype(np.float32), grads[best], int(cells))


def plane_scores(
    log_probs: np.ndarray,
    weights: np.ndarray,
    positions: np.ndarray,
    gradients: np.ndarray,
    resolution: int = 2,
) -> VoteResult:
    """Score every plate as the centre ``z0`` of a planar cut, over one grid of gradients.

    ``log_probs``: ``(C, P)`` log-probabilities of the plates per cell; ``weights``: ``(C,)`` tissue
    shares; ``positions``: ``(C, 2)`` cell centres ``(y, x)`` in input pixels; ``gradients``:
    ``(G, 2)`` candidate ``(gy, gx)`` in plates per input pixel. The plate position of cell ``c``
    under gradient ``g`` is ``z0 + g . (p_c - centroid)``, the centroid weighted by ``weights``;
    positions between plates are read off the log-probabilities linearly interpolated at
    ``1 / resolution`` plate steps (and rounded to them). ``scores[z0]`` is the maximum over
    ``gradients`` of the weighted mean over cells of ``log p_c(z(c))``; positions beyond the atlas
    take the lowest log-probability.
    """
    grads = np.asarray(gradients, dtype=np.float32).reshape(-1, 2)
    if len(grads) == 0:
        raise InputError("plane_scores needs at least one gradient (gy, gx).")
    table, w, offsets, resolution, floor = _prepare(log_probs, weights, positions, resolution)
    total = _totals(table, w, offsets, grads, resolution, floor)
    return _best(total, grads, len(w))


def plane_vote(
    log_probs: np.ndarray,
    weights: np.ndarray,
    positions: np.ndarray,
    max_gradient: float,
    step: float,
    refine: int = 3,
    resolution: int = 2,
) -> VoteResult:
    """:func:`plane_scores` coarse to fine: gradients on a grid of ``step`` within ``max_gradient``,
    then a grid four times finer around the ``refine`` best coarse gradients (each plate keeps the
    best of both)."""
    refine = check_int("refine", refine, 0, 100)
    coarse = gradient_grid(max_gradient, step)
    table, w, offsets, resolution, floor = _prepare(log_probs, weights, positions, resolution)
    total = _totals(table, w, offsets, coarse, resolution, floor)
    grads = [coarse]
    if refine > 0 and step > 0:
        top = np.argsort(-total.max(axis=1), kind="stable")[:refine]
        local = gradient_grid(step * 0.5 * math.sqrt(2), step / 4)
        fine = (coarse[top][:, None, :] + local[None]).reshape(-1, 2)
        total = np.concatenate([total, _totals(table, w, offsets, fine, resolution, floor)])
        grads.append(fine)
    grads = np.concatenate(grads)
    return _best(total, grads, len(w))


def cell_positions(cells: int, size: int) -> np.ndarray:
    """``(cells * cells, 2)`` centres ``(y, x)`` of the cells of a ``size`` px input, row by row."""
    centres = (np.arange(cells) + 0.5) * size / cells - 0.5
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.float32)


def truth_channels(z: np.ndarray, geometry, size: int) -> np.ndarray:
    """``(3, size, size)`` float32 per-pixel truth of a prepared input for :func:`cell_targets`:
    the tissue share ``m``, ``z * m`` and ``z**2 * m``, with ``z`` (the atlas plate position of every
    pixel of the source image, or one number for all) read at the input's pixels through
    ``geometry`` (a :class:`.preprocess.InputGeometry`; linear, nearest value beyond the edge)."""
    m = np.asarray(geometry.mask, dtype=np.float32)
    if np.ndim(z) == 0:
        zmap = np.full(m.shape, float(z), dtype=np.float32)
    else:
        ys, xs = geometry.source(size)
        src = np.asarray(z, dtype=np.float32)
        ys = np.clip(ys, 0, src.shape[0] - 1).astype(np.float32)
        xs = np.clip(xs, 0, src.shape[1] - 1).astype(np.float32)
        mx, my = np.meshgrid(xs, ys)
        zmap = cv2.remap(src, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return np.stack([m, zmap * m, zmap * zmap * m]).astype(np.float32)


def section_vote(
    log_probs: np.ndarray,
    cover: np.ndarray,
    size: int,
    max_gradient: float,
    floor: float = FLOOR,
    refine: int = 3,
) -> VoteResult:
    """The plane vote of one section: ``log_probs`` ``(cells * cells, P)`` from the cell head
    (:func:`.network.embed_with_cells`), ``cover`` ``(cells, cells)`` the cells' tissue shares
    (:func:`cell_cover`) of its ``size`` px input; gradients up to ``max_gradient`` plates per input
    pixel (:func:`plane_vote`, :data:`GRID_STEPS` coarse steps). Cells under :data:`MIN_COVER` do not
    vote (all cells with tissue do when none reaches it)."""
    cover = np.asarray(cover, dtype=np.float32)
    cells = cover.shape[0]
    w = cover.ravel() * (cover.ravel() >= MIN_COVER)
    if not (w > 0).any():
        w = cover.ravel()
    step = max_gradient / GRID_STEPS if max_gradient > 0 else 1.0
    refine = refine if max_gradient > 0 else 0
    return plane_vote(floored(log_probs, floor), w, cell_positions(cells, size), max_gradient, step, refine)


def max_gradient(pixel_scale: float, max_tilt: float = MAX_TILT, plate_spacing: float = 1.0) -> float:
    """Largest plate-position gradient, in plates per input pixel, of a cut tilted up to ``max_tilt``
    degrees when an input pixel spans ``pixel_scale`` atlas pixels (plates ``plate_spacing`` apart)."""
    return math.tan(math.radians(max_tilt)) * pixel_scale / plate_spacing
