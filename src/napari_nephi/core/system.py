"""What this machine offers a process: its usable cores.

Standard library only, imported by nothing heavy: ``tests/conftest.py`` loads this file by its path in
pytest-xdist's controller (before any worker starts), where importing the package would import torch
(``napari_nephi/__init__.py`` imports the engines). Keep it free of torch, numpy, napari and Qt, and of
imports from the package (``tests/test_suite_workers.py`` checks it).
"""

from __future__ import annotations

import os

__all__ = ["cores"]


def cores() -> int:
    """The CPU cores this process may run on (its affinity on Linux; else every core), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
