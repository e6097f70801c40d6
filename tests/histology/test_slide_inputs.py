"""The engine's inputs: tissue masks given at any size are resized by nearest neighbour without being
read whole; each slide's polarity is judged once, on the whole slide, and kept for its tiles."""

from __future__ import annotations

import tracemalloc

import cv2
import dask.array as da
import numpy as np
import pytest

from napari_nephi.core.errors import InputError
from napari_nephi.engines.histology.slide_inputs import Channel, resize_mask


@pytest.mark.parametrize(
    ("src", "dst"), [((1000, 777), (256, 199)), ((64, 50), (300, 211)), ((513, 2), (7, 9))]
)
def test_resize_mask_equals_opencv_nearest(src, dst):
    mask = np.random.default_rng(sum(src)).random(src) > 0.6
    want = cv2.resize(mask.astype(np.uint8), dst[::-1], interpolation=cv2.INTER_NEAREST) > 0

    np.testing.assert_array_equal(resize_mask(mask, dst), want)
    np.testing.assert_array_equal(resize_mask(da.from_array(mask, chunks=97), dst), want)
    fractional = np.where(mask, 0.9, 0.4)  # as before: a value below 1 is no tissue (uint8 cast)
    assert not resize_mask(fractional, dst).any()


def test_a_large_lazy_mask_is_read_chunk_by_chunk():
    big = da.ones((6000, 6000), dtype=bool, chunks=1000)  # 34 MiB if computed whole
    big = big & (da.arange(6000)[:, None] < 3000)  # the top half is tissue

    tracemalloc.start()
    try:
        small = resize_mask(big, (300, 300))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MiB"
    assert small[:150].all() and not small[150:].any()


def test_a_mask_that_is_not_2d_is_refused():
    with pytest.raises(InputError, match="must be 2D"):
        resize_mask(np.ones((4, 4, 3), bool), (2, 2))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_tiles_of_a_dark_background_slide_keep_its_polarity():
    """A DAPI-like grey slide (nuclei bright on black) against brightfield H&E: a tile that reaches
    beyond the slide (filled white, as the engine reads it) must not be taken for brightfield."""
    from skimage import data
    from skimage.color import rgb2hed

    he = data.immunohistochemistry()
    h = rgb2hed(he)[..., 0]
    dapi = np.round(255 * (h - h.min()) / np.ptp(h)).astype(np.uint8)
    _, whole, settled = Channel("hematoxylin").settle(he, dapi)
    assert settled.kind == "hematoxylin" and settled.brightfield == (True, False)

    edge = np.pad(dapi[:200, :200], ((60, 0), (60, 0)), constant_values=255)[:200, :200]
    inner = dapi[150:350, 150:350]
    for tile, truth in ((edge[60:, 60:], whole[:140, :140]), (inner, whole[150:350, 150:350])):
        assert _corr(settled.one(tile, "moving"), truth) > 0.95
    assert _corr(settled.one(edge, "moving")[60:, 60:], whole[:140, :140]) > 0.95
    # judged from the tile alone, the white fill makes it look brightfield: inverted
    assert _corr(Channel("hematoxylin").one(edge)[60:, 60:], whole[:140, :140]) < -0.5
    # the brightfield slide's tiles are its haematoxylin whatever the tile
    fixed_tile = settled.one(he[150:350, 150:350], "fixed")
    assert _corr(fixed_tile, rgb2hed(he[150:350, 150:350])[..., 0]) > 0.99
