"""Fixed and moving images in different frames (spacing, origin, direction).

A transform maps fixed voxels to moving voxels. Its files must say where those voxels are in
space: the forward field lies on the fixed grid and points into moving space, the ITK affine takes
fixed physical points to moving physical points, the inverse field lies on the moving grid. Every
expected value here is computed from a known physical map with numpy alone, not with the package's
frame helpers; ITK (when installed) is an extra, independent reader.
"""

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
)
from napari_nephi.core.transform_io import itk_text_to_affine

FIXED_SHAPE = {2: (26, 30), 3: (12, 14, 16)}
MOVING_SHAPE = {2: (40, 17), 3: (18, 24, 9)}
FIXED_SPACING_IJK = (0.8, 1.1, 2.0)  # NIfTI order (x, y, z)
MOVING_SPACING_IJK = (1.5, 0.6, 1.25)


def _rot(theta):
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def world_affines(ndim):
    """Fixed and moving NIfTI affines: other voxel sizes, origins and directions (x flipped)."""
    fixed = np.eye(4)
    fixed[:3, :3] = _rot(0.3) @ np.diag([-1.0, 1.0, 1.0]) @ np.diag(FIXED_SPACING_IJK)
    fixed[:3, 3] = [10.0, -5.0, 3.0]
    moving = np.eye(4)
    moving[:3, :3] = _rot(-0.2) @ np.diag(MOVING_SPACING_IJK)
    moving[:3, 3] = [-4.0, 7.0, 1.0]
    if ndim == 2:  # no k component in the in-plane axes; k keeps a unit column
        fixed[2, 3] = moving[2, 3] = 0.0
    return fixed, moving


def case_frames(case, ndim):
    """``(fixed world, moving world, transform keywords)``; worlds as 4x4 i, j, k -> RAS."""
    fsp = tuple(FIXED_SPACING_IJK[:ndim][::-1])  # napari order
    msp = tuple(MOVING_SPACING_IJK[:ndim][::-1])
    if case == "affines":
        fw, mw = world_affines(ndim)
        return fw, mw, dict(spacing=fsp, world_affine=fw, moving_spacing=msp, moving_world_affine=mw)
    # spacings only: diagonal frames with the origin at 0, as napari layers with a scale
    fw = np.diag(list(FIXED_SPACING_IJK[:ndim]) + [1.0] * (4 - ndim))
    mw = np.diag(list(MOVING_SPACING_IJK[:ndim]) + [1.0] * (4 - ndim))
    return fw, mw, dict(spacing=fsp, moving_spacing=msp)


def to_lps(world, vox):
    """Napari-order voxel points ``(N, D)`` -> ITK LPS physical points ``(N, D)``."""
    vox = np.asarray(vox, float)
    n, d = vox.shape
    ijk1 = np.zeros((n, 4))
    ijk1[:, :d] = vox[:, ::-1]
    ijk1[:, 3] = 1.0
    ras = ijk1 @ world.T
    return (ras[:, :3] * [-1.0, -1.0, 1.0])[:, :d]


def from_lps(world, pts):
    """Inverse of :func:`to_lps`."""
    pts = np.asarray(pts, float)
    n, d = pts.shape
    ras = np.zeros((n, 4))
    ras[:, :d] = pts * [-1.0, -1.0, 1.0][:d]
    ras[:, 3] = 1.0
    if d == 2:
        ras[:, 2] = world[2, 3]  # the k = 0 plane
    ijk = ras @ np.linalg.inv(world).T
    return ijk[:, :d][:, ::-1]


def _direction(world, d):
    lps = np.diag([-1.0, -1.0, 1.0]) @ world[:3, :3]
    m = lps[:d, :d]
    return m / np.linalg.norm(m, axis=0)


