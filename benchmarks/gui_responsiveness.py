"""Longest GUI-thread stall while a 3D registration runs in the widget (run under Xvfb).

    xvfb-run -a python benchmarks/gui_responsiveness.py [--method affine] [--sample mri]

A QTimer fires every 10 ms on the GUI thread; the longest gap between two ticks while the
worker runs is the longest time napari could not respond. Target: no stall over 100 ms.
Gaps are reported for the registration itself (worker running, progress and previews arriving)
and for adding the result layers to the viewer afterwards.
"""

from __future__ import annotations

import argparse
import json
import time

import napari
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QApplication

from napari_nephi import sample_data
from napari_nephi.widgets import RegisterWidget


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="affine")
    p.add_argument("--sample", default="mri")
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--option", action="append", default=[], help="KEY=JSON engine option")
    args = p.parse_args()
    viewer = napari.Viewer(show=True)
    for data, kwargs, kind in getattr(sample_data, f"{args.sample}_sample")():
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = RegisterWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.options.method.setCurrentText(args.method)
    widget.options.iterations.setValue(args.iterations)
    app = QApplication.instance()
    for _ in range(50):  # let the window settle before measuring
        app.processEvents()
        time.sleep(0.01)
    gaps, last = [], [time.perf_counter()]

    def tick():
        now = time.perf_counter()
        gaps.append(now - last[0])
        last[0] = now

    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(tick)
    timer.start()
    start = time.perf_counter()
    handler = {}
    done = []
    widget.runner.finished.connect(lambda _: handler.update(ticks=len(gaps), t0=time.perf_counter()))
    widget.run_done.connect(lambda: done.append(time.perf_counter()))
    widget.start()
    while not done:
        app.processEvents()
        time.sleep(0.001)
    timer.stop()
    seconds = time.perf_counter() - start
    cut = handler.get("ticks", len(gaps))
    running_ms = sorted(g * 1000 for g in gaps[:cut])
    gaps_ms = sorted(g * 1000 for g in gaps)
    result = {
        "longest_stall_while_registering_ms": round(running_ms[-1], 1),
        "adding_result_layers_ms": round((done[0] - handler.get("t0", done[0])) * 1000, 1),
        "longest_stall_adding_result_layers_ms": round(max(gaps[cut:], default=0) * 1000, 1),
        "method": args.method,
        "sample": args.sample,
        "seconds": round(seconds, 2),
        "ticks": len(gaps_ms),
        "longest_stall_ms": round(gaps_ms[-1], 1),
        "p99_gap_ms": round(gaps_ms[int(0.99 * (len(gaps_ms) - 1))], 1),
        "status": widget.status.text(),
    }
    print(json.dumps(result, indent=2))
    viewer.close()


if __name__ == "__main__":
    main()
