"""Separable Gaussian smoothing of tensors along one axis (edges replicated)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def blur_axis(t: torch.Tensor, axis: int, sigma: float, radius: int) -> torch.Tensor:
    """``t`` convolved along ``axis`` with a Gaussian of ``sigma`` voxels cut at ``radius`` voxels
    (normalised to sum 1; the edges replicated)."""
    x = torch.arange(-radius, radius + 1, dtype=t.dtype, device=t.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).reshape(1, 1, -1)
    moved = t.movedim(axis, -1)
    flat = moved.reshape(-1, 1, moved.shape[-1])
    flat = F.conv1d(F.pad(flat, (radius, radius), mode="replicate"), k)
    return flat.reshape(moved.shape).movedim(-1, axis)
