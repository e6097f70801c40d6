"""Global placement of all sections from a graph of pairwise maps (robust sparse least squares).

Every section ``k`` gets an unknown map ``B_k`` from its own coordinates to the aligned frame
(rigid, similarity or affine; ``B_ref`` is the identity). A pairwise map ``M`` from section
``a`` to section ``b`` (any 3x3, e.g. a homography) says that a point ``q`` of section ``a``
and its image ``M q`` in section ``b`` are the same point of the aligned frame:
``B_a q = B_b (M q)``. These equations, at a 3 x 3 grid of points ``q`` over the section, are
linear in the unknowns, couple only the two sections of a pair, and are solved for all
sections at once by sparse (banded) normal equations, assembled for all pairs at once as one
``params x params`` block per pair of sections (2000 sections with 3 neighbours each, affine,
drift prior, up to 10 reweighting passes, at load ~10: 2.3 CPU s and 27 MB at most, 14 KB per
section; session 13's per-pair assembly took 25-35 CPU s and 114 MB measured alongside in the
same conditions, where session 11 had noted "about 2 CPU s" for a rigid solve on a quiet
machine). Pairs that disagree with the others are
down-weighted by iteratively reweighted least squares with Huber weights on their RMS
residual (``huber`` pixels).

``drift_prior`` adds, for every section, the difference between its linear part and the
nearest rotation (scale and shear, scaled by the half-size of the point grid so that it
counts in pixels) as a residual with that weight: it holds back scale and shear that would
otherwise build up slowly along a long stack, at the price of also resisting a real slow
change of shape of the sections (compression that truly varies through the stack).
Rotation and translation are never penalised.

Matrices are homogeneous 3x3 in ``(y, x)`` order, as in :mod:`.align`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import spsolve

from ...core.errors import InputError
from ...core.options import check_float, check_int
from .features import check_choice

#: Models of the per-section map of the global solve, simplest last.
GLOBAL_MODELS = ("rigid", "similarity", "affine")

#: Defaults of :func:`~.align.align_stack` (and of the EM widget and ``align-em``): each section
#: matched to its 2 nearest sections toward the reference and all placed by the global solve, with
#: affine sections (a section's own compression or shear is undone, as the chain does) and a weak
#: drift prior (0.1: leaves about 3 % of an isolated section's own 4 % compression, and holds back
#: the scale/shear an affine solve otherwise accumulates on distorted stacks; evidence in
#: benchmarks/README.md, "Long stacks, session 14").
NEIGHBOURS = 2
GLOBAL_MODEL = "affine"
DRIFT_PRIOR = 0.1


@dataclass
class Edge:
    """A pairwise map ``matrix`` ((y, x) 3x3) from section ``a`` coordinates to section ``b``
    coordinates, with a confidence ``weight`` (e.g. 1, or small for a guessed identity)."""

    a: int
    b: int
    matrix: np.ndarray
    weight: float = 1.0
    stats: dict | None = None  # the pair's match statistics, for the report
    #: whether the pair is a real match that places its sections (``None``: ``weight >= 0.5``);
    #: set it when ``weight`` also carries other factors (e.g. 1 / distance^2)
    confident: bool | None = None

    def is_confident(self) -> bool:
        return bool(self.weight >= 0.5) if self.confident is None else bool(self.confident)


def _grid(shape, count: int = 3) -> np.ndarray:
    """``(count**2, 2)`` (y, x) points spread over the central 60 % of a section."""
    h, w = shape
    ys = np.linspace(0.2 * (h - 1), 0.8 * (h - 1), count)
    xs = np.linspace(0.2 * (w - 1), 0.8 * (w - 1), count)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], 1)


def _project(m: np.ndarray, p: np.ndarray) -> np.ndarray:
    q = p @ m[:2, :2].T + m[:2, 2]
    z = p @ m[2, :2] + m[2, 2]
    return q / z[:, None]


def _design(p: np.ndarray, model: str) -> np.ndarray:
    """``(len(p), 2, n_params)``: the coefficients of ``B p`` in the parameters of ``B``."""
    y, x = p[:, 0], p[:, 1]
    one, zero = np.ones_like(y), np.zeros_like(y)
    if model == "affine":  # B = [[l00, l01, ty], [l10, l11, tx]]
        ry = np.stack([y, x, one, zero, zero, zero], 1)
        rx = np.stack([zero, zero, zero, y, x, one], 1)
    else:  # similarity: B = [[a, -b, ty], [b, a, tx]]
        ry = np.stack([y, -x, one, zero], 1)
        rx = np.stack([x, y, zero, one], 1)
    return np.stack([ry, rx], 1)


def _to_matrix(params: np.ndarray, model: str) -> np.ndarray:
    m = np.eye(3)
    if model == "affine":
        m[:2] = params.reshape(2, 3)
    else:
        a, b, ty, tx = params
        m[:2] = [[a, -b, ty], [b, a, tx]]
    return m


def _from_matrix(m: np.ndarray, model: str) -> np.ndarray:
    if model == "affine":
        return m[:2].ravel().copy()
    return np.array([(m[0, 0] + m[1, 1]) / 2, (m[1, 0] - m[0, 1]) / 2, m[0, 2], m[1, 2]])


def nearest_rotation(linear: np.ndarray) -> np.ndarray:
    """The rotation closest to a 2x2 matrix (polar decomposition; no reflection)."""
    u, _, vt = np.linalg.svd(linear)
    d = np.sign(np.linalg.det(u @ vt)) or 1.0
    return u @ np.diag([1.0, d]) @ vt


def solve_global(
    n: int,
    edges: list[Edge],
    ref: int,
    shape,
    model: str = "rigid",
    initial: np.ndarray | None = None,
    huber: float = 3.0,
    drift_prior: float = 0.0,
    iterations: int = 10,
) -> tuple[np.ndarray, dict]:
    """Place all ``n`` sections from the pairwise ``edges`` at once.

    Parameters
    ----------
    n, ref, shape
        Number of sections, the section kept fixed, the ``(y, x)`` size of a section.
    model
        ``"affine"``, ``"similarity"`` or ``"rigid"``: the map of every section to the aligned
        frame (rigid: solved as a similarity, then each linear part replaced by its nearest
        rotation and the translations solved again).
    initial
        ``(n, 3, 3)`` pull-back matrices (aligned frame -> section, e.g. the chained ones): the
        starting point, and the map of a section no edge at all touches.
    huber
        Residual (pixels, RMS over the points of one pair) above which a pair is down-weighted.
    drift_prior
        Weight of the penalty on scale and shear of every section (see the module docstring);
        0 turns it off.

    Returns
    -------
    ``(matrices, info)``: ``matrices[k]`` (3x3, (y, x)) maps the aligned frame to section ``k``
    (pull-back, as :class:`~napari_nephi.core.transform.PerSectionTransform` expects);
    ``info`` has ``"residuals"`` (RMS pixels per edge, in the order given), ``"robust"`` (final
    Huber weight per edge: below 1 means down-weighted), ``"weights"`` (``robust`` times the
    edge's own ``weight``) and ``"unconstrained"`` (sections no confident edge reaches, see
    :meth:`Edge.is_confident`). An unconstrained section takes the solved map of a placed
    neighbour composed with the edge between them (its own edge toward the reference first,
    then the nearest); a section no edge touches keeps its ``initial`` map.
    """
    if model not in GLOBAL_MODELS:
        raise InputError(f"global_model must be one of {', '.join(GLOBAL_MODELS)}, got {model!r}.")
    lin_model = "affine" if model == "affine" else "similarity"
    npar = 6 if lin_model == "affine" else 4
    if initial is None:
        initial = np.repeat(np.eye(3)[None], n, axis=0)
    b0 = np.stack([np.linalg.inv(m) for m in initial])
    b0 /= b0[:, 2:3, 2:3]
    x0 = np.stack([_from_matrix(b, lin_model) for b in b0])
    x0[ref] = _from_matrix(np.eye(3), lin_model)
    pts = _grid(shape)
    radius = float(np.linalg.norm(pts - pts.mean(0), axis=1).max()) or 1.0
    edges = [e for e in edges if e.a != e.b and 0 <= e.a < n and 0 <= e.b < n]
    # per edge: design blocks of the two ends, (edges, 2 * points, params) each
    blocks = _blocks(edges, pts, lin_model)
    reached = np.zeros(n, bool)
    for e in edges:
        if e.is_confident():
            reached[[e.a, e.b]] = True
    robust = np.ones(len(edges))
    x = x0.copy()
    for it in range(max(2, iterations)):
        # the prior's targets (nearest rotations) come from the previous solve: none in the first
        prior = drift_prior if it else 0.0
        previous = x
        x = _solve_linear(n, ref, npar, edges, blocks, robust, x, x0, lin_model, prior, radius)
        res = _residuals(edges, blocks, x)
        new = np.where(res > huber, huber / np.maximum(res, 1e-12), 1.0)
        settled = np.allclose(new, robust, atol=1e-3) and np.abs(x - previous).max() < 1e-6 * radius
        robust = new
        if it and settled:
            break
    mats_b = np.stack([_to_matrix(p, lin_model) for p in x])
    if model == "rigid":
        mats_b = _rigid_from(mats_b, n, ref, edges, pts, robust)
    out = np.stack([np.linalg.inv(b) for b in mats_b])
    out[ref] = np.eye(3)
    reached[ref] = True
    _place_unreached(out, initial, reached, edges)
    x_final = np.stack([_from_matrix(b, "affine") for b in mats_b])
    info = {
        "residuals": _residuals(edges, _blocks(edges, pts, "affine"), x_final),
        "robust": robust,
        "weights": robust * np.array([e.weight for e in edges]),
        "unconstrained": [int(k) for k in np.flatnonzero(~reached) if k != ref],
    }
    return out, info


def _place_unreached(out, initial, reached, edges) -> None:
    """Give every section not ``reached`` the map of a placed neighbour composed with the edge
    between them (in rounds outward from the placed sections; per section its own edges, where it
    is ``b``, first, then the heaviest, then the nearest); untouched sections keep ``initial``."""
    placed = reached.copy()
    out[~placed] = initial[~placed]
    while True:
        best: dict[int, tuple] = {}
        for e in edges:
            for k, other in ((e.b, e.a), (e.a, e.b)):
                if placed[k] or not placed[other]:
                    continue
                key = (k != e.b, -e.weight, abs(e.b - e.a))
                if k not in best or key < best[k][0]:
                    best[k] = (key, e)
        if not best:
            return
        for k, (_, e) in best.items():
            m = np.asarray(e.matrix, dtype=np.float64)  # pull-backs: P_b = M P_a
            p = m @ out[e.a] if k == e.b else np.linalg.inv(m) @ out[e.b]
            out[k] = p / p[2, 2]
            placed[k] = True


def _blocks(edges, pts: np.ndarray, model: str) -> tuple[np.ndarray, np.ndarray]:
    """``(da, db)``: the coefficients of ``B_a p`` (``(2 * len(pts), params)``, the same for every
    edge) and of ``B_b (M p)`` for every edge (``(len(edges), 2 * len(pts), params)``)."""
    npar = 6 if model == "affine" else 4
    m = np.stack([np.asarray(e.matrix, dtype=np.float64) for e in edges]) if edges else np.zeros((0, 3, 3))
    q = np.einsum("eij,pj->epi", m, np.c_[pts, np.ones(len(pts))])
    q = (q[..., :2] / q[..., 2:]).reshape(-1, 2)
    return _design(pts, model).reshape(-1, npar), _design(q, model).reshape(len(edges), 2 * len(pts), npar)


def _residuals(edges, blocks, x) -> np.ndarray:
    """RMS distance (pixels) between ``B_a q`` and ``B_b M q`` per edge."""
    da, db = blocks
    if not len(edges):
        return np.zeros(0)
    a = np.array([e.a for e in edges])
    b = np.array([e.b for e in edges])
    d = x[a] @ da.T - np.einsum("erp,ep->er", db, x[b])
    return np.sqrt((d**2).reshape(len(edges), -1, 2).sum(2).mean(1))


def _solve_linear(n, ref, npar, edges, blocks, robust, x, x0, model, drift_prior, radius) -> np.ndarray:
    """One weighted least-squares solve for all free sections: its normal equations assembled
    block by block (each edge adds ``params x params`` blocks at its two sections; a sparse band)."""
    free = np.array([k for k in range(n) if k != ref], dtype=np.int64)
    col = np.full(n, -1)
    col[free] = np.arange(len(free))
    size = len(free) * npar
    fixed = x0[ref]
    da, db = blocks
    w2 = np.array([e.weight for e in edges], dtype=np.float64) * robust  # squared row weights
    a = np.array([e.a for e in edges], dtype=np.int64)
    b = np.array([e.b for e in edges], dtype=np.int64)
    # residual of an edge: w (da x_a - db x_b); normal blocks (a, a), (b, b), (a, b) = -(b, a)^T
    rhs = np.zeros(size)
    diag = np.zeros(size)
    # an end at the reference is fixed: its terms go to the right-hand side of the other end
    gab = np.einsum("rp,erq->epq", da, db)  # da^T db per edge
    gab *= w2[:, None, None]
    at = a == ref  # w^2 db^T da x_ref for b
    np.add.at(rhs, col[b[at], None] * npar + np.arange(npar), gab[at].transpose(0, 2, 1) @ fixed)
    at = b == ref  # w^2 da^T db x_ref for a
    np.add.at(rhs, col[a[at], None] * npar + np.arange(npar), gab[at] @ fixed)
    # the blocks summed per pair of free sections (one block per section pair: a sparse band),
    # the diagonal blocks included; np.unique sorts them into the rows of a block-sparse matrix
    nf = len(free)
    ends = [(a, a), (b, b), (a, b), (b, a)]
    keeps = [(i != ref) & (j != ref) for i, j in ends]
    keys = [col[i[k]] * nf + col[j[k]] for (i, j), k in zip(ends, keeps)] + [np.arange(nf) * (nf + 1)]
    unique, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    starts = np.cumsum([0] + [len(k) for k in keys])
    data = np.zeros((len(unique), npar, npar))
    gbb = np.einsum("erp,erq->epq", db, db)
    gbb *= w2[:, None, None]
    for t, (g, add) in enumerate(
        [
            ((da.T @ da)[None] * w2[:, None, None], True),
            (gbb, True),
            (gab, False),
            (gab.transpose(0, 2, 1), False),
        ]
    ):  # (a, a), (b, b), (a, b) = -w^2 da^T db, (b, a) its transpose
        (np.add if add else np.subtract).at(data, inverse[starts[t] : starts[t + 1]], g[keeps[t]])
    del gbb, gab
    if drift_prior > 0 and len(free):
        s2 = drift_prior * radius**2
        if model == "affine":  # the linear part held near its nearest rotation
            which = np.array([0, 1, 3, 4])
            target = np.stack([nearest_rotation(x[k].reshape(2, 3)[:, :2]).ravel() for k in free])
        else:  # similarity: scale sqrt(a^2 + b^2) held near 1
            which = np.array([0, 1])
            ab = x[free][:, :2]
            target = ab / np.maximum(np.hypot(ab[:, 0], ab[:, 1]), 1e-12)[:, None]
        at = (col[free] * npar)[:, None] + which
        diag[at.ravel()] += s2
        rhs[at.ravel()] += s2 * target.ravel()
    # a tiny pull toward the initial maps keeps sections no edge reaches determined
    eps = 1e-10
    diag += eps
    rhs += eps * x0[free].ravel()
    diag_blocks = inverse[starts[4] :]
    data[diag_blocks[:, None], np.arange(npar), np.arange(npar)] += diag.reshape(nf, npar)
    brow, bcol = np.divmod(unique, max(nf, 1))
    indptr = np.searchsorted(brow, np.arange(nf + 1))
    normal = sp.bsr_matrix((data, bcol, indptr), shape=(size, size), blocksize=(npar, npar))
    del data
    sol = spsolve(normal.tocsc(), rhs)
    out = x.copy()
    out[free] = np.asarray(sol).reshape(len(free), npar)
    return out


def _rigid_from(mats_b, n, ref, edges, pts, robust) -> np.ndarray:
    """Replace each linear part by its nearest rotation, then solve the translations again."""
    rot = mats_b.copy()
    for k in range(n):
        rot[k, :2, :2] = nearest_rotation(mats_b[k, :2, :2])
    rot[ref] = np.eye(3)
    free = [k for k in range(n) if k != ref]
    col = {k: i for i, k in enumerate(free)}
    rows, cols, vals, rhs = [], [], [], []
    r0 = 0
    for e, rw in zip(edges, robust):
        w = np.sqrt(e.weight * rw)
        q = _project(e.matrix, pts)
        # R_a p + t_a - R_b q - t_b = 0  ->  t_a - t_b = R_b q - R_a p
        d = (q @ rot[e.b, :2, :2].T - pts @ rot[e.a, :2, :2].T) * w
        m = len(pts)
        for axis in range(2):
            rr = r0 + axis * m + np.arange(m)
            for k, sign in ((e.a, 1.0), (e.b, -1.0)):
                if k == ref:
                    continue
                rows.append(rr)
                cols.append(np.full(m, 2 * col[k] + axis))
                vals.append(np.full(m, sign * w))
            rhs.append(d[:, axis])
        r0 += 2 * m
    if free and rows:
        a = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(r0, 2 * len(free)))  # fmt: skip
        b = np.concatenate(rhs)
        t0 = np.array([mats_b[k, :2, 2] for k in free]).ravel()
        normal = (a.T @ a + 1e-9 * sp.identity(2 * len(free))).tocsc()
        t = np.asarray(spsolve(normal, a.T @ b + 1e-9 * t0)).reshape(-1, 2)
        for k in free:
            rot[k, :2, 2] = t[col[k]]
    return rot


def check_global_options(neighbours, solver, global_model, drift_prior) -> tuple[int, str, str, float]:
    """Validated ``(neighbours, solver, global_model, drift_prior)`` of :func:`~.align.align_stack`.

    ``neighbours=None`` (the default): 1 with ``solver="chain"``, else :data:`NEIGHBOURS`.
    """
    if neighbours is None:
        neighbours = 1 if isinstance(solver, str) and solver.lower() == "chain" else NEIGHBOURS
    neighbours = check_int("neighbours", neighbours, 1, 64)
    if solver is None:
        solver = "global" if neighbours > 1 else "chain"
    solver = check_choice(solver, ("chain", "global"), "solver")
    if solver == "chain" and neighbours > 1:
        raise InputError(
            f"neighbours={neighbours} needs solver='global' (the chain uses one neighbour per section); "
            "leave solver unset or set it to 'global'."
        )
    global_model = check_choice(global_model, GLOBAL_MODELS, "global_model")
    drift_prior = check_float("drift_prior", drift_prior, 0.0, 1e6)
    return neighbours, solver, global_model, drift_prior
