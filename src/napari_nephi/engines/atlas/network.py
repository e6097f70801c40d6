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
from napari_nephi.core.options import check_choice, check_float, check_int, check_int_list

from .preprocess import image_list, prepare_input, prepare_input_geometry
from .vote import cell_cover

#: What a cell of the cell head sees: ``"local"`` the stages at least as fine as the cell grid,
#: ``"stages"`` every stage (the coarser ones upsampled), ``"global"`` every stage and the global mean
#: of the last one.
VOTE_CONTEXTS = ("local", "stages", "global")


@dataclass
class EmbeddingConfig:
    """Shape of an :class:`EmbeddingNet`; values are checked when made (:class:`InputError`)."""

    input_size: int = 128
    widths: tuple = (16, 32, 64, 128)
    blocks_per_stage: int = 1
    embedding_dim: int = 64
    hidden: int = 256
    dropout: float = 0.2
    vote_plates: int = 0
    vote_cells: int = 8
    vote_hidden: int = 96
    vote_context: str = "stages"

    def __post_init__(self) -> None:
        self.input_size = check_int("input_size", self.input_size, 16, 2048)
        self.widths = tuple(check_int_list("widths", self.widths, None, 1, 1024))
        if not 1 <= len(self.widths) <= 6:
            raise InputError(f"Option widths needs 1 to 6 stage widths, got {len(self.widths)}.")
        self.blocks_per_stage = check_int("blocks_per_stage", self.blocks_per_stage, 1, 8)
        self.embedding_dim = check_int("embedding_dim", self.embedding_dim, 2, 1024)
        self.hidden = check_int("hidden", self.hidden, 1, 4096)
        self.dropout = check_float("dropout", self.dropout, 0.0, 0.95)
        self.vote_plates = check_int("vote_plates", self.vote_plates, 0, 100000)
        self.vote_cells = check_int("vote_cells", self.vote_cells, 1, 64)
        self.vote_hidden = check_int("vote_hidden", self.vote_hidden, 1, 4096)
        self.vote_context = check_choice("vote_context", self.vote_context, VOTE_CONTEXTS)

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


class _CellHead(nn.Module):
    """Per-cell plate logits from stage features brought to a ``cells`` x ``cells`` grid (area mean
    or bilinear), then two 1x1 convolutions. ``stages``: indices of the stages used; ``context``:
    the global mean of the last stage joins every cell (its view is then the whole input)."""

    def __init__(
        self,
        widths: Sequence[int],
        stages: Sequence[int],
        cells: int,
        hidden: int,
        plates: int,
        context: bool,
    ) -> None:
        super().__init__()
        self.cells = cells
        self.stages = list(stages)
        self.context = context
        c_in = sum(widths[i] for i in self.stages) + (widths[-1] if context else 0)
        self.mix = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1), _norm(hidden), nn.ReLU(), nn.Conv2d(hidden, plates, 1)
        )

    def forward(self, stages: Sequence[torch.Tensor]) -> torch.Tensor:
        n = self.cells
        maps = []
        for i in self.stages:
            f = stages[i]
            if f.shape[-1] >= n:
                maps.append(F.adaptive_avg_pool2d(f, n))
            else:
                maps.append(F.interpolate(f, size=(n, n), mode="bilinear", align_corners=False))
        if self.context:
            maps.append(stages[-1].mean(dim=(2, 3), keepdim=True).expand(-1, -1, n, n))
        return self.mix(torch.cat(maps, dim=1))


