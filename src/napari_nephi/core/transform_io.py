"""The transform file format: a folder other tools can read.

``transform.save(path)`` writes a folder (written under a temporary name, then renamed, so a
half-written result never replaces a good one)::

    path/
      transform.json             kind, ndim, fixed grid shape, spacing, world_affine, the moving
                                 frame (moving_shape, moving_spacing, moving_world_affine), parameters
      settings.json              the settings of the run that produced it
      displacement.nii.gz        displacement kinds: the field, ITK/ANTs convention
      inverse_displacement.nii.gz  when a backward field exists; on the moving grid
      affine.txt                 affine kind: ITK "Insight Transform File V1.0" text
      section_fields.npy         per_section_elastic kind: (n, gh, gw, 2) float32 (y, x) fields
      0/, 1/, ...                composed kind: its parts, applied in that order

Two frames. A transform maps fixed voxels to moving voxels; each image has its own frame, the
4x4 NIfTI affine (voxel index i, j, k -> RAS mm) it was read with, else ``diag(spacing)`` with the
origin at 0. ``P_fixed`` and ``P_moving`` below are these frames followed by RAS -> LPS (negate
the first two coordinates), as napari-order voxel -> ITK physical maps (:func:`frame_to_lps`).

Displacement NIfTI (what ITK, ANTs and nitransforms read as a displacement field): data shape
``(X, Y, Z, 1, D)`` (``(X, Y, 1, 1, 2)`` in 2D) with intent ``NIFTI_INTENT_VECTOR`` (1007) and the
affine of the grid it lies on. The spatial axes are NIfTI's i, j, k, i.e. numpy's last axis first:
a napari ``(z, y, x)`` array is transposed to ``(x, y, z)``. The vector at fixed voxel ``x`` is
``P_moving(phi(x)) - P_fixed(x)``, the physical displacement in LPS that ITK adds to a fixed
physical point to get the moving one. With one frame on both sides this is the voxel displacement
times the affine's linear part, negated in x and y. ``inverse_displacement.nii.gz`` is the same
with the roles swapped: on the moving grid (moving affine), ``P_fixed(psi(y)) - P_moving(y)``.
Loading undoes each step with the frames in ``transform.json`` (full precision; the NIfTI header
keeps its affine in single precision).

ITK affine text: ``Parameters`` are the 3x3 (2x2) matrix row by row then the translation of
``P_moving @ matrix @ P_fixed^-1``, ``FixedParameters`` the centre (0); like every ITK transform it
maps fixed physical (LPS) points to moving physical points. ``transform.json`` also holds the
matrix in voxel coordinates, napari order (``matrix``), which is what :func:`load_transform` uses.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import OutOfMemoryError, UnsupportedFileError
from .files import DIR_MODE, publish_folder
from .transform import (
    AffineTransform,
    ComposedTransform,
    DisplacementTransform,
    ElasticSectionTransform,
    IdentityTransform,
    PerSectionTransform,
    Transform,
    default_world_affine,
    frame_to_lps,
    resolve_moving_world_affine,
)

FORMAT = "napari-nephi-transform"
VERSION = 1
NIFTI_INTENT_VECTOR = 1007


def _world(t_world, spacing) -> np.ndarray:
    return np.asarray(t_world, float) if t_world is not None else default_world_affine(spacing)


def _add_affine_of_grid(out: np.ndarray, m: np.ndarray, sign: float) -> None:
    """``out += sign * (m[:, :D] @ x + m[:, D])`` for every voxel ``x`` of ``out``'s grid, in place.

    ``out`` is ``(D, *shape)``; the grid is never materialised (one broadcast axis at a time).
    """
    d = out.shape[0]
    for axis, n in enumerate(out.shape[1:]):
        ramp = np.arange(n, dtype=np.float64).reshape((1,) + (1,) * axis + (n,) + (1,) * (d - 1 - axis))
        out += sign * m[:, axis].reshape((d,) + (1,) * d) * ramp
    out += sign * m[:, d].reshape((d,) + (1,) * d)


def _apply_linear(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.einsum("ij,j...->i...", m, v)


def field_to_itk_nifti(
    field: np.ndarray,
    world_affine=None,
    spacing=None,
    moving_world_affine=None,
    moving_spacing=None,
) -> nib.Nifti1Image:
    """A ``(D, *shape)`` voxel displacement (napari order) as an ITK displacement-field NIfTI.

    ``field`` maps voxel ``x`` of the grid it lies on (the frame ``world_affine`` / ``spacing``)
    to voxel ``x + u(x)`` of the target image (the frame ``moving_world_affine`` /
    ``moving_spacing``, by default the same frame). The vector written at ``x`` is
    ``P_target(x + u(x)) - P_grid(x)`` in LPS millimetres, ITK's displacement-field convention.
    """
    d = field.shape[0]
    spacing = spacing if spacing is not None else (1.0,) * d
    a = _world(world_affine, spacing)
    grid = frame_to_lps(a, spacing, d)
    if moving_world_affine is None and moving_spacing is None:
        target = grid
    else:
        msp = moving_spacing if moving_spacing is not None else spacing
        target = frame_to_lps(
            resolve_moving_world_affine(a, spacing, moving_world_affine, moving_spacing), msp, d
        )
    u = np.asarray(field, np.float64)
    lps = _apply_linear(target[:d, :d], u)
    if not np.array_equal(target, grid):  # + P_target(x) - P_grid(x), zero for one frame
        _add_affine_of_grid(lps, (target - grid)[:d], 1.0)
    data = np.moveaxis(lps.transpose(0, *range(d, 0, -1)), 0, -1).astype(np.float32)  # (X, Y[, Z], D)
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


def itk_nifti_to_field(
    img: nib.Nifti1Image, world_affine=None, moving_world_affine=None
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`field_to_itk_nifti`: ``(field (D, *shape) napari order, world affine)``.

    ``world_affine`` is the frame of the field's grid (default: the file's own affine, which is
    stored in single precision), ``moving_world_affine`` the frame its vectors point into
    (default: the grid's frame). Both are 4x4 NIfTI affines (i, j, k -> RAS).
    """
    data = np.asarray(img.dataobj, dtype=np.float64)
    if data.ndim != 5 or data.shape[3] != 1 or data.shape[4] not in (2, 3):
        raise UnsupportedFileError(
            f"Not a displacement field: expected NIfTI data (X, Y, Z, 1, D), got {data.shape}."
        )
    d = data.shape[4]
    data = data[:, :, 0, 0, :] if d == 2 else data[:, :, :, 0, :]
    a = np.asarray(world_affine if world_affine is not None else img.affine, float)
    grid = frame_to_lps(a, None, d)
    target = grid if moving_world_affine is None else frame_to_lps(moving_world_affine, None, d)
    lps = np.moveaxis(data, -1, 0).transpose(0, *range(d, 0, -1))  # (D, *napari shape)
    if not np.array_equal(target, grid):
        lps = np.array(lps)
        _add_affine_of_grid(lps, (target - grid)[:d], -1.0)
    field = _apply_linear(np.linalg.inv(target[:d, :d]), lps)
    return np.ascontiguousarray(field, dtype=np.float32), a


