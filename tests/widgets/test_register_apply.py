"""The register widget's "Apply saved transform": the warp runs in a worker thread (session 43)."""

import threading

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from napari_nephi.core import AffineTransform
from napari_nephi.core.errors import InputError
from napari_nephi.core.transform_io import load_transform
from napari_nephi.widgets import RegisterWidget
from napari_nephi.widgets import register_widget as rw
from napari_nephi.widgets._state import RunState

WAIT_MS = 30000


@pytest.fixture
def errors(monkeypatch):
    messages = []
    monkeypatch.setattr(rw, "show_error", messages.append)
    return messages


@pytest.fixture
def saved(tmp_path):
    """A saved affine transform with a moving frame (so a layer of another spacing is rescaled)."""
    m = np.eye(3)
    m[:2, 2] = (6.0, -4.0)
    m[0, 1] = 0.05
    AffineTransform(m, shape=(48, 40), spacing=(1.0, 1.0), moving_spacing=(1.0, 1.0)).save(tmp_path / "t")
    return tmp_path / "t"


class Gate:
    """Replaces the transform's warps: each waits until :meth:`open` (at most 30 s), records where and
    with how many torch threads it ran, then warps as before (or raises ``error``)."""

    def __init__(self, monkeypatch, cls):
        self.opened = threading.Event()
        self.entered = threading.Event()
        self.threads: list = []
        self.torch_threads: list[int] = []
        self.error: Exception | None = None
        for name in ("warp", "warp_labels"):
            monkeypatch.setattr(cls, name, self._wrap(getattr(cls, name)))

    def _wrap(self, real):
        def warp(transform, *args, **kwargs):
            self.threads.append(threading.current_thread())
            self.torch_threads.append(torch.get_num_threads())
            self.entered.set()
            assert self.opened.wait(30)
            if self.error is not None:
                raise self.error
            return real(transform, *args, **kwargs)

        return warp

    def open(self) -> None:
        self.opened.set()


@pytest.fixture
def gate(monkeypatch, saved):
    return Gate(monkeypatch, type(load_transform(saved)))


def _viewer(make_napari_viewer):
    rng = np.random.default_rng(0)
    image = ndi.gaussian_filter(rng.random((40, 36)), 2).astype(np.float32)
    labels = np.zeros((20, 18), np.uint16)
    labels[4:12, 5:14] = 7
    labels[13:18, 2:8] = 300
    viewer = make_napari_viewer()
    viewer.add_image(image, name="image")
    viewer.add_labels(labels, name="labels", scale=(2.0, 2.0))  # half resolution: rescaled by the frame
    viewer.add_points(np.array([[15.0, 10.0], [30.0, 20.5]]), name="points", scale=(1.0, 2.0))
    widget = RegisterWidget(viewer)
    viewer.window.add_dock_widget(widget)
    return viewer, widget


def _wait_idle(widget, qtbot):
    qtbot.waitUntil(lambda: widget.state.is_(RunState.IDLE) and not widget.applier.busy, timeout=WAIT_MS)


def test_apply_returns_before_the_warp_ends_and_adds_the_layer_after(make_napari_viewer, qtbot, saved, gate):
    viewer, widget = _viewer(make_napari_viewer)
    image = viewer.layers["image"]
    before = image.data.copy()
    assert widget.apply_transform(saved, layer=image, wait=False) is None  # returns at once
    assert gate.entered.wait(10)  # the warp has started and waits for the gate
    assert "image (transformed)" not in viewer.layers
    assert not widget.apply_button.isEnabled() and not widget.run_button.isEnabled()
    assert widget.cancel_button.isEnabled()
    assert "Applying" in widget.status.text()
    with qtbot.waitSignal(widget.apply_done, timeout=WAIT_MS) as done:
        gate.open()
    new = viewer.layers["image (transformed)"]
    assert done.args == [new]
    assert gate.threads[0] is not threading.main_thread()
    t = load_transform(saved)
    np.testing.assert_array_equal(new.data, t.warp(before, image_spacing=(1.0, 1.0)))
    np.testing.assert_array_equal(image.data, before)  # the input is untouched
    _wait_idle(widget, qtbot)
    assert widget.apply_button.isEnabled() and widget.run_button.isEnabled()


