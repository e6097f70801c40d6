"""Keypoints, descriptors, matching and robust model fitting for EM section alignment.

Everything here works on one 2D ``uint8`` section (or a pair) and is pure OpenCV / numpy,
so it runs in worker threads while OpenCV releases the GIL.

Coordinates: OpenCV keypoints are ``(x, y)``. This module keeps them as ``(x, y)`` float32
arrays internally and converts fitted models to the project's ``(y, x)`` homogeneous
convention only at the end, with :func:`xy_to_yx`. A model fitted with
``fit_model(src, dst)`` maps ``src`` points to ``dst`` points.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy.spatial import cKDTree

from ...core.device import memory_guard
from ...core.errors import InputError, OutOfMemoryError

DETECTORS = ("mito", "orb", "brisk", "fast", "sift")
DESCRIPTORS = ("brisk", "orb", "freak", "sift")
MATCHERS = ("bf", "flann")
MODELS = ("homography", "affine", "similarity", "rigid")

#: Axis swap between (x, y) and (y, x) homogeneous coordinates (its own inverse).
SWAP = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
#: Set bits of every byte value: Hamming distances of binary descriptors without unpacking them.
POPCOUNT = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint8)


def xy_to_yx(matrix_xy: np.ndarray) -> np.ndarray:
    """A 3x3 map on ``(x, y, 1)`` as the same map on ``(y, x, 1)`` (and back: the swap is symmetric)."""
    return SWAP @ np.asarray(matrix_xy, dtype=np.float64) @ SWAP


yx_to_xy = xy_to_yx


# -- OpenCV objects (created once per thread: they are not documented as thread-safe) --------
_local = threading.local()


def _brisk_factory():
    if hasattr(cv2, "BRISK_create"):  # OpenCV 4
        return cv2.BRISK_create
    return cv2.xfeatures2d.BRISK_create  # OpenCV 5 moved it to contrib


def _freak_factory():
    xf = getattr(cv2, "xfeatures2d", None)
    if xf is None or not hasattr(xf, "FREAK_create"):
        raise InputError(
            "The FREAK descriptor needs opencv-contrib-python(-headless); install it instead of "
            "opencv-python, or choose descriptor='brisk'."
        )
    return xf.FREAK_create


def _tool(name: str, key: tuple, make):
    cache = getattr(_local, "tools", None)
    if cache is None:
        cache = _local.tools = {}
    k = (name, *key)
    if k not in cache:
        cache[k] = make()
    return cache[k]


def _fast(threshold: int):
    return _tool("fast", (threshold,), lambda: cv2.FastFeatureDetector_create(int(threshold), True))


def _orb(n: int):
    return _tool("orb", (n,), lambda: cv2.ORB_create(nfeatures=int(n)))


def _brisk(threshold: int):
    return _tool("brisk", (threshold,), lambda: _brisk_factory()(int(threshold), 3))


def _sift(n: int):
    return _tool("sift", (n,), lambda: cv2.SIFT_create(nfeatures=int(n)))


def _freak():
    return _tool("freak", (), lambda: _freak_factory()())


# -- features ----------------------------------------------------------------------------------
@dataclass
class Features:
    """Keypoints of one section: ``points`` (N, 2) float32 ``(x, y)`` in ORIGINAL section pixels.

    ``image`` (the smoothed uint8 work image), ``valid`` (uint8 1 where it holds tissue) and
    ``scale`` (work / original resolution, a number or ``(x, y)`` ratios) are kept for
    :func:`refine`; None when not needed.
    """

    points: np.ndarray
    descriptors: np.ndarray | None
    binary: bool
    detector: str = ""
    descriptor: str = ""
    extra: dict = field(default_factory=dict)
    image: np.ndarray | None = None
    valid: np.ndarray | None = None
    scale: float | np.ndarray = 1.0

    def __len__(self) -> int:
        return 0 if self.descriptors is None else len(self.points)

    def tree(self) -> cKDTree:
        """A kd-tree of ``points`` (built once; a section is matched to several others)."""
        t = self.extra.get("tree")
        if t is None:
            t = self.extra["tree"] = cKDTree(self.points.astype(np.float64))
        return t

    @staticmethod
    def empty(detector: str, descriptor: str) -> Features:
        return Features(np.zeros((0, 2), np.float32), None, descriptor != "sift", detector, descriptor)


#: What OpenCV's ``cv2.error`` says when an allocation fails.
OPENCV_OUT_OF_MEMORY = ("Insufficient memory", "Failed to allocate")


@contextlib.contextmanager
def opencv_memory_guard(what: str) -> Iterator[None]:
    """:func:`~napari_nephi.core.device.memory_guard` that also turns OpenCV's failed allocations
    (a ``cv2.error`` saying "Insufficient memory" or "Failed to allocate") into
    :class:`~napari_nephi.core.errors.OutOfMemoryError`."""
    with memory_guard(what):
        try:
            yield
        except cv2.error as exc:
            if not any(text in str(exc) for text in OPENCV_OUT_OF_MEMORY):
                raise
            raise OutOfMemoryError(
                f"The {what} ran out of memory in OpenCV. Downsample the sections (scale=0.5), "
                "crop them to the region of interest, or use fewer workers."
            ) from exc


def check_choice(value: str, allowed: tuple, what: str) -> str:
    v = str(value).lower()
    if v not in allowed:
        raise InputError(f"Unknown {what} {value!r}; choose one of {', '.join(allowed)}.")
    return v


def _strongest(kps, n: int):
    if len(kps) <= n:
        return list(kps)
    return sorted(kps, key=lambda p: -p.response)[:n]


def _spread(kps, n: int, shape, cells: int = 8):
    """Keep at most ``n`` keypoints, the strongest of each cell of a ``cells`` x ``cells`` grid first.

    Without this, strong keypoints crowd into a few high-contrast spots and the model fit is
    poorly conditioned; with it they cover every structure that has any.
    """
    if len(kps) <= n:
        return list(kps)
    h, w = shape
    per_cell: dict[int, list] = {}
    for kp in sorted(kps, key=lambda p: -p.response):
        x, y = kp.pt
        c = min(int(y * cells / h), cells - 1) * cells + min(int(x * cells / w), cells - 1)
        per_cell.setdefault(c, []).append(kp)
    out: list = []
    rank = 0
    while len(out) < n:
        added = False
        for lst in per_cell.values():
            if rank < len(lst):
                out.append(lst[rank])
                added = True
                if len(out) >= n:
                    break
        if not added:
            break
        rank += 1
    return out


def _orient(img: np.ndarray, kps, radius: int = 7) -> None:
    """Set each keypoint's angle from the intensity centroid of a disc (as ORB does)."""
    if not kps:
        return
    r = int(radius)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disc = xx**2 + yy**2 <= r * r
    dy, dx = yy[disc], xx[disc]
    pad = cv2.copyMakeBorder(img, r, r, r, r, cv2.BORDER_REFLECT)
    pts = np.array([kp.pt for kp in kps])
    cx = np.clip(np.round(pts[:, 0]).astype(int), 0, img.shape[1] - 1) + r
    cy = np.clip(np.round(pts[:, 1]).astype(int), 0, img.shape[0] - 1) + r
    vals = pad[cy[:, None] + dy[None], cx[:, None] + dx[None]].astype(np.float32)
    m10 = vals @ dx.astype(np.float32)
    m01 = vals @ dy.astype(np.float32)
    angles = np.degrees(np.arctan2(m01, m10)) % 360.0
    for kp, a in zip(kps, angles):
        kp.angle = float(a)


