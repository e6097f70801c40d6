"""Overlays: Registration -> napari layer data, checked against independent computations."""

import math

import numpy as np
import pytest
import scipy.ndimage as ndi

from napari_nephi.core import (
    AffineTransform,
    DimensionMismatchError,
    DisplacementTransform,
    IdentityTransform,
    InputError,
    Registration,
)
from napari_nephi.overlays import (
    JACOBIAN_LEGEND,
    auto_line_width,
    auto_spacing,
    checkerboard,
    deformation_grid,
    difference,
    folds_layer,
    grid_as_vectors,
    grid_image,
    jacobian_layer,
    landmark_residuals,
    registration_layers,
    style_layer,
    warped_labels_layer,
)

SHAPES = {2: (40, 35), 3: (9, 40, 35)}


def translation(t):
    d = len(t)
    m = np.eye(d + 1)
    m[:d, d] = t
    return AffineTransform(m)


def grid_lines(layer):
    """(slice, axis, level) -> path, for a grid layer."""
    paths, kwargs, kind = layer
    assert kind == "shapes" and kwargs["shape_type"] == "path"
    f = kwargs["features"]
    assert len(paths) == len(f["axis"]) == len(f["level"]) == len(f["slice"])
    return {(int(s), int(a), float(v)): p for p, a, v, s in zip(paths, f["axis"], f["level"], f["slice"])}


def expected_keys(shape, slices, positions):
    """Keys of the lines a grid should have: ``positions(axis)`` gives the levels of an axis."""
    d = len(shape)
    plane = [0, 1] if d == 2 else [1, 2]
    return {(s, p, float(v)) for s in slices for p in plane for v in positions(p)}


# -- deformation grid ---------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
def test_identity_grid_is_straight_lines_at_grid_positions(ndim):
    shape = SHAPES[ndim]
    slices = [-1] if ndim == 2 else [0, 4, 8]
    layer = deformation_grid(IdentityTransform(ndim), shape, spacing_px=16, slice_step=4)
    lines = grid_lines(layer)
    assert set(lines) == expected_keys(shape, slices, lambda p: range(0, shape[p], 16))
    for (s, axis, level), path in lines.items():
        assert path.shape[1] == ndim
        if ndim == 3:
            np.testing.assert_allclose(path[:, 0], s)  # lies in its slice
        np.testing.assert_allclose(path[:, axis], level, atol=1e-6)
        other = [a for a in range(ndim) if a != axis and not (ndim == 3 and a == 0)][0]
        run = np.sort(path[:, other])
        assert run[0] == pytest.approx(0) and run[-1] == pytest.approx(shape[other] - 1)
        step = np.linalg.norm(np.diff(path, axis=0), axis=1)
        assert step.max() <= 2.0 + 1e-6 and step.min() > 0  # sampled every 2 px


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("mode", ["warped", "sampling"])
def test_translation_shifts_grid_lines(ndim, mode):
    """phi(x) = x + t: "warped" lines move by -t (with the content), "sampling" lines by +t."""
    shape = SHAPES[ndim]
    t = (1.5, 3.25, -2.5)[-ndim:]
    layer = deformation_grid(
        translation(t), shape, spacing_px=10, slice_step=4, mode=mode, scale=[2.0] * ndim
    )
    assert layer[1]["scale"] == (2.0,) * ndim
    lines = grid_lines(layer)
    slices = [-1] if ndim == 2 else [0, 4, 8]
    if mode == "warped":
        # moving grid lines c (multiples of 10) whose preimage c - t lies on the fixed grid
        levels = lambda p: [c for c in range(-20, 80, 10) if 0 <= c - t[p] <= shape[p] - 1]  # noqa: E731
        shift = -1
    else:
        levels = lambda p: range(0, shape[p], 10)  # noqa: E731
        shift = +1
    assert set(lines) == expected_keys(shape, slices, levels)
    for (_, axis, level), path in lines.items():
        np.testing.assert_allclose(path[:, axis], level + shift * t[axis], atol=1e-4)


