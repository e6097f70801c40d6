"""Preprocessing of plates and sections: grey, tissue mask, crop, polarity, size, bad input."""

from __future__ import annotations

import time

import numpy as np
import pytest
from skimage.color import rgb2gray
from skimage.draw import ellipse
from skimage.exposure import equalize_adapthist

from napari_nephi.core.errors import InputError
from napari_nephi.engines.atlas.preprocess import clahe, prepare_batch, prepare_input, tissue_mask, to_grey
from napari_nephi.synthetic.atlas import toy_atlas


@pytest.fixture(scope="module")
def plate() -> np.ndarray:
    """A textured brain-like plate (float32 in [0, 1], black background)."""
    reference, _ = toy_atlas((24, 96, 112), seed=1)
    return reference[12]


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _scene(shape, centre, radii, value=1.0) -> np.ndarray:
    img = np.zeros(shape, dtype=np.float32)
    rr, cc = ellipse(*centre, *radii, shape=shape)
    img[rr, cc] = value
    return img


def test_to_grey_any_range_and_rgb():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 4096, size=(40, 50, 3)).astype(np.uint16)
    before = rgb.copy()
    grey = to_grey(rgb)
    np.testing.assert_array_equal(rgb, before)  # input not modified
    lum = rgb2gray(rgb.astype(np.float64))
    lo, hi = np.percentile(lum, [0.5, 99.5])
    expected = np.clip((lum - lo) / (hi - lo), 0, 1)
    assert grey.dtype == np.float32 and grey.shape == (40, 50)
    np.testing.assert_allclose(grey, expected, atol=1e-4)
    # RGBA: alpha ignored; an affine change of range changes nothing
    rgba = np.concatenate([rgb, np.full((40, 50, 1), 7, np.uint16)], axis=-1)
    np.testing.assert_allclose(to_grey(rgba), grey, atol=1e-6)
    np.testing.assert_allclose(to_grey(rgb.astype(np.float64) * 3 - 100), grey, atol=1e-4)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.full((20, 20), 3.0), "constant"),
        (np.where(np.eye(20) > 0, np.nan, 1.0), "contains NaN"),
        (np.where(np.eye(20) > 0, np.inf, 1.0), "contains NaN or infinite"),
        (np.zeros((0, 0)), "is empty"),
        (np.zeros((5, 20, 20)), r"2D image \(y, x\) or RGB"),
        (np.zeros((4, 30)), "too small"),
        (np.array([["a", "b"]]), "real numbers"),
    ],
)
def test_bad_images_raise(image, message):
    with pytest.raises(InputError, match=message):
        to_grey(image)
    with pytest.raises(InputError, match=message):
        prepare_input(image)


def test_no_tissue_raises():
    img = np.zeros((200, 200), np.float32)
    img[100, 100] = 1.0  # a hot pixel is not a section
    with pytest.raises(InputError, match="has no tissue"):
        prepare_input(img)


def test_tissue_mask_either_polarity():
    truth = _scene((120, 160), (60, 70), (40, 55)) > 0
    img = np.where(truth, 0.8, 0.05).astype(np.float32)
    img[(slice(55, 65), slice(65, 75))] = 0.05  # a dark hole inside the tissue
    img[5:8, 150:153] = 0.8  # a speck of dust, far smaller than the tissue
    rng = np.random.default_rng(0)
    noisy = np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1).astype(np.float32)
    for grey in (noisy, 1.0 - noisy):  # dark background, then bright (brightfield)
        mask = tissue_mask(grey)
        iou = (mask & truth).sum() / (mask | truth).sum()
        assert iou > 0.95
        assert mask[60, 70]  # hole filled
        assert not mask[6, 151]  # dust removed
    assert not tissue_mask(np.full((30, 30), 0.4, np.float32)).any()


def test_clahe_agrees_with_skimage(plate):
    grey = to_grey(plate)
    for image in (grey, grey[10:80, 5:60], grey.T.copy()):
        ours = clahe(image, 0.03)
        ref = equalize_adapthist(image, clip_limit=0.03)
        assert ours.dtype == np.float32 and ours.shape == image.shape
        assert _corr(ours, ref) > 0.97
        assert np.abs(ours - ref).mean() < 0.08