def test_apply_in_a_worker_gives_the_synchronous_result(make_napari_viewer, qtbot, saved, errors):
    """Image, labels (half resolution) and points: the same arrays as the warps called directly."""
    viewer, widget = _viewer(make_napari_viewer)
    t = load_transform(saved)
    image, labels, points = (viewer.layers[n] for n in ("image", "labels", "points"))
    new_image = widget.apply_transform(saved, layer=image)  # wait=True: returns the new layer
    np.testing.assert_array_equal(new_image.data, t.warp(np.asarray(image.data), image_spacing=(1.0, 1.0)))
    new_labels = widget.apply_transform(saved, layer=labels)
    expected = t.warp_labels(np.asarray(labels.data), image_spacing=(2.0, 2.0))
    np.testing.assert_array_equal(new_labels.data, expected)
    assert new_labels.data.dtype == np.uint16 and set(np.unique(expected)) == {0, 7, 300}
    new_points = widget.apply_transform(saved, layer=points)
    world = np.asarray(points.data, float) * points.scale + points.translate
    np.testing.assert_array_equal(
        new_points.data, t.inverse().map_points(world / np.asarray(t.moving_spacing))
    )
    for new, kind in ((new_image, "Image"), (new_labels, "Labels"), (new_points, "Points")):
        assert type(new).__name__ == kind and new.visible and new in viewer.layers
        np.testing.assert_allclose(new.scale, t.spacing)
    assert [ly.name for ly in viewer.layers][3:] == [
        "image (transformed)", "labels (transformed)", "points (transformed)"
    ]  # fmt: skip
    assert errors == []


def test_the_warp_runs_with_torchs_own_thread_count(make_napari_viewer, qtbot, saved, gate):
    """Off napari's thread, whose count numba's OpenMP pool may have set to the cores' count."""
    viewer, widget = _viewer(make_napari_viewer)
    fresh = []
    reader = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    reader.start()
    reader.join()
    gate.open()
    widget.apply_transform(saved, layer=viewer.layers["labels"])
    assert gate.threads[0] is not threading.main_thread()
    assert gate.torch_threads == fresh


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (
            InputError("The labels are too large; crop them first."),
            "The labels are too large; crop them first.",
        ),
        (RuntimeError("boom"), "Applying the transform failed unexpectedly: RuntimeError: boom"),
    ],
)
def test_an_error_in_the_warp_reaches_show_error(
    make_napari_viewer, qtbot, saved, gate, errors, error, message
):
    viewer, widget = _viewer(make_napari_viewer)
    gate.error = error
    gate.open()
    n = len(viewer.layers)
    assert widget.apply_transform(saved, layer=viewer.layers["labels"]) is None
    assert errors == [message]
    assert len(viewer.layers) == n
    assert message in widget.status.text()
    _wait_idle(widget, qtbot)
    assert widget.apply_button.isEnabled()


def test_a_missing_folder_and_an_untransformable_layer_say_so(make_napari_viewer, qtbot, tmp_path, errors):
    viewer, widget = _viewer(make_napari_viewer)
    n = len(viewer.layers)
    assert widget.apply_transform(tmp_path / "nothing here", layer=viewer.layers["image"]) is None
    assert len(errors) == 1 and "nothing here" in errors[0]
    shapes = viewer.add_shapes(
        [np.array([[1.0, 1.0], [5.0, 5.0], [1.0, 8.0]])], shape_type="polygon", name="shapes"
    )
    assert widget.apply_transform(tmp_path, layer=shapes) is None
    assert errors[1] == "Cannot apply a transform to a Shapes layer."
    assert len(viewer.layers) == n + 1
    _wait_idle(widget, qtbot)


def test_a_second_apply_while_one_runs_is_refused(make_napari_viewer, qtbot, saved, gate, errors):
    viewer, widget = _viewer(make_napari_viewer)
    widget.apply_transform(saved, layer=viewer.layers["image"], wait=False)
    assert gate.entered.wait(10)
    assert widget.apply_transform(saved, layer=viewer.layers["labels"], wait=False) is None
    assert errors == ["A transform is being applied; wait for it to finish (or Cancel it) first."]
    widget.start()  # Run is refused too (its button is disabled)
    assert not widget.runner.busy
    with qtbot.waitSignal(widget.apply_done, timeout=WAIT_MS):
        gate.open()
    assert [ly.name for ly in viewer.layers][3:] == ["image (transformed)"]
    assert len(gate.threads) == 1


