"""Screenshots for the docs, taken from a real napari window (run under Xvfb, on PyQt6).

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_screenshots.py

Only napari's public API is used (``viewer.window.resize``, ``viewer.screenshot``, layers, dims,
camera). Writes to docs/images/:

* nephi_before.png, nephi_during.png (live preview and loss curve), nephi_after.png (warped image,
  deformation grid, folds) and nephi_jacobian.png (Jacobian determinant with its colour bar under
  the grid) of the NePhi widget on the Triangles-and-Circles sample; nephi_after.png is copied to
  register_widget.png for the README;
* mri_3d_before.png and mri_3d_after.png: the 3D MRI sample in napari's 3D view before and after a
  NePhi run in the widget: fixed volume in green, moving (before) or warped (after) volume in
  magenta, added (grey where they agree; maximum intensity projections with the contrast limits at
  1.6 times the 99.5th percentile so that they do not saturate); after: on the plane of the slice
  the 2D view was at, the deformation grid and the Jacobian determinant with its colour bar;
* atlas_widget.png: the Atlas lookup widget on the toy atlas sample (an index trained with small
  options, loaded in the widget) and a section cut from it at plate 20 (tilted 3 and 2 degrees,
  its top cut away): the plate gallery, the chosen plate beside the section, and the registered
  plate and atlas labels over the section;
* histology_widget.png: the Histology registration widget on scikit-image's IHC image (1024 px at
  0.5 um/px) against a re-stained (H-DAB), rotated (150 degrees) copy, both multiscale: the
  checkerboard of the fixed and the warped slide, the deformation grid and a polygon drawn on the
  moving slide carried onto the fixed one by "Transfer annotations".

``python docs/make_screenshots.py atlas`` takes only the atlas screenshot (``tc``, ``mri``,
``histology`` the others). Prints the name of the Qt binding; napari shows a deprecation banner on
PyQt5, so run it on PyQt6.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import napari
import numpy as np
import qtpy
from qtpy.QtWidgets import QApplication

from napari_nephi import sample_data
from napari_nephi.widgets import NephiWidget
from napari_nephi.widgets.atlas_widget import AtlasWidget

OUT = Path(__file__).parent / "images"
#: The camera of the 3D screenshots: looking at the MRI volume from the front, left and above.
ANGLES_3D = (10.0, -30.0, 60.0)
#: Steps of the NePhi run after which the "during" screenshot is taken (the fast preset has 200).
DURING_STEP = 80


def pump(seconds: float = 0.3) -> None:
    """Let Qt draw and deliver events for ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.01)


def show_only(viewer, names: set[str]) -> None:
    """Make the layers named in ``names`` visible and hide the others."""
    for layer in viewer.layers:
        layer.visible = layer.name in names


def new_window():
    """A napari window of a fixed size with the NePhi widget docked on the right."""
    viewer = napari.Viewer(title="napari-nephi")
    viewer.window.resize(1400, 900)
    widget = NephiWidget(viewer)
    viewer.window.add_dock_widget(widget, name="NePhi registration", area="right")
    pump(0.5)
    return viewer, widget


def shows_preview(widget) -> bool:
    """Whether the widget's live preview layer has received a preview and is shown."""
    layer = widget.preview_layer
    return layer is not None and layer in widget.viewer.layers and layer.visible


def run_widget(widget, min_steps: int = 0, during=None) -> None:
    """Start the widget's run and wait for its end; ``during()`` once ``min_steps`` losses are in."""
    done = []
    widget.run_done.connect(lambda: done.append(True))
    widget.start()
    if during is not None:
        while not done and not (shows_preview(widget) and len(widget.loss_plot.values) >= min_steps):
            pump(0.05)
        during()
    while not done:
        pump(0.05)
    pump(1.0)


