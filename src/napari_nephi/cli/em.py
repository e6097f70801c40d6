"""``napari-nephi align-em STACK -o OUT [--masks MASKS] [options]``: MITO stack alignment.

Writes into ``OUT`` (atomically: everything appears at the end; an ``OUT`` of an earlier
napari-nephi run is replaced as a whole, any other existing folder or file is refused):

* ``aligned.tif``: the aligned stack (input dtype), written one section at a time;
* ``aligned_masks.tif``: the masks carried along (the given ones, or with ``--detector mito``
  and no ``--masks`` the automatically detected mitochondria, labelled per section);
  ``--no-masks-out`` skips it;
* ``transform/``: the per-section transform (``napari_nephi.load_transform``, ``napari-nephi apply``);
  where the elastic step ran (``--elastic``, or ``--elastic-auto``, the default, on sections read
  distorted) an elastic per-section transform (matrices and smooth fields);
* ``matrices.npy`` and ``matrices.json``: ``(n, 3, 3)`` ``(y, x)`` maps from aligned to original
  section coordinates (with the elastic step, the part before the fields);
* ``report.csv`` (one row per section) and ``report.json`` (rows, summary metrics, settings).

Progress goes to stderr: one bar for the alignment (a step per section), one for writing
the aligned stack and masks (a step per section written).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import numpy as np

from ..core.files import check_output_folder, output_folder
from ..core.options import check_known
from ..core.progress import Progress
from ..engines.mito import features as ft
from ..engines.mito.detrend import (
    DEFAULT_DRIFT_CORRECTION,
    DEFAULT_REFERENCE,
    DRIFT_CORRECTIONS,
    MIN_SECTIONS,
    MIN_WINDOW,
    SERIAL_SECTIONS,
)
from ..engines.mito.distortion import DEFAULT_ELASTIC
from ..engines.mito.elastic import ELASTIC_SOLVER, ELASTIC_SOLVERS
from ..engines.mito.organelles import DEFAULT_READING, READINGS
from ..engines.mito.solve import DRIFT_PRIOR, GLOBAL_MODEL, GLOBAL_MODELS, NEIGHBOURS
from ._common import HelpFormatter, ProgressBars, add_key_values, add_quiet, parse_options

#: ``--elastic``'s words for the engine's values.
_ELASTIC_WORDS = {True: "on", False: "off", "auto": "auto"}

#: align_stack parameters the command sets itself (not through --option).
_FIXED_BY_COMMAND = ("stack", "masks", "progress", "cancel", "lazy", "spacing", "warp")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``align-em`` subcommand (with its own ``func``) to an argparse subparsers object."""
    p = subparsers.add_parser(
        "align-em",
        formatter_class=HelpFormatter,
        help="align a stack of EM sections with mitochondria keypoints (MITO)",
        description=(
            "Align every section of an EM stack to a reference section with keypoints (by default "
            "FAST corners inside mitochondria, BRISK descriptors, RANSAC). Writes the aligned stack, "
            "aligned masks, the per-section matrices and a per-section report into the folder OUT.\n\n"
            "OUT is written atomically: the results appear only when the run has finished. An OUT "
            "from an earlier napari-nephi run is replaced as a whole; any other existing folder or "
            "file is refused."
        ),
    )
    p.add_argument("stack", help="multi-page TIFF, folder of section TIFFs, or NIfTI (n, y, x)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument("--masks", help="mitochondria masks of the same shape (labels or binary)")
    p.add_argument("--detector", default="mito", choices=ft.DETECTORS, help="keypoint detector")
    p.add_argument("--descriptor", default="brisk", choices=ft.DESCRIPTORS, help="keypoint descriptor")
    p.add_argument("--matcher", default="bf", choices=ft.MATCHERS, help="brute force or FLANN matching")
    p.add_argument("--model", default="homography", choices=ft.MODELS, help="map fitted per section pair")
    p.add_argument(
        "--no-model-selection",
        action="store_true",
        help="always fit --model (otherwise a simpler model is preferred when it explains the matches "
        "as well)",
    )
    p.add_argument(
        "--no-refine",
        action="store_true",
        help="skip the sub-pixel refinement of each pair map (Lucas-Kanade tracking of the keypoints)",
    )
    p.add_argument(
        "--no-guided-pairs",
        action="store_true",
        help="global solve: match every further pair in full instead of starting from the chain's map",
    )
    p.add_argument(
        "--reference",
        default=None,
        help=(
            "reference section index, 'middle', or 'auto' (the default: section 0, or the middle section "
            "where the drift correction detrends; middle with --serial-sections); with a drift correction it "
            "moves by its own drift level"
        ),
    )
    p.add_argument(
        "--serial-sections",
        action="store_true",
        help="serial-section TEM whose organelles may drift: --reference middle --drift-correction auto "
        "unless given (auto is the default since session 22; it keeps a stage drift that the rest of the "
        "image shows)",
    )
    p.add_argument("--ransac-threshold", type=float, default=3.0, help="RANSAC inlier distance, pixels")
    p.add_argument("--ratio", type=float, default=0.8, help="Lowe ratio test")
    p.add_argument("--workers", type=int, default=None, help="threads (default: one per CPU core)")
    p.add_argument("--max-keypoints", type=int, default=1000, help="keypoints per section at most")
    p.add_argument("--scale", type=float, default=None, help="work resolution (default: automatic)")
    p.add_argument("--use-masks", action="store_true", help="restrict other detectors to the masks too")
    p.add_argument(
        "--fallback",
        default="sift,identity",
        help="detectors tried when a pair fails, comma-separated",
    )
    p.add_argument(
        "--neighbours",
        type=int,
        default=None,
        help=f"sections each section is matched to (default {NEIGHBOURS}, 1 with --solver chain: "
        "multi-neighbour matching with a global solve; 1: the chain of neighbour maps)",
    )
    p.add_argument(
        "--solver",
        default=None,
        choices=("chain", "global"),
        help="compose neighbour maps, or place all sections at once by robust least squares "
        "(default: global when --neighbours > 1)",
    )
    p.add_argument(
        "--global-model",
        default=GLOBAL_MODEL,
        choices=GLOBAL_MODELS,
        help=f"map of each section in the global solve (default {GLOBAL_MODEL})",
    )
    p.add_argument(
        "--drift-prior",
        type=float,
        default=DRIFT_PRIOR,
        help="global solve: weight of the penalty on each section's scale and shear "
        f"(default {DRIFT_PRIOR:g}; 0: off)",
    )
    p.add_argument(
        "--drift-correction",
        default=None,
        choices=DRIFT_CORRECTIONS,
        help="detrend: remove the slow trend of the section positions through depth (organelle drift; "
        "wrong for FIB-SEM/SBEM stage drift); auto: only where that trend is more than the sections' "
        "own scatter explains and the rest of the image (mitochondria left out) moves with it, i.e. "
        "the organelles drift, not the sections (placement jitter and stage drift are kept); skipped "
        "below 10 sections (default auto; none: the placement as solved)",
    )
    p.add_argument(
        "--drift-window",
        type=float,
        default=0.0,
        help="with --drift-correction detrend: a local line at every section, weighted by a Gaussian of "
        f"sigma this many sections, at least {MIN_WINDOW:g} (widened where fewer than {MIN_SECTIONS} placed "
        "sections lie under it: stack ends, failed or blank runs); 0: one straight line over the stack",
    )
    p.add_argument(
        "--organelle-reading",
        default=DEFAULT_READING,
        choices=READINGS,
        help="with --drift-correction auto on stacks that get the elastic step: whose drift the trend is, "
        "read from the rest of the image (background) or from each mitochondrion against the tissue right "
        f"around it (local; session 32), the tissue's step there taken over a grid of tiles around it "
        f"(local-grid; session 34, opt-in) (default {DEFAULT_READING})",
    )
    elastic = p.add_mutually_exclusive_group()
    elastic.add_argument(
        "--elastic",
        dest="elastic",
        action="store_const",
        const=True,
        default=None,
        help="elastic refinement on every stack: a smooth displacement per section toward its neighbours "
        f"(slower; without a flag: {_ELASTIC_WORDS[DEFAULT_ELASTIC]})",
    )
    elastic.add_argument(
        "--elastic-auto",
        dest="elastic",
        action="store_const",
        const="auto",
        help="the elastic refinement only where the sections are measured to be distorted (the neighbour "
        "pairs' residuals through each section point opposite ways; report.json's metrics 'distortion'; "
        f"{'the default' if DEFAULT_ELASTIC == 'auto' else 'opt-in'})",
    )
    elastic.add_argument(
        "--no-elastic", dest="elastic", action="store_const", const=False, help="no elastic refinement"
    )
    p.add_argument(
        "--elastic-solver",
        default=None,
        choices=ELASTIC_SOLVERS,
        help="with --elastic: joint solves the fields' affine part for all sections at once from dense "
        "flows (errors do not add up along the stack); local: each section from its neighbours' median "
        f"flow alone (default {ELASTIC_SOLVER} with the global solve, local with the chain)",
    )
    p.add_argument(
        "--elastic-landmarks",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with the joint elastic solver: each flow pair's rotation and translation from the mitochondria "
        "regions (the keypoints' landmarks); distorted stacks gain, drifting ones lose a little "
        "(default: on with the joint solver and masks)",
    )
    p.add_argument("--no-masks-out", action="store_true", help="do not write aligned_masks.tif")
    add_key_values(p, "--option", "any other align_stack option")
    add_quiet(p)
    p.set_defaults(func=cmd_align_em)
    return p


def write_stack_tiff(path: Path, sections, shape, dtype, spacing) -> None:
    """Write ``(n, y, x)`` sections from an iterator into one TIFF (atomically), with spacing."""
    import tifffile

    from ..io._util import atomic_write

    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        dtype = np.dtype(np.uint8)
    sz, sy, sx = (float(s) for s in spacing)
    with atomic_write(path) as tmp:
        tifffile.imwrite(
            tmp,
            (np.asarray(s, dtype=dtype) for s in sections),
            shape=tuple(int(v) for v in shape),
            dtype=dtype,
            photometric="minisblack",
            metadata={"axes": "ZYX", "spacing": [sz, sy, sx]},
            resolution=(1.0 / sx, 1.0 / sy),
        )


def _align_options(args: argparse.Namespace) -> dict:
    """align_stack keyword arguments from the flags; ``--option`` names are checked, and win."""
    from ..engines.mito.align import align_stack

    options = parse_options(args.option)
    valid = [name for name in inspect.signature(align_stack).parameters if name not in _FIXED_BY_COMMAND]
    check_known("align-em", options, valid)
    if args.use_masks:
        options["use_masks"] = True
    if args.no_model_selection:
        options["model_selection"] = False
    if args.no_refine:
        options["refine"] = False
    if args.no_guided_pairs:
        options["guided_pairs"] = False
    if args.elastic is not None:
        options.setdefault("elastic", args.elastic)
    preset = (
        SERIAL_SECTIONS
        if args.serial_sections
        else {"reference": DEFAULT_REFERENCE, "drift_correction": DEFAULT_DRIFT_CORRECTION}
    )
    reference = preset["reference"] if args.reference is None else args.reference
    reference = int(reference) if str(reference).lstrip("-").isdigit() else reference
    drift_correction = preset["drift_correction"] if args.drift_correction is None else args.drift_correction
    kw = {
        "detector": args.detector, "descriptor": args.descriptor, "matcher": args.matcher,
        "model": args.model, "reference": reference, "ransac_threshold": args.ransac_threshold,
        "ratio": args.ratio, "workers": args.workers, "max_keypoints": args.max_keypoints,
        "scale": args.scale, "fallback": tuple(f.strip() for f in args.fallback.split(",") if f.strip()),
        "neighbours": args.neighbours, "solver": args.solver, "global_model": args.global_model,
        "drift_prior": args.drift_prior, "drift_correction": drift_correction,
        "drift_window": args.drift_window, "elastic_solver": args.elastic_solver,
        "elastic_landmarks": args.elastic_landmarks, "organelle_reading": args.organelle_reading,
    }  # fmt: skip
    kw.update(options)  # --option KEY=VALUE wins
    return kw


def _field(fields, k: int):
    return None if fields is None else fields[k]


def cmd_align_em(args: argparse.Namespace) -> int:
    """Run ``napari-nephi align-em``."""
    from ..engines.mito.align import _read_path, _warp_one, align_stack, read_section
    from ..engines.mito.masks import detect_mitochondria_section, intensity_range, label_mask, to_uint8
    from ..engines.mito.report import write_report

    out = check_output_folder(args.output)
    kw = _align_options(args)
    stack, meta = _read_path(args.stack, "stack")
    spacing = tuple(meta.get("scale") or (1.0, 1.0, 1.0))
    if len(spacing) != 3:
        spacing = (1.0, 1.0, 1.0)
    masks = None
    if args.masks:
        masks, _ = _read_path(args.masks, "mask stack")
    bars = ProgressBars(quiet=args.quiet)
    # lazy: sections are warped while they are written, so memory stays bounded
    try:
        reg = align_stack(stack, masks, progress=bars, lazy=True, spacing=spacing, **kw)
    finally:
        bars.close()
    n, h, w = (int(s) for s in reg.transform.shape)
    mats = reg.transform.matrices
    fields = getattr(reg.transform, "fields", None)  # elastic refinement
    warped = reg.warped
    write_masks = not args.no_masks_out and (masks is not None or reg.settings["use_masks"])
    writing = Progress(bars)
    total = n * (2 if write_masks else 1)

    def reported(sections, first: int, what: str):
        """Yield the sections, one progress step (a second bar, after the alignment's) each."""
        for k, section in enumerate(sections):
            yield section
            writing.step(first + k + 1, total, stage=f"writing {what} {k + 1}/{n}")

    with output_folder(out) as tmp:
        write_stack_tiff(
            tmp / "aligned.tif",
            reported((warped[k].compute(scheduler="synchronous") for k in range(n)), 0, "aligned section"),
            (n, h, w), warped.dtype, spacing,
        )  # fmt: skip
        if write_masks:
            if masks is not None:
                sections = (
                    _warp_one(np.asarray(read_section(masks, k)), mats[k], True, _field(fields, k))
                    for k in range(n)
                )
                dtype = np.dtype(masks.dtype)
            else:  # the automatically detected mitochondria, labelled per section
                rng = (None, None)
                if np.dtype(stack.dtype) != np.uint8:
                    rng = intensity_range(read_section(stack, reg.metrics["reference"]))

                def auto(k):
                    m = detect_mitochondria_section(to_uint8(read_section(stack, k), *rng))
                    return _warp_one(label_mask(m).astype(np.uint16), mats[k], True, _field(fields, k))

                sections = (auto(k) for k in range(n))
                dtype = np.dtype(np.uint16)
            sections = reported(sections, n, "aligned masks")
            write_stack_tiff(tmp / "aligned_masks.tif", sections, (n, h, w), dtype, spacing)
        bars.close()
        reg.transform.save(tmp / "transform")
        np.save(tmp / "matrices.npy", mats)
        (tmp / "matrices.json").write_text(json.dumps(mats.tolist()))
        write_report(tmp, reg)
    if not args.quiet:
        m = reg.metrics
        failed = m["failed_sections"]
        print(
            f"Aligned {n} sections to section {m['reference']} in {m['seconds']:.1f} s "
            f"({m['megapixels_per_second']:.1f} MP/s); mean inliers {m['inliers_mean']:.0f}; "
            f"failed pairs: {failed if failed else 'none'}; identity: {m['identity_sections'] or 'none'}.",
            file=sys.stdout,
        )
        print(f"Results written to {out}")
    return 0
