"""``napari-nephi demo``: napari with a sample and the widget that fits it, optionally run and screenshot.

* ``tc``, ``ihc``, ``mri`` (image pairs): the registration widget, fixed and moving image of the pair,
  method ``nephi`` unless ``--method`` says otherwise; in 2D it predicts the field in one pass with
  the shipped general model (mode ``predict``: about a second on a CPU; choose ``predict+refine``
  or ``optimize`` in the widget to refine it), in 3D, where no model ships, it optimises (fast
  preset);
* ``em`` (a stack of sections with mitochondria): the EM stack alignment widget, stack and masks;
* ``atlas`` (a 3D atlas and an oblique, partial section cut from it): the atlas plate the section
  was cut near is added as a 2D image, and the registration widget aligns the section (moving)
  onto that plate (fixed) with the ``affine`` method unless ``--method`` says otherwise.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from ..core.errors import InputError, RegistrationError
from ._common import HelpFormatter

SAMPLES = ("tc", "ihc", "mri", "em", "atlas")
#: The plate the atlas sample's section is cut through (``sample_data.atlas_sample``: index 20).
ATLAS_PLATE = 20
#: Seconds a ``--run --screenshot`` may take before the demo gives up.
RUN_TIMEOUT = 600.0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to an argparse subparsers object."""
    d = subparsers.add_parser(
        "demo",
        formatter_class=HelpFormatter,
        help="open napari with a sample and the widget that fits it",
        description=__doc__.split("\n", 1)[1].strip(),
    )
    d.add_argument("--sample", choices=SAMPLES, default="tc", help="sample data to open")
    d.add_argument(
        "--method",
        help="engine selected in the registration widget (default: nephi for image pairs, affine for "
        "atlas; the em sample uses the EM stack alignment widget and takes no method)",
    )
    d.add_argument("--run", action="store_true", help="start the registration (or alignment) right away")
    d.add_argument(
        "--screenshot",
        metavar="PNG",
        help="save a screenshot of the window to this PNG (after the run with --run) and exit",
    )
    d.set_defaults(func=cmd_demo)
    return d


@dataclass
class DemoSetup:
    """What the demo docked: the widget, its dock title and the layers it was given."""

    widget: object
    title: str
    inputs: dict


def setup_demo(viewer, sample: str, method: str | None = None) -> DemoSetup:
    """Add ``sample`` to ``viewer`` and dock the widget that fits it, its inputs chosen."""
    from napari.layers import Image, Labels

    from .. import sample_data

    if sample not in SAMPLES:
        raise InputError(f"Unknown sample {sample!r}; choose one of {', '.join(SAMPLES)}.")
    layers = [
        getattr(viewer, f"add_{kind}")(data, **kwargs)
        for data, kwargs, kind in getattr(sample_data, f"{sample}_sample")()
    ]
    images = [layer for layer in layers if isinstance(layer, Image)]
    labels = [layer for layer in layers if isinstance(layer, Labels)]
    if sample == "em":
        if method is not None:
            raise InputError(
                "The em sample opens the EM stack alignment widget, which takes no --method; leave it out."
            )
        return _setup_em(viewer, images[0], labels[0] if labels else None)
    if sample == "atlas":
        reference, section = images[0], images[-1]
        plate = viewer.add_image(
            reference.data[ATLAS_PLATE],
            name=f"atlas plate {ATLAS_PLATE}",
            scale=tuple(reference.scale[1:]),
            colormap="gray",
        )
        section.colormap = "magenta"
        section.blending = "additive"
        reference.visible = False
        for layer in labels:
            layer.visible = False
        return _setup_pair(viewer, plate, section, method or "affine")
    return _setup_pair(viewer, images[0], images[1], method or "nephi")


def _setup_pair(viewer, fixed, moving, method: str) -> DemoSetup:
    from ..engines.registry import available_methods
    from ..widgets import NephiWidget, RegisterWidget

    if method not in available_methods():
        raise InputError(f"Unknown method {method!r}; available: {', '.join(available_methods())}.")
    widget = NephiWidget(viewer) if method == "nephi" else RegisterWidget(viewer)
    widget.options.method.setCurrentText(method)
    if method == "nephi":
        _use_shipped_model(widget.options, fixed.data.ndim)
    widget.fixed.set_layer(fixed)
    widget.moving.set_layer(moving)
    title = "NePhi registration" if method == "nephi" else "Register images"
    viewer.window.add_dock_widget(widget, name=title, area="right")
    return DemoSetup(widget, title, {"fixed": fixed, "moving": moving, "method": method})


