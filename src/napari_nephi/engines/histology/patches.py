"""Overlapping patches of a slide pair at two magnifications, and patch fields blended into one field.

Every patch set is cut at an *origin* (top-left ``(y, x)`` of the high-magnification patch):
the high view is the ``P x P`` patch itself; the low view is the surrounding ``2P x 2P`` region
(centre-crop rate 2) averaged over 2 x 2 pixels back to ``P x P`` (sampling factor 2). Pixels
outside the image are 0. Patch fields are blended with a smooth window (sin^2 in each axis,
about 0 at the patch border), so the blended field has no seams where patches end.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from ...core.errors import InputError


def _axis_origins(n: int, patch: int, stride: int) -> list[int]:
    last = max(n - patch, 0)
    out = list(range(0, last + 1, stride))
    if out[-1] < last:
        out.append(last)
    return out


def patch_origins(shape: Sequence[int], patch: int = 224, stride: int = 112) -> np.ndarray:
    """Top-left corners ``(N, 2)`` of patches on a regular grid (last row/column flush) covering ``shape``."""
    if len(shape) != 2 or min(shape) < 1:
        raise InputError(f"patch_origins needs a 2D image shape, got {tuple(shape)}.")
    if stride < 1 or stride > patch:
        raise InputError(f"The patch stride must be between 1 and the patch size {patch}, got {stride}.")
    axes = [_axis_origins(int(n), patch, stride) for n in shape]
    return np.asarray(list(itertools.product(*axes)), dtype=np.int64).reshape(-1, 2)


def crop(image, y0: int, x0: int, size: int) -> np.ndarray:
    """``image[y0:y0+size, x0:x0+size]`` as float32, zero where the window leaves the image."""
    h, w = image.shape[:2]
    out = np.zeros((size, size), dtype=np.float32)
    ys, ye = max(y0, 0), min(y0 + size, h)
    xs, xe = max(x0, 0), min(x0 + size, w)
    if ys < ye and xs < xe:
        out[ys - y0 : ye - y0, xs - x0 : xe - x0] = np.asarray(image[ys:ye, xs:xe], dtype=np.float32)
    return out


def _check_pair(fixed, moving) -> None:
    if getattr(fixed, "ndim", None) != 2 or getattr(moving, "ndim", None) != 2:
        raise InputError(
            "Patches are cut from 2D single-channel images (stain channels); got shapes "
            f"{getattr(fixed, 'shape', None)} and {getattr(moving, 'shape', None)}."
        )
    if tuple(fixed.shape) != tuple(moving.shape):
        raise InputError(
            f"Fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} must be on one grid; "
            "resample the moving image onto the fixed grid first (rigid pre-alignment)."
        )


def multimag_patches(
    fixed, moving, origins, patch: int = 224, magnifications: int = 2
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """High ``(N, 2, P, P)`` and low ``(N, 2, P, P)`` patch sets (channel 0 fixed, 1 moving).

    ``low`` is None for ``magnifications=1``. ``fixed`` and ``moving`` are 2D arrays of one shape
    (numpy, or dask: only the windows are read).
    """
    _check_pair(fixed, moving)
    if magnifications not in (1, 2):
        raise InputError(f"magnifications must be 1 or 2, got {magnifications!r}.")
    origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
    high = np.zeros((len(origins), 2, patch, patch), dtype=np.float32)
    low = np.zeros_like(high) if magnifications == 2 else None
    half = patch // 2
    for i, (y, x) in enumerate(origins):
        for c, image in enumerate((fixed, moving)):
            if low is None:
                high[i, c] = crop(image, y, x, patch)
                continue
            region = crop(image, y - half, x - half, 2 * patch)
            high[i, c] = region[half : half + patch, half : half + patch]
            low[i, c] = region.reshape(patch, 2, patch, 2).mean(axis=(1, 3))
    return torch.from_numpy(high), None if low is None else torch.from_numpy(low)


def blend_window(patch: int) -> np.ndarray:
    """The ``(P, P)`` blending weight: sin^2 in each axis, ~0 at the border, 1 at the centre."""
    t = np.sin(np.pi * (np.arange(patch) + 0.5) / patch) ** 2
    return np.outer(t, t)


class FieldBlender:
    """Patch fields added batch by batch into one blended ``(2, H, W)`` field.

    Holds only the running weighted sum and weight (``O(H W)``), never all patch fields at once;
    :func:`blend_fields` is one :meth:`add` and :meth:`result`.
    """

    def __init__(self, shape: Sequence[int], patch: int):
        self.shape = tuple(int(s) for s in shape)
        self.patch = int(patch)
        self.total = np.zeros((2, *self.shape), dtype=np.float64)
        self.weight = np.zeros(self.shape, dtype=np.float64)
        self.window = blend_window(self.patch)

    def add(self, fields, origins) -> None:
        """Add ``(N, 2, P, P)`` patch fields at their ``(N, 2)`` origins (a zero field still weighs)."""
        p = self.patch
        fields = fields.detach().cpu().numpy() if isinstance(fields, torch.Tensor) else np.asarray(fields)
        origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
        if fields.ndim != 4 or fields.shape[1:] != (2, p, p) or len(fields) != len(origins):
            raise InputError(
                f"blend_fields needs (N, 2, {p}, {p}) fields for N={len(origins)} origins, "
                f"got {fields.shape}."
            )
        h, w = self.shape
        for f, (y, x) in zip(fields, origins, strict=True):
            ys, ye, xs, xe = max(y, 0), min(y + p, h), max(x, 0), min(x + p, w)
            if ys >= ye or xs >= xe:
                continue
            win = self.window[ys - y : ye - y, xs - x : xe - x]
            self.total[:, ys:ye, xs:xe] += win * f[:, ys - y : ye - y, xs - x : xe - x]
            self.weight[ys:ye, xs:xe] += win

    def result(self) -> np.ndarray:
        """The blended field, float32 (0 where no patch lies)."""
        out = np.divide(self.total, self.weight, out=np.zeros_like(self.total), where=self.weight > 0)
        return out.astype(np.float32)


def blend_fields(fields, origins, shape: Sequence[int], patch: int) -> np.ndarray:
    """Patch fields ``(N, 2, P, P)`` at ``origins`` -> one ``(2, H, W)`` float32 field.

    Each pixel takes the window-weighted mean of the patches covering it; the window falls to
    about 0 at patch borders, so the field is as smooth across a border as inside the patches.
    """
    blender = FieldBlender(shape, patch)
    blender.add(fields, origins)
    return blender.result()
