"""The user's start for registering a plate: landmark fits and rotation/scale nudges, checked by hand."""

import math

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_nephi.core.errors import InputError
from napari_nephi.engines.atlas.manual_start import landmark_matrix, nudge_matrix, start_matrix


def _apply(m, points):
    p = np.c_[np.asarray(points, float), np.ones(len(points))]
    return (p @ m.T)[:, :2]


def test_landmarks_recover_a_known_similarity_and_affine():
    rng = np.random.default_rng(3)
    t = math.radians(25.0)
    truth = np.array(
        [
            [1.3 * math.cos(t), -1.3 * math.sin(t), 4.0],
            [1.3 * math.sin(t), 1.3 * math.cos(t), -7.0],
            [0, 0, 1],
        ]
    )
    section = rng.uniform(0, 100, size=(2, 2))
    np.testing.assert_allclose(landmark_matrix(section, _apply(truth, section)), truth, atol=1e-9)
    shear = truth.copy()
    shear[0, 1] += 0.4
    section = rng.uniform(0, 100, size=(5, 2))
    np.testing.assert_allclose(landmark_matrix(section, _apply(shear, section)), shear, atol=1e-9)


def test_landmark_errors():
    with pytest.raises(InputError, match="3 section and 2 plate points"):
        landmark_matrix(np.zeros((3, 2)), np.zeros((2, 2)))
    with pytest.raises(InputError, match="at least 2 pairs"):
        landmark_matrix(np.zeros((1, 2)), np.zeros((1, 2)))
    line = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    with pytest.raises(InputError, match="do not define a map"):
        landmark_matrix(line, line * 2)


def _blob(shape, centre, radii):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inside = ((yy - centre[0]) / radii[0]) ** 2 + ((xx - centre[1]) / radii[1]) ** 2 < 1
    image = inside.astype(np.float32) * (0.5 + 0.5 * (xx > centre[1]))  # a brighter right half
    return image


def test_nudge_puts_centres_and_extents_together_and_turns_the_plate():
    plate = _blob((80, 100), (40, 50), (20, 30))
    section = _blob((200, 200), (90, 110), (40, 60))  # the same shape, twice as large, elsewhere
    m = nudge_matrix(section, plate)
    np.testing.assert_allclose(_apply(m, [[90.0, 110.0]]), [[40.0, 50.0]], atol=0.6)
    np.testing.assert_allclose(np.linalg.det(m[:2, :2]), 0.25, rtol=0.05)  # (1/2)^2: section twice as large
    # the plate turned 90 degrees counter-clockwise on screen: its downward direction now points
    # right, so a step right on the section is a step down on the plate
    turned = nudge_matrix(section, plate, rotation=90.0, scale=2.0)
    step = _apply(turned, [[90.0, 120.0]]) - _apply(turned, [[90.0, 110.0]])
    np.testing.assert_allclose(step, [[2.5, 0.0]], atol=0.2)  # 10 px / (2 section px per plate px * 2)


def test_nudge_matches_a_plate_rotated_by_scipy():
    """Independent check: a section made by turning the plate with scipy is put back by the nudge."""
    plate = _blob((101, 101), (50, 50), (25, 40))
    section = ndi.rotate(plate, 30.0, reshape=False, order=1)  # scipy: counter-clockwise on screen
    m = nudge_matrix(section, plate, rotation=30.0)  # the plate turned the same way lies on it
    yy, xx = np.mgrid[:101, :101]
    pts = np.c_[yy.ravel(), xx.ravel()].astype(float)
    back = ndi.map_coordinates(plate, _apply(m, pts).T, order=1).reshape(plate.shape)
    inside = ndi.binary_erosion(section > 0.2, iterations=3)
    assert np.mean(np.abs(back[inside] - section[inside])) < 0.08


def test_start_matrix_is_none_without_corrections_and_landmarks_win():
    plate = _blob((60, 60), (30, 30), (15, 20))
    assert start_matrix(plate, plate) is None
    pts = np.array([[10.0, 10.0], [40.0, 20.0], [20.0, 50.0]])
    m = start_matrix(plate, plate, rotation=40.0, scale=2.0, section_points=pts, plate_points=pts + 3)
    np.testing.assert_allclose(m[:2, 2], [3.0, 3.0], atol=1e-9)
    with pytest.raises(InputError, match="scale positive"):
        start_matrix(plate, plate, rotation=5.0, scale=float("nan"))
