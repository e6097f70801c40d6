"""Keep torch's thread count when a dependency starts numba's thread pool.

napari colours labels layers with numba functions compiled with ``parallel=True``. The first one
to run starts numba's thread pool; numba's OpenMP layer starts it with
``omp_set_num_threads(cpu_count)`` on the libgomp it shares with torch, so in that thread torch's
count became the number of cores whatever the user had set (``OMP_NUM_THREADS``,
``torch.set_num_threads`` or ``batch``'s ``threads``). numba's other layers (TBB, and its own
``workqueue``) leave OpenMP alone, so unless the user chose, numba tries OpenMP last.

numba reads ``NUMBA_THREADING_LAYER_PRIORITY`` when it is imported and again before it compiles,
but not when it loads a function from its on-disk cache (napari's are cached). napari imports
numba before it loads a plugin, so where numba is imported already and its pool not started,
``numba.config`` is set as well (numba's documented way to pick the layer in a program).
"""

from __future__ import annotations

import os
import sys

PRIORITY = "tbb workqueue omp"  # numba's own order is "tbb omp workqueue"
_NUMBA_DEFAULT_PRIORITY = ["tbb", "omp", "workqueue"]


def keep_torch_threads() -> None:
    """Make numba try OpenMP last, unless the user set numba's threading layer or its order."""
    if "NUMBA_THREADING_LAYER" in os.environ or "NUMBA_THREADING_LAYER_PRIORITY" in os.environ:
        return
    numba = sys.modules.get("numba")
    config = getattr(numba, "config", None)
    if config is not None:
        if (
            getattr(config, "THREADING_LAYER", "default") != "default"
            or getattr(config, "THREADING_LAYER_PRIORITY", None) != _NUMBA_DEFAULT_PRIORITY
        ):
            return  # chosen in a .numba_config.yaml or in numba.config by the program
        try:
            numba.threading_layer()
            return  # the pool has started: too late to choose, so leave numba as it is
        except ValueError:  # numba's answer before the pool starts
            config.THREADING_LAYER_PRIORITY = PRIORITY.split()
    os.environ["NUMBA_THREADING_LAYER_PRIORITY"] = PRIORITY
