"""Volumes in the coarse stage: the trilinear warp's smoothing matched (coarse.WARP_BLUR_3D, session 35)."""

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from napari_nephi.engines.nephi import coarse


def test_warp_blur_is_the_trilinear_smoothing_of_a_quadratic():
    """Linear interpolation of a quadratic at sub-voxel part ``f`` adds ``c f (1 - f)`` per axis (``c`` its
    second derivative over 2): the fixed quadratic blurred by :func:`coarse.interpolation_variance` at the
    warp's points equals the warped moving one inside (to float rounding), where unblurred they differ by
    up to 0.26."""
    shape = (9, 10, 11)
    t = (0.3, -0.6, 0.25)  # moving(x + t) = fixed(x): f = 0.3, 0.4, 0.25

    def quad(z, y, x):
        return 0.5 * z**2 + 0.2 * y**2 + 0.8 * x**2 + 0.3 * z - 0.1 * x

    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    fixed = torch.as_tensor(quad(z, y, x), dtype=torch.float32)[None, None]
    moving = torch.as_tensor(quad(z - t[0], y - t[1], x - t[2]), dtype=torch.float32)[None, None]
    coords = [z + t[0], y + t[1], x + t[2]]
    pts = np.stack([2 * c / (n - 1) - 1 for c, n in zip(coords, shape)][::-1], -1)  # grid_sample's x, y, z
    pts = torch.as_tensor(pts, dtype=torch.float32)[None]
    warped = F.grid_sample(moving, pts, mode="bilinear", align_corners=True)
    var = coarse.interpolation_variance(pts, shape)
    assert var.shape == (1, 3, *shape)
    np.testing.assert_allclose(var[0, :, 4, 4, 4].numpy(), [0.25 * 0.75, 0.4 * 0.6, 0.3 * 0.7], atol=1e-4)
    # outside the frame grid_sample (border padding) reads the edge voxel as it is: no smoothing (review B1)
    out = torch.tensor([[[[[1.3, -1.2, 0.9]]]]])  # x, y beyond the frame, z inside at a sub-voxel point
    np.testing.assert_allclose(
        coarse.interpolation_variance(out, shape)[0, :, 0, 0, 0].numpy(), [0, 0, 0.24], atol=1e-4
    )
    inner = (0, 0, slice(1, -1), slice(1, -1), slice(1, -1))
    blurred = coarse.blur_by_variance(fixed, var)
    assert float((warped - fixed)[inner].abs().max()) > 0.25
    assert float((warped - blurred)[inner].abs().max()) < 2e-3


def _coarse_only(fixed, moving, **options):
    """NePhi's coarse stage alone (no global stage, no neural steps) with ``options``."""
    import napari_nephi

    return napari_nephi.register(
        fixed, moving, method="nephi", device="cpu", iterations=0, initial="none", **options
    )


def test_warp_blur_recovers_a_shift_of_a_volume_sampled_like_the_fixed_one():
    """The MRI (a 17 x 25 x 21 crop) shifted by (0.5, -0.5, 0.5) voxels (cubic spline, which smooths
    nearly alike at every shift), coarse stage alone (20 steps, no global stage): with the trilinear warp
    compared as it is the field ends 0.26 voxels off on average, with its smoothing matched 0.03 (largest
    |det J - 1| three voxels inside 0.22 -> 0.06; ``"all"`` levels: 0.03, 0.05). The settings say where it
    ran (about 0.5 s of CPU a run). Since session 37 the option ``coarse_warp_blur`` chooses (the fast
    preset's default on volumes is ``"all"``, which the module switch set to False no longer turns off), and
    the bending weight 0.1 of these numbers is given (the volume default is now 0.03)."""
    from napari_nephi.core.jacobian import jacobian_determinant
    from napari_nephi.synthetic import mri_volume

    vol = mri_volume()[0][4:21, 8:33, 6:27]
    shift = (0.5, -0.5, 0.5)
    moving = ndimage.shift(vol, shift, order=3, mode="nearest").astype(np.float32)  # moving(x + s) = fixed(x)
    inner = (slice(3, -3),) * 3
    out = {}
    for on in (False, True, "all"):
        reg = _coarse_only(vol, moving, coarse_iterations=20, coarse_reg_weight=0.1, coarse_warp_blur=on)
        assert reg.settings["coarse_volume_sampling"].get("warp_blur", False) == on
        assert reg.settings["coarse_warp_blur"] == on
        u = reg.transform.displacement(vol.shape)
        err = np.sqrt(((u - np.reshape(shift, (3, 1, 1, 1))) ** 2).sum(0))[inner]
        det = jacobian_determinant(u)[inner]
        out[on] = float(err.mean()), float(np.abs(det - 1).max())
    assert out[False][0] > 0.15
    for on in (True, "all"):
        assert out[on][0] < 0.1
        assert out[on][1] < 0.1 < out[False][1]


def test_warp_blur_is_recorded_only_where_a_level_ran_it(monkeypatch):
    """With matched blur ``"once"`` the full-grid levels learn the blur instead, so ``True`` (full-grid
    levels only) runs nowhere and is not recorded; ``"all"`` still runs on the coarser levels and is
    (review 1, B2)."""
    from napari_nephi.synthetic import mri_volume

    vol = mri_volume()[0][4:21, 8:33, 6:27]
    moving = ndimage.shift(vol, (0.5, -0.5, 0.5), order=3, mode="nearest").astype(np.float32)
    seen = {}
    for on in (True, "all"):
        monkeypatch.setattr(coarse, "WARP_BLUR_3D", on)
        reg = _coarse_only(vol, moving, coarse_iterations=4, coarse_match_blur="once")
        seen[on] = reg.settings["coarse_volume_sampling"].get("warp_blur")
    assert seen == {True: None, "all": "all"}


