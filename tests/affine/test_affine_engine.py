"""The affine engine: known maps recovered in 2D and 3D for every kind, large rotations found by the
search, options validated, masks honoured, progress counted and cancel obeyed.

Moving images are made with scipy's cubic resampling (not the engine's warps) from real images:
scikit-image's camera (128 x 128) and nibabel's ``anatomical.nii`` (33 x 41 x 25, 2 mm voxels).
"""

import threading

import numpy as np
import pytest
import scipy.ndimage as ndi
import skimage.data
from scipy.spatial.transform import Rotation

import napari_nephi as nn
from napari_nephi.core import device as device_module


def rotation(d: int, axis: int, degrees: float) -> np.ndarray:
    """Rotation by ``degrees`` about main axis ``axis`` (scipy's rotation vectors; in 2D the plane's)."""
    if d == 2:
        return Rotation.from_rotvec([0, 0, np.deg2rad(degrees)]).as_matrix()[:2, :2]
    return Rotation.from_rotvec(np.deg2rad(degrees) * np.eye(3)[axis]).as_matrix()


def voxel_map(linear, shift, shape, spacing=None) -> np.ndarray:
    """Voxel map of ``y = A x + t`` about the image centre in physical units (shift in voxels):
    ``x -> S^-1 A S (x - c) + c + shift`` with ``S`` the spacing and ``c`` the centre voxel."""
    d = len(shape)
    sp = np.ones(d) if spacing is None else np.asarray(spacing, float)
    a = np.asarray(linear, float) * sp[None, :] / sp[:, None]
    c = (np.asarray(shape, float) - 1) / 2
    return np.block(
        [[a, (c + np.asarray(shift, float) - a @ c)[:, None]], [np.zeros((1, d)), np.ones((1, 1))]]
    )


def make_moving(fixed: np.ndarray, m: np.ndarray, mode: str = "reflect") -> np.ndarray:
    """``moving(m x) = fixed(x)`` by scipy's cubic resampling (independent of the engine's warps).

    ``mode="constant"`` fills with the background (the 1st percentile)."""
    cval = float(np.percentile(fixed, 1)) if mode == "constant" else 0.0
    return ndi.affine_transform(fixed, np.linalg.inv(m), order=3, mode=mode, cval=cval).astype(np.float32)


def map_error(transform, m: np.ndarray, shape) -> np.ndarray:
    """Endpoint error (voxels) of ``transform`` against the true map ``m`` on every voxel."""
    idx = np.indices(shape).reshape(len(shape), -1).astype(float)
    truth = m[:-1, :-1] @ idx + m[:-1, -1:]
    found = transform.map_points(idx.T).T
    return np.linalg.norm(found - truth, axis=0)


def scaled_shear(d: int, scale, shear: float) -> np.ndarray:
    a = np.diag(np.asarray(scale, float))
    a[0, 1] = shear
    return a


CASES_2D = {
    "translation": (np.eye(2), (6.3, -4.7)),
    "rigid": (rotation(2, 0, 12), (3.5, -2.0)),
    "similarity": (1.07 * rotation(2, 0, -8), (-2.5, 3.0)),
    "affine": (rotation(2, 0, 5) @ scaled_shear(2, (1.06, 0.95), 0.05), (2.0, 3.5)),
}


@pytest.mark.parametrize("kind", list(CASES_2D))
def test_2d_known_map_recovered(camera128, kind):
    a, shift = CASES_2D[kind]
    m = voxel_map(a, shift, camera128.shape)
    reg = nn.register(camera128, make_moving(camera128, m), kind=kind)
    err = map_error(reg.transform, m, camera128.shape)
    assert err.mean() < 0.1 and err.max() < 0.3, (err.mean(), err.max())
    assert reg.settings["kind"] == kind
    assert reg.metrics["ncc_after"] > max(0.99, reg.metrics["ncc_before"])


CASES_3D = {
    "translation": (np.eye(3), (1.5, -2.2, 2.6)),
    "rigid": (rotation(3, 1, 9) @ rotation(3, 0, -6), (1.2, 2.0, -1.5)),
    "similarity": (1.05 * rotation(3, 2, 7), (-1.0, 1.5, 1.0)),
    "affine": (rotation(3, 0, 5) @ scaled_shear(3, (1.05, 0.96, 1.0), 0.04), (1.0, -1.0, 1.5)),
}


