"""Reproduce the shipped general 2D NePhi model (``napari_nephi/data/nephi_general2d.pt``).

    python scripts/train_general2d.py                  # the shipped run (CPU, 1 thread: about 30 min)
    python scripts/train_general2d.py --quick          # a 5-minute check that training works
    python scripts/train_general2d.py --resume         # continue an interrupted run in --work

Pairs: random crops of the images scikit-image and nibabel ship, warped by random smooth
deformations of 0.5-5 % of the size with random intensity changes
(:mod:`napari_nephi.engines.nephi.shipped_pairs`); the held-out images (``HELD_OUT``: camera,
cell, coins, sagittal MRI slices) are never drawn for training and give the validation endpoint
error. Training state goes to ``--work`` and can be resumed; the shipped file keeps the config, the
weights and a summary (settings, validation history), not the optimiser.
"""

from __future__ import annotations

import argparse
import sys

import torch

from napari_nephi.engines.nephi.train import export_model, train
from napari_nephi.engines.nephi.weights import BUILTIN

SETTINGS = {
    "shape": (128, 128),
    "steps": 2000,
    "batch_size": 8,
    "learning_rate": 1e-3,
    "sample_points": 1024,
    "reg_points": 32,
    "reg_weight": 0.5,
    "truth_weight": 1.0,
    "antialias": True,
    "features": "flow",
    "val_pairs": 16,
    "val_every": 100,
    "checkpoint_every": 50,
    "seed": 0,
    "field_options": {"hidden": 64, "layers": 3, "n_frequencies": 32, "global_dim": 32, "local_dim": 8},
    "channels": (16, 32, 64, 64),
    "local_level": 3,
}
#: ``--quick``: the same run, shorter (checks that the loss falls and validation improves).
QUICK = {"steps": 200, "val_every": 50, "val_pairs": 8}


def _report(bar):
    """Progress bar, plus a line per validation (held-out endpoint error before and after)."""

    def report(ev):
        bar(ev)
        if "validation" in ev.extra:
            print(f"\nstep {ev.step}: {ev.extra['validation']}", file=sys.stderr, flush=True)

    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="nephi_general2d.run.pt", help="checkpoint of the run (resumable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --work")
    p.add_argument("--output", help=f"where the weights go (default {BUILTIN['general2d']}; --quick: none)")
    p.add_argument("--quick", action="store_true", help=f"a short run: {QUICK}")
    p.add_argument("--steps", type=int, help="override the number of steps")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = {**SETTINGS, **(QUICK if args.quick else {})}
    if args.steps:
        settings["steps"] = args.steps
    output = args.output or (None if args.quick else str(BUILTIN["general2d"]))

    from napari_nephi.cli import TextProgress
    from napari_nephi.core.progress import Progress

    resume = args.work if args.resume else None
    progress = Progress(_report(TextProgress()))
    result = train("general2d", args.work, resume=resume, device=args.device, progress=progress, **settings)
    print("\n".join(str(row) for row in result.validation), file=sys.stderr)
    print(f"trained in {result.seconds:.0f} s", file=sys.stderr)
    if output:
        print(f"wrote {export_model(args.work, output)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
