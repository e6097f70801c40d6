"""``elastic="auto"`` (session 29): the sections' distortion read from the neighbour pairs' residuals."""

import numpy as np
import pytest

from napari_nephi.core.errors import RegistrationError
from napari_nephi.core.transform import ElasticSectionTransform, PerSectionTransform
from napari_nephi.engines.mito import align_stack
from napari_nephi.synthetic import em_stack


def _smooth(rng, pts, amplitude=0.7):
    """A smooth random (x, y) displacement at ``pts`` (a few waves across 256 px, ~1 px rms at 0.7)."""
    k = rng.normal(0, 2 * np.pi / 200, (4, 2))
    ph = rng.uniform(0, 2 * np.pi, (4, 2))
    a = rng.normal(0, amplitude, (4, 2))
    return np.stack([sum(a[i, c] * np.sin(pts @ k[i] + ph[i, c]) for i in range(4)) for c in range(2)], 1)


@pytest.mark.parametrize("kind", ["distorted", "moving", "noise", "image noise"])
def test_the_residual_correlation_reads_the_sign_of_what_moves_the_content(kind):
    """Twelve sections, the same 300 points each (rotated by the pair's map so the residuals are
    measured in each section's own frame). Each section displaced by its own smooth field: the two
    pairs through a section share it with opposite signs, correlation -0.5 (-0.48 here); content
    moving on at a constant (smooth, per-point) velocity: positive (+1 at the same point, the
    field's own correlation in the ring, 0.74); tracking noise independent per pair: 0. Image noise
    (session 30): each section's points moved by their own noise, which both pairs through the
    section see at the same point with opposite signs: the same-point reading (session 29's) is
    -0.5 like a distortion's, the ring reading (points 12-30 px apart) 0. Before session 30 the
    reading was the same-point one: -0.5 on image noise, so that case failed."""
    from napari_nephi.engines.mito.distortion import pair_residual, residual_correlation

    rng = np.random.default_rng(3)
    pts = rng.uniform(0, 256, (300, 2))
    n = 12
    velocity = _smooth(rng, pts)

    def moved(k):
        if kind == "distorted":
            return pts + _smooth(rng, pts)
        if kind == "image noise":
            return pts + rng.normal(0, 0.3, pts.shape)
        return pts + (velocity * k if kind == "moving" else 0)

    where = [moved(k) for k in range(n)]
    turn = np.deg2rad(7.0)
    fit = np.array([[np.cos(turn), -np.sin(turn), 3.0], [np.sin(turn), np.cos(turn), -2.0], [0, 0, 1]])

    def frame(k, p):  # section k's own frame: the pair map k -> k + 1 is `fit`
        for _ in range(k):
            p = p @ fit[:2, :2].T + fit[:2, 2]
        return p

    pairs = {}
    for k in range(n - 1):
        src = frame(k, where[k] + (rng.normal(0, 0.3, pts.shape) if kind == "noise" else 0))
        dst = frame(k + 1, where[k + 1] + (rng.normal(0, 0.3, pts.shape) if kind == "noise" else 0))
        if k % 2:  # oriented toward the reference either way
            pairs[k] = pair_residual(k + 1, k, dst, src, np.linalg.inv(fit))
        else:
            pairs[k] = pair_residual(k, k + 1, src, dst, fit)
    reading = residual_correlation(pairs, ring=(12.0, 30.0), radius=2.0)
    assert reading["sections"] == n - 2 and reading["points"] >= 0.97 * 300 * (n - 2)
    expected = {"distorted": -0.5, "moving": 1.0, "noise": 0.0, "image noise": 0.0}[kind]
    if kind == "moving":  # the velocity field's own correlation at 12-30 px (0.74 here)
        assert 0.5 < reading["value"] < 1.0
    else:
        assert reading["value"] == pytest.approx(expected, abs=0.1 if kind == "distorted" else 0.03)
    same = {"distorted": -0.5, "moving": 1.0, "noise": 0.0, "image noise": -0.5}[kind]
    assert reading["same_point"] == pytest.approx(same, abs=0.1)
    assert reading["se"] is not None and reading["se"] < 0.1


