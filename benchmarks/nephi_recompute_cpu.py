"""The CPU cost of the coarse stage's recomputed comparison segments (session 45), paired in one process.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/nephi_recompute_cpu.py [--size 2048] [--rounds 2]
        [--coarse-iterations N] [--iterations N] [--json out.json]

On images of at least ``coarse.RECOMPUTE_MIN_VOXELS`` voxels (2^21) the coarse stage runs each direction
of its comparison as a checkpointed segment that is recomputed in the backward pass (less memory, one more
forward pass of the comparison a step). This runs ``napari_nephi.register(fixed, moving, method="nephi",
device="cpu")`` with the default (fast) preset and its default steps (unless ``--coarse-iterations`` /
``--iterations`` are given) on :func:`nephi_memory.make_pair`'s pair (the camera zoomed to
``--size`` px, a smooth sine warp of 1 % of the size), with the segment off
(``RECOMPUTE_MIN_VOXELS`` set above the image) and on (set to 2^21, its default) in turn, the order
reversed every second round (off, on, on, off, ...), after one warm-up call on a 64 px pair. Per call it
prints the CPU seconds of the whole call (``time.process_time``), of the coarse stage alone (the engine's
``optimize_velocity`` wrapped by a timer) and the wall seconds, and the sha256 of the forward
displacement: the segment is bit for bit, so both arms' digests must be equal. At the end: the mean CPU
seconds per arm and the ratios on / off, whole call and coarse stage. One torch thread.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048, help="image side in px (2D)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of both arms, order reversed every second")
    ap.add_argument("--coarse-iterations", type=int, default=None, help="None: the preset's")
    ap.add_argument("--iterations", type=int, default=None, help="None: the preset's")
    ap.add_argument("--json", default=None, help="write every call's reading here")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    torch.set_num_threads(1)
    from nephi_memory import make_pair

    import napari_nephi
    from napari_nephi.engines.nephi import coarse
    from napari_nephi.engines.nephi import engine as nephi_engine

    coarse_cpu = [0.0]
    inner = nephi_engine.optimize_velocity

    def timed(*a, **k):
        t = time.process_time()
        try:
            return inner(*a, **k)
        finally:
            coarse_cpu[0] += time.process_time() - t

    nephi_engine.optimize_velocity = timed
    default_min = coarse.RECOMPUTE_MIN_VOXELS
    opts = {}
    if args.coarse_iterations is not None:
        opts["coarse_iterations"] = args.coarse_iterations
    if args.iterations is not None:
        opts["iterations"] = args.iterations

    def call(fixed, moving):
        coarse_cpu[0] = 0.0
        t, w = time.process_time(), time.perf_counter()
        reg = napari_nephi.register(fixed, moving, method="nephi", device="cpu", **opts)
        cpu, wall = time.process_time() - t, time.perf_counter() - w
        u = np.ascontiguousarray(reg.transform.displacement(fixed.shape), np.float32)
        return cpu, coarse_cpu[0], wall, hashlib.sha256(u.tobytes()).hexdigest()

    small = make_pair((64, 64))
    call(*small)  # warm-up: lazy imports and one-time allocations
    fixed, moving = make_pair((args.size, args.size))
    rows = []
    for r in range(args.rounds):
        arms = ["off", "on"] if r % 2 == 0 else ["on", "off"]
        for arm in arms:
            coarse.RECOMPUTE_MIN_VOXELS = (1 << 62) if arm == "off" else default_min
            cpu, c_cpu, wall, digest = call(fixed, moving)
            rows.append(
                {
                    "round": r,
                    "arm": arm,
                    "cpu_s": cpu,
                    "coarse_cpu_s": c_cpu,
                    "wall_s": wall,
                    "sha256": digest,
                }
            )
            print(
                f"round {r} segment {arm:3s}: whole call {cpu:7.1f} CPU s, coarse stage {c_cpu:7.1f} CPU s,"
                f" {wall:7.1f} wall s, sha256 {digest[:16]}",
                flush=True,
            )
    coarse.RECOMPUTE_MIN_VOXELS = default_min
    mean = {
        arm: {
            key: float(np.mean([x[key] for x in rows if x["arm"] == arm]))
            for key in ("cpu_s", "coarse_cpu_s")
        }
        for arm in ("off", "on")
    }
    same = len({x["sha256"] for x in rows}) == 1
    off, on = mean["off"], mean["on"]
    print(
        f"mean CPU s off / on: whole call {off['cpu_s']:.1f} / {on['cpu_s']:.1f}"
        f" ({on['cpu_s'] / off['cpu_s']:.3f}x), coarse stage {off['coarse_cpu_s']:.1f}"
        f" / {on['coarse_cpu_s']:.1f} ({on['coarse_cpu_s'] / off['coarse_cpu_s']:.3f}x);"
        f" displacement {'bit for bit equal' if same else 'DIFFERS'} across arms",
        flush=True,
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "mean": mean, "same": same}))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