@pytest.mark.parametrize("kind", list(CASES_3D))
def test_3d_known_map_recovered(anatomical, kind):
    vol, spacing = anatomical
    a, shift = CASES_3D[kind]
    m = voxel_map(a, shift, vol.shape, spacing)
    reg = nn.register(vol, make_moving(vol, m, "constant"), kind=kind, spacing=spacing)
    err = map_error(reg.transform, m, vol.shape)
    assert err.mean() < 0.15 and err.max() < 0.4, (err.mean(), err.max())


@pytest.mark.parametrize("angle", [90, -90, 170, -135])
@pytest.mark.parametrize("kind", ["rigid", "affine"])
def test_2d_large_rotation_found_by_the_search(camera128, angle, kind):
    m = voxel_map(rotation(2, 0, angle), (3.0, -2.0), camera128.shape)
    reg = nn.register(camera128, make_moving(camera128, m), kind=kind)
    err = map_error(reg.transform, m, camera128.shape)
    assert err.max() < 0.3, err.max()


def test_2d_large_rotation_needs_the_search(camera128):
    m = voxel_map(rotation(2, 0, 170), (3.0, -2.0), camera128.shape)
    reg = nn.register(camera128, make_moving(camera128, m), kind="rigid", rotation_search=False)
    assert map_error(reg.transform, m, camera128.shape).mean() > 20


@pytest.mark.parametrize("axis,angle", [(0, 120), (1, -90), (2, 150)])
def test_3d_large_rotation_about_a_main_axis_found(anatomical, axis, angle):
    vol, spacing = anatomical
    m = voxel_map(rotation(3, axis, angle), (1.0, -1.0, 0.5), vol.shape, spacing)
    reg = nn.register(vol, make_moving(vol, m, "constant"), kind="rigid", spacing=spacing)
    err = map_error(reg.transform, m, vol.shape)
    assert err.mean() < 0.3, err.mean()


def test_identical_images_give_the_identity(camera128):
    reg = nn.register(camera128, camera128, kind="affine")
    np.testing.assert_allclose(reg.transform.matrix, np.eye(3), atol=1e-3)


@pytest.mark.parametrize("similarity", ["mse", "nmi", "lncc"])
def test_other_similarities_recover_a_rigid_map(camera128, similarity):
    m = voxel_map(rotation(2, 0, 6), (2.5, -3.5), camera128.shape)
    reg = nn.register(camera128, make_moving(camera128, m), kind="rigid", similarity=similarity)
    assert map_error(reg.transform, m, camera128.shape).max() < 0.5


def test_inverted_contrast_with_nmi(camera128):
    """NMI does not need the same contrast: an inverted moving image is still aligned."""
    m = voxel_map(rotation(2, 0, 4), (3.0, 2.0), camera128.shape)
    moving = 255 - make_moving(camera128, m)
    reg = nn.register(camera128, moving, kind="rigid", similarity="nmi", rotation_search=False)
    assert map_error(reg.transform, m, camera128.shape).max() < 0.5


def test_anisotropic_3d_spacing(anatomical):
    """A rotation in physical space on (2, 1, 1) voxels is not a voxel rotation; rigid still finds it."""
    vol, _ = anatomical
    spacing = (2.0, 1.0, 1.0)
    m = voxel_map(rotation(3, 0, 8), (1.0, 1.5, -1.0), vol.shape, spacing)
    reg = nn.register(vol, make_moving(vol, m, "constant"), kind="rigid", spacing=spacing)
    assert map_error(reg.transform, m, vol.shape).max() < 0.4


