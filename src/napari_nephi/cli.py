"""The ``napari-nephi`` command line: ``demo``, ``register``, ``apply``, ``align-em``, ``methods``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .core.errors import Cancelled, InputError, RegistrationError

SAMPLES = ("tc", "ihc", "mri", "em", "atlas")


class TextProgress:
    """A one-line progress bar on stderr, redrawn at most 10 times a second."""

    def __init__(self, stream=None, quiet: bool = False):
        self._stream, self.quiet, self._last = stream, quiet, 0.0

    @property
    def stream(self):
        """The given stream, else the current ``sys.stderr`` (looked up on each write)."""
        return self._stream if self._stream is not None else sys.stderr

    def __call__(self, ev) -> None:
        now = time.monotonic()
        if self.quiet or (now - self._last < 0.1 and ev.step < ev.total):
            return
        self._last = now
        width = 30
        filled = int(width * ev.fraction)
        loss = "" if ev.loss is None else f" loss {ev.loss:.4f}"
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {ev.step}/{ev.total} {ev.stage}{loss}  "
        )
        if ev.step >= ev.total:
            self.stream.write("\n")
        self.stream.flush()


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_options(pairs: list[str] | None) -> dict:
    """``--option KEY=VALUE`` items as engine keyword arguments (values parsed as JSON when they can be)."""
    out = {}
    for item in pairs or []:
        if "=" not in item:
            raise InputError(f"--option takes KEY=VALUE, got {item!r}.")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = _parse_value(value)
    return out


def _read_one(path: str):
    from .io import read_image

    data, meta, _ = read_image(path)[0]
    if meta.get("multiscale"):
        data = data[0]
    return np.asarray(data), meta


def _write_image(path: Path, data, spacing, labels: bool = False) -> None:
    from .io import write_image, write_labels

    (write_labels if labels else write_image)(str(path), data, {"scale": list(spacing)})


def _write_shapes_csv(path: Path, paths: list) -> None:
    """Path shapes as napari's shapes CSV (``index, shape-type, vertex-index, axis-0, ...``, voxels)."""
    from .core.registration import atomic_write_bytes

    d = paths[0].shape[1] if paths else 2
    lines = [",".join(["index", "shape-type", "vertex-index", *(f"axis-{i}" for i in range(d))])]
    for i, p in enumerate(paths):
        lines += [f"{i},path,{j}," + ",".join(f"{v:.4f}" for v in row) for j, row in enumerate(p)]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def _grid_image(reg, moving, mmeta, spacing_px: float) -> np.ndarray:
    """The deformation grid as an image on the fixed grid: a grid painted on the moving image, warped.

    Planes (lines in 2D) every ``spacing_px`` moving voxels along each axis, value 1, pulled back
    with the transform (linear, so lines are about one voxel wide): the same lines as the
    ``deformation_grid.csv`` shapes.
    """
    m_shape = moving.shape[: moving.ndim - (1 if mmeta.get("rgb") else 0)]
    step = max(1, int(round(spacing_px)))
    painted = np.zeros(m_shape, np.float32)
    for axis, n in enumerate(m_shape):
        index = [slice(None)] * len(m_shape)
        index[axis] = slice(0, n, step)
        painted[tuple(index)] = 1.0
    return np.asarray(reg.transform.warp(painted, output_shape=reg.warped.shape[: len(m_shape)]), np.float32)


def cmd_register(args) -> int:
    from . import overlays
    from .core.registration import register

    fixed, fmeta = _read_one(args.fixed)
    moving, mmeta = _read_one(args.moving)
    spatial = fixed.ndim - (1 if fmeta.get("rgb") else 0)
    spacing = tuple(fmeta.get("scale") or (1.0,) * spatial)[-spatial:]
    options = parse_options(args.option)
    m_spatial = moving.ndim - (1 if mmeta.get("rgb") else 0)
    moving_spacing = tuple(mmeta.get("scale") or (1.0,) * m_spatial)[-m_spatial:]
    if args.method == "affine" and moving_spacing != spacing and len(moving_spacing) == len(spacing):
        options.setdefault("moving_spacing", moving_spacing)
    for key in ("kind", "iterations", "levels", "similarity", "mode", "preset"):
        value = getattr(args, key, None)
        if value is not None:
            options[key] = value
    reg = register(
        fixed,
        moving,
        method=args.method,
        spacing=spacing,
        device=args.device,
        progress=TextProgress(quiet=args.quiet),
        rgb=True if fmeta.get("rgb") else None,
        **options,
    )
    world = (fmeta.get("metadata") or {}).get("nifti_affine")
    if world is not None and len(spacing) == 3:
        reg.transform.world_affine = np.asarray(world, float)  # keeps the NIfTI orientation on save
    # the moving image's own frame, whatever the engine did with it (see docs/transforms.md)
    if len(moving_spacing) == len(spacing):
        reg.transform.moving_spacing = moving_spacing
        mworld = (mmeta.get("metadata") or {}).get("nifti_affine")
        if mworld is not None and len(spacing) == 3:
            reg.transform.moving_world_affine = np.asarray(mworld, float)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    ext = args.format
    _write_image(out / f"warped{ext}", reg.warped, spacing)
    reg.transform.save(out / "transform")
    shape = reg.warped.shape[: len(spacing)]
    u = reg.transform.displacement(shape)  # shared by the Jacobian and the grid
    det_layer = overlays.jacobian_layer(reg.transform, shape, spacing, displacement=u)
    _write_image(out / f"jacobian{ext}", det_layer[0], spacing)
    folds = overlays.folds_layer(det_layer[0])
    _write_image(out / f"folds{ext}", folds[0], spacing, labels=True)
    grid = overlays.deformation_grid(reg.transform, shape, displacement=u)
    _write_shapes_csv(out / "deformation_grid.csv", grid[0])
    spacing_px = grid[1]["metadata"]["spacing_px"]
    _write_image(out / f"deformation_grid{ext}", _grid_image(reg, moving, mmeta, spacing_px), spacing)
    metrics = dict(reg.metrics)
    if args.moving_labels:
        labels, _ = _read_one(args.moving_labels)
        warped_labels = reg.transform.warp_labels(labels, output_shape=reg.warped.shape[: len(spacing)])
        _write_image(out / f"warped_labels{ext}", warped_labels, spacing, labels=True)
    settings = {
        "fixed": str(args.fixed),
        "moving": str(args.moving),
        **reg.settings,
    }
    from .core.registration import atomic_write_bytes

    atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=2, default=str).encode())
    atomic_write_bytes(out / "settings.json", json.dumps(settings, indent=2, default=str).encode())
    if not args.quiet:
        print(
            json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}, indent=2, default=str)
        )
        print(f"Results written to {out}")
    return 0


