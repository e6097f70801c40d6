"""Whole-image fields from a patch network: cut patches, predict, blend, compose (MASN(k)).

Each iteration warps the moving image by the current field, cuts overlapping multi-magnification
patch sets (stride P/2), lets the network predict a field per patch (the affine matrices become
pixel fields), blends them batch by batch (:class:`~.patches.FieldBlender`, so memory stays
``O(H W)``) and composes the result with the current field: ``u_new(x) = d(x) + u(x + d(x))``.
Patches without tissue get zero displacement.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...core.errors import InputError
from ...core.options import check_int
from ...core.progress import Progress
from .networks import MultiMagNet, affine_displacement
from .patches import FieldBlender, multimag_patches, patch_origins

#: A patch whose fixed or moving view varies less than this (std) is background.
FLAT_STD = 1e-6


def prepare(image, name: str = "image") -> np.ndarray:
    """A stain channel as float32 in [0, 1], scaled by its 99.5th percentile; bad images raise."""
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise InputError(f"The {name} must be one 2D stain channel (y, x), got shape {arr.shape}.")
    if min(arr.shape) < 8:
        raise InputError(f"The {name} is too small ({arr.shape}); give at least 8 x 8 pixels.")
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise InputError(f"The {name} holds NaN or infinite values; replace them (e.g. by 0) first.")
    arr = arr - min(float(arr.min()), 0.0)
    top = float(np.percentile(arr, 99.5))
    if top <= 0:
        top = float(arr.max())
    if top <= 0 or float(arr.max() - arr.min()) == 0:
        raise InputError(f"The {name} is constant (no tissue signal); check the channel and the tissue mask.")
    return np.clip(arr / top, 0.0, 1.0)


def sample_at(
    image: torch.Tensor, coords: torch.Tensor, padding: str = "zeros", mode: str = "bilinear"
) -> torch.Tensor:
    """Samples of ``image`` (N, C, H, W) at pixel ``coords`` (N, 2, h, w) in (y, x) order, bilinear
    or (``mode="bicubic"``) bicubic; ``padding`` as :func:`torch.nn.functional.grid_sample`."""
    h, w = image.shape[-2:]
    gy = coords[:, 0] * (2.0 / max(h - 1, 1)) - 1.0
    gx = coords[:, 1] * (2.0 / max(w - 1, 1)) - 1.0
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding, align_corners=True)


def _identity(shape, device, dtype=torch.float32) -> torch.Tensor:
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


def warp(image: np.ndarray, field: np.ndarray) -> np.ndarray:
    """``image(x + u(x))`` for a 2D image and a ``(2, H, W)`` pixel field (bilinear, 0 outside)."""
    img = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    u = torch.as_tensor(np.ascontiguousarray(field, dtype=np.float32))[None]
    return sample_at(img, _identity(image.shape, "cpu") + u)[0, 0].numpy()


def compose(delta: np.ndarray, field: np.ndarray) -> np.ndarray:
    """The field of ``x -> y + u(y)`` with ``y = x + d(x)``: ``d(x) + u(x + d(x))`` (u clamped at borders)."""
    d = torch.as_tensor(np.ascontiguousarray(delta, dtype=np.float32))[None]
    u = torch.as_tensor(np.ascontiguousarray(field, dtype=np.float32))[None]
    out = d + sample_at(u, _identity(delta.shape[1:], "cpu") + d, padding="border")
    return out[0].numpy()


def _check_mask(mask, shape) -> np.ndarray | None:
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise InputError(
            f"The tissue mask has shape {m.shape} but the images are {tuple(shape)}; "
            "give one of the fixed image's shape."
        )
    return m.astype(bool)


def _patch_fields(net: MultiMagNet, high, low) -> torch.Tensor:
    device = next(net.parameters()).device
    high = high.to(device)
    low = None if low is None else low.to(device)
    out = net(high, low)
    if net.config.kind == "affine":
        out = affine_displacement(out, net.config.patch)
    return out.cpu()


def predict_field(
    fixed,
    moving,
    net: MultiMagNet,
    *,
    iterations: int = 1,
    mask=None,
    batch: int = 16,
    progress: Progress | None = None,
) -> np.ndarray:
    """The ``(2, H, W)`` pixel field ``u`` with ``moving(x + u(x)) ~ fixed(x)`` predicted by ``net``.

    ``fixed`` and ``moving`` are stain channels on one grid (after pre-alignment); ``mask`` the
    fixed tissue (patches without tissue get zero displacement); ``iterations`` re-runs the net on
    the re-warped moving image and composes the fields (the paper's MASN(k)).
    """
    if not isinstance(net, MultiMagNet):
        raise InputError(f"net must be a MultiMagNet (load one with load_model), got {type(net).__name__}.")
    iterations = check_int("iterations", iterations, 1, 20)
    batch = check_int("batch", batch, 1, 4096)
    fixed = prepare(fixed, "fixed image")
    moving = prepare(moving, "moving image")
    if fixed.shape != moving.shape:
        raise InputError(
            f"Fixed {fixed.shape} and moving {moving.shape} must be on one grid; resample the moving "
            "image onto the fixed grid first (rigid pre-alignment)."
        )
    mask = _check_mask(mask, fixed.shape)
    if progress is None or callable(progress) and not isinstance(progress, Progress):
        progress = Progress(progress)
    cfg = net.config
    origins = patch_origins(fixed.shape, cfg.patch, cfg.patch // 2)
    starts = range(0, len(origins), batch)
    total = iterations * len(starts)
    field = np.zeros((2, *fixed.shape), dtype=np.float32)
    was_training = net.training
    net.eval()
    try:
        for it in range(iterations):
            warped = warp(moving, field) if it else moving
            blender = FieldBlender(fixed.shape, cfg.patch)  # one batch of patch fields at a time
            for b, s in enumerate(starts):
                progress.check()
                chunk = origins[s : s + batch]
                high, low = multimag_patches(fixed, warped, chunk, cfg.patch, cfg.magnifications)
                keep = high.flatten(2).std(dim=2).min(dim=1).values > FLAT_STD
                if mask is not None:
                    keep &= torch.as_tensor(
                        [bool(mask[y : y + cfg.patch, x : x + cfg.patch].any()) for y, x in chunk]
                    )
                fields = torch.zeros((len(chunk), 2, cfg.patch, cfg.patch))
                if keep.any():
                    with torch.no_grad():
                        fields[keep] = _patch_fields(net, high[keep], None if low is None else low[keep])
                blender.add(fields, chunk)
                progress.step(
                    it * len(starts) + b + 1, total, stage=f"{cfg.kind} network {it + 1}/{iterations}"
                )
            delta = blender.result()
            field = compose(delta, field) if it else delta
    finally:
        net.train(was_training)
    return field
