"""register(method="histology"): known rotations, flips and warps recovered; pyramids, dask, pixel sizes,
saving, stages, cancel and bad inputs. Small real-image pairs (scikit-image's IHC image, 256 px)."""

from __future__ import annotations

import threading

import cv2
import dask.array as da
import numpy as np
import pytest
import tifffile
import torch
from skimage import data

import napari_nephi
from napari_nephi.core.errors import Cancelled, InputError
from napari_nephi.synthetic.histology import slide_pair

#: Accuracy asserted (median rTRE, TRE / image diagonal, on a dense grid of tissue points).
RIGID_RTRE = 0.002  # 0.2 %
WARP_RTRE = 0.003  # 0.3 % after refinement of a 3 px smooth warp


@pytest.fixture(scope="module")
def ihc() -> np.ndarray:
    return data.immunohistochemistry()[::2, ::2].copy()


def tissue_points(pair, step: int = 6, border: int = 8) -> np.ndarray:
    h, w = pair.fixed.shape[:2]
    ys, xs = np.mgrid[border : h - border : step, border : w - border : step]
    pts = np.stack([ys.ravel(), xs.ravel()], 1).astype(np.float64)
    return pts[pair.tissue[pts[:, 0].astype(int), pts[:, 1].astype(int)]]


def rtre(reg, pair, moving_scale: float = 1.0, fixed_scale: float = 1.0) -> float:
    """Median TRE / fixed diagonal (in the pair's pixels); ``moving_scale`` / ``fixed_scale``: level-0
    pixels of the registered slides per pixel of the pair's moving / fixed image."""
    pts = tissue_points(pair)
    truth = (pair.transform.map_points(pts) + 0.5) * moving_scale - 0.5
    mapped = reg.transform.map_points((pts + 0.5) * fixed_scale - 0.5)
    err = np.linalg.norm(mapped - truth, axis=1) / moving_scale
    return float(np.median(err) / np.hypot(*pair.fixed.shape[:2]))


@pytest.fixture(scope="module")
def warped_case(ihc):
    """Rotated by 200 degrees, mirrored, smoothly warped by 3 px: rigid + refine (no networks)."""
    torch.set_num_threads(1)
    pair = slide_pair(ihc, seed=3, rotation=200.0, flip=True, warp=3.0)
    fixed, moving = pair.fixed.copy(), pair.moving.copy()
    events = []
    reg = napari_nephi.register(
        pair.fixed, pair.moving, method="histology", stages=("rigid", "refine"), progress=events.append
    )
    return pair, reg, events, (fixed, moving)


def test_rotation_flip_and_warp_recovered(warped_case):
    pair, reg, events, _ = warped_case
    assert reg.metrics["rigid_flipped"] is True
    assert abs((reg.metrics["rigid_angle"] - 200.0 + 180) % 360 - 180) < 1.0
    assert rtre(reg, pair) < WARP_RTRE
    assert reg.metrics["ncc_after"] > reg.metrics["ncc_before"] + 0.5
    assert {"rigid: rotation search", "refine"} <= {e.stage for e in events}
    assert reg.metrics["tiles_refined"] >= 1


def test_preview_after_the_rigid_stage_shows_the_aligned_moving_slide(warped_case):
    """The GUI gets the moving slide under the rigid map on a coarse fixed grid, with its zoom."""
    pair, reg, events, _ = warped_case
    previews = [e for e in events if e.preview is not None]
    assert previews and previews[0].stage == "rigid: done"
    zoom = np.asarray(previews[0].extra["preview_zoom"])
    preview = np.asarray(previews[0].preview, np.float64)
    expected = np.ceil(np.asarray(pair.fixed.shape[:2]) / zoom).astype(int)
    np.testing.assert_array_equal(preview.shape[:2], expected)
    from napari_nephi.engines.histology.stain import stain_channel

    # the moving slide is re-stained: compare haematoxylin, on the preview grid
    h_fixed = cv2.resize(
        stain_channel(pair.fixed, "hematoxylin")[0], preview.shape[1::-1], interpolation=cv2.INTER_AREA
    )
    h_preview = stain_channel(np.clip(preview, 0, 255).astype(np.uint8), "hematoxylin")[0]
    tissue = (
        cv2.resize(pair.tissue.astype(np.uint8), preview.shape[1::-1], interpolation=cv2.INTER_NEAREST) > 0
    )
    assert np.corrcoef(h_fixed[tissue], h_preview[tissue])[0, 1] > 0.8


def test_large_rotation_rigid_only(ihc):
    pair = slide_pair(ihc, seed=5, rotation=-95.0, shift=(7, -4))
    reg = napari_nephi.register(pair.fixed, pair.moving, method="histology", stages=["rigid"])
    assert rtre(reg, pair) < RIGID_RTRE
    assert "tiles" not in reg.metrics
    assert reg.settings["stages"] == ["rigid"]


