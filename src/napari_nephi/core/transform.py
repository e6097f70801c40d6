"""Transforms: pull-back maps from fixed voxel coordinates to moving voxel coordinates.

Every kind implements ``_map(points)`` on a torch tensor ``(N, D)``; everything else
(dense displacement, warping images and labels, mapping points, composition) follows from it.
The warped moving image at ``x`` is ``moving(phi(x))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import warp as _warp
from .errors import DimensionMismatchError, InputError
from .grid import check_spacing, identity_grid


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
    ):
        self.ndim = int(ndim)
        self.shape = tuple(int(s) for s in shape) if shape is not None else None
        if self.shape is not None and len(self.shape) != self.ndim:
            raise DimensionMismatchError(f"shape {self.shape} does not have {self.ndim} axes.")
        self.spacing = check_spacing(spacing, self.ndim)
        self.settings = dict(settings or {})
        #: 4x4 NIfTI affine (index i,j,k -> RAS mm) of the fixed image, when known.
        self.world_affine = None if world_affine is None else np.asarray(world_affine, float)

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
    def _out_shape(self, shape, fallback=None) -> tuple[int, ...]:
        shape = shape if shape is not None else self.shape
        if shape is None:
            shape = fallback
        if shape is None:
            raise InputError("This transform has no grid of its own; pass the output shape.")
        shape = tuple(int(s) for s in shape)
        if len(shape) != self.ndim:
            raise DimensionMismatchError(
                f"Shape {shape} has {len(shape)} axes but the transform is {self.ndim}D."
            )
        return shape

    def map_points(self, points, device: str | torch.device = "cpu") -> np.ndarray:
        """Map fixed-grid points ``(N, D)`` (napari order, voxel units) into the moving image."""
        pts = np.asarray(points, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != self.ndim:
            raise DimensionMismatchError(f"Points must be an (N, {self.ndim}) array, got shape {pts.shape}.")
        return _warp.map_points_chunked(pts, self, device)

    def displacement(
        self, shape: Sequence[int] | None = None, device: str | torch.device = "cpu"
    ) -> np.ndarray:
        """``phi(x) - x`` on every voxel of ``shape`` (default: the fixed grid), ``(D, *shape)``."""
        return _warp.displacement_field(self, self._out_shape(shape), device)

    def warp(
        self,
        image,
        output_shape: Sequence[int] | None = None,
        device: str | torch.device = "cpu",
    ) -> np.ndarray:
        """Resample a moving image (channels last allowed) onto the fixed grid, linearly."""
        img = np.asarray(image)
        spatial = img.shape[: self.ndim]
        return _warp.warp_image(img, self, self.ndim, self._out_shape(output_shape, spatial), device)

    def warp_labels(
        self,
        labels,
        output_shape: Sequence[int] | None = None,
        device: str | torch.device = "cpu",
    ) -> np.ndarray:
        """Resample moving labels onto the fixed grid by nearest neighbour; dtype and values kept."""
        lab = np.asarray(labels)
        return _warp.warp_labels(lab, self, self.ndim, self._out_shape(output_shape, lab.shape), device)

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
        return IdentityTransform(self.ndim, self.shape, self.spacing, world_affine=self.world_affine)

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
            np.linalg.inv(self.matrix), spacing=self.spacing, world_affine=self.world_affine
        )

    def _state(self):
        return {"matrix": self.matrix.tolist()}, {}


class DisplacementTransform(Transform):
    """``phi(x) = x + u(x)`` with a dense field ``u`` of shape ``(D, *shape)`` in voxel units.

    Between voxels ``u`` is interpolated linearly; outside the grid the border value is used.
    ``inverse_field``, when given (e.g. a backward NePhi field), is returned by :meth:`inverse`.
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
        super().__init__(f.shape[0], **kwargs)
        if tuple(f.shape[1:]) != self.shape:
            raise DimensionMismatchError(f"Field grid {f.shape[1:]} differs from shape {self.shape}.")
        self.field = f
        self.inverse_field = None
        if inverse_field is not None:
            inv = np.asarray(inverse_field, dtype=np.float32)
            if inv.shape != f.shape:
                raise DimensionMismatchError(
                    f"inverse_field shape {inv.shape} differs from field shape {f.shape}."
                )
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
        if shape is None or tuple(int(n) for n in shape) == self.shape:
            return self.field.copy()
        return super().displacement(shape, device)

    def inverse(self, iterations: int = 30) -> DisplacementTransform:
        """The stored backward field, or a numerical inverse by fixed-point iteration."""
        if self.inverse_field is not None:
            inv = self.inverse_field
        else:
            inv = invert_field(self.field, iterations)
        return DisplacementTransform(
            inv, inverse_field=self.field, spacing=self.spacing, world_affine=self.world_affine
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
        super().__init__(ts[0].ndim, **kwargs)
        self.transforms = ts

    def _map(self, points):
        for t in self.transforms:
            points = t._map(points)
        return points

    def inverse(self):
        return ComposedTransform([t.inverse() for t in reversed(self.transforms)])

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
        return PerSectionTransform(np.linalg.inv(self.matrices), shape=self.shape, spacing=self.spacing)

    def _state(self):
        return {}, {"matrices": self.matrices}


class _Homography2D(Transform):
    kind = "homography"

    def __init__(self, matrix):
        super().__init__(2)
        self.matrix = np.asarray(matrix, dtype=np.float64)

    def _map(self, points):
        m = torch.as_tensor(self.matrix, dtype=points.dtype, device=points.device)
        h = torch.cat([points, torch.ones_like(points[:, :1])], dim=1) @ m.T
        return h[:, :2] / h[:, 2:3]
