"""The "Histology registration" dock widget: its parts one by one, then end to end in a real viewer
on a small re-stained, rotated IHC pair given as multiscale layers."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import tifffile
import torch
from skimage import data
from skimage.color import rgb2hed

import napari_nephi
from napari_nephi.core.progress import ProgressEvent
from napari_nephi.synthetic.histology import slide_pair
from napari_nephi.widgets import _histology_layers as layers_module
from napari_nephi.widgets import histology_widget as hw
from napari_nephi.widgets._histology_layers import Frame, points_between
from napari_nephi.widgets._histology_parts import (
    HistologyOptions,
    SlideChooser,
    SlidePreview,
    StageProgress,
    stage_of,
)
from napari_nephi.widgets._state import RunState

#: Level-0 pixel size of the test slides (um/px) and the stage levels the widget is set to.
UM, WORKING_UM, REFINE_UM = 0.5, 4.0, 2.0
#: Median error (level-0 px) of the recovered map against the truth on tissue points.
MAX_MEDIAN_ERROR_PX = 3.0


def pyramid(image: np.ndarray, smallest: int = 200) -> list[np.ndarray]:
    levels = [image]
    while max(levels[-1].shape[:2]) > smallest:
        a = levels[-1]
        levels.append(cv2.resize(a, (a.shape[1] // 2, a.shape[0] // 2), interpolation=cv2.INTER_AREA))
    return levels


@pytest.fixture(scope="module")
def pair():
    """scikit-image's IHC image at 1024 px, re-stained to H-DAB, rotated by 150 degrees and shifted."""
    torch.set_num_threads(1)
    ihc = data.immunohistochemistry()
    big = cv2.resize(ihc, (1024, 1024), interpolation=cv2.INTER_LINEAR)
    return slide_pair(big, seed=4, rotation=150.0, shift=(12, -9))


@pytest.fixture
def errors(monkeypatch):
    messages = []
    monkeypatch.setattr(hw, "show_error", messages.append)
    return messages


def _viewer_with_slides(make_napari_viewer, pair, scale=(UM, UM)):
    viewer = make_napari_viewer()
    fixed = viewer.add_image(pyramid(pair.fixed), multiscale=True, rgb=True, name="HE", scale=scale)
    moving = viewer.add_image(
        pyramid(pair.moving), multiscale=True, rgb=True, name="HDAB", scale=scale, translate=(30.0, -20.0)
    )
    return viewer, fixed, moving


def _quick_options(widget) -> None:
    """Rigid and refinement only (the networks are the engine's own tests), at coarse levels."""
    widget.options.stages["affine"].setChecked(False)
    widget.options.stages["nonrigid"].setChecked(False)
    widget.options.working_um.setValue(WORKING_UM)
    widget.options.refine_um.setValue(REFINE_UM)


