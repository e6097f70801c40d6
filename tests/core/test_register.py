"""register(): the affine engine recovers known maps; bad input is refused; progress and cancel."""

import threading

import numpy as np
import pytest
import scipy.ndimage as ndi
import skimage.data

import napari_nephi as nn
from napari_nephi.core import AffineTransform

_RNG = np.random.default_rng(123)


def known_affine(shape, angle_deg, scale, shift):
    th = np.deg2rad(angle_deg)
    c = (np.array(shape) - 1) / 2
    r = np.eye(len(shape))
    r[-2:, -2:] = [[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]
    r *= scale
    m = np.eye(len(shape) + 1)
    m[:-1, :-1] = r
    m[:-1, -1] = c - r @ c + np.asarray(shift)
    return m


@pytest.fixture(scope="module")
def camera():
    return skimage.data.camera().astype(np.float32)[::2, ::2]


def make_moving(fixed, m):
    """moving(m x) = fixed(x): the pull-back from fixed to moving coordinates is m."""
    return ndi.affine_transform(fixed, np.linalg.inv(m), order=1, mode="reflect").astype(np.float32)


@pytest.mark.parametrize(
    "kind,angle,scale,shift",
    [("rigid", 8, 1.0, (5, -3)), ("similarity", -6, 1.08, (-4, 2)), ("affine", 5, 0.95, (3, 4))],
)
def test_affine_engine_recovers_known_map_on_camera(camera, kind, angle, scale, shift):
    m = known_affine(camera.shape, angle, scale, shift)
    moving = make_moving(camera, m)
    reg = nn.register(camera, moving, method="affine", kind=kind)
    pts = np.indices(camera.shape).reshape(2, -1).T[::97]
    err = np.linalg.norm(reg.transform.map_points(pts) - AffineTransform(m).map_points(pts), axis=1)
    assert err.max() < 0.75, err.max()
    assert reg.metrics["ncc_after"] > reg.metrics["ncc_before"]
    assert reg.warped.shape == camera.shape
    assert reg.settings["method"] == "affine" and reg.settings["kind"] == kind


def test_affine_engine_3d_translation_and_rotation():
    rng = np.random.default_rng(0)
    vol = ndi.gaussian_filter(rng.random((32, 40, 40)), 2.5).astype(np.float32)
    m = known_affine(vol.shape, 6, 1.0, (1.5, -2.0, 2.5))
    moving = make_moving(vol, m)
    reg = nn.register(vol, moving, method="affine", kind="rigid", spacing=(1.0, 1.0, 1.0))
    pts = np.indices(vol.shape).reshape(3, -1).T[::211]
    err = np.linalg.norm(reg.transform.map_points(pts) - AffineTransform(m).map_points(pts), axis=1)
    assert err.max() < 0.75, err.max()


def test_anisotropic_spacing_rigid(camera):
    """With spacing (2, 1) a physical rotation is not a voxel rotation; rigid must find it."""
    fixed = camera[::2]  # 128 x 256 voxels of 2 x 1
    th = np.deg2rad(5)
    s = np.diag([2.0, 1.0])
    r = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    a = np.linalg.inv(s) @ r @ s
    c = (np.array(fixed.shape) - 1) / 2
    m = np.eye(3)
    m[:2, :2] = a
    m[:2, 2] = c - a @ c
    moving = make_moving(fixed, m)
    reg = nn.register(fixed, moving, method="affine", kind="rigid", spacing=(2.0, 1.0))
    np.testing.assert_allclose(reg.transform.matrix, m, atol=0.02 * np.abs(m).max())


def test_progress_and_cancel(camera):
    events = []
    cancel = threading.Event()

    def callback(ev):
        events.append(ev)
        if ev.step == 5:
            cancel.set()

    moving = make_moving(camera, known_affine(camera.shape, 3, 1, (2, 2)))
    with pytest.raises(nn.Cancelled):
        nn.register(camera, moving, method="affine", progress=callback, cancel=cancel)
    assert [e.step for e in events] == [1, 2, 3, 4, 5]
    assert all(e.loss is not None and e.total > 5 for e in events)


@pytest.mark.parametrize(
    "fixed,moving,message",
    [
        (np.ones((16, 16)), _RNG.random((16, 16)), "constant"),
        (_RNG.random((16, 16)), _RNG.random((8, 16, 16)), "2D"),
        (np.full((16, 16), np.nan), _RNG.random((16, 16)), "NaN"),
        (np.zeros((0, 16)), _RNG.random((16, 16)), "empty"),
        (_RNG.random(16), _RNG.random(16), "2D .y, x. or 3D"),
        (None, _RNG.random((16, 16)), "No fixed"),
    ],
)
def test_bad_input_is_refused_clearly(fixed, moving, message):
    with pytest.raises(nn.InputError, match=message):
        nn.register(fixed, moving, method="affine")


def test_bad_spacing_method_and_device():
    a = _RNG.random((16, 16))
    with pytest.raises(nn.InputError, match="finite and positive"):
        nn.register(a, a, spacing=(1.0, np.inf))
    with pytest.raises(nn.InputError, match="one spacing per axis"):
        nn.register(a, a, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(nn.InputError, match="Unknown method"):
        nn.register(a, a, method="nope")
    with pytest.raises(nn.InputError, match="Unknown affine kind"):
        nn.register(a, a, kind="shear")


def test_rgb_is_converted_with_a_note(camera):
    rgb = np.stack([camera] * 3, -1).astype(np.uint8)
    with pytest.warns(UserWarning, match="RGB"):
        reg = nn.register(rgb, rgb, method="affine", iterations=5, levels=1)
    assert any("RGB" in n for n in reg.metrics["notes"])
    assert reg.warped.ndim == 2


def test_inputs_are_not_modified(camera):
    fixed = camera.copy()
    moving = make_moving(camera, known_affine(camera.shape, 2, 1, (1, 1)))
    before = moving.copy()
    nn.register(fixed, moving, method="affine", iterations=5)
    np.testing.assert_array_equal(fixed, camera)
    np.testing.assert_array_equal(moving, before)


def test_registration_save(tmp_path, camera):
    reg = nn.register(camera, camera, method="affine", iterations=3, levels=1)
    reg.save(tmp_path / "out")
    back = nn.load_transform(tmp_path / "out" / "transform")
    np.testing.assert_allclose(back.matrix, reg.transform.matrix)
    assert back.settings["method"] == "affine"
    assert (tmp_path / "out" / "warped.tif").exists()
    assert (tmp_path / "out" / "metrics.json").exists()


def test_available_methods():
    assert "affine" in nn.available_methods()


def test_moving_spacing_differs(camera):
    """A moving image sampled twice as coarsely along y is found with rigid + moving_spacing."""
    moving = camera[::2].copy()  # same field of view, spacing (2, 1)
    reg = nn.register(
        camera, moving, method="affine", kind="rigid", spacing=(1.0, 1.0), moving_spacing=(2.0, 1.0)
    )
    pts = np.array([[50.0, 60.0], [200.0, 180.0]])
    expected = pts * [0.5, 1.0]  # moving voxel of the same physical point
    np.testing.assert_allclose(reg.transform.map_points(pts), expected, atol=0.6)


def test_moving_mask_restricts_the_loss(camera):
    moving = make_moving(camera, known_affine(camera.shape, 0, 1, (3, -2)))
    mask = np.zeros(camera.shape, bool)
    mask[40:200, 40:200] = True
    reg = nn.register(camera, moving, method="affine", kind="translation", moving_mask=mask)
    np.testing.assert_allclose(reg.transform.matrix[:2, 2], (3, -2), atol=0.5)