def test_fill_holes_matches_scipy():
    from scipy import ndimage as ndi

    from napari_nephi.engines.atlas.preprocess import _fill_holes

    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = ndi.gaussian_filter(rng.random((40, 50)), 1.5) > rng.uniform(0.45, 0.55)
        np.testing.assert_array_equal(_fill_holes(mask), ndi.binary_fill_holes(mask))


def test_faint_tissue_open_to_a_cut_edge_is_tissue():
    # a partial section: a bright rim around faint tissue (white matter), cut straight through it
    shape = (160, 200)
    truth = _scene(shape, (100, 100), (70, 90)) > 0
    img = np.where(truth, 0.8, 0.0).astype(np.float32)
    img[_scene(shape, (100, 100), (50, 70)) > 0] = 0.3
    truth[120:] = False
    img[120:] = 0.0
    rng = np.random.default_rng(1)
    noisy = np.clip(img + rng.normal(0, 0.04, shape), 0, 1).astype(np.float32)
    for grey in (noisy, 1.0 - noisy):
        mask = tissue_mask(grey)
        assert (mask & truth).sum() / (mask | truth).sum() > 0.9


def test_small_blob_fills_the_output():
    img = _scene((1000, 1400), (700, 300), (25, 40), value=0.7)
    out = prepare_input(img, 64)
    assert out.shape == (64, 64) and out.dtype == np.float32
    nonzero = out > 0.05
    # an ellipse 80 x 50 in a square of side 80 plus margins: about pi/4 * 50/80 of the square
    expected = np.pi / 4 * 50 / 80
    assert nonzero.mean() == pytest.approx(expected, rel=0.2)
    cols = np.flatnonzero(nonzero.any(axis=0))
    assert cols[-1] - cols[0] >= 0.85 * 64  # the longer axis spans the output
    centre = np.argwhere(nonzero).mean(axis=0)
    np.testing.assert_allclose(centre, 31.5, atol=2)  # centred


def test_dark_tissue_behind_a_tear_is_kept():
    # bright tissue around a dark region (white matter, a ventricle), a thin tear joins it to the outside
    whole = _scene((300, 400), (150, 200), (120, 170), value=0.8)
    whole[_scene((300, 400), (150, 200), (40, 60)) > 0] = 0.15
    torn = whole.copy()
    torn[148:151, 30:160] = 0.0  # 3 pixels wide, from the edge of the tissue into the dark region
    a, b = prepare_input(whole), prepare_input(torn)
    inner = _scene((128, 128), (64, 64), (10, 16)) > 0  # the middle of the dark region in the output
    assert b[inner].mean() == pytest.approx(a[inner].mean(), abs=0.03)
    assert _corr(a, b) > 0.95


def test_inverted_brightfield_looks_alike(plate):
    dark = prepare_input(plate)
    # brightfield: white background, dark tissue, other gain and offset, 8-bit, a little noise
    rng = np.random.default_rng(0)
    bright = np.clip(250 - 180 * plate + rng.normal(0, 2, plate.shape), 0, 255).astype(np.uint8)
    light = prepare_input(bright)
    assert dark[dark > 0].mean() > 0.2 and light[64, 64] > 0  # tissue bright in both, not inverted
    assert _corr(dark, light) > 0.9
    assert light[:3].max() < 0.05 and light[-3:].max() < 0.05  # background set to black


def test_rgb_and_grey_agree(plate):
    tint = np.array([0.55, 0.25, 0.75], np.float32)  # a purple Nissl stain on white
    rgb = (255 * (1.0 - plate[..., None] * tint)).astype(np.uint8)
    grey = rgb2gray(rgb)
    a, b = prepare_input(rgb), prepare_input(grey)
    assert _corr(a, b) > 0.99
    np.testing.assert_allclose(a, b, atol=0.05)


