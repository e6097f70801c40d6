"""Which code a benchmark row ran: one helper for the scripts that record it (session 41).

Sessions 39-40 wrote two of these in parallel, for the same job, in two formats; both formats are kept here
exactly, so every value recorded before (in the docs and in old rows) stays valid:

* :func:`sha12`: sha256 of the files' bytes, concatenated in the order given, first 12 hex. ``mito_paired.py``
  records it (:func:`mito_state`: ``script_sha``, ``benchmark_sha``, ``engine_sha``; e.g. ``b45189ed75b2`` for
  the MITO engine of 8008ee3).
* :func:`files_sha`: sha256 of each file's name, a NUL, its bytes and a NUL, in the order given, first 16 hex.
  ``nephi_zoom_cases.py`` records it (:func:`package_state`: ``code_sha``, ``harness_sha``).

Not a benchmark itself; imported by the scripts beside it (``import _code_state``, the script's folder on
``sys.path``). ``tests/test_code_state.py`` pins both formats.
"""

from __future__ import annotations

import glob
import hashlib
import os
import subprocess
from pathlib import Path


def git(args: list[str], cwd) -> str | None:
    """``git ARGS`` run in ``cwd``: its standard output, or None where git fails or is missing."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=cwd)
    except OSError:
        return None
    return out.stdout if out.returncode == 0 else None


def sha12(paths) -> str:
    """sha256 of the files' bytes, concatenated in the order given, first 12 hex (``mito_paired``'s)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:12]


def files_sha(paths) -> str:
    """A short sha256 of the files' names and bytes, in the order given, first 16 hex (``nephi_zoom_cases``'s
    format)."""
    h = hashlib.sha256()
    for path in map(Path, paths):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def mito_state(script, engine) -> dict:
    """``mito_paired``'s record (review 1 of session 40): ``head`` (``git rev-parse --short HEAD`` of the
    checkout holding ``script``, "unknown" outside one; the checkout may hold other uncommitted changes) and
    :func:`sha12` of ``script``, of ``mito_benchmark.py`` beside it and of the ``*.py`` files (sorted) of the
    folder ``engine`` (the imported MITO engine's; with ``PYTHONPATH`` set to a frozen ``src``, that one's),
    with that folder."""
    here = os.path.dirname(os.path.abspath(script))
    head = git(["rev-parse", "--short", "HEAD"], here)
    engine = os.path.abspath(engine)
    return {
        "head": "unknown" if head is None else head.strip(), "script_sha": sha12([os.path.abspath(script)]),
        "benchmark_sha": sha12([os.path.join(here, "mito_benchmark.py")]),
        "engine_sha": sha12(sorted(glob.glob(os.path.join(engine, "*.py")))), "engine": engine,
    }  # fmt: skip


def package_state(script, here, package, code: tuple[str, ...]) -> dict:
    """``nephi_zoom_cases``'s record: ``head`` (short hash) and ``dirty`` (``git status --porcelain --
    benchmarks src`` not empty) of the repository holding ``here``, and ``package``, the imported
    ``napari_nephi``'s folder. ``head`` and ``dirty`` are ``"unknown"`` outside a repository or where the
    package is not under the repository (an installed copy: the hash would not name the code that ran).
    Besides: ``code_sha``, :func:`files_sha` of the package's files matching each pattern of ``code`` in turn
    (sorted within a pattern), as they are on disk, and ``harness_sha``, of ``script``."""
    here, package = Path(here).resolve(), Path(package).resolve()
    state = {"head": "unknown", "dirty": "unknown", "package": str(package)}
    state["code_sha"] = files_sha([p for pattern in code for p in sorted(package.glob(pattern))])
    state["harness_sha"] = files_sha([Path(script)])
    top = git(["rev-parse", "--show-toplevel"], here)
    if top is None or not package.is_relative_to(Path(top.strip()).resolve()):
        return state
    head = git(["rev-parse", "--short", "HEAD"], here)
    status = git(["status", "--porcelain", "--", "benchmarks", "src"], Path(top.strip()))
    if head is not None and status is not None:
        state.update(head=head.strip(), dirty=bool(status.strip()))
    return state