def affine_to_itk_text(t: AffineTransform) -> str:
    """``t`` as an ITK affine text: fixed LPS points in, moving LPS points out."""
    d = t.ndim
    phys = t.moving_frame() @ t.matrix @ np.linalg.inv(t.fixed_frame())
    params = list(phys[:d, :d].ravel()) + list(phys[:d, d])
    fmt = " ".join(repr(float(p)) for p in params)
    return (
        "#Insight Transform File V1.0\n#Transform 0\n"
        f"Transform: AffineTransform_double_{d}_{d}\n"
        f"Parameters: {fmt}\nFixedParameters: {' '.join(['0'] * d)}\n"
    )


def itk_text_to_affine(
    text: str, world_affine=None, spacing=None, moving_world_affine=None, moving_spacing=None
) -> AffineTransform:
    """Read an ITK affine text into voxel coordinates of the given fixed and moving frames.

    The frames default as for :class:`~napari_nephi.core.transform.Transform`: without a moving
    frame the fixed one is used on both sides.
    """
    fields = {}
    for line in text.splitlines():
        if ":" in line and not line.startswith("#"):
            key, val = line.split(":", 1)
            fields[key.strip()] = val.split()
    try:
        d = int(fields["Transform"][0].rsplit("_", 1)[-1])
        p = np.array([float(v) for v in fields["Parameters"]])
        c = np.array([float(v) for v in fields.get("FixedParameters", ["0"] * d)])
        if p.shape != (d * d + d,) or c.shape != (d,):
            raise ValueError("wrong number of parameters")
    except (KeyError, ValueError, IndexError) as exc:
        raise UnsupportedFileError("Not an ITK affine transform text file.") from exc
    phys = np.eye(d + 1)
    phys[:d, :d] = p[: d * d].reshape(d, d)
    phys[:d, d] = p[d * d : d * d + d] + c - phys[:d, :d] @ c
    spacing = spacing if spacing is not None else (1.0,) * d
    frames = {"spacing": spacing, "world_affine": world_affine}
    if moving_world_affine is not None or moving_spacing is not None:
        frames.update(moving_spacing=moving_spacing, moving_world_affine=moving_world_affine)
    t = AffineTransform(np.eye(d + 1), **frames)
    t.matrix = np.linalg.inv(t.moving_frame()) @ phys @ t.fixed_frame()
    return t


