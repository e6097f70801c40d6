"""The registration dock widget and its parts, in a real napari viewer (Xvfb on CI)."""

import numpy as np
import pytest
import scipy.ndimage as ndi
import skimage.data

from napari_nephi.core.errors import InputError
from napari_nephi.core.progress import ProgressEvent
from napari_nephi.widgets import RegisterWidget
from napari_nephi.widgets import register_widget as rw
from napari_nephi.widgets._pickers import NONE_TEXT, LayerPicker
from napari_nephi.widgets._results import ResultLayers
from napari_nephi.widgets._runner import RegistrationRunner
from napari_nephi.widgets._state import RunState
from napari_nephi.widgets._steps import StepQueue


@pytest.fixture
def pair():
    fixed = skimage.data.camera()[::4, ::4].astype(np.float32)
    m = np.eye(3)
    m[:2, 2] = (3.0, -2.0)
    moving = ndi.affine_transform(fixed, np.linalg.inv(m), order=1, mode="reflect")
    labels = np.zeros(fixed.shape, np.uint16)
    labels[30:60, 40:80] = 7
    labels[70:100, 20:50] = 300
    return fixed, moving.astype(np.float32), labels


@pytest.fixture
def errors(monkeypatch):
    messages = []
    monkeypatch.setattr(rw, "show_error", messages.append)
    return messages


