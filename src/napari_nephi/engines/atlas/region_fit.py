"""The section's intensities explained by the atlas's regions: the correlation ratio of a pose, and a
local refinement of poses by it (the last stage of the pose search, :mod:`.rerank`).

A stain colours each brain region with its own level (Nissl and fluorescence differ region by
region, some regions inverted), so at the right pose the section's intensity is close to a
function of the atlas region under each pixel, whatever that function is. The correlation ratio
(Roche, Malandain, Pennec and Ayache 1998)

    eta^2 = 1 - sum_k sum_{i in k} (s_i - mean_k)^2 / sum_i (s_i - mean)^2

of the section's tissue intensities ``s`` grouped by the atlas region ``k`` under them measures
that; it is unchanged by any per-region remapping of the section's intensities, inversion
included. Regions come from the atlas's annotation or, without one, from its intensities in
:data:`LEVELS` quantiles (regions of a Nissl atlas differ in level). Pixels on the atlas's
background form a group of their own. The adjusted form (degrees of freedom of the groups) keeps
poses that touch many small regions from gaining by chance; times the share of the section's
tissue on the atlas's tissue.

The refinement is a pattern search over the plate position ``z``, pitch, yaw (volumes), rotation,
log scale and the plate position of the tissue centre, all neighbours of a pose scored at once
(nearest-label look-ups of the section's tissue pixels, no resampling of the section).
"""

from __future__ import annotations

import math
from dataclasses import replace

import cv2
import numpy as np

from .plates import Plates
from .pose_grid import Pose, plane, rotation_matrix
from .preprocess import _segment

#: Intensity groups of an atlas without annotation (quantiles of its tissue's intensities).
LEVELS = 12
#: Longest side (pixels) of the section's tissue for the correlation ratio.
FIT_SIZE = 64
#: Initial steps of the pattern search: plates, degrees (pitch, yaw, rotation), log scale, plate
#: pixels (times the largest plate's longest side / 100); each is halved when no neighbour improves.
STEPS = (1.0, 4.0, 4.0, 3.0, 0.04, 1.5, 1.5)
#: Halvings of the steps before the search stops, and the most moves.
HALVINGS = 3
MAX_MOVES = 40


class RegionAtlas:
    """The atlas's region of every voxel (or plate pixel), as compact integer groups (0: background)."""

    def __init__(self, plates: Plates):
        self.n = plates.n
        self.is_volume = plates.volume is not None
        if plates.has_labels:
            raw = [plates.labels(i) for i in range(self.n)]
            values = np.unique(np.concatenate([np.unique(r) for r in raw]))
            groups = [np.searchsorted(values, r).astype(np.int32) for r in raw]
            if values[0] != 0:  # no background value in the annotation: keep 0 for "outside"
                groups = [g + 1 for g in groups]
            else:
                groups = [np.where(r == 0, 0, g) for r, g in zip(raw, groups, strict=True)]
            self.groups_count = int(values.size) + 1
        else:
            imgs = [plates.plate(i) for i in range(self.n)]
            masks = [_segment(im)[0] for im in imgs]
            tissue = np.concatenate([im[m] for im, m in zip(imgs, masks, strict=True)])
            edges = np.quantile(tissue, np.linspace(0, 1, LEVELS + 1)[1:-1]) if tissue.size else []
            groups = [
                np.where(m, 1 + np.digitize(im, edges), 0).astype(np.int32)
                for im, m in zip(imgs, masks, strict=True)
            ]
            self.groups_count = LEVELS + 1
        self.shapes = np.array([g.shape for g in groups])
        self.volume = np.stack(groups) if self.is_volume else None
        self.plates = None if self.is_volume else groups
        # the volume with one voxel of background (0) around it, flattened: a look-up clips its voxel
        # to that border and reads one flat index (session 35: the same groups as the bounds checks)
        self._padded = None if self.volume is None else np.pad(self.volume, 1).ravel()
        #: longest side (plate pixels, background included) of the largest plate: the unit of shifts
        self.size = float(max(max(s) for s in self.shapes))

    def lookup(self, points: np.ndarray) -> np.ndarray:
        """Groups at ``points`` ``(..., 3)`` (z, y, x; nearest voxel, 0 outside)."""
        idx = np.rint(points).astype(np.int64)
        if self.is_volume:
            n, h, w = self.volume.shape
            z = np.clip(idx[..., 0], -1, n) + 1
            y = np.clip(idx[..., 1], -1, h) + 1
            x = np.clip(idx[..., 2], -1, w) + 1
            return self._padded[(z * (h + 2) + y) * (w + 2) + x]
        out = np.zeros(idx.shape[:-1], dtype=np.int32)
        for z in np.unique(idx[..., 0]):
            if not 0 <= z < self.n:
                continue
            g = self.plates[int(z)]
            sel = idx[..., 0] == z
            y, x = idx[..., 1][sel], idx[..., 2][sel]
            ok = (y >= 0) & (y < g.shape[0]) & (x >= 0) & (x < g.shape[1])
            vals = np.zeros(y.shape, dtype=np.int32)
            vals[ok] = g[y[ok], x[ok]]
            out[sel] = vals
        return out