def _write(t: Transform, folder: Path) -> None:
    params, arrays = t._state()
    meta = {"format": FORMAT, "version": VERSION, "axis_order": "napari (z, y, x)"}
    meta.update(t.common_state())
    meta.update(params)
    fixed = (_world(t.world_affine, t.spacing), t.spacing)
    moving = (_world(t.moving_world_affine, t.moving_spacing), t.moving_spacing)
    for name, arr in arrays.items():
        if name in ("displacement", "inverse_displacement"):
            # the forward field lies on the fixed grid and points into the moving image;
            # the inverse lies on the moving grid and points into the fixed image
            (grid, grid_sp), (target, target_sp) = (
                (fixed, moving) if name == "displacement" else (moving, fixed)
            )
            img = field_to_itk_nifti(arr, grid, grid_sp, target, target_sp)
            nib.save(img, folder / f"{name}.nii.gz")
        elif name == "section_fields":  # elastic sections: a (n, gh, gw, 2) array, too big for JSON
            np.save(folder / "section_fields.npy", np.asarray(arr, dtype=np.float32), allow_pickle=False)
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
    """Write ``t`` to the folder ``path`` atomically (replacing an existing transform folder).

    A place that cannot be written (read-only, a file in the way, disk full) raises
    :class:`UnsupportedFileError` naming ``path``; nothing is left half-written.
    """
    path = Path(path)
    if path.exists() and not (path / "transform.json").exists():
        raise UnsupportedFileError(f"{path} exists and is not a saved transform; choose a new folder name.")
    blocking = next((a for a in path.parents if a.exists() and not a.is_dir()), None)
    if blocking is not None:
        raise UnsupportedFileError(
            f"Cannot write the transform to {path}: {blocking} is a file, not a folder; choose another path."
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as exc:
        raise UnsupportedFileError(
            f"Cannot write the transform to {path}: {exc.strerror or exc}. Choose a folder you can write to."
        ) from exc
    try:
        os.chmod(tmp, DIR_MODE)  # mkdtemp makes 0700; a saved transform is a normal folder
        _write(t, tmp)
        publish_folder(tmp, path)  # replaces an earlier transform as a whole, or puts it back
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, UnsupportedFileError):
            raise UnsupportedFileError(
                f"Cannot write the transform to {path}: {exc.strerror or exc}. "
                "Choose a folder you can write to, with enough free space."
            ) from exc
        if isinstance(exc, MemoryError) and not isinstance(exc, OutOfMemoryError):
            raise OutOfMemoryError(
                f"Writing the transform to {path} ran out of memory; free memory or save a coarser field."
            ) from exc
        raise
    return path


