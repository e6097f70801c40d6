"""Progress events and cancellation shared by every engine."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import Cancelled, InputError


@dataclass
class ProgressEvent:
    """One step of a long computation.

    ``preview``, when present, is the current warped moving image on the fixed grid, or on that
    grid downsampled by ``extra["preview_zoom"]`` (one factor per axis; voxel ``i`` of the preview
    is centred on fixed voxel ``(i + 0.5) * zoom - 0.5``).
    """

    step: int
    total: int
    loss: float | None = None
    stage: str = ""
    preview: Any = None  # optional numpy array: the current warped moving image
    extra: dict = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return 0.0 if self.total <= 0 else min(1.0, self.step / self.total)


ProgressCallback = Callable[[ProgressEvent], Any]
CancelFlag = threading.Event | Callable[[], bool] | None


def is_cancelled(cancel: CancelFlag) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


class Progress:
    """Reports steps to a callback and raises :class:`Cancelled` when the flag is set.

    Engines call :meth:`step` once per iteration. ``preview_every`` seconds at most a
    preview is requested (``wants_preview``), so GUIs are not flooded.
    """

    def __init__(
        self,
        callback: ProgressCallback | None = None,
        cancel: CancelFlag = None,
        preview_every: float = 0.5,
    ):
        if callback is not None and not callable(callback):
            raise InputError(
                "progress must be a function taking a ProgressEvent (or None), "
                f"got {type(callback).__name__}."
            )
        if cancel is not None and not (callable(cancel) or isinstance(cancel, threading.Event)):
            raise InputError(
                f"cancel must be a threading.Event or a function returning True to stop (or None), "
                f"got {type(cancel).__name__}."
            )
        self.callback = callback
        self.cancel = cancel
        self.preview_every = preview_every
        self._last_preview = -float("inf")
        self.history: list[float] = []

    def check(self) -> None:
        """Raise :class:`Cancelled` if the user asked to stop."""
        if is_cancelled(self.cancel):
            raise Cancelled("Registration cancelled by the user.")

    @property
    def wants_preview(self) -> bool:
        return self.callback is not None and (time.monotonic() - self._last_preview >= self.preview_every)

    def step(
        self,
        step: int,
        total: int,
        loss: float | None = None,
        stage: str = "",
        preview: Any = None,
        **extra: Any,
    ) -> None:
        if loss is not None:
            self.history.append(float(loss))
        if self.callback is not None:
            if preview is not None:
                self._last_preview = time.monotonic()
            self.callback(ProgressEvent(step, total, loss, stage, preview, dict(extra)))
        self.check()
