"""Unsupervised training of the histology patch networks (NCC, plus curvature for the non-rigid net).

Each step draws a few patch sets in the tissue of the training pairs, predicts their fields,
warps the moving image (read around the patch, so content can move in) and minimises
``-NCC(fixed patch, warped patch)``; the non-rigid net adds ``reg_weight`` times the curvature
term ``mean(Laplacian(u)^2)`` (3x3 Laplacian, the paper's weight 60). Adam, learning rate
decayed by 0.95 every 100 steps. Patches of step ``s`` come from a generator seeded with
``(seed, s)``, so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...core.errors import Cancelled, InputError, UnsupportedFileError
from ...core.options import check_choice, check_float, check_int
from ...core.progress import Progress
from ...core.similarity import ncc
from .networks import (
    MultiMagNet,
    NetConfig,
    affine_displacement,
    check_model_path,
    model_record,
    net_from_record,
    read_record,
    save_record,
)
from .patches import crop, multimag_patches
from .predict import prepare, sample_at

#: A patch set is drawn from the tissue: its fixed patch must vary at least this much (std).
MIN_PATCH_STD = 0.02
_LAPLACIAN = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, 8.0, -1.0], [-1.0, -1.0, -1.0]]) / 9.0
#: File names of a training folder: ``NAME_fixed.EXT`` and ``NAME_moving.EXT``.
FIXED_SUFFIX, MOVING_SUFFIX = "_fixed", "_moving"


def curvature(u: torch.Tensor) -> torch.Tensor:
    """``mean(1/2 (L u_y)^2 + 1/2 (L u_x)^2)`` over the interior (3x3 Laplacian, 1 pixel border left out)."""
    n, c, h, w = u.shape
    lap = F.conv2d(u.reshape(n * c, 1, h, w), _LAPLACIAN.to(u)[None, None])
    return lap.pow(2).mean()


def _read_stain(path: Path, max_side: int) -> np.ndarray:
    from ...io import read_image

    data, meta, _ = read_image(str(path))[0]
    levels = list(data) if meta.get("multiscale") else [data]
    level = next((lv for lv in levels if max(lv.shape[:2]) <= max_side), levels[-1])
    step = int(np.ceil(max(level.shape[:2]) / max_side))
    # thinned before reading: a lazy (dask) level larger than max_side is never loaded whole
    return np.asarray(level[::step, ::step] if step > 1 else level)


def pairs_from_folder(folder, *, max_side: int = 4096) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pre-aligned training pairs ``NAME_fixed.EXT`` / ``NAME_moving.EXT`` as stain channels.

    Any image the project reads (TIFF/OME-TIFF/SVS pyramids, PNG, ...): the first level no larger
    than ``max_side`` pixels is used; RGB slides become one stain channel each
    (:func:`~.stain.choose_stain_channels`). The two images of a pair must have one shape.
    """
    from .stain import choose_stain_channels

    max_side = check_int("max_side", max_side, 64, 1 << 20)
    root = Path(folder)
    if not root.is_dir():
        raise UnsupportedFileError(f"Training folder {root} does not exist or is not a folder.")
    pairs = []
    for fixed_path in sorted(root.iterdir()):
        if FIXED_SUFFIX not in fixed_path.stem:
            continue
        name = fixed_path.stem[: fixed_path.stem.rindex(FIXED_SUFFIX)]
        matches = sorted(root.glob(f"{name}{MOVING_SUFFIX}.*"))
        if not matches:
            raise InputError(f"{fixed_path.name} has no partner {name}{MOVING_SUFFIX}.* in {root}.")
        fixed, moving = _read_stain(fixed_path, max_side), _read_stain(matches[0], max_side)
        if fixed.shape[:2] != moving.shape[:2]:
            raise InputError(
                f"{fixed_path.name} {fixed.shape[:2]} and {matches[0].name} {moving.shape[:2]} differ in "
                "size; "
                "training pairs must be pre-aligned on one grid "
                "(register them rigidly and save the warped moving)."
            )
        f, m, _ = choose_stain_channels(fixed, moving)
        pairs.append((f, m))
    if not pairs:
        raise InputError(
            f"No training pairs in {root}: name them NAME{FIXED_SUFFIX}.tif and NAME{MOVING_SUFFIX}.tif."
        )
    return pairs


def _prepare_pairs(pairs) -> list[tuple[np.ndarray, np.ndarray]]:
    if isinstance(pairs, (str, Path)):
        pairs = pairs_from_folder(pairs)
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise InputError(
            "train needs a non-empty list of (fixed, moving) stain channels or a folder of pairs."
        )
    out = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise InputError(f"Training pair {i} must be a (fixed, moving) tuple of 2D images.")
        f, m = prepare(pair[0], f"fixed image of pair {i}"), prepare(pair[1], f"moving image of pair {i}")
        if f.shape != m.shape:
            raise InputError(
                f"Pair {i}: fixed {f.shape} and moving {m.shape} differ; pre-align them onto one grid first."
            )
        out.append((f, m))
    return out


