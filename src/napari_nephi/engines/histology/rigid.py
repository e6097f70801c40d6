"""Rigid/similarity pre-alignment of two slides at low resolution: any rotation, mirrored slides.

1. Both stain channels are reduced to one common pixel size (longest side :data:`SEARCH_SIZE`).
2. Every rotation on a grid of ``angle_step`` degrees, unmirrored and mirrored (and a second scale
   when the tissue areas say so), is scored for every translation at once by FFT cross-correlation
   of a contrast-invariant representation: normalised gradient fields compared by the squared dot
   product of their directions, which expands into three cross-correlations of the products of
   gradient components (CSNGF, Öfverstedt et al., WBIR 2022). Edges match whatever their contrast.
3. The best distinct hypotheses are refined at :data:`WORK_SIZE` by the ``affine`` engine (rigid or
   similarity, masked NCC; again by NMI when even the best then scores below
   :data:`MULTIMODAL_SCORE`, as channels of different stains do) and the winner is the one with
   the best similarity on the tissue (mean of masked NCC of the stain channels and the NGF
   similarity). A refined map whose scale left the searched scales by more than :data:`SCALE_SLACK`
   is not accepted (its hypothesis is kept unrefined): from a wrong start the refinement can shrink
   the map onto a small patch of the moving slide, which scored above the right map (session 46).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ...core.errors import InputError
from ...core.options import check_bool, check_float
from ...core.progress import Progress
from ...core.transform import AffineTransform
from ..affine.levels import grid_sample_frame, zoom_frame
from ..affine.search import masked_ncc
from .stain import _check_image, _check_values, choose_stain_channels, tissue_mask

__all__ = ["RigidResult", "rigid_prealign", "DEFAULT_ANGLE_STEP", "SCALE_SLACK", "SEARCH_SIZE", "WORK_SIZE"]

#: Longest side (pixels) of the grid of the exhaustive rotation search, and of the refinement.
SEARCH_SIZE = 96
WORK_SIZE = 256
DEFAULT_ANGLE_STEP = 5.0
#: Distinct hypotheses refined after the search.
REFINED = 3
#: Hypotheses scoring below this fraction of the best search score are not refined.
REFINE_FRACTION = 0.75
#: Random points per level of the affine engine's loss (a rigid map needs few).
REFINE_SAMPLES = 8192
#: Below this best score (after NCC refinement) the hypotheses are refined again by NMI.
MULTIMODAL_SCORE = 0.6
#: Rotations resampled per batch of the search (bounds its memory).
BATCH = 24
#: A refined map is accepted only if its scale lies within this factor of the searched scales' range;
#: otherwise its hypothesis is kept unrefined. From a wrong start the refinement (by mutual information
#: above all) can shrink the map until the whole fixed slide samples a small patch of the moving one,
#: which the tissue similarity can score above the right map (``math.inf``: no bound). Its limits: the
#: range follows the searched scales, so when the tissue areas add a second scale (0.5-2) the bound
#: widens with it (down to 0.33 at 0.5: a collapse to 0.38 would then be kept); and a true scale more
#: than 1.5x from every searched scale (tissue areas misled by a partial overlap) is refused.
SCALE_SLACK = 1.5


@dataclass
class RigidResult:
    """The pre-alignment found: ``matrix`` maps fixed pixel ``(y, x)`` to moving pixel ``(y, x)``.

    ``matrix`` is 3x3 homogeneous at the pixel size of the images given; ``angle`` (degrees, 0-360,
    counter-clockwise as displayed), ``flipped`` (the moving slide is mirrored: ``x`` flipped
    before the rotation) and ``scale`` (moving pixels per fixed pixel) describe it; ``score`` is
    its similarity on the tissue (higher is better); ``candidates`` lists the refined hypotheses
    as ``(angle, flipped, score)``, best first.
    """

    matrix: np.ndarray
    angle: float
    flipped: bool
    scale: float
    score: float
    candidates: list[tuple[float, bool, float]] = field(default_factory=list)
    fixed_shape: tuple[int, int] | None = None
    moving_shape: tuple[int, int] | None = None
    kind: str = ""

    def transform(self, fixed_downsample: float = 1.0, moving_downsample: float = 1.0) -> AffineTransform:
        """The map as an :class:`~napari_nephi.AffineTransform` (2D).

        ``fixed_downsample`` / ``moving_downsample``: level-0 pixels per pixel of the images given;
        with them the transform maps level-0 fixed pixels to level-0 moving pixels (pixel ``i`` of
        a level is centred on level-0 coordinate ``(i + 0.5) * downsample - 0.5``, the pyramid
        convention of :mod:`napari_nephi.core.lazy_warp` and :mod:`napari_nephi.io.slides`).
        """
        fd = check_float("fixed_downsample", fixed_downsample, 0.0, 1e6, low_open=True)
        md = check_float("moving_downsample", moving_downsample, 0.0, 1e6, low_open=True)
        m = _to_level0(md) @ self.matrix @ np.linalg.inv(_to_level0(fd))

        def level0(shape, d):
            return None if shape is None else tuple(int(round(n * d)) for n in shape)

        return AffineTransform(
            m,
            ndim=2,
            shape=level0(self.fixed_shape, fd),
            moving_shape=level0(self.moving_shape, md),
            settings={"angle": self.angle, "flipped": self.flipped, "scale": self.scale},
        )


def _to_level0(d: float) -> np.ndarray:
    """Pixels of a level downsampled ``d`` times -> level-0 pixels (centres of a 2x2-mean pyramid)."""
    return np.array([[d, 0.0, (d - 1) / 2], [0.0, d, (d - 1) / 2], [0.0, 0.0, 1.0]])


def decompose(matrix: np.ndarray) -> tuple[float, bool, float]:
    """``(angle in degrees 0-360, flipped, scale)`` of a 2D similarity ``s R(angle) F``."""
    lin = np.asarray(matrix, float)[:2, :2]
    det = float(np.linalg.det(lin))
    flipped = det < 0
    scale = math.sqrt(abs(det))
    rot = lin @ np.diag([1.0, -1.0]) if flipped else lin
    angle = math.degrees(math.atan2(rot[1, 0], rot[0, 0])) % 360.0
    return (0.0 if angle > 360.0 - 1e-6 else angle), flipped, scale


def _linear(angle: float, flipped: bool, scale: float) -> np.ndarray:
    a = math.radians(angle)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return scale * rot @ (np.diag([1.0, -1.0]) if flipped else np.eye(2))


@dataclass
class _Image:
    """A stain channel and its tissue mask on a grid ``zoom`` times coarser than the input."""

    channel: np.ndarray
    mask: np.ndarray
    zoom: np.ndarray  # input pixels per grid pixel, per axis

    @classmethod
    def reduce(cls, channel: np.ndarray, mask: np.ndarray, factor: float, zoom=1.0) -> _Image:
        """Area-averaged by ``factor``; ``zoom``: input pixels per pixel of ``channel``."""
        small = _area_resize(channel, factor)
        m = _area_resize(mask.astype(np.float32), factor) > 0.5
        rel = np.asarray(channel.shape, float) / np.asarray(small.shape, float)
        return cls(small.astype(np.float32), m, rel * np.asarray(zoom, float))

    @property
    def frame(self) -> np.ndarray:
        """Homogeneous map of grid pixels to input pixels."""
        return zoom_frame(self.zoom)


def _area_resize(image: np.ndarray, factor: float) -> np.ndarray:
    """``image`` (channels last allowed) shrunk by ``factor`` by area averaging (a copy)."""
    import cv2

    if factor <= 1.0:
        return np.array(image, dtype=np.float32)
    h, w = image.shape[:2]
    size = (max(8, int(round(w / factor))), max(8, int(round(h / factor))))
    return cv2.resize(np.ascontiguousarray(image, dtype=np.float32), size, interpolation=cv2.INTER_AREA)


def _reduced_unit(arr: np.ndarray, top: float, factor: float) -> np.ndarray:
    """A checked slide (:func:`~.stain._check_values`) area-reduced by ``factor``, ``/ top``, in [0, 1].

    Float32 throughout: the only full-size copy is the float32 one that OpenCV needs of integer
    input (none of float32 input); scaling and clipping happen on the reduced image.
    """
    if arr.dtype.kind == "f" and float(arr.min()) < 0:  # clipped before averaging, as before
        arr = np.clip(arr, 0.0, None, dtype=np.float32)
    small = _area_resize(arr, factor)
    small /= np.float32(top)
    return np.clip(small, 0.0, 1.0, out=small)


def _ngf(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalised gradient field ``(N, 2, H, W)`` of ``(N, 1, H, W)``, zero outside ``mask``."""
    img = image
    gy = torch.zeros_like(img)
    gx = torch.zeros_like(img)
    gy[..., 1:-1, :] = (img[..., 2:, :] - img[..., :-2, :]) / 2
    gx[..., :, 1:-1] = (img[..., :, 2:] - img[..., :, :-2]) / 2
    g = torch.cat([gy, gx], dim=1) * mask
    mag2 = (g * g).sum(dim=1, keepdim=True)
    n_in = mask.sum(dim=(1, 2, 3), keepdim=True).clamp_min(1.0)
    eps = (mag2.sqrt().sum(dim=(1, 2, 3), keepdim=True) / n_in).clamp_min(1e-6)
    return g / torch.sqrt(mag2 + eps * eps)


