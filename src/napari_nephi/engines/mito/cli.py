"""``napari-nephi align-em STACK -o OUT [--masks MASKS] [options]``: MITO on the command line.

Wire it into the main parser with ``add_parser(subparsers)``. Writes into ``OUT``:

* ``aligned.tif``: the aligned stack (input dtype), written one section at a time;
* ``aligned_masks.tif``: the masks carried along (the given ones, or with ``--detector mito``
  and no ``--masks`` the automatically detected mitochondria, labelled per section);
  ``--no-masks-out`` skips it;
* ``transform/``: the per-section transform (``napari_nephi.load_transform``, ``napari-nephi apply``);
* ``matrices.npy`` and ``matrices.json``: ``(n, 3, 3)`` ``(y, x)`` maps from aligned to original
  section coordinates;
* ``report.csv`` (one row per section) and ``report.json`` (rows, summary metrics, settings).

Progress goes to stderr: one bar for the alignment (a step per section), one for writing
the aligned stack and masks (a step per section written).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np

from ...core.registration import atomic_write_bytes
from . import features as ft

REPORT_COLUMNS = (
    "section", "neighbour", "keypoints", "matches", "inliers", "reprojection_error", "failed",
    "fallback", "method", "model", "refined", "tracks", "tracking_error",
)  # fmt: skip


def add_parser(subparsers):
    """Add the ``align-em`` subcommand (with its own ``func``) to an argparse subparsers object."""
    p = subparsers.add_parser(
        "align-em",
        help="align a stack of EM sections with mitochondria keypoints (MITO)",
        description=(
            "Align every section of an EM stack to a reference section with keypoints (by default "
            "FAST corners inside mitochondria, BRISK descriptors, RANSAC). Writes the aligned stack, "
            "aligned masks, the per-section matrices and a per-section report."
        ),
    )
    p.add_argument("stack", help="multi-page TIFF, folder of section TIFFs, or NIfTI (n, y, x)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--masks", help="mitochondria masks of the same shape (labels or binary)")
    p.add_argument("--detector", default="mito", choices=ft.DETECTORS)
    p.add_argument("--descriptor", default="brisk", choices=ft.DESCRIPTORS)
    p.add_argument("--matcher", default="bf", choices=ft.MATCHERS)
    p.add_argument("--model", default="homography", choices=ft.MODELS)
    p.add_argument(
        "--no-model-selection",
        action="store_true",
        help="always fit --model (default: prefer a simpler model when it explains the matches as well)",
    )
    p.add_argument(
        "--no-refine",
        action="store_true",
        help="skip the sub-pixel refinement of each pair map (Lucas-Kanade tracking of the keypoints)",
    )
    p.add_argument("--reference", default="0", help="reference section index, or 'middle'")
    p.add_argument("--ransac-threshold", type=float, default=3.0, help="pixels (default 3)")
    p.add_argument("--ratio", type=float, default=0.8, help="Lowe ratio test (default 0.8)")
    p.add_argument("--workers", type=int, default=None, help="threads (default: CPU cores)")
    p.add_argument("--max-keypoints", type=int, default=1000)
    p.add_argument("--scale", type=float, default=None, help="work resolution (default: automatic)")
    p.add_argument("--use-masks", action="store_true", help="restrict other detectors to the masks too")
    p.add_argument(
        "--fallback",
        default="sift,identity",
        help="detectors tried when a pair fails, comma-separated (default sift,identity)",
    )
    p.add_argument("--no-masks-out", action="store_true", help="do not write aligned_masks.tif")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="any other align_stack option")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_align_em)
    return p


def write_stack_tiff(path: Path, sections, shape, dtype, spacing) -> None:
    """Write ``(n, y, x)`` sections from an iterator into one TIFF (atomically), with spacing."""
    import tifffile

    from ...io._util import atomic_write

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


def write_report(out: Path, reg) -> None:
    """``report.csv`` (one row per section) and ``report.json`` (rows, summary, settings)."""
    rows = reg.metrics["report"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(REPORT_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in REPORT_COLUMNS})
    atomic_write_bytes(out / "report.csv", buf.getvalue().encode())
    summary = {k: v for k, v in reg.metrics.items() if k != "report"}
    doc = {"report": rows, "metrics": summary, "settings": reg.settings}
    atomic_write_bytes(out / "report.json", json.dumps(doc, indent=2, default=str).encode())


def cmd_align_em(args) -> int:
    from ...cli import (  # here, not at import: napari_nephi.cli imports this module
        TextProgress,
        parse_options,
    )
    from ...core.progress import Progress
    from .align import _read_path, _warp_one, align_stack, read_section
    from .masks import detect_mitochondria_section, intensity_range, label_mask, to_uint8

    stack, meta = _read_path(args.stack, "stack")
    spacing = tuple(meta.get("scale") or (1.0, 1.0, 1.0))
    if len(spacing) != 3:
        spacing = (1.0, 1.0, 1.0)
    masks = None
    if args.masks:
        masks, _ = _read_path(args.masks, "mask stack")
    reference = int(args.reference) if str(args.reference).lstrip("-").isdigit() else args.reference
    options = parse_options(args.option)
    if args.use_masks:
        options["use_masks"] = True
    if args.no_model_selection:
        options["model_selection"] = False
    if args.no_refine:
        options["refine"] = False
    kw = {
        "detector": args.detector, "descriptor": args.descriptor, "matcher": args.matcher,
        "model": args.model, "reference": reference, "ransac_threshold": args.ransac_threshold,
        "ratio": args.ratio, "workers": args.workers, "max_keypoints": args.max_keypoints,
        "scale": args.scale, "fallback": tuple(f.strip() for f in args.fallback.split(",") if f.strip()),
    }  # fmt: skip
    kw.update(options)  # --option KEY=VALUE wins
    kw.update(progress=TextProgress(quiet=args.quiet), lazy=True, spacing=spacing)
    # lazy: sections are warped while they are written, so memory stays bounded
    reg = align_stack(stack, masks, **kw)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    n, h, w = (int(s) for s in reg.transform.shape)
    mats = reg.transform.matrices
    warped = reg.warped
    write_masks = not args.no_masks_out and (masks is not None or reg.settings["use_masks"])
    writing = Progress(TextProgress(quiet=args.quiet))
    total = n * (2 if write_masks else 1)

    def reported(sections, first: int, what: str):
        """Yield the sections, one progress step (a second bar, after the alignment's) each."""
        for k, section in enumerate(sections):
            yield section
            writing.step(first + k + 1, total, stage=f"writing {what} {k + 1}/{n}")

    write_stack_tiff(
        out / "aligned.tif",
        reported((warped[k].compute(scheduler="synchronous") for k in range(n)), 0, "aligned section"),
        (n, h, w), warped.dtype, spacing,
    )  # fmt: skip
    if write_masks:
        if masks is not None:
            sections = (_warp_one(np.asarray(read_section(masks, k)), mats[k], labels=True) for k in range(n))
            dtype = np.dtype(masks.dtype)
        else:  # the automatically detected mitochondria, labelled per section
            rng = (None, None)
            if np.dtype(stack.dtype) != np.uint8:
                rng = intensity_range(read_section(stack, reg.metrics["reference"]))

            def auto(k):
                m = detect_mitochondria_section(to_uint8(read_section(stack, k), *rng))
                return _warp_one(label_mask(m).astype(np.uint16), mats[k], labels=True)

            sections = (auto(k) for k in range(n))
            dtype = np.dtype(np.uint16)
        sections = reported(sections, n, "aligned masks")
        write_stack_tiff(out / "aligned_masks.tif", sections, (n, h, w), dtype, spacing)
    reg.transform.save(out / "transform")
    np.save(out / "matrices.npy", mats)
    atomic_write_bytes(out / "matrices.json", json.dumps(mats.tolist()).encode())
    write_report(out, reg)
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
