"""Stain-robust preprocessing: tissue masks without background, pen or debris; comparable channels."""

import numpy as np
import pytest
from skimage import data
from skimage.color import hed2rgb, rgb2gray, rgb2hed
from skimage.draw import disk

from napari_nephi import InputError
from napari_nephi.engines.histology.stain import (
    choose_stain_channels,
    is_brightfield,
    stain_channel,
    tissue_mask,
)
from napari_nephi.synthetic.histology import restain

PAD = 60


@pytest.fixture(scope="module")
def ihc():
    return data.immunohistochemistry()


@pytest.fixture(scope="module")
def marked_slide(ihc):
    """The IHC slide on white glass, with a blue pen stripe across glass and tissue, and dust dots."""
    img = np.pad(ihc, ((PAD, PAD), (PAD, PAD), (0, 0)), constant_values=255)
    rng = np.random.default_rng(0)
    ink = np.zeros(img.shape[:2], bool)
    ink[20:34, :] = True  # on the glass
    ink[300:312, 100:400] = True  # over the tissue
    img[ink] = np.clip(np.array([35, 70, 185]) + rng.normal(0, 6, (ink.sum(), 3)), 0, 255).astype(np.uint8)
    dots = np.zeros(img.shape[:2], bool)
    for centre in [(45, 150), (600, 30), (100, 600), (610, 500), (40, 45)]:
        dots[disk(centre, 3, shape=dots.shape)] = True
    img[dots] = (70, 55, 60)
    return img, ink, dots