def test_an_apply_while_a_registration_runs_is_refused(make_napari_viewer, qtbot, saved, errors, monkeypatch):
    viewer, widget = _viewer(make_napari_viewer)
    widget.state.to(RunState.RUNNING)  # as start() does
    assert not widget.apply_button.isEnabled()
    assert widget.apply_transform(saved, layer=viewer.layers["image"]) is None
    assert errors == ["A registration is running; wait for it to finish (or Cancel it) first."]
    assert not widget.applier.busy
    widget.state.to(RunState.IDLE)
    assert widget.apply_button.isEnabled()


def test_cancel_drops_the_result_of_an_apply(make_napari_viewer, qtbot, saved, gate, errors):
    viewer, widget = _viewer(make_napari_viewer)
    n = len(viewer.layers)
    _cancel_a_held_apply(widget, qtbot, saved, viewer.layers["image"], gate.entered, gate.open)
    assert len(viewer.layers) == n and errors == []
    assert "Cancelled" in widget.status.text()
    assert not widget.runner.busy  # the registration runner was never involved
    # and the widget applies again afterwards
    assert widget.apply_transform(saved, layer=viewer.layers["image"]) in viewer.layers


def _cancel_a_held_apply(widget, qtbot, saved, layer, held: threading.Event, release) -> None:
    """Apply to ``layer``; once the worker is ``held``, click Cancel, ``release`` it and wait until idle."""
    widget.apply_transform(saved, layer=layer, wait=False)
    assert held.wait(10)
    widget.cancel_button.click()
    assert widget.state.is_(RunState.CANCELLING)
    with qtbot.waitSignal(widget.apply_done, timeout=WAIT_MS) as done:
        release()
    assert done.args == [None]
    _wait_idle(widget, qtbot)


def test_closing_the_viewer_during_an_apply_adds_nothing(make_napari_viewer, qtbot, saved, gate):
    viewer, widget = _viewer(make_napari_viewer)
    applier = widget.applier
    widget.apply_transform(saved, layer=viewer.layers["image"], wait=False)
    assert gate.entered.wait(10)
    worker = applier._worker
    with qtbot.waitSignal(widget.destroyed, timeout=WAIT_MS):
        widget.deleteLater()
    gate.open()
    worker.await_workers(WAIT_MS)
    qtbot.wait(50)  # a late signal would land here
    assert "image (transformed)" not in viewer.layers


def test_a_late_stopped_of_the_registration_runner_leaves_an_apply_alone(
    make_napari_viewer, qtbot, saved, gate
):
    """Each runner's signals act on its own job only (review 1 of session 43, D1)."""
    viewer, widget = _viewer(make_napari_viewer)
    widget.apply_transform(saved, layer=viewer.layers["image"], wait=False)
    assert gate.entered.wait(10)
    bar = widget._apply_bar
    widget.runner.stopped.emit()  # as if a registration's worker ended now
    assert widget.state.is_(RunState.RUNNING) and not widget.apply_button.isEnabled()
    assert widget._apply_bar is bar is not None  # the apply's progress bar is still open
    with qtbot.waitSignal(widget.apply_done, timeout=WAIT_MS) as done:
        gate.open()
    assert done.args == [viewer.layers["image (transformed)"]]
    _wait_idle(widget, qtbot)


def test_a_run_is_idle_only_once_its_worker_thread_has_ended(make_napari_viewer, qtbot, saved, errors):
    """A run whose layers are in but whose worker has not ended yet holds the state (review 1, D1): an Apply
    then is refused instead of sharing the state with the run's late ``stopped``."""
    viewer, widget = _viewer(make_napari_viewer)
    image = viewer.layers["image"]
    viewer.add_image(np.roll(image.data, (2, -1), axis=(0, 1)), name="moving")
    widget.fixed.set_layer(image)
    widget.moving.set_layer(viewer.layers["moving"])
    widget.options.kind.setCurrentText("translation")
    widget.options.iterations.setValue(5)
    held = []
    real = widget.runner._on_finished  # the worker thread's end (connected when the run starts)
    widget.runner._on_finished = lambda: held.append(real)
    ended = []
    widget.run_done.connect(lambda: ended.append(True))
    widget.start()
    qtbot.waitUntil(lambda: bool(held) and widget.status.text().startswith("Done"), timeout=WAIT_MS)
    qtbot.wait(100)
    assert widget.state.is_(RunState.ADDING_RESULTS) and not ended
    assert not widget.apply_button.isEnabled() and not widget.run_button.isEnabled()
    assert widget.apply_transform(saved, layer=image) is None
    assert errors == ["A registration is running; wait for it to finish (or Cancel it) first."]
    held[0]()  # the worker thread ends
    assert widget.state.is_(RunState.IDLE) and ended == [True]
    assert widget.apply_button.isEnabled() and widget._progress_bar is None
    assert widget.apply_transform(saved, layer=image) in viewer.layers