def physical_affine(fw, mw, ndim):
    """A known physical map ``p -> Q p + c`` (LPS) taking the fixed image onto the moving one.

    Roughly the rotation between the two frames' axes, a little extra rotation and scaling, and the
    translation that takes the fixed grid's centre to the moving grid's centre.
    """
    small = _rot(0.05)[:ndim, :ndim] * np.array([1.03, 0.97, 1.0])[:ndim]
    q = _direction(mw, ndim) @ small @ _direction(fw, ndim).T
    cf = to_lps(fw, [(np.array(FIXED_SHAPE[ndim]) - 1) / 2.0])[0]
    cm = to_lps(mw, [(np.array(MOVING_SHAPE[ndim]) - 1) / 2.0])[0]
    return q, cm - q @ cf


def bump(p):
    """A smooth physical displacement (mm) added to the affine part, ``(N, D)``."""
    d = p.shape[1]
    k = np.array([0.11, -0.07, 0.05])[:d]
    return 1.5 * np.stack([np.sin(p @ k + i) for i in range(d)], axis=1)


def physical_map(fw, mw, ndim, nonlinear):
    q, c = physical_affine(fw, mw, ndim)

    def g(p):
        out = p @ q.T + c
        return out + bump(p) if nonlinear else out

    return g


def grid_points(shape):
    return np.indices(shape).reshape(len(shape), -1).T.astype(float)


def voxel_field(fw, mw, ndim, nonlinear=True):
    """``phi(x) - x`` on the fixed grid for the known physical map, ``(D, *shape)``."""
    shape = FIXED_SHAPE[ndim]
    x = grid_points(shape)
    phi = from_lps(mw, physical_map(fw, mw, ndim, nonlinear)(to_lps(fw, x)))
    return (phi - x).T.reshape((ndim, *shape))


def voxel_matrix(fw, mw, ndim):
    """The homogeneous fixed voxel -> moving voxel matrix of the affine part, by fitting points."""
    x = grid_points(FIXED_SHAPE[ndim])[::7]
    phi = from_lps(mw, physical_map(fw, mw, ndim, nonlinear=False)(to_lps(fw, x)))
    xh = np.c_[x, np.ones(len(x))]
    sol = np.linalg.lstsq(xh, phi, rcond=None)[0].T
    return np.vstack([sol, np.r_[np.zeros(ndim), 1.0]])


def read_itk_affine(text):
    """Parse an ITK affine text with plain Python: ``(matrix, translation)`` of ``p -> A p + t``."""
    fields = dict(
        line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#")
    )
    kind = fields["Transform"].strip()
    d = int(kind.rsplit("_", 1)[-1])
    assert kind == f"AffineTransform_double_{d}_{d}"
    p = np.array(fields["Parameters"].split(), float)
    centre = np.array(fields["FixedParameters"].split(), float)
    a = p[: d * d].reshape(d, d)
    return a, p[d * d :] + centre - a @ centre


CASES = ["affines", "spacings"]


# -- (a) ITK affine text ---------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("ndim", [2, 3])
def test_itk_affine_maps_fixed_physical_points_to_moving_physical_points(tmp_path, ndim, case):
    fw, mw, frames = case_frames(case, ndim)
    t = AffineTransform(voxel_matrix(fw, mw, ndim), shape=FIXED_SHAPE[ndim], **frames)
    t.save(tmp_path / "t")
    a, b = read_itk_affine((tmp_path / "t" / "affine.txt").read_text())
    g = physical_map(fw, mw, ndim, nonlinear=False)
    pts = to_lps(fw, np.random.default_rng(0).uniform(0, 10, (50, ndim)))
    np.testing.assert_allclose(pts @ a.T + b, g(pts), atol=1e-8)
    # and back into voxel coordinates with the same frames
    back = itk_text_to_affine(
        (tmp_path / "t" / "affine.txt").read_text(), fw, frames["spacing"], mw, frames["moving_spacing"]
    )
    np.testing.assert_allclose(back.matrix, t.matrix, atol=1e-9)