def test_inputs_unchanged_and_metrics(warped_case):
    pair, reg, _, (fixed, moving) = warped_case
    np.testing.assert_array_equal(pair.fixed, fixed)
    np.testing.assert_array_equal(pair.moving, moving)
    for key in ("ncc_before", "mse_after", "nmi_after", "fold_percent_refine", "peak_rss_mb", "channel"):
        assert key in reg.metrics
    assert 0.0 <= reg.metrics["fold_percent"] < 1.0  # a smooth correction barely folds
    assert set(reg.metrics["seconds_per_stage"]) >= {"rigid", "refine"}
    assert any("pixel sizes of both slides are unknown" in n for n in reg.metrics["notes"])


def test_warped_pyramid_level0_equals_in_memory_warp(warped_case):
    pair, reg, _, _ = warped_case
    assert isinstance(reg.warped, list) and all(isinstance(level, da.Array) for level in reg.warped)
    lazy = reg.warped[0].compute()
    assert lazy.shape == pair.fixed.shape
    h, w = pair.fixed.shape[:2]
    ref = np.stack(
        [reg.transform.warp(pair.moving[..., c].astype(np.float32), output_shape=(h, w)) for c in range(3)],
        -1,
    )
    grid = np.stack(np.mgrid[:h, :w], -1).reshape(-1, 2).astype(float)
    mapped = reg.transform.map_points(grid).reshape(h, w, 2)
    inside = np.all((mapped > 1) & (mapped < np.array(pair.moving.shape[:2]) - 2), axis=-1)
    assert inside.mean() > 0.5
    assert np.abs(lazy[inside].astype(float) - ref[inside]).max() <= 1.0


def test_save_and_load(warped_case, tmp_path):
    pair, reg, _, _ = warped_case
    reg.save(tmp_path / "out")
    loaded = napari_nephi.load_transform(tmp_path / "out" / "transform")
    pts = tissue_points(pair)
    np.testing.assert_allclose(loaded.map_points(pts), reg.transform.map_points(pts), atol=1e-3)
    with tifffile.TiffFile(tmp_path / "out" / "warped.ome.tif") as tif:
        np.testing.assert_array_equal(tif.series[0].levels[0].asarray(), reg.warped[0].compute())


def test_pixel_sizes_differ(ihc):
    """Fixed at 1.0 um/px, moving at 0.5 um/px (twice the pixels)."""
    pair = slide_pair(ihc, seed=2, rotation=40.0)
    big = cv2.resize(pair.moving, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)
    reg = napari_nephi.register(
        pair.fixed, big, method="histology", spacing=(1.0, 1.0), moving_spacing=0.5, stages=["rigid"]
    )
    assert reg.metrics["rigid_scale"] == pytest.approx(1.0, abs=0.02)  # in common physical units
    assert rtre(reg, pair, moving_scale=2.0) < RIGID_RTRE
    assert reg.settings["spacing"] == [1.0, 1.0] and reg.settings["moving_spacing"] == [0.5, 0.5]