def _tensor_features(n: torch.Tensor) -> torch.Tensor:
    """``(ny^2, sqrt(2) ny nx, nx^2)``: their dot product is ``(n_a . n_b)^2``."""
    ny, nx = n[:, :1], n[:, 1:]
    return torch.cat([ny * ny, math.sqrt(2.0) * ny * nx, nx * nx], dim=1)


def _smooth(a: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    return ndimage.gaussian_filter(a.astype(np.float32), sigma)


def _soft_mask(mask: np.ndarray) -> np.ndarray:
    return ndimage.binary_dilation(mask, iterations=2).astype(np.float32)


class _Search:
    """FFT cross-correlation of the fixed image's NGF tensor features with rotated moving ones."""

    def __init__(self, fixed: _Image, moving: _Image, scales: list[float]):
        self.fixed, self.moving = fixed, moving
        self.scales = scales
        hm, wm = moving.channel.shape
        self.side = int(math.ceil(math.hypot(hm, wm) / min(scales))) + 2
        self.pad = tuple(_fft_size(n + self.side) for n in fixed.channel.shape)
        f = torch.from_numpy(_smooth(fixed.channel))[None, None]
        fm = torch.from_numpy(_soft_mask(fixed.mask))[None, None]
        tf = _tensor_features(_ngf(f, fm))
        self.f_energy = float((tf * tf).sum())
        self.f_fft = torch.fft.rfft2(tf, s=self.pad)
        self.mov = torch.from_numpy(_smooth(moving.channel))[None, None]
        self.mov_mask = torch.from_numpy(_soft_mask(moving.mask))[None, None]

    def rotated(self, linears: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
        """Moving image and mask pulled onto a ``side x side`` grid by each linear map.

        The maps are in input pixels; on the grids they are ``Zm^-1 L Zf`` (the two images' zooms
        may differ slightly by rounding), so a rotation stays a rotation of the slides."""
        c_g = (self.side - 1) / 2.0
        c_m = (np.asarray(self.moving.channel.shape, float) - 1) / 2.0
        to_unit = grid_sample_frame(self.moving.channel.shape)
        from_grid = np.linalg.inv(grid_sample_frame((self.side, self.side)))
        thetas, maps = [], []
        zf, zm = self.fixed.zoom, self.moving.zoom
        for lin in linears:
            lin = np.diag(1.0 / zm) @ lin @ np.diag(zf)
            m = np.eye(3)
            m[:2, :2] = lin
            m[:2, 2] = c_m - lin @ [c_g, c_g]
            maps.append(m)
            u = to_unit @ m @ from_grid  # grid_sample wants (x, y) order
            thetas.append(u[[1, 0]][:, [1, 0, 2]])
        theta = torch.tensor(np.stack(thetas), dtype=torch.float32)
        grid = F.affine_grid(theta, (len(linears), 1, self.side, self.side), align_corners=True)
        img = F.grid_sample(self.mov.expand(len(linears), -1, -1, -1), grid, align_corners=True)
        msk = F.grid_sample(self.mov_mask.expand(len(linears), -1, -1, -1), grid, align_corners=True)
        return img, (msk > 0.5).float(), maps

    def best(self, linears: list[np.ndarray]) -> list[tuple[float, np.ndarray]]:
        """For each linear map: the best score and the fixed-grid -> moving-grid matrix."""
        img, msk, maps = self.rotated(linears)
        tg = _tensor_features(_ngf(img, msk))
        energy = (tg * tg).sum(dim=(1, 2, 3))
        corr = torch.fft.irfft2((torch.conj(self.f_fft) * torch.fft.rfft2(tg, s=self.pad)).sum(1), s=self.pad)
        # normalised by the whole images' energies, so a small overlap cannot score high
        score = corr / torch.sqrt(energy * self.f_energy).clamp_min(1e-12)[:, None, None]
        out = []
        flat = score.reshape(len(linears), -1)
        best = torch.argmax(flat, dim=1)
        for k, idx in enumerate(best.tolist()):
            iy, ix = divmod(idx, self.pad[1])
            # circular index -> shift: 0 .. side-1 are positive, the top of the range negative
            shift = np.array(
                [i if i < self.side else i - p for i, p in ((iy, self.pad[0]), (ix, self.pad[1]))], float
            )
            # fixed x -> grid z = x + shift -> moving maps[k] @ z
            t = np.eye(3)
            t[:2, 2] = shift
            out.append((float(flat[k, idx]), maps[k] @ t))
        return out


def _fft_size(n: int) -> int:
    """The smallest ``2^a 3^b 5^c >= n`` (fast FFT lengths)."""
    best = 2 * n
    p2 = 1
    while p2 < 2 * n:
        p3 = p2
        while p3 < 2 * n:
            p5 = p3
            while p5 < 2 * n:
                if p5 >= n:
                    best = min(best, p5)
                p5 *= 5
            p3 *= 3
        p2 *= 2
    return best


def _ngf_similarity(f: np.ndarray, fm: np.ndarray, m: np.ndarray, mm: np.ndarray) -> float:
    """Mean squared cosine of the gradient directions where both images have tissue."""
    both = torch.from_numpy((fm & mm).astype(np.float32))[None, None]
    if float(both.sum()) < 16:
        return -1.0
    a = _tensor_features(_ngf(torch.from_numpy(_smooth(f))[None, None], both))
    b = _tensor_features(_ngf(torch.from_numpy(_smooth(m))[None, None], both))
    den = float(torch.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / den if den > 0 else -1.0


def _warp(channel: np.ndarray, mask: np.ndarray, matrix: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """``channel`` and ``mask`` sampled at ``matrix @ x`` for every pixel ``x`` of ``shape`` (0 outside)."""
    grid = np.stack(np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")).reshape(2, -1)
    coords = matrix[:2, :2] @ grid + matrix[:2, 2:]
    c = ndimage.map_coordinates(channel, coords, order=1, cval=0.0).reshape(shape)
    m = ndimage.map_coordinates(mask.astype(np.float32), coords, order=1, cval=0.0).reshape(shape) > 0.5
    return c.astype(np.float32), m


def _score(fixed: _Image, moving: _Image, matrix: np.ndarray) -> float:
    """Similarity on the tissue of ``fixed`` and ``moving`` under ``matrix`` (grid pixels)."""
    wc, wm = _warp(moving.channel, moving.mask, matrix, fixed.channel.shape)
    ncc = masked_ncc(*(torch.from_numpy(a.astype(np.float32)) for a in (fixed.channel, fixed.mask, wc, wm)))
    return 0.5 * (ncc + _ngf_similarity(fixed.channel, fixed.mask, wc, wm))


def _refine(fixed: _Image, moving: _Image, matrix: np.ndarray, kind: str, similarity: str) -> np.ndarray:
    """``matrix`` (fixed grid -> moving grid) improved by the affine engine on the pre-warped moving."""
    from ..registry import register

    wc, wm = _warp(moving.channel, moving.mask, matrix, fixed.channel.shape)
    if wm.sum() < 64:
        return matrix
    try:
        reg = register(
            fixed.channel,
            wc,
            method="affine",
            device="cpu",
            spacing=tuple(fixed.zoom),  # input pixels: "rigid" is rigid on the slides
            fixed_mask=fixed.mask,
            moving_mask=wm,
            kind=kind,
            similarity=similarity,
            init="identity",
            rotation_search=False,
            levels=2,
            iterations=40,
            samples=REFINE_SAMPLES,
        )
    except InputError:
        # the optimisation diverged from this start (mutual information on unlike stains can step
        # onto a degenerate map; session 46, IHC od against haematoxylin, seed 7, rotation 37): the
        # start is kept unrefined, as one with too little overlap is, and the other hypotheses compete
        return matrix
    return matrix @ reg.transform.matrix


def _check_mask(mask, shape, name: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise InputError(
            f"The {name}_mask has shape {m.shape} but the {name} slide {tuple(shape)}; give one per pixel."
        )
    return m.astype(np.float32)


def _stain_inputs(fixed, moving, fixed_mask, moving_mask):
    """Stain channels (float32) and tissue masks of both slides, and the stain kind used."""
    f_arr, f_rgb = _check_image(fixed, "fixed")
    m_arr, m_rgb = _check_image(moving, "moving")
    if f_rgb or m_rgb:
        fc, mc, kind = choose_stain_channels(fixed, moving)
    else:
        fc, mc, kind = f_arr.astype(np.float32), m_arr.astype(np.float32), "given"
    masks = []
    for name, given, img in (("fixed", fixed_mask, fixed), ("moving", moving_mask, moving)):
        mask = tissue_mask(img) if given is None else given
        if not mask.any():
            raise InputError(
                f"No tissue found in the {name} slide: it looks blank. Check that it is a brightfield "
                f"slide (or a stain channel, tissue bright), or give {name}_mask."
            )
        masks.append(mask)
    return fc, mc, masks[0], masks[1], kind


def rigid_prealign(
    fixed,
    moving,
    *,
    fixed_mask=None,
    moving_mask=None,
    allow_flip: bool = True,
    scale: bool = True,
    angle_step: float | None = None,
    progress=None,
) -> RigidResult:
    """Find the rotation (any angle), mirror, scale and shift that map the fixed slide onto the moving.

    ``fixed``, ``moving``: RGB slides (their stain channels are chosen by
    :func:`~napari_nephi.engines.histology.stain.choose_stain_channels`) or two stain channels
    (grey, tissue bright), at one common pixel size. Masks default to
    :func:`~napari_nephi.engines.histology.stain.tissue_mask`. ``allow_flip``: also try the
    mirrored moving slide; ``scale``: also estimate an isotropic scale; ``angle_step``: degrees
    between the rotations searched (default 5). ``progress``: a
    :class:`~napari_nephi.core.progress.Progress` or a callback taking progress events.
    """
    allow_flip = check_bool("allow_flip", allow_flip)
    scale = check_bool("scale", scale)
    step = DEFAULT_ANGLE_STEP if angle_step is None else check_float("angle_step", angle_step, 0.5, 45.0)
    prog = progress if isinstance(progress, Progress) else Progress(progress)
    prog.check()
    f_in, _, f_top = _check_values(fixed, "fixed")
    m_in, _, m_top = _check_values(moving, "moving")
    largest = max(*f_in.shape[:2], *m_in.shape[:2])
    factor = max(1.0, largest / WORK_SIZE)  # one factor: the common pixel size stays common
    fc, mc, fmask, mmask, kind = _stain_inputs(
        _reduced_unit(f_in, f_top, factor),
        _reduced_unit(m_in, m_top, factor),
        *(None if m is None else _area_resize(_check_mask(m, a.shape[:2], n), factor) > 0.5
          for m, a, n in ((fixed_mask, f_in, "fixed"), (moving_mask, m_in, "moving"))),
    )  # fmt: skip
    w_fix = _Image(fc, fmask, np.asarray(f_in.shape[:2], float) / fc.shape)
    w_mov = _Image(mc, mmask, np.asarray(m_in.shape[:2], float) / mc.shape)
    half = max(1.0, max(*fc.shape, *mc.shape) / SEARCH_SIZE)
    s_fix = _Image.reduce(fc, fmask, half, w_fix.zoom)
    s_mov = _Image.reduce(mc, mmask, half, w_mov.zoom)
    for name, img in (("fixed", s_fix), ("moving", s_mov)):
        if img.mask.sum() < 16:
            raise InputError(
                f"The tissue of the {name} slide is too small to align ({int(img.mask.sum())} pixels at "
                f"{SEARCH_SIZE} px); give a larger region or a finer level."
            )
    scales = [1.0]
    if scale:
        est = math.sqrt(s_mov.mask.sum() * np.prod(s_mov.zoom) / (s_fix.mask.sum() * np.prod(s_fix.zoom)))
        if abs(math.log(est)) > math.log(1.05):
            scales.append(float(np.clip(est, 0.5, 2.0)))
    angles = np.arange(0.0, 360.0 - 1e-9, step)
    hyps = [(a, fl, s) for s in scales for fl in ((False, True) if allow_flip else (False,)) for a in angles]
    batches = [hyps[i : i + BATCH] for i in range(0, len(hyps), BATCH)]
    total = len(batches) + 2 * REFINED + 1
    search = _Search(s_fix, s_mov, scales)
    found = []
    with torch.no_grad():
        for i, batch in enumerate(batches):
            for h, (sc, m) in zip(batch, search.best([_linear(*h) for h in batch])):
                found.append((sc, h, m))
            prog.step(i + 1, total, loss=1 - max(f[0] for f in found), stage="rigid: rotation search")

    # the best hypotheses that differ by more than two angle steps or by the mirror
    found.sort(key=lambda f: -f[0])
    picked = []
    for sc, h, m in found:
        if len(picked) >= REFINED or sc < REFINE_FRACTION * found[0][0]:
            break
        if all(h[1] != p[1][1] or _angle_gap(h[0], p[1][0]) > 2 * step for p in picked):
            picked.append((sc, h, m))
    to_work_f = np.linalg.inv(w_fix.frame) @ s_fix.frame
    to_work_m = np.linalg.inv(w_mov.frame) @ s_mov.frame
    starts = [to_work_m @ m @ np.linalg.inv(to_work_f) for _, _h, m in picked]
    model = "similarity" if scale else "rigid"
    bounds = (min(scales) / SCALE_SLACK, max(scales) * SCALE_SLACK)

    def refine(start: np.ndarray, similarity: str) -> np.ndarray:
        refined = _refine(w_fix, w_mov, start, model, similarity)
        s = decompose(w_mov.frame @ refined @ np.linalg.inv(w_fix.frame))[2]
        return refined if bounds[0] <= s <= bounds[1] else start

    results = []
    for j, start in enumerate(starts):
        refined = refine(start, "ncc")
        results.append((_score(w_fix, w_mov, refined), refined))
        prog.step(len(batches) + j + 1, total, loss=1 - results[-1][0], stage="rigid: refinement")
    if max(r[0] for r in results) < MULTIMODAL_SCORE:
        # the channels do not look alike (other stains): refine again by mutual information
        for j, start in enumerate(starts):
            refined = refine(start, "nmi")
            results.append((_score(w_fix, w_mov, refined), refined))
            prog.step(len(batches) + REFINED + j + 1, total, stage="rigid: refinement (mutual information)")
    results.sort(key=lambda r: -r[0])
    best_score, best = results[0]
    matrix = w_mov.frame @ best @ np.linalg.inv(w_fix.frame)
    angle, flipped, sc = decompose(matrix)
    candidates = [(*decompose(r)[:2], s) for s, r in results]
    prog.step(total, total, loss=1 - best_score, stage="rigid: done")
    return RigidResult(
        matrix=matrix,
        angle=angle,
        flipped=flipped,
        scale=sc,
        score=best_score,
        candidates=candidates,
        fixed_shape=tuple(f_in.shape[:2]),
        moving_shape=tuple(m_in.shape[:2]),
        kind=kind,
    )


def _angle_gap(a: float, b: float) -> float:
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)
