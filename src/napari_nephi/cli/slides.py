"""``napari-nephi register-slides FIXED MOVING -o OUT``: register two whole slides of different stains.

FIXED and MOVING are SVS, pyramidal or flat TIFF / OME-TIFF files (and, with
``pip install "napari-nephi[openslide]"``, .mrxs, .ndpi, .scn, .vms, .vmu, .bif, .svslide). They
are read lazily, level by level, never whole at full resolution. Writes into OUT:

* ``transform/``: fixed level-0 pixels -> moving level-0 pixels (``napari_nephi.load_transform``);
* ``warped.ome.tif``: the moving slide on the fixed slide's grid, a tiled pyramidal OME-TIFF with the
  fixed slide's pixel size, written tile by tile (``--no-warped`` skips it);
* ``annotations.geojson`` (or ``.csv``) with ``--annotations``: the moving slide's annotations
  placed on the fixed slide (QuPath GeoJSON, or CSV points);
* ``metrics.json`` (similarity before/after, folds, seconds per stage, memory, TRE with
  ``--landmarks``) and ``settings.json`` (everything needed to run it again).

OUT is written atomically: the results appear only when the run has finished. An OUT from an
earlier napari-nephi run is replaced as a whole; any other existing folder or file is refused.
Examples::

    napari-nephi register-slides he.svs cd8.svs -o he_cd8
    napari-nephi register-slides he.svs cd8.ndpi -o out --annotations cd8_tumour.geojson
    napari-nephi register-slides a.tif b.tif -o out --spacing 0.5 --moving-spacing 0.25 --no-flip
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import numpy as np

from ..core.errors import InputError, UnsupportedFileError
from ..core.files import check_output_folder, output_folder
from ..core.progress import Progress
from ._common import HelpFormatter, ProgressBars, add_quiet

#: Annotation file suffixes: GeoJSON (QuPath) and CSV points.
GEOJSON_SUFFIXES, CSV_SUFFIXES = (".geojson", ".json"), (".csv",)
#: A mask file is read at the first pyramid level whose longer side is at most this (pixels).
MASK_SIDE = 4096
#: Metrics printed in the summary (when the run reports them).
SUMMARY_KEYS = (
    "channel", "rigid_angle", "rigid_flipped", "rigid_score", "ncc_before", "ncc_after", "nmi_before",
    "nmi_after", "tre_median_um", "tre_p90_um", "seconds", "peak_rss_mb",
)  # fmt: skip


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``register-slides`` subcommand (with its own ``func``) to an argparse subparsers object."""
    from ..engines.histology.engine import STAGES, histology

    default = {k: v.default for k, v in inspect.signature(histology).parameters.items()}
    p = subparsers.add_parser(
        "register-slides",
        formatter_class=HelpFormatter,
        help="register two whole slides of different stains (histology) and carry annotations",
        description=__doc__.split("\n", 1)[1].strip(),
    )
    p.add_argument("fixed", help="fixed slide (SVS, TIFF, OME-TIFF; OpenSlide formats with the extra)")
    p.add_argument("moving", help="moving slide, placed onto the fixed slide")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument(
        "--spacing", type=float, nargs="+", metavar="UM",
        help="fixed slide's level-0 pixel size in um/px (one value, or y x); overrides the file's",
    )  # fmt: skip
    p.add_argument(
        "--moving-spacing", type=float, nargs="+", metavar="UM",
        help="moving slide's level-0 pixel size in um/px (one value, or y x); overrides the file's",
    )  # fmt: skip
    p.add_argument(
        "--annotations", metavar="FILE",
        help="annotations drawn on the moving slide: QuPath GeoJSON (.geojson, .json) or CSV points (.csv)",
    )  # fmt: skip
    p.add_argument(
        "--landmarks", nargs=2, metavar=("FIXED_CSV", "MOVING_CSV"),
        help="corresponding points of the two slides (CSV) for the TRE in metrics.json",
    )  # fmt: skip
    p.add_argument(
        "--csv-um", action="store_true",
        help="CSV annotations and landmarks are in um of their slide (default: level-0 pixels); the "
        "carried CSV is then written in um of the fixed slide",
    )  # fmt: skip
    p.add_argument(
        "--channel", default=default["channel"],
        help="stain channel compared: auto, hematoxylin, od or grey; a number picks that channel of "
        "multi-channel (fluorescence) slides, e.g. 0 for DAPI",
    )  # fmt: skip
    p.add_argument(
        "--fixed-mask", metavar="FILE",
        help="tissue mask of the fixed slide (an image of any size with the slide's aspect; non-zero: "
        "tissue); default: found automatically",
    )  # fmt: skip
    p.add_argument("--moving-mask", metavar="FILE", help="tissue mask of the moving slide (as --fixed-mask)")
    p.add_argument("--no-flip", action="store_true", help="do not consider a mirrored moving slide")
    p.add_argument(
        "--stages", nargs="+", choices=STAGES, default=list(default["stages"]), help="stages to run"
    )
    p.add_argument(
        "--rigid-um", type=float, metavar="UM", help="pixel size of the rigid search (default: automatic)"
    )
    p.add_argument(
        "--working-um", type=float, metavar="UM", help="pixel size of the networks (default: automatic)"
    )
    p.add_argument(
        "--refine-um",
        type=float,
        metavar="UM",
        help="pixel size of the refinement (default: automatic; 0: off)",
    )
    p.add_argument(
        "--affine-iterations",
        type=int,
        metavar="N",
        default=default["affine_iterations"],
        help="local-affine network passes",
    )
    p.add_argument(
        "--nonrigid-iterations",
        type=int,
        metavar="N",
        default=default["nonrigid_iterations"],
        help="non-rigid network passes",
    )
    p.add_argument(
        "--magnifications",
        type=int,
        choices=[1, 2],
        default=default["magnifications"],
        help="magnifications per patch (1: single, the paper's SASN)",
    )
    p.add_argument(
        "--weights", nargs="+", metavar="PATH",
        help="trained network files or a folder of them (default: the shipped ones); see train-histology",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=int, default=default["seed"], help="random seed")
    p.add_argument("--no-warped", action="store_true", help="do not write warped.ome.tif")
    p.add_argument("--tile", type=int, default=512, help="tile side of warped.ome.tif (multiple of 16)")
    p.add_argument(
        "--compression", default="zlib", choices=["zlib", "zstd", "lzw", "jpeg", "none"],
        help="compression of warped.ome.tif",
    )  # fmt: skip
    add_quiet(p)
    p.set_defaults(func=cmd_register_slides)
    return p


