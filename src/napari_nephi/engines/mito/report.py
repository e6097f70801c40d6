"""The per-section report of a stack alignment as files: ``report.csv`` and ``report.json``.

Used by the ``align-em`` command and the EM widget's "Save report"; no CLI, no Qt.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ...core.files import atomic_write_bytes
from ...core.registration import Registration

REPORT_COLUMNS = (
    "section", "neighbour", "keypoints", "matches", "inliers", "reprojection_error", "failed",
    "fallback", "method", "model", "refined", "tracks", "tracking_error", "drift_shift_y", "drift_shift_x",
)  # fmt: skip


def _csv_row(r: dict) -> dict:
    """One report row as CSV cells (``drift_shift``, (y, x) in the JSON, as two columns)."""
    shift = r.get("drift_shift") or (None, None)
    row = {**r, "drift_shift_y": shift[0], "drift_shift_x": shift[1]}
    return {k: ("" if row.get(k) is None else row.get(k)) for k in REPORT_COLUMNS}


def write_report(out: Path, reg: Registration) -> None:
    """``report.csv`` (one row per section) and ``report.json`` (rows, summary, settings) in ``out``."""
    out = Path(out)
    rows = reg.metrics["report"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(REPORT_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(_csv_row(r))
    atomic_write_bytes(out / "report.csv", buf.getvalue().encode())
    summary = {k: v for k, v in reg.metrics.items() if k != "report"}
    doc = {"report": rows, "metrics": summary, "settings": reg.settings}
    atomic_write_bytes(out / "report.json", json.dumps(doc, indent=2, default=str).encode())
