"""The fast preset's cheaper default: no neural steps after the coarse stage on large 2D images."""

import numpy as np
from scipy import ndimage as ndi

import napari_nephi as nn
from napari_nephi.engines.nephi.engine import NEURAL_2D_MIN_SIDE, PRESETS


def _pair(n: int):
    rng = np.random.default_rng(0)
    img = ndi.gaussian_filter(rng.random((n, n)), 2.0).astype(np.float32)
    return img, np.roll(img, 1, axis=0)


def test_large_2d_images_skip_the_neural_stage_after_the_coarse_one():
    fixed, moving = _pair(NEURAL_2D_MIN_SIDE)
    reg = nn.register(fixed, moving, method="nephi", device="cpu", coarse_iterations=6, initial="none")
    assert reg.settings["iterations"] == 0 and reg.metrics["iterations"] == 0
    assert reg.metrics["coarse_iterations"] > 0 and reg.metrics["ncc_after"] > reg.metrics["ncc_before"]
    assert reg.metrics["inverse_consistency_mean"] < 0.05  # exp(v) and exp(-v)


def test_small_images_keep_the_neural_steps():
    fixed, moving = _pair(32)
    tiny = dict(sample_points=64, reg_points=4, hidden=8, layers=1, n_frequencies=4, local_dim=0)
    reg = nn.register(
        fixed, moving, method="nephi", device="cpu", coarse_iterations=2, initial="none", **tiny
    )
    assert reg.settings["iterations"] == reg.metrics["iterations"] == PRESETS["fast"]["iterations"]
