"""A trainable NePhi model: encoder + neural deformation field, saved with its configuration.

``NePhiModel.codes(fixed, moving)`` predicts the latent codes of a pair in one forward pass; the
field then maps points. Checkpoints are plain dicts of tensors and JSON-able values, loaded with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ...core.errors import InputError, UnsupportedFileError
from ...core.files import atomic_write_bytes
from .encoder import Encoder
from .field import Codes, FieldConfig, NeuralDeformationField

FORMAT = "napari-nephi-model"
VERSION = 1


class NePhiModel(nn.Module):
    def __init__(
        self,
        cfg: FieldConfig,
        channels: Sequence[int] = (16, 32, 64, 64),
        local_level: int = 3,
        input_shape: Sequence[int] | None = None,
        antialias: bool = False,
        features: str = "pair",
    ):
        super().__init__()
        self.cfg = cfg
        self.channels = tuple(int(c) for c in channels)
        self.local_level = int(local_level)
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        #: Low-pass filter 2D inputs that are shrunk to ``input_shape`` (models saved before: False).
        self.antialias = bool(antialias)
        with torch.random.fork_rng(devices=[]):  # seeded, global random state untouched
            torch.manual_seed(cfg.seed)
            self.encoder = Encoder(
                cfg.ndim, cfg.global_dim, cfg.local_dim, self.channels, self.local_level, features=features
            )
        self.field = NeuralDeformationField(cfg)

    def codes(self, fixed: torch.Tensor, moving: torch.Tensor) -> Codes:
        """Latent codes of pairs ``(B, 1, *spatial)`` (resized to ``input_shape`` when one is set)."""
        if self.input_shape is not None and tuple(fixed.shape[2:]) != self.input_shape:
            mode = "bilinear" if self.cfg.ndim == 2 else "trilinear"
            kw = {"antialias": True} if self.antialias and self.cfg.ndim == 2 else {}
            fixed = nn.functional.interpolate(
                fixed, size=self.input_shape, mode=mode, align_corners=True, **kw
            )
            moving = nn.functional.interpolate(
                moving, size=self.input_shape, mode=mode, align_corners=True, **kw
            )
        glob, loc = self.encoder(fixed, moving)
        return Codes(glob, loc if self.cfg.local_dim > 0 else None)

    def copy(self) -> NePhiModel:
        """An independent copy (refinement works on a copy, never on the stored model)."""
        return copy.deepcopy(self)

    def config(self) -> dict:
        return {
            "field": self.cfg.to_dict(),
            "channels": list(self.channels),
            "local_level": self.local_level,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "antialias": self.antialias,
            "features": self.encoder.features,
        }

    def save(self, path, extra: dict | None = None) -> Path:
        """Write config + weights (+ JSON-able/tensor ``extra``) atomically to ``path``."""
        path = Path(path)
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        buf = io.BytesIO()
        torch.save(
            {
                "format": FORMAT,
                "version": VERSION,
                "config": self.config(),
                "state_dict": state,
                "extra": extra or {},
            },
            buf,
        )
        atomic_write_bytes(path, buf.getvalue())
        return path

    @classmethod
    def from_config(cls, config: dict) -> NePhiModel:
        return cls(
            FieldConfig.from_dict(config["field"]),
            config.get("channels", (16, 32, 64, 64)),
            config.get("local_level", 3),
            config.get("input_shape"),
            config.get("antialias", False),
            config.get("features", "pair"),
        )

    @classmethod
    def load(cls, path, device="cpu") -> NePhiModel:
        try:
            ckpt = torch.load(Path(path), map_location=device, weights_only=True)
        except FileNotFoundError as exc:
            raise UnsupportedFileError(f"No NePhi model at {path}.") from exc
        except Exception as exc:  # pickle or zip errors of a corrupt or foreign file
            raise UnsupportedFileError(f"{path} is not a readable NePhi model: {exc}") from exc
        if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
            raise UnsupportedFileError(f"{path} is not a NePhi model file.")
        model = cls.from_config(ckpt["config"])
        model.load_state_dict(ckpt["state_dict"])
        return model.to(device).eval()


def as_model(weights, device) -> NePhiModel:
    """A model from a :class:`NePhiModel`, a checkpoint path or a built-in name (``BUILTIN``)."""
    from .weights import BUILTIN, SCRIPTS, builtin_path

    if isinstance(weights, NePhiModel):
        return weights
    if weights is None:
        raise InputError(
            "mode='predict' needs a trained model: pass weights=<checkpoint path, NePhiModel or a built-in "
            f"name: {', '.join(repr(n) for n in BUILTIN)}>."
        )
    builtin = builtin_path(weights) if isinstance(weights, str) else None
    if builtin is not None and not builtin.is_file():
        raise UnsupportedFileError(
            f"The built-in model {weights!r} is missing from this installation ({builtin}); "
            f"make it with {SCRIPTS.get(str(weights).lower(), 'its training script')} or pass a model file."
        )
    return NePhiModel.load(builtin or weights, device)
