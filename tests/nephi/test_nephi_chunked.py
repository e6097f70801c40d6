"""Divide-and-downsample mode: chunk plan, blending, downsampling, and registration of a volume in chunks.

Tolerance of the chunked 3D registration (32^3 textured shapes, up to 2.5 voxels, mean endpoint error
inside a 4-voxel border): below 45% of the initial error, against 40% for the unchunked test in
test_nephi_register.py, with a global pass on the 16^3 volume and 8 chunks of 20^3 voxels.
Measured (session 42): 0.276; the global pass alone (chunk_iterations=0) reads 0.310 and the chunks'
residual with its sign flipped 0.353, so that bound checks the chunked run end to end, not the chunks' share.
Session 43: the module fixture also keeps the global pass's map (a spy on the engine's ``_frozen``, no
second run), and the chunked field must beat the global map alone on the same voxels by 5 %, which only
the chunks can do.
"""

import threading

import numpy as np
import pytest
import torch

import napari_nephi
from napari_nephi.engines.nephi import chunked
from napari_nephi.engines.nephi.chunked import (
    _box_grid,
    _map_voxels,
    _point_weights,
    axis_ranges,
    blend_weights,
    downsample,
    intensity_range,
    plan_chunks,
)
from napari_nephi.engines.nephi.coarse import level_iterations

CHUNKED_3D = dict(
    chunked=True,
    initial="none",  # the step counts below are the chunking's (test_nephi_initial covers the global stage)
    chunk_size=20,
    chunk_overlap=8,
    global_factor=2,
    levels=2,
    coarse_iterations=30,
    iterations=30,
    chunk_iterations=10,  # 20 until session 42 (endpoint error 0.265 of the start, now 0.276)
    sample_points=2048,
    reg_points=32,
    hidden=32,
    device="cpu",
)


def test_plan_covers_the_grid_with_overlapping_chunks():
    plan = plan_chunks((50, 37), max_voxels=1 << 16, chunk_size=16, overlap=4)
    assert plan.chunk_size == (16, 16)
    covered = np.zeros((50, 37), int)
    for box in plan.boxes:
        assert all(b - a == 16 for a, b in box)
        covered[tuple(slice(a, b) for a, b in box)] += 1
    assert covered.min() >= 1
    for n in (50, 37):
        ranges = axis_ranges(n, 16, 4)
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(r0[1] - r1[0] >= 4 for r0, r1 in zip(ranges, ranges[1:]))
    assert axis_ranges(10, 16, 4) == [(0, 10)]
    # defaults: chunks and the global pass hold about max_voxels / 8 voxels
    plan = plan_chunks((300, 300, 300), max_voxels=1 << 24)
    assert plan.chunk_size == (128, 128, 128) and plan.overlap == 32
    assert plan.global_factor == 3 and plan.global_shape == (101, 101, 101)
    with pytest.raises(napari_nephi.InputError):
        plan_chunks((64, 64), 1 << 16, chunk_size=16, overlap=9)


def test_blend_weights_are_a_smooth_partition_of_unity():
    shape = (40, 29)
    plan = plan_chunks(shape, max_voxels=1 << 16, chunk_size=16, overlap=6)
    assert len(plan.boxes) == 4 * 3
    total = np.zeros(shape)
    for k, box in enumerate(plan.boxes):
        w = blend_weights(plan, k)
        assert w.shape == tuple(b - a for a, b in box) and w.min() > 0 and w.max() <= 1 + 1e-6
        full = np.zeros(shape)
        full[tuple(slice(a, b) for a, b in box)] = w
        total += full
        for axis in range(2):  # smooth: a raised cosine over 6 + 1 voxels changes by <= pi / 14 a voxel
            assert np.abs(np.diff(full, axis=axis)).max() < 0.25
    np.testing.assert_allclose(total, 1, atol=1e-6)
    # the weight of a chunk at continuous points (used for the backward field) agrees on voxels
    pts = torch.as_tensor(np.indices(shape).reshape(2, -1).T, dtype=torch.float64)
    w = _point_weights(plan, 4, pts).reshape(shape).numpy()
    box = plan.boxes[4]
    np.testing.assert_allclose(w[tuple(slice(a, b) for a, b in box)], blend_weights(plan, 4), atol=1e-6)
    assert w.sum() == pytest.approx(blend_weights(plan, 4).sum(), rel=1e-5)  # zero outside its box