def test_large_input_is_downsampled_fast():
    shape = (6000, 6000)
    big = np.zeros(shape, np.uint8)
    rr, cc = ellipse(3000, 2500, 1500, 2200, shape=shape)
    big[rr, cc] = 180
    rr, cc = ellipse(2600, 2500, 400, 500, shape=shape)
    big[rr, cc] = 90
    small = np.zeros((600, 600), np.uint8)
    small[ellipse(300, 250, 150, 220, shape=small.shape)] = 180
    small[ellipse(260, 250, 40, 50, shape=small.shape)] = 90
    start = time.perf_counter()
    out = prepare_input(big)
    seconds = time.perf_counter() - start
    assert out.shape == (128, 128)
    assert seconds < 10  # measured well under a second; the bound only catches full-size work
    assert _corr(out, prepare_input(small)) > 0.95


class _Lazy:
    """An array-like that is not in memory (as zarr or h5py): records the largest block read."""

    def __init__(self, data: np.ndarray) -> None:
        self._data, self.shape, self.dtype, self.largest = data, data.shape, data.dtype, 0

    def __getitem__(self, key):
        block = self._data[key]
        self.largest = max(self.largest, block.size)
        return block


def test_lazy_input_is_read_in_strips(monkeypatch):
    from napari_nephi.engines.atlas import preprocess

    monkeypatch.setattr(preprocess, "STRIP_BYTES", 8 << 20)
    shape = (5000, 3000, 3)
    big = np.full(shape, 245, np.uint8)  # brightfield: white slide, dark tissue
    rr, cc = ellipse(2600, 1500, 1900, 1300, shape=shape[:2])
    big[rr, cc] = (90, 40, 120)
    rr, cc = ellipse(2200, 1500, 500, 400, shape=shape[:2])
    big[rr, cc] = (170, 150, 190)
    lazy = _Lazy(big)
    out = prepare_input(lazy)
    assert 4 * lazy.largest <= 8 << 20  # never loaded whole: strips of at most 8 MB as float32
    assert _corr(out, prepare_input(big)) > 0.98
    with pytest.raises(InputError, match="contains NaN"):
        prepare_input(_Lazy(np.full((3000, 3000), np.nan, np.float32)))
    with pytest.raises(InputError, match="real numbers"):
        prepare_input(_Lazy(np.zeros((3000, 3000), dtype=np.complex64)))


def test_downsample_is_a_block_mean():
    from skimage.measure import block_reduce

    from napari_nephi.engines.atlas.preprocess import downsample

    rng = np.random.default_rng(0)
    image = rng.random((1003, 701, 3)).astype(np.float32)
    expected = block_reduce(image[:1000, :700], (5, 5, 1), np.mean)  # factor 5: 1003 -> 200 rows
    np.testing.assert_allclose(downsample(image, 250), expected, atol=1e-5)
    np.testing.assert_allclose(downsample(_Lazy(image), 250), expected, atol=1e-5)
    small = image[:100, :90]
    assert np.shares_memory(downsample(small, 250), small)  # fits: returned as is, not copied
    with pytest.raises(InputError, match="contains NaN"):
        downsample(np.full((50, 50), np.nan), 20)


def test_prepare_batch_shapes_and_errors(plate):
    batch = prepare_batch([plate, plate[10:, 20:], np.dstack([plate] * 3)], size=48)
    assert tuple(batch.shape) == (3, 1, 48, 48) and str(batch.dtype) == "torch.float32"
    np.testing.assert_allclose(batch[0, 0].numpy(), batch[2, 0].numpy(), atol=1e-5)
    with pytest.raises(InputError, match="Wrap it in a list"):
        prepare_batch(np.dstack([plate] * 3))
    stack = np.stack([plate, plate[::-1]])
    lazy = prepare_batch(_Lazy(stack), size=48)  # a stack that is not in memory (dask, zarr)
    np.testing.assert_array_equal(lazy.numpy(), prepare_batch(list(stack), size=48).numpy())
    with pytest.raises(InputError, match="No images given"):
        prepare_batch([])
    with pytest.raises(InputError, match="size must be at least 16"):
        prepare_batch([plate], size=4)
