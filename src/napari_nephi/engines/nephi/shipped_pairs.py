"""Training pairs for the general 2D model from the images scikit-image and nibabel ship.

Nothing is downloaded: only images that the installed scikit-image and nibabel packages carry are
used (photographs, microscopy, histology, retina, textures, astronomy, text, slices of nibabel's
anatomical MRI). A fixed set of them is **held out** (:data:`HELD_OUT`): never drawn for training,
used for validation, tests and benchmarks.

A pair is a random square crop of one image (random size, position and flip), resized with
anti-aliasing to the working shape, as the *moving* image; the *fixed* image is that crop pulled
back through a random smooth diffeomorphism ``u`` (:func:`~napari_nephi.synthetic.
random_smooth_displacement`, amplitude 0.5-5 % of the size, smoothness 3-6 %), so ``u`` is exactly the
pull-back displacement a registration should find (fixed voxel -> moving voxel). Each image then
gets its own random intensity change (gamma, contrast, blur, noise) and is rescaled to [0, 1]
between its 0.5 and 99.5 percentiles, as the engine does.
"""

from __future__ import annotations

import functools

import numpy as np

from ...core.errors import InputError
from ...core.inputs import normalize_intensity
from ...core.transform import DisplacementTransform

#: scikit-image ``data`` images used for training (all ship with the wheel).
TRAINING: tuple[str, ...] = (
    "astronaut",
    "brick",
    "chelsea",
    "clock",
    "coffee",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "microaneurysms",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
    "mri_axial",
    "mri_coronal",
)
#: Never used in training: a photograph, phase-contrast cells, coins, sagittal MRI slices.
HELD_OUT: tuple[str, ...] = ("camera", "cell", "coins", "mri_sagittal")
#: Displacement amplitude (largest vector) and smoothness drawn per field, as fractions of the size.
AMPLITUDE = (0.005, 0.05)
SMOOTHNESS = (0.03, 0.06)
#: Random deformations generated per source (drawn again with flips and transposes).
FIELD_BANK = 256


def _unit(img: np.ndarray) -> np.ndarray:
    return normalize_intensity(np.asarray(img, dtype=np.float32))


@functools.cache
def _mri_slices(axis: int) -> tuple[np.ndarray, ...]:
    """Slices of nibabel's MRI along ``axis`` (0 axial, 1 coronal, 2 sagittal) with enough tissue."""
    from ...synthetic import mri_volume

    vol = mri_volume()[0]
    slices = [np.take(vol, i, axis=axis) for i in range(vol.shape[axis])]
    return tuple(_unit(s) for s in slices if (s > 0.2).mean() > 0.15)


@functools.cache
def shipped_image(name: str) -> np.ndarray | tuple[np.ndarray, ...]:
    """A shipped image, grey float32 in [0, 1]; the MRI names give a tuple of slices."""
    if name.startswith("mri_"):
        axes = {"mri_axial": 0, "mri_coronal": 1, "mri_sagittal": 2}
        if name not in axes:
            raise InputError(f"Unknown MRI slice set {name!r}; choose one of {', '.join(axes)}.")
        return _mri_slices(axes[name])
    from skimage import data
    from skimage.color import rgb2gray

    loader = getattr(data, name, None)
    if loader is None or name not in TRAINING + HELD_OUT:
        raise InputError(f"Unknown shipped image {name!r}; choose one of {', '.join(TRAINING + HELD_OUT)}.")
    img = np.asarray(loader())
    if img.ndim == 3:
        img = rgb2gray(img[..., :3])
    if name == "immunohistochemistry":
        img = img.max() - img  # tissue bright, glass dark, as ihc_stains()["gray"]
    return _unit(img)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    from skimage.transform import resize

    out = resize(img, (size, size), order=1, anti_aliasing=img.shape[0] > size, preserve_range=True)
    return out.astype(np.float32)