def detect(
    img: np.ndarray,
    detector: str,
    mask: np.ndarray | None,
    max_keypoints: int,
    fast_threshold: int = 10,
):
    """Keypoints of ``detector`` in ``img`` (uint8), only where ``mask`` is non-zero."""
    m = None if mask is None else (mask > 0).astype(np.uint8)
    if m is not None and not m.any():
        return []
    if detector in ("mito", "fast"):
        kps = _fast(fast_threshold).detect(img, m)
        return _spread(kps, max_keypoints, img.shape)
    if detector == "orb":
        return list(_orb(max_keypoints).detect(img, m))
    if detector == "brisk":
        return _spread(_brisk(20).detect(img, m), max_keypoints, img.shape)
    if detector == "sift":
        return list(_sift(max_keypoints).detect(img, m))
    raise InputError(f"Unknown detector {detector!r}; choose one of {', '.join(DETECTORS)}.")


def describe(img: np.ndarray, kps, detector: str, descriptor: str, keypoint_size: float | None = None):
    """Descriptors of ``kps``; returns ``(keypoints kept, descriptors or None)``.

    ``keypoint_size`` (work pixels) is the support given to FAST keypoints, which have no
    scale of their own; BRISK and FREAK scale their sampling pattern with it.
    """
    if not kps:
        return [], None
    if detector in ("mito", "fast") and keypoint_size:
        for kp in kps:
            kp.size = float(keypoint_size)
    native = {"orb": "orb", "sift": "sift", "brisk": "brisk"}.get(detector)
    if descriptor in ("orb", "sift") and native != descriptor:
        # FAST (and BRISK) keypoints carry no orientation usable by ORB / SIFT descriptors:
        # give them the intensity-centroid angle, as ORB does, and a patch they expect.
        size = float(keypoint_size or 31.0)
        _orient(img, kps, max(3, int(round(size / 2))))
        for kp in kps:
            kp.size = size / 3.0 if descriptor == "sift" else 31.0
            kp.octave = 0
    if descriptor == "brisk":
        ext = _brisk(20)
    elif descriptor == "orb":
        ext = _orb(max(len(kps), 1))
    elif descriptor == "freak":
        ext = _freak()
    elif descriptor == "sift":
        ext = _sift(0)
    else:
        raise InputError(f"Unknown descriptor {descriptor!r}; choose one of {', '.join(DESCRIPTORS)}.")
    kps, desc = ext.compute(img, kps)
    if desc is None or len(kps) == 0:
        return [], None
    return kps, desc


