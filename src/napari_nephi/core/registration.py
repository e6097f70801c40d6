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

        The folder is written atomically (see :func:`napari_nephi.core.files.output_folder`): an
        earlier output there is replaced as a whole; a folder holding other files is refused.
        """
        import tifffile

        folder = Path(folder)
        with output_folder(folder) as tmp:
            self.transform.save(tmp / "transform")
            (tmp / "metrics.json").write_text(json.dumps(self.metrics, indent=2, default=str))
            (tmp / "settings.json").write_text(json.dumps(self.settings, indent=2, default=str))
            tifffile.imwrite(tmp / "warped.tif", np.asarray(self.warped, np.float32))
        return folder


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
