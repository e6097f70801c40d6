"""Dock widget "Register (affine and more)": pick layers, set options, run in the background."""

from __future__ import annotations

import gc
import importlib
import json
import threading
import time
from pathlib import Path

import numpy as np
import torch
from napari.layers import Image, Labels, Layer, Points
from napari.utils import progress as napari_progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QEventLoop, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QFormLayout,
    QLabel,
    QPushButton,
    QWidget,
)

from .. import overlays
from ..core.errors import RegistrationError
from ..core.files import atomic_write_bytes
from ..core.progress import is_cancelled
from ..engines.registry import register
from ._apply import apply_saved_transform, layer_job
from ._options import RegistrationOptions, folded
from ._panel import scrolling_body
from ._pickers import LayerPicker
from ._plot import CurvePlot
from ._results import ResultLayers, remove_layer, warm_up
from ._runner import RegistrationRunner
from ._state import RunControls, RunState, RunStateMachine
from ._steps import StepQueue

# The first torch optimizer of a process imports torch's compiler stack (1-4 s holding the GIL):
# pay that when the widget's module loads (the widget is opening) rather than in the first run,
# where it would freeze the GUI from the worker thread.
torch.optim.SGD([torch.zeros(1, requires_grad=True)])

#: Do not push previews to the canvas more often than this (seconds).
PREVIEW_INTERVAL = 0.5
#: The Apply's bar is redrawn at most this often (seconds), and at its first and last chunk.
APPLY_BAR_INTERVAL = 0.2

#: The worker waits at most this long (seconds) for the GUI to draw a preview it sent.
PREVIEW_WAIT = 0.5


def layer_image(layer):
    """The full-resolution data of an Image layer (level 0 of a multiscale), not read: a lazy (dask)
    layer is read in the worker thread (:func:`register_with_overlays`), not on napari's."""
    return layer.data[0] if layer.multiscale else layer.data


def _show_step(bar, event) -> None:
    """napari's progress ``bar`` at ``event.step`` of ``event.total`` (the registration's and the apply's).
    Only the count: the stage and loss are in the status line, and ``set_description`` costs ~40 ms."""
    if bar.total != event.total:
        bar.total = event.total
    bar.n = event.step
    bar.refresh()


