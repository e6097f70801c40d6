"""Tiles of a large (lazy) image in row-major order, computed in bands of bounded size.

A TIFF writer wants the tiles of a level in row-major order: all of tile row 0, then tile row 1 ...
The level is computed one *band* of rows at a time (aligned to its dask row chunks, so each chunk is
computed once). A band holding more than :data:`MAX_BAND_BYTES` (a very wide slide) is cut into
column *groups*, so at most one group is in memory:

- a band one tile row high streams its groups' tiles as they are computed;
- a taller band (dask chunks taller than a tile, which a tile-row band would compute twice) writes
  its groups' tiles to an anonymous temporary file, then reads them back in row-major order.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

__all__ = ["Band", "MAX_BAND_BYTES", "MAX_BAND_ROWS", "iter_tiles", "plan_bands"]

#: bands taller than this many rows are cut into tile-row bands (huge dask chunks)
MAX_BAND_ROWS = 4096
#: the most bytes of a level computed at once (a wider band is computed in column groups)
MAX_BAND_BYTES = 32 << 20


@dataclass(frozen=True)
class Band:
    """Rows ``y0:y1`` of a level, computed as the column ranges ``groups``; ``spill``: via a file."""

    y0: int
    y1: int
    groups: tuple[tuple[int, int], ...]
    spill: bool


def _ranges(n: int, edges: list[int], tile: int, limit: int) -> list[tuple[int, int]]:
    """``[0, n)`` cut at ``edges`` rounded up to whole tiles, in pieces of at most ``limit``."""
    out, start = [], 0
    for edge in edges:
        stop = min(n, math.ceil(edge / tile) * tile)
        while stop > start:
            end = min(stop, start + limit)
            out.append((start, end))
            start = end
    return out


def _whole_tiles(n: int, tile: int) -> int:
    """``n`` rounded down to whole tiles, at least one tile."""
    return max(tile, n // tile * tile)


def plan_bands(level: Any, tile: int, max_bytes: int | None = None) -> list[Band]:
    """The bands (and their column groups) in which :func:`iter_tiles` computes ``level``."""
    max_bytes = MAX_BAND_BYTES if max_bytes is None else max_bytes
    rows, cols = int(level.shape[0]), int(level.shape[1])
    pixel = int(np.prod(level.shape[2:], dtype=np.int64)) * np.dtype(level.dtype).itemsize
    lazy = isinstance(level, da.Array)
    fit = max_bytes // max(cols * pixel, 1)  # full-width rows within the budget
    if lazy:  # whole dask row chunks (each computed once), at most MAX_BAND_ROWS
        small = max(level.chunks[0]) <= MAX_BAND_ROWS
        edges = [int(e) for e in np.cumsum(level.chunks[0])] if small else [rows]
        bands = _ranges(rows, edges, tile, _whole_tiles(MAX_BAND_ROWS, tile))
    else:  # as many whole tile rows as the budget allows (one at least)
        bands = _ranges(rows, [rows], tile, _whole_tiles(min(fit, MAX_BAND_ROWS), tile))
    col_edges = [int(e) for e in np.cumsum(level.chunks[1])] if lazy else [cols]
    plan = []
    for y0, y1 in bands:
        width = _whole_tiles(max_bytes // max((y1 - y0) * pixel, 1), tile)
        groups = tuple(_ranges(cols, col_edges, tile, width)) if width < cols else ((0, cols),)
        if len(groups) > 1 and lazy:  # merge neighbouring chunk columns up to the group width
            groups = _merge(groups, width)
        plan.append(Band(y0, y1, groups, spill=len(groups) > 1 and y1 - y0 > tile))
    return plan


def _merge(groups: tuple[tuple[int, int], ...], width: int) -> tuple[tuple[int, int], ...]:
    out = [groups[0]]
    for x0, x1 in groups[1:]:
        if x1 - out[-1][0] <= width:
            out[-1] = (out[-1][0], x1)
        else:
            out.append((x0, x1))
    return tuple(out)


def _compute(level: Any, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    part = level[y0:y1, x0:x1]
    return part.compute() if isinstance(part, da.Array) else np.asarray(part)


def _cut(block: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    for ty in range(0, block.shape[0], tile):
        for tx in range(0, block.shape[1], tile):
            yield np.ascontiguousarray(block[ty : ty + tile, tx : tx + tile])


def _spilled(
    level: Any, band: Band, tile: int, folder: Path | None, on_band: Callable[[], None]
) -> Iterator[np.ndarray]:
    """The band's tiles (zero-padded to full size) in row-major order, computed group by group."""
    shape = (tile, tile) + tuple(int(n) for n in level.shape[2:])
    dtype = np.dtype(level.dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    n_y, n_x = math.ceil((band.y1 - band.y0) / tile), math.ceil(int(level.shape[1]) / tile)
    with tempfile.TemporaryFile(dir=folder) as fh:
        for x0, x1 in band.groups:  # tile (ty, tx) of the band lies at ((ty * n_x) + tx) * nbytes
            block = _compute(level, band.y0, band.y1, x0, x1)
            for ty in range(n_y):
                for j in range(math.ceil((x1 - x0) / tile)):
                    piece = block[ty * tile : (ty + 1) * tile, j * tile : (j + 1) * tile]
                    padded = np.zeros(shape, dtype)
                    padded[: piece.shape[0], : piece.shape[1]] = piece
                    fh.seek((ty * n_x + x0 // tile + j) * nbytes)
                    fh.write(padded.data)
            del block
        on_band()
        for i in range(n_y * n_x):
            fh.seek(i * nbytes)
            buf = bytearray(nbytes)
            fh.readinto(buf)
            yield np.frombuffer(buf, dtype).reshape(shape)


def iter_tiles(
    level: Any, tile: int, plan: list[Band], on_band: Callable[[], None], spill_dir: Path | None = None
) -> Iterator[np.ndarray]:
    """Tiles of ``level`` in row-major order, band by band as ``plan`` says (``on_band()`` once each).

    ``spill_dir``: where the temporary file of a spilled band goes (it has no name and vanishes
    when closed, even if the process is killed).
    """
    for band in plan:
        if band.spill:
            yield from _spilled(level, band, tile, spill_dir, on_band)
            continue
        for x0, x1 in band.groups:
            block = _compute(level, band.y0, band.y1, x0, x1)
            if x1 == band.groups[-1][1]:
                on_band()  # before the last tiles: the writer stops reading after the last one
            yield from _cut(block, tile)