@pytest.mark.parametrize("ndim", [2, 3])
def test_itk_affine_of_inverse_swaps_frames(tmp_path, ndim):
    fw, mw, frames = case_frames("affines", ndim)
    t = AffineTransform(voxel_matrix(fw, mw, ndim), shape=FIXED_SHAPE[ndim], **frames)
    inv = t.inverse()
    assert inv.shape == t.moving_shape and inv.moving_shape == t.shape
    np.testing.assert_array_equal(inv.world_affine, mw)
    np.testing.assert_array_equal(inv.moving_world_affine, fw)
    inv.save(tmp_path / "inv")
    a, b = read_itk_affine((tmp_path / "inv" / "affine.txt").read_text())
    pts = to_lps(fw, np.random.default_rng(1).uniform(0, 10, (20, ndim)))
    moved = physical_map(fw, mw, ndim, nonlinear=False)(pts)
    np.testing.assert_allclose(moved @ a.T + b, pts, atol=1e-8)


@pytest.mark.parametrize("ndim", [2, 3])
def test_itk_reads_the_affine_like_numpy(tmp_path, ndim):
    itk = pytest.importorskip("itk")
    fw, mw, frames = case_frames("affines", ndim)
    AffineTransform(voxel_matrix(fw, mw, ndim), **frames).save(tmp_path / "t")
    tr = itk.transformread(str(tmp_path / "t" / "affine.txt"))[0]
    g = physical_map(fw, mw, ndim, nonlinear=False)
    for p in to_lps(fw, np.random.default_rng(2).uniform(0, 10, (5, ndim))):
        np.testing.assert_allclose(
            np.array(tr.TransformPoint([float(v) for v in p])), g(p[None])[0], atol=1e-8
        )


# -- (b) displacement NIfTI, voxel by voxel with nibabel ---------------------------------------
def _nifti_vectors(img, ndim):
    """``(X, Y[, Z], 1, D)`` NIfTI data -> vectors ``(N, D)`` in napari voxel order of the grid."""
    data = np.asarray(img.dataobj, dtype=np.float64)
    data = data[:, :, 0, 0, :] if ndim == 2 else data[:, :, :, 0, :]
    napari = data.transpose(*range(ndim)[::-1], ndim)  # (z, y, x, D)
    return napari.reshape(-1, ndim)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("ndim", [2, 3])
