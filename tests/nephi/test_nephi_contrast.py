"""A monotone non-linear contrast change (a gamma) between the images: the ``nephi`` engine maps the
moving image's intensities onto the fixed image's by their quantiles before its stages (NCC assumes
a linear relation), leaves linearly related pairs as they are, and warps the moving image as given."""

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage import data, transform

import napari_nephi as nn
from napari_nephi.core.registration import Pair
from napari_nephi.engines.nephi import contrast


def _retina(size):
    img = transform.resize(data.retina()[..., 1].astype(np.float32) / 255, (size, size), anti_aliasing=True)
    return img.astype(np.float32)


def _pair(fixed, moving):
    return Pair(fixed, moving, (1.0, 1.0), None, None, None, "cpu", [])


def _gamma(img, g):
    lo, hi = float(img.min()), float(img.max())
    return (((img - lo) / (hi - lo)) ** g).astype(np.float32)


def test_quantile_map_is_linear_for_a_linear_change_and_not_for_a_gamma():
    fixed = _retina(128)
    moving = ndi.shift(fixed, (2.5, -1.5), order=1, mode="nearest").astype(np.float32)
    linear = 3 * moving + 0.5
    assert contrast.nonlinearity(*contrast.quantile_map(fixed, linear)) < contrast.NONLINEAR
    same = _pair(fixed, linear)
    assert contrast.prepare(same, "auto") == (same, pytest.approx(0.0, abs=contrast.NONLINEAR), False)
    bent = _gamma(moving, 2.0)
    nonlin = contrast.nonlinearity(*contrast.quantile_map(fixed, bent))
    assert nonlin > 2 * contrast.NONLINEAR
    copy = bent.copy()
    matched = contrast.match_to(bent, fixed)
    assert np.array_equal(bent, copy)  # input unchanged
    # matched back: within 2 % of the range of the moving image before the gamma (resampling aside)
    assert np.abs(matched - moving).mean() < 0.02 * float(np.ptp(moving))
    assert np.abs(bent - moving).mean() > 0.05 * float(np.ptp(moving))
    assert contrast.prepare(_pair(fixed, bent), False) == (_pair(fixed, bent), None, False)


def test_gamma_changed_shift_is_recovered_and_the_moving_image_warped_as_given():
    """The retina at 64 px shifted by (2.5, -1.5) px, the moving image at gamma 2: mean endpoint error
    8 px inside the border 0.084 px with contrast_match="auto", 2.06 px with False (measured)."""
    fixed = _retina(64)
    moving = _gamma(ndi.shift(fixed, (2.5, -1.5), order=1, mode="nearest").astype(np.float32), 2.0)
    reg = nn.register(fixed, moving, method="nephi", device="cpu", contrast_match="auto")
    assert reg.settings["contrast_match"] is True
    assert reg.metrics["contrast_nonlinearity"] > contrast.NONLINEAR
    assert any("histogram matching" in n for n in reg.metrics["notes"])
    u = reg.transform.displacement(fixed.shape)[:, 8:-8, 8:-8]
    assert np.hypot(u[0] - 2.5, u[1] + 1.5).mean() < 0.25
    # the result warps the moving image as given (its gamma kept), not the matched copy
    inner = (slice(8, -8), slice(8, -8))
    assert (
        np.abs(reg.warped[inner] - _gamma(fixed, 2.0)[inner]).mean()
        < np.abs(reg.warped[inner] - fixed[inner]).mean()
    )


def test_contrast_match_option_is_validated():
    img = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    with pytest.raises(nn.InputError, match="contrast_match must be 'auto', True or False"):
        nn.register(img, img, method="nephi", contrast_match="always")