def random_crop(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (35-100 % of the short side, MRI: the whole slice) resized to ``size``."""
    src = shipped_image(name)
    if isinstance(src, tuple):
        img = src[int(rng.integers(len(src)))]
        side = max(img.shape)
        pad = [((side - n) // 2, side - n - (side - n) // 2) for n in img.shape]
        crop = np.pad(img, pad)
    else:
        side = int(round(min(src.shape) * rng.uniform(0.35, 1.0)))
        y0 = int(rng.integers(0, src.shape[0] - side + 1))
        x0 = int(rng.integers(0, src.shape[1] - side + 1))
        crop = src[y0 : y0 + side, x0 : x0 + side]
    crop = _dihedral(crop, int(rng.integers(8)))
    return _resize(np.ascontiguousarray(crop), size)


def _dihedral(img: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 flips/transposes of a 2D image."""
    if k & 1:
        img = img[::-1]
    if k & 2:
        img = img[:, ::-1]
    return img.T if k & 4 else img


def _dihedral_field(u: np.ndarray, k: int) -> np.ndarray:
    """The same flip/transpose applied to a displacement field ``(2, y, x)`` and its components."""
    u = u.copy()
    if k & 1:
        u = u[:, ::-1]
        u[0] = -u[0]
    if k & 2:
        u = u[:, :, ::-1]
        u[1] = -u[1]
    if k & 4:
        u = np.stack([u[1].T, u[0].T])
    return np.ascontiguousarray(u)


def random_field(size: int, seed) -> tuple[np.ndarray, np.ndarray]:
    """A random smooth diffeomorphism on ``(size, size)``: ``(u, u_inverse)`` in voxels."""
    from ...synthetic import random_smooth_displacement

    rng = np.random.default_rng(seed)
    amp = float(np.exp(rng.uniform(*np.log(AMPLITUDE)))) * size
    smooth = float(rng.uniform(*SMOOTHNESS)) * size
    for _ in range(6):
        try:
            return random_smooth_displacement(
                (size, size), amp, smooth, seed=int(rng.integers(2**31)), return_inverse=True
            )
        except InputError:  # it would fold: a little smaller
            amp *= 0.8
    return random_smooth_displacement((size, size), amp, 2 * smooth, seed=0, return_inverse=True)


def change_intensity(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random gamma, blur and noise, then percentile rescaling to [0, 1]."""
    from scipy import ndimage

    out = np.clip(img, 0, 1) ** np.float32(np.exp(rng.normal(0, 0.3)))
    if rng.random() < 0.5:
        out = ndimage.gaussian_filter(out, rng.uniform(0.3, 1.2))
    out = out * rng.uniform(0.5, 1.5) + rng.normal(0, rng.uniform(0, 0.04), out.shape)
    return normalize_intensity(out.astype(np.float32))


def make_pair(name: str, size: int, seed) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(fixed, moving, u, u_inverse)`` from the shipped image ``name`` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    moving = random_crop(name, size, rng)
    u, u_inv = random_field(size, rng.integers(2**62))
    fixed = DisplacementTransform(u).warp(moving)
    return change_intensity(fixed, rng), change_intensity(moving, rng), u, u_inv


class ShippedPairs:
    """Pair source of :func:`.train.train` (``data="general2d"``): random pairs of the training
    images with their true displacement, and fixed validation pairs of the held-out images."""

    has_truth = True

    def __init__(self, shape, val_pairs: int = 16, seed: int = 0, bank: int | None = None):
        if bank is None:  # read at the call (session 40)
            bank = FIELD_BANK
        if len(shape) != 2 or shape[0] != shape[1]:
            raise InputError(f"General 2D pairs are square 2D images; got shape {tuple(shape)}.")
        self.size, self.n_val, self.seed, self.bank = int(shape[0]), int(val_pairs), int(seed), int(bank)
        self._fields: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _field(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self._fields:
            self._fields[k] = random_field(self.size, [self.seed, 7, k])
        return self._fields[k]

    def _train_pair(self, rng: np.random.Generator):
        name = TRAINING[int(rng.integers(len(TRAINING)))]
        moving = random_crop(name, self.size, rng)
        op = int(rng.integers(8))
        u, u_inv = (_dihedral_field(f, op) for f in self._field(int(rng.integers(self.bank))))
        fixed = DisplacementTransform(u).warp(moving)
        return change_intensity(fixed, rng), change_intensity(moving, rng), u, u_inv

    def batch(self, n: int, rng: np.random.Generator):
        """``(fixed, moving, truth)``: tensors ``(n, 1, s, s)`` twice and ``(n, 4, s, s)`` (u, u_inverse)."""
        import torch

        items = [self._train_pair(rng) for _ in range(n)]
        fixed = np.stack([it[0] for it in items])[:, None]
        moving = np.stack([it[1] for it in items])[:, None]
        truth = np.stack([np.concatenate([it[2], it[3]]) for it in items])
        return torch.as_tensor(fixed), torch.as_tensor(moving), torch.as_tensor(truth)

    def validation(self) -> list[tuple]:
        """Held-out pairs ``(fixed, moving, None, None, u)`` (no labels; the true field)."""
        out = []
        for i in range(self.n_val):
            f, m, u, _ = make_pair(HELD_OUT[i % len(HELD_OUT)], self.size, [self.seed, 11, i])
            out.append((f, m, None, None, u))
        return out
