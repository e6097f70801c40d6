"""Wall time and peak resident memory of a call, measured in this process.

Peak memory is the largest resident set size seen by a sampling thread (every 5 ms) minus the
size before the call, so several tools can be compared side by side in one process.
"""

from __future__ import annotations

import gc
import os
import threading
import time

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


def measure(func, *args, **kwargs):
    """Run ``func``; return ``(result, seconds, peak_extra_mib)``."""
    gc.collect()
    base = rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    start = time.perf_counter()
    try:
        result = func(*args, **kwargs)
    finally:
        seconds = time.perf_counter() - start
        done.set()
        t.join()
    peak[0] = max(peak[0], rss_bytes())
    return result, seconds, (peak[0] - base) / 2**20
