"""Training a NePhi model (encoder + field) on many pairs: ``train()`` and ``napari-nephi train``.

Pairs come from the Triangles-and-Circles generator (``data="tc"``), from the images scikit-image
and nibabel ship warped by known random deformations (``data="general2d"``, :mod:`.shipped_pairs`)
or from a folder of images or volumes (NIfTI/TIFF) resized to ``shape``; label maps with the same
names in ``labels/`` beside them give a validation Dice. Each step the encoder predicts the codes
of a batch of pairs and the loss is the one of instance optimisation (:func:`.optimize.step_loss`):
symmetric NCC on fresh random points, GradICON on a sparse set, a small latent prior; where the
true field is known, ``truth_weight`` adds the squared endpoint error of both maps (in voxels of the
working shape) on a quarter as many points. Adam with a cosine learning rate.

Checkpoints (one file, written atomically) hold the model's config with its weights, the
optimiser state, the step and the history, so ``resume=`` continues a run exactly: the pairs and
points of step ``k`` are drawn from a generator seeded by ``(seed, rank, k)``. Under ``torchrun``
(``WORLD_SIZE > 1``) every process draws its own pairs and the gradients are averaged with
``torch.distributed`` (NCCL on GPUs, Gloo on CPUs); rank 0 validates and writes checkpoints.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...core.device import choose_device
from ...core.errors import Cancelled, InputError
from ...core.inputs import normalize_intensity, to_grayscale
from ...core.metrics import regularity_report
from ...core.options import check_float, check_int, check_int_list
from ...core.progress import Progress
from ...core.transform import DisplacementTransform
from .coarse import grid_sample_points
from .dense import dense_displacement
from .field import FieldConfig
from .model import NePhiModel
from .optimize import Maps, OptimizeSettings, step_loss, uniform_points

#: Seeds of generated training pairs are drawn below this; validation pairs use seeds above it.
VALIDATION_SEED = 1_000_000_000


#: Ranges of the whole-number and number settings of :class:`TrainSettings`.
_TRAIN_INTS = {
    "steps": (0, 10**8),
    "batch_size": (1, 4096),
    "sample_points": (16, 1 << 28),
    "reg_points": (1, 1 << 24),
    "val_pairs": (0, 10**6),
    "val_every": (1, None),
    "checkpoint_every": (1, None),
    "seed": (0, 2**63 - 1),
    "local_level": (0, 16),
}
_TRAIN_FLOATS = {
    "learning_rate": (0.0, 0.1, True),
    "final_lr_fraction": (0.0, 1.0, False),
    "reg_weight": (0.0, 1e4, False),
    "latent_weight": (0.0, 1e4, False),
    "strength": (0.0, 100.0, True),
    "truth_weight": (0.0, 1e4, False),
}


@dataclass
class TrainSettings:
    """Everything that defines a training run (stored in every checkpoint)."""

    data: str = "tc"
    shape: tuple[int, ...] = (128, 128)
    steps: int = 2000
    batch_size: int = 8
    learning_rate: float = 1e-3
    final_lr_fraction: float = 0.05
    sample_points: int = 2048
    reg_points: int = 64
    reg_weight: float = 1.0
    latent_weight: float = 1e-4
    strength: float = 1.0
    val_pairs: int = 16
    val_every: int = 200
    checkpoint_every: int = 200
    seed: int = 0
    field: dict = field(default_factory=dict)
    channels: tuple[int, ...] = (16, 32, 64, 64)
    local_level: int = 3
    truth_weight: float = 0.0
    antialias: bool = False
    features: str = "pair"

    def __post_init__(self):
        self.shape = tuple(check_int_list("shape", self.shape, low=16))
        self.channels = tuple(check_int_list("channels", self.channels, low=1, high=4096))
        if len(self.shape) not in (2, 3):
            raise InputError(f"shape must be 2 or 3 sizes of at least 16 voxels, got {self.shape}.")
        for name, (low, high) in _TRAIN_INTS.items():
            setattr(self, name, check_int(name, getattr(self, name), low, high))
        for name, (low, high, low_open) in _TRAIN_FLOATS.items():
            setattr(self, name, check_float(name, getattr(self, name), low, high, low_open=low_open))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["shape"], out["channels"] = list(self.shape), list(self.channels)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> TrainSettings:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def field_config(self) -> FieldConfig:
        defaults = {"fourier_scale": 0.5, "seed": self.seed}
        return FieldConfig(ndim=len(self.shape), **{**defaults, **self.field})

    def optimize_settings(self) -> OptimizeSettings:
        return OptimizeSettings(
            iterations=self.steps,
            sample_points=self.sample_points,
            reg_points=self.reg_points,
            regularizer="gradicon",
            reg_weight=self.reg_weight,
            latent_weight=self.latent_weight,
        )


@dataclass
class TrainResult:
    model: NePhiModel
    history: list[float]
    validation: list[dict]
    path: Path
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------- data
class TCPairs:
    """Fixed/moving pairs from the Triangles-and-Circles generator (2D), with labels."""

    def __init__(self, shape, strength: float = 1.0, val_pairs: int = 16):
        from ...synthetic import tc_pair

        if len(shape) != 2 or shape[0] != shape[1]:
            raise InputError(f"Triangles-and-circles pairs are square 2D images; got shape {tuple(shape)}.")
        self._pair = tc_pair
        self.size, self.strength, self.n_val = int(shape[0]), float(strength), int(val_pairs)

    def _make(self, seed: int):
        f, m, fl, ml = self._pair(seed=int(seed), size=self.size, strength=self.strength)
        return normalize_intensity(f), normalize_intensity(m), fl, ml

    def batch(self, n: int, rng: np.random.Generator):
        seeds = rng.integers(0, VALIDATION_SEED, n)
        return _stack([self._make(s) for s in seeds])

    def validation(self) -> list[tuple]:
        return [self._make(VALIDATION_SEED + i) for i in range(self.n_val)]


class FolderPairs:
    """Random pairs of the images (or volumes) of a folder, resized to ``shape``.

    Labels: a ``labels/`` folder beside the images holding files of the same names. With labels and
    at least 4 images, ``val_fraction`` of them (at least 2) are held out for validation pairs.
    """

    def __init__(self, folder, shape, val_pairs: int = 16, val_fraction: float = 0.2):
        from ...io.read import can_read, read_image

        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"{folder} is not a folder of images; pass a folder or data='tc'.")
        files = sorted(p for p in folder.iterdir() if p.is_file() and can_read(p))
        if len(files) < 2:
            raise InputError(f"{folder} holds {len(files)} readable image(s); training needs at least 2.")
        self.shape = tuple(int(s) for s in shape)
        label_dir = folder / "labels"
        images, labels = [], []
        for p in files:
            images.append(self._load(read_image(p)[0][0], p, order=1))
            lp = label_dir / p.name
            labels.append(self._load(read_image(lp)[0][0], lp, order=0) if lp.is_file() else None)
        has_labels = all(lab is not None for lab in labels)
        n_val = max(2, round(val_fraction * len(files))) if has_labels and len(files) >= 4 else 0
        self.images, self.labels = images[: len(files) - n_val], labels[: len(files) - n_val]
        self.val_images, self.val_labels = images[len(files) - n_val :], labels[len(files) - n_val :]
        self.n_val = int(val_pairs)
        self.files = files

    def _load(self, data, path: Path, order: int) -> np.ndarray:
        arr = np.asarray(data)
        if order == 1:
            if arr.ndim == len(self.shape) + 1 and arr.shape[-1] in (3, 4):
                arr = to_grayscale(arr)
            arr = arr.astype(np.float32)
            if not np.isfinite(arr).all() or float(arr.max()) == float(arr.min()):
                raise InputError(f"{path} is constant or holds NaN/inf values; remove it from the folder.")
        if arr.ndim != len(self.shape):
            raise InputError(
                f"{path} is {arr.ndim}D {arr.shape} but training shape {self.shape} is {len(self.shape)}D."
            )
        t = torch.as_tensor(arr.astype(np.float32))[None, None]
        mode = ("bilinear" if arr.ndim == 2 else "trilinear") if order == 1 else "nearest"
        kw = {"align_corners": True} if order == 1 else {}
        out = F.interpolate(t, size=self.shape, mode=mode, **kw)[0, 0].numpy()
        return normalize_intensity(out) if order == 1 else out.astype(np.int64)

    def batch(self, n: int, rng: np.random.Generator):
        idx = [rng.choice(len(self.images), 2, replace=False) for _ in range(n)]
        return _stack([(self.images[i], self.images[j], self.labels[i], self.labels[j]) for i, j in idx])

    def validation(self) -> list[tuple]:
        k = len(self.val_images)
        pairs = [(i, j) for i in range(k) for j in range(k) if i != j][: self.n_val]
        return [
            (self.val_images[i], self.val_images[j], self.val_labels[i], self.val_labels[j]) for i, j in pairs
        ]


def _stack(items):
    fixed = np.stack([it[0] for it in items])[:, None]
    moving = np.stack([it[1] for it in items])[:, None]
    return torch.as_tensor(fixed), torch.as_tensor(moving)


def pair_source(data, shape, strength: float = 1.0, val_pairs: int = 16, seed: int = 0):
    """``"tc"`` -> :class:`TCPairs`; ``"general2d"`` -> :class:`.shipped_pairs.ShippedPairs`; a folder
    -> :class:`FolderPairs`."""
    if str(data).lower() in ("tc", "triangles-circles", "triangles_and_circles"):
        return TCPairs(shape, strength, val_pairs)
    if str(data).lower() == "general2d":
        from .shipped_pairs import ShippedPairs

        return ShippedPairs(shape, val_pairs, seed)
    return FolderPairs(data, shape, val_pairs)


# ------------------------------------------------------------------------------------ validation
def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over the labels > 0 present in either map."""
    values = np.union1d(np.unique(a), np.unique(b))
    scores = [
        2 * np.logical_and(a == v, b == v).sum() / ((a == v).sum() + (b == v).sum()) for v in values if v > 0
    ]
    return float(np.mean(scores)) if scores else float("nan")