def features(
    img: np.ndarray,
    detector: str,
    descriptor: str,
    mask: np.ndarray | None = None,
    max_keypoints: int = 1000,
    scale: float | np.ndarray = 1.0,
    fast_threshold: int = 10,
    keypoint_size: float | None = None,
) -> Features:
    """Detect and describe keypoints of one (already scaled, smoothed) uint8 section.

    ``scale`` is the work resolution relative to the original section (a number, or exact
    ``(x, y)`` ratios of the work and original sizes): returned points are mapped back with it,
    so they are in original section pixels. ``keypoint_size``: see
    :func:`describe`.
    """
    kps = detect(img, detector, mask, max_keypoints, fast_threshold)
    kps, desc = describe(img, kps, detector, descriptor, keypoint_size)
    if desc is None:
        return Features.empty(detector, descriptor)
    pts = np.array([kp.pt for kp in kps], dtype=np.float32).reshape(-1, 2)
    # pixel centres: work pixel i covers original [i/s, (i+1)/s), centre (i + 0.5)/s - 0.5
    pts = (pts + 0.5) / np.asarray(scale, np.float32) - 0.5
    return Features(pts, desc, desc.dtype == np.uint8, detector, descriptor)


# -- matching ------------------------------------------------------------------------------
def _matcher(kind: str, binary: bool):
    if kind == "bf":
        norm = cv2.NORM_HAMMING if binary else cv2.NORM_L2
        return _tool("bf", (norm,), lambda: cv2.BFMatcher(norm))
    if kind == "flann":
        if binary:  # locality-sensitive hashing for binary strings
            index = {"algorithm": 6, "table_number": 6, "key_size": 12, "multi_probe_level": 1}
        else:  # randomised kd-trees for float vectors
            index = {"algorithm": 1, "trees": 4}
        return cv2.FlannBasedMatcher(index, {"checks": 48})
    raise InputError(f"Unknown matcher {kind!r}; choose one of {', '.join(MATCHERS)}.")


