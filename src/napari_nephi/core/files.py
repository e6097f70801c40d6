"""Writing files and output folders atomically with the usual permissions (never a half-written output)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import UnsupportedFileError


def _umask() -> int:
    mask = os.umask(0o022)  # read once at import, before any worker thread writes files
    os.umask(mask)
    return mask


_UMASK = _umask()
#: Modes of finished files and folders (``mkstemp``/``mkdtemp`` make 0600/0700).
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


def publish(tmp, path) -> None:
    """Give a finished temporary file the usual permissions (mkstemp makes 0600) and move it to ``path``."""
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it (no half-written files)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_output_file(path, what: str = "file") -> Path:
    """``path`` as a Path if a ``what`` may be written there (its folder exists, it is not a folder).

    Raises :class:`UnsupportedFileError` that says what to give instead.
    """
    p = Path(path)
    if p.is_dir():
        raise UnsupportedFileError(f"{p} is a folder; give the name of the {what} to write.")
    if not p.parent.is_dir():
        raise UnsupportedFileError(f"Cannot write {p}: folder {p.parent} does not exist; create it first.")
    return p


#: Written into every output folder napari-nephi publishes: such a folder may be replaced by a later run.
OUTPUT_MARKER = ".napari-nephi-output"
_PARTIAL, _OLD = "partial", "old"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or no way to tell: leave its folder alone
    return True


def _sibling_name(path: Path, kind: str) -> str:
    return f".{path.name}.{kind}-{os.getpid()}-"


def clean_leftovers(path) -> list[Path]:
    """Remove temporary folders a killed earlier run left next to ``path``; return what was removed.

    A run names its temporary folders ``.NAME.partial-PID-*`` (being written) and
    ``.NAME.old-PID-*`` (the earlier output being replaced); a folder whose process is gone is a
    leftover. Folders of a run still going are kept.
    """
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for kind in (_PARTIAL, _OLD):
        for leftover in path.parent.glob(f".{path.name}.{kind}-*-*"):
            pid = leftover.name[len(f".{path.name}.{kind}-") :].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)) and leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
                removed.append(leftover)
    return removed


def check_output_folder(path, earlier_output: Callable[[Path], bool] | None = None) -> Path:
    """``path`` as a Path if a run may publish a folder there, else :class:`UnsupportedFileError`.

    Allowed: a path that does not exist, an empty folder, or the output folder of an earlier
    napari-nephi run (it holds :data:`OUTPUT_MARKER`, or ``earlier_output(path)`` is true: an
    output of a version that wrote no marker), which is then replaced as a whole. A file, or a
    folder holding anything else, is refused, so nothing of the user's is ever deleted.
    """
    path = Path(path)
    if path.is_dir():
        if (path / OUTPUT_MARKER).exists() or not any(path.iterdir()):
            return path
        if earlier_output is not None and earlier_output(path):
            return path
        raise UnsupportedFileError(
            f"{path} exists and holds files napari-nephi did not write; choose a new output folder "
            "or remove it first."
        )
    if path.exists() or path.is_symlink():
        raise UnsupportedFileError(f"{path} is a file, not a folder; choose a folder name for the output.")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UnsupportedFileError(
            f"Cannot write the output folder {path}: {ancestor} is a file, not a folder."
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UnsupportedFileError(
            f"Cannot write the output folder {path}: {ancestor} is not writable. Choose a writable place."
        )
    return path


@contextlib.contextmanager
def output_folder(path, earlier_output: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; when the block succeeds it becomes ``path``.

    The folder replaces an earlier output at ``path`` as a whole (never mixing old and new files);
    when the block fails, or the process is killed, ``path`` is left as it was, and the temporary
    folder is removed (or, after a kill, by the next run: :func:`clean_leftovers`). Refuses what
    :func:`check_output_folder` refuses (``earlier_output`` as there); an unwritable place gives
    :class:`UnsupportedFileError`.
    """
    path = check_output_folder(path, earlier_output)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(path)
        tmp = Path(tempfile.mkdtemp(prefix=_sibling_name(path, _PARTIAL), dir=path.parent))
    except OSError as exc:
        raise UnsupportedFileError(
            f"Cannot write the output folder {path}: {exc.strerror or exc}. Choose a writable place."
        ) from exc
    try:
        os.chmod(tmp, DIR_MODE)  # mkdtemp makes 0700; an output is a normal folder
        yield tmp
        atomic_write_bytes(tmp / OUTPUT_MARKER, b"written by napari-nephi; may be replaced by a later run\n")
        publish_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_folder(tmp, path) -> None:
    """Move the finished folder ``tmp`` to ``path``, replacing what is there as a whole."""
    tmp, path = Path(tmp), Path(path)
    if not path.exists():
        os.replace(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=_sibling_name(path, _OLD), dir=path.parent))
    os.replace(path, old / path.name)  # the earlier output moves aside (same file system) ...
    try:
        os.replace(tmp, path)  # ... the new one takes its place
    except BaseException:
        os.replace(old / path.name, path)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