def smooth_displacement(shape, amplitude=2.5):
    d = len(shape)
    coords = np.meshgrid(*[np.arange(n) / n for n in shape], indexing="ij")
    u = np.stack([amplitude * np.sin(2 * np.pi * coords[(i + 1) % d] + i) for i in range(d)])
    return u.astype(np.float32)


@pytest.mark.parametrize("ndim", [2, 3])
def test_warped_grid_lines_are_preimages_of_moving_grid_lines(ndim):
    """Every vertex x of a "warped" line of axis a and level c satisfies phi_a(x) = c."""
    shape = SHAPES[ndim]
    transform = DisplacementTransform(smooth_displacement(shape))
    lines = grid_lines(deformation_grid(transform, shape, spacing_px=8, slice_step=4))
    assert len(lines) > 8
    for (_, axis, level), path in lines.items():
        np.testing.assert_allclose(transform.map_points(path)[:, axis], level, atol=2e-3)


def test_warped_grid_follows_a_warped_grid_image():
    """The "warped" paths lie on the lines of a grid image painted on moving and warped."""
    shape = (96, 120)
    transform = DisplacementTransform(smooth_displacement(shape, amplitude=5.0))
    painted = np.zeros(shape, np.float32)
    painted[::16, :] = 1
    painted[:, ::16] = 1
    warped = transform.warp(painted)
    vertices = np.concatenate(deformation_grid(transform, shape, spacing_px=16)[0])
    mapped = transform.map_points(vertices)  # the painted grid only exists inside the moving image
    vertices = vertices[np.all((mapped >= 1) & (mapped <= np.asarray(shape) - 2), axis=1)]
    assert len(vertices) > 500
    on_lines = ndi.map_coordinates(warped, vertices.T, order=1)
    between = ndi.map_coordinates(warped, (vertices + 8).T, order=1, mode="nearest")  # control
    assert (on_lines > 0.3).mean() > 0.95
    assert (between > 0.3).mean() < 0.5


@pytest.mark.parametrize("ndim", [2, 3])
def test_grid_image_paints_the_grid_lines_moved_by_the_transform(ndim):
    """Planes at the voxels nearest to k * 2.1 of the moving image; a translation t moves them by -t."""
    shape = SHAPES[ndim]
    t = (2.0, 3.0, -1.0)[-ndim:]
    image = grid_image(translation(t), shape, 2.1)
    assert image.dtype == np.float32 and image.shape == shape
    for axis, n in enumerate(shape):
        lines = np.unique(np.round(np.arange(0, n - 0.5, 2.1)).astype(int))
        assert list(lines[:5]) == [0, 2, 4, 6, 8] and 11 not in lines
        profile = np.zeros(n, bool)  # fixed voxels x whose moving voxel x + t is on a line
        profile[[c - int(t[axis]) for c in lines if 0 <= c - t[axis] < n]] = True
        # along a row whose other coordinates land on moving voxel 11 (7 across the 9 slices),
        # off every other line
        row = tuple(
            slice(None) if a == axis else int((7 if shape[a] < 12 else 11) - t[a]) for a in range(ndim)
        )
        np.testing.assert_array_equal(image[row] > 0.5, profile)
    with pytest.raises(InputError, match="spacing_px must be a positive number"):
        grid_image(IdentityTransform(ndim), shape, 0)
    with pytest.raises(InputError, match="non-empty axes"):
        grid_image(IdentityTransform(ndim), shape[1:], 2.0)


def test_sampling_grid_maps_fixed_lines():
    shape = SHAPES[2]
    m = np.array([[1.1, 0.2, 3.0], [-0.1, 0.9, -1.0], [0, 0, 1]])
    lines = grid_lines(deformation_grid(AffineTransform(m), shape, spacing_px=16, mode="sampling"))
    for (_, axis, level), path in lines.items():
        other = 1 - axis
        t = np.append(np.arange(0, shape[other] - 1, 2.0), shape[other] - 1)
        fixed = np.zeros((len(t), 2))
        fixed[:, axis], fixed[:, other] = level, t
        np.testing.assert_allclose(path, fixed @ m[:2, :2].T + m[:2, 2], atol=1e-4)


