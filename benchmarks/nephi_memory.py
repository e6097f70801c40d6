# ruff: noqa: E501  (table-printing lines)
"""Peak memory as the image grows: NePhi instance optimisation vs a dense voxel displacement field.

    python benchmarks/nephi_memory.py [--sizes2d 256 512 1024 2048] [--sizes3d 64 128 192 256]
        [--methods nephi nephi-l1 dense] [--iterations 3] [--limit-gib 12] [--json out.json]
    python benchmarks/nephi_memory.py --table out.json     # the table of an earlier run
    python benchmarks/nephi_memory.py --sizes2d 2048 --sizes3d 256 --methods nephi dense --rounds 3

Every measurement runs in a fresh child process (a clean allocator and a clean baseline); the
child makes the pair, collects garbage, then samples its resident set size every 5 ms during the
call (:mod:`_measure`). "MiB" is the peak above the level just before the call. Memory per
iteration does not change after the first optimiser step (fixed point counts, or fixed grids), so
a few iterations measure it; the registrations are not run to convergence and no accuracy is
claimed here. Each child's address space is capped with ``RLIMIT_DATA`` (``--limit-gib``), so a
size that does not fit fails with an allocation error instead of waking the OOM killer.

Before the measured call each child runs the same method once on a tiny pair of the same
dimensionality, so lazy imports (``torch.optim`` pulls in ``torch._dynamo``) and one-time
allocations are in the baseline, not in the peak.

``--rounds R`` (session 44; 0, the default, as above): per shape one child process runs the methods in turn,
``R`` rounds, their order reversed on every second round, each call's peak read above the level just before it
(garbage collected and the freed heap handed back first, as above), after one warm-up of each method on the
tiny pair. The methods then see the same process, allocator and load, so the ratio dense / NePhi of each round
is a paired reading; the table gives every round's peaks and ratios (the first method named is the numerator's
partner: ``--methods nephi dense`` gives dense / NePhi), and their spread.

Methods (CPU, 1 torch thread):

* ``nephi``: ``napari_nephi.register(fixed, moving, method="nephi", preset="fast",
  iterations=N, coarse_iterations=N)``, the whole call: the coarse stationary-velocity stage
  (dense, on grids 4x and 2x coarser, none above 2^17 voxels), the neural field on sampled
  points (autograd on at most 8192 at a time), then the dense forward
  and backward displacements, the warped image and the metrics. The peak is also split by phase:
  optimisation (up to the last progress step) and outputs (dense fields, warp, metrics).
* ``nephi-l1``: the same with ``levels=1``: no coarse stage, only the neural field.
* ``dense``: the baseline: forward and backward displacement fields as voxel grids at full
  resolution (``(1, D, *shape)`` float32 each), optimised with Adam on the same loss form:
  symmetric global NCC of ``moving(phi(x))`` vs ``fixed(x)`` and ``fixed(phi_inv(x))`` vs
  ``moving(x)`` (evaluated on every voxel, as a dense method does) plus ``0.1 x`` GradICON
  ``||J_{phi_inv o phi} - I||_F^2`` (symmetrised) by forward differences on the grid (as in
  GradICON's dense implementation). Its output is the fields themselves.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
THREADS = 1  # the shared 2-core machine is overloaded; multi-threaded torch mostly spin-waits


# --------------------------------------------------------------------------------------------
# child side


def make_pair(shape):
    import numpy as np
    from scipy import ndimage
    from skimage import data

    from napari_nephi.core.transform import DisplacementTransform
    from napari_nephi.synthetic import mri_volume

    src = data.camera().astype(np.float32) / 255.0 if len(shape) == 2 else mri_volume()[0]
    fixed = ndimage.zoom(src, [n / s for n, s in zip(shape, src.shape)], order=1).astype(np.float32)
    fixed = np.ascontiguousarray(fixed[tuple(slice(0, n) for n in shape)])
    # a smooth deformation, a few percent of the image: only memory is measured here
    grids = np.meshgrid(*[np.linspace(0, 2 * np.pi, n, dtype=np.float32) for n in shape], indexing="ij")
    amp = 0.01 * min(shape)
    u = np.stack([amp * np.sin(grids[(a + 1) % len(shape)]) for a in range(len(shape))])
    moving = DisplacementTransform(u).warp(fixed)
    del u, grids
    return fixed, np.ascontiguousarray(moving, np.float32)


class Sampler:
    """RSS every 5 ms with time stamps, so the peak can be split by phase afterwards."""

    def __init__(self):
        from _measure import rss_bytes

        self.rss = rss_bytes
        self.samples: list[tuple[float, int]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.done.is_set():
            self.samples.append((time.perf_counter(), self.rss()))
            time.sleep(0.005)

    def __enter__(self):
        import torch

        from napari_nephi.core.device import release_free_memory

        gc.collect()
        release_free_memory(torch.device("cpu"))  # hand the warm-up's freed heap back first
        self.base = self.rss()
        self.t0 = time.perf_counter()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.samples.append((time.perf_counter(), self.rss()))
        self.t1 = time.perf_counter()

    def peak_mib(self, start=None, end=None) -> float:
        start = self.t0 if start is None else start
        end = self.t1 if end is None else end
        vals = [r for t, r in self.samples if start <= t <= end] or [self.base]
        return (max(vals) - self.base) / 2**20


def run_nephi(fixed, moving, iterations: int, levels: int | None):
    import napari_nephi

    marks: list[float] = []

    def mark():  # called once per step as the "cancel" flag: time stamps without previews
        marks.append(time.perf_counter())
        return False

    opts = dict(preset="fast", iterations=iterations, coarse_iterations=iterations)
    if levels is not None:
        opts["levels"] = levels
    with Sampler() as s:
        reg = napari_nephi.register(fixed, moving, method="nephi", device="cpu", cancel=mark, **opts)
    opt_end = marks[-1] if marks else s.t0
    return dict(
        peak_mib=s.peak_mib(),
        opt_peak_mib=s.peak_mib(end=opt_end),
        out_peak_mib=s.peak_mib(start=opt_end),
        seconds=s.t1 - s.t0,
        opt_seconds=opt_end - s.t0,
        sample_points=reg.metrics.get("sample_points"),
        reg_points=reg.metrics.get("reg_points"),
        levels=reg.metrics.get("levels"),
    )


def dense_gradicon(fixed, moving, iterations: int, reg_weight: float = 0.1, lr: float = 1e-3):
    """Optimise dense forward/backward displacement grids (normalised units) with NCC + GradICON."""
    import torch
    import torch.nn.functional as F

    from napari_nephi.core.similarity import ncc

    d = fixed.ndim
    shape = fixed.shape
    f = torch.as_tensor(fixed)[None, None]
    m = torch.as_tensor(moving)[None, None]
    axes = [torch.linspace(-1, 1, n) for n in shape]
    ident = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)[None]  # (1, D, *shape), (z,) y, x
    to_vox = torch.tensor([(n - 1) / 2 for n in shape]).reshape(1, d, *[1] * d)

    def sample(img, pts):  # pts (1, D, *shape) normalised in numpy axis order
        grid = torch.movedim(pts, 1, -1).flip(-1)
        return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=True)

    def gradicon_fd(comp):  # comp = phi_b(phi_f(x)) on the grid, normalised; J by forward differences
        c = comp * to_vox
        total = 0.0
        for a in range(d):
            diff = torch.diff(c, dim=2 + a)
            eye = torch.zeros(1, d, *[1] * d)
            eye[0, a] = 1.0
            total = total + ((diff - eye) ** 2).sum(1).mean()
        return total

    u_f = torch.zeros(1, d, *shape, requires_grad=True)
    u_b = torch.zeros(1, d, *shape, requires_grad=True)
    opt = torch.optim.Adam([u_f, u_b], lr=lr)
    losses = []
    for _ in range(iterations):
        opt.zero_grad(set_to_none=True)
        phi_f = ident + u_f
        phi_b = ident + u_b
        sim = 0.5 * ((1 - ncc(f, sample(m, phi_f))) + (1 - ncc(m, sample(f, phi_b))))
        comp_fb = phi_f + sample(u_b, phi_f)  # phi_b(phi_f(x))
        comp_bf = phi_b + sample(u_f, phi_b)  # phi_f(phi_b(x))
        loss = sim + reg_weight * 0.5 * (gradicon_fd(comp_fb) + gradicon_fd(comp_bf))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return u_f.detach(), u_b.detach(), losses


def run_dense(fixed, moving, iterations: int):
    with Sampler() as s:
        out = dense_gradicon(fixed, moving, iterations)
    del out
    return dict(peak_mib=s.peak_mib(), seconds=s.t1 - s.t0)


def _run_method(method: str, fixed, moving, iterations: int) -> dict:
    if method == "dense":
        return run_dense(fixed, moving, iterations)
    return run_nephi(fixed, moving, iterations, 1 if method == "nephi-l1" else None)


def _guarded(method: str, fixed, moving, iterations: int) -> dict:
    try:
        return _run_method(method, fixed, moving, iterations)
    except (MemoryError, RuntimeError) as exc:  # torch reports failed allocations as RuntimeError
        return dict(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")


def child(method: str, shape, iterations: int, limit_gib: float, rounds: int = 0) -> None:
    """One measurement (``method``), or with ``rounds`` the methods of ``method`` (comma-separated) in turn,
    ``rounds`` times in this one process, the order reversed on every second round; one RESULT line a call."""
    lim = int(limit_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (lim, lim))
    import torch

    torch.set_num_threads(THREADS)
    methods = method.split(",")
    for name in methods:
        _run_method(name, *make_pair((32,) * len(shape)), iterations)  # warm-up, not measured
    fixed, moving = make_pair(shape)
    if rounds <= 0:
        print("RESULT " + json.dumps(_guarded(methods[0], fixed, moving, iterations)), flush=True)
        return
    for r in range(rounds):
        for name in methods if r % 2 == 0 else methods[::-1]:
            row = _guarded(name, fixed, moving, iterations)
            row.update(method=name, round=r, load=os.getloadavg()[0])
            print("RESULT " + json.dumps(row), flush=True)


# --------------------------------------------------------------------------------------------
# parent side

LABELS = {
    "nephi": "NePhi fast (coarse stage + neural field), whole call",
    "nephi-l1": "NePhi fast, levels=1 (neural field only), whole call",
    "dense": "dense voxel fields + GradICON",
}


def measure_one(method, shape, iterations, limit_gib, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "x".join(map(str, shape))]
    cmd += ["--iterations", str(iterations), "--limit-gib", str(limit_gib)]
    load = os.getloadavg()[0]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE)
    except subprocess.TimeoutExpired:
        return dict(error=f"timeout after {timeout} s", load=load)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            row = json.loads(line[7:])
            row["load"] = load
            return row
    return dict(error=f"child exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}", load=load)


def measure_rounds(methods, shape, iterations, limit_gib, timeout, rounds) -> list[dict]:
    """``--rounds``: the methods in one child process, alternating (:func:`child`); one row per call, each
    printed as it comes (a run cut short keeps the calls it finished)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", ",".join(methods), "x".join(map(str, shape))]
    cmd += ["--iterations", str(iterations), "--limit-gib", str(limit_gib), "--rounds", str(rounds)]
    rows: list[dict] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=HERE)
    timer = threading.Timer(timeout * rounds * len(methods), proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            if line.startswith("RESULT "):
                row = json.loads(line[7:])
                rows.append(row)
                state = row.get("error") or f"{row['peak_mib']:8.0f} MiB  {row['seconds']:7.1f} s"
                name = "x".join(map(str, shape))
                print(
                    f"{name:>12} round {row['round']} {row['method']:9s} {state}  load {row['load']:.1f}",
                    flush=True,
                )
    finally:
        timer.cancel()
        proc.wait()
    if not rows:
        rows = [dict(method=m, round=0, error=f"child exit {proc.returncode}") for m in methods]
    return rows


def print_rounds(rows, methods) -> None:
    """``--rounds``: each round's peaks and the paired ratios of every other method's peak to the first's."""
    first = methods[0]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        here = [r for r in rows if r["shape"] == shape]
        print(f"\n{shape}, {max(r['round'] for r in here) + 1} round(s), one process, alternating:")
        for m in methods:
            peaks = [r["peak_mib"] for r in here if r["method"] == m and "error" not in r]
            text = ", ".join(f"{p:.0f}" for p in peaks) or "failed"
            print(
                f"  {m:9s} peak MiB {text}"
                + (f"  (min {min(peaks):.0f}, max {max(peaks):.0f})" if peaks else "")
            )
        for m in methods[1:]:
            ratios = []
            for k in sorted({r["round"] for r in here}):
                a = next(
                    (r for r in here if r["round"] == k and r["method"] == first and "error" not in r), None
                )
                b = next((r for r in here if r["round"] == k and r["method"] == m and "error" not in r), None)
                if a and b:
                    ratios.append(b["peak_mib"] / max(a["peak_mib"], 1))
            if ratios:
                text = ", ".join(f"{x:.2f}" for x in ratios)
                print(f"  {m} / {first} per round: {text}  (min {min(ratios):.2f}, max {max(ratios):.2f})")


def print_table(rows) -> None:
    """Markdown table; ratios are dense peak / NePhi peak (whole call, or its optimisation phase)."""
    by = {(r["shape"], r["method"]): r for r in rows}

    def ok(r):
        return r is not None and "error" not in r

    def cell(r):
        if r is None:
            return "-"
        if "error" in r:
            return "failed"
        if "opt_peak_mib" in r:
            return f"{r['peak_mib']:.0f} ({r['opt_peak_mib']:.0f} / {r['out_peak_mib']:.0f})"
        return f"{r['peak_mib']:.0f}"

    def ratio(dn, r, key):
        return f"{dn['peak_mib'] / max(r[key], 1):.1f}" if ok(dn) and ok(r) else "-"

    def secs(r):
        return f"{r['seconds']:.0f}" if ok(r) else "-"

    print(
        "\n| shape | voxels | NePhi MiB (optim. / outputs) | NePhi levels=1 MiB (optim. / outputs) | dense MiB "
        "| dense / NePhi | dense / NePhi levels=1 | dense / NePhi levels=1 optim. | s: NePhi, levels=1, dense |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        n, l1, dn = by.get((shape, "nephi")), by.get((shape, "nephi-l1")), by.get((shape, "dense"))
        vox = next(r["voxels"] for r in rows if r["shape"] == shape)
        print(
            f"| {shape} | {vox:,} | {cell(n)} | {cell(l1)} | {cell(dn)} | {ratio(dn, n, 'peak_mib')} "
            f"| {ratio(dn, l1, 'peak_mib')} | {ratio(dn, l1, 'opt_peak_mib')} "
            f"| {secs(n)}, {secs(l1)}, {secs(dn)} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes2d", type=int, nargs="*", default=[256, 512, 1024, 2048])
    p.add_argument("--sizes3d", type=int, nargs="*", default=[64, 128, 192, 256])
    p.add_argument("--methods", nargs="*", default=["nephi", "nephi-l1", "dense"])
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--limit-gib", type=float, default=12.0)
    p.add_argument("--timeout", type=int, default=900, help="seconds per measurement")
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--table", metavar="JSON", help="only print the table of an earlier --json file")
    p.add_argument(
        "--rounds", type=int, default=0, help="methods alternating in one process, this many rounds"
    )
    p.add_argument("--child", nargs=2, metavar=("METHOD", "SHAPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        method, shape = args.child
        child(method, tuple(int(s) for s in shape.split("x")), args.iterations, args.limit_gib, args.rounds)
        return

    if args.table:
        with open(args.table) as fh:
            print_table(json.load(fh))
        return
    import torch

    print(
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.iterations} iterations per stage, load {os.getloadavg()}",
        flush=True,
    )
    shapes = [(s, s) for s in args.sizes2d] + [(s, s, s) for s in args.sizes3d]
    rows = []
    if args.rounds > 0:
        for shape in shapes:
            got = measure_rounds(
                args.methods, shape, args.iterations, args.limit_gib, args.timeout, args.rounds
            )
            for row in got:
                row.update(shape="x".join(map(str, shape)), voxels=int(torch.tensor(shape).prod()))
            rows += got
        print_rounds(rows, args.methods)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(rows, fh, indent=1)
        return
    for shape in shapes:
        for method in args.methods:
            row = measure_one(method, shape, args.iterations, args.limit_gib, args.timeout)
            row.update(shape="x".join(map(str, shape)), voxels=int(torch.tensor(shape).prod()), method=method)
            rows.append(row)
            if "error" in row:
                print(f"{row['shape']:>12} {method:9s} FAILED {row['error']}", flush=True)
            else:
                extra = ""
                if "opt_peak_mib" in row:
                    extra = f" (optimisation {row['opt_peak_mib']:.0f}, outputs {row['out_peak_mib']:.0f})"
                print(
                    f"{row['shape']:>12} {method:9s} {row['peak_mib']:8.0f} MiB{extra}  "
                    f"{row['seconds']:7.1f} s  load {row['load']:.1f}",
                    flush=True,
                )

    print_table(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
