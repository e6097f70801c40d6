"""Screenshots for the docs, taken from a real napari window (run under Xvfb).

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_screenshots.py

Writes docs/images/nephi_before.png, nephi_during.png (live preview and loss curve) and
nephi_after.png (warped image with the deformation grid and the Jacobian map), and copies the
last to docs/images/register_widget.png for the README.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

from napari_nephi import sample_data
from napari_nephi.widgets import NephiWidget

OUT = Path(__file__).parent / "images"


def pump(seconds: float = 0.3) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.01)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    viewer = napari.Viewer(title="napari-nephi")
    viewer.window._qt_window.resize(1400, 900)
    for data, kwargs, kind in sample_data.tc_sample():
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    for name in ("fixed labels (T&C)", "moving labels (T&C)"):
        viewer.layers[name].visible = False
    widget = NephiWidget(viewer)
    viewer.window.add_dock_widget(widget, name="NePhi registration", area="right")
    widget.moving_labels.set_layer(viewer.layers["moving labels (T&C)"])
    viewer.reset_view()
    pump(1.0)
    viewer.screenshot(str(OUT / "nephi_before.png"), canvas_only=False)

    done = []
    widget.run_done.connect(lambda: done.append(True))
    widget.start()
    while widget.preview_layer is None or len(widget.loss_plot.values) < 250:
        if done:
            break
        pump(0.05)
    viewer.layers["moving (T&C)"].visible = False
    pump(0.3)
    viewer.screenshot(str(OUT / "nephi_during.png"), canvas_only=False)
    viewer.layers["moving (T&C)"].visible = True
    while not done:
        pump(0.05)
    pump(1.0)
    for layer in viewer.layers:
        layer.visible = layer.name in {
            "fixed (T&C)",
            "moving (T&C) warped",
            "moving (T&C) deformation grid",
            "moving (T&C) folds",
        }
    viewer.screenshot(str(OUT / "nephi_after.png"), canvas_only=False)
    jac = viewer.layers["moving (T&C) Jacobian determinant"]
    for layer in viewer.layers:
        layer.visible = layer is jac or layer.name == "moving (T&C) deformation grid"
    viewer.layers.selection.active = jac
    pump(0.5)
    viewer.screenshot(str(OUT / "nephi_jacobian.png"), canvas_only=False)
    shutil.copy(OUT / "nephi_after.png", OUT / "register_widget.png")
    viewer.close()


if __name__ == "__main__":
    main()
