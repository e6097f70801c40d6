"""The "Atlas lookup" widget's worker jobs: engine calls only, run in a worker thread.

Each job takes ``progress`` and ``cancel`` (given by the runner) and keyword arguments that hold
plain data (arrays, strings, an :class:`~napari_nephi.AtlasLookup`), never layers or widgets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.errors import InputError, UnsupportedFileError
from ..core.progress import Progress

#: Thumbnail size of the plate gallery, in pixels.
THUMBNAIL = 96


def _lookup_class():
    from .. import AtlasLookup

    return AtlasLookup


def read_source(source: dict) -> tuple:
    """``(reference, annotation)`` of an ``AtlasSource.spec()`` of kind "file or folder" or "image layer".

    For a layer source the spec holds the layers' data under ``data`` / ``annotation_data``.
    """
    from ..io.atlas_files import read_atlas

    if source["kind"] == "file or folder":
        if not source.get("path"):
            raise InputError("Give the path of the atlas: a 3D volume file or a folder of plate images.")
        reference = read_atlas(source["path"])
        labels = source.get("annotation_path")
        annotation = read_atlas(labels, "annotation") if labels else None
        return reference, annotation
    return source["data"], source.get("annotation_data")


def train_index(progress, cancel, source: dict, sections=None, section_plates=None, options=None):
    """Train the plate index of the atlas ``source`` (see :func:`read_source`), with real examples."""
    options = dict(options or {})
    examples = {"sections": sections or None, "section_plates": section_plates or None}
    AtlasLookup = _lookup_class()
    if source["kind"] == "brainglobe atlas":
        if not source.get("name"):
            raise InputError("Give the name of a brainglobe atlas, e.g. allen_mouse_25um.")
        from ..engines.atlas.brainglobe import train_brainglobe

        return train_brainglobe(
            AtlasLookup, source["name"], progress=progress, cancel=cancel, **examples, **options
        )
    reference, annotation = read_source(source)
    return AtlasLookup.train(
        reference,
        annotation,
        plate_axis=source.get("plate_axis", 0),
        progress=progress,
        cancel=cancel,
        **examples,
        **options,
    )


def load_index(progress, cancel, path: str):
    """Read a saved index folder."""
    p = Path(path)
    if not p.is_dir():
        raise UnsupportedFileError(
            f"{p} is not an index folder; choose the folder written by Save index or by "
            "napari-nephi atlas-train."
        )
    Progress(progress, cancel).check()
    return _lookup_class().load(p)


def save_index(progress, cancel, lookup, path: str) -> Path:
    """Write the index folder (atomically)."""
    Progress(progress, cancel).check()
    return Path(lookup.save(path))


def find_plates(progress, cancel, lookup, section, top: int, rerank: bool | None = None) -> dict:
    """The ``top`` plates for ``section`` with their gallery thumbnails (``rerank``: see ``lookup``).

    The pose search of a re-ranked lookup reports its progress and stops on ``cancel`` between its steps.
    """
    reranked = lookup.rerank_default if rerank is None else bool(rerank)
    options = plain = densified = None  # what the pose search ran with (None: no search)
    if reranked:
        found = lookup.search_poses(section, progress=progress, cancel=cancel)
        hits, options, plain = found.ranking[:top], found.options, found.plain_ranked
        densified = bool(found.densified)  # whether the opt-in dense_sweep fired (session 29)
    else:
        hits = lookup.lookup(section, top=top, rerank=False)
    Progress(progress, cancel).check()
    thumbnails = [lookup.plates.thumbnail(i, size=THUMBNAIL) for i, _ in hits]
    first = getattr(lookup, "first_stage", "embedding")  # what ranks without the pose search
    return {
        "hits": hits,
        "thumbnails": thumbnails,
        "reranked": reranked,
        "first_stage": first,
        "rerank_options": options,
        "plain_ranked": plain,
        "densified": densified,
    }


def plate_preview(progress, cancel, lookup, plate: int) -> dict:
    """Plate ``plate`` (and its labels) to show beside the section."""
    return {"plate": int(plate), "image": lookup.plate_image(plate), "labels": lookup.plate_labels(plate)}


def register_plate(
    progress, cancel, lookup, section, plate: int, method: str, start: dict | None = None
) -> dict:
    """Register ``plate`` onto ``section``; the warped plate, the labels on the section and their names.

    ``start``: the user's corrections (``rotation``, ``scale``, ``section_points``, ``plate_points``
    in pixels), see :func:`napari_nephi.engines.atlas.manual_start.start_matrix`.
    """
    from ..engines.atlas.manual_start import register_from_start, start_matrix

    matrix = start_matrix(section, lookup.plate_image(plate), **(start or {}))
    run = {"method": method, "progress": progress, "cancel": cancel}
    if matrix is None:
        reg = lookup.register(section, plate, **run)
    else:
        reg = register_from_start(lookup, section, plate, matrix, **run)
    labels = reg.metrics.get("labels")
    features = None
    if labels is not None:
        values = np.unique(np.asarray(labels))
        features = {"index": values, "region": [lookup.region_name(int(v)) for v in values]}
    return {"registration": reg, "plate": int(plate), "labels": labels, "features": features}
