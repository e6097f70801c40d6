"""Reproduce the shipped NePhi weights for Triangles-and-Circles (``napari_nephi/data/nephi_tc2d.pt``).

    python scripts/train_tc_weights.py                   # trains (CPU: ~1 h on 2 cores), then writes the file
    python scripts/train_tc_weights.py --resume run.pt   # continue an interrupted run

Training state goes to ``--work`` (default ``nephi_tc2d.run.pt``) and can be resumed; the shipped
file keeps the config, the weights and a summary (settings, validation history), not the optimiser.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from napari_nephi.engines.nephi.model import NePhiModel
from napari_nephi.engines.nephi.train import train
from napari_nephi.engines.nephi.weights import BUILTIN

SETTINGS = {
    "shape": (64, 64),
    "steps": 3000,
    "batch_size": 8,
    "learning_rate": 1e-3,
    "sample_points": 1024,
    "reg_points": 32,
    "reg_weight": 0.5,
    "strength": 1.0,
    "val_pairs": 16,
    "val_every": 100,
    "checkpoint_every": 50,
    "seed": 0,
    "field_options": {"hidden": 64, "layers": 3, "n_frequencies": 32, "global_dim": 32, "local_dim": 8},
    "channels": (16, 32, 64, 64),
    "local_level": 3,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="nephi_tc2d.run.pt", help="checkpoint of the run (resumable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --work")
    p.add_argument("--output", default=str(BUILTIN["tc"]), help="where the shipped weights go")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    torch.manual_seed(0)

    from napari_nephi.cli import TextProgress
    from napari_nephi.core.progress import Progress

    bar = TextProgress()

    def report(ev):
        bar(ev)
        if "validation" in ev.extra:
            print(f"\nstep {ev.step}: {ev.extra['validation']}", file=sys.stderr, flush=True)

    result = train(
        "tc",
        args.work,
        resume=args.work if args.resume else None,
        device=args.device,
        progress=Progress(report),
        **SETTINGS,
    )
    for row in result.validation:
        print(row, file=sys.stderr)
    ckpt = torch.load(args.work, map_location="cpu", weights_only=True)
    extra = {k: v for k, v in ckpt["extra"].items() if k != "optimizer"}
    extra["history"] = extra["history"][:: max(1, len(extra["history"]) // 200)]  # keep the file small
    NePhiModel.load(args.work).save(Path(args.output), extra=extra)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
