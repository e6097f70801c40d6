"""Re-stained slide pairs: the stains change, the nuclei stay, and the known transform is exact."""

import numpy as np
import pytest
from scipy import ndimage
from skimage import data
from skimage.color import rgb2gray, rgb2hed

from napari_nephi import InputError
from napari_nephi.engines.histology.stain import tissue_mask
from napari_nephi.synthetic.histology import restain, rigid_matrix, slide_pair


@pytest.fixture(scope="module")
def ihc():
    return data.immunohistochemistry()


def _corr(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_restain_hdab_keeps_nuclei_changes_grey(ihc, seed):
    out = restain(ihc, "hdab", seed=seed, dab_fraction=0.3)
    assert out.dtype == np.uint8 and out.shape == ihc.shape
    tissue = tissue_mask(ihc)
    h0, h1 = rgb2hed(ihc)[..., 0][tissue], rgb2hed(out)[..., 0][tissue]
    # the haematoxylin (nuclei) survives the re-staining; the grey image does not
    assert _corr(h0, h1) > 0.9
    assert _corr(rgb2gray(ihc)[tissue], rgb2gray(out)[tissue]) < 0.6
    dab = rgb2hed(out)[..., 2][tissue]
    stained = float((dab > 0.5 * dab.max()).mean())
    assert 0.05 < stained < 0.5  # DAB in regions covering about dab_fraction of the tissue


def test_restain_he_has_eosin_and_no_dab(ihc):
    out = restain(ihc, "he", seed=4)
    tissue = tissue_mask(ihc)
    hed = rgb2hed(out)
    assert np.median(hed[..., 1][tissue]) > 0.02  # eosin-like counterstain on the tissue
    assert np.percentile(hed[..., 2][tissue], 99) < 0.02 < np.percentile(rgb2hed(ihc)[..., 2][tissue], 50)
    assert _corr(rgb2hed(ihc)[..., 0][tissue], hed[..., 0][tissue]) > 0.9


def test_restain_keeps_white_background_and_input(ihc):
    padded = np.pad(ihc, ((40, 40), (40, 40), (0, 0)), constant_values=255)
    before = padded.copy()
    out = restain(padded, "hdab", seed=0)
    np.testing.assert_array_equal(padded, before)
    assert out[:30].min() >= 250 and out[:, -30:].min() >= 250
    np.testing.assert_array_equal(out, restain(padded, "hdab", seed=0))  # same seed, same slide


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rotation": 0.0},
        {"rotation": 123.0, "shift": (10, -25)},
        {"rotation": 250.0, "flip": True, "scale": 1.2},
        {"rotation": 30.0, "warp": 6.0, "overlap": 0.7, "scale": 0.9},
    ],
)
def test_slide_pair_truth_maps_fixed_onto_moving(ihc, kwargs):
    small = ihc[::2, ::2]
    pair = slide_pair(small, seed=5, **kwargs)
    assert pair.fixed.shape == small.shape and pair.moving.dtype == np.uint8
    det = np.linalg.det(pair.rigid[:2, :2])
    scale = kwargs.get("scale", 1.0)
    assert det == pytest.approx((-1 if kwargs.get("flip") else 1) * scale**2, rel=1e-9)
    # the moving colour at transform(x) is the re-stained fixed colour at x (same seed)
    stained = restain(small, "hdab", seed=5).astype(float)
    ys, xs = np.nonzero(ndimage.binary_erosion(pair.tissue, iterations=3))
    pts = np.stack([ys, xs], 1)[::7].astype(float)
    mapped = pair.transform.map_points(pts)
    got = np.stack(
        [ndimage.map_coordinates(pair.moving[..., c].astype(float), mapped.T, order=1) for c in range(3)], 1
    )
    want = stained[ys[::7], xs[::7]]
    assert np.median(np.abs(got - want)) < 6.0  # interpolation only (out of 255)
    # outside the slide the canvas is white
    corner = pair.moving[:3, :3]
    if kwargs.get("rotation", 0.0) % 90:
        assert corner.min() == 255


def test_slide_pair_overlap_cuts_tissue(ihc):
    full = slide_pair(ihc[::2, ::2], seed=1)
    part = slide_pair(ihc[::2, ::2], seed=1, overlap=0.6)
    assert part.tissue.sum() == pytest.approx(0.6 * full.tissue.sum(), rel=0.15)
    assert part.moving.size < full.moving.size


def test_rigid_matrix_rotates_counter_clockwise_as_displayed():
    m = rigid_matrix(90.0, False, 1.0, (0, 0), (0, 0))
    # (y, x) = (0, 1), a point to the right, goes up on screen (y = -1)
    np.testing.assert_allclose(m[:2, :2] @ [0, 1], [-1, 0], atol=1e-12)
    f = rigid_matrix(0.0, True, 2.0, (1, 1), (5, 5))
    np.testing.assert_allclose(f @ [1, 2, 1], [5, 3, 1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"overlap": 0.1}, "overlap"),
        ({"shift": (1, 2, 3)}, "shift"),
        ({"scale": 0.0}, "scale"),
        ({"rotation": float("nan")}, "rotation"),
        ({"restain_to": "pas"}, "restain_to"),
        ({"warp": 500.0}, "warp"),
    ],
)
def test_slide_pair_bad_options(ihc, kwargs, match):
    with pytest.raises(InputError, match=match):
        slide_pair(ihc[::4, ::4], **kwargs)


def test_restain_bad_input(ihc):
    with pytest.raises(InputError, match="RGB slide"):
        restain(ihc[..., 0])
    with pytest.raises(InputError, match="target"):
        restain(ihc, "pas")
    bad = ihc.astype(float)
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        restain(bad)