def test_a_layer_napari_refuses_is_an_error_not_a_stuck_widget(
    make_napari_viewer, qtbot, saved, errors, monkeypatch
):
    """Review 2 (session 43): an exception while inserting the layer reaches show_error and the
    widget goes back to IDLE (before, Run and Apply stayed disabled and ``wait=True`` hung)."""
    viewer, widget = _viewer(make_napari_viewer)

    def refuse(self, layer):
        raise ValueError("napari refused the layer")

    monkeypatch.setattr(type(viewer), "add_layer", refuse)  # a pydantic model: patch its class
    n = len(viewer.layers)
    assert widget.apply_transform(saved, layer=viewer.layers["image"]) is None
    assert errors == ["Could not add the transformed layer: ValueError: napari refused the layer"]
    assert len(viewer.layers) == n
    _wait_idle(widget, qtbot)
    assert widget.apply_button.isEnabled() and widget.run_button.isEnabled()


class SlowSlabs:
    """The warps work on one-row slabs; with :attr:`hold` set, the second slab is handed out only after
    :meth:`go` (the first chunk is done by then). Counts the chunks actually mapped."""

    def __init__(self, monkeypatch):
        from napari_nephi.core import warp as warp_module

        self.hold = False
        self.first_done, self.went = threading.Event(), threading.Event()
        self.given, self.mapped = 0, 0
        real_slabs, real_grid = warp_module.iter_slabs, warp_module.slab_grid

        def slabs(shape, chunk_voxels=warp_module.CHUNK_VOXELS):
            for i, slab in enumerate(real_slabs(shape, 1)):  # one row a chunk
                if i == 1 and self.hold:
                    self.first_done.set()
                    assert self.went.wait(30)
                self.given += 1
                yield slab

        def grid(*args, **kwargs):
            self.mapped += 1
            return real_grid(*args, **kwargs)

        monkeypatch.setattr(warp_module, "iter_slabs", slabs)
        monkeypatch.setattr(warp_module, "slab_count", lambda shape, chunk_voxels=0: shape[0])
        monkeypatch.setattr(warp_module, "slab_grid", grid)

    def go(self) -> None:
        self.went.set()


@pytest.mark.parametrize("name", ["image", "labels"])
def test_cancel_stops_the_apply_inside_the_warp(make_napari_viewer, qtbot, saved, errors, monkeypatch, name):
    """Session 44: Cancel during the warp stops it before its next chunk (before, the warp ran to its end
    and the result was dropped); the widget is idle with no new layer. Uncancelled, the chunked warp in the
    worker gives the synchronous result."""
    viewer, widget = _viewer(make_napari_viewer)
    layer = viewer.layers[name]
    slabs = SlowSlabs(monkeypatch)
    slabs.hold = True
    n = len(viewer.layers)
    # the worker is held after the first chunk, before the second is handed out
    _cancel_a_held_apply(widget, qtbot, saved, layer, slabs.first_done, slabs.go)
    assert slabs.given == 2 and slabs.mapped == 1  # the second chunk was handed out, then refused
    assert len(viewer.layers) == n and errors == []
    assert widget.status.text() == "Cancelled; no layers were changed."
    assert widget.run_button.isEnabled() and widget.apply_button.isEnabled()
    assert not widget.cancel_button.isEnabled()
    # uncancelled, one-row chunks in the worker: the synchronous warp's array
    slabs.hold, slabs.given = False, 0
    new = widget.apply_transform(saved, layer=layer)
    t = load_transform(saved)
    frame = {"image_spacing": tuple(layer.scale)}
    expected = t.warp(layer.data, **frame) if name == "image" else t.warp_labels(layer.data, **frame)
    assert slabs.given == 2 * t.shape[0]  # the worker's warp and this one, a row at a time
    np.testing.assert_array_equal(new.data, expected)