class RegisterWidget(QWidget):
    """Fixed/moving pickers, options, Run/Cancel, result layers and metrics.

    Built from parts that talk through signals: layer pickers, the options panel, the run state
    (:class:`RunStateMachine`, which the Run and Cancel buttons follow), the runner (a napari
    worker) and the result layers. Closing the viewer deletes the widget, which cancels its run.
    """

    #: Emitted when a run is over and its result layers (if any) are all in the viewer.
    run_done = Signal()

    #: Emitted when an "Apply saved transform" is over: the new layer, or None (error or Cancel).
    apply_done = Signal(object)

    #: Emitted when a "Save transform" is over: the folder, or None after an error.
    save_done = Signal(object)

    #: The method selected when the widget opens.
    default_method = "affine"

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        imports = _import_in_background()
        self.viewer = napari_viewer
        self.fixed = LayerPicker(napari_viewer, (Image,))
        self.moving = LayerPicker(napari_viewer, (Image,))
        self.moving_labels = LayerPicker(napari_viewer, (Labels,), optional=True)
        self.fixed_points = LayerPicker(napari_viewer, (Points,), optional=True)
        self.moving_points = LayerPicker(napari_viewer, (Points,), optional=True)
        self.options = RegistrationOptions(self.default_method)
        self.state = RunStateMachine(self)
        self.controls = RunControls(self.state)
        self.run_button, self.cancel_button = self.controls.run_button, self.controls.cancel_button
        self.save_button = QPushButton("Save transform…")
        self.save_button.setEnabled(False)
        self.apply_button = QPushButton("Apply saved transform to layer…")
        self.keep_partial = QCheckBox("keep the partial preview when cancelled")
        self.loss_plot = CurvePlot("step", "loss at each step")
        self.status = QLabel("Pick a fixed and a moving image, then Run.")
        self.status.setWordWrap(True)
        self.runner = RegistrationRunner(self)
        self.applier = RegistrationRunner(self)  # "Apply saved transform": one job at a time, as a run
        self._applied_layer = None  # the layer the last apply added (None after an error or Cancel)
        self.saver = RegistrationRunner(self)  # "Save transform": the files are written off napari's thread
        self._saving = {"folder": None, "status": ""}  # the save's folder once written; the status to restore
        self.results = ResultLayers(napari_viewer, self)
        self.steps = StepQueue(self)  # turns of the event loop owned by this widget
        self.last = None  # the last Registration
        self._progress_bar = None  # the registration's
        self._apply_bar = None  # the apply's
        self._apply_bar_drawn = 0.0  # when it was last redrawn
        self._last_preview = 0.0
        self.preview_layer = None
        self._reused = None  # the previous run's warped layer showing this run's previews, and its state
        self._last_run = {"settings": {}, "world_affine": None}
        self._gc_pause = FullCollectionPause()
        self._gui_idle = threading.Event()  # set when the GUI has drawn the last preview
        self.destroyed.connect(lambda *_: self._closed())
        self._layout()
        self.run_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        self.save_button.clicked.connect(lambda: self.save_transform(wait=False))
        self.apply_button.clicked.connect(lambda: self.apply_transform(wait=False))
        self.state.changed.connect(self._follow_state)
        # both jobs share one state (one job at a time); each runner's signals act on its own job only
        run = (self._on_finished, self._on_failed, self._on_cancelled)
        self.state.drive(
            self.runner, *run, progressed=self._on_progress, stopped=self._gc_pause.end, done=self._run_over
        )
        apply = (self._on_applied, self._on_apply_failed, self._on_apply_cancelled)
        self.state.drive(self.applier, *apply, progressed=self._on_apply_progress, done=self._apply_over)
        saving = (self._on_saved, self._on_save_failed, lambda: None)
        self.state.drive(self.saver, *saving, done=self._save_over, cancellable=False)  # written to its end
        images = self.moving.layers()
        if len(images) >= 2:
            self.fixed.set_layer(images[0])
            self.moving.set_layer(images[1])
        self.warmed_up = False  # see warm_up(): napari's once-per-viewer costs, paid now
        warm_up(
            napari_viewer,
            self.steps,
            cancelled=lambda: not self.state.is_(RunState.IDLE),
            done=self._warm_up_done,
            ready=lambda: not imports.is_alive(),
        )

    def _warm_up_done(self) -> None:
        self.warmed_up = True

    def _closed(self) -> None:
        """The widget is being deleted (its viewer closed): end what a run holds. No Qt calls here."""
        self.runner.cancel()  # the runner cancels its worker when deleted too
        self.applier.cancel()  # (a save is written to its end: each file atomically)
        self._gui_idle.set()
        self._close_progress_bar()
        self._close_apply_bar()
        self._gc_pause.end()

    def _layout(self):
        inputs = QFormLayout()
        inputs.addRow("fixed image", self.fixed)
        inputs.addRow("moving image", self.moving)
        inputs.addRow("moving labels", self.moving_labels)
        landmarks = QWidget()
        form = QFormLayout(landmarks)
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow("fixed landmarks", self.fixed_points)
        form.addRow("moving landmarks", self.moving_points)
        self.landmarks = folded("landmarks (target registration error)", landmarks)
        box = scrolling_body(self)
        box.addLayout(inputs)
        box.addWidget(self.landmarks)
        box.addWidget(self.options)
        box.addWidget(self.controls)
        box.addWidget(self.keep_partial)
        box.addWidget(self.loss_plot)
        box.addWidget(self.status)
        box.addWidget(self.save_button)
        box.addWidget(self.apply_button)
        box.addStretch()

    # -- running -----------------------------------------------------------------------
    def start(self) -> None:
        """Validate the chosen layers and start the registration in a worker thread."""
        if not self.state.is_(RunState.IDLE):
            return
        fixed, moving = self.fixed.layer(), self.moving.layer()
        if fixed is None or moving is None:
            show_error("Choose a fixed and a moving image layer first.")
            return
        if fixed.rgb != moving.rgb:
            show_error("One image is RGB and the other is not; convert them to the same kind first.")
            return
        f_dim, m_dim = fixed.ndim, moving.ndim  # napari's ndim leaves out the RGB axis
        if f_dim != m_dim:
            show_error(
                f"The fixed image is {f_dim}D and the moving image is {m_dim}D; both must be 2D or 3D."
            )
            return
        opts = self.options.values()
        spacing = tuple(float(s) for s in fixed.scale[-f_dim:])
        moving_spacing = tuple(float(s) for s in moving.scale[-m_dim:])
        if opts["method"] == "affine" and moving_spacing != spacing:
            opts["moving_spacing"] = moving_spacing
        self._inputs = {
            "fixed_shape": layer_image(fixed).shape[:f_dim],
            "scale": spacing,
            "name": moving.name,
            "world_affine": (fixed.metadata or {}).get("nifti_affine"),
            "moving_scale": moving_spacing,
            "moving_world_affine": (moving.metadata or {}).get("nifti_affine"),
            "labels": self.moving_labels.layer(),
            "fixed_points": self.fixed_points.layer(),
            "moving_points": self.moving_points.layer(),
        }
        self._settings = {"fixed": fixed.name, "moving": moving.name, **opts}
        self.state.start(self.runner)
        self.status.setText("Running…")
        self._gc_pause.begin()
        self.loss_plot.clear()
        self._remove_preview()
        inp = self._inputs
        labels = inp["labels"].data if inp["labels"] is not None else None  # read in the worker too
        job = {
            "fixed": layer_image(fixed),
            "moving": layer_image(moving),
            "spacing": spacing,
            "rgb": bool(fixed.rgb),
            "moving_labels": labels,
            "fixed_points": points_in_voxels(inp["fixed_points"], fixed),
            "moving_points": points_in_voxels(inp["moving_points"], moving),
            "name_prefix": f"{moving.name} ",
            "gui_idle": self._gui_idle,
            **opts,
        }
        # this turn adds the preview layer, or takes the previous run's warped layer for it (adding
        # a layer costs ~50-100 ms of GUI time); the next turn starts the worker
        if not self._reuse_warped_for_preview(f_dim):
            self._add_preview_layer(f_dim)
        self.steps.later(lambda: self._launch(job))

    def _launch(self, job: dict) -> None:
        if self.state.is_(RunState.CANCELLING):  # Cancel came before the worker started
            self.state.not_started()
            return
        self._progress_bar = napari_progress(total=0, desc=f"Registering {self._inputs['name']}")
        self.runner.run(register_with_overlays, **job)

    def cancel(self) -> None:
        """Stop the running registration, or the transform being applied (the Cancel button).

        A save is not stopped: its files are being written (it is driven as not cancellable)."""
        self.state.cancel(status=self.status)  # the runner of the job that holds the state

    def _follow_state(self, _old, new: RunState) -> None:
        """Apply and Save only when idle (Run and Cancel follow the state in RunControls)."""
        idle = new is RunState.IDLE
        self.apply_button.setEnabled(idle)
        self.save_button.setEnabled(idle and self.last is not None)

    def _busy(self) -> bool:
        """Whether a job is on (a registration, an apply or a save); if so, tells the user which."""
        if self.state.is_(RunState.IDLE):
            return False
        job = self.state.job
        if job is self.saver:
            show_error("A transform is being saved; wait for it to finish first.")
        else:
            what = "A transform is being applied" if job is self.applier else "A registration is running"
            show_error(f"{what}; wait for it to finish (or Cancel it) first.")
        return True

    def _run_job(self, runner, func, done_signal, wait: bool, **kwargs) -> None:
        """Run ``func`` in ``runner``'s worker; with ``wait``, run the event loop until ``done_signal``
        (or until the widget is deleted, its viewer closed), as the viewer's own loop would."""
        loop = QEventLoop() if wait else None
        if loop is not None:
            done_signal.connect(loop.quit)
            self.destroyed.connect(loop.quit)
        runner.run(func, **kwargs)
        if loop is None:
            return
        loop.exec()  # the worker's signals arrive here
        try:
            done_signal.disconnect(loop.quit)
            self.destroyed.disconnect(loop.quit)
        except (RuntimeError, TypeError):  # pragma: no cover  the widget is gone
            pass

    def _on_progress(self, event) -> None:
        if event.preview is not None:  # the worker waits until this is drawn (next turn)
            QTimer.singleShot(1, self._gui_idle.set)
        if not self.state.is_(RunState.RUNNING):
            return  # a late event after Cancel
        if event.loss is not None:
            self.loss_plot.values.append(float(event.loss))
        now = time.monotonic()
        if event.preview is None and now - self._last_preview < PREVIEW_INTERVAL and event.step < event.total:
            # throttled: the GUI is redrawn at most every PREVIEW_INTERVAL seconds. Previews are
            # never dropped (the engine sends one every 0.5 s at most): with both clocks at the same
            # period a plain step could otherwise always come just before them and starve them.
            return
        self._last_preview = now
        self.loss_plot.update()
        loss = "" if event.loss is None else f", loss {event.loss:.4f}"
        stage = f"{event.stage}, " if event.stage else ""
        self.status.setText(f"Running: {stage}step {event.step}/{event.total}{loss}")
        if event.preview is not None:
            self._show_preview(event)
        bar = self._progress_bar  # updating it may run the event loop: do it last
        if bar is not None and self.state.is_(RunState.RUNNING):
            _show_step(bar, event)

    def _add_preview_layer(self, ndim: int) -> None:
        """The (hidden, empty) layer that will show the previews, added before the worker starts.

        Adding a layer is the most expensive thing napari does for us (~50-100 ms of GUI time);
        done here it does not compete with the worker, and the first preview only fills it in.
        """
        self.preview_layer = self._add_image_quietly(
            np.zeros((1,) * ndim, np.float32), name=f"{self._inputs['name']} preview",
            scale=self._inputs["scale"], colormap="magenta", blending="additive", visible=False,
        )  # fmt: skip

    def _add_image_quietly(self, data, **kwargs) -> Image:
        """Add an Image layer and give the selection back to the layer the user had selected."""
        selected = self.viewer.layers.selection.active
        layer = self.viewer.add_image(data, **kwargs)
        if selected is not None and selected in self.viewer.layers:
            self.viewer.layers.selection.active = selected
        return layer

    def _reuse_warped_for_preview(self, ndim: int) -> bool:
        """Show this run's previews in the previous run's warped layer (it is updated in place at the
        end anyway); what it showed is kept and put back if the run is cancelled or fails."""
        layer = self.results.layer_with_role("warped", "image")
        if layer is None or layer.rgb or layer.ndim != ndim or getattr(layer, "multiscale", False):
            return False
        if layer in (self.fixed.layer(), self.moving.layer()):  # an input of this run: leave it alone
            return False
        self._reused = {
            "layer": layer,
            "data": layer.data,
            "scale": np.array(layer.scale),
            "translate": np.array(layer.translate),
            "contrast_limits": tuple(layer.contrast_limits),
        }
        self.preview_layer = layer
        return True

    def _restore_reused(self) -> None:
        """Give the previous run's warped layer back what it showed before this run's previews."""
        saved, self._reused = self._reused, None
        layer = saved["layer"]
        if self.preview_layer is layer:
            self.preview_layer = None
        if layer in self.viewer.layers:
            layer.data = saved["data"]
            layer.scale, layer.translate = saved["scale"], saved["translate"]
            layer.contrast_limits = saved["contrast_limits"]

    def _show_preview(self, event) -> None:
        """Show the engine's current warped image, on its own (possibly coarser) grid.

        One layer for the whole run, updated in place; the worker has made the array contiguous
        float32 and found its contrast limits.
        """
        spacing = np.asarray(self._inputs["scale"], float)
        zoom = np.asarray(event.extra.get("preview_zoom", (1.0,) * len(spacing)), float)
        scale = spacing * zoom
        translate = spacing * (zoom - 1) / 2
        data = np.asarray(event.preview)
        limits = event.extra.get("contrast_limits")
        layer = self.preview_layer
        if layer is None or layer not in self.viewer.layers or layer.data.ndim != data.ndim:
            self._remove_preview()
            self._add_preview_layer(data.ndim)
            layer = self.preview_layer
        layer.data = data
        if not (np.allclose(layer.scale, scale) and np.allclose(layer.translate, translate)):
            layer.scale, layer.translate = scale, translate
        if limits is not None:
            layer.contrast_limits = limits
        if not layer.visible:
            layer.visible = True

    def _remove_preview(self) -> None:
        if self._reused is not None:
            self._restore_reused()
            return
        if self.preview_layer is not None and self.preview_layer in self.viewer.layers:
            remove_layer(self.viewer, self.preview_layer)
        self.preview_layer = None

    def _on_finished(self, result) -> None:
        """The run's result (in ADDING_RESULTS; the state machine drops a result that came after Cancel)."""
        reg, layers, notes, prebuilt = result
        self.last = reg
        self._last_run = {
            "settings": dict(self._settings),
            **{k: self._inputs.get(k) for k in ("world_affine", "moving_scale", "moving_world_affine")},
        }
        preview, self.preview_layer = self.preview_layer, None
        reused, self._reused = self._reused is not None, None  # the warped layer takes the result
        for note in notes:
            show_info(note)
        self.status.setText("Adding result layers…")

        def shown(_layers):
            self.status.setText(_summary(reg.metrics))
            self._gc_pause.end()
            self.state.results_in()  # IDLE once the worker thread has ended too

        prefix = f"{self._inputs['name']} "
        roles = [
            kw["name"][len(prefix) :] if kw["name"].startswith(prefix) else kw["name"] for _, kw, _ in layers
        ]
        # the live preview becomes the warped image unless the previous run's warped layer takes it
        adopt = {"warped": preview} if preview is not None and preview in self.viewer.layers else None
        if reused:
            adopt = None  # the preview is the previous run's warped layer, updated in place as such
        self.results.show_gradually(layers, shown, roles=roles, adopt=adopt, prebuilt=prebuilt)

    def _on_failed(self, message: str) -> None:
        self._remove_preview()
        show_error(message)
        self.status.setText(f"Failed: {message}")

    def _on_cancelled(self) -> None:
        layer = self.preview_layer
        shown = layer is not None and layer in self.viewer.layers and layer.visible
        if self._reused is not None:  # the previews were in the previous run's warped layer
            partial = (layer.data, np.array(layer.scale), np.array(layer.translate))
            got_preview = shown and partial[0] is not self._reused["data"]
            self._restore_reused()
            if self.keep_partial.isChecked() and got_preview:
                self._add_image_quietly(
                    partial[0], name=f"{self._inputs['name']} preview (partial, cancelled)",
                    scale=partial[1], translate=partial[2], colormap="magenta", blending="additive",
                )  # fmt: skip
                self.status.setText("Cancelled; the partial preview is kept as its own layer.")
            else:
                self.status.setText("Cancelled; no layers were changed.")
            return
        if self.keep_partial.isChecked() and shown:
            layer.name = f"{self._inputs['name']} preview (partial, cancelled)"
            self.preview_layer = None
            self.status.setText("Cancelled; the partial preview is kept as its own layer.")
        else:
            self._remove_preview()
            self.status.setText("Cancelled; no layers were changed.")

    def _run_over(self) -> None:
        """The run is over (IDLE): its layers are in, or it failed or was cancelled."""
        self._close_progress_bar()
        self.run_done.emit()

    # -- saving and applying -------------------------------------------------------------
    def save_transform(self, folder: str | Path | None = None, *, wait: bool = True) -> Path | None:
        """Save the last transform and the run's settings JSON into ``folder``.

        The files are written in a worker thread (the button's call, ``wait=False``, returns at once)
        while Run, Apply and Save are disabled; :attr:`save_done` gives the folder (None after an
        error). With ``wait`` (scripts, tests) the call runs the event loop until then and returns it.
        A save is not cancelled half way; each file is written atomically.
        """
        if self.last is None:
            show_error("Run a registration first.")
            return None
        if self._busy():
            return None
        if folder is None:
            folder = QFileDialog.getSaveFileName(self, "Save transform folder")[0]
            if not folder:
                return None
        folder = Path(folder)
        run = self._last_run
        t = self.last.transform
        t.settings = {**self.last.settings, **run["settings"]}
        if run["world_affine"] is not None and t.ndim == 3:
            t.world_affine = np.asarray(run["world_affine"], float)
        if run.get("moving_scale") is not None:  # the moving layer's own frame
            t.moving_spacing = run["moving_scale"]
            if run.get("moving_world_affine") is not None and t.ndim == 3:
                t.moving_world_affine = np.asarray(run["moving_world_affine"], float)
        self._saving = {"folder": None, "status": self.status.text()}
        self.state.start(self.saver)
        self.status.setText(f"Saving the transform to {folder}…")
        job = {
            "transform": t,
            "folder": folder,
            "run": {"settings": run["settings"], "metrics": self.last.metrics},
        }
        self._run_job(self.saver, save_with_run, self.save_done, wait, **job)
        return self._saving["folder"]

    def _on_saved(self, folder: Path) -> None:
        self._saving["folder"] = folder
        show_info(f"Transform saved to {folder}")
        self.state.results_in()

    def _on_save_failed(self, message: str) -> None:
        show_error(message)

    def _save_over(self) -> None:
        self.status.setText(self._saving["status"])
        self.save_done.emit(self._saving["folder"])

    def apply_transform(self, folder: str | Path | None = None, layer=None, *, wait: bool = True):
        """Warp ``layer`` (default: the selected layer) with a saved transform; adds a new layer.

        The warp runs in a worker thread (the button's call, ``wait=False``, returns at once) while
        Run and Apply are disabled and Cancel drops the result; :attr:`apply_done` gives the new
        layer (None after an error or Cancel), which is added on napari's thread. With ``wait``
        (scripts, tests) the call runs the event loop until then and returns that layer.
        """
        if self._busy():
            return None
        if folder is None:
            folder = QFileDialog.getExistingDirectory(self, "Saved transform folder")
            if not folder:
                return None
        layer = layer if layer is not None else self.viewer.layers.selection.active
        if layer is None:
            show_error("Select the layer to transform first.")
            return None
        job = layer_job(layer)
        if job is None:
            show_error(f"Cannot apply a transform to a {type(layer).__name__} layer.")
            return None
        self._applied_layer = None
        self.state.start(self.applier)
        self.status.setText(f"Applying the transform to {layer.name}…")
        self._apply_bar = napari_progress(total=0, desc=f"Applying a transform to {layer.name}")
        self._run_job(self.applier, apply_saved_transform, self.apply_done, wait, folder=folder, **job)
        return self._applied_layer if wait else None

    def _on_applied(self, layer) -> None:
        """The worker's layer (hidden): insert it now and show it in the next turn (two costs).

        Called in ADDING_RESULTS (the state machine drops a layer that came after Cancel).
        """
        self.status.setText("Adding the transformed layer…")
        try:
            self._applied_layer = self.viewer.add_layer(layer)
        except Exception as exc:  # noqa: BLE001  a Qt slot: anything napari raises must not leave Apply stuck
            self._on_apply_failed(f"Could not add the transformed layer: {type(exc).__name__}: {exc}")
            self.state.results_in()  # nothing to add: IDLE once the worker thread has ended
            return

        def show():
            if layer in self.viewer.layers:
                layer.visible = True
            self.status.setText(f"Added {layer.name}.")
            self.state.results_in()

        self.steps.later(show)

    def _on_apply_progress(self, event) -> None:
        """A chunk of the apply's warp is written: the bar shows ``step`` of ``total`` chunks (at most
        every :data:`APPLY_BAR_INTERVAL` seconds, and its first and last)."""
        bar = self._apply_bar
        if bar is None or not self.state.is_(RunState.RUNNING):
            return  # a late event after Cancel
        now = time.monotonic()
        if 0 < event.step < event.total and now - self._apply_bar_drawn < APPLY_BAR_INTERVAL:
            return
        self._apply_bar_drawn = now
        _show_step(bar, event)

    def _on_apply_failed(self, message: str) -> None:
        show_error(message)
        self.status.setText(f"Failed: {message}")

    def _on_apply_cancelled(self) -> None:
        self.status.setText("Cancelled; no layers were changed.")

    def _close_progress_bar(self) -> None:
        if self._progress_bar is not None:
            self._progress_bar.close()
            self._progress_bar = None

    def _close_apply_bar(self) -> None:
        if self._apply_bar is not None:
            self._apply_bar.close()
            self._apply_bar = None

    def _apply_over(self) -> None:
        """The apply is over (IDLE): its layer is in, or it failed or was cancelled."""
        self._close_apply_bar()
        self.apply_done.emit(self._applied_layer)


