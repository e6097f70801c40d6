"""``napari-nephi atlas-train`` and ``napari-nephi atlas-lookup``: find the atlas plate of a section.

``atlas-train REFERENCE -o INDEX`` trains the plate lookup of an atlas (a 3D reference volume, a
folder of 2D plate images, or ``brainglobe:NAME`` for a brainglobe atlas in the local cache) and
writes its index folder. ``atlas-lookup INDEX SECTION... -o OUT`` ranks the plates for every
section and writes into ``OUT`` (atomically: everything appears at the end):

* ``ranks.csv``: one row per section and rank (section, file, rank, plate, distance, chosen);
* ``ranks.json``: per section the ranked plates with distances and the chosen plate (with
  ``--register``, also the regions on the section: label, name, pixels);
* with ``--register``: ``warped/NAME.tif`` (the chosen plate registered onto the section) and,
  when the atlas has labels, ``labels/NAME.tif`` (its region labels on the section, values kept);
  ``--labels`` alone writes only the labels, ``--labels DIR`` writes them into the folder DIR;
* for an index built from a brainglobe atlas: ``quicknii.json``, the chosen positions as a
  QuickNII / DeepSlice anchoring series (open it in QuickNII, VisuAlign or ABBA).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

import numpy as np

from ..core.errors import InputError, UnsupportedFileError
from ..core.files import check_output_folder, output_folder
from ..core.progress import Progress
from ..io.atlas_files import read_atlas, read_sections
from ._common import HelpFormatter, ProgressBars, add_key_values, add_quiet, parse_options

#: REFERENCE prefix naming a brainglobe atlas instead of a file.
BRAINGLOBE = "brainglobe:"
#: Registration methods of ``atlas-lookup --register`` (the plate onto the section).
METHODS = ("nephi", "affine")

_DOC = __doc__.split("\n", 1)[1].strip()


def add_parsers(subparsers) -> None:
    """Add ``atlas-train`` and ``atlas-lookup`` (each with its own ``func``) to a subparsers object."""
    t = subparsers.add_parser(
        "atlas-train",
        formatter_class=HelpFormatter,
        help="train the plate lookup of an atlas and write its index folder",
        description="Train the embedding network that finds the atlas plate matching a brain "
        "section (trained from the atlas alone: synthetic oblique, partial, restained sections) and "
        "write the index folder that atlas-lookup and the Atlas lookup widget load.\n\n" + _DOC,
    )
    t.add_argument(
        "reference",
        help="3D reference volume (NIfTI, TIFF), folder of 2D plate TIFFs, or brainglobe:NAME "
        "(e.g. brainglobe:allen_mouse_25um, from the local brainglobe cache)",
    )
    t.add_argument("-o", "--output", required=True, metavar="INDEX", help="index folder to write")
    t.add_argument("--annotation", help="region labels matching the reference (volume or folder)")
    t.add_argument(
        "--region-names",
        metavar="FILE",
        help="names of the label values: a CSV with a value column (label, index, value or id) and a "
        "name column (name, region or acronym), or a JSON object {value: name}",
    )
    t.add_argument("--plate-axis", type=int, default=0, help="axis of the volume the plates lie along")
    t.add_argument("--steps", type=int, default=None, help="training steps (default: the engine's)")
    t.add_argument("--max-minutes", type=float, default=None, help="time budget of the training")
    t.add_argument("--seed", type=int, default=0, help="random seed")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    add_key_values(t, "--option", "any other training option (embedding_dim=64, loss=contrastive, ...)")
    add_quiet(t)
    t.set_defaults(func=cmd_atlas_train)

    q = subparsers.add_parser(
        "atlas-lookup",
        formatter_class=HelpFormatter,
        help="rank the atlas plates for sections (and register the chosen plate)",
        description="Rank the plates of a trained atlas index for every section, best first.\n\n"
        + _DOC
        + "\n\nOUT is written atomically: an OUT of an earlier napari-nephi run is replaced as a "
        "whole; any other existing folder or file is refused.",
    )
    q.add_argument("index", help="index folder written by atlas-train (or the widget's Save index)")
    q.add_argument(
        "sections",
        nargs="+",
        metavar="SECTION",
        help="section images (2D TIFF, NIfTI, PNG or JPEG; grey or RGB), stacks (one section per "
        "plane) or folders of section images",
    )
    q.add_argument("--top", type=int, default=5, help="plates ranked per section")
    q.add_argument("-o", "--output", default="atlas-lookup", metavar="OUT", help="output folder")
    q.add_argument(
        "--series",
        action="store_true",
        help="the sections are a series in cutting order: choose monotonic, evenly spaced plates",
    )
    q.add_argument(
        "--rerank",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="re-rank the embedding's shortlist by a pose search of each section in the atlas (rotation, "
        "scale, tilt; contrast-invariant; about a second per section on a CPU); default: the index's",
    )
    add_key_values(
        q,
        "--rerank-option",
        "an option of the pose search (plain_reach=null ranks as session 21; see "
        "napari_nephi.engines.atlas.rerank.DEFAULTS); ranks.json records every option it ran with",
    )
    q.add_argument(
        "--framing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compare each section with the plates at several framings (its tissue as part of a whole "
        "section: a cut top, bottom, side or corner); --no-framing: the centred section alone",
    )
    q.add_argument("--register", action="store_true", help="register the chosen plate onto each section")
    q.add_argument(
        "--labels",
        nargs="?",
        const=True,
        default=False,
        metavar="DIR",
        help="write the atlas labels registered onto each section (implies --register; the registered "
        "plates only with --register too): into OUT/labels, or into the folder DIR",
    )
    q.add_argument("--method", default="nephi", choices=METHODS, help="registration method")
    q.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    add_quiet(q)
    q.set_defaults(func=cmd_atlas_lookup)


# -- atlas-train ------------------------------------------------------------------------------
def _train_options(args: argparse.Namespace) -> dict:
    options = parse_options(args.option)
    if args.steps is not None:
        options["steps"] = args.steps
    if args.max_minutes is not None:
        options["max_minutes"] = args.max_minutes
    return options


def read_region_names(path: str) -> dict[int, str]:
    """``{label value: name}`` from a CSV with a header (a value and a name column, see
    :func:`~napari_nephi.engines.atlas.plates.region_names_from_table`) or a JSON object."""
    from ..engines.atlas.plates import region_names_from_table

    p = Path(path)
    if not p.is_file():
        raise UnsupportedFileError(f"The region names file {p} does not exist; check the path.")
    text = p.read_text(encoding="utf-8-sig")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise UnsupportedFileError(f"{p} is not valid JSON ({exc}).") from exc
        if not isinstance(data, dict):
            raise InputError(f"{p} must hold a JSON object {{value: name}}.")
        return region_names_from_table({"label": list(data), "name": list(data.values())}, str(p))
    reader = csv.DictReader(io.StringIO(text))
    rows = list(reader)
    table = {c: [r.get(c) for r in rows] for c in reader.fieldnames or [] if c is not None}
    return region_names_from_table(table, str(p))


def cmd_atlas_train(args: argparse.Namespace) -> int:
    """Run ``napari-nephi atlas-train``."""
    from .. import AtlasLookup
    from ..engines.atlas.brainglobe import train_brainglobe

    out = check_output_folder(args.output)  # before any training: fail at once, not after it
    options = _train_options(args)
    if args.region_names:
        if args.reference.startswith(BRAINGLOBE):
            raise InputError("--region-names is not used with a brainglobe atlas (it has its own names).")
        options["region_names"] = read_region_names(args.region_names)
    bars = ProgressBars(quiet=args.quiet)
    common = {"device": args.device, "progress": bars, "seed": args.seed, **options}
    try:
        if args.reference.startswith(BRAINGLOBE):
            if args.annotation:
                raise InputError("--annotation is not used with a brainglobe atlas (it has its own labels).")
            if args.plate_axis != 0:
                raise InputError(
                    "--plate-axis is not used with a brainglobe atlas (its plates lie along axis 0)."
                )
            lk = train_brainglobe(AtlasLookup, args.reference[len(BRAINGLOBE) :], **common)
        else:
            reference = read_atlas(args.reference)
            annotation = read_atlas(args.annotation, "annotation") if args.annotation else None
            lk = AtlasLookup.train(reference, annotation, plate_axis=args.plate_axis, **common)
    finally:
        bars.close()
    lk.save(out)
    if not args.quiet:
        seconds = lk.settings.get("seconds")
        took = f" in {seconds:.0f} s" if isinstance(seconds, int | float) else ""
        print(f"Trained the lookup of {lk.n_plates} plates{took}; index written to {out}")
    return 0


# -- atlas-lookup -----------------------------------------------------------------------------
def _load_index(path: str, device: str = "auto"):
    from .. import AtlasLookup

    p = Path(path)
    if not p.exists():
        raise UnsupportedFileError(f"The index {p} does not exist; train one with napari-nephi atlas-train.")
    if not p.is_dir():
        raise UnsupportedFileError(
            f"The index {p} is a file; an index is the folder written by napari-nephi atlas-train."
        )
    return AtlasLookup.load(p, device=device)


def rank_rows(names: list[str], files: list[str], rankings: list, picks: list[int]) -> list[dict]:
    """The rows of ranks.csv: one per section and rank."""
    rows = []
    for name, file, ranking, pick in zip(names, files, rankings, picks, strict=True):
        for rank, (plate, distance) in enumerate(ranking, start=1):
            rows.append(
                {"section": name, "file": file, "rank": rank, "plate": int(plate),
                 "distance": round(float(distance), 6), "chosen": int(plate) == int(pick)}
            )  # fmt: skip
    return rows


def region_table(lk, labels) -> list[dict] | None:
    """The regions on a section's carried labels: ``label``, ``name``, ``pixels``; None without labels."""
    if labels is None:
        return None
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    return [
        {"label": int(v), "name": lk.region_name(int(v)), "pixels": int(c)}
        for v, c in zip(values, counts, strict=True)
        if v != 0
    ]


