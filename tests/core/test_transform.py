"""Transform kinds: composition, inverses, per-section maps, save/load round trips."""

import json

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

from napari_nephi import load_transform
from napari_nephi.core import (
    AffineTransform,
    ComposedTransform,
    DisplacementTransform,
    IdentityTransform,
    PerSectionTransform,
)
from napari_nephi.core.errors import InputError, UnsupportedFileError
from napari_nephi.core.transform_io import (
    affine_to_itk_text,
    field_to_itk_nifti,
    itk_text_to_affine,
)


def smooth_field(shape, amplitude=3.0, seed=0):
    rng = np.random.default_rng(seed)
    d = len(shape)
    f = ndi.gaussian_filter(rng.normal(0, 1, (d, *shape)), (0,) + (shape[0] / 6,) * d)
    return (f / np.abs(f).max() * amplitude).astype(np.float32)


def affine(ndim, seed=0):
    rng = np.random.default_rng(seed)
    m = np.eye(ndim + 1)
    m[:ndim, :ndim] += rng.uniform(-0.1, 0.1, (ndim, ndim))
    m[:ndim, ndim] = rng.uniform(-3, 3, ndim)
    return m


@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_displacement_is_analytic(ndim):
    m = affine(ndim)
    shape = (6, 7, 8)[:ndim]
    u = AffineTransform(m).displacement(shape)
    x = np.indices(shape).astype(np.float64)
    expected = (
        np.einsum("ij,j...->i...", m[:ndim, :ndim], x) + m[:ndim, ndim].reshape((ndim,) + (1,) * ndim) - x
    )
    np.testing.assert_allclose(u, expected, atol=1e-4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_composition_order(ndim):
    a, b = AffineTransform(affine(ndim, 1)), AffineTransform(affine(ndim, 2))
    pts = np.random.default_rng(0).uniform(0, 10, (20, ndim))
    composed = a.then(b)
    np.testing.assert_allclose(composed.map_points(pts), b.map_points(a.map_points(pts)), atol=1e-4)
    np.testing.assert_allclose(
        composed.map_points(pts), AffineTransform(b.matrix @ a.matrix).map_points(pts), atol=1e-4
    )


@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_inverse(ndim):
    t = AffineTransform(affine(ndim, 3))
    pts = np.random.default_rng(1).uniform(0, 10, (20, ndim))
    np.testing.assert_allclose(t.inverse().map_points(t.map_points(pts)), pts, atol=1e-4)


@pytest.mark.parametrize("shape", [(32, 32), (16, 16, 16)])
def test_displacement_numeric_inverse(shape):
    t = DisplacementTransform(smooth_field(shape, 2.0))
    inv = t.inverse()
    pts = np.indices(shape).reshape(len(shape), -1).T.astype(float)
    inner = np.all((pts > 4) & (pts < np.array(shape) - 5), axis=1)
    round_trip = t.map_points(inv.map_points(pts[inner]))
    assert np.abs(round_trip - pts[inner]).max() < 0.05


def test_displacement_map_points_interpolates_linearly():
    field = np.zeros((2, 4, 4), np.float32)
    field[1, 1, 1], field[1, 1, 2] = 1.0, 3.0
    t = DisplacementTransform(field)
    np.testing.assert_allclose(t.map_points([[1.0, 1.5]]), [[1.0, 1.5 + 2.0]], atol=1e-6)


def test_per_section_transform_rotates_each_section():
    rng = np.random.default_rng(0)
    n, h, w = 3, 20, 24
    stack = ndi.gaussian_filter(rng.random((n, h, w)), (0, 2, 2)).astype(np.float32)
    mats = []
    for k in range(n):
        th = 0.1 * (k + 1)
        c = np.array([h - 1, w - 1]) / 2
        r = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        m = np.eye(3)
        m[:2, :2] = r
        m[:2, 2] = c - r @ c
        mats.append(m)
    t = PerSectionTransform(np.array(mats), shape=stack.shape)
    out = t.warp(stack)
    for k in range(n):
        ref = ndi.affine_transform(stack[k].astype(float), mats[k], order=1, mode="grid-constant")
        np.testing.assert_allclose(out[k], ref, atol=1e-4)
    u = t.displacement()
    assert np.all(u[0] == 0)
    pts = np.array([[1.0, 5.0, 6.0], [2.0, 10.0, 3.0]])
    np.testing.assert_allclose(t.inverse().map_points(t.map_points(pts)), pts, atol=1e-4)


def test_homography_perspective_division():
    h = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.01, 0.0, 1.0]])
    t = PerSectionTransform(h[None])
    y, x = 10.0, 4.0
    np.testing.assert_allclose(t.map_points([[0, y, x]]), [[0, y / 1.1, x / 1.1]], atol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda nd: AffineTransform(affine(nd), spacing=(0.5,) * nd),
        lambda nd: DisplacementTransform(smooth_field((12,) * nd), spacing=(2.0,) * nd),
        lambda nd: DisplacementTransform(smooth_field((12,) * nd), inverse_field=-smooth_field((12,) * nd)),
        lambda nd: ComposedTransform(
            [AffineTransform(affine(nd)), DisplacementTransform(smooth_field((12,) * nd))]
        ),
        lambda nd: IdentityTransform(nd, shape=(12,) * nd),
    ],
    ids=["affine", "displacement", "with-inverse", "composed", "identity"],
)
@pytest.mark.parametrize("ndim", [2, 3])
def test_save_load_round_trip_identical(tmp_path, make, ndim):
    t = make(ndim)
    t.settings = {"method": "test", "iterations": 3}
    t.save(tmp_path / "t")
    back = load_transform(tmp_path / "t")
    assert type(back) is type(t)
    assert back.settings == t.settings
    np.testing.assert_array_equal(back.displacement((12,) * ndim), t.displacement((12,) * ndim))
    if isinstance(t, DisplacementTransform) and t.inverse_field is not None:
        np.testing.assert_array_equal(back.inverse_field, t.inverse_field)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_per_section_round_trip(tmp_path):
    mats = np.stack([np.eye(3), np.diag([1.0, 2.0, 1.0])])
    t = PerSectionTransform(mats, shape=(2, 5, 5))
    t.save(tmp_path / "p")
    np.testing.assert_array_equal(load_transform(tmp_path / "p").matrices, mats)


