"""NIfTI (.nii, .nii.gz) reading and writing in napari axis order.

NIfTI stores voxels as ``(i, j, k[, t])`` with ``i`` fastest along x; napari wants ``(z, y, x)``.
Reading reverses the axes (and the header zooms); writing does the inverse. The original
index -> RAS affine travels in ``meta["metadata"]["nifti_affine"]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ..core.errors import InputError, UnsupportedFileError
from ..core.grid import check_spacing
from ._util import (
    PathLike,
    atomic_write,
    check_not_empty,
    existing_file,
    is_nifti,
    reading,
    stem,
    writable_array,
)

__all__ = ["read_nifti", "write_nifti"]


def read_nifti(path: PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a NIfTI file as ``(data, meta)`` with data in ``(z, y, x)`` (or ``(t, z, y, x)``) order.

    ``meta`` holds ``scale`` (spacing in data order), ``name`` and
    ``metadata={"nifti_affine": 4x4 affine, "nifti_zooms": header zooms}``.
    A single-slice volume ``(i, j, 1)`` becomes a 2D ``(y, x)`` array.
    """
    p = existing_file(path)
    with reading(p, "NIfTI"):
        img = nib.load(str(p))
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise UnsupportedFileError(f"{p} is not a NIfTI-1/NIfTI-2 image; convert it to .nii.gz first.")
        _check_data_size(p, img)
        raw = np.asanyarray(img.dataobj)
        # zooms are float32 in the header: keep their shortest decimal form (0.3, not 0.30000001)
        zooms = tuple(float(str(np.float32(z))) for z in img.header.get_zooms())
        affine = np.array(img.affine, dtype=np.float64)
    if raw.ndim < 2:
        raise UnsupportedFileError(f"{p} holds a {raw.ndim}D array; an image needs at least 2 dimensions.")
    check_not_empty(p, raw.shape)
    zooms = (zooms + (1.0,) * raw.ndim)[: raw.ndim]
    if raw.ndim == 3 and raw.shape[2] == 1:  # a 2D image stored as (i, j, 1)
        raw, zooms = raw[:, :, 0], zooms[:2]
    data = np.ascontiguousarray(raw.transpose(tuple(range(raw.ndim))[::-1]))
    if not data.dtype.isnative:  # big-endian files: torch and napari want native byte order
        data = data.astype(data.dtype.newbyteorder("="))
    scale = tuple(z if np.isfinite(z) and z > 0 else 1.0 for z in zooms[::-1])
    meta = {
        "name": stem(p),
        "scale": scale,
        "metadata": {"nifti_affine": affine, "nifti_zooms": zooms, "source_path": str(p)},
    }
    return data, meta


#: Most a deflate stream can expand (1032:1), with room for the gzip and NIfTI headers.
_GZIP_MAX_RATIO = 1100


def _check_data_size(path: Path, img: nib.Nifti1Image) -> None:
    """Refuse a header whose image needs more bytes than the file can hold (truncated or corrupt).

    Checked before any pixel is read, so a corrupt dimension never allocates a huge array.
    """
    proxy = img.dataobj
    shape = tuple(int(n) for n in proxy.shape)
    needed = int(np.prod(shape, dtype=object)) * np.dtype(proxy.dtype).itemsize + int(
        getattr(proxy, "offset", 0)
    )
    size = path.stat().st_size
    limit = size * _GZIP_MAX_RATIO + (1 << 20) if path.name.lower().endswith(".gz") else size
    if needed > limit:
        raise UnsupportedFileError(
            f"{path} is truncated or its header is corrupt: the header describes a {shape} image of "
            f"{needed} bytes but the file has {size} bytes. Check that it was copied completely, or "
            "re-export it."
        )


def _affine_for(spacing: tuple[float, ...], affine: np.ndarray | None) -> np.ndarray:
    """Index (i, j, k) -> RAS affine whose column norms equal the (i, j, k) ``spacing``.

    Without ``affine`` it is diagonal. With one, its direction and origin are kept and its column
    lengths are set to ``spacing``, so the written spacing always matches the data's spacing.
    """
    sp = np.ones(3)
    sp[: min(3, len(spacing))] = spacing[:3]
    if affine is None:
        return np.diag([*sp, 1.0])
    a = np.array(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise InputError(f"affine must be a finite 4x4 matrix, got shape {a.shape}.")
    norms = np.linalg.norm(a[:3, :3], axis=0)
    if np.any(norms == 0):
        raise InputError("affine has a zero column; give a non-singular index-to-world affine.")
    a[:3, :3] = a[:3, :3] / norms * sp
    return a


def write_nifti(
    path: PathLike,
    data: Any,
    spacing: Sequence[float] | None = None,
    affine: np.ndarray | None = None,
) -> str:
    """Write ``data`` (napari order ``(y, x)``, ``(z, y, x)`` or ``(t, z, y, x)``) to a NIfTI file.

    ``spacing`` is in data order (like napari ``scale``); ``affine`` is an index (i, j, k) -> RAS
    NIfTI affine whose direction and origin are kept (its spacing is replaced by ``spacing`` when
    given). Dtype is preserved (bool becomes uint8). The write is atomic. Returns the path.
    """
    if not is_nifti(path):
        raise UnsupportedFileError(f"Cannot write {path} as NIfTI: the name must end in .nii or .nii.gz.")
    arr = writable_array(path, data)
    if arr.ndim not in (2, 3, 4):
        raise InputError(f"NIfTI export needs a 2D, 3D or 4D array, got shape {arr.shape}.")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    sp = check_spacing(spacing, arr.ndim)
    nifti = arr.transpose(tuple(range(arr.ndim))[::-1])  # (i, j[, k[, t]])
    sp_ijk = sp[::-1]
    if nifti.ndim == 2:
        nifti = nifti[:, :, np.newaxis]
        sp_ijk = (*sp_ijk, 1.0)
    try:
        img = nib.Nifti1Image(nifti, _affine_for(sp_ijk, affine), dtype=nifti.dtype)
    except nib.spatialimages.HeaderDataError as exc:
        raise InputError(f"NIfTI cannot store arrays of dtype {arr.dtype}; cast it first ({exc}).") from exc
    img.header.set_zooms(sp_ijk)
    with atomic_write(path) as tmp:
        nib.save(img, str(tmp))
    return str(path)
