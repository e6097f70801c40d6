"""Registration pairs with known ground truth from images that dependencies bundle.

Nothing is downloaded: scikit-image ships ``immunohistochemistry()`` and nibabel ships
``tests/data/anatomical.nii``.

Ground-truth convention (the package's pull-back convention, DESIGN.md): each pair returns a
displacement ``u`` ``(D, *shape)`` in voxels of the fixed grid such that the *moving* image
sampled at ``x + u(x)`` shows the content of the *fixed* image at ``x``::

    DisplacementTransform(u).warp(moving)  ~=  fixed              (mri_pair)
    DisplacementTransform(u).warp(moving)  ~=  stain image aligned with fixed   (ihc_pair)

so ``u`` is exactly what ``register(fixed, moving).transform.displacement(fixed.shape)`` should
return. The moving image was made by warping the aligned image with the inverse field (see
:func:`~napari_nephi.synthetic.deformation.random_smooth_displacement`), so the identity above
holds to about 1e-3 voxel apart from interpolation blur, and exactly 0 is used outside the grid.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..core.errors import InputError
from ..core.transform import DisplacementTransform
from .deformation import random_smooth_displacement

__all__ = ["ihc_stains", "ihc_pair", "mri_path", "mri_volume", "mri_pair"]

_STAINS = {"hematoxylin": 0, "eosin": 1, "dab": 2}


def _normalise(channel: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    lo, hi = np.percentile(channel, [low, high])
    if hi <= lo:
        return np.zeros(channel.shape, dtype=np.float32)
    return np.clip((channel - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def ihc_stains(downscale: int = 1) -> dict[str, np.ndarray]:
    """Stain channels of scikit-image's bundled immunohistochemistry image (512 x 512 RGB).

    Colour deconvolution by :func:`skimage.color.rgb2hed`; each channel is rescaled so its
    0.5 and 99.5 percentiles map to 0 and 1 (clipped), float32 ``(y, x)``. ``downscale`` > 1
    averages ``downscale x downscale`` blocks (:func:`skimage.transform.downscale_local_mean`).

    Keys: ``"hematoxylin"``, ``"eosin"`` (this slide has no eosin: the channel is all zeros after
    normalisation), ``"dab"``, ``"gray"`` (luminance of the RGB image, inverted so tissue is
    bright, normalised the same way) and ``"rgb"`` (uint8, for reference).
    """
    from skimage import data
    from skimage.color import rgb2gray, rgb2hed

    downscale = int(downscale)
    if downscale < 1:
        raise InputError(f"downscale must be a positive integer, got {downscale}.")
    rgb = data.immunohistochemistry()
    hed = rgb2hed(rgb)
    if downscale > 1:
        from skimage.transform import downscale_local_mean

        hed = downscale_local_mean(hed, (downscale, downscale, 1))
        rgb = downscale_local_mean(rgb, (downscale, downscale, 1)).round().astype(np.uint8)
    out = {name: _normalise(hed[..., k]) for name, k in _STAINS.items()}
    out["gray"] = _normalise(1.0 - rgb2gray(rgb))
    out["rgb"] = rgb
    return out


def ihc_pair(
    seed: int | None = 0,
    moving_stain: str = "dab",
    max_displacement: float = 12.0,
    smoothness: float = 48.0,
    downscale: int = 1,
):
    """Hematoxylin (fixed) and another stain (moving) of the same IHC slide, deformed.

    ``fixed`` is the hematoxylin channel of :func:`ihc_stains`; ``moving`` is the
    ``moving_stain`` image (``"dab"``, or ``"gray"``: the inverted luminance of the RGB slide;
    the slide has no eosin) resampled through a random smooth diffeomorphism, so it is a
    multi-stain (multi-modal) pair with a known answer.

    Parameters
    ----------
    seed
        Seed of the deformation.
    max_displacement, smoothness
        Bound and correlation length of the deformation in pixels of the (downscaled) image.
    downscale
        Integer block-averaging factor (1 keeps 512 x 512).

    Returns
    -------
    fixed, moving : ``(y, x)`` float32 in [0, 1]
    displacement : ``(2, y, x)`` float32 pull-back field in pixels (module docstring):
        ``DisplacementTransform(displacement).warp(moving)`` equals ``ihc_stains()[moving_stain]``,
        which is aligned with ``fixed``.
    """
    key = str(moving_stain).lower()
    if key not in ("dab", "gray"):
        raise InputError(
            f"moving_stain must be 'dab' or 'gray', got {moving_stain!r} (this slide has no eosin)."
        )
    stains = ihc_stains(downscale)
    fixed = stains["hematoxylin"]
    u, u_inv = random_smooth_displacement(
        fixed.shape, max_displacement, smoothness, seed=seed, return_inverse=True
    )
    moving = DisplacementTransform(u_inv).warp(stains[key])
    return fixed, moving, u


def mri_path() -> str:
    """Path of the small anatomical MRI that nibabel ships (``nibabel/tests/data/anatomical.nii``)."""
    import nibabel

    path = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")
    if not os.path.exists(path):  # pragma: no cover - only with a stripped nibabel install
        raise InputError(
            f"nibabel's bundled test image is missing ({path}); reinstall nibabel with its tests data."
        )
    return path


def mri_volume() -> tuple[np.ndarray, tuple[float, float, float]]:
    """nibabel's bundled anatomical MRI in napari order, and its spacing.

    The NIfTI array is indexed ``(i, j, k)``; it is transposed to ``(k, j, i)``, i.e. ``(z, y, x)``,
    without flips: shape ``(25, 41, 33)`` with spacing ``(2.0, 2.0, 2.0)`` mm. Intensities are
    divided by the 99.9th percentile and clipped to [0, 1]; float32.
    """
    import nibabel

    img = nibabel.load(mri_path())
    data = np.asarray(img.dataobj, dtype=np.float64)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    vol = np.transpose(data, (2, 1, 0))
    top = np.percentile(vol, 99.9)
    vol = np.clip(vol / top, 0.0, 1.0).astype(np.float32)
    spacing = (zooms[2], zooms[1], zooms[0])
    return np.ascontiguousarray(vol), spacing


def mri_pair(
    seed: int | None = 0,
    max_displacement: float = 6.0,
    smoothness: float = 14.0,
    spacing: Sequence[float] | None = None,
):
    """The bundled MRI (fixed) and a smoothly deformed copy (moving), with the true field.

    ``max_displacement`` and ``smoothness`` are in physical units (mm, with the image's own
    2 mm spacing unless ``spacing`` overrides it).

    Returns
    -------
    fixed, moving : ``(z, y, x)`` float32 in [0, 1]
    displacement : ``(3, z, y, x)`` float32 pull-back field in voxels of the fixed grid:
        ``DisplacementTransform(displacement).warp(moving)`` equals ``fixed`` (module docstring).
    spacing : ``(z, y, x)`` voxel size in mm, for the napari layer ``scale``.
    """
    fixed, own = mri_volume()
    sp = tuple(float(s) for s in spacing) if spacing is not None else own
    u, u_inv = random_smooth_displacement(
        fixed.shape, max_displacement, smoothness, seed=seed, spacing=sp, return_inverse=True
    )
    moving = DisplacementTransform(u_inv).warp(fixed)
    return fixed, moving, u, sp
