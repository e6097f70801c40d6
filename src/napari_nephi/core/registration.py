"""``Registration``, the result every engine returns, and ``Pair``, the validated inputs it gets.

The engine registry and the ``register()`` entry point live in :mod:`napari_nephi.engines.registry`
(``core`` imports no engine).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .files import atomic_write_bytes, output_folder, publish  # noqa: F401 (re-exported)
from .progress import Progress
from .transform import Transform


@dataclass
class Registration:
    """Result of a registration: ``warped`` moving image on the fixed grid and its transform."""

    warped: np.ndarray
    transform: Transform
    metrics: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def save(self, folder) -> Path:
        """Write ``transform/``, ``warped.tif``, ``metrics.json`` and ``settings.json`` to ``folder``.

        Array-valued metrics (e.g. the atlas labels carried onto a section) are written beside
        them as ``metric_<name>.tif`` and named in ``metrics.json``. Engines whose ``warped`` is
        not one in-memory image (a whole slide's pyramid) override :meth:`write_warped`.

        The folder is written atomically (see :func:`napari_nephi.core.files.output_folder`): an
        earlier output there is replaced as a whole, also one saved by a version that wrote no
        output marker (it holds only these names and a saved transform); a folder holding other
        files is refused.
        """
        import tifffile

        folder = Path(folder)
        metrics = {}
        with output_folder(folder, earlier_output=saved_without_marker) as tmp:
            self.transform.save(tmp / "transform")
            for key, value in self.metrics.items():
                if isinstance(value, np.ndarray) and value.ndim >= 1:
                    name = f"metric_{key}.tif"
                    tifffile.imwrite(tmp / name, value)
                    metrics[key] = {"file": name, "shape": list(value.shape), "dtype": str(value.dtype)}
                else:
                    metrics[key] = value
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
            (tmp / "settings.json").write_text(json.dumps(self.settings, indent=2, default=str))
            self.write_warped(tmp)
        return folder

    def write_warped(self, folder: Path) -> None:
        """Write ``warped`` into the (temporary) output ``folder``: ``warped.tif`` here."""
        import tifffile

        tifffile.imwrite(folder / "warped.tif", np.asarray(self.warped, np.float32))


#: What :meth:`Registration.save` of an earlier version wrote into its folder (it wrote no output marker).
SAVED_NAMES = ("transform", "warped.tif", "metrics.json", "settings.json")


def saved_without_marker(folder: Path) -> bool:
    """Whether ``folder`` was written by :meth:`Registration.save` of a version with no output marker.

    True when it holds a saved napari-nephi transform in ``transform/`` and nothing but
    :data:`SAVED_NAMES` and the temporary files a killed save of those left (``.NAME.*``).
    """
    from .transform_io import FORMAT

    try:
        meta = json.loads((folder / "transform" / "transform.json").read_text(encoding="utf-8"))
        names = [entry.name for entry in folder.iterdir()]
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return False
    return all(name in SAVED_NAMES or name.startswith(tuple(f".{n}." for n in SAVED_NAMES)) for name in names)


@dataclass
class Pair:
    """Validated inputs handed to an engine."""

    fixed: np.ndarray
    moving: np.ndarray
    spacing: tuple[float, ...]
    fixed_mask: np.ndarray | None
    moving_mask: np.ndarray | None
    progress: Progress
    device: str
    notes: list[str]
    #: The caller's ``rgb`` flag; only whole-slide engines read it (others get converted images).
    rgb: bool | None = None
