"""The EM generator's ``organelle_drift`` and ``distortion`` cases (the default stays drift-free)."""

import math

import cv2
import numpy as np
import pytest
from scipy import ndimage

from napari_nephi.core.errors import InputError
from napari_nephi.engines.mito.detrend import section_centres
from napari_nephi.synthetic import em_stack


@pytest.fixture(scope="module")
def plain():
    return em_stack(24, (256, 256), seed=0, rotate=False)


def test_organelle_drift_moves_the_mitochondria_population_and_nothing_else(plain):
    speed = 0.5  # scale px per section; scale = 1 for 256 x 256
    d = em_stack(24, (256, 256), seed=0, rotate=False, organelle_drift=speed)
    masks = d["unrotated_masks"]
    ids = sorted(set(np.unique(masks[0])) & set(np.unique(masks[-1])) - {0})
    assert len(ids) >= 6
    first = np.array(ndimage.center_of_mass(masks[0] > 0, masks[0], ids))
    last = np.array(ndimage.center_of_mass(masks[-1] > 0, masks[-1], ids))
    net = np.linalg.norm((last - first).mean(0))
    assert 0.7 * 23 * speed < net < 1.3 * 23 * speed
    # without the option, the same mitochondria have no net motion
    pm = plain["unrotated_masks"]
    net0 = np.linalg.norm(
        (
            np.array(ndimage.center_of_mass(pm[-1] > 0, pm[-1], ids))
            - np.array(ndimage.center_of_mass(pm[0] > 0, pm[0], ids))
        ).mean(0)
    )
    assert net0 < 0.25 * net
    # membranes, vesicles and texture stay in place: identical away from the mitochondria
    near = ndimage.binary_dilation((masks > 0) | (pm > 0), np.ones((1, 9, 9), bool))
    np.testing.assert_array_equal(d["unrotated_stack"][~near], plain["unrotated_stack"][~near])


def test_distortion_deforms_acquired_sections_and_keeps_the_truth():
    amp = 2.0
    plain = em_stack(4, (256, 256), seed=0, rotate=False)
    d = em_stack(4, (256, 256), seed=0, rotate=False, distortion=amp)
    np.testing.assert_array_equal(d["unrotated_stack"], plain["unrotated_stack"])
    np.testing.assert_array_equal(d["unrotated_masks"], plain["unrotated_masks"])
    assert not np.array_equal(d["stack"], plain["stack"])
    for k in range(4):  # displacement measured independently by OpenCV's Farneback flow
        flow = cv2.calcOpticalFlowFarneback(
            d["unrotated_stack"][k], d["stack"][k], None, 0.5, 3, 21, 5, 7, 1.5, 0
        )
        rms = np.sqrt((flow[40:-40, 40:-40] ** 2).mean(axis=(0, 1)))
        assert np.all(rms > 0.5 * amp) and np.all(rms < 2.0 * amp), rms
    # rotated: the masks follow the distorted sections
    r = em_stack(4, (256, 256), seed=0, distortion=amp)
    assert r["stack"].shape == r["masks"].shape and r["masks"].max() > 0


def test_default_is_the_drift_free_stack(plain):
    d = em_stack(24, (256, 256), seed=0, rotate=False, organelle_drift=0.0, distortion=0.0)
    np.testing.assert_array_equal(d["stack"], plain["stack"])


