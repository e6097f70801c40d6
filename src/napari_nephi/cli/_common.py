"""Helpers shared by the command groups: the parser class, progress bars, options, image files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from tqdm import tqdm

from ..core.errors import InputError
from ..core.progress import ProgressEvent


class CommandLineError(Exception):
    """A problem with the command line itself (argparse's); ``main`` prints it as one line."""

    def __init__(self, message: str, prog: str):
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors become one-line messages instead of usage dumps.

    ``main`` catches :class:`CommandLineError` and prints ``error: ... (see PROG --help)``.
    ``arguments`` lists the actions added (for checks of the help texts); ``commands`` maps the
    names of sub-commands to their parsers.
    """

    def __init__(self, *args, **kwargs):
        self.arguments: list[argparse.Action] = []
        self.commands: dict[str, Parser] = {}
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.arguments.append(action)
        return action

    def error(self, message: str) -> NoReturn:
        raise CommandLineError(message, self.prog)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default next to its help; keeps description paragraphs as written.

    Options without a value of their own (default None: the engine decides) and flags say so in
    their help text instead of ``(default: None)``.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def add_key_values(parser: argparse.ArgumentParser, flag: str, what: str) -> None:
    """A repeatable ``FLAG KEY=VALUE`` option; VALUE is read as JSON when it can be (see parse_options)."""
    parser.add_argument(
        flag,
        action="append",
        metavar="KEY=VALUE",
        help=f"{what}, repeatable; VALUE is read as JSON when it can be (e.g. [5, 5], true, 0.1)",
    )


def add_quiet(parser: argparse.ArgumentParser) -> None:
    """``-q/--quiet``: no progress bars and no summary."""
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no summary")


class _LineBar(tqdm):
    """A tqdm bar that writes a new line per update (for logs: no endless line of carriage returns)."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":
            return True
        self.fp.write(("\n" if getattr(self, "_wrote", False) else "") + (str(self) if msg is None else msg))
        self.fp.flush()
        self._wrote = True
        return True


class ProgressBars:
    """A progress callback that draws engine :class:`ProgressEvent` s as tqdm bars on stderr.

    One bar per stage of the work: a new bar starts when the stage label changes other than in its
    counters (``coarse level 1/3`` -> ``neural field``; ``level 1/3`` -> ``level 2/3`` is the same
    stage), when the number of steps changes, or when the count starts again; the label is the
    engine's current stage and the postfix its loss. On a terminal the
    bar redraws in place; in a log (stderr not a terminal) it writes one line every few seconds.
    ``quiet`` draws nothing.
    """

    def __init__(self, quiet: bool = False, stream=None):
        self.quiet = quiet
        self._stream = stream
        self._bar: tqdm | None = None
        self._last_step = 0
        self._kind: str | None = None

    @property
    def stream(self):
        """The given stream, else the current ``sys.stderr`` (looked up when a bar starts)."""
        return self._stream if self._stream is not None else sys.stderr

    def __call__(self, ev: ProgressEvent) -> None:
        if self.quiet:
            return
        total = max(int(ev.total), 1)
        kind = stage_kind(ev.stage)
        bar = self._bar
        restart = bar is None or bar.total != total or ev.step < self._last_step
        if restart or kind != self._kind:
            first = 0 if restart else min(max(int(ev.step) - 1, 0), total)  # the count goes on
            self.close()
            tty = bool(getattr(self.stream, "isatty", lambda: False)())
            cls = tqdm if tty else _LineBar
            bar = self._bar = cls(
                total=total,
                initial=first,
                file=self.stream,
                ascii=not tty,
                mininterval=0.1 if tty else 5.0,
                unit="step",
            )
        self._last_step, self._kind = int(ev.step), kind
        bar.set_description_str(ev.stage, refresh=False)
        if ev.loss is not None:
            bar.set_postfix_str(f"loss {ev.loss:.4f}", refresh=False)
        bar.update(min(int(ev.step), total) - bar.n)
        if ev.step >= total:
            self.close()

    def close(self) -> None:
        """Finish the current bar (its final state stays on screen)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._last_step = 0
            self._kind = None


def stage_kind(stage: str) -> str:
    """A stage label without its counters: ``coarse level 2/3`` -> ``coarse level``."""
    return " ".join(word for word in stage.split() if not any(c.isdigit() for c in word))


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_options(pairs: list[str] | None, flag: str = "--option") -> dict:
    """``KEY=VALUE`` items as keyword arguments (values parsed as JSON when they can be)."""
    out = {}
    for item in pairs or []:
        if "=" not in item:
            raise InputError(f"{flag} takes KEY=VALUE, got {item!r}; e.g. {flag} iterations=100.")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = _parse_value(value)
    return out


def read_one(path: str) -> tuple[np.ndarray, dict]:
    """The first layer of an image file as a numpy array (the finest level of a pyramid) and its meta."""
    from ..io import read_image

    data, meta, _ = read_image(path)[0]
    if meta.get("multiscale"):
        data = data[0]
    return np.asarray(data), meta


def spatial_spacing(data: np.ndarray, meta: dict) -> tuple[float, ...]:
    """The voxel size of the spatial axes (the channel axis of RGB images left out)."""
    spatial = data.ndim - (1 if meta.get("rgb") else 0)
    return tuple(meta.get("scale") or (1.0,) * spatial)[-spatial:]


def write_image(path: Path, data, spacing, labels: bool = False) -> None:
    """Write an image or labels (by suffix: TIFF or NIfTI) with ``spacing`` as its voxel size."""
    from ..io import write_image as write
    from ..io import write_labels

    (write_labels if labels else write)(str(path), data, {"scale": list(spacing)})
