"""The engine registry and the one entry point, :func:`register`.

Engines register themselves with :func:`register_engine` when :mod:`napari_nephi.engines` is
imported; ``core`` knows nothing about them. An engine is ``func(pair, **options) -> Registration``
whose options are explicit keyword parameters: :func:`register` refuses any other name with an
:class:`~napari_nephi.core.errors.InputError` that lists the valid ones.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.device import choose_device, memory_guard
from ..core.errors import InputError
from ..core.grid import check_spacing
from ..core.inputs import check_pair, prepare_image, prepare_mask
from ..core.options import check_known
from ..core.progress import CancelFlag, Progress, ProgressCallback
from ..core.registration import Pair, Registration

Engine = Callable[..., Registration]


@dataclass(frozen=True)
class EngineInfo:
    """A registered engine: its function, a one-line description and its option names."""

    name: str
    func: Engine
    description: str
    #: The engine takes whole slides: ``register`` hands it the inputs as given (numpy or dask arrays, or
    #: pyramids as lists of levels), unloaded and unchecked, and the engine validates them itself.
    whole_slides: bool = False

    @property
    def options(self) -> tuple[str, ...] | None:
        """The engine's option names, or None when it still takes ``**kwargs`` (names unchecked)."""
        return engine_options(self.func)


_ENGINES: dict[str, EngineInfo] = {}


def register_engine(
    name: str, description: str = "", *, whole_slides: bool = False
) -> Callable[[Engine], Engine]:
    """Decorator: make ``func(pair, **options) -> Registration`` available as ``method=name``.

    ``description`` is the one line ``napari-nephi methods`` prints next to the name. With
    ``whole_slides`` the engine gets ``pair.fixed`` / ``pair.moving`` (and the masks) exactly as the
    caller gave them, never loaded into memory, and ``pair.spacing`` as given (``None`` when unknown).
    """

    def deco(func: Engine) -> Engine:
        doc = (inspect.getdoc(func) or "").strip().splitlines()
        _ENGINES[name] = EngineInfo(name, func, description or (doc[0] if doc else ""), whole_slides)
        return func

    return deco


def unregister_engine(name: str) -> None:
    """Remove the method ``name`` (a plugin's or a test's engine); unknown names are ignored."""
    _ENGINES.pop(name, None)


def _load_builtin_engines() -> None:
    import importlib

    importlib.import_module("napari_nephi.engines")  # engines register themselves on import


def available_methods() -> list[str]:
    """Names of the registered methods, sorted."""
    _load_builtin_engines()
    return sorted(_ENGINES)


def method_descriptions() -> dict[str, str]:
    """``{name: one-line description}`` of every registered method, sorted by name."""
    _load_builtin_engines()
    return {name: _ENGINES[name].description for name in sorted(_ENGINES)}


def engine_info(method: str) -> EngineInfo:
    """The registered engine ``method``; :class:`InputError` naming the available ones otherwise."""
    _load_builtin_engines()
    if method not in _ENGINES:
        raise InputError(f"Unknown method {method!r}; available: {', '.join(sorted(_ENGINES))}.")
    return _ENGINES[method]


def engine_options(func: Engine) -> tuple[str, ...] | None:
    """Keyword parameters of an engine function after ``pair``; None if it takes ``**kwargs``."""
    params = list(inspect.signature(func).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in params if p.kind in kinds)


def check_options(method: str, options: dict) -> None:
    """Raise :class:`InputError` if ``options`` holds a name engine ``method`` does not take."""
    valid = engine_info(method).options
    if valid is not None:
        check_known(method, options, valid)


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
    Option names the engine does not take raise :class:`InputError` listing the valid ones, an
    unknown or unavailable ``device`` an :class:`InputError`, and running out of memory an
    :class:`~napari_nephi.core.errors.OutOfMemoryError`. Notes on the inputs and the engine's
    own notes are in ``metrics["notes"]``. Inputs are never modified.
    """
    info = engine_info(method)
    check_options(method, options)
    choose_device(device)  # the same error for every engine, before any work
    prog = Progress(progress, cancel)  # checks the callbacks, before any work too
    notes: list[str] = []
    if info.whole_slides:
        pair = Pair(fixed, moving, spacing, fixed_mask, moving_mask, prog, device, notes, rgb)
        return _run(info, pair, notes, options)
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
        progress=prog,
        device=device,
        notes=notes,
    )
    return _run(info, pair, notes, options)


def _run(info: EngineInfo, pair: Pair, notes: list[str], options: dict[str, Any]) -> Registration:
    """Run the engine on validated inputs; merge notes and settings into its result."""
    start = time.perf_counter()
    with memory_guard(f"{info.name} registration"):
        result = info.func(pair, **options)
    result.metrics.setdefault("seconds", time.perf_counter() - start)
    merged = notes + [n for n in result.metrics.get("notes", []) if n not in notes]
    if merged:
        result.metrics["notes"] = merged
    spacing = None if pair.spacing is None else [float(v) for v in np.atleast_1d(pair.spacing)]
    result.settings = {"method": info.name, "spacing": spacing, "device": pair.device, **result.settings}
    result.transform.settings = dict(result.settings)
    return result
