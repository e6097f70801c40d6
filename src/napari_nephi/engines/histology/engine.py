"""``register(fixed, moving, method="histology")``: multi-stain whole-slide registration.

Stages (each selectable): ``rigid`` (any rotation, mirrored slides, at ``rigid_um``), ``affine`` and
``nonrigid`` (the multi-magnification networks on patches at ``working_um``), ``refine`` (tile-wise
instance optimisation at ``refine_um``). The transform maps fixed level-0 pixels to moving level-0
pixels; ``warped`` is the lazy multiscale pyramid of the moving slide on the fixed grid.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ...core.device import choose_device
from ...core.errors import InputError
from ...core.lazy_warp import warp_pyramid
from ...core.metrics import process_peak_rss_mb
from ...core.options import check_bool, check_choice, check_float, check_int
from ...core.registration import Pair, Registration
from ...core.transform import AffineTransform, ComposedTransform, Transform
from ...io.pyramid_writer import write_ome_pyramid
from ..registry import register_engine
from .grids import Grid, field_on_grid, read_on_grid
from .moving_region import MovingRegions
from .predict import compose, predict_field, warp
from .quality import field_folds, similarity_table, tre_report
from .refine import RefineSettings, refine_field
from .rigid import rigid_prealign
from .slide_inputs import (
    Channel,
    check_image_values,
    check_landmarks,
    load_networks,
    pixel_sizes,
    resize_mask,
    slide_of,
)
from .stain import KINDS, tissue_mask, white_level

STAGES = ("rigid", "affine", "nonrigid", "refine")
#: Longest side (pixels) of the automatic rigid and working grids.
RIGID_SIDE, WORKING_SIDE = 512, 2048
#: Largest grids accepted (pixels): rigid search, working level (in memory), refinement field.
MAX_RIGID, MAX_WORKING, MAX_REFINE = 2048**2, 8192**2, 1 << 28


def _optional_um(name: str, value, zero_ok: bool = False) -> float | None:
    if value is None:
        return None
    if zero_ok and not isinstance(value, bool) and value == 0:
        return 0.0
    return check_float(name, value, 0.0, 1e5, low_open=True)


def _check_stages(stages) -> tuple[str, ...]:
    names = (stages,) if isinstance(stages, str) else stages
    if not isinstance(names, Sequence) or not names:
        raise InputError(f"Option stages must name at least one of {', '.join(STAGES)}; got {stages!r}.")
    for s in names:
        check_choice("stages", s, STAGES)
    return tuple(s for s in STAGES if s in names)


def _check_channel(channel):
    if isinstance(channel, str):
        return check_choice("channel", channel, ("auto", *KINDS))
    return check_int("channel", channel, 0, 255)


def _grid(shape0, um0: float, um: float, limit: int, option: str) -> Grid:
    g = Grid(tuple(int(n) for n in shape0[:2]), um0, um)
    if g.shape[0] * g.shape[1] > limit:
        raise InputError(
            f"Option {option}={um:g} um/px gives a {g.shape[0]} x {g.shape[1]} grid, too large; choose a "
            f"coarser pixel size (or leave it unset for the automatic choice)."
        )
    return g


def _compute(lazy) -> np.ndarray:
    return np.asarray(lazy.compute())


class _Run:
    """One registration: the slides, pixel sizes, the channel kind and the transform so far."""

    def __init__(self, pair: Pair, moving_spacing, channel):
        fixed_sp = pair.spacing
        self.fixed = slide_of(pair.fixed, fixed_sp, pair.rgb, channel, "fixed")
        self.moving = slide_of(pair.moving, moving_spacing, pair.rgb, channel, "moving")
        self.notes: list[str] = []
        self.um_f, self.um_m = pixel_sizes(self.fixed.spacing, self.moving.spacing, self.notes)
        self.spacing_known = self.fixed.spacing is not None
        self.channel = Channel("hematoxylin" if isinstance(channel, int) else channel)
        # Value beyond each slide: white for brightfield, black for dark background (set by settle).
        self.fill_fixed = self.fill_moving = 255.0 if self.fixed.rgb or self.moving.rgb else 0.0
        self.progress = pair.progress
        self.seconds: dict[str, float] = {}
        scale = self.um_f / self.um_m  # level-0 fixed px -> moving px, same physical place
        self.rigid0 = np.array([[scale, 0, (scale - 1) / 2], [0, scale, (scale - 1) / 2], [0, 0, 1.0]])
        self.initial = self.affine(self.rigid0)
        self.parts: list[Transform] = []  # fields applied before the rigid map, first first

    def settle_fill(self, fixed: np.ndarray, moving: np.ndarray) -> None:
        """Each slide's fill from the polarity :meth:`Channel.settle` judged on ``fixed`` and
        ``moving`` (low levels of the slides): their white level (255 for 8-bit, 1 for floats in
        [0, 1]) for brightfield and RGB slides, 0 for dark-background ones."""
        bright = self.channel.brightfield
        self.fill_fixed = white_level(fixed) if self.fixed.rgb or bright[0] else 0.0
        self.fill_moving = white_level(moving) if self.moving.rgb or bright[1] else 0.0

    def extent_um(self) -> float:
        return max(max(self.fixed.shape[:2]) * self.um_f, max(self.moving.shape[:2]) * self.um_m)

    def affine(self, matrix: np.ndarray) -> AffineTransform:
        return AffineTransform(matrix, spacing=(self.um_f,) * 2, moving_spacing=(self.um_m,) * 2)

    def transform(self) -> Transform:
        parts = [*self.parts, self.affine(self.rigid0)]
        return ComposedTransform(
            parts,
            shape=self.fixed.shape[:2],
            moving_shape=self.moving.shape[:2],
            spacing=(self.um_f,) * 2,
            moving_spacing=(self.um_m,) * 2,
        )

    def read_fixed(self, grid: Grid) -> np.ndarray:
        img = _compute(read_on_grid(self.fixed.levels, grid, fill=self.fill_fixed))
        check_image_values(img, "fixed")
        return img

    def read_moving(self, grid: Grid, transform: Transform | None) -> np.ndarray:
        img = _compute(read_on_grid(self.moving.levels, grid, transform, fill=self.fill_moving))
        check_image_values(img, "moving")
        return img


#: Longest side of the previews sent after each stage (the moving slide under the transform so far).
PREVIEW_SIDE = 512


def _send_preview(run: _Run, stage: str) -> None:
    """Send the moving slide under the current transform on a coarse fixed grid, if a GUI wants it."""
    if not run.progress.wants_preview:
        return
    um = run.um_f * max(1.0, max(run.fixed.shape[:2]) / PREVIEW_SIDE)
    grid = Grid(tuple(int(n) for n in run.fixed.shape[:2]), run.um_f, um)
    preview = run.read_moving(grid, run.transform())
    run.progress.step(1, 1, stage=stage, preview=preview, preview_zoom=(grid.factor, grid.factor))


def _masks(run: _Run, f_img, m_img, fixed_mask, moving_mask) -> tuple[np.ndarray, np.ndarray]:
    out = []
    for name, given, img in (("fixed", fixed_mask, f_img), ("moving", moving_mask, m_img)):
        mask = tissue_mask(img) if given is None else resize_mask(given, img.shape[:2])
        if not mask.any():
            raise InputError(
                f"No tissue found in the {name} slide: it looks blank at {img.shape[0]} x {img.shape[1]} px. "
                f"Check the slide and the channel, or give {name}_mask."
            )
        out.append(mask)
    return out[0], out[1]


def _stage_rigid(run: _Run, allow_flip: bool, rigid_um: float, use: bool, masks) -> dict:
    start = time.perf_counter()
    run.progress.check()
    gf = _grid(run.fixed.shape, run.um_f, rigid_um, MAX_RIGID, "rigid_um")
    gm = _grid(run.moving.shape, run.um_m, rigid_um, MAX_RIGID, "rigid_um")
    f_img, m_img = run.read_fixed(gf), run.read_moving(gm, None)
    fc, mc, run.channel = run.channel.settle(f_img, m_img)
    kind = run.channel.kind
    run.settle_fill(f_img, m_img)
    fm, mm = _masks(run, f_img, m_img, *masks)
    info: dict = {"channel": kind, "rigid_um": rigid_um}
    if use:
        res = rigid_prealign(
            fc, mc, fixed_mask=fm, moving_mask=mm, allow_flip=allow_flip, progress=run.progress
        )
        run.rigid0 = gm.to_level0() @ res.matrix @ gf.from_level0()
        info.update(
            rigid_angle=res.angle, rigid_flipped=res.flipped, rigid_scale=res.scale, rigid_score=res.score
        )
        _send_preview(run, "rigid: done")
    run.seconds["rigid"] = time.perf_counter() - start
    return info


#: Patches per network call: bounds the network's activations (about 35 MiB per 224 px patch set).
PREDICT_BATCH = 4
#: Before refinement the networks' field is low-passed by a Gaussian of sigma = patch / this (working px).
NET_LOW_PASS = 16


def low_pass(field: np.ndarray, sigma: float) -> np.ndarray:
    """``field`` ``(2, H, W)`` smoothed by a Gaussian of ``sigma`` pixels (borders: nearest)."""
    from scipy.ndimage import gaussian_filter

    return np.stack([gaussian_filter(c, sigma, mode="nearest") for c in field]).astype(np.float32)


def _stage_networks(
    run: _Run, grid: Grid, nets: dict, stages, iterations: dict, masks, refining: bool = False
) -> dict:
    """Affine then non-rigid network on the working grid; each kept only if it raises NCC on tissue.

    With ``refining`` the field kept is low-passed (sigma: patch / :data:`NET_LOW_PASS`): patch-wise
    predictions vary from patch to patch by a fraction of a pixel, a roughness the refinement's
    smooth correction cannot undo; the refinement recovers the fine part itself.
    """
    from ...core.similarity import metric

    info: dict = {}
    wanted = [k for k in ("affine", "nonrigid") if k in stages]
    missing = [k for k in wanted if nets.get(k) is None]
    if missing:
        run.notes.append(
            f"Skipped the {' and '.join(missing)} network(s): no trained weights (train them with "
            "napari-nephi train-histology and give weights=...)."
        )
    wanted = [k for k in wanted if nets.get(k) is not None]
    if not wanted:
        return info
    f_img = run.read_fixed(grid)
    m_img = run.read_moving(grid, run.transform())
    fc, mc = run.channel.one(f_img, "fixed"), run.channel.one(m_img, "moving")
    fmask = tissue_mask(f_img) if masks[0] is None else resize_mask(masks[0], grid.shape)
    u = np.zeros((2, *grid.shape), np.float32)
    score = metric("ncc", fc, mc, fmask)
    for kind in wanted:
        start = time.perf_counter()
        run.progress.check()
        current = warp(mc, u) if u.any() else mc
        delta = predict_field(
            fc,
            current,
            nets[kind],
            iterations=iterations[kind],
            mask=fmask,
            batch=PREDICT_BATCH,
            progress=run.progress,
        )
        new = compose(delta, u)
        new_score = metric("ncc", fc, warp(mc, new), fmask)
        if new_score > score:
            u, score = new, new_score
        else:
            run.notes.append(
                f"The {kind} network did not improve the alignment (NCC {new_score:.3f}); skipped."
            )
        info[f"{kind}_ncc"] = new_score
        run.seconds[kind] = time.perf_counter() - start
    if u.any():
        if refining:
            u = low_pass(u, max(nets[k].config.patch for k in wanted) / NET_LOW_PASS)
        run.parts = field_on_grid(u, grid) + run.parts
        info["fold_percent_networks"] = field_folds(u, fmask)
        _send_preview(run, f"{wanted[-1]} network: done")
    return info


def _stage_refine(
    run: _Run, grid: Grid, work: Grid, fixed_mask, settings: RefineSettings, device: torch.device
) -> dict:
    start = time.perf_counter()
    run.progress.check()
    lazy_f = read_on_grid(run.fixed.levels, grid, fill=run.fill_fixed)
    current = run.transform()
    lazy_m = read_on_grid(run.moving.levels, grid, current, fill=run.fill_moving)
    w_img = run.read_fixed(work)
    wmask = tissue_mask(w_img) if fixed_mask is None else resize_mask(fixed_mask, work.shape)
    ratio = grid.um / work.um
    h, w = grid.shape

    def read_fixed(box):
        y0, y1, x0, x1 = box
        return run.channel.one(_compute(lazy_f[y0:y1, x0:x1]), "fixed")

    regions = MovingRegions(run.moving.levels, grid, current, run.fill_moving)

    def read_moving(box):
        got = regions(box)  # sampled once through the composed map by the refinement
        if got is not None:
            return run.channel.one(got[0], "moving"), got[1]
        y0, y1, x0, x1 = box
        cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
        tile = run.channel.one(_compute(lazy_m[cy0:cy1, cx0:cx1]), "moving")
        return np.pad(tile, ((cy0 - y0, y1 - cy1), (cx0 - x0, x1 - cx1)), mode="edge")

    def tissue(box):
        y0, y1, x0, x1 = box
        wy0, wx0 = int(y0 * ratio), int(x0 * ratio)
        wy1, wx1 = max(wy0 + 1, int(np.ceil(y1 * ratio))), max(wx0 + 1, int(np.ceil(x1 * ratio)))
        return resize_mask(wmask[wy0:wy1, wx0:wx1], (y1 - y0, x1 - x0)).astype(np.float32)

    field, summary = refine_field(grid.shape, read_fixed, read_moving, tissue, settings, run.progress, device)
    if summary["tiles_refined"]:
        run.parts = field_on_grid(field, grid) + run.parts
        summary["fold_percent_refine"] = field_folds(field, None)
    run.seconds["refine"] = time.perf_counter() - start
    return summary


class SlideRegistration(Registration):
    """A whole-slide result: ``warped`` is a lazy multiscale pyramid (list of dask arrays)."""

    def write_warped(self, folder: Path) -> None:
        """Write the pyramid as a tiled ``warped.ome.tif``, tile by tile, at the fixed pixel size."""
        write_ome_pyramid(
            folder / "warped.ome.tif", list(self.warped), spacing_um=self.settings.get("spacing")
        )


@register_engine(
    "histology",
    "whole slides of different stains: any rotation or mirror, patch networks, refinement",
    whole_slides=True,
)
def histology(
    pair: Pair,
    *,
    moving_spacing=None,
    channel="auto",
    allow_flip: bool = True,
    rigid_um: float | None = None,
    working_um: float | None = None,
    refine_um: float | None = None,
    stages=STAGES,
    affine_iterations: int = 2,
    nonrigid_iterations: int = 1,
    magnifications: int = 2,
    weights=None,
    landmarks=None,
    seed: int = 0,
) -> Registration:
    """Register two whole slides (grey or RGB; arrays, dask arrays or pyramids) of different stains.

    ``moving_spacing``: the moving slide's level-0 um/px (``spacing`` is the fixed one's); ``channel``:
    the stain channel ("auto", "hematoxylin", "od", "grey") or the channel index of a multi-channel
    (fluorescence) slide; ``rigid_um`` / ``working_um`` / ``refine_um``: pixel sizes of the stages
    (automatic by default, ``refine_um=0`` turns refinement off); ``stages``: any of "rigid",
    "affine", "nonrigid", "refine"; ``weights``: model files or a folder (default: shipped);
    ``landmarks``: ``(fixed_pts, moving_pts)`` in level-0 pixels (y, x) for the TRE.
    """
    total_start = time.perf_counter()
    channel = _check_channel(channel)
    allow_flip = check_bool("allow_flip", allow_flip)
    rigid_um, working_um = _optional_um("rigid_um", rigid_um), _optional_um("working_um", working_um)
    refine_um = _optional_um("refine_um", refine_um, zero_ok=True)
    stages = _check_stages(stages)
    iterations = {
        "affine": check_int("affine_iterations", affine_iterations, 1, 10),
        "nonrigid": check_int("nonrigid_iterations", nonrigid_iterations, 1, 10),
    }
    magnifications = check_choice("magnifications", magnifications, (1, 2))
    seed = check_int("seed", seed, 0, 2**31 - 1)
    points = check_landmarks(landmarks)
    run = _Run(pair, moving_spacing, channel)
    device = choose_device(pair.device)
    nets = load_networks(weights, device, run.notes) if {"affine", "nonrigid"} & set(stages) else {}
    for kind, net in nets.items():
        if net is not None and net.config.magnifications != magnifications:
            raise InputError(
                f"The {kind} network was trained with {net.config.magnifications} magnification(s) but "
                f"magnifications={magnifications}; give matching weights or magnifications="
                f"{net.config.magnifications}."
            )
    torch.manual_seed(seed)
    finest = max(run.um_f, run.um_m)
    rigid_um = rigid_um or max(finest, run.extent_um() / RIGID_SIDE)
    working_um = working_um or max(finest, run.extent_um() / WORKING_SIDE)
    if refine_um is None:
        refine_um = max(finest, working_um / 2)
    masks = (pair.fixed_mask, pair.moving_mask)
    work = _grid(run.fixed.shape, run.um_f, working_um, MAX_WORKING, "working_um")
    refining = "refine" in stages and refine_um > 0
    fine = _grid(run.fixed.shape, run.um_f, refine_um, MAX_REFINE, "refine_um") if refining else None
    metrics: dict = {}
    metrics.update(_stage_rigid(run, allow_flip, rigid_um, "rigid" in stages, masks))
    metrics.update(_stage_networks(run, work, nets, stages, iterations, masks, refining))
    if fine is not None:
        metrics.update(_stage_refine(run, fine, work, pair.fixed_mask, RefineSettings(), device))
    transform = run.transform()
    metrics["fold_percent"] = max(
        [metrics.get(k, 0.0) for k in ("fold_percent_networks", "fold_percent_refine")]
    )
    start = time.perf_counter()
    pair.progress.check()
    metrics.update(similarity_table(run, work, transform, pair.fixed_mask))
    run.seconds["metrics"] = time.perf_counter() - start
    if points is not None:
        metrics.update(tre_report(transform, points, run))
    warped = warp_pyramid(run.moving.levels, transform, run.fixed.shape[:2], fill=run.fill_moving)
    metrics.update(
        seconds_per_stage=run.seconds,
        seconds=time.perf_counter() - total_start,
        peak_rss_mb=process_peak_rss_mb(),
        notes=run.notes,
    )
    settings = {
        "spacing": list(run.fixed.spacing) if run.spacing_known else None,
        "moving_spacing": list(run.moving.spacing) if run.moving.spacing is not None else None,
        "channel": channel,
        "stain_kind": run.channel.kind,
        "allow_flip": allow_flip,
        "rigid_um": rigid_um,
        "working_um": working_um,
        "refine_um": refine_um,
        "stages": list(stages),
        "affine_iterations": iterations["affine"],
        "nonrigid_iterations": iterations["nonrigid"],
        "magnifications": magnifications,
        "weights": None
        if weights is None
        else [str(w) for w in ([weights] if isinstance(weights, str | Path) else weights)],
        "seed": seed,
    }
    return SlideRegistration(warped=warped, transform=transform, metrics=metrics, settings=settings)