def test_placement_shift_translates_sections_and_matrices_undo_it():
    d = em_stack(6, (128, 128), seed=1, placement_shift=6.0)
    plain = em_stack(6, (128, 128), seed=1, pad=d["pad"])  # its border covers the shifts too
    np.testing.assert_array_equal(d["unrotated_stack"], plain["unrotated_stack"])
    np.testing.assert_array_equal(d["angles"], plain["angles"])  # same rotations, plus a shift
    shifts = d["matrices"][:, :2, 2] - plain["matrices"][:, :2, 2]
    assert 2.0 < np.sqrt((shifts**2).mean()) < 12.0
    # independent check: phase correlation between the two acquired sections gives the shift
    for k in range(6):
        (dx, dy), _ = cv2.phaseCorrelate(
            plain["stack"][k].astype(np.float64), d["stack"][k].astype(np.float64)
        )
        assert np.hypot(dy - shifts[k, 0], dx - shifts[k, 1]) < 0.3, (k, dy, dx, shifts[k])
    # unrotated with a shift: the generator's matrices still map the truth onto the sections
    u = em_stack(3, (128, 128), seed=1, rotate=False, placement_shift=6.0)
    assert np.allclose(u["angles"], 0) and not np.allclose(u["matrices"][:, :2, 2], 0)
    # ... and a border of 3 sigma keeps the shifted sections whole: none of the content is cut off
    assert u["pad"] == 18 and u["stack"].shape[1:] == (128 + 36, 128 + 36)
    for k in range(3):
        content = (u["unrotated_stack"][k] > 0).sum()
        assert abs(int((u["stack"][k] > 0).sum()) - int(content)) < 0.03 * content


def test_placement_trend_moves_whole_sections_on_a_slow_path_that_the_matrices_hold():
    """placement_trend (session 22): the sections drift as a whole (stage drift), in steps of the
    given length on a straight or slowly turning path, zero at the middle section; the content
    stays the same and the matrices hold the drift (so the truth removes it)."""
    speed, n = 1.5, 9
    d = em_stack(n, (128, 128), seed=2, rotate=False, placement_trend=speed)
    plain = em_stack(n, (128, 128), seed=2, rotate=False, pad=d["pad"])
    np.testing.assert_array_equal(d["unrotated_stack"], plain["unrotated_stack"])
    assert d["pad"] >= 6  # the border holds the largest offset (4 steps of 1.5 px)
    centres = section_centres(d["matrices"], d["stack"].shape[1:])
    steps = np.diff(centres, axis=0)
    np.testing.assert_allclose(np.linalg.norm(steps, axis=1), speed, atol=1e-9)
    turn = np.degrees(np.arccos(np.clip((steps[0] @ steps[-1]) / speed**2, -1, 1)))
    assert turn <= 45.0  # a slow path: the direction turns by at most 45 degrees over the stack
    mid = (n - 1) // 2
    np.testing.assert_allclose(centres[mid], [(d["stack"].shape[1] - 1) / 2, (d["stack"].shape[2] - 1) / 2])
    # independent check: phase correlation of each acquired section against the truth gives the offset
    for k in (0, n - 1):
        (dx, dy), _ = cv2.phaseCorrelate(
            d["unrotated_stack"][k].astype(np.float64), d["stack"][k].astype(np.float64)
        )
        expected = centres[mid] - centres[k]  # the content moves against the section's centre
        assert np.hypot(dy - expected[0], dx - expected[1]) < 0.3, (k, dy, dx, expected)
    # rotated: the drift lies in the specimen's frame, so the section centres trend in the aligned frame
    r = em_stack(n, (128, 128), seed=2, placement_trend=speed)
    rc = section_centres(r["matrices"], r["stack"].shape[1:])
    np.testing.assert_allclose(np.linalg.norm(np.diff(rc, axis=0), axis=1), speed, atol=1e-9)


@pytest.mark.parametrize("name", ["organelle_drift", "distortion", "placement_shift", "placement_trend"])
def test_negative_drift_or_distortion_is_refused(name):
    with pytest.raises(InputError, match=name):
        em_stack(2, (64, 64), **{name: -1.0})


