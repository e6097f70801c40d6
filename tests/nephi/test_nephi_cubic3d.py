"""Volumes in the coarse stage: cubic spline warps, averaging down by exact fractional bins (session 32)."""

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from napari_nephi.engines.nephi import coarse
from napari_nephi.engines.nephi.coarse import normalized_grid
from napari_nephi.engines.nephi.cubic import cubic_sample, spline_coefficients


def test_cubic_sample_is_scipys_cubic_spline_with_mirrored_edges():
    """The interpolating cubic spline (prefilter and 8 linear fetches) equals
    ``scipy.ndimage.map_coordinates(order=3, mode="mirror")`` inside the frame, edges included, and
    returns the volume itself on its own grid."""
    rng = np.random.default_rng(0)
    vol = rng.random((9, 13, 11))
    t = torch.as_tensor(vol, dtype=torch.float64)[None, None]
    coef = spline_coefficients(t)
    assert coef.shape == (1, 1, 11, 15, 13)
    own = cubic_sample(coef, normalized_grid(vol.shape, dtype=torch.float64).flip(-1)[None])
    np.testing.assert_allclose(own[0, 0].numpy(), vol, atol=1e-5)
    p = rng.uniform(0, 1, (500, 3)) * (np.array(vol.shape) - 1)
    ref = ndimage.map_coordinates(vol, p.T, order=3, mode="mirror")
    pn = torch.as_tensor((p / (np.array(vol.shape) - 1) * 2 - 1)[:, ::-1].copy()).reshape(1, 500, 1, 1, 3)
    np.testing.assert_allclose(cubic_sample(coef, pn)[0, 0, :, 0, 0].numpy(), ref, atol=1e-5)


def test_cubic_sample_smooths_alike_at_every_subvoxel_shift():
    """Trilinear interpolation halves a checkerboard's contrast half-way between voxels and keeps it on
    them; the cubic spline keeps a smooth pattern's contrast within 1 % at any shift."""
    z, y, x = np.meshgrid(*[np.arange(20.0)] * 3, indexing="ij")
    vol = torch.as_tensor(np.cos(2 * np.pi * x / 5.0))[None, None]  # 5 voxels a period
    coef = spline_coefficients(vol)
    ident = normalized_grid(vol.shape[2:], dtype=torch.float64).flip(-1)[None]
    amplitudes = {}
    for frac in (0.0, 0.25, 0.5):
        pts = ident.clone()
        pts[..., 0] += frac * 2 / 19  # x by ``frac`` voxels
        inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
        lin = F.grid_sample(vol, pts, mode="bilinear", align_corners=True)[inner]
        cub = cubic_sample(coef, pts)[inner]
        amplitudes[frac] = float(lin.abs().max()), float(cub.abs().max())
    lin_ratio = amplitudes[0.5][0] / amplitudes[0.0][0]
    cub_ratio = amplitudes[0.5][1] / amplitudes[0.0][1]
    assert lin_ratio < 0.95  # linear interpolation: contrast lost half-way
    assert abs(cub_ratio - 1) < 0.01


def test_exact_area_keeps_a_ramp_a_ramp():
    """Averaging 25 voxels down to 13 over whole-voxel bins of varying width (``mode="area"``) puts
    the bins' centres unevenly, so a linear ramp comes out bent; exact fractional bins keep it linear
    (the image scaled, not distorted). Integer ratios are the same both ways."""
    ramp = torch.arange(25.0, dtype=torch.float64).reshape(1, 1, 25, 1, 1).expand(1, 1, 25, 4, 4).contiguous()
    old = F.interpolate(ramp, size=(13, 2, 2), mode="area")[0, 0, :, 0, 0]
    assert float(old.diff().std()) > 0.1
    new = coarse._area(ramp, (13, 2, 2), exact=True)[0, 0, :, 0, 0]
    assert float(new.diff().std()) < 1e-9
    even = torch.rand(1, 1, 24, 8, 4, dtype=torch.float64)
    torch.testing.assert_close(
        coarse._area(even, (12, 4, 2)), F.interpolate(even, size=(12, 4, 2), mode="area")
    )


def test_cubic_warp_recovers_a_half_voxel_shift_of_a_volume(monkeypatch):
    """The MRI (a 17 x 25 x 21 crop) shifted by (0.5, -0.5, 0.5) voxels, cubic-resampled, coarse stage alone
    (20 steps, no global stage): with the trilinear warp the field ends 0.26 voxels off on average (det J
    0.86-1.22 three voxels inside), with the cubic warp and exact bins 0.054 (0.94-1.10). Settings say
    which ran. The trilinear warp as measured: without its warp blur and with the bending weight 0.1 (the
    volume default before session 37)."""
    import napari_nephi
    from napari_nephi.core.jacobian import jacobian_determinant
    from napari_nephi.synthetic import mri_volume

    vol = mri_volume()[0][4:21, 8:33, 6:27]
    shift = (0.5, -0.5, 0.5)
    moving = ndimage.shift(vol, shift, order=3, mode="nearest").astype(np.float32)  # moving(x + s) = fixed(x)
    inner = (slice(None), *[slice(3, -3)] * 3)
    out = {}
    for on in (False, True):
        monkeypatch.setattr(coarse, "CUBIC_3D", on)
        monkeypatch.setattr(coarse, "EXACT_AREA_3D", on)
        reg = napari_nephi.register(
            vol,
            moving,
            method="nephi",
            device="cpu",
            iterations=0,
            initial="none",
            coarse_iterations=20,
            coarse_warp_blur=False,
            coarse_reg_weight=0.1,
        )
        assert reg.settings["coarse_volume_sampling"] == {"cubic": on, "exact_area": on}
        u = reg.transform.displacement(vol.shape)
        err = np.sqrt(((u - np.reshape(shift, (3, 1, 1, 1))) ** 2).sum(0))[inner[1:]]
        det = jacobian_determinant(u)[inner[1:]]
        out[on] = float(err.mean()), float(np.abs(det - 1).max())
    assert out[False][0] > 0.15
    assert out[True][0] < 0.1
    assert out[True][1] < 0.12 < out[False][1]
