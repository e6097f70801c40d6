"""Parameterisations of ``y = A x + t`` in centred physical coordinates, one per kind.

Parameters start at zero and perturb a starting map ``(base, shift)``, so a rotation found by the
search is refined rather than re-learnt: ``A = P @ base`` where ``P`` is a rotation (``rigid``),
a scaled rotation (``similarity``) or ``I + delta`` (``affine``); ``t = shift + extent * p_t``.
Translations are optimised in units of ``extent`` so every parameter moves the image by a
comparable amount.
"""

from __future__ import annotations

import numpy as np
import torch

KINDS = ("translation", "rigid", "similarity", "affine")


class LinearMap(torch.nn.Module):
    """A linear map of one ``kind`` with float64 parameters; :meth:`matrix` is homogeneous."""

    def __init__(self, d: int, kind: str, extent: float, base=None, shift=None, device=None):
        super().__init__()
        f64 = {"dtype": torch.float64, "device": device}
        self.d, self.kind, self.extent = d, kind, float(extent)
        base = np.eye(d) if base is None or kind == "translation" else np.asarray(base, float)
        self.register_buffer("base", torch.as_tensor(base, **f64))
        self.register_buffer("shift", torch.as_tensor(np.zeros(d) if shift is None else shift, **f64))
        self.t = torch.nn.Parameter(torch.zeros(d, **f64))
        if kind in ("rigid", "similarity"):
            self.rot = torch.nn.Parameter(torch.zeros(1 if d == 2 else 3, **f64))
        if kind == "similarity":
            self.log_scale = torch.nn.Parameter(torch.zeros(1, **f64))
        if kind == "affine":
            self.delta = torch.nn.Parameter(torch.zeros(d, d, **f64))

    def linear(self) -> torch.Tensor:
        """The ``(D, D)`` matrix ``A``."""
        if self.kind == "translation":
            return self.base
        if self.kind == "affine":
            return (torch.eye(self.d, dtype=torch.float64, device=self.base.device) + self.delta) @ self.base
        r = _rotation(self.rot, self.d)
        if self.kind == "similarity":
            r = r * torch.exp(self.log_scale)
        return r @ self.base

    def matrix(self) -> torch.Tensor:
        """Homogeneous ``(D + 1, D + 1)`` float64 matrix of ``y = A x + t``."""
        d = self.d
        top = torch.cat([self.linear(), (self.shift + self.t * self.extent)[:, None]], 1)
        bottom = torch.zeros(1, d + 1, dtype=torch.float64, device=top.device)
        bottom[0, d] = 1
        return torch.cat([top, bottom], 0)


def _rotation(rot: torch.Tensor, d: int) -> torch.Tensor:
    if d == 2:
        c, s = torch.cos(rot[0]), torch.sin(rot[0])
        return torch.stack([torch.stack([c, -s]), torch.stack([s, c])])
    zero = torch.zeros((), dtype=rot.dtype, device=rot.device)
    skew = torch.stack(
        [
            torch.stack([zero, -rot[0], -rot[1]]),
            torch.stack([rot[0], zero, -rot[2]]),
            torch.stack([rot[1], rot[2], zero]),
        ]
    )
    return torch.linalg.matrix_exp(skew)