def _use_shipped_model(options, ndim: int) -> None:
    """Predict with the built-in model for ``ndim``-D images, when one is installed."""
    from ..engines.nephi.weights import default_model

    name = default_model(ndim)
    if name is not None:
        options.mode.setCurrentText("predict")
        options.model_path.setText(name)


def _setup_em(viewer, stack, masks) -> DemoSetup:
    from ..widgets import EMAlignWidget

    widget = EMAlignWidget(viewer)
    widget.stack.set_layer(stack)
    if masks is not None:
        widget.masks.set_layer(masks)
    title = "EM stack alignment"
    viewer.window.add_dock_widget(widget, name=title, area="right")
    return DemoSetup(widget, title, {"stack": stack, "masks": masks})


def _process_events(seconds: float) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.02)


def run_and_wait(setup: DemoSetup, timeout: float = RUN_TIMEOUT) -> None:
    """Start the docked widget's run; process Qt events until its results are in; raise if it failed."""
    from qtpy.QtWidgets import QApplication

    from ..widgets._state import RunState

    widget = setup.widget
    idle, failed = [], []
    widget.runner.failed.connect(failed.append)
    widget.state.changed.connect(lambda _old, new: idle.append(True) if new is RunState.IDLE else None)
    widget.start()
    if widget.state.is_(RunState.IDLE) and not idle:
        raise RegistrationError("The demo run did not start; the widget refused its inputs.")
    end = time.monotonic() + timeout
    while not idle:
        if time.monotonic() > end:
            raise RegistrationError(f"The demo run did not finish within {timeout:.0f} s.")
        QApplication.processEvents()
        time.sleep(0.02)
    if failed:
        raise RegistrationError(f"The demo run failed: {failed[0]}")


def known_error(setup: DemoSetup) -> tuple[float, float] | None:
    """Mean endpoint error (voxels) before and after the widget's last run, for samples whose moving
    layer carries its ``true_displacement`` (``tc`` does not); None without one or without a run."""
    import numpy as np

    moving = setup.inputs.get("moving")
    truth = None if moving is None else moving.metadata.get("true_displacement")
    reg = getattr(setup.widget, "last", None)
    if truth is None or reg is None:
        return None
    truth = np.asarray(truth, np.float64)
    u = reg.transform.displacement(truth.shape[1:])
    before = float(np.sqrt((truth**2).sum(0)).mean())
    return before, float(np.sqrt(((u - truth) ** 2).sum(0)).mean())


def cmd_demo(args: argparse.Namespace) -> int:
    """Run ``napari-nephi demo``; the caller gets torch's thread count back (numba's pool, below)."""
    import torch

    # napari colours a labels layer with numba, whose OpenMP pool starts (once per process) with
    # omp_set_num_threads(cores) on the libgomp torch shares: torch's count on this thread follows
    # (the registration runs in a worker thread, which keeps torch's own count)
    threads = torch.get_num_threads()
    try:
        return _demo(args)
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _demo(args: argparse.Namespace) -> int:
    import napari

    viewer = napari.Viewer(title="napari-nephi demo")
    if args.screenshot:
        try:
            setup = setup_demo(viewer, args.sample, args.method)
            viewer.window.resize(1400, 900)
            if args.run:
                start = time.perf_counter()
                run_and_wait(setup)
                print(f"The {args.sample} demo ran in {time.perf_counter() - start:.1f} s")
                error = known_error(setup)
                if error is not None:
                    print(
                        f"Mean endpoint error against the sample's known deformation: {error[0]:.2f} px "
                        f"unregistered, {error[1]:.2f} px registered"
                    )
            _process_events(0.5)  # result layers and their controls arrive a turn or two later
            viewer.reset_view()
            _process_events(0.1)
            viewer.screenshot(args.screenshot, canvas_only=False)
        finally:
            viewer.close()
        print(f"Wrote {args.screenshot}")
        return 0
    try:
        setup = setup_demo(viewer, args.sample, args.method)
    except BaseException:
        viewer.close()
        raise
    if args.run:
        setup.widget.start()
    napari.run()
    return 0