# -- the Apply's progress bar, a chunk at a time (session 46) --------------------------------------


class Bars:
    """Records ``(n, total)`` at each refresh of the progress bars the widget opens, and whether each
    bar was closed. The bars are napari's own."""

    def __init__(self, monkeypatch):
        self.values: list[list[tuple[int, int]]] = []
        self.bars = []
        real = rw.napari_progress

        def make(*args, **kwargs):
            bar = real(*args, **kwargs)
            values, refresh = [], bar.refresh
            self.values.append(values)
            self.bars.append(bar)

            def recorded(*a, **k):
                values.append((bar.n, bar.total))
                return refresh(*a, **k)

            bar.refresh = recorded
            return bar

        monkeypatch.setattr(rw, "napari_progress", make)
        monkeypatch.setattr(rw, "APPLY_BAR_INTERVAL", 0.0)  # every chunk refreshes the bar


@pytest.mark.parametrize("name", ["image", "labels"])
def test_the_apply_s_bar_counts_the_warp_s_chunks_to_the_total(
    make_napari_viewer, qtbot, saved, errors, monkeypatch, name
):
    """One-row chunks: the bar starts at 0 of the chunks, rises with each, ends at the total and is
    closed; the layer is the synchronous warp's."""
    viewer, widget = _viewer(make_napari_viewer)
    layer = viewer.layers[name]
    SlowSlabs(monkeypatch)
    bars = Bars(monkeypatch)
    new = widget.apply_transform(saved, layer=layer)
    t = load_transform(saved)
    frame = {"image_spacing": tuple(layer.scale)}
    expected = t.warp(layer.data, **frame) if name == "image" else t.warp_labels(layer.data, **frame)
    np.testing.assert_array_equal(new.data, expected)
    (values,) = bars.values
    total = t.shape[0]  # one chunk per row of the output
    assert values == [(k, total) for k in range(total + 1)]
    assert widget._apply_bar is None and errors == []
    _wait_idle(widget, qtbot)


def test_the_apply_s_bar_stops_where_an_error_came_and_is_closed(
    make_napari_viewer, qtbot, saved, errors, monkeypatch
):
    viewer, widget = _viewer(make_napari_viewer)
    SlowSlabs(monkeypatch)
    from napari_nephi.core import warp as warp_module

    real_grid, calls = warp_module.slab_grid, []

    def fail_at_the_fourth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("disk on fire")
        return real_grid(*args, **kwargs)

    monkeypatch.setattr(warp_module, "slab_grid", fail_at_the_fourth)
    bars = Bars(monkeypatch)
    n = len(viewer.layers)
    assert widget.apply_transform(saved, layer=viewer.layers["image"]) is None
    assert errors == ["Applying the transform failed unexpectedly: RuntimeError: disk on fire"]
    assert bars.values == [[(k, 48) for k in range(4)]]  # three chunks done, the fourth failed
    assert widget._apply_bar is None and len(viewer.layers) == n
    _wait_idle(widget, qtbot)
    assert widget.apply_button.isEnabled()


def test_the_apply_s_bar_stops_at_a_cancel_and_is_closed(
    make_napari_viewer, qtbot, saved, errors, monkeypatch
):
    """The bar shows the first chunk of 48 while the worker is held; Cancel stops the warp there."""
    viewer, widget = _viewer(make_napari_viewer)
    slabs = SlowSlabs(monkeypatch)
    slabs.hold = True
    bars = Bars(monkeypatch)
    n = len(viewer.layers)
    widget.apply_transform(saved, layer=viewer.layers["image"], wait=False)
    assert slabs.first_done.wait(10)
    qtbot.waitUntil(lambda: bars.values[0][-1:] == [(1, 48)], timeout=WAIT_MS)
    assert bars.values == [[(0, 48), (1, 48)]] and widget._apply_bar is bars.bars[0]
    widget.cancel_button.click()
    with qtbot.waitSignal(widget.apply_done, timeout=WAIT_MS) as done:
        slabs.go()
    assert done.args == [None]
    _wait_idle(widget, qtbot)
    assert bars.values == [[(0, 48), (1, 48)]] and slabs.mapped == 1
    assert widget._apply_bar is None and len(viewer.layers) == n and errors == []
    assert widget.status.text() == "Cancelled; no layers were changed."
