"""The Dask cluster a batch runs on: a ``LocalCluster`` sized to this machine, or a running scheduler."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass

from ..core.errors import InputError, RegistrationError
from ..core.options import check_int
from ..core.system import cores

#: Thread pools of compiled libraries, limited in every worker process of a local cluster.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


#: Dask settings of the local cluster's workers. Dask starts worker processes with
#: ``MALLOC_TRIM_THRESHOLD_=65536``, which fixes glibc's mmap threshold at 128 KiB: every large torch
#: tensor is then mapped and unmapped again, and a registration job took 1.6x the CPU time of the same
#: job in a plain process (7.3 against 4.6 s, benchmarks/batch_throughput.py). The statistical profiler
#: samples every thread's stack every 10 ms, which a batch of registrations does not need; the
#: system and memory monitors and the event loop's tick run less often (an idle worker used 0.020
#: CPU seconds per second with Dask's defaults, 0.006 with these; a job lasts seconds to hours).
WORKER_CONFIG = {
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    "distributed.worker.profile.enabled": False,
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "500ms",
    "distributed.admin.tick.interval": "100ms",
}


class MissingDependencyError(RegistrationError, ImportError):
    """An optional package that a feature needs is not installed."""


def import_distributed():
    """The ``distributed`` module, or :class:`MissingDependencyError` saying how to install it."""
    try:
        import distributed
    except ImportError:
        raise MissingDependencyError(
            "Batch processing runs on Dask distributed, which is not installed; install it with "
            "pip install 'napari-nephi[batch]' (or pip install distributed)."
        ) from None
    return distributed


@dataclass
class LocalSize:
    """Worker processes, threads of each worker's job (torch, OpenCV, BLAS) and memory per worker."""

    workers: int
    threads: int
    memory_limit: int


def local_size(
    workers: int | None = None, threads_per_worker: int | None = None, memory_limit: int | None = None
) -> LocalSize:
    """Size a local cluster: by default one single-thread worker per core, the memory shared out evenly.

    Each worker runs one job at a time with ``threads_per_worker`` threads, so
    ``workers * threads_per_worker`` should not exceed the cores.
    """
    import psutil

    threads = check_int("threads_per_worker", threads_per_worker or 1, 1, 1024)
    n = check_int("workers", workers, 1, 4096) if workers is not None else max(1, cores() // threads)
    total = psutil.virtual_memory().total
    limit = check_int("memory_limit", memory_limit, 2**26) if memory_limit is not None else total // n
    return LocalSize(n, threads, limit)


def has_dashboard() -> bool:
    """Whether the Dask dashboard can be served here (it needs bokeh)."""
    return importlib.util.find_spec("bokeh") is not None


def dashboard_line(client, local: bool) -> str:
    """A line naming the dashboard's address, or saying why there is none (``local``: the scheduler
    runs in this process, so bokeh's absence here means no dashboard)."""
    services = client.scheduler_info().get("services", {})
    if "dashboard" not in services or (local and not has_dashboard()):
        return (
            "Dask dashboard: not available (it needs bokeh: pip install 'bokeh>=3.1'); the jobs run anyway."
        )
    return f"Dask dashboard: {client.dashboard_link}"


def gpu_workers(client) -> int:
    """How many workers of the cluster were started with a ``GPU`` resource (``--resources GPU=1``)."""
    try:  # counted on the scheduler: scheduler_info() lists only the first workers in some releases
        return int(client.run_on_scheduler(_count_gpu_workers))
    except Exception:  # an older scheduler or one that refuses to run functions
        workers = client.scheduler_info().get("workers", {}).values()
        return sum(1 for w in workers if (w.get("resources") or {}).get("GPU", 0) > 0)


def _count_gpu_workers(dask_scheduler) -> int:
    """Run on the scheduler: its workers with a ``GPU`` resource."""
    return sum((ws.resources or {}).get("GPU", 0) > 0 for ws in dask_scheduler.workers.values())


@contextlib.contextmanager
def open_client(
    scheduler: str | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: int | None = None,
    processes: bool = True,
) -> Iterator[tuple[object, int | None]]:
    """Yield ``(client, threads)``: a client of the scheduler at ``scheduler``, or of a new local cluster
    (closed at the end). ``threads``: threads per job on a local cluster, None on a running one (each
    job then uses the worker's cores shared by its task slots)."""
    distributed = import_distributed()
    if scheduler:
        try:
            client = distributed.Client(scheduler, timeout="20s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise InputError(
                f"Cannot reach the Dask scheduler at {scheduler} ({' '.join(str(exc).split())}); start one "
                "with 'dask scheduler' and workers with 'dask worker ADDRESS', or leave --scheduler out to "
                "run on this machine."
            ) from None
        with client:
            yield client, None
        return
    size = local_size(workers, threads_per_worker, memory_limit)
    kwargs = {
        "n_workers": size.workers,
        "threads_per_worker": 1,  # one job at a time per worker; the job itself uses size.threads
        "processes": processes,
        "memory_limit": size.memory_limit,
        "dashboard_address": ":0",  # any free port (without bokeh: a page saying so)
    }
    if processes:
        kwargs["env"] = {name: str(size.threads) for name in THREAD_VARIABLES}
    import dask

    with dask.config.set(WORKER_CONFIG):
        cluster = distributed.LocalCluster(**kwargs)
    with cluster, distributed.Client(cluster) as client:
        yield client, size.threads