def _csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _rank_all(
    lk,
    images: list,
    top: int,
    series: bool,
    rerank: bool,
    progress: Progress | None = None,
    widened: list | None = None,
    rerank_options: dict | None = None,
    searches: list | None = None,
) -> tuple[list, list[int]]:
    """Per section its ranking (best first) and the chosen plate (``series``: smoothed as
    :meth:`AtlasLookup.lookup_series`). Re-ranked lookups (about a second each, with
    ``rerank_options``) report progress per section, and append to ``widened`` whether each one's
    pose search widened (rerank option ``widen_score``) and to ``searches`` each search's
    :class:`~napari_nephi.engines.atlas.rerank.RerankResult`; the embedding alone ranks every
    section in one batch."""
    from ..engines.atlas.series import smooth_series

    progress = progress or Progress(None)
    if rerank:
        rankings = []
        for k, image in enumerate(images):
            # lookup(image, top, rerank=True, rerank_options=...), with what the search ran
            found = lk.search_poses(image, rerank_options)
            rankings.append(found.ranking[:top])
            if widened is not None:
                widened.append(bool(found.widened))
            if searches is not None:
                searches.append(found)
            progress.step(k + 1, len(images), stage="ranking")
    else:
        rankings = lk.lookup_many(images, top=top, rerank=False)
    if series:
        return rankings, [int(p) for p in smooth_series(rankings, lk.n_plates)["picks"]]
    return rankings, [int(r[0][0]) for r in rankings]