def match(a: Features, b: Features, matcher: str = "bf", ratio: float = 0.8) -> np.ndarray:
    """Indices ``(M, 2)`` of matches ``a[i] <-> b[j]`` passing Lowe's ratio test."""
    if len(a) < 2 or len(b) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    if a.binary != b.binary or a.descriptors.shape[1] != b.descriptors.shape[1]:
        raise InputError("Cannot match different descriptor kinds; use one descriptor for the stack.")
    da, db = a.descriptors, b.descriptors
    if not a.binary:
        da, db = da.astype(np.float32, copy=False), db.astype(np.float32, copy=False)
    knn = _matcher(matcher, a.binary).knnMatch(da, db, k=2)
    out = []
    for pair in knn:
        if len(pair) == 2:
            m, n = pair
            if m.distance < ratio * n.distance:
                out.append((m.queryIdx, m.trainIdx))
        elif len(pair) == 1 and matcher == "flann":
            pass  # LSH found a single candidate: no ratio test possible, skip it
    if not out:
        return np.zeros((0, 2), dtype=np.int64)
    idx = np.array(out, dtype=np.int64)
    # keep one match per target keypoint (the first, i.e. in query order) to avoid many-to-one
    _, first = np.unique(idx[:, 1], return_index=True)
    return idx[np.sort(first)]


def match_near(
    a: Features, b: Features, matrix_xy: np.ndarray, radius: float, ratio: float = 0.8
) -> np.ndarray:
    """Indices ``(M, 2)`` of descriptor matches ``a[i] <-> b[j]`` among the keypoints of b within
    ``radius`` original pixels of where ``matrix_xy`` (a -> b, (x, y)) puts a's keypoint.

    The nearest descriptor is kept when it passes Lowe's ratio test against the second nearest
    in that disc (a lone candidate is kept); one match per keypoint of b. Much cheaper than
    :func:`match` over all keypoints, and still an independent check of the map when
    ``radius`` is several times the tolerance it is checked with.
    """
    none = np.zeros((0, 2), dtype=np.int64)
    if len(a) < 2 or len(b) < 2:
        return none
    q = project(np.asarray(matrix_xy, np.float64), a.points.astype(np.float64))
    ia, ib = _within(b.tree(), np.where(np.all(np.isfinite(q), axis=1)[:, None], q, 1e18), radius)
    if not len(ia):
        return none
    da, db = a.descriptors[ia], b.descriptors[ib]
    if a.binary:
        # out=da: da is a copy (fancy indexing), never the section's cached descriptors
        dist = hamming(da, db, out=da).astype(np.float64)
    else:
        dist = np.linalg.norm(da.astype(np.float64) - db.astype(np.float64), axis=1)
    order = np.lexsort((dist, ia))
    ia, ib, dist = ia[order], ib[order], dist[order]
    first = np.flatnonzero(np.r_[True, ia[1:] != ia[:-1]])
    has_second = np.r_[first[1:], len(ia)] - first > 1
    second = np.where(has_second, dist[np.minimum(first + 1, len(ia) - 1)], np.inf)
    keep = first[dist[first] < ratio * second]
    idx = np.stack([ia[keep], ib[keep]], axis=1)
    _, one = np.unique(idx[:, 1], return_index=True)
    return idx[np.sort(one)]


