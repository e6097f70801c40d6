"""The "EM stack alignment" dock widget in a real napari viewer (Xvfb on CI)."""

import inspect

import numpy as np
import pytest

from napari_nephi.engines.mito import align_stack
from napari_nephi.engines.mito.elastic import ELASTIC_SOLVER
from napari_nephi.engines.mito.solve import check_global_options
from napari_nephi.widgets import em_widget as emw
from napari_nephi.widgets._em_parts import InliersPlot
from napari_nephi.widgets.em_widget import EMAlignWidget


@pytest.fixture
def errors(monkeypatch):
    messages = []
    monkeypatch.setattr(emw, "show_error", messages.append)
    return messages


def _wait(runner, qtbot, action):
    with qtbot.waitSignal(runner.stopped, timeout=60000):
        action()


def _align(widget, qtbot, action=None):
    """Start an alignment and wait until it is over and its layers are in the viewer."""
    with qtbot.waitSignal(widget.run_done, timeout=60000):
        (action or widget.start)()


def test_end_to_end_alignment(make_napari_viewer, qtbot, em, errors, tmp_path):
    viewer = make_napari_viewer()
    stack = viewer.add_image(em["stack"], name="em", scale=(1.0, 0.5, 0.5))
    masks = viewer.add_labels(em["masks"], name="mito", scale=(1.0, 0.5, 0.5))
    before = em["stack"].copy()
    widget = EMAlignWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.stack.set_layer(stack)
    widget.masks.set_layer(masks)
    widget.options.model.setCurrentText("rigid")
    steps = []
    widget.runner.progressed.connect(lambda ev: steps.append(ev.step))
    _align(widget, qtbot)
    assert errors == []
    names = [ly.name for ly in viewer.layers]
    assert "em aligned" in names and "em aligned masks" in names, names
    aligned = viewer.layers["em aligned"]
    assert aligned.data.shape == em["stack"].shape and tuple(aligned.scale) == (1.0, 0.5, 0.5)
    lab = viewer.layers["em aligned masks"].data
    assert lab.dtype == em["masks"].dtype and set(np.unique(lab)) <= set(np.unique(em["masks"]))
    # progress per section, the report table and the plot
    assert len(steps) >= 6
    assert widget.table.rowCount() == 6
    assert widget.table.column_values("section") == [str(k) for k in range(6)]
    inliers = [int(v) for v in widget.table.column_values("inliers")[1:]]
    assert min(inliers) >= 10
    assert widget.plot.values == [float(r["inliers"]) for r in widget.last.metrics["report"]]
    assert widget.progress.value() == widget.progress.maximum() == 6
    assert "Done" in widget.status.text()
    np.testing.assert_array_equal(stack.data, before)  # the input is untouched
    assert widget.table.column_values("refined") == [""] + ["yes"] * 5  # sub-pixel refinement on
    assert all(float(v) < 1.5 for v in widget.table.column_values("tracking_error")[1:])
    # a second run, without refinement, replaces the result layers
    count = len(viewer.layers)
    widget.options.refine.setChecked(False)
    assert widget.options.values()["refine"] is False
    _align(widget, qtbot)
    assert len(viewer.layers) == count
    assert widget.table.column_values("refined") == [""] * 6
    assert widget.last.settings["refine"] is False
    # keypoint / match overlay for a chosen pair
    _wait(widget.helper, qtbot, lambda: widget.show_matches(1, 2))
    pts1, pts2 = viewer.layers["keypoints 1"], viewer.layers["keypoints 2"]
    assert len(pts1.data) > 10 and np.all(pts1.data[:, 0] == 1) and np.all(pts2.data[:, 0] == 2)
    assert tuple(pts1.scale) == (1.0, 0.5, 0.5)
    lines = viewer.layers["matches 1-2"]
    assert lines.nshapes >= 20 and "inliers" in widget.status.text()
    # saving the report
    folder = widget.save_report(tmp_path / "report")
    for name in ("report.csv", "report.json", "matrices.npy"):
        assert (folder / name).exists()
    assert np.load(folder / "matrices.npy").shape == (6, 3, 3)


