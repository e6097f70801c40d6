"""The neural deformation field: a forward and a backward map sharing one latent code.

``phi(x) = x + f(x, z(x))`` with ``z(x) = [global code, local code grid interpolated at x]``
(hybrid conditioning). ``f`` is one coordinate network per direction (:mod:`.mlp`); the latent codes
come from an encoder (prediction) or are free parameters (instance optimisation). Coordinates are
normalised [-1, 1] in the image's axis order; points are batched ``(B, N, D)``.

With ``FieldConfig.bspline_intervals`` set (SINR, Song et al.), ``f`` is evaluated only on a grid of
control points and the displacement at ``x`` is the cubic B-spline interpolation of those control
displacements (:mod:`.bspline`): C2 by construction, smooth on the scale of the knot spacing. The
control displacements of a direction are computed once per set of parameters and codes and reused
by every call until the parameters change or a backward pass goes through them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from ...core.errors import InputError
from .bspline import bspline_interpolate, control_points
from .interp import interpolate
from .mlp import REPRESENTATIONS, build_network

DIRECTIONS = ("forward", "backward")


@dataclass
class FieldConfig:
    """Everything needed to rebuild a field (stored with trained weights)."""

    ndim: int
    representation: str = "modulated"
    hidden: int = 64
    layers: int = 3
    n_frequencies: int = 32
    fourier_scale: float = 2.0
    omega: float = 30.0
    first_omega: float = 8.0
    global_dim: int = 32
    local_dim: int = 8
    seed: int = 0
    #: Cubic B-spline smoothing (SINR): knot intervals per axis across the domain, or None (off).
    bspline_intervals: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.ndim not in (2, 3):
            raise InputError(f"A deformation field is 2D or 3D, not {self.ndim}D.")
        k = self.bspline_intervals
        if k is not None and not isinstance(k, (int, float)) and len(k) == 0:
            k = None
        if k is not None:
            k = (k,) * self.ndim if isinstance(k, (int, float)) else tuple(k)
            if len(k) != self.ndim or any(int(v) != v or v < 1 for v in k):
                raise InputError(
                    f"bspline_intervals must be {self.ndim} positive integers (knot intervals per axis), "
                    f"got {self.bspline_intervals!r}."
                )
            k = tuple(int(v) for v in k)
        self.bspline_intervals = k
        if self.representation not in REPRESENTATIONS:
            raise InputError(
                f"Unknown representation {self.representation!r}; choose one of {', '.join(REPRESENTATIONS)}."
            )
        if self.hidden < 1 or self.layers < 1:
            raise InputError("hidden and layers must be positive.")

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.bspline_intervals is not None:
            out["bspline_intervals"] = list(self.bspline_intervals)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> FieldConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Codes:
    """Latent codes of a batch of pairs: global ``(B, G)`` and a local grid ``(B, L, *grid)``."""

    global_code: torch.Tensor
    local_code: torch.Tensor | None

    def detach_clone(self) -> Codes:
        loc = None if self.local_code is None else self.local_code.detach().clone()
        return Codes(self.global_code.detach().clone(), loc)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.global_code, self.local_code) if t is not None]


def local_grid_shape(shape, stride: int = 8, minimum: int = 2) -> tuple[int, ...]:
    """Size of a local code grid with about one code every ``stride`` voxels."""
    return tuple(max(minimum, -(-int(n) // int(stride)) + 1) for n in shape)


def zero_codes(cfg: FieldConfig, grid_shape, batch: int = 1, device="cpu") -> Codes:
    glob = torch.zeros(batch, cfg.global_dim, device=device)
    loc = torch.zeros(batch, cfg.local_dim, *grid_shape, device=device) if cfg.local_dim > 0 else None
    return Codes(glob, loc)


class _ControlCache(dict):
    """Cached control displacements; never copied or pickled (they may carry an autograd graph)."""

    def __deepcopy__(self, memo):
        return _ControlCache()

    def __reduce__(self):
        return (_ControlCache, ())


class NeuralDeformationField(nn.Module):
    """Forward and backward networks; ``map(x, codes, direction) = x + f_direction(x, z(x))``."""

    def __init__(self, cfg: FieldConfig):
        super().__init__()
        self.cfg = cfg
        latent = cfg.global_dim + cfg.local_dim

        def net(seed):
            return build_network(
                cfg.representation,
                cfg.ndim,
                latent,
                cfg.hidden,
                cfg.layers,
                cfg.n_frequencies,
                cfg.fourier_scale,
                cfg.omega,
                cfg.first_omega,
                seed,
            )

        self.forward_net = net(cfg.seed)
        self.backward_net = net(cfg.seed + 7919)
        self._control_cache = _ControlCache()

    def latent(self, x: torch.Tensor, codes: Codes) -> torch.Tensor | None:
        """``z(x)``: ``(B, N, G + L)``."""
        parts = []
        b, n = x.shape[:2]
        if codes.global_code is not None and codes.global_code.shape[-1] > 0:
            parts.append(codes.global_code[:, None, :].expand(b, n, -1))
        if codes.local_code is not None and codes.local_code.shape[1] > 0:
            parts.append(interpolate(codes.local_code, x))
        if not parts:
            return None
        return torch.cat(parts, dim=-1).to(x.dtype)

    def displacement(self, x: torch.Tensor, codes: Codes, direction: str = "forward") -> torch.Tensor:
        if direction not in DIRECTIONS:
            raise InputError(f"direction must be 'forward' or 'backward', not {direction!r}.")
        net = self.forward_net if direction == "forward" else self.backward_net
        if self.cfg.bspline_intervals is not None:
            return bspline_interpolate(self.control_displacements(codes, direction, x.dtype, x.device), x)
        return net(x, self.latent(x, codes))

    def control_displacements(self, codes: Codes, direction: str, dtype, device) -> torch.Tensor:
        """The network's displacement on the B-spline control grid, ``(B, D, *control_shape)``.

        Cached per direction: reused while the parameters, buffers and code tensors are the same
        objects with the same storage, version counters (an optimiser step or ``load_state_dict``
        bumps them) and ``requires_grad``, and grad mode, dtype and device match. A backward pass
        through the cached tensor frees its graph, so a hook drops the cache then.
        """
        net = self.forward_net if direction == "forward" else self.backward_net
        tensors = [*net.parameters(), *net.buffers(), *codes.tensors()]
        try:
            state = tuple((t.data_ptr(), t._version, t.requires_grad) for t in tensors)
        except RuntimeError:  # inference-mode tensors have no version counter: no caching
            state = None
        key = (torch.is_grad_enabled(), dtype, torch.device(device), state)
        hit = self._control_cache.get(direction)
        if (
            state is not None
            and hit is not None
            and hit[0] == key
            and all(a is b for a, b in zip(hit[1], tensors))
        ):
            return hit[2]
        self._control_cache.pop(direction, None)
        pts = control_points(self.cfg.bspline_intervals, device=device, dtype=dtype)
        shape = pts.shape[:-1]
        b = max(t.shape[0] for t in codes.tensors()) if codes.tensors() else 1
        flat = pts.reshape(1, -1, self.cfg.ndim).expand(b, -1, -1)
        disp = net(flat, self.latent(flat, codes))  # (B, M, D)
        control = disp.transpose(1, 2).reshape(b, self.cfg.ndim, *shape)
        if state is not None:
            if control.requires_grad:
                control.register_hook(self._drop_cache)
            self._control_cache[direction] = (key, tensors, control)
        return control

    def _drop_cache(self, grad):
        self._control_cache.clear()
        return grad

    def map(self, x: torch.Tensor, codes: Codes, direction: str = "forward") -> torch.Tensor:
        return x + self.displacement(x, codes, direction)
