"""CNN encoder: a fixed/moving pair -> global latent code and a coarse grid of local codes.

Blocks of stride-2 convolution, batch norm and leaky ReLU halve the resolution each time. The
local code grid is read out by a 1x1 convolution after ``local_level`` blocks (a coarse
intermediate resolution); the global code by a fully connected head after global average
pooling of the last block. 2D and 3D.

Inputs (``features``): ``"pair"`` feeds the two images; ``"flow"`` adds their difference and the
difference times each spatial derivative of their mean (central differences), the terms of the
optical-flow (demons) step ``-(f - m) grad(m)``, which tell a small local shift directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...core.errors import InputError


def _conv(ndim: int):
    return nn.Conv2d if ndim == 2 else nn.Conv3d


def _norm(ndim: int):
    return nn.BatchNorm2d if ndim == 2 else nn.BatchNorm3d


#: Input features -> number of input channels for ``ndim``-D images.
FEATURES = {"pair": lambda ndim: 2, "flow": lambda ndim: 3 + ndim}


def flow_features(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """``[f, m, f - m, (f - m) * d(mean)/d axis ...]`` for pairs ``(B, 1, *spatial)``."""
    diff = fixed - moving
    mean = 0.5 * (fixed + moving)
    grads = []
    for axis in range(2, fixed.dim()):
        pad = [0, 0] * (fixed.dim() - 2)
        pad[2 * (fixed.dim() - 1 - axis) : 2 * (fixed.dim() - 1 - axis) + 2] = [1, 1]
        padded = nn.functional.pad(mean, pad, mode="replicate")
        n = fixed.shape[axis]
        grads.append(0.5 * (padded.narrow(axis, 2, n) - padded.narrow(axis, 0, n)))
    return torch.cat([fixed, moving, diff, *[diff * g for g in grads]], dim=1)


class Encoder(nn.Module):
    def __init__(
        self,
        ndim: int,
        global_dim: int = 64,
        local_dim: int = 8,
        channels: Sequence[int] = (16, 32, 64, 64),
        local_level: int = 3,
        in_channels: int | None = None,
        features: str = "pair",
    ):
        super().__init__()
        if features not in FEATURES:
            raise InputError(f"Unknown encoder features {features!r}; choose one of {', '.join(FEATURES)}.")
        conv, norm = _conv(ndim), _norm(ndim)
        self.ndim, self.features = ndim, features
        in_channels = FEATURES[features](ndim) if in_channels is None else int(in_channels)
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
        h = torch.cat([fixed, moving], dim=1) if self.features == "pair" else flow_features(fixed, moving)
        local = None
        for i, block in enumerate(self.blocks, start=1):
            h = block(h)
            if i == self.local_level:
                local = self.local_head(h)
        pooled = h.mean(dim=tuple(range(2, h.dim())))
        return self.global_head(pooled), local