def hamming(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Hamming distances (int64) between the rows of two ``(m, bytes)`` uint8 arrays of binary
    descriptors; ``out`` (e.g. ``a``, when it is a copy) takes their XOR.

    Set bits counted per 8-byte word by ``np.bitwise_count`` (numpy >= 2), else per byte through
    a table: unpacking the bits (``np.unpackbits``) took 8 bytes per descriptor byte, a 5 MB
    peak per pair, and 8 times the time of the word count.
    """
    x = np.bitwise_xor(a, b, out=out)
    if not hasattr(np, "bitwise_count"):  # numpy < 2
        return POPCOUNT[x].sum(axis=1, dtype=np.int64)
    if x.shape[1] % 8 == 0 and x.flags.c_contiguous:
        x = x.view(np.uint64)
    return np.bitwise_count(x).sum(axis=1, dtype=np.int64)


def _within(tree: cKDTree, q: np.ndarray, radius: float, k: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Every pair ``(i, j)``: tree point j within ``radius`` of ``q[i]`` (vectorised: the ``k``
    nearest, then a full ball query for the few points with more than ``k - 1`` in the disc)."""
    n = tree.n
    k = min(k, n)
    if k == 0 or not len(q):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # the bound is strict (<); the ball query, and so the disc, includes its edge (<=)
    _, j = tree.query(q, k=k, distance_upper_bound=np.nextafter(radius, np.inf))
    j = j.reshape(len(q), k)
    found = j < n
    full = found[:, -1].copy() if k < n else np.zeros(len(q), bool)
    found[full] = False
    ia, col = np.nonzero(found)
    ib = j[ia, col].astype(np.int64)
    rest = np.flatnonzero(full)
    if len(rest):  # crowded discs: all their points
        near = tree.query_ball_point(q[rest], radius)
        ia = np.concatenate([ia, np.repeat(rest, [len(c) for c in near])])
        ib = np.concatenate([ib, np.fromiter((x for c in near for x in c), np.int64)])
    return ia.astype(np.int64), ib


# -- model fitting ------------------------------------------------------------------------------
MIN_POINTS = {"homography": 4, "affine": 3, "similarity": 2, "rigid": 2}


def _rigid_lsq(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares rotation + translation (no scale, no reflection) mapping src to dst, (x, y)."""
    cs, cd = src.mean(0), dst.mean(0)
    h = (src - cs).T @ (dst - cd)
    u, _, vt = np.linalg.svd(h)
    r = vt.T @ u.T
    if np.linalg.det(r) < 0:
        vt[-1] *= -1
        r = vt.T @ u.T
    m = np.eye(3)
    m[:2, :2] = r
    m[:2, 2] = cd - r @ cs
    return m


def lsq_model(src: np.ndarray, dst: np.ndarray, model: str) -> np.ndarray | None:
    """Least-squares (no RANSAC) ``model`` mapping ``src`` (x, y) to ``dst``; 3x3 or None."""
    src = np.asarray(src, np.float64).reshape(-1, 2)
    dst = np.asarray(dst, np.float64).reshape(-1, 2)
    if len(src) < MIN_POINTS[model] + 1:
        return None
    if model == "rigid":
        return _rigid_lsq(src, dst)
    if model == "similarity":  # Umeyama: rotation, uniform scale, translation
        cs, cd = src.mean(0), dst.mean(0)
        a, b = src - cs, dst - cd
        var = float((a**2).sum())
        if var <= 0:
            return None
        u, sv, vt = np.linalg.svd(a.T @ b)
        d = np.diag([1.0, np.sign(np.linalg.det(vt.T @ u.T)) or 1.0])
        r = vt.T @ d @ u.T
        c = float((sv * np.diag(d)).sum()) / var
        m = np.eye(3)
        m[:2, :2] = c * r
        m[:2, 2] = cd - c * r @ cs
        return m
    if model == "affine":
        x = np.c_[src, np.ones(len(src))]
        sol, *_ = np.linalg.lstsq(x, dst, rcond=None)
        return np.vstack([sol.T, [0.0, 0.0, 1.0]])
    m, _ = cv2.findHomography(src.astype(np.float32), dst.astype(np.float32), 0)
    if m is None or not np.all(np.isfinite(m)) or abs(m[2, 2]) < 1e-12:
        return None
    return m / m[2, 2]


def _work_matrix(scale) -> np.ndarray:
    """Original -> work pixel (x, y) coordinates (pixel centres: ``w = s (o + 0.5) - 0.5``)."""
    sx, sy = np.broadcast_to(np.asarray(scale, np.float64), (2,))
    return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])


def track(
    fa: Features,
    fb: Features,
    matrix_xy: np.ndarray,
    threshold: float,
    window: int = 11,
) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel correspondences of a's keypoints in section b, given a fitted map a -> b.

    Section a's work image is resampled into b's frame with ``matrix_xy`` (so what is left
    to find is a small shift without rotation), and every keypoint of a that lands inside b's
    tissue is tracked into b by Lucas-Kanade (``window`` x ``window`` work pixels, one level,
    sub-pixel). Tracks that end more than ``threshold`` original pixels from where the map
    puts them are dropped. Returns ``(src, dst)``: ``(N, 2)`` float64 ``(x, y)`` points of a
    and their tracked positions in b, in original pixels (empty without work images).
    """
    empty = np.zeros((0, 2)), np.zeros((0, 2))
    if fa.image is None or fb.image is None or len(fa.points) == 0:
        return empty
    m = np.asarray(matrix_xy, np.float64)
    s = _work_matrix(fa.scale)
    tw = s @ m @ np.linalg.inv(s)
    hb, wb = fb.image.shape
    src = fa.points.astype(np.float64)
    q = project(tw, project(s, src))  # a's keypoints in b's work image
    r = window // 2 + 1
    inside = (q[:, 0] >= r) & (q[:, 0] < wb - 1 - r) & (q[:, 1] >= r) & (q[:, 1] < hb - 1 - r)
    if fb.valid is not None:
        iq = np.clip(np.round(np.nan_to_num(q)).astype(int), 0, [wb - 1, hb - 1])
        inside &= fb.valid[iq[:, 1], iq[:, 0]] > 0
    if not inside.any():
        return empty
    src, q = src[inside], q[inside]
    # Only the box around the tracked points is warped and searched (padded sections: about half
    # of the image): a margin of the window, the derivative stencil and the farthest a kept track
    # may move, so every pixel the tracker reads is the one the whole image would give it.
    x0, y0, x1, y1 = _track_box(q, r + 2 + int(np.ceil(threshold * float(np.max(fa.scale)))) + 2, wb, hb)
    box = np.array([[1.0, 0.0, -x0], [0.0, 1.0, -y0], [0.0, 0.0, 1.0]])
    flags = cv2.INTER_LINEAR
    if _affine(tw):  # the cheaper warp
        warped = cv2.warpAffine(fa.image, (box @ tw)[:2], (x1 - x0, y1 - y0), flags=flags, borderValue=0)
    else:
        warped = cv2.warpPerspective(fa.image, box @ tw, (x1 - x0, y1 - y0), flags=flags, borderValue=0)
    q = (q - (x0, y0)).astype(np.float32).reshape(-1, 1, 2)
    tracked, status, _ = cv2.calcOpticalFlowPyrLK(
        warped, np.ascontiguousarray(fb.image[y0:y1, x0:x1]), q, q.copy(), winSize=(window, window),
        maxLevel=0, criteria=(cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 30, 0.01),
        flags=cv2.OPTFLOW_USE_INITIAL_FLOW,
    )  # fmt: skip
    tracked = tracked.reshape(-1, 2).astype(np.float64) + (x0, y0)
    dst = project(np.linalg.inv(s), tracked)  # original pixels
    ok = (status.ravel() == 1) & np.all(np.isfinite(dst), axis=1)
    ok &= np.linalg.norm(dst - project(m, src), axis=1) <= threshold
    return src[ok], dst[ok]


def _track_box(q: np.ndarray, margin: int, w: int, h: int) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)``: the box of the points ``q`` (x, y) grown by ``margin``, inside ``w`` x ``h``."""
    lo = np.floor(q.min(axis=0)).astype(int) - margin
    hi = np.ceil(q.max(axis=0)).astype(int) + margin + 1
    return max(0, lo[0]), max(0, lo[1]), min(w, hi[0]), min(h, hi[1])


def fit_tracks(src: np.ndarray, dst: np.ndarray, model: str, min_points: int = 10):
    """Least-squares ``model`` on tracked points, trimming outliers.

    Residuals above ``max(3 * 1.4826 * median residual, 0.25 px)`` are dropped and the fit
    repeated (at most four times). Returns ``(3x3 (x, y) matrix, kept (N,) bool, RMS residual
    of the kept points)`` or ``(None, kept, None)`` when fewer than ``min_points`` remain.
    """
    keep = np.ones(len(src), bool)
    fit = None
    for it in range(5):
        if keep.sum() < max(min_points, MIN_POINTS[model] + 1):
            return None, keep, None
        fit = lsq_model(src[keep], dst[keep], model)
        if fit is None:
            return None, keep, None
        res = np.linalg.norm(project(fit, src) - dst, axis=1)
        new = res <= max(3.0 * 1.4826 * float(np.median(res[keep])), 0.25)
        if it == 4 or new.sum() < min_points or np.array_equal(new, keep):
            break
        keep = new
    return fit, keep, float(np.sqrt(np.mean(res[keep] ** 2)))


#: A richer model is chosen on the tracks only when it lowers the RMS residual by this factor.
REFINE_GAIN = 0.8


def refine(
    fa: Features,
    fb: Features,
    matrix_xy: np.ndarray,
    models: tuple,
    threshold: float,
    min_points: int = 10,
    window: int = 11,
    residuals: list | None = None,
):
    """Sub-pixel refinement of a fitted map a -> b, with model selection on the tracks.

    a's keypoints are tracked into b (:func:`track`) and every model of ``models`` (nested,
    richest first) is fitted to the tracks by least squares (:func:`fit_tracks`). The
    simplest model whose RMS residual, on the points all fits keep, is at most the richest
    model's divided by :data:`REFINE_GAIN` is used: with sub-pixel tracks a real distortion
    between sections (compression, shear) lowers the residual many times over, while extra
    degrees of freedom that only fit noise and the sections' own small differences gain a few
    per cent and would extrapolate badly far from the keypoints. FAST keypoints sit on whole
    work pixels (2 original pixels apart at scale 0.5); tracking removes that quantisation,
    whose random error of a few hundredths of a degree per pair accumulates along a stack.

    Returns ``(model, refined (x, y) 3x3 matrix, tracks used, RMS residual in original pixels)``
    or ``(None, None, tracks, None)`` when too few tracks survive. A ``residuals`` list gets
    ``(src, dst, richest fit)`` of the tracks all fits keep appended (:mod:`.distortion`).
    """
    src, dst = track(fa, fb, matrix_xy, threshold, window)
    fits = []
    for model in models:
        fit, keep, rms = fit_tracks(src, dst, model, min_points)
        if fit is not None:
            fits.append((model, fit, keep))
    if not fits:
        return None, None, len(src), None
    common = np.logical_and.reduce([k for _, _, k in fits])
    if common.sum() < min_points:
        common = fits[0][2]
    rms = [
        float(np.sqrt(np.mean(np.sum((project(f, src[common]) - dst[common]) ** 2, 1)))) for _, f, _ in fits
    ]
    if residuals is not None:
        residuals.append((src[common], dst[common], fits[0][1]))
    best = min(rms)
    i = max(j for j, r in enumerate(rms) if r * REFINE_GAIN <= best or r <= best + 1e-9)
    model, fit, keep = fits[i]
    return model, fit, int(keep.sum()), rms[i]


def _affine(m: np.ndarray) -> bool:
    """Whether the 3x3 ``m`` has the exact affine last row ``(0, 0, 1)``."""
    return m[2, 0] == 0.0 and m[2, 1] == 0.0 and m[2, 2] == 1.0


def project(matrix_xy: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """``(N, 2)`` points ``pts`` (x, y) mapped by the 3x3 ``matrix_xy`` (perspective division)."""
    m = np.asarray(matrix_xy, np.float64)
    pts = np.asarray(pts, np.float64).reshape(-1, 2)
    xy = pts @ m[:2, :2].T + m[:2, 2]
    if _affine(m):  # no division
        return xy
    w = pts @ m[2, :2] + m[2, 2]
    return xy / w[:, None]


def fit_model(
    src: np.ndarray,
    dst: np.ndarray,
    model: str,
    threshold: float,
    iterations: int = 2000,
    confidence: float = 0.999,
):
    """RANSAC fit of ``model`` mapping ``src`` (x, y) to ``dst``; ``(3x3 matrix, inlier mask)``.

    ``threshold`` is the RANSAC reprojection threshold in pixels. Returns ``(None, None)`` when
    there are too few points or no model is found.
    """
    src = np.asarray(src, np.float64).reshape(-1, 2)
    dst = np.asarray(dst, np.float64).reshape(-1, 2)
    if len(src) < MIN_POINTS[model] + 1:
        return None, None
    s32, d32 = src.astype(np.float32), dst.astype(np.float32)
    try:
        if model == "homography":
            m, inl = cv2.findHomography(
                s32, d32, cv2.RANSAC, threshold, maxIters=iterations, confidence=confidence
            )
        elif model == "affine":
            a, inl = cv2.estimateAffine2D(
                s32, d32, method=cv2.RANSAC, ransacReprojThreshold=threshold, maxIters=iterations,
                confidence=confidence, refineIters=10,
            )  # fmt: skip
            m = None if a is None else np.vstack([a, [0.0, 0.0, 1.0]])
        else:  # similarity, and rigid seeded by it
            a, inl = cv2.estimateAffinePartial2D(
                s32, d32, method=cv2.RANSAC, ransacReprojThreshold=threshold, maxIters=iterations,
                confidence=confidence, refineIters=10,
            )  # fmt: skip
            m = None if a is None else np.vstack([a, [0.0, 0.0, 1.0]])
    except cv2.error:
        return None, None
    if m is None or inl is None or not np.all(np.isfinite(m)):
        return None, None
    inl = inl.ravel().astype(bool)
    if model == "rigid" and inl.sum() >= 2:
        for _ in range(2):
            m = _rigid_lsq(src[inl], dst[inl])
            err = np.linalg.norm(project(m, src) - dst, axis=1)
            new = err <= threshold
            if new.sum() < 2 or np.array_equal(new, inl):
                break
            inl = new
    if abs(m[2, 2]) > 1e-12:
        m = m / m[2, 2]
    return m, inl


def plausible(matrix_xy: np.ndarray, shape, max_scale: float = 1.5) -> bool:
    """A section-to-section map: no flip, scale within ``1/max_scale..max_scale``, mild perspective."""
    m = np.asarray(matrix_xy, dtype=np.float64)
    if not np.all(np.isfinite(m)):
        return False
    a = m[:2, :2]
    if np.linalg.det(a) <= 0:
        return False
    sv = np.linalg.svd(a, compute_uv=False)
    if sv.max() > max_scale or sv.min() < 1.0 / max_scale:
        return False
    h, w = shape
    corners = np.array([[0, 0], [w, 0], [0, h], [w, h]], dtype=np.float64)
    denom = corners @ m[2, :2] + m[2, 2]
    return bool(np.all(denom > 0.5) and np.all(denom < 2.0))


def rotation_degrees(matrix_yx: np.ndarray) -> float:
    """Rotation angle (degrees) of the linear part of a (y, x) matrix, for reports."""
    a = np.asarray(matrix_yx)[:2, :2]
    # in (y, x) order a rotation by t is [[c, -s], [s, c]] as in synthetic.rotation_matrix
    return math.degrees(math.atan2(a[1, 0] - a[0, 1], a[0, 0] + a[1, 1]))
