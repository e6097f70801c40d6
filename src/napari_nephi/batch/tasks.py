"""What one job does on a worker: run its ``napari-nephi`` command into a temporary folder, then publish it.

A job's folder ``OUT/<output>/`` appears whole or not at all: the command writes into
``OUT/.tmp-<job>-<random>/``, :data:`RESULT` (status, metrics, the job's spec) is written last,
and the folder is renamed into place. A folder holding :data:`RESULT` with the job's spec is
complete; a run killed at any moment leaves only ``.tmp-*`` folders, which the next run removes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import resource
import shutil
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from ..core.errors import InputError, OutOfMemoryError, RegistrationError, UnsupportedFileError
from ..core.files import atomic_write_bytes, check_output_folder, clean_leftovers, publish_folder
from .jobs import COMMANDS, FILE_FLAGS, Job

#: Written last into a job's folder: the job's record; its presence marks the folder complete.
RESULT = "job.json"
#: Prefix of the temporary folders of jobs being written (inside OUT).
TMP_PREFIX = ".tmp-"
#: Where each kind's command writes its metrics (file, key inside it or None for the whole file).
METRICS_FILES = {"pair": ("metrics.json", None), "slides": ("metrics.json", None),
                 "stack": ("report.json", "metrics"), "atlas": ("ranks.json", None)}  # fmt: skip


@functools.lru_cache(maxsize=1)
def _parser():
    from ..cli import build_parser

    return build_parser()


def _cli_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def option_arguments(command: str, options: dict) -> list[str]:
    """``options`` as arguments of ``napari-nephi COMMAND``: the command's own flag where it has one
    (``iterations`` -> ``--iterations``), else ``--option KEY=JSON`` (the engine checks the name)."""
    parser = _parser().commands[command]
    flags = {s: a for a in parser.arguments for s in a.option_strings}
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + str(key).replace("_", "-")
        action = None if flag in ("--output", "--option", "--quiet") else flags.get(flag)
        if value is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else "--no-" + flag[2:])
        elif action is not None and action.nargs == 0:  # a switch such as --no-flip
            if value is not True and value is not False:
                raise InputError(f"option {key}: {command} {flag} is a switch; give true or false.")
            argv += [flag] if value else []
        elif (
            action is not None
            and action.nargs == "?"
            and action.const is not None
            and isinstance(value, bool)
        ):
            argv += [flag] if value else []  # a flag whose value may be left out (--labels): bare for true
        elif action is not None:
            several = action.nargs not in (None, "?") and isinstance(value, (list, tuple))
            argv += [flag, *(_cli_text(v) for v in (value if several else [value]))]
        elif "--option" in flags:
            argv += ["--option", f"{key}={json.dumps(value)}"]
        else:
            valid = sorted(s[2:].replace("-", "_") for s in flags if s.startswith("--") and s != "--output")
            raise InputError(f"{command} has no option {key!r}; valid: {', '.join(valid)}.")
    return argv


def command_line(job: Job, out) -> list[str]:
    """The ``napari-nephi`` arguments that run ``job`` with its results written into ``out``."""
    command = COMMANDS[job.kind]
    flags = {s for a in _parser().commands[command].arguments for s in a.option_strings}
    inputs = [job.moving] if job.kind == "stack" else [job.fixed, job.moving]
    argv = [command, *inputs, "-o", str(out), "-q"]
    if job.kind == "pair":
        argv += ["--method", job.method]
    elif job.kind == "atlas" and job.method is not None:
        argv += ["--register", "--method", job.method]
    for column, flag in FILE_FLAGS[job.kind].items():
        value = getattr(job, column)
        if value is not None:
            if flag not in flags:
                raise InputError(f"{column}: 'napari-nephi {command}' takes no {flag} in this version.")
            argv += [flag, value]
    return argv + option_arguments(command, job.options)


def check_job(job: Job) -> None:
    """Parse the job's command line as the worker will (flags, values; a pair's engine options), or raise."""
    argv = command_line(job, "out")
    args = _parser().parse_args(argv)
    if job.kind == "pair":
        from ..cli.register import engine_options_from_args

        engine_options_from_args(args)


class _JobSettings:
    """Settings of the process while jobs run in it, set by the first job and restored by the last.

    Torch, OpenCV and the BLAS / OpenMP pools get ``threads`` threads; dask arrays a job computes
    (lazily read slides, stacks) are computed in the worker itself with as many threads: inside a
    Dask worker, dask would otherwise send them to the cluster as new tasks. The settings are per
    process, so jobs running side by side in one process share them (a count, not a stack).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._undo: contextlib.ExitStack | None = None

    @contextlib.contextmanager
    def __call__(self, threads: int | None):
        with self._lock:
            if self._active == 0:
                self._undo = self._apply(threads)
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0 and self._undo is not None:
                    self._undo.close()
                    self._undo = None

    @staticmethod
    def _apply(threads: int | None) -> contextlib.ExitStack:
        import dask

        undo = contextlib.ExitStack()
        local = {"scheduler": "threads"} | ({"num_workers": threads} if threads else {})
        undo.enter_context(dask.config.set(local))
        if threads:
            import cv2
            import torch

            before = torch.get_num_threads(), cv2.getNumThreads()
            torch.set_num_threads(threads)
            cv2.setNumThreads(threads)
            undo.callback(torch.set_num_threads, before[0])
            undo.callback(cv2.setNumThreads, before[1])
            try:
                from threadpoolctl import threadpool_limits
            except ImportError:  # numpy's BLAS keeps its threads (the local cluster limits them anyway)
                return undo
            undo.enter_context(threadpool_limits(limits=threads))
        return undo


