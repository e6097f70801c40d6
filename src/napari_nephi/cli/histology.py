"""``napari-nephi train-histology FOLDER -o MODEL --kind affine|nonrigid --steps N [--resume]``.

Trains a histology patch network (unsupervised: NCC, plus the curvature term for the non-rigid
network) on the slide pairs in FOLDER, named ``NAME_fixed.EXT`` and ``NAME_moving.EXT`` (any
image the project reads; pre-aligned, one size per pair; RGB slides become haematoxylin or
optical-density channels). MODEL is written at checkpoints, atomically, and can be continued
with ``--resume`` (its settings are used) up to a larger ``--steps``. Examples::

    napari-nephi train-histology pairs/ -o nonrigid.pt --kind nonrigid --steps 2000
    napari-nephi train-histology pairs/ -o nonrigid.pt --kind nonrigid --steps 4000 --resume
    napari-nephi train-histology pairs/ -o sasn.pt --kind affine --magnifications 1 --steps 2000

An interrupted run continues from its last checkpoint with ``--resume``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..core.errors import InputError
from ..core.files import check_output_file
from ..core.progress import Progress
from ._common import HelpFormatter, ProgressBars, add_quiet


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``train-histology`` subcommand (with its own ``func``) to an argparse subparsers object."""
    p = subparsers.add_parser(
        "train-histology",
        formatter_class=HelpFormatter,
        help="train a histology patch network (local affine or non-rigid) on a folder of slide pairs",
        description=__doc__.split("\n", 1)[1].strip(),
    )
    p.add_argument("folder", help="folder of NAME_fixed.EXT / NAME_moving.EXT slide pairs")
    p.add_argument("-o", "--output", required=True, help="model file to write (and update at checkpoints)")
    p.add_argument("--kind", choices=["affine", "nonrigid"], required=True, help="which network")
    p.add_argument("--steps", type=int, default=2000, help="optimisation steps in all")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --output")
    p.add_argument("--magnifications", type=int, choices=[1, 2], default=2, help="1: single-magnification")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--reg-weight", type=float, default=60.0, help="curvature weight (non-rigid only)")
    p.add_argument("--patch", type=int, default=224, help="patch size in pixels (multiple of 16)")
    p.add_argument("--widths", type=int, nargs=4, default=[16, 32, 64, 128], help="network widths")
    p.add_argument("--patches-per-step", type=int, default=4, help="patch sets per step")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--max-side", type=int, default=4096, help="largest image side read from a slide pyramid")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    add_quiet(p)
    p.set_defaults(func=cmd_train_histology)
    return p


def cmd_train_histology(args: argparse.Namespace) -> int:
    """Run ``napari-nephi train-histology``."""
    from ..core.device import choose_device
    from ..engines.histology.networks import read_record
    from ..engines.histology.train import pairs_from_folder, train

    out = check_output_file(args.output)
    if args.resume and not out.is_file():
        raise InputError(f"--resume continues the run saved in {out}, but there is no such file.")
    if not args.resume and out.exists():
        raise InputError(f"{out} exists; pass --resume to continue its training, or another -o.")
    pairs = pairs_from_folder(Path(args.folder), max_side=args.max_side)
    bars = ProgressBars(quiet=args.quiet)
    try:
        net = train(
            pairs,
            args.kind,
            steps=args.steps,
            magnifications=args.magnifications,
            lr=args.learning_rate,
            reg_weight=args.reg_weight,
            patch=args.patch,
            widths=tuple(args.widths),
            patches_per_step=args.patches_per_step,
            checkpoint_every=args.checkpoint_every,
            resume=out if args.resume else None,
            out=out,
            progress=Progress(bars),
            seed=args.seed,
            device=choose_device(args.device),
        )
    finally:
        bars.close()
    if not args.quiet:
        state = read_record(out)["extra"]["training"]
        summary = {
            "output": str(out),
            "pairs": len(pairs),
            "steps": state["step"],
            "final_loss": state["history"][-1] if state["history"] else None,
            "seconds": round(float(state["seconds"]), 1),
            **net.config.to_dict(),
        }
        print(json.dumps(summary))
    return 0