# -- parts --------------------------------------------------------------------------------------------
def test_slide_chooser_takes_the_layer_scale_or_asks(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    known = viewer.add_image(np.zeros((8, 8), np.uint8), scale=(0.25, 0.25), name="known")
    unknown = viewer.add_image(np.zeros((8, 8), np.uint8), name="unknown")
    chooser = SlideChooser(viewer)
    qtbot.addWidget(chooser)
    chooser.set_layer(known)
    assert chooser.pixel_size() == pytest.approx(0.25)
    chooser.set_layer(unknown)
    assert chooser.pixel_size() is None and not chooser.confirmed.isChecked()
    chooser.size.setValue(0.5)  # typing the size confirms it
    assert chooser.pixel_size() == pytest.approx(0.5)
    chooser.set_layer(known)
    chooser.set_layer(unknown)  # another layer: its own scale again
    assert chooser.pixel_size() is None
    chooser.confirmed.setChecked(True)  # or 1 um/px is confirmed as it is
    assert chooser.pixel_size() == pytest.approx(1.0)
    # a slide file read with its pixel size (the reader's metadata unit), 1 um/px: known
    read = viewer.add_image(np.zeros((8, 8), np.uint8), name="10x", metadata={"unit": "um"})
    chooser.set_layer(read)
    assert chooser.pixel_size() == pytest.approx(1.0) and chooser.confirmed.isChecked()
    mm = viewer.add_image(np.zeros((8, 8), np.uint8), scale=(5e-4, 5e-4), metadata={"unit": "mm"})
    chooser.set_layer(mm)  # a layer scale in mm is 0.5 um/px
    assert chooser.pixel_size() == pytest.approx(0.5)
    pixels = viewer.add_image(np.zeros((8, 8), np.uint8), metadata={"unit": "pixel"})
    chooser.set_layer(pixels)  # an uncalibrated ImageJ image: unknown, asked for
    assert chooser.pixel_size() is None


def test_options_give_engine_keywords(qtbot):
    options = HistologyOptions()
    qtbot.addWidget(options)
    assert options.values() == {
        "channel": "auto",
        "allow_flip": True,
        "stages": ("rigid", "affine", "nonrigid", "refine"),
        "affine_iterations": 2,
        "nonrigid_iterations": 1,
    }
    options.channel.setCurrentText("fluorescence")  # a nuclear channel layer against haematoxylin
    assert options.values()["channel"] == "hematoxylin"
    options.channel.setCurrentText("od")
    options.allow_flip.setChecked(False)
    options.stages["affine"].setChecked(False)
    options.working_um.setValue(8.0)
    options.affine_iterations.setValue(3)
    values = options.values()
    assert values["channel"] == "od" and values["allow_flip"] is False and values["working_um"] == 8.0
    assert values["stages"] == ("rigid", "nonrigid", "refine") and "refine_um" not in values
    assert values["affine_iterations"] == 3


def test_stage_bars_follow_events(qtbot):
    bars = StageProgress()
    qtbot.addWidget(bars)
    assert stage_of("rigid: rotation search") == "rigid" and stage_of("affine network 1/2") == "affine"
    assert stage_of("nonrigid network 1/1") == "nonrigid" and stage_of("refine") == "refine"
    assert stage_of("metrics") is None
    bars.start(("rigid", "nonrigid", "refine"))
    assert bars.bars["rigid"].isVisibleTo(bars) and not bars.bars["affine"].isVisibleTo(bars)
    assert bars.advance(ProgressEvent(3, 12, stage="rigid: rotation search")) == "rigid"
    assert bars.values() == pytest.approx({"rigid": 0.25, "nonrigid": 0.0, "refine": 0.0})
    assert bars.advance(ProgressEvent(1, 4, stage="affine network 1/2")) is None  # not chosen
    bars.advance(ProgressEvent(2, 8, stage="refine"))  # a later stage completes the earlier ones
    assert bars.values() == pytest.approx({"rigid": 1.0, "nonrigid": 1.0, "refine": 0.25})
    bars.finish()
    assert set(bars.values().values()) == {1.0}


def test_preview_layer_is_updated_in_place(make_napari_viewer):
    viewer = make_napari_viewer()
    preview = SlidePreview(viewer)
    where = Frame((0.5, 0.5), (10.0, 0.0)).at(4.0)
    layer = preview.show(np.zeros((16, 16, 3), np.uint8), where, "p")
    assert layer.rgb and np.allclose(layer.scale, 2.0) and np.allclose(layer.translate, (10.75, 0.75))
    again = preview.show(np.full((32, 32, 3), 9, np.uint8), Frame((0.5, 0.5), (0.0, 0.0)).at(2.0), "p")
    assert again is layer and layer.data.shape == (32, 32, 3) and np.allclose(layer.scale, 1.0)
    preview.remove()
    assert layer not in viewer.layers and preview.layer is None


def test_points_between_layers_go_through_the_world(make_napari_viewer):
    viewer = make_napari_viewer()
    source = viewer.add_points(np.zeros((0, 2)), scale=(2.0, 3.0), translate=(5.0, -4.0))
    target = viewer.add_image(np.zeros((8, 8)), scale=(0.5, 0.5), translate=(1.0, 1.0))
    pts = np.array([[0.0, 0.0], [1.0, 2.0], [-3.0, 7.5]])
    expected = (pts * (2.0, 3.0) + (5.0, -4.0) - 1.0) / 0.5
    np.testing.assert_allclose(points_between(pts, source, target), expected, atol=1e-9)


# -- the widget -------------------------------------------------------------------------------------
def test_unknown_pixel_size_is_asked_for(make_napari_viewer, pair, errors):
    viewer, fixed, moving = _viewer_with_slides(make_napari_viewer, pair, scale=(1.0, 1.0))
    widget = hw.HistologyWidget(viewer)
    assert widget.fixed.layer() is fixed and widget.moving.layer() is moving
    assert widget.start() is False and "pixel size of the fixed slide 'HE' is unknown" in errors[0]
    widget.fixed.set_pixel_size(UM)
    assert widget.start() is False and "moving slide 'HDAB'" in errors[1]
    assert widget.state.is_(RunState.IDLE) and widget.transfer_annotations() is None
    assert "Run a registration first" in errors[2]


def test_engine_errors_are_shown_and_the_widget_stays_usable(make_napari_viewer, qtbot, pair, errors):
    viewer, fixed, _ = _viewer_with_slides(make_napari_viewer, pair)
    blank = viewer.add_image(np.full((300, 300, 3), 255, np.uint8), rgb=True, name="blank", scale=(UM, UM))
    widget = hw.HistologyWidget(viewer)
    widget.moving.set_layer(blank)
    _quick_options(widget)
    n_layers = len(viewer.layers)
    with qtbot.waitSignal(widget.run_done, timeout=120000):
        assert widget.start()
    assert len(errors) == 1 and "No tissue found in the moving slide" in errors[0]
    assert len(viewer.layers) == n_layers and widget.run_button.isEnabled()


def test_slides_of_different_pixel_sizes(make_napari_viewer, qtbot, pair, errors):
    """The moving slide scanned at half the resolution (its layer scale twice the fixed one's): the
    transform maps level-0 pixels of each, and a point drawn on the moving slide lands on the truth."""
    viewer = make_napari_viewer()
    fixed = viewer.add_image(pyramid(pair.fixed), multiscale=True, rgb=True, name="HE", scale=(UM, UM))
    half = cv2.resize(pair.moving, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    moving = viewer.add_image(
        half, rgb=True, name="HDAB", scale=(2 * UM, 2 * UM), translate=(7.0, 3.0), metadata={"unit": "um"}
    )  # 1 um/px, as the reader gives a 10x slide file
    widget = hw.HistologyWidget(viewer)
    qtbot.addWidget(widget)
    assert widget.moving.layer() is moving and widget.moving.pixel_size() == pytest.approx(2 * UM)
    for stage in ("affine", "nonrigid", "refine"):
        widget.options.stages[stage].setChecked(False)
    with qtbot.waitSignal(widget.run_done, timeout=120000):
        assert widget.start()
    assert not errors, errors
    reg = widget.last
    assert reg.transform.moving_shape == half.shape[:2] and reg.warped[0].shape[:2] == pair.fixed.shape[:2]
    ys, xs = np.nonzero(pair.tissue[16:-16:32, 16:-16:32])
    pts = np.stack([ys, xs], 1) * 32.0 + 16.0
    truth = (pair.transform.map_points(pts) + 0.5) / 2 - 0.5  # level-0 pixels of the half-size slide
    assert np.median(np.linalg.norm(reg.transform.map_points(pts) - truth, axis=1)) < MAX_MEDIAN_ERROR_PX / 2
    drawn = truth[:3] * 2 * UM + moving.translate  # world coordinates on the moving slide
    carried = widget.transfer_annotations(viewer.add_points(drawn, name="cells"))
    np.testing.assert_allclose(carried.scale, fixed.scale)
    assert np.abs(np.asarray(carried.data) - pts[:3]).max() < 2 * MAX_MEDIAN_ERROR_PX


def test_a_fluorescence_nuclear_channel_against_brightfield(make_napari_viewer, qtbot, errors):
    """napari shows a fluorescence image as one layer per channel: its DAPI layer is registered
    against the H&E slide's haematoxylin with the stain channel "fluorescence"."""
    he = data.immunohistochemistry()
    pair = slide_pair(he, seed=1, rotation=70.0, restain_to="he")
    h = rgb2hed(pair.moving)[..., 0]
    dapi = np.round(255 * (h - h.min()) / np.ptp(h)).astype(np.uint8)  # nuclei bright on black
    viewer = make_napari_viewer()
    viewer.add_image(pair.fixed, rgb=True, name="HE", scale=(UM, UM))
    stack = viewer.add_image(np.stack([dapi, 255 - dapi]), name="stack", scale=(1, UM, UM))
    viewer.add_image(dapi, name="DAPI", scale=(UM, UM))
    widget = hw.HistologyWidget(viewer)
    qtbot.addWidget(widget)
    widget.moving.set_layer(stack)
    assert widget.start() is False and "one layer per channel" in errors[-1]
    widget.moving.set_layer(viewer.layers["DAPI"])
    for stage in ("affine", "nonrigid", "refine"):
        widget.options.stages[stage].setChecked(False)
    with qtbot.waitSignal(widget.run_done, timeout=120000):
        assert widget.start()  # "auto" refuses a dark-background slide against brightfield ...
    assert "channel='hematoxylin'" in errors[-1] and widget.last is None
    widget.options.channel.setCurrentText("fluorescence")
    with qtbot.waitSignal(widget.run_done, timeout=120000):
        assert widget.start()  # ... the nuclear channel against haematoxylin finds the rotation
    assert len(errors) == 2 and abs((widget.last.metrics["rigid_angle"] - 70.0 + 180) % 360 - 180) < 1.0
    assert widget.last.settings["stain_kind"] == "hematoxylin"


def test_previews_show_during_a_run_and_go_on_cancel(make_napari_viewer, qtbot, pair, monkeypatch):
    """The engine's previews (faked here: the engine's own tests cover it) appear at their zoom."""
    import threading

    sent = threading.Event()

    def fake_register(fixed, moving, *, progress, cancel, **_):
        preview = np.full((128, 128, 3), 200, np.uint8)
        progress(
            ProgressEvent(
                1, 4, stage="rigid: rotation search", preview=preview, extra={"preview_zoom": (8, 8)}
            )
        )
        sent.set()
        cancel.wait(60)
        from napari_nephi.core.errors import Cancelled

        raise Cancelled("cancelled")

    monkeypatch.setattr(layers_module, "register", fake_register)
    viewer, fixed, _ = _viewer_with_slides(make_napari_viewer, pair)
    widget = hw.HistologyWidget(viewer)
    qtbot.addWidget(widget)
    n_layers = len(viewer.layers)
    with qtbot.waitSignal(widget.run_done, timeout=60000):
        assert widget.start()
        qtbot.waitUntil(lambda: widget.preview.layer is not None, timeout=30000)
        layer = widget.preview.layer
        assert layer.data.shape == (128, 128, 3) and np.allclose(layer.scale, 8 * UM)
        np.testing.assert_allclose(layer.translate, np.asarray(fixed.translate) + 3.5 * UM)
        assert widget.stage_bars.values()["rigid"] == pytest.approx(0.25)
        widget.cancel()
    assert len(viewer.layers) == n_layers and layer not in viewer.layers
    assert widget.state.is_(RunState.IDLE) and "Cancelled" in widget.status.text()


def test_cancel_then_register_and_transfer_annotations(
    make_napari_viewer, qtbot, pair, errors, monkeypatch, tmp_path
):
    monkeypatch.setattr(layers_module, "LOW_SIDE", 512)  # comparisons on level 1 of this 1024 px slide
    viewer, fixed, moving = _viewer_with_slides(make_napari_viewer, pair)
    originals = [np.array(level, copy=True) for level in (fixed.data[0], moving.data[0])]
    widget = hw.HistologyWidget(viewer)
    qtbot.addWidget(widget)
    _quick_options(widget)
    names = [ly.name for ly in viewer.layers]

    # cancel mid-run: nothing is added, the widget is usable again
    with qtbot.waitSignal(widget.run_done, timeout=120000):
        assert widget.start()
        qtbot.waitUntil(lambda: widget.stage_bars.values()["rigid"] > 0, timeout=60000)
        widget.cancel()
    assert [ly.name for ly in viewer.layers] == names and widget.last is None
    assert "Cancelled" in widget.status.text() and widget.run_button.isEnabled() and not errors

    # a full run
    with qtbot.waitSignal(widget.run_done, timeout=300000):
        assert widget.start()
    assert not errors, errors
    reg = widget.last
    assert set(widget.stage_bars.values()) == {"rigid", "refine"}
    assert set(widget.stage_bars.values().values()) == {1.0}
    warped = viewer.layers["HDAB warped"]
    assert warped.multiscale and len(warped.data) == 2 and warped.rgb
    assert warped.data.shapes[0][:2] == pair.fixed.shape[:2]
    np.testing.assert_allclose(warped.scale, fixed.scale)
    np.testing.assert_allclose(warped.translate, fixed.translate)
    # the transform (fixed -> moving level-0 px) against the truth, on tissue points
    ys, xs = np.nonzero(pair.tissue[8:-8:16, 8:-8:16])
    pts = np.stack([ys, xs], 1) * 16.0 + 8.0
    err = np.linalg.norm(reg.transform.map_points(pts) - pair.transform.map_points(pts), axis=1)
    assert np.median(err) < MAX_MEDIAN_ERROR_PX
    # the warped slide's coarse level shows the fixed slide's content: compare with the truth's warp
    low = np.asarray(warped.data[1]).mean(-1)
    truth = np.asarray(pair.transform.warp(pair.moving.mean(-1).astype(np.float32)))
    truth_low = cv2.resize(truth, low.shape[::-1], interpolation=cv2.INTER_AREA)
    tissue = cv2.resize(pair.tissue.astype(np.uint8), low.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    assert np.corrcoef(low[tissue], truth_low[tissue])[0, 1] > 0.9

    board, diff = viewer.layers["HDAB checkerboard"], viewer.layers["HDAB difference"]
    assert board.data.shape == (512, 512) and np.allclose(board.scale, 2 * UM) and not board.visible
    assert diff.data.shape == (512, 512) and np.allclose(diff.translate, UM / 2)
    jac, grid = viewer.layers["HDAB Jacobian determinant"], viewer.layers["HDAB deformation grid"]
    factor = WORKING_UM / UM
    assert jac.data.shape == (128, 128) and np.allclose(jac.scale, WORKING_UM)
    np.testing.assert_allclose(jac.translate, (factor - 1) / 2 * UM)
    assert np.median(np.abs(jac.data - 1.0)) < 0.05  # a rotation and a small correction keep areas
    assert len(grid.data) > 10 and np.allclose(grid.scale, WORKING_UM)

    # annotations drawn on the moving slide (in its world frame) are carried onto the fixed slide
    fixed_pts = np.array([[300.0, 400.0], [500.0, 620.0], [700.0, 380.0], [450.0, 300.0]])
    drawn = pair.transform.map_points(fixed_pts)  # where that tissue is on the moving slide
    shapes = viewer.add_shapes(
        [drawn], shape_type="polygon", name="tumour", scale=moving.scale, translate=moving.translate
    )
    widget.annotations.set_layer(shapes)
    assert widget.transfer_button.isEnabled()
    carried = widget.transfer_annotations()
    assert carried is not None and carried.name == "tumour on the fixed slide"
    np.testing.assert_allclose(carried.scale, fixed.scale)
    verts = np.asarray(carried.data[0])
    np.testing.assert_allclose(reg.transform.map_points(verts), drawn, atol=0.05)  # where the transform says
    assert np.abs(verts - fixed_pts).max() < 3 * MAX_MEDIAN_ERROR_PX  # and where the tissue is
    points = viewer.add_points(drawn[:2] * UM + moving.translate, name="cells")  # drawn in world units
    carried_points = widget.transfer_annotations(points)
    np.testing.assert_allclose(
        reg.transform.map_points(np.asarray(carried_points.data)), drawn[:2], atol=0.05
    )
    volume = viewer.add_shapes([np.array([[0, 0, 0], [0, 5, 5], [0, 5, 0]])], shape_type="polygon")
    assert widget.transfer_annotations(volume) is None and "3D" in errors[-1]

    # a second run (rigid only) replaces the result layers; the carried annotations stay
    results = {"HDAB warped", "HDAB checkerboard", "HDAB difference", "HDAB Jacobian determinant",
               "HDAB deformation grid"}  # fmt: skip
    before = [ly.name for ly in viewer.layers]
    widget.options.stages["refine"].setChecked(False)
    with qtbot.waitSignal(widget.run_done, timeout=300000):
        assert widget.start()
    assert not errors[1:], errors
    assert sorted(ly.name for ly in viewer.layers) == sorted(before) and results <= set(before)
    assert widget.last is not reg and "tiles" not in widget.last.metrics
    assert viewer.layers["HDAB warped"].multiscale and carried in viewer.layers

    # the result is saved: transform, a tiled pyramidal OME-TIFF with the fixed pixel size, metrics
    with qtbot.waitSignal(widget.run_done, timeout=120000):
        assert widget.save_result(tmp_path / "result")
    assert "Saved to" in widget.status.text() and not errors[1:]
    assert napari_nephi.load_transform(tmp_path / "result" / "transform").ndim == 2
    with tifffile.TiffFile(tmp_path / "result" / "warped.ome.tif") as tif:
        levels = tif.series[0].levels
        assert len(levels) == 2 and levels[0].shape[:2] == pair.fixed.shape[:2]
        np.testing.assert_array_equal(levels[1].asarray(), np.asarray(viewer.layers["HDAB warped"].data[1]))
    assert json.loads((tmp_path / "result" / "metrics.json").read_text())["ncc_after"] > 0.9

    # nothing the user loaded changed
    for layer, original in zip((fixed, moving), originals, strict=True):
        np.testing.assert_array_equal(np.asarray(layer.data[0]), original)
    np.testing.assert_allclose(moving.translate, (30.0, -20.0))


def test_widget_docks_from_the_plugin_menu(make_napari_viewer, pair):
    viewer, fixed, moving = _viewer_with_slides(make_napari_viewer, pair)
    _, widget = viewer.window.add_plugin_dock_widget("napari-nephi", "Histology registration")
    assert isinstance(widget, hw.HistologyWidget)
    assert widget.fixed.layer() is fixed and widget.moving.layer() is moving
    assert widget.fixed.pixel_size() == pytest.approx(UM) and widget.run_button.isEnabled()