def test_grid_slice_axis_and_displacement_reuse():
    shape = SHAPES[3]
    transform = translation((0.0, 1.0, 2.0))
    a = deformation_grid(transform, shape, slice_axis=2, slice_step=10)
    b = deformation_grid(
        transform, shape, slice_axis=2, slice_step=10, displacement=transform.displacement(shape)
    )
    la, lb = grid_lines(a), grid_lines(b)
    assert set(la) == set(lb)
    assert {k[0] for k in la} == {0, 10, 20, 30} and {k[1] for k in la} == {0, 1}
    for key, path in la.items():
        np.testing.assert_allclose(path[:, 2], key[0])
        np.testing.assert_allclose(path, lb[key], atol=1e-4)


def test_grid_rejects_bad_input():
    with pytest.raises(DimensionMismatchError, match="pass the shape of the fixed image"):
        deformation_grid(IdentityTransform(2), (4, 4, 4))
    with pytest.raises(InputError, match="spacing_px must be a positive number"):
        deformation_grid(IdentityTransform(2), (8, 8), spacing_px=0)
    with pytest.raises(InputError, match="edge_width must be a positive number"):
        deformation_grid(IdentityTransform(2), (8, 8), edge_width=float("nan"))
    with pytest.raises(InputError, match="mode must be one of"):
        deformation_grid(IdentityTransform(2), (8, 8), mode="forward")
    with pytest.raises(InputError, match="empty axis"):
        auto_spacing((0, 8))


# image shapes of very different sizes (aspect ratios up to 2): the MRI sample is (25, 41, 33)
GRID_SHAPES = [
    (20, 20),
    (41, 33),
    (128, 128),
    (300, 600),
    (1024, 768),
    (25, 41, 33),
    (64, 128, 96),
    (200, 160, 180),
    (200, 64, 64),  # a thick volume: its depth does not thin the in-plane grid
]


