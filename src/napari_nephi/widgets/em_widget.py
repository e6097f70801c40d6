"""Dock widget "EM stack alignment": MITO on a stack layer, with report, plot and match overlay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QWidget,
)

from ..engines.mito import align_stack, detect_mitochondria, match_pair, warp_masks
from ._em_parts import EMOptions, InliersPlot, ReportTable
from ._panel import scrolling_body
from ._pickers import LayerPicker
from ._results import ResultLayers
from ._runner import RegistrationRunner
from ._state import RunControls, RunState, RunStateMachine

#: Colours of the match overlay.
INLIER, OUTLIER, UNMATCHED = "lime", "orange", "gray"


def layer_stack(layer):
    """The data of a stack layer without loading it (level 0 of a multiscale; dask stays lazy)."""
    return layer.data[0] if layer.multiscale else layer.data


# -- worker jobs (engine calls only; they run in a worker thread) --------------------------------
def run_alignment(progress, cancel, stack, masks, options, detect_masks):
    """Align; carry the given masks along, or the automatically detected ones."""
    reg = align_stack(stack, masks, progress=progress, cancel=cancel, **options)
    source = "given" if masks is not None else None
    if masks is None and detect_masks:
        masks = detect_mitochondria(stack, workers=options.get("workers"))
        source = "automatic"
    aligned = warp_masks(reg, masks, workers=options.get("workers")) if masks is not None else None
    return {"registration": reg, "aligned_masks": aligned, "mask_source": source}


def run_matches(progress, cancel, stack, a, b, masks, options):
    return match_pair(stack, a, b, masks, **options)


def run_detection(progress, cancel, stack):
    return detect_mitochondria(stack)


class EMAlignWidget(QWidget):
    """Stack and mask pickers, options, Run/Cancel, aligned layers, report table, plot, overlay.

    The alignment's state is a :class:`RunStateMachine` that the Run and Cancel buttons follow;
    detection and the match overlay run on a second runner (``helper``). Closing the viewer
    deletes the widget, which cancels its runs.
    """

    #: Emitted when an alignment is over and its result layers (if any) are all in the viewer.
    run_done = Signal()

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.stack = LayerPicker(napari_viewer, (Image,))
        self.masks = LayerPicker(napari_viewer, (Labels,), optional=True)
        self.options = EMOptions()
        self.detect_button = QPushButton("Detect mitochondria")
        self.detect_button.setToolTip("Add automatic mitochondria masks as a Labels layer you can edit")
        self.state = RunStateMachine(self)
        self.controls = RunControls(self.state)
        self.run_button, self.cancel_button = self.controls.run_button, self.controls.cancel_button
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m sections")
        self.status = QLabel("Pick a stack of EM sections (and optionally mitochondria masks), then Run.")
        self.status.setWordWrap(True)
        self.table = ReportTable()
        self.plot = InliersPlot()
        self.pair_a = QSpinBox()
        self.pair_b = QSpinBox()
        for s in (self.pair_a, self.pair_b):
            s.setRange(0, 1_000_000)
        self.pair_b.setValue(1)
        self.match_button = QPushButton("Show keypoints and matches")
        self.save_button = QPushButton("Save report and matrices…")
        self.save_button.setEnabled(False)
        self.runner = RegistrationRunner(self)
        self.helper = RegistrationRunner(self)  # detection and overlays
        self.results = ResultLayers(napari_viewer, self)
        self.overlay = ResultLayers(napari_viewer, self)
        self.auto_masks = ResultLayers(napari_viewer, self)
        self.last = None  # the last Registration
        self._inputs: dict = {}
        self._inliers: dict[int, float] = {}
        self._failed: set[int] = set()
        self._layout()
        self.run_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        self.detect_button.clicked.connect(self.detect_masks)
        self.match_button.clicked.connect(lambda: self.show_matches())
        self.save_button.clicked.connect(lambda: self.save_report())
        self.runner.progressed.connect(self._on_progress)
        self.runner.finished.connect(self._on_finished)
        self.runner.failed.connect(self._on_failed)
        self.runner.cancelled.connect(self._on_cancelled)
        self.runner.stopped.connect(self._on_stopped)
        self.helper.finished.connect(self._on_helper_finished)
        self.helper.failed.connect(self._on_failed)
        self.helper.stopped.connect(self._on_helper_stopped)
        self._helper_done = None  # what to do with the helper's result

    def _layout(self):
        form = QFormLayout()
        form.addRow("EM stack", self.stack)
        form.addRow("mitochondria masks", self.masks)
        pair = QHBoxLayout()
        pair.addWidget(QLabel("sections"))
        pair.addWidget(self.pair_a)
        pair.addWidget(self.pair_b)
        pair.addWidget(self.match_button)
        overlay = QGroupBox("keypoint / match overlay")
        overlay.setLayout(pair)
        box = scrolling_body(self)
        box.addLayout(form)
        box.addWidget(self.detect_button)
        box.addWidget(self.options)
        box.addWidget(self.controls)
        box.addWidget(self.progress)
        box.addWidget(self.status)
        box.addWidget(QLabel("inliers per section"))
        box.addWidget(self.plot)
        box.addWidget(self.table)
        box.addWidget(overlay)
        box.addWidget(self.save_button)

    # -- checks ---------------------------------------------------------------------------------
    def _checked_inputs(self):
        """``(stack layer, stack data, masks data or None)``, or None after telling the user why."""
        layer = self.stack.layer()
        if layer is None:
            show_error("Choose the EM stack (an Image layer) first.")
            return None
        if layer.rgb:
            show_error(f"{layer.name} is RGB; EM sections must be grayscale. Convert it first.")
            return None
        data = layer_stack(layer)
        if data.ndim != 3:
            show_error(
                f"{layer.name} is {data.ndim}D {tuple(data.shape)}; alignment needs a stack of sections "
                "(sections, y, x). Open a multi-page TIFF or a folder of section TIFFs."
            )
            return None
        mask_layer = self.masks.layer()
        masks = None
        if mask_layer is not None:
            masks = mask_layer.data
            if tuple(masks.shape) != tuple(data.shape):
                show_error(
                    f"The masks {mask_layer.name} {tuple(masks.shape)} do not match the stack "
                    f"{tuple(data.shape)}; pick masks of the same shape or none (automatic)."
                )
                return None
        return layer, data, masks

    # -- alignment ------------------------------------------------------------------------------
    def start(self) -> None:
        """Validate the inputs and start the alignment in a worker thread."""
        if not self.state.is_(RunState.IDLE):
            return
        checked = self._checked_inputs()
        if checked is None:
            return
        layer, data, masks = checked
        opts = self.options.values()
        n = int(data.shape[0])
        if isinstance(opts["reference"], int) and opts["reference"] >= n:
            show_error(f"The reference section {opts['reference']} is outside the stack of {n} sections.")
            return
        self._inputs = {"name": layer.name, "scale": tuple(layer.scale), "n": n, "layer": layer}
        self._inliers, self._failed = {}, set()
        self.table.clear_rows(n)
        self.plot.set_data([])
        self.progress.setRange(0, n)
        self.progress.setValue(0)
        self.state.to(RunState.RUNNING)
        self.status.setText(f"Aligning {n} sections…")
        self.runner.run(
            run_alignment,
            stack=data,
            masks=masks,
            options=opts,
            detect_masks=opts["use_masks"],
        )

    def cancel(self) -> None:
        """Stop the running alignment (the Cancel button)."""
        self.state.cancel(self.runner, self.status)

    def _on_progress(self, event) -> None:
        if not self.state.is_(RunState.RUNNING):
            return
        n = self._inputs.get("n", event.total)
        row = event.extra.get("row")
        if row is not None:
            self.progress.setRange(0, n)
            self.progress.setValue(min(n, event.step))
            self.table.set_row(row)
            self._inliers[int(row["section"])] = float(row["inliers"])
            if row.get("failed"):
                self._failed.add(int(row["section"]))
            values = [self._inliers.get(k, 0.0) for k in range(n)]
            self.plot.set_data(values, self._failed)
        elif event.stage:
            self.status.setText(f"Aligned; {event.stage}")

    def _on_finished(self, result) -> None:
        if self.state.is_(RunState.CANCELLING):  # it finished before it saw the Cancel: drop it
            self._on_cancelled()
            return
        self.state.to(RunState.ADDING_RESULTS)
        reg = result["registration"]
        self.last = reg
        inp = self._inputs
        name, scale = inp["name"], inp["scale"]
        layers = []
        if reg.warped is not None:
            kwargs = {"name": f"{name} aligned", "scale": scale}
            limits = getattr(inp["layer"], "contrast_limits", None)
            if limits is not None:
                kwargs["contrast_limits"] = list(limits)
            layers.append((reg.warped, kwargs, "image"))
        if result["aligned_masks"] is not None:
            suffix = "aligned masks" if result["mask_source"] == "given" else "aligned mitochondria (auto)"
            layers.append((result["aligned_masks"], {"name": f"{name} {suffix}", "scale": scale}, "labels"))
        report = reg.metrics["report"]
        self.table.set_rows(report)
        self.plot.set_data(
            [r["inliers"] for r in report], reg.metrics["failed_sections"], reg.metrics["reference"]
        )
        self.progress.setValue(self.progress.maximum())
        self.status.setText("Adding the aligned layers…")

        def shown(_layers):
            self.status.setText(_summary(reg.metrics))
            self.save_button.setEnabled(True)
            self.state.to(RunState.IDLE)
            self.run_done.emit()

        self.results.show_gradually(layers, shown)

    def _on_failed(self, message: str) -> None:
        show_error(message)
        self.status.setText(f"Failed: {message}")

    def _on_cancelled(self) -> None:
        self.status.setText("Cancelled; no layers were changed.")

    def _on_stopped(self) -> None:
        if self.state.is_(RunState.RUNNING, RunState.CANCELLING):  # not adding results
            self.state.to(RunState.IDLE)
            self.run_done.emit()

    def _on_helper_finished(self, result) -> None:
        if self._helper_done is not None:
            self._helper_done(result)

    def _on_helper_stopped(self) -> None:
        self._helper_done = None
        self.detect_button.setEnabled(True)
        self.match_button.setEnabled(True)

    # -- automatic masks --------------------------------------------------------------------------
    def detect_masks(self) -> None:
        """Detect mitochondria in every section and add them as an editable Labels layer."""
        if self.helper.busy:
            return
        checked = self._checked_inputs()
        if checked is None:
            return
        layer, data, _ = checked
        self.detect_button.setEnabled(False)
        self.status.setText("Detecting mitochondria…")
        name, scale = layer.name, tuple(layer.scale)

        def done(labels):
            (new,) = self.auto_masks.show(
                [(labels, {"name": f"{name} mitochondria", "scale": scale}, "labels")]
            )
            self.masks.set_layer(new)
            self.status.setText(
                f"Added {new.name}: edit it if needed; it is used as the masks of the next run."
            )

        self._helper_done = done
        self.helper.run(run_detection, stack=data)

    # -- overlay ----------------------------------------------------------------------------------
    def show_matches(self, a: int | None = None, b: int | None = None) -> None:
        """Show keypoints of sections ``a`` and ``b`` and their matches (inliers green)."""
        if self.helper.busy:
            return
        checked = self._checked_inputs()
        if checked is None:
            return
        layer, data, masks = checked
        a = self.pair_a.value() if a is None else int(a)
        b = self.pair_b.value() if b is None else int(b)
        n = int(data.shape[0])
        if not (0 <= a < n and 0 <= b < n) or a == b:
            show_error(f"Choose two different sections between 0 and {n - 1}.")
            return
        opts = {k: v for k, v in self.options.values().items() if k not in ("reference", "workers")}
        scale = tuple(layer.scale)
        self.match_button.setEnabled(False)
        self.status.setText(f"Matching sections {a} and {b}…")

        def done(res):
            self.overlay.show(match_layers(res, a, b, scale, data.shape[1:]))
            st = res["stats"]
            err = st["reprojection_error"]
            self.status.setText(
                f"Sections {a} -> {b}: {st['keypoints_a']} and {st['keypoints_b']} keypoints, "
                f"{st['matches']} matches, {st['inliers']} inliers"
                + ("" if err is None else f", error {err:.2f} px")
                + ("" if res["matrix"] is not None else " (fit rejected)")
            )

        self._helper_done = done
        self.helper.run(run_matches, stack=data, a=a, b=b, masks=masks, options=opts)

    # -- saving -----------------------------------------------------------------------------------
    def save_report(self, folder: str | Path | None = None) -> Path | None:
        """Write report.csv, report.json, matrices.npy and transform/ of the last run."""
        from ..engines.mito.report import write_report

        if self.last is None:
            show_error("Run an alignment first.")
            return None
        if folder is None:
            folder = QFileDialog.getExistingDirectory(self, "Folder for the report and matrices")
            if not folder:
                return None
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_report(folder, self.last)
        np.save(folder / "matrices.npy", self.last.transform.matrices)
        self.last.transform.save(folder / "transform")
        show_info(f"Report and matrices saved to {folder}")
        return folder


def match_layers(res: dict, a: int, b: int, scale, shape) -> list:
    """Points (keypoints of both sections) and Shapes (match lines) layer data for the overlay.

    Keypoints of section ``a`` sit in plane ``a`` of the stack, those of ``b`` in plane ``b``;
    every match is drawn in both planes as a line from its keypoint in ``a`` to its keypoint
    in ``b`` (the raw displacement between the sections).
    """
    pa, pb = res["points_a"], res["points_b"]
    idx, inl = res["matches"], res["inliers"]
    colour_a = np.full(len(pa), UNMATCHED, dtype=object)
    colour_b = np.full(len(pb), UNMATCHED, dtype=object)
    for (i, j), ok in zip(idx, inl):
        colour_a[i] = colour_b[j] = INLIER if ok else OUTLIER
    size = max(3.0, max(shape) / 120.0)
    layers = [
        (
            np.c_[np.full(len(pa), a), pa],
            {"name": f"keypoints {a}", "scale": scale, "face_color": list(colour_a), "size": size},
            "points",
        ),
        (
            np.c_[np.full(len(pb), b), pb],
            {"name": f"keypoints {b}", "scale": scale, "face_color": list(colour_b), "size": size},
            "points",
        ),
    ]
    lines, colours = [], []
    for (i, j), ok in zip(idx, inl):
        for z in (a, b):
            lines.append(np.array([[z, *pa[i]], [z, *pb[j]]]))
            colours.append(INLIER if ok else OUTLIER)
    if lines:
        layers.append(
            (
                lines,
                {
                    "name": f"matches {a}-{b}",
                    "scale": scale,
                    "shape_type": "line",
                    "edge_color": colours,
                    "edge_width": max(1.0, size / 4),
                },
                "shapes",
            )
        )
    return layers


def _summary(metrics: dict) -> str:
    parts = [f"{metrics['sections']} sections to section {metrics['reference']}"]
    parts.append(f"mean inliers {metrics['inliers_mean']:.0f} (min {metrics['inliers_min']})")
    if metrics.get("reprojection_error_mean") is not None:
        parts.append(f"error {metrics['reprojection_error_mean']:.2f} px")
    failed = metrics["failed_sections"]
    parts.append(f"failed pairs: {', '.join(map(str, failed)) if failed else 'none'}")
    if metrics["identity_sections"]:
        parts.append(f"left in place: {', '.join(map(str, metrics['identity_sections']))}")
    if metrics.get("megapixels_per_second"):
        parts.append(f"{metrics['megapixels_per_second']:.0f} MP/s")
    return "Done: " + "; ".join(parts)
