"""``napari-nephi batch JOBS -o OUT``: run a job table on Dask distributed (this machine or a cluster).

JOBS is a CSV (or JSON-lines) table with a row per job and the columns ``fixed``, ``moving``,
``method``, ``output`` and, as needed, ``kind`` (pair, stack, slides, atlas), ``options`` (a
JSON object of engine options), ``fixed_mask``, ``moving_mask``, ``moving_labels``; relative paths
are relative to the table. Each job writes its folder ``OUT/<output>/`` atomically; ``OUT/summary.csv`` and
``OUT/summary.json`` list every job (status, seconds, worker, metrics, error). Running the same
command again skips the jobs already complete and runs the failed and missing ones.

Exit code: 0 when every job is done, 1 when some failed (see the summary), 2 for a problem with
the table or the command line. See docs/batch.md. Examples::

    napari-nephi batch jobs.csv -o results
    napari-nephi batch jobs.csv -o results --workers 2 --threads-per-worker 4
    napari-nephi batch jobs.csv -o /shared/results --scheduler tcp://10.0.0.5:8786
"""

from __future__ import annotations

import argparse
import sys

from ._common import HelpFormatter, ProgressBars, add_quiet

#: Exit code when the run finished but some jobs failed.
EXIT_SOME_FAILED = 1


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``batch`` subcommand (with its own ``func``) to an argparse subparsers object."""
    p = subparsers.add_parser(
        "batch",
        formatter_class=HelpFormatter,
        help="run a table of registrations on Dask distributed (this machine or a cluster)",
        description=__doc__.split("\n", 1)[1].strip(),
    )
    p.add_argument("jobs", help="job table: CSV, or JSON lines (.jsonl, .ndjson, .json)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder of all the jobs")
    p.add_argument(
        "--workers", type=int, help="worker processes of the local cluster (default: cores / threads)"
    )
    p.add_argument(
        "--threads-per-worker", type=int, metavar="K",
        help="threads of each job (torch, OpenCV, BLAS); default: 1 on the local cluster, where a worker "
        "runs one job at a time, and the workers' own setting with --scheduler",
    )  # fmt: skip
    p.add_argument(
        "--memory-limit", metavar="SIZE",
        help="memory per local worker, e.g. 4GB (default: the machine's memory shared out evenly)",
    )  # fmt: skip
    p.add_argument(
        "--scheduler", metavar="ADDRESS",
        help="run on the cluster of this Dask scheduler (tcp://host:8786) instead of a local one",
    )  # fmt: skip
    p.add_argument(
        "--retries", type=int, default=1,
        help="more tries of a job that failed for a reason that may pass (out of memory, a lost worker)",
    )  # fmt: skip
    p.add_argument("--no-resume", action="store_true", help="run every job, also those already complete")
    add_quiet(p)
    p.set_defaults(func=cmd_batch)
    return p


def _memory(text: str | None) -> int | None:
    if text is None:
        return None
    from dask.utils import parse_bytes

    from ..core.errors import InputError

    try:
        return int(parse_bytes(text))
    except (ValueError, TypeError):
        raise InputError(f"--memory-limit takes a size such as 4GB or 500MB, got {text!r}.") from None


def cmd_batch(args: argparse.Namespace) -> int:
    """Run ``napari-nephi batch``."""
    from ..batch import run

    bars = ProgressBars(quiet=args.quiet)
    try:
        rows = run(
            args.jobs, args.output, scheduler=args.scheduler, workers=args.workers,
            threads_per_worker=args.threads_per_worker, memory_limit=_memory(args.memory_limit),
            retries=args.retries, resume=not args.no_resume, progress=bars,
            log=None if args.quiet else lambda line: print(line, file=sys.stderr),
        )  # fmt: skip
    finally:
        bars.close()
    failed = [r for r in rows if r["status"] == "failed"]
    if not args.quiet:
        counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "skipped", "failed")}
        print(
            f"{len(rows)} jobs: {counts['done']} done, {counts['skipped']} already complete (skipped), "
            f"{counts['failed']} failed. Summary: {args.output}/summary.csv"
        )
        for r in failed[:20]:
            print(f"failed: {r['job']} (row {r['row']}): {r['error_type']}: {r['error']}", file=sys.stderr)
        if len(failed) > 20:
            print(f"... and {len(failed) - 20} more failed jobs; see the summary.", file=sys.stderr)
    return EXIT_SOME_FAILED if failed else 0
