"""Longest GUI-thread stall while the register widget applies a saved transform to a volume (session 43).

    OMP_NUM_THREADS=1 nice -n 5 xvfb-run -a python benchmarks/apply_responsiveness.py [--size 160]

A QTimer ticks every 10 ms on the GUI thread; the longest gap between two ticks is the longest time napari
could not respond. Two arms in one process, alternating (sync, worker, worker, sync per round):

- ``sync``: what "Apply saved transform" did before session 43, on napari's thread: ``t.warp`` of the
  layer's data, then ``viewer.add_image``.
- ``worker``: ``RegisterWidget.apply_transform(folder, layer=...)``, which warps in a worker thread while
  the event loop runs (its ``wait=True`` form spins it until the layer is in).

The transform is a smooth random displacement field of ``--size``^3 voxels (up to 3 voxels), the image
a float32 volume of the same size. Prints, per arm and round, the wall seconds of the apply and the
longest gap, and checks that both arms give the same array. Not a test; the numbers are quoted in
docs/register_widget.md ("Session 43").

``--cancel-after S`` (session 44) times a Cancel instead: the Apply starts (``wait=False``), Cancel is
clicked ``S`` seconds after the warp has started, and the time from the click until the widget is idle
again (``apply_done``) is printed. Two arms, alternating (to-end, chunked, chunked, to-end per round):

- ``to-end``: the warp ignores the cancel (``Transform.warp`` called without it), as before session 44:
  the warp runs to its end and its result is dropped.
- ``chunked``: the widget as it is: the warp stops before its next chunk (2^20 output voxels each).

Both arms must add no layer.

``--job save`` (session 44) times "Save transform…" the same way as the Apply (sync, worker, worker,
sync): ``sync`` writes the transform folder and run.json on napari's thread (``save_with_run`` called
there, which is what ``save_transform`` did before session 44), ``worker`` is
``RegisterWidget.save_transform(folder)`` now. The widget's last registration is a ``--size``^3
displacement transform with its inverse field (as NePhi saves one). Both arms' saved fields must be
equal.

``--job start`` (session 44) times Run with a lazy moving layer: a folder of ``--size`` section TIFFs of
``--size``^2 float32 opened lazily (``read_section_folder``, dask), the fixed layer the same volume in
memory. Each arm clicks Run, lets the registration go for ``--window`` seconds, cancels it and waits until
the widget is idle; the longest gap covers the whole arm. ``sync`` reads the lazy layer on napari's thread
in ``start`` (``np.asarray``, what the widget did before session 44), ``worker`` is the widget now (the
worker thread reads it).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cancel-after", type=float, default=None, help="time a Cancel this many s into the warp")
    p.add_argument("--job", choices=("apply", "save", "start"), default="apply")
    p.add_argument("--window", type=float, default=3.0, help="--job start: seconds before Cancel")
    args = p.parse_args()

    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_nephi.core import DisplacementTransform, Registration, load_transform
    from napari_nephi.synthetic.deformation import random_smooth_displacement
    from napari_nephi.widgets import RegisterWidget
    from napari_nephi.widgets.register_widget import save_with_run

    shape = (args.size,) * 3
    rng = np.random.default_rng(0)
    volume = rng.random(shape, dtype=np.float32)
    u = random_smooth_displacement(shape, 3.0, args.size / 4, seed=1)
    folder = Path(tempfile.mkdtemp(prefix="apply_responsiveness_")) / "t"
    DisplacementTransform(u).save(folder)

    viewer = napari.Viewer(show=True)
    layer = viewer.add_image(volume, name="volume")
    widget = RegisterWidget(viewer)
    viewer.window.add_dock_widget(widget)
    app = QApplication.instance()
    for _ in range(100):  # let the window and the widget's warm-up settle
        app.processEvents()
        time.sleep(0.01)

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))

    def sync():
        t = load_transform(folder)
        return viewer.add_image(t.warp(np.asarray(layer.data)), name="volume (sync)", scale=t.spacing)

    def worker():
        return widget.apply_transform(folder, layer=layer)

    if args.job == "save":
        widget.last = Registration(
            volume, DisplacementTransform(u, inverse_field=-u), metrics={"seconds": 1.0}
        )
        widget._last_run = {"settings": {"method": "nephi"}, "world_affine": None}
        out = Path(tempfile.mkdtemp(prefix="save_responsiveness_"))
        count = iter(range(1000))

        def sync():  # what save_transform did on napari's thread before session 44
            run = {"settings": widget._last_run["settings"], "metrics": widget.last.metrics}
            return _Saved(save_with_run(None, None, widget.last.transform, out / f"s{next(count)}", run))

        def worker():
            return _Saved(widget.save_transform(out / f"w{next(count)}"))

    if args.cancel_after is not None:
        cancel_latency(viewer, widget, layer, folder, args.cancel_after, args.rounds)
        viewer.close()
        return

    if args.job == "start":
        sync, worker = _lazy_start_arms(viewer, widget, volume, args.window)

    results = {}
    print(f"load average {os.getloadavg()[0]:.2f}; volume {shape}")
    for r in range(args.rounds):
        for arm, run in (("sync", sync), ("worker", worker), ("worker", worker), ("sync", sync)):
            ticks.clear()
            timer.start()
            for _ in range(5):
                app.processEvents()
                time.sleep(0.01)
            start = time.perf_counter()
            new = run()
            seconds = time.perf_counter() - start
            for _ in range(5):
                app.processEvents()
                time.sleep(0.01)
            timer.stop()
            gaps = np.diff(ticks) if len(ticks) > 1 else np.array([seconds])
            # a run that never gave the loop back leaves no tick inside it: its gap is the whole run
            longest = max(float(gaps.max()), seconds if len(ticks) < 3 else 0.0)
            print(
                f"round {r} {arm:6s}: {seconds:6.2f} s, longest GUI gap {1000 * longest:7.0f} ms", flush=True
            )
            results.setdefault(arm, new.data)
            new.visible = (
                False  # kept: removing a layer here crashed software OpenGL under Xvfb (draw after removal)
            )
    if args.job == "save":  # the saved folders: their fields
        results = {arm: load_transform(folder).displacement() for arm, folder in results.items()}
    same = np.array_equal(results["sync"], results["worker"])
    print(f"same array in both arms: {same}")
    viewer.close()


def _lazy_start_arms(viewer, widget, volume, window: float):
    """The two arms of ``--job start``: Run on a lazy moving layer, Cancel after ``window`` seconds."""
    import tifffile
    from qtpy.QtWidgets import QApplication

    from napari_nephi.io.stack import read_section_folder
    from napari_nephi.widgets import register_widget as rw

    folder = Path(tempfile.mkdtemp(prefix="start_responsiveness_"))
    for k, section in enumerate(volume):
        tifffile.imwrite(folder / f"s{k}.tif", section)
    lazy, _ = read_section_folder(folder)
    widget.fixed.set_layer(viewer.add_image(volume, name="fixed", contrast_limits=(0, 1)))
    widget.moving.set_layer(viewer.add_image(lazy, name="moving (lazy)", contrast_limits=(0, 1)))
    widget.options.iterations.setValue(500)  # still running when Cancel comes
    app, new = QApplication.instance(), rw.layer_image

    def old(layer):  # session 43: the level was read with np.asarray on napari's thread
        return np.asarray(new(layer))

    def arm(read):
        rw.layer_image = read
        done = []

        def over():
            done.append(True)

        widget.run_done.connect(over)
        widget.start()
        begin = time.perf_counter()
        while time.perf_counter() - begin < window:
            app.processEvents()
            time.sleep(0.005)
        widget.cancel()
        while not done:
            app.processEvents()
            time.sleep(0.005)
        widget.run_done.disconnect(over)
        rw.layer_image = new
        return _Saved(np.zeros(1))  # nothing to compare: the run was cancelled

    return (lambda: arm(old)), (lambda: arm(new))


class _Saved:
    """A saved folder (or nothing) in the place of a layer (``data``; ``visible``: ignored)."""

    def __init__(self, folder):
        assert folder is not None, "the save failed"
        self.data, self.visible = folder, True


def cancel_latency(viewer, widget, layer, folder, after: float, rounds: int) -> None:
    """Cancel an Apply ``after`` seconds into its warp; print the seconds from the click until it is idle."""
    import threading

    from qtpy.QtWidgets import QApplication

    from napari_nephi.core import load_transform

    app = QApplication.instance()
    cls = type(load_transform(folder))
    real = cls.warp
    started = threading.Event()
    arm = {"to-end": False}

    def warp(self, image, *a, cancel=None, **kw):
        started.set()
        return real(self, image, *a, cancel=None if arm["to-end"] else cancel, **kw)

    cls.warp = warp
    n = len(viewer.layers)
    print(f"load average {os.getloadavg()[0]:.2f}; volume {layer.data.shape}; Cancel {after} s into the warp")
    try:
        for r in range(rounds):
            for name in ("to-end", "chunked", "chunked", "to-end"):
                arm["to-end"] = name == "to-end"
                started.clear()
                done = []
                widget.apply_done.connect(done.append)
                begin = time.perf_counter()
                widget.apply_transform(folder, layer=layer, wait=False)
                while not started.is_set():
                    app.processEvents()
                    time.sleep(0.005)
                warp_start = time.perf_counter()
                while time.perf_counter() - warp_start < after:
                    app.processEvents()
                    time.sleep(0.005)
                click = time.perf_counter()
                widget.cancel_button.click()
                while not done:
                    app.processEvents()
                    time.sleep(0.002)
                idle = time.perf_counter()
                widget.apply_done.disconnect(done.append)
                assert done == [None] and len(viewer.layers) == n, "a cancelled apply added a layer"
                print(
                    f"round {r} {name:7s}: Cancel to idle {1000 * (idle - click):6.0f} ms "
                    f"(apply to idle {idle - begin:5.2f} s)",
                    flush=True,
                )
    finally:
        cls.warp = real


if __name__ == "__main__":
    main()
