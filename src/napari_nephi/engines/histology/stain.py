"""Stain-robust preprocessing of brightfield slides: tissue masks and one comparable channel.

Brightfield RGB is turned into optical density (OD, ``-log`` of the transmitted light), where stains
add up; colour deconvolution (Ruifrok and Johnston, :func:`skimage.color.rgb2hed`) separates the
haematoxylin that stains nuclei on H&E, IHC (H-DAB) and most special stains alike, so two slides
with different stains still show the same nuclei in that channel.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ...core.errors import InputError

__all__ = ["KINDS", "choose_stain_channels", "is_brightfield", "stain_channel", "tissue_mask"]

#: Channel kinds of :func:`stain_channel` ("auto" picks one of them).
KINDS = ("hematoxylin", "od", "grey")
#: OD (summed over R, G, B) above the brightest pixels' level that still counts as tissue.
_TISSUE_OD_ABOVE_BACKGROUND = 0.2
#: Pen ink: saturation above this, in the blue/green hue range (0.2-0.75 of the colour circle) ...
_INK_SATURATION = 0.6
#: ... or red ink: even more saturated, hue within 0.03 of pure red.
_RED_INK_SATURATION = 0.8
#: Black ink or dirt: HSV value below this.
_BLACK = 0.12
#: Haematoxylin (rgb2hed units) that the tissue's 90th percentile must reach to count as stained.
_MIN_HEMATOXYLIN = 0.02


def _check_values(image, name: str = "image") -> tuple[np.ndarray, bool, float]:
    """``image`` as an array view (RGBA -> RGB), whether it is RGB, and its white level ``top``.

    Checks shape and values without copying the image (NaN and infinities show in its min and max).
    """
    arr = np.asarray(image)
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise InputError(f"The {name} must be a numeric array, got dtype {arr.dtype}.")
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]  # RGBA: the alpha channel carries no stain
    rgb = arr.ndim == 3 and arr.shape[-1] == 3
    if arr.ndim == 3 and not rgb:
        raise InputError(
            f"The {name} has shape {arr.shape}: a multi-channel (fluorescence) image, not a grey "
            "(y, x) or RGB (y, x, 3) slide. Pick the channel to register, e.g. the nuclear stain "
            f"(DAPI): channel=0 or {name}[..., 0] (channels last) / {name}[0] (channels first)."
        )
    if arr.ndim != 2 and not rgb:
        raise InputError(
            f"The {name} must be a 2D slide, grey (y, x) or RGB (y, x, 3); got shape {arr.shape}."
        )
    if min(arr.shape[:2]) < 8:
        raise InputError(f"The {name} is too small ({arr.shape}); a slide needs at least 8 x 8 pixels.")
    if arr.dtype.kind == "b":
        return arr, rgb, 1.0
    hi = float(arr.max())
    if arr.dtype.kind == "f" and not (np.isfinite(hi) and np.isfinite(float(arr.min()))):
        raise InputError(f"The {name} contains NaN or infinite values; replace them (e.g. by background).")
    if arr.dtype.kind in "iu":
        top = 255.0 if arr.dtype.itemsize == 1 or hi <= 255 else float(np.iinfo(arr.dtype).max)
    else:
        top = 1.0 if hi <= 1.001 else (255.0 if hi <= 255.0 else hi)
    return arr, rgb, top


def white_level(image) -> float:
    """The value of white (an empty brightfield field) in ``image``'s own units: 1 for floats in
    [0, 1], 255 for 8-bit data, the dtype's maximum for wider integers holding more than 8 bits."""
    return _check_values(image)[2]


def _to_unit(arr: np.ndarray, top: float) -> np.ndarray:
    """``arr / top`` clipped to [0, 1]: one new float64 array, scaled and clipped in place."""
    out = np.array(arr, dtype=np.float64)
    out /= top
    return np.clip(out, 0.0, 1.0, out=out)


def _check_image(image, name: str = "image") -> tuple[np.ndarray, bool]:
    """``image`` as float64 in [0, 1] (grey ``(y, x)`` or RGB ``(y, x, 3)``) and whether it is RGB."""
    arr, rgb, top = _check_values(image, name)
    return _to_unit(arr, top), rgb


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    """OD summed over the three channels (0 for white)."""
    return -np.log(np.clip(rgb, 1.0 / 255.0, 1.0)).sum(axis=-1)


