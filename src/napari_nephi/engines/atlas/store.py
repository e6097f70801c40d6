"""The saved atlas index: one folder, written atomically, read back with ``weights_only=True``.

``config.json``: format, version, training options, network and synthesis configs, atlas
fingerprint, plate shapes, region names, training summary. ``weights.pt``: the network's
state_dict. ``embeddings.npy``: ``(n_plates, D)`` plate embeddings. ``plates.npz``: the plates
(float16, downsampled to at most :data:`MAX_STORED_SIDE` pixels) and their labels, so lookups and
registration work after loading without the original atlas.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import torch

from ...core.errors import InputError, UnsupportedFileError
from ...core.files import output_folder
from .network import EmbeddingConfig, EmbeddingNet
from .plates import Plates

FORMAT = "napari-nephi-atlas-index"
#: Version of the folder layout; an index of another version must be trained again.
VERSION = 1
#: Longest side of the plates stored in the index (larger plates are downsampled).
MAX_STORED_SIDE = 640
NAMES = ("config.json", "weights.pt", "embeddings.npy", "plates.npz")


def _stored(image: np.ndarray, labels: np.ndarray | None):
    """``image`` (and ``labels``) downsampled so the longer side is at most :data:`MAX_STORED_SIDE`."""
    h, w = image.shape
    if max(h, w) <= MAX_STORED_SIDE:
        return image, labels
    scale = MAX_STORED_SIDE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(np.ascontiguousarray(image, np.float32), size, interpolation=cv2.INTER_AREA)
    if labels is not None:
        ys = np.minimum(((np.arange(size[1]) + 0.5) / scale).astype(np.int64), h - 1)
        xs = np.minimum(((np.arange(size[0]) + 0.5) / scale).astype(np.int64), w - 1)
        labels = labels[np.ix_(ys, xs)]
    return small, labels


def save_index(lk, path) -> Path:
    """Write ``lk`` (an :class:`~.lookup.AtlasLookup`) to the folder ``path`` atomically."""
    plates: Plates = lk.plates
    settings = lk.settings
    arrays: dict[str, np.ndarray] = {}
    stored_shapes = []
    for i in range(plates.n):
        img, lab = _stored(plates.plate(i), plates.labels(i))
        arrays[f"plate_{i}"] = img.astype(np.float16)
        if lab is not None:
            arrays[f"labels_{i}"] = lab
        stored_shapes.append(list(img.shape))
    config = {
        "format": FORMAT,
        "version": VERSION,
        "volume": plates.volume is not None,
        "n_plates": plates.n,
        "stored_shapes": stored_shapes,
        "region_names": {str(k): v for k, v in lk.region_names.items()},
        "settings": {k: v for k, v in settings.items() if k != "history"},
    }
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in lk.net.state_dict().items()}, buf)
    path = Path(path)
    with output_folder(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        (tmp / "weights.pt").write_bytes(buf.getvalue())
        np.save(tmp / "embeddings.npy", lk.embeddings)
        np.savez_compressed(tmp / "plates.npz", **arrays)
    return path


def read_config(path) -> dict:
    """``config.json`` of an index folder, checked for format and version."""
    path = Path(path)
    if not path.is_dir():
        raise UnsupportedFileError(f"{path} is not an atlas index folder (write one with AtlasLookup.save).")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UnsupportedFileError(
            f"{path} holds no readable config.json: not an atlas index, or a damaged one; train it again."
        ) from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise InputError(f"{path} is not an atlas index (config.json has another format).")
    if config.get("version") != VERSION:
        raise InputError(
            f"The atlas index {path} has version {config.get('version')!r}; this napari-nephi reads "
            f"version {VERSION}. Train the index again (AtlasLookup.train or napari-nephi atlas-train)."
        )
    return config


def load_index(cls, path, reference=None, annotation=None, *, plate_axis: int = 0, device: str = "auto"):
    """An :class:`~.lookup.AtlasLookup` read from the folder ``path``; see ``AtlasLookup.load``."""
    path = Path(path)
    config = read_config(path)
    settings = dict(config.get("settings", {}))
    try:
        net = EmbeddingNet(EmbeddingConfig.from_dict(settings["network"]))
        state = torch.load(path / "weights.pt", map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        emb = np.load(path / "embeddings.npy", allow_pickle=False)
        n = int(config["n_plates"])
        if reference is None:
            plates = _stored_plates(path / "plates.npz", n, bool(config.get("volume")))
        else:
            plates = Plates.from_reference(reference, annotation, plate_axis=plate_axis)
    except (OSError, KeyError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        if isinstance(exc, InputError):
            raise
        raise UnsupportedFileError(
            f"The atlas index {path} is incomplete or damaged ({type(exc).__name__}: {exc}); train it again."
        ) from exc
    if reference is not None and plates.fingerprint() != settings.get("fingerprint"):
        raise InputError(
            f"The atlas index {path} was trained on another atlas ({n} plates of shapes "
            f"{_shapes_text(settings.get('plate_shapes'))}) than the reference given ({plates.n} plates of "
            f"shapes {_shapes_text(plates.shapes)}). Train an index for this atlas."
        )
    if emb.shape != (plates.n, net.config.embedding_dim):
        raise UnsupportedFileError(
            f"The atlas index {path} holds embeddings of shape {emb.shape} for {plates.n} plates of "
            f"{net.config.embedding_dim} dimensions; it is damaged: train it again."
        )
    names = {int(k): v for k, v in config.get("region_names", {}).items()}
    return cls(net, plates, emb, settings, names, device=device)


def _stored_plates(file: Path, n: int, volume: bool) -> Plates:
    with np.load(file, allow_pickle=False) as data:
        imgs = [np.clip(data[f"plate_{i}"].astype(np.float32), 0.0, 1.0) for i in range(n)]
        labs = [data[f"labels_{i}"] for i in range(n)] if "labels_0" in data.files else None
    same = len({im.shape for im in imgs}) == 1
    if volume and same:
        return Plates(np.stack(imgs), None if labs is None else np.stack(labs))
    return Plates(imgs, labs)


def _shapes_text(shapes) -> str:
    if not shapes:
        return "unknown"
    uniq = sorted({tuple(s) for s in shapes})
    return ", ".join("x".join(str(v) for v in s) for s in uniq[:3]) + (" ..." if len(uniq) > 3 else "")
