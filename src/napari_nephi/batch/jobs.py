"""The job table: reading it (CSV or JSON lines), checking it, and turning a row into a command line.

A row is one job: a ``napari-nephi`` command run on a worker. Columns:

* ``output`` (required): the job's folder, relative to the batch output folder (``a/b`` allowed);
* ``moving`` (required): the moving image (``pair``, ``slides``), the stack (``stack``) or the
  section (``atlas``);
* ``fixed``: the fixed image (``pair``, ``slides``) or the atlas index folder (``atlas``);
* ``method``: the engine of a ``pair`` job (``napari-nephi methods``); for ``atlas`` the method
  that registers the chosen plate (empty: lookup only); ``stack`` and ``slides`` take none (or
  ``mito`` / ``histology``);
* ``kind``: ``pair`` (default), ``stack``, ``slides`` or ``atlas``;
* ``options``: a JSON object of engine options, passed on as given (the engine checks them);
* ``fixed_mask``, ``moving_mask``, ``moving_labels``: masks of the fixed and moving images (``pair``,
  ``slides``), labels of the moving image carried over (``pair``; ``stack``: the mitochondria masks).

Relative paths are relative to the table's folder. Other columns are kept (copied into the
summary) unless their name is close to a known one (a typo is refused).
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..core.errors import InputError, UnsupportedFileError

#: Job kinds and the ``napari-nephi`` command each runs.
COMMANDS = {"pair": "register", "stack": "align-em", "slides": "register-slides", "atlas": "atlas-lookup"}
KINDS = tuple(COMMANDS)
#: Columns every table has; the other known ones may be left out.
REQUIRED = ("moving", "output")
COLUMNS = (
    "kind",
    "fixed",
    "moving",
    "method",
    "output",
    "options",
    "fixed_mask",
    "moving_mask",
    "moving_labels",
)
#: The method a kind runs when it is not a pair (the value allowed in its ``method`` cell).
OWN_METHOD = {"stack": "mito", "slides": "histology"}
#: Per kind: the column -> command flag of the optional files (None: the command takes none).
FILE_FLAGS = {
    "pair": {
        "fixed_mask": "--fixed-mask",
        "moving_mask": "--moving-mask",
        "moving_labels": "--moving-labels",
    },
    "stack": {"fixed_mask": None, "moving_mask": None, "moving_labels": "--masks"},
    "slides": {"fixed_mask": "--fixed-mask", "moving_mask": "--moving-mask", "moving_labels": None},
    "atlas": {"fixed_mask": None, "moving_mask": None, "moving_labels": None},
}
#: Output names the batch folder keeps for itself (compared case-insensitively).
RESERVED = ("summary.csv", "summary.json")
JSON_LINES = (".jsonl", ".ndjson", ".json")


@dataclass
class Job:
    """One row of the table. ``error`` is set when the row cannot run (then it is reported as failed)."""

    row: int
    output: str
    kind: str = "pair"
    fixed: str | None = None
    moving: str | None = None
    method: str | None = None
    options: dict = field(default_factory=dict)
    fixed_mask: str | None = None
    moving_mask: str | None = None
    moving_labels: str | None = None
    extra: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def name(self) -> str:
        """The job's name: its output folder relative to the batch folder."""
        return self.output

    def spec(self) -> dict:
        """What decides the job's result (kind, method, inputs, options): a finished job with
        another spec is run again on resume. Empty cells are left out, so that columns added later do
        not change the spec of jobs that leave them empty."""
        keys = ("kind", "fixed", "moving", "method", "options", "fixed_mask", "moving_mask", "moving_labels")
        return {k: getattr(self, k) for k in keys if getattr(self, k) not in (None, {})}

    def spec_hash(self) -> str:
        """A short hash of :meth:`spec`."""
        text = json.dumps(self.spec(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        """The job as plain values (sent to workers)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _is_missing(value) -> bool:
    """True for None, NaN and pandas' missing values (``pd.NA``, ``NaT``) of a data frame cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    pandas = sys.modules.get("pandas")  # a data frame's cells come with pandas already imported
    if pandas is None or isinstance(value, (str, bytes, Mapping, list, tuple)):
        return False
    try:
        return bool(pandas.isna(value))
    except (TypeError, ValueError):  # not a scalar
        return False


def _text(value) -> str | None:
    """A cell as stripped text; empty cells (also NaN or pd.NA from a data frame) are None."""
    if _is_missing(value):
        return None
    text = str(value).strip()
    return text or None


def _resolve(value, base: Path) -> str | None:
    text = _text(value)
    if text is None:
        return None
    p = Path(text).expanduser()
    return str(p if p.is_absolute() else base / p)


def _options(value) -> dict:
    if isinstance(value, Mapping):
        return dict(value)
    text = _text(value)
    if text is None:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"options is not valid JSON ({exc.msg} at character {exc.pos}); write a JSON object, e.g. "
            '{"iterations": 50}.'
        ) from None
    if not isinstance(options, dict):
        raise InputError(f'options must be a JSON object such as {{"iterations": 50}}, got {text!r}.')
    return options


def _output_name(value) -> str:
    text = _text(value)
    if text is None:
        raise InputError("output is empty; give the name of the job's folder.")
    parts = PurePosixPath(text.replace("\\", "/")).parts
    if PurePosixPath(text).is_absolute() or Path(text).is_absolute() or any(p == ".." for p in parts):
        raise InputError(f"output {text!r} must be a folder name inside the batch output folder.")
    if any(p.startswith(".") for p in parts):
        raise InputError(f"output {text!r}: names starting with '.' are reserved for temporary folders.")
    name = "/".join(p for p in parts if p != "")
    if name.casefold() in RESERVED:
        raise InputError(f"output {text!r} is reserved for the batch summary; give the job another name.")
    return name


def _check_row(job: Job) -> None:
    """Raise InputError when the row cannot run: unknown kind or method, missing inputs, bad columns."""
    from ..engines.registry import available_methods

    if job.kind not in KINDS:
        raise InputError(f"unknown kind {job.kind!r}; use one of {', '.join(KINDS)}.")
    if job.moving is None:
        raise InputError("moving is empty; give the image (stack, section) to register.")
    if job.kind != "stack" and job.fixed is None:
        what = "the atlas index folder" if job.kind == "atlas" else "the fixed image"
        raise InputError(f"fixed is empty; a {job.kind} job needs {what}.")
    if job.kind == "stack" and job.fixed is not None:
        raise InputError("a stack job aligns 'moving' alone; leave 'fixed' empty.")
    if job.kind == "pair":
        methods = [m for m in available_methods() if m not in OWN_METHOD.values() and m != "atlas"]
        if job.method not in methods:
            got = "is empty" if job.method is None else f"{job.method!r} is unknown"
            raise InputError(f"method {got}; a pair job takes one of {', '.join(methods)}.")
    elif job.kind == "atlas":
        from ..cli.atlas import METHODS

        if job.method is not None and job.method not in METHODS:
            raise InputError(
                f"method {job.method!r}: an atlas job registers the chosen plate with "
                f"{' or '.join(METHODS)} (leave it empty for the lookup alone)."
            )
    elif job.method not in (None, OWN_METHOD[job.kind]):
        raise InputError(
            f"method {job.method!r}: a {job.kind} job runs {OWN_METHOD[job.kind]}; leave method empty."
        )
    for column, flag in FILE_FLAGS[job.kind].items():
        if getattr(job, column) is not None and flag is None:
            raise InputError(f"a {job.kind} job takes no {column}; leave that column empty.")


def make_job(row: int, record: Mapping, base: Path) -> Job:
    """A :class:`Job` from one record (a mapping of column -> cell); row errors go into ``job.error``."""
    extra = {k: v for k, v in record.items() if k not in COLUMNS}
    job = Job(row=row, output=str(_text(record.get("output")) or ""), extra=extra)
    try:
        job.output = _output_name(record.get("output"))
        job.kind = (_text(record.get("kind")) or "pair").lower()
        for column in ("fixed", "moving", "fixed_mask", "moving_mask", "moving_labels"):
            setattr(job, column, _resolve(record.get(column), base))
        job.method = _text(record.get("method"))
        job.options = _options(record.get("options"))
        _check_row(job)
    except InputError as exc:
        job.error = f"row {row}: {exc}"
    return job


def _check_columns(names: Iterable[str], where: str) -> None:
    names = [str(n) for n in names]
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise InputError(
            f"{where} has no column {', '.join(repr(c) for c in missing)}; a job table needs the columns "
            f"{', '.join(REQUIRED)} (and fixed, method, kind, options, fixed_mask, moving_labels as needed)."
        )
    for name in names:
        if name not in COLUMNS:
            # a known name with a suffix (moving_id, fixed_2) is a column of its own, not a typo
            if any(re.fullmatch(rf"{c}[_\-. ]\w+", name, re.IGNORECASE) for c in COLUMNS):
                continue
            close = difflib.get_close_matches(name, COLUMNS, n=1, cutoff=0.85)
            if close:
                raise InputError(f"{where}: unknown column {name!r}; did you mean {close[0]!r}?")


def _records_from_file(path: Path) -> list[tuple[int, dict]]:
    """(row number, record) pairs; CSV rows are numbered as lines of the file (the header is line 1)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise UnsupportedFileError(f"Cannot read the job table {path}: {exc.strerror or exc}.") from exc
    except UnicodeDecodeError:
        raise UnsupportedFileError(
            f"{path} is not a text file; give a CSV or JSON-lines job table."
        ) from None
    if path.suffix.lower() in JSON_LINES:
        records = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}, line {line_no}: not valid JSON ({exc.msg}).") from None
            if not isinstance(record, dict):
                raise InputError(f"{path}, line {line_no}: a job is a JSON object, got {line.strip()!r}.")
            records.append((line_no, record))
        if records:
            _check_columns({k for _, r in records for k in r}, str(path))
        return records
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None:
        raise InputError(f"{path} is empty; a job table has a header line and one row per job.")
    _check_columns([n.strip() for n in reader.fieldnames], str(path))
    records = []
    for record in reader:
        if None in record:
            raise InputError(
                f"{path}, line {reader.line_num}: more cells than columns; quote cells holding commas "
                '(options as "{""iterations"": 50}").'
            )
        if any(_text(v) for v in record.values()):
            records.append((reader.line_num, {k.strip(): v for k, v in record.items()}))
    return records


def read_jobs(table, base=None) -> list[Job]:
    """The jobs of a table: a CSV or JSON-lines file, or rows (mappings, e.g. ``df.to_dict("records")``).

    Relative paths are relative to the table's folder (``base``, default: the current folder, for
    rows). Raises :class:`InputError` for problems of the whole table (no such column, the same
    output twice, no jobs); a row that cannot run gets ``job.error`` and is reported as failed.
    """
    if isinstance(table, (str, Path)):
        path = Path(table)
        if not path.is_file():
            raise UnsupportedFileError(f"The job table {path} does not exist; check the path.")
        records = _records_from_file(path)
        base = Path(base) if base is not None else path.resolve().parent
        where = str(path)
    else:
        rows = list(table.to_dict("records") if hasattr(table, "to_dict") else table)
        if not all(isinstance(r, Mapping) for r in rows):
            raise InputError("jobs must be a table file or a list of mappings (column -> value).")
        _check_columns({k for r in rows for k in r} if rows else REQUIRED, "the job table")
        records = list(enumerate(rows, 1))
        base = Path(base) if base is not None else Path.cwd()
        where = "the job table"
    if not records:
        raise InputError(f"{where} has no jobs; add one row per job.")
    jobs = [make_job(row, record, base) for row, record in records]
    check_outputs(jobs, where)
    return jobs


def check_outputs(jobs: Iterable[Job], where: str = "the job table") -> None:
    """Raise InputError when two jobs write the same output folder (also by case only) or one lies
    inside another's. ``read_jobs`` checks tables with it; ``run`` checks lists of :class:`Job` s."""
    seen: dict[str, int] = {}
    for job in jobs:
        if not job.output:
            continue
        key = job.output.casefold()  # the same folder on case-insensitive file systems
        if key in seen:
            raise InputError(
                f"{where}: rows {seen[key]} and {job.row} write the same output {job.output!r}; give each "
                "job its own output folder."
            )
        seen[key] = job.row
    for key, row in seen.items():
        parts = key.split("/")
        for k in range(1, len(parts)):
            outer = "/".join(parts[:k])
            if outer in seen:
                raise InputError(
                    f"{where}: rows {seen[outer]} and {row}: output {key!r} lies inside output {outer!r}; "
                    "give each job a folder of its own."
                )
