"""Annotations of slides: QuPath GeoJSON and CSV landmarks in and out, napari layers, carried by a transform.

Coordinates are level-0 pixels in numpy order ``(y, x)``; GeoJSON stores ``(x, y)`` (the QuPath
convention), and the readers and writers swap them. A polygon's rings are kept without the repeated
closing vertex (GeoJSON's closed ring is restored on writing); the first ring is the outline, the
others are holes.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ..core.errors import InputError, UnsupportedFileError
from ..core.grid import check_spacing
from ..core.options import check_choice
from ..core.transform import AffineTransform, Transform
from ._util import PathLike, atomic_write, existing_file, reading

__all__ = [
    "KINDS",
    "Annotation",
    "carry",
    "carry_points",
    "from_napari_points",
    "from_napari_shapes",
    "read_geojson",
    "read_landmarks_csv",
    "to_napari_points",
    "to_napari_shapes",
    "write_geojson",
    "write_landmarks_csv",
]

KINDS = ("Point", "MultiPoint", "LineString", "Polygon", "MultiPolygon")
#: vertices of a napari ellipse turned into a polygon
ELLIPSE_VERTICES = 64
#: a carried point is accepted when the transform maps it back to within this many pixels
CARRY_TOLERANCE = 0.01


def _vertices(value: Any, what: str, minimum: int = 1) -> np.ndarray:
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} must be numbers, got {value!r:.80}.") from exc
    if arr.ndim == 1 and arr.shape[0] == 2:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] < minimum:
        raise InputError(f"{what} must be at least {minimum} (y, x) pair(s), got shape {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{what} hold NaN or infinite values; fix or remove that annotation.")
    return arr


def _ring(value: Any, what: str) -> np.ndarray:
    ring = _vertices(value, what, 3)
    if len(ring) > 3 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    return ring


@dataclass
class Annotation:
    """One annotation: ``kind`` (a GeoJSON geometry type), ``coords`` in level-0 pixels (y, x).

    ``coords``: Point, MultiPoint, LineString: ``(N, 2)``; Polygon: a list of rings ``(N, 2)``
    (outline first, then holes, not closed); MultiPolygon: a list of such polygons. ``name`` and
    ``classification`` (QuPath's ``{"name": ..., "color": [r, g, b]}``) come from the properties;
    ``properties`` keeps the others (``objectType``, measurements ...) for writing back.
    """

    kind: str
    coords: Any
    name: str | None = None
    classification: dict | None = None
    properties: dict = field(default_factory=dict)
    id: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"Annotation kind must be one of {', '.join(KINDS)}, got {self.kind!r}.")
        what = f"{self.kind} coordinates"
        if self.kind in ("Point", "MultiPoint", "LineString"):
            self.coords = _vertices(self.coords, what, 2 if self.kind == "LineString" else 1)
            if self.kind == "Point" and len(self.coords) != 1:
                raise InputError(f"A Point has one (y, x) pair, got {len(self.coords)}.")
        elif self.kind == "Polygon":
            self.coords = self._polygon(self.coords, what)
        else:
            if isinstance(self.coords, np.ndarray) or not self.coords:
                raise InputError(
                    "MultiPolygon coordinates must be a non-empty list of polygons (lists of rings)."
                )
            self.coords = [self._polygon(p, what) for p in self.coords]

    @staticmethod
    def _polygon(rings: Any, what: str) -> list[np.ndarray]:
        if isinstance(rings, np.ndarray) and rings.ndim == 2:
            rings = [rings]
        if not isinstance(rings, list | tuple) or not rings:
            raise InputError(f"{what} must be a list of rings, each (N, 2) with N >= 3.")
        return [_ring(r, what) for r in rings]

    def points(self) -> np.ndarray:
        """Every vertex, ``(N, 2)`` (y, x), in the order :meth:`with_points` expects."""
        if self.kind == "Polygon":
            return np.concatenate(self.coords)
        if self.kind == "MultiPolygon":
            return np.concatenate([r for p in self.coords for r in p])
        return self.coords

    def with_points(self, points: np.ndarray) -> Annotation:
        """A copy whose vertices are ``points`` (same order and count as :meth:`points`)."""
        pts = np.asarray(points, dtype=np.float64)
        if self.kind in ("Point", "MultiPoint", "LineString"):
            coords: Any = pts.copy()
        else:
            polygons = [self.coords] if self.kind == "Polygon" else self.coords
            out, start = [], 0
            for polygon in polygons:
                rings = []
                for ring in polygon:
                    rings.append(pts[start : start + len(ring)].copy())
                    start += len(ring)
                out.append(rings)
            coords = out[0] if self.kind == "Polygon" else out
        return replace(self, coords=coords, properties=dict(self.properties))


# -- GeoJSON ---------------------------------------------------------------------------------------
def _features(doc: Any, path: PathLike) -> list[dict]:
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        return list(doc.get("features") or [])
    if isinstance(doc, dict) and doc.get("type") == "Feature":
        return [doc]
    if isinstance(doc, dict) and doc.get("type") in KINDS:
        return [{"type": "Feature", "geometry": doc, "properties": {}}]
    raise UnsupportedFileError(
        f"{path} is JSON but not GeoJSON annotations: expected a FeatureCollection, a Feature or a list of "
        "features (as QuPath exports them)."
    )


def _swap(arr: np.ndarray) -> np.ndarray:
    return arr[:, ::-1].copy()


def _from_geometry(geometry: Any, where: str) -> tuple[str, Any]:
    if not isinstance(geometry, dict) or "coordinates" not in geometry:
        raise UnsupportedFileError(f"{where} has no geometry with coordinates.")
    kind = geometry.get("type")
    if kind not in KINDS:
        raise UnsupportedFileError(
            f"{where} is a {kind!r} geometry; napari-nephi reads {', '.join(KINDS)}. Convert or remove it."
        )
    c = geometry["coordinates"]
    try:
        if kind in ("Point", "MultiPoint", "LineString"):
            return kind, _swap(_vertices(c, f"{where} coordinates"))
        if kind == "Polygon":
            return kind, [_swap(_ring(r, f"{where} ring")) for r in c]
        return kind, [[_swap(_ring(r, f"{where} ring")) for r in p] for p in c]
    except TypeError as exc:
        raise InputError(f"{where} has malformed coordinates ({exc}).") from exc


def read_geojson(path: PathLike) -> list[Annotation]:
    """Annotations of a GeoJSON file in the QuPath convention (FeatureCollection, Feature or list)."""
    p = existing_file(path)
    with reading(p, "GeoJSON"):
        text = p.read_text(encoding="utf-8")
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UnsupportedFileError(
                f"{p} is not GeoJSON: it is not valid JSON ({exc.msg} at line {exc.lineno}). Export the "
                "annotations again as GeoJSON."
            ) from exc
    out = []
    for i, feature in enumerate(_features(doc, p)):
        where = f"{p}: feature {i}"
        if not isinstance(feature, dict):
            raise UnsupportedFileError(f"{where} is not a GeoJSON Feature object.")
        kind, coords = _from_geometry(feature.get("geometry"), where)
        props = dict(feature.get("properties") or {})
        name, classification = props.pop("name", None), props.pop("classification", None)
        fid = feature.get("id")
        out.append(Annotation(kind, coords, name, classification, props, None if fid is None else str(fid)))
    return out


def _to_geometry(a: Annotation) -> dict:
    def closed(ring: np.ndarray) -> list:
        return _swap(np.vstack([ring, ring[:1]])).tolist()

    if a.kind == "Point":
        coords: Any = _swap(a.coords)[0].tolist()
    elif a.kind in ("MultiPoint", "LineString"):
        coords = _swap(a.coords).tolist()
    elif a.kind == "Polygon":
        coords = [closed(r) for r in a.coords]
    else:
        coords = [[closed(r) for r in p] for p in a.coords]
    return {"type": a.kind, "coordinates": coords}


def write_geojson(path: PathLike, annotations: Sequence[Annotation]) -> str:
    """Write ``annotations`` as a QuPath-style GeoJSON FeatureCollection (x, y pixels), atomically."""
    features = []
    for a in annotations:
        if not isinstance(a, Annotation):
            raise InputError(f"write_geojson takes Annotation objects, got {type(a).__name__}.")
        props = {"objectType": "annotation", **a.properties}
        if a.name is not None:
            props["name"] = a.name
        if a.classification is not None:
            props["classification"] = a.classification
        fid = a.id or str(uuid.uuid4())
        features.append({"type": "Feature", "id": fid, "geometry": _to_geometry(a), "properties": props})
    text = json.dumps({"type": "FeatureCollection", "features": features}, indent=1)
    with atomic_write(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return str(path)


# -- CSV landmarks ---------------------------------------------------------------------------------
_COLUMNS = {("axis-0", "axis-1"): "yx", ("y", "x"): "yx", ("x", "y"): "xy"}


def _um_to_px(points: np.ndarray, spacing: Any) -> np.ndarray:
    return points if spacing is None else points / np.asarray(check_spacing(spacing, 2))


def read_landmarks_csv(path: PathLike, *, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Landmarks ``(N, 2)`` (y, x) in pixels from a CSV with a header.

    Columns ``axis-0, axis-1`` (napari Points), ``y, x`` or ``X, Y`` (ANHIR), any case, other
    columns ignored. With ``spacing`` (um/px, (y, x)) the file's values are um and are converted.
    """
    p = existing_file(path)
    with reading(p, "CSV"):
        rows = list(csv.reader(io.StringIO(p.read_text(encoding="utf-8"))))
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise InputError(f"{p} holds no landmarks; it is empty.")
    header = [cell.strip().lower() for cell in rows[0]]
    cols = None
    for names, order in _COLUMNS.items():
        if all(n in header for n in names):
            idx = [header.index(n) for n in names]
            cols = idx if order == "yx" else idx[::-1]
            break
    if cols is None:
        raise UnsupportedFileError(
            f"{p} has no landmark columns: its header must name axis-0 and axis-1 (napari), y and x, "
            f"or X and Y (ANHIR); found {rows[0]}."
        )
    try:
        pts = np.array([[float(r[cols[0]]), float(r[cols[1]])] for r in rows[1:]], dtype=np.float64)
    except (ValueError, IndexError) as exc:
        raise UnsupportedFileError(f"{p} has a landmark row that is not two numbers ({exc}).") from exc
    if len(pts) == 0:
        raise InputError(f"{p} holds no landmarks, only a header.")
    if not np.all(np.isfinite(pts)):
        raise InputError(f"{p} has NaN or infinite landmark coordinates; fix or remove those rows.")
    return _um_to_px(pts, spacing)


def write_landmarks_csv(
    path: PathLike, points: Any, *, spacing: Sequence[float] | None = None, style: str = "napari"
) -> str:
    """Write landmarks ``(N, 2)`` (y, x) pixels as CSV, atomically; returns the path.

    ``style`` "napari" writes ``index,axis-0,axis-1`` (opens as a napari Points layer), "anhir"
    writes ``,X,Y``. With ``spacing`` (um/px, (y, x)) the values are written in um.
    """
    style = check_choice("style", style, ("napari", "anhir"))
    pts = _vertices(points, "Landmarks")
    if spacing is not None:
        pts = pts * np.asarray(check_spacing(spacing, 2))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if style == "napari":
        writer.writerow(["index", "axis-0", "axis-1"])
        writer.writerows([i, repr(float(y)), repr(float(x))] for i, (y, x) in enumerate(pts))
    else:
        writer.writerow(["", "X", "Y"])
        writer.writerows([i, repr(float(x)), repr(float(y))] for i, (y, x) in enumerate(pts))
    with atomic_write(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    return str(path)


# -- napari layers ---------------------------------------------------------------------------------
def _class_name(a: Annotation) -> str:
    return str((a.classification or {}).get("name") or "")


def to_napari_shapes(
    annotations: Sequence[Annotation],
) -> tuple[list[np.ndarray], list[str], dict[str, list]]:
    """Shapes layer data of the line and polygon annotations: ``(data, shape_type, properties)``.

    LineString -> "path"; Polygon -> "polygon" (its outline: napari shapes have no holes);
    MultiPolygon -> one polygon per part. Points are left to :func:`to_napari_points`. ``properties``
    holds ``name``, ``classification`` and ``annotation`` (the index in ``annotations``).
    """
    data, types, props = [], [], {"name": [], "classification": [], "annotation": []}
    for i, a in enumerate(annotations):
        if a.kind == "LineString":
            parts, kind = [a.coords], "path"
        elif a.kind == "Polygon":
            parts, kind = [a.coords[0]], "polygon"
        elif a.kind == "MultiPolygon":
            parts, kind = [p[0] for p in a.coords], "polygon"
        else:
            continue
        for part in parts:
            data.append(part.copy())
            types.append(kind)
            props["name"].append(a.name or "")
            props["classification"].append(_class_name(a))
            props["annotation"].append(i)
    return data, types, props


def to_napari_points(annotations: Sequence[Annotation]) -> tuple[np.ndarray, dict[str, list]]:
    """Points layer data ``(N, 2)`` and properties of the Point and MultiPoint annotations."""
    rows, props = [], {"name": [], "classification": [], "annotation": []}
    for i, a in enumerate(annotations):
        if a.kind in ("Point", "MultiPoint"):
            rows.append(a.coords)
            props["name"] += [a.name or ""] * len(a.coords)
            props["classification"] += [_class_name(a)] * len(a.coords)
            props["annotation"] += [i] * len(a.coords)
    return (np.concatenate(rows) if rows else np.zeros((0, 2))), props


def _ellipse(corners: np.ndarray) -> np.ndarray:
    """A polygon on the ellipse inscribed in napari's four bounding-box corners (in order around)."""
    c = corners.mean(axis=0)
    a = (corners[1] + corners[2]) / 2 - c
    b = (corners[2] + corners[3]) / 2 - c
    t = np.linspace(0, 2 * np.pi, ELLIPSE_VERTICES, endpoint=False)[:, None]
    return c + np.cos(t) * a + np.sin(t) * b


def _prop(properties: dict | None, key: str, i: int) -> Any:
    values = (properties or {}).get(key)
    return None if values is None or i >= len(values) else values[i]


def _layer_vertices(item: Any, what: str) -> np.ndarray:
    arr = np.asarray(item, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise InputError(
            f"{what} has shape {arr.shape}; annotations are 2D (y, x). Use a 2D layer on the slide."
        )
    return arr


def _named(kind: str, coords: Any, properties: dict | None, i: int) -> Annotation:
    name, cls = _prop(properties, "name", i), _prop(properties, "classification", i)
    classification = {"name": str(cls)} if cls not in (None, "") else None
    return Annotation(kind, coords, str(name) if name not in (None, "") else None, classification)


def from_napari_shapes(
    data: Sequence[Any], shape_type: str | Sequence[str], properties: dict | None = None
) -> list[Annotation]:
    """Annotations of napari Shapes layer data (data coordinates = level-0 pixels).

    polygon, rectangle -> Polygon; ellipse -> Polygon of 64 vertices; path, line -> LineString.
    ``properties`` may hold ``name`` and ``classification`` per shape.
    """
    types = [shape_type] * len(data) if isinstance(shape_type, str) else list(shape_type)
    if len(types) != len(data):
        raise InputError(f"{len(data)} shapes but {len(types)} shape types; give one type per shape.")
    out = []
    for i, (item, kind) in enumerate(zip(data, types)):
        verts = _layer_vertices(item, f"Shape {i}")
        if kind in ("polygon", "rectangle"):
            out.append(_named("Polygon", [verts], properties, i))
        elif kind == "ellipse":
            out.append(_named("Polygon", [_ellipse(verts)], properties, i))
        elif kind in ("path", "line"):
            out.append(_named("LineString", verts, properties, i))
        else:
            raise InputError(
                f"Shape {i} has type {kind!r}; napari shapes are polygon, rectangle, ellipse, path, line."
            )
    return out


def from_napari_points(data: Any, properties: dict | None = None) -> list[Annotation]:
    """One Point annotation per row of napari Points layer data ``(N, 2)``."""
    pts = _layer_vertices(data, "Points data") if len(data) else np.zeros((0, 2))
    return [_named("Point", p[None], properties, i) for i, p in enumerate(pts)]


# -- carrying by a transform -----------------------------------------------------------------------
def _phi(transform: Transform, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return transform(torch.as_tensor(x, dtype=torch.float64)).numpy()


def _invert(transform: Transform, targets: np.ndarray, iterations: int = 50) -> np.ndarray:
    """Fixed points ``x`` with ``transform(x) = targets``: damped Newton with a finite-difference Jacobian."""
    if isinstance(transform, AffineTransform):
        inv = transform.inverse().matrix  # a singular matrix raises InputError
        return targets @ inv[:2, :2].T + inv[:2, 2]
    x = targets.copy()
    r = _phi(transform, x) - targets
    h = 0.25
    for _ in range(iterations):
        err = np.linalg.norm(r, axis=1)
        if err.max() < CARRY_TOLERANCE * 1e-2:
            break
        jac = np.stack([(_phi(transform, x + h * e) - (r + targets)) / h for e in np.eye(2)], axis=-1)
        det = np.linalg.det(jac)
        ok = np.abs(det) > 1e-9
        step = np.zeros_like(x)
        step[ok] = np.linalg.solve(jac[ok], r[ok][..., None])[..., 0]
        scale = np.ones(len(x))
        for _ in range(8):  # halve the step where the residual would grow
            trial = x - scale[:, None] * step
            r_new = _phi(transform, trial) - targets
            worse = np.linalg.norm(r_new, axis=1) > err
            if not worse.any():
                break
            scale[worse] /= 2
        x, r = trial, r_new
    bad = np.linalg.norm(r, axis=1) > CARRY_TOLERANCE
    if bad.any():
        raise InputError(
            f"{int(bad.sum())} of {len(x)} points could not be carried: no fixed point maps to them within "
            f"{CARRY_TOLERANCE} px (the transform folds there or does not reach them). Check the "
            "registration."
        )
    return x


def carry_points(points: Any, transform: Transform, *, moving_to_fixed: bool = True) -> np.ndarray:
    """Points ``(N, 2)`` (y, x, level-0 px) of one slide placed on the other.

    ``transform`` maps fixed -> moving pixels. ``moving_to_fixed=True`` (points drawn on the moving
    slide) solves ``transform(x) = p`` per point (exact for affine maps, Newton otherwise, to
    0.01 px); ``False`` applies the map itself.
    """
    pts = _vertices(points, "Points", 0) if len(points) else np.zeros((0, 2))
    if not isinstance(transform, Transform) or transform.ndim != 2:
        raise InputError(f"carry needs a 2D napari_nephi Transform, got {transform!r}.")
    if len(pts) == 0:
        return pts
    return _invert(transform, pts) if moving_to_fixed else _phi(transform, pts)


def carry(
    annotations: Sequence[Annotation], transform: Transform, *, moving_to_fixed: bool = True
) -> list[Annotation]:
    """Annotations drawn on the moving slide placed on the fixed slide (or the reverse, ``False``).

    Every vertex is carried by :func:`carry_points`; names, classes and properties are kept.
    """
    counts = [len(a.points()) for a in annotations]
    if not counts:
        return []
    moved = carry_points(
        np.concatenate([a.points() for a in annotations]), transform, moving_to_fixed=moving_to_fixed
    )
    out, start = [], 0
    for a, n in zip(annotations, counts):
        out.append(a.with_points(moved[start : start + n]))
        start += n
    return out
