"""MITO local truth: the local reading on the generator's true placement, per mitochondrion (session 46).

``kept_reading="local"`` (session 45) read 0.1-0.2 px per section of drift through the tissue on stage-drift
stacks whose mitochondria do not move, on the truth placement too (98: chi-square 8.0 from its 8 blocks). This
script reads :func:`.organelles.relative_motion`'s reading tile by tile on the truth placement (the
generator's matrices, where the tissue stands still and each mitochondrion moves only by its own centroid's
step):

* per mitochondrion (the generator's instance id, from its masks placed the same way): its readings' mean
  (the reading, ``own - tissue``), the mean of its own step (the median of its tiles' mitochondrion part),
  its centroid's mean step (the unrotated instance masks: the truth), the mean of its tiles' tissue steps, and
  the share of its tiles that lie within :data:`NEAR_BORDER` px of the section's content (``pad`` from the
  border), with the tissue's mean on those tiles and on the rest;
* the reading's mean with three se: the engine's 8 blocks of pairs, the mitochondria's spread (tracks: the
  cluster-robust se of :func:`.organelles.track_se`, one track per generator id) and the larger of the two,
  each with its chi-square from 0;
* ``--border B``: the sections' borders left out by ``B`` px (``relative_motion(border=B)``; default 4, the
  engine's before session 46; 12 is ``kept_reading="local-tracks"``).
* ``--engine`` (review 1 of session 46, A5): also the engine's own reading on the truth placement,
  ``relative_motion(..., tracks=True, border=B)`` (its tracks linked by overlap, not by the generator's ids):
  slope, the blocks', the tracks' and the larger se, the tracks' count and the chi-square that
  ``kept_reading="local-tracks"`` classifies with (``"engine"`` in the JSON).

Session 46 read it this way (docs/mito.md): the mitochondria's own steps follow their centroids (per
mitochondrion within 0.06 px per section); the error is the tissue's part. A tissue tile on the section's
border reads about 1 px outward pair after pair (98 stage-drift #3 / #6, 136 #6 / #9), and away from the
border each mitochondrion's few tiles keep a tissue error of up to 0.26 px through depth, which the blocks do
not see.

Usage (``cd /work/main``; one 160-section stack: about 15 CPU s to generate and 45 to read)::

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/mito_local_truth.py 98:stage-drift \\
        136:stage-drift [--border 12] [--engine] [--json /tmp/lt.json]

Not part of the test run (``tests/mito/test_mito_local_truth.py`` runs it on a short stack).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mito_benchmark as mb  # noqa: E402

from napari_nephi.engines.mito import organelles as org  # noqa: E402
from napari_nephi.engines.mito.background import BLOCKS, COARSE_SIGMA, FINE_SIGMA, MARGIN  # noqa: E402
from napari_nephi.synthetic import em_stack  # noqa: E402

#: A tile "on the border" has an edge within this many px of the section's content (``pad`` from the frame).
NEAR_BORDER = 20


def read_stack(data: dict, border: int = 4) -> dict:
    """Tile by tile, the local reading of ``data`` (an ``em_stack`` result) on its true placement, with the
    engine's functions (:func:`.organelles.tile_step`, :func:`.organelles.match`, the same tiles, margins and
    medians as :func:`.organelles.pair_motion`). Returns ``{"tiles": (m, 8) [pair, id, y, x, mito step (2),
    tissue step (2)], "reads": (r, 8) [pair, id, reading (2), own step (2), centroid step (2)]}``."""
    stack, masks, mats, um = data["stack"], data["masks"], data["matrices"], data["unrotated_masks"]
    n, h, w = stack.shape
    edge = np.ones((2 * border + 1,) * 2, np.uint8)
    square = np.ones((2 * MARGIN + 1,) * 2, np.uint8)
    tile = org.TILE

    def prepare(k):
        img = org._placed(stack[k], mats[k], (h, w))
        lab = cv2.connectedComponents(
            org._placed((masks[k] > 0).astype(np.uint8), mats[k], (h, w), nearest=True)
        )[1]
        ids = org._placed(masks[k], mats[k], (h, w), nearest=True)
        f = img.astype(np.float32)
        band = cv2.GaussianBlur(f, (0, 0), FINE_SIGMA) - cv2.GaussianBlur(f, (0, 0), COARSE_SIGMA)
        return band, lab, (img > 0).view(np.uint8), ids

    tiles, reads, ready = [], [], {}
    for k in range(n - 1):
        for j in (k, k + 1):
            ready.setdefault(j, prepare(j))
        (a, la, ia, ids), (b, lb, ib, _) = ready[k], ready[k + 1]
        valid = cv2.erode(ia & ib, edge)
        tissue = (valid & (1 - cv2.dilate(((la > 0) | (lb > 0)).view(np.uint8), square))).astype(np.float32)
        a_area, b_area = np.bincount(la.ravel()), np.bincount(lb.ravel())
        for i in np.flatnonzero(a_area[1:] >= org.MIN_AREA) + 1:
            mine = (la == i).astype(np.uint8)
            j = org.match(lb, mine, b_area)
            if j == 0 or int(b_area[j]) < org.MIN_AREA:
                continue
            gid = int(np.bincount(ids[mine > 0]).argmax())
            weight = (cv2.dilate(mine, np.ones((7, 7), np.uint8)) & valid).astype(np.float32)
            steps = []
            for y0, x0 in org.outline_tiles(mine, h, w):
                mito = org.tile_step(a, weight, b, y0, x0)
                around = None if mito is None else org.tile_step(a, tissue, b, y0, x0)
                if around is not None:
                    steps.append(np.concatenate([mito - around, mito]))
                    tiles.append([k, gid, y0 + tile // 2, x0 + tile // 2, *mito, *around])
            if steps:
                med = np.median(np.asarray(steps), axis=0)
                ya, xa = np.nonzero(um[k] == gid)
                yb, xb = np.nonzero(um[k + 1] == gid)
                reads.append([k, gid, *med, yb.mean() - ya.mean(), xb.mean() - xa.mean()])
        ready.pop(k)
    return {
        "tiles": np.array(tiles, np.float64).reshape(-1, 8),
        "reads": np.array(reads, np.float64).reshape(-1, 8),
    }


def summary(got: dict, shape, pad: int, content) -> dict:
    """Per mitochondrion and for the stack (see the module doc). ``shape``: the frame; ``content``: the
    sections' size before padding (their content lies from ``pad``)."""
    tiles, reads = got["tiles"], got["reads"]
    lo = np.array([pad, pad], np.float64)
    hi = lo + np.asarray(content, np.float64)
    half = org.TILE / 2
    per = []
    for gid in np.unique(reads[:, 1]).astype(int):
        r, t = reads[reads[:, 1] == gid], tiles[tiles[:, 1] == gid]
        gap = np.minimum.reduce([t[:, 2] - half - lo[0], hi[0] - t[:, 2] - half, t[:, 3] - half - lo[1],
                                 hi[1] - t[:, 3] - half])  # fmt: skip
        near = gap < NEAR_BORDER
        per.append({
            "id": int(gid), "readings": len(r), "reading": r[:, 2:4].mean(0).tolist(),
            "own": r[:, 4:6].mean(0).tolist(),
            "centroid": r[:, 6:8].mean(0).tolist(), "tissue": t[:, 6:8].mean(0).tolist(), "tiles": len(t),
            "near_border": float(near.mean()),
            "tissue_near_border": t[near, 6:8].mean(0).tolist() if near.any() else None,
            "tissue_inside": t[~near, 6:8].mean(0).tolist() if (~near).any() else None,
        })  # fmt: skip
    values, at = reads[:, 2:4], reads[:, 0]
    mean = values.mean(0)
    edges = np.linspace(at.min(), at.max() + 1, BLOCKS + 1)
    blocks = np.array([values[(at >= a) & (at < b)].mean(0) for a, b in zip(edges[:-1], edges[1:])
                       if np.any((at >= a) & (at < b))])  # fmt: skip
    se_blocks = blocks.std(0, ddof=1) / math.sqrt(len(blocks))
    se_tracks = org.track_se(values, reads[:, 1].astype(np.int64))
    se = np.maximum(se_blocks, se_tracks)

    def chi2(s):
        return float(np.sum((mean / np.maximum(s, 1e-9)) ** 2))

    return {
        "readings": len(reads), "reading": mean.tolist(), "own": reads[:, 4:6].mean(0).tolist(),
        "centroid": reads[:, 6:8].mean(0).tolist(), "tissue_tile_sd": tiles[:, 6:8].std(0).tolist(),
        "se_blocks": se_blocks.tolist(), "chi2_blocks": chi2(se_blocks), "se_tracks": se_tracks.tolist(),
        "chi2_tracks": chi2(se_tracks), "se": se.tolist(), "chi2": chi2(se), "mitochondria": per,
    }  # fmt: skip


