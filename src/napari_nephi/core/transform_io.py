"""The transform file format: a folder other tools can read.

``transform.save(path)`` writes a folder (written under a temporary name, then renamed, so a
half-written result never replaces a good one)::

    path/
      transform.json             kind, ndim, fixed grid shape, spacing, parameters (see below)
      settings.json              the settings of the run that produced it
      displacement.nii.gz        displacement kinds: the field, ITK/ANTs convention
      inverse_displacement.nii.gz  when a backward field exists
      affine.txt                 affine kind: ITK "Insight Transform File V1.0" text
      0/, 1/, ...                composed kind: its parts, applied in that order

Displacement NIfTI (what ITK, ANTs and nitransforms read as a displacement field): data shape
``(X, Y, Z, 1, D)`` (``(X, Y, 1, 1, 2)`` in 2D) with intent ``NIFTI_INTENT_VECTOR`` (1007). The
spatial axes are NIfTI's i, j, k, i.e. numpy's last axis first: a napari ``(z, y, x)`` array is
transposed to ``(x, y, z)``. Vectors are physical displacements (mm, or the spacing's unit) in
ITK's LPS frame: the voxel displacement is multiplied by the upper-left block of the NIfTI affine
(voxel index -> RAS), then its first two components are negated (RAS -> LPS). The NIfTI affine is
the fixed image's own when it was read from NIfTI (``world_affine``), else ``diag(spacing)`` with
the origin at 0. Loading undoes each step.

ITK affine text: ``Parameters`` are the 3x3 (2x2) matrix row by row then the translation, in
LPS physical coordinates of the same frame, ``FixedParameters`` the centre (0); like every ITK
transform it maps fixed physical points to moving physical points. ``transform.json`` also holds
the matrix in voxel coordinates, napari order (``matrix``), which is what :func:`load_transform`
uses.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import UnsupportedFileError
from .transform import (
    AffineTransform,
    ComposedTransform,
    DisplacementTransform,
    IdentityTransform,
    PerSectionTransform,
    Transform,
)

FORMAT = "napari-nephi-transform"
VERSION = 1
NIFTI_INTENT_VECTOR = 1007
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def default_world_affine(spacing) -> np.ndarray:
    """NIfTI affine (i, j, k -> RAS) for a napari-order spacing, origin 0."""
    sp = list(spacing)[::-1] + [1.0] * (3 - len(spacing))
    return np.diag(sp + [1.0])


def _world(t_world, spacing) -> np.ndarray:
    return np.asarray(t_world, float) if t_world is not None else default_world_affine(spacing)


def field_to_itk_nifti(field: np.ndarray, world_affine=None, spacing=None) -> nib.Nifti1Image:
    """A ``(D, *shape)`` voxel displacement (napari order) as an ITK displacement-field NIfTI."""
    d = field.shape[0]
    spacing = spacing if spacing is not None else (1.0,) * d
    a = _world(world_affine, spacing)
    u_ijk = np.asarray(field, np.float64)[::-1].transpose(0, *range(d, 0, -1))  # (D, X, Y[, Z])
    ras = np.einsum("ij,j...->i...", a[:d, :d], u_ijk)
    ras[:2] *= -1.0  # RAS -> LPS
    data = np.moveaxis(ras, 0, -1).astype(np.float32)  # (X, Y[, Z], D)
    if d == 2:
        data = data[:, :, None, None, :]
    else:
        data = data[:, :, :, None, :]
    img = nib.Nifti1Image(data, a)
    img.header.set_intent(NIFTI_INTENT_VECTOR, name="displacement")
    img.header.set_qform(a, code=1)
    img.header.set_sform(a, code=1)
    img.header.set_xyzt_units("mm")
    return img


def itk_nifti_to_field(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`field_to_itk_nifti`: ``(field (D, *shape) napari order, world affine)``."""
    data = np.asarray(img.dataobj, dtype=np.float64)
    if data.ndim != 5 or data.shape[3] != 1 or data.shape[4] not in (2, 3):
        raise UnsupportedFileError(
            f"Not a displacement field: expected NIfTI data (X, Y, Z, 1, D), got {data.shape}."
        )
    d = data.shape[4]
    data = data[:, :, 0, 0, :] if d == 2 else data[:, :, :, 0, :]
    a = np.asarray(img.affine, float)
    vec = np.moveaxis(data, -1, 0)
    vec[:2] *= -1.0  # LPS -> RAS
    u_ijk = np.einsum("ij,j...->i...", np.linalg.inv(a[:d, :d]), vec)
    field = u_ijk[::-1].transpose(0, *range(d, 0, -1))
    return np.ascontiguousarray(field, dtype=np.float32), a


def _zyx_to_lps(world_affine, spacing, d: int) -> np.ndarray:
    """Homogeneous map from napari-order voxel coordinates to LPS physical coordinates."""
    a = _LPS @ _world(world_affine, spacing)
    perm = np.zeros((4, d + 1))
    for axis in range(d):
        perm[axis, d - 1 - axis] = 1.0  # index i (row 0) is numpy's last axis
    perm[3, d] = 1.0
    full = a @ perm  # (4, d+1)
    keep = list(range(d)) + [3]
    return full[keep]


