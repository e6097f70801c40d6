"""``napari-nephi train``: train a NePhi model (encoder + field) for ``mode="predict"``.

Examples::

    napari-nephi train --data tc -o tc_model.pt --steps 1200 --shape 64 64
    napari-nephi train --data scans/ -o brain.pt --shape 64 64 64 --batch-size 2
    napari-nephi train --resume brain.pt -o brain.pt --steps 4000      # continue a run
    torchrun --nproc_per_node=4 -m napari_nephi.cli train --data scans/ -o brain.pt   # several GPUs

The output file holds the model config, the weights and the training state (resumable); use it
with ``napari-nephi register FIXED MOVING -o OUT --method nephi --option mode=predict
--option weights=tc_model.pt`` or in the widget's model field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from tqdm import tqdm

from ..core.files import check_output_file
from ..core.options import check_known
from ._common import HelpFormatter, ProgressBars, add_key_values, add_quiet, parse_options


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand (with its own ``func``) to an argparse subparsers object."""
    p = subparsers.add_parser(
        "train",
        formatter_class=HelpFormatter,
        help="train a NePhi model on image pairs (for mode=predict)",
        description=__doc__.split("\n", 1)[1].strip(),
    )
    p.add_argument(
        "--data",
        default="tc",
        help="'tc' (generated triangles and circles, 2D) or a folder of NIfTI/TIFF images or volumes, "
        "with optional labels/ of the same names for validation Dice",
    )
    p.add_argument("-o", "--output", required=True, help="model file to write (and update at checkpoints)")
    p.add_argument("--shape", type=int, nargs="+", default=[128, 128], help="training size, 2 or 3 numbers")
    p.add_argument("--steps", type=int, default=2000, help="optimisation steps in all")
    p.add_argument("--batch-size", type=int, default=8, help="image pairs per step")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--sample-points", type=int, default=2048, help="similarity points per pair and step")
    p.add_argument("--reg-points", type=int, default=64, help="GradICON points per pair and step")
    p.add_argument("--reg-weight", type=float, default=1.0, help="weight of the GradICON regulariser")
    p.add_argument("--val-pairs", type=int, default=16, help="validation pairs")
    p.add_argument("--val-every", type=int, default=200, help="steps between validations")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--resume", help="checkpoint to continue from (its settings are used)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    add_key_values(p, "--field", "field option (hidden=64, layers=3, n_frequencies=32, ...)")
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 64], help="encoder widths")
    p.add_argument("--local-level", type=int, default=3, help="encoder block that gives the local codes")
    add_quiet(p)
    p.set_defaults(func=cmd_train)
    return p


def cmd_train(args: argparse.Namespace) -> int:
    """Run ``napari-nephi train``."""
    from ..core.progress import Progress
    from ..engines.nephi.field import FieldConfig
    from ..engines.nephi.train import train

    check_output_file(args.output)
    field_options = parse_options(args.field, flag="--field")
    valid = [f.name for f in dataclasses.fields(FieldConfig) if f.name != "ndim"]
    check_known("train --field", field_options, valid)
    bars = ProgressBars(quiet=args.quiet)

    def report(ev):
        bars(ev)
        if "validation" in ev.extra and not args.quiet:
            tqdm.write(f"step {ev.step}: validation {json.dumps(ev.extra['validation'])}", file=sys.stderr)

    try:
        result = train(
            args.data,
            args.output,
            shape=tuple(args.shape),
            steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            sample_points=args.sample_points,
            reg_points=args.reg_points,
            reg_weight=args.reg_weight,
            val_pairs=args.val_pairs,
            val_every=args.val_every,
            checkpoint_every=args.checkpoint_every,
            seed=args.seed,
            field_options=field_options,
            channels=tuple(args.channels),
            local_level=args.local_level,
            resume=args.resume,
            device=args.device,
            progress=Progress(report),
        )
    finally:
        bars.close()
    summary = {
        "output": str(result.path),
        "steps": len(result.history),
        "final_loss": result.history[-1] if result.history else None,
        "validation": result.validation[-1] if result.validation else None,
        "seconds": round(result.seconds, 1),
    }
    print(json.dumps(summary))
    return 0