@pytest.mark.parametrize("seed", [1, 3])
def test_rotated_shifted_sections_keep_their_corners(seed):
    """The default border of a rotated stack covers the placement shifts too (it covered the
    rotation only, and the shifted corners of the tissue fell outside the sections)."""
    d = em_stack(4, (96, 128), seed=seed, placement_shift=5.0)
    p, (_, hp, wp) = d["pad"], d["stack"].shape
    corners = np.array([[p, p, 1], [p, p + 127, 1], [p + 95, p, 1], [p + 95, p + 127, 1.0]]).T
    q = d["matrices"] @ corners  # where the tissue's corners lie in every acquired section
    assert q[:, 0].min() >= 0 and q[:, 0].max() <= hp - 1
    assert q[:, 1].min() >= 0 and q[:, 1].max() <= wp - 1


def _old_pad(h, w, rotate=True, placement_shift=0.0, pad=None, **_):
    """The default border before the change: the rotation's only, or 3 sigma of the shift unrotated."""
    if pad is not None:
        return pad
    return math.ceil(math.hypot(h, w) / 2 - min(h, w) / 2) if rotate else math.ceil(3 * placement_shift)


# every case with its own border or without a rotated shift: the old border, and the stack it gives
# (the generator draws the shifts from their own stream, so only the border can differ)
_UNCHANGED = [
    {},
    {"organelle_drift": 0.5},
    {"distortion": 1.0},
    {"rotate": False, "placement_shift": 5.0},
    {"placement_shift": 5.0, "pad": 40},
    {"organelle_drift": 0.3, "placement_shift": 4.0, "pad": 40},
    {"rotate": False},
]


@pytest.mark.parametrize("kw", _UNCHANGED)
def test_the_other_cases_keep_the_old_border(kw):
    d = em_stack(4, (96, 128), seed=1, **kw)
    assert d["pad"] == _old_pad(96, 128, **kw)
    old = em_stack(4, (96, 128), seed=1, **{**kw, "pad": _old_pad(96, 128, **kw)})
    for key in ("stack", "masks", "unrotated_stack", "unrotated_masks", "matrices", "angles"):
        np.testing.assert_array_equal(d[key], old[key])