def _pairs(kind, n=12, seed=3):
    """The neighbour pairs' residuals of ``n`` sections of the same 300 points (as in the test above):
    ``"moving"`` content (a smooth velocity, ~1 px per section), ``"distorted"`` sections (each its own
    smooth field, ~1 px rms) or both (``"moving+distorted"``, the field at half the amplitude); pairs
    in both orientations, each measured in its sections' own frames (a 7 degree turn per pair)."""
    from napari_nephi.engines.mito.distortion import pair_residual

    rng = np.random.default_rng(seed)
    pts = rng.uniform(0, 256, (300, 2))
    velocity = _smooth(rng, pts)
    amplitude = 0.35 if kind == "moving+distorted" else 0.7
    where = [
        pts
        + (velocity * k if "moving" in kind else 0)
        + (_smooth(rng, pts, amplitude) if "distorted" in kind else 0)
        for k in range(n)
    ]
    turn = np.deg2rad(7.0)
    fit = np.array([[np.cos(turn), -np.sin(turn), 3.0], [np.sin(turn), np.cos(turn), -2.0], [0, 0, 1]])

    def frame(k, p):
        for _ in range(k):
            p = p @ fit[:2, :2].T + fit[:2, 2]
        return p

    return {
        k: pair_residual(k + 1, k, frame(k + 1, where[k + 1]), frame(k, where[k]), np.linalg.inv(fit))
        if k % 2
        else pair_residual(k, k + 1, frame(k, where[k]), frame(k + 1, where[k + 1]), fit)
        for k in range(n - 1)
    }


@pytest.mark.parametrize("kind", ["moving", "distorted", "moving+distorted"])
def test_the_lag_corrected_reading_takes_out_content_moving_on(kind):
    """Session 33 (issue 15, held-out seed 73): content that moves on through the stack (mitochondria
    drifting or changing shape) correlates the two pairs through a section positively and hides a
    distortion from the ring reading. Pairs two sections apart share no section, so a distortion gives
    them nothing, while the moving content moves them as it moves the neighbours: the ring reading less
    this lag-2 one is the distortion's. 16 sections (12 with lag-2 sums, the corrected rule's least).
    Moving content: ring +0.70, lag 2 +0.70, corrected 0.00; distorted: -0.46 / +0.09 / -0.55; both: the
    ring reads +0.02 +- 0.04 (missed), corrected -0.31 +- 0.06, which ``decide(corrected=True)`` finds
    (``read_by`` "corrected") and the ring rule alone (:data:`~.distortion.CORRECTED` False, the default)
    does not. Fails before session 33 (no ``corrected`` reading)."""
    from napari_nephi.engines.mito.distortion import LIMIT, SE_FACTOR, decide, residual_correlation

    r = residual_correlation(_pairs(kind, n=16), ring=(12.0, 30.0), radius=2.0)
    assert r["sections"] == 14 and r["corrected_sections"] == 12 and r["corrected_se"] is not None
    if kind == "moving":
        assert r["value"] > 0.5 and r["lag2"] == pytest.approx(r["value"], abs=0.02)
        assert abs(r["corrected"]) < 0.02
    elif kind == "distorted":
        assert r["value"] < -0.4 and abs(r["lag2"]) < 0.15 and r["corrected"] < -0.4
    else:
        assert (
            r["value"] > LIMIT and r["corrected"] < -0.25 and r["corrected"] < -SE_FACTOR * r["corrected_se"]
        )
    old, new = decide("auto", r, corrected=False), decide("auto", r, corrected=True)
    assert old["corrected_rule"] is False and new["corrected_rule"] is True
    assert old["distorted"] is (kind == "distorted") and new["distorted"] is (kind != "moving")
    assert new["read_by"] == {"moving": None, "distorted": "ring", "moving+distorted": "corrected"}[kind]
    assert old["lag2"] == r["lag2"] and old["corrected"] == r["corrected"]  # recorded either way


def test_the_corrected_reading_is_bounded_by_students_t_over_its_sections():
    """Development, session 33: an undistorted 8 x 384^2 stack at noise 0.3 (seed 119) read -0.0255 +-
    0.0066 corrected, from 4 sections with lag-2 sums, under the limit and 3.9 standard errors: the
    jackknife over so few sections is unreliable. Session 34: the bound is Student's t over those sections
    (:func:`~.distortion.corrected_bound`, 9.2 for 4, 3.85 for 12, 3.05 for 156) instead of 3 behind a
    12-section guard: 3.2 standard errors through 12 sections no longer fire (the guard let them), 6 through
    8 do (bound 4.53; the guard held them back), and through 156 the bound is 3.05, about the 3 of before.
    The ring rule is untouched.
    Fails on session 33's rule."""
    from napari_nephi.engines.mito.distortion import corrected_bound, decide

    assert corrected_bound(2) is None
    np.testing.assert_allclose([corrected_bound(m) for m in (4, 12, 156)], [9.22, 3.85, 3.05], atol=0.01)
    base = {"value": -0.007, "se": 0.0067, "points": 5000, "sections": 6, "same_point": None, "rms": 1.0}
    few = {**base, "lag2": 0.013, "corrected": -0.0255, "corrected_se": 0.0066, "corrected_sections": 4}
    assert decide("auto", few, corrected=True)["distorted"] is False
    twelve = {**few, "corrected_se": 0.0080, "corrected_sections": 12}  # 3.2 se
    assert decide("auto", twelve, corrected=True)["distorted"] is False
    assert decide("auto", {**twelve, "corrected_sections": 156}, corrected=True)["read_by"] == "corrected"
    eight = {**few, "corrected": -0.06, "corrected_se": 0.01, "corrected_sections": 8}  # 6 se, bound 4.53
    record = decide("auto", eight, corrected=True)
    assert record["read_by"] == "corrected" and record["corrected_bound"] > 4.5
    assert decide("auto", {**eight, "value": -0.04, "se": 0.01}, corrected=True)["read_by"] == "ring"
    assert decide("auto", eight)["distorted"] is False  # CORRECTED stays off by default