def _corr(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_tissue_mask_excludes_glass_pen_and_debris(marked_slide):
    img, ink, dots = marked_slide
    before = img.copy()
    mask = tissue_mask(img)
    np.testing.assert_array_equal(img, before)
    assert mask.dtype == bool and mask.shape == img.shape[:2]
    glass = np.ones(mask.shape, bool)
    glass[PAD:-PAD, PAD:-PAD] = False
    assert mask[glass & ~ink & ~dots].mean() < 0.01  # white background
    assert mask[ink].mean() < 0.05  # pen, on glass and on tissue
    assert not mask[dots].any()  # dust
    # every clearly stained tissue pixel (grey below 0.8, an independent threshold) is kept
    tissue = np.zeros(mask.shape, bool)
    tissue[PAD:-PAD, PAD:-PAD] = True
    dark = tissue & ~ink & (rgb2gray(img) < 0.8)
    assert mask[dark].mean() > 0.97
    assert mask[tissue & ~ink].mean() > 0.75


def test_tissue_mask_of_grey_slides_either_polarity(marked_slide, ihc):
    img = np.pad(ihc, ((PAD, PAD), (PAD, PAD), (0, 0)), constant_values=255)
    rgb_mask = tissue_mask(img)
    grey = rgb2gray(img)
    bright = tissue_mask(grey)
    dark = tissue_mask(1.0 - grey)  # dark background (fluorescence-like): polarity from the border
    assert (rgb_mask & bright).sum() / (rgb_mask | bright).sum() > 0.95
    # dark background: Otsu on the signal keeps the brighter (denser) tissue, never the glass
    assert (dark & rgb_mask).sum() / dark.sum() > 0.97 and (dark & rgb_mask).sum() / rgb_mask.sum() > 0.6
    assert not dark[:PAD].any()
    assert is_brightfield(grey) and not is_brightfield(1.0 - grey) and is_brightfield(img)


def test_tissue_mask_blank_and_min_area(ihc):
    assert not tissue_mask(np.full((64, 64, 3), 247, np.uint8)).any()
    img = np.full((200, 200, 3), 250, np.uint8)
    rr, cc = disk((100, 100), 12)
    img[rr, cc] = (120, 60, 140)  # 450 px: 1.1 % of the image
    assert tissue_mask(img, min_area_fraction=0.005)[100, 100]
    assert not tissue_mask(img, min_area_fraction=0.02).any()
    with pytest.raises(InputError, match="min_area_fraction"):
        tissue_mask(img, min_area_fraction=-1)


def test_stain_channels_of_he_and_hdab_versions_correlate(ihc):
    he = restain(ihc, "he", seed=1)
    hdab = restain(ihc, "hdab", seed=2)
    a, kind_a = stain_channel(he)
    b, kind_b = stain_channel(hdab)
    assert kind_a == kind_b == "hematoxylin"
    assert a.dtype == np.float32 and 0.0 <= a.min() and a.max() <= 1.0
    tissue = tissue_mask(ihc)
    # the haematoxylin channels agree; the grey images of the two stains much less
    assert _corr(a[tissue], b[tissue]) > 0.9
    assert _corr(rgb2gray(he)[tissue], rgb2gray(hdab)[tissue]) < 0.8
    # the channel is colour deconvolution's haematoxylin, rescaled (independent computation)
    assert _corr(a, np.clip(rgb2hed(he)[..., 0], 0, np.percentile(rgb2hed(he)[..., 0], 99.5))) > 0.99


def test_od_and_grey_kinds(ihc):
    img = np.pad(ihc, ((PAD, PAD), (PAD, PAD), (0, 0)), constant_values=255)
    od, kind = stain_channel(img, "od")
    assert kind == "od"
    independent = -np.log10((img.astype(float) + 1) / 256).sum(-1)
    assert _corr(od, independent) > 0.98
    grey, kind = stain_channel(img, "grey")
    assert kind == "grey" and _corr(grey, 1 - rgb2gray(img)) > 0.98
    for chan in (od, grey):
        assert np.median(chan[:PAD, :]) < 0.05  # background near 0
        assert np.median(chan[PAD:-PAD, PAD:-PAD]) > 0.15  # tissue high
    g, kind = stain_channel(rgb2gray(img), "hematoxylin")
    assert kind == "grey" and _corr(g, 1 - rgb2gray(img)) > 0.98
    with pytest.raises(InputError, match="kind"):
        stain_channel(img, "eosin")


def test_choose_stain_channels(ihc):
    he, hdab = restain(ihc, "he", seed=0), restain(ihc, "hdab", seed=0)
    f, m, kind = choose_stain_channels(he, hdab)
    assert kind == "hematoxylin" and f.shape == m.shape == ihc.shape[:2]
    dab_only = (
        hed2rgb(np.stack([np.zeros(ihc.shape[:2]), np.zeros(ihc.shape[:2]), rgb2hed(ihc)[..., 2]], -1)) * 255
    )
    _, _, kind = choose_stain_channels(he, dab_only.astype(np.uint8))
    assert kind == "od"  # no haematoxylin in one of them
    _, _, kind = choose_stain_channels(rgb2gray(he), hdab)
    assert kind == "grey"  # a brightfield grey slide against RGB


def test_fluorescence_against_brightfield_says_which_channel(ihc):
    hdab = restain(ihc, "hdab", seed=0)
    dapi = stain_channel(ihc, "hematoxylin")[0]  # nuclei bright on a dark background
    with pytest.raises(InputError, match=r"dark-background \(fluorescence\).*channel="):
        choose_stain_channels(dapi, hdab)
    f, m, kind = choose_stain_channels(dapi, hdab, kind="hematoxylin")
    assert kind == "hematoxylin"
    assert _corr(f, m) > 0.9
    with pytest.raises(InputError, match=r"multi-channel.*channel=0"):
        choose_stain_channels(np.zeros((64, 64, 2)), hdab)
    with pytest.raises(InputError, match=r"multi-channel"):
        choose_stain_channels(hdab, np.zeros((64, 64, 6), np.uint16))


def test_bad_images(ihc):
    nan = ihc.astype(float)
    nan[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        tissue_mask(nan)
    with pytest.raises(InputError, match="2D slide"):
        stain_channel(np.zeros((4, 8, 8, 3)))
    with pytest.raises(InputError, match="too small"):
        stain_channel(np.zeros((4, 4, 3)))
    with pytest.raises(InputError, match="numeric"):
        tissue_mask(np.array([["a"] * 10] * 10))