def correlation_ratio(values: np.ndarray, groups: np.ndarray, count: int) -> np.ndarray:
    """Adjusted correlation ratio of ``values`` ``(N,)`` given each row of ``groups`` ``(M, N)``
    (integers in ``[0, count)``, 0: the atlas's background), times the share of values on groups
    other than 0: ``(M,)``, at most 1 (0 or less for no relation)."""
    groups = np.atleast_2d(groups)
    m, n = groups.shape
    v = values.astype(np.float64)
    total = float(((v - v.mean()) ** 2).sum())
    if n < 3 or total <= 0:
        return np.zeros(m)
    flat = (groups + count * np.arange(m)[:, None]).ravel()
    counts = np.bincount(flat, minlength=m * count).reshape(m, count)
    sums = np.bincount(flat, weights=np.tile(v, m), minlength=m * count).reshape(m, count)
    between = (sums**2 / np.maximum(counts, 1)).sum(axis=1) - v.sum() ** 2 / n
    within = np.maximum(total - between, 0.0)
    k = (counts > 0).sum(axis=1)
    adjusted = 1.0 - (within / np.maximum(n - k, 1)) / (total / (n - 1))
    share = 1.0 - counts[:, 0] / n
    return adjusted * share


class SectionSamples:
    """The section's tissue pixels (positions in the searched section's pixels, intensities) for
    the correlation ratio, at most :data:`FIT_SIZE` pixels along the tissue's longer side."""

    def __init__(self, grey: np.ndarray, mask: np.ndarray, centre: np.ndarray, size: int = FIT_SIZE):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        longest = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
        f = max(1.0, longest / size)  # section pixels per sample pixel
        shape = (max(4, round(grey.shape[1] / f)), max(4, round(grey.shape[0] / f)))
        small = cv2.resize(grey, shape, interpolation=cv2.INTER_AREA)
        inside = cv2.resize(mask.astype(np.float32), shape, interpolation=cv2.INTER_AREA) > 0.99
        pos = np.argwhere(inside).astype(np.float64)
        fy, fx = grey.shape[0] / shape[1], grey.shape[1] / shape[0]
        self.offsets = np.stack([(pos[:, 0] + 0.5) * fy - 0.5, (pos[:, 1] + 0.5) * fx - 0.5], 1) - centre
        self.values = small[inside].astype(np.float64)


def pose_points(samples: SectionSamples, params: np.ndarray) -> np.ndarray:
    """Atlas points ``(M, N, 3)`` under the section's samples for poses ``params`` ``(M, 7)``:
    ``z, pitch, yaw, rotation, log scale, centre y, centre x`` (see :class:`.pose_grid.Pose`)."""
    params = np.asarray(params, dtype=np.float64)
    # in-plane offsets R^T d / scale (row vectors: d @ R), then along the cut's rows and columns
    lin = np.stack([rotation_matrix(r) for r in params[:, 3]]) / np.exp(params[:, 4])[:, None, None]
    axes = np.stack([np.stack(plane((p, y))) for p, y in params[:, 1:3]])  # (M, 2, 3): e_row, e_col
    return params[:, None, [0, 5, 6]] + samples.offsets[None] @ lin @ axes


def region_ratio(regions: RegionAtlas, samples: SectionSamples, pose: Pose) -> float:
    """The adjusted correlation ratio (:func:`correlation_ratio`) of the section's samples given the
    atlas's regions under them at ``pose`` (its scale in the sampled section's pixels per plate pixel)."""
    params = np.array([[pose.z, *pose.tilt, pose.rotation, math.log(pose.scale), *pose.centre]])
    groups = regions.lookup(pose_points(samples, params))
    return float(correlation_ratio(samples.values, groups, regions.groups_count)[0])


def refine(
    regions: RegionAtlas,
    samples: SectionSamples,
    pose: Pose,
    max_tilt: float,
    max_rotation: float,
    free_z: bool = True,
    halvings: int = HALVINGS,
    moves: int = MAX_MOVES,
) -> Pose:
    """``pose`` moved to a local maximum of the correlation ratio (pattern search); its score is
    the correlation ratio. ``max_tilt`` / ``max_rotation`` bound the angles (degrees); with
    ``free_z`` False the plate position stays; ``halvings`` / ``moves``: when the search stops
    (:data:`HALVINGS`, :data:`MAX_MOVES`)."""
    x = np.array([pose.z, *pose.tilt, pose.rotation, math.log(pose.scale), *pose.centre])
    steps = np.array(STEPS) * np.array([1, 1, 1, 1, 1, regions.size / 100, regions.size / 100])
    free = np.ones(7, dtype=bool)
    free[0] = free_z
    if not regions.is_volume or max_tilt <= 0:
        free[1:3] = False
    lo = np.array([-0.5, -max_tilt, -max_tilt, -max_rotation - 1e-9, -np.inf, -np.inf, -np.inf])
    hi = np.array([regions.n - 0.5, max_tilt, max_tilt, max_rotation + 1e-9, np.inf, np.inf, np.inf])

    def score(params: np.ndarray) -> np.ndarray:
        if not regions.is_volume:
            params = params.copy()
            params[:, 0] = np.rint(params[:, 0])
        return correlation_ratio(
            samples.values, regions.lookup(pose_points(samples, params)), regions.groups_count
        )

    best = float(score(x[None])[0])
    halved = moved = 0
    while halved <= halvings and moved < moves:
        cand = []
        for d in np.flatnonzero(free):
            for sign in (-1, 1):
                y = x.copy()
                y[d] += sign * steps[d]
                if lo[d] <= y[d] <= hi[d]:
                    cand.append(y)
        values = score(np.array(cand))
        k = int(np.argmax(values))
        if values[k] > best + 1e-9:
            x, best = cand[k], float(values[k])
            moved += 1
        else:
            steps = steps / 2
            halved += 1
    z = float(np.rint(x[0])) if not regions.is_volume else float(x[0])
    return replace(
        pose,
        score=best,
        z=z,
        plate=int(np.clip(round(z), 0, regions.n - 1)),
        tilt=(float(x[1]), float(x[2])),
        rotation=float(x[3]),
        scale=float(math.exp(x[4])),
        centre=(float(x[5]), float(x[6])),
    )
