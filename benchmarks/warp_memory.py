"""Chunked warping vs scipy.ndimage on large images: time and peak extra memory.

    python benchmarks/warp_memory.py [--sizes2d 4096 8192] [--sizes3d 256 384]

napari-nephi warps in slabs (float32 coordinates for ~4M voxels at a time); scipy's
``affine_transform`` is the peer for affine maps and ``map_coordinates`` with a full float64
coordinate grid is the naive way to apply a dense field.
"""

from __future__ import annotations

import argparse
import platform

import numpy as np
import scipy.ndimage as ndi
import torch
from _measure import measure

from napari_nephi.core import AffineTransform, DisplacementTransform


def affine(ndim: int) -> np.ndarray:
    m = np.eye(ndim + 1)
    m[:ndim, :ndim] += 0.02 * np.eye(ndim)[::-1]
    m[:ndim, ndim] = 3.5
    return m


def run(shape) -> list[dict]:
    rng = np.random.default_rng(0)
    image = rng.random(shape, dtype=np.float32)
    nd = len(shape)
    m = affine(nd)
    rows = []
    ours, t_ours, mem_ours = measure(AffineTransform(m).warp, image)
    ref, t_ref, mem_ref = measure(ndi.affine_transform, image, m, order=1, mode="grid-constant")
    assert np.abs(ours - ref).max() < 1e-2  # float32 coordinates on noise: ~1e-3 px
    rows.append(dict(shape=shape, map="affine", ours_s=t_ours, ours_mib=mem_ours,
                     peer="scipy affine_transform", peer_s=t_ref, peer_mib=mem_ref))  # fmt: skip
    del ours, ref
    field = np.zeros((nd, *shape), np.float32)
    field[0] = 1.25
    t = DisplacementTransform(field)
    ours, t_ours, mem_ours = measure(t.warp, image)

    def naive():
        grid = np.indices(shape, dtype=np.float64) + field
        return ndi.map_coordinates(image, grid, order=1, mode="grid-constant")

    ref, t_ref, mem_ref = measure(naive)
    assert np.abs(ours - ref).max() < 1e-2  # float32 coordinates on noise: ~1e-3 px
    rows.append(dict(shape=shape, map="dense field", ours_s=t_ours, ours_mib=mem_ours,
                     peer="float64 grid + map_coordinates", peer_s=t_ref, peer_mib=mem_ref))  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes2d", type=int, nargs="*", default=[4096, 8192])
    p.add_argument("--sizes3d", type=int, nargs="*", default=[256])
    args = p.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    print("| shape | map | napari-nephi s | MiB | peer | peer s | MiB | memory ratio peer/ours |")
    print("|---|---|---|---|---|---|---|---|")
    shapes = [(n, n) for n in args.sizes2d] + [(n, n, n) for n in args.sizes3d]
    for shape in shapes:
        for r in run(shape):
            ratio = r["peer_mib"] / max(r["ours_mib"], 1)
            shape_text = "x".join(map(str, r["shape"]))
            print(
                f"| {shape_text} | {r['map']} | {r['ours_s']:.2f} | {r['ours_mib']:.0f} | "
                f"{r['peer']} | {r['peer_s']:.2f} | {r['peer_mib']:.0f} | {ratio:.1f} |"
            )


if __name__ == "__main__":
    main()
