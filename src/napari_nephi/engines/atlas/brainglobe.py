"""brainglobe atlases from the user's local brainglobe cache (the ``brainglobe`` extra); never downloads.

``AtlasLookup.from_brainglobe("allen_mouse_25um")`` trains on the atlas's reference with its
annotation and structure names. brainglobe atlases are stored ASR (anterior-posterior first), so
axis 0 holds the coronal plates. Blank plates in front of and behind the brain (no label, no
contrast: empty space in the volume) are left out; ``settings["brainglobe"]`` of the lookup keeps the
atlas's name, resolution, shape and the anterior-posterior index of every plate
(``plate_positions``), from which ``napari-nephi atlas-lookup`` writes the QuickNII anchoring.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...core.errors import InputError

INSTALL_HINT = 'pip install "napari-nephi[brainglobe]"'


def _api():
    try:
        return importlib.import_module("brainglobe_atlasapi")
    except ImportError as exc:
        raise InputError(
            f"brainglobe atlases need the brainglobe extra, which is not installed: run {INSTALL_HINT}, "
            "or pass the atlas as a 3D volume or a list of plates."
        ) from exc


def _cache_dirs(api) -> list[Path]:
    """Folders brainglobe keeps its atlases in (its configured folder and the default one)."""
    dirs = []
    try:
        config = importlib.import_module(f"{api.__name__}.config")
        dirs.append(Path(config.get_brainglobe_dir()))
    except (ImportError, AttributeError, KeyError, OSError, TypeError):
        pass
    dirs.append(Path.home() / ".brainglobe")
    return dirs


def is_cached(name: str, api=None) -> bool:
    """Whether the atlas ``name`` is in the local brainglobe cache (looks at folders only)."""
    api = api or _api()
    try:
        listing = importlib.import_module(f"{api.__name__}.list_atlases")
        if name in listing.get_downloaded_atlases():
            return True
    except (ImportError, AttributeError, OSError, TypeError):
        pass
    for root in _cache_dirs(api):
        for base in (root, root / "brainglobe-atlasapi"):
            if any(p.is_dir() for p in base.glob(f"{name}_v*")):  # v1/v2 layout: NAME_vX.Y
                return True
            if any(base.glob(f"atlases/{name}/*/manifest.json")):  # v3 layout
                return True
    return False


@dataclass(frozen=True)
class CachedAtlas:
    """A brainglobe atlas read from the local cache, without the blank plates around the brain."""

    name: str
    reference: np.ndarray
    annotation: np.ndarray
    names: dict[int, str]
    #: Micrometres per voxel along (anterior-posterior, superior-inferior, right-left), or None.
    resolution: tuple[float, float, float] | None
    #: Shape of the whole atlas volume, ``asr`` order (before the crop).
    shape: tuple[int, int, int]
    #: Anterior-posterior index in the whole atlas of each plate kept.
    positions: tuple[int, ...]

    def info(self) -> dict:
        """What a lookup keeps of the atlas (``settings["brainglobe"]``; JSON-ready)."""
        return {
            "name": self.name,
            "resolution": None if self.resolution is None else list(self.resolution),
            "shape": list(self.shape),
            "plate_positions": list(self.positions),
        }


def _resolution(atlas, name: str) -> tuple[float, float, float] | None:
    """Voxel size in um: the atlas's own, else the ``_25um`` of its name, else None."""
    value = getattr(atlas, "resolution", None)
    try:
        if value is not None and len(value) == 3:
            return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        pass
    found = re.search(r"_(\d+(?:\.\d+)?)um", name)
    return (float(found.group(1)),) * 3 if found else None


#: A plate whose reference varies by less than this share of the volume's range is blank.
BLANK_RANGE = 0.01


def _brain_range(reference: np.ndarray, annotation: np.ndarray) -> tuple[int, int]:
    """First and last plate (axis 0) of the brain: the end plates that are blank (no label, reference
    range under :data:`BLANK_RANGE` of the volume's) are left out."""
    n = reference.shape[0]
    flat = reference.reshape(n, -1)
    lo, hi = flat.min(axis=1).astype(np.float64), flat.max(axis=1).astype(np.float64)
    span = float(hi.max() - lo.min())
    labelled = np.asarray(annotation != 0).reshape(n, -1).any(axis=1)
    keep = np.flatnonzero(labelled | (hi - lo > BLANK_RANGE * span))
    if keep.size == 0:
        return 0, n - 1
    return int(keep[0]), int(keep[-1])


def read_brainglobe(name: str) -> CachedAtlas:
    """A locally cached brainglobe atlas without the blank plates in front of and behind the brain.

    Raises :class:`InputError` when the extra is missing or the atlas is not cached (offline use
    never downloads; the message says how to download it).
    """
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"A brainglobe atlas name is a string such as 'allen_mouse_25um', got {name!r}.")
    api = _api()
    if not is_cached(name, api):
        raise InputError(
            f"The brainglobe atlas {name!r} is not in the local brainglobe cache, and napari-nephi never "
            f"downloads atlases. On a machine with network run `brainglobe install -a {name}` (copy its "
            "~/.brainglobe folder here if this machine is offline), then try again."
        )
    try:
        atlas = api.BrainGlobeAtlas(name, check_latest=False)
        reference = np.asarray(atlas.reference)
        annotation = np.asarray(atlas.annotation)
    except (OSError, ValueError, KeyError) as exc:  # a damaged cache folder, or a download attempted
        raise InputError(
            f"The brainglobe atlas {name!r} in the local cache could not be read ({type(exc).__name__}: "
            f"{exc}). Install it again with `brainglobe install -a {name}` on a machine with network."
        ) from exc
    if reference.ndim != 3 or annotation.shape != reference.shape:
        raise InputError(
            f"The brainglobe atlas {name!r} has a reference of shape {reference.shape} and an annotation of "
            f"shape {annotation.shape}; both must be the same 3D volume. Reinstall it (brainglobe install)."
        )
    names: dict[int, str] = {}
    for key, value in dict(atlas.structures).items():
        label = value.get("name") if isinstance(value, dict) else getattr(value, "name", None)
        if label is not None and isinstance(key, (int, np.integer)):
            names[int(key)] = str(label)
    first, last = _brain_range(reference, annotation)
    return CachedAtlas(
        name=name,
        reference=reference[first : last + 1],
        annotation=annotation[first : last + 1],
        names=names,
        resolution=_resolution(atlas, name),
        shape=tuple(int(s) for s in reference.shape),
        positions=tuple(range(first, last + 1)),
    )


def train_brainglobe(cls, name: str, **options):
    """An index (``cls``: :class:`~.lookup.AtlasLookup`) trained on the cached brainglobe atlas ``name``.

    ``options``: those of ``cls.train`` (the structure names are the default ``region_names``).
    The lookup's ``settings["brainglobe"]`` holds :meth:`CachedAtlas.info`.
    """
    atlas = read_brainglobe(name)
    if "plate_axis" in options and options["plate_axis"] != 0:
        raise InputError("A brainglobe atlas has its plates along its first axis; leave plate_axis at 0.")
    options.pop("plate_axis", None)
    options.setdefault("region_names", atlas.names)
    lk = cls.train(atlas.reference, atlas.annotation, **options)
    settings = {**lk.settings, "brainglobe": atlas.info()}
    device = str(next(lk.net.parameters()).device)
    return cls(lk.net, lk.plates, lk.embeddings, settings, lk.region_names, device=device)
