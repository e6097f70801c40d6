"""Trained NePhi weights shipped with the package (made by ``scripts/train_tc_weights.py``)."""

from __future__ import annotations

from pathlib import Path

_DATA = Path(__file__).resolve().parents[2] / "data"

#: Name -> file of the built-in models; ``weights="tc"`` selects one by name.
BUILTIN: dict[str, Path] = {"tc": _DATA / "nephi_tc2d.pt"}

#: What each built-in model was trained on (shown in the widget).
DESCRIPTIONS: dict[str, str] = {"tc": "Triangles and circles, 2D (trained at 64 x 64)"}


def builtin_path(name: str) -> Path | None:
    """The file of a built-in model named ``name``, or None for other names."""
    return BUILTIN.get(str(name).lower())