def test_3d_moving_spacing_differs(anatomical):
    """Every other slice of the same volume (4 mm apart) maps fixed slice z to moving slice z / 2."""
    vol, spacing = anatomical
    moving = vol[::2].copy()
    msp = (2 * spacing[0], spacing[1], spacing[2])
    reg = nn.register(vol, moving, kind="rigid", spacing=spacing, moving_spacing=msp)
    pts = np.indices(vol.shape).reshape(3, -1).T.astype(float)
    np.testing.assert_allclose(reg.transform.map_points(pts), pts * [0.5, 1, 1], atol=0.3)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"iterations": -5}, "iterations must be at least 0"),
        ({"iterations": "abc"}, "iterations must be a whole number, got 'abc'"),
        ({"iterations": 2.5}, "iterations must be a whole number"),
        ({"iterations": [10, 10], "levels": 3}, "one count per level"),
        ({"iterations": [10, -1]}, r"iterations\[1\] must be at least 0"),
        ({"learning_rate": float("nan")}, "learning_rate must be a finite number"),
        ({"learning_rate": float("inf")}, "learning_rate must be a finite number"),
        ({"learning_rate": 0}, "learning_rate must be greater than 0"),
        ({"learning_rate": "fast"}, "learning_rate must be a number"),
        ({"levels": 0}, "levels must be at least 1"),
        ({"levels": True}, "levels must be a whole number"),
        ({"rotation_step": 1}, "rotation_step must be at least 5"),
        ({"rotation_step": float("nan")}, "rotation_step must be a finite number"),
        ({"rotation_search": "yes"}, "rotation_search must be true or false"),
        ({"samples": 10}, "samples must be at least 64"),
        ({"tolerance": -1e-3}, "tolerance must be at least 0"),
        ({"seed": -1}, "seed must be at least 0"),
        ({"init": "random"}, "init must be one of 'search', 'center', 'identity'"),
        ({"similarity": "ssd"}, "similarity must be one of"),
        ({"kind": "shear"}, "Unknown affine kind 'shear'"),
        ({"moving_spacing": "abc"}, "moving_spacing must be 2 finite positive numbers"),
        ({"moving_spacing": (1.0, 0.0)}, "moving_spacing must be 2 finite positive numbers"),
        ({"iteratons": 10}, "Unknown option for method 'affine': 'iteratons' .did you mean 'iterations'"),
    ],
)
def test_bad_options_are_refused_clearly(camera128, options, message):
    with pytest.raises(nn.InputError, match=message):
        nn.register(camera128, camera128, **options)


def test_iterations_list_longer_than_the_image_allows(camera128):
    with pytest.raises(nn.InputError, match="gives 9 counts but the images allow 5 levels"):
        nn.register(camera128, camera128, iterations=[5] * 9)


def test_memory_estimate_refuses_what_does_not_fit(camera128, monkeypatch):
    monkeypatch.setattr(device_module, "available_memory_bytes", lambda device: 1 << 16)
    with pytest.raises(
        nn.OutOfMemoryError, match=r"affine registration needs about [0-9.]+ [MG]iB but only .*Downsample"
    ):
        nn.register(camera128, camera128, device="cpu")


def test_fixed_mask_excludes_what_does_not_match(camera128):
    """Half of the moving image is replaced by noise: with a fixed mask on the other half the map is exact."""
    m = voxel_map(rotation(2, 0, 5), (4.0, -3.0), camera128.shape)
    moving = make_moving(camera128, m)
    moving[:, 64:] = np.random.default_rng(1).uniform(0, 255, (128, 64))
    mask = np.zeros(camera128.shape, bool)
    mask[8:120, 8:52] = True  # maps into the untouched left half of the moving image
    reg = nn.register(camera128, moving, kind="rigid", fixed_mask=mask)
    assert map_error(reg.transform, m, camera128.shape).max() < 0.5


def test_moving_mask_excludes_what_does_not_match(camera128):
    m = voxel_map(rotation(2, 0, -5), (-3.0, 4.0), camera128.shape)
    moving = make_moving(camera128, m)
    moving[70:, :] = np.random.default_rng(2).uniform(0, 255, (58, 128))
    mask = np.zeros(camera128.shape, bool)
    mask[:64] = True
    reg = nn.register(camera128, moving, kind="rigid", moving_mask=mask)
    assert map_error(reg.transform, m, camera128.shape).max() < 0.5


def test_progress_counts_every_step_and_ends_at_the_total(camera128):
    events = []
    m = voxel_map(rotation(2, 0, 30), (2.0, 1.0), camera128.shape)
    reg = nn.register(camera128, make_moving(camera128, m), kind="rigid", progress=events.append)
    assert [e.step for e in events] == list(range(1, len(events) + 1))
    assert events[-1].step == events[-1].total == reg.metrics["iterations"]
    assert all(e.step <= e.total and np.isfinite(e.loss) for e in events)
    stages = ["rotation search", "rotation refinement", "level 1/2", "level 2/2", "resampling"]
    assert list(dict.fromkeys(e.stage for e in events)) == stages
    assert events[-1].loss < events[0].loss