def register_with_overlays(
    progress,
    cancel,
    fixed,
    moving,
    spacing,
    moving_labels=None,
    fixed_points=None,
    moving_points=None,
    name_prefix="",
    gui_idle: threading.Event | None = None,
    **options,
):
    """Worker-thread job: read the inputs (a lazy layer's data is computed here), register, then build
    every result layer.

    Returns ``(reg, layers, notes, prebuilt)``: the Registration, the result LayerData tuples, notes
    for the user and the same layers as napari layer objects.

    Everything heavy for the GUI is done here, off the GUI thread: previews are made contiguous
    float32 with their contrast limits, image layers get contrast limits (napari would scan the
    data on the GUI thread) and the napari layer objects are made (a Shapes layer triangulates
    its paths), so the GUI thread only has to insert them.
    """
    _import_lazy_dependencies()  # usually done already (the widget starts it when it opens)
    fixed, moving = np.asarray(fixed), np.asarray(moving)  # a lazy (dask) layer is read here
    moving_labels = None if moving_labels is None else np.asarray(moving_labels)

    def report(event):
        if event.preview is None:
            progress(event)
            return
        event.preview = np.ascontiguousarray(event.preview, dtype=np.float32)
        event.extra.setdefault("contrast_limits", _contrast_limits(event.preview))
        if gui_idle is None:
            progress(event)
            return
        # while the GUI draws the preview the worker waits instead of competing for the GIL (the
        # GUI releases and retakes it at every OpenGL call); at most PREVIEW_WAIT seconds
        gui_idle.clear()
        progress(event)
        if not is_cancelled(cancel):
            gui_idle.wait(PREVIEW_WAIT)

    reg = register(fixed, moving, spacing=spacing, progress=report, cancel=cancel, **options)
    notes = []
    if (fixed_points is None) != (moving_points is None) or (
        fixed_points is not None and len(fixed_points) != len(moving_points)
    ):
        fixed_points = moving_points = None
        notes.append("Landmarks need the same number of fixed and moving points; TRE skipped.")
    spatial = reg.warped.shape[: len(spacing)]
    gray_fixed = fixed if fixed.ndim == len(spacing) else None
    try:
        layers = overlays.registration_layers(
            reg,
            spatial,
            moving_labels=moving_labels,
            fixed_points=fixed_points,
            moving_points=moving_points,
            scale=spacing,
            name_prefix=name_prefix,
            fixed=gray_fixed,
            include_warped=True,
            grid_style="vectors",  # one shader program and no per-path triangulation in napari
        )
    except RegistrationError as exc:
        notes.append(f"Some result layers could not be made: {exc}")
        layers = [
            (reg.warped, {"name": f"{name_prefix}warped", "scale": spacing, "colormap": "gray"}, "image")
        ]
    for data, kwargs, kind in layers:
        if kind == "image" and np.ndim(data) == len(spacing) and "contrast_limits" not in kwargs:
            kwargs["contrast_limits"] = _contrast_limits(data)
        tre = kwargs.get("metadata", {}).get("tre")
        if tre:
            reg.metrics.update({k: v for k, v in tre.items() if k != "tre_per_point"})
    # the napari layer objects too (hidden; shapes triangulate their paths here): the GUI thread
    # only inserts them (they are used for new layers; a rerun updates its layers in place)
    prebuilt = [Layer.create(data, {**kwargs, "visible": False}, kind) for data, kwargs, kind in layers]
    return reg, layers, notes, prebuilt


