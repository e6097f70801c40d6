"""CNN encoder: a fixed/moving pair -> global latent code and a coarse grid of local codes.

Blocks of stride-2 convolution, batch norm and leaky ReLU halve the resolution each time. The
local code grid is read out by a 1x1 convolution after ``local_level`` blocks (a coarse
intermediate resolution); the global code by a fully connected head after global average
pooling of the last block. 2D and 3D.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _conv(ndim: int):
    return nn.Conv2d if ndim == 2 else nn.Conv3d


def _norm(ndim: int):
    return nn.BatchNorm2d if ndim == 2 else nn.BatchNorm3d


class Encoder(nn.Module):
    def __init__(
        self,
        ndim: int,
        global_dim: int = 64,
        local_dim: int = 8,
        channels: Sequence[int] = (16, 32, 64, 64),
        local_level: int = 3,
        in_channels: int = 2,
    ):
        super().__init__()
        conv, norm = _conv(ndim), _norm(ndim)
        self.ndim = ndim
        self.local_level = min(max(1, int(local_level)), len(channels))
        blocks = []
        prev = in_channels
        for ch in channels:
            blocks.append(
                nn.Sequential(
                    conv(prev, ch, 3, stride=2, padding=1),
                    norm(ch),
                    nn.LeakyReLU(0.2),
                    conv(ch, ch, 3, padding=1),
                    norm(ch),
                    nn.LeakyReLU(0.2),
                )
            )
            prev = ch
        self.blocks = nn.ModuleList(blocks)
        self.local_head = conv(channels[self.local_level - 1], local_dim, 1)
        self.global_head = nn.Sequential(
            nn.Linear(prev, prev), nn.LeakyReLU(0.2), nn.Linear(prev, global_dim)
        )

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs ``(B, 1, *spatial)`` -> global codes ``(B, G)`` and local code grids ``(B, L, *grid)``."""
        h = torch.cat([fixed, moving], dim=1)
        local = None
        for i, block in enumerate(self.blocks, start=1):
            h = block(h)
            if i == self.local_level:
                local = self.local_head(h)
        pooled = h.mean(dim=tuple(range(2, h.dim())))
        return self.global_head(pooled), local
