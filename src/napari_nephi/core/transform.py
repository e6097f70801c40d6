"""Transforms: pull-back maps from fixed voxel coordinates to moving voxel coordinates.

Every kind implements ``_map(points)`` on a torch tensor ``(N, D)``; everything else
(dense displacement, warping images and labels, mapping points, composition) follows from it.
The warped moving image at ``x`` is ``moving(phi(x))``.

A transform knows two physical frames: the fixed image's (``spacing``, ``world_affine``), on
whose grid it is defined, and the moving image's (``moving_spacing``, ``moving_world_affine``),
in whose voxel coordinates ``phi(x)`` is expressed. The moving frame defaults to the fixed one.
The frames change nothing in ``_map`` (voxel to voxel); they say where those voxels are in space,
which is what saving to ITK/ANTs files and applying the map to an image of another resolution need.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real
from typing import Any

import numpy as np
import torch

from . import warp as _warp
from .device import check_memory, choose_device, memory_guard
from .errors import DimensionMismatchError, InputError
from .grid import check_spacing, identity_grid

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def default_world_affine(spacing) -> np.ndarray:
    """NIfTI affine (i, j, k -> RAS) for a napari-order spacing, origin 0."""
    sp = list(spacing)[::-1] + [1.0] * (3 - len(spacing))
    return np.diag(sp + [1.0])


def check_world_affine(world_affine, what: str = "world_affine") -> np.ndarray | None:
    """A 4x4 NIfTI affine (index i, j, k -> RAS) as float64, or ``None``."""
    if world_affine is None:
        return None
    a = np.array(world_affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise InputError(f"{what} must be a finite 4x4 NIfTI affine (i, j, k -> RAS), got shape {a.shape}.")
    if abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise InputError(f"{what} is singular; give the image's voxel-index-to-world affine.")
    return a


def rescaled_world_affine(world_affine, spacing) -> np.ndarray:
    """``world_affine`` with its direction and origin kept and its i, j(, k) columns ``spacing`` long.

    ``spacing`` is in napari order; the frame of an image lying where ``world_affine``'s image lies
    but with another voxel size (the same rule :func:`napari_nephi.io.nifti.write_nifti` uses).
    """
    a = np.array(world_affine, dtype=np.float64)
    sp = list(spacing)[::-1]
    for col, s in enumerate(sp):
        norm = np.linalg.norm(a[:3, col])
        if norm == 0:
            raise InputError("world_affine has a zero column; give a non-singular affine.")
        a[:3, col] *= s / norm
    return a


def resolve_moving_world_affine(world_affine, spacing, moving_world_affine, moving_spacing):
    """The moving frame's NIfTI affine by the defaulting rule (``None`` means ``diag(spacing)``).

    Given explicitly, it is used as is. Without it: with no moving spacing either, the moving frame
    is the fixed frame; with only a moving spacing, it is the fixed affine rescaled to that spacing
    (the fixed direction and origin kept), or ``None`` when the fixed frame has no affine.
    """
    if moving_world_affine is not None:
        return moving_world_affine
    if moving_spacing is None or world_affine is None:
        return world_affine
    return rescaled_world_affine(world_affine, moving_spacing)


def frame_to_lps(world_affine, spacing, ndim: int) -> np.ndarray:
    """Homogeneous ``(D+1, D+1)`` map from napari-order voxel coordinates to ITK LPS millimetres.

    ``world_affine`` (4x4, i, j, k -> RAS) defaults to ``diag(spacing)``; NIfTI's index ``i`` is
    numpy's last axis. In 2D the first two rows and columns (and the translation) are kept.
    """
    a = _RAS_TO_LPS @ (
        np.asarray(world_affine, float) if world_affine is not None else default_world_affine(spacing)
    )
    d = int(ndim)
    perm = np.zeros((4, d + 1))
    for axis in range(d):
        perm[axis, d - 1 - axis] = 1.0  # index i (row 0) is numpy's last axis
    perm[3, d] = 1.0
    return (a @ perm)[list(range(d)) + [3]]


def check_output_memory(
    shape: Sequence[int], channels: int, itemsize: int, what: str, advice: str, extra: float = 0.0
) -> None:
    """Raise :class:`OutOfMemoryError` before allocating a ``(channels, *shape)`` result that cannot fit.

    ``extra``: further bytes needed meanwhile (an input copy); one chunk of coordinates is added.
    """
    shape = tuple(int(n) for n in shape)
    if any(n <= 0 for n in shape):
        raise InputError(f"Shape {shape} has an empty axis; every axis needs at least one voxel.")
    needed = float(itemsize) * channels * float(np.prod([float(n) for n in shape]))
    check_memory(
        needed + extra + 64 * _warp.CHUNK_VOXELS, torch.device("cpu"), f"{what} of shape {shape}", advice
    )


def check_dense_memory(shape: Sequence[int]) -> None:
    """Raise :class:`OutOfMemoryError` when a dense ``(D, *shape)`` float32 field cannot fit in memory."""
    check_output_memory(
        shape,
        len(shape),
        4,
        "dense displacement field",
        "Ask for a coarser grid (a smaller shape), or warp with the transform directly "
        "(transform.warp works in chunks without the dense field).",
    )


_WARP_ADVICE = "Give a smaller output_shape, or downsample or crop the image first."


def check_grid_shape(shape, ndim: int, what: str = "shape") -> tuple[int, ...]:
    """``shape`` as a tuple of ``ndim`` positive whole numbers, or an :class:`InputError`.

    Whole-number floats (``10.0``) are accepted; ``10.5``, strings, bools and empty axes are not.
    """
    if (
        isinstance(shape, (str, bytes))
        or not isinstance(shape, (Sequence, np.ndarray))
        or (isinstance(shape, np.ndarray) and shape.ndim != 1)
    ):
        raise InputError(f"{what} must be a sequence of {ndim} whole numbers (one per axis), got {shape!r}.")
    out = []
    for n in shape:
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, Real) or not float(n).is_integer():
            raise InputError(f"{what} {tuple(shape)!r} must hold whole numbers of voxels, got {n!r}.")
        out.append(int(n))
    out = tuple(out)
    if len(out) != ndim:
        axes = "axis" if len(out) == 1 else "axes"
        raise DimensionMismatchError(f"{what} {out} has {len(out)} {axes} but the transform is {ndim}D.")
    if min(out) < 1:
        raise InputError(f"{what} {out} has an empty axis; every axis needs at least one voxel.")
    return out


class Transform:
    """Base class and protocol of every transform kind."""

    kind = "base"

    def __init__(
        self,
        ndim: int,
        shape: Sequence[int] | None = None,
        spacing: Sequence[float] | None = None,
        settings: dict | None = None,
        world_affine: np.ndarray | None = None,
        moving_spacing: Sequence[float] | None = None,
        moving_world_affine: np.ndarray | None = None,
        moving_shape: Sequence[int] | None = None,
    ):
        self.ndim = int(ndim)
        self.shape = self._check_shape(shape, "shape")
        self.spacing = check_spacing(spacing, self.ndim)
        self.settings = dict(settings or {})
        #: 4x4 NIfTI affine (index i,j,k -> RAS mm) of the fixed image, when known.
        self.world_affine = check_world_affine(world_affine)
        #: grid shape of the moving image, when known (the grid an inverse lives on).
        self.moving_shape = self._check_shape(moving_shape, "moving_shape")
        self.moving_spacing = moving_spacing
        self.moving_world_affine = moving_world_affine

    def _check_shape(self, shape, what: str) -> tuple[int, ...] | None:
        return None if shape is None else check_grid_shape(shape, self.ndim, what)

    # -- the moving frame --------------------------------------------------------------------
    @property
    def moving_spacing(self) -> tuple[float, ...]:
        """Voxel spacing of the moving image (napari order); the fixed ``spacing`` unless given."""
        return self._moving_spacing if self._moving_spacing is not None else self.spacing

    @moving_spacing.setter
    def moving_spacing(self, value) -> None:
        self._moving_spacing = None if value is None else check_spacing(value, self.ndim)

    @property
    def moving_world_affine(self) -> np.ndarray | None:
        """4x4 NIfTI affine of the moving image (see :func:`resolve_moving_world_affine`).

        Not given, it follows the fixed frame: ``world_affine`` itself while no moving spacing is
        given either, else ``world_affine`` rescaled to ``moving_spacing``. ``None`` means
        ``diag(moving_spacing)`` with the origin at 0, as for ``world_affine``.
        """
        return resolve_moving_world_affine(
            self.world_affine, self.spacing, self._moving_world_affine, self._moving_spacing
        )

    @moving_world_affine.setter
    def moving_world_affine(self, value) -> None:
        self._moving_world_affine = check_world_affine(value, "moving_world_affine")

    @property
    def has_moving_frame(self) -> bool:
        """Whether a moving frame was given (else it is the fixed frame, whatever that becomes)."""
        return self._moving_spacing is not None or self._moving_world_affine is not None

    def fixed_frame(self) -> np.ndarray:
        """``(D+1, D+1)``: fixed voxel coordinates (napari order) -> LPS physical coordinates."""
        return frame_to_lps(self.world_affine, self.spacing, self.ndim)

    def moving_frame(self) -> np.ndarray:
        """``(D+1, D+1)``: moving voxel coordinates (napari order) -> LPS physical coordinates."""
        return frame_to_lps(self.moving_world_affine, self.moving_spacing, self.ndim)

    def frame_kwargs(self, swap: bool = False) -> dict[str, Any]:
        """Constructor keywords giving another transform these frames (``swap``: for an inverse)."""
        if not self.has_moving_frame:
            return {"spacing": self.spacing, "world_affine": self.world_affine}
        fixed = (self.spacing, self.world_affine)
        mw = self.moving_world_affine
        moving = (self.moving_spacing, mw if mw is not None else default_world_affine(self.moving_spacing))
        (sp, wa), (msp, mwa) = (moving, fixed) if swap else (fixed, moving)
        if mwa is None:  # explicit, so that it is not re-derived from the other frame
            mwa = default_world_affine(msp)
        return {"spacing": sp, "world_affine": wa, "moving_spacing": msp, "moving_world_affine": mwa}

    def for_moving_image(self, spacing=None, world_affine=None) -> Transform:
        """This physical map in the voxel coordinates of another image of the moving space.

        For an image (labels at another resolution, another channel) whose frame is ``spacing``
        (napari order) and/or ``world_affine`` instead of this transform's moving frame. With only
        ``spacing``, the image lies where the moving image lies (``moving_world_affine`` rescaled,
        or ``diag(spacing)`` at origin 0, which is how napari places a layer of that ``scale``).
        Returns ``self`` when nothing differs.
        """
        if spacing is None and world_affine is None:
            return self
        world = check_world_affine(world_affine, "world_affine")
        if spacing is None:  # the voxel size of the given affine (column lengths), napari order
            spacing = tuple(float(v) for v in np.linalg.norm(world[:3, : self.ndim], axis=0)[::-1])
        spacing = check_spacing(spacing, self.ndim)
        if world is None and self.moving_world_affine is not None:
            world = rescaled_world_affine(self.moving_world_affine, spacing)
        target = frame_to_lps(world, spacing, self.ndim)
        change = np.linalg.inv(target) @ self.moving_frame()  # our moving voxels -> image voxels
        if np.array_equal(change, np.eye(self.ndim + 1)):
            return self
        frames = self.frame_kwargs()
        frames.update(moving_spacing=spacing, moving_world_affine=world)
        if frames["moving_world_affine"] is None:
            frames["moving_world_affine"] = default_world_affine(spacing)
        if isinstance(self, AffineTransform):
            return AffineTransform(change @ self.matrix, shape=self.shape, settings=self.settings, **frames)
        step = AffineTransform(
            change,
            spacing=self.moving_spacing,
            world_affine=self.moving_world_affine,
            moving_spacing=frames["moving_spacing"],
            moving_world_affine=frames["moving_world_affine"],
        )
        return ComposedTransform([self, step], shape=self.shape, settings=self.settings, **frames)

    # -- the one method a kind must provide -------------------------------------------
    def _map(self, points: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_points(self, points: torch.Tensor) -> torch.Tensor:
        if points.shape[-1] != self.ndim:
            raise DimensionMismatchError(
                f"Points have {points.shape[-1]} coordinates but the transform is {self.ndim}D."
            )
        return points

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        """Map a torch tensor of fixed voxel points ``(N, D)`` to moving voxel points."""
        return self._map(self._check_points(points))

    # -- derived operations --------------------------------------------------------------
    def _out_shape(self, shape, fallback=None, what: str = "shape") -> tuple[int, ...]:
        if shape is not None:
            return check_grid_shape(shape, self.ndim, what)
        shape = self.shape if self.shape is not None else fallback
        if shape is None:
            raise InputError(f"This transform has no grid of its own; pass the {what}.")
        return check_grid_shape(shape, self.ndim, "shape")

    def map_points(
        self, points, device: str | torch.device = "cpu", *, image_spacing=None, image_world_affine=None
    ) -> np.ndarray:
        """Map fixed-grid points ``(N, D)`` (napari order, voxel units) into the moving image.

        ``image_spacing`` / ``image_world_affine``: return voxel coordinates of an image of the
        moving space whose frame differs from the moving frame (see :meth:`for_moving_image`).
        """
        pts = np.asarray(points, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != self.ndim:
            raise DimensionMismatchError(f"Points must be an (N, {self.ndim}) array, got shape {pts.shape}.")
        t = self.for_moving_image(image_spacing, image_world_affine)
        return _warp.map_points_chunked(pts, t, choose_device(device))

    def displacement(
        self, shape: Sequence[int] | None = None, device: str | torch.device = "cpu"
    ) -> np.ndarray:
        """``phi(x) - x`` on every voxel of ``shape`` (default: the fixed grid), ``(D, *shape)``.

        Raises :class:`OutOfMemoryError` up front when the dense field cannot fit in memory.
        """
        shape = self._out_shape(shape)
        check_dense_memory(shape)
        return _warp.displacement_field(self, shape, choose_device(device))

    def warp(
        self,
        image,
        output_shape: Sequence[int] | None = None,
        device: str | torch.device = "cpu",
        *,
        image_spacing=None,
        image_world_affine=None,
        cancel=None,
        progress=None,
    ) -> np.ndarray:
        """Resample a moving image (channels last allowed) onto the fixed grid, linearly.

        ``image`` is taken to lie in the moving frame; give ``image_spacing`` (napari order) and/or
        ``image_world_affine`` when it has another (e.g. the same anatomy at another voxel size).
        ``cancel`` (a ``threading.Event`` or a callable returning True to stop) is checked before
        each chunk of the output; once set, :class:`~napari_nephi.core.errors.Cancelled` is raised
        (anything else: :class:`InputError`). None (the default) leaves the warp as it was.
        ``progress`` (a callable or None) receives ``(done, total)`` chunks of the output: ``(0,
        total)`` before the first, then after each one (a GUI's progress bar). None: as before.
        """
        img = np.asarray(image)
        channels = img.shape[-1] if _warp.channels_last(img.shape, self.ndim) else 1
        out_shape = self._out_shape(output_shape, img.shape[: self.ndim], "output_shape")
        check_output_memory(out_shape, channels, 4, "warped image", _WARP_ADVICE, extra=4.0 * img.size)
        t = self.for_moving_image(image_spacing, image_world_affine)
        return _warp.warp_image(
            img, t, self.ndim, out_shape, choose_device(device), cancel=cancel, progress=progress
        )

    def warp_labels(
        self,
        labels,
        output_shape: Sequence[int] | None = None,
        device: str | torch.device = "cpu",
        *,
        image_spacing=None,
        image_world_affine=None,
        cancel=None,
        progress=None,
    ) -> np.ndarray:
        """Resample moving labels onto the fixed grid by nearest neighbour; dtype and values kept.

        ``image_spacing`` / ``image_world_affine`` / ``cancel`` / ``progress``: as for :meth:`warp`.
        """
        lab = np.asarray(labels)
        if lab.ndim != self.ndim:
            raise DimensionMismatchError(
                f"Cannot warp labels of shape {lab.shape} ({lab.ndim}D) with a {self.ndim}D transform; "
                f"give {self.ndim}D labels of the moving image."
            )
        out_shape = self._out_shape(output_shape, lab.shape, "output_shape")
        check_output_memory(out_shape, 1, lab.dtype.itemsize, "warped labels", _WARP_ADVICE)
        t = self.for_moving_image(image_spacing, image_world_affine)
        return _warp.warp_labels(
            lab, t, self.ndim, out_shape, choose_device(device), cancel=cancel, progress=progress
        )

    def inverse(self) -> Transform:
        """The inverse map (moving -> fixed coordinates), where it exists."""
        raise NotImplementedError(f"A {self.kind} transform has no inverse.")

    def then(self, other: Transform) -> ComposedTransform:
        """``x -> other(self(x))``: apply this map, then ``other``."""
        return ComposedTransform([self, other])

    # -- persistence ---------------------------------------------------------------------
    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """JSON-able parameters and named arrays of this kind."""
        raise NotImplementedError

    def common_state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "ndim": self.ndim,
            "shape": list(self.shape) if self.shape is not None else None,
            "spacing": list(self.spacing),
            "world_affine": None if self.world_affine is None else self.world_affine.tolist(),
            "moving_shape": list(self.moving_shape) if self.moving_shape is not None else None,
            # only a frame that was given is written: an implicit one follows the fixed frame
            "moving_spacing": list(self.moving_spacing) if self.has_moving_frame else None,
            "moving_world_affine": None
            if self.moving_world_affine is None or not self.has_moving_frame
            else self.moving_world_affine.tolist(),
        }

    def save(self, path) -> None:
        """Write this transform to a folder (see :mod:`napari_nephi.core.transform_io`)."""
        from .transform_io import save_transform

        save_transform(self, path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ndim={self.ndim}, shape={self.shape})"


class IdentityTransform(Transform):
    kind = "identity"

    def _map(self, points):
        return points

    def inverse(self):
        return IdentityTransform(
            self.ndim, self.moving_shape, moving_shape=self.shape, **self.frame_kwargs(swap=True)
        )

    def _state(self):
        return {}, {}


class AffineTransform(Transform):
    """``phi(x) = A x + t`` with a homogeneous ``(D+1, D+1)`` matrix in voxel coordinates."""

    kind = "affine"

    def __init__(self, matrix, ndim: int | None = None, **kwargs):
        m = np.asarray(matrix, dtype=np.float64)
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise InputError(f"An affine matrix must be square, got shape {m.shape}.")
        if not np.all(np.isfinite(m)):
            raise InputError("The affine matrix holds NaN or infinite values.")
        d = m.shape[0] - 1
        if ndim is not None and ndim != d:
            raise DimensionMismatchError(f"A {d + 1}x{d + 1} matrix is not a {ndim}D affine.")
        super().__init__(d, **kwargs)
        self.matrix = m

    def _map(self, points):
        a = torch.as_tensor(self.matrix[:-1, :-1], dtype=points.dtype, device=points.device)
        t = torch.as_tensor(self.matrix[:-1, -1], dtype=points.dtype, device=points.device)
        return points @ a.T + t

    def inverse(self):
        if abs(np.linalg.det(self.matrix[:-1, :-1])) < 1e-12:
            raise InputError("This affine is singular and has no inverse.")
        return AffineTransform(
            np.linalg.inv(self.matrix),
            shape=self.moving_shape,
            moving_shape=self.shape,
            **self.frame_kwargs(swap=True),
        )

    def _state(self):
        return {"matrix": self.matrix.tolist()}, {}


class DisplacementTransform(Transform):
    """``phi(x) = x + u(x)`` with a dense field ``u`` of shape ``(D, *shape)`` in voxel units.

    ``x`` is a fixed voxel and ``x + u(x)`` a moving voxel, so when the two frames differ ``u`` is
    a moving voxel coordinate minus a fixed one. Between voxels ``u`` is interpolated linearly;
    outside the grid the border value is used. ``inverse_field``, when given (e.g. a backward
    NePhi field), is returned by :meth:`inverse`: it lives on the moving grid (``moving_shape``,
    which it sets when not given) and maps moving voxels to fixed voxels.
    """

    kind = "displacement"

    def __init__(self, field, inverse_field=None, **kwargs):
        f = np.asarray(field, dtype=np.float32)
        if f.ndim < 2 or f.shape[0] != f.ndim - 1:
            raise InputError(
                f"A displacement field must have shape (D, *shape) with D = len(shape), got {f.shape}."
            )
        if not np.all(np.isfinite(f)):
            raise InputError("The displacement field holds NaN or infinite values.")
        kwargs.setdefault("shape", f.shape[1:])
        inv = None
        if inverse_field is not None:
            inv = np.asarray(inverse_field, dtype=np.float32)
            if inv.ndim != f.ndim or inv.shape[0] != f.shape[0]:
                raise DimensionMismatchError(
                    f"inverse_field must have shape (D, *moving_shape) with D = {f.shape[0]}, "
                    f"got {inv.shape}."
                )
            if not np.all(np.isfinite(inv)):
                raise InputError("The inverse displacement field holds NaN or infinite values.")
            if kwargs.get("moving_shape") is None:
                kwargs["moving_shape"] = inv.shape[1:]
        super().__init__(f.shape[0], **kwargs)
        if tuple(f.shape[1:]) != self.shape:
            raise DimensionMismatchError(f"Field grid {f.shape[1:]} differs from shape {self.shape}.")
        if inv is not None and tuple(inv.shape[1:]) != self.moving_shape:
            raise DimensionMismatchError(
                f"inverse_field grid {inv.shape[1:]} differs from moving_shape {self.moving_shape}."
            )
        self.field = f
        self.inverse_field = inv
        self._cache: dict = {}

    def _field_on(self, device, dtype) -> torch.Tensor:
        key = (str(device), dtype)
        tensor = self._cache.get(key)
        if tensor is None:  # one device at a time; safe when threads use different devices
            tensor = torch.as_tensor(self.field, device=device, dtype=dtype)
            self._cache = {key: tensor}
        return tensor

    def _map(self, points):
        u = self._field_on(points.device, points.dtype)
        upper = torch.as_tensor(self.shape, dtype=points.dtype, device=points.device) - 1
        inside = torch.minimum(torch.clamp(points, min=0), upper)  # border extension
        disp = _warp.sample(u, inside).T
        return points + disp

    def displacement(
        self, shape: Sequence[int] | None = None, device: str | torch.device = "cpu"
    ) -> np.ndarray:
        """The stored field itself on its own grid (no resampling); elsewhere as for any transform."""
        if shape is None or check_grid_shape(shape, self.ndim) == self.shape:
            return self.field.copy()
        return super().displacement(shape, device)

    def inverse(self, iterations: int = 30) -> DisplacementTransform:
        """The stored backward field, or a numerical inverse by fixed-point iteration."""
        if self.inverse_field is not None:
            inv = self.inverse_field
        elif not self.has_moving_frame and self.moving_shape in (None, self.shape):
            with memory_guard("numerical inverse"):
                inv = invert_field(self.field, iterations)
        else:  # on the moving grid, preconditioned by the affine part of the map
            with memory_guard("numerical inverse"):
                inv = _invert_map(self, self.moving_shape or self.shape, _affine_fit(self), iterations)
        return DisplacementTransform(
            inv, inverse_field=self.field, moving_shape=self.shape, **self.frame_kwargs(swap=True)
        )

    def _state(self):
        arrays = {"displacement": self.field}
        if self.inverse_field is not None:
            arrays["inverse_displacement"] = self.inverse_field
        return {}, arrays


def invert_field(field: np.ndarray, iterations: int = 30, tol: float = 1e-4) -> np.ndarray:
    """Solve ``v(y) = -u(y + v(y))`` by fixed-point iteration, so ``(x+u) o (y+v) = id``.

    Converges for fields whose Jacobian stays away from folds (``|grad u| < 1``).
    """
    d = field.shape[0]
    fwd = DisplacementTransform(field)
    y = identity_grid(field.shape[1:]).reshape(-1, d)
    v = -torch.as_tensor(field).reshape(d, -1).T
    with torch.no_grad():
        for _ in range(iterations):
            new = y + v - fwd._map(y + v)
            done = float((new - v).abs().max()) < tol
            v = new
            if done:
                break
    return v.T.reshape(field.shape).numpy().astype(np.float32)


def _affine_fit(t: Transform, max_points: int = 4096) -> np.ndarray:
    """Least-squares homogeneous affine of ``t`` on a lattice of its grid (at most ``max_points``)."""
    shape = np.asarray(t._out_shape(None))
    step = max(1, int(np.ceil((shape.prod() / max_points) ** (1.0 / t.ndim))))
    axes = [np.arange(0, n, step, dtype=np.float64) for n in shape]
    x = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, t.ndim)
    with torch.no_grad():
        y = t._map(torch.as_tensor(x, dtype=torch.float32)).numpy().astype(np.float64)
    sol = np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=None)[0].T
    return np.vstack([sol, np.r_[np.zeros(t.ndim), 1.0]])


def _invert_map(
    t: Transform, shape, frame: np.ndarray, iterations: int = 30, tol: float = 1e-4
) -> np.ndarray:
    """Inverse of ``t`` on a (moving) grid ``shape``: ``v(y)`` with ``t(y + v(y)) = y``.

    Fixed-point iteration preconditioned by ``frame``, a homogeneous affine approximation of ``t``
    (fixed voxel -> moving voxel): converges while ``t`` stays close to it (no folds, the
    non-affine part's gradient below 1).
    """
    d = t.ndim
    y = identity_grid(shape).reshape(-1, d)
    inv = np.linalg.inv(frame)
    lin = torch.as_tensor(inv[:d, :d], dtype=torch.float32)
    x = y @ lin.T + torch.as_tensor(inv[:d, d], dtype=torch.float32)
    with torch.no_grad():
        for _ in range(iterations):
            new = x + (y - t._map(x)) @ lin.T
            done = float((new - x).abs().max()) < tol
            x = new
            if done:
                break
    return (x - y).T.reshape((d, *shape)).numpy().astype(np.float32)


class ComposedTransform(Transform):
    """``x -> t_n(...t_2(t_1(x)))``: the first transform in the list is applied first."""

    kind = "composed"

    def __init__(self, transforms: Sequence[Transform], **kwargs):
        ts = list(transforms)
        if not ts:
            raise InputError("A composed transform needs at least one transform.")
        nd = {t.ndim for t in ts}
        if len(nd) != 1:
            raise DimensionMismatchError(f"Cannot compose transforms of dimensions {sorted(nd)}.")
        kwargs.setdefault("shape", ts[0].shape)
        kwargs.setdefault("spacing", ts[0].spacing)
        kwargs.setdefault("world_affine", ts[0].world_affine)
        kwargs.setdefault("moving_shape", ts[-1].moving_shape)
        if any(t.has_moving_frame for t in ts):  # the first part's fixed frame, the last part's moving frame
            last = ts[-1].frame_kwargs()
            kwargs.setdefault("moving_spacing", last.get("moving_spacing", last["spacing"]))
            mw = last.get("moving_world_affine", last["world_affine"])
            kwargs.setdefault(
                "moving_world_affine", mw if mw is not None else default_world_affine(last["spacing"])
            )
        super().__init__(ts[0].ndim, **kwargs)
        self.transforms = ts

    def _map(self, points):
        for t in self.transforms:
            points = t._map(points)
        return points

    def inverse(self):
        grids = {"shape": self.moving_shape, "moving_shape": self.shape}
        return ComposedTransform(
            [t.inverse() for t in reversed(self.transforms)],
            **{k: v for k, v in grids.items() if v is not None},
            **self.frame_kwargs(swap=True),
        )

    def _state(self):
        return {"count": len(self.transforms)}, {}


class PerSectionTransform(Transform):
    """One 2D homogeneous map per section of a ``(n, y, x)`` stack.

    ``matrices[k]`` (3x3, (y, x) order) maps aligned section coordinates to original section
    coordinates of section ``k`` (a pull-back, perspective division included). The section axis
    is not moved: a point in section ``z`` samples section ``round(z)``.
    """

    kind = "per_section"

    def __init__(self, matrices, **kwargs):
        m = np.asarray(matrices, dtype=np.float64)
        if m.ndim != 3 or m.shape[1:] != (3, 3):
            raise InputError(f"Per-section matrices must have shape (n, 3, 3), got {m.shape}.")
        if not np.all(np.isfinite(m)):
            raise InputError("Per-section matrices hold NaN or infinite values.")
        super().__init__(3, **kwargs)
        if self.shape is not None and self.shape[0] != m.shape[0]:
            raise DimensionMismatchError(f"{m.shape[0]} matrices for a stack of {self.shape[0]} sections.")
        self.matrices = m

    def _map(self, points):
        n = self.matrices.shape[0]
        k = torch.floor(points[:, 0] + 0.5).long().clamp(0, n - 1)
        m = torch.as_tensor(self.matrices, dtype=points.dtype, device=points.device)[k]
        h = torch.cat([points[:, 1:], torch.ones_like(points[:, :1])], dim=1)
        yx = torch.einsum("nij,nj->ni", m, h)
        yx = yx[:, :2] / yx[:, 2:3]
        return torch.cat([points[:, :1], yx], dim=1)

    def section(self, k: int) -> AffineTransform | Transform:
        """The 2D transform of section ``k``."""
        return _Homography2D(self.matrices[k])

    def inverse(self):
        return PerSectionTransform(
            np.linalg.inv(self.matrices),
            shape=self.moving_shape or self.shape,
            moving_shape=self.shape,
            **self.frame_kwargs(swap=True),
        )

    def _state(self):
        return {}, {"matrices": self.matrices}


class ElasticSectionTransform(PerSectionTransform):
    """Per-section maps with a smooth displacement of every section before its matrix.

    A point ``p = (y, x)`` of aligned section ``k`` is first moved by ``fields[k]`` (bilinear
    on a coarse grid whose ``(gh, gw)`` nodes span the section, node ``(i, j)`` at
    ``(i (H - 1) / (gh - 1), j (W - 1) / (gw - 1))``; values ``(dy, dx)`` in aligned pixels),
    then mapped by ``matrices[k]`` as in :class:`PerSectionTransform`:
    ``phi(k, p) = matrices[k] (p + fields[k](p))``. The grid needs the stack ``shape``.
    Zero fields give exactly the per-section transform. Warps stay per section (lazy).
    """

    kind = "per_section_elastic"

    def __init__(self, matrices, fields, **kwargs):
        super().__init__(matrices, **kwargs)
        f = np.asarray(fields, dtype=np.float32)
        n = self.matrices.shape[0]
        if f.ndim != 4 or f.shape[0] != n or f.shape[3] != 2 or min(f.shape[1:3]) < 2:
            raise InputError(f"Section fields must have shape ({n}, gh >= 2, gw >= 2, 2), got {f.shape}.")
        if not np.all(np.isfinite(f)):
            raise InputError("Section fields hold NaN or infinite values.")
        if self.shape is None:
            raise InputError("An elastic per-section transform needs the stack shape (n, y, x).")
        self.fields = f

    def field_at(self, k: int, points: np.ndarray) -> np.ndarray:
        """Displacement ``(N, 2)`` of section ``k`` at aligned points ``(N, 2)`` (y, x), bilinear."""
        return _bilinear(self.fields[k], np.asarray(points, dtype=np.float64), self.shape[1:])

    def _map(self, points):
        pts = points.detach().cpu().numpy().astype(np.float64)
        n = self.matrices.shape[0]
        k = np.clip(np.floor(pts[:, 0] + 0.5).astype(np.int64), 0, n - 1)
        moved = pts.copy()
        for sec in np.unique(k):
            sel = k == sec
            moved[sel, 1:] += self.field_at(int(sec), pts[sel, 1:])
        return super()._map(torch.as_tensor(moved, dtype=points.dtype, device=points.device))

    def section(self, k: int) -> Transform:
        """The 2D transform of section ``k`` (field, then matrix)."""
        return _ElasticSection2D(self.matrices[k], self.fields[k], self.shape[1:])

    def inverse(self):
        raise NotImplementedError("An elastic per-section transform has no inverse.")

    def _state(self):
        return {}, {"matrices": self.matrices, "section_fields": self.fields}


def _bilinear(field: np.ndarray, points: np.ndarray, shape) -> np.ndarray:
    """``field`` ``(gh, gw, 2)`` on a grid spanning ``shape``, sampled at ``points`` (y, x); edges clamped."""
    gh, gw = field.shape[:2]
    gy = np.clip(points[:, 0] * (gh - 1) / max(shape[0] - 1, 1), 0, gh - 1)
    gx = np.clip(points[:, 1] * (gw - 1) / max(shape[1] - 1, 1), 0, gw - 1)
    y0, x0 = np.minimum(gy.astype(np.int64), gh - 2), np.minimum(gx.astype(np.int64), gw - 2)
    fy, fx = (gy - y0)[:, None], (gx - x0)[:, None]
    f = field.astype(np.float64)
    return (
        f[y0, x0] * (1 - fy) * (1 - fx) + f[y0 + 1, x0] * fy * (1 - fx)
        + f[y0, x0 + 1] * (1 - fy) * fx + f[y0 + 1, x0 + 1] * fy * fx
    )  # fmt: skip


class _ElasticSection2D(Transform):
    kind = "elastic_section"

    def __init__(self, matrix, field, shape):
        super().__init__(2, shape=shape)
        self.matrix, self.field = np.asarray(matrix, dtype=np.float64), field

    def _map(self, points):
        pts = points.detach().cpu().numpy().astype(np.float64)
        moved = pts + _bilinear(self.field, pts, self.shape)
        return _Homography2D(self.matrix)._map(
            torch.as_tensor(moved, dtype=points.dtype, device=points.device)
        )


class _Homography2D(Transform):
    kind = "homography"

    def __init__(self, matrix):
        super().__init__(2)
        self.matrix = np.asarray(matrix, dtype=np.float64)

    def _map(self, points):
        m = torch.as_tensor(self.matrix, dtype=points.dtype, device=points.device)
        h = torch.cat([points, torch.ones_like(points[:, :1])], dim=1) @ m.T
        return h[:, :2] / h[:, 2:3]
