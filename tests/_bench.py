"""Importing the scripts of ``benchmarks/`` in tests (one helper for every test that does).

``from .._bench import import_benchmark`` (the suite runs with ``--import-mode=importlib``); not a conftest,
which pytest advises against importing from.
"""

import importlib
import os
import sys
from pathlib import Path

BENCH = str(Path(__file__).resolve().parents[1] / "benchmarks")


def import_benchmark(name: str):
    """The module ``benchmarks/<name>.py``, imported with that folder on ``sys.path`` for the import only (the
    modules it imports from there stay in ``sys.modules``); ``nephi_accuracy`` (imported by the NePhi
    benchmarks) sets ITK's thread count, which is restored."""
    itk = os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
    sys.path.insert(0, BENCH)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(BENCH)
        if itk is None:
            os.environ.pop("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", None)
        else:
            os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = itk
