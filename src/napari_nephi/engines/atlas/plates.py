"""The atlas as a list of 2D plates: from a 3D reference volume or from plates of different shapes.

Plates are stored as float32 grey images in [0, 1] (:func:`.preprocess.to_grey`), with optional
integer labels of the same shape. A 3D reference keeps its volume (normalised as a whole, so
neighbouring plates stay comparable and oblique re-slices are possible); a list of plates is
normalised plate by plate. Inputs are copied, never modified.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import cv2
import numpy as np

from napari_nephi.core.errors import DimensionMismatchError, InputError
from napari_nephi.core.options import check_int

from .preprocess import tissue_mask, to_grey

__all__ = ["Plates", "index_ranges", "region_names_from_table"]

#: Columns of a table of region names (a CSV, a Labels layer's features): the label values, and the
#: names; the first column found of each tuple is used.
VALUE_COLUMNS = ("label", "index", "value", "id")
NAME_COLUMNS = ("name", "region", "acronym")

#: Longest side of the downsampled copy of each plate that :meth:`Plates.fingerprint` hashes.
FINGERPRINT_SIZE = 32
_MIN_SIDE = 8


def index_ranges(indices: Sequence[int]) -> str:
    """Compact text of sorted indices: ``[0, 1, 2, 7]`` -> ``"0-2, 7"``."""
    parts: list[str] = []
    idx = sorted(int(i) for i in indices)
    start = prev = None
    for i in [*idx, None]:
        if start is not None and (i is None or i != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    return ", ".join(parts)


def region_names_from_table(table, what: str = "the table") -> dict[int, str]:
    """``{label value: name}`` from a mapping of columns (a CSV's, a DataFrame): one column of
    :data:`VALUE_COLUMNS` and one of :data:`NAME_COLUMNS`, matched without case or spaces.

    Raises :class:`InputError` naming the columns when either is missing or a value is not whole.
    """
    columns = {str(c).strip().lower(): c for c in table}
    value = next((columns[c] for c in VALUE_COLUMNS if c in columns), None)
    name = next((columns[c] for c in NAME_COLUMNS if c in columns), None)
    if value is None or name is None:
        raise InputError(
            f"{what} needs a value column ({', '.join(VALUE_COLUMNS)}) and a name column "
            f"({', '.join(NAME_COLUMNS)}); it has {list(columns) or 'none'}."
        )
    out = {}
    for v, n in zip(table[value], table[name], strict=True):
        if v is None or not str(v).strip():
            continue
        try:
            out[int(str(v).strip())] = "" if n is None else str(n).strip()
        except ValueError as exc:
            raise InputError(f"{what}: label values must be whole numbers, got {v!r}.") from exc
    return out


def _resize_longest(image: np.ndarray, longest: int) -> np.ndarray:
    """``image`` (2D float32) resized so its longer side is ``longest`` (area when shrinking)."""
    h, w = image.shape
    scale = longest / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return np.array(image, dtype=np.float32, copy=True)
    mode = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(image, dtype=np.float32), size, interpolation=mode)


def _numeric(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise InputError(f"The {what} must hold real numbers, got dtype {arr.dtype}.")
    return arr


def _nonfinite_plates(stack: np.ndarray) -> list[int]:
    """Indices along axis 0 of plates holding NaN or infinite values."""
    if stack.dtype.kind != "f":
        return []
    return [i for i in range(stack.shape[0]) if not np.isfinite(stack[i]).all()]


def _raise_nonfinite(bad: list[int]) -> None:
    if bad:
        which = "Plate" if len(bad) == 1 else "Plates"
        raise InputError(
            f"{which} {index_ranges(bad)} of the reference contain{'s' if len(bad) == 1 else ''} NaN or "
            "infinite values; fill them (e.g. with the background value) or remove those plates."
        )


def _as_labels(arr, shape: tuple[int, ...], what: str) -> np.ndarray:
    """An integer copy of the label array ``arr`` of ``shape``, or :class:`InputError`."""
    lab = _numeric(np.asarray(arr), what)
    if lab.shape != shape:
        raise DimensionMismatchError(
            f"The {what} has shape {lab.shape} but its plates have {shape}; give labels of the "
            "reference's shape (the same plate axis)."
        )
    if lab.dtype.kind == "f":
        if not np.isfinite(lab).all() or not np.array_equal(lab, np.round(lab)):
            raise InputError(
                f"The {what} must hold integer labels (region values); it holds NaN or fractional values."
            )
        return lab.astype(np.int64)
    if lab.dtype.kind == "b":
        return lab.astype(np.int32)
    return np.array(lab, copy=True)


def _check_count(n: int) -> None:
    if n < 2:
        raise InputError(
            f"The atlas has {n} plate{'s' if n != 1 else ''}; a lookup needs at least 2 plates "
            "(a 3D volume or a list of 2D plates)."
        )


class Plates:
    """The atlas: ``n`` grey float32 plates in [0, 1] (2D, possibly of different shapes), optional labels.

    Build it with :meth:`from_reference`. The constructor itself takes plates that are already
    normalised (float in [0, 1]), e.g. read back from a saved index: a 3D array (its volume) or a
    list of 2D arrays, and labels to match.
    """

    def __init__(self, plates, labels=None):
        if isinstance(plates, np.ndarray) and plates.ndim == 3:
            vol = np.array(plates, dtype=np.float32, copy=True)
            self._volume: np.ndarray | None = vol
            self._plates = list(vol)
        elif isinstance(plates, (list, tuple)) or (isinstance(plates, np.ndarray) and plates.ndim == 1):
            self._volume = None
            self._plates = [np.array(p, dtype=np.float32, copy=True) for p in plates]
        else:
            raise InputError(
                "Plates takes a 3D array (n, y, x) or a list of 2D plates; use Plates.from_reference for "
                f"raw images. Got {type(plates).__name__}."
            )
        _check_count(len(self._plates))
        for i, p in enumerate(self._plates):
            if p.ndim != 2 or min(p.shape) < _MIN_SIDE:
                raise InputError(
                    f"Plate {i} must be 2D with sides of {_MIN_SIDE} pixels or more, got {p.shape}."
                )
            if not np.isfinite(p).all() or p.min() < 0 or p.max() > 1:
                raise InputError(
                    f"Plate {i} must hold values in [0, 1]; "
                    "use Plates.from_reference to normalise raw plates."
                )
        self._labels: list[np.ndarray] | None = None
        if labels is not None:
            if isinstance(labels, np.ndarray) and labels.ndim == 3:
                labels = list(labels)
            if not isinstance(labels, (list, tuple)) or len(labels) != len(self._plates):
                raise DimensionMismatchError(
                    f"Give one label image per plate ({len(self._plates)}), got "
                    f"{len(labels) if isinstance(labels, (list, tuple)) else type(labels).__name__}."
                )
            self._labels = [
                _as_labels(lab, p.shape, f"annotation of plate {i}")
                for i, (lab, p) in enumerate(zip(labels, self._plates, strict=True))
            ]
        if self._volume is not None:
            self._volume.flags.writeable = False
        for p in self._plates:
            p.flags.writeable = False
        self._fingerprint: str | None = None

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_reference(cls, reference, annotation=None, *, plate_axis: int = 0) -> Plates:
        """The plates of a 3D reference volume or of a list of 2D plates, with optional labels.

        ``reference``: a 3D volume with plates along ``plate_axis`` (0 to 2, or -3 to -1 from the
        end; grey ``(z, y, x)`` or RGB ``(z, y, x, 3|4)``), normalised as a whole; or a list/tuple
        of 2D grey or RGB plates of any shapes, each normalised on its own. ``annotation``: integer
        labels, a volume of the reference's spatial shape or a list of one label image per plate. Raises
        :class:`InputError` for fewer than 2 plates, plates without tissue (named), NaN values or
        labels of the wrong shape.
        """
        if isinstance(reference, Plates):
            if annotation is not None:
                raise InputError("The reference is already a Plates object; it carries its own labels.")
            return reference
        if reference is None:
            raise InputError("No reference given: pass a 3D volume or a list of 2D plates.")
        if isinstance(reference, (list, tuple)):
            if plate_axis != 0:
                raise InputError(
                    "plate_axis applies only to a 3D volume; a list of plates has no plate axis (leave it 0)."
                )
            plates = _plates_from_list(reference)
            volume = None
            labels = None
            if annotation is not None:
                if not isinstance(annotation, (list, tuple)) or len(annotation) != len(plates):
                    raise DimensionMismatchError(
                        f"The annotation of a list of {len(plates)} plates must be a list of as many label "
                        f"images, got {type(annotation).__name__}"
                        + (f" of {len(annotation)}" if isinstance(annotation, (list, tuple)) else "")
                        + "."
                    )
                labels = [
                    _as_labels(a, p.shape, f"annotation of plate {i}")
                    for i, (a, p) in enumerate(zip(annotation, plates, strict=True))
                ]
        else:
            volume = _volume_from_array(reference, plate_axis)
            plates = list(volume)
            labels = None
            if annotation is not None:
                raw = _numeric(np.asarray(annotation), "annotation")
                spatial = np.asarray(reference).shape[:3]
                if raw.shape != spatial:
                    raise DimensionMismatchError(
                        f"The annotation has shape {raw.shape} but the reference volume has {spatial}; give "
                        "labels of the same shape."
                    )
                axis = _plate_axis(plate_axis)
                labels = _as_labels(np.moveaxis(raw, axis, 0), volume.shape, "annotation")
        _check_tissue(plates, volume is not None)
        out = cls.__new__(cls)
        out._volume = volume
        out._plates = plates
        out._labels = list(labels) if labels is not None else None
        if volume is not None:
            volume.flags.writeable = False
        for p in plates:
            p.flags.writeable = False
        out._fingerprint = None
        return out

    # -- access --------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        """Number of plates."""
        return len(self._plates)

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        kind = f"volume {self._volume.shape}" if self._volume is not None else "list"
        return f"Plates(n={self.n}, {kind}, labels={self.has_labels})"

    @property
    def volume(self) -> np.ndarray | None:
        """Read-only float32 ``(n, y, x)`` in [0, 1] when built from a 3D volume, else ``None``."""
        return self._volume

    @property
    def has_labels(self) -> bool:
        """Whether every plate has a label image."""
        return self._labels is not None

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """``(y, x)`` shape of every plate."""
        return [tuple(int(s) for s in p.shape) for p in self._plates]

    def _index(self, i) -> int:
        try:
            idx = check_int("plate index", i)
        except InputError as exc:
            raise InputError(f"A plate index must be a whole number, got {i!r}.") from exc
        if not 0 <= idx < self.n:
            raise InputError(
                f"Plate index {idx} is out of range: the atlas has {self.n} plates (0-{self.n - 1})."
            )
        return idx

    def plate(self, i: int) -> np.ndarray:
        """A float32 copy of plate ``i`` in [0, 1]."""
        return self._plates[self._index(i)].copy()

    def labels(self, i: int) -> np.ndarray | None:
        """A copy of the integer labels of plate ``i``, or ``None`` when the atlas has none."""
        idx = self._index(i)
        return None if self._labels is None else self._labels[idx].copy()

    def thumbnail(self, i: int, size: int = 96) -> np.ndarray:
        """Plate ``i`` as float32 with its longer side ``size`` pixels (aspect ratio kept)."""
        size = check_int("size", size, 8, 4096)
        return _resize_longest(self._plates[self._index(i)], size)

    def fingerprint(self) -> str:
        """sha256 hex digest of a small downsampled copy of every plate and of the plate shapes.

        Equal atlases give equal strings; a change to a plate that shows at 32 pixels (the longer
        side) changes it. Labels are not part of it.
        """
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(f"plates:{self.n}".encode())
            for p in self._plates:
                h.update(f"|{p.shape[0]}x{p.shape[1]}|".encode())
                small = _resize_longest(p, FINGERPRINT_SIZE)
                h.update(np.round(np.clip(small, 0, 1) * 255).astype(np.uint8).tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint


def _plates_from_list(reference: Sequence) -> list[np.ndarray]:
    """Normalised float32 copies of a list of 2D grey or RGB(A) plates."""
    _check_count(len(reference))
    plates = []
    blank = []
    bad = []
    for i, item in enumerate(reference):
        arr = _numeric(np.asarray(item), f"plate {i}")
        rgb = arr.ndim == 3 and arr.shape[-1] in (3, 4)
        if arr.ndim != 2 and not rgb:
            raise InputError(
                f"Plate {i} has shape {arr.shape}; every plate must be 2D (y, x) or RGB (y, x, 3|4). "
                "For a 3D volume pass the array itself, not a list."
            )
        if min(arr.shape[:2]) < _MIN_SIDE:
            raise InputError(
                f"Plate {i} {arr.shape} is too small: both sides need {_MIN_SIDE} pixels or more."
            )
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad.append(i)
            continue
        if arr.min() == arr.max():
            blank.append(i)
            plates.append(None)
            continue
        plates.append(to_grey(arr, f"plate {i}"))
    _raise_nonfinite(bad)
    if blank:
        _raise_no_tissue(blank, False)
    return plates


def _plate_axis(plate_axis) -> int:
    """``plate_axis`` of a 3D volume as 0, 1 or 2 (numpy's -3 to -1 count from the end)."""
    return check_int("plate_axis", plate_axis, -3, 2) % 3


def _volume_from_array(reference, plate_axis) -> np.ndarray:
    """Normalised float32 ``(n, y, x)`` of a grey or RGB(A) 3D volume with plates along ``plate_axis``."""
    arr = _numeric(np.asarray(reference), "reference")
    rgb = arr.ndim == 4 and arr.shape[-1] in (3, 4)
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4) and min(arr.shape[:2]) > 8):
        raise InputError(
            f"The reference has shape {arr.shape}: a single plate. A lookup needs at least 2 plates: "
            "pass a 3D volume (z, y, x) or a list of 2D plates."
        )
    if arr.ndim != 3 and not rgb:
        raise InputError(
            "The reference must be a 3D volume (z, y, x), an RGB volume (z, y, x, 3) or a list of 2D "
            f"plates, "
            f"got shape {arr.shape}."
        )
    axis = _plate_axis(plate_axis)
    vol = np.moveaxis(arr, axis, 0)
    _check_count(vol.shape[0])
    if min(vol.shape[1:3]) < _MIN_SIDE:
        raise InputError(
            f"The plates of the reference are {vol.shape[1:3]}: both sides need {_MIN_SIDE} pixels or more. "
            "Is plate_axis right?"
        )
    _raise_nonfinite(_nonfinite_plates(vol))
    n, h, w = vol.shape[:3]
    if float(vol.min()) == float(vol.max()):
        _raise_no_tissue(list(range(n)), True)
    flat = to_grey(np.ascontiguousarray(vol).reshape((n * h, w, *vol.shape[3:])), "reference")
    return flat.reshape(n, h, w)


def _check_tissue(plates: list[np.ndarray], from_volume: bool) -> None:
    blank = [i for i, p in enumerate(plates) if not tissue_mask(p).any()]
    if blank:
        _raise_no_tissue(blank, from_volume)


def _raise_no_tissue(blank: list[int], from_volume: bool) -> None:
    which = "Plate" if len(blank) == 1 else "Plates"
    hint = (
        "Crop the volume to the plates that show the brain "
        "(e.g. reference[first:last + 1] along the plate axis)."
        if from_volume
        else "Remove them from the list."
    )
    raise InputError(
        f"{which} {index_ranges(blank)} show{'s' if len(blank) == 1 else ''} no tissue "
        f"(blank or constant). {hint}"
    )