def tc_screenshots(viewer, widget) -> None:
    """Before, during and after a NePhi run on the 2D Triangles-and-Circles sample."""
    for data, kwargs, kind in sample_data.tc_sample():
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    show_only(viewer, {"fixed (T&C)", "moving (T&C)"})
    widget.fixed.set_layer(viewer.layers["fixed (T&C)"])
    widget.moving.set_layer(viewer.layers["moving (T&C)"])
    widget.moving_labels.set_layer(viewer.layers["moving labels (T&C)"])
    pump(0.5)  # the canvas has its final size before the view is fitted to it
    viewer.reset_view()
    pump(1.0)
    viewer.screenshot(str(OUT / "nephi_before.png"), canvas_only=False)

    def during():
        viewer.layers["moving (T&C)"].visible = False
        pump(0.3)
        viewer.screenshot(str(OUT / "nephi_during.png"), canvas_only=False)
        viewer.layers["moving (T&C)"].visible = True

    run_widget(widget, DURING_STEP, during)
    grid = "moving (T&C) deformation grid"
    show_only(viewer, {"fixed (T&C)", "moving (T&C) warped", grid, "moving (T&C) folds"})
    pump(0.5)
    viewer.screenshot(str(OUT / "nephi_after.png"), canvas_only=False)
    jac = viewer.layers["moving (T&C) Jacobian determinant"]
    show_only(viewer, {jac.name, grid})
    viewer.layers.selection.active = jac
    pump(0.5)
    viewer.screenshot(str(OUT / "nephi_jacobian.png"), canvas_only=False)
    shutil.copy(OUT / "nephi_after.png", OUT / "register_widget.png")


def two_colour(fixed, moving, limit: float) -> None:
    """Fixed in green, moving in magenta, added: grey where they agree, coloured where they differ."""
    fixed.colormap, moving.colormap = "green", "magenta"
    moving.blending = "additive"
    for layer in (fixed, moving):
        layer.contrast_limits = (0.0, limit)


def mri_screenshots(viewer, widget) -> None:
    """The 3D MRI sample in napari's 3D view, before and after a NePhi run."""
    for data, kwargs, kind in sample_data.mri_sample():
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    fixed, moving = viewer.layers["fixed (MRI)"], viewer.layers["moving (MRI)"]
    limit = 1.6 * float(np.percentile(fixed.data, 99.5))
    two_colour(fixed, moving, limit)
    widget.fixed.set_layer(fixed)
    widget.moving.set_layer(moving)
    pump(0.5)
    viewer.reset_view()
    middle = fixed.data.shape[0] // 2
    viewer.dims.set_point(0, fixed.data_to_world((middle, 0, 0))[0])
    viewer.dims.ndisplay = 3
    viewer.scene.camera.angles = ANGLES_3D
    pump(1.0)
    viewer.screenshot(str(OUT / "mri_3d_before.png"), canvas_only=False)
    viewer.dims.ndisplay = 2  # the run itself from the 2D view, as a user would start it
    run_widget(widget)
    warped = viewer.layers["moving (MRI) warped"]
    two_colour(fixed, warped, limit)
    jac = viewer.layers["moving (MRI) Jacobian determinant"]
    show_only(viewer, {fixed.name, warped.name, "moving (MRI) deformation grid", jac.name})
    viewer.layers.selection.active = jac
    viewer.dims.ndisplay = 3
    viewer.scene.camera.angles = ANGLES_3D
    pump(1.0)
    viewer.screenshot(str(OUT / "mri_3d_after.png"), canvas_only=False)


#: Training options of the atlas screenshot's index: a small network, a few minutes on 2 cores.
ATLAS_TRAINING = {"input_size": 64, "widths": (8, 16, 32), "embedding_dim": 32, "steps": 400,
                  "batch_plates": 12, "views_per_plate": 2, "validate_every": 100}  # fmt: skip


#: The atlas screenshot's section: plate 20 of the sample atlas, cut obliquely, its top cut away.
ATLAS_SECTION_TILT, ATLAS_SECTION_CROP = (3.0, 2.0), (0.1, 0.0, 0.0, 0.0)


def whole_window_shot(viewer, selected, filename: str) -> None:
    """Select ``selected``, fit the view, save the whole window as ``filename`` and close it."""
    viewer.layers.selection.active = selected
    pump(0.5)
    viewer.reset_view()
    pump(1.0)
    viewer.screenshot(str(OUT / filename), canvas_only=False)
    viewer.close()


def run_job(widget, start) -> None:
    """Start one of the atlas widget's jobs and wait until it is over."""
    done = []
    widget.run_done.connect(lambda: done.append(True))
    assert start(), "the widget refused to start"
    while not done:
        pump(0.05)
    pump(0.5)