def test_automatic_masks_and_blank_section(make_napari_viewer, qtbot, em, errors):
    viewer = make_napari_viewer()
    data = em["stack"].copy()
    data[4] = 0  # a blank section: reported, not fatal
    viewer.add_image(data, name="em")
    widget = EMAlignWidget(viewer)
    viewer.window.add_dock_widget(widget)
    _wait(widget.helper, qtbot, widget.detect_masks)
    assert "em mitochondria" in [ly.name for ly in viewer.layers]
    assert widget.masks.layer() is viewer.layers["em mitochondria"]
    widget.masks.set_layer(None)  # none: the run detects them itself
    widget.masks.setCurrentIndex(0)
    _align(widget, qtbot)
    assert errors == []
    assert "em aligned mitochondria (auto)" in [ly.name for ly in viewer.layers]
    assert widget.table.rowCount() == 6
    assert widget.table.column_values("fallback")[4] == "identity"
    assert 4 in widget.plot.failed
    assert "left in place: 4" in widget.status.text()


def test_bad_inputs_show_errors_and_change_nothing(make_napari_viewer, qtbot, em, errors):
    viewer = make_napari_viewer()
    viewer.add_image(em["stack"][0], name="one section")
    widget = EMAlignWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.start()
    assert errors and "stack of sections" in errors[-1]
    viewer.add_image(em["stack"], name="em")
    widget.stack.set_layer(viewer.layers["em"])
    viewer.add_labels(em["masks"][:3], name="short")
    widget.masks.set_layer(viewer.layers["short"])
    widget.start()
    assert "do not match" in errors[-1]
    assert [ly.name for ly in viewer.layers] == ["one section", "em", "short"]
    assert widget.run_button.isEnabled() and not widget.runner.busy


def _long_alignment(make_napari_viewer):
    """A viewer with a 40-section stack and the widget docked, on one thread: seconds of work."""
    from napari_nephi.synthetic import em_stack

    big = em_stack(40, (256, 256), seed=1)
    viewer = make_napari_viewer()
    viewer.add_image(big["stack"], name="em")
    widget = EMAlignWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.options.workers.setValue(1)
    return viewer, widget


def test_cancel_keeps_layers(make_napari_viewer, qtbot, errors):
    viewer, widget = _long_alignment(make_napari_viewer)

    def start_and_cancel():
        widget.start()
        widget.cancel_button.click()

    _align(widget, qtbot, start_and_cancel)
    assert "Cancelled" in widget.status.text()
    assert [ly.name for ly in viewer.layers] == ["em"]
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert errors == []


def test_inliers_plot_paints(qtbot):
    plot = InliersPlot()
    qtbot.addWidget(plot)
    plot.resize(300, 120)
    plot.set_data([0, 40, 35, 3, 50], failed=[3], reference=0)
    image = plot.grab().toImage()
    assert image.width() == 300
    # the polyline and the red failed marker are painted (not only the background)
    colours = {image.pixelColor(x, y).name() for x in range(0, 300, 3) for y in range(0, 120, 3)}
    assert len(colours) > 3
    plot.set_data([])
    plot.grab()


def test_closing_the_viewer_mid_alignment_is_safe(make_napari_viewer, qtbot, monkeypatch, em):
    """Closing napari while an alignment runs deletes the widget, which cancels the alignment."""
    import time

    from qtpy.QtCore import QThreadPool

    from napari_nephi.core.errors import Cancelled
    from napari_nephi.core.progress import Progress

    outcome = []

    def endless_alignment(stack, masks, progress, cancel, **options):  # steps until cancelled
        p = Progress(progress, cancel)
        step = 0
        try:
            while True:
                step += 1
                time.sleep(0.005)
                p.step(step, 10**9)
        except Cancelled:
            outcome.append("cancelled")
            raise

    monkeypatch.setattr(emw, "align_stack", endless_alignment)
    viewer = make_napari_viewer()
    viewer.add_image(em["stack"], name="em")
    widget = EMAlignWidget(viewer)
    viewer.window.add_dock_widget(widget)
    steps = []
    widget.runner.progressed.connect(lambda ev: steps.append(ev.step))
    widget.start()
    qtbot.waitUntil(lambda: len(steps) >= 2, timeout=30000)
    assert not widget.run_button.isEnabled() and widget.cancel_button.isEnabled()
    with qtbot.waitSignal(widget.destroyed, timeout=10000):
        viewer.close()
    pool = QThreadPool.globalInstance()
    qtbot.waitUntil(lambda: pool.activeThreadCount() == 0, timeout=10000)
    assert outcome == ["cancelled"]  # the worker stopped through the engine's cancel


