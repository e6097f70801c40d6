"""Batch registration on Dask distributed: many pairs, stacks, slides and sections from one job table.

``run(jobs, out)`` runs a table (see :mod:`.jobs` for its columns) on a local cluster or on a
running one and returns the summary; ``napari-nephi batch JOBS -o OUT`` is its command line.
See ``docs/batch.md``.
"""

from .cluster import MissingDependencyError, local_size, open_client
from .jobs import COLUMNS, KINDS, Job, read_jobs
from .run import run, write_summary
from .tasks import RESULT, run_job

__all__ = [
    "COLUMNS",
    "KINDS",
    "RESULT",
    "Job",
    "MissingDependencyError",
    "local_size",
    "open_client",
    "read_jobs",
    "run",
    "run_job",
    "write_summary",
]