def test_the_lag2_sums_count_every_inner_section_and_hold_few_pairs():
    """The lag-2 sums through section ``m`` need the pairs ``m - 2 .. m + 1``; pairs arriving from a middle
    reference in both directions (as :func:`.align.align_stack` adds them) give every section 2 .. n - 3
    its sums, and a pair is dropped once the sections it serves are counted (4 held at the end of 30).
    Fails before session 33 (no lag-2 sums)."""
    from napari_nephi.engines.mito.distortion import Correlation

    pairs = _pairs("distorted", n=30)
    acc = Correlation((12.0, 30.0), 2.0)
    held = 0
    for lo in [*range(14, 29), *range(13, -1, -1)]:  # reference 14: upward, then downward
        acc.add(lo, pairs[lo])
        held = max(held, len(acc.pairs))
    assert sorted(acc.rows2) == list(range(2, 28)) and len(acc.pairs) <= 4
    assert held <= 17  # the upward half waits for its lower neighbours, then they go


@pytest.mark.parametrize("distortion", [0.0, 1.0])
def test_elastic_auto_runs_the_elastic_step_where_the_sections_are_distorted(distortion):
    """16 sections of 192 x 192: with a smooth distortion of 0.75 px rms per section the reading
    (-0.089, the ring reading of session 30; -0.17 at the same point) is under the limit and the
    elastic step runs (an elastic transform, the stage in the progress); undistorted, this seed reads
    +0.010 (standard error 0.005; 0.13 at the same point; other seeds of this size read -0.015..+0.019,
    review 1 of session 30 A3, which is why the decision also asks for 3 standard errors) and the
    result is ``elastic=False``'s, bit for bit. Before session 29 "auto" was refused."""
    d = em_stack(16, (192, 192), seed=0, distortion=distortion)
    stages = []
    reg = align_stack(
        d["stack"],
        masks=d["masks"],
        workers=1,
        warp=False,
        elastic="auto",
        progress=lambda e: stages.append(e.stage),
    )
    reading = reg.metrics["distortion"]
    limit = reading["limit"]
    assert reg.settings["elastic"] == "auto" and abs(limit) <= 0.1
    assert reading["points"] >= 1000 and reading["sections"] == 14
    elastic_stage = [s for s in stages if s.startswith("elastic refinement (auto: sections distorted")]
    if distortion:
        assert reading["correlation"] < limit - 0.05 and reading["distorted"] is True
        assert reg.settings["elastic_applied"] is True and isinstance(reg.transform, ElasticSectionTransform)
        assert reg.metrics["elastic"]["displacement_mean"] > 0.2 and len(elastic_stage) == 1
    else:
        assert reading["correlation"] > limit + 3 * reading["se"] and reading["distorted"] is False
        assert reg.settings["elastic_applied"] is False and type(reg.transform) is PerSectionTransform
        assert not elastic_stage
        plain = align_stack(d["stack"], masks=d["masks"], workers=1, warp=False, elastic=False)
        assert np.array_equal(plain.transform.matrices, reg.transform.matrices)
        assert plain.metrics["distortion"]["correlation"] == reading["correlation"]


def test_the_default_leaves_a_noisy_undistorted_stack_without_the_elastic_step():
    """Review 2 of session 29 (A1): image noise enters both pairs through a section with opposite
    signs at the same point, as a distortion does, so this undistorted stack at noise 0.3 read -0.08
    at the same point, under session 29's limit (with ``"auto"`` as the default, 2a7a0e8, the elastic
    step ran here at ~10x the CPU). Since session 30 the default is ``"auto"`` with the ring reading
    (points 12-30 work px apart, beyond the tracking window), which the noise does not move: the
    default runs no elastic step."""
    d = em_stack(16, (192, 192), seed=0, noise=0.3)
    reg = align_stack(d["stack"], masks=d["masks"], workers=1, warp=False)
    assert reg.settings["elastic_applied"] is False and type(reg.transform) is PerSectionTransform
    assert reg.settings["elastic"] == "auto"  # the default (False before session 30)
    assert reg.metrics["distortion"]["correlation"] is not None  # still read and recorded


