"""Warps to compare bit for bit between two versions of the code (session 44: ``cancel=None``).

    python benchmarks/warp_bits.py OUT.npz                 # the warps of the code on sys.path
    python benchmarks/warp_bits.py --compare A.npz B.npz   # np.array_equal of every array

Run the first form once with ``PYTHONPATH=<base>/src`` (a ``git archive <rev> src`` of the base) and
once on the working tree, then compare. Cases: 2D 1100x1000 and 3D 96x120x110 (two chunks each at
the default chunk size), an affine and a smooth displacement transform, an image, labels (uint16)
and, in 2D, an RGB image. Prints which ``napari_nephi`` was imported, so a wrong path shows.
``--progress`` (session 46) passes a progress callable that does nothing to every warp (the code
before it has no such keyword: use it on the new code only, and compare with the base's arrays).
"""

from __future__ import annotations

import argparse

import numpy as np
import scipy.ndimage as ndi


def warps(**kw) -> dict[str, np.ndarray]:
    """The arrays; ``kw`` (e.g. ``progress``) is passed to every warp."""
    from napari_nephi.core import AffineTransform, DisplacementTransform

    out = {}
    for shape in [(1100, 1000), (96, 120, 110)]:
        d = len(shape)
        rng = np.random.default_rng(d)
        image = ndi.gaussian_filter(rng.random(shape, dtype=np.float32), 1.5)
        labels = (image * 40).astype(np.uint16) * 13
        m = np.eye(d + 1)
        m[:d, :d] += rng.uniform(-0.08, 0.08, (d, d))
        m[:d, -1] = rng.uniform(-2.5, 2.5, d)
        small = tuple(max(4, s // 8) for s in shape)
        zoom = [a / b for a, b in zip(shape, small, strict=True)]
        field = np.stack(
            [ndi.zoom(ndi.gaussian_filter(rng.normal(0, 40, small), 1), zoom, order=1) for _ in shape]
        ).astype(np.float32)
        for name, t in (("affine", AffineTransform(m, shape=shape)), ("disp", DisplacementTransform(field))):
            out[f"{d}d_{name}_image"] = t.warp(image, **kw)
            out[f"{d}d_{name}_labels"] = t.warp_labels(labels, **kw)
            if d == 2:
                out[f"{d}d_{name}_rgb"] = t.warp(np.stack([image, 1 - image, image**2], -1), **kw)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", nargs="?")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"))
    p.add_argument("--progress", action="store_true", help="pass a progress callable to every warp")
    args = p.parse_args()
    if args.compare:
        a, b = (np.load(f) for f in args.compare)
        same = [k for k in a.files if np.array_equal(a[k], b[k])]
        for k in a.files:
            print(f"{k:18s} {str(a[k].shape):18s} {a[k].dtype} equal: {k in same}")
        print(f"{len(same)} of {len(a.files)} equal")
        return
    import napari_nephi

    print(napari_nephi.__file__)
    np.savez(args.out, **(warps(progress=lambda done, total: None) if args.progress else warps()))


if __name__ == "__main__":
    main()
