"""The one entry point, ``register``, and the ``Registration`` result every engine returns."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .files import atomic_write_bytes, publish  # noqa: F401 (re-exported)
from .grid import check_spacing
from .inputs import check_pair, prepare_image, prepare_mask
from .progress import CancelFlag, Progress, ProgressCallback
from .transform import Transform


@dataclass
class Registration:
    """Result of a registration: ``warped`` moving image on the fixed grid and its transform."""

    warped: np.ndarray
    transform: Transform
    metrics: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def save(self, folder) -> Path:
        """Write ``transform/``, ``warped.tif``, ``metrics.json`` and ``settings.json`` to ``folder``."""
        import tifffile

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.transform.save(folder / "transform")
        atomic_write_bytes(folder / "metrics.json", json.dumps(self.metrics, indent=2, default=str).encode())
        atomic_write_bytes(
            folder / "settings.json", json.dumps(self.settings, indent=2, default=str).encode()
        )
        tmp = folder / ".warped.tif.tmp"
        tifffile.imwrite(tmp, self.warped.astype(np.float32))
        os.replace(tmp, folder / "warped.tif")
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


Engine = Callable[..., Registration]
_ENGINES: dict[str, Engine] = {}


def register_engine(name: str) -> Callable[[Engine], Engine]:
    """Decorator: make ``func(pair, **options) -> Registration`` available as ``method=name``."""

    def deco(func: Engine) -> Engine:
        _ENGINES[name] = func
        return func

    return deco


def available_methods() -> list[str]:
    _load_builtin_engines()
    return sorted(_ENGINES)


def _load_builtin_engines() -> None:
    import importlib

    importlib.import_module("napari_nephi.engines")  # engines register themselves on import


def register(
    fixed,
    moving,
    method: str = "affine",
    spacing: Sequence[float] | None = None,
    device: str = "auto",
    progress: ProgressCallback | None = None,
    cancel: CancelFlag = None,
    fixed_mask=None,
    moving_mask=None,
    rgb: bool | None = None,
    **options: Any,
) -> Registration:
    """Register ``moving`` onto ``fixed`` with the engine ``method``.

    Images are numpy-like, 2D ``(y, x)`` or 3D ``(z, y, x)``; ``spacing`` is the fixed image's
    voxel size. ``progress`` receives :class:`~napari_nephi.core.progress.ProgressEvent` objects;
    setting ``cancel`` (a ``threading.Event`` or a callable) stops the engine with ``Cancelled``.
    Inputs are never modified.
    """
    _load_builtin_engines()
    if method not in _ENGINES:
        raise InputError(f"Unknown method {method!r}; available: {', '.join(sorted(_ENGINES))}.")
    notes: list[str] = []
    f = prepare_image(fixed, "fixed", rgb, notes)
    m = prepare_image(moving, "moving", rgb, notes)
    check_pair(f, m)
    sp = check_spacing(spacing, f.ndim)
    pair = Pair(
        fixed=f,
        moving=m,
        spacing=sp,
        fixed_mask=prepare_mask(fixed_mask, f.shape, "fixed mask"),
        moving_mask=prepare_mask(moving_mask, m.shape, "moving mask"),
        progress=Progress(progress, cancel),
        device=device,
        notes=notes,
    )
    start = time.perf_counter()
    result = _ENGINES[method](pair, **options)
    result.metrics.setdefault("seconds", time.perf_counter() - start)
    if notes:
        result.metrics.setdefault("notes", notes)
    result.settings = {"method": method, "spacing": list(sp), "device": device, **result.settings}
    result.transform.settings = dict(result.settings)
    return result