def test_progress_previews_are_on_the_level_grid(camera128):
    previews = []

    def callback(ev):
        if ev.preview is not None:
            previews.append((ev.preview.shape, ev.extra["preview_zoom"]))

    nn.register(camera128, camera128[::-1].copy(), kind="translation", progress=callback)
    assert previews, "no preview was sent"
    for shape, zoom in previews:
        assert shape == tuple(int(np.ceil(128 / z)) for z in zoom)


def test_large_levels_are_previewed_on_a_coarser_grid(camera128, monkeypatch):
    """Over PREVIEW_VOXELS a level is previewed on a strided grid: the fixed image there, under identity."""
    from napari_nephi.engines.affine import engine as affine_engine

    monkeypatch.setattr(affine_engine, "PREVIEW_VOXELS", 900)
    previews = []

    def callback(ev):
        if ev.preview is not None:
            previews.append((ev.preview, np.asarray(ev.extra["preview_zoom"])))

    nn.register(camera128, camera128.copy(), kind="translation", progress=callback)
    assert previews, "no preview was sent"
    assert max(z.max() for _, z in previews) >= 4  # the finest level (zoom 1) was strided
    for img, zoom in previews:
        assert img.size <= 900
        assert img.shape == tuple(int(np.ceil(128 / z)) for z in zoom)
    img, zoom = previews[-1]
    centres = [np.minimum((np.arange(n) + 0.5) * z - 0.5, 127) for n, z in zip(img.shape, zoom)]
    expected = ndi.map_coordinates(camera128, np.meshgrid(*centres, indexing="ij"), order=1)
    assert np.corrcoef(img.ravel(), expected.ravel())[0, 1] > 0.9


def test_preview_stride_halves_the_largest_axes_first():
    from napari_nephi.engines.affine.engine import preview_stride

    assert preview_stride((256, 256, 256), 2**21).tolist() == [2, 2, 2]
    assert preview_stride((256, 64, 64), 2**18).tolist() == [4, 1, 1]
    assert preview_stride((100, 100), 10**4).tolist() == [1, 1]
    assert preview_stride((5,), 1).tolist() == [8]


def test_cancel_stops_at_the_step_it_is_set(camera128):
    events = []
    cancel = threading.Event()

    def callback(ev):
        events.append(ev)
        if ev.step == 30:  # inside the refinement of the rotation candidates
            cancel.set()

    with pytest.raises(nn.Cancelled):
        nn.register(camera128, camera128, kind="rigid", progress=callback, cancel=cancel)
    assert [e.step for e in events] == list(range(1, 31))


@pytest.mark.parametrize("which", ["fixed_mask", "moving_mask"])
def test_small_mask_on_a_large_image(which):
    """A 20 x 20 mask on a 512 x 512 image vanishes from the coarse levels; those are skipped, not failed."""
    camera = skimage.data.camera().astype(np.float32)
    m = voxel_map(np.eye(2), (2.5, -1.5), camera.shape)
    mask = np.zeros(camera.shape, bool)
    mask[200:220, 250:270] = True
    reg = nn.register(camera, make_moving(camera, m), kind="translation", **{which: mask})
    np.testing.assert_allclose(reg.transform.matrix, m, atol=0.2)


