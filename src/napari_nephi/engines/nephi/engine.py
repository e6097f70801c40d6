"""``method="nephi"``: neural deformation fields (NePhi, Tian et al., ECCV 2024).

``mode="optimize"`` (the default) optimises latent codes and both networks for the pair from the
identity: no training needed. ``mode="predict"`` runs a trained :class:`.model.NePhiModel` once
(encoder -> codes -> field, sampled on the model's input grid: :mod:`.predict`);
``"predict+refine"`` then runs the coarse stage from the prediction (optimize's knots on grids twice
as coarse, ``coarse_iterations``, preset 50) and, on 3D images, ``iterations`` neural steps on top
as optimize does; with ``levels=1`` or ``coarse_iterations=0`` it optimises a copy of the model from
the predicted codes for ``iterations`` steps instead. The stored model never changes.

In ``optimize`` mode with ``levels > 1`` a cheap coarse stage runs first: a stationary velocity
field, a cubic B-spline refined level by level, integrated on grids ``2**(levels-1)``, ..., 4, 2
times coarser than the image (scaling and squaring, so it cannot fold; :mod:`.coarse`); the neural
field then refines it at full resolution (fast preset: not on 2D images of 256 px a side or more, nor on
volumes in ``optimize`` mode (not chunked) since session 37, whose coarse stage matches its trilinear warp's
smoothing on every level with a bending weight of 0.03; with the opt-in :data:`NEURAL_3D_GATE_RMS`, on
volumes only where the coarse map's displacement RMS reaches it). On 2D images its first level can
compare the images blurred by :data:`.coarse.FIRST_LEVEL_BLUR`
voxels of its grid (opt-in; ``settings["coarse_first_blur"]``).

``bspline_spacing > 0`` (SINR) evaluates each network on a grid of control points that many voxels
apart and interpolates the field between them with cubic B-splines (:mod:`.bspline`).

Volumes with more than ``max_voxels`` voxels (or any, with ``chunked=True``) run in
divide-and-downsample mode (:mod:`.chunked`): a global pass on the downsampled pair, local passes
on overlapping chunks of the full-resolution grid, fused with smooth weights; memory stays bounded
by a chunk's tensors plus the output fields.

The result is a :class:`~napari_nephi.core.transform.DisplacementTransform` holding the forward
field and the backward field as its inverse, both evaluated on the fixed grid in chunks, in voxel
units of the fixed grid.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ...core.device import choose_device, memory_guard, release_free_memory, reset_peak_memory
from ...core.errors import DimensionMismatchError, InputError
from ...core.inputs import normalize_intensity
from ...core.metrics import memory_report, regularity_report, similarity_report
from ...core.registration import Pair, Registration
from ...core.transform import AffineTransform, ComposedTransform, DisplacementTransform
from ..registry import register_engine
from . import basin, contrast, flatfill, heldout, noise
from . import chunked as chunking
from . import coarse as coarse_module
from . import predict as predict_module
from .blurgate import excess_blur
from .bspline import intervals_for_spacing
from .checks import check_options, check_result, check_run_memory, heldout_memory_note, optimised_similarity
from .coarse import (
    MATCH_BLUR_MAX_VOXELS,
    DenseMaps,
    cooldown_steps,
    displacement_rms,
    finer_level_runs,
    global_maps,
    level_iterations,
    level_spacings,
    match_blur_mode,
    optimize_velocity,
    pyramid_shapes,
    velocity_maps,
)
from .dense import Previewer, dense_displacement, inside_mask, inverse_consistency, mask_tensor, warped_image
from .field import FieldConfig, NeuralDeformationField, local_grid_shape, zero_codes
from .initial import INITIALS, MIN_OVERLAP, normalized_matrix, run_global_stage
from .mlp import REPRESENTATIONS
from .model import as_model
from .optimize import REGULARIZERS, SIMILARITIES, Maps, OptimizeSettings, optimize_field
from .predict import (
    FINER_ON_OPTIMIZE_GRID,
    ComposedMaps,
    low_passed_maps,
    prediction_grid,
    prediction_maps,
    refine_cooldown,
    refine_grids,
    refine_warmup,
    velocity_of,
    warp_through,
)
from .weights import default_model

MODES = ("optimize", "predict", "predict+refine")

#: Parameters each preset fills in when not given explicitly.
PRESETS: dict[str, dict] = {
    "fast": {
        "iterations": 50,
        # 2D images of at least NEURAL_2D_MIN_SIDE px a side, after a coarse stage: the neural field
        # changed no endpoint error of the issue-13 benchmark at 256 px (12 cases, at most
        # 0.002 px) and doubled the CPU time (benchmarks/README.md); on a 96 px image it still
        # gained 0.014 px (0.137 -> 0.123), so smaller images keep it
        "iterations_2d_after_coarse": 0,
        # volumes in optimize mode (not chunked), after a coarse stage, iterations not given and the opt-in
        # NEURAL_3D_GATE_RMS unset: no neural steps (session 37, R0 of session 36; docs/nephi.md). On fair
        # MRI deformations of 0.5-6 voxels the coarse stage below (warp blur "all", bending weight 0.03)
        # alone had a lower endpoint error than the old whole default on 25 of 25 (field sets 10, 20, 406,
        # 407, 408), a narrower det J on 30 of 30 fair rigid pairs (IC max at most 0.028), half its CPU
        "iterations_3d_after_coarse": 0,
        # the coarse stage of volumes in optimize mode (not chunked): the trilinear warp's smoothing matched
        # on every level (coarse.WARP_BLUR_3D's "all", option coarse_warp_blur) and a bending weight of 0.03
        # (coarse_reg_weight; 2D keeps COARSE_REG_WEIGHT): session 36, made the default in session 37
        "coarse_warp_blur_3d": "all",
        "coarse_reg_weight_3d": 0.03,
        # volumes in optimize mode (not chunked), after a coarse stage: the neural steps run only where the
        # coarse map's displacement RMS (voxels, rigid map removed) reaches NEURAL_3D_GATE_RMS (None: always)
        "neural_3d_gate_rms": "auto",
        "hidden": 64,
        "layers": 3,
        "n_frequencies": 32,
        "levels": 3,
        "coarse_iterations": 100,
        # predict+refine: coarse steps from the prediction (grids twice coarser, predict.py)
        "refine_coarse_iterations": 50,
        "sample_fraction": 0.01,
        "min_sample_points": 2048,
        "max_sample_points": 1 << 15,
        "max_reg_points": 200,
    },
    "accurate": {
        "iterations": 600,
        "hidden": 96,
        "layers": 3,
        "n_frequencies": 48,
        "levels": 4,
        "coarse_iterations": 150,
        "refine_coarse_iterations": 100,
        "sample_fraction": 0.02,
        "min_sample_points": 4096,
        "max_sample_points": 1 << 17,
        "max_reg_points": 500,
    },
}

#: Shortest side (px) from which the fast preset skips the neural stage of 2D images after a
#: coarse stage (see ``PRESETS["fast"]["iterations_2d_after_coarse"]``).
NEURAL_2D_MIN_SIDE = 256

#: Volumes, fast preset (``PRESETS["fast"]["neural_3d_gate_rms"]``), ``optimize`` mode, not chunked, after
#: a coarse stage, ``iterations`` not given: the neural stage runs only where the coarse stage's
#: displacement (the rigid map removed) has an RMS of at least this many voxels
#: (``metrics["neural_3d_gate"]``). Session 33 (docs/nephi.md): on the MRI its 50 steps lowered the
#: endpoint error of 4 and 6 voxel deformations of smoothness 7 voxels (coarse maps of RMS 0.89-1.45 voxel:
#: 0.011-0.031 voxel) and raised it or tied at 0.5-2 voxels (0.09-0.47); on 16 rigid maps (0.09-0.21) they
#: widened det J on all 16 and doubled the inverse-consistency error (IC max 0.01-0.06 -> 0.04-0.13 voxel).
#: But on rougher fields (smoothness 3.5 voxels, review 1 of session 33) the coarse map reads lower where the
#: neural stage has more to add: at 0.4 two such fields lost (EPE +0.0082 at 2 voxels, reading 0.39996).
#: None (the default): the neural stage always runs; 0.3 / 0.4 are opt-in (docs/nephi.md, "Session 33").
NEURAL_3D_GATE_RMS: float | None = None

#: With :data:`NEURAL_3D_GATE_RMS` set, a coarse map under it skips the neural stage only where the moving
#: image is also blurrier than the fixed one, as the stage compares them, by more than this many voxel^2 per
#: axis (:func:`.blurgate.excess_blur`; ``metrics["neural_3d_gate"]["excess_blur"]``). Session 34
#: (docs/nephi.md): on linear-resampled rigid maps the stage's 50 steps cost EPE (up to 0.012) and double
#: the inverse-consistency error, on cubic-resampled ones they gain (0.0005-0.029); RMS 0.3 with 0.12
#: skipped 40 of 44 linear maps and none of 44 cubic, but also the zoomed MRI's shift and fields with a
#: Gaussian-blurred moving image, where the stage gains (up to 0.011): it reads the benchmark's linear
#: resampling, so it is not proposed. None (the default): the RMS alone decides, as in session 33.
NEURAL_3D_GATE_BLUR: float | None = None

#: Global stage of ``optimize`` mode. Rigid, not affine: on seven benchmark deformations
#: (benchmarks/nephi_large.py, 256 px) an affine stage raised the endpoint error by up to
#: 0.12 px against none (its scale and shear, fitted to the textured part, are extrapolated
#: into the textureless part), a rigid one by at most 0.054 px (and lowered it on two), while
#: shifts and rotations are recovered exactly by either.
INITIAL_DEFAULT = "rigid"

#: Default Adam learning rates (networks, codes) of the neural field: from the identity or from
#: predicted codes ("start"), and after a coarse stage ("refine"), where the field only corrects a
#: converged map and the larger rates knock it off by a fraction of a voxel in 50 steps
#: (benchmarks/README.md).
LEARNING_RATES = {"start": (2e-3, 1e-2), "refine": (5e-4, 2.5e-3)}

#: Volumes of at most this many voxels (2^20 = 1,048,576 since session 39; 2^19 in session 38; 33,825, the
#: bundled MRI, in session 37) take the preset's volume default in ``optimize`` mode (not chunked):
#: ``coarse_warp_blur_3d``, ``coarse_reg_weight_3d`` and ``iterations_3d_after_coarse`` (session 37). Larger
#: ones keep the earlier default (no warp blur, weight 0.1, the neural steps). Session 38 (docs/nephi.md): on
#: fair (area) pairs of the MRI zoomed 1.2x-2.5x (58,800-518,568 voxels; fresh rigid draws 70, 71 and field
#: sets 414, 415) the volume default passed every mark written first (EPE, det J, folds, CPU, peak memory)
#: once its warp blur stopped holding the (1, 3, *S) interpolation variance
#: (:func:`.coarse.blur_by_interpolation`); session 37's det J failure at 1.8x and 2.5x was a linear-resampled
#: pair's. Session 39: the same at 2.6x-3.1x (598,130-1,010,412 voxels; fresh rigid draws 73, 74 and field
#: sets 417, 418; ``benchmarks/nephi_zoom_cases.py``). Up to 2^20 the coarse stage compares on the full image
#: (:data:`.coarse.WARP_MAX_VOXELS`); above it on a downsampled grid, where R0 is unmeasured but for one
#: failing development case (session 38, B2). 128^3 and 256^3 stay over it.
VOLUME_DEFAULT_MAX_VOXELS = 1 << 20

#: Volumes of more than :data:`VOLUME_DEFAULT_MAX_VOXELS` and at most this many voxels (``optimize`` mode,
#: not chunked; 1,206,630 = the MRI zoomed 3.3x, 82 x 135 x 109, since session 40) take the volume default's
#: coarse stage (``coarse_warp_blur_3d`` "all", ``coarse_reg_weight_3d`` 0.03) with the preset's neural steps
#: (50 with the fast preset; ``iterations`` given still wins; the blur off by option gives the earlier
#: default). There the coarse stage compares on a downsampled grid (over :data:`.coarse.WARP_MAX_VOXELS`),
#: where it alone failed (session 39, B3) and with the 50 steps passed every mark written first on the fresh
#: cases at 3.3x (rigid draw 76, field sets 420, 421); at 3.6x (1,585,080) two fresh rotations failed det J
#: (docs/nephi.md, "Session 40"), so larger volumes keep the earlier default (128^3 too). None (or a value
#: of at most :data:`VOLUME_DEFAULT_MAX_VOXELS`): no such band, as before session 40.
VOLUME_DEFAULT_STEPS_MAX_VOXELS: int | None = 1_206_630

#: Default bending weight of the coarse stage (``coarse_reg_weight``), before noise adaptation.
COARSE_REG_WEIGHT = 0.1
#: Volumes (``coarse_reg_weight`` not given): the coarse stage's bending weight there, in every mode; None:
#: the preset's ``coarse_reg_weight_3d`` in ``optimize`` mode (not chunked; 0.03 with the fast preset since
#: session 37), else :data:`COARSE_REG_WEIGHT` as in 2D. Session 36 (docs/nephi.md): 0.03 with
#: ``coarse.WARP_BLUR_3D = "all"`` lowered the endpoint error of every fair MRI deformation of field
#: sets 10 and 20 (0.5-6 voxels; set 10: 0.0390 / 0.0755 / 0.1129 / 0.1550 / 0.2965 -> 0.0273 / 0.0464 /
#: 0.0773 / 0.1266 / 0.2416, textureless tissue too); without the warp blur it changed little (coarse stage
#: alone, set 10 at 0.5 voxel: 0.0415 -> 0.0411). On fair rigid MRI draws 0.0-0.5 (whole engine) the worst
#: det J is 0.936-1.077, against 0.868-1.173 by default and 0.955-1.067 with "all" and 0.1: it gives back
#: part of what the warp blur gained towards the rigid target (docs/nephi.md, session 36).
COARSE_REG_WEIGHT_3D: float | None = None

#: Default weight of each regulariser (the similarity loss is ``1 - NCC`` in [0, 2]).
REG_WEIGHTS = {
    "gradicon": 0.1,
    "jacobian": 0.1,
    "symmetric_jacobian": 0.1,
    "bending": 1e-4,
    "diffusion": 0.05,
    "cycle": 10.0,
}


def _resolve(value, preset: dict, key: str):
    return preset[key] if value is None else value


@register_engine("nephi", description="Deformable, neural deformation field (NePhi); 2D and 3D")
def register_nephi(
    pair: Pair,
    mode: str = "optimize",
    preset: str = "fast",
    iterations: int | None = None,
    regularizer: str = "gradicon",
    reg_weight: float | None = None,
    representation: str = "modulated",
    similarity: str = "ncc",
    sample_fraction: float | None = None,
    sample_points: int | None = None,
    reg_points: int | None = None,
    levels: int | None = None,
    coarse_iterations: int | None = None,
    coarse_reg_weight: float | None = None,
    coarse_finer_level: bool = True,
    coarse_capture: int = 0,
    coarse_capture_gate: float | None = None,
    coarse_finer_gate: float | None = None,
    coarse_edge_damp: float | None = None,
    coarse_blur_pattern: bool = False,
    coarse_spline_warp: bool = False,
    coarse_match_blur: bool | str | None = None,
    coarse_warp_blur: bool | str | None = None,
    coarse_flat_fill: bool = True,
    coarse_flat_noisy: bool = False,
    noise_adapt: bool | str = "auto",
    noise_heldout: bool | str = "auto",
    contrast_match: bool | str | None = False,
    frame_mask: bool = True,
    learning_rate: float | None = None,
    code_learning_rate: float | None = None,
    hidden: int | None = None,
    layers: int | None = None,
    n_frequencies: int | None = None,
    fourier_scale: float = 0.5,
    omega: float = 30.0,
    first_omega: float = 8.0,
    global_dim: int = 32,
    local_dim: int = 8,
    local_stride: int = 8,
    cycle_weight: float | None = None,
    latent_weight: float = 1e-4,
    derivatives: str = "autograd",
    seed: int = 0,
    weights=None,
    bspline_spacing: float = 0,
    chunked: bool | None = None,
    max_voxels: int = 1 << 24,
    chunk_size: int | None = None,
    chunk_overlap: int | None = None,
    global_factor: int | None = None,
    chunk_iterations: int | None = None,
    initial: str | None = None,
) -> Registration:
    """Register ``pair.moving`` onto ``pair.fixed`` with a neural deformation field.

    Parameters left ``None`` come from ``preset`` (``"fast"`` or ``"accurate"``, see
    :data:`PRESETS`); ``reg_weight`` defaults by regulariser (:data:`REG_WEIGHTS`). Points for the
    similarity: ``sample_points``, or ``sample_fraction`` of the voxels (preset: 1 % fast, the
    paper's 2 % accurate), at least the preset's minimum (2048, 4096) or all of them, at most its
    cap. Points for the regulariser: ``reg_points``, or 1e-4 of the voxels clipped to [64, the
    preset's cap (200 or 500)]. ``cycle_weight`` (default: 0 with
    GradICON or cycle consistency, else the cycle weight) keeps the backward field the inverse.
    ``iterations`` not given, the fast preset runs no neural steps after the coarse stage on 2D images
    of :data:`NEURAL_2D_MIN_SIDE` px a side or more; on volumes (``optimize``, not chunked), where
    :data:`NEURAL_3D_GATE_RMS` is set (opt-in), only where the coarse map's displacement RMS (voxels, the
    global map removed) reaches it (``metrics["neural_3d_gate"]``: the reading, the threshold, whether they
    ran); with :data:`NEURAL_3D_GATE_BLUR` also set (opt-in), a map under it skips them only where the moving
    image is blurrier than the fixed one by more than that (``excess_blur``, :mod:`.blurgate`).

    ``coarse_reg_weight`` (None: :data:`COARSE_REG_WEIGHT`; on volumes :data:`COARSE_REG_WEIGHT_3D` where
    it is set, opt-in, else in ``optimize`` mode (not chunked) on volumes of at most
    :data:`VOLUME_DEFAULT_MAX_VOXELS` the preset's ``coarse_reg_weight_3d``, 0.03 with the fast preset since
    session 37): the coarse stage's bending weight, recorded in ``settings["coarse_reg_weight"]``.

    ``coarse_warp_blur`` (None: on volumes of at most :data:`VOLUME_DEFAULT_MAX_VOXELS` in ``optimize``
    mode, not chunked, the preset's ``coarse_warp_blur_3d``, ``"all"`` with the fast preset since session
    37, unless the module switch :data:`.coarse.WARP_BLUR_3D` is set, which then decides as before;
    elsewhere that switch, off; False, True or ``"all"``): on volumes warped trilinearly the coarse stage
    compares a warped image with the other one blurred by the warp's own smoothing (True: on the levels
    compared on their warp grid; ``"all"``: on every level; :mod:`.coarse`). Without it the stage fits the
    smoothing by compressing and stretching the map around edges (det J 0.87-1.17 on fair rigid MRI pairs).
    Recorded in ``settings["coarse_warp_blur"]`` (what was asked on a volume, None on 2D) and
    ``settings["coarse_volume_sampling"]["warp_blur"]`` (where it ran). On those volumes the fast preset runs
    no neural steps after the coarse stage unless ``iterations`` is given. The weight 0.03 and the skipped
    neural steps go with the warp blur ``"all"``: ``coarse_warp_blur=False`` (or True) alone gives the volume
    default before session 37 (weight 0.1, the preset's neural steps). Volumes of more than
    :data:`VOLUME_DEFAULT_MAX_VOXELS` and at most :data:`VOLUME_DEFAULT_STEPS_MAX_VOXELS` (1,206,630 since
    session 40) get the same warp blur and weight 0.03 with the preset's neural steps (their coarse stage
    compares on a downsampled grid, where it alone was less accurate); larger ones the earlier default.

    ``coarse_finer_level`` (default True): after the coarse stage's last grid, one more level on it
    with half its knot spacing (:mod:`.coarse`); it runs only with ``coarse_reg_weight > 0``
    (unregularised, its knots fit noise). Settings record it and the knot spacing of every level run
    (``coarse_spacings``); False runs the stage as before the level was added.

    ``coarse_capture`` (default 0: off; 2D ``optimize``, not chunked, with a coarse stage): that many steps
    of one more level before the coarse stage's schedule, on a grid twice as coarse per axis as its first
    (64^2 at 512 px) with knots twice as far apart; the schedule after it runs as it would without it (the
    same grids, knots and steps). A wider capture range for large displacements: at 512 px the schedule's
    first grid (128^2, 32 px knots) settles 4 % fields (20 px) of a texture of repeated blobs in local minima
    (IHC: patches up to 25 px off), which a 64^2 level of 16 steps removes (docs/nephi.md, "Session 42").
    Opt-in: it also moves results where the default is right (the camera's sky). Recorded in
    ``settings["coarse_capture"]`` (the steps run; 0 where the image is too small for a coarser grid). Not
    with the opt-in :data:`.coarse.FIRST_LEVEL_BLUR` (``InputError``).
    ``coarse_capture_gate`` (None: none; with ``coarse_capture``): the capture level's velocity is dropped,
    and the schedule runs from zero as without it (the same result bit for bit), where the RMS of det J - 1 of
    its map is at most this (0.02: :data:`.coarse.MATCH_BLUR_NEAR_RIGID`'s near-rigid bound), so a shift or
    rotation, which the global stage holds, is not moved by a fresh level
    (``metrics["coarse_capture_detj_rms"]`` and ``["coarse_capture_kept"]``).

    ``coarse_finer_gate`` (None: none, the default; 2D ``optimize``, not chunked, with a coarse stage and its
    finer-knot level): the finer-knot level does not run where the RMS of det J - 1 of the map before it is
    at most this (0.02: :data:`.coarse.MATCH_BLUR_NEAR_RIGID`'s near-rigid bound), so a shift or rotation,
    which the global stage holds, keeps the smoother map of the levels before it; elsewhere the stage is
    the default's bit for bit. At 512 px the level's 8 px knots slid a straight edge between flat regions
    along itself on the camera shifted by (1.00, -0.76) px (det J 0.874..1.090; without the level
    0.985..1.012; docs/nephi.md, "Session 43 (B)"). Opt-in. Recorded in ``settings["coarse_finer_gate"]``;
    ``metrics["coarse_finer_detj_rms"]`` and ``["coarse_finer_kept"]`` give the reading and whether the
    level ran.

    ``coarse_edge_damp`` (None: none, the default; in (0, 1]; 2D ``optimize``, not chunked, with a coarse
    stage): every coarse level's increment loses, at that strength, its motion along edges of the fixed image
    that have no texture along them (:mod:`.edgedamp`: from the structure tensor in a window of the level's
    knot footprint), so a level cannot slide a straight edge between flat regions along itself (camera
    shifted by (1.00, -0.76) px at 512 px: det J 0.874..1.090 -> 0.980..1.010). It does not fix the
    rotations' misses, which are a compression across such edges, and it costs the camera's deformations
    a little (docs/nephi.md, "Session 44 (B)"). Opt-in. Recorded in ``settings["coarse_edge_damp"]``.

    ``coarse_blur_pattern`` (default False; 2D ``optimize``, not chunked, with a coarse stage and the matched
    blur estimated once, ``coarse_match_blur`` None, ``"auto"`` or ``"once"``): the matched blur's variance
    is a uniform part plus a part that follows the sub-voxel position of the map's sampling points, ``6 f (1 -
    f)`` per voxel and axis (:mod:`.matchblur`): a moving image resampled linearly through a rotation carries
    a blur that varies over the image as a moire, which one variance per axis cannot follow (docs/nephi.md,
    "Session 46 (B)"). Opt-in. Recorded in ``settings["coarse_blur_pattern"]``;
    ``metrics["coarse_blur_pattern"]`` gives the parts (direction, uniform / patterned, axis) where it ran;
    where it did not (a pair not near-rigid under ``"auto"``, an image too large), ``metrics["notes"]`` says
    so.

    ``coarse_spline_warp`` (default False; 2D ``optimize``, not chunked, with a coarse stage): the coarse
    stage warps the images with the prefiltered cubic B-spline (:func:`.cubic.cubic_sample`) instead of
    ``grid_sample``'s bicubic, whose cubic convolution (a = -0.75) does not reproduce linear functions: at
    sub-voxel fraction f it shifts the image by up to 0.047 voxel and sharpens it, by amounts that follow f,
    a moire over the image on a rotation (docs/nephi.md, "Session 46 (B)": camera and retina rotations at
    512 px, EPE 20-53 % lower, det J narrower, CPU 1.9-2.7x). Opt-in. Recorded in
    ``settings["coarse_spline_warp"]``.

    ``coarse_match_blur`` (None: ``"auto"`` in optimize mode, the default since session 18, and off
    in predict+refine, measured when its coarse stage saw a pre-warped moving image (before session 28's
    velocity start, :data:`.predict.SAMPLE_ONCE`; docs/nephi.md); False: off; True:
    learned with the velocity; ``"once"``; on images of at most :data:`.coarse.MATCH_BLUR_MAX_VOXELS`
    compared on their own grid): the coarse stage's levels on the full grid compare the images at
    matched blur, a blur of the sharper image per direction and axis (:mod:`.coarse`,
    :mod:`.matchblur`; the noise a blur removes is added back, so noise is not taken for blur), so
    the field does not fit the resampling blur of the moving image (a pure shift's Jacobian stays
    near 1). True learns the variances with the velocity at every step (opt-in for its cost and its
    losses on large deformations, :func:`.coarse.match_blur_runs`); ``"once"`` estimates them at
    the start of the full-grid levels and holds them (cheaper, but misalignment inflates the
    estimate); ``"auto"`` runs ``"once"`` only on 2D images where the coarser levels' map is
    near-rigid (``metrics["coarse_blur_gate_detj_rms"]``, the RMS of det J - 1, at most
    :data:`.coarse.MATCH_BLUR_NEAR_RIGID`; ``metrics["coarse_blur_gate_spread"]`` the displacement's
    spread in voxels, the gate until session 18) and is off elsewhere. Settings record the mode that
    ran (True, ``"once"``, or False), ``metrics["coarse_blur_variance"]`` the variances.

    ``coarse_flat_fill`` (default True): after the coarse stage, the velocity where both images are
    flat (local RMS gradient below 0.005; in 2D predict+refine on images of side sqrt(h w) over 256 px,
    0.005 times 256 over that side, at least 0.00167, :func:`.predict.refine_flat_gradient`, recorded as
    ``settings["coarse_flat_gradient"]``) is replaced by a smooth extension of the velocity around
    it that relaxes towards the velocity's mean on the textured part over the length of its own
    correlation there, at most the last grid's knot spacing (:mod:`.flatfill`);
    labels in lumens and flat backgrounds then move with the tissue around them. False: no fill.
    ``coarse_flat_noisy`` (default False): also count as flat what is flat after a 3-voxel blur
    (RMS gradient below 0.0015), which finds flat regions under noise (none are found without it at
    noise 0.01 and more) but also calls texture finer than about 8 voxels flat (session-16 review).

    ``contrast_match`` (default False; ``"auto"``, True): NCC assumes intensities related linearly.
    With ``"auto"``, after the global stage the mean fixed intensity per moving-intensity bin, on the
    voxels the global map pairs, is compared with a line; where it explains more than
    :data:`.contrast.NONLINEAR` of what the line leaves (``metrics["contrast_nonlinearity"]``), the
    deformable stages register the moving image mapped through it, with a note (:mod:`.contrast`).
    True maps whenever the relation increases. The result warps the moving image as given. Opt-in:
    it also fires where no contrast changed, on piecewise-constant images a deformation separates
    (the Triangles-and-Circles pairs: Dice lost in predict, predict+refine and optimize) and on
    binary or noisy pairs (session-19 review, R4 and R9).

    ``noise_adapt`` (default ``"auto"``): where either image's estimated white noise is at least
    :data:`.noise.NOISE_MIN` (2D ``optimize``, not chunked), both are compared after a shared Wiener
    filter and the coarse bending weight grows with the noise variance (:mod:`.noise`); True always,
    False never. ``noise_heldout`` (default ``"auto"``: where the noise adaptation ran; True: on any 2D
    ``optimize`` run with a coarse stage; False: never): a first coarse stage is fitted to one half of
    a checkerboard split of the voxels and each level is kept only if it beats the coarser map on the
    other half by more than two standard errors of the held-out noise, and then only where its gain on
    that half is positive (:mod:`.heldout`); no level kept: the global map alone.
    ``metrics["noise_heldout_shares"]`` records where each level was kept.

    ``frame_mask`` (default True): in the coarse stage and the neural field's instance optimisation a
    voxel counts in the similarity only if the map takes it inside the other image's frame (outside,
    the images are sampled at their edge values, which are no data; a border a shift pushed out
    pulled the field up to 16 px inside). False: the similarity before session 17.

    ``learning_rate`` and ``code_learning_rate`` (Adam, networks and latent codes) default to
    :data:`LEARNING_RATES`: a quarter of the rates after a coarse stage, which the field refines.

    ``bspline_spacing``: voxels between B-spline control points of a B-spline-smoothed field
    (SINR); 0 (default) evaluates the network at every point. In ``predict`` modes the model's own
    configuration decides.

    Divide-and-downsample (``mode="optimize"`` only): ``chunked`` None (default) switches it on when
    the fixed image has more than ``max_voxels`` voxels (default 2**24, e.g. 256^3), True forces
    it, False never. ``global_factor`` (default: the smallest integer >= 2 bringing the global pass
    to ``max_voxels / 8`` voxels) downsamples the global pass, which uses ``levels``,
    ``coarse_iterations`` and ``iterations``; ``chunk_size`` (default: the edge of a cube of
    ``max_voxels / 8`` voxels) and ``chunk_overlap`` (default a quarter of it) shape the chunks,
    each optimised for ``chunk_iterations`` (default ``iterations``) steps.

    ``initial``: a global stage first (:mod:`.initial`): ``"rigid"`` (default in ``optimize``
    mode), ``"affine"``, ``"similarity"`` or ``"translation"`` runs the affine engine of that kind
    and the deformable stages register what it leaves; the transform is the field composed with
    that map. ``"none"`` (default in the predict modes) starts from the identity. Not given, on 2D
    images, a searched map far from the one refined from the identity is judged against that one and the
    identity by a short coarse stage from each (:mod:`.basin`; ``metrics["initial_basin"]``), and so is a
    map the overlap rule drops that still keeps at least ``basin.LOW_OVERLAP`` of the image (a large shift).
    In the predict modes ``weights=None`` uses the built-in model for the images' dimensionality
    (:func:`.weights.default_model`). ``predict+refine`` runs the coarse stage from the prediction
    (``coarse_iterations`` defaults to the preset's ``refine_coarse_iterations``) and no neural
    steps on 2D images unless ``iterations`` asks for them; ``levels=1`` refines the predicted codes.
    """
    check_options(dict(locals()))  # types and ranges, before any work (a NaN can crash torch)
    if coarse_finer_level is None:  # automatic: the default (None would read as False below)
        coarse_finer_level = True
    if coarse_flat_fill is None:
        coarse_flat_fill = True
    if noise_adapt is None:
        noise_adapt = "auto"
    if noise_heldout is None:
        noise_heldout = "auto"
    if mode not in MODES:
        raise InputError(f"Unknown mode {mode!r}; choose one of {', '.join(MODES)}.")
    if coarse_flat_noisy and not coarse_flat_fill:  # the blurred test only chooses what the fill fills
        raise InputError(
            "coarse_flat_noisy=True changes which regions coarse_flat_fill fills, and the fill is off "
            "(coarse_flat_fill=False); turn the fill on or leave coarse_flat_noisy off."
        )
    d = pair.fixed.ndim
    if coarse_reg_weight is None and d == 3 and COARSE_REG_WEIGHT_3D is not None:  # opt-in module switch
        try:
            coarse_reg_weight = float(COARSE_REG_WEIGHT_3D)
        except (TypeError, ValueError):  # a string or another object: the same message (review 2, B1)
            coarse_reg_weight = math.nan
        if isinstance(COARSE_REG_WEIGHT_3D, bool) or not (
            math.isfinite(coarse_reg_weight) and coarse_reg_weight >= 0
        ):  # as check_options does
            raise InputError(
                "engine.COARSE_REG_WEIGHT_3D must be a finite number of at least 0.0 "
                f"(now {COARSE_REG_WEIGHT_3D!r})."
            )
    if mode != "optimize" and weights is None:
        weights = default_model(d)
        if weights is None:
            raise InputError(
                f"mode={mode!r} needs a trained NePhi model and there is no built-in one for {d}D "
                "images; pass weights=<checkpoint path or NePhiModel>, or use mode='optimize', which "
                "needs no training."
            )
    guard_initial = initial is None  # a default global map that loses the overlap is dropped
    if initial is None:
        initial = INITIAL_DEFAULT if mode == "optimize" else "none"
    if initial not in INITIALS:
        raise InputError(
            f"Unknown initial {initial!r}; choose one of {', '.join(map(repr, INITIALS))} "
            "(the global stage run before the deformable one)."
        )
    if preset not in PRESETS:
        raise InputError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    if regularizer not in REGULARIZERS:
        raise InputError(f"Unknown regularizer {regularizer!r}; choose one of {', '.join(REGULARIZERS)}.")
    if representation not in REPRESENTATIONS:
        raise InputError(
            f"Unknown representation {representation!r}; choose one of {', '.join(REPRESENTATIONS)}."
        )
    if similarity not in SIMILARITIES:
        raise InputError(f"Unknown similarity {similarity!r}; choose one of {', '.join(SIMILARITIES)}.")
    if chunked and mode != "optimize":
        raise InputError("chunked=True (divide-and-downsample) works with mode='optimize' only.")
    p = PRESETS[preset]
    sample_fraction = float(_resolve(sample_fraction, p, "sample_fraction"))
    levels = int(_resolve(levels, p, "levels"))
    coarse_key = "refine_coarse_iterations" if mode == "predict+refine" else "coarse_iterations"
    coarse_iterations = int(_resolve(coarse_iterations, p, coarse_key))
    after_coarse = mode != "predict" and levels > 1 and coarse_iterations > 0
    large_2d = d == 2 and min(pair.fixed.shape) >= NEURAL_2D_MIN_SIDE
    fshape = pair.fixed.shape
    nvox = math.prod(fshape)
    # divide-and-downsample: its chunks are optimised by the neural steps alone (no neural gate there)
    use_chunks = mode == "optimize" and (bool(chunked) or (chunked is None and nvox > max_voxels))
    # volumes in optimize mode, not chunked, up to VOLUME_DEFAULT_MAX_VOXELS: the preset's own coarse stage
    # and neural steps (session 37)
    volume_run = d == 3 and mode == "optimize" and not use_chunks
    volume_default = volume_run and nvox <= VOLUME_DEFAULT_MAX_VOXELS
    # over it, up to VOLUME_DEFAULT_STEPS_MAX_VOXELS: the same coarse stage, the preset's neural steps kept
    steps_cap = VOLUME_DEFAULT_STEPS_MAX_VOXELS
    if (
        volume_run
        and steps_cap is not None
        and (isinstance(steps_cap, bool) or not isinstance(steps_cap, numbers.Integral) or steps_cap < 0)
    ):  # as COARSE_REG_WEIGHT_3D: checked where it decides
        raise InputError(
            "engine.VOLUME_DEFAULT_STEPS_MAX_VOXELS must be None or a whole number of voxels of at least 0 "
            f"(now {steps_cap!r})."
        )
    volume_steps = volume_run and steps_cap is not None and VOLUME_DEFAULT_MAX_VOXELS < nvox <= steps_cap
    if coarse_warp_blur is None and (volume_default or volume_steps) and not coarse_module.WARP_BLUR_3D:
        coarse_warp_blur = p.get("coarse_warp_blur_3d")  # (None: the module switch, off)
    # the volume default's bending weight and skipped neural steps go with its warp blur "all": with the
    # blur off or partial (False / True, by option or module switch) a volume gets the earlier default
    # (review 2 of session 37: the blur off alone gave a coarse-only run worse than both defaults)
    blur_mode = coarse_module.WARP_BLUR_3D if coarse_warp_blur is None else coarse_warp_blur
    blur_all = isinstance(blur_mode, str) and blur_mode == "all"
    volume_default = volume_default and blur_all
    volume_steps = volume_steps and blur_all
    if coarse_reg_weight is None:
        coarse_reg_weight = p.get("coarse_reg_weight_3d") if volume_default or volume_steps else None
        coarse_reg_weight = COARSE_REG_WEIGHT if coarse_reg_weight is None else coarse_reg_weight
    coarse_reg_weight = float(coarse_reg_weight)
    neural_info: dict = {}  # the gate's reading (metrics["neural_3d_gate"])
    neural_gate = None  # volumes: the neural steps only where the coarse map's RMS reaches this (voxels)
    blur_gate = None  # ... or where the moving image is not blurrier than this (voxel^2; NEURAL_3D_GATE_BLUR)
    if iterations is None and after_coarse and d == 3 and mode == "optimize" and not use_chunks:
        if p.get("neural_3d_gate_rms") == "auto":
            neural_gate = NEURAL_3D_GATE_RMS
            blur_gate = None if neural_gate is None else NEURAL_3D_GATE_BLUR
        if (
            neural_gate is None and volume_default and "iterations_3d_after_coarse" in p
        ):  # the volume default's neural steps (where the opt-in gate is set, the gate decides instead)
            iterations = p["iterations_3d_after_coarse"]
    if iterations is None and after_coarse and d == 2:
        if mode == "predict+refine":
            # predict+refine aims at speed: after its coarse stage the neural steps changed the
            # camera's error at 192 px by 0.015 px for 8x the CPU time (predict.py), so 2D skips
            # them at any size and with any preset
            iterations = p.get("iterations_2d_after_coarse", 0)
        elif large_2d and "iterations_2d_after_coarse" in p:
            iterations = p["iterations_2d_after_coarse"]
    iterations = int(_resolve(iterations, p, "iterations"))
    hidden = int(_resolve(hidden, p, "hidden"))
    layers = int(_resolve(layers, p, "layers"))
    n_frequencies = int(_resolve(n_frequencies, p, "n_frequencies"))
    reg_weight = REG_WEIGHTS[regularizer] if reg_weight is None else float(reg_weight)
    # After a coarse stage the field refines a converged map: smaller steps (see LEARNING_RATES).
    rates = LEARNING_RATES["refine" if after_coarse else "start"]
    learning_rate = rates[0] if learning_rate is None else float(learning_rate)
    code_learning_rate = rates[1] if code_learning_rate is None else float(code_learning_rate)
    if cycle_weight is None:
        # GradICON and cycle consistency tie the backward field to the forward one; the other
        # regularisers act on each field alone, so add cycle consistency to keep them inverse.
        cycle_weight = 0.0 if regularizer in ("gradicon", "cycle") else REG_WEIGHTS["cycle"]

    noise_supported = d == 2 and mode == "optimize" and not use_chunks
    if noise_adapt is True and not noise_supported:
        raise InputError(
            "noise_adapt=True runs on 2D images in mode='optimize' only, not "
            + (
                f"on {d}D images"
                if d != 2
                else f"in mode={mode!r}"
                if mode != "optimize"
                else "in chunked mode"
            )
            + "; use noise_adapt='auto' (which does not run there) or False."
        )
    if noise_heldout is True and not (noise_supported and levels > 1 and coarse_iterations > 0):
        raise InputError(
            "noise_heldout=True checks the coarse stage's levels on 2D images in mode='optimize' (not "
            "chunked) with a coarse stage (levels > 1, coarse_iterations > 0); use noise_heldout='auto' "
            "(which does not run elsewhere) or False."
        )
    plan = None
    if use_chunks:
        plan = chunking.plan_chunks(fshape, max_voxels, chunk_size, chunk_overlap, global_factor)
        chunk_iterations = iterations if chunk_iterations is None else int(chunk_iterations)
        user_points = (sample_points, reg_points)
        sample_points, reg_points = chunking.point_counts(
            math.prod(plan.global_shape), sample_fraction, sample_points, reg_points, p
        )
    sample_points, reg_points = chunking.point_counts(nvox, sample_fraction, sample_points, reg_points, p)
    settings_opt = OptimizeSettings(
        iterations=iterations,
        sample_points=int(sample_points),
        reg_points=int(reg_points),
        regularizer=regularizer,
        reg_weight=reg_weight,
        cycle_weight=float(cycle_weight),
        latent_weight=float(latent_weight),
        learning_rate=float(learning_rate),
        code_learning_rate=float(code_learning_rate),
        derivatives=derivatives,
        similarity=similarity,
        frame_mask=bool(frame_mask),
    )
    cfg = FieldConfig(
        ndim=d,
        representation=representation,
        hidden=hidden,
        layers=layers,
        n_frequencies=n_frequencies,
        fourier_scale=float(fourier_scale),
        omega=float(omega),
        first_omega=float(first_omega),
        global_dim=int(global_dim),
        local_dim=int(local_dim),
        seed=int(seed),
        bspline_intervals=intervals_for_spacing(fshape, bspline_spacing) if bspline_spacing > 0 else None,
    )
    device = choose_device(pair.device)
    masks = sum(m is not None for m in (pair.fixed_mask, pair.moving_mask))
    same_grid = pair.moving.shape == fshape or initial != "none"  # else no backward field
    # noise_heldout=True: the held-out check will run, count it now; "auto" is tested where the noise
    # estimate asks for it (below), so a clean run that never checks is not refused (review 1, B1)
    will_check = (
        mode == "optimize"
        and noise_supported
        and levels > 1
        and coarse_iterations > 0
        and noise_heldout is True
    )
    check_levels = (
        levels - 1 + finer_level_runs(coarse_finer_level, coarse_reg_weight) + (1 if coarse_capture else 0)
        if will_check
        else 0
    )
    check_run_memory(fshape, device, use_chunks, same_grid, masks, heldout_levels=check_levels)
    reset_peak_memory(device)
    start = time.perf_counter()
    notes = []
    predicting = mode != "optimize"
    if coarse_match_blur is None and predicting:
        # "auto" is optimize's default; in predict+refine it was measured when the coarse stage saw the
        # moving image pre-warped through the prediction and its gate only the residual (review R10: IHC
        # 1 % 0.075 -> 0.089 px, CPU 1.1 -> 2.5 s); since session 28 (2D) the stage samples the moving
        # image once from the prediction as a velocity, and its gate reads the whole map (docs/nephi.md)
        coarse_match_blur = False
    if predicting and bspline_spacing > 0:
        notes.append(
            "bspline_spacing is ignored in predict modes: the trained model's configuration decides."
        )
    factors = [2**k for k in range(levels - 1, 0, -1)]  # e.g. levels=3 -> [4, 2]
    shapes = pyramid_shapes(fshape, factors) if levels > 1 and not predicting else []
    spacings = None  # the coarse stage's default knots
    coarse_info: dict = {}  # what the coarse stage learned besides the map (matched blur)
    # optimize's first coarse level may compare blurred images (2D; coarse.FIRST_LEVEL_BLUR, opt-in)
    first_blur = coarse_module.FIRST_LEVEL_BLUR if mode == "optimize" and d == 2 else 0.0
    finer = finer_level_runs(coarse_finer_level, coarse_reg_weight)
    stage_finer = coarse_finer_level  # the coarse stage adds the finer-knot level itself
    # share of each coarse level's steps its rate ramps up over (predict+refine: REFINE_WARMUP)
    coarse_warmup = coarse_cooldown = 0.0  # (and the share of the last level's steps added, decaying)
    refine_start = None  # predict+refine's coarse stage: from the prediction as a velocity, or pre-warped
    flat_gradient = None  # the flat fill's texture threshold (None: flatfill's; predict+refine's below)
    flat_empty = None  # empty regions filled whole under a lowered threshold (predict.REFINE_FLAT_EMPTY)
    refine_predictions = None  # predictions in predict+refine's start (predict.REFINE_PREDICT_TWICE)
    if mode == "predict+refine" and after_coarse:  # the coarse stage starts from the prediction
        coarse_warmup = refine_warmup(fshape) if d == 2 else 0.0  # 2D, where it was measured
        coarse_cooldown = refine_cooldown(fshape) if d == 2 else 0.0
        # the finer-knot level in the schedule, on optimize's last grid: 2D, where it was measured
        on_optimize_grid = finer and FINER_ON_OPTIMIZE_GRID and d == 2
        shapes, spacings = refine_grids(fshape, levels, on_optimize_grid)
        # from the prediction as a velocity (predict.SAMPLE_ONCE): 2D, where it was measured
        refine_start = "velocity" if predict_module.SAMPLE_ONCE and d == 2 else "prewarp"
        if refine_start == "velocity":  # on large images a lower texture threshold for the flat fill
            flat_gradient = predict_module.refine_flat_gradient(fshape)
            flat_empty = predict_module.refine_flat_empty(fshape)
            refine_predictions = 1
        if on_optimize_grid:
            finer = stage_finer = False
    refine = iterations if mode != "predict" else 0
    if use_chunks:  # the global pass runs the coarse stage on the downsampled pair
        shapes = pyramid_shapes(plan.global_shape, factors) if levels > 1 else []
    coarse_spacings = level_spacings(plan.global_shape if use_chunks else fshape, shapes, spacings, finer)
    coarse_label = f"coarse ({len(coarse_spacings)} level(s))"
    coarse_schedule = level_iterations(coarse_iterations, len(shapes), finer)
    refine_steps = None  # predict+refine's own steps a level (predict.REFINE_LEVEL_SHARES), where set
    compare_on_warp = False  # its coarser levels compared on their warp grids (REFINE_COMPARE_ON_WARP_GRID)
    if refine_start == "velocity" and not use_chunks:
        refine_steps = predict_module.refine_schedule(coarse_iterations, len(shapes), fshape)
        coarse_schedule = refine_steps or coarse_schedule
        compare_on_warp = predict_module.refine_compare_on_warp_grid(fshape)
    basin_shapes = shapes  # the basin guard's short coarse stages keep the schedule's grids
    capture_steps = 0  # coarse_capture: the steps of the coarser level run first (0: none ran)
    capture_schedule = None  # ... and the stage's schedule with it
    if coarse_capture_gate is not None and not coarse_capture:
        raise InputError("coarse_capture_gate gates the capture level; set coarse_capture (steps) with it.")
    if coarse_capture:
        if not (mode == "optimize" and d == 2 and not use_chunks and shapes and coarse_iterations > 0):
            raise InputError(
                "coarse_capture adds a coarser level to the coarse stage of 2D images in mode='optimize' "
                "(not chunked) with a coarse stage (levels > 1, coarse_iterations > 0); leave it at 0 here."
            )
        if first_blur > 0:  # it blurs level 0, which would be the capture level (review 1 of session 42)
            raise InputError(
                "coarse_capture does not run with coarse.FIRST_LEVEL_BLUR set (it would blur the capture "
                "level, not the schedule's first); set one of them only."
            )
        wider = pyramid_shapes(fshape, [2 * factors[0], *factors])
        if len(wider) > len(shapes):  # (an image too small for a coarser grid runs the schedule alone)
            shapes, capture_steps = wider, int(coarse_capture)
            coarse_spacings = level_spacings(fshape, shapes, spacings, finer)
            coarse_schedule = capture_schedule = [capture_steps, *coarse_schedule]
            coarse_label = f"coarse ({len(coarse_spacings)} level(s))"
    # the coarse stage's 2D-only options (sessions 43-46) need a 2D optimize, not chunked, with a coarse stage
    coarse_2d = mode == "optimize" and d == 2 and not use_chunks and bool(shapes) and coarse_iterations > 0
    if coarse_finer_gate is not None and not (coarse_2d and finer):
        raise InputError(
            "coarse_finer_gate gates the finer-knot level of the coarse stage of 2D images in "
            "mode='optimize' (not chunked) with a coarse stage (levels > 1, coarse_iterations > 0) and "
            "that level (coarse_finer_level=True, coarse_reg_weight > 0); leave it at None here."
        )
    if coarse_edge_damp is not None and not coarse_2d:
        raise InputError(
            "coarse_edge_damp damps the coarse stage's motion along edges of 2D images in mode='optimize' "
            "(not chunked) with a coarse stage (levels > 1, coarse_iterations > 0); leave it at None here."
        )
    if coarse_blur_pattern and not (coarse_2d and match_blur_mode(coarse_match_blur) in ("auto", "once")):
        raise InputError(
            "coarse_blur_pattern shapes the matched blur of the coarse stage of 2D images in mode='optimize' "
            "(not chunked) with a coarse stage (levels > 1, coarse_iterations > 0), estimated once "
            "(coarse_match_blur None, 'auto' or 'once'); leave it False here."
        )
    if coarse_spline_warp and not coarse_2d:
        raise InputError(
            "coarse_spline_warp changes the warp of the coarse stage of 2D images in mode='optimize' (not "
            "chunked) with a coarse stage (levels > 1, coarse_iterations > 0); leave it False here."
        )
    coarse_tail = cooldown_steps(coarse_cooldown, coarse_schedule[-1]) if coarse_schedule else 0
    coarse_steps = sum(coarse_schedule) + coarse_tail
    total = coarse_steps + refine + (1 if predicting else 0)
    if use_chunks:
        total = chunking.total_steps(plan, levels, coarse_iterations, iterations, chunk_iterations, finer)
    counter = {"step": 0}
    stage0 = affine_n = None
    initial_steps, initial_metrics = 0, {}
    # Optimising on grids of one shape, the global map is composed into the sampling (the moving
    # image is interpolated once); else the moving image is resampled onto the fixed grid first.
    fold = mode == "optimize" and not use_chunks and pair.moving.shape == fshape
    if initial != "none":
        stage0 = run_global_stage(
            pair, initial, total, resample=not fold, min_overlap=MIN_OVERLAP if guard_initial else 0.0
        )
        counter["step"] = initial_steps = stage0.steps
        total += stage0.steps
        if guard_initial and fold and d == 2 and shapes and coarse_iterations > 0:
            # the searched map against the one refined from the identity, where they differ (basin.py)
            stage0, basin_record, basin_note = basin.guard(
                pair,
                stage0,
                initial,
                basin_shapes,
                coarse_reg_weight,
                similarity,
                device,
                settings_opt.frame_mask,
                noise_adapt,
            )
            initial_metrics.update(initial_basin=basin_record)
            notes.extend([basin_note] if basin_note else [])
        initial_metrics.update(stage0.metrics, initial_kept=not stage0.dropped)
        if stage0.dropped:
            notes.append(stage0.dropped)
            stage0 = None
    if stage0 is not None:
        moving_on_fixed, offset = stage0.moving, None
        if fold:
            affine_n = normalized_matrix(stage0.transform.matrix, fshape).to(device)
    else:
        moving_on_fixed, offset = _moving_on_fixed_grid(pair, device)
    if offset is not None:
        notes.append(
            "Fixed and moving grids differ; the moving image was centred on the fixed grid and "
            "no backward field is stored. Use initial='affine' to register them with both fields."
        )
    moving_mask = pair.moving_mask if stage0 is None else stage0.moving_mask
    user_on_fixed, contrast_score, contrast_mapped = moving_on_fixed, None, False
    if contrast_match:  # intensities related non-linearly: map the moving ones (contrast.py)
        matrix = stage0.transform.matrix if stage0 is not None and fold else None
        contrast_score, cmap = contrast.check(
            pair.fixed, moving_on_fixed, matrix, pair.fixed_mask, moving_mask if offset is None else None
        )
        if cmap is not None and (contrast_match is True or contrast_score > contrast.NONLINEAR):
            moving_on_fixed, contrast_mapped = contrast.apply_map(moving_on_fixed, *cmap), True
            notes.append(contrast.note(contrast_score))
    preview = Previewer(pair, moving_on_fixed, fshape, device)
    # noise (noise.py): estimated on the images as compared (intensities normalised to [0, 1]); where
    # it adapts, both are compared after a Wiener filter and the coarse stage's bending weight grows
    # (2D optimize mode only, not divide-and-downsample, whose images this would copy)
    fixed_cmp = moving_cmp = noise_sigmas = None
    noise_ran = False
    if not use_chunks:
        fixed_cmp, moving_cmp = normalize_intensity(pair.fixed), normalize_intensity(moving_on_fixed)
    if noise_adapt and noise_supported:
        noise_sigmas = [noise.estimate_noise(fixed_cmp), noise.estimate_noise(moving_cmp)]
        noise_ran = noise.adapts(noise_adapt, noise_sigmas)
    # held-out check of the coarse levels (heldout.py): where the noise adaptation ran ("auto") or asked
    # for; a first coarse stage on one half of a checkerboard split, scored on the other
    heldout_ran = (
        not predicting
        and noise_supported
        and bool(shapes)
        and coarse_iterations > 0
        and (noise_heldout is True or (noise_heldout == "auto" and noise_ran))
    )
    if heldout_ran and noise_heldout == "auto":  # the check's memory, now that it would run
        skipped = heldout_memory_note(fshape, len(coarse_spacings))
        if skipped is not None:
            heldout_ran = False
            notes.append(skipped)
    raw_cmp = (fixed_cmp, moving_cmp) if heldout_ran else None
    heldout_check, heldout_shares, coarse_kept = None, None, len(coarse_spacings)
    if heldout_ran:
        total += coarse_steps
    reg_used = coarse_reg_weight
    if noise_ran:
        fixed_cmp, moving_cmp = noise.wiener_filter([fixed_cmp, moving_cmp], noise_sigmas)
        reg_used = noise.regularizer_weight(coarse_reg_weight, math.sqrt(np.mean(np.square(noise_sigmas))))

    def report(stage, loss, point_map):
        counter["step"] += 1
        pv = preview.maybe(point_map)
        pair.progress.step(counter["step"], total, loss, stage=stage, preview=pv)

    chunk_info = None
    if use_chunks:
        with memory_guard("NePhi registration (divide-and-downsample)"):

            def chunk_settings(voxels: int) -> OptimizeSettings:
                n_s, n_r = chunking.point_counts(voxels, sample_fraction, *user_points, p)
                return replace(settings_opt, iterations=chunk_iterations, sample_points=n_s, reg_points=n_r)

            fwd, bwd, chunk_info = chunking.register_chunked(
                pair.fixed,
                moving_on_fixed,
                plan,
                cfg,
                settings_opt,
                chunk_settings,
                levels,
                coarse_iterations,
                coarse_reg_weight,
                local_stride,
                float(bspline_spacing),
                device,
                lambda stage, loss, _maps: report(stage, loss, None),
                pair.progress.check,
                seed=seed,
                fixed_mask=pair.fixed_mask,
                moving_mask=moving_mask if offset is None else None,
                backward=offset is None,
                coarse_finer_level=coarse_finer_level,
                coarse_match_blur=coarse_match_blur,
                coarse_flat_fill=coarse_flat_fill,
                coarse_flat_noisy=coarse_flat_noisy,
                coarse_warp_blur=coarse_warp_blur,
            )
        global_loss = chunk_info.pop("global_final_loss")
        coarse_info["blur_variance"] = chunk_info.pop("coarse_blur_variance", None)
        coarse_info["flat_share"] = chunk_info.pop("coarse_flat_share", None)
        coarse_info["flat_fill_info"] = chunk_info.pop("coarse_flat_fill_info", {})
        history = [] if global_loss is None else [global_loss]
    else:
        with memory_guard("NePhi registration"):
            fix_t = torch.as_tensor(fixed_cmp, device=device)[None, None]
            mov_t = torch.as_tensor(moving_cmp, device=device)[None, None]
            del fixed_cmp, moving_cmp
            fmask = mask_tensor(pair.fixed_mask, device)
            mmask = mask_tensor(moving_mask, device) if offset is None else None

            def coarse_stage(moving, moving_mask, fixed=None, label=coarse_label, **kw) -> DenseMaps:
                """The B-spline coarse stage of ``fixed`` (default ``fix_t``) against ``moving`` (its
                progress steps); ``kw`` adds or overrides options of ``optimize_velocity``."""
                options = dict(
                    fixed_mask=fmask,
                    moving_mask=moving_mask,
                    finer_level=stage_finer,
                    match_blur=coarse_match_blur,
                    flat_fill=coarse_flat_fill,
                    flat_noisy=coarse_flat_noisy,
                    frame_mask=settings_opt.frame_mask,
                    first_blur=first_blur,
                    warp_blur=coarse_warp_blur,
                )
                if capture_schedule is not None:  # the capture level first, then the schedule as it was
                    options["schedule"] = capture_schedule
                    if coarse_capture_gate is not None:  # kept only where its map is not near-rigid
                        options["first_gate"] = float(coarse_capture_gate)
                if coarse_finer_gate is not None:  # the finer-knot level only where the map is not near-rigid
                    options["finer_gate"] = float(coarse_finer_gate)
                if coarse_edge_damp is not None:  # no motion along coherent edges (opt-in, session 44)
                    options["edge_damp"] = float(coarse_edge_damp)
                if coarse_spline_warp:  # the cubic B-spline warp in 2D (session 46)
                    options["spline_warp"] = True
                if coarse_blur_pattern:  # the matched blur follows the map's sub-voxel position (session 46)
                    options["pattern_blur"] = True
                options.update(kw)
                maps = optimize_velocity(
                    fix_t if fixed is None else fixed,
                    moving,
                    shapes,
                    coarse_iterations,
                    reg_used,
                    similarity,
                    lambda loss: report(label, loss, None),
                    **options,
                )
                if fixed is not None:  # not the registration's own coarse stage (the held-out check)
                    return maps
                coarse_info["blur_variance"] = maps.blur_variance
                coarse_info["blur_pattern"] = maps.blur_pattern
                coarse_info["blur_gate_spread"] = maps.blur_gate_spread
                coarse_info["blur_gate_detj_rms"] = maps.blur_gate_detj_rms
                coarse_info["flat_share"] = maps.flat_share
                coarse_info["flat_fill_info"] = maps.flat_fill_info
                coarse_info["steps_run"] = maps.steps_run
                coarse_info["capture_gate"] = (maps.first_gate_reading, maps.first_kept)
                coarse_info["finer_gate"] = (maps.finer_gate_reading, maps.finer_kept)
                coarse_info["volume_sampling"] = maps.volume_sampling
                return maps

            def heldout_levels():
                """The held-out check (heldout.py): the comparison of the global map and each coarse level
                fitted to one half of the voxels, on the other half (None: too few voxels held out), and
                each level's gate (:func:`.heldout.level_gates`)."""
                keep = heldout.split_mask(fshape)
                fit = [heldout.fill_from(x, keep) for x in raw_cmp]
                if noise_ran:
                    fit = noise.wiener_filter(fit, noise_sigmas)
                velocities: list[torch.Tensor] = []
                coarse_stage(
                    torch.as_tensor(fit[1], device=device)[None, None],
                    mmask,
                    fixed=torch.as_tensor(fit[0], device=device)[None, None],
                    label="held-out check",
                    flat_fill=False,
                    flat_noisy=False,
                    affine=affine_n,
                    on_level=lambda _k, v: velocities.append(v),
                )
                del fit
                candidates = [global_maps(d, device, affine_n)] + [
                    velocity_maps(v, affine_n) for v in velocities
                ]
                raw = [torch.as_tensor(x, device=device)[None, None] for x in raw_cmp]
                sigmas = noise_sigmas or [noise.estimate_noise(x) for x in raw_cmp]
                check = heldout.heldout_scores(
                    *raw,
                    fix_t,
                    mov_t,
                    sigmas,
                    candidates,
                    torch.as_tensor(~keep, device=device),
                    fmask,
                    mmask,
                )
                if check is None:
                    return None, [None] * len(velocities)
                gates = heldout.level_gates(check, coarse_spacings)[0]
                check.release()  # the metrics need the scores only, not its images (review 2, B6)
                return check, gates

            coarse: DenseMaps | None = None
            if predicting:
                # Work on a copy: neither prediction (eval mode) nor refinement touches the stored model.
                work = as_model(weights, device).copy().to(device).eval()
                if work.cfg.ndim != d:
                    raise DimensionMismatchError(
                        f"The NePhi model is {work.cfg.ndim}D but the images are {d}D; use a {d}D model."
                    )
                with torch.no_grad():
                    codes = work.codes(fix_t, mov_t).detach_clone()
                predicted = prediction_maps(work.field, codes, prediction_grid(work.input_shape, fshape))
                report("predict", None, predicted.forward)
                if shapes:  # predict+refine: the coarse stage from the prediction, then as optimize
                    low_passed = low_passed_maps(predicted)
                    if refine_start == "velocity" and predict_module.refine_predict_twice(fshape):
                        low_passed = predict_module.predict_again(work, fix_t, mov_t, low_passed)
                        refine_predictions = 2
                    if refine_start == "velocity":  # from the prediction, the moving image sampled once
                        coarse = coarse_stage(
                            mov_t,
                            mmask,
                            spacings=spacings,
                            warmup=coarse_warmup,
                            cooldown=coarse_cooldown,
                            initial=velocity_of(low_passed),
                            flat_gradient=flat_gradient,
                            flat_empty=flat_empty,
                            schedule=refine_steps,
                            compare_on_warp_grid=compare_on_warp,
                        )
                    else:  # the moving image resampled through the prediction first
                        mmask_low = None if mmask is None else warp_through(mmask, low_passed).clamp(0, 1)
                        coarse = ComposedMaps(
                            coarse_stage(
                                warp_through(mov_t, low_passed),
                                mmask_low,
                                spacings=spacings,
                                warmup=coarse_warmup,
                                cooldown=coarse_cooldown,
                            ),
                            low_passed,
                        )
                    field = NeuralDeformationField(cfg).to(device)
                    codes = zero_codes(cfg, local_grid_shape(fshape, local_stride), device=device)
                elif refine == 0:  # predict: the prediction on its grid is the map
                    cfg, field, coarse = work.cfg, work.field, predicted
                else:  # predict+refine without a coarse stage: refine the predicted codes
                    cfg, field = work.cfg, work.field
            else:
                gates = None
                if heldout_ran:
                    heldout_check, gates = heldout_levels()
                    raw_cmp = None
                    # levels up to the last one kept anywhere; a share of 1 where kept everywhere
                    heldout_shares = [1.0 if g is None else float(np.mean(g)) for g in gates]
                    coarse_kept = max((k + 1 for k, sh in enumerate(heldout_shares) if sh > 0), default=0)
                    if coarse_kept == 0:  # no deformation supported at any knot spacing: none finer either
                        refine = 0
                if shapes and coarse_iterations > 0 and coarse_kept > 0:
                    kept = coarse_kept if coarse_kept < len(coarse_spacings) else None
                    coarse = coarse_stage(mov_t, mmask, affine=affine_n, max_levels=kept, gates=gates)
                elif affine_n is not None or heldout_ran:  # no coarse stage: the global map alone first
                    coarse = global_maps(d, device, affine_n)
                field = NeuralDeformationField(cfg).to(device)
                codes = zero_codes(cfg, local_grid_shape(fshape, local_stride), device=device)
            history: list[float] = []
            maps = Maps(field, codes, coarse)
            if neural_gate is not None and refine > 0 and isinstance(coarse, DenseMaps):
                rms = displacement_rms(coarse, fshape)
                neural_info = {"rms": rms, "threshold": neural_gate, "ran": rms >= neural_gate}
                # a small map: skip only on a blurrier moving image
                if not neural_info["ran"] and blur_gate is not None:
                    blur = excess_blur(fix_t, mov_t, coarse, settings_opt, fmask, mmask, seed)
                    neural_info.update(
                        excess_blur=blur["excess"], blur_threshold=blur_gate, ran=blur["excess"] <= blur_gate
                    )
                if not neural_info["ran"]:
                    refine = 0
            if refine > 0:
                maps, history = optimize_field(
                    field,
                    codes,
                    fix_t,
                    mov_t,
                    replace(settings_opt, iterations=refine),
                    coarse=coarse,
                    on_step=lambda loss, m: report("nephi", loss, m.forward),
                    seed=seed,
                    fixed_mask=fmask,
                    moving_mask=mmask,
                )
            pair.progress.check()
            del fix_t, mov_t, fmask, mmask  # the dense outputs below need the memory
            preview.moving = None
            release_free_memory(device)
            if refine == 0 and coarse is not None:  # the untrained field is the identity: skip it
                maps = coarse
            with torch.no_grad():
                fwd = dense_displacement(maps.forward, fshape, device)
                bwd = dense_displacement(maps.backward, fshape, device) if offset is None else None
    if offset is not None:
        fwd = fwd + np.asarray(offset, np.float32).reshape((d,) + (1,) * d)
    transform = DisplacementTransform(
        fwd,
        inverse_field=bwd,
        spacing=pair.spacing,
        moving_shape=fshape if stage0 is not None and affine_n is None else pair.moving.shape,
    )
    if stage0 is not None and affine_n is None:  # phi(x) = A(x + u(x)): the field, then the map
        transform = ComposedTransform([transform, stage0.transform])
        fwd = transform.displacement(fshape)
    # the steps the held-out check skipped (levels, or the coarse and neural stages): progress ends at total
    if (heldout_ran or neural_info.get("ran") is False) and counter["step"] < total:
        counter["step"] = total
        pair.progress.step(total, total, stage="nephi")
    seconds_opt = time.perf_counter() - start
    # in smaller slabs than Transform.warp's (the same values), and the freed slabs handed back before the
    # metrics (session 43: the 2048^2 memory peak)
    warped = warped_image(transform, pair.moving, fshape, device)
    release_free_memory(device)
    metrics = {
        "iterations": refine,
        # the steps the coarse stage ran: levels the held-out check cut or gated off everywhere run none,
        # and the cooldown only where the last level runs (as planned where the stage cannot tell: chunked)
        "coarse_iterations": coarse_info.get(
            "steps_run",
            sum(coarse_schedule[:coarse_kept]) + (coarse_tail if coarse_kept >= len(coarse_schedule) else 0),
        ),
        "levels": len(shapes) + 1,
        "coarse_levels": min(coarse_kept, len(coarse_spacings)) if coarse_steps > 0 else 0,
        "final_loss": history[-1] if history else None,
        "seconds_optimisation": seconds_opt,
        "sample_points": settings_opt.sample_points,
        "reg_points": settings_opt.reg_points,
        "initial_steps": initial_steps,
    }
    metrics.update(initial_metrics)
    capture_reading, capture_kept = coarse_info.get("capture_gate", (None, None))
    if capture_reading is not None:  # coarse_capture_gate: the capture level's reading, whether it was kept
        metrics["coarse_capture_detj_rms"] = round(capture_reading, 5)
        metrics["coarse_capture_kept"] = bool(capture_kept)
    finer_reading, finer_kept = coarse_info.get("finer_gate", (None, None))
    # coarse_finer_gate: the reading before the finer-knot level, whether it ran
    if finer_reading is not None:
        metrics["coarse_finer_detj_rms"] = round(finer_reading, 5)
        metrics["coarse_finer_kept"] = bool(finer_kept)
    if neural_info:  # volumes: the coarse map's displacement RMS and whether the neural steps ran
        metrics["neural_3d_gate"] = neural_info
    if coarse_info.get("flat_share") is not None:  # the flat fill ran: share of the last grid filled
        metrics["coarse_flat_share"] = round(coarse_info["flat_share"], 4)
    fill_info = coarse_info.get("flat_fill_info") or {}
    if fill_info.get("converged") is False:  # rare (under 110 steps measured): say so
        notes.append(
            f"coarse_flat_fill stopped after {fill_info['steps']} conjugate-gradient steps before "
            "converging; the flat regions' fill is approximate (coarse_flat_fill=False turns it off)."
        )
    blur_ran = False
    if coarse_info.get("blur_variance") is not None:
        blur_ran = {"learned": True, "auto": "once"}.get(
            match_blur_mode(coarse_match_blur), coarse_match_blur
        )
    if coarse_info.get("blur_gate_spread") is not None:
        metrics["coarse_blur_gate_spread"] = round(coarse_info["blur_gate_spread"], 4)
    if coarse_info.get("blur_gate_detj_rms") is not None:
        metrics["coarse_blur_gate_detj_rms"] = round(coarse_info["blur_gate_detj_rms"], 5)
    if coarse_info.get("blur_variance") is not None:  # (direction, axis): fixed vs moving, moving vs fixed
        metrics["coarse_blur_variance"] = [
            [round(float(x), 4) for x in row] for row in coarse_info["blur_variance"]
        ]
        if coarse_info.get("blur_pattern") is not None:  # (direction, uniform / patterned, axis)
            metrics["coarse_blur_pattern"] = [
                [[round(float(x), 4) for x in part] for part in row] for row in coarse_info["blur_pattern"]
            ]
    elif (
        coarse_match_blur and match_blur_mode(coarse_match_blur) != "auto"
    ):  # asked for, but left out: say why
        notes.append(
            f"coarse_match_blur={coarse_match_blur!r} did not run: "
            + (
                "it belongs to the coarse stage, which did not run (mode, levels or coarse_iterations)"
                if "blur_variance" not in coarse_info
                else "it runs only in the coarse stage's steps on the full grid, on images of at most "
                f"{MATCH_BLUR_MAX_VOXELS} voxels compared on their own grid (its memory cost)"
            )
        )
    if (
        coarse_blur_pattern and "coarse_blur_pattern" not in metrics
    ):  # asked for, but nothing to shape: say why
        notes.append(
            "coarse_blur_pattern=True did not act: the matched blur was not estimated once here ("
            + (
                "the coarser levels' map was not near-rigid, coarse_blur_gate_detj_rms over "
                f"{coarse_module.MATCH_BLUR_NEAR_RIGID}"
                if coarse_info.get("blur_gate_detj_rms") is not None
                else f"it runs on images of at most {MATCH_BLUR_MAX_VOXELS} voxels compared on their grid"
            )
            + "); the matched blur ran as without it"
        )
    if chunk_info is not None:
        metrics["chunk_iterations"] = chunk_iterations
        metrics.update(chunk_info)
    # Similarity where the map stays inside the moving image (warping pads with zeros outside),
    # before and after alike; within the fixed mask when one is given.
    overlap = inside_mask(fwd, pair.moving.shape)
    if pair.fixed_mask is not None:
        overlap &= pair.fixed_mask
    if overlap.sum() < 16:
        overlap = pair.fixed_mask
    metrics.update(similarity_report(pair.fixed, pair.moving, warped, overlap))
    if contrast_score is not None:
        metrics["contrast_nonlinearity"] = round(contrast_score, 4)
    if noise_sigmas is not None:  # estimated noise (fixed, moving; intensities in [0, 1])
        metrics["noise_sigma"] = [round(float(x), 5) for x in noise_sigmas]
    if noise_ran:
        metrics["coarse_reg_weight_used"] = round(reg_used, 6)
    if heldout_check is not None:  # held-out NCC of the global map and of each coarse level's fit
        metrics["noise_heldout_scores"] = [round(float(x), 6) for x in heldout_check.scores]
        # standard error of each level's score minus the previous level's
        metrics["noise_heldout_se"] = [
            float(f"{heldout_check.se[k, k - 1]:.3g}") for k in range(1, len(heldout_check.scores))
        ]
    if heldout_shares is not None and heldout_check is None:  # ran, but could not judge (review 1, B4)
        metrics["noise_heldout_shares"] = None
        metrics["noise_heldout_levels"] = coarse_kept
        notes.append(
            "noise_heldout could not judge the coarse levels: fewer than 16 held-out voxels lie inside "
            "the frame (and mask) of every candidate map; all levels were kept, as with noise_heldout=False."
        )
    elif heldout_shares is not None:  # share of the image where each coarse level was kept; levels run
        metrics["noise_heldout_shares"] = [round(x, 4) for x in heldout_shares]
        metrics["noise_heldout_levels"] = coarse_kept
    if similarity != "ncc":  # judge the run by what it optimised (NCC is in the report already)
        metrics.update(optimised_similarity(similarity, pair.fixed, user_on_fixed, warped, overlap))
    metrics.update(regularity_report(transform, fshape, pair.fixed_mask))
    note = check_result(metrics, settings_opt.learning_rate, settings_opt.code_learning_rate)
    if note is not None:
        notes.append(note)
    if bwd is not None:
        metrics.update(inverse_consistency(transform))
    metrics.update(memory_report(device))
    metrics["seconds"] = time.perf_counter() - start
    if notes:
        metrics["notes"] = notes
    settings = {
        "mode": mode,
        "preset": preset,
        "initial": initial,
        "levels": len(shapes) + 1 if predicting else levels,
        "coarse_iterations": coarse_iterations,
        "coarse_reg_weight": coarse_reg_weight,
        "coarse_finer_level": coarse_finer_level,
        # steps of the coarser level run before the coarse stage's schedule (coarse_capture; 0: none ran)
        "coarse_capture": capture_steps,
        # its map's RMS of det J - 1 up to which its velocity is dropped (None: kept whatever it reads)
        "coarse_capture_gate": coarse_capture_gate if capture_steps else None,
        # the map's RMS of det J - 1 up to which the finer-knot level does not run (None: it runs)
        "coarse_finer_gate": None if coarse_finer_gate is None else float(coarse_finer_gate),
        # strength of the damping of the coarse levels' motion along coherent edges (None: none)
        "coarse_edge_damp": None if coarse_edge_damp is None else float(coarse_edge_damp),
        # the matched blur's variance follows the map's sub-voxel position (opt-in, session 46)
        "coarse_blur_pattern": bool(coarse_blur_pattern),
        # the coarse stage's 2D warp by the cubic B-spline, not grid_sample's bicubic (opt-in, session 46)
        "coarse_spline_warp": bool(coarse_spline_warp),
        "coarse_flat_fill": bool(coarse_flat_fill),
        "coarse_flat_noisy": bool(coarse_flat_noisy),
        # the flat fill's texture threshold, RMS gradient per voxel (predict.refine_flat_gradient)
        "coarse_flat_gradient": (flatfill.FLAT_GRADIENT if flat_gradient is None else flat_gradient)
        if coarse_flat_fill
        else None,
        # regions flat by FLAT_GRADIENT filled whole where this share is flat by the lowered threshold
        # (predict.REFINE_FLAT_EMPTY, opt-in; None: off)
        "coarse_flat_empty": flat_empty if coarse_flat_fill else None,
        # whether the noise adaptation ran ("auto" records its outcome; metrics["noise_sigma"])
        "noise_adapt": noise_ran,
        # whether the held-out check of the coarse levels ran (metrics["noise_heldout_levels"]: kept)
        "noise_heldout": heldout_ran,
        "contrast_match": contrast_mapped,  # whether the deformable stages saw the moving image mapped
        # the mode that ran (True: learned with the velocity, "once": estimated once, also as the
        # outcome of "auto", whose gate measure is metrics["coarse_blur_gate_detj_rms"]), False if none
        "coarse_match_blur": blur_ran,
        # volumes: the warp blur the coarse stage was asked for (coarse_warp_blur, or coarse.WARP_BLUR_3D
        # where left to it; coarse_volume_sampling["warp_blur"] says where it ran); None on 2D
        "coarse_warp_blur": blur_mode if d == 3 else None,
        "coarse_shapes": [list(sh) for sh in shapes],
        "coarse_spacings": [float(sp) for sp in coarse_spacings],
        "coarse_warmup": coarse_warmup,
        "coarse_cooldown": coarse_cooldown,
        "coarse_first_blur": first_blur if coarse_steps > 0 and not use_chunks else 0.0,
        # volumes: whether the coarse stage warped by the cubic spline and averaged down by exact bins
        # (coarse.CUBIC_3D, coarse.EXACT_AREA_3D, up to coarse.VOLUME_SAMPLING_MAX_VOXELS); None: 2D, none
        "coarse_volume_sampling": coarse_info.get("volume_sampling"),
        # predict+refine's coarse stage: "velocity" (from the prediction, the moving image sampled once),
        # "prewarp" (the moving image resampled through the prediction first); None: none ran
        "refine_start": refine_start,
        # the model's predictions composed into predict+refine's start from the prediction as a velocity
        # (2: predict.REFINE_PREDICT_TWICE), None: no such start
        "refine_predictions": refine_predictions,
        # predict+refine's own steps a level (predict.REFINE_LEVEL_SHARES; None: the schedule of thirds) and
        # whether its coarser levels compared the images on their warp grids (REFINE_COMPARE_ON_WARP_GRID)
        "refine_level_steps": refine_steps,
        "refine_compare_on_warp_grid": compare_on_warp,
        "sample_fraction": sample_fraction,
        "local_stride": local_stride,
        "seed": seed,
        "bspline_spacing": bspline_spacing,
        "chunked": use_chunks,
        # volumes: the coarse map's displacement RMS (voxels) the neural steps need (None: they always run)
        "neural_3d_gate_rms": neural_gate,
        "neural_3d_gate_blur": blur_gate,
        **settings_opt.to_dict(),
        "field": cfg.to_dict(),
    }
    if use_chunks:
        settings.update(plan.to_dict(), max_voxels=max_voxels, chunk_iterations=chunk_iterations)
    if predicting:
        settings["weights"] = str(weights) if isinstance(weights, (str, Path)) else type(weights).__name__
    return Registration(warped=warped, transform=transform, metrics=metrics, settings=settings)


def _moving_on_fixed_grid(pair: Pair, device) -> tuple[np.ndarray, tuple | None]:
    """The moving image on the fixed grid (centres aligned) and the voxel offset, or itself and None."""
    if pair.moving.shape == pair.fixed.shape:
        return pair.moving, None
    fshape, mshape = np.asarray(pair.fixed.shape), np.asarray(pair.moving.shape)
    offset = (mshape - 1) / 2.0 - (fshape - 1) / 2.0
    d = len(fshape)
    mat = np.eye(d + 1)
    mat[:d, d] = offset
    shift = AffineTransform(mat)
    return shift.warp(pair.moving, output_shape=tuple(fshape), device=device), tuple(offset)