def save_with_run(progress, cancel, transform, folder: Path, run: dict) -> Path:
    """Worker-thread job: write ``transform`` into ``folder``, then ``run`` (settings, metrics) as run.json.

    Runs to its end (each file is written atomically); every failure is a :class:`RegistrationError`
    whose message the user sees.
    """
    del progress, cancel
    try:
        transform.save(folder)
        atomic_write_bytes(folder / "run.json", json.dumps(run, indent=2, default=str).encode())
    except (RegistrationError, OSError) as exc:
        raise RegistrationError(f"Could not save the transform: {exc}") from exc
    except Exception as exc:
        raise RegistrationError(f"Could not save the transform: {type(exc).__name__}: {exc}") from exc
    return folder


class FullCollectionPause:
    """Keeps Python's full garbage collections short while a run and its result layers are on.

    With torch and napari loaded a full collection walks ~500 000 objects: 150-270 ms holding
    the GIL, so the GUI freezes whichever thread it runs on, and a long NePhi run allocates enough
    to trigger one every minute or so. :meth:`begin` freezes the objects that exist when the run
    starts (``gc.freeze``: collections skip them) and :meth:`end` puts them back, so collections
    during the run only look at what the run made. Garbage among the frozen objects is collected
    after the run, and the first full collection after it (whenever Python decides to run one)
    still takes its usual time. Nothing is frozen if something else in the process already froze
    objects (``gc.unfreeze`` would undo its freeze too).
    """

    def __init__(self):
        self.active = False

    def begin(self) -> None:
        if not self.active and gc.get_freeze_count() == 0:
            gc.freeze()
            self.active = True

    def end(self) -> None:
        if self.active:
            self.active = False
            gc.unfreeze()