#: Fingerprints of the cases above (seed 1, 4 sections of 96 x 128), from the generator of
#: session 13 (the stacks of session 12 but for the rotated-shift border): per section the number
#: of mitochondria, the mitochondria pixels aligned and acquired, their centroid (y, x) and mean
#: label, and the mean and standard deviation of the aligned and of the acquired section. Integer
#: counts and means over thousands of pixels: a float rounding that differs between platforms
#: moves them by far less than the tolerances, a change of the generator's shapes, intensities,
#: draws or warps by more.
_FINGERPRINTS = [
    [  # {}
        [10, 1485, 1493, 86.45, 106.25, 5.60, 56.84, 73.59, 56.84, 72.43],
        [10, 1485, 1476, 86.48, 106.29, 5.60, 53.35, 69.12, 53.35, 68.01],
        [10, 1487, 1491, 86.44, 106.47, 5.61, 55.75, 72.25, 55.75, 71.10],
        [10, 1487, 1481, 86.54, 106.25, 5.60, 57.24, 74.10, 57.24, 72.94],
    ],
    [  # {'organelle_drift': 0.5}
        [10, 1481, 1481, 86.11, 106.27, 5.60, 56.84, 73.58, 56.84, 72.43],
        [10, 1486, 1479, 86.37, 106.39, 5.62, 53.35, 69.12, 53.35, 68.01],
        [10, 1485, 1492, 86.58, 106.29, 5.60, 55.75, 72.24, 55.75, 71.09],
        [10, 1483, 1483, 86.75, 106.43, 5.59, 57.24, 74.09, 57.23, 72.93],
    ],
    [  # {'distortion': 1.0}
        [10, 1485, 1512, 86.45, 106.25, 5.60, 56.84, 73.59, 56.73, 71.77],
        [10, 1485, 1473, 86.48, 106.29, 5.60, 53.35, 69.12, 52.85, 67.27],
        [10, 1487, 1486, 86.44, 106.47, 5.61, 55.75, 72.25, 55.94, 70.50],
        [10, 1487, 1512, 86.54, 106.25, 5.60, 57.24, 74.10, 57.34, 72.37],
    ],
    [  # {'rotate': False, 'placement_shift': 5.0}
        [10, 1485, 1485, 69.45, 89.25, 5.60, 87.71, 75.17, 87.71, 73.05],
        [10, 1485, 1485, 69.48, 89.29, 5.60, 82.32, 70.62, 82.32, 69.47],
        [10, 1487, 1487, 69.44, 89.47, 5.61, 86.03, 73.82, 86.02, 71.66],
        [10, 1487, 1487, 69.54, 89.25, 5.60, 88.33, 75.67, 88.33, 73.27],
    ],
    [  # {'placement_shift': 5.0, 'pad': 40}
        [10, 1485, 1494, 94.45, 114.25, 5.60, 47.70, 70.58, 47.70, 69.56],
        [10, 1485, 1487, 94.48, 114.29, 5.60, 44.77, 66.28, 44.77, 65.31],
        [10, 1487, 1488, 94.44, 114.47, 5.61, 46.78, 69.28, 46.79, 68.28],
        [10, 1487, 1478, 94.54, 114.25, 5.60, 48.04, 71.06, 48.04, 70.05],
    ],
    [  # {'organelle_drift': 0.3, 'placement_shift': 4.0, 'pad': 40}
        [10, 1480, 1466, 94.29, 114.32, 5.61, 47.70, 70.57, 47.70, 69.56],
        [10, 1489, 1499, 94.43, 114.30, 5.61, 44.76, 66.28, 44.76, 65.30],
        [10, 1487, 1490, 94.53, 114.35, 5.61, 46.78, 69.28, 46.77, 68.27],
        [10, 1484, 1481, 94.63, 114.39, 5.60, 48.04, 71.06, 48.04, 70.06],
    ],
    [  # {'rotate': False}
        [10, 1485, 1485, 54.45, 74.25, 5.60, 142.10, 37.75, 142.10, 37.75],
        [10, 1485, 1485, 54.48, 74.29, 5.60, 133.36, 35.68, 133.36, 35.68],
        [10, 1487, 1487, 54.44, 74.47, 5.61, 139.37, 37.34, 139.37, 37.34],
        [10, 1487, 1487, 54.54, 74.25, 5.60, 143.11, 37.92, 143.11, 37.92],
    ],
]
#: The rotation angles every rotated case draws (the main stream, after all other draws).
_ANGLES = [-1.9839420711, 2.0560893158, 2.0410156469, 0.7013907316]


def _fingerprint(d):
    rows = []
    for k in range(len(d["stack"])):
        aligned, acquired = d["unrotated_masks"][k], d["masks"][k]
        ys, xs = np.nonzero(aligned)
        sections = d["unrotated_stack"][k], d["stack"][k]
        rows.append([
            len(np.unique(aligned)) - 1, np.count_nonzero(aligned), np.count_nonzero(acquired),
            ys.mean(), xs.mean(), aligned[aligned > 0].mean(),
            *[f(a) for a in sections for f in (np.mean, np.std)],
        ])  # fmt: skip
    return np.array(rows, dtype=np.float64)


@pytest.mark.parametrize("case", range(len(_UNCHANGED)))
def test_the_other_cases_keep_their_content(case):
    """Portable check of the unchanged cases' content (not only their border, as above)."""
    kw = _UNCHANGED[case]
    d = em_stack(4, (96, 128), seed=1, **kw)
    got, want = _fingerprint(d), np.array(_FINGERPRINTS[case], dtype=np.float64)
    np.testing.assert_array_equal(got[:, 0], want[:, 0])  # mitochondria per section
    np.testing.assert_allclose(got[:, 1:3], want[:, 1:3], atol=3)  # their pixels
    # a flipped boundary pixel (allowed above) moves the centroid by up to ~0.05 px and the mean label
    # by ~0.01: tolerances for three such pixels, so float rounding elsewhere does not fail the test
    np.testing.assert_allclose(got[:, 3:5], want[:, 3:5], atol=0.15)  # centroids
    np.testing.assert_allclose(got[:, 5], want[:, 5], atol=0.05)  # mean label
    np.testing.assert_allclose(got[:, 6:], want[:, 6:], atol=0.02)  # intensities
    rotated = kw.get("rotate", True)
    np.testing.assert_allclose(d["angles"], _ANGLES if rotated else 0.0, atol=1e-9)