def test_em_options_alone(qtbot):
    from napari_nephi.widgets._em_parts import EMOptions

    opts = EMOptions()
    qtbot.addWidget(opts)
    assert not opts.advanced.isExpanded()  # the advanced rows are folded at first
    opts.advanced.toggleButton().click()
    assert opts.advanced.isExpanded()
    opts.middle.setChecked(True)
    assert not opts.reference.isEnabled() and opts.values()["reference"] == "middle"
    opts.middle.setChecked(False)
    opts.reference.setValue(3)
    opts.workers.setValue(0)
    values = opts.values()
    assert values["reference"] == 3 and values["workers"] is None  # 0 threads: all cores
    opts.detector.setCurrentText("orb")
    opts.use_masks.setChecked(False)
    assert opts.use_masks.isEnabled() and opts.values()["use_masks"] is False
    opts.detector.setCurrentText("mito")  # keypoints inside mitochondria need the masks
    assert opts.use_masks.isChecked() and not opts.use_masks.isEnabled()


def test_report_table_alone(qtbot):
    from napari_nephi.widgets._em_parts import ReportTable

    table = ReportTable()
    qtbot.addWidget(table)
    table.set_rows(
        [
            {"section": 0, "inliers": 0, "failed": False},
            {"section": 1, "neighbour": 0, "inliers": 42, "reprojection_error": 0.514, "failed": False},
            {"section": 2, "neighbour": 1, "inliers": 3, "failed": True, "fallback": "identity"},
        ]
    )
    assert table.rowCount() == 3
    assert table.column_values("inliers") == ["0", "42", "3"]
    assert table.column_values("reprojection_error") == ["", "0.51", ""]
    assert table.column_values("failed") == ["", "", "yes"]
    assert table.item(2, 0).background().color() == ReportTable.IDENTITY  # identity fallback in red
    table.set_row({"section": 4, "inliers": 7})  # a row past the end grows the table
    assert table.rowCount() == 5 and table.column_values("inliers")[4] == "7"


def test_em_options_multi_neighbour_reach_the_engine(qtbot, em):
    from napari_nephi.widgets._em_parts import EMOptions

    opts = EMOptions()
    qtbot.addWidget(opts)
    values = opts.values()
    # the engine's defaults (session 14: 2 neighbours, global solve with affine sections, prior 0.1)
    defaults = inspect.signature(align_stack).parameters
    for key in ("global_model", "drift_prior", "organelle_reading"):
        assert values[key] == defaults[key].default, key
    # the organelle reading only matters to drift correction auto (session 32)
    assert opts.organelle_reading.isEnabled()
    opts.drift_correction.setCurrentText("detrend")
    assert not opts.organelle_reading.isEnabled()
    opts.drift_correction.setCurrentText("auto")
    opts.organelle_reading.setCurrentText("local")
    assert opts.organelle_reading.isEnabled() and opts.values()["organelle_reading"] == "local"
    assert values["neighbours"] == check_global_options(defaults["neighbours"].default, None, "rigid", 0)[0]
    assert values["neighbours"] == 2 and opts.global_model.isEnabled() and opts.drift_prior.isEnabled()
    opts.neighbours.setValue(1)  # the chain: the global solve's options do not apply
    assert not opts.global_model.isEnabled() and not opts.drift_prior.isEnabled()
    assert opts.values()["elastic_solver"] == "local"  # as the engine's default with the chain
    opts.elastic_solver.setCurrentText("joint")
    opts.elastic_solver.activated.emit(opts.elastic_solver.currentIndex())  # the user's own choice stays
    opts.neighbours.setValue(2)
    opts.neighbours.setValue(1)
    assert opts.values()["elastic_solver"] == "joint"
    opts.neighbours.setValue(3)
    opts.global_model.setCurrentText("rigid")
    opts.drift_prior.setValue(0.5)
    assert opts.global_model.isEnabled() and opts.drift_prior.isEnabled()
    values = opts.values()
    assert (values["neighbours"], values["global_model"], values["drift_prior"]) == (3, "rigid", 0.5)
    # session 19: joint + landmarks, the engine's choice with the global solve and masks
    # session 29: "auto" decides on the sections' distortion; the on / off box waits meanwhile; the
    # default since session 30 (opt-in in session 29, when image noise read as distortion)
    assert values["elastic"] == "auto" and opts.elastic_auto.isChecked()
    opts.elastic_auto.setChecked(True)
    values = opts.values()
    assert values["elastic"] == "auto" and values["elastic_solver"] == ELASTIC_SOLVER == "joint"
    assert (
        not opts.elastic.isEnabled()
        and opts.elastic_solver.isEnabled()
        and opts.elastic_landmarks.isEnabled()
    )
    opts.elastic_auto.setChecked(False)
    assert opts.values()["elastic"] is False and opts.elastic.isEnabled()
    assert not opts.elastic_solver.isEnabled() and not opts.elastic_landmarks.isEnabled()
    opts.elastic.setChecked(True)
    assert opts.values()["elastic"] is True and opts.elastic_solver.isEnabled()
    assert opts.elastic_landmarks.isEnabled() and opts.values()["elastic_landmarks"] is True
    opts.elastic_solver.setCurrentText("local")  # the landmarks belong to the joint solver
    assert not opts.elastic_landmarks.isEnabled() and opts.values()["elastic_landmarks"] is False
    opts.elastic_solver.setCurrentText("joint")
    opts.detector.setCurrentText("fast")
    opts.use_masks.setChecked(False)  # and to the masks' regions
    assert not opts.elastic_landmarks.isEnabled() and opts.values()["elastic_landmarks"] is False
    opts.detector.setCurrentText("mito")
    assert opts.values()["elastic_landmarks"] is True
    opts.elastic_landmarks.setChecked(False)
    opts.elastic_solver.setCurrentText("local")
    reg = emw.run_alignment(None, None, em["stack"], em["masks"], {**values, "model": "rigid"}, False)[
        "registration"
    ]
    assert reg.settings["solver"] == "global" and reg.settings["global_model"] == "rigid"
    assert reg.metrics["solver"]["pairs"] == 5 + 4 + 3