_FIX = "Save the transform again, or restore the folder from a copy."


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``; :class:`UnsupportedFileError` naming it if unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UnsupportedFileError(
            f"{path} is unreadable or corrupt ({type(exc).__name__}: {exc}). {_FIX}"
        ) from exc
    if not isinstance(data, dict):
        raise UnsupportedFileError(
            f"{path} is corrupt: it holds a {type(data).__name__}, not a JSON object. {_FIX}"
        )
    return data


def _read_field(path: Path, ndim: int, grid, world, target) -> np.ndarray:
    """The ``(D, *grid)`` voxel field stored in the NIfTI ``path``, checked against ``transform.json``."""
    try:
        img = nib.load(path)
        if not isinstance(img, nib.Nifti1Image):
            raise ValueError(f"not a NIfTI-1 image but {type(img).__name__}")
        dtype = np.dtype(img.get_data_dtype())
        if dtype.kind != "f":
            raise ValueError(f"a displacement field holds floating-point vectors, not {dtype}")
        field, _ = itk_nifti_to_field(img, world, target)
    except MemoryError as exc:
        raise OutOfMemoryError(f"{path} is too large for the free memory.") from exc
    except Exception as exc:  # nibabel, gzip, zlib, numpy: truncated or corrupt
        raise UnsupportedFileError(
            f"{path} is unreadable or corrupt ({type(exc).__name__}: {exc}). {_FIX}"
        ) from exc
    if field.shape[0] != ndim:
        raise UnsupportedFileError(
            f"{path} holds a {field.shape[0]}D field but transform.json says ndim={ndim}. {_FIX}"
        )
    if grid is not None and tuple(field.shape[1:]) != tuple(grid):
        raise UnsupportedFileError(
            f"{path} lies on a grid {field.shape[1:]} but transform.json says {tuple(grid)}. {_FIX}"
        )
    if not np.all(np.isfinite(field)):
        raise UnsupportedFileError(f"{path} holds NaN or infinite displacements. {_FIX}")
    return field


def _read(folder: Path) -> Transform:
    meta_path = folder / "transform.json"
    if not meta_path.is_file():
        raise UnsupportedFileError(f"{folder} is not a saved transform (no transform.json inside).")
    meta = _read_json(meta_path)
    if meta.get("format") != FORMAT:
        raise UnsupportedFileError(
            f"{folder} was not written by napari-nephi (no format tag in {meta_path})."
        )
    _check_version(meta, meta_path)
    settings_path = folder / "settings.json"
    settings = _read_json(settings_path) if settings_path.exists() else {}
    try:
        return _build(folder, meta, settings)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as exc:
        # InputError and DimensionMismatchError are ValueErrors: a field of transform.json is wrong
        what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc).rstrip(".")
        raise UnsupportedFileError(f"{meta_path} is corrupt: {what}. {_FIX}") from exc


def _check_version(meta: dict, meta_path: Path) -> None:
    """Refuse a format version this code cannot read: a newer one, or one that is not a version.

    Every version ever written (only ``1`` so far) is read; a missing ``version`` is read as 1.
    """
    version = meta.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UnsupportedFileError(
            f"{meta_path} is corrupt: version must be a positive whole number, got {version!r}. {_FIX}"
        )
    if version > VERSION:
        raise UnsupportedFileError(
            f"{meta_path} is in transform format version {version}, newer than this napari-nephi reads "
            f"(up to {VERSION}); update napari-nephi to load it."
        )


