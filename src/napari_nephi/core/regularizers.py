"""Regularisers of deformation maps, on point sets (autograd or finite differences) or dense grids.

A *map* is a callable taking points ``(..., N, D)`` and returning their images ``(..., N, D)``,
e.g. ``phi(x) = x + u(x)`` of a neural deformation field; it must be differentiable in the points
(twice for the gradient of a Jacobian-based loss, three times for bending energy by autograd).
Every point-set regulariser returns a scalar tensor that can be minimised; 2D and 3D alike.

- :func:`gradicon`: ``|| d(phi_inv o phi)/dx - I ||_F^2``, symmetrised (GradICON, Tian et al. 2023).
- :func:`jacobian_determinant_loss`: penalise ``det J <= 0`` and either ``log(det J)^2`` (``"log"``,
  symmetric in expansion and contraction) or ``|1 - det J|`` (``"abs"``, IDIR).
- :func:`bending_energy`: the sum of squared second derivatives of the map.
- :func:`diffusion`: ``|| J - I ||_F^2``, the squared gradient of the displacement.
- :func:`cycle_consistency`: ``|| phi_inv(phi(x)) - x ||^2``, symmetrised.

``*_grid`` functions evaluate diffusion and bending energy of dense displacement fields
``(B, D, *spatial)`` by finite differences, for voxel-based stages.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import InputError

Map = Callable[[torch.Tensor], torch.Tensor]

METHODS = ("autograd", "fd")


def _check(x: torch.Tensor) -> int:
    d = x.shape[-1]
    if d not in (2, 3) or x.dim() < 2:
        raise InputError(f"Points must have shape (..., N, 2) or (..., N, 3), got {tuple(x.shape)}.")
    return d


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise InputError(f"Unknown derivative method {method!r}; choose 'autograd' or 'fd'.")


def _grad(out: torch.Tensor, x: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """``d out.sum() / d x``; zero where ``out`` does not depend on ``x`` (e.g. a linear map's gradient)."""
    if not out.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(
        out.sum(), x, create_graph=create_graph, retain_graph=True, allow_unused=True, materialize_grads=True
    )
    return g


def jacobian(
    fn: Map,
    x: torch.Tensor,
    method: str = "autograd",
    h: float = 1e-3,
    create_graph: bool = True,
) -> torch.Tensor:
    """``J[..., n, i, j] = d fn_i / d x_j`` at the points ``x`` ``(..., N, D)``.

    ``method="autograd"`` differentiates exactly (``create_graph`` keeps the graph, so a loss on
    ``J`` can be back-propagated to the parameters of ``fn``); ``"fd"`` uses central differences
    of step ``h`` (in the units of ``x``), which needs only first derivatives of ``fn``.
    """
    d = _check(x)
    _check_method(method)
    if method == "fd":
        eye = torch.eye(d, dtype=x.dtype, device=x.device) * h
        shifted = torch.cat([x[..., None, :, :] + s * eye[:, None, :] for s in (1.0, -1.0)], dim=-3)
        y = fn(shifted.reshape(*x.shape[:-2], 2 * d * x.shape[-2], d))
        y = y.reshape(*x.shape[:-2], 2, d, x.shape[-2], d)
        cols = (y[..., 0, :, :, :] - y[..., 1, :, :, :]) / (2 * h)  # (..., j, N, i)
        return cols.permute(*range(cols.dim() - 3), -2, -1, -3)
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        y = fn(xg)
        rows = [_grad(y[..., i], xg, create_graph) for i in range(d)]
    return torch.stack(rows, dim=-2)


def hessian(fn: Map, x: torch.Tensor, method: str = "autograd", h: float = 1e-2) -> torch.Tensor:
    """``H[..., n, i, j, k] = d^2 fn_i / d x_j d x_k`` at the points ``x`` ``(..., N, D)``."""
    d = _check(x)
    _check_method(method)
    if method == "fd":
        return _hessian_fd(fn, x, h)
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        y = fn(xg)
        out = []
        for i in range(d):
            g = _grad(y[..., i], xg, True)
            out.append(torch.stack([_grad(g[..., j], xg, True) for j in range(d)], dim=-2))
    return torch.stack(out, dim=-3)


def _hessian_fd(fn: Map, x: torch.Tensor, h: float) -> torch.Tensor:
    d = x.shape[-1]
    eye = torch.eye(d, dtype=x.dtype, device=x.device) * h
    offsets = [torch.zeros(d, dtype=x.dtype, device=x.device)]
    for j in range(d):
        offsets += [eye[j], -eye[j]]
    pairs = [(j, k) for j in range(d) for k in range(j + 1, d)]
    for j, k in pairs:
        offsets += [eye[j] + eye[k], eye[j] - eye[k], -eye[j] + eye[k], -eye[j] - eye[k]]
    off = torch.stack(offsets)  # (M, D)
    pts = x[..., None, :, :] + off[:, None, :]
    n = x.shape[-2]
    y = fn(pts.reshape(*x.shape[:-2], len(offsets) * n, d)).reshape(*x.shape[:-2], len(offsets), n, d)
    centre = y[..., 0, :, :]
    entries = {}
    for j in range(d):
        entries[(j, j)] = (y[..., 1 + 2 * j, :, :] - 2 * centre + y[..., 2 + 2 * j, :, :]) / h**2
    base = 1 + 2 * d
    for p, (j, k) in enumerate(pairs):
        pp, pm, mp, mm = (y[..., base + 4 * p + q, :, :] for q in range(4))
        entries[(j, k)] = entries[(k, j)] = (pp - pm - mp + mm) / (4 * h**2)
    rows = [torch.stack([entries[(j, k)] for k in range(d)], dim=-1) for j in range(d)]
    return torch.stack(rows, dim=-2)  # (..., N, i, j, k)


def _identity_like(j: torch.Tensor) -> torch.Tensor:
    return torch.eye(j.shape[-1], dtype=j.dtype, device=j.device)


def gradicon(
    forward: Map,
    backward: Map,
    x: torch.Tensor,
    method: str = "autograd",
    h: float = 1e-3,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetrised GradICON: mean of ``||J_{backward o forward}(x) - I||_F^2`` and the converse.

    ``y`` (default ``x``) are the points where ``forward o backward`` is checked.
    """
    y = x if y is None else y

    def ab(p):
        return backward(forward(p))

    def ba(p):
        return forward(backward(p))

    ja = jacobian(ab, x, method, h)
    jb = jacobian(ba, y, method, h)
    eye = _identity_like(ja)
    return 0.5 * (((ja - eye) ** 2).sum((-2, -1)).mean() + ((jb - eye) ** 2).sum((-2, -1)).mean())


def determinant(j: torch.Tensor) -> torch.Tensor:
    """Determinant of ``(..., D, D)`` matrices, D = 2 or 3, written out (differentiable any order)."""
    if j.shape[-1] == 2:
        return j[..., 0, 0] * j[..., 1, 1] - j[..., 0, 1] * j[..., 1, 0]
    return (
        j[..., 0, 0] * (j[..., 1, 1] * j[..., 2, 2] - j[..., 1, 2] * j[..., 2, 1])
        - j[..., 0, 1] * (j[..., 1, 0] * j[..., 2, 2] - j[..., 1, 2] * j[..., 2, 0])
        + j[..., 0, 2] * (j[..., 1, 0] * j[..., 2, 1] - j[..., 1, 1] * j[..., 2, 0])
    )


def jacobian_determinant_loss(
    fn: Map,
    x: torch.Tensor,
    mode: str = "log",
    eps: float = 0.05,
    fold_weight: float = 10.0,
    method: str = "autograd",
    h: float = 1e-3,
) -> torch.Tensor:
    """Penalty on the Jacobian determinant of ``fn`` at ``x``.

    ``mode="log"``: ``log(max(det, eps))^2``, equal for a volume doubled or halved; ``"abs"``:
    ``|1 - det|`` (IDIR). Both add ``fold_weight * relu(eps - det) / eps``, which is large where
    the map folds (``det <= 0``) and keeps pushing there even where the first term is flat.
    """
    if mode not in ("log", "abs"):
        raise InputError(f"Unknown Jacobian penalty mode {mode!r}; choose 'log' or 'abs'.")
    det = determinant(jacobian(fn, x, method, h))
    if mode == "log":
        main = torch.log(det.clamp_min(eps)) ** 2
    else:
        main = (1 - det).abs()
    return (main + fold_weight * torch.relu(eps - det) / eps).mean()


def diffusion(fn: Map, x: torch.Tensor, method: str = "autograd", h: float = 1e-3) -> torch.Tensor:
    """Mean ``||J - I||_F^2``: the squared gradient of the displacement ``fn(x) - x``."""
    j = jacobian(fn, x, method, h)
    return ((j - _identity_like(j)) ** 2).sum((-2, -1)).mean()


def bending_energy(fn: Map, x: torch.Tensor, method: str = "autograd", h: float = 1e-2) -> torch.Tensor:
    """Mean over points of the sum of squared second derivatives ``d^2 fn_i / d x_j d x_k``."""
    return (hessian(fn, x, method, h) ** 2).sum((-3, -2, -1)).mean()


def cycle_consistency(
    forward: Map, backward: Map, x: torch.Tensor, y: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared distance of ``backward(forward(x))`` to ``x`` and of ``forward(backward(y))`` to ``y``."""
    _check(x)
    y = x if y is None else y
    a = ((backward(forward(x)) - x) ** 2).sum(-1).mean()
    b = ((forward(backward(y)) - y) ** 2).sum(-1).mean()
    return 0.5 * (a + b)


REGULARIZERS = ("gradicon", "jacobian", "symmetric_jacobian", "bending", "diffusion", "cycle")


# -- dense fields ------------------------------------------------------------------------


def _grid_diffs(u: torch.Tensor, spacing=None) -> list[torch.Tensor]:
    d = u.dim() - 2
    if d not in (2, 3) or u.shape[1] != d:
        raise InputError(f"Expected a (B, D, *spatial) displacement with D = 2 or 3, got {tuple(u.shape)}.")
    sp = [1.0] * d if spacing is None else list(spacing)
    return [torch.diff(u, dim=2 + a) / sp[a] for a in range(d)]


def diffusion_grid(u: torch.Tensor, spacing=None) -> torch.Tensor:
    """Voxel mean of ``||grad u||_F^2`` by forward differences, ``u`` ``(B, D, *spatial)``."""
    return sum((g**2).sum(1).mean() for g in _grid_diffs(u, spacing))


def bending_grid(u: torch.Tensor, spacing=None) -> torch.Tensor:
    """Voxel mean of the summed squared second differences (pure and mixed) of ``u`` ``(B, D, *spatial)``."""
    d = u.dim() - 2
    sp = [1.0] * d if spacing is None else list(spacing)
    total = 0.0
    for a, g in enumerate(_grid_diffs(u, spacing)):
        for b in range(d):
            w = 1.0 if a == b else 2.0
            total = total + w * ((torch.diff(g, dim=2 + b) / sp[b]) ** 2).sum(1).mean()
    return total
