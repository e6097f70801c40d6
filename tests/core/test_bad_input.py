"""Bad inputs to core: each raises the right RegistrationError with a message that says what to do.

One test per row of docs/bad_input.md (images, masks, transforms, spacing, memory).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

import napari_nephi as nn
from napari_nephi.core import transform as core_transform
from napari_nephi.core import warp as core_warp
from napari_nephi.core.errors import DimensionMismatchError, InputError, OutOfMemoryError
from napari_nephi.core.grid import check_spacing
from napari_nephi.core.inputs import looks_rgb, min_mask_voxels, prepare_image, prepare_mask
from napari_nephi.core.jacobian import jacobian_determinant
from napari_nephi.core.similarity import metric
from napari_nephi.core.transform import (
    AffineTransform,
    DisplacementTransform,
    IdentityTransform,
)

RNG = np.random.default_rng(0)


def _image(shape, dtype=np.float32):
    img = RNG.random(shape)
    if np.dtype(dtype).kind in "iu":
        img = img * np.iinfo(dtype).max
    return img.astype(dtype)


# -- a 2D transform never warps a 3D volume --------------------------------------------------------
TRANSFORMS_2D = {
    "affine": lambda: AffineTransform(np.eye(3), shape=(16, 16)),
    "affine without grid": lambda: AffineTransform(np.eye(3)),
    "displacement": lambda: DisplacementTransform(np.zeros((2, 16, 16), np.float32)),
    "identity": lambda: IdentityTransform(2, shape=(16, 16)),
}


@pytest.mark.parametrize("kind", sorted(TRANSFORMS_2D))
def test_2d_transform_refuses_to_warp_a_volume(kind):
    t = TRANSFORMS_2D[kind]()
    volume = _image((10, 16, 16))
    with pytest.raises(
        DimensionMismatchError, match=r"shape \(10, 16, 16\) with a 2D transform.*3D transform"
    ):
        t.warp(volume)
    with pytest.raises(
        DimensionMismatchError, match=r"labels of shape \(10, 16, 16\) \(3D\) with a 2D transform"
    ):
        t.warp_labels(volume.astype(np.int32))
    with pytest.raises(DimensionMismatchError, match=r"has 3 axes but the transform is 2D"):
        t.displacement((10, 16, 16))
    with pytest.raises(DimensionMismatchError, match=r"Points must be an \(N, 2\) array"):
        t.map_points(np.zeros((5, 3)))


def test_3d_transform_refuses_a_2d_image_and_4d_arrays():
    t = AffineTransform(np.eye(4), shape=(8, 8, 8))
    with pytest.raises(DimensionMismatchError, match=r"Cannot warp a 2D array of shape \(8, 8\) with a 3D"):
        t.warp(_image((8, 8)))
    with pytest.raises(DimensionMismatchError, match=r"last axis \(8\) is too long to be colour channels"):
        t.warp(_image((8, 8, 8, 8)))


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_channels_last_images_still_warp(channels):
    """An RGB(A) (or few-channel) image is warped channel by channel and keeps its channel axis."""
    img = _image((16, 16, channels))
    t = AffineTransform([[1, 0, 2], [0, 1, 0], [0, 0, 1]], shape=(16, 16))
    out = t.warp(img)
    assert out.shape == (16, 16, channels)
    for c in range(channels):
        np.testing.assert_allclose(out[:12, :, c], img[2:14, :, c], atol=1e-5)


# -- shapes given to a transform: positive whole numbers, one per axis -------------------------------
BAD_SHAPES = [
    ((10.5, 10), InputError, r"shape \(10.5, 10\) must hold whole numbers of voxels, got 10.5"),
    ("ab", InputError, r"shape must be a sequence of 2 whole numbers \(one per axis\), got 'ab'"),
    (12, InputError, r"shape must be a sequence of 2 whole numbers"),
    (np.array(12), InputError, r"shape must be a sequence of 2 whole numbers"),
    (np.ones((2, 2), int), InputError, r"shape must be a sequence of 2 whole numbers"),
    ([4, [2, 3]], InputError, r"must hold whole numbers of voxels, got \[2, 3\]"),
    ((True, 4), InputError, r"must hold whole numbers of voxels, got True"),
    ((4, "8"), InputError, r"must hold whole numbers of voxels, got '8'"),
    ((4, float("nan")), InputError, r"must hold whole numbers of voxels, got nan"),
    ((10,), DimensionMismatchError, r"shape \(10,\) has 1 axis but the transform is 2D"),
    ((4, -2), InputError, r"shape \(4, -2\) has an empty axis"),
]


@pytest.mark.parametrize("kind", sorted(TRANSFORMS_2D))
@pytest.mark.parametrize(("shape", "error", "message"), BAD_SHAPES)
def test_every_method_taking_a_shape_checks_it(kind, shape, error, message):
    t = TRANSFORMS_2D[kind]()
    image = _image((16, 16))
    out_message = message.replace("shape", "output_shape", 1)
    with pytest.raises(error, match=message):
        t.displacement(shape)
    with pytest.raises(error, match=out_message):
        t.warp(image, output_shape=shape)
    with pytest.raises(error, match=out_message):
        t.warp_labels(image.astype(np.int32), output_shape=shape)
    with pytest.raises(error, match=message):
        IdentityTransform(2, shape=shape)
    with pytest.raises(error, match=message.replace("shape", "moving_shape", 1)):
        AffineTransform(np.eye(3), moving_shape=shape)


def test_whole_number_shapes_of_any_numeric_type_are_accepted():
    t = AffineTransform([[1, 0, 1], [0, 1, 0], [0, 0, 1]])
    expected = t.displacement((6, 5))
    for shape in [(6.0, 5.0), (np.int64(6), np.uint8(5)), np.array([6, 5]), [6, 5.0]]:
        out = t.displacement(shape)
        assert out.shape == (2, 6, 5)
        np.testing.assert_array_equal(out, expected)
    assert t.warp(_image((8, 8)), output_shape=(6.0, 5)).shape == (6, 5)
    assert IdentityTransform(2, shape=(3.0, np.int32(4))).shape == (3, 4)


# -- RGB(A): one rule for every dtype --------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.int32])
@pytest.mark.parametrize("channels", [3, 4])
def test_rgb_rule_does_not_depend_on_dtype(dtype, channels):
    img = _image((64, 48, channels), dtype)
    notes: list[str] = []
    with pytest.warns(UserWarning, match="was RGB; it was converted to grayscale"):
        out = prepare_image(img, "fixed", notes=notes)
    assert out.shape == (64, 48)
    assert notes and "converted to grayscale" in notes[0]
    rgb = img[..., :3].astype(np.float64) / (255.0 if dtype == np.uint8 else 1.0)
    expected = rgb @ np.array([0.2125, 0.7154, 0.0721])
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("slices", [4, 5, 16])
def test_small_volumes_are_never_taken_for_rgb(slices, recwarn):
    """A (z, y, x) volume with few slices has its short axis first: registered as a volume."""
    vol = _image((slices, 32, 32), np.uint16)
    out = prepare_image(vol, "fixed")
    assert out.shape == (slices, 32, 32)
    assert not [w for w in recwarn if "RGB" in str(w.message)]


def test_three_slice_volume_is_too_small():
    with pytest.raises(InputError, match=r"\(3, 32, 32\) is too small; every axis needs 4 voxels.*4 slices"):
        prepare_image(_image((3, 32, 32)), "fixed")


def test_ambiguous_shape_asks_for_rgb_true_or_false():
    img = _image((8, 12, 4))
    with pytest.raises(InputError, match=r"\(8, 12, 4\): it may be a small RGB\(A\).*rgb=True.*rgb=False"):
        prepare_image(img, "moving")
    assert prepare_image(img, "moving", rgb=False).shape == (8, 12, 4)
    with pytest.warns(UserWarning, match="was RGB"):
        assert prepare_image(img, "moving", rgb=True).shape == (8, 12)
    assert looks_rgb((8, 12, 4)) is None
    assert looks_rgb((16, 16, 4)) is True
    assert looks_rgb((4, 64, 64)) is False


def test_rgb_false_keeps_a_thin_volume_and_bad_rgb_values_are_refused():
    assert prepare_image(_image((64, 64, 4)), "fixed", rgb=False).shape == (64, 64, 4)
    with pytest.raises(InputError, match="rgb must be True, False or None"):
        prepare_image(_image((64, 64, 4)), "fixed", rgb="yes")
    with pytest.raises(InputError, match=r"Expected an RGB\(A\) image with channels last"):
        prepare_image(_image((64, 64)), "fixed", rgb=True)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (None, "No fixed image given"),
        (np.array([["a"] * 8] * 8), r"must hold real numbers \(bool, integer or float\), got dtype <U1"),
        (np.ones((8, 8), complex), r"must hold real numbers .* got dtype complex128"),
        (np.zeros((0, 32)), r"is empty \(shape \(0, 32\)\)"),
        (np.zeros(32) + np.arange(32), "must be 2D"),
        (np.zeros((4, 4, 4, 4, 4)), "must be 2D"),
        (np.full((16, 16), np.nan), "holds 256 NaN or infinite values"),
        (np.ones((16, 16)), "is constant"),
    ],
)
def test_unusable_images(image, message):
    with pytest.raises(InputError, match=message):
        prepare_image(image, "fixed")


# -- masks -------------------------------------------------------------------------------------------
def test_one_pixel_mask_is_refused():
    mask = np.zeros((32, 32), bool)
    mask[5, 5] = True
    with pytest.raises(InputError, match=r"fixed mask covers only 1 voxel; .* at least 16"):
        prepare_mask(mask, (32, 32), "fixed mask")


def test_small_3d_mask_is_refused_and_enough_voxels_pass():
    mask = np.zeros((8, 8, 8), bool)
    mask[:3, :3, :3] = True  # 27 voxels < 64
    with pytest.raises(InputError, match="covers only 27 voxels; .* at least 64"):
        prepare_mask(mask, mask.shape, "moving mask")
    mask[:4, :4, :4] = True
    assert prepare_mask(mask, mask.shape).sum() == min_mask_voxels(3) == 64


@pytest.mark.parametrize(
    ("mask", "error", "message"),
    [
        (np.full((16, 16), np.nan), InputError, "holds NaN or infinite values"),
        (np.full((16, 16), np.inf), InputError, "holds NaN or infinite values"),
        (np.zeros((16, 16)), InputError, "is empty; draw or load a mask"),
        (np.full((16, 16), 0.5), InputError, r"only 0 and 1 .* such as 0.5; threshold it"),
        (np.array([["x"] * 16] * 16), InputError, "must be boolean-like"),
        (np.ones((8, 8), bool), DimensionMismatchError, r"shape \(8, 8\) but its image has \(16, 16\)"),
    ],
)
def test_unusable_masks(mask, error, message):
    with pytest.raises(error, match=message):
        prepare_mask(mask, (16, 16), "fixed mask")


@pytest.mark.parametrize("mask", [np.ones((16, 16), np.float32), np.full((16, 16), 3, np.uint16)])
def test_float_01_and_integer_label_masks_are_accepted(mask):
    out = prepare_mask(mask, (16, 16))
    assert out.dtype == bool and out.all()


# -- spacing ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spacing", "message"),
    [
        ("abc", "spacing must be numbers, got 'abc'"),
        (["1", "2"], "spacing must be numbers"),
        ([True, 1.0], "spacing must be numbers"),
        ([[1.0, 2.0]], "spacing must be numbers"),
        (object(), "spacing must be numbers"),
        ([1.0, 2.0, 3.0], "spacing has 3 values but the image has 2 dimensions"),
        ([1.0], "spacing has 1 values but the image has 2 dimensions"),
        ([float("nan"), 1.0], "must be finite and positive"),
        ([float("inf"), 1.0], "must be finite and positive"),
        ([1.0, 0.0], "must be finite and positive"),
        (-1.0, "must be finite and positive"),
    ],
)
def test_bad_spacing(spacing, message):
    with pytest.raises(InputError, match=message):
        check_spacing(spacing, 2)


@pytest.mark.parametrize(
    ("spacing", "expected"),
    [(None, (1.0, 1.0)), (2, (2.0, 2.0)), (np.float32(0.5), (0.5, 0.5)), (np.array([1, 3]), (1.0, 3.0))],
)
def test_good_spacing(spacing, expected):
    assert check_spacing(spacing, 2) == expected


# -- memory --------------------------------------------------------------------------------------------
def test_absurd_displacement_shape_is_refused_before_allocating():
    t = AffineTransform(np.eye(3))
    with pytest.raises(OutOfMemoryError, match=r"dense displacement field of shape .* needs about .* GiB"):
        t.displacement((10**6, 10**6))
    with pytest.raises(InputError, match="has an empty axis"):
        t.displacement((0, 4))


def test_absurd_warp_output_is_refused_before_allocating():
    t = AffineTransform(np.eye(3))
    with pytest.raises(OutOfMemoryError, match=r"warped image of shape .* smaller output_shape"):
        t.warp(_image((16, 16)), output_shape=(10**6, 10**6))
    with pytest.raises(OutOfMemoryError, match=r"warped labels of shape .* smaller output_shape"):
        t.warp_labels(np.ones((16, 16), np.int32), output_shape=(10**6, 10**6))


@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
        MemoryError("Unable to allocate 12.0 GiB for an array"),
    ],
)
@pytest.mark.parametrize("operation", ["warp", "warp_labels", "displacement", "map_points"])
def test_allocation_failures_become_out_of_memory(monkeypatch, failure, operation):
    def failing_grid(*args, **kwargs):
        raise failure

    t = AffineTransform(np.eye(3), shape=(16, 16))
    if operation == "map_points":
        monkeypatch.setattr(torch, "as_tensor", failing_grid)
        call = lambda: t.map_points(np.zeros((4, 2)))  # noqa: E731
    else:
        monkeypatch.setattr(core_warp, "slab_grid", failing_grid)
        call = {
            "warp": lambda: t.warp(_image((16, 16))),
            "warp_labels": lambda: t.warp_labels(np.ones((16, 16), np.int32)),
            "displacement": lambda: t.displacement((8, 8)),
        }[operation]
    with pytest.raises(OutOfMemoryError, match="ran out of memory"):
        call()


def test_other_runtime_errors_are_not_disguised(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("some bug")

    monkeypatch.setattr(core_warp, "slab_grid", broken)
    with pytest.raises(RuntimeError, match="some bug"):
        AffineTransform(np.eye(3), shape=(8, 8)).warp(_image((8, 8)))


def test_prepare_image_memory_error_becomes_out_of_memory():
    class Huge:
        def __array__(self, dtype=None, copy=None):
            raise MemoryError("Unable to allocate 800 GiB")

    with pytest.raises(OutOfMemoryError, match="reading the fixed image ran out of memory"):
        prepare_image(Huge(), "fixed")


# -- similarity and Jacobian ------------------------------------------------------------------------
def test_metric_refuses_mismatched_or_non_finite_inputs():
    a = _image((16, 16))
    with pytest.raises(
        DimensionMismatchError, match=r"Shapes differ: \(16, 16\) vs \(8, 8\); .*warp one first"
    ):
        metric("ncc", a, a[:8, :8])
    with pytest.raises(
        DimensionMismatchError, match=r"mask has shape \(8, 8\) but the images have \(16, 16\)"
    ):
        metric("ncc", a, a, mask=np.ones((8, 8), bool))
    b = a.copy()
    b[3, 3] = np.nan
    with pytest.raises(InputError, match="second image holds NaN or infinite values"):
        metric("mse", a, b)
    with pytest.raises(InputError, match="Unknown similarity 'ssd'"):
        metric("ssd", a, a)
    assert metric("ncc", a, a) == pytest.approx(1.0, abs=1e-6)


def test_jacobian_refuses_non_finite_fields():
    u = np.zeros((2, 8, 8), np.float32)
    np.testing.assert_allclose(jacobian_determinant(u), 1.0)
    u[1, 2, 2] = np.inf
    with pytest.raises(InputError, match="holds NaN or infinite values; it has no Jacobian"):
        jacobian_determinant(u)


# -- through the public register() ------------------------------------------------------------------
def test_register_refuses_one_pixel_mask_and_bad_spacing():
    fixed = _image((32, 32))
    mask = np.zeros((32, 32), bool)
    mask[4, 4] = True
    with pytest.raises(InputError, match="fixed mask covers only 1 voxel"):
        nn.register(fixed, fixed, method="affine", fixed_mask=mask)
    with pytest.raises(InputError, match="moving mask holds NaN"):
        nn.register(fixed, fixed, method="affine", moving_mask=np.full((32, 32), np.nan))
    with pytest.raises(InputError, match="spacing must be numbers, got 'abc'"):
        nn.register(fixed, fixed, method="affine", spacing="abc")


def test_register_converts_uint16_rgba_with_a_note():
    rng = np.random.default_rng(3)
    gray = ndi.gaussian_filter(rng.random((48, 48)), 3)
    rgba = np.stack([gray, gray, gray, np.ones_like(gray)], -1)
    rgba = (rgba * 60000).astype(np.uint16)
    with pytest.warns(UserWarning, match="was RGB"):
        reg = nn.register(rgba, rgba, method="affine")
    assert reg.warped.shape == (48, 48)
    assert any("fixed image was RGB" in note for note in reg.metrics["notes"])


def test_numerical_inverse_out_of_memory(monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99 GB")

    monkeypatch.setattr(core_transform, "identity_grid", failing)
    with pytest.raises(OutOfMemoryError, match="numerical inverse ran out of memory"):
        DisplacementTransform(np.zeros((2, 8, 8), np.float32)).inverse()


def test_prepare_image_checks_memory_before_copying(monkeypatch):
    from napari_nephi.core import device

    monkeypatch.setattr(device, "available_memory_bytes", lambda dev: 1000)
    image = np.broadcast_to(np.arange(64, dtype=np.float32), (64, 64))  # 16 KiB of float32 to copy
    with pytest.raises(
        OutOfMemoryError, match=r"float32 copy of the fixed image \(64, 64\) needs about .*crop"
    ):
        prepare_image(image, "fixed")


@pytest.mark.parametrize("operation", ["warp", "warp_labels", "displacement", "map_points"])
def test_unknown_device_is_an_input_error(operation):
    t = AffineTransform(np.eye(3), shape=(8, 8))
    call = {
        "warp": lambda: t.warp(_image((8, 8)), device="gpu"),
        "warp_labels": lambda: t.warp_labels(np.ones((8, 8), np.int32), device="gpu"),
        "displacement": lambda: t.displacement(device="gpu"),
        "map_points": lambda: t.map_points(np.zeros((2, 2)), device="gpu"),
    }[operation]
    with pytest.raises(InputError, match="Unknown device 'gpu'; use 'auto', 'cpu'"):
        call()