def test_displacement_nifti_holds_physical_moving_minus_fixed(tmp_path, ndim, case):
    fw, mw, frames = case_frames(case, ndim)
    t = DisplacementTransform(voxel_field(fw, mw, ndim), **frames)
    t.save(tmp_path / "t")
    img = nib.load(tmp_path / "t" / "displacement.nii.gz")
    assert img.header["intent_code"] == 1007
    assert img.shape == tuple(reversed(FIXED_SHAPE[ndim])) + (1,) * (4 - ndim) + (ndim,)
    np.testing.assert_allclose(img.affine, fw, atol=1e-6)  # the fixed grid's frame
    p = to_lps(fw, grid_points(FIXED_SHAPE[ndim]))
    expected = physical_map(fw, mw, ndim, nonlinear=True)(p) - p
    got = _nifti_vectors(img, ndim)
    np.testing.assert_allclose(got, expected, atol=2e-4)
    # reading the moving voxels in the fixed frame (the old convention) would be far off
    x = grid_points(FIXED_SHAPE[ndim])
    one_frame = to_lps(fw, x + t.field.reshape(ndim, -1).T) - p
    assert np.abs(one_frame - expected).max() > 1.0


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("ndim", [2, 3])
def test_inverse_displacement_nifti_lies_on_the_moving_grid(tmp_path, ndim, case):
    fw, mw, frames = case_frames(case, ndim)
    g = physical_map(fw, mw, ndim, nonlinear=False)
    q, c = physical_affine(fw, mw, ndim)
    y = grid_points(MOVING_SHAPE[ndim])
    pm = to_lps(mw, y)
    psi = from_lps(fw, (pm - c) @ np.linalg.inv(q).T)  # moving voxel -> fixed voxel
    inverse = (psi - y).T.reshape((ndim, *MOVING_SHAPE[ndim]))
    t = DisplacementTransform(voxel_field(fw, mw, ndim, nonlinear=False), inverse_field=inverse, **frames)
    assert t.moving_shape == MOVING_SHAPE[ndim]
    t.save(tmp_path / "t")
    img = nib.load(tmp_path / "t" / "inverse_displacement.nii.gz")
    assert img.shape == tuple(reversed(MOVING_SHAPE[ndim])) + (1,) * (4 - ndim) + (ndim,)
    np.testing.assert_allclose(img.affine, mw, atol=1e-6)  # the moving grid's frame
    expected = (pm - c) @ np.linalg.inv(q).T - pm
    np.testing.assert_allclose(_nifti_vectors(img, ndim), expected, atol=2e-4)
    np.testing.assert_allclose(g(pm + expected), pm, atol=1e-3)  # it undoes the forward map
    back = load_transform(tmp_path / "t")
    np.testing.assert_allclose(back.inverse_field, inverse, atol=1e-4)
    inv = back.inverse()
    assert inv.shape == MOVING_SHAPE[ndim] and inv.moving_shape == FIXED_SHAPE[ndim]
    assert inv.spacing == frames["moving_spacing"] and inv.moving_spacing == frames["spacing"]
    np.testing.assert_allclose(inv.fixed_frame(), back.moving_frame())
    np.testing.assert_allclose(inv.moving_frame(), back.fixed_frame())


def test_itk_reads_the_displacement_field_like_numpy(tmp_path):
    itk = pytest.importorskip("itk")
    fw, mw, frames = case_frames("affines", 3)
    DisplacementTransform(voxel_field(fw, mw, 3), **frames).save(tmp_path / "t")
    field = itk.imread(str(tmp_path / "t" / "displacement.nii.gz"), itk.Vector[itk.F, 3])
    dft = itk.DisplacementFieldTransform[itk.F, 3].New()
    dft.SetDisplacementField(field)
    g = physical_map(fw, mw, 3, nonlinear=True)
    for x in ([3, 4, 5], [7, 2, 11], [0, 0, 0]):  # voxel centres: no interpolation
        p = to_lps(fw, [x])[0]
        np.testing.assert_allclose(
            np.array(dft.TransformPoint([float(v) for v in p])), g(p[None])[0], atol=1e-3
        )


