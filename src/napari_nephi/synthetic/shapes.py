"""Triangles and circles: the synthetic 2D registration set of the ICON / GradICON / NePhi papers.

ICON (uncbiag/ICON, ``icon_registration.data.get_dataset_triangles``) draws one triangle or
circle per image, with ``tanh`` edges, from the signed "radial distance"
``|p - c| - r cos(pi/3) / cos(((atan2(p - c) + theta) mod 2pi/3) - pi/3)``. This module mimics
that drawing and follows the richer variant used for demos: a large smooth elliptical *body*
holding several smaller circles and triangles of different intensities, with a label map.

Label values (:data:`TC_LABELS`): 0 background, 1 body, 2 circle, 3 triangle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..core.errors import InputError

__all__ = ["TC_LABELS", "triangles_and_circles", "tc_pair"]

#: Label value -> structure name of :func:`triangles_and_circles` and :func:`tc_pair`.
TC_LABELS = {0: "background", 1: "body", 2: "circle", 3: "triangle"}

_EDGE_PX = 0.8  # tanh edge half-width in pixels


@dataclass
class _Shape:
    kind: int  # 2 circle, 3 triangle
    pos: np.ndarray  # centre in the body frame (unit disk)
    radius: float  # circumradius as a fraction of the body's short semi-axis
    angle: float
    intensity: float


@dataclass
class _Scene:
    centre: np.ndarray  # (y, x) in units of the image size
    axes: np.ndarray  # semi-axes (a_y, a_x) before rotation, units of the image size
    angle: float
    intensity: float
    shapes: list = field(default_factory=list)


def _random_scene(rng: np.random.Generator) -> _Scene:
    scene = _Scene(
        centre=0.5 + rng.uniform(-0.04, 0.04, 2),
        axes=rng.uniform(0.30, 0.42, 2),
        angle=rng.uniform(-np.pi, np.pi),
        intensity=rng.uniform(0.35, 0.5),
    )
    n_shapes = int(rng.integers(3, 6))
    tries = 0
    while len(scene.shapes) < n_shapes and tries < 200:
        tries += 1
        # at least one circle and one triangle; a triangle's circumradius is drawn larger
        kind = 2 + len(scene.shapes) % 2 if len(scene.shapes) < 2 else int(rng.integers(2, 4))
        radius = rng.uniform(0.18, 0.3) if kind == 2 else rng.uniform(0.26, 0.38)
        rmax = 0.9 - radius
        pos = rng.uniform(-rmax, rmax, 2)
        if np.hypot(*pos) > rmax:
            continue
        if any(np.hypot(*(pos - s.pos)) < radius + s.radius + 0.06 for s in scene.shapes):
            continue
        scene.shapes.append(_Shape(kind, pos, radius, rng.uniform(0, 2 * np.pi), rng.uniform(0.65, 1.0)))
    return scene


def _jitter(scene: _Scene, rng: np.random.Generator, strength: float) -> _Scene:
    """The same structures, moved, resized and turned a little: a non-rigid variation."""
    out = _Scene(
        centre=scene.centre + rng.uniform(-0.03, 0.03, 2) * strength,
        axes=scene.axes * (1 + rng.uniform(-0.1, 0.1, 2) * strength),
        angle=scene.angle + rng.uniform(-0.25, 0.25) * strength,
        intensity=scene.intensity,
    )
    for s in scene.shapes:
        radius = s.radius * (1 + rng.uniform(-0.12, 0.12) * strength)
        pos = s.pos + rng.uniform(-0.08, 0.08, 2) * strength
        rmax = 0.9 - radius
        norm = np.hypot(*pos)
        if norm > rmax:
            pos = pos * (rmax / norm)
        out.shapes.append(
            _Shape(s.kind, pos, radius, s.angle + rng.uniform(-0.4, 0.4) * strength, s.intensity)
        )
    return out


def _render(scene: _Scene, size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    y = (y + 0.5) / size
    x = (x + 0.5) / size
    c, s = np.cos(scene.angle), np.sin(scene.angle)
    dy, dx = y - scene.centre[0], x - scene.centre[1]
    # body frame: rotate, then divide by the semi-axes; the body is the unit disk there
    by = (c * dy + s * dx) / scene.axes[0]
    bx = (-s * dy + c * dx) / scene.axes[1]
    short = float(scene.axes.min())
    # approximate signed distance in pixels (exact on the short axis)
    sd_body = (np.hypot(by, bx) - 1.0) * short * size
    image = np.zeros((size, size))
    labels = np.zeros((size, size), dtype=np.uint8)

    def paint(sd_px, value, label):
        alpha = 0.5 * (1.0 - np.tanh(sd_px / _EDGE_PX))
        image[...] = image * (1 - alpha) + value * alpha
        labels[sd_px < 0] = label

    paint(sd_body, scene.intensity, 1)
    for sh in scene.shapes:
        # the centre comes from the body frame; the shape itself is drawn in image space so
        # that circles stay round and triangles equilateral
        cy = scene.centre[0] + c * sh.pos[0] * scene.axes[0] - s * sh.pos[1] * scene.axes[1]
        cx = scene.centre[1] + s * sh.pos[0] * scene.axes[0] + c * sh.pos[1] * scene.axes[1]
        r = sh.radius * short
        py, px = y - cy, x - cx
        dist = np.hypot(py, px)
        if sh.kind == 2:
            sd = dist - r
        else:  # ICON's triangle: radial distance to an equilateral triangle of circumradius r
            ang = (np.arctan2(px, py) + sh.angle) % (2 * np.pi / 3) - np.pi / 3
            sd = (dist - r * np.cos(np.pi / 3) / np.cos(ang)) * np.cos(ang)
        paint(sd * size, sh.intensity, sh.kind)
    return image.astype(np.float32), labels


def _check(size: int) -> int:
    size = int(size)
    if size < 16:
        raise InputError(f"size must be at least 16 pixels, got {size}.")
    return size


def triangles_and_circles(n: int = 1, size: int = 128, seed: int | None = 0):
    """``n`` random triangles-and-circles images with their label maps.

    Each image holds a smooth elliptical body (intensity 0.35-0.5) on a 0 background, with 3-5
    circles and equilateral triangles (intensity 0.65-1.0) drawn fully inside it; edges are
    ``tanh`` ramps about a pixel wide, as in ICON. Deterministic for a given ``seed``.

    Returns
    -------
    images : ``(n, size, size)`` float32 in [0, 1]
    labels : ``(n, size, size)`` uint8, values of :data:`TC_LABELS` (a pixel belongs to the
        topmost structure whose outline contains its centre).
    """
    n = int(n)
    if n < 1:
        raise InputError(f"n must be at least 1, got {n}.")
    size = _check(size)
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size), dtype=np.float32)
    labels = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        images[i], labels[i] = _render(_random_scene(rng), size)
    return images, labels


def tc_pair(seed: int | None = 0, size: int = 128, strength: float = 1.0):
    """A fixed/moving triangles-and-circles pair with corresponding structures.

    ``moving`` shows the same body and the same circles and triangles as ``fixed`` (same count,
    kinds and intensities), each moved, resized and turned independently, so the two are related
    by a smooth non-rigid map and labels correspond (a registration should carry
    ``moving_labels`` onto ``fixed_labels``). ``strength`` scales the variation (0: identical).

    Returns ``fixed, moving, fixed_labels, moving_labels``: two ``(size, size)`` float32 images
    and two uint8 label maps (values of :data:`TC_LABELS`).
    """
    size = _check(size)
    rng = np.random.default_rng(seed)
    scene = _random_scene(rng)
    fixed, fixed_labels = _render(scene, size)
    moving, moving_labels = _render(_jitter(scene, rng, float(strength)), size)
    return fixed, moving, fixed_labels, moving_labels
