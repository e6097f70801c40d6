"""Where :meth:`Correlator.best`'s CPU goes, on the batches a real lookup asks (session 46, issue 12).

The default lookup (``AtlasLookup.search_poses``) of some of the benchmark's sections
(``atlas_paired.sections_of``: query seed ``S`` gives 60 sections, 12 per case) runs once with
:meth:`Correlator.best` wrapped, keeping every call's inputs and its CPU; then, for the most frequent batch
shapes of stage 1 (45-pixel canvas, 72-pixel FFTs) and stage 2 (78-pixel canvas, 96-pixel FFTs), each
part of ``best`` is timed on the captured inputs, its steps in turn as ``best`` runs them: the spectral
products (:meth:`Correlator._spectra`), the inverse FFT along the rows, the one along the columns (the
rows of searched shifts only), the contiguous copy of the searched block, the score arithmetic, and the
maximum with what follows it (:meth:`Correlator._scored`: the tie rule at the shift (0, 0) and the score
without the band at the best shift; review 1, C2); beside them ``best`` itself and ``best_lattice``
(every second shift per axis, the ``stage1_lattice_margin`` rerank option), alternating call by call.
Printed: per stage the CPU of ``best`` per lookup and its calls, then a row per batch shape (ms per call).
1 thread; the timings depend on the machine's load (printed).

Usage::

    cd benchmarks
    OMP_NUM_THREADS=1 nice -n 5 ../.venv/bin/python atlas_best_profile.py --index /tmp/c13/idx \\
        --seed 171 --sections 6 [--repeat 20] [--shapes 3]

Not part of the test run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter, defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import atlas_paired  # noqa: E402

from napari_nephi.engines.atlas import pose_grid, rerank  # noqa: E402

PARTS = ("products", "rows (ifft)", "columns (irfft)", "copy", "arithmetic", "maximum and tie rule")


def capture(lk, images, options) -> tuple[list[dict], float]:
    """Every ``best`` call of the lookups of ``images``: inputs, CPU; and the lookups' CPU (s)."""
    calls: list[dict] = []
    original = pose_grid.Correlator.best

    def wrapped(self, fa, ea, na, fb, nr=None, outside=0.0, free=0.0, plain=False):
        t = time.process_time()
        out = original(self, fa, ea, na, fb, nr, outside, free, plain)
        calls.append(
            dict(
                corr=self,
                args=(fa.clone(), ea.clone(), na.clone(), fb.clone(), None if nr is None else nr.clone()),
                outside=outside,
                free=free,
                plain=plain,
                cpu=time.process_time() - t,
            )
        )
        return out

    pose_grid.Correlator.best = wrapped
    try:
        t = time.process_time()
        for image in images:
            lk.search_poses(image, options)
        total = time.process_time() - t
    finally:
        pose_grid.Correlator.best = original
    return calls, total


def parts(call) -> dict[str, float]:
    """CPU (s) of each step of ``best`` on one captured call, run as ``best`` runs them."""
    corr = call["corr"]
    fa, ea, na, fb, nr = call["args"]
    cpu: dict[str, float] = {}
    t = time.process_time()

    def tick(name):
        nonlocal t
        now = time.process_time()
        cpu[name] = now - t
        t = now

    import torch

    spec = corr._spectra(fa, fb, call["outside"] > 0, corr.ramp)
    tick("products")
    h, w = corr.window
    rows = torch.fft.ifft(spec, dim=-2)[..., :h, :]
    tick("rows (ifft)")
    cols = torch.fft.irfft(rows, n=corr.pad[1], dim=-1)
    tick("columns (irfft)")
    out = cols[..., :w].contiguous()
    tick("copy")
    # _scored's arithmetic and maximum, split: everything up to the maximum, then the rest
    original_max = torch.Tensor.max
    stamp = {}

    def timed_max(self, *a, **k):
        stamp["before"] = time.process_time()
        return original_max(self, *a, **k)

    torch.Tensor.max = timed_max
    try:
        corr._scored(
            out, ea, na, nr, call["outside"], call["free"], call["plain"], (corr.low[0], corr.low[1])
        )
    finally:
        torch.Tensor.max = original_max
    end = time.process_time()
    cpu["arithmetic"] = stamp["before"] - t
    cpu["maximum and tie rule"] = end - stamp["before"]
    return cpu


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--index", required=True, help="index folder (or a folder holding it as 'ours')")
    p.add_argument("--seed", type=int, default=171, help="query seed")
    p.add_argument("--compartments", default="labels")
    p.add_argument("--sections", type=int, default=6, help="sections, evenly spaced over the 60")
    p.add_argument("--repeat", type=int, default=20, help="timed calls per batch shape")
    p.add_argument("--shapes", type=int, default=3, help="most frequent batch shapes per stage")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    lk = atlas_paired._load(args.index)
    options = rerank.check_rerank_options({})
    sections = atlas_paired.sections_of(args.seed, args.compartments)
    lk.search_poses(sections[0][2]["image"], options)  # warm-up, untimed
    step = max(1, len(sections) // args.sections)
    images = [sections[k][2]["image"] for k in range(0, len(sections), step)][: args.sections]
    print(
        f"load {os.getloadavg()[0]:.1f}; index {args.index}; query seed {args.seed}; {len(images)} sections"
    )
    calls, total = capture(lk, images, options)
    n = len(images)
    by_stage: dict[tuple, list] = defaultdict(list)
    for c in calls:
        by_stage[c["corr"].shape].append(c)
    print(
        f"lookup {1000 * total / n:.0f} ms per section; best {1000 * sum(c['cpu'] for c in calls) / n:.0f} ms"
    )
    for shape, cs in sorted(by_stage.items()):
        corr = cs[0]["corr"]
        print(
            f"\ncanvas {shape}, FFT {corr.pad}, searched {corr.window[0]} x {corr.window[1]}: "
            f"{len(cs) / n:.1f} calls and {1000 * sum(c['cpu'] for c in cs) / n:.1f} ms per section"
        )
        print("| batch (sections x slices) | calls | best | lattice | " + " | ".join(PARTS) + " |")
        print("|" + "---|" * (4 + len(PARTS)))
        kinds = Counter((c["args"][0].shape[0], c["args"][3].shape[0]) for c in cs)
        for (r, s), count in kinds.most_common(args.shapes):
            call = next(c for c in cs if (c["args"][0].shape[0], c["args"][3].shape[0]) == (r, s))
            full = (*call["args"], call["outside"], call["free"], call["plain"])
            sums = defaultdict(float)
            for _ in range(args.repeat):  # best, its parts and the lattice in turn, call by call
                t = time.process_time()
                corr.best(*full)
                sums["best"] += time.process_time() - t
                for k, v in parts(call).items():
                    sums[k] += v
                if corr.lattice_ok():
                    t = time.process_time()
                    corr.best_lattice(*full)
                    sums["lattice"] += time.process_time() - t
            ms = {k: 1000 * v / args.repeat for k, v in sums.items()}
            cells = [f"{ms['best']:.2f}", f"{ms['lattice']:.2f}" if "lattice" in ms else "-"]
            cells += [f"{ms[k]:.2f}" for k in PARTS]
            print(f"| {r} x {s} | {count} | " + " | ".join(cells) + " |")
    print(f"\nload at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