# -- (c) save / load round trip, moving frame included ---------------------------------------
def _frames_equal(a, b):
    assert a.spacing == b.spacing and a.moving_spacing == b.moving_spacing
    assert a.shape == b.shape and a.moving_shape == b.moving_shape
    for name in ("world_affine", "moving_world_affine"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kind", ["affine", "displacement", "composed", "identity"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("ndim", [2, 3])
def test_round_trip_keeps_the_moving_frame(tmp_path, ndim, case, kind):
    fw, mw, frames = case_frames(case, ndim)
    shape, mshape = FIXED_SHAPE[ndim], MOVING_SHAPE[ndim]
    if kind == "affine":
        t = AffineTransform(voxel_matrix(fw, mw, ndim), shape=shape, moving_shape=mshape, **frames)
    elif kind == "displacement":
        t = DisplacementTransform(voxel_field(fw, mw, ndim), moving_shape=mshape, **frames)
    elif kind == "composed":  # fixed -> fixed (displacement), then fixed -> moving (affine)
        f = DisplacementTransform(
            voxel_field(fw, fw, ndim) * 0.1,
            spacing=frames["spacing"],
            world_affine=frames.get("world_affine"),
        )
        t = ComposedTransform([f, AffineTransform(voxel_matrix(fw, mw, ndim), moving_shape=mshape, **frames)])
    else:
        t = IdentityTransform(ndim, shape=shape, moving_shape=mshape, **frames)
    t.save(tmp_path / "t")
    meta = json.loads((tmp_path / "t" / "transform.json").read_text())
    assert meta["moving_spacing"] == list(frames["moving_spacing"])
    assert meta["moving_shape"] == list(mshape)
    back = load_transform(tmp_path / "t")
    assert type(back) is type(t) and back.has_moving_frame
    _frames_equal(back, t)
    if kind == "affine":
        np.testing.assert_array_equal(back.matrix, t.matrix)
    pts = grid_points(shape)
    atol = 0 if kind in ("affine", "identity") else 1e-4  # the field passes through float32 mm
    np.testing.assert_allclose(back.map_points(pts), t.map_points(pts), atol=atol)


@pytest.mark.parametrize("spacing", [(0.5, 2.0, 1.0), (0.3, 0.7, 1.9)])
def test_round_trip_without_a_moving_frame_stays_implicit(tmp_path, spacing):
    field = voxel_field(*case_frames("spacings", 3)[:2], 3, nonlinear=True)
    t = DisplacementTransform(field, spacing=spacing)
    assert not t.has_moving_frame and t.moving_spacing == t.spacing
    t.save(tmp_path / "t")
    back = load_transform(tmp_path / "t")
    assert not back.has_moving_frame

    def check(loaded):
        if spacing == (0.5, 2.0, 1.0):  # powers of two: mm <-> voxels is exact in float32
            np.testing.assert_array_equal(loaded.field, t.field)
        else:  # a float32 rounding of the millimetre vectors, no more
            np.testing.assert_allclose(loaded.field, t.field, rtol=1e-6, atol=1e-6)

    check(back)
    # a transform.json written before the moving frame existed
    meta = json.loads((tmp_path / "t" / "transform.json").read_text())
    for key in ("moving_spacing", "moving_world_affine", "moving_shape"):
        del meta[key]
    (tmp_path / "t" / "transform.json").write_text(json.dumps(meta))
    old = load_transform(tmp_path / "t")
    assert not old.has_moving_frame and old.moving_spacing == spacing
    check(old)


def test_moving_frame_follows_a_later_fixed_affine():
    """Callers set ``world_affine`` after registration; the moving frame follows it."""
    fw, mw = world_affines(3)
    t = AffineTransform(np.eye(4))
    t.world_affine = fw
    np.testing.assert_array_equal(t.moving_world_affine, fw)
    t2 = AffineTransform(np.eye(4), spacing=(2.0, 1.1, 0.8), moving_spacing=(1.0, 1.0, 3.0))
    t2.world_affine = fw
    expected = fw.copy()
    expected[:3, :3] = fw[:3, :3] / np.linalg.norm(fw[:3, :3], axis=0) * [3.0, 1.0, 1.0]
    np.testing.assert_allclose(t2.moving_world_affine, expected)
    np.testing.assert_array_equal(t2.moving_world_affine[:3, 3], fw[:3, 3])


# -- (d) warping a moving image of another spacing through a loaded transform --------------
def moving_image(shape, seed=0):
    rng = np.random.default_rng(seed)
    return ndi.gaussian_filter(rng.random(shape), 2.0).astype(np.float32) * 10


@pytest.mark.parametrize("kind", ["displacement", "affine"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("ndim", [2, 3])
def test_loaded_transform_warps_like_map_coordinates(tmp_path, ndim, case, kind):
    fw, mw, frames = case_frames(case, ndim)
    nonlinear = kind == "displacement"
    if nonlinear:
        t = DisplacementTransform(voxel_field(fw, mw, ndim), **frames)
    else:
        t = AffineTransform(voxel_matrix(fw, mw, ndim), shape=FIXED_SHAPE[ndim], **frames)
    t.save(tmp_path / "t")
    back = load_transform(tmp_path / "t")
    moving = moving_image(MOVING_SHAPE[ndim])
    x = grid_points(FIXED_SHAPE[ndim])
    coords = from_lps(mw, physical_map(fw, mw, ndim, nonlinear)(to_lps(fw, x)))
    expected = ndi.map_coordinates(moving.astype(float), coords.T, order=1, mode="grid-constant")
    expected = expected.reshape(FIXED_SHAPE[ndim])
    warped = back.warp(moving)
    assert warped.shape == FIXED_SHAPE[ndim]
    inside = np.all((coords > 0.5) & (coords < np.array(MOVING_SHAPE[ndim]) - 1.5), axis=1)
    assert inside.mean() > 0.3  # the test compares a real overlap, not zeros
    np.testing.assert_allclose(warped, expected, atol=2e-3)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("ndim", [2, 3])
def test_warp_a_layer_of_another_resolution(tmp_path, ndim, case):
    """Labels and an image of the moving space at half the resolution of the moving image."""
    fw, mw, frames = case_frames(case, ndim)
    DisplacementTransform(voxel_field(fw, mw, ndim), **frames).save(tmp_path / "t")
    back = load_transform(tmp_path / "t")
    coarse_spacing = tuple(2.0 * s for s in back.moving_spacing)
    coarse_shape = tuple((n + 1) // 2 for n in MOVING_SHAPE[ndim])
    lw = mw.copy()  # same origin and direction, voxels twice as large
    lw[:3, :ndim] *= 2.0
    x = grid_points(FIXED_SHAPE[ndim])
    coords = from_lps(lw, physical_map(fw, mw, ndim, nonlinear=True)(to_lps(fw, x)))
    image = moving_image(coarse_shape, seed=3)
    expected = ndi.map_coordinates(image.astype(float), coords.T, order=1, mode="grid-constant")
    warped = back.warp(image, image_spacing=coarse_spacing)
    np.testing.assert_allclose(warped, expected.reshape(FIXED_SHAPE[ndim]), atol=2e-3)
    labels = (np.arange(int(np.prod(coarse_shape))) % 7 + 1).reshape(coarse_shape).astype(np.uint16)
    idx = np.floor(coords + 0.5).astype(int)
    ok = np.all((idx >= 0) & (idx < np.array(coarse_shape)), axis=1)
    # nearest neighbour is ambiguous on exact ties; compare only voxels clear of them
    clear = np.all(np.abs(coords - np.floor(coords) - 0.5) > 1e-3, axis=1)
    got = back.warp_labels(labels, image_spacing=coarse_spacing).reshape(-1)
    expected_labels = np.zeros(len(coords), np.uint16)
    expected_labels[ok] = labels[tuple(idx[ok].T)]
    np.testing.assert_array_equal(got[clear], expected_labels[clear])
    # the same frame given explicitly as an affine gives the same result
    if case == "affines":
        same = back.warp(image, image_world_affine=lw)  # spacing from its columns
        np.testing.assert_allclose(same, warped, atol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_numeric_inverse_lives_on_the_moving_grid(ndim):
    fw, mw, frames = case_frames("affines", ndim)
    t = DisplacementTransform(voxel_field(fw, mw, ndim), moving_shape=MOVING_SHAPE[ndim], **frames)
    inv = t.inverse()
    assert inv.shape == MOVING_SHAPE[ndim] and inv.moving_shape == FIXED_SHAPE[ndim]
    np.testing.assert_array_equal(inv.world_affine, mw)
    np.testing.assert_array_equal(inv.moving_world_affine, fw)
    y = grid_points(MOVING_SHAPE[ndim])
    fixed_pts = inv.map_points(y)
    inner = np.all((fixed_pts > 1) & (fixed_pts < np.array(FIXED_SHAPE[ndim]) - 2), axis=1)
    assert inner.mean() > 0.2
    np.testing.assert_allclose(t.map_points(fixed_pts[inner]), y[inner], atol=0.02)
