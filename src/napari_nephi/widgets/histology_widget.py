"""Dock widget "Histology registration": register two differently stained whole slides.

Pick the fixed and moving slide layers (multiscale or not; their pixel sizes come from the layer
scale, or are asked for), the stain channel, flips, the working level, stages and iterations; Run
registers in a worker thread with one progress bar per stage and a low-resolution preview when
the engine sends one. Results: the warped moving slide (a lazy multiscale layer), checkerboard and
difference at a low level, the Jacobian determinant and the deformation grid on the working level.
"Transfer annotations" carries a Shapes or Points layer drawn on the moving slide onto the fixed
slide as a new layer. Nothing the user loaded is modified.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from napari.layers import Points, Shapes
from napari.utils.notifications import show_error
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QFileDialog, QFormLayout, QGroupBox, QLabel, QPushButton, QVBoxLayout, QWidget

from ..core.errors import RegistrationError
from . import _histology_layers as work
from ._histology_parts import HistologyOptions, SlideChooser, SlidePreview, StageProgress, narrow
from ._panel import scrolling_body
from ._pickers import LayerPicker
from ._results import ResultLayers, remove_layer
from ._runner import RegistrationRunner
from ._state import RunControls, RunState, RunStateMachine


def summary(metrics: dict) -> str:
    """One paragraph about a finished run: similarity before/after, rigid part, time, notes."""
    parts = []
    if "ncc_before" in metrics and "ncc_after" in metrics:
        parts.append(f"NCC on tissue {metrics['ncc_before']:.3f} -> {metrics['ncc_after']:.3f}")
    if "rigid_angle" in metrics:
        flip = ", mirrored" if metrics.get("rigid_flipped") else ""
        parts.append(f"rotation {metrics['rigid_angle']:.1f} deg{flip}")
    if "channel" in metrics:
        parts.append(f"channel {metrics['channel']}")
    if isinstance(metrics.get("seconds"), int | float):
        parts.append(f"{metrics['seconds']:.0f} s")
    text = "; ".join(parts) + "."
    notes = metrics.get("notes") or []
    return text + (" Notes: " + " ".join(notes) if notes else "")


class HistologyWidget(QWidget):
    """Slides and pixel sizes, options, Run/Cancel with stage bars, result layers, annotation transfer.

    ``last`` is the last :class:`~napari_nephi.Registration`; ``run_done`` is emitted when a run is
    over (finished with its layers in the viewer, failed or cancelled).
    """

    run_done = Signal()

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.fixed = SlideChooser(napari_viewer)
        self.moving = SlideChooser(napari_viewer)
        self.options = HistologyOptions()
        self.state = RunStateMachine(self)
        self.controls = RunControls(self.state)
        self.run_button, self.cancel_button = self.controls.run_button, self.controls.cancel_button
        self.stage_bars = StageProgress()
        self.status = QLabel("Pick the fixed and the moving slide, check their pixel sizes, then Run.")
        self.status.setWordWrap(True)
        self.annotations = narrow(LayerPicker(napari_viewer, (Shapes, Points)))
        self.transfer_button = QPushButton("Transfer annotations")
        self.transfer_button.setToolTip(
            "Carry a Shapes or Points layer drawn on the moving slide to the fixed one"
        )
        self.save_button = QPushButton("Save result…")
        self.save_button.setToolTip(
            "Write the transform, the warped slide (tiled pyramidal OME-TIFF), metrics and settings "
            "to a folder"
        )
        self.transfer_status = QLabel("")
        self.transfer_status.setWordWrap(True)
        self.runner = RegistrationRunner(self)
        self.results = ResultLayers(napari_viewer, self)
        self.last = None
        self.preview = SlidePreview(napari_viewer)
        self._run: dict = {}
        images = self.moving.picker.layers()
        if len(images) >= 2:
            self.fixed.set_layer(images[0])
            self.moving.set_layer(images[1])
        self._layout()
        self._connect()
        self._sync()

    def _layout(self) -> None:
        slides = QGroupBox("slides")
        form = QFormLayout(slides)
        form.addRow("fixed", self.fixed)
        form.addRow("moving", self.moving)
        options = QGroupBox("registration")
        QVBoxLayout(options).addWidget(self.options)
        transfer = QGroupBox("annotations drawn on the moving slide")
        column = QVBoxLayout(transfer)
        column.addWidget(self.annotations)
        column.addWidget(self.transfer_button)
        column.addWidget(self.transfer_status)
        box = scrolling_body(self)
        for w in (slides, options, self.controls, self.stage_bars, self.status, self.save_button, transfer):
            box.addWidget(w)
        box.addStretch(1)

    def _connect(self) -> None:
        self.run_button.clicked.connect(lambda: self.start())
        self.cancel_button.clicked.connect(self.cancel)
        self.transfer_button.clicked.connect(lambda: self.transfer_annotations())
        self.save_button.clicked.connect(lambda: self.save_result())
        self.annotations.layer_changed.connect(lambda *_: self._sync())
        self.state.changed.connect(lambda *_: self._sync())
        handlers = (self._on_finished, self._on_failed, self._on_cancelled)
        self.state.drive(self.runner, *handlers, progressed=self._on_progress, stopped=self.preview.remove)
        self.state.done.connect(self.run_done)

    def _sync(self) -> None:
        idle = self.state.is_(RunState.IDLE)
        self.transfer_button.setEnabled(
            idle and self.last is not None and self.annotations.layer() is not None
        )
        self.save_button.setEnabled(idle and self.last is not None)

    # -- running ------------------------------------------------------------------------------------
    def _check_inputs(self):
        """The fixed and moving layers, or None after telling the user what is missing."""
        fixed, moving = self.fixed.layer(), self.moving.layer()
        if fixed is None or moving is None:
            show_error("Choose a fixed and a moving slide (Image layers).")
            return None
        if fixed is moving:
            show_error("The fixed and the moving slide are the same layer; choose two slides.")
            return None
        for what, layer in (("fixed", fixed), ("moving", moving)):
            if layer.ndim != 2:
                show_error(
                    f"The {what} slide {layer.name!r} is {layer.ndim}D; choose a 2D (grey or RGB) slide. "
                    "For a multi-channel (fluorescence) image, open it with one layer per channel "
                    "(napari-nephi's reader does), choose the layer of its nuclear channel (DAPI) and "
                    "the stain channel 'fluorescence'."
                )
                return None
        for what, chooser, layer in (("fixed", self.fixed, fixed), ("moving", self.moving, moving)):
            if chooser.pixel_size() is None:
                show_error(
                    f"The pixel size of the {what} slide {layer.name!r} is unknown (its layer scale is "
                    "1): enter it in um/px (e.g. 0.25 at 40x, 0.5 at 20x), or tick 'confirmed' if 1 um/px "
                    "is right."
                )
                return None
        return fixed, moving

    def start(self) -> bool:
        """Start the registration of the chosen slides in a worker thread; False if it could not start."""
        if not self.state.is_(RunState.IDLE):
            return False
        layers = self._check_inputs()
        if layers is None:
            return False
        fixed, moving = layers
        options = self.options.values()
        um_f, um_m = self.fixed.pixel_size(), self.moving.pixel_size()
        self._run = {"fixed": fixed, "moving": moving, "frame": work.Frame.of(fixed), "name": moving.name}
        self.stage_bars.start(options["stages"])
        self.status.setText(f"Registering {moving.name} onto {fixed.name}…")
        self.state.start()
        self.runner.run(
            work.register_slides,
            fixed=work.levels_of(fixed) if fixed.multiscale else fixed.data,
            moving=work.levels_of(moving) if moving.multiscale else moving.data,
            rgb=bool(fixed.rgb) if fixed.rgb == moving.rgb else None,
            spacing=(um_f, um_f),
            moving_spacing=(um_m, um_m),
            options=options,
            frame=self._run["frame"],
            name=moving.name,
        )
        return True

    def cancel(self) -> None:
        """Stop the running registration (the Cancel button); the viewer is left as it was."""
        self.state.cancel(self.runner, self.status)

    def _on_progress(self, event) -> None:
        if not self.state.is_(RunState.RUNNING):
            return
        self.stage_bars.advance(event)
        self.status.setText(f"Running: {event.stage or 'working'}, step {event.step}/{event.total}")
        if event.preview is not None:
            self._show_preview(event)

    def _show_preview(self, event) -> None:
        """The engine's current warped moving slide, on the fixed grid or a coarser one."""
        shape0 = np.asarray(self._run["fixed"].level_shapes[0][:2], float)
        zoom = event.extra.get("preview_zoom")
        factor = np.mean(zoom) if zoom is not None else np.mean(shape0 / np.shape(event.preview)[:2])
        where = self._run["frame"].at(float(factor))
        self.preview.show(event.preview, where, f"{self._run['name']} preview")

    def _on_finished(self, result) -> None:
        if "saved" in result:
            self.status.setText(f"Saved to {result['saved']}.")
            self.state.results_in()
            return
        self.preview.remove()
        reg = result["registration"]
        self.last = reg
        self.stage_bars.finish()

        def shown(_layers) -> None:
            self.status.setText(f"Done. {summary(reg.metrics)}")
            self.state.results_in()

        old = self.results.layer_with_role("warped", "image")  # multiscale: replaced, not updated
        if old is not None:
            remove_layer(self.viewer, old)  # first, so that the new one takes its name
        self.results.show_gradually(result["layers"], shown, roles=work.ROLES)

    def _on_failed(self, message: str) -> None:
        self.preview.remove()
        show_error(message)
        self.status.setText(f"Failed: {message}")

    def _on_cancelled(self) -> None:
        self.preview.remove()
        self.status.setText("Cancelled; no layers were changed.")

    def save_result(self, folder: str | Path | None = None) -> bool:
        """Save the last registration to ``folder`` (asked for when None) in a worker thread."""
        if self.last is None or not self.state.is_(RunState.IDLE):
            show_error("Run a registration first; its result is what is saved.")
            return False
        if folder is None:
            folder = QFileDialog.getSaveFileName(self, "Save the result as a folder")[0]
            if not folder:
                return False
        self.status.setText(f"Saving to {folder}…")
        self.state.start()
        self.runner.run(work.save_registration, registration=self.last, folder=str(folder))
        return True

    # -- annotations --------------------------------------------------------------------------------
    def transfer_annotations(self, layer=None):
        """Add ``layer`` (default: the chosen Shapes or Points layer), drawn on the moving slide of the
        last run, carried onto its fixed slide; returns the new layer (None after an error message)."""
        layer = self.annotations.layer() if layer is None else layer
        if self.last is None or not self._run:
            show_error("Run a registration first: annotations are carried by its transform.")
            return None
        if layer is None:
            show_error("Choose a Shapes or Points layer drawn on the moving slide.")
            return None
        try:
            data, kwargs, kind = work.carried_annotations(
                layer, self._run["moving"], self._run["frame"], self.last.transform
            )
        except RegistrationError as exc:
            show_error(str(exc))
            return None
        new = getattr(self.viewer, f"add_{kind}")(data, **kwargs)
        self.transfer_status.setText(
            f"{layer.name}: {len(data)} {kind} carried onto {self._run['fixed'].name}."
        )
        return new