@pytest.mark.parametrize("seed", range(6))
def test_2d_random_rotation_scale_and_shift(camera128, seed):
    """Any angle, scale 0.9-1.1 and a shift up to 12 px (drawn from a seeded generator)."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.9, 1.1) * rotation(2, 0, rng.uniform(-180, 180))
    m = voxel_map(a, rng.uniform(-12, 12, 2), camera128.shape)
    reg = nn.register(camera128, make_moving(camera128, m), kind="similarity")
    assert map_error(reg.transform, m, camera128.shape).max() < 0.3


def test_3d_rotation_about_two_axes(anatomical):
    """Not on the search grid (it tries the main axes): 70 deg about x then 40 deg about z."""
    vol, spacing = anatomical
    m = voxel_map(rotation(3, 0, 40) @ rotation(3, 2, 70), (1.5, -1.0, 2.0), vol.shape, spacing)
    reg = nn.register(vol, make_moving(vol, m, "constant"), kind="rigid", spacing=spacing)
    assert map_error(reg.transform, m, vol.shape).mean() < 0.3


def test_a_start_next_to_the_unrotated_one_is_refined_too_where_it_scores_better():
    """The unrotated start blocks its neighbours (within ``min_angle``) from the ``count`` distinct starts;
    the best of them is refined as one more where it scores better than the unrotated start (session 24:
    it was never refined, whatever it scored). The far starts keep their slots."""
    from napari_nephi.engines.affine.search import pick_distinct, rotation_candidates

    rotations = rotation_candidates(2, 15.0)  # 0, 15, 30, ..., 345 degrees
    scores = [0.4, 0.8, 0.6] + [0.1] * 20 + [0.7]  # 15 degrees best, then -15, then 30
    assert pick_distinct(scores, rotations, 3, 22.5) == [0, 2, 4, 1]
    # a neighbour scoring no better than the unrotated start is not added
    scores = [0.9, 0.8, 0.6] + [0.1] * 20 + [0.7]
    assert pick_distinct(scores, rotations, 3, 22.5) == [0, 2, 4]


def test_coins_turned_20_degrees_with_a_smooth_field_found_by_the_search():
    """Coins (128 px) under a 2 % smooth field, then turned by 20 degrees and shifted: the +15-degree
    start scores best on the search grid, and is refined. Session 24 (review 2, B-new2): the search
    dropped it and ended at -157.7 degrees (NCC 0.63)."""
    from skimage.transform import resize

    from napari_nephi.core.transform import DisplacementTransform
    from napari_nephi.synthetic import random_smooth_displacement

    coins = skimage.data.coins().astype(np.float32) / 255
    fixed = resize(coins, (128, 128), order=1, anti_aliasing=True).astype(np.float32)
    smooth = float(np.random.default_rng(197).uniform(0.03, 0.06)) * 128
    _, u_inv = random_smooth_displacement(fixed.shape, 0.02 * 128, smooth, seed=197, return_inverse=True)
    warped = np.asarray(DisplacementTransform(u_inv).warp(fixed), np.float32)
    m = voxel_map(rotation(2, 0, 20), (1.875, -1.0), fixed.shape)
    reg = nn.register(fixed, make_moving(warped, m, "nearest"), kind="rigid")
    found = reg.transform.matrix
    angle = np.degrees(np.arctan2(found[1, 0], found[0, 0]))
    assert abs(angle - 20) < 1, angle
    assert reg.metrics["ncc_after"] > 0.9, reg.metrics["ncc_after"]


def test_coins_turned_about_the_centre_not_a_lattice_step_off():
    """Coins (128 px) turned by -22.56 degrees about the centre: on the search grid every start's best FFT
    shift is a step of the coin lattice on a small overlap (66-88 px), so the refined starts kept a right
    turn with a translation a lattice step off (corner error 67 px; session 27's coins turn, which only the
    nephi global stage's turned map rescued). Each start's centred twin (its turn about the centre,
    refined) is compared too: the map is found within half a pixel, and the twin is recorded as kept."""
    from skimage.transform import resize

    coins = skimage.data.coins().astype(np.float32)
    fixed = resize(coins, (128, 128), anti_aliasing=True).astype(np.float32)
    m = voxel_map(rotation(2, 0, -22.56), (0.0, 0.0), fixed.shape)
    reg = nn.register(fixed, make_moving(fixed, m, "nearest"), method="affine", kind="rigid")
    assert map_error(reg.transform, m, fixed.shape).max() < 0.5
    twins = reg.metrics["search_twins"]
    assert any(t["kept"] for t in twins), twins
    assert all(t["shift"] > 0.02 * 127 for t in twins), twins


@pytest.mark.parametrize("shift", [45, 55])
def test_a_large_real_shift_is_not_lost_to_the_centred_twin(shift):
    """Two 128 px windows of coins (256 px) shifted by (s, s): the right start keeps 33-42 % of the image
    and the centred twin (no translation) 85 %. The twin must not raise the starts' overlap bar and drop
    the right start (review 2 of session 28: 45 px kept a wrong start, 55 px kept the twin): it is kept only
    where it passes the starts' own bar and beats the chosen one. The window's centre maps within 0.5 px."""
    from skimage.transform import resize

    big = resize(skimage.data.coins().astype(np.float32), (256, 256), anti_aliasing=True).astype(np.float32)
    fixed = big[40:168, 40:168].copy()
    moving = big[40 + shift : 168 + shift, 40 + shift : 168 + shift].copy()
    reg = nn.register(fixed, moving, method="affine", kind="rigid")
    centre = np.asarray(reg.transform.matrix) @ np.array([63.5, 63.5, 1.0])
    assert np.abs(centre[:2] - (63.5 - shift)).max() < 0.5, (centre, reg.metrics["search_twins"])
    assert not any(t["kept"] for t in reg.metrics["search_twins"])


@pytest.mark.parametrize("similarity", ["ncc", "nmi"])
def test_a_refined_start_with_a_small_overlap_is_not_kept(monkeypatch, similarity):
    """skimage's cell (128 px) under a 2 % smooth field, turned by 170 degrees: its bright disk matches the
    disk under a turn of 8 degrees and a large shift, with NCC 0.976 on 37 % of the image, above the turned
    start's 0.971 on 94 %. Compared only among the starts that keep at least half the largest overlap, the
    map keeps the overlap and the turn is within 20 degrees (the disk leaves only the faint background to
    fix the rest: NCC ends 13 degrees off, NMI 16); by NCC alone (session 24) it ends at 8 degrees. NMI is
    judged the same way (review 1 of session 25, B1: it ended 164 degrees off). Since session 28 the
    180-degree start's centred twin (its turn about the centre, refined; its searched shift was 4 px) is
    compared too and wins: within 1 degree by NCC and NMI; the overlap rule is checked with the twins off.
    NMI draws 2560 samples instead of the default 16384 (its Parzen loss took 12 s a run of three; review 2
    of session 28, B5): 0.35 / 9.3 / 166 degrees off, and the test still fails without the rule, without
    NMI's rule and without the twin (c58fbc3^, c5fc2f7^, a2b7761^: 166 / 166 / 9.3 degrees off at the first
    check). Without the twins NMI's result depends on the draw (1024 / 3072 / 4096 samples: 0.8 degrees off,
    2048 / 2560: 9-10, 8192: 19), so for NMI the middle check asks only that the overlap rule holds (under 20
    degrees on over 0.9 of the image), not that the twin was needed (review 1 of session 29, B1); NCC's
    twin-less run is 13 degrees off at the default draw."""
    from skimage.transform import resize

    from napari_nephi.core.transform import DisplacementTransform
    from napari_nephi.engines.affine import engine as affine_engine
    from napari_nephi.engines.nephi.initial import overlap_share
    from napari_nephi.synthetic import random_smooth_displacement

    cell = skimage.data.cell().astype(np.float32)
    cell = (cell - cell.min()) / (cell.max() - cell.min())
    fixed = resize(cell, (128, 128), order=1, anti_aliasing=True).astype(np.float32)
    smooth = float(np.random.default_rng(187).uniform(0.03, 0.06)) * 128
    _, u_inv = random_smooth_displacement(fixed.shape, 0.02 * 128, smooth, seed=187, return_inverse=True)
    warped = np.asarray(DisplacementTransform(u_inv).warp(fixed), np.float32)
    m = voxel_map(rotation(2, 0, 170), (1.875, -1.0), fixed.shape)
    moving = make_moving(warped, m, "nearest")

    options = {"similarity": similarity} if similarity == "ncc" else {"similarity": "nmi", "samples": 2560}

    def turn_and_share():
        found = nn.register(fixed, moving, kind="rigid", **options).transform.matrix
        error = abs((np.degrees(np.arctan2(found[1, 0], found[0, 0])) - 170 + 180) % 360 - 180)
        return error, overlap_share(found, fixed.shape, moving.shape)

    error, share = turn_and_share()
    assert error < 2 and share > 0.9, (error, share)  # NCC 0.81, NMI 0.35 degrees off
    monkeypatch.setattr(affine_engine, "CENTRED_TWIN_TOLERANCE", np.inf)  # without the twins (session 27)
    error, share = turn_and_share()
    low = 2 if similarity == "ncc" else -1  # NMI: the rule only (see above)
    assert low < error < (15 if similarity == "ncc" else 20) and share > 0.9, (error, share)  # 13, 9.3 off
    monkeypatch.setattr(affine_engine, "JUDGE_OVERLAP_RATIO", 0.0)
    error, share = turn_and_share()
    assert error > 150 and share < 0.5, (error, share)