def _draw(pairs, rng: np.random.Generator, patch: int, count: int) -> list[tuple[int, int, int]]:
    """``count`` (pair, y, x) patch origins whose fixed patch is tissue (the best of 20 tries each)."""
    out = []
    for _ in range(count):
        best, best_std = None, -1.0
        for _try in range(20):
            k = int(rng.integers(len(pairs)))
            h, w = pairs[k][0].shape
            y = int(rng.integers(-patch // 4, max(h - 3 * patch // 4, -patch // 4 + 1)))
            x = int(rng.integers(-patch // 4, max(w - 3 * patch // 4, -patch // 4 + 1)))
            std = float(crop(pairs[k][0], y, x, patch).std())
            if std > best_std:
                best, best_std = (k, y, x), std
            if std >= MIN_PATCH_STD:
                break
        out.append(best)
    return out


def _batch(pairs, draws, cfg: NetConfig):
    highs, lows, contexts = [], [], []
    p, half = cfg.patch, cfg.patch // 2
    for k, y, x in draws:
        fixed, moving = pairs[k]
        high, low = multimag_patches(fixed, moving, [(y, x)], p, cfg.magnifications)
        highs.append(high)
        lows.append(low)
        contexts.append(torch.from_numpy(crop(moving, y - half, x - half, 2 * p))[None, None])
    low = None if cfg.magnifications == 1 else torch.cat(lows)
    return torch.cat(highs), low, torch.cat(contexts)


def patch_loss(net: MultiMagNet, high, low, context, reg_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, -NCC) of one batch; ``context`` is the moving 2P x 2P region around each patch."""
    p = net.config.patch
    out = net(high, low)
    u = affine_displacement(out, p) if net.config.kind == "affine" else out
    r = torch.arange(p, dtype=u.dtype, device=u.device) + p // 2
    base = torch.stack(torch.meshgrid(r, r, indexing="ij"))[None]
    warped = sample_at(context, base + u)
    sim = -ncc(high[:, :1], warped)
    loss = sim + reg_weight * curvature(u) if net.config.kind == "nonrigid" else sim
    return loss, sim


def _learning_rate(lr: float, step: int) -> float:
    return lr * 0.95 ** (step // 100)


def _as_progress(progress, cancel) -> Progress:
    if isinstance(progress, Progress):
        return Progress(progress.callback, cancel if cancel is not None else progress.cancel)
    return Progress(progress, cancel)


def train(
    pairs,
    kind: str,
    *,
    steps: int,
    magnifications: int = 2,
    lr: float = 1e-3,
    reg_weight: float = 60.0,
    patch: int = 224,
    widths: tuple[int, ...] = (16, 32, 64, 128),
    patches_per_step: int = 4,
    checkpoint_every: int = 50,
    resume=None,
    out=None,
    progress=None,
    cancel=None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> MultiMagNet:
    """Train (or continue training) a patch network; returns it in eval mode.

    ``pairs``: a list of pre-aligned ``(fixed, moving)`` stain channels or a folder
    (:func:`pairs_from_folder`). ``steps`` is the total step count (a resumed run continues to it).
    ``out`` receives a resumable checkpoint every ``checkpoint_every`` steps, at the end and when
    cancelled (then :class:`~napari_nephi.core.errors.Cancelled` is raised). ``resume`` is such a
    checkpoint: its network settings are used.
    """
    kind = check_choice("kind", kind, ("affine", "nonrigid"))
    steps = check_int("steps", steps, 1, 10_000_000)
    lr = check_float("lr", lr, 0.0, 1.0, low_open=True)
    reg_weight = check_float("reg_weight", reg_weight, 0.0, 1e6)
    patches_per_step = check_int("patches_per_step", patches_per_step, 1, 256)
    checkpoint_every = check_int("checkpoint_every", checkpoint_every, 1)
    seed = check_int("seed", seed, 0)
    prog = _as_progress(progress, cancel)
    if out is not None:
        out = check_model_path(out)
    data = _prepare_pairs(pairs)
    state = {"step": 0, "history": [], "seconds": 0.0}
    if resume is not None:
        record = read_record(resume)
        if "training" not in record.get("extra", {}):
            raise InputError(
                f"{resume} holds no training state (a shipped or exported model); train afresh instead."
            )
        net = net_from_record(record)
        if net.config.kind != kind:
            raise InputError(
                f"{resume} is a {net.config.kind} network, not {kind}; pass kind={net.config.kind!r}."
            )
        state = dict(record["extra"]["training"])
        seed, lr = int(state.pop("seed", seed)), float(state.pop("lr", lr))
        reg_weight = float(state.pop("reg_weight", reg_weight))
    else:
        torch.manual_seed(seed)
        net = MultiMagNet(
            NetConfig(kind=kind, magnifications=magnifications, patch=patch, widths=tuple(widths))
        )
    net = net.to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    if resume is not None:
        opt.load_state_dict(state.pop("optimizer"))

    def checkpoint() -> None:
        if out is not None:
            training = dict(state, optimizer=opt.state_dict(), seed=seed, lr=lr, reg_weight=reg_weight)
            save_record(model_record(net, extra={"training": training}), out)

    start = time.perf_counter() - float(state["seconds"])
    try:
        while state["step"] < steps:
            prog.check()
            step = int(state["step"])
            rng = np.random.default_rng([seed, step])
            high, low, context = _batch(
                data, _draw(data, rng, net.config.patch, patches_per_step), net.config
            )
            dev = [None if t is None else t.to(device) for t in (high, low, context)]
            for group in opt.param_groups:
                group["lr"] = _learning_rate(lr, step)
            loss, sim = patch_loss(net, *dev, reg_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            state["step"] = step + 1
            state["history"].append(loss.item())
            state["seconds"] = time.perf_counter() - start
            if state["step"] % checkpoint_every == 0 or state["step"] == steps:
                checkpoint()
            prog.step(
                state["step"], steps, loss=loss.item(), stage=f"training {kind} network", ncc=-sim.item()
            )
    except Cancelled:
        checkpoint()
        raise
    return net.eval()
