"""Speed of the atlas lookup's embedding: network forward, preprocessing and both together.

Times, on the CPU with the given number of torch threads (default 1):

* the embedding network (default ``EmbeddingConfig``: 128 x 128 input, 64-d output) on a batch of
  1 (one lookup) and of 64 prepared inputs;
* ``prepare_input`` (grey, tissue, crop, CLAHE, square, resize) of one section of several sizes;
* ``embed`` (both) of one raw section of several sizes, and of 64 sections of 512 x 640.

The sections are plates of :func:`napari_nephi.synthetic.atlas.toy_atlas` resized with OpenCV.
Each figure is the median over repeats of the process CPU time (``time.process_time``, all
threads; robust to other processes sharing the machine) and of the wall time, in ms.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/atlas_embedding_speed.py --threads 1

Not part of the test run.
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
import torch

from napari_nephi.engines.atlas.network import EmbeddingConfig, EmbeddingNet, embed
from napari_nephi.engines.atlas.preprocess import prepare_input
from napari_nephi.synthetic.atlas import toy_atlas


def _median_ms(fn, repeats: int) -> tuple[float, float]:
    """(CPU ms, wall ms): medians over ``repeats`` calls after one warm-up call."""
    fn()
    cpu, wall = [], []
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return 1000 * float(np.median(cpu)), 1000 * float(np.median(wall))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=20, help="repeats per figure (default 20)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = EmbeddingNet(EmbeddingConfig()).eval()
    print(f"parameters: {sum(p.numel() for p in net.parameters())}, torch threads: {args.threads}")
    rows = []
    x1, x64 = torch.rand(1, 1, 128, 128), torch.rand(64, 1, 128, 128)
    with torch.no_grad():
        rows.append(("network, batch 1 (one lookup)", _median_ms(lambda: net(x1), args.repeats)))
        rows.append(("network, batch 64", _median_ms(lambda: net(x64), max(3, args.repeats // 4))))
    plate = toy_atlas((24, 160, 200), seed=0)[0][12]
    for n in (256, 1024, 4096):
        image = cv2.resize(plate, (n * 5 // 4, n), interpolation=cv2.INTER_LINEAR)
        reps = args.repeats if n < 4096 else max(3, args.repeats // 4)
        rows.append(
            (f"prepare_input, {n} x {n * 5 // 4}", _median_ms(lambda im=image: prepare_input(im), reps))
        )
        rows.append(
            (f"embed one section, {n} x {n * 5 // 4}", _median_ms(lambda im=image: embed(net, [im]), reps))
        )
    sections = [cv2.resize(plate, (640, 512), interpolation=cv2.INTER_LINEAR)] * 64
    rows.append(("embed 64 sections, 512 x 640", _median_ms(lambda: embed(net, sections), 3)))
    width = max(len(name) for name, _ in rows)
    print(f"{'':{width}}  {'CPU ms':>8}  {'wall ms':>8}")
    for name, (cpu, wall) in rows:
        print(f"{name:{width}}  {cpu:8.1f}  {wall:8.1f}")


if __name__ == "__main__":
    main()
