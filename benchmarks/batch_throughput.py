"""Throughput of ``napari_nephi.batch.run`` on a local Dask cluster: 1 and 2 workers against a plain loop.

Eight small real images from scikit-image (camera, astronaut grey, coins, moon, text, brick, grass,
retina grey), each resized to SIZE x SIZE and warped by a known smooth field
(``napari_nephi.synthetic.random_smooth_displacement``, 4 px at most, seed = the pair's index), make
eight ``pair`` jobs of one method with the engine's defaults. The same jobs run

1. one after another in this process (``batch.run_job``, the function each worker task calls);
2. with ``batch.run`` on a LocalCluster of 1 worker process;
3. with ``batch.run`` on a LocalCluster of 2 worker processes;

every job with 1 thread (torch, OpenCV, BLAS). Before the timed part, each worker process (and this
process, for the loop) runs one tiny warm-up registration, so the timings compare steady work; the
cluster's start (worker processes, imports, warm-up) is printed on its own and added in the
"with start" columns. Printed per configuration: wall seconds, jobs per minute, CPU seconds per job
(process time inside the job), the speed-up of 2 workers over 1 (target >= 1.7 on 2 cores), the
overhead of the cluster over the loop (target < 5 %), peak resident memory per worker process (the
whole process: Python, torch, the job), and the load average before and after, since other
programs on the machine disturb wall times (CPU seconds per job much less). Every job must end
'done' with a better NCC. On a machine whose working tree others edit, run a frozen copy
(``git archive HEAD | tar -x -C /tmp/frozen`` and ``PYTHONPATH=/tmp/frozen/src``): the worker
processes import the package after the loop has run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/batch_throughput.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/batch_throughput.py --size 96 --method affine
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

IMAGES = ("camera", "astronaut", "coins", "moon", "text", "brick", "grass", "retina")


def load_grey(name: str, size: int) -> np.ndarray:
    """A scikit-image sample as float32 grey in [0, 1], resized to ``size`` x ``size``."""
    from skimage import data
    from skimage.color import rgb2gray
    from skimage.transform import resize

    image = getattr(data, name)()
    grey = rgb2gray(image) if image.ndim == 3 else image.astype(np.float64) / 255.0
    return resize(grey, (size, size), anti_aliasing=True).astype(np.float32)


def make_pairs(folder: Path, size: int) -> list[tuple[str, str, str]]:
    """Write the fixed and moving TIFFs; return (name, fixed path, moving path) per pair."""
    import tifffile

    from napari_nephi import DisplacementTransform
    from napari_nephi.synthetic import random_smooth_displacement

    pairs = []
    for seed, name in enumerate(IMAGES):
        fixed = load_grey(name, size)
        u = random_smooth_displacement((size, size), 4.0, 12.0, seed=seed)
        moving = np.asarray(DisplacementTransform(u).warp(fixed), np.float32)
        tifffile.imwrite(folder / f"{name}_fixed.tif", fixed)
        tifffile.imwrite(folder / f"{name}_moving.tif", moving)
        pairs.append((name, str(folder / f"{name}_fixed.tif"), str(folder / f"{name}_moving.tif")))
    return pairs


def warm_up(folder: str, method: str) -> float:
    """One tiny registration through the batch task (imports, first-call costs); returns its seconds."""
    import tifffile
    import torch

    from napari_nephi.batch import Job, run_job

    torch.set_num_threads(1)
    start = time.perf_counter()
    path = Path(folder) / f"warm-{os.getpid()}"
    path.mkdir(exist_ok=True)
    image = np.zeros((32, 32), np.float32)
    image[8:24, 10:22] = 1.0
    tifffile.imwrite(path / "f.tif", image)
    tifffile.imwrite(path / "m.tif", np.roll(image, 1, axis=0))
    job = Job(row=0, output="warm", fixed=str(path / "f.tif"), moving=str(path / "m.tif"), method=method)
    record = run_job(job, path / "out", threads=1)
    assert record["status"] == "done", record
    return time.perf_counter() - start


def loop(jobs, out: Path) -> tuple[float, list[dict]]:
    """The jobs one after another in this process."""
    from napari_nephi.batch import run_job

    out.mkdir()
    start = time.perf_counter()
    records = [run_job(job, out, threads=1) for job in jobs]
    return time.perf_counter() - start, records


def cluster(jobs, out: Path, workers: int, scratch: str, method: str) -> tuple[float, float, list[dict]]:
    """The jobs on a LocalCluster of ``workers`` processes: (start seconds, run seconds, summary rows)."""
    from napari_nephi.batch import open_client, run

    start = time.perf_counter()
    with open_client(workers=workers, threads_per_worker=1) as (client, _):
        client.run(warm_up, scratch, method)  # every worker, before the timed part
        started = time.perf_counter()
        rows = run(jobs, out, client=client, threads_per_worker=1, retries=0)
        ran = time.perf_counter() - started
    return started - start, ran, rows


def _check(rows: list[dict], what: str) -> None:
    bad = [
        r for r in rows if r["status"] != "done" or r["metrics"]["ncc_after"] <= r["metrics"]["ncc_before"]
    ]
    if bad:
        sys.exit(f"{what}: jobs failed or did not improve: {bad}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=128, help="side of the images, pixels")
    p.add_argument("--method", default="nephi", help="engine of every job, with its defaults")
    args = p.parse_args()

    import torch

    from napari_nephi.batch import Job
    from napari_nephi.batch.cluster import cores

    torch.set_num_threads(1)
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as scratch:
        folder = Path(scratch)
        pairs = make_pairs(folder, args.size)
        jobs = [
            Job(row=k + 1, output=name, fixed=f, moving=m, method=args.method)
            for k, (name, f, m) in enumerate(pairs)
        ]
        warm_up(scratch, args.method)
        seq_s, seq_rows = loop(jobs, folder / "loop")
        _check(seq_rows, "loop")
        load.append(os.getloadavg()[0])
        results = {}
        for n in (1, 2):
            start_s, run_s, rows = cluster(jobs, folder / f"cluster{n}", n, scratch, args.method)
            _check(rows, f"{n} workers")
            results[n] = (start_s, run_s, rows)
            load.append(os.getloadavg()[0])

    def cpu_per_job(rows):
        return np.mean([r["cpu_seconds"] for r in rows])

    def peak(rows):
        return max(r["worker_peak_rss_mb"] for r in rows)

    n_jobs = len(jobs)
    print(f"batch throughput: {n_jobs} pairs {args.size}x{args.size} ({', '.join(IMAGES)}), method "
          f"{args.method} (defaults), 1 thread per job, {cores()} cores")  # fmt: skip
    print(f"load average (1 min) before / after loop / after 1 worker / after 2 workers: "
          f"{' / '.join(f'{v:.2f}' for v in load)}")  # fmt: skip
    head = f"{'configuration':<22}{'wall s':>8}{'jobs/min':>10}{'CPU s/job':>11}{'with start s':>14}"
    print(head + f"{'jobs/min':>10}{'peak MB/worker':>16}")
    print(f"{'loop, this process':<22}{seq_s:8.1f}{60 * n_jobs / seq_s:10.2f}{cpu_per_job(seq_rows):11.2f}"
          f"{'':>14}{'':>10}{peak(seq_rows):16.0f}")  # fmt: skip
    for n, (start_s, run_s, rows) in results.items():
        print(f"{f'cluster, {n} worker' + ('s' if n > 1 else ''):<22}{run_s:8.1f}{60 * n_jobs / run_s:10.2f}"
              f"{cpu_per_job(rows):11.2f}{start_s + run_s:14.1f}{60 * n_jobs / (start_s + run_s):10.2f}"
              f"{peak(rows):16.0f}")  # fmt: skip
    (s1, r1, _), (s2, r2, _) = results[1], results[2]
    print(f"speed-up 2 workers / 1 worker: {r1 / r2:.2f}x steady, {(s1 + r1) / (s2 + r2):.2f}x with start "
          f"(target >= 1.7)")  # fmt: skip
    print(f"overhead of the cluster (1 worker) over the loop: {100 * (r1 / seq_s - 1):+.1f} % steady, "
          f"{100 * ((s1 + r1) / seq_s - 1):+.1f} % with start (target < 5 %)")  # fmt: skip
    cpu = cpu_per_job(seq_rows)
    print(f"CPU seconds per job against the loop (not disturbed by the load as wall times are): "
          f"{100 * (cpu_per_job(results[1][2]) / cpu - 1):+.1f} % with 1 worker, "
          f"{100 * (cpu_per_job(results[2][2]) / cpu - 1):+.1f} % with 2")  # fmt: skip
    print(f"cluster start (processes, imports, warm-up): {s1:.1f} s with 1 worker, {s2:.1f} s with 2")
    ncc = [(r["metrics"]["ncc_before"], r["metrics"]["ncc_after"]) for r in results[2][2]]
    print(f"NCC before -> after, mean over the pairs: {np.mean([a for a, _ in ncc]):.3f} -> "
          f"{np.mean([b for _, b in ncc]):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
