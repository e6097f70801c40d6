"""Elastic refinement of aligned EM sections: one smooth displacement field per section.

After the per-section maps (chain or global solve), every section is resampled at a coarse
work resolution and the dense optical flow (OpenCV DIS) from it to each of its neighbours
``k +- 1 .. k +- radius`` is computed. The section's correction is minus the per-pixel
*median* of those flows, read on the nodes of a coarse grid (``spacing`` pixels, spanning the
section) by a smooth local linear fit over the pixels with content (:func:`_to_grid`):

* a section cut with a distortion of its own moves toward its neighbours, while its
  neighbours, for which it is one vote among ``2 radius``, barely move (with ``radius = 1``
  the median is the mean of two flows and a distortion leaks half into both neighbours);
* structures that move steadily through depth (organelles cut obliquely) pull equally
  forward and backward, so the median leaves them where they are;
* identical sections give zero flows, hence zero fields.

The flow of each pair is computed once and used with its sign reversed for the other section.

With ``solver="joint"`` the affine part of every pair's flow is fitted first (where both
sections have texture) and the affine part of all sections' fields is solved at once over these
pairs (:func:`_joint_affine`): each pair measures the whole section, so its errors are small and
do not add up along the stack as the keypoint pairs' do; the median then works on what the
pairs' affine fits leave. With ``rois`` (``elastic_landmarks``) a pair's rotation and translation
come from the landmarks' regions instead, as the keypoints' do, and only its scale and shear from
the whole section.

Two sections that only have each other (a two-section stack) take half steps each, so they meet
halfway instead of swapping places. Only one section's
neighbours are held in memory at a time (a sliding window of resampled work images), so long,
lazily read stacks stay bounded in memory.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import scipy.sparse as sp
from scipy import ndimage
from scipy.sparse.linalg import spsolve

from .features import check_choice, yx_to_xy
from .solve import _grid, nearest_rotation

#: ``solver`` of :func:`elastic_fields`: the affine part solved for all sections at once, or
#: every section's field from the median of its neighbours' flows alone (sessions 11-14).
ELASTIC_SOLVERS = ("joint", "local")
#: The ``elastic_solver`` of :func:`~.align.align_stack`, ``align-em`` and the EM widget when none is
#: given, with the global solve (session 19; ``"local"`` before, and still with the chain, whose
#: keypoint pairs do not join the joint solve): with the landmarks it beat ``"local"`` on the
#: distorted stacks by 0.10-0.23 Dice at 160 sections (docs/mito.md).
ELASTIC_SOLVER = "joint"


def default_solver(global_solve: bool) -> str:
    """The ``elastic_solver`` used when none is given: :data:`ELASTIC_SOLVER` with the global solve,
    ``"local"`` with the chain (its keypoint pairs do not join the joint solve)."""
    return ELASTIC_SOLVER if global_solve else "local"


#: Weight of the joint solve's prior on every section's final scale and shear (as ``drift_prior``).
#: The pairs' scale and shear come from flows over all textured pixels, which change through depth:
#: with 0.1 the sections' scale and shear came out 1.7 px off at the rms radius (160 distorted
#: em_stack sections, seed 0, joint solve with the landmarks), more than the truth's own 1.1 px; with
#: 1.0, 0.8 px (session 18, docs/mito.md).
JOINT_PRIOR = 1.0
#: How much larger a keypoint pair's error is than its residual in the global solve, relative to a
#: flow pair's and its residual in the joint solve (measured, 40 distorted and undistorted sections
#: of em_stack seed 0: keypoint pairs' error per step 3 x, flow pairs' 0.65 x their median residual):
#: a keypoint pair's error is mostly shared by all pairs of its section (the local distortion of the
#: few mitochondria it sees), which no residual shows. Fitted to the generator, not a knife edge:
#: 3.0 / 4.5 / 6.0 give Dice 0.976 / 0.976 / 0.976 (undistorted) and 0.962 / 0.964 / 0.964
#: (distorted) on 40 sections of seed 3, never used in development.
JOINT_KEYPOINT_SCALE = 4.5
#: Half-width in sections of the window over which the joint solve takes each kind's typical
#: residual for a keypoint pair (a stack-wide median let the distorted part of a stack decide for
#: the rest, review R6 of session 16). A clean run shorter than about this many sections inside a
#: distorted stretch is still decided by its neighbours (review 1 of session 17: sections 8-15 of 24
#: clean gain nothing).
JOINT_WINDOW = 8.0
#: A flow pair ``d`` sections apart weighs ``1 / d**JOINT_DISTANCE_POWER`` (its error grows with ``d``).
JOINT_DISTANCE_POWER = 2.0
#: Share of a flow pair's rotation taken from the landmarks' regions (:func:`_on_landmarks`) rather than
#: from all textured pixels: 1 (the default) the landmarks' rotation, 0 the whole section's (session 35,
#: diagnosis of the rotation walk; docs/mito.md).
LANDMARK_SPIN = 1.0


def _scaled(matrix: np.ndarray, s: float) -> np.ndarray:
    """``matrix`` (aligned -> section, original pixels) at work scale ``s`` on both sides
    (pixel centres: ``x_work = (x + 0.5) s - 0.5``)."""
    t = np.array([[s, 0, 0.5 * s - 0.5], [0, s, 0.5 * s - 0.5], [0, 0, 1.0]])
    return t @ matrix @ np.linalg.inv(t)


def _aligned_work(section: np.ndarray, matrix: np.ndarray, s: float, shape, field=None):
    """Section (uint8) resampled into the aligned frame at work scale (through ``field``, in
    original pixels, when given), and where it has content."""
    h, w = shape
    small = section if s == 1 else cv2.resize(section, (w, h), interpolation=cv2.INTER_AREA)
    ones = np.ones_like(small, dtype=np.uint8)
    if field is not None and np.any(field):
        m = _scaled(matrix, s)
        img = warp_elastic_section(small, m, field * np.float32(s), cv2.INTER_LINEAR)
        valid = warp_elastic_section(ones, m, field * np.float32(s), cv2.INTER_NEAREST)
    else:
        m = yx_to_xy(_scaled(matrix, s))
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        img = cv2.warpPerspective(
            small, m, (w, h), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0
        )
        valid = cv2.warpPerspective(ones, m, (w, h), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP)
    valid = cv2.erode(valid, np.ones((7, 7), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return img, valid & (small.max() > small.min())


def elastic_fields(
    read: Callable[[int], np.ndarray],
    matrices: np.ndarray,
    shape,
    spacing: float = 32.0,
    radius: int = 2,
    scale: float = 0.5,
    smooth: float = 0.5,
    step: Callable[[int], None] | None = None,
    iterations: int = 1,
    workers: int = 1,
    solver: str = "local",
    reference: int = 0,
    prior: float = JOINT_PRIOR,
    pairs: Sequence[tuple[int, int, np.ndarray, float]] = (),
    rois: Callable[[int], np.ndarray] | None = None,
) -> np.ndarray:
    """Smooth per-section displacement fields ``(n, gh, gw, 2)`` (aligned (y, x) pixels).

    ``read(k)`` gives section ``k`` as uint8; ``matrices[k]`` maps the aligned frame to it;
    ``shape`` is ``(H, W)`` of a section; ``spacing`` the grid step in pixels; ``radius`` the
    neighbours on each side; ``scale`` the work resolution of the flow; ``smooth`` the Gaussian
    sigma of the final smoothing in grid cells; ``step(k)`` is called after every section
    (progress, cancel); ``iterations`` relaxation passes; ``workers`` threads. ``read`` must be
    safe to call from several threads, and so must ``rois``. Fields follow
    :class:`~napari_nephi.core.transform.ElasticSectionTransform`.

    ``solver="joint"``: the affine part of the fields is solved for all sections at once
    (:func:`_joint_affine`, ``reference`` keeps its place, ``prior`` weighs each section's
    final scale and shear against 0); the per-section median then handles only what is left
    (the flows minus their pairs' affine fits). ``pairs`` (joint only): the keypoint pair maps
    ``(a, b, matrix, residual)`` that placed the sections (``matrix`` from section ``a`` to section
    ``b`` coordinates, ``residual`` its RMS disagreement in pixels with the placement of all pairs),
    further observations of the same solve (:func:`_joint_affine`). ``rois`` (joint only): ``rois(k)``
    is section ``k``'s region of interest (the dilated mitochondria masks, 0/1 of the section's
    shape); a pair's affine fit then takes its rotation and translation from the textured pixels
    inside either section's region (the keypoints' landmarks), its scale and shear from all
    textured pixels (:func:`_on_landmarks`). ``"local"`` (this function's default; ``align_stack``'s is
    :data:`ELASTIC_SOLVER`): every section's whole field from the median (sessions 11-14).
    """
    n = len(matrices)
    h, w = (int(v) for v in shape)
    gh, gw = max(2, int(round((h - 1) / spacing)) + 1), max(2, int(round((w - 1) / spacing)) + 1)
    work = (max(8, int(round(h * scale))), max(8, int(round(w * scale))))
    s = work[0] / h  # one ratio for both axes (the grid is in aligned pixels)
    fields = np.zeros((n, gh, gw, 2), np.float32)
    joint = check_choice(solver, ELASTIC_SOLVERS, "elastic_solver") == "joint"
    total = np.zeros((n, 6))  # the affine part of the fields so far (joint): G (2 x 2) and t
    for _ in range(max(1, iterations)):  # each pass starts from the previous fields
        update, flows = _pass(
            read, matrices, fields, s, work, (gh, gw), radius, smooth, step, max(1, workers), joint, (h, w),
            rois if joint else None,
        )  # fmt: skip
        if joint:
            # the keypoint targets less the affine part of the whole fields so far, median step included,
            # as the flows see them (review R7)
            keyed = _pair_targets(pairs, matrices, field_affine_fit(fields, (h, w)), (h, w))
            x = _joint_affine(n, flows, matrices, total, (h, w), reference, prior, keyed)
            total += x
            update += _affine_at_nodes(x, (h, w), (gh, gw))
        fields = fields + update
    return fields


def _pass(
    read, matrices, current, s, work, grid, radius, smooth, step, workers, joint=False, shape=None, rois=None
):
    """One relaxation pass: the field update of every section given the ``current`` fields, and
    (``joint``) the affine fit of every pair's flow (:func:`_flow_affine`, ``{(a, b): (params,
    weight)}``; else empty), whose dense field is then taken off the flows before the median.

    Sections are done in blocks of ``2 * workers`` over the threads (OpenCV releases the GIL).
    The flow of a pair is computed once, from the lower section to the higher; the other
    direction is its negative (exact to first order for the smooth, small flows between
    aligned neighbours). Two sections that only have each other take half steps (full
    steps would swap them). Only the resampled work images and the flows of a block and its
    ``radius`` margins are kept. ``rois`` (joint): the sections' regions for the affine fits."""
    n = len(matrices)
    images: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    flows: dict[tuple[int, int], np.ndarray] = {}
    affines: dict[tuple[int, int], tuple[np.ndarray, float]] = {}
    textured: dict[int, np.ndarray] = {}  # joint: where each image has texture (once per image)
    regions: dict[int, np.ndarray] = {}  # joint with rois: each image's region of interest
    unfitted: set[tuple[int, int]] = set()  # joint: pairs without an affine fit (left out of the median)
    fields = np.zeros_like(current)
    local = threading.local()

    def flow(pair: tuple[int, int]) -> np.ndarray:
        if not hasattr(local, "dis"):
            local.dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        a, b = pair
        f = local.dis.calc(images[a][0], images[b][0], None)  # img_a(p) ~ img_b(p + flow(p))
        if joint:
            where = (images[a][1] & images[b][1]).astype(bool) & textured[a] & textured[b]
            fit = _flow_affine(f, where, s, shape)
            if rois is not None and fit is not None:
                fit = (_on_landmarks(f, where & (regions[a] | regions[b]), s, shape, fit[0]), fit[1])
            if fit is None:  # its full flow would mix with the others' residuals in the median
                unfitted.add(pair)
            else:
                f = f - _affine_dense(fit[0], s, shape, f.shape[:2])
                affines[pair] = fit
        return f

    def partners(k: int) -> list[int]:
        """The sections with content within ``radius`` of ``k`` whose pair with ``k`` counts (joint: has an
        affine fit). A section outside the window of kept images (a partner's partner) counts as one."""
        lo, hi = max(0, k - radius), min(n, k + radius + 1)
        return [
            j
            for j in range(lo, hi)
            if j != k and (j not in images or images[j][1].any()) and (min(k, j), max(k, j)) not in unfitted
        ]

    def one(k: int) -> None:
        img_k, valid_k = images[k]
        if not valid_k.any():  # a blank section: no field
            return
        towards, valid = [], valid_k.astype(bool)
        near = partners(k)
        for j in near:
            towards.append(flows[k, j] if k < j else -flows[j, k])
            valid &= images[j][1].astype(bool)
        if towards and valid.any():
            # two sections that only have each other (a two-section stack): each moves toward the
            # other, so full steps would swap them; a half step each meets halfway. A section with
            # more partners is one vote among several for them, so it takes the full step.
            gain = 0.5 if len(near) == 1 and partners(near[0]) == [k] else 1.0
            fields[k] = _to_grid(-gain * np.median(np.stack(towards), axis=0) / s, valid, grid, smooth)

    block = 2 * workers
    with ThreadPoolExecutor(max_workers=workers) as ex:
        for start in range(0, n, block):
            stop = min(n, start + block)
            needed = range(max(0, start - radius), min(n, stop + radius))
            for old in [j for j in images if j not in needed]:
                del images[old]
                textured.pop(old, None)
                regions.pop(old, None)
            for old in [p for p in flows if p[0] < start - radius]:
                del flows[old]
            todo = [j for j in needed if j not in images]

            def load(j: int):  # in the pool: the section's read and its region's detection
                res = _aligned_work(read(j), matrices[j], s, work, current[j])
                if rois is None:
                    return res, None
                roi = (np.asarray(rois(j)) > 0).astype(np.uint8) * np.uint8(255)
                return res, _aligned_work(roi, matrices[j], s, work, current[j])[0] > 127

            for j, (res, region) in zip(todo, ex.map(load, todo)):
                images[j] = res
                if joint:
                    textured[j] = _textured(res[0])
                if region is not None:
                    regions[j] = region
            pairs = {
                (min(k, j), max(k, j))
                for k in range(start, stop)
                for j in range(max(0, k - radius), min(n, k + radius + 1))
                if j != k and images[j][1].any() and images[k][1].any()
            }
            pairs = sorted(p for p in pairs if p not in flows)
            for p, f in zip(pairs, ex.map(flow, pairs)):
                flows[p] = f
            for k, _ in zip(range(start, stop), ex.map(one, range(start, stop))):
                if step is not None:
                    step(k)
    return fields, affines