def test_pyramid_and_dask_inputs_match_numpy(ihc):
    pair = slide_pair(ihc, seed=4, rotation=15.0)

    def half(a):
        return cv2.resize(a, (a.shape[1] // 2, a.shape[0] // 2), interpolation=cv2.INTER_AREA)

    def run(fixed, moving):
        reg = napari_nephi.register(fixed, moving, method="histology", stages=["rigid"])
        return reg.transform.map_points(tissue_points(pair, step=16))

    ref = run(pair.fixed, pair.moving)
    lazy = run(da.from_array(pair.fixed, chunks=64), da.from_array(pair.moving, chunks=64))
    pyramid = run([pair.fixed, half(pair.fixed)], [pair.moving, half(pair.moving)])
    np.testing.assert_allclose(lazy, ref, atol=0.05)
    np.testing.assert_allclose(pyramid, ref, atol=0.25)


def test_landmarks_give_tre(ihc):
    pair = slide_pair(ihc, seed=6, rotation=10.0)
    pts = tissue_points(pair, step=24)
    reg = napari_nephi.register(
        pair.fixed,
        pair.moving,
        method="histology",
        stages=["rigid"],
        landmarks=(pts, pair.transform.map_points(pts)),
    )
    err = np.linalg.norm(reg.transform.map_points(pts) - pair.transform.map_points(pts), axis=1)
    assert reg.metrics["tre_median_um"] == pytest.approx(np.median(err), rel=1e-6)
    assert reg.metrics["rtre_median"] == pytest.approx(np.median(err) / np.hypot(256, 256), rel=1e-6)
    assert reg.metrics["landmarks"] == len(pts)


def test_untrained_network_is_skipped(ihc, tmp_path):
    """An identity network (untrained) gives no improvement: the stage is skipped with a note."""
    from napari_nephi.engines.histology import MultiMagNet, NetConfig, save_model

    save_model(MultiMagNet(NetConfig(kind="nonrigid", widths=(8, 8, 8, 8))), tmp_path / "nr.pt")
    pair = slide_pair(ihc, seed=7, rotation=5.0)
    events = []
    reg = napari_nephi.register(
        pair.fixed,
        pair.moving,
        method="histology",
        stages=["rigid", "nonrigid"],
        weights=tmp_path,
        progress=events.append,
    )
    assert any("nonrigid network did not improve" in n for n in reg.metrics["notes"])
    assert any(e.stage.startswith("nonrigid network") for e in events)
    assert rtre(reg, pair) < RIGID_RTRE


def test_cancel_mid_stage(ihc):
    pair = slide_pair(ihc, seed=8, rotation=30.0)
    stop = threading.Event()

    def progress(event):
        if event.stage.startswith("rigid"):
            stop.set()

    with pytest.raises(Cancelled):
        napari_nephi.register(
            pair.fixed, pair.moving, method="histology", stages=["rigid"], progress=progress, cancel=stop
        )


def test_cancel_during_refinement(ihc):
    pair = slide_pair(ihc, seed=9, warp=2.0)
    stop = threading.Event()
    stages_seen = []

    def progress(event):
        stages_seen.append(event.stage)
        if event.stage == "refine":
            stop.set()

    with pytest.raises(Cancelled):
        napari_nephi.register(
            pair.fixed, pair.moving, method="histology", stages=["refine"], progress=progress, cancel=stop
        )
    assert stages_seen == ["refine"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"spacing": (0.5, 0.5)}, "pixel size of the moving"),
        ({"moving_spacing": 0.5}, "pixel size of the fixed"),
        ({"stages": ["rigid", "warp"]}, "stages"),
        ({"stages": []}, "stages"),
        ({"working_um": 0.001}, "too large"),
        ({"channel": "eosin"}, "channel"),
        ({"affine_iterations": 0}, "affine_iterations"),
        ({"landmarks": (np.zeros((3, 2)), np.zeros((2, 2)))}, "pairs"),
        ({"weights": "/nonexistent/model.pt", "stages": ["affine"]}, "neither a model file"),
    ],
)
def test_bad_options(ihc, kwargs, match):
    with pytest.raises(InputError, match=match):
        napari_nephi.register(ihc, ihc, method="histology", **kwargs)


def test_bad_images(ihc):
    blank = np.full_like(ihc, 255)
    with pytest.raises(InputError, match="No tissue found in the moving"):
        napari_nephi.register(ihc, blank, method="histology", stages=["rigid"])
    nan = ihc.astype(np.float32)
    nan[10:20, 10:20] = np.nan
    with pytest.raises(InputError, match="NaN"):
        napari_nephi.register(ihc, nan, method="histology", stages=["rigid"])
    fluo = np.zeros((256, 256, 5), np.uint16)
    with pytest.raises(InputError, match="channel=0"):
        napari_nephi.register(ihc, fluo, method="histology")
    with pytest.raises(InputError, match="channel=7 but the moving slide has 5 channels"):
        napari_nephi.register(ihc, fluo, method="histology", channel=7)


class _Recording:
    """A level-0 array-like that records every region read from it."""

    def __init__(self, array: np.ndarray):
        self.array, self.shape, self.dtype, self.ndim = array, array.shape, array.dtype, array.ndim
        self.reads: list[tuple[int, ...]] = []

    def __getitem__(self, index):
        out = self.array[index]
        self.reads.append(out.shape)
        return out


def test_pyramid_levels_are_read_where_needed(ihc):
    """With every stage's pixel size at level 1, level 0 of either pyramid is never read."""
    pair = slide_pair(ihc, seed=10, rotation=70.0, warp=2.0)

    def pyramid(image):
        big = cv2.resize(image, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)
        return [_Recording(big), image, cv2.resize(image, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)]

    fixed, moving = pyramid(pair.fixed), pyramid(pair.moving)
    options = {
        "spacing": (0.5, 0.5),
        "moving_spacing": 0.5,
        "rigid_um": 1.0,
        "working_um": 1.0,
        "refine_um": 1.0,
    }
    reg = napari_nephi.register(fixed, moving, method="histology", stages=["rigid", "refine"], **options)
    assert reg.warped[0].shape[:2] == fixed[0].shape[:2]
    assert [r for r in fixed[0].reads + moving[0].reads if np.prod(r) > 0] == []  # (0, 0, 0): dask's probe
    assert rtre(reg, pair, moving_scale=2.0, fixed_scale=2.0) < WARP_RTRE