def evaluate(model: NePhiModel, pairs, device) -> dict:
    """Mean Dice of the moving labels carried onto the fixed ones, before and after; folds. Pairs
    with a true field ``(fixed, moving, None, None, u)`` give the mean endpoint error, before (the
    identity) and after, in voxels."""
    model.eval()
    before, after, folds, epe_before, epe = [], [], [], [], []
    with torch.no_grad():
        for fixed, moving, fl, ml, *truth in pairs:
            has_truth = bool(truth) and truth[0] is not None
            if (fl is None or ml is None) and not has_truth:
                continue
            f = torch.as_tensor(fixed, device=device)[None, None]
            m = torch.as_tensor(moving, device=device)[None, None]
            maps = Maps(model.field, model.codes(f, m))
            u = dense_displacement(maps.forward, fixed.shape, device)
            transform = DisplacementTransform(u)
            folds.append(regularity_report(transform, fixed.shape)["fold_percent"])
            if has_truth:
                epe_before.append(float(np.sqrt((truth[0] ** 2).sum(0)).mean()))
                epe.append(float(np.sqrt(((u - truth[0]) ** 2).sum(0)).mean()))
            if fl is not None and ml is not None:
                before.append(dice(ml, fl))
                after.append(dice(transform.warp_labels(ml), fl))
    if not folds:
        return {}
    out = {"fold_percent": float(np.mean(folds)), "pairs": len(folds)}
    if after:
        out.update(dice_before=float(np.mean(before)), dice=float(np.mean(after)))
    if epe:
        out.update(epe_before=float(np.mean(epe_before)), epe=float(np.mean(epe)))
    return out


