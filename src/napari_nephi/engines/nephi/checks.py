"""Checks of the ``nephi`` engine's options and of the memory a run needs, before any work.

Every option is type- and range-checked (:mod:`napari_nephi.core.options`), so a NaN, infinite,
negative or absurd value stops with an ``InputError`` naming the option instead of reaching torch,
where a NaN learning rate or sampling grid can crash the process. :func:`check_run_memory` stops a
run whose dense outputs would not fit with an ``OutOfMemoryError``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ...core import regularizers as R
from ...core.device import check_memory
from ...core.errors import InputError, OutOfMemoryError
from ...core.options import check_bool, check_choice, check_float, check_int
from ...core.similarity import metric
from .coarse import MATCH_BLUR_MODES
from .mlp import REPRESENTATIONS
from .optimize import REGULARIZERS, SIMILARITIES

#: Whole-number options: (low, high); ``None`` always means "from the preset / automatic".
INT_RANGES: dict[str, tuple[int, int | None]] = {
    "iterations": (0, 1_000_000),
    "coarse_iterations": (0, 1_000_000),
    "coarse_capture": (0, 1_000_000),
    "chunk_iterations": (0, 1_000_000),
    "levels": (1, 12),
    "sample_points": (16, 1 << 28),
    "reg_points": (1, 1 << 24),
    "hidden": (1, 4096),
    "layers": (1, 64),
    "n_frequencies": (1, 4096),
    "global_dim": (1, 4096),
    "local_dim": (0, 4096),
    "local_stride": (1, 1 << 20),
    "seed": (0, 2**63 - 1),
    "max_voxels": (4096, None),
    "chunk_size": (8, None),
    "chunk_overlap": (0, None),
    "global_factor": (1, None),
}

#: Number options: (low, high, low_open). Learning rates above these make Adam's steps larger than
#: the whole normalised image (defaults: 5e-4 to 2e-3 for the networks, 2.5e-3 to 1e-2 for codes);
#: SIREN frequencies above 1000 alias on any image.
FLOAT_RANGES: dict[str, tuple[float, float, bool]] = {
    "learning_rate": (0.0, 0.1, True),
    "code_learning_rate": (0.0, 1.0, True),
    "reg_weight": (0.0, 1e4, False),
    "coarse_reg_weight": (0.0, 1e4, False),
    "coarse_capture_gate": (0.0, 1.0, False),
    "coarse_finer_gate": (0.0, 1.0, False),
    "coarse_edge_damp": (0.0, 1.0, True),
    "cycle_weight": (0.0, 1e4, False),
    "latent_weight": (0.0, 1e4, False),
    "sample_fraction": (0.0, 1.0, True),
    "fourier_scale": (0.0, 100.0, True),
    "omega": (0.0, 1000.0, True),
    "first_omega": (0.0, 1000.0, True),
    "bspline_spacing": (0.0, 1e6, False),
}

#: Options that are True or False.
BOOLS = (
    "chunked",
    "coarse_blur_pattern",
    "coarse_spline_warp",
    "coarse_finer_level",
    "coarse_flat_fill",
    "coarse_flat_noisy",
    "frame_mask",
)

#: Options that are "auto", True or False.
AUTO_BOOLS = ("contrast_match", "noise_adapt", "noise_heldout")

CHOICES: dict[str, Sequence[str]] = {
    "regularizer": REGULARIZERS,
    "representation": REPRESENTATIONS,
    "similarity": SIMILARITIES,
    "derivatives": R.METHODS,
}


def check_options(options: dict[str, Any]) -> None:
    """Raise ``InputError`` for the first option of ``register_nephi`` out of type or range.

    ``options`` maps names to values as given; ``None`` (automatic) passes. Names not listed
    here (``pair``, ``mode``, ``preset``, ``weights``) are checked by the engine itself.
    """
    for name, value in options.items():
        if value is None:
            continue
        if name in INT_RANGES:
            check_int(name, value, *INT_RANGES[name])
        elif name in FLOAT_RANGES:
            low, high, low_open = FLOAT_RANGES[name]
            check_float(name, value, low, high, low_open=low_open)
        elif name in CHOICES:
            check_choice(name, value, CHOICES[name])
        elif name in BOOLS:
            check_bool(name, value)
        elif name == "coarse_match_blur" and not (
            isinstance(value, bool) or (isinstance(value, str) and value in MATCH_BLUR_MODES)
        ):
            modes = ", ".join(repr(m) for m in MATCH_BLUR_MODES)
            raise InputError(f"coarse_match_blur must be one of {modes}, not {value!r}.")
        elif name == "coarse_warp_blur" and not (isinstance(value, bool) or value == "all"):
            raise InputError(f"coarse_warp_blur must be True, False or 'all', not {value!r}.")
        elif name in AUTO_BOOLS and not (
            isinstance(value, bool) or (isinstance(value, str) and value == "auto")
        ):
            raise InputError(f"{name} must be 'auto', True or False, not {value!r}.")


#: Memory a run needs beyond its inputs whatever their size (torch, the networks, buffers), bytes.
FIXED_OVERHEAD = 256 * 2**20


def output_bytes(shape: Sequence[int], backward: bool = True, chunked: bool = False) -> int:
    """Peak bytes a run on a fixed grid ``shape`` needs beyond its inputs.

    Per voxel, float32: ``D`` values per field (forward, and backward unless the grids differ),
    ``D + 3`` for the warped image, the intensity-normalised copies and the slab-wise report
    temporaries and, in divide-and-downsample mode, ``2 * D`` for the accumulators that fuse the
    chunks' fields; plus :data:`FIXED_OVERHEAD`. That is 9 float32 per pixel in 2D and 12 per
    voxel in 3D, as measured at the largest sizes of ``benchmarks/nephi_memory.py`` (2048^2:
    237 MiB, 256^3: 899 MiB, each with about 100 MiB that does not grow with the image), and 13
    per pixel in 2D chunked (one-step runs at 1024^2 and 2048^2 on CPU).
    """
    nvox, d = math.prod(int(n) for n in shape), len(shape)
    per_voxel = (2 if backward else 1) * d + d + 3 + (2 * d if chunked else 0)
    return 4 * nvox * per_voxel + FIXED_OVERHEAD


def device_bytes(shape: Sequence[int], masks: int = 0) -> int:
    """Bytes of the whole-image tensors a run keeps on its device while it optimises (not chunked):
    the fixed and moving image and the masks, float32."""
    return 4 * math.prod(int(n) for n in shape) * (2 + masks)


def heldout_bytes(shape: Sequence[int], levels: int) -> int:
    """Peak bytes of the held-out check of ``levels`` coarse levels (``noise_heldout``, :mod:`.heldout`)
    on a grid ``shape``: per voxel, float32, the warped images of the global map and of each level in
    both directions (``2 (levels + 1)``), the two raw images (2), the local test's temporaries (4) and
    one gate per level; plus :data:`FIXED_OVERHEAD`. ``3 levels + 8`` float32 a voxel: 17 (68 bytes) for
    the default three levels. The maps are evaluated slab by slab (:data:`.heldout.SLAB_POINTS`), so
    their interpolation adds a constant."""
    nvox = math.prod(int(n) for n in shape)
    return 4 * nvox * (3 * int(levels) + 8) + FIXED_OVERHEAD


def heldout_memory_note(shape: Sequence[int], levels: int) -> str | None:
    """Where ``noise_heldout="auto"`` decides to check (the noise estimate asks for it): None if the
    check fits in the free memory (:func:`heldout_bytes`), else the note of a run that skips it (review 1
    of session 22, B1: counting it before the estimate refused clean runs that never check)."""
    try:
        check_memory(heldout_bytes(shape, levels), torch.device("cpu"), "held-out check", "")
    except OutOfMemoryError as err:
        return f"noise_heldout='auto' skipped the held-out check of the coarse levels: {str(err).strip()}"
    return None


def check_run_memory(
    shape: Sequence[int],
    device: torch.device,
    chunked: bool,
    backward: bool = True,
    masks: int = 0,
    heldout_levels: int = 0,
) -> None:
    """Raise ``OutOfMemoryError`` before a run on a fixed grid ``shape`` that cannot fit.

    The dense outputs live in system memory whatever the device (on the CPU they are made after the
    optimisation's image copies are freed); without divide-and-downsample the whole images also sit
    on a GPU ``device`` while it optimises. ``heldout_levels`` (0: none): the held-out check of that
    many coarse levels will run (``noise_heldout=True``; :func:`heldout_bytes`; it is over before the
    outputs are made, so the larger of the two counts). Under ``"auto"`` the engine tests it once the
    noise estimate asks for the check, and skips the check where it does not fit
    (:func:`heldout_memory_note`).
    """
    text = " x ".join(str(int(n)) for n in shape)
    advice = (
        "Register a coarser level of the images (downsample them or choose a lower pyramid level) or "
        "crop them to the region of interest; for whole-slide histology use method='histology', which "
        "works on pyramid levels and patches."
    )
    # On the CPU the optimisation's image copies are freed before the (larger) dense outputs.
    what = f"NePhi registration of {text} images (dense fields and warped image)"
    needed = output_bytes(shape, backward, chunked)
    if heldout_levels > 0 and heldout_bytes(shape, heldout_levels) > needed:
        needed = heldout_bytes(shape, heldout_levels)
        what = f"NePhi registration of {text} images (held-out check of the coarse levels)"
        advice = "Or turn the check off (noise_heldout=False). " + advice
    check_memory(needed, torch.device("cpu"), what, advice)
    if device.type != "cpu" and not chunked:
        check_memory(
            device_bytes(shape, masks),
            device,
            f"NePhi registration of {text} images on {device}",
            "Run it in divide-and-downsample mode (chunked=True), which keeps one chunk on the device "
            "at a time, or on device='cpu'. " + advice,
        )


#: A result whose optimised similarity got worse than at the start by more than these (NCC and
#: local NCC: an absolute drop; MSE: a relative rise), with more than ``FOLD_PERCENT`` % of folded
#: voxels, is a diverged run, not a registration.
NCC_DROP = 0.05
MSE_RISE = 0.1
FOLD_PERCENT = 1.0


def optimised_similarity(
    name: str, fixed: np.ndarray, before: np.ndarray, warped: np.ndarray, overlap: np.ndarray | None
) -> dict:
    """``{"similarity", "similarity_before", "similarity_after"}``: the measure a run optimised.

    ``before`` is the moving image on the fixed grid, unmoved. NCC is taken inside ``overlap``; for
    the local measures the voxels outside ``overlap`` take the fixed image's values in both, so
    the zero padding a warp leaves outside the moving image counts neither way.
    """
    if overlap is not None and name != "ncc":
        fixed = np.asarray(fixed, np.float32)
        before = np.where(overlap, before, fixed)
        warped = np.where(overlap, warped, fixed)
    mask = overlap if name == "ncc" else None
    return {
        "similarity": name,
        "similarity_before": metric(name, fixed, before, mask),
        "similarity_after": metric(name, fixed, warped, mask),
    }


def check_result(metrics: dict, learning_rate: float, code_learning_rate: float) -> str | None:
    """Raise ``InputError`` for a diverged result (the optimised similarity worse than at the start
    and many folds); a note when the similarity only got worse; None for a sound result.

    The similarity is ``metrics["similarity"]`` with ``similarity_before`` / ``similarity_after``
    (see :func:`optimised_similarity`); without them, NCC (``ncc_before`` / ``ncc_after``). A
    multi-modal pair registered with ``similarity="lncc"`` can end with a lower NCC and be sound.
    """
    name = metrics.get("similarity", "ncc")
    before, after = metrics.get("similarity_before"), metrics.get("similarity_after")
    if before is None or after is None:
        name, before, after = "ncc", metrics.get("ncc_before"), metrics.get("ncc_after")
    if before is None or after is None or not _worse(name, before, after):
        return None
    label = name.upper()
    folds = float(metrics.get("fold_percent") or 0.0)
    if folds > FOLD_PERCENT:
        raise InputError(
            f"The NePhi registration diverged: the similarity fell from {label} {before:.3g} to "
            f"{after:.3g} and {folds:.1f} % of the voxels fold. With learning_rate={learning_rate:g} and "
            f"code_learning_rate={code_learning_rate:g} the steps are too large for this pair: leave "
            "them at their defaults (or lower them tenfold), or raise reg_weight."
        )
    return (
        f"The similarity got worse ({label} {before:.3g} -> {after:.3g}); check the result, and try "
        "the default learning rates or a coarse stage (levels > 1)."
    )


def _worse(name: str, before: float, after: float) -> bool:
    """Whether ``after`` is clearly worse than ``before`` for the measure ``name``."""
    if name == "mse":
        return after > before * (1 + MSE_RISE) + 1e-12
    return after < before - NCC_DROP
