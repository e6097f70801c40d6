"""The engine's inputs: slides with their pixel sizes, the stain channel of each, masks and landmarks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...core.errors import InputError, UnsupportedFileError
from ...core.grid import check_spacing
from ...io.slides import Slide, as_slide
from .networks import load_model, shipped_model
from .stain import KINDS, choose_stain_channels, is_brightfield, stain_channel


def _pick_channel(data, channel: int, name: str):
    """Channel ``channel`` (samples last) of every level of a multi-channel slide, lazily."""
    levels = list(data) if isinstance(data, list | tuple) else [data]
    n = levels[0].shape[-1]
    if channel >= n:
        raise InputError(f"channel={channel} but the {name} slide has {n} channels (0..{n - 1}).")
    picked = [level[..., channel] for level in levels]
    return picked if isinstance(data, list | tuple) else picked[0]


def _is_multichannel(data, rgb: bool | None) -> bool:
    first = (
        data.levels[0] if isinstance(data, Slide) else (data[0] if isinstance(data, list | tuple) else data)
    )
    shape = tuple(getattr(first, "shape", ()))
    if len(shape) != 3:
        return False
    return rgb is False or shape[2] not in (3, 4)


def slide_of(data, spacing, rgb: bool | None, channel, name: str) -> Slide:
    """A :class:`Slide` of the caller's ``data`` (array, dask array, list of levels or a Slide)."""
    if isinstance(data, Slide):
        if spacing is None:
            spacing = data.spacing
        data, rgb = data.levels, data.rgb if rgb is None else rgb
    if data is None:
        raise InputError(f"The {name} slide is missing; give an array, a list of levels or a Slide.")
    if isinstance(data, list | tuple) and not data:
        raise InputError(f"The {name} slide is an empty list; give at least one level.")
    if _is_multichannel(data, rgb):
        if isinstance(channel, str):
            n = (data[0] if isinstance(data, list | tuple) else data).shape[-1]
            raise InputError(
                f"The {name} slide has {n} channels (fluorescence?), not a brightfield RGB image. Pick the "
                "channel to register, e.g. the nuclear stain (DAPI): channel=0."
            )
        data, rgb = _pick_channel(data, channel, name), False
    return as_slide(data, spacing, rgb=rgb, name=name)


def pixel_sizes(fixed_spacing, moving_spacing, notes: list[str]) -> tuple[float, float]:
    """Mean level-0 um/px of both slides; both unknown -> 1 (a note), one unknown -> InputError."""
    if fixed_spacing is None and moving_spacing is None:
        notes.append(
            "The pixel sizes of both slides are unknown: assumed equal (1 um/px); give spacing= and "
            "moving_spacing= (um/px) if they differ."
        )
        return 1.0, 1.0
    if fixed_spacing is None or moving_spacing is None:
        which = "fixed (spacing=...)" if fixed_spacing is None else "moving (moving_spacing=...)"
        raise InputError(
            f"The pixel size of the {which} slide is unknown but the other's is given; give it in um/px "
            "(e.g. 0.25 at 40x, 0.5 at 20x)."
        )
    f = check_spacing(fixed_spacing, 2)
    m = check_spacing(moving_spacing, 2)
    return float(np.mean(f)), float(np.mean(m))


#: The two slides, in the order of :attr:`Channel.brightfield`.
SLIDES = ("fixed", "moving")