def _spacing(values: list[float] | None, flag: str) -> tuple[float, float] | None:
    if values is None:
        return None
    if len(values) > 2:
        raise InputError(f"{flag} takes one pixel size, or two (y x), in um/px; got {len(values)} values.")
    from ..core.grid import check_spacing

    sp = values * 2 if len(values) == 1 else values
    try:
        return tuple(float(v) for v in check_spacing(sp, 2))
    except InputError as exc:
        raise InputError(f"{flag}: {exc}") from exc


def _slide_spacing(slide, given, path: str, flag: str) -> tuple[float, float]:
    """The given pixel size, else the file's; neither -> InputError asking for ``flag``."""
    if given is not None:
        return given
    if slide.spacing is None:
        raise InputError(
            f"{path} does not say its pixel size; give it with {flag} UM (um/px of level 0, e.g. 0.25 at "
            "40x, 0.5 at 20x)."
        )
    return tuple(float(v) for v in slide.spacing)


def _check_channels(slide, path: str, channel) -> None:
    """A multi-channel (fluorescence) slide needs ``--channel N``: say so in the command's words."""
    first = slide.levels[0]
    if not slide.rgb and first.ndim == 3 and isinstance(channel, str):
        raise InputError(
            f"{path} has {first.shape[2]} channels (fluorescence?), not a brightfield RGB image; pick the "
            "channel to register with --channel N, e.g. the nuclear stain (DAPI): --channel 0."
        )


