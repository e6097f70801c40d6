"""The embedding network: a compact ResNet and an MLP head to an L2-normalised embedding.

As the authors' model (ResNet backbone, global average pool, Dense 256 ReLU, Dense 64, L2
normalisation) but small enough to train per atlas on a CPU: basic residual blocks with GroupNorm
(so an embedding does not depend on the other images of its batch), one stride-2 stage per width.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_nephi.core.device import choose_device
from napari_nephi.core.errors import InputError
from napari_nephi.core.options import check_float, check_int, check_int_list

from .preprocess import image_list, prepare_input


@dataclass
class EmbeddingConfig:
    """Shape of an :class:`EmbeddingNet`; values are checked when made (:class:`InputError`)."""

    input_size: int = 128
    widths: tuple = (16, 32, 64, 128)
    blocks_per_stage: int = 1
    embedding_dim: int = 64
    hidden: int = 256
    dropout: float = 0.2

    def __post_init__(self) -> None:
        self.input_size = check_int("input_size", self.input_size, 16, 2048)
        self.widths = tuple(check_int_list("widths", self.widths, None, 1, 1024))
        if not 1 <= len(self.widths) <= 6:
            raise InputError(f"Option widths needs 1 to 6 stage widths, got {len(self.widths)}.")
        self.blocks_per_stage = check_int("blocks_per_stage", self.blocks_per_stage, 1, 8)
        self.embedding_dim = check_int("embedding_dim", self.embedding_dim, 2, 1024)
        self.hidden = check_int("hidden", self.hidden, 1, 4096)
        self.dropout = check_float("dropout", self.dropout, 0.0, 0.95)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (widths as a list)."""
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EmbeddingConfig:
        """The config saved by :meth:`to_dict`; unknown keys raise :class:`InputError`."""
        if not isinstance(d, dict):
            raise InputError(f"An embedding config must be a dict, got {type(d).__name__}.")
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise InputError(
                f"Unknown embedding config keys: {', '.join(map(repr, unknown))}. Valid keys: "
                f"{', '.join(sorted(valid))}. The index may come from a newer version: retrain it."
            )
        return cls(**d)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, 8), channels)


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (1x1 projection when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _norm(c_out)
        nn.init.zeros_(self.norm2.weight)  # each block starts as the identity
        self.skip = None
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), _norm(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return F.relu(y + (x if self.skip is None else self.skip(x)))


class EmbeddingNet(nn.Module):
    """(B, 1, S, S) images -> (B, embedding_dim) L2-normalised embeddings."""

    def __init__(self, config: EmbeddingConfig | None = None) -> None:
        super().__init__()
        if config is None:
            config = EmbeddingConfig()
        if not isinstance(config, EmbeddingConfig):
            raise InputError(f"EmbeddingNet needs an EmbeddingConfig, got {type(config).__name__}.")
        self.config = config
        w0 = config.widths[0]
        self.stem = nn.Sequential(nn.Conv2d(1, w0, 3, stride=2, padding=1, bias=False), _norm(w0), nn.ReLU())
        blocks: list[nn.Module] = []
        c_in = w0
        for width in config.widths:
            for b in range(config.blocks_per_stage):
                blocks.append(_BasicBlock(c_in, width, 2 if b == 0 else 1))
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Linear(c_in, config.hidden),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, config.embedding_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise InputError(f"EmbeddingNet takes images of shape (B, 1, S, S), got {tuple(x.shape)}.")
        y = self.blocks(self.stem(x))
        y = self.head(y.mean(dim=(2, 3)))
        return F.normalize(y, dim=1)


def embed_batch(net: EmbeddingNet, x: torch.Tensor, mirror: bool = False) -> torch.Tensor:
    """``net(x)``, or with ``mirror`` the normalised mean of the embeddings of ``x`` and of its
    left-right mirror (brains are nearly symmetric: a hemisphere cut away on either side, or an
    asymmetric cut, then gives one embedding)."""
    if not mirror:
        return net(x)
    both = net(torch.cat([x, x.flip(-1)]))
    return F.normalize(both[: len(x)] + both[len(x) :], dim=1)


def embed(
    net: EmbeddingNet,
    images: Sequence | np.ndarray,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    mirror: bool = False,
) -> np.ndarray:
    """(N, D) float32 embeddings of raw plates or sections (each run through :func:`prepare_input`).

    Runs in eval mode without gradients, on ``device``; the net's mode and device are restored.
    ``images``: a list of 2D/RGB images or an array whose first axis indexes them. ``mirror``: see
    :func:`embed_batch`.
    """
    images = image_list(images)
    batch_size = check_int("batch_size", batch_size, 1, 1 << 16)
    dev = choose_device(device)
    size = net.config.input_size
    was_training = net.training
    old = next(net.parameters()).device
    net.eval().to(dev)
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                x = np.stack(
                    [prepare_input(im, size, name=f"image {start + i}") for i, im in enumerate(chunk)]
                )
                x = torch.from_numpy(x[:, None]).to(dev)
                out.append(embed_batch(net, x, mirror).float().cpu().numpy())
    finally:
        net.to(old).train(was_training)
    return np.concatenate(out).astype(np.float32, copy=False)