@pytest.mark.parametrize("ndim", [2, 3])
def test_displacement_nifti_follows_itk_convention(tmp_path, ndim):
    """Read the saved field with nibabel alone and check the documented convention."""
    shape = (5, 6, 7)[:ndim]
    spacing = (2.0, 0.5, 0.25)[:ndim]
    field = smooth_field(shape, seed=4)
    DisplacementTransform(field, spacing=spacing).save(tmp_path / "t")
    img = nib.load(tmp_path / "t" / "displacement.nii.gz")
    assert img.header["intent_code"] == 1007
    data = np.asarray(img.dataobj)
    assert data.shape == tuple(reversed(shape)) + (1,) * (4 - ndim) + (ndim,)
    np.testing.assert_allclose(np.diag(img.affine)[:ndim], spacing[::-1])
    # voxel (z, y, x) = (1, 2, 3): NIfTI index (3, 2, 1); x component is first, in LPS (x negated)
    idx = (1, 2, 3)[:ndim]
    nifti_idx = tuple(reversed(idx)) + (0,) * (3 - ndim) + (0,)
    vec = data[nifti_idx]
    u = field[(slice(None),) + idx]  # (uz, uy, ux) or (uy, ux), voxels
    phys_xyz = u[::-1] * np.array(spacing[::-1])
    expected = phys_xyz.copy()
    expected[:2] *= -1
    np.testing.assert_allclose(vec, expected, rtol=1e-6)


def test_world_affine_is_used_and_restored(tmp_path):
    field = smooth_field((6, 6, 6), seed=5)
    world = np.array([[-1.5, 0, 0, 10], [0, 1.5, 0, -5], [0, 0, 3.0, 2], [0, 0, 0, 1]])
    DisplacementTransform(field, world_affine=world).save(tmp_path / "t")
    img = nib.load(tmp_path / "t" / "displacement.nii.gz")
    np.testing.assert_allclose(img.affine, world)
    back = load_transform(tmp_path / "t")
    np.testing.assert_allclose(back.field, field, atol=1e-6)
    np.testing.assert_allclose(back.world_affine, world)


@pytest.mark.parametrize("ndim", [2, 3])
def test_itk_affine_text_round_trip(ndim):
    t = AffineTransform(affine(ndim, 7), spacing=(0.5, 2.0, 1.0)[:ndim])
    text = affine_to_itk_text(t)
    assert text.startswith("#Insight Transform File V1.0")
    assert f"AffineTransform_double_{ndim}_{ndim}" in text
    back = itk_text_to_affine(text, spacing=t.spacing)
    np.testing.assert_allclose(back.matrix, t.matrix, atol=1e-9)


def test_itk_affine_pure_translation_in_lps():
    """A shift of +2 voxels along x with 0.5 mm spacing is -1 mm in LPS x (L = -R)."""
    m = np.eye(3)
    m[1, 2] = 2.0  # (y, x) order: x shift
    text = affine_to_itk_text(AffineTransform(m, spacing=(1.0, 0.5)))
    params = [float(v) for v in text.split("Parameters:")[1].split("\n")[0].split()]
    np.testing.assert_allclose(params, [1, 0, 0, 1, -1.0, 0.0], atol=1e-12)


def test_load_errors(tmp_path):
    with pytest.raises(UnsupportedFileError, match="not a transform folder"):
        load_transform(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "transform.json").write_text("{not json")
    with pytest.raises(UnsupportedFileError, match="corrupt"):
        load_transform(tmp_path / "bad")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("hello")
    with pytest.raises(UnsupportedFileError, match="not a saved transform"):
        AffineTransform(np.eye(3)).save(tmp_path / "plain")
    assert (tmp_path / "plain" / "x.txt").read_text() == "hello"


def test_save_replaces_existing_transform(tmp_path):
    AffineTransform(np.eye(3)).save(tmp_path / "t")
    m = affine(2)
    AffineTransform(m).save(tmp_path / "t")
    assert json.loads((tmp_path / "t" / "transform.json").read_text())["matrix"] == m.tolist()


def test_bad_constructors():
    with pytest.raises(InputError):
        AffineTransform(np.full((3, 3), np.nan))
    with pytest.raises(InputError):
        DisplacementTransform(np.zeros((3, 4, 4)))
    with pytest.raises(InputError):
        PerSectionTransform(np.zeros((2, 2, 2)))


def test_itk_nifti_is_readable_as_5d_vector():
    img = field_to_itk_nifti(smooth_field((4, 5)), spacing=(1.0, 1.0))
    assert img.header.get_intent()[0] == "vector"