def engine_reading(data: dict, border: int) -> dict:
    """The engine's reading of ``data`` on its true placement as ``kept_reading="local-tracks"`` reads it
    (with ``border`` px left out): :func:`.organelles.relative_motion` with ``tracks=True``."""
    n, h, w = data["stack"].shape
    r = org.relative_motion(
        lambda k: data["stack"][k], lambda k: data["masks"][k], data["matrices"], (h, w), np.ones(n, bool),
        tracks=True, border=border,
    )  # fmt: skip
    return {k: r.get(k) for k in ("slope", "se", "se_blocks", "se_tracks", "tracks", "chi2", "readings")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rows", nargs="+", help="SEED:CASE (a mito_benchmark.CASES name)")
    ap.add_argument(
        "--border", type=int, default=4, help="px of the sections' borders left out (12: local-tracks)"
    )
    ap.add_argument("--sections", type=int, default=160)
    ap.add_argument("--shape", type=int, nargs=2, default=(768, 1024))
    ap.add_argument("--pad", type=int, default=250)
    ap.add_argument("--json", default=None)
    ap.add_argument("--engine", action="store_true", help="also relative_motion(tracks=True, border=B)")
    args = ap.parse_args(argv)
    out = {}
    for row in args.rows:
        seed, case = row.split(":")
        if case not in mb.CASES:
            raise SystemExit(f"{case!r}: not a case of mito_benchmark.CASES")
        t0 = time.process_time()
        data = em_stack(args.sections, tuple(args.shape), seed=int(seed), pad=args.pad, **mb.CASES[case])
        got = summary(read_stack(data, args.border), data["stack"].shape[1:], args.pad, args.shape)
        if args.engine:
            got["engine"] = engine_reading(data, args.border)
        got.update(border=args.border, cpu_s=time.process_time() - t0)
        out[row] = got
        r, o, c = got["reading"], got["own"], got["centroid"]
        print(
            f"{row} border {args.border}: {got['readings']} readings, reading ({r[0]:+.4f}, {r[1]:+.4f}), "
            f"own ({o[0]:+.4f}, {o[1]:+.4f}), centroid ({c[0]:+.4f}, {c[1]:+.4f}); chi2 blocks "
            f"{got['chi2_blocks']:.2f}, tracks {got['chi2_tracks']:.2f}, larger se {got['chi2']:.2f}; "
            f"{got['cpu_s']:.0f} CPU s"
        )
        print(
            "   id readings  reading (y, x)     own (y, x)         centroid (y, x)    tissue (y, x)      "
            "border share  tissue on border"
        )
        if args.engine:
            e = got["engine"]
            v, sb, st = e["slope"], e["se_blocks"], e["se_tracks"]
            print(
                f"   engine (relative_motion, tracks by overlap): ({v[0]:+.4f}, {v[1]:+.4f}), se blocks "
                f"({sb[0]:.4f}, {sb[1]:.4f}), tracks ({st[0]:.4f}, {st[1]:.4f}), {e['tracks']} tracks, "
                f"chi2 {e['chi2']:.2f}"
            )
        for m in got["mitochondria"]:
            nb = m["tissue_near_border"]
            cells = [f"({m[k][0]:+.3f}, {m[k][1]:+.3f})" for k in ("reading", "own", "centroid", "tissue")]
            near = "-" if nb is None else f"({nb[0]:+.2f}, {nb[1]:+.2f})"
            print(
                f"  {m['id']:3d} {m['readings']:8d}  {'  '.join(cells)}  {m['near_border']:12.2f}  {near}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