def test_auto_reads_a_noisy_undistorted_stack_undistorted():
    """Session 30: image noise moves a track only through its 11 px window, so the ring reading
    (points 12-30 work px apart) does not see it: the undistorted stack at noise 0.3 reads -0.002
    (standard error 0.003) and ``"auto"`` leaves it without the elastic step, while the same-point
    reading (session 29's, recorded as context) is -0.08, under its old limit -0.03: before session
    30 ``"auto"`` ran the elastic step here."""
    d = em_stack(16, (192, 192), seed=0, noise=0.3)
    reg = align_stack(d["stack"], masks=d["masks"], workers=1, warp=False, elastic="auto")
    reading = reg.metrics["distortion"]
    assert reading["distorted"] is False and reg.settings["elastic_applied"] is False
    assert abs(reading["correlation"]) < 3 * reading["se"] < 0.02 and reading["same_point"] < -0.05


def test_auto_asks_the_reading_to_stand_out_of_its_standard_error():
    """Review 1 of session 30 (A2): on a small, short undistorted stack the ring reading's spread
    reaches -0.01 (session 30's first limit): 16 x 192^2 seed 5 reads -0.0147 (standard error 0.0053,
    2.8 of them under 0). The decision asks for both the limit and :data:`SE_FACTOR` (3) standard
    errors under 0, so ``"auto"`` leaves it without the elastic step (5be3e72, the limit alone, ran it
    at ~5x the CPU); the same reading with half the error reads distorted under that limit, and not
    under today's -0.025 (review 2 of session 30, A1)."""
    d = em_stack(16, (192, 192), seed=5)
    reg = align_stack(d["stack"], masks=d["masks"], workers=1, warp=False, elastic="auto")
    reading = reg.metrics["distortion"]
    assert reading["correlation"] <= -0.01 and reading["correlation"] > -3 * reading["se"]
    assert reading["distorted"] is False and reg.settings["elastic_applied"] is False

    from napari_nephi.engines.mito.distortion import LIMIT, SE_FACTOR, decide

    assert reading["se_factor"] == SE_FACTOR == 3.0 and reading["limit"] == LIMIT == -0.025
    base = {"points": 5000, "sections": 14, "same_point": None, "rms": 1.0}
    assert decide("auto", {**base, "value": -0.0147, "se": 0.0026}, limit=-0.01)["distorted"] is True
    assert decide("auto", {**base, "value": -0.0147, "se": 0.0053}, limit=-0.01)["distorted"] is False
    assert decide("auto", {**base, "value": -0.0147, "se": 0.0026})["distorted"] is False  # over -0.025
    assert decide("auto", {**base, "value": -0.04, "se": 0.008})["distorted"] is True
    assert decide("auto", {**base, "value": -0.04, "se": 0.016})["distorted"] is False  # 2.5 se
    assert decide("auto", {**base, "value": -0.05, "se": None})["distorted"] is False  # under 3 sections


@pytest.mark.parametrize("seed", [17, 34])
def test_the_default_leaves_small_undistorted_stacks_alone(seed):
    """Review 2 of session 30 (A1, HIGH): with ``"auto"`` as the default at the limit -0.01 (75fb72f)
    these undistorted 16 x 192^2 stacks at the generator's noise read -0.0115 / -0.0119 (3.4 / 3.6
    standard errors under 0) and got the elastic step at ~6x the CPU (seed 34: 0.006 Dice less). The
    default is ``"auto"`` at -0.025 (under the lowest of 312 undistorted small stacks on other seeds,
    -0.0167): no elastic step."""
    d = em_stack(16, (192, 192), seed=seed)
    reg = align_stack(d["stack"], masks=d["masks"], workers=1, warp=False)
    reading = reg.metrics["distortion"]
    assert reg.settings["elastic"] == "auto" and -0.025 < reading["correlation"] <= -0.01
    assert reading["distorted"] is False
    assert reg.settings["elastic_applied"] is False and type(reg.transform) is PerSectionTransform


@pytest.mark.parametrize("bad", ["yes", 1, None, "automatic"])
def test_elastic_takes_true_false_or_auto(em, bad):
    with pytest.raises(RegistrationError, match=r"elastic must be true, false or 'auto'"):
        align_stack(em["stack"][:3], masks=em["masks"][:3], workers=1, warp=False, elastic=bad)
