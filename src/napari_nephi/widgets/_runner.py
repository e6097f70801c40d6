"""Run a registration in a napari worker thread; report progress, results and errors as signals."""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable

from napari.qt.threading import create_worker
from qtpy.QtCore import QObject, Signal

from ..core.errors import Cancelled, RegistrationError


class RegistrationRunner(QObject):
    """Owns one background run at a time. Signals are delivered on the GUI thread.

    When the runner is deleted (with its widget, when the viewer closes) its run is cancelled and
    nothing more is reported.
    """

    started = Signal()
    progressed = Signal(object)  # ProgressEvent
    finished = Signal(object)  # the function's return value
    failed = Signal(str)  # a message for the user
    cancelled = Signal()
    stopped = Signal()  # after any of finished / failed / cancelled

    def __init__(self, parent=None):
        super().__init__(parent)
        self._worker = None
        self._cancel = threading.Event()
        self.destroyed.connect(lambda *_: self._cancel.set())

    @property
    def busy(self) -> bool:
        return self._worker is not None

    def run(self, func: Callable, **kwargs) -> None:
        """Call ``func(progress=..., cancel=..., **kwargs)`` in a worker thread."""
        if self.busy:
            raise RuntimeError("A registration is already running.")
        self._cancel = cancel = threading.Event()
        emit = self.progressed.emit

        def report(event) -> None:
            if cancel.is_set():
                return
            try:
                emit(event)
            except (
                RuntimeError,
                AttributeError,
            ):  # this runner is gone (its viewer was closed): stop the run
                # (PyQt6 raises RuntimeError for a deleted object, or AttributeError naming the signal's
                # "(PyQt_PyObject)" signature when the deletion races the emit)
                cancel.set()

        def job():
            return func(progress=report, cancel=cancel, **kwargs)

        worker = create_worker(job, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.started.emit()
        worker.start()

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self, timeout_ms: int = 30000) -> None:
        """Block until the worker thread ends (used by tests and on close)."""
        if self._worker is not None:
            self._worker.await_workers(timeout_ms)

    def _on_returned(self, value) -> None:
        self.finished.emit(value)

    def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, Cancelled):
            self.cancelled.emit()
        elif isinstance(exc, RegistrationError):
            self.failed.emit(str(exc))
        else:
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            self.failed.emit(f"Registration failed unexpectedly: {detail}")

    def _on_finished(self) -> None:
        self._worker = None
        self.stopped.emit()
