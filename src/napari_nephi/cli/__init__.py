"""The ``napari-nephi`` command line: one module per command group.

* :mod:`.register`: ``register``, ``apply``, ``methods``;
* :mod:`.demo`: ``demo``;
* :mod:`.train`: ``train`` (NePhi models for ``mode=predict``);
* :mod:`.em`: ``align-em`` (MITO stack alignment);
* :mod:`.atlas`: ``atlas-train``, ``atlas-lookup`` (atlas plate lookup);
* :mod:`.slides`: ``register-slides`` (whole histology slides of different stains);
* :mod:`.batch`: ``batch`` (a table of jobs on Dask distributed).

Errors a user can cause (:class:`~napari_nephi.RegistrationError`, files that cannot be read or
written, mistyped arguments) end the command with one ``error: ...`` line on stderr and exit
code 2; a cancelled run exits with 130. Output folders are written atomically
(:func:`napari_nephi.core.files.output_folder`).
"""

from __future__ import annotations

import sys

from ..core.errors import Cancelled, RegistrationError
from . import atlas, batch, demo, em, histology, register, slides, train
from ._common import CommandLineError, HelpFormatter, Parser, ProgressBars, parse_options

__all__ = ["ProgressBars", "TextProgress", "build_parser", "main", "parse_options"]

#: The former name of :class:`ProgressBars` (scripts/train_tc_weights.py uses it).
TextProgress = ProgressBars

#: Exit codes: a problem with the inputs, files or arguments; a cancelled run.
EXIT_ERROR, EXIT_CANCELLED = 2, 130


def build_parser() -> Parser:
    """The ``napari-nephi`` argument parser with every command group."""
    from .. import __version__

    p = Parser(
        prog="napari-nephi",
        formatter_class=HelpFormatter,
        description="Image registration for napari: command line. 'napari-nephi COMMAND --help' "
        "describes each command.",
    )
    p.add_argument("--version", action="version", version=__version__, help="show the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.add_parser(sub)
    register.add_parsers(sub)
    train.add_parser(sub)
    em.add_parser(sub)
    atlas.add_parsers(sub)
    histology.add_parser(sub)
    slides.add_parser(sub)
    batch.add_parser(sub)
    p.commands = dict(sub.choices)
    return p


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _describe_os_error(exc: OSError) -> str:
    what = exc.strerror or exc.__class__.__name__
    where = f" {exc.filename}" if exc.filename else ""
    return f"{what}:{where}; check the path exists and that you may write there" if where else str(exc)


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    except CommandLineError as exc:
        print(f"error: {_one_line(exc)} (see '{exc.prog} --help')", file=sys.stderr)
    except Cancelled:
        print("Cancelled.", file=sys.stderr)
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return EXIT_CANCELLED
    except RegistrationError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
    except OSError as exc:
        print(f"error: {_one_line(_describe_os_error(exc))}", file=sys.stderr)
    except MemoryError as exc:
        print(
            f"error: out of memory ({_one_line(exc) or 'no details'}); try smaller inputs.", file=sys.stderr
        )
    return EXIT_ERROR
