"""Random warps for self-supervised training pairs: small affine maps and smooth non-rigid fields.

A pair made by :func:`warped_pair` has a known truth: ``fixed(x) = moving(x + u(x))`` for the
field ``u`` that made it, the field the networks should predict.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from ...core.errors import InputError
from .predict import warp


def affine_field(shape: Sequence[int], matrix: np.ndarray) -> np.ndarray:
    """``(2, H, W)`` field of the 2 x 3 pixel matrix ``matrix`` acting about the image centre."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (2, 3):
        raise InputError(f"An affine matrix must be 2 x 3, got {m.shape}.")
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")).astype(np.float64)
    rel = grid - centre[:, None, None]
    moved = np.einsum("ij,jhw->ihw", m[:, :2], rel) + m[:, 2, None, None]
    return (moved - rel).astype(np.float32)


def random_affine(
    rng: np.random.Generator,
    *,
    rotation: float = 5.0,
    shear: float = 0.03,
    scale: float = 0.03,
    shift: float = 8.0,
) -> np.ndarray:
    """A 2 x 3 pixel matrix with rotation (degrees), shear, log-scale and shift (pixels) drawn uniformly."""
    a = np.deg2rad(rng.uniform(-rotation, rotation))
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    sh = np.array([[1.0, rng.uniform(-shear, shear)], [0.0, 1.0]])
    sc = np.diag(np.exp(rng.uniform(-scale, scale, size=2)))
    return np.concatenate([rot @ sh @ sc, rng.uniform(-shift, shift, size=(2, 1))], axis=1)


def smooth_field(
    shape: Sequence[int], rng: np.random.Generator, amplitude: float, spacing: float = 48.0
) -> np.ndarray:
    """A smooth random ``(2, H, W)`` field: noise on a grid of ``spacing`` pixels, cubic-upsampled.

    ``amplitude`` is the largest displacement (pixels) of the field.
    """
    if amplitude < 0 or spacing < 2:
        raise InputError(f"smooth_field needs amplitude >= 0 and spacing >= 2, got {amplitude}, {spacing}.")
    coarse = [max(2, int(np.ceil(n / spacing)) + 1) for n in shape]
    noise = rng.uniform(-1.0, 1.0, size=(2, *coarse))
    zoom = [(n - 1) / (c - 1) for n, c in zip(shape, coarse, strict=True)]
    field = np.stack([ndimage.zoom(c, zoom, order=3, mode="nearest", grid_mode=False) for c in noise])
    field = field[:, : shape[0], : shape[1]]
    peak = float(np.abs(field).max())
    return (field * (amplitude / peak if peak > 0 else 0.0)).astype(np.float32)


def warped_pair(
    image: np.ndarray, field: np.ndarray, moving: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(fixed, moving)``: ``fixed(x) = image(x + u(x))``; ``moving`` is ``image`` or the one given."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2 or field.shape != (2, *img.shape):
        raise InputError(
            f"warped_pair needs a 2D image and a (2, H, W) field, got {img.shape} and {field.shape}."
        )
    return warp(img, field), (img if moving is None else np.asarray(moving, dtype=np.float32))