def test_guided_pairs_and_drift_window_reach_the_engine_and_the_settings_json(qtbot, em, tmp_path):
    import json

    from napari_nephi.engines.mito.report import write_report
    from napari_nephi.widgets._em_parts import EMOptions

    opts = EMOptions()
    qtbot.addWidget(opts)
    opts.neighbours.setValue(1)
    v = opts.values()
    assert v["guided_pairs"] is True and not opts.guided_pairs.isEnabled()  # chain: no further pairs
    assert v["drift_window"] == 0.0 and opts.drift_window.isEnabled()  # "auto" by default (session 22)
    opts.drift_correction.setCurrentText("none")
    assert not opts.drift_window.isEnabled()
    opts.neighbours.setValue(3)
    assert opts.guided_pairs.isEnabled()
    opts.refine.setChecked(False)
    assert not opts.guided_pairs.isEnabled()  # guided pairs start from the refinement's tracks
    opts.refine.setChecked(True)
    opts.guided_pairs.setChecked(False)
    opts.drift_correction.setCurrentText("detrend")
    opts.drift_window.setValue(6.0)
    v = opts.values()
    assert (v["guided_pairs"], v["drift_correction"], v["drift_window"]) == (False, "detrend", 6.0)
    runs = {}
    for guided in (False, True):
        reg = emw.run_alignment(None, None, em["stack"], em["masks"], {**v, "guided_pairs": guided}, False)[
            "registration"
        ]
        (tmp_path / str(guided)).mkdir()
        write_report(tmp_path / str(guided), reg)
        runs[guided] = reg
        saved = json.loads((tmp_path / str(guided) / "report.json").read_text())["settings"]
        assert saved["guided_pairs"] is guided and saved["drift_window"] == 6.0
    pairs = {
        g: [p for r in reg.metrics["report"] for p in r.get("pairs", []) if "guided" in p]
        for g, reg in runs.items()
    }
    assert pairs[False] and not any(p["guided"] for p in pairs[False])  # every further pair matched in full
    assert any(p["guided"] for p in pairs[True])


def test_drift_window_box_offers_no_window_the_engine_refuses(qtbot):
    from napari_nephi.engines.mito.detrend import MIN_WINDOW
    from napari_nephi.widgets._em_parts import EMOptions

    opts = EMOptions()
    qtbot.addWidget(opts)
    box = opts.drift_window
    assert box.value() == 0.0
    box.stepUp()  # from "whole stack" straight to the minimum, not 1
    assert box.value() == MIN_WINDOW
    box.stepUp()
    assert box.value() == MIN_WINDOW + 1
    box.stepDown()
    box.stepDown()  # from the minimum back to "whole stack", not 3
    assert box.value() == 0.0
    box.setValue(2.5)  # a typed value below the minimum is raised to it
    assert box.value() == MIN_WINDOW
    box.setValue(0.0)
    assert box.value() == 0.0
    box.setValue(10.0)
    box.setValue(3.0)  # typed below the minimum from above it: raised to it, not dropped to 0
    assert box.value() == MIN_WINDOW
    box.stepDown()  # the arrow from the minimum still goes to "whole stack"
    assert box.value() == 0.0