def affine_to_itk_text(t: AffineTransform) -> str:
    d = t.ndim
    q = _zyx_to_lps(t.world_affine, t.spacing, d)
    phys = q @ t.matrix @ np.linalg.inv(q)
    params = list(phys[:d, :d].ravel()) + list(phys[:d, d])
    fmt = " ".join(repr(float(p)) for p in params)
    return (
        "#Insight Transform File V1.0\n#Transform 0\n"
        f"Transform: AffineTransform_double_{d}_{d}\n"
        f"Parameters: {fmt}\nFixedParameters: {' '.join(['0'] * d)}\n"
    )


def itk_text_to_affine(text: str, world_affine=None, spacing=None) -> AffineTransform:
    """Read an ITK affine text (as written by :func:`affine_to_itk_text`) into voxel coordinates."""
    fields = {}
    for line in text.splitlines():
        if ":" in line and not line.startswith("#"):
            key, val = line.split(":", 1)
            fields[key.strip()] = val.split()
    try:
        d = int(fields["Transform"][0].rsplit("_", 1)[-1])
        p = np.array([float(v) for v in fields["Parameters"]])
        c = np.array([float(v) for v in fields.get("FixedParameters", ["0"] * d)])
    except (KeyError, ValueError, IndexError) as exc:
        raise UnsupportedFileError("Not an ITK affine transform text file.") from exc
    phys = np.eye(d + 1)
    phys[:d, :d] = p[: d * d].reshape(d, d)
    phys[:d, d] = p[d * d : d * d + d] + c - phys[:d, :d] @ c
    spacing = spacing if spacing is not None else (1.0,) * d
    q = _zyx_to_lps(world_affine, spacing, d)
    return AffineTransform(np.linalg.inv(q) @ phys @ q, spacing=spacing, world_affine=world_affine)


def _write(t: Transform, folder: Path) -> None:
    params, arrays = t._state()
    meta = {"format": FORMAT, "version": VERSION, "axis_order": "napari (z, y, x)"}
    meta.update(t.common_state())
    meta.update(params)
    for name, arr in arrays.items():
        if name in ("displacement", "inverse_displacement"):
            nib.save(field_to_itk_nifti(arr, t.world_affine, t.spacing), folder / f"{name}.nii.gz")
        else:
            meta[name] = np.asarray(arr).tolist()
    if isinstance(t, AffineTransform):
        (folder / "affine.txt").write_text(affine_to_itk_text(t))
    if isinstance(t, ComposedTransform):
        for i, part in enumerate(t.transforms):
            (folder / str(i)).mkdir()
            _write(part, folder / str(i))
    (folder / "transform.json").write_text(json.dumps(meta, indent=2))
    (folder / "settings.json").write_text(json.dumps(t.settings, indent=2, default=str))


def save_transform(t: Transform, path) -> Path:
    """Write ``t`` to the folder ``path`` atomically (replacing an existing transform folder)."""
    path = Path(path)
    if path.exists() and not (path / "transform.json").exists():
        raise UnsupportedFileError(f"{path} exists and is not a saved transform; choose a new folder name.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        _write(t, tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _read(folder: Path) -> Transform:
    try:
        meta = json.loads((folder / "transform.json").read_text())
    except FileNotFoundError as exc:
        raise UnsupportedFileError(f"{folder} is not a saved transform (no transform.json inside).") from exc
    except json.JSONDecodeError as exc:
        raise UnsupportedFileError(f"{folder / 'transform.json'} is corrupt: {exc}.") from exc
    if meta.get("format") != FORMAT:
        raise UnsupportedFileError(f"{folder} was not written by napari-nephi.")
    settings = {}
    if (folder / "settings.json").exists():
        settings = json.loads((folder / "settings.json").read_text())
    common = {
        "spacing": meta.get("spacing"),
        "world_affine": meta.get("world_affine"),
        "settings": settings,
    }
    kind = meta["kind"]
    if kind == "identity":
        return IdentityTransform(meta["ndim"], shape=meta.get("shape"), **common)
    if kind == "affine":
        return AffineTransform(meta["matrix"], shape=meta.get("shape"), **common)
    if kind == "displacement":
        try:
            field, _ = itk_nifti_to_field(nib.load(folder / "displacement.nii.gz"))
            inv = None
            if (folder / "inverse_displacement.nii.gz").exists():
                inv, _ = itk_nifti_to_field(nib.load(folder / "inverse_displacement.nii.gz"))
        except (OSError, EOFError, ValueError) as exc:
            raise UnsupportedFileError(f"The displacement field in {folder} is unreadable: {exc}") from exc
        return DisplacementTransform(field, inverse_field=inv, **common)
    if kind == "composed":
        parts = [_read(folder / str(i)) for i in range(int(meta["count"]))]
        return ComposedTransform(parts, shape=meta.get("shape"), **common)
    if kind == "per_section":
        return PerSectionTransform(meta["matrices"], shape=meta.get("shape"), **common)
    raise UnsupportedFileError(f"Unknown transform kind {kind!r} in {folder}.")


def load_transform(path) -> Transform:
    """Read a transform folder written by :meth:`Transform.save`."""
    path = Path(path)
    if not path.is_dir():
        raise UnsupportedFileError(f"{path} is not a transform folder.")
    return _read(path)
