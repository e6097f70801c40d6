"""Dock widget "Register (affine and more)": pick layers, set options, run in the background."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch._dynamo  # noqa: F401  torch.optim imports it on first use: ~1 s holding the GIL
from napari.layers import Image, Labels, Points
from napari.utils import progress as napari_progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from .. import overlays
from ..core.errors import RegistrationError
from ..core.registration import atomic_write_bytes, register
from ..core.transform_io import load_transform
from ._options import RegistrationOptions
from ._pickers import LayerPicker
from ._plot import CurvePlot
from ._results import ResultLayers
from ._runner import RegistrationRunner

#: Do not push previews to the canvas more often than this (seconds).
PREVIEW_INTERVAL = 0.5


def layer_image(layer) -> np.ndarray:
    """The full-resolution data of an Image layer as numpy (level 0 of a multiscale)."""
    data = layer.data[0] if layer.multiscale else layer.data
    return np.asarray(data)


class RegisterWidget(QWidget):
    """Fixed/moving pickers, options, Run/Cancel, result layers and metrics."""

    #: Emitted when a run is over and its result layers (if any) are all in the viewer.
    run_done = Signal()

    #: The method selected when the widget opens.
    default_method = "affine"

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.fixed = LayerPicker(napari_viewer, (Image,))
        self.moving = LayerPicker(napari_viewer, (Image,))
        self.moving_labels = LayerPicker(napari_viewer, (Labels,), optional=True)
        self.fixed_points = LayerPicker(napari_viewer, (Points,), optional=True)
        self.moving_points = LayerPicker(napari_viewer, (Points,), optional=True)
        self.options = RegistrationOptions(self.default_method)
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.save_button = QPushButton("Save transform…")
        self.save_button.setEnabled(False)
        self.apply_button = QPushButton("Apply saved transform to layer…")
        self.keep_partial = QCheckBox("keep the partial preview when cancelled")
        self.loss_plot = CurvePlot("step", "loss at each step")
        self.status = QLabel("Pick a fixed and a moving image, then Run.")
        self.status.setWordWrap(True)
        self.runner = RegistrationRunner(self)
        self.results = ResultLayers(napari_viewer)
        self.last = None  # the last Registration
        self._progress_bar = None
        self._last_preview = 0.0
        self.preview_layer = None
        self._showing = False
        self._running = False
        self._last_run = {"settings": {}, "world_affine": None}
        self._layout()
        self.run_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.runner.cancel)
        self.save_button.clicked.connect(lambda: self.save_transform())
        self.apply_button.clicked.connect(lambda: self.apply_transform())
        self.runner.progressed.connect(self._on_progress)
        self.runner.finished.connect(self._on_finished)
        self.runner.failed.connect(self._on_failed)
        self.runner.cancelled.connect(self._on_cancelled)
        self.runner.stopped.connect(self._on_stopped)
        if len(napari_viewer.layers) >= 2 and self.moving._layers:
            images = self.moving._layers
            self.fixed.set_layer(images[0])
            self.moving.set_layer(images[1] if len(images) > 1 else images[0])

    def _layout(self):
        form = QFormLayout()
        form.addRow("fixed image", self.fixed)
        form.addRow("moving image", self.moving)
        form.addRow("moving labels", self.moving_labels)
        form.addRow("fixed landmarks", self.fixed_points)
        form.addRow("moving landmarks", self.moving_points)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        box = QVBoxLayout(self)
        box.addLayout(form)
        box.addWidget(self.options)
        box.addLayout(buttons)
        box.addWidget(self.keep_partial)
        box.addWidget(self.loss_plot)
        box.addWidget(self.status)
        box.addWidget(self.save_button)
        box.addWidget(self.apply_button)
        box.addStretch()

    # -- running -----------------------------------------------------------------------
    def start(self) -> None:
        """Validate the chosen layers and start the registration in a worker thread."""
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
            "labels": self.moving_labels.layer(),
            "fixed_points": self.fixed_points.layer(),
            "moving_points": self.moving_points.layer(),
        }
        self._settings = {"fixed": fixed.name, "moving": moving.name, **opts}
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText("Running…")
        self._running = True
        self.loss_plot.clear()
        self._remove_preview()
        self._progress_bar = napari_progress(total=0, desc=f"Registering {moving.name}")
        inp = self._inputs
        fpts = points_in_voxels(inp["fixed_points"], fixed)
        mpts = points_in_voxels(inp["moving_points"], moving)
        labels = inp["labels"].data if inp["labels"] is not None else None
        self.runner.run(
            register_with_overlays,
            fixed=layer_image(fixed),
            moving=layer_image(moving),
            spacing=spacing,
            rgb=bool(fixed.rgb),
            moving_labels=None if labels is None else np.asarray(labels),
            fixed_points=fpts,
            moving_points=mpts,
            name_prefix=f"{moving.name} ",
            **opts,
        )

    def _on_progress(self, event) -> None:
        if not self._running:
            return  # a late event after the run ended (cancelled or failed)
        if event.loss is not None:
            self.loss_plot.values.append(float(event.loss))
        now = time.monotonic()
        if now - self._last_preview < PREVIEW_INTERVAL and event.step < event.total:
            return  # throttled: the GUI is redrawn at most every PREVIEW_INTERVAL seconds
        self._last_preview = now
        self.loss_plot.update()
        loss = "" if event.loss is None else f", loss {event.loss:.4f}"
        self.status.setText(f"Running: step {event.step}/{event.total}{loss}")
        if event.preview is not None:
            self._show_preview(event)
        bar = self._progress_bar  # updating it may run the event loop: do it last
        if bar is not None and self._running:
            if bar.total != event.total:
                bar.total = event.total
            bar.n = event.step
            bar.set_description(f"{event.stage}{loss}")
            bar.refresh()

    def _show_preview(self, event) -> None:
        """Show the engine's current warped image, on its own (possibly coarser) grid."""
        spacing = np.asarray(self._inputs["scale"], float)
        zoom = np.asarray(event.extra.get("preview_zoom", (1.0,) * len(spacing)), float)
        scale = spacing * zoom
        translate = spacing * (zoom - 1) / 2
        data = np.asarray(event.preview)
        layer = self.preview_layer
        if layer is not None and layer in self.viewer.layers and layer.data.shape == data.shape:
            layer.data = data
            layer.scale, layer.translate = scale, translate
        else:
            self._remove_preview()
            self.preview_layer = self.viewer.add_image(
                data, name=f"{self._inputs['name']} preview", scale=scale, translate=translate,
                colormap="magenta", blending="additive",
            )  # fmt: skip

    def _remove_preview(self) -> None:
        if self.preview_layer is not None and self.preview_layer in self.viewer.layers:
            self.viewer.layers.remove(self.preview_layer)
        self.preview_layer = None

    def _on_finished(self, result) -> None:
        self._running = False
        reg, layers, notes = result
        self.last = reg
        self._last_run = {"settings": dict(self._settings), "world_affine": self._inputs.get("world_affine")}
        self._remove_preview()
        for note in notes:
            show_info(note)
        self.status.setText("Adding result layers…")
        self._showing = True

        def shown(_layers):
            self._showing = False
            self.status.setText(_summary(reg.metrics))
            self.save_button.setEnabled(True)
            self.run_button.setEnabled(True)
            self.run_done.emit()

        self.results.show_gradually(layers, shown)

    def _on_failed(self, message: str) -> None:
        self._running = False
        show_error(message)
        self.status.setText(f"Failed: {message}")

    def _on_cancelled(self) -> None:
        self._running = False
        layer = self.preview_layer
        if self.keep_partial.isChecked() and layer is not None and layer in self.viewer.layers:
            layer.name = f"{self._inputs['name']} preview (partial, cancelled)"
            self.preview_layer = None
            self.status.setText("Cancelled; the partial preview is kept as its own layer.")
        else:
            self._remove_preview()
            self.status.setText("Cancelled; no layers were changed.")

    def _on_stopped(self) -> None:
        if self._progress_bar is not None:
            self._progress_bar.close()
            self._progress_bar = None
        self.cancel_button.setEnabled(False)
        if not self._showing:
            self.run_button.setEnabled(True)
            self.run_done.emit()

    # -- saving and applying -------------------------------------------------------------
    def save_transform(self, folder: str | Path | None = None) -> Path | None:
        """Save the last transform and the run's settings JSON into ``folder``."""
        if self.last is None:
            show_error("Run a registration first.")
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
        try:
            t.save(folder)
            atomic_write_bytes(
                folder / "run.json",
                json.dumps(
                    {"settings": run["settings"], "metrics": self.last.metrics}, indent=2, default=str
                ).encode(),
            )
        except (RegistrationError, OSError) as exc:
            show_error(f"Could not save the transform: {exc}")
            return None
        show_info(f"Transform saved to {folder}")
        return folder

    def apply_transform(self, folder: str | Path | None = None, layer=None):
        """Warp ``layer`` (default: the selected layer) with a saved transform; adds a new layer."""
        if folder is None:
            folder = QFileDialog.getExistingDirectory(self, "Saved transform folder")
            if not folder:
                return None
        layer = layer if layer is not None else self.viewer.layers.selection.active
        if layer is None:
            show_error("Select the layer to transform first.")
            return None
        try:
            t = load_transform(folder)
            name = f"{layer.name} (transformed)"
            scale = t.spacing  # results lie on the transform's fixed grid
            if isinstance(layer, Labels):
                return self.viewer.add_labels(t.warp_labels(np.asarray(layer.data)), name=name, scale=scale)
            if isinstance(layer, Points):
                # moving world coordinates -> moving voxels (same spacing assumed) -> fixed voxels
                world = np.asarray(layer.data, float) * layer.scale + layer.translate
                fixed_voxels = t.inverse().map_points(world / np.asarray(scale))
                return self.viewer.add_points(fixed_voxels, name=name, scale=scale)
            if isinstance(layer, Image):
                data = layer_image(layer)
                return self.viewer.add_image(t.warp(data), name=name, scale=scale, rgb=layer.rgb)
            show_error(f"Cannot apply a transform to a {type(layer).__name__} layer.")
        except (RegistrationError, NotImplementedError) as exc:
            show_error(str(exc))
        return None


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
    **options,
):
    """Worker-thread job: register, then build every result layer; returns (reg, layers, notes)."""
    reg = register(fixed, moving, spacing=spacing, progress=progress, cancel=cancel, **options)
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
        )
    except RegistrationError as exc:
        notes.append(f"Some result layers could not be made: {exc}")
        layers = [(reg.warped, {"name": f"{name_prefix}warped", "scale": spacing}, "image")]
    for _, kwargs, _kind in layers:
        tre = kwargs.get("metadata", {}).get("tre")
        if tre:
            reg.metrics.update({k: v for k, v in tre.items() if k != "tre_per_point"})
    return reg, layers, notes


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
