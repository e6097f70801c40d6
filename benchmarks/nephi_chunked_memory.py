"""Peak memory of NePhi with and without divide-and-downsample as a 3D volume grows (CPU).

Each size and mode runs in a fresh subprocess (peak resident memory is per process). Printed per
run, in MiB above the resident size just before ``register`` (inputs already in memory):

- ``peak``: the whole call (optimisation, dense fields, warping, metrics);
- ``opt``: the largest value sampled during the optimisation steps (progress callbacks + a 5 ms
  sampling thread while steps run), i.e. what the optimisation itself holds;
- ``fields``: the size of the result arrays every mode must return (forward and backward
  displacement, warped image: 7 float32 per voxel in 3D), for reference.

Each subprocess first registers a 24^3 crop, so one-time import costs are not counted.
Iteration counts are tiny: memory, not accuracy, is measured. Chunked runs use fixed 32^3 chunks
(overlap 8; ``--chunk-size`` to change) and a global pass of about 32^3 voxels, whatever the
volume size.

    .venv/bin/python benchmarks/nephi_chunked_memory.py --sizes 48 64 96 128
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def one(n: int, chunked: bool, chunk_size: int = 32) -> dict:
    import numpy as np
    import torch
    from _measure import rss_bytes

    import napari_nephi
    from napari_nephi.core.transform import DisplacementTransform
    from napari_nephi.synthetic.deformation import random_smooth_displacement

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    from scipy import ndimage as ndi

    moving = ndi.gaussian_filter(rng.standard_normal((n, n, n)), 2).astype(np.float32)
    u = random_smooth_displacement(moving.shape, max_displacement=2.0, smoothness=n / 6, seed=1)
    fixed = DisplacementTransform(u).warp(moving)
    del u
    opts = dict(method="nephi", device="cpu", levels=2, coarse_iterations=3, iterations=5, hidden=32)
    if chunked:
        opts.update(
            chunked=True,
            chunk_size=chunk_size,
            chunk_overlap=8,
            global_factor=max(2, n // 32),
            chunk_iterations=3,
        )
    else:
        opts.update(chunked=False)
    # warm up: lazy imports (torch._dynamo through the optimiser, ...) take ~200 MiB once per process
    small = (slice(0, 24),) * 3
    warm = dict(opts, iterations=1, coarse_iterations=1)
    if chunked:
        warm.update(chunk_size=16, chunk_iterations=1, global_factor=2)
    napari_nephi.register(fixed[small], moving[small], **warm)
    import gc

    gc.collect()
    base = rss_bytes()
    peak_opt = [base]
    running = threading.Event()
    done = threading.Event()
    peak_all = [base]

    def sample():
        while not done.is_set():
            r = rss_bytes()
            peak_all[0] = max(peak_all[0], r)
            if running.is_set():
                peak_opt[0] = max(peak_opt[0], r)
            time.sleep(0.005)

    def progress(e):
        running.set()
        peak_opt[0] = max(peak_opt[0], rss_bytes())
        if e.step == e.total:
            running.clear()

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    start = time.perf_counter()
    reg = napari_nephi.register(fixed, moving, progress=progress, **opts)
    seconds = time.perf_counter() - start
    done.set()
    t.join()
    mib = 2**20
    return {
        "n": n,
        "mode": "chunked" if chunked else "whole",
        "voxels": n**3,
        "peak_mib": (peak_all[0] - base) / mib,
        "opt_mib": (peak_opt[0] - base) / mib,
        "fields_mib": 7 * n**3 * 4 / mib,
        "seconds": seconds,
        "chunks": reg.metrics.get("chunks", 1),
        "folds": reg.metrics["folds"],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[48, 64, 96, 128])
    ap.add_argument("--one", type=int)
    ap.add_argument("--chunked", action="store_true")
    ap.add_argument("--chunk-size", type=int, default=32)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.chunked, args.chunk_size)))
        return
    print(
        f"{'size':>6} {'mode':>8} {'chunks':>6} {'peak MiB':>9} {'opt MiB':>8} {'fields MiB':>10} {'s':>7} "
        "folds"
    )
    for n in args.sizes:
        for chunked in (False, True):
            cmd = [sys.executable, __file__, "--one", str(n), "--chunk-size", str(args.chunk_size)]
            cmd += ["--chunked"] if chunked else []
            out = (
                subprocess.run(cmd, capture_output=True, text=True, check=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            r = json.loads(out)
            print(
                f"{n:>4}^3 {r['mode']:>8} {r['chunks']:>6} {r['peak_mib']:>9.1f} {r['opt_mib']:>8.1f} "
                f"{r['fields_mib']:>10.1f} {r['seconds']:>7.1f} {r['folds']}",
                flush=True,
            )


if __name__ == "__main__":
    main()
