"""Scale: warp a 20000 x 20000 RGB slide pyramid lazily and write its warped tiled OME-TIFF pyramid.

    python benchmarks/slide_warp_scale.py [--size 20000] [--threads 4] [--chunk 1024] [--tile 512] [--out DIR]

The moving slide is a synthetic tissue-like texture computed on demand (a lazy dask pyramid whose
levels evaluate the same continuous pattern at their pixel centres, as a file's pyramid would be
read), so nothing is ever held whole. The transform is a rotation of 4 degrees about the centre
composed with a smooth displacement of up to 40 px stored on a 200 x 200 grid (as the histology
engine stores fields at its working level). Reports wall time, the peak resident memory of the
whole process and the peak extra memory during the warp-and-write, the output size, and checks a
few output pixels against the analytic value.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import tempfile
import time

import dask
import dask.array as da
import numpy as np
import tifffile
import torch
import zarr
from _measure import measure

from napari_nephi.core.lazy_warp import warp_pyramid
from napari_nephi.core.transform import AffineTransform, ComposedTransform, DisplacementTransform
from napari_nephi.io.pyramid_writer import write_ome_pyramid
from napari_nephi.io.slides import as_slide

PERIODS = ((97.0, 131.0), (53.0, 71.0), (211.0, 173.0))


def texture(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A smooth RGB pattern of level-0 coordinates (tissue-like stripes and blobs), uint8."""
    out = []
    for c, (py, px) in enumerate(PERIODS):
        v = (
            150
            + 50 * np.sin(2 * np.pi * y / py + c) * np.cos(2 * np.pi * x / px)
            + 40 * np.sin(2 * np.pi * (x + y) / (py + px))
        )
        out.append(np.clip(np.round(v), 0, 255).astype(np.uint8))
    return np.stack(out, axis=-1)


def level(size: int, k: int, chunk: int) -> da.Array:
    """Level ``k`` of the moving pyramid: the texture at the level's pixel centres, lazily."""
    n = math.ceil(size / 2**k)

    def block(block_info=None):
        (y0, y1), (x0, x1) = block_info[None]["array-location"][:2]
        ys = (np.arange(y0, y1) + 0.5) * 2**k - 0.5
        xs = (np.arange(x0, x1) + 0.5) * 2**k - 0.5
        return texture(ys[:, None], xs[None, :])

    chunks = (tuple(min(chunk, n - s) for s in range(0, n, chunk)),) * 2 + ((3,),)
    return da.map_blocks(block, chunks=chunks, dtype=np.uint8, name=f"texture-{size}-{k}")


def smooth_transform(size: int, seed: int = 0) -> ComposedTransform:
    """Fixed level-0 -> moving level-0: a smooth field (<= 40 px) on a coarse grid, then a rotation."""
    grid = 200
    step = size / grid
    rng = np.random.default_rng(seed)
    coarse = np.zeros((2, grid, grid), np.float32)
    yy, xx = np.mgrid[0:grid, 0:grid] / grid
    for axis in range(2):
        a, b, p = rng.uniform(1, 3, 3)
        coarse[axis] = np.sin(2 * np.pi * (a * yy + p)) * np.cos(2 * np.pi * b * xx)
    coarse *= 40.0 / step  # in coarse-grid pixels, i.e. up to 40 level-0 pixels
    down = AffineTransform(np.diag([1 / step, 1 / step, 1.0]))
    up = AffineTransform(np.diag([step, step, 1.0]))
    angle = np.deg2rad(4.0)
    r = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = np.array([size / 2, size / 2])
    rot = np.eye(3)
    rot[:2, :2] = r
    rot[:2, 2] = centre - r @ centre
    return ComposedTransform([down, DisplacementTransform(coarse), up, AffineTransform(rot)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=4, help="dask worker threads (torch uses 1 each)")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--out", default=None, help="folder for the OME-TIFF (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = args.size
    n_levels = 1 + max(0, math.ceil(math.log2(size / 512)))
    moving = as_slide([level(size, k, args.chunk) for k in range(n_levels)], 0.5, rgb=True, name="texture")
    transform = smooth_transform(size)
    folder = args.out or tempfile.mkdtemp(prefix="slide_warp_scale-")
    path = os.path.join(folder, "warped.ome.tif")
    t0 = time.perf_counter()
    levels = warp_pyramid(moving, transform, (size, size), n_levels, 255, chunk=args.chunk)
    build = time.perf_counter() - t0

    def run():
        with dask.config.set(scheduler="threads", num_workers=args.threads):
            return write_ome_pyramid(path, levels, spacing_um=(0.5, 0.5), tile=args.tile)

    _, seconds, extra_mib = measure(run)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        shapes = [lvl.shape for lvl in series.levels]
        rng = np.random.default_rng(1)
        pts = rng.uniform(0.1 * size, 0.9 * size, (200, 2)).round()
        z = zarr.open(tifffile.imread(path, aszarr=True, series=0, level=0), mode="r")
        got = np.stack([z[int(y), int(x)] for y, x in pts]).astype(float)
    mapped = transform.map_points(pts)
    expected = texture(mapped[:, 0], mapped[:, 1]).astype(float)
    err = np.abs(got - expected)
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {os.cpu_count()} CPUs; dask threads {args.threads}")
    print(
        f"slide {size} x {size} RGB uint8, {n_levels} levels in and out, chunk {args.chunk}, tile {args.tile}"
    )
    print(f"graph built in {build:.2f} s; warp + write {seconds:.1f} s")
    print(f"peak RSS of the process {peak_mib:.0f} MiB; peak extra during warp + write {extra_mib:.0f} MiB")
    print(f"output {os.path.getsize(path) / 2**20:.0f} MiB at {path}; levels {shapes}")
    print(f"200 level-0 pixels vs the analytic warped texture: median |error| {np.median(err):.2f}, ", end="")
    print(f"max {err.max():.1f} (grey levels)")


if __name__ == "__main__":
    main()