def truth_loss(maps: Maps, truth: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Mean squared endpoint error (voxels) of both maps on ``n`` random points per pair.

    ``truth`` ``(B, 2D, *spatial)``: the true pull-back displacement ``u`` (fixed -> moving) and
    its inverse, in voxels, components in numpy axis order.
    """
    b, d = truth.shape[0], truth.dim() - 2
    scale = torch.tensor([(s - 1) / 2 for s in truth.shape[2:]], device=truth.device)
    x = uniform_points(b, n, d, generator, truth.device)
    true = grid_sample_points(truth, x).transpose(1, 2)  # (B, N, 2D)
    fwd = (maps.forward(x) - x) * scale
    bwd = (maps.backward(x) - x) * scale
    return ((fwd - true[..., :d]) ** 2).sum(-1).mean() + ((bwd - true[..., d:]) ** 2).sum(-1).mean()


# -------------------------------------------------------------------------------------- training
def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _save(model: NePhiModel, path: Path, settings: TrainSettings, state: dict) -> None:
    extra = {"train": settings.to_dict(), **state}
    model.save(path, extra=extra)


def train(
    data="tc",
    output="nephi_model.pt",
    *,
    shape=(128, 128),
    steps: int = 2000,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    sample_points: int = 2048,
    reg_points: int = 64,
    reg_weight: float = 1.0,
    strength: float = 1.0,
    val_pairs: int = 16,
    val_every: int = 200,
    checkpoint_every: int = 200,
    seed: int = 0,
    field_options: dict | None = None,
    channels=(16, 32, 64, 64),
    local_level: int = 3,
    truth_weight: float = 0.0,
    antialias: bool = False,
    features: str = "pair",
    resume=None,
    device="auto",
    progress: Progress | None = None,
) -> TrainResult:
    """Train a NePhi model and write it (config + weights + training state) to ``output``.

    ``data``: ``"tc"`` (Triangles-and-Circles, 2D) or a folder of images/volumes. ``resume``: a
    checkpoint written by an earlier run (its settings are used; ``steps`` may extend the run).
    ``field_options`` are :class:`.field.FieldConfig` fields (hidden, layers, n_frequencies, ...).
    ``truth_weight`` weights the endpoint error against the true field (sources that know it:
    ``"general2d"``); ``antialias`` makes the model low-pass inputs it downsizes for the encoder;
    ``features``: the encoder's inputs (:data:`.encoder.FEATURES`).
    The returned model is in eval mode; ``predict`` uses it through ``weights=output``.
    """
    progress = progress or Progress()
    output = Path(output)
    rank, world, local_rank = _distributed()
    own_group = False
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            own_group = True
        if torch.cuda.is_available() and str(device) in ("auto", "cuda"):
            device = f"cuda:{local_rank}"
    dev = choose_device(device)

    if resume is not None:
        ckpt = torch.load(Path(resume), map_location="cpu", weights_only=True)
        extra = ckpt.get("extra", {}) if isinstance(ckpt, dict) else {}
        if "train" not in extra:
            raise InputError(f"{resume} holds no training state to resume from.")
        settings = TrainSettings.from_dict({**extra["train"], "steps": max(int(steps), extra["step"])})
        model = NePhiModel.from_config(ckpt["config"])
        model.load_state_dict(ckpt["state_dict"])
        start, history, validation = int(extra["step"]), list(extra["history"]), list(extra["validation"])
    else:
        settings = TrainSettings(
            data=str(data),
            shape=tuple(shape),
            steps=steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            sample_points=sample_points,
            reg_points=reg_points,
            reg_weight=reg_weight,
            strength=strength,
            val_pairs=val_pairs,
            val_every=val_every,
            checkpoint_every=checkpoint_every,
            seed=seed,
            field=dict(field_options or {}),
            channels=tuple(channels),
            local_level=local_level,
            truth_weight=truth_weight,
            antialias=bool(antialias),
            features=str(features),
        )
        model = NePhiModel(
            settings.field_config(),
            settings.channels,
            settings.local_level,
            settings.shape,
            settings.antialias,
            settings.features,
        )
        start, history, validation, ckpt = 0, [], [], None
    source = pair_source(settings.data, settings.shape, settings.strength, settings.val_pairs, settings.seed)
    if settings.truth_weight > 0 and not getattr(source, "has_truth", False):
        raise InputError(
            f"truth_weight needs pairs with a known field (data='general2d'); {settings.data!r} has none."
        )
    val_set = source.validation() if rank == 0 else []
    model = model.to(dev)
    opt_settings = settings.optimize_settings()
    opt = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    if ckpt is not None and "optimizer" in ckpt["extra"]:
        opt.load_state_dict(ckpt["extra"]["optimizer"])
    if world > 1:
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, 0)

    def state(step):
        return {"step": step, "history": history, "validation": validation, "optimizer": opt.state_dict()}

    def lr_at(step):
        q = min(step, settings.steps) / max(settings.steps, 1)
        f = settings.final_lr_fraction
        return settings.learning_rate * (f + (1 - f) * 0.5 * (1 + math.cos(math.pi * q)))

    step = start
    t0 = time.perf_counter()
    try:
        while step < settings.steps:
            rng = np.random.default_rng([settings.seed, rank, step])
            gen = torch.Generator(device=dev).manual_seed(int(rng.integers(0, 2**62)))
            fixed, moving, *truth = source.batch(settings.batch_size, rng)
            fixed, moving = fixed.to(dev), moving.to(dev)
            model.train()
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            maps = Maps(model.field, model.codes(fixed, moving))
            loss = step_loss(maps, fixed, moving, opt_settings, gen)
            if truth and settings.truth_weight > 0:
                n_truth = max(16, settings.sample_points // 4)
                loss = loss + settings.truth_weight * truth_loss(maps, truth[0].to(dev), n_truth, gen)
            if not math.isfinite(float(loss.detach())):  # before the backward pass, which it can crash
                raise InputError(
                    f"Training diverged at step {step + 1}: the loss became NaN or infinite. Lower "
                    f"learning_rate (now {settings.learning_rate:g}) or reg_weight, or resume from "
                    "the last checkpoint with a lower learning_rate."
                )
            loss.backward()
            if world > 1:
                for p in model.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= world
            opt.step()
            step += 1
            value = float(loss.detach())
            history.append(value)
            extra = {}
            if rank == 0 and val_set and (step % settings.val_every == 0 or step == settings.steps):
                scores = evaluate(model, val_set, dev)
                if scores:
                    validation.append({"step": step, **scores})
                    extra = {"validation": scores}
            if rank == 0 and (step % settings.checkpoint_every == 0 or step == settings.steps):
                _save(model, output, settings, state(step))
            progress.step(step, settings.steps, value, stage="train", **extra)
    except Cancelled:
        if rank == 0 and step > start:
            _save(model, output, settings, state(step))  # resume from here later
        raise
    finally:
        if own_group:
            dist.destroy_process_group()
    if rank == 0 and step == start:  # nothing to do (already trained that far): still write it
        _save(model, output, settings, state(step))
    model.eval()
    return TrainResult(model, history, validation, output, time.perf_counter() - t0)


def export_model(run, output, history_points: int = 200) -> Path:
    """Write the model of the training checkpoint ``run`` to ``output`` as a file to ship: config,
    weights and the training summary (settings, validation, a thinned loss history), no optimiser."""
    ckpt = torch.load(Path(run), map_location="cpu", weights_only=True)
    extra = {k: v for k, v in ckpt.get("extra", {}).items() if k != "optimizer"}
    history = list(extra.get("history", []))
    extra["history"] = history[:: max(1, len(history) // max(1, int(history_points)))]
    return NePhiModel.load(run).save(Path(output), extra=extra)