def _stage_sizes(config: EmbeddingConfig) -> list[int]:
    """Side of each stage's feature map for a ``config.input_size`` input (stem and stages stride 2)."""
    side = -(-config.input_size // 2)
    out = []
    for _ in config.widths:
        side = -(-side // 2)
        out.append(side)
    return out


class EmbeddingNet(nn.Module):
    """(B, 1, S, S) images -> (B, embedding_dim) L2-normalised embeddings.

    With ``config.vote_plates > 0`` a second head (:meth:`forward_all`) gives, on a
    ``vote_cells`` x ``vote_cells`` grid of cells over the input, logits over the plates of where
    each cell lies along the plate axis (see :mod:`.vote`).
    """

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
        self._stage_ends = [(s + 1) * config.blocks_per_stage - 1 for s in range(len(config.widths))]
        self.head = nn.Sequential(
            nn.Linear(c_in, config.hidden),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, config.embedding_dim),
        )
        self.cell_head = None  # made last: the other layers draw the same initial weights as without it
        if config.vote_plates > 0:
            sizes = _stage_sizes(config)
            # local: the stages at least as fine as the cells (each cell sees its neighbourhood only)
            used = [i for i, side in enumerate(sizes) if side >= config.vote_cells] or [0]
            if config.vote_context != "local":
                used = list(range(len(sizes)))
            self.cell_head = _CellHead(
                config.widths,
                used,
                config.vote_cells,
                config.vote_hidden,
                config.vote_plates,
                config.vote_context == "global",
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x, cells=False)[0]

    def forward_all(self, x: torch.Tensor, cells: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(embeddings (B, D), cell logits (B, vote_plates, cells, cells) or None)`` in one pass
        (``None`` without a cell head or with ``cells=False``)."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise InputError(f"EmbeddingNet takes images of shape (B, 1, S, S), got {tuple(x.shape)}.")
        y = self.stem(x)
        stages = []
        for i, block in enumerate(self.blocks):
            y = block(y)
            if i in self._stage_ends:
                stages.append(y)
        emb = F.normalize(self.head(y.mean(dim=(2, 3))), dim=1)
        logits = self.cell_head(stages) if cells and self.cell_head is not None else None
        return emb, logits


def embed_batch(net: EmbeddingNet, x: torch.Tensor, mirror: bool = False) -> torch.Tensor:
    """``net(x)``, or with ``mirror`` the normalised mean of the embeddings of ``x`` and of its
    left-right mirror (brains are nearly symmetric: a hemisphere cut away on either side, or an
    asymmetric cut, then gives one embedding)."""
    if not mirror:
        return net(x)
    both = net(torch.cat([x, x.flip(-1)]))
    return F.normalize(both[: len(x)] + both[len(x) :], dim=1)


def embed_with_cells(
    net: EmbeddingNet, x: torch.Tensor, mirror: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeddings (B, D), cell log-probabilities (B, cells * cells, vote_plates))`` of a batch in
    one pass (the net must have a cell head). With ``mirror`` the embedding is :func:`embed_batch`'s
    and each cell's log-probabilities are the mean of its own and its mirror image's (the mirrored
    pass's cells flipped back)."""
    if net.cell_head is None:
        raise InputError("This network has no cell head (trained with vote=0): rank by the embedding.")
    b = len(x)
    emb, logits = net.forward_all(torch.cat([x, x.flip(-1)]) if mirror else x)
    logp = F.log_softmax(logits, dim=1)
    if mirror:
        emb = F.normalize(emb[:b] + emb[b:], dim=1)
        logp = 0.5 * (logp[:b] + logp[b:].flip(-1))
    return emb, logp.flatten(2).transpose(1, 2)


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


def embed_cells(
    net: EmbeddingNet, images: Sequence | np.ndarray, device: str | torch.device = "cpu", mirror: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(embeddings (N, D), cell log-probabilities (N, cells * cells, P), cell tissue shares
    (N, cells, cells))`` of raw sections in one pass per batch of 64 (see :func:`embed_with_cells`)."""
    images = image_list(images)
    dev = choose_device(device)
    size, cells = net.config.input_size, net.config.vote_cells
    was_training = net.training
    old = next(net.parameters()).device
    net.eval().to(dev)
    embs, logps, covers = [], [], []
    try:
        with torch.no_grad():
            for start in range(0, len(images), 64):
                prepared = [
                    prepare_input_geometry(im, size, name=f"image {start + i}")
                    for i, im in enumerate(images[start : start + 64])
                ]
                x = torch.from_numpy(np.stack([p[0] for p in prepared])[:, None]).to(dev)
                emb, logp = embed_with_cells(net, x, mirror)
                embs.append(emb.float().cpu().numpy())
                logps.append(logp.float().cpu().numpy())
                covers.extend(cell_cover(p[1].mask, cells) for p in prepared)
    finally:
        net.to(old).train(was_training)
    return np.concatenate(embs), np.concatenate(logps), np.stack(covers)
