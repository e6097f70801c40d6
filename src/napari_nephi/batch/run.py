"""Run a job table on Dask distributed and write its summary (``summary.csv``, ``summary.json``)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

from ..core.errors import InputError, UnsupportedFileError
from ..core.files import atomic_write_bytes, clean_leftovers
from ..core.options import check_int
from ..core.progress import ProgressEvent
from .cluster import dashboard_line, gpu_workers, local_size, open_client
from .jobs import Job, check_outputs, read_jobs
from .tasks import TMP_PREFIX, check_job, complete_record, run_job

#: Written into a batch output folder; a folder holding it may be written again (resume).
BATCH_MARKER = ".napari-nephi-batch"
#: Held while a run writes the folder: ``host pid``.
LOCK = ".napari-nephi-batch.lock"
#: Metrics copied into summary.csv when a job reports them (summary.json has all of a job's metrics).
SUMMARY_METRICS = (
    "ncc_before", "ncc_after", "nmi_before", "nmi_after", "mse_before", "mse_after", "folds",
    "folds_percent", "tre_before", "tre_after", "tre_median_um", "tre_p90_um", "inliers_mean",
    "identity_sections", "plate", "distance",
)  # fmt: skip
COLUMNS = ("job", "row", "kind", "method", "status", "attempts", "seconds", "worker")
#: A job's status in the summary: run now, complete from an earlier run, or failed.
STATUSES = ("done", "skipped", "failed")


def _check_out(out: Path) -> Path:
    if out.is_dir():
        if (out / BATCH_MARKER).exists() or not any(out.iterdir()):
            return out
        raise UnsupportedFileError(
            f"{out} exists and holds files napari-nephi batch did not write; choose a new output folder."
        )
    if out.exists():
        raise UnsupportedFileError(f"{out} is a file, not a folder; choose a folder name for the output.")
    try:
        out.mkdir(parents=True)
    except OSError as exc:
        raise UnsupportedFileError(f"Cannot create the output folder {out}: {exc.strerror or exc}.") from None
    return out


def _lock(out: Path) -> Path:
    """Take ``OUT/LOCK``; refuse when a live run on this host holds it (a dead run's lock is taken over)."""
    lock = out / LOCK
    me = f"{socket.gethostname()} {os.getpid()}"
    try:
        host, pid = lock.read_text().split()
    except (OSError, ValueError):
        host, pid = "", ""
    if host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid():
        try:
            os.kill(int(pid), 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except OSError:
            alive = True
        if alive:
            raise InputError(
                f"Another napari-nephi batch (process {pid}) is writing {out}; wait for it to finish or "
                "choose another output folder."
            )
    atomic_write_bytes(lock, me.encode())
    return lock


def remove_leftovers(out: Path, jobs: list[Job]) -> list[Path]:
    """Remove the temporary folders a killed earlier run left in ``out``; return them."""
    removed = [p for p in out.glob(f"{TMP_PREFIX}*") if p.is_dir()]
    removed += [p for p in out.glob(f".{TMP_PREFIX}*") if p.is_dir()]  # the commands' own
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    for job in jobs:
        if job.output and not job.error:
            removed += clean_leftovers(out / job.output)
    return removed


def _failed(job: Job, message: str, error_type: str = "InputError") -> dict:
    record = {"job": job.output, "row": job.row, "kind": job.kind, "method": job.method}
    record.update(status="failed", attempts=0, seconds=0.0, worker=None)
    return {**record, "error_type": error_type, "error": message}


def _prepare(jobs: list[Job], out: Path, resume: bool) -> tuple[dict[int, dict], list[Job]]:
    """Records of the rows that need no run (bad rows, complete jobs) and the jobs to run."""
    records, todo = {}, []
    for job in jobs:
        if not job.error:
            try:
                check_job(job)
            except Exception as exc:  # the command line's or the engine's own message
                prog = getattr(exc, "prog", None)
                text = " ".join(str(exc).split())
                job.error = f"row {job.row}: " + (f"{prog}: {text}" if prog else text)
        if job.error:
            records[job.row] = _failed(job, job.error)
            continue
        done = complete_record(out / job.output, job) if resume else None
        if done is not None:
            records[job.row] = {**done, "status": "skipped", "row": job.row}
        else:
            todo.append(job)
    return records, todo


def _summary_rows(jobs: list[Job], records: dict[int, dict]) -> list[dict]:
    rows = []
    for job in jobs:
        r = records[job.row]
        row = {k: r.get(k) for k in COLUMNS}
        row.update(metrics=r.get("metrics") or {}, error_type=r.get("error_type"), error=r.get("error"))
        row.update(worker_peak_rss_mb=r.get("worker_peak_rss_mb"), cpu_seconds=r.get("cpu_seconds"))
        row["extra"] = {k: v for k, v in job.extra.items() if k not in row}
        rows.append(row)
    return rows


def write_summary(out: Path, rows: list[dict]) -> None:
    """``summary.csv`` (one row per job: the columns, key metrics, error, extra table columns) and
    ``summary.json`` (counts and every job with all its metrics), both written atomically."""
    metrics = [m for m in SUMMARY_METRICS if any(m in r["metrics"] for r in rows)]
    extra = list(dict.fromkeys(k for r in rows for k in r["extra"]))
    names = [*COLUMNS, *metrics, "error_type", "error", *extra]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        flat = {**{k: r[k] for k in COLUMNS}, **{m: r["metrics"].get(m) for m in metrics}, **r["extra"]}
        flat.update(error_type=r["error_type"], error=r["error"])
        writer.writerow({k: "" if v is None else v for k, v in flat.items()})
    atomic_write_bytes(out / "summary.csv", buf.getvalue().encode())
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    doc = {"out": str(out), "counts": counts, "jobs": rows}
    atomic_write_bytes(out / "summary.json", json.dumps(doc, indent=2, default=str).encode())


def _resources(job: Job, gpus: int) -> dict | None:
    """``{"GPU": 1}`` for a job that may use a GPU when the cluster has GPU workers (one such job each)."""
    device = str(job.options.get("device", "auto")).lower()
    return {"GPU": 1} if gpus and job.kind != "stack" and device != "cpu" else None


def _submit_all(
    client, todo: list[Job], out: Path, threads, retries: int, gpus: int, step
) -> dict[int, dict]:
    from distributed import as_completed

    def submit(job: Job, attempt: int):
        key = f"napari-nephi-{job.row}-{attempt}-{uuid.uuid4().hex[:8]}"
        return client.submit(run_job, job.to_dict(), str(out), threads, attempt, key=key, pure=False,
                             resources=_resources(job, gpus))  # fmt: skip

    pending = {}
    for job in todo:
        pending[submit(job, 1)] = (job, 1)
    records: dict[int, dict] = {}
    queue = as_completed(list(pending))
    for future in queue:
        job, attempt = pending.pop(future)
        if future.status == "finished":
            record = future.result()
        else:  # the worker died (killed, out of memory), or the cluster failed or cancelled the task
            try:
                exc = future.exception()
            except BaseException as cancelled:  # a cancelled future raises CancelledError
                exc = cancelled
            record = _failed(job, " ".join(str(exc).split()) or type(exc).__name__, type(exc).__name__)
            record.update(attempts=attempt, retry=True)
        future.release()
        if record["status"] == "failed" and record.get("retry") and attempt <= retries:
            again = submit(job, attempt + 1)
            pending[again] = (job, attempt + 1)
            queue.add(again)
            continue
        records[job.row] = record
        step()
    return records


def run(
    jobs,
    out,
    client=None,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: int | None = None,
    retries: int = 1,
    resume: bool = True,
    processes: bool = True,
    progress: Callable[[ProgressEvent], object] | None = None,
    log: Callable[[str], object] | None = None,
) -> list[dict]:
    """Run the jobs of a table (a file, rows or :class:`Job` s) and return the summary: one row per job.

    Each job's results go into ``OUT/<output>/`` (written atomically); ``OUT/summary.csv`` and
    ``OUT/summary.json`` list every job with its status (``done``, ``skipped``: complete from an
    earlier run with the same inputs and options, ``failed``), seconds, worker, metrics and error.
    ``client``: a ``distributed.Client`` to use; else one of the scheduler at ``scheduler``; else a
    local cluster of ``workers`` processes (``processes=False``: threads of this process). Jobs use
    ``threads_per_worker`` threads each (torch, OpenCV, BLAS; on a given or running cluster, None
    leaves the workers' settings). A job that fails with an error that may pass (out
    of memory, a lost worker) is tried up to ``retries`` more times. ``resume=False`` runs every job.
    ``progress`` gets a :class:`ProgressEvent` per finished job; ``log`` gets lines (dashboard).
    """
    retries = check_int("retries", retries, 0, 100)
    if client is None and not scheduler:
        local_size(workers, threads_per_worker, memory_limit)  # absurd sizes fail before any work
    if isinstance(jobs, list) and all(isinstance(j, Job) for j in jobs):
        check_outputs(jobs, "the job list")  # the checks read_jobs does for a table
    else:
        jobs = read_jobs(jobs)
    out = _check_out(Path(out).expanduser().resolve())
    atomic_write_bytes(out / BATCH_MARKER, b"written by napari-nephi batch; may be written again\n")
    lock = _lock(out)
    try:
        remove_leftovers(out, jobs)
        records, todo = _prepare(jobs, out, resume)
        finished = [len(records)]

        def step() -> None:
            finished[0] += 1
            if progress is not None:
                progress(ProgressEvent(finished[0], len(jobs), stage="jobs"))

        if todo:
            if client is not None:
                if log is not None:
                    log(dashboard_line(client, local=False))
                threads = threads_per_worker  # None: the workers' own settings
                records.update(_submit_all(client, todo, out, threads, retries, gpu_workers(client), step))
            else:
                with open_client(scheduler, workers, threads_per_worker, memory_limit, processes) as (c, n):
                    if log is not None:
                        log(dashboard_line(c, local=not scheduler))
                    n = threads_per_worker if n is None else n
                    records.update(_submit_all(c, todo, out, n, retries, gpu_workers(c), step))
        rows = _summary_rows(jobs, records)
        write_summary(out, rows)
        return rows
    finally:
        lock.unlink(missing_ok=True)
