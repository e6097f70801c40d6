"""``register``, ``apply`` and ``methods``: pair registration from files and saved transforms."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.files import atomic_write_bytes, check_output_file, check_output_folder, output_folder
from ._common import (
    HelpFormatter,
    ProgressBars,
    add_key_values,
    add_quiet,
    parse_options,
    read_one,
    spatial_spacing,
    write_image,
)

#: Options with their own flag; ``--option KEY=VALUE`` gives any other engine option.
FLAG_OPTIONS = ("kind", "similarity", "iterations", "levels", "preset", "mode", "initial")


def engine_choice_help(method: str, option: str, values) -> str:
    """``"method: a, b or c (engine default: d)"``, the values and default read from the engine."""
    import inspect

    from ..engines.registry import engine_info

    default = inspect.signature(engine_info(method).func).parameters[option].default
    values = [str(v) for v in values]
    listed = ", ".join(values[:-1]) + f" or {values[-1]}" if len(values) > 1 else values[0]
    return f"{method}: {listed} (engine default: {default})"


def _option_help() -> dict[str, str]:
    """Help of the engine option flags, from the engines' own names and defaults."""
    from ..engines.affine.engine import SIMILARITIES as AFFINE_SIMILARITIES
    from ..engines.affine.model import KINDS
    from ..engines.nephi.engine import MODES, PRESETS
    from ..engines.nephi.initial import INITIALS
    from ..engines.nephi.optimize import SIMILARITIES as NEPHI_SIMILARITIES

    return {
        "kind": engine_choice_help("affine", "kind", KINDS),
        "similarity": "similarity measure; "
        + "; ".join(
            engine_choice_help(m, "similarity", v)
            for m, v in (("affine", AFFINE_SIMILARITIES), ("nephi", NEPHI_SIMILARITIES))
        ),
        "preset": engine_choice_help("nephi", "preset", PRESETS),
        "mode": engine_choice_help("nephi", "mode", MODES)
        + "; the predict modes use the built-in model of the images' dimensionality (2D: general2d) "
        "or --option weights=NAME|PATH",
        "initial": f"nephi: global stage before the deformable one, {', '.join(INITIALS[:-1])} or "
        f"{INITIALS[-1]} (engine default: rigid in optimize mode, none in the predict modes)",
    }


def add_parsers(sub) -> None:
    """Add ``register``, ``apply`` and ``methods`` to an argparse subparsers object."""
    r = sub.add_parser(
        "register",
        formatter_class=HelpFormatter,
        help="register MOVING onto FIXED and write the results into a folder",
        description=(
            "Register MOVING onto FIXED and write into the folder OUT: warped image, transform/, "
            "jacobian, folds, deformation_grid (.csv shapes and image), metrics.json, settings.json, "
            "and warped_labels with --moving-labels.\n\n"
            "OUT is written atomically: the results appear only when the run has finished. An OUT "
            "from an earlier napari-nephi run is replaced as a whole; any other existing folder or "
            "file is refused."
        ),
    )
    r.add_argument("fixed", help="fixed image file (TIFF, OME-TIFF or NIfTI), 2D or 3D")
    r.add_argument("moving", help="moving image file, resampled onto the fixed image's grid")
    r.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    r.add_argument("--method", default="affine", help="registration engine; see 'napari-nephi methods'")
    flag_help = _option_help()
    r.add_argument("--kind", help=flag_help["kind"])
    r.add_argument("--similarity", help=flag_help["similarity"])
    r.add_argument("--iterations", type=int, help="optimisation steps (per level for affine; engine default)")
    r.add_argument("--levels", type=int, help="resolution levels (engine default)")
    r.add_argument("--preset", help=flag_help["preset"])
    r.add_argument("--mode", help=flag_help["mode"])
    r.add_argument("--initial", help=flag_help["initial"])
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    r.add_argument("--moving-labels", metavar="LABELS", help="labels of the moving image to carry over")
    r.add_argument(
        "--fixed-mask",
        metavar="MASK",
        help="mask on the fixed grid (non-zero = inside): compare the images there",
    )
    r.add_argument("--moving-mask", metavar="MASK", help="mask on the moving grid (non-zero = inside)")
    r.add_argument(
        "--format", choices=(".tif", ".nii.gz"), default=".tif", help="format of the images written"
    )
    add_key_values(r, "--option", "any other engine option")
    add_quiet(r)
    r.set_defaults(func=cmd_register)

    a = sub.add_parser(
        "apply",
        formatter_class=HelpFormatter,
        help="apply a saved transform to an image or labels",
        description="Resample IMAGE onto the fixed grid of a saved transform and write it to OUTPUT "
        "(written atomically; an existing file is replaced).",
    )
    a.add_argument("transform", help="transform folder written by 'register' (OUT/transform)")
    a.add_argument("image", help="image or labels file in the moving image's space")
    a.add_argument("-o", "--output", required=True, help="file to write (.tif, .ome.tif, .nii or .nii.gz)")
    a.add_argument("--labels", action="store_true", help="nearest-neighbour, keeps label values")
    add_quiet(a)
    a.set_defaults(func=cmd_apply)

    m = sub.add_parser(
        "methods",
        formatter_class=HelpFormatter,
        help="list the registration methods with a one-line description",
        description="List the registration methods (the values of --method) with a one-line description.",
    )
    m.set_defaults(func=cmd_methods)


