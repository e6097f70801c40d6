"""A lazy (dask) layer is read in the registration's worker thread, not on napari's (session 44)."""

import threading

import dask
import dask.array as da
import numpy as np
import scipy.ndimage as ndi

from napari_nephi.widgets import RegisterWidget


def _lazy(array: np.ndarray, reads: list) -> da.Array:
    """``array`` as a one-chunk dask array whose read records the thread it runs on (the thread that
    computes it, with dask's synchronous scheduler)."""

    def read():
        reads.append(threading.current_thread())
        return array

    return da.from_delayed(dask.delayed(read)(), array.shape, array.dtype)


def _run(widget, qtbot):
    with qtbot.waitSignal(widget.run_done, timeout=60000):
        widget.start()


def test_a_lazy_moving_layer_is_read_in_the_worker_and_registers_as_numpy(make_napari_viewer, qtbot):
    rng = np.random.default_rng(5)
    fixed = ndi.gaussian_filter(rng.random((48, 44)), 2).astype(np.float32)
    moving = np.roll(fixed, (2, -3), axis=(0, 1))
    viewer = make_napari_viewer()
    viewer.add_image(fixed, name="fixed", contrast_limits=(0, 1))
    reads = []
    lazy = viewer.add_image(_lazy(moving, reads), name="lazy", contrast_limits=(0, 1))
    eager = viewer.add_image(moving, name="eager")
    widget = RegisterWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.options.kind.setCurrentText("translation")
    widget.options.iterations.setValue(10)
    widget.fixed.set_layer(viewer.layers["fixed"])
    widget.moving.set_layer(lazy)
    qtbot.wait(50)  # napari draws the layer (reads on its thread)
    lazy.visible = False  # no redraw of it on napari's thread during the run (review 2 of session 44, D-a)
    reads.clear()
    with dask.config.set(scheduler="synchronous"):
        _run(widget, qtbot)
    assert reads and all(t is not threading.main_thread() for t in reads), reads
    lazy_result = widget.last
    widget.moving.set_layer(eager)
    _run(widget, qtbot)
    np.testing.assert_array_equal(lazy_result.warped, widget.last.warped)
    np.testing.assert_array_equal(lazy_result.transform.matrix, widget.last.transform.matrix)
