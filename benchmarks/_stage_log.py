"""A running log of a long benchmark: stage, resident memory and its peak, written as the run goes.

A sampling thread reads the resident set size (``/proc/self/statm``) every ``every_s`` seconds and
keeps the peak; a line is appended to the log file (and flushed) whenever the stage changes and at
least every ``line_s`` seconds, so a run that is stopped early still tells how far it got and what
it held. Use :meth:`StageLog.progress` as the ``progress`` callback of a registration.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from _measure import rss_bytes


class StageLog:
    """Log stage changes, RSS and peak RSS (MiB) to ``path`` while a run goes on."""

    def __init__(self, path: str | Path | None, every_s: float = 0.05, line_s: float = 30.0):
        self.path = Path(path) if path else None
        self.every_s, self.line_s = every_s, line_s
        self.start = time.perf_counter()
        self.stage, self.detail = "start", ""
        self.peak = self.stage_peak = rss_bytes()
        self.stage_peaks: dict[str, float] = {}
        self._last_line = -float("inf")
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(self.every_s):
            rss = rss_bytes()
            with self._lock:
                self.peak, self.stage_peak = max(self.peak, rss), max(self.stage_peak, rss)
            if time.perf_counter() - self._last_line >= self.line_s:
                self.write()

    def write(self, note: str = "") -> None:
        """Append one line: elapsed seconds, stage, RSS, stage peak, process peak (MiB), note."""
        self._last_line = time.perf_counter()
        rss = rss_bytes() / 2**20
        with self._lock:
            line = (
                f"{time.strftime('%H:%M:%S')} {self._last_line - self.start:8.1f} s  {self.stage:<28} "
                f"{self.detail:<14} rss {rss:6.0f}  stage peak {self.stage_peak / 2**20:6.0f}  "
                f"peak {self.peak / 2**20:6.0f} MiB {note}"
            )
        if self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(line + "\n")

    def set_stage(self, stage: str, detail: str = "") -> None:
        """Start a new stage (closing the previous one's peak)."""
        stage = stage.split(":")[0].strip() or "?"
        with self._lock:
            changed = stage != self.stage
            if changed:
                self.stage_peaks[self.stage] = max(self.stage_peaks.get(self.stage, 0), self.stage_peak)
                self.stage, self.stage_peak = stage, rss_bytes()
            self.detail = detail
        if changed:
            self.write("(new stage)")

    def progress(self, event) -> None:
        """A registration ``progress`` callback: follows ``event.stage``."""
        self.set_stage(event.stage or self.stage, f"{event.step}/{event.total}")

    def close(self) -> dict[str, float]:
        """Stop sampling; return the peak RSS (MiB) of every stage seen."""
        self.set_stage("end")
        self._done.set()
        self._thread.join()
        self.write("(closed)")
        return {k: v / 2**20 for k, v in self.stage_peaks.items()}