def _write_shapes_csv(path: Path, paths: list) -> None:
    """Path shapes as napari's shapes CSV (``index, shape-type, vertex-index, axis-0, ...``, voxels)."""
    d = paths[0].shape[1] if paths else 2
    lines = [",".join(["index", "shape-type", "vertex-index", *(f"axis-{i}" for i in range(d))])]
    for i, p in enumerate(paths):
        lines += [f"{i},path,{j}," + ",".join(f"{v:.4f}" for v in row) for j, row in enumerate(p)]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def engine_options_from_args(args: argparse.Namespace) -> dict:
    """``--option`` items and the option flags given, checked against the engine's option names."""
    from ..engines.registry import check_options, engine_info

    if engine_info(args.method).whole_slides:
        raise InputError(
            f"Method '{args.method}' registers whole slides and writes a pyramid: use "
            "'napari-nephi register-slides FIXED MOVING -o OUT' instead."
        )
    options = parse_options(args.option)
    for key in FLAG_OPTIONS:
        value = getattr(args, key, None)
        if value is not None:
            options[key] = value
    check_options(args.method, options)  # a typo fails now, before any file is read
    return options


def cmd_register(args: argparse.Namespace) -> int:
    """Run ``napari-nephi register``."""
    from .. import overlays
    from ..engines.registry import engine_info, register

    out = check_output_folder(args.output)
    options = engine_options_from_args(args)
    fixed, fmeta = read_one(args.fixed)
    moving, mmeta = read_one(args.moving)
    labels = read_one(args.moving_labels)[0] if args.moving_labels else None
    masks = {
        key: read_one(path)[0] != 0
        for key, path in (("fixed_mask", args.fixed_mask), ("moving_mask", args.moving_mask))
        if path
    }
    spacing = spatial_spacing(fixed, fmeta)
    moving_spacing = spatial_spacing(moving, mmeta)
    takes = engine_info(args.method).options or ()
    if "moving_spacing" in takes and moving_spacing != spacing and len(moving_spacing) == len(spacing):
        options.setdefault("moving_spacing", moving_spacing)
    bars = ProgressBars(quiet=args.quiet)
    try:
        reg = register(
            fixed,
            moving,
            method=args.method,
            spacing=spacing,
            device=args.device,
            progress=bars,
            rgb=True if fmeta.get("rgb") else None,
            **masks,
            **options,
        )
    finally:
        bars.close()
    world = (fmeta.get("metadata") or {}).get("nifti_affine")
    if world is not None and len(spacing) == 3:
        reg.transform.world_affine = np.asarray(world, float)  # keeps the NIfTI orientation on save
    # the moving image's own frame, whatever the engine did with it (see docs/transforms.md)
    if len(moving_spacing) == len(spacing):
        reg.transform.moving_spacing = moving_spacing
        mworld = (mmeta.get("metadata") or {}).get("nifti_affine")
        if mworld is not None and len(spacing) == 3:
            reg.transform.moving_world_affine = np.asarray(mworld, float)
    ext = args.format
    shape = reg.warped.shape[: len(spacing)]
    settings = {"fixed": str(args.fixed), "moving": str(args.moving), **reg.settings}
    settings.update({key: str(getattr(args, key)) for key in masks})
    with output_folder(out) as tmp:
        write_image(tmp / f"warped{ext}", reg.warped, spacing)
        reg.transform.save(tmp / "transform")
        u = reg.transform.displacement(shape)  # shared by the Jacobian and the grid
        det_layer = overlays.jacobian_layer(reg.transform, shape, spacing, displacement=u)
        write_image(tmp / f"jacobian{ext}", det_layer[0], spacing)
        folds = overlays.folds_layer(det_layer[0])
        write_image(tmp / f"folds{ext}", folds[0], spacing, labels=True)
        grid = overlays.deformation_grid(reg.transform, shape, displacement=u)
        _write_shapes_csv(tmp / "deformation_grid.csv", grid[0])
        spacing_px = grid[1]["metadata"]["spacing_px"]
        m_shape = moving.shape[: moving.ndim - (1 if mmeta.get("rgb") else 0)]
        grid_image = overlays.grid_image(reg.transform, m_shape, spacing_px, output_shape=shape)
        write_image(tmp / f"deformation_grid{ext}", grid_image, spacing)
        if labels is not None:
            warped_labels = reg.transform.warp_labels(labels, output_shape=shape)
            write_image(tmp / f"warped_labels{ext}", warped_labels, spacing, labels=True)
        (tmp / "metrics.json").write_text(json.dumps(reg.metrics, indent=2, default=str))
        (tmp / "settings.json").write_text(json.dumps(settings, indent=2, default=str))
    if not args.quiet:
        summary = {k: v for k, v in reg.metrics.items() if not isinstance(v, list)}
        print(json.dumps(summary, indent=2, default=str))
        print(f"Results written to {out}")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    """Run ``napari-nephi apply``."""
    from ..core.transform_io import load_transform

    output = check_output_file(args.output)
    t = load_transform(args.transform)
    image, imeta = read_one(args.image)
    frame = {}
    if t.has_moving_frame:  # the image may have another spacing than the registered moving image
        frame["image_spacing"] = tuple(imeta.get("scale") or (1.0,) * t.ndim)[-t.ndim :]
        iworld = (imeta.get("metadata") or {}).get("nifti_affine")
        if iworld is not None and t.moving_world_affine is not None:
            frame["image_world_affine"] = np.asarray(iworld, float)
    warp = t.warp_labels if args.labels else t.warp
    write_image(output, warp(image, output_shape=t.shape, **frame), t.spacing, labels=args.labels)
    if not args.quiet:
        print(f"Wrote {output}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """Run ``napari-nephi methods``: one line per method, name and description."""
    from ..engines.registry import method_descriptions

    methods = method_descriptions()
    width = max(map(len, methods))
    for name, description in methods.items():
        print(f"{name:<{width}}  {description}".rstrip())
    return 0
