"""The histology rigid stage's stain pair at several torch thread counts (session 46).

The pair of ``tests/histology/test_rigid.py::test_channels_of_different_stains``: scikit-image's IHC
image at 256 x 256, re-stained and rotated by 77 degrees (``slide_pair(seed=0, rotation=77)``), the
optical density of the fixed slide against the haematoxylin of the moving one, tissue masks given,
``allow_flip=False, angle_step=10``. For each thread count and arm: the angle and scale found, the
mean / max error of the mapped tissue points (every 11th, as the test) and the refined candidates.

    python benchmarks/histology_rigid_threads.py --threads 1 2 3 4 8 --arms before after

``before``: :data:`~napari_nephi.engines.histology.rigid.SCALE_SLACK` set to ``inf`` (a refined map's
scale unbounded, the code before session 46); ``after``: the module's value. The test's marks are a
mean below 0.5 px and a max below 1.5 px.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from skimage import data

from napari_nephi.engines.histology import rigid
from napari_nephi.engines.histology.stain import stain_channel, tissue_mask
from napari_nephi.synthetic.histology import slide_pair


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--arms", nargs="+", choices=("before", "after"), default=["after"])
    args = parser.parse_args(argv)
    pair = slide_pair(data.immunohistochemistry()[::2, ::2].copy(), seed=0, rotation=77.0)
    f, _ = stain_channel(pair.fixed, "od")
    m, _ = stain_channel(pair.moving, "hematoxylin")
    masks = {"fixed_mask": tissue_mask(pair.fixed), "moving_mask": tissue_mask(pair.moving)}
    ys, xs = np.nonzero(pair.tissue)
    pts = np.stack([ys, xs], 1)[::11].astype(float)
    truth = pts @ pair.rigid[:2, :2].T + pair.rigid[:2, 2]
    slack = rigid.SCALE_SLACK
    print("| threads | arm | angle | scale | mean px | max px | s | candidates (angle, score) |")
    print("|---|---|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for arm in args.arms:
            rigid.SCALE_SLACK = math.inf if arm == "before" else slack
            try:
                start = time.perf_counter()
                res = rigid.rigid_prealign(f, m, allow_flip=False, angle_step=10, **masks)
                seconds = time.perf_counter() - start
            finally:
                rigid.SCALE_SLACK = slack
            err = np.linalg.norm(res.transform().map_points(pts) - truth, axis=1)
            cands = ", ".join(f"({a:.3f}, {s:.4f})" for a, _f, s in res.candidates)
            print(
                f"| {threads} | {arm} | {res.angle:.4f} | {res.scale:.3f} | {err.mean():.3f} "
                f"| {err.max():.3f} | {seconds:.1f} | {cands} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