@pytest.mark.parametrize("shape", GRID_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_automatic_grid_has_10_to_20_lines_per_axis_and_thin_lines(shape):
    ndim = len(shape)
    grid = deformation_grid(IdentityTransform(ndim), shape, slice_step=1000)  # first slice in 3D
    lines = grid_lines(grid)
    s = grid[1]["metadata"]["spacing_px"]
    assert s == auto_spacing(shape[-2:])  # the in-plane axes set the spacing
    for axis in range(ndim - 2, ndim):  # the in-plane axes (all of them in 2D)
        levels = sorted({level for (_, a, level) in lines if a == axis})
        assert 10 <= len(levels) <= 20, (axis, len(levels))
        np.testing.assert_allclose(np.diff(levels), s)  # evenly spaced, s voxels apart
        assert levels[0] == 0 and levels[-1] > shape[axis] - 1 - s
    width = grid[1]["edge_width"]
    assert width == auto_line_width(shape) and 0 < width < 1  # napari data units: voxels
    assert width <= s / 4
    assert grid_as_vectors(grid)[1]["edge_width"] == width


def test_small_images_get_a_finer_grid_than_large_ones():
    """On the MRI sample the grid used to be 16 voxels: two or three lines across the image."""
    mri = (25, 41, 33)
    assert auto_spacing(mri) == pytest.approx(2.1)
    assert auto_spacing((512, 512)) == 43.0
    assert auto_spacing((6, 6)) == 1.0  # never finer than a voxel
    assert auto_line_width(mri) == pytest.approx(0.082)  # 41 voxels / 500
    assert auto_line_width((512, 512)) == pytest.approx(0.8)
    assert auto_line_width((4096, 4096)) == pytest.approx(0.8)


def analytic_phi(points, shape, amplitude):
    """phi of :func:`smooth_displacement` evaluated analytically (not from the sampled field)."""
    d = len(shape)
    x = np.asarray(points, dtype=np.float64)
    n = np.asarray(shape, dtype=np.float64)
    return np.stack(
        [x[:, i] + amplitude * np.sin(2 * np.pi * x[:, (i + 1) % d] / n[(i + 1) % d] + i) for i in range(d)],
        axis=1,
    )


@pytest.mark.parametrize("shape", [(64, 80), (25, 41, 33)], ids=["2d", "mri-3d"])
def test_automatic_grid_follows_a_known_deformation(shape):
    """Each vertex of a line of axis a and level c satisfies phi_a(x) = c for the analytic phi."""
    amplitude = 1.5
    transform = DisplacementTransform(smooth_displacement(shape, amplitude))
    grid = deformation_grid(transform, shape)
    lines = grid_lines(grid)
    s = grid[1]["metadata"]["spacing_px"]
    assert len(lines) >= 20
    for (_, axis, level), path in lines.items():
        assert level / s == pytest.approx(round(level / s))
        np.testing.assert_allclose(analytic_phi(path, shape, amplitude)[:, axis], level, atol=0.03)
    if len(shape) == 3:  # every slice has its grid, so napari's 2D view shows one on every slice
        assert {k[0] for k in lines} == set(range(shape[0]))
        assert grid[1]["metadata"]["view_3d"] == "current slice"


# -- Jacobian and folds -------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
def test_jacobian_of_uniform_scaling(ndim):
    shape = SHAPES[ndim]
    s = 1.2
    m = np.eye(ndim + 1)
    m[:ndim, :ndim] *= s
    m[:ndim, ndim] = -(s - 1) * (np.asarray(shape) - 1) / 2  # about the centre
    det, kwargs, kind = jacobian_layer(AffineTransform(m), shape, spacing=[0.5] * ndim)
    assert kind == "image" and det.shape == shape
    np.testing.assert_allclose(det, s**ndim, rtol=1e-4)
    lo, hi = kwargs["contrast_limits"]
    assert (lo + hi) / 2 == pytest.approx(1.0) and hi > s**ndim - 1e-3
    assert kwargs["scale"] == (0.5,) * ndim and kwargs["name"] == "Jacobian determinant"
    assert kwargs["metadata"]["fold_statistics"]["folds"] == 0


@pytest.mark.parametrize("ndim", [2, 3])
def test_jacobian_contrast_is_symmetric_about_one_with_a_legend(ndim):
    shape = (48, 40) if ndim == 2 else (16, 48, 40)
    u = folding_field(shape, amplitude=1.3) + smooth_displacement(shape, 3.0)
    det, kwargs, _ = jacobian_layer(DisplacementTransform(u), shape)
    lo, hi = kwargs["contrast_limits"]
    assert lo + hi == pytest.approx(2.0) and hi > 1
    r = np.percentile(np.abs(det - 1), 99.5)
    assert hi - 1 == pytest.approx(min(max(r, 0.05), 1.0), rel=1e-6)
    assert det.min() <= 0 <= lo  # folds in the darkest colour
    assert kwargs["colormap"] == "PiYG"  # pink below 1, white at 1, green above
    assert kwargs["metadata"]["legend"] == JACOBIAN_LEGEND and "1 (white)" in JACOBIAN_LEGEND
    assert kwargs["metadata"]["contrast_range"] == f"{lo:.2f} (pink) - 1 (white) - {hi:.2f} (green)"
    if ndim == 3:  # napari's 3D view: the map on one plane across the slice axis, at the middle
        assert kwargs["depiction"] == "plane"
        assert kwargs["plane"]["normal"] == (1.0, 0.0, 0.0) and kwargs["plane"]["position"][0] == 8
    else:
        assert "depiction" not in kwargs
    # nearly the identity: the range does not collapse below +-0.05
    _, kw, _ = jacobian_layer(IdentityTransform(ndim), shape)
    assert kw["contrast_limits"] == pytest.approx((0.95, 1.05))


@pytest.mark.parametrize("ndim", [2, 3])
def test_folds_counted_on_a_known_folding_field(ndim):
    """u_x = -a (x - c) within w voxels of column c, constant beyond: d phi_x / dx = 1 - a < 0 there.

    Central differences see the fold on the columns whose two neighbours are inside, |x - c| <= w - 1,
    so exactly (2 w - 1) voxels of every row are folded.
    """
    shape = (30, 50) if ndim == 2 else (6, 30, 50)
    a, c, w = 1.5, 24, 5
    x = np.arange(shape[-1], dtype=np.float64)
    ux = np.where(np.abs(x - c) <= w, -a * (x - c), -a * w * np.sign(x - c))
    u = np.zeros((ndim, *shape), np.float32)
    u[-1] = np.broadcast_to(ux, shape)
    det, _, _ = jacobian_layer(DisplacementTransform(u), shape)
    folds, kwargs, _ = folds_layer(det)
    rows = int(np.prod(shape[:-1]))
    assert kwargs["metadata"]["fold_statistics"]["folds"] == rows * (2 * w - 1) == int(folds.sum())
    np.testing.assert_array_equal(folds.any(axis=tuple(range(ndim - 1))), np.abs(x - c) <= w - 1)
    np.testing.assert_allclose(det[..., c], 1 - a, atol=1e-6)
    assert kwargs["blending"] == "translucent_no_depth"
    assert kwargs.get("rendering") == ("iso_categorical" if ndim == 3 else None)


def folding_field(shape, amplitude=1.6, sigma=4.0):
    """Field along the last axis with a fold at the centre: d phi / dx = 1 - amplitude there."""
    d = len(shape)
    coords = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    centre = [(n - 1) / 2 + 0.3 for n in shape]
    r2 = sum((c - m) ** 2 for c, m in zip(coords, centre))
    g = np.exp(-r2 / (2 * sigma**2))
    u = np.zeros((d, *shape))
    u[-1] = -amplitude * (coords[-1] - centre[-1]) * g
    u[-2] = 0.7 * np.sin(2 * np.pi * coords[-1] / shape[-1])
    return u.astype(np.float32)


def independent_det(u):
    d = u.shape[0]
    jac = np.stack([np.stack(np.gradient(u[i].astype(np.float64)), axis=-1) for i in range(d)], axis=-2)
    return np.linalg.det(jac + np.eye(d))


@pytest.mark.parametrize("ndim", [2, 3])
def test_folds_mark_exactly_nonpositive_determinant(ndim):
    shape = (24, 26) if ndim == 2 else (14, 24, 26)
    u = folding_field(shape)
    ref = independent_det(u)
    assert np.abs(ref).min() > 1e-3  # no voxel too close to 0 to decide
    det, _, _ = jacobian_layer(DisplacementTransform(u), shape)
    np.testing.assert_allclose(det, ref, atol=1e-3)
    folds, kwargs, kind = folds_layer(det, scale=[2.0] * ndim)
    assert kind == "labels" and folds.dtype == np.uint8 and kwargs["name"] == "folds"
    np.testing.assert_array_equal(folds, (ref <= 0).astype(np.uint8))
    stats = kwargs["metadata"]["fold_statistics"]
    assert stats["folds"] == int((ref <= 0).sum()) > 0
    assert stats["fold_percent"] == pytest.approx(100 * (ref <= 0).mean())


# -- labels, comparisons, landmarks ---------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
def test_warped_labels_keep_dtype_and_values(ndim):
    shape = SHAPES[ndim]
    labels = np.zeros(shape, dtype=np.uint16)
    labels[(slice(2, 7),) * ndim] = 5
    labels[(slice(3, 8),) * (ndim - 1) + (slice(15, 25),)] = 300
    labels[(slice(4, 8),) * (ndim - 1) + (slice(28, 32),)] = 1000
    before = labels.copy()
    t = (1, 2, -1)[-ndim:]
    data, kwargs, kind = warped_labels_layer(translation(t), labels, shape)
    assert kind == "labels" and data.dtype == np.uint16 and kwargs["name"] == "warped labels"
    expected = np.zeros_like(labels)  # expected[x] = labels[x + t], 0 outside
    dst = tuple(slice(max(0, -ti), n - max(0, ti)) for ti, n in zip(t, shape))
    src = tuple(slice(max(0, ti), n + min(0, ti)) for ti, n in zip(t, shape))
    expected[dst] = labels[src]
    np.testing.assert_array_equal(data, expected)
    assert set(np.unique(data)) == {0, 5, 300, 1000}
    np.testing.assert_array_equal(labels, before)


def binary_pair(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random(shape) > 0.5) * 10.0, (rng.random(shape) > 0.5) * 3.0  # normalise to 0/1


@pytest.mark.parametrize("ndim", [2, 3])
def test_checkerboard_alternates_tiles(ndim):
    shape = (32, 24) if ndim == 2 else (8, 32, 24)
    fixed, warped = binary_pair(shape)
    out, kwargs, kind = checkerboard(fixed, warped, tiles=4)
    assert kind == "image" and out.shape == shape and kwargs["contrast_limits"] == (0.0, 1.0)
    for index in np.ndindex(*shape):
        tile = sum(math.floor(i * min(4, n) / n) for i, n in zip(index, shape))
        source = fixed / 10 if tile % 2 == 0 else warped / 3
        assert out[index] == source[index]
    # neighbouring tiles along the last axis come from different images
    step = shape[-1] // 4
    first = (0,) * (ndim - 1)
    np.testing.assert_array_equal(out[first + (slice(0, step),)], fixed[first + (slice(0, step),)] / 10)
    np.testing.assert_array_equal(
        out[first + (slice(step, 2 * step),)], warped[first + (slice(step, 2 * step),)] / 3
    )


def test_difference_of_normalised_images():
    fixed, warped = binary_pair((30, 20))
    diff, kwargs, _ = difference(fixed, warped)
    np.testing.assert_allclose(diff, fixed / 10 - warped / 3)
    lo, hi = kwargs["contrast_limits"]
    assert lo == -hi and hi > 0
    same, _, _ = difference(fixed, fixed * 7 + 2)
    np.testing.assert_allclose(same, 0, atol=1e-6)
    with pytest.raises(DimensionMismatchError):
        difference(fixed, warped[:10])


@pytest.mark.parametrize("ndim", [2, 3])
def test_landmark_residuals(ndim):
    rng = np.random.default_rng(1)
    m = np.eye(ndim + 1)
    m[:ndim, :ndim] += rng.uniform(-0.1, 0.1, (ndim, ndim))
    m[:ndim, ndim] = rng.uniform(-3, 3, ndim)
    transform = AffineTransform(m)
    fixed_pts = rng.uniform(0, 30, (6, ndim))
    exact = fixed_pts @ m[:ndim, :ndim].T + m[:ndim, ndim]
    _, stats = landmark_residuals(transform, fixed_pts, exact)
    assert stats["tre_max"] < 1e-4 and len(stats["tre_per_point"]) == 6

    spacing = (3.0, 0.5, 2.0)[-ndim:]
    offset = np.array([1.0, 2.0, -4.0][-ndim:])
    (data, kwargs, kind), stats = landmark_residuals(transform, fixed_pts, exact + offset, spacing)
    want = np.linalg.norm(offset * spacing)
    assert kind == "vectors" and data.shape == (6, 2, ndim) and kwargs["scale"] == spacing
    np.testing.assert_allclose(data[:, 0], exact, atol=1e-4)  # starts at the mapped fixed landmark
    np.testing.assert_allclose(data[:, 1], np.broadcast_to(offset, (6, ndim)), atol=1e-4)
    np.testing.assert_allclose(stats["tre_per_point"], want, rtol=1e-5)
    assert stats["tre_mean"] == pytest.approx(want, rel=1e-5) == stats["tre_max"]
    assert kwargs["metadata"]["tre"] == stats
    with pytest.raises(InputError):
        landmark_residuals(transform, fixed_pts, exact[:4])


# -- everything together --------------------------------------------------------------------


def make_registration(ndim):
    shape = SHAPES[ndim]
    transform = translation((0.5, 1.0, -2.0)[-ndim:])
    rng = np.random.default_rng(2)
    moving = rng.random(shape).astype(np.float32)
    return Registration(warped=transform.warp(moving), transform=transform), shape


@pytest.mark.parametrize("ndim", [2, 3])
def test_registration_layers(ndim):
    reg, shape = make_registration(ndim)
    labels = np.zeros(shape, np.int32)
    labels[(slice(2, 6),) * ndim] = 7
    pts = np.full((3, ndim), 4.0) + np.arange(3)[:, None]
    scale = (4.0, 0.5, 0.5)[-ndim:]
    layers = registration_layers(
        reg,
        shape,
        labels,
        pts,
        reg.transform.map_points(pts),
        scale=scale,
        name_prefix="r1 ",
        fixed=reg.warped,
    )
    names = [kw["name"] for _, kw, _ in layers]
    assert names == [
        "r1 checkerboard",
        "r1 difference",
        "r1 Jacobian determinant",
        "r1 folds",
        "r1 deformation grid",
        "r1 warped labels",
        "r1 landmark residuals",
    ]
    assert [kind for _, _, kind in layers] == [
        "image",
        "image",
        "image",
        "labels",
        "shapes",
        "labels",
        "vectors",
    ]
    assert all(kw["scale"] == scale for _, kw, _ in layers)
    np.testing.assert_allclose(layers[2][0], 1.0, atol=1e-4)  # translation: no volume change
    assert not layers[3][0].any()
    assert layers[6][1]["metadata"]["tre"]["tre_max"] < 1e-4
    assert set(np.unique(layers[5][0])) == {0, 7}


def test_layer_data_builds_napari_layers():
    layers_mod = pytest.importorskip("napari.layers")
    for ndim in (2, 3):
        reg, shape = make_registration(ndim)
        labels = np.ones(shape, np.uint8)
        pts = np.full((2, ndim), 5.0)
        for data, kwargs, kind in registration_layers(
            reg, shape, labels, pts, pts + 1, fixed=reg.warped, include_warped=True
        ):
            layer = getattr(layers_mod, kind.capitalize())(data, **kwargs)
            assert layer.ndim == ndim
        # phi in [501, 505]: no moving grid line (multiples of 16) reaches this small fixed grid
        grid = deformation_grid(translation((501.0,) * ndim), (5,) * ndim, spacing_px=16)
        assert grid[0] == []
        assert layers_mod.Shapes(grid[0], **grid[1]).nshapes == 0


@pytest.mark.parametrize("ndim", [2, 3])
def test_grid_as_vectors_draws_the_same_segments(ndim):
    shape = (40, 48) if ndim == 2 else (12, 40, 48)
    rng = np.random.default_rng(0)
    field = ndi.gaussian_filter(rng.normal(size=(ndim, *shape)), (0,) + (6,) * ndim) * 20
    grid = deformation_grid(
        DisplacementTransform(field.astype(np.float32)), shape, spacing_px=8, slice_step=4
    )
    paths, kwargs, _ = grid
    data, vkw, kind = grid_as_vectors(grid)
    assert kind == "vectors" and vkw["name"] == kwargs["name"] and vkw["vector_style"] == "line"
    assert data.shape == (sum(len(p) - 1 for p in paths), 2, ndim)
    # every segment joins two consecutive vertices of a path, in order, and carries its path's features
    np.testing.assert_allclose(data[:, 0] + data[:, 1], np.concatenate([p[1:] for p in paths]))
    np.testing.assert_allclose(data[:, 0], np.concatenate([p[:-1] for p in paths]))
    owner = np.repeat(np.arange(len(paths)), [len(p) - 1 for p in paths])
    np.testing.assert_array_equal(vkw["features"]["level"], kwargs["features"]["level"][owner])
    if ndim == 3:  # each segment stays in its slice, so napari shows it there
        assert np.all(data[:, 1, 0] == 0)
    with pytest.raises(InputError, match="Shapes layer data"):
        grid_as_vectors((data, vkw, kind))


# -- styling live napari layers ---------------------------------------------------------------


def mri_like_result(shape=(25, 41, 33), scale=(2.0, 2.0, 2.0)):
    transform = DisplacementTransform(smooth_displacement(shape, 1.5))
    reg = Registration(warped=np.zeros(shape, np.float32), transform=transform)
    layers = registration_layers(reg, shape, scale=scale, grid_style="vectors")
    return {kw["name"]: (data, kw, kind) for data, kw, kind in layers}


def test_style_layer_shows_the_jacobian_colour_bar():
    components = pytest.importorskip("napari.components")
    viewer = components.ViewerModel()
    layers = mri_like_result()
    jac = viewer.add_image(layers["Jacobian determinant"][0], **layers["Jacobian determinant"][1])
    folds = viewer.add_labels(layers["folds"][0], **layers["folds"][1])
    assert not jac.colorbar.visible
    for layer in (jac, folds):
        style_layer(layer)
    assert jac.colorbar.visible and jac.colormap.name == "PiYG"
    lo, hi = jac.contrast_limits
    assert lo + hi == pytest.approx(2.0)
    assert folds.blending == "translucent_no_depth"


def test_style_layer_keeps_the_3d_view_on_the_current_slice():
    components = pytest.importorskip("napari.components")
    viewer = components.ViewerModel()
    layers = mri_like_result()
    data, kwargs, kind = layers["deformation grid"]
    assert kind == "vectors"
    grid = viewer.add_vectors(data, **kwargs)
    jdata, jkw, _ = layers["Jacobian determinant"]
    jac = viewer.add_image(jdata, **jkw)
    for layer in (grid, jac, grid):  # a second call on the grid changes nothing
        style_layer(layer, viewer)
    n_all = len(data)
    assert len(grid.data) == n_all  # 2D view: every slice keeps its lines
    viewer.dims.set_point(0, 2.0 * 7)  # world coordinates: slice 7 of 2 mm voxels
    viewer.dims.ndisplay = 3
    starts = np.asarray(grid.data)[:, 0, 0]
    assert 0 < len(starts) < n_all / 10 and np.all(starts == 7)
    np.testing.assert_array_equal(grid.features["slice"], 7)
    np.testing.assert_allclose(grid.data, data[data[:, 0, 0] == 7])  # the same segments, unchanged
    assert jac.depiction == "plane" and jac.plane.position[0] == 7
    viewer.dims.ndisplay = 2
    assert len(grid.data) == n_all
    np.testing.assert_allclose(grid.data, data)
    assert len(grid.features) == n_all
    viewer.dims.set_point(0, 2.0 * 12)  # another slice in 2D, then 3D again: that slice
    viewer.dims.ndisplay = 3
    assert np.all(np.asarray(grid.data)[:, 0, 0] == 12) and jac.plane.position[0] == 12
    # a new run replaces data and features while the 3D view is on (as the widget's in-place
    # update does): shown whole until style_layer is called again, then cut the same way
    viewer.dims.ndisplay = 3
    grid.data = data[::2]
    grid.features = {k: v[::2] for k, v in kwargs["features"].items()}
    assert len(grid.data) == len(data[::2])
    style_layer(grid, viewer)
    assert np.all(np.asarray(grid.data)[:, 0, 0] == 12) and np.all(grid.features["slice"] == 12)
    viewer.dims.ndisplay = 2
    assert len(grid.data) == len(data[::2]) == len(grid.features)
    viewer.layers.remove(grid)
    viewer.dims.ndisplay = 2  # no error once the layer is gone


def test_style_layer_leaves_a_shapes_grid_whole():
    """Paths (``grid_style="paths"``) are not cut: napari's 3D view shows them all, thin."""
    components = pytest.importorskip("napari.components")
    viewer = components.ViewerModel()
    shape = (6, 20, 24)
    paths, kwargs, kind = deformation_grid(DisplacementTransform(smooth_displacement(shape, 1.0)), shape)
    assert kind == "shapes"
    grid = viewer.add_shapes(paths, **kwargs)
    style_layer(grid, viewer)
    viewer.dims.ndisplay = 3
    assert grid.nshapes == len(paths) and 0 < grid.edge_width[0] < 1
