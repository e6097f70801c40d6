"""Joint elastic solve (``elastic_solver="joint"``): the affine part of every section's field is
solved for all sections at once from dense flows, so errors no longer add up along the stack."""

import cv2
import numpy as np
import pytest

from napari_nephi.core.errors import InputError
from napari_nephi.core.transform import ElasticSectionTransform
from napari_nephi.engines.mito import align_stack
from napari_nephi.engines.mito.elastic import _affine_at_nodes, elastic_fields, field_affine_fit
from napari_nephi.synthetic import em_stack


def _affine(g, t, shape):
    """Dense (y, x) displacement ``G (p - centre) + t``."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    yc, xc = yy - (h - 1) / 2, xx - (w - 1) / 2
    return np.stack([g[0, 0] * yc + g[0, 1] * xc + t[0], g[1, 0] * yc + g[1, 1] * xc + t[1]], -1)


def _resample(img, d):
    """``img`` sampled at ``p + d(p)``."""
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return cv2.remap(img, (xx + d[..., 1]).astype(np.float32), (yy + d[..., 0]).astype(np.float32),
                     cv2.INTER_LINEAR)  # fmt: skip


@pytest.fixture(scope="module")
def walk():
    """24 unrotated sections, each with its own affine distortion (scale and shear up to ~1 %,
    translation ~1 px; section ``k`` shows the truth at ``p + d_k(p)``), and matrices that put a
    random walk of rotation and translation on top (as keypoint pairs chained along a stack do)."""
    n = 24
    data = em_stack(n, (160, 160), seed=3, rotate=False, pad=24)
    truth = data["unrotated_stack"]
    shape = truth.shape[1:]
    rng = np.random.default_rng(7)
    g = rng.normal(0, 0.006, (n, 2, 2))
    t = rng.normal(0, 0.8, (n, 2))
    g[0], t[0] = 0.0, 0.0  # the reference keeps its place
    d = np.stack([_affine(g[k], t[k], shape) for k in range(n)])
    stack = np.stack([_resample(truth[k], d[k]) for k in range(n)])
    # the matrices: a rigid random walk (0.4 px and 0.3 mrad per section), zero at section 0
    angle = np.cumsum(np.r_[0, rng.normal(0, 3e-3, n - 1)])
    shift = np.cumsum(np.r_[[[0, 0]], rng.normal(0, 0.4, (n - 1, 2))], axis=0)
    c = (np.array(shape) - 1) / 2
    mats = np.repeat(np.eye(3)[None], n, axis=0)
    for k in range(n):
        r = np.array([[np.cos(angle[k]), -np.sin(angle[k])], [np.sin(angle[k]), np.cos(angle[k])]])
        mats[k, :2, :2] = r
        mats[k, :2, 2] = c - r @ c + shift[k]
    return {"stack": stack, "d": d, "matrices": mats, "shape": shape}


def _errors(walk, fields):
    """RMS error (px) per section of the final maps against the truth (aligned ``p`` -> ``p - d(p)``,
    to first order) over the inner part of the sections."""
    n = len(walk["stack"])
    h, w = walk["shape"]
    yy, xx = np.mgrid[40 : h - 40 : 6, 40 : w - 40 : 6]
    p = np.stack([yy.ravel(), xx.ravel()], 1).astype(float)
    t = ElasticSectionTransform(walk["matrices"], fields, shape=(n, h, w))
    out = []
    for k in range(n):
        q = p + t.field_at(k, p)
        q = q @ walk["matrices"][k][:2, :2].T + walk["matrices"][k][:2, 2]
        want = p - walk["d"][k][p[:, 0].astype(int), p[:, 1].astype(int)]
        out.append(np.sqrt(((q - want) ** 2).sum(1).mean()))
    return np.array(out)


def test_the_joint_solve_removes_the_walk_and_each_sections_own_distortion(walk):
    n, (h, w) = len(walk["stack"]), walk["shape"]
    zero = np.zeros((n, 2, 2, 2), np.float32)
    before = _errors(walk, zero)
    kw = dict(spacing=16, radius=4, scale=1.0, iterations=1)
    joint = _errors(
        walk, elastic_fields(lambda k: walk["stack"][k], walk["matrices"], (h, w), solver="joint", **kw)
    )
    local = _errors(
        walk, elastic_fields(lambda k: walk["stack"][k], walk["matrices"], (h, w), solver="local", **kw)
    )
    # measured (px): mean over sections / last 6 sections / max: before 1.47 / 2.33 / 3.5, local
    # median 1.06 / 1.89 / 2.7, joint 0.52 / 0.79 / 1.03 (the joint error still grows a little:
    # the dense flows between these small, changing sections are not exact)
    assert before[-6:].mean() > 2.0
    assert joint.max() < 1.4, joint
    assert joint.mean() < 0.6 * local.mean(), (joint.mean(), local.mean())
    assert joint[-6:].mean() < 0.5 * local[-6:].mean(), (joint[-6:], local[-6:])
    assert joint[-6:].mean() < 0.45 * before[-6:].mean(), (joint[-6:], before[-6:])


def test_joint_solve_leaves_identical_sections_identical(em):
    base = em["unrotated_stack"][2]
    stack = np.stack([base] * 5)
    mats = np.repeat(np.eye(3)[None], 5, axis=0)
    f = elastic_fields(lambda k: stack[k], mats, base.shape, spacing=32, radius=2, solver="joint")
    assert np.abs(f).max() < 1e-3


def test_a_section_distorted_on_its_own_moves_and_its_neighbours_stay(em):
    base = em["unrotated_stack"][2]
    shape = base.shape
    d = _affine(np.array([[0.015, -0.01], [0.008, -0.012]]), np.array([1.2, -0.8]), shape)
    stack = np.stack([base] * 7)
    stack[3] = _resample(base, d)
    mats = np.repeat(np.eye(3)[None], 7, axis=0)
    f = elastic_fields(lambda k: stack[k], mats, shape, spacing=16, radius=2, scale=1.0, solver="joint")
    t = ElasticSectionTransform(mats, f, shape=(7, *shape))
    pad = em["pad"]
    yy, xx = np.mgrid[pad + 20 : shape[0] - pad - 20 : 8, pad + 20 : shape[1] - pad - 20 : 8]
    p = np.stack([yy.ravel(), xx.ravel()], 1).astype(float)
    err = np.abs(t.field_at(3, p) + d[p[:, 0].astype(int), p[:, 1].astype(int)]).mean()
    assert err < 0.2 * np.abs(d).mean(), err
    others = [np.abs(t.field_at(k, p)).max() for k in range(7) if k != 3]
    assert max(others) < 0.15, others


def test_engine_joint_option_is_recorded_and_checked(em):
    stack = em["stack"][:4]
    # session 19: elastic=True alone runs the joint solver with the landmarks (global solve, masks)
    reg = align_stack(stack, masks=em["masks"][:4], elastic=True, warp=False, workers=1)
    assert reg.settings["elastic_solver"] == "joint" and reg.settings["elastic_landmarks"] is True
    assert isinstance(reg.transform, ElasticSectionTransform)
    # the old behaviour stays reachable, and the chain (no keypoint pairs to join) keeps "local"
    kw = dict(elastic=True, warp=False, workers=1)
    reg = align_stack(stack, masks=em["masks"][:4], elastic_landmarks=False, **kw)
    assert reg.settings["elastic_solver"] == "joint" and reg.settings["elastic_landmarks"] is False
    reg = align_stack(stack, masks=em["masks"][:4], neighbours=1, **kw)
    assert reg.settings["elastic_solver"] == "local" and reg.settings["elastic_landmarks"] is False
    reg = align_stack(
        stack, detector="orb", descriptor="orb", use_masks=False, **kw
    )  # no masks: no landmarks
    assert reg.settings["elastic_solver"] == "joint" and reg.settings["elastic_landmarks"] is False
    with pytest.raises(InputError, match="elastic_solver"):
        align_stack(stack, elastic=True, elastic_solver="global", warp=False)
    # the landmarks (session 17): recorded; refused without the joint solver or without masks
    kw = dict(elastic=True, elastic_solver="joint", elastic_landmarks=True, warp=False, workers=1)
    reg = align_stack(stack, masks=em["masks"][:4], **kw)
    assert reg.settings["elastic_landmarks"] is True
    with pytest.raises(InputError, match="elastic_landmarks"):
        align_stack(stack, masks=em["masks"][:4], **{**kw, "elastic_solver": "local"})
    with pytest.raises(InputError, match="elastic_landmarks"):
        align_stack(stack, detector="orb", descriptor="orb", use_masks=False, **kw)


def test_a_pair_without_an_affine_fit_stays_out_of_the_median(em):
    """A section with almost no texture gives its pairs no affine fit: with the joint solve it gets no
    field (its full flows would mix with the others' residual flows in the median) and the others
    stay put."""
    base = em["unrotated_stack"][2]
    stack = np.stack([base] * 5)
    stack[2] = 120
    stack[2, 100:116, 100:116] = base[100:116, 100:116]  # a small textured patch: too few pixels for a fit
    mats = np.repeat(np.eye(3)[None], 5, axis=0)
    f = elastic_fields(lambda k: stack[k], mats, base.shape, spacing=32, radius=2, scale=1.0, solver="joint")
    assert np.abs(f[2]).max() == 0
    assert np.abs(np.delete(f, 2, axis=0)).max() < 0.05


def _true_pairs(walk, error: float = 0.0, residual: float = 0.01, seed: int = 0):
    """Keypoint pair maps between sections up to 2 apart, from the truth (section ``k`` shows the
    truth at ``q + d_k(q)``), each off by a random affine map of about ``error`` px when given."""
    n = len(walk["stack"])
    rng = np.random.default_rng(seed)
    own = []
    for k in range(n):  # A_k: section k -> truth, q -> q + d_k(q), d_k affine
        d = walk["d"][k]
        a = np.eye(3)
        a[:2, :2] += np.stack([d[1, 0] - d[0, 0], d[0, 1] - d[0, 0]], axis=1)
        a[:2, 2] = d[0, 0]
        own.append(a)
    pairs = []
    for a in range(n):
        for b in range(a + 1, min(n, a + 3)):
            m = np.linalg.inv(own[b]) @ own[a]
            if error:
                off = np.eye(3)
                off[:2, :2] += rng.normal(0, error / 100, (2, 2))
                off[:2, 2] = rng.normal(0, error, 2)
                m = off @ m
            pairs.append((a, b, m, residual))
    return pairs


def test_keypoint_pairs_that_agree_keep_their_placement_and_others_give_way(walk):
    """The keypoint pairs join the joint solve weighted by their residuals: exact pairs that agree
    closely with one another decide the affine part (the flows between these small, changing
    sections are not exact), while pairs off by ~2 px each, with residuals to match, change little."""
    h, w = walk["shape"]
    kw = dict(spacing=16, radius=4, scale=1.0, iterations=1, solver="joint")
    read = lambda k: walk["stack"][k]  # noqa: E731
    flows = _errors(walk, elastic_fields(read, walk["matrices"], (h, w), **kw))
    exact = _errors(walk, elastic_fields(read, walk["matrices"], (h, w), pairs=_true_pairs(walk), **kw))
    noisy = _errors(
        walk, elastic_fields(read, walk["matrices"], (h, w), pairs=_true_pairs(walk, 2.0, 2.0), **kw)
    )

    # a chain of pairs fits exactly whatever its errors: its residuals say nothing, it is left out
    chain = [p for p in _true_pairs(walk, 2.0, 0.0) if p[1] == p[0] + 1]
    assert np.array_equal(
        _errors(walk, elastic_fields(read, walk["matrices"], (h, w), pairs=chain, **kw)), flows
    )
    # bridges (here: no skip-one pairs past section 6) fit exactly too, and are left out even where
    # other pairs close loops; before, their zero residuals set the keypoint pairs' scale (review 1)
    mixed = [
        (a, b, m, 2.0 if b <= 6 else 0.0) for a, b, m, _ in _true_pairs(walk, 2.0) if b == a + 1 or b <= 6
    ]
    bridged = _errors(walk, elastic_fields(read, walk["matrices"], (h, w), pairs=mixed, **kw))
    assert abs(bridged.mean() - flows.mean()) < 0.25 * flows.mean(), (bridged.mean(), flows.mean())
    # measured (px, mean over sections): flows alone 0.553, with exact pairs 0.269, with noisy 0.553
    assert exact.mean() < 0.6 * flows.mean(), (exact.mean(), flows.mean())
    assert abs(noisy.mean() - flows.mean()) < 0.25 * flows.mean(), (noisy.mean(), flows.mean())


def test_a_stack_distorted_in_one_part_keeps_its_clean_parts_placement(walk):
    """Each keypoint pair's weight comes from the residuals of the pairs near it, not from one
    median for the whole stack: with exact pairs below section 12 and 2 px-noisy ones above (fewer
    than half the pairs exact), the clean part gains as with exact pairs throughout. With one
    stack-wide median it gained nothing (0.379 px against 0.386, review R6 of session 16)."""
    h, w = walk["shape"]
    kw = dict(spacing=16, radius=4, scale=1.0, iterations=1, solver="joint")
    read = lambda k: walk["stack"][k]  # noqa: E731
    flows = _errors(walk, elastic_fields(read, walk["matrices"], (h, w), **kw))
    clean, noisy = _true_pairs(walk), _true_pairs(walk, 2.0, 2.0)
    mixed = [c if c[1] < 12 else nz for c, nz in zip(clean, noisy)]
    assert sum(c[1] < 12 for c in clean) < len(clean) / 2
    e = _errors(walk, elastic_fields(read, walk["matrices"], (h, w), pairs=mixed, **kw))
    # measured: clean part 0.278 px against the flows alone 0.345 (0.292 / 0.386 with JOINT_PRIOR 0.1:
    # the flows alone improve more than the clean part with the stronger prior, hence 0.85, not 0.8)
    assert e[:11].mean() < 0.85 * flows[:11].mean(), (e[:11].mean(), flows[:11].mean())
    assert e[12:].mean() < flows[12:].mean() + 0.05, (e[12:].mean(), flows[12:].mean())


def test_affine_fit_of_fields_recovers_the_affine_part():
    """The keypoint targets of a later pass discount the affine part of the whole fields so far
    (median step included, review R7): the fit returns an affine field's own parameters."""
    x = np.random.default_rng(0).normal(0, 1, (3, 6)) * [0.01, 0.01, 0.01, 0.01, 1.0, 1.0]
    nodes = _affine_at_nodes(x, (300, 400), (10, 13))
    assert np.allclose(field_affine_fit(nodes, (300, 400)), x, atol=1e-6)


def test_rois_keep_the_affine_part_on_the_landmarks(walk):
    """With ``rois`` a pair's affine fit uses the regions of interest (the keypoints' landmarks):
    content outside them that moves steadily through depth (here everything but a central square
    slides 0.5 px per section) no longer drags the sections along."""
    h, w = walk["shape"]
    n = len(walk["stack"])
    roi = np.zeros((h, w), np.uint8)
    roi[40:120, 40:120] = 1
    still = np.zeros((2, 2))
    moved = [_resample(walk["stack"][k], _affine(still, [0.0, 0.5 * k], (h, w))) for k in range(n)]
    slid = np.stack([np.where(roi > 0, walk["stack"][k], moved[k]) for k in range(n)])
    kw = dict(spacing=16, radius=4, scale=1.0, iterations=1, solver="joint")
    plain = _errors(walk, elastic_fields(lambda k: slid[k], walk["matrices"], (h, w), **kw))
    kept = _errors(
        walk, elastic_fields(lambda k: slid[k], walk["matrices"], (h, w), rois=lambda k: roi, **kw)
    )
    # measured: 1.42 px with rois, 4.46 without (0.55 with no sliding content)
    assert kept.mean() < 0.5 * plain.mean(), (kept.mean(), plain.mean())


def test_landmark_spin_takes_the_rotation_from_the_landmarks_or_the_whole_section(monkeypatch):
    """``LANDMARK_SPIN`` (session 35, a diagnosis switch): the share of a pair's rotation taken from the
    landmarks' region. Here the region turns by 0.004 rad and the rest by -0.002: with 1 (the default) the
    pair's rotation is the region's, with 0 the whole section's fit, with 0.5 halfway; scale, shear and the
    displacement at the region's centroid stay the region fit's / the whole fit's as before."""
    from napari_nephi.engines.mito import elastic

    h, w, s = 200, 240, 1.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = yy - (h - 1) / 2, xx - (w - 1) / 2
    region = np.zeros((h, w), bool)
    region[60:140, 20:100] = True
    turn = np.where(region, 0.004, -0.002)
    flow = np.stack([turn * cy, -turn * cx], -1).astype(np.float32)  # (x, y): u_y = -t x, u_x = t y
    whole = elastic._flow_affine(flow, np.ones((h, w), bool), s, (h, w))[0]

    def spin(p):  # (G10 - G01) / 2 of the (y, x) parameters
        return 0.5 * (p[2] - p[1])

    got = {}
    for share in (1.0, 0.5, 0.0):
        monkeypatch.setattr(elastic, "LANDMARK_SPIN", share)
        got[share] = elastic._on_landmarks(flow, region, s, (h, w), whole)
    assert abs(spin(got[1.0]) - 0.004) < 2e-4, spin(got[1.0])  # the region's turn
    assert spin(whole) < 0.0  # the rest's turn dominates the whole fit
    assert abs(spin(got[0.0]) - spin(whole)) < 1e-9
    assert abs(spin(got[0.5]) - 0.5 * (spin(got[1.0]) + spin(whole))) < 1e-9
    roi = elastic._flow_affine(flow, region, s, (h, w))[0]
    ys, xs = np.nonzero(region)
    c = np.array([cy[ys, xs].mean(), cx[ys, xs].mean()])

    def at(p, q):  # the affine field p's (y, x) displacement at q
        return p[:4].reshape(2, 2) @ q + p[4:]

    for p in got.values():  # scale and shear are the whole fit's in every case
        g, gw = p[:4].reshape(2, 2), whole[:4].reshape(2, 2)
        assert np.allclose(g + g.T, gw + gw.T, atol=1e-12)
        assert np.allclose(at(p, c), at(roi, c), atol=1e-9)  # the region fit's displacement at its centroid