def read_mask(path: str, slide, flag: str) -> np.ndarray:
    """A tissue mask file as bool (non-zero: tissue) at most MASK_SIDE px; its aspect must be the slide's."""
    from ..io.slides import open_slide

    levels = open_slide(path).levels
    level = next((lv for lv in levels if max(lv.shape[:2]) <= MASK_SIDE), levels[-1])
    mask = np.asarray(level.compute() if hasattr(level, "compute") else level[:])
    mask = mask.max(axis=-1) if mask.ndim == 3 else mask
    (h, w), (sh, sw) = mask.shape[:2], slide.shape[:2]
    if abs(h / w - sh / sw) > 0.02 * sh / sw + 1.0 / min(h, w):
        raise InputError(
            f"{flag} {path} is {levels[0].shape[0]} x {levels[0].shape[1]} px, not the shape of the slide "
            f"({sh} x {sw} px) at any scale; give a mask of the whole slide."
        )
    return mask > 0


def _channel(text: str):
    return int(text) if text.strip().lstrip("-").isdigit() else text.strip().lower()


def _annotation_kind(path: str | None) -> str | None:
    """ "geojson" or "csv" by the file's suffix (checked before any work), None without a file."""
    if path is None:
        return None
    suffix = Path(path).suffix.lower()
    if suffix in GEOJSON_SUFFIXES:
        return "geojson"
    if suffix in CSV_SUFFIXES:
        return "csv"
    raise UnsupportedFileError(
        f"--annotations {path}: '{suffix or 'no suffix'}' is not an annotation format; give QuPath GeoJSON "
        "(.geojson, .json) or CSV points (.csv)."
    )