def test_downsample_samples_the_align_corners_grid_slab_by_slab():
    z, y, x = np.indices((33, 21, 17)).astype(np.float32)
    image = 0.5 * z - 0.25 * y + 0.1 * x  # linear: Gaussian smoothing keeps it in the interior
    out_shape = (17, 11, 9)
    wide = (-100.0, 100.0)  # an intensity range that clips nothing: values map to (v + 100) / 200
    whole = downsample(image, out_shape, wide, "cpu", slab_voxels=1 << 24)[0, 0].numpy() * 200 - 100
    slabs = downsample(image, out_shape, wide, "cpu", slab_voxels=2000)[0, 0].numpy() * 200 - 100
    np.testing.assert_allclose(slabs, whole, atol=1e-4)  # many slabs give the same result as one
    grid = np.indices(out_shape).astype(np.float64)
    scale = [(n - 1) / (m - 1) for n, m in zip(image.shape, out_shape)]
    expected = 0.5 * grid[0] * scale[0] - 0.25 * grid[1] * scale[1] + 0.1 * grid[2] * scale[2]
    inner = (slice(2, -2),) * 3
    np.testing.assert_allclose(whole[inner], expected[inner], atol=2e-3)
    # normalisation by the intensity range, then clipping to [0, 1]
    lo, hi = intensity_range(image)
    norm = downsample(image, out_shape, (lo, hi), "cpu")[0, 0].numpy()
    assert norm.min() >= 0 and norm.max() <= 1
    np.testing.assert_allclose(norm[inner], np.clip((expected[inner] - lo) / (hi - lo), 0, 1), atol=1e-5)


@pytest.fixture(scope="module")
def chunked_result(shapes_volume_pair):
    """The chunked run, its truth and progress events, and the displacement of its global pass alone."""
    fixed, moving, u = shapes_volume_pair
    events, frozen = [], []
    real = chunked._frozen

    def spy(point_map):  # the engine freezes the global pass's forward map first, then its backward one
        frozen.append(real(point_map))
        return frozen[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chunked, "_frozen", spy)
        reg = napari_nephi.register(fixed, moving, method="nephi", progress=events.append, **CHUNKED_3D)
    shape = u.shape[1:]
    with torch.no_grad():
        x = _box_grid([(0, n) for n in shape], "cpu")
        glob = (_map_voxels(frozen[0], x, shape) - x).T.reshape(len(shape), *shape).numpy()
    return reg, u, events, glob


def test_chunked_3d_recovers_known_deformation_without_folds(chunked_result):
    reg, u, _, glob = chunked_result
    disp = reg.transform.displacement()
    inner = (slice(None),) + (slice(4, -4),) * 3
    before = float(np.linalg.norm(u[inner], axis=0).mean())
    after = float(np.linalg.norm(disp[inner] - u[inner], axis=0).mean())
    global_only = float(np.linalg.norm(glob[inner] - u[inner], axis=0).mean())
    print(
        f"chunked 3D endpoint error {before:.3f} -> {after:.3f} voxels (global alone {global_only:.3f}), "
        f"{reg.metrics['seconds']:.1f} s"
    )
    assert after < 0.45 * before
    assert after < 0.95 * global_only  # the chunks' share: their residuals improve on the global map
    assert reg.metrics["folds"] == 0
    assert reg.metrics["inverse_consistency_mean"] < 0.2  # mostly the 16^3 global pass (0.15 measured)
    assert reg.metrics["ncc_after"] > reg.metrics["ncc_before"]
    assert reg.warped.shape == u.shape[1:]


def test_chunked_3d_has_no_seams(chunked_result):
    """Second differences of the fields where chunks overlap are no larger than elsewhere.

    A seam (a jump of the field where one chunk takes over) shows up as a large second difference
    in the overlaps. Measured: 0.85 of the largest second difference outside the overlaps for the
    blended fields, 1.55 when the same chunks are stitched hard (nearest chunk, no blending). Session 42:
    0.71 blended and 1.15 stitched hard (0.77 / 1.13 with 20 chunk steps), so the bound is 1.0 (it was
    1.2, which a hard stitch passed; review 1 of session 42).
    """
    reg, u, _, _ = chunked_result
    s = reg.settings
    seam, rest = 0.0, 0.0
    for field in (reg.transform.displacement(), reg.transform.inverse().displacement()):
        for axis in range(3):
            n = u.shape[1 + axis]
            ranges = axis_ranges(n, s["chunk_size"][axis], s["chunk_overlap"])
            overlap = np.zeros(n, bool)
            for (_, stop), (start, _) in zip(ranges, ranges[1:]):
                overlap[start:stop] = True
            assert overlap.any()
            second = np.abs(np.diff(field, n=2, axis=1 + axis)).max(axis=0)  # index i: voxels i..i+2
            touches = np.array([overlap[i : i + 3].any() for i in range(n - 2)])
            seam = max(seam, float(np.compress(touches, second, axis=axis).max()))
            rest = max(rest, float(np.compress(~touches, second, axis=axis).max()))
    print(f"largest second difference in chunk overlaps {seam:.3f}, elsewhere {rest:.3f}")
    assert seam <= 1.0 * rest