def test_the_fingerprint_tells_the_cases_apart():
    """The fingerprint sees each option: no two cases of different content share one."""
    rows = [np.array(f, dtype=np.float64) for f in _FINGERPRINTS]
    for i in range(len(rows)):
        for j in range(i):
            same = np.all(np.abs(rows[i] - rows[j]) <= np.r_[0, 3, 3, [0.02] * 7])
            assert not same, (_UNCHANGED[i], _UNCHANGED[j])


def test_only_the_border_of_a_rotated_shifted_stack_changed():
    from napari_nephi.synthetic.em import rotation_matrix

    d = em_stack(4, (96, 128), seed=1, placement_shift=5.0)
    old = em_stack(4, (96, 128), seed=1, placement_shift=5.0, pad=_old_pad(96, 128))
    assert d["pad"] > old["pad"]
    np.testing.assert_array_equal(d["angles"], old["angles"])  # the same rotations drawn

    def shifts(s):  # the placement shift: the map less the rotation about the padded centre
        return s["matrices"][:, :2, 2] - np.stack(
            [rotation_matrix(a, s["stack"].shape[1:])[:2, 2] for a in s["angles"]]
        )

    np.testing.assert_allclose(shifts(d), shifts(old), atol=1e-9)  # and the same shifts
    assert np.abs(shifts(d)).max() > 1.0


def test_tissue_drift_moves_the_whole_tissue_with_the_mitochondria():
    speed, n = 0.5, 12  # scale px per section (scale 1 at 256 x 256)
    d = em_stack(n, (256, 256), seed=0, rotate=False, organelle_drift=speed, tissue_drift=True)
    only = em_stack(n, (256, 256), seed=0, rotate=False, organelle_drift=speed)
    # the same mitochondria as with organelle_drift alone; the rest of the tissue is moved, by
    # the same velocity times (k - middle) in every section k
    np.testing.assert_array_equal(d["unrotated_masks"], only["unrotated_masks"])
    shifts = []
    for k in (0, n - 1):
        out = (d["unrotated_masks"][k] > 0) | (only["unrotated_masks"][k] > 0)
        a, b = (np.where(out, np.float32(160), s[k].astype(np.float32))[32:-32, 32:-32]
                for s in (only["unrotated_stack"], d["unrotated_stack"]))  # fmt: skip
        shifts.append(np.array(cv2.phaseCorrelate(a, b)[0]))
    assert np.allclose(shifts[0], -shifts[1], atol=0.3)
    # (the flat fill over the mitochondria, where both images agree, pulls the estimate toward 0)
    assert 0.75 * (n - 1) * speed < np.linalg.norm(shifts[1] - shifts[0]) < 1.1 * (n - 1) * speed
    # the same way as the mitochondria: their mean centroid motion from the first to the last section
    m = d["unrotated_masks"]
    ids = sorted(set(np.unique(m[0])) & set(np.unique(m[-1])) - {0})
    mito = (
        np.array(ndimage.center_of_mass(m[-1] > 0, m[-1], ids))
        - np.array(ndimage.center_of_mass(m[0] > 0, m[0], ids))
    ).mean(0)
    tissue = (shifts[1] - shifts[0])[::-1]  # phaseCorrelate gives (x, y)
    assert tissue @ mito > 0.9 * np.linalg.norm(tissue) * np.linalg.norm(mito), (tissue, mito)
    with pytest.raises(InputError, match="organelle_drift"):
        em_stack(2, (64, 64), tissue_drift=True)