def _engine_options(args: argparse.Namespace) -> dict:
    options = {
        "channel": _channel(args.channel),
        "allow_flip": not args.no_flip,
        "stages": tuple(args.stages),
        "affine_iterations": args.affine_iterations,
        "nonrigid_iterations": args.nonrigid_iterations,
        "magnifications": args.magnifications,
        "seed": args.seed,
    }
    for key in ("rigid_um", "working_um", "refine_um", "weights"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    return options


def carry_all(annotations: list, transform) -> tuple[list, list[int]]:
    """Annotations carried moving -> fixed; those that cannot be carried are left out (their indices)."""
    from ..io.annotations import carry

    try:
        return carry(annotations, transform), []
    except InputError:  # some vertices fold: carry the others one annotation at a time
        pass
    kept, lost = [], []
    for i, a in enumerate(annotations):
        try:
            kept += carry([a], transform)
        except InputError:
            lost.append(i)
    return kept, lost


def carry_csv_points(points: np.ndarray, transform) -> tuple[np.ndarray, list[int]]:
    """CSV points carried moving -> fixed; those that cannot be carried are left out (their rows)."""
    from ..io.annotations import carry_points

    try:
        return carry_points(points, transform), []
    except InputError:
        pass
    kept, lost = [], []
    for i, p in enumerate(points):
        try:
            kept.append(carry_points(p[None], transform)[0])
        except InputError:
            lost.append(i)
    return np.array(kept, float).reshape(-1, 2), lost


def _read_inputs(args: argparse.Namespace):
    """The two slides, their pixel sizes, the annotations and the landmarks (all checked before work)."""
    from ..io.annotations import read_geojson, read_landmarks_csv
    from ..io.slides import open_slide

    kind = _annotation_kind(args.annotations)
    fixed_sp = _spacing(args.spacing, "--spacing")
    moving_sp = _spacing(args.moving_spacing, "--moving-spacing")
    fixed, moving = open_slide(args.fixed), open_slide(args.moving)
    for slide, path in ((fixed, args.fixed), (moving, args.moving)):
        _check_channels(slide, path, _channel(args.channel))
    fixed_sp = _slide_spacing(fixed, fixed_sp, args.fixed, "--spacing")
    moving_sp = _slide_spacing(moving, moving_sp, args.moving, "--moving-spacing")
    masks = [
        None if path is None else read_mask(path, slide, flag)
        for path, slide, flag in (
            (args.fixed_mask, fixed, "--fixed-mask"),
            (args.moving_mask, moving, "--moving-mask"),
        )
    ]
    annotations = None
    if kind == "geojson":
        annotations = read_geojson(args.annotations)
    elif kind == "csv":
        annotations = read_landmarks_csv(args.annotations, spacing=moving_sp if args.csv_um else None)
    landmarks = None
    if args.landmarks:
        landmarks = tuple(
            read_landmarks_csv(path, spacing=sp if args.csv_um else None)
            for path, sp in zip(args.landmarks, (fixed_sp, moving_sp), strict=True)
        )
    return fixed, moving, fixed_sp, moving_sp, masks, (kind, annotations), landmarks


def cmd_register_slides(args: argparse.Namespace) -> int:
    """Run ``napari-nephi register-slides``."""
    from ..engines.registry import register
    from ..io.annotations import write_geojson, write_landmarks_csv
    from ..io.pyramid_writer import check_tile, write_ome_pyramid

    out = check_output_folder(args.output)
    tile = check_tile(args.tile, "--tile")  # before the registration, not when the pyramid is written
    options = _engine_options(args)
    fixed, moving, fixed_sp, moving_sp, masks, (kind, annotations), landmarks = _read_inputs(args)
    if landmarks is not None:
        options["landmarks"] = landmarks
    bars = ProgressBars(quiet=args.quiet)
    try:
        reg = register(
            fixed, moving, method="histology", spacing=fixed_sp, moving_spacing=moving_sp,
            device=args.device, progress=bars, fixed_mask=masks[0], moving_mask=masks[1], **options,
        )  # fmt: skip
    finally:
        bars.close()
    metrics = dict(reg.metrics)
    lost: list[int] = []
    if kind == "geojson":
        carried, lost = carry_all(annotations, reg.transform)
    elif kind == "csv":
        carried, lost = carry_csv_points(annotations, reg.transform)
    if kind is not None:
        metrics["annotations_carried"] = len(carried)
        metrics["annotations_not_carried"] = lost
    settings = {
        "fixed": str(args.fixed),
        "moving": str(args.moving),
        "annotations": args.annotations,
        "fixed_mask": args.fixed_mask,
        "moving_mask": args.moving_mask,
        "landmarks": args.landmarks,
        "csv_um": args.csv_um,
        "warped": not args.no_warped,
        "tile": tile,
        "compression": args.compression,
        **reg.settings,
        "spacing": list(fixed_sp),
        "moving_spacing": list(moving_sp),
    }
    with output_folder(out) as tmp:
        reg.transform.save(tmp / "transform")
        if not args.no_warped:
            write_ome_pyramid(
                tmp / "warped.ome.tif", reg.warped, spacing_um=fixed_sp, tile=tile,
                compression=args.compression, progress=Progress(bars),
            )  # fmt: skip
            bars.close()
        if kind == "geojson":
            write_geojson(tmp / "annotations.geojson", carried)
        elif kind == "csv":
            write_landmarks_csv(tmp / "annotations.csv", carried, spacing=fixed_sp if args.csv_um else None)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        (tmp / "settings.json").write_text(json.dumps(settings, indent=2, default=str))
    if lost:
        print(
            f"warning: {len(lost)} annotation(s) could not be carried (the transform folds there), left "
            f"out: {lost[:20]}{' ...' if len(lost) > 20 else ''}",
            file=sys.stderr,
        )
    if not args.quiet:
        summary = {k: metrics[k] for k in SUMMARY_KEYS if k in metrics}
        summary["notes"] = metrics.get("notes", [])
        print(json.dumps(summary, indent=2, default=str))
        print(f"Results written to {out}")
    return 0