def cmd_apply(args) -> int:
    from .core.transform_io import load_transform

    t = load_transform(args.transform)
    image, imeta = _read_one(args.image)
    shape = t.shape
    frame = {}
    if t.has_moving_frame:  # the image may have another spacing than the registered moving image
        frame["image_spacing"] = tuple(imeta.get("scale") or (1.0,) * t.ndim)[-t.ndim :]
        iworld = (imeta.get("metadata") or {}).get("nifti_affine")
        if iworld is not None and t.moving_world_affine is not None:
            frame["image_world_affine"] = np.asarray(iworld, float)
    if args.labels:
        out = t.warp_labels(image, output_shape=shape, **frame)
    else:
        out = t.warp(image, output_shape=shape, **frame)
    _write_image(Path(args.output), out, t.spacing, labels=args.labels)  # on the fixed grid
    if not args.quiet:
        print(f"Wrote {args.output}")
    return 0


def cmd_methods(args) -> int:
    from .core.registration import available_methods

    print("\n".join(available_methods()))
    return 0


def cmd_demo(args) -> int:
    import napari

    from . import sample_data
    from .widgets import NephiWidget, RegisterWidget

    viewer = napari.Viewer(title="napari-nephi demo")
    for data, kwargs, kind in getattr(sample_data, f"{args.sample}_sample")():
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = NephiWidget(viewer) if args.method == "nephi" else RegisterWidget(viewer)
    widget.options.method.setCurrentText(args.method)
    name = "NePhi registration" if args.method == "nephi" else "Register images"
    viewer.window.add_dock_widget(widget, name=name, area="right")
    finished = []
    widget.run_done.connect(lambda: finished.append(True))
    if args.run:
        widget.start()
    if args.screenshot:
        from qtpy.QtWidgets import QApplication

        viewer.window._qt_window.resize(1400, 900)
        if args.run:
            while not finished:
                QApplication.processEvents()
                time.sleep(0.05)
        for _ in range(20):
            QApplication.processEvents()
            time.sleep(0.02)
        viewer.reset_view()
        QApplication.processEvents()
        viewer.screenshot(args.screenshot, canvas_only=False)
        viewer.close()
        return 0
    napari.run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="napari-nephi", description="Image registration for napari.")
    from . import __version__

    p.add_argument("--version", action="version", version=__version__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="open napari with a sample pair and the registration widget")
    d.add_argument("--sample", choices=SAMPLES, default="tc")
    d.add_argument("--method", default="nephi", help="engine selected in the widget (nephi, affine)")
    d.add_argument("--run", action="store_true", help="start the registration right away")
    d.add_argument("--screenshot", help="save a window screenshot to this PNG and exit")
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("register", help="register MOVING onto FIXED and write the results")
    r.add_argument("fixed")
    r.add_argument("moving")
    r.add_argument("-o", "--output", required=True, help="output folder")
    r.add_argument("--method", default="affine")
    r.add_argument("--kind", help="affine engine: translation, rigid, similarity or affine")
    r.add_argument("--similarity")
    r.add_argument("--iterations", type=int)
    r.add_argument("--levels", type=int)
    r.add_argument("--device", default="auto")
    r.add_argument("--moving-labels", help="labels of the moving image to carry over")
    r.add_argument("--format", choices=(".tif", ".nii.gz"), default=".tif")
    r.add_argument("--option", action="append", metavar="KEY=VALUE", help="any engine option")
    r.add_argument("-q", "--quiet", action="store_true")
    r.set_defaults(func=cmd_register)

    a = sub.add_parser("apply", help="apply a saved transform to an image or labels")
    a.add_argument("transform")
    a.add_argument("image")
    a.add_argument("-o", "--output", required=True)
    a.add_argument("--labels", action="store_true", help="nearest-neighbour, keeps label values")
    a.add_argument("-q", "--quiet", action="store_true")
    a.set_defaults(func=cmd_apply)

    m = sub.add_parser("methods", help="list the registration methods")
    m.set_defaults(func=cmd_methods)

    from .engines.mito.cli import add_parser as add_align_em
    from .engines.nephi.cli import add_parser as add_train

    add_align_em(sub)
    add_train(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Cancelled:
        print("Cancelled.", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return 130
    except RegistrationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
