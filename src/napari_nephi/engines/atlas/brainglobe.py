"""brainglobe atlases from the user's local brainglobe cache (the ``brainglobe`` extra); never downloads.

``AtlasLookup.from_brainglobe("allen_mouse_25um")`` trains on the atlas's reference with its
annotation and structure names. brainglobe atlases are stored ASR (anterior-posterior first), so
axis 0 holds the coronal plates.
"""

from __future__ import annotations

import importlib
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


def load_brainglobe(name: str) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """``(reference, annotation, {label value: structure name})`` of a locally cached brainglobe atlas.

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
    atlas = api.BrainGlobeAtlas(name, check_latest=False)
    reference = np.asarray(atlas.reference)
    annotation = np.asarray(atlas.annotation)
    names: dict[int, str] = {}
    for key, value in dict(atlas.structures).items():
        label = value.get("name") if isinstance(value, dict) else getattr(value, "name", None)
        if label is not None and isinstance(key, (int, np.integer)):
            names[int(key)] = str(label)
    return reference, annotation, names