def cmd_atlas_lookup(args: argparse.Namespace) -> int:
    """Run ``napari-nephi atlas-lookup``."""
    from ..engines.atlas.rerank import check_rerank_options
    from ..io import write_image

    if args.top < 1:
        raise InputError(f"--top must be at least 1, got {args.top}.")
    out = check_output_folder(args.output)
    labels_dir = _labels_folder(args.labels, out)
    lk = _load_index(args.index, args.device)
    if args.labels and not lk.plates.has_labels:
        raise InputError(
            f"--labels: the index {args.index} has no region labels (it was trained without an "
            "annotation); use --register for the registered plate, or train with --annotation."
        )
    sections = read_sections(args.sections)
    names, files, images = ([s[k] for s in sections] for k in range(3))
    bars = ProgressBars(quiet=args.quiet)
    rerank = lk.rerank_default if args.rerank is None else bool(args.rerank)
    rerank_options = parse_options(args.rerank_option, "--rerank-option")
    if rerank_options and not rerank:
        raise InputError(
            "--rerank-option sets the pose search, which this lookup does not run: add --rerank "
            "(or leave out --no-rerank)."
        )
    check_rerank_options(rerank_options)  # a bad option fails before the sections are read
    lk.framing = bool(args.framing)
    register = args.register or bool(args.labels)
    registrations = []
    progress = Progress(bars)
    try:
        widened: list[bool] = []
        searches: list = []
        rankings, picks = _rank_all(
            lk,
            images,
            min(args.top, lk.n_plates),
            args.series,
            rerank,
            progress,
            widened,
            rerank_options,
            searches,
        )
        for k, (image, pick) in enumerate(zip(images, picks, strict=True)):
            if register:
                registrations.append(lk.register(image, pick, method=args.method, device=args.device))
                progress.step(k + 1, len(images), stage="registering")
    finally:
        bars.close()
    quicknii = _quicknii(lk, quicknii_names(names, files), images, picks, registrations)
    with output_folder(out) as tmp:
        (tmp / "ranks.csv").write_text(_csv_text(rank_rows(names, files, rankings, picks)))
        summary = {
            "index": str(args.index), "top": args.top, "series": bool(args.series), "rerank": rerank,
            "framing": lk.framing and lk.first_stage == "embedding",  # the vote has no framings
            "sections": [
                {"section": n, "file": f, "chosen": p,
                 "ranking": [{"plate": int(i), "distance": float(d)} for i, d in r]}
                for n, f, r, p in zip(names, files, rankings, picks, strict=True)
            ],
        }  # fmt: skip
        # every option the pose search ran with (None: no search), so a ranking can be repeated
        summary["rerank_options"] = searches[0].options if searches else None
        for k, entry in enumerate(summary["sections"]):  # whether the pose search widened (None: no search)
            entry["widened"] = widened[k] if rerank else None
            # whether plain_reach ordered the plates next to the best pose (None: no search)
            entry["plain_ranked"] = searches[k].plain_ranked if rerank else None
            # whether stage 1 ran again with the dense_sweep plates (None: no search)
            entry["densified"] = searches[k].densified if rerank else None
        for entry, reg in zip(summary["sections"], registrations, strict=False):
            entry["regions"] = region_table(lk, reg.metrics.get("labels"))
        (tmp / "ranks.json").write_text(json.dumps(summary, indent=2))
        for name, reg in zip(names, registrations, strict=False):
            if args.register:
                (tmp / "warped").mkdir(exist_ok=True)
                write_image(str(tmp / "warped" / f"{name}.tif"), np.asarray(reg.warped, np.float32), None)
        if labels_dir is None:
            _write_labels(tmp / "labels", names, registrations)
        if quicknii is not None:
            (tmp / "quicknii.json").write_text(json.dumps(quicknii, indent=2))
    if labels_dir is not None:
        with output_folder(labels_dir) as tmp:
            _write_labels(tmp, names, registrations)
    if not args.quiet:
        for name, ranking, pick in zip(names, rankings, picks, strict=True):
            shown = ", ".join(f"{int(i)} ({float(d):.3f})" for i, d in ranking[:3])
            print(f"{name}: plate {pick}; best {shown}")
        print(f"Results written to {out}" + (f", labels to {labels_dir}" if labels_dir is not None else ""))
    return 0