@dataclass(frozen=True)
class Channel:
    """How the stain channel is made: a named kind (hematoxylin, od, grey) or "auto", and each
    slide's polarity (brightfield or dark background) once :meth:`settle` has judged it."""

    kind: str
    brightfield: tuple[bool | None, bool | None] = (None, None)

    def pair(self, fixed: np.ndarray, moving: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
        """The channels of two images and the kind used (which fixes ``kind`` when it was auto)."""
        return choose_stain_channels(fixed, moving, self.kind)

    def settle(self, fixed: np.ndarray, moving: np.ndarray) -> tuple[np.ndarray, np.ndarray, Channel]:
        """:meth:`pair` of the two whole slides (a low level), and the Channel with the kind and both
        polarities fixed, for :meth:`one` of any part of them later (tiles, crops)."""
        fc, mc, kind = self.pair(fixed, moving)
        return fc, mc, Channel(kind, (is_brightfield(fixed), is_brightfield(moving)))

    def one(self, image: np.ndarray, slide: str | None = None) -> np.ndarray:
        """The channel of ``image``, a part of the ``slide`` ("fixed" or "moving") or (None) a whole one.

        With ``slide`` the polarity judged by :meth:`settle` is used: a tile inside the tissue of a
        grey slide, or one filled white beyond a dark-background slide, would be judged wrongly.
        """
        bright = None if slide is None else self.brightfield[SLIDES.index(slide)]
        if image.ndim == 2:
            return stain_channel(image, "grey", bright)[0]
        return stain_channel(image, self.kind if self.kind in KINDS else "auto", bright)[0]


def check_image_values(image: np.ndarray, name: str) -> None:
    """NaN or infinite values -> InputError."""
    if image.dtype.kind == "f" and not np.all(np.isfinite(image)):
        raise InputError(
            f"The {name} slide holds NaN or infinite values; replace them (e.g. by the background value)."
        )


def check_landmarks(landmarks) -> tuple[np.ndarray, np.ndarray] | None:
    """``(fixed_pts, moving_pts)`` as two ``(N, 2)`` float arrays in level-0 pixels (y, x)."""
    if landmarks is None:
        return None
    if isinstance(landmarks, str | bytes) or len(landmarks) != 2:
        raise InputError("landmarks must be a pair (fixed_points, moving_points) of (N, 2) arrays (y, x).")
    pts = []
    for what, p in zip(("fixed", "moving"), landmarks, strict=True):
        a = np.asarray(p, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != 2 or len(a) == 0:
            raise InputError(f"The {what} landmarks must be an (N, 2) array of (y, x) pixels, got {a.shape}.")
        if not np.all(np.isfinite(a)):
            raise InputError(f"The {what} landmarks hold NaN or infinite values.")
        pts.append(a)
    if len(pts[0]) != len(pts[1]):
        raise InputError(f"{len(pts[0])} fixed but {len(pts[1])} moving landmarks; give them in pairs.")
    return pts[0], pts[1]


def load_networks(weights, device, notes: list[str]) -> dict:
    """``{"affine": net or None, "nonrigid": net or None}`` from ``weights`` (default: shipped).

    Shipped weights that do not load (made by another version) are skipped with a note; the
    user's own files raise.
    """
    if weights is None:
        nets = {}
        for kind in ("affine", "nonrigid"):
            try:
                nets[kind] = shipped_model(kind, device)
            except UnsupportedFileError as exc:
                nets[kind] = None
                notes.append(f"The shipped {kind} network could not be loaded ({str(exc)[:120]}).")
        return nets
    paths = [weights] if isinstance(weights, str | Path) else list(weights)
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.pt"))
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"weights: {p} is neither a model file nor a folder of them.")
    nets: dict = {"affine": None, "nonrigid": None}
    for f in files:
        net = load_model(f, device)
        nets[net.config.kind] = net
    if not any(nets.values()):
        raise InputError(f"weights: no histology network found in {[str(p) for p in paths]}.")
    return nets


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output index, as OpenCV's ``INTER_NEAREST`` picks it (``floor(i / scale)``)."""
    inverse = 1.0 / (n_out / n_in)
    return np.minimum(np.floor(np.arange(n_out) * inverse).astype(np.int64), n_in - 1)


def resize_mask(mask, shape) -> np.ndarray:
    """A mask (any size, lazy or not) resized to ``shape`` by nearest neighbour, as bool.

    Only the picked pixels are kept: a lazy (dask) mask is read chunk by chunk and a level-0 mask
    is never copied whole; the result equals OpenCV's ``INTER_NEAREST`` resize.
    """
    dims = getattr(mask, "shape", None)
    if dims is None:
        mask = np.asarray(mask)
        dims = mask.shape
    if len(dims) != 2:
        raise InputError(f"A tissue mask must be 2D (y, x), got shape {tuple(dims)}.")
    rows = _nearest_indices(int(dims[0]), int(shape[0]))
    cols = _nearest_indices(int(dims[1]), int(shape[1]))
    if hasattr(mask, "compute"):
        picked = np.asarray(mask[rows][:, cols].compute())
    else:
        picked = np.asarray(mask[:] if not isinstance(mask, np.ndarray) else mask)[np.ix_(rows, cols)]
    return picked.astype(np.uint8) > 0
