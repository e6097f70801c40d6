"""Random Fourier features of coordinates (Tancik et al. 2020)."""

from __future__ import annotations

import math

import torch
from torch import nn


class FourierFeatures(nn.Module):
    """``x -> [x, sin(2 pi x B), cos(2 pi x B)]`` with a fixed Gaussian matrix ``B`` ``(D, m)``.

    ``scale`` is the standard deviation of the frequencies in cycles per unit of ``x``; with
    normalised coordinates (domain length 2) ``scale=1`` gives about two periods across the image.
    ``B`` is a buffer, so it is saved with the model and moves with it between devices.
    """

    def __init__(
        self,
        ndim: int,
        n_frequencies: int = 32,
        scale: float = 2.0,
        include_input: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        g = torch.Generator().manual_seed(int(seed))
        self.register_buffer("B", torch.randn(ndim, n_frequencies, generator=g) * float(scale))
        self.include_input = include_input
        self.ndim = ndim
        self.out_features = 2 * n_frequencies + (ndim if include_input else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = (2 * math.pi) * (x @ self.B.to(x.dtype))
        parts = [x] if self.include_input else []
        return torch.cat(parts + [torch.sin(proj), torch.cos(proj)], dim=-1)
