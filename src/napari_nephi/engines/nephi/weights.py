"""Trained NePhi weights shipped with the package.

``tc`` is made by ``scripts/train_tc_weights.py``, ``general2d`` by ``scripts/train_general2d.py``.
"""

from __future__ import annotations

from pathlib import Path

_DATA = Path(__file__).resolve().parents[2] / "data"

#: Name -> file of the built-in models; ``weights="tc"`` selects one by name.
BUILTIN: dict[str, Path] = {
    "tc": _DATA / "nephi_tc2d.pt",
    "general2d": _DATA / "nephi_general2d.pt",
}

#: What each built-in model was trained on (shown in the widget).
DESCRIPTIONS: dict[str, str] = {
    "tc": "Triangles and circles, 2D (trained at 64 x 64)",
    "general2d": "General 2D: photographs, microscopy, textures, MRI slices (trained at 128 x 128)",
}

#: The script in the repository that reproduces each built-in model.
SCRIPTS: dict[str, str] = {"tc": "scripts/train_tc_weights.py", "general2d": "scripts/train_general2d.py"}

#: The built-in model the predict modes use by default, per number of image dimensions.
DEFAULTS: dict[int, str] = {2: "general2d"}


def builtin_path(name: str) -> Path | None:
    """The file of a built-in model named ``name``, or None for other names."""
    return BUILTIN.get(str(name).lower())


def default_model(ndim: int) -> str | None:
    """Name of the built-in model the predict modes use for ``ndim``-D images, or None.

    None when no default exists for that dimensionality or its file is missing from this installation.
    """
    name = DEFAULTS.get(int(ndim))
    if name is None or not BUILTIN[name].is_file():
        return None
    return name
