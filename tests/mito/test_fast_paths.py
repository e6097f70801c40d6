"""The cheaper paths of the guided far pairs give what the plain computations give."""

import cv2
import numpy as np
from scipy.spatial import cKDTree

from napari_nephi.engines.mito import features as ft


def test_within_finds_every_point_in_the_disc():
    rng = np.random.default_rng(0)
    pts = rng.random((900, 2)) * 300  # ~12 per disc of radius 20: many discs hold more than 16
    q = rng.random((700, 2)) * 300
    q[:5] = 1e18  # unmappable points find nothing
    tree = cKDTree(pts)
    ia, ib = ft._within(tree, q, 20.0)
    near = tree.query_ball_point(q, 20.0)
    want = {(i, j) for i, c in enumerate(near) for j in c}
    assert len(want) > 3000 and max(len(c) for c in near) > 16
    assert set(zip(ia.tolist(), ib.tolist())) == want and len(ia) == len(want)


def _match_near_plain(a, b, matrix_xy, radius, ratio):
    """:func:`.features.match_near` written as a loop over a's keypoints, bit by bit."""
    q = ft.project(matrix_xy, a.points.astype(np.float64))
    best = {}
    for i, p in enumerate(q):
        near = np.flatnonzero(np.linalg.norm(b.points - p, axis=1) <= radius)
        if not len(near):
            continue
        d = np.unpackbits(a.descriptors[i] ^ b.descriptors[near], axis=1).sum(1)
        order = np.argsort(d, kind="stable")
        if len(near) == 1 or d[order[0]] < ratio * d[order[1]]:
            j = int(near[order[0]])
            best.setdefault(j, i)  # one match per keypoint of b: the first of a
    return {(i, j) for j, i in best.items()}


def test_match_near_hamming_distances_as_the_plain_loop():
    rng = np.random.default_rng(3)
    pts_b = (rng.random((400, 2)) * 200).astype(np.float32)
    desc_b = rng.integers(0, 256, (400, 64), dtype=np.uint8)
    keep = rng.random(300) < 0.5  # half of a's keypoints are b's with a few bits flipped
    pts_a = pts_b[:300] + rng.normal(0, 1.0, (300, 2)).astype(np.float32)
    flips = rng.random((300, 64 * 8)) < np.where(keep, 0.05, 0.5)[:, None]
    desc_a = desc_b[:300] ^ np.packbits(flips, axis=1)
    a = ft.Features(pts_a, desc_a, True)
    b = ft.Features(pts_b, desc_b, True)
    shift = np.array([[1.0, 0, 2.0], [0, 1.0, -1.0], [0, 0, 1.0]])
    b.points = b.points + np.float32([2.0, -1.0])
    got = ft.match_near(a, b, shift, 12.0, 0.8)
    want = _match_near_plain(a, b, shift, 12.0, 0.8)
    assert len(want) > 100 and set(map(tuple, got.tolist())) == want
    # the counts themselves, by words, by the byte table (numpy < 2) and for odd lengths
    bits = np.unpackbits(desc_a ^ desc_b[:300], axis=1).sum(1)
    np.testing.assert_array_equal(ft.hamming(desc_a, desc_b[:300]), bits)
    np.testing.assert_array_equal(ft.POPCOUNT[desc_a ^ desc_b[:300]].sum(1), bits)
    odd = np.unpackbits(desc_a[:, :13] ^ desc_b[:300, :13], axis=1).sum(1)
    np.testing.assert_array_equal(ft.hamming(desc_a[:, :13], desc_b[:300, :13]), odd)


def _features(img, pts, scale):
    f = ft.Features(np.asarray(pts, np.float32), np.zeros((len(pts), 64), np.uint8), True)
    f.image, f.valid, f.scale = img, (img > 0).astype(np.uint8), np.array([scale, scale])
    return f


def _track_whole(fa, fb, m, threshold, window=11):
    """The tracking on the whole work image (no box), as it was written before."""
    s = ft._work_matrix(fa.scale)
    tw = s @ m @ np.linalg.inv(s)
    hb, wb = fb.image.shape
    warped = cv2.warpPerspective(fa.image, tw, (wb, hb), flags=cv2.INTER_LINEAR, borderValue=0)
    src = fa.points.astype(np.float64)
    q = ft.project(tw, ft.project(s, src))
    r = window // 2 + 1
    inside = (q[:, 0] >= r) & (q[:, 0] < wb - 1 - r) & (q[:, 1] >= r) & (q[:, 1] < hb - 1 - r)
    iq = np.clip(np.round(q).astype(int), 0, [wb - 1, hb - 1])
    inside &= fb.valid[iq[:, 1], iq[:, 0]] > 0
    src, q = src[inside], q[inside].astype(np.float32).reshape(-1, 1, 2)
    tracked, status, _ = cv2.calcOpticalFlowPyrLK(
        warped, fb.image, q, q.copy(), winSize=(window, window), maxLevel=0,
        criteria=(cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 30, 0.01),
        flags=cv2.OPTFLOW_USE_INITIAL_FLOW,
    )  # fmt: skip
    dst = ft.project(np.linalg.inv(s), tracked.reshape(-1, 2).astype(np.float64))
    ok = (status.ravel() == 1) & (np.linalg.norm(dst - ft.project(m, src), axis=1) <= threshold)
    return src[ok], dst[ok]


