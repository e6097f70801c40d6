"""Helpers shared by the readers and writers: path checks, error wrapping, atomic writes."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import InputError, OutOfMemoryError, RegistrationError, UnsupportedFileError
from ..core.files import publish

PathLike = str | os.PathLike

NIFTI_SUFFIXES = (".nii", ".nii.gz")
TIFF_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".svs")


def full_suffix(path: PathLike) -> str:
    """Lower-case suffix including a double one: ``.nii.gz``, ``.ome.tif``; else the last suffix."""
    name = Path(path).name.lower()
    for double in (".nii.gz", ".ome.tiff", ".ome.tif"):
        if name.endswith(double):
            return double
    return Path(name).suffix


def is_nifti(path: PathLike) -> bool:
    return full_suffix(path) in NIFTI_SUFFIXES


def is_tiff(path: PathLike) -> bool:
    return full_suffix(path) in TIFF_SUFFIXES


def stem(path: PathLike) -> str:
    """File name without its (possibly double) suffix; used as the layer name."""
    name = Path(path).name
    suffix = full_suffix(path)
    return name[: len(name) - len(suffix)] if suffix else name


def natural_key(name: str) -> list:
    """Sort key that orders ``s2`` before ``s10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def existing_file(path: PathLike) -> Path:
    """``path`` as a Path; :class:`UnsupportedFileError` if it is not an existing file."""
    p = Path(path)
    if not p.exists():
        raise UnsupportedFileError(f"{p} does not exist; check the path and try again.")
    if not p.is_file():
        raise UnsupportedFileError(f"{p} is not a file; pass the path of an image file.")
    try:
        with open(p, "rb"):
            pass
    except PermissionError as exc:
        raise UnsupportedFileError(
            f"Cannot read {p}: permission denied. Check that you may read the file."
        ) from exc
    return p


class LibraryReportedError(Exception):
    """A reading library logged an error (e.g. a truncated file) but carried on."""


class _ErrorLog(logging.Handler):
    """Collects the errors a library logs in this thread (lazy tiles are read in several threads)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []
        self.thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def reading(path: PathLike, kind: str, logger: str | None = None) -> Iterator[None]:
    """Turn a library error raised while reading ``path`` into :class:`UnsupportedFileError`.

    Errors that the library named by ``logger`` only logs (tifffile reads what it can of a
    truncated file and logs the rest) count too.
    """
    log = _ErrorLog()
    if logger:
        logging.getLogger(logger).addHandler(log)
    try:
        yield
        if log.messages:
            raise LibraryReportedError("; ".join(log.messages))
    except RegistrationError:
        raise
    except MemoryError as exc:
        raise OutOfMemoryError(
            f"Cannot read {path}: it needs more memory than is free ({exc}). If the file is small, its "
            "header is corrupt; otherwise open a downsampled copy, or convert it to a pyramidal OME-TIFF, "
            "which opens lazily."
        ) from exc
    except PermissionError as exc:
        raise UnsupportedFileError(
            f"Cannot read {path}: permission denied. Check that you may read the file."
        ) from exc
    except Exception as exc:  # a library error: file corrupt, truncated or not of this kind
        raise UnsupportedFileError(
            f"Cannot read {path} as {kind}: the file looks corrupt, truncated or is not a {kind} file "
            f"({type(exc).__name__}: {exc}). Check that it was copied completely, or re-export it "
            "from the program that made it."
        ) from exc
    finally:
        if logger:
            logging.getLogger(logger).removeHandler(log)


@contextlib.contextmanager
def atomic_write(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` that replaces ``path`` once the block succeeds.

    The temporary file keeps the suffix of ``path`` so that libraries that choose the format by
    suffix (nibabel's ``.nii.gz``) behave the same. On error it is removed and ``path`` is untouched.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if folder.exists() and not folder.is_dir():
        raise UnsupportedFileError(
            f"Cannot write {target}: {folder} is a file, not a folder; choose another path."
        )
    if not folder.is_dir():
        raise UnsupportedFileError(f"Cannot write {target}: folder {folder} does not exist; create it first.")
    if target.is_dir():
        raise UnsupportedFileError(f"Cannot write {target}: it is a folder; give a file name inside it.")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=full_suffix(target))
    except OSError as exc:
        raise UnsupportedFileError(
            f"Cannot write {target}: {exc.strerror or exc}. Check that the folder {folder} is writable."
        ) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        publish(tmp_path, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, RegistrationError):
            raise UnsupportedFileError(
                f"Cannot write {target}: {exc.strerror or exc}. Check that the folder is writable and "
                "has free space."
            ) from exc
        if isinstance(exc, MemoryError) and not isinstance(exc, RegistrationError):
            raise OutOfMemoryError(f"Writing {target} ran out of memory; write a smaller image.") from exc
        raise


def check_not_empty(path: PathLike, shape, min_ndim: int = 2) -> None:
    """:class:`UnsupportedFileError` naming ``path`` when an image of ``shape`` is empty or below 2D."""
    shape = tuple(int(n) for n in shape)
    if len(shape) < min_ndim or 0 in shape:
        raise UnsupportedFileError(
            f"{path} holds no usable image: its data has shape {shape}. The file looks corrupt or "
            "truncated; check that it was copied completely, or re-export it."
        )


def writable_array(path: PathLike, data: Any, kinds: str = "biuf") -> np.ndarray:
    """``data`` as an array fit to write to ``path``; :class:`InputError` if it is empty or not numeric."""
    try:
        arr = np.asarray(data)
    except MemoryError as exc:
        raise OutOfMemoryError(f"Cannot write {path}: the image does not fit in memory ({exc}).") from exc
    if arr.dtype.kind not in kinds:
        raise InputError(f"Cannot write {path}: the image has dtype {arr.dtype}, not numbers; cast it first.")
    if arr.size == 0:
        raise InputError(
            f"Cannot write {path}: the image is empty (shape {arr.shape}); there is nothing to save."
        )
    return arr
