"""Longest GUI-thread stall while a 3D registration runs in the widget (run under Xvfb).

    xvfb-run -a python benchmarks/gui_responsiveness.py [--method affine] [--sample mri]

A QTimer fires every 10 ms on the GUI thread; the longest gap between two ticks is the longest
time napari could not respond. Target: no stall over 100 ms for the plugin's own work. Gaps are
reported by phase: opening the widget (importing it, building it, its one-off warm-up of napari),
then for each of ``--runs`` registrations in the same viewer the registration itself (worker
running, progress and previews arriving) and adding the result layers to the viewer afterwards (a
second run updates the first run's layers).

Time napari spends inserting or removing a layer (``LayerList.insert`` / ``__delitem__``: the
layer's vispy visual, its layer-controls panel, the layer list's row) is napari's own, not the
plugin's; it is timed separately. Each phase reports the longest gap (``longest_ms``), the
longest gap less the napari insert/remove time inside it (``plugin_longest_ms``: the plugin's own
work, plus napari's redraw) and napari's inserts and removals themselves (``napari_layer_ms``).
``--gaps`` lists every gap over 50 ms with its phase and the napari insert/remove time in it.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import napari
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QApplication

from napari_nephi import sample_data


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="affine")
    p.add_argument("--sample", default="mri")
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--option", action="append", default=[], help="KEY=JSON engine option")
    p.add_argument("--runs", type=int, default=1, help="register this many times in the same viewer")
    p.add_argument("--gaps", action="store_true", help="list every gap over 50 ms")
    p.add_argument(
        "--trace",
        action="store_true",
        help="sample the GUI thread's stack; print what ran in gaps over 80 ms",
    )
    args = p.parse_args()
    load = os.getloadavg()[0]
    viewer = napari.Viewer(show=True)
    for data, kwargs, kind in getattr(sample_data, f"{args.sample}_sample")():
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    app = QApplication.instance()
    for _ in range(50):  # let the window settle before measuring
        app.processEvents()
        time.sleep(0.01)
    samples = start_sampler() if args.trace else None
    napari_calls = time_layer_list(type(viewer.layers))
    ticks = [time.perf_counter()]
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()

    def wait(condition) -> None:
        while not condition():
            app.processEvents()
            time.sleep(0.001)
        n = len(ticks)  # and until the probe has ticked twice since: the phase's last stall is over
        while len(ticks) < n + 2:
            app.processEvents()
            time.sleep(0.001)

    phases = []  # (name, start, end) in perf_counter seconds
    t_open = time.perf_counter()
    from napari_nephi.widgets import RegisterWidget  # in napari the module loads when the widget opens

    widget = RegisterWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.options.method.setCurrentText(args.method)
    widget.options.iterations.setValue(args.iterations)
    wait(lambda: getattr(widget, "warmed_up", True))
    wait(lambda: time.perf_counter() - t_open > 1.0)
    phases.append(("opening the widget", t_open, time.perf_counter()))
    marks: dict = {}
    widget.runner.finished.connect(lambda _: marks.setdefault("results", time.perf_counter()))
    widget.run_done.connect(lambda: marks.setdefault("end", time.perf_counter()))
    runs = []
    for k in range(args.runs):
        marks.clear()
        marks["run"] = time.perf_counter()
        widget.start()
        wait(lambda: "end" in marks)
        results = marks.get("results", marks["end"])
        phases += [
            (f"registering {k + 1}", marks["run"], results),
            (f"results {k + 1}", results, marks["end"]),
        ]
        runs.append(
            {
                "registration_seconds": round(results - marks["run"], 2),
                "adding_result_layers_ms": round((marks["end"] - results) * 1000, 1),
                "status": widget.status.text(),
            }
        )
        quiet_until = time.perf_counter() + 0.5
        wait(lambda until=quiet_until: time.perf_counter() > until)
    timer.stop()
    gaps = [(b - a, a) for a, b in zip(ticks, ticks[1:], strict=False)]
    # a phase runs from the last tick before it starts to the first tick after it ends, and a gap
    # belongs to the (latest) phase in which it started: the stall that begins just before an
    # action and the redraw that ends just after it count for that action
    windows = [
        (name, max((t for t in ticks if t <= t0), default=t0), min((t for t in ticks if t >= t1), default=t1))
        for name, t0, t1 in phases
    ]

    def phase_of(t: float) -> str:
        return next((name for name, w0, w1 in reversed(windows) if w0 <= t < w1), "between phases")

    def napari_in(a: float, b: float) -> float:
        """Seconds of napari layer inserts/removals inside ``[a, b]``."""
        return sum(max(0.0, min(b, t1) - max(a, t0)) for t0, t1 in napari_calls)

    def stats(name: str) -> dict:
        mine = [(g, a) for g, a in gaps if phase_of(a) == name]
        ms = sorted(g * 1000 for g, _ in mine)
        if not ms:
            return {"longest_ms": 0.0, "ticks": 0}
        plugin = sorted((g - napari_in(a, a + g)) * 1000 for g, a in mine)
        start, end = mine[0][1], mine[-1][1] + mine[-1][0]
        calls = [(t1 - t0) * 1000 for t0, t1 in napari_calls if start <= t0 < end]
        return {
            "longest_ms": round(ms[-1], 1),
            "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 1),
            "over_100_ms": sum(g > 100 for g in ms),
            "plugin_longest_ms": round(plugin[-1], 1),
            "plugin_over_100_ms": sum(g > 100 for g in plugin),
            "napari_layer_ms": {
                "count": len(calls),
                "longest": round(max(calls, default=0.0), 1),
                "total": round(sum(calls), 1),
            },
            "ticks": len(ms),
        }

    for k, run in enumerate(runs):
        run["registering"] = stats(f"registering {k + 1}")
        run["adding_result_layers"] = stats(f"results {k + 1}")
    result = {
        "method": args.method,
        "sample": args.sample,
        "load_average": round(load, 2),
        "opening_the_widget": stats("opening the widget"),
        "longest_stall_while_registering_ms": runs[0]["registering"]["longest_ms"],
        "longest_stall_adding_result_layers_ms": runs[0]["adding_result_layers"]["longest_ms"],
        "plugin_longest_stall_while_registering_ms": runs[0]["registering"]["plugin_longest_ms"],
        "plugin_longest_stall_adding_result_layers_ms": runs[0]["adding_result_layers"]["plugin_longest_ms"],
        "runs": runs,
    }
    if args.gaps:
        result["gaps_over_50_ms"] = [
            f"{g * 1000:.0f} ms, {phase_of(a)}, napari insert/remove {napari_in(a, a + g) * 1000:.0f} ms"
            for g, a in gaps
            if g > 0.05
        ]
    print(json.dumps(result, indent=2))
    if samples is not None:
        print_gap_profiles(samples, [(g, a) for g, a in gaps if g > 0.08], phase_of)
    viewer.close()


def time_layer_list(cls) -> list:
    """Time every layer insert and removal of napari's layer list class ``cls``: ``[(t0, t1)]``.

    Wraps the class's public ``insert`` and ``__delitem__`` (every add and remove goes through
    them) for this benchmark process only; the plugin itself never does this.
    """
    calls: list = []
    depth = [0]

    def timed(method):
        def wrapper(self, *args, **kwargs):
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:  # nested calls count once
                    calls.append((t0, time.perf_counter()))

        return wrapper

    cls.insert = timed(cls.insert)
    cls.__delitem__ = timed(cls.__delitem__)
    return calls


def start_sampler(period: float = 0.002) -> list:
    """Sample the main thread's Python stack every ``period`` s in a daemon thread: ``[(t, frames)]``."""
    import sys
    import threading

    main_id = threading.main_thread().ident
    samples: list = []

    def run():
        while True:
            frame = sys._current_frames().get(main_id)
            stack = []
            while frame is not None and len(stack) < 60:
                code = frame.f_code
                stack.append(f"{os.path.basename(code.co_filename)}:{code.co_name}")
                frame = frame.f_back
            samples.append((time.perf_counter(), tuple(stack)))
            time.sleep(period)

    threading.Thread(target=run, daemon=True).start()
    return samples


def print_gap_profiles(samples: list, gaps: list, phase_of, top: int = 14) -> None:
    """For each gap, the functions most often on the GUI thread's stack during it (inclusive)."""
    from collections import Counter

    for g, a in gaps:
        inside = [st for t, st in samples if a <= t <= a + g]
        counts = Counter(f for st in inside for f in dict.fromkeys(st))
        print(f"\ngap {g * 1000:.0f} ms ({phase_of(a)}), {len(inside)} samples:")
        for name, n in counts.most_common(top):
            print(f"  {100 * n / max(1, len(inside)):5.0f}%  {name}")


if __name__ == "__main__":
    main()