def _centred(shape, size, s):
    """Original-pixel (y, x) coordinates, relative to the section centre, of the work pixels
    ``size`` at work scale ``s`` (pixel centres: ``x = (x_work + 0.5) / s - 0.5``)."""
    h, w = shape
    y = (np.arange(size[0]) + 0.5) / s - 0.5 - (h - 1) / 2
    x = (np.arange(size[1]) + 0.5) / s - 0.5 - (w - 1) / 2
    return y, x


def _textured(img: np.ndarray, size: int = 9, floor: float = 1.0) -> np.ndarray:
    """Where ``img`` has texture: local standard deviation (``size`` px box) above ``floor`` grey
    levels. Flow in a blank region (the zero border of a padded or rotated section) is only
    extrapolated from its edges, and would bias the affine fit of a pair's flow."""
    f = img.astype(np.float32)
    mean = cv2.blur(f, (size, size))
    var = cv2.blur(f * f, (size, size)) - mean * mean
    return var > floor**2


def _flow_affine(flow: np.ndarray, valid: np.ndarray, s: float, shape, every: int = 4):
    """The affine fit ``u(p) = G p + t`` (original (y, x) pixels, ``p`` about the section centre;
    ``params = (G00, G01, G10, G11, t_y, t_x)``) of a work-scale (x, y) ``flow`` over the
    ``valid`` pixels (every ``every``-th in each axis), refitted once without the pixels more
    than 3 median residuals off; and its weight (the share of the section it covers). None
    with under 50 pixels."""
    ys, xs = np.nonzero(valid[::every, ::every])
    if len(ys) < 50:
        return None
    ys, xs = ys * every, xs * every
    cy, cx = _centred(shape, valid.shape, s)
    a = np.stack([cy[ys], cx[xs], np.ones(len(ys))], 1)
    f = flow[ys, xs][:, ::-1].astype(np.float64) / s  # (y, x) original pixels
    coef = np.linalg.lstsq(a, f, rcond=None)[0]
    r = np.linalg.norm(a @ coef - f, axis=1)
    keep = r <= max(3.0 * float(np.median(r)), 0.25)
    if keep.sum() >= 50:
        coef = np.linalg.lstsq(a[keep], f[keep], rcond=None)[0]
    params = np.array([coef[0, 0], coef[1, 0], coef[0, 1], coef[1, 1], coef[2, 0], coef[2, 1]])
    return params, float(len(ys)) / valid[::every, ::every].size


