"""Coarse exhaustive start for the affine engine: rotations on a grid, translations by FFT.

For every candidate rotation the moving image is resampled onto a small fixed grid and the
translation with the best masked normalised cross-correlation is found for all shifts at once
with FFTs (Padfield, "Masked object registration in the Fourier domain", IEEE TIP 2012).
"""

from __future__ import annotations

import numpy as np
import torch


def rotation_candidates(d: int, step_deg: float) -> list[np.ndarray]:
    """The identity first, then rotations by multiples of about ``step_deg`` in each plane of two axes.

    In 3D these are rotations about each main axis (z, y and x).
    """
    n = max(2, int(round(360.0 / step_deg)))
    angles = [2 * np.pi * k / n for k in range(1, n)]
    planes = [(0, 1)] if d == 2 else [(1, 2), (0, 2), (0, 1)]
    out = [np.eye(d)]
    for i, j in planes:
        for a in angles:
            r = np.eye(d)
            r[i, i] = r[j, j] = np.cos(a)
            r[i, j], r[j, i] = -np.sin(a), np.sin(a)
            out.append(r)
    return out


def rotation_angle(a: np.ndarray, b: np.ndarray) -> float:
    """Angle in degrees of the rotation ``a^T b`` (the linear parts' closest rotations need not be exact)."""
    d = a.shape[0]
    cos = (np.trace(a.T @ b) - (d - 2)) / 2.0
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def pick_distinct(
    scores: list[float], rotations: list[np.ndarray], count: int, min_angle: float
) -> list[int]:
    """Index 0 (the start without rotation) and the best-scoring others at least ``min_angle`` apart,
    ``count`` in all; then one more: the best start within ``min_angle`` of index 0, where it scores
    higher than index 0 (index 0 blocks it above, whatever it scores).

    The extra start is added, not swapped in: on coins turned by 20 degrees the +15-degree start
    scores best of all and was never refined; taking the slot of a far start instead loses a turn of
    143 degrees on the MRI (session 25).
    """
    order = np.argsort(-np.asarray(scores), kind="stable")
    picked = [0]
    for i in order:
        if len(picked) >= count:
            break
        if all(rotation_angle(rotations[i], rotations[j]) >= min_angle for j in picked):
            picked.append(int(i))
    for i in order:
        if scores[i] <= scores[0]:
            break
        if i not in picked and rotation_angle(rotations[i], rotations[0]) < min_angle:
            picked.append(int(i))
            break
    return picked


def masked_ncc(f: torch.Tensor, fw: torch.Tensor, m: torch.Tensor, mw: torch.Tensor) -> float:
    """NCC of ``f`` and ``m`` over the voxels where both weights are set (float64)."""
    w = (fw * mw).to(torch.float64)
    n = float(w.sum())
    if n < 16:
        return -1.0
    a, b = f.to(torch.float64), m.to(torch.float64)
    a = a - (w * a).sum() / n
    b = b - (w * b).sum() / n
    den = float(((w * a * a).sum() * (w * b * b).sum()).sqrt())
    return float((w * a * b).sum()) / den if den > 0 else -1.0


class ShiftSearch:
    """Masked NCC of a fixed image against moving images for every integer shift, by FFT.

    The fixed side's transforms are computed once; :meth:`best` takes one moving image (on the
    fixed grid, zero where ``moving_weight`` is 0) and returns the best shift ``s`` (voxels, numpy
    order, ``moving(x + s) ~ fixed(x)``) and its NCC. Shifts are searched up to half the image
    per axis; those overlapping less than ``min_overlap`` of the smaller image are ignored.
    Images are centred first, so float32 transforms keep the variances accurate.
    """

    def __init__(self, fixed: torch.Tensor, fixed_weight: torch.Tensor, min_overlap: float = 0.25):
        self.shape = tuple(fixed.shape)
        self.pad = [n + (n + 1) // 2 for n in self.shape]  # exact for |shift| <= pad - n
        w = fixed_weight.to(torch.float32)
        f = fixed.to(torch.float32)
        f = (f - (f * w).sum() / w.sum()) * w
        self.f0, self.f1, self.f2 = (self._fft(x) for x in (w, f, f * f))
        self.fixed_count = float(w.sum())
        self.min_overlap = min_overlap
        allowed = torch.ones(self.pad, dtype=torch.bool, device=fixed.device)
        for axis, (n, p) in enumerate(zip(self.shape, self.pad)):
            bad = torch.zeros(p, dtype=torch.bool, device=fixed.device)
            bad[p - n + 1 : n] = True  # would wrap around: neither a valid positive nor negative shift
            view = [1] * len(self.shape)
            view[axis] = p
            allowed &= ~bad.reshape(view)
        self.allowed = allowed

    def _fft(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfftn(x, s=self.pad)

    def _corr(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.fft.irfftn(torch.conj(a) * b, s=self.pad)

    def best(
        self, moving: torch.Tensor, moving_weight: torch.Tensor, either_sign: bool = False
    ) -> tuple[np.ndarray, float]:
        """Best shift and its NCC (``|NCC|`` with ``either_sign``, for inverted contrast)."""
        w = moving_weight.to(torch.float32)
        count = float(w.sum())
        if count < 16:
            return np.zeros(len(self.shape)), -1.0
        m = moving.to(torch.float32)
        m = (m - (m * w).sum() / count) * w
        m0, m1, m2 = (self._fft(x) for x in (w, m, m * m))
        n = self._corr(self.f0, m0)
        sf, sm = self._corr(self.f1, m0), self._corr(self.f0, m1)
        n_safe = n.clamp_min(1.0)
        cov = self._corr(self.f1, m1) - sf * sm / n_safe
        vf = self._corr(self.f2, m0) - sf * sf / n_safe
        vm = self._corr(self.f0, m2) - sm * sm / n_safe
        need = max(self.min_overlap * min(self.fixed_count, count), 16.0)
        ok = self.allowed & (n > need) & (vf > 1e-4 * n_safe) & (vm > 1e-4 * n_safe)
        score = cov / (vf.clamp_min(1e-12) * vm.clamp_min(1e-12)).sqrt()
        score = torch.where(ok, score.abs() if either_sign else score, -2.0)
        k = int(torch.argmax(score))
        idx = np.array(np.unravel_index(k, score.shape))
        pad = np.asarray(self.pad)
        shift = np.where(idx < np.asarray(self.shape), idx, idx - pad)
        return shift.astype(float), float(score.reshape(-1)[k])