def test_tracking_in_the_box_of_the_points_matches_the_whole_image():
    rng = np.random.default_rng(1)
    base = np.zeros((400, 500), np.uint8)
    base[60:330, 120:420] = cv2.GaussianBlur((rng.random((270, 300)) * 255).astype(np.uint8), (0, 0), 2.0)
    for perspective in (0.0, 2e-5):  # the affine warp and the perspective one
        m = np.array([[0.999, -0.035, 4.3], [0.035, 0.999, -2.6], [perspective, 0.0, 1.0]])
        moved = cv2.warpPerspective(base, m, (500, 400), flags=cv2.INTER_LINEAR)  # b = a moved by m
        pts = np.c_[rng.uniform(150, 390, 300), rng.uniform(90, 300, 300)]
        for scale in (1.0, 0.5):
            size = (int(500 * scale), int(400 * scale))
            fa = _features(cv2.resize(base, size, interpolation=cv2.INTER_AREA), pts, scale)
            fb = _features(cv2.resize(moved, size, interpolation=cv2.INTER_AREA), pts, scale)
            guess = m.copy()
            guess[:2, 2] += (0.6, -0.4)  # a map off by under a pixel, as a chained prior is
            src, dst = ft.track(fa, fb, guess, 3.0)
            src0, dst0 = _track_whole(fa, fb, guess, 3.0)
            assert len(src) > 100 and np.array_equal(src, src0)
            # same tracks: the tracker stops when a step is under 0.01 work px, so starting points
            # rounded to float32 at other coordinates (box or whole image) end up to ~0.01 apart
            assert np.abs(dst - dst0).max() < 0.025 / scale
            assert np.median(np.linalg.norm(dst - ft.project(m, src), axis=1)) < 0.2  # and right


def test_guided_check_for_a_homography_is_no_looser_than_a_homography_fit(monkeypatch):
    """A guided map that explains a fifth of the matches, where a homography explains all of them,
    is refused (an affine-only check accepted it: the affine RANSAC finds only that fifth)."""
    from types import SimpleNamespace

    from napari_nephi.engines.mito import align

    rng = np.random.default_rng(0)
    src = rng.uniform(0, 1000, (300, 2))
    h = np.array([[1.0, 0.05, 5.0], [0.02, 1.0, -3.0], [4e-4, 2e-4, 1.0]])  # strong perspective
    dst = ft.project(h, src)
    fj = ft.Features(src.astype(np.float32), np.zeros((300, 32), np.uint8), True)
    fk = ft.Features(dst.astype(np.float32), np.zeros((300, 32), np.uint8), True)
    monkeypatch.setattr(ft, "match_near", lambda *a: np.c_[np.arange(300), np.arange(300)])
    o = SimpleNamespace(ransac_threshold=3.0, ratio=0.8, min_inliers=12)
    wrong, inl = ft.fit_model(src, dst, "affine", 3.0)
    assert 12 <= inl.sum() < 0.25 * len(src)  # an affine explains only a part of the matches
    assert not align._confirmed(fj, fk, wrong, "homography", 2, o)
    assert align._confirmed(fj, fk, wrong, "affine", 2, o)  # as good as any affine map
    assert align._confirmed(fj, fk, h, "homography", 2, o)
    near = h.copy()
    near[:2, 2] += 40.0  # far off: explains none
    assert not align._confirmed(fj, fk, near, "homography", 2, o)


def test_guided_check_with_just_under_half_agreeing_warns_nothing(monkeypatch):
    """An odd match count with the guided map explaining just under half of it asks RANSAC for
    a model explaining every match (inlier ratio 1): no log(0) warning, and the map is confirmed,
    since no fit can explain more than twice its inliers."""
    import warnings
    from types import SimpleNamespace

    from napari_nephi.engines.mito import align

    rng = np.random.default_rng(1)
    src = rng.uniform(0, 1000, (301, 2))
    h = np.array([[1.0, 0.02, 5.0], [-0.02, 1.0, -3.0], [0.0, 0.0, 1.0]])
    dst = ft.project(h, src)
    dst[150:] += rng.uniform(50, 100, (151, 2))  # 150 of 301 follow h
    fj = ft.Features(src.astype(np.float32), np.zeros((301, 32), np.uint8), True)
    fk = ft.Features(dst.astype(np.float32), np.zeros((301, 32), np.uint8), True)
    monkeypatch.setattr(ft, "match_near", lambda *a: np.c_[np.arange(301), np.arange(301)])
    o = SimpleNamespace(ransac_threshold=3.0, ratio=0.8, min_inliers=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert align._confirmed(fj, fk, h, "homography", 2, o)


def test_within_keeps_points_on_the_edge_of_the_disc():
    """Integer keypoints under an integer map lie exactly on the disc's edge: kept, as by the ball query."""
    pts = np.array([[0.0, 0.0], [6.0, 8.0], [10.0, 0.0], [3.0, 4.0], [0.0, 10.5]])
    tree = cKDTree(pts)
    q = np.array([[0.0, 0.0], [6.0, 8.0]])
    ia, ib = ft._within(tree, q, 10.0)
    near = tree.query_ball_point(q, 10.0)
    assert {(i, j) for i, c in enumerate(near) for j in c} == set(zip(ia.tolist(), ib.tolist()))
    assert (0, 1) in set(zip(ia.tolist(), ib.tolist())) and (0, 2) in set(zip(ia.tolist(), ib.tolist()))