_job_settings = _JobSettings()


def worker_name() -> str:
    """The Dask worker running this task (its name and host), or this process outside a cluster."""
    try:
        from distributed import get_worker

        worker = get_worker()
        return f"{worker.name}@{socket.gethostname()}"
    except (ImportError, ValueError):
        return f"local@{socket.gethostname()}"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB (Linux: ``VmHWM``, which, unlike ``ru_maxrss``,
    does not start from the peak of the process that forked this one)."""
    try:
        with open("/proc/self/status") as fh:
            line = next(x for x in fh if x.startswith("VmHWM:"))
        return round(int(line.split()[1]) / 1024, 1)
    except (OSError, StopIteration, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def _scalars(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if isinstance(v, (int, float, str, bool)) or v is None}


def read_metrics(folder: Path, kind: str) -> dict:
    """The scalar metrics a kind's command wrote into ``folder`` (an atlas job: the chosen plate)."""
    name, key = METRICS_FILES[kind]
    path = folder / name
    if not path.is_file():
        return {}
    doc = json.loads(path.read_text())
    if kind == "atlas":
        first = (doc.get("sections") or [{}])[0]
        ranking = first.get("ranking") or [{}]
        return {"sections": len(doc.get("sections", [])), "plate": first.get("chosen"),
                "distance": ranking[0].get("distance")}  # fmt: skip
    return _scalars(doc[key] if key else doc)


def _retryable(exc: BaseException) -> bool:
    """Out of memory and passing file-system trouble may go away on another try; input errors do not."""
    if isinstance(exc, (MemoryError, OutOfMemoryError)):
        return True
    if isinstance(exc, (RegistrationError, UnsupportedFileError)):
        return False
    return isinstance(exc, OSError) or "out of memory" in str(exc).lower()


def _message(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    prog = getattr(exc, "prog", None)  # the command line's own errors
    return f"{prog}: {text}" if prog else text


def temp_folder(out: Path, job: Job) -> Path:
    """A new temporary folder name for ``job`` inside ``out``."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", job.output)[:60]
    return out / f"{TMP_PREFIX}{slug}-{uuid.uuid4().hex[:10]}"


def complete_record(folder: Path, job: Job) -> dict | None:
    """The record of a finished job in ``folder`` when it is complete and ran the same spec, else None."""
    try:
        record = json.loads((folder / RESULT).read_text())
    except (OSError, ValueError):
        return None
    ok = record.get("status") == "done" and record.get("spec_hash") == job.spec_hash()
    return record if ok else None


def run_job(job: dict | Job, out, threads: int | None = None, attempt: int = 1) -> dict:
    """Run one job and publish ``OUT/<output>/``; return its record (status, seconds, worker, metrics).

    Never raises for a failed job: the record holds ``status="failed"``, ``error_type``, ``error``
    and ``retry`` (whether another try may succeed). ``threads``: torch / OpenCV / BLAS threads.
    """
    job = job if isinstance(job, Job) else Job(**job)
    out = Path(out)
    start, cpu = time.perf_counter(), time.process_time()
    record = {"job": job.output, "row": job.row, "kind": job.kind, "method": job.method, "status": "done",
              "attempts": attempt, "worker": worker_name(), "error_type": None, "error": None}  # fmt: skip
    final = out / job.output
    tmp = temp_folder(out, job)
    try:
        tmp.mkdir(parents=True)  # at once: a job running (or killed) shows as its temporary folder
        if job.error:
            raise InputError(job.error)
        check_output_folder(final, earlier_output=lambda p: (p / RESULT).exists())
        argv = command_line(job, tmp)
        with _job_settings(threads):
            args = _parser().parse_args(argv)
            args.func(args)
        record["metrics"] = read_metrics(tmp, job.kind)
        record.update(
            seconds=round(time.perf_counter() - start, 3), cpu_seconds=round(time.process_time() - cpu, 3)
        )
        record.update(worker_peak_rss_mb=peak_rss_mb(), spec=job.spec(), spec_hash=job.spec_hash())
        atomic_write_bytes(tmp / RESULT, json.dumps(record, indent=2, default=str).encode())
        final.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(final)
        publish_folder(tmp, final)
    except Exception as exc:
        record.update(status="failed", error_type=type(exc).__name__, error=_message(exc))
        record.update(retry=_retryable(exc), seconds=round(time.perf_counter() - start, 3))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for leftover in out.glob(f".{tmp.name}.partial-{os.getpid()}-*"):
        shutil.rmtree(leftover, ignore_errors=True)  # the command's own temporary folder, if it was stopped
    return record
