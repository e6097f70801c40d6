"""Registering a chosen plate onto a section and carrying its labels (AtlasLookup.register)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_nephi import InputError, Registration
from napari_nephi.core.transform import AffineTransform
from napari_nephi.synthetic.atlas import section_from_atlas

#: Share of the best Dice a 2D map can reach on an oblique section (the plate's labels read at the
#: true in-plane position of every section pixel) that the carried labels must reach.
ORACLE_SHARE = 0.85
#: Fast settings of the deformable step for tests.
NEPHI_FAST = {"iterations": 50, "coarse_iterations": 50}


def mean_dice(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean Dice over the non-zero labels of ``truth``."""
    scores = []
    for v in np.unique(truth):
        if v == 0:
            continue
        a, b = found == v, truth == v
        scores.append(2.0 * np.sum(a & b) / (a.sum() + b.sum()))
    return float(np.mean(scores))


def oracle_dice(coords: np.ndarray, plate_labels: np.ndarray, truth: np.ndarray) -> float:
    """Dice of the plate's labels read at each section pixel's true in-plane (y, x) atlas position."""
    h, w = plate_labels.shape
    yy = np.clip(np.round(coords[1]).astype(int), 0, h - 1)
    xx = np.clip(np.round(coords[2]).astype(int), 0, w - 1)
    return mean_dice(plate_labels[yy, xx], truth)


def unregistered(plate_labels: np.ndarray, shape, zoom: float = 1.0) -> np.ndarray:
    """The plate's labels placed on the section grid with centres aligned (no registration)."""
    fs, ms = np.asarray(shape, float), np.asarray(plate_labels.shape, float)
    mat = np.eye(3)
    mat[0, 0] = mat[1, 1] = 1.0 / zoom
    mat[:2, 2] = (ms - 1) / 2 - (fs - 1) / (2 * zoom)
    return AffineTransform(mat).warp_labels(plate_labels, tuple(shape))


@pytest.fixture(scope="module")
def oblique_partial(toy_reference):
    reference, labels = toy_reference
    image, section_labels, coords = section_from_atlas(
        (reference, labels), 21.3, (5.0, -4.0), crop=(0.25, 0.0, 0.0, 0.0), return_coords=True
    )
    return image, section_labels, 21, oracle_dice(coords, labels[21], section_labels)


def test_affine_carries_labels_that_keep_their_values(trained_lookup, toy_reference, oblique_partial):
    _, labels = toy_reference
    image, truth, plate, best = oblique_partial
    reg = trained_lookup.register(image, plate, method="affine", device="cpu")
    assert isinstance(reg, Registration)
    carried = reg.metrics["labels"]
    assert carried.shape == image.shape and carried.dtype == labels.dtype
    assert set(np.unique(carried)) <= set(np.unique(labels[plate]))
    dice = mean_dice(carried, truth)
    assert dice >= ORACLE_SHARE * best
    assert dice > mean_dice(unregistered(labels[plate], image.shape), truth) + 0.2
    assert reg.metrics["regions"] == {
        int(v): trained_lookup.region_name(v) for v in np.unique(carried) if v != 0
    }
    # the transform maps section pixels to plate pixels: it reproduces warped and labels
    np.testing.assert_array_equal(reg.transform.warp_labels(labels[plate], image.shape), carried)
    np.testing.assert_allclose(
        reg.transform.warp(trained_lookup.plate_image(plate), image.shape), reg.warped, atol=1e-5
    )


def test_nephi_refines_the_affine_map(trained_lookup, toy_reference, oblique_partial):
    _, labels = toy_reference
    image, truth, plate, best = oblique_partial
    affine = trained_lookup.register(image, plate, method="affine", device="cpu")
    reg = trained_lookup.register(image, plate, method="nephi", device="cpu", **NEPHI_FAST)
    dice = mean_dice(reg.metrics["labels"], truth)
    assert dice >= ORACLE_SHARE * best
    assert dice >= mean_dice(affine.metrics["labels"], truth) - 0.02
    assert set(np.unique(reg.metrics["labels"])) <= set(np.unique(labels[plate]))
    assert "nephi" in reg.metrics and reg.settings["method"] == "nephi"


def test_brightfield_section_at_another_scale(trained_lookup, toy_reference, oblique_partial):
    _, labels = toy_reference
    image, truth, plate, best = oblique_partial
    # twice the resolution, dark tissue on a bright background (brightfield-like)
    big = ndi.zoom(image, 2.0, order=1)
    big_truth = ndi.zoom(truth, 2.0, order=0)
    bright = 1.0 - big
    reg = trained_lookup.register(bright, plate, method="affine", device="cpu")
    assert reg.metrics["plate_scale"] == pytest.approx(2.0, rel=0.15)
    dice = mean_dice(reg.metrics["labels"], big_truth)
    assert dice >= ORACLE_SHARE * best
    assert dice > mean_dice(unregistered(labels[plate], big.shape, zoom=2.0), big_truth) + 0.2


def test_large_section_is_registered_on_a_downsampled_grid(trained_lookup, toy_reference):
    reference, labels = toy_reference
    image, truth, coords = section_from_atlas((reference, labels), 15, 3.0, return_coords=True)
    big = np.kron(image, np.ones((10, 10), np.float32))  # 640 x 640 > the 512 working grid
    big_truth = np.kron(truth, np.ones((10, 10), truth.dtype))
    reg = trained_lookup.register(big, 15, method="affine", device="cpu")
    assert reg.metrics["labels"].shape == big.shape
    assert reg.metrics["work_zoom"][0] > 1
    best = oracle_dice(coords, labels[15], truth)
    assert mean_dice(reg.metrics["labels"], big_truth) >= ORACLE_SHARE * best


@pytest.mark.parametrize(
    "section, plate, kwargs, match",
    [
        (np.zeros((64, 64), np.float32), 3, {}, "constant"),
        (np.full((64, 64), np.nan, np.float32), 3, {}, "NaN"),
        ("ok", 40, {}, "out of range"),
        ("ok", 3, {"method": "nonsense"}, "Unknown method"),
        ("ok", 3, {"method": "affine", "kindd": "rigid"}, "did you mean 'kind'"),
    ],
)
def test_bad_registration_input(trained_lookup, toy_reference, section, plate, kwargs, match):
    if isinstance(section, str):
        section = section_from_atlas(toy_reference[0], 10)
    with pytest.raises(InputError, match=match):
        trained_lookup.register(section, plate, device="cpu", **kwargs)
