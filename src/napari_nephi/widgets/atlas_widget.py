"""Dock widget "Atlas lookup": find the atlas plate of a section, register it, show its labels.

Train (or load) the plate index of an atlas, pick a section layer, Find plates shows the best
plates as a gallery; choose one (the best is preselected), correct by hand if needed (previous /
next plate, rotation, scale, landmark pairs), Register adds the warped plate and the atlas labels
(region names on hover) over the section. Every engine call runs in a worker thread
(:mod:`._atlas_jobs`); the parts (:mod:`._atlas_parts`) talk to this widget through signals.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from napari.layers import Image
from napari.utils.notifications import show_error
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..core.errors import InputError
from . import _atlas_jobs as jobs
from ._atlas_parts import AtlasSource, PlateAdjust, PlateGallery
from ._atlas_section import plane_of, section_level
from ._panel import scrolling_body
from ._pickers import LayerPicker
from ._results import ResultLayers
from ._runner import RegistrationRunner
from ._state import RunState, RunStateMachine

#: Registration methods offered (the plate onto the section).
METHODS = ("nephi", "affine")
#: Gap between the section and the plate shown beside it, as a fraction of the section's width.
PREVIEW_GAP = 0.1


class AtlasWidget(QWidget):
    """Atlas source and index, section and gallery, plate corrections, Register; one run at a time.

    ``lookup`` is the current :class:`~napari_nephi.AtlasLookup` (None until trained or loaded),
    ``last`` the last plate registration, ``examples`` the confirmed ``(section, plate)`` pairs the
    next training uses.
    """

    #: Emitted when a job (train, load, save, find, register) is over, whatever its outcome.
    run_done = Signal()

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.lookup = None
        self.last = None
        #: what the last Find plates ran with (set when it finishes; see _find_done)
        self.find_settings: dict | None = None
        self.examples: list[tuple[np.ndarray, int]] = []
        self.source = AtlasSource(napari_viewer)
        self.steps = QSpinBox()
        self.steps.setRange(0, 10**6)
        self.steps.setSpecialValueText("default")
        self.steps.setToolTip("Training steps (default: the engine's)")
        self.minutes = QDoubleSpinBox()
        self.minutes.setRange(0.0, 24 * 60.0)
        self.minutes.setSpecialValueText("default")
        self.minutes.setSuffix(" min")
        self.minutes.setToolTip("Time budget of the training (default: the engine's)")
        self.train_button = QPushButton("Train index")
        self.load_button = QPushButton("Load index…")
        self.save_button = QPushButton("Save index…")
        self.index_status = QLabel("No index yet: train one or load a saved one.")
        self.index_status.setWordWrap(True)
        self.section = LayerPicker(napari_viewer, (Image,))
        self.top = QSpinBox()
        self.top.setRange(1, 100)
        self.top.setValue(5)
        self.rerank = QCheckBox("Re-rank by pose")
        self.rerank.setToolTip(
            "Re-rank the best plates by searching the section's pose (tilt, rotation, scale) in the atlas: "
            "slower (about a second), often better for oblique or partial sections"
        )
        self.find_button = QPushButton("Find plates")
        self.gallery = PlateGallery()
        self.adjust = PlateAdjust(napari_viewer)
        self.method = QComboBox()
        self.method.addItems(METHODS)
        self.register_button = QPushButton("Register")
        self.example_button = QPushButton("Add as example")
        self.example_button.setToolTip("Use this section with this plate in the next training")
        self.cancel_button = QPushButton("Cancel")
        self.progress = QProgressBar()
        self.status = QLabel("Choose the atlas, then Train index (or Load index).")
        self.status.setWordWrap(True)
        self.state = RunStateMachine(self)
        self.runner = RegistrationRunner(self)
        self.results = ResultLayers(napari_viewer, self)
        self.preview = ResultLayers(napari_viewer, self)
        self._job: str | None = None
        self._job_info: dict = {}
        self._layout()
        self._connect()
        self._sync()

    # -- building -------------------------------------------------------------------------------
    def _layout(self) -> None:
        atlas = QGroupBox("atlas")
        a = QVBoxLayout(atlas)
        a.addWidget(self.source)
        options = QFormLayout()
        options.addRow("training steps", self.steps)
        options.addRow("time budget", self.minutes)
        a.addLayout(options)
        a.addLayout(_row(self.train_button, self.load_button, self.save_button))
        a.addWidget(self.index_status)
        section = QGroupBox("section")
        s = QFormLayout(section)
        s.addRow("section", self.section)
        s.addRow("plates shown", self.top)
        s.addRow(self.rerank)
        s.addRow(self.find_button)
        s.addRow(self.gallery)
        plate = QGroupBox("plate")
        p = QVBoxLayout(plate)
        p.addWidget(self.adjust)
        form = QFormLayout()
        form.addRow("method", self.method)
        p.addLayout(form)
        p.addLayout(_row(self.register_button, self.example_button))
        box = scrolling_body(self)
        for w in (atlas, section, plate):
            box.addWidget(w)
        box.addLayout(_row(self.progress, self.cancel_button))
        box.addWidget(self.status)
        box.addStretch(1)

    def _connect(self) -> None:
        self.train_button.clicked.connect(lambda: self.train())
        self.load_button.clicked.connect(lambda: self.load_index())
        self.save_button.clicked.connect(lambda: self.save_index())
        self.find_button.clicked.connect(lambda: self.find_plates())
        self.register_button.clicked.connect(lambda: self.register())
        self.example_button.clicked.connect(lambda: self.add_example())
        self.cancel_button.clicked.connect(self.cancel)
        self.gallery.plate_chosen.connect(self._choose)
        self.adjust.plate_changed.connect(self._plate_changed)
        self.section.layer_changed.connect(lambda *_: self._sync())
        self.state.changed.connect(lambda *_: self._sync())
        handlers = (self._on_finished, self._on_failed, self._on_cancelled)
        self.state.drive(self.runner, *handlers, progressed=self._on_progress, stopped=self._on_stopped)
        self.state.done.connect(self.run_done)

    def _sync(self) -> None:
        """Enable what can be done now."""
        idle = self.state.is_(RunState.IDLE)
        ready = idle and self.lookup is not None
        has_section = self.section.layer() is not None
        self.train_button.setEnabled(idle)
        self.load_button.setEnabled(idle)
        self.save_button.setEnabled(ready)
        self.find_button.setEnabled(ready and has_section)
        self.register_button.setEnabled(ready and has_section)
        self.example_button.setEnabled(ready and has_section)
        self.cancel_button.setEnabled(self.state.is_(RunState.RUNNING))

    # -- running jobs ---------------------------------------------------------------------------
    def _start(self, job: str, func, message: str, info: dict | None = None, **kwargs) -> bool:
        if not self.state.is_(RunState.IDLE):
            return False
        self._job, self._job_info = job, dict(info or {})
        self.progress.setRange(0, 0)  # busy until the first progress event
        self.status.setText(message)
        self.state.start()
        self.runner.run(func, **kwargs)
        return True

    def cancel(self) -> None:
        """Stop the running job (the Cancel button)."""
        self.state.cancel(self.runner, self.status)

    def _on_progress(self, event) -> None:
        if not self.state.is_(RunState.RUNNING):
            return
        self.progress.setRange(0, max(int(event.total), 1))
        self.progress.setValue(min(int(event.step), int(event.total)))
        parts = [event.stage or self._job or "working"]
        if event.loss is not None:
            parts.append(f"loss {event.loss:.4f}")
        rank = event.extra.get("val_mean_rank")
        if rank is not None:
            parts.append(f"validation mean rank {rank:.2f}")
        self.status.setText(f"{self._job_text()}: " + ", ".join(parts))

    def _job_text(self) -> str:
        return {"train": "Training", "register": "Registering"}.get(self._job or "", "Working")

    def _on_finished(self, result) -> None:
        getattr(self, f"_{self._job}_done")(result)

    def _finish(self, message: str) -> None:
        """The results are in: back to idle once the worker thread has ended too."""
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        self.status.setText(message)
        self.state.results_in()

    def _on_failed(self, message: str) -> None:
        show_error(message)
        self.status.setText(f"Failed: {message}")

    def _on_cancelled(self) -> None:
        kept = "the previous index is kept" if self.lookup is not None else "no index was made"
        self.status.setText(f"Cancelled; {kept}, no layers were changed.")

    def _on_stopped(self) -> None:
        """A failed or cancelled job: the progress bar is emptied."""
        self.progress.setRange(0, 1)
        self.progress.setValue(0)

    # -- the index ------------------------------------------------------------------------------
    def train(self) -> bool:
        """Train the index of the chosen atlas (with the examples added so far) in a worker."""
        spec = self.source.spec()
        if spec["kind"] == "image layer":
            layer = spec["layer"]
            if layer is None:
                show_error(
                    "Choose the atlas: an Image layer holding the 3D reference, a path or a brainglobe name."
                )
                return False
            spec["data"] = layer.data[0] if layer.multiscale else layer.data
            labels = spec.get("annotation")
            spec["annotation_data"] = None if labels is None else labels.data
        names = region_names_of(spec.get("annotation"))
        spec.pop("layer", None)
        spec.pop("annotation", None)
        options = {"region_names": names} if names else {}
        if self.steps.value():
            options["steps"] = self.steps.value()
        if self.minutes.value():
            options["max_minutes"] = self.minutes.value()
        examples = {
            "sections": [s for s, _ in self.examples] or None,
            "section_plates": [p for _, p in self.examples] or None,
        }
        extra = f" and {len(self.examples)} example sections" if self.examples else ""
        return self._start(
            "train", jobs.train_index, f"Training the index{extra}…", source=spec, options=options, **examples
        )

    def _train_done(self, lookup) -> None:
        self._set_lookup(lookup, "trained")

    def load_index(self, path: str | Path | None = None) -> bool:
        """Load a saved index folder (asks for it when ``path`` is None)."""
        if path is None:
            path = QFileDialog.getExistingDirectory(self, "Atlas index folder")
            if not path:
                return False
        return self._start("load", jobs.load_index, f"Loading {path}…", path=str(path))

    def _load_done(self, lookup) -> None:
        self._set_lookup(lookup, "loaded")

    def save_index(self, path: str | Path | None = None) -> bool:
        """Save the current index as a folder (asks for it when ``path`` is None)."""
        if self.lookup is None:
            show_error("Train or load an index first.")
            return False
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, "Save the atlas index as a folder")
            if not path:
                return False
        return self._start("save", jobs.save_index, f"Saving to {path}…", lookup=self.lookup, path=str(path))

    def _save_done(self, path) -> None:
        self._finish(f"Index saved to {path}.")

    def _set_lookup(self, lookup, how: str) -> None:
        self.lookup = lookup
        self.gallery.clear()
        self.adjust.set_plates(lookup.n_plates)
        self.rerank.setChecked(bool(lookup.rerank_default))
        labels = "with labels" if lookup.plate_labels(0) is not None else "no labels"
        seconds = lookup.settings.get("seconds")
        took = f", trained in {seconds:.0f} s" if isinstance(seconds, int | float) else ""
        self.index_status.setText(f"Index {how}: {lookup.n_plates} plates, {labels}{took}.")
        self._finish(f"Index {how}. Pick a section and Find plates.")

    # -- the section ----------------------------------------------------------------------------
    def section_image(self) -> np.ndarray | None:
        """The chosen section as a 2D (or RGB) array: a 3D stack gives its plane on screen; a
        multiscale layer its finest level within :data:`._atlas_section.MAX_SECTION_SIDE` pixels."""
        found = self._section()
        return None if found is None else found[0]

    def _section(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(image, factor)``: :meth:`section_image` and its pixel size in the layer's data pixels."""
        layer = self.section.layer()
        if layer is None:
            show_error("Choose the section: an Image layer holding one brain section.")
            return None
        data, factor = section_level(layer)
        plane = plane_of(data, layer, self.viewer.dims.point)
        if plane is None:
            spatial = data.ndim - (1 if layer.rgb else 0)
            show_error(f"{layer.name} is {spatial}D; pick a 2D section (or a stack of them).")
            return None
        return np.asarray(plane), factor

    def _ready_section(self) -> tuple[np.ndarray, np.ndarray] | None:
        """:meth:`_section` when an index is there too; else None after telling the user."""
        if self.lookup is None:
            show_error("Train or load an index first.")
            return None
        return self._section()

    def find_plates(self) -> bool:
        """Rank the plates for the chosen section; the best ones appear in the gallery."""
        found = self._ready_section()
        if found is None:
            return False
        section = found[0]
        top = min(self.top.value(), self.lookup.n_plates)
        rerank = self.rerank.isChecked()
        message = "Finding plates (re-ranking by pose)…" if rerank else "Finding plates…"
        return self._start(
            "find", jobs.find_plates, message, lookup=self.lookup, section=section, top=top, rerank=rerank
        )

    def _find_done(self, result) -> None:
        hits = result["hits"]
        # the pose search's options (None without it) and whether plain_reach ordered the plates next
        # to its best pose: what a ranking needs to be repeated
        self.find_settings = {
            "rerank": bool(result["reranked"]),
            "rerank_options": result.get("rerank_options"),
            "plain_ranked": result.get("plain_ranked"),
            "densified": result.get("densified"),  # whether the opt-in dense_sweep fired (None: no search)
            "first_stage": result["first_stage"],
            # the order the pose search starts from, and the first stage's ranking, depend on it
            "framing": bool(self.lookup.framing),
        }
        if result["reranked"]:
            what = "pose distance (1 - similarity)"
        elif result["first_stage"] == "embedding" and self.lookup.framing:
            what = "framing-pooled embedding distance"  # the mean of the centred and the best framing's
        else:
            what = f"{result['first_stage']} distance"
        self.gallery.set_hits(hits, result["thumbnails"], what)  # chooses the best: the plate follows
        shown = ", ".join(f"{p} ({d:.3f})" for p, d in hits[:3])
        self._finish(f"Best plates: {shown}. Choose one, then Register.")

    def _choose(self, plate: int) -> None:
        """A plate clicked in the gallery becomes the plate to register (and is shown)."""
        if self.adjust.values()["plate"] == plate:
            self._plate_changed(plate)
        else:
            self.adjust.set_plate(plate)  # emits plate_changed

    def _plate_changed(self, plate: int) -> None:
        """Show the plate beside the section, as large as it (where plate landmarks can be placed)."""
        self.gallery.choose(plate)
        if self.lookup is None:
            return
        result = jobs.plate_preview(None, None, lookup=self.lookup, plate=plate)
        layer = self.section.layer()
        scale, translate = (1.0, 1.0), (0.0, 0.0)
        if layer is not None:
            shape = layer.data.shape[-3:-1] if layer.rgb else layer.data.shape[-2:]
            extent = np.asarray(shape, float) * np.asarray(layer.scale[-2:], float)  # world units
            size = float(np.min(extent / np.asarray(result["image"].shape, float)))
            scale = (size, size)
            translate = (
                float(layer.translate[-2]),
                float(layer.translate[-1]) + extent[1] * (1 + PREVIEW_GAP),
            )
        kwargs = {"name": "atlas plate", "scale": scale, "translate": translate, "colormap": "gray"}
        self.preview.show([(result["image"], kwargs, "image")])
        self.status.setText(f"Plate {plate} shown beside the section.")

    # -- registration ---------------------------------------------------------------------------
    def _landmarks(self, values: dict, section_layer, factor: np.ndarray):
        """Section and plate landmarks in pixels of the section image (``factor``: its pixel size in
        the layer's data pixels) and of the plate, or (None, None)."""
        s_layer, p_layer = values["section_points"], values["plate_points"]
        plate_layer = next(iter(self.preview.layers), None)
        if s_layer is None or p_layer is None or plate_layer is None:
            return None, None
        s = [section_layer.world_to_data(s_layer.data_to_world(pt))[-2:] for pt in s_layer.data]
        p = [plate_layer.world_to_data(p_layer.data_to_world(pt))[-2:] for pt in p_layer.data]
        return np.asarray(s, float).reshape(-1, 2) / factor, np.asarray(p, float)

    def register(self) -> bool:
        """Register the chosen plate (with the manual corrections) onto the section."""
        found = self._ready_section()
        if found is None:
            return False
        section, factor = found
        layer = self.section.layer()
        values = self.adjust.values()
        plate = values["plate"]
        section_points, plate_points = self._landmarks(values, layer, factor)
        start = {"rotation": values["rotation"], "scale": values["scale"],
                 "section_points": section_points, "plate_points": plate_points}  # fmt: skip
        info = {
            "name": layer.name,
            "scale": tuple(float(v) for v in np.asarray(layer.scale[-2:]) * factor),
            "translate": tuple(layer.translate[-2:]),
        }
        return self._start(
            "register", jobs.register_plate, f"Registering plate {plate}…", info,
            lookup=self.lookup, section=section, plate=plate, method=self.method.currentText(), start=start,
        )  # fmt: skip

    def _register_done(self, result) -> None:
        reg = result["registration"]
        self.last = reg
        info, plate = self._job_info, result["plate"]
        where = {"scale": info["scale"], "translate": info["translate"]}
        layers = [
            (
                np.asarray(reg.warped, np.float32),
                {"name": f"{info['name']} atlas plate {plate}", "colormap": "magenta",
                 "blending": "additive", **where},
                "image",
            )
        ]  # fmt: skip
        roles = ["warped plate"]
        if result["labels"] is not None:
            kwargs = {"name": f"{info['name']} atlas labels", "opacity": 0.5, **where}
            if result["features"] is not None:
                kwargs["features"] = result["features"]
            layers.append((np.asarray(result["labels"]), kwargs, "labels"))
            roles.append("atlas labels")

        def shown(_layers):
            names = "; labels with region names on hover" if result["labels"] is not None else ""
            self._finish(f"Done: plate {plate} registered onto {info['name']}{names}.")

        self.results.show_gradually(layers, shown, roles=roles)

    def add_example(self) -> bool:
        """Keep the section with the chosen plate as a labelled example for the next training."""
        section = self.section_image()
        if section is None:
            return False
        plate = self.adjust.values()["plate"]
        self.examples.append((np.array(section, copy=True), int(plate)))
        n = len(self.examples)
        self.status.setText(f"Added as an example of plate {plate}; {n} example(s) for the next Train index.")
        return True


def region_names_of(layer) -> dict[int, str]:
    """``{label value: name}`` from a Labels layer's features (a value and a name column, see
    :func:`~napari_nephi.engines.atlas.plates.region_names_from_table`); empty when it has none."""
    from ..engines.atlas.plates import region_names_from_table

    features = getattr(layer, "features", None)
    if features is None or len(features) == 0:
        return {}
    try:
        return region_names_from_table({c: list(features[c]) for c in features.columns})
    except InputError:
        return {}


def _row(*widgets) -> QHBoxLayout:
    row = QHBoxLayout()
    for w in widgets:
        row.addWidget(w)
    return row