def _on_landmarks(flow: np.ndarray, region: np.ndarray, s: float, shape, whole: np.ndarray) -> np.ndarray:
    """The affine fit ``whole`` of a pair's flow with its rotation and translation taken from the
    fit over ``region`` (the landmarks), its scale and shear kept (a few clustered landmarks
    determine those poorly); ``whole`` where the region holds too few pixels. The translation is
    the one that keeps the landmark fit's displacement at the region's centroid."""
    fit = _flow_affine(flow, region, s, shape)
    if fit is None:
        return whole
    g_roi, g = fit[0][:4].reshape(2, 2), whole[:4].reshape(2, 2)
    spin = LANDMARK_SPIN * (0.5 * ((g_roi[0, 1] - g_roi[1, 0]) - (g[0, 1] - g[1, 0])))
    out = g + np.array([[0.0, spin], [-spin, 0.0]])
    ys, xs = np.nonzero(region)
    cy, cx = _centred(shape, region.shape, s)
    c = np.array([cy[ys].mean(), cx[xs].mean()])
    t = fit[0][4:] + (g_roi - out) @ c
    return np.r_[out.ravel(), t]


def _affine_yx(params: np.ndarray, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(u_y, u_x)`` of the affine fields ``params`` (``(..., 6)``, :func:`_flow_affine`) on the
    grid of centred coordinates ``y`` x ``x``: arrays ``(..., len(y), len(x))``."""
    g = np.asarray(params)[..., None, None, :]
    uy = g[..., 0] * y[:, None] + g[..., 1] * x[None, :] + g[..., 4]
    ux = g[..., 2] * y[:, None] + g[..., 3] * x[None, :] + g[..., 5]
    return uy, ux


def _affine_dense(params: np.ndarray, s: float, shape, size) -> np.ndarray:
    """The affine field ``params`` (:func:`_flow_affine`) as a work-scale (x, y) flow of ``size``."""
    uy, ux = _affine_yx(params, *_centred(shape, size, s))
    return np.stack([ux * s, uy * s], -1).astype(np.float32)


def _node_coords(shape, grid) -> tuple[np.ndarray, np.ndarray]:
    """Centred (y, x) pixel coordinates of the ``grid`` nodes spanning a section of ``shape``."""
    h, w = shape
    gh, gw = grid
    ny = np.arange(gh) * ((h - 1) / max(gh - 1, 1)) - (h - 1) / 2
    nx = np.arange(gw) * ((w - 1) / max(gw - 1, 1)) - (w - 1) / 2
    return ny, nx


def _affine_at_nodes(x: np.ndarray, shape, grid) -> np.ndarray:
    """``(n, gh, gw, 2)`` (y, x) values of the affine fields ``x`` (``(n, 6)``) at the grid nodes."""
    return np.stack(_affine_yx(x, *_node_coords(shape, grid)), -1).astype(np.float32)


def field_affine_fit(fields: np.ndarray, shape) -> np.ndarray:
    """``(n, 6)`` least-squares affine fits (:func:`_flow_affine` parameters) of the ``fields``
    over their grid nodes."""
    n = len(fields)
    ny, nx = _node_coords(shape, fields.shape[1:3])
    yy, xx = np.meshgrid(ny, nx, indexing="ij")
    d = _design(np.stack([yy.ravel(), xx.ravel()], 1))
    return np.linalg.lstsq(d, fields.reshape(n, -1).T.astype(np.float64), rcond=None)[0].T


def field_affine_matrices(fields: np.ndarray, shape) -> np.ndarray:
    """``(n, 3, 3)`` (y, x): ``p -> p + a(p)``, ``a`` each field's least-squares affine fit
    (:func:`field_affine_fit`), as matrices acting before the sections' own."""
    g = field_affine_fit(fields, shape)
    c = np.array([(shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0])
    out = np.repeat(np.eye(3)[None], len(g), axis=0)
    out[:, :2, :2] += g[:, :4].reshape(-1, 2, 2)
    out[:, :2, 2] = g[:, 4:] - g[:, :4].reshape(-1, 2, 2) @ c
    return out


def reframed_fields(fields: np.ndarray, to_old: np.ndarray, shape) -> np.ndarray:
    """The sections' ``fields`` (``(n, gh, gw, 2)``, ``p + u(p)`` then the section's matrix) in another
    frame of the aligned stack: a point ``q`` of the new frame is ``to_old q`` (an affine map, ``(3, 3)``,
    (y, x)) of the old one, whose matrices become ``matrix @ to_old``, so ``u'(q) = A^-1 u(to_old q)``
    (``A`` its linear part), sampled bilinearly (edges clamped) at the new grid's nodes (session 24:
    ``reference="auto"`` puts a detrended stack in its middle section's frame after the elastic step)."""
    h, w = shape
    gh, gw = fields.shape[1:3]
    ny, nx = np.arange(gh) * ((h - 1) / max(gh - 1, 1)), np.arange(gw) * ((w - 1) / max(gw - 1, 1))
    nodes = np.stack(np.meshgrid(ny, nx, indexing="ij"), -1).reshape(-1, 2)
    to_old = np.asarray(to_old, np.float64) / to_old[2, 2]
    at = nodes @ to_old[:2, :2].T + to_old[:2, 2]
    back = np.linalg.inv(to_old[:2, :2])
    # grid coordinates of the new nodes in the old grid; bilinear, edges clamped
    g = np.stack([at[:, 0] * (gh - 1) / max(h - 1, 1), at[:, 1] * (gw - 1) / max(w - 1, 1)])
    out = np.empty_like(fields)
    for k, f in enumerate(fields):
        both = np.stack(
            [ndimage.map_coordinates(f[..., c], g, order=1, mode="nearest") for c in range(2)], -1
        )
        out[k] = (both @ back.T).reshape(gh, gw, 2)
    return out


def _pair_targets(pairs, matrices, current, shape):
    """The keypoint ``pairs`` ``(a, b, matrix, residual)`` as observations of :func:`_joint_affine`:
    ``(a, b, targets, residuals)``, the target of a pair being the displacement, at the joint solve's
    grid points (aligned frame, (y, x) interleaved), from section ``a``'s content to section ``b``'s
    that its map asks for, less what the ``current`` affine fields already give."""
    h, w = shape
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    pts = _grid((h, w))
    d = _design(pts - centre)
    out = [], [], [], []
    for a, b, m, r in pairs:
        # aligned p in a shows what aligned P_b^-1 M P_a p shows in b
        q = (
            np.linalg.inv(matrices[b])
            @ np.asarray(m, np.float64)
            @ matrices[a]
            @ np.c_[pts, np.ones(len(pts))].T
        )
        g = (q[:2] / q[2:]).T - pts
        for lst, v in zip(out, (a, b, (g.ravel() - d @ (current[b] - current[a])), r)):
            lst.append(v)
    return tuple(np.array(v) for v in out)


def _bridges(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Which of the edges ``(a[i], b[i])`` are bridges (on no loop): iterative Tarjan DFS."""
    adj: dict[int, list[tuple[int, int]]] = {}
    for i, (u, v) in enumerate(zip(a.tolist(), b.tolist())):
        adj.setdefault(u, []).append((v, i))
        adj.setdefault(v, []).append((u, i))
    disc: dict[int, int] = {}
    low: dict[int, int] = {}
    out = np.zeros(len(a), bool)
    for root in adj:
        if root in disc:
            continue
        disc[root] = low[root] = len(disc)
        stack = [(root, -1, iter(adj[root]))]
        while stack:
            u, via, it = stack[-1]
            for v, e in it:
                if e == via:
                    continue
                if v in disc:
                    low[u] = min(low[u], disc[v])
                else:
                    disc[v] = low[v] = len(disc)
                    stack.append((v, e, iter(adj[v])))
                    break
            else:
                stack.pop()
                if stack:
                    p = stack[-1][0]
                    low[p] = min(low[p], low[u])
                    if low[u] > disc[p]:
                        out[via] = True
    return out


def _design(pts: np.ndarray) -> np.ndarray:
    """``(2 len(pts), 6)`` rows (y, x) per point of ``u = G p + t`` (:func:`_flow_affine` parameters)."""
    d = np.zeros((2 * len(pts), 6))
    d[0::2, 0], d[0::2, 1], d[0::2, 4] = pts[:, 0], pts[:, 1], 1.0
    d[1::2, 2], d[1::2, 3], d[1::2, 5] = pts[:, 0], pts[:, 1], 1.0
    return d


def _joint_affine(n, pairs, matrices, current, shape, reference, prior, keyed=None, iterations: int = 10):
    """The affine field update ``(n, 6)`` (:func:`_flow_affine` parameters) of all sections at once.

    Corrected sections agree when ``u_b - u_a`` equals the flow from ``a`` to ``b`` (first order),
    so every pair asks, at a 3 x 3 grid of points over the section, that the difference of its
    sections' affine updates equal its flow's affine fit; pairs are weighted by ``share /
    distance**2`` and by iteratively reweighted least squares toward the least absolute deviations
    (weight ``1 / max(residual, 0.25 px)``: as with the median, a section distorted on its own
    moves while its neighbours stay put; the prior terms likewise, so the typical section's
    shape, not the mean, is taken as undistorted). Because every pair measures the whole section, not a
    few keypoints, their errors are small and do not add up along the stack as the pairwise
    maps' do (with ``rois``, see :func:`elastic_fields`, the pairs' rotation and translation come
    from the landmarks' regions, as the keypoints' do; ``JOINT_KEYPOINT_SCALE`` was measured
    without them). ``prior`` (per unit of scale or shear, in pixels at the grid's radius, as the
    global solve's ``drift_prior``) pulls every section's final scale and shear (of ``matrices``
    with the ``current`` affine fields) toward none: the sections' own distortions average
    out. A tiny ridge fixes rotation and translation; the ``reference`` section's are then
    taken off every section with a pair (it keeps its place). Sections without a fitted pair (blank,
    or too little texture) get no update, not even that common shift.

    ``keyed`` (:func:`_pair_targets`): the keypoint pairs. They join a second solve, in which the flow
    pairs keep their final weights and a keypoint pair weighs as a flow pair of the same distance
    times the ratio of the kinds' squared typical errors: each kind's median residual (the flows' in
    the solve above, the keypoint pairs' in the global solve), the keypoint pairs' times
    ``JOINT_KEYPOINT_SCALE``; a keypoint pair with a residual above its kind's median weighs less in
    proportion. Pairs on no loop (bridges, e.g. a chain) fit exactly, say nothing by their residual,
    and are left out. Where the keypoint pairs agree closely (undistorted sections: median 0.08 px on
    em_stack) they keep their placement; where they disagree (distorted sections: 1.0 px, each pair
    sees another few mitochondria's local distortion) the flows decide."""
    if not pairs:  # one section: no neighbour flows, nothing to solve
        return np.zeros((n, 6))
    h, w = shape
    pts = _grid((h, w)) - [(h - 1) / 2, (w - 1) / 2]
    radius = float(np.linalg.norm(pts, axis=1).max()) or 1.0
    d = _design(pts)
    keys = sorted(pairs)
    a = np.array([k[0] for k in keys], dtype=np.int64)
    b = np.array([k[1] for k in keys], dtype=np.int64)
    target = np.array([d @ pairs[k][0] for k in keys]).reshape(len(keys), -1)
    base = np.array([pairs[k][1] / (k[1] - k[0]) ** JOINT_DISTANCE_POWER for k in keys])
    placed = np.zeros(n, bool)
    placed[a], placed[b] = True, True
    # the prior's targets: minus each section's current scale and shear (symmetric part of the polar
    # decomposition of its linear part, aligned -> section, with the current affine field)
    sym = np.zeros((n, 3))
    for k in np.flatnonzero(placed):
        lin = matrices[k][:2, :2] / matrices[k][2, 2] @ (np.eye(2) + current[k, :4].reshape(2, 2))
        u = nearest_rotation(lin).T @ lin - np.eye(2)
        sym[k] = [u[0, 0], u[1, 1], 0.5 * (u[0, 1] + u[1, 0])]
    c = np.zeros((3, 6))  # the prior acts on (G00, G11, (G01 + G10) / 2): scale and shear
    c[0, 0], c[1, 3], c[2, 1], c[2, 2] = 1.0, 1.0, 0.5, 0.5
    scale = np.array([1.0, 1.0, 2.0])  # the shear counts twice in a matrix's squared norm
    p_mat = prior * radius**2 * (c.T * scale) @ c
    p_rhs = -prior * radius**2 * (sym * scale) @ c  # (n, 6)
    ridge = 1e-6 * np.diag([radius**2] * 4 + [1.0, 1.0])
    x = np.zeros((n, 6))
    if not len(keys):
        return x
    idx = np.flatnonzero(placed)
    col = np.full(n, -1)
    col[idx] = np.arange(len(idx))
    m = len(idx)
    dtd = d.T @ d

    def solve(a, b, target, wgt, robust_prior):
        rows, cols, vals = [], [], []
        rhs = np.zeros((m, 6))
        for i, j, sign in ((a, a, 1.0), (b, b, 1.0), (a, b, -1.0), (b, a, -1.0)):
            rows.append(col[i])
            cols.append(col[j])
            vals.append(sign * wgt[:, None, None] * dtd)
        np.add.at(rhs, col[b], wgt[:, None] * (target @ d))
        np.subtract.at(rhs, col[a], wgt[:, None] * (target @ d))
        rows.append(np.arange(m))
        cols.append(np.arange(m))
        vals.append(robust_prior[idx, None, None] * p_mat + ridge)
        rhs += robust_prior[idx, None] * p_rhs[idx]
        r, cc, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
        rr = (r[:, None, None] * 6 + np.arange(6)[None, :, None]) * np.ones((1, 1, 6), np.int64)
        ci = (cc[:, None, None] * 6 + np.arange(6)[None, None, :]) * np.ones((1, 6, 1), np.int64)
        normal = sp.csc_matrix((v.ravel(), (rr.ravel(), ci.ravel())), shape=(6 * m, 6 * m))
        x[idx] = np.asarray(spsolve(normal, rhs.ravel())).reshape(m, 6)
        return np.sqrt((((x[b] - x[a]) @ d.T - target) ** 2).reshape(len(a), -1, 2).sum(2).mean(1))

    robust = np.ones(len(keys))
    robust_prior = np.ones(n)
    for _ in range(iterations):
        res = solve(a, b, target, base * robust, robust_prior)
        robust = 1.0 / np.maximum(res, 0.25)
        shape_px = radius * np.sqrt((((x @ c.T + sym) ** 2) * scale).sum(1))  # final scale and shear
        robust_prior = 0.25 / np.maximum(shape_px, 0.25)
    ka = kb = np.zeros(0, np.int64)
    if keyed is not None and len(keyed[0]):
        ka, kb, kt, kr = keyed
        use = placed[ka] & placed[kb]
        ka, kb, kt, kr = ka[use], kb[use], kt[use], kr[use]
    # only pairs on a loop have residuals that say something (a bridge, e.g. in a chain, fits exactly)
    if len(ka):
        loop = ~_bridges(ka, kb)
        ka, kb, kt, kr = ka[loop], kb[loop], kt[loop], kr[loop]
    if len(ka):
        # the flows keep their weights; a keypoint pair counts as a flow pair of the same distance
        # times the ratio of the kinds' typical squared errors (each kind's median residual, the
        # keypoint pairs' times JOINT_KEYPOINT_SCALE), less where its own residual is larger. The
        # typical values are taken over the pairs within JOINT_WINDOW sections of each keypoint pair,
        # so a stack distorted in one part keeps its undistorted part's placement (review R6)
        at, mid = 0.5 * (ka + kb), 0.5 * (a + b)
        m_key = np.maximum(_local_median(at, kr, at, JOINT_WINDOW), 1e-3)
        ratio = (_local_median(mid, res, at, JOINT_WINDOW) / (JOINT_KEYPOINT_SCALE * m_key)) ** 2
        near = b - a == 1 if np.any(b - a == 1) else np.ones(len(a), bool)
        unit = _local_median(mid[near], (base * robust)[near], at, JOINT_WINDOW)
        w_key = unit * ratio * np.minimum(1.0, m_key / np.maximum(kr, 1e-3)) / (kb - ka) ** 2
        wgt = np.r_[base * robust, w_key]
        solve(np.r_[a, ka], np.r_[b, kb], np.r_[target, kt], wgt, robust_prior)
    if placed[reference]:  # the reference keeps its place: its rotation and translation off every section
        rot = 0.5 * (x[reference, 2] - x[reference, 1])
        x[idx, 1] += rot
        x[idx, 2] -= rot
        x[idx, 4:] -= x[reference, 4:]
    return x


def _local_median(mid: np.ndarray, values: np.ndarray, at: np.ndarray, window: float) -> np.ndarray:
    """The median of the ``values`` whose ``mid`` (a pair's middle section) is within ``window``
    sections of each of ``at`` (of all ``values`` where none is)."""
    order = np.argsort(mid, kind="stable")
    ms, vs = mid[order], values[order]
    lo = np.searchsorted(ms, at - window, "left")
    hi = np.searchsorted(ms, at + window, "right")
    whole = float(np.median(values))
    return np.array([float(np.median(vs[i:j])) if j > i else whole for i, j in zip(lo, hi)])


def _to_grid(u: np.ndarray, valid: np.ndarray, grid, smooth: float) -> np.ndarray:
    """The dense ``(h, w, 2)`` (x, y) field ``u`` on the ``grid`` nodes, as (y, x).

    Node ``(i, j)`` sits at pixel ``(i (h - 1) / (gh - 1), j (w - 1) / (gw - 1))``, as the grid
    is read back (:func:`warp_elastic_section`). Its value is a Gaussian-weighted local *linear*
    fit of ``u`` over the ``valid`` pixels around that point (sigma: a grid cell's averaging
    plus ``smooth`` cells), so a field that varies linearly is reproduced exactly, at the edges
    of the section and of the content too; nodes without content nearby get 0. The sums are
    taken on a reduced copy (about 4 pixels per cell) for speed."""
    gh, gw = grid
    h, w = valid.shape
    cell = max((h - 1) / max(gh - 1, 1), (w - 1) / max(gw - 1, 1), 1.0)
    f = max(1, int(cell // 4))
    dh, dw = max(2, int(round(h / f))), max(2, int(round(w / f)))
    sy, sx = h / dh, w / dw  # reduced pixel j covers work pixels [j s, (j + 1) s)
    # area sums of w u, w, w y, w x (dense coordinates relative to the section centre: exact for
    # partly covered cells), then the second moments from the reduced pixel centres
    wgt = valid.astype(np.float32)
    yd = (np.arange(h, dtype=np.float32) - (h - 1) / 2)[:, None]
    xd = (np.arange(w, dtype=np.float32) - (w - 1) / 2)[None, :]
    num = cv2.resize(u * wgt[..., None], (dw, dh), interpolation=cv2.INTER_AREA).astype(np.float64)
    dense = np.stack([wgt, wgt * yd, wgt * xd], -1)
    red = cv2.resize(dense, (dw, dh), interpolation=cv2.INTER_AREA).astype(np.float64)
    del dense
    den, wy, wx = red[..., 0], red[..., 1], red[..., 2]
    yc = ((np.arange(dh) + 0.5) * sy - 0.5 - (h - 1) / 2)[:, None] * np.ones((1, dw))
    xc = ((np.arange(dw) + 0.5) * sx - 0.5 - (w - 1) / 2)[None, :] * np.ones((dh, 1))
    sigma = cell * np.sqrt(1 / 12 + max(smooth, 0.0) ** 2)
    # rows of the normal equations of u(p) ~ c + g . p: weighted by 1, y, x
    moments = [den, wy, wx, den * yc, wy * yc, wx * yc, den * xc, wy * xc, wx * xc]
    for c in range(2):
        moments += [num[..., c], num[..., c] * yc, num[..., c] * xc]
    blurred = np.stack(
        [cv2.GaussianBlur(m, (0, 0), sigmaX=sigma / sx, sigmaY=sigma / sy, borderType=cv2.BORDER_CONSTANT)
         for m in moments], -1,
    )  # fmt: skip
    # node positions: work pixels -> reduced pixel coordinates
    ny = np.arange(gh) * ((h - 1) / max(gh - 1, 1))
    nx = np.arange(gw) * ((w - 1) / max(gw - 1, 1))
    my = ((ny + 0.5) / sy - 0.5).astype(np.float32)[:, None] * np.ones((1, gw), np.float32)
    mx = ((nx + 0.5) / sx - 0.5).astype(np.float32)[None, :] * np.ones((gh, 1), np.float32)
    at = np.stack(
        [cv2.remap(blurred[..., i], mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
         for i in range(blurred.shape[-1])], -1,
    )  # fmt: skip
    dy = (ny - (h - 1) / 2)[:, None] * np.ones((1, gw))
    dx = (nx - (w - 1) / 2)[None, :] * np.ones((gh, 1))
    a = at[..., :9].reshape(gh, gw, 3, 3).copy()
    # about the node: u(p) ~ c + g . (p - node), rows weighted by 1, y - ny, x - nx
    a[..., 1] -= dy[..., None] * a[..., 0]
    a[..., 2] -= dx[..., None] * a[..., 0]
    a[..., 1, :] -= dy[..., None] * a[..., 0, :]
    a[..., 2, :] -= dx[..., None] * a[..., 0, :]
    m0 = a[..., 0, 0]
    ridge = 1e-6 * m0 * sigma**2  # keeps the slope determined where the content is thin
    a[..., 1, 1] += ridge
    a[..., 2, 2] += ridge
    ok = m0 > 1e-3 * max(float(m0.max()), 1e-12)
    out = np.zeros((gh, gw, 2))
    for c in range(2):
        k = 9 + 3 * c
        b0, by, bx = at[..., k], at[..., k + 1], at[..., k + 2]
        rhs = np.stack([b0, by - dy * b0, bx - dx * b0], -1)
        sol = np.zeros_like(rhs)
        sol[ok] = np.linalg.solve(a[ok], rhs[ok][..., None])[..., 0]
        out[..., c] = sol[..., 0]
    return out[..., ::-1].astype(np.float32)  # (x, y) flow -> (y, x)


def _linear_weights(size: int, nodes: int) -> np.ndarray:
    """``(size, nodes)`` float32 linear interpolation weights from ``nodes`` grid values spanning
    ``0 .. size - 1`` to every pixel (as :func:`napari_nephi.core.transform._bilinear`)."""
    g = np.arange(size, dtype=np.float64) * ((nodes - 1) / max(size - 1, 1))
    i0 = np.minimum(g.astype(np.int64), nodes - 2)
    f = g - i0
    out = np.zeros((size, nodes), np.float32)
    out[np.arange(size), i0] = 1 - f
    out[np.arange(size), i0 + 1] += f
    return out


def warp_elastic_section(section: np.ndarray, matrix: np.ndarray, field: np.ndarray, interpolation: int):
    """``section`` sampled at ``matrix (p + field(p))`` for every aligned pixel ``p`` (OpenCV remap)."""
    h, w = section.shape
    gh, gw = field.shape[:2]
    # bilinear on the grid whose nodes span the section, exactly (separable: rows, then columns)
    wy, wx = _linear_weights(h, gh), _linear_weights(w, gw)
    dense = np.stack([wy @ field[..., c].astype(np.float32) @ wx.T for c in range(2)], -1)
    py = np.arange(h, dtype=np.float32)[:, None] + dense[..., 0]
    px = np.arange(w, dtype=np.float32)[None, :] + dense[..., 1]
    del dense
    m = matrix.astype(np.float64)
    z = m[2, 0] * py + m[2, 1] * px + m[2, 2]
    map_y = ((m[0, 0] * py + m[0, 1] * px + m[0, 2]) / z).astype(np.float32)
    map_x = ((m[1, 0] * py + m[1, 1] * px + m[1, 2]) / z).astype(np.float32)
    del py, px, z
    return cv2.remap(section, map_x, map_y, interpolation, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