def _border(a: np.ndarray) -> np.ndarray:
    w = max(1, min(a.shape[:2]) // 32)
    return np.concatenate([a[:w].ravel(), a[-w:].ravel(), a[:, :w].ravel(), a[:, -w:].ravel()])


def _bright_background(grey: np.ndarray) -> bool:
    """Whether a grey image (in [0, 1]) is brightfield: its border is nearer its bright end than
    its dark end, or bright in absolute terms (tissue up to the border of a brightfield slide)."""
    lo, hi = np.percentile(grey, [5, 95])
    border = float(np.median(_border(grey)))
    return border >= (lo + hi) / 2 or border > 0.5


def is_brightfield(image) -> bool:
    """True for a brightfield slide (tissue darker than its background), False for dark background.

    RGB images count as brightfield unless most of the image is dark (a fluorescence composite);
    grey images are judged by their border, which shows background on most slides.
    """
    arr, rgb = _check_image(image)
    grey = arr.mean(axis=-1) if rgb else arr
    if rgb:
        return bool(np.median(grey) > 0.25)
    return _bright_background(grey)


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    if values.size == 0 or float(values.max() - values.min()) <= 1e-12:
        return float("inf")
    return float(threshold_otsu(values, nbins=256))


def _ink(rgb: np.ndarray) -> np.ndarray:
    """Pen marks: saturated blue/green/red ink and black ink, slightly dilated over their rims."""
    from skimage.color import rgb2hsv

    hsv = rgb2hsv(rgb)
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    coloured = val > 0.1
    blue_green = coloured & (sat > _INK_SATURATION) & (hue > 0.2) & (hue < 0.75)
    red = coloured & (sat > _RED_INK_SATURATION) & ((hue < 0.03) | (hue > 0.97))
    ink = blue_green | red | (val < _BLACK)
    return ndimage.binary_dilation(ink, iterations=2) if ink.any() else ink


def _remove_small(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]


def tissue_mask(image, *, min_area_fraction: float = 1e-3) -> np.ndarray:
    """Boolean tissue mask of a brightfield RGB or grey slide.

    RGB: tissue is where the optical density exceeds an Otsu threshold (capped a little above the
    background's level, so pale stroma stays tissue); pen marks (saturated blue, green or red ink,
    black ink) are excluded; components smaller than ``min_area_fraction`` of the image (debris,
    dust) are dropped and holes filled. Grey images: the polarity comes from the border (bright
    border: tissue is dark), then the same threshold and clean-up. May be empty.
    """
    from ...core.options import check_float

    frac = check_float("min_area_fraction", min_area_fraction, 0.0, 0.5)
    arr, rgb = _check_image(image)
    if rgb:
        signal = _optical_density(arr)
        ink = _ink(arr)
        bright = True
    else:
        bright = _bright_background(arr)
        # brightfield grey: the OD of the grey level, three channels' worth (as the RGB sum)
        signal = 3.0 * _optical_density(arr[..., None]) if bright else arr
        ink = np.zeros(arr.shape, dtype=bool)
    lo, hi = np.percentile(signal, [2, 99.9])
    if hi - lo <= 1e-6:
        return np.zeros(signal.shape, dtype=bool)
    cap = lo + (_TISSUE_OD_ABOVE_BACKGROUND if bright else 0.2 * (hi - lo))
    threshold = min(_otsu(signal[~ink] if (~ink).any() else signal), cap)
    mask = (signal > threshold) & ~ink
    mask = ndimage.binary_opening(mask, iterations=1)
    min_pixels = max(frac * mask.size, 4.0)
    mask = _remove_small(mask, min_pixels)
    mask = ndimage.binary_fill_holes(mask) & ~ink
    return _remove_small(mask, min_pixels)


def _normalise(signal: np.ndarray) -> np.ndarray:
    """Map the 1st and 99.5th percentiles to 0 and 1 (clipped), float32."""
    lo, hi = np.percentile(signal, [1, 99.5])
    if hi - lo <= 1e-9:
        return np.zeros(signal.shape, dtype=np.float32)
    return np.clip((signal - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _hematoxylin(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2hed

    return rgb2hed(rgb)[..., 0]


def _has_hematoxylin(image) -> bool:
    arr, _, top = _check_values(image)
    step = max(1, max(arr.shape[:2]) // 256)  # a statistic: a thumbnail is enough
    rgb = _to_unit(arr[::step, ::step], top)
    mask = tissue_mask(rgb)
    if not mask.any():
        return False
    return float(np.percentile(_hematoxylin(rgb)[mask], 90)) > _MIN_HEMATOXYLIN


def stain_channel(image, kind: str = "auto", brightfield: bool | None = None) -> tuple[np.ndarray, str]:
    """One float32 channel in [0, 1], tissue signal high and background near 0, and its kind.

    ``kind``: ``"hematoxylin"`` (colour deconvolution), ``"od"`` (optical density), ``"grey"``
    (inverted grey for brightfield, grey as is for dark background) or ``"auto"`` (haematoxylin
    when the brightfield tissue holds it, else OD; grey input always gives ``"grey"``).
    ``brightfield``: the slide's polarity when known (:func:`is_brightfield` of the whole slide);
    ``None`` judges it from ``image`` itself, which a tile inside the tissue may get wrong.
    """
    from ...core.options import check_choice

    kind = check_choice("kind", kind, ("auto", *KINDS))
    arr, rgb = _check_image(image)
    if not rgb:
        bright = _bright_background(arr) if brightfield is None else bool(brightfield)
        return _normalise(1.0 - arr if bright else arr), "grey"
    if brightfield is None:
        brightfield = bool(np.median(arr.mean(axis=-1)) > 0.25)
    if kind == "auto":
        kind = "hematoxylin" if brightfield and _has_hematoxylin(arr) else ("od" if brightfield else "grey")
    if kind == "hematoxylin":
        return _normalise(_hematoxylin(arr)), kind
    if kind == "od":
        return _normalise(_optical_density(arr)), kind
    grey = arr.mean(axis=-1)
    return _normalise(1.0 - grey if brightfield else grey), kind


def _describe(image, name: str) -> tuple[bool, bool]:
    """(is RGB, is brightfield) of a slide, refusing multi-channel images with advice."""
    arr, rgb = _check_image(image, name)
    grey = arr.mean(axis=-1) if rgb else arr
    return rgb, (bool(np.median(grey) > 0.25) if rgb else _bright_background(grey))


def choose_stain_channels(fixed, moving, kind: str = "auto") -> tuple[np.ndarray, np.ndarray, str]:
    """The stain channels of both slides, of one kind, and that kind.

    ``"auto"``: haematoxylin when both are brightfield RGB with haematoxylin in the tissue, else OD
    when both are brightfield RGB, else grey. A multi-channel (fluorescence) slide, or a dark-
    background grey slide against a brightfield RGB one, raises :class:`InputError` naming the
    channel to pick. An explicit ``kind`` applies to the RGB slides; a grey slide gives its grey.
    """
    from ...core.options import check_choice

    kind = check_choice("kind", kind, ("auto", *KINDS))
    f_rgb, f_bright = _describe(fixed, "fixed")
    m_rgb, m_bright = _describe(moving, "moving")
    if kind == "auto":
        for name, rgb, bright, other_rgb in (
            ("fixed", f_rgb, f_bright, m_rgb),
            ("moving", m_rgb, m_bright, f_rgb),
        ):
            if not rgb and not bright and other_rgb:
                raise InputError(
                    f"The {name} slide is a dark-background (fluorescence) image and the other a "
                    "brightfield RGB slide: their intensities do not correspond. Compare its nuclear "
                    "channel (DAPI) with the brightfield slide's haematoxylin: channel='hematoxylin' "
                    "(channel=N, the nuclear channel's index, for a multi-channel slide; "
                    "kind='hematoxylin' for choose_stain_channels)."
                )
        if f_rgb and m_rgb and f_bright and m_bright:
            both = _has_hematoxylin(fixed) and _has_hematoxylin(moving)
            kind = "hematoxylin" if both else "od"
        else:
            kind = "grey"
    f, _ = stain_channel(fixed, kind)
    m, _ = stain_channel(moving, kind)
    return f, m, kind