def atlas_screenshot() -> None:
    """The Atlas lookup widget after Find plates and Register on the toy atlas sample."""
    from napari_nephi import AtlasLookup
    from napari_nephi.synthetic.atlas import ATLAS_REGIONS, section_from_atlas

    viewer = napari.Viewer(title="napari-nephi")
    viewer.window.resize(1400, 900)
    for data, kwargs, kind in sample_data.atlas_sample():
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    atlas, labels = viewer.layers["toy atlas"], viewer.layers["toy atlas labels"]
    viewer.layers.remove("section (toy atlas)")  # a milder cut: the small index's lookup gets it
    cut = section_from_atlas(atlas.data, 20, ATLAS_SECTION_TILT, crop=ATLAS_SECTION_CROP)
    section = viewer.add_image(cut, name="section")
    lookup = AtlasLookup.train(atlas.data, labels.data, region_names=ATLAS_REGIONS, **ATLAS_TRAINING)
    widget = AtlasWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Atlas lookup", area="right")
    widget.source.layer.set_layer(atlas)
    widget.source.annotation.set_layer(labels)
    with tempfile.TemporaryDirectory() as folder:
        lookup.save(Path(folder) / "index")
        run_job(widget, lambda: widget.load_index(Path(folder) / "index"))
    widget.section.set_layer(section)
    run_job(widget, widget.find_plates)
    run_job(widget, widget.register)
    atlas.visible = labels.visible = False
    whole_window_shot(viewer, viewer.layers["section atlas labels"], "atlas_widget.png")


#: The histology screenshot's working and refinement levels (um/px): a few minutes on 2 cores.
HISTOLOGY_OPTIONS = {"working_um": 2.0, "refine_um": 1.0}


def histology_screenshot() -> None:
    """The Histology registration widget after a run and an annotation transfer."""
    import cv2
    from skimage import data

    from napari_nephi.synthetic.histology import slide_pair
    from napari_nephi.widgets.histology_widget import HistologyWidget

    def pyramid(image):
        levels = [image]
        while max(levels[-1].shape[:2]) > 256:
            a = levels[-1]
            levels.append(cv2.resize(a, (a.shape[1] // 2, a.shape[0] // 2), interpolation=cv2.INTER_AREA))
        return levels

    big = cv2.resize(data.immunohistochemistry(), (1024, 1024), interpolation=cv2.INTER_LINEAR)
    pair = slide_pair(big, seed=4, rotation=150.0, shift=(12, -9))
    viewer = napari.Viewer(title="napari-nephi")
    viewer.window.resize(1400, 900)
    um = (0.5, 0.5)
    viewer.add_image(pyramid(pair.fixed), multiscale=True, rgb=True, name="IHC", scale=um)
    moving = viewer.add_image(pyramid(pair.moving), multiscale=True, rgb=True, name="H-DAB", scale=um)
    widget = HistologyWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Histology registration", area="right")
    widget.options.working_um.setValue(HISTOLOGY_OPTIONS["working_um"])
    widget.options.refine_um.setValue(HISTOLOGY_OPTIONS["refine_um"])
    run_job(widget, widget.start)
    outline = np.array([[300.0, 400.0], [480.0, 640.0], [720.0, 560.0], [700.0, 360.0], [450.0, 280.0]])
    drawn = viewer.add_shapes(
        [pair.transform.map_points(outline)], shape_type="polygon", name="region", scale=moving.scale,
        edge_color="cyan", edge_width=6, face_color="transparent",
    )  # fmt: skip
    widget.annotations.set_layer(drawn)
    widget.transfer_annotations()
    show_only(viewer, {"H-DAB checkerboard", "H-DAB deformation grid", "region on the fixed slide"})
    whole_window_shot(viewer, viewer.layers["H-DAB checkerboard"], "histology_widget.png")


def main() -> None:
    print(f"Qt binding: {qtpy.API_NAME}")
    OUT.mkdir(exist_ok=True)
    chosen = set(sys.argv[1:]) or {"tc", "mri", "atlas", "histology"}
    for name, take in (("tc", tc_screenshots), ("mri", mri_screenshots)):
        if name in chosen:
            viewer, widget = new_window()
            take(viewer, widget)
            viewer.close()
    if "atlas" in chosen:
        atlas_screenshot()
    if "histology" in chosen:
        histology_screenshot()


if __name__ == "__main__":
    main()