class EndlessEngine:
    """Stands in for the engine in the widget: steps (a preview of the moving image every 0.1 s)
    until cancelled, so cancel tests do not depend on how fast a real engine converges."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.real = rw.register
        self.outcome: list[str] = []

    def install(self) -> None:
        self.monkeypatch.setattr(rw, "register", self)

    def remove(self) -> None:
        self.monkeypatch.setattr(rw, "register", self.real)

    def __call__(self, fixed, moving, spacing, progress, cancel, **options):
        import time

        from napari_nephi.core.errors import Cancelled
        from napari_nephi.core.progress import Progress

        p = Progress(progress, cancel, preview_every=0.1)
        step = 0
        try:
            while True:
                step += 1
                time.sleep(0.005)
                preview = np.asarray(moving, np.float32) if p.wants_preview else None
                p.step(step, 10**9, loss=1.0 / step, preview=preview)
        except Cancelled:
            self.outcome.append("cancelled")
            raise


@pytest.fixture
def endless(monkeypatch):
    """An :class:`EndlessEngine`, installed."""
    engine = EndlessEngine(monkeypatch)
    engine.install()
    return engine


def test_layer_picker_follows_layers(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    from napari.layers import Image

    picker = LayerPicker(viewer, (Image,), optional=True)
    qtbot.addWidget(picker)
    assert [picker.itemText(i) for i in range(picker.count())] == [NONE_TEXT]
    viewer.add_image(np.zeros((4, 4)), name="a")
    viewer.add_labels(np.zeros((4, 4), int), name="not an image")
    b = viewer.add_image(np.ones((4, 4)), name="b")
    assert [picker.itemText(i) for i in range(picker.count())] == [NONE_TEXT, "a", "b"]
    picker.set_layer(b)
    assert picker.layer() is b
    b.name = "renamed"
    assert picker.currentText() == "renamed" and picker.layer() is b
    viewer.layers.remove(b)
    assert picker.layer() is None  # the chosen layer went away: back to "(none)"
    assert "renamed" not in [picker.itemText(i) for i in range(picker.count())]


def test_layer_picker_lets_go_of_the_viewer_when_deleted(make_napari_viewer, qtbot):
    from napari.layers import Image

    viewer = make_napari_viewer()
    a = viewer.add_image(np.zeros((4, 4)), name="a")
    inserted, renamed = viewer.layers.events.inserted, a.events.name
    before = len(inserted.callbacks), len(renamed.callbacks)
    picker = LayerPicker(viewer, (Image,))
    assert (len(inserted.callbacks), len(renamed.callbacks)) == (before[0] + 1, before[1] + 1)
    with qtbot.waitSignal(picker.destroyed, timeout=2000):
        picker.deleteLater()
    assert (len(inserted.callbacks), len(renamed.callbacks)) == before
    viewer.add_image(np.ones((4, 4)), name="b")  # nothing calls into the deleted picker
    a.name = "renamed"


def test_result_layers_replace_previous_run(make_napari_viewer):
    viewer = make_napari_viewer()
    user = viewer.add_image(np.zeros((5, 5)), name="mine")
    results = ResultLayers(viewer)
    results.show(
        [(np.ones((5, 5)), {"name": "warped"}, "image"), (np.zeros((5, 5), int), {"name": "folds"}, "labels")]
    )
    assert len(viewer.layers) == 3
    results.show([(2 * np.ones((5, 5)), {"name": "warped"}, "image")])
    assert [ly.name for ly in viewer.layers] == ["mine", "warped"]
    assert float(viewer.layers["warped"].data.max()) == 2.0
    assert viewer.layers["mine"] is user


def _show_gradually(results, qtbot, layer_data, **kwargs):
    done = []
    results.show_gradually(layer_data, done.append, **kwargs)
    qtbot.waitUntil(lambda: bool(done), timeout=10000)
    return done[0]


def test_result_layers_update_in_place_and_remove_leftovers(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    user = viewer.add_image(np.zeros((5, 6)), name="mine")
    results = ResultLayers(viewer)

    def grid(n):
        paths = [np.array([[i, 0.0], [i, 5.0]]) for i in range(n)]
        kwargs = {"name": f"run grid {n}", "shape_type": "path", "edge_color": "yellow", "ndim": 2,
                  "features": {"level": np.arange(n, dtype=float)}}  # fmt: skip
        return paths, kwargs, "shapes"

    first = [
        (np.ones((5, 6)), {"name": "a warped", "contrast_limits": (0, 1)}, "image"),
        (np.zeros((5, 6), np.uint8), {"name": "a folds"}, "labels"),
        grid(2),
    ]
    layers = _show_gradually(results, qtbot, first, roles=["warped", "folds", "grid"])
    assert [ly.name for ly in viewer.layers] == ["mine", "a warped", "a folds", "run grid 2"]
    assert all(ly.visible for ly in layers)  # added hidden, shown a turn later
    warped, folds, shapes = layers
    second = [
        (2 * np.ones((5, 6)), {"name": "b warped", "contrast_limits": (0, 2), "scale": (2.0, 2.0)}, "image"),
        grid(4),
    ]
    again = _show_gradually(results, qtbot, second, roles=["warped", "grid"])
    assert again[0] is warped and again[1] is shapes  # updated in place, not re-added
    assert folds not in viewer.layers  # the second run has no folds: the old layer goes
    assert [ly.name for ly in viewer.layers] == ["mine", "b warped", "run grid 4"]
    assert float(warped.data.max()) == 2.0 and tuple(warped.contrast_limits) == (0, 2)
    assert tuple(warped.scale) == (2.0, 2.0)
    assert shapes.nshapes == 4 and list(shapes.features["level"]) == [0.0, 1.0, 2.0, 3.0]
    np.testing.assert_allclose(shapes.edge_color, np.tile([1.0, 1.0, 0.0, 1.0], (4, 1)))  # yellow
    assert viewer.layers["mine"] is user and float(user.data.max()) == 0.0


def test_result_layers_adopt_an_existing_layer(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    preview = viewer.add_image(np.zeros((3, 4)), name="preview", colormap="magenta", blending="additive")
    preview.visible = False
    results = ResultLayers(viewer)
    data = np.arange(12.0).reshape(3, 4)
    (warped,) = _show_gradually(
        results, qtbot, [(data, {"name": "warped", "colormap": "gray"}, "image")], adopt={"warped": preview}
    )
    assert warped is preview and len(viewer.layers) == 1
    assert warped.name == "warped" and warped.colormap.name == "gray" and warped.blending == "translucent"
    assert warped.visible
    np.testing.assert_array_equal(warped.data, data)


def test_remove_layer_leaves_the_collector_as_it_was(gc_unfrozen, make_napari_viewer):
    import gc

    from napari_nephi.widgets._results import remove_layer

    viewer = make_napari_viewer()
    keep = viewer.add_image(np.zeros((4, 4)), name="keep")
    big = viewer.add_image(np.zeros((80, 256, 256), np.float32), name="big")  # 20 MiB
    remove_layer(viewer, big)
    assert list(viewer.layers) == [keep]
    assert gc.get_freeze_count() == 0
    assert big.data.size == 1  # a big layer lets go of its data at once


def test_warm_up_adds_nothing_that_stays(make_napari_viewer, qtbot):
    from napari_nephi.widgets._results import warm_up

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((4, 5, 6)), name="volume")
    inserted = []
    viewer.layers.events.inserted.connect(lambda e: inserted.append(type(e.value).__name__))
    done = []
    queue = StepQueue()
    warm_up(viewer, queue, done=lambda: done.append(1))
    qtbot.waitUntil(lambda: bool(done), timeout=10000)
    assert inserted == ["Labels", "Points"]  # napari's first-of-a-kind costs were paid ...
    assert [ly.name for ly in viewer.layers] == ["volume"]  # ... and nothing is left behind
    assert viewer.layers.selection.active is viewer.layers["volume"]  # the selection is given back
    assert viewer.dims.ndim == 3
    warm_up(viewer, queue, done=lambda: done.append(2))  # once per viewer
    assert done == [1, 2] and inserted == ["Labels", "Points"]


def test_runner_signals(qtbot):
    runner = RegistrationRunner()
    seen = []
    runner.progressed.connect(lambda ev: seen.append(ev.step))

    def work(progress, cancel, n):
        for i in range(n):
            progress(ProgressEvent(i + 1, n))
        return "result"

    with qtbot.waitSignal(runner.finished, timeout=10000) as blocker:
        runner.run(work, n=3)
    assert blocker.args == ["result"]
    qtbot.waitUntil(lambda: not runner.busy, timeout=5000)
    assert seen == [1, 2, 3]

    def bad(progress, cancel):
        raise InputError("the moving image is constant")

    with qtbot.waitSignal(runner.failed, timeout=10000) as blocker:
        runner.run(bad)
    assert "constant" in blocker.args[0]
    qtbot.waitUntil(lambda: not runner.busy, timeout=5000)


def test_runner_cancel(qtbot):
    import time

    from napari_nephi.core.progress import Progress

    runner = RegistrationRunner()

    def slow(progress, cancel):
        p = Progress(progress, cancel)
        for i in range(1000):
            time.sleep(0.01)
            p.step(i + 1, 1000)

    with qtbot.waitSignal(runner.cancelled, timeout=10000):
        runner.run(slow)
        runner.cancel()
    qtbot.waitUntil(lambda: not runner.busy, timeout=5000)


def _viewer_with_widget(make_napari_viewer, qtbot, pair):
    fixed, moving, _ = pair
    viewer = make_napari_viewer()
    viewer.add_image(fixed, name="fixed")
    viewer.add_image(moving, name="moving")
    widget = RegisterWidget(viewer)
    viewer.window.add_dock_widget(widget)
    return viewer, widget


def _run(widget, qtbot):
    with qtbot.waitSignal(widget.run_done, timeout=120000):
        widget.start()


def test_end_to_end_affine_run(make_napari_viewer, qtbot, pair, errors, tmp_path):
    fixed, moving, labels = pair
    viewer = make_napari_viewer()
    viewer.add_image(fixed, name="fixed", scale=(2.0, 2.0))
    mov_layer = viewer.add_image(moving, name="moving", scale=(2.0, 2.0))
    lab_layer = viewer.add_labels(labels, name="labels", scale=(2.0, 2.0))
    # fixed landmarks in voxel units with the image's scale, moving ones in world units
    fpts = viewer.add_points(np.array([[40.0, 40.0], [100.0, 120.0]]), name="fixed pts", scale=(2.0, 2.0))
    mpts = viewer.add_points((np.array([[40.0, 40.0], [100.0, 120.0]]) + (3.0, -2.0)) * 2, name="moving pts")
    before = moving.copy()
    widget = RegisterWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.fixed.set_layer(viewer.layers["fixed"])
    widget.moving.set_layer(mov_layer)
    widget.moving_labels.set_layer(lab_layer)
    widget.fixed_points.set_layer(fpts)
    widget.moving_points.set_layer(mpts)
    widget.options.kind.setCurrentText("translation")
    widget.options.iterations.setValue(60)
    widget.options.levels.setValue(2)
    _run(widget, qtbot)
    assert errors == []
    names = [ly.name for ly in viewer.layers]
    for suffix in ("warped", "Jacobian determinant", "folds", "deformation grid", "warped labels"):
        assert f"moving {suffix}" in names, names
    warped = viewer.layers["moving warped"]
    assert warped.data.shape == fixed.shape
    assert tuple(warped.scale) == (2.0, 2.0)
    assert int(viewer.layers["moving folds"].data.sum()) == 0
    jac = viewer.layers["moving Jacobian determinant"]
    assert jac.colorbar.visible  # the legend: colour bar of a range centred on 1
    low, high = jac.contrast_limits
    assert low < 1 < high and low + high == pytest.approx(2.0)
    wl = viewer.layers["moving warped labels"].data
    assert wl.dtype == np.uint16 and set(np.unique(wl)) == {0, 7, 300}
    assert widget.last.metrics["tre_mean"] < 2.0  # physical units, spacing 2
    assert "Done" in widget.status.text()
    np.testing.assert_array_equal(mov_layer.data, before)  # inputs untouched
    # a second run replaces the result layers instead of adding more: the same layers, new data
    before_rerun = list(viewer.layers)
    _run(widget, qtbot)
    assert list(viewer.layers) == before_rerun
    assert viewer.layers["moving Jacobian determinant"].colorbar.visible
    assert viewer.layers["moving warped"].data is widget.last.warped
    # save the transform with the settings, load it and apply it to the labels layer
    folder = widget.save_transform(tmp_path / "t")
    assert (folder / "transform.json").exists() and (folder / "run.json").exists()
    new = widget.apply_transform(folder, layer=lab_layer)
    np.testing.assert_array_equal(new.data, wl)


def test_dimension_mismatch_shows_error_and_changes_nothing(make_napari_viewer, qtbot, errors):
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((16, 16)), name="2d")
    viewer.add_image(np.random.default_rng(1).random((8, 16, 16)), name="3d")
    widget = RegisterWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.fixed.set_layer(viewer.layers["2d"])
    widget.moving.set_layer(viewer.layers["3d"])
    widget.start()
    assert errors and "2D" in errors[0] and "3D" in errors[0]
    assert [ly.name for ly in viewer.layers] == ["2d", "3d"]
    assert widget.run_button.isEnabled()


def test_engine_error_is_notified(make_napari_viewer, qtbot, errors):
    viewer = make_napari_viewer()
    viewer.add_image(np.ones((16, 16)), name="flat")
    viewer.add_image(np.random.default_rng(1).random((16, 16)), name="noise")
    widget = RegisterWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.fixed.set_layer(viewer.layers["flat"])
    widget.moving.set_layer(viewer.layers["noise"])
    _run(widget, qtbot)
    assert errors and "constant" in errors[0]
    assert len(viewer.layers) == 2
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()


def test_out_of_memory_is_notified_and_widget_stays_usable(make_napari_viewer, qtbot, pair, monkeypatch):
    """A GPU out-of-memory error inside the engine: a napari notification says what to do, the
    previous run's layers stay as they were, and the next run works."""
    import torch
    from napari.utils.notifications import notification_manager

    from napari_nephi.core.device import memory_guard

    viewer, widget = _viewer_with_widget(make_napari_viewer, qtbot, pair)
    widget.options.iterations.setValue(20)
    widget.options.levels.setValue(1)
    _run(widget, qtbot)
    before = [(ly.name, ly) for ly in viewer.layers]
    warped = viewer.layers["moving warped"].data.copy()
    notes = []
    notification_manager.notification_ready.connect(notes.append)
    real_register = rw.register

    def no_memory(*args, **kwargs):  # what an engine does when torch cannot allocate on the GPU
        with memory_guard("affine registration"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(rw, "register", no_memory)
    try:
        _run(widget, qtbot)
    finally:
        notification_manager.notification_ready.disconnect(notes.append)
    errors = [n.message for n in notes if n.severity == "error"]
    assert len(errors) == 1 and "out of GPU memory" in errors[0] and "device='cpu'" in errors[0]
    assert "Failed" in widget.status.text()
    assert [(ly.name, ly) for ly in viewer.layers] == before  # same layer objects, none added
    np.testing.assert_array_equal(viewer.layers["moving warped"].data, warped)
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    monkeypatch.setattr(rw, "register", real_register)
    _run(widget, qtbot)  # still usable
    assert "Done" in widget.status.text() and len(viewer.layers) == len(before)


def test_cancel_keeps_layers(make_napari_viewer, qtbot, pair, errors, endless):
    viewer, widget = _viewer_with_widget(make_napari_viewer, qtbot, pair)
    with qtbot.waitSignal(widget.run_done, timeout=60000):
        widget.start()
        qtbot.wait(300)
        widget.cancel_button.click()
    assert "Cancelled" in widget.status.text()
    assert [ly.name for ly in viewer.layers] == ["fixed", "moving"]
    assert errors == []


def test_cancel_before_the_worker_starts(make_napari_viewer, qtbot, pair, errors, endless):
    viewer, widget = _viewer_with_widget(make_napari_viewer, qtbot, pair)
    with qtbot.waitSignal(widget.run_done, timeout=60000):
        widget.start()  # the worker starts one event-loop turn later
        widget.cancel_button.click()
    assert "Cancelled" in widget.status.text()
    assert [ly.name for ly in viewer.layers] == ["fixed", "moving"]
    assert widget.run_button.isEnabled() and errors == []


def test_preview_and_loss_curve(gc_unfrozen, make_napari_viewer, qtbot, pair, errors, monkeypatch):
    fixed, moving, _ = pair
    viewer = make_napari_viewer()
    viewer.add_image(fixed, name="fixed", scale=(2.0, 2.0))
    viewer.add_image(moving, name="moving", scale=(2.0, 2.0))
    widget = RegisterWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.options.iterations.setValue(40)
    widget.options.levels.setValue(2)
    import gc

    # gc.get_freeze_count() walks every frozen object (~1e6 late in the suite: ~0.1 s a call), so it is read
    # at the first progress event only; the count falls only through gc.unfreeze, whose calls are logged in
    # order with the events: frozen at the first event and no unfreeze before the last one = frozen at each.
    seen, frozen, losses, order = [], [], [], []
    real_unfreeze = gc.unfreeze

    def unfreeze():
        order.append("unfreeze")
        real_unfreeze()

    monkeypatch.setattr(gc, "unfreeze", unfreeze)
    widget.runner.progressed.connect(lambda ev: seen.append(widget.preview_layer is not None))
    widget.runner.progressed.connect(lambda ev: frozen or frozen.append(gc.get_freeze_count()))
    widget.runner.progressed.connect(lambda ev: order.append("progress"))
    widget.runner.progressed.connect(lambda ev: ev.loss is not None and losses.append(float(ev.loss)))
    _run(widget, qtbot)
    last = len(order) - order[::-1].index("progress")
    assert frozen[0] > 0 and "unfreeze" not in order[:last]  # full collections skip the objects older than
    # the run while it runs ...
    assert gc.get_freeze_count() == 0 and "unfreeze" in order  # ... and not after
    assert len(losses) >= 2 and widget.loss_plot.values == losses  # every reported loss is plotted
    assert any(seen)  # a preview layer was shown while running ...
    assert not [ly for ly in viewer.layers if "preview" in ly.name]  # ... and removed at the end


def test_cancel_can_keep_partial_preview(make_napari_viewer, qtbot, pair, errors, endless):
    viewer, widget = _viewer_with_widget(make_napari_viewer, qtbot, pair)
    widget.keep_partial.setChecked(True)
    with qtbot.waitSignal(widget.run_done, timeout=60000):
        widget.start()
        # the preview layer is added (hidden) with Run and shown with the first preview
        qtbot.waitUntil(
            lambda: widget.preview_layer is not None and widget.preview_layer.visible, timeout=20000
        )
        widget.cancel_button.click()
    names = [ly.name for ly in viewer.layers]
    assert names == ["fixed", "moving", "moving preview (partial, cancelled)"]
    assert viewer.layers[-1].data.ndim == 2


def test_nephi_widget_end_to_end(make_napari_viewer, qtbot, errors):
    """NePhi in the widget on the T&C sample: layers appear, no folds, labels keep values."""
    from napari_nephi import sample_data
    from napari_nephi.widgets import NephiWidget

    viewer = make_napari_viewer()
    for data, kwargs, kind in sample_data.tc_sample():
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = NephiWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.options.method.currentText() == "nephi"
    widget.fixed.set_layer(viewer.layers["fixed (T&C)"])
    widget.moving.set_layer(viewer.layers["moving (T&C)"])
    widget.moving_labels.set_layer(viewer.layers["moving labels (T&C)"])
    widget.options.iterations.setValue(20)  # 60 until session 43: NCC 0.948 -> 1.000 and no folds either way
    widget.options.levels.setValue(2)
    _run(widget, qtbot)
    assert errors == []
    metrics = widget.last.metrics
    assert metrics["folds"] == 0 and metrics["ncc_after"] > metrics["ncc_before"]
    warped_labels = viewer.layers["moving (T&C) warped labels"].data
    assert set(np.unique(warped_labels)) <= set(np.unique(viewer.layers["moving labels (T&C)"].data))
    assert int(viewer.layers["moving (T&C) folds"].data.sum()) == 0


def test_rgb_pair_runs(make_napari_viewer, qtbot, errors):
    rgb = skimage.data.immunohistochemistry()[::4, ::4]
    shifted = np.roll(rgb, (3, -2), axis=(0, 1))
    viewer = make_napari_viewer()
    viewer.add_image(rgb, name="fixed rgb", rgb=True)
    viewer.add_image(shifted, name="moving rgb", rgb=True)
    widget = RegisterWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.options.kind.setCurrentText("translation")
    widget.options.iterations.setValue(60)
    _run(widget, qtbot)
    assert errors == []
    warped = viewer.layers["moving rgb warped"]
    assert warped.data.shape == rgb.shape[:2]
    # np.roll: moving(x + (3, -2)) = fixed(x), so the pull-back shifts by (3, -2)
    np.testing.assert_allclose(widget.last.transform.matrix[:2, 2], (3.0, -2.0), atol=0.5)


def test_apply_transform_to_points_with_scale(make_napari_viewer, qtbot, tmp_path):
    from napari_nephi.core import AffineTransform

    m = np.eye(3)
    m[:2, 2] = (5.0, 0.0)  # fixed voxel x -> moving voxel x + (5, 0)
    AffineTransform(m, spacing=(2.0, 2.0)).save(tmp_path / "t")
    viewer = make_napari_viewer()
    pts = viewer.add_points(np.array([[15.0, 10.0]]), scale=(2.0, 2.0), name="moving pts")
    widget = RegisterWidget(viewer)
    viewer.window.add_dock_widget(widget)
    new = widget.apply_transform(tmp_path / "t", layer=pts)
    np.testing.assert_allclose(new.data, [[10.0, 10.0]], atol=1e-4)  # moving voxel 15 -> fixed 10
    np.testing.assert_allclose(new.scale, (2.0, 2.0))


def test_apply_transform_rescales_layers_of_another_spacing(make_napari_viewer, qtbot, tmp_path):
    """A transform saved with the moving frame lands a half-resolution channel where the full one lands."""
    from napari_nephi.core import AffineTransform

    m = np.eye(3)
    m[:2, 2] = (6.0, -4.0)
    AffineTransform(m, shape=(64, 64), spacing=(1.0, 1.0), moving_spacing=(1.0, 1.0)).save(tmp_path / "t")
    rng = np.random.default_rng(0)
    full = ndi.gaussian_filter(rng.random((64, 64)), 3).astype(np.float32)
    labels = np.zeros((64, 64), np.uint8)
    labels[20:40, 24:44] = 7
    viewer = make_napari_viewer()
    full_layer = viewer.add_image(full, name="full")
    half_layer = viewer.add_image(full[::2, ::2].copy(), scale=(2.0, 2.0), name="half")
    half_labels = viewer.add_labels(labels[::2, ::2].copy(), scale=(2.0, 2.0), name="half labels")
    widget = RegisterWidget(viewer)
    viewer.window.add_dock_widget(widget)
    a = widget.apply_transform(tmp_path / "t", layer=full_layer).data
    b = widget.apply_transform(tmp_path / "t", layer=half_layer).data
    lab = widget.apply_transform(tmp_path / "t", layer=half_labels).data
    assert a.shape == b.shape == lab.shape == (64, 64)
    inner = (slice(8, -8), slice(8, -8))
    assert np.abs(a[inner] - b[inner]).mean() < 0.1 * np.abs(a[inner]).mean()
    expected = ndi.shift(labels, (-6, 4), order=0)  # fixed x shows moving x + (6, -4)
    assert set(np.unique(lab)) == {0, 7}
    assert (lab == expected).mean() > 0.97


def _first_run(make_napari_viewer, qtbot, pair):
    viewer, widget = _viewer_with_widget(make_napari_viewer, qtbot, pair)
    widget.options.iterations.setValue(30)
    widget.options.levels.setValue(2)
    _run(widget, qtbot)
    return viewer, widget


def test_second_run_previews_in_the_warped_layer_and_adds_nothing(make_napari_viewer, qtbot, pair, errors):
    viewer, widget = _first_run(make_napari_viewer, qtbot, pair)
    warped = viewer.layers["moving warped"]
    layers_before = list(viewer.layers)
    changes, previews_in = [], []
    viewer.layers.events.inserted.connect(lambda e: changes.append("inserted"))
    viewer.layers.events.removed.connect(lambda e: changes.append("removed"))
    widget.runner.progressed.connect(lambda ev: previews_in.append(widget.preview_layer is warped))
    _run(widget, qtbot)
    assert changes == [] and list(viewer.layers) == layers_before  # no preview layer came or went
    assert previews_in and all(previews_in)
    assert warped.data is widget.last.warped and tuple(warped.translate) == (0.0, 0.0)
    assert errors == []


@pytest.mark.parametrize("keep", [False, True])
def test_cancelled_second_run_gives_the_warped_layer_back(
    make_napari_viewer, qtbot, pair, errors, monkeypatch, keep
):
    viewer, widget = _first_run(make_napari_viewer, qtbot, pair)
    warped = viewer.layers["moving warped"]
    data, limits = warped.data, tuple(warped.contrast_limits)
    names = [ly.name for ly in viewer.layers]
    EndlessEngine(monkeypatch).install()
    widget.keep_partial.setChecked(keep)
    with qtbot.waitSignal(widget.run_done, timeout=120000):
        widget.start()
        try:
            qtbot.waitUntil(lambda: warped.data is not data, timeout=60000)  # a preview arrived
        finally:
            widget.cancel_button.click()  # never leave an endless run behind
    assert warped.data is data and tuple(warped.contrast_limits) == limits
    expected = names + (["moving preview (partial, cancelled)"] if keep else [])
    assert [ly.name for ly in viewer.layers] == expected
    assert errors == []


def test_a_preview_right_after_a_throttled_step_is_still_shown(make_napari_viewer, qtbot, pair, monkeypatch):
    """Status updates are throttled; previews (already throttled by the engine) never are. The widget's
    clock stands still (session 41: at load 12 the real one passed PREVIEW_INTERVAL between two emits and
    step 3 was shown), so all three events fall in one interval."""
    import time
    from types import SimpleNamespace

    from napari_nephi.core.progress import ProgressEvent

    still = {k: getattr(time, k) for k in dir(time) if not k.startswith("_")}
    monkeypatch.setattr(rw, "time", SimpleNamespace(**{**still, "monotonic": lambda: 1e6}))
    _, widget = _viewer_with_widget(make_napari_viewer, qtbot, pair)
    widget._inputs = {"scale": (1.0, 1.0), "name": "moving"}
    widget.state.start(widget.runner)  # as if Run was clicked; the runner's signals come by hand
    widget.runner.progressed.emit(ProgressEvent(1, 100, 0.5))  # a plain step: shown, starts the throttle
    preview = np.full(pair[0].shape, 0.25, np.float32)
    widget.runner.progressed.emit(ProgressEvent(2, 100, 0.4, preview=preview))  # within the same interval
    assert widget.preview_layer.data is preview and widget.preview_layer.visible
    widget.runner.progressed.emit(ProgressEvent(3, 100, 0.3))  # a plain step inside the interval: skipped
    assert "step 2/100" in widget.status.text()
    widget.runner.stopped.emit()
    assert widget.state.state is RunState.IDLE and widget.run_button.isEnabled()


def test_previous_warped_layer_used_as_input_is_not_overwritten_by_previews(
    make_napari_viewer, qtbot, pair, errors
):
    viewer, widget = _first_run(make_napari_viewer, qtbot, pair)
    warped = viewer.layers["moving warped"]
    widget.moving.set_layer(warped)  # register the previous result again
    previews_in = []
    widget.runner.progressed.connect(lambda ev: previews_in.append(widget.preview_layer is warped))
    _run(widget, qtbot)
    assert previews_in and not any(previews_in)  # the previews had a layer of their own
    assert errors == []


def test_buttons_follow_the_run_state_and_a_run_after_cancel_works(
    make_napari_viewer, qtbot, pair, errors, endless
):
    viewer, widget = _viewer_with_widget(make_napari_viewer, qtbot, pair)
    seen = []
    widget.state.changed.connect(
        lambda old, new: seen.append((new, widget.run_button.isEnabled(), widget.cancel_button.isEnabled()))
    )
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    with qtbot.waitSignal(widget.run_done, timeout=60000):
        widget.start()
        qtbot.waitUntil(lambda: widget.runner.busy, timeout=10000)
        widget.start()  # Run while running does nothing
        widget.cancel_button.click()
    assert seen == [
        (RunState.RUNNING, False, True),
        (RunState.CANCELLING, False, False),
        (RunState.IDLE, True, False),
    ]
    assert "Cancelled" in widget.status.text() and [ly.name for ly in viewer.layers] == ["fixed", "moving"]
    assert endless.outcome == ["cancelled"]
    endless.remove()
    seen.clear()
    widget.options.iterations.setValue(20)
    widget.options.levels.setValue(1)
    _run(widget, qtbot)
    assert [state for state, *_ in seen] == [RunState.RUNNING, RunState.ADDING_RESULTS, RunState.IDLE]
    assert seen[1][1:] == (False, False)  # neither Run nor Cancel while the layers are added
    assert "Done" in widget.status.text() and "moving warped" in [ly.name for ly in viewer.layers]
    assert errors == []


def test_closing_the_viewer_mid_run_is_safe(gc_unfrozen, make_napari_viewer, qtbot, pair, endless):
    """Closing napari while a run is on deletes the widget, which cancels the run; nothing is left."""
    import gc

    from qtpy.QtCore import QThreadPool

    viewer, widget = _viewer_with_widget(make_napari_viewer, qtbot, pair)
    widget.start()
    qtbot.waitUntil(lambda: widget.preview_layer is not None and widget.preview_layer.visible, timeout=30000)
    assert gc.get_freeze_count() > 0  # the run holds the collector's freeze
    with qtbot.waitSignal(widget.destroyed, timeout=10000):
        viewer.close()
    pool = QThreadPool.globalInstance()
    qtbot.waitUntil(lambda: pool.activeThreadCount() == 0, timeout=5000)
    assert endless.outcome == ["cancelled"]  # the worker stopped through the engine's cancel
    assert gc.get_freeze_count() == 0
    qtbot.wait(200)  # late signals of the worker, if any, find nobody


def test_docked_widgets_fit_on_a_screen(make_napari_viewer, qtbot, pair):
    """Each dock asks for at most 900 px and scrolls below that; three docked fit on a 1080 px screen."""
    from napari_nephi.widgets import EMAlignWidget, NephiWidget

    viewer, register = _viewer_with_widget(make_napari_viewer, qtbot, pair)
    widgets = [NephiWidget(viewer), register, EMAlignWidget(viewer)]
    for w in (widgets[0], widgets[2]):
        viewer.window.add_dock_widget(w, name=type(w).__name__)
    for w in widgets:
        assert w.sizeHint().height() <= 900, type(w).__name__
        assert w.minimumSizeHint().height() <= 900, type(w).__name__
    assert register.window().minimumSizeHint().height() <= 1080
    # folded sections are closed at first and open on a click
    for section in (register.landmarks, register.options.advanced, widgets[2].options.advanced):
        assert not section.isExpanded()
        section.toggleButton().click()
        assert section.isExpanded()
