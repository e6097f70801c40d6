"""Writing files atomically with the usual permissions (never a half-written output)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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