def _check_invertible(matrices: np.ndarray, what: str) -> None:
    """Raise ``ValueError`` when a square matrix, or one of a stack ``(n, k, k)``, is singular."""
    stack = np.asarray(matrices, dtype=np.float64).reshape(-1, *np.shape(matrices)[-2:])
    singular = np.abs(np.linalg.det(stack)) < 1e-12
    if singular.any():
        where = f" (section {int(np.argmax(singular))})" if np.ndim(matrices) == 3 else ""
        raise ValueError(f"{what} is singular{where}: it collapses the image and has no inverse")


def _build(folder: Path, meta: dict, settings: dict) -> Transform:
    ndim = meta["ndim"]
    if not isinstance(ndim, int) or isinstance(ndim, bool) or ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim!r}")
    common = {
        "spacing": meta.get("spacing"),
        "world_affine": meta.get("world_affine"),
        "settings": settings,
        "moving_shape": meta.get("moving_shape"),
    }
    common.update(_moving_frame(meta))
    shape = meta.get("shape")
    kind = meta["kind"]
    if kind == "identity":
        return IdentityTransform(ndim, shape=shape, **common)
    if kind == "affine":
        t = AffineTransform(meta["matrix"], ndim=ndim, shape=shape, **common)
        _check_invertible(t.matrix[:-1, :-1], "the affine matrix")
        return t
    if kind == "displacement":
        frame = IdentityTransform(ndim, shape=shape, **common)  # checks the frames, resolves defaults
        fixed_world = _world(frame.world_affine, frame.spacing)
        moving_world = _world(frame.moving_world_affine, frame.moving_spacing)
        field = _read_field(folder / "displacement.nii.gz", ndim, frame.shape, fixed_world, moving_world)
        inv = None
        if (folder / "inverse_displacement.nii.gz").exists():
            inv = _read_field(
                folder / "inverse_displacement.nii.gz", ndim, frame.moving_shape, moving_world, fixed_world
            )
        return DisplacementTransform(field, inverse_field=inv, **common)
    if kind == "composed":
        count = meta["count"]
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 10_000:
            raise ValueError(f"count must be a positive whole number, got {count!r}")
        parts = [_read(folder / str(i)) for i in range(count)]
        return ComposedTransform(parts, shape=shape, **common)
    if kind == "per_section":
        if ndim != 3:
            raise ValueError(f"a per-section transform is 3D, got ndim={ndim}")
        t = PerSectionTransform(meta["matrices"], shape=shape, **common)
        _check_invertible(t.matrices, "a per-section matrix")
        return t
    if kind == "per_section_elastic":
        if ndim != 3:
            raise ValueError(f"a per-section transform is 3D, got ndim={ndim}")
        fields = np.load(folder / "section_fields.npy", allow_pickle=False)
        t = ElasticSectionTransform(meta["matrices"], fields, shape=shape, **common)
        _check_invertible(t.matrices, "a per-section matrix")
        return t
    raise ValueError(f"unknown transform kind {kind!r}")


def _moving_frame(meta: dict) -> dict:
    """The moving frame from ``transform.json``; none (the fixed frame) in files written before it.

    A frame equal to the fixed one is kept: it still says what spacing the moving image had, so
    applying the transform to a layer of another spacing (``image_spacing=``) rescales correctly.
    """
    msp, mwa = meta.get("moving_spacing"), meta.get("moving_world_affine")
    if msp is None and mwa is None:
        return {}
    return {"moving_spacing": msp, "moving_world_affine": mwa}


def load_transform(path) -> Transform:
    """Read a transform folder written by :meth:`Transform.save`."""
    path = Path(path)
    if not path.is_dir():
        raise UnsupportedFileError(f"{path} is not a transform folder.")
    return _read(path)