def test_chunked_settings_metrics_and_progress(chunked_result):
    reg, _, events, _ = chunked_result
    s, m = reg.settings, reg.metrics
    assert s["chunked"] is True and s["chunks"] == 8 and s["chunk_size"] == [20, 20, 20]
    assert s["global_factor"] == 2 and s["global_shape"] == [17, 17, 17] and s["chunk_overlap"] == 8
    assert s["chunk_iterations"] == CHUNKED_3D["chunk_iterations"] and s["max_voxels"] == 1 << 24
    assert m["chunks"] == 8 and len(m["chunk_final_losses"]) == 8 and m["folds"] == 0
    total = events[-1].total
    coarse_steps = sum(level_iterations(30, 1))  # the levels plus the finer-knot last level
    assert total == coarse_steps + 30 + 8 * CHUNKED_3D["chunk_iterations"]
    assert [e.step for e in events] == list(range(1, total + 1))
    stages = [e.stage for e in events]
    assert stages[0] == "global: coarse" and stages[coarse_steps] == "global" and stages[-1] == "chunk 8/8"
    assert sum(st == "chunk 3/8" for st in stages) == CHUNKED_3D["chunk_iterations"]


def test_chunked_cancel_stops_within_one_step(shapes_volume_pair):
    fixed, moving, _ = shapes_volume_pair
    cancel = threading.Event()
    seen = []

    def progress(e):
        seen.append(e.stage)
        if e.stage == "chunk 2/8":
            cancel.set()

    opts = {**CHUNKED_3D, "coarse_iterations": 1, "iterations": 1, "chunk_iterations": 2}
    with pytest.raises(napari_nephi.Cancelled):
        napari_nephi.register(fixed, moving, method="nephi", progress=progress, cancel=cancel, **opts)
    assert seen[-1] == "chunk 2/8" and seen.count("chunk 2/8") == 1


def test_chunked_switches_on_above_max_voxels_in_2d_with_bspline_and_mask(camera_pair):
    fixed, moving, _ = camera_pair  # 96 x 96 = 9216 voxels
    losses = []
    opts = dict(
        method="nephi",
        device="cpu",
        max_voxels=8192,
        chunk_size=48,
        levels=1,
        iterations=6,
        chunk_iterations=4,
        sample_points=512,
        reg_points=16,
        hidden=16,
        bspline_spacing=6,
        initial="none",
    )
    mask = np.zeros(fixed.shape, bool)
    mask[:, :40] = True  # the three chunks of columns 48..95 lie outside: they keep the global map
    reg = napari_nephi.register(
        fixed, moving, fixed_mask=mask, progress=lambda e: losses.append(e.loss), **opts
    )
    assert reg.settings["chunked"] is True and reg.settings["chunks"] == 9
    assert reg.settings["global_shape"] == [33, 33]  # factor ceil(sqrt(9216 / 1024)) = 3
    assert len(losses) == 6 + 9 * 4
    assert sum(loss is None for loss in losses) == 3 * 4
    assert all(np.isfinite(loss) for loss in losses if loss is not None)
    assert reg.metrics["chunk_final_losses"].count(None) == 3
    assert reg.metrics["folds"] == 0
    assert reg.transform.displacement().shape == (2, 96, 96)
    plain = napari_nephi.register(fixed, moving, chunked=False, **{**opts, "iterations": 1})
    assert plain.settings["chunked"] is False and "chunks" not in plain.settings


def test_chunked_options_are_checked(small_pair):
    fixed, moving = small_pair
    for bad in [
        {"chunked": True, "chunk_size": 4},
        {"chunked": True, "chunk_size": 16, "chunk_overlap": 12},
        {"chunked": True, "mode": "predict", "weights": "x.pt"},
        {"max_voxels": 100},
        {"chunked": True, "chunk_iterations": -1},
    ]:
        with pytest.raises(napari_nephi.InputError):
            napari_nephi.register(fixed, moving, method="nephi", iterations=1, **bad)


def test_intensity_range_uses_a_bounded_subsample():
    rng = np.random.default_rng(0)
    image = rng.random((64, 64, 64)).astype(np.float32)
    lo, hi = intensity_range(image, max_samples=1 << 12)
    assert 0 <= lo < 0.02 and 0.98 < hi <= 1
    assert intensity_range(np.ones((8, 8)))[1] > 1  # constant: a non-empty range
    assert torch.is_tensor(downsample(image, (8, 8, 8), (lo, hi), "cpu"))