def _contrast_limits(data) -> tuple[float, float]:
    """Finite min and max of ``data`` (napari's default contrast limits), never an empty range."""
    data = np.asarray(data)
    finite = data[np.isfinite(data)] if np.issubdtype(data.dtype, np.floating) else data
    if finite.size == 0:
        return (0.0, 1.0)
    lo, hi = float(finite.min()), float(finite.max())
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


#: Modules napari imports on the GUI thread the first time it makes a Labels layer (~0.3 s).
_LAZY_MODULES = ("pandas", "skimage.color")

_importer: threading.Thread | None = None


def _import_lazy_dependencies() -> None:
    for name in _LAZY_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # pragma: no cover  a napari without them does not need them
            pass


def _import_in_background() -> threading.Thread:
    """Import :data:`_LAZY_MODULES` in a thread (once per process); the GUI keeps the GIL most of the time."""
    global _importer
    if _importer is None:
        _importer = threading.Thread(
            target=_import_lazy_dependencies, name="napari-nephi imports", daemon=True
        )
        _importer.start()
    return _importer


def points_in_voxels(points_layer, image_layer):
    """Points of a Points layer as voxel coordinates of an image layer (through world space)."""
    if points_layer is None or len(points_layer.data) == 0:
        return None
    nd = image_layer.ndim  # napari's ndim leaves out the RGB axis
    world = np.asarray(points_layer.data, float)[:, -nd:] * np.asarray(points_layer.scale)[-nd:]
    world = world + np.asarray(points_layer.translate)[-nd:]
    scale = np.asarray(image_layer.scale)[-nd:]
    return (world - np.asarray(image_layer.translate)[-nd:]) / scale


def _summary(metrics: dict) -> str:
    parts = []
    if "ncc_before" in metrics:
        parts.append(f"NCC {metrics['ncc_before']:.3f} → {metrics['ncc_after']:.3f}")
    if "fold_percent" in metrics:
        parts.append(f"folds {metrics['fold_percent']:.3f}%")
    if "tre_mean" in metrics:
        parts.append(f"TRE mean {metrics['tre_mean']:.2f}, max {metrics['tre_max']:.2f}")
    if "seconds" in metrics:
        parts.append(f"{metrics['seconds']:.1f} s")
    return "Done: " + ", ".join(parts)


class NephiWidget(RegisterWidget):
    """The same widget opened on the NePhi engine (neural deformation fields)."""

    default_method = "nephi"