def _labels_folder(value, out: Path) -> Path | None:
    """The folder of ``--labels DIR`` (checked before any work), or None for OUT/labels."""
    if isinstance(value, bool):
        return None
    path = Path(value)
    if path.is_file():
        raise InputError(
            f"--labels takes a folder for the labels, but {path} is a file (a section?): give the sections "
            "before --labels, or a folder after it."
        )
    if path.resolve() == out.resolve():
        raise InputError(
            f"--labels {path} is the output folder itself; without DIR the labels go to {out}/labels."
        )
    if out.resolve().is_relative_to(path.resolve()) or path.resolve().is_relative_to(out.resolve()):
        raise InputError(
            f"--labels {path} and the output folder {out} lie one inside the other; each is replaced as a "
            "whole when written, so give folders side by side (or no DIR: the labels go to OUT/labels)."
        )
    return check_output_folder(path)


def _write_labels(folder: Path, names: list[str], registrations: list) -> None:
    """``folder/NAME.tif`` of every registration's carried labels (none when the atlas has none)."""
    from ..io import write_labels

    for name, reg in zip(names, registrations, strict=False):
        labels = reg.metrics.get("labels")
        if labels is not None:
            folder.mkdir(exist_ok=True)
            write_labels(str(folder / f"{name}.tif"), np.asarray(labels), None)


def quicknii_names(names: list[str], files: list[str]) -> list[str]:
    """The QuickNII ``filename`` of each section: its image file's name (with its suffix, as QuickNII
    and VisuAlign match them), or for a plane of a stack the section's name."""
    base = [Path(f).name for f in files]  # QuickNII matches by file name, so two folders' s1.png clash
    return [b if base.count(b) == 1 else n for n, b in zip(names, base, strict=True)]


def _quicknii(lk, names, images, picks, registrations) -> dict | None:
    """The QuickNII anchoring series when the index was built from a brainglobe atlas, else None."""
    from ._quicknii import anchoring, quicknii_target, section_corners, series_json

    info = lk.settings.get("brainglobe")
    if not isinstance(info, dict):
        return None
    shape = tuple(int(s) for s in info["shape"])  # asr
    positions = info.get("plate_positions") or list(range(lk.n_plates))
    target, grid, factor = quicknii_target(str(info["name"]), info.get("resolution"), shape)
    slices = []
    for k, (name, image, pick) in enumerate(zip(names, images, picks, strict=True)):
        h, w = np.shape(image)[:2]
        plate_shape = np.shape(lk.plate_image(pick))
        corners = section_corners(h, w)
        if k < len(registrations):  # the registration's map of the corners onto the plate
            on_plate = registrations[k].transform.map_points(corners)
        else:  # unregistered: the section spans the plate
            on_plate = (corners + 0.5) * (np.asarray(plate_shape) / (h, w)) - 0.5
        scale = (shape[1] / plate_shape[0], shape[2] / plate_shape[1])
        vector = anchoring(np.asarray(on_plate), positions[pick], scale, shape, factor)
        slices.append({"filename": name, "nr": k + 1, "width": int(w), "height": int(h), "anchoring": vector})
    return series_json(target, grid, slices)
