"""The EM generator's ``organelle_drift`` and ``distortion`` cases (the default stays drift-free)."""

import math

import cv2
import numpy as np
import pytest
from scipy import ndimage

from napari_nephi.core.errors import InputError
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


@pytest.mark.parametrize("name", ["organelle_drift", "distortion", "placement_shift"])
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