def test_volumes_take_their_own_coarse_bending_weight_where_set(monkeypatch):
    """``engine.COARSE_REG_WEIGHT_3D`` (opt-in, session 36) is the coarse bending weight of volumes when
    ``coarse_reg_weight`` is not given: recorded in the settings, used by the stage (another field than the
    default's), 2D keeps ``COARSE_REG_WEIGHT`` and an explicit weight wins. Since session 37 the default on
    volumes (optimize, fast preset) is the preset's ``coarse_reg_weight_3d``, 0.03 (it was 0.1 as in 2D)."""
    import napari_nephi
    from napari_nephi.engines.nephi import engine
    from napari_nephi.synthetic import mri_volume

    vol = mri_volume()[0][4:21, 8:33, 6:27]
    moving = ndimage.shift(vol, (0.5, -0.5, 0.5), order=3, mode="nearest").astype(np.float32)
    opts = dict(method="nephi", device="cpu", iterations=0, initial="none", coarse_iterations=6)
    base = napari_nephi.register(vol, moving, **opts)
    assert base.settings["coarse_reg_weight"] == engine.PRESETS["fast"]["coarse_reg_weight_3d"] == 0.03
    monkeypatch.setattr(engine, "COARSE_REG_WEIGHT_3D", 0.01)
    low = napari_nephi.register(vol, moving, **opts)
    assert low.settings["coarse_reg_weight"] == 0.01
    u0, u1 = (r.transform.displacement(vol.shape) for r in (base, low))
    assert float(np.abs(u1 - u0).max()) > 1e-3
    given = napari_nephi.register(vol, moving, coarse_reg_weight=0.03, **opts)
    np.testing.assert_array_equal(given.transform.displacement(vol.shape), u0)
    img = vol[8]
    flat = napari_nephi.register(img, img, **opts)
    assert flat.settings["coarse_reg_weight"] == engine.COARSE_REG_WEIGHT == 0.1


def test_a_bad_volume_bending_weight_is_refused(monkeypatch):
    """``engine.COARSE_REG_WEIGHT_3D`` is checked where it is read, as ``coarse_reg_weight`` is (review 1 of
    session 36, B3: -1 and NaN had run silently and been recorded)."""
    import pytest

    import napari_nephi
    from napari_nephi.core.errors import InputError
    from napari_nephi.engines.nephi import engine
    from napari_nephi.synthetic import mri_volume

    vol = mri_volume()[0][4:21, 8:33, 6:27]
    for bad in (-1.0, float("nan"), float("inf"), "0.1x", True):  # the last two: review 2 of session 36, B1
        monkeypatch.setattr(engine, "COARSE_REG_WEIGHT_3D", bad)
        with pytest.raises(InputError, match="COARSE_REG_WEIGHT_3D must be a finite number of at least 0"):
            napari_nephi.register(vol, vol, method="nephi", device="cpu", iterations=0, coarse_iterations=2)


def test_the_warp_blur_never_holds_the_variance_and_gives_its_blur_bit_for_bit(monkeypatch):
    """Session 38: the coarse stage blurs by the interpolation's smoothing one axis at a time from the
    detached warp points (:func:`coarse.blur_by_interpolation`), never holding the ``(1, 3, *S)`` variance of
    :func:`coarse.interpolation_variance` (its peak memory on large comparison grids: the 2.5x MRI's coarse
    stage at 12 steps 291.6 / 316.6 / 301.7 -> 235.6 / 237.8 / 237.7 MiB, blur off 233.0 / 235.1 / 218.8;
    /tmp/s38/B/q1.out). The blurred image's values are the same bit for bit either way (points inside and
    outside the frame, axes of 1 and 2 voxels), and so is the coarse stage's displacement with the old
    formulation put back (warp blur ``"all"``, the volume default)."""
    from napari_nephi.synthetic import mri_volume

    gen = torch.Generator().manual_seed(0)
    for shape in [(7, 9, 8), (1, 6, 2)]:
        pts = torch.rand(1, *shape, 3, generator=gen) * 2.4 - 1.2
        image = torch.rand(1, 1, *shape, generator=gen)
        old = coarse.blur_by_variance(image, coarse.interpolation_variance(pts, shape))
        assert torch.equal(coarse.blur_by_interpolation(image, pts), old)
    vol = mri_volume()[0][4:21, 8:33, 6:27]
    moving = ndimage.shift(vol, (0.5, -0.5, 0.5), order=3, mode="nearest").astype(np.float32)
    new = _coarse_only(vol, moving, coarse_iterations=8, coarse_warp_blur="all")
    assert new.settings["coarse_volume_sampling"]["warp_blur"] == "all"

    def via_variance(image, pts, shape=None):
        shape = image.shape[2:] if shape is None else shape
        return coarse.blur_by_variance(image, coarse.interpolation_variance(pts, shape))

    monkeypatch.setattr(coarse, "blur_by_interpolation", via_variance)
    old = _coarse_only(vol, moving, coarse_iterations=8, coarse_warp_blur="all")
    assert np.array_equal(new.transform.displacement(vol.shape), old.transform.displacement(vol.shape))
    assert not np.array_equal(
        new.transform.displacement(vol.shape),
        _coarse_only(vol, moving, coarse_iterations=8, coarse_warp_blur=False).transform.displacement(
            vol.shape
        ),
    )
