"""Instance optimisation of a neural deformation field for one pair.

Each step draws fresh uniform points: symmetric NCC of ``moving(phi(x))`` vs ``fixed(x)`` and
``fixed(phi_inv(y))`` vs ``moving(y)`` on ``sample_points`` points, and the regulariser on a much
sparser set of ``reg_points`` points. The maps may be preceded by a frozen coarse stage
(:class:`.coarse.DenseMaps`): ``phi = C o N`` and ``phi_inv = N_inv o C_inv``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ...core import regularizers as R
from ...core.errors import InputError
from ...core.similarity import lncc, ncc
from .coarse import DenseMaps, grid_sample_points, in_frame, normalized_grid
from .field import Codes, NeuralDeformationField

REGULARIZERS = ("gradicon", "jacobian", "symmetric_jacobian", "bending", "diffusion", "cycle")
SIMILARITIES = ("ncc", "lncc", "mse")
#: Dense local NCC is evaluated on every voxel; above this many it is refused.
LNCC_MAX_VOXELS = 1 << 18


@dataclass
class OptimizeSettings:
    iterations: int = 300
    sample_points: int = 4096
    reg_points: int = 128
    regularizer: str = "gradicon"
    reg_weight: float = 1.0
    cycle_weight: float = 0.0
    latent_weight: float = 1e-4
    learning_rate: float = 2e-3
    code_learning_rate: float = 1e-2
    final_lr_fraction: float = 0.1
    warmup_fraction: float = 0.2
    derivatives: str = "autograd"
    similarity: str = "ncc"
    #: instance optimisation: points mapped outside the other image's frame do not count
    frame_mask: bool = True

    def __post_init__(self):
        if self.regularizer not in REGULARIZERS:
            raise InputError(
                f"Unknown regularizer {self.regularizer!r}; choose one of {', '.join(REGULARIZERS)}."
            )
        if self.similarity not in SIMILARITIES:
            raise InputError(
                f"Unknown similarity {self.similarity!r}; choose one of {', '.join(SIMILARITIES)}."
            )
        if self.derivatives not in R.METHODS:
            raise InputError("derivatives must be 'autograd' or 'fd'.")
        if self.iterations < 0 or self.sample_points < 16 or self.reg_points < 1:
            raise InputError("iterations must be >= 0, sample_points >= 16 and reg_points >= 1.")
        if self.reg_weight < 0 or self.cycle_weight < 0 or self.latent_weight < 0:
            raise InputError("Loss weights must not be negative.")

    def to_dict(self) -> dict:
        return asdict(self)


class Maps:
    """The full forward and backward maps in normalised coordinates, points ``(B, N, D)``."""

    def __init__(self, field: NeuralDeformationField, codes: Codes, coarse: DenseMaps | None = None):
        self.field, self.codes, self.coarse = field, codes, coarse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.field.map(x, self.codes, "forward")
        return y if self.coarse is None else self.coarse.forward(y)

    def backward(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.coarse is None else self.coarse.backward(x)
        return self.field.map(y, self.codes, "backward")

    def residual_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.field.map(x, self.codes, "forward")

    def residual_backward(self, x: torch.Tensor) -> torch.Tensor:
        return self.field.map(x, self.codes, "backward")


def regularization(name: str, maps: Maps, x: torch.Tensor, method: str = "autograd") -> torch.Tensor:
    """The regulariser ``name`` on points ``x``.

    GradICON and cycle consistency act on the full maps (their composition should be the identity
    whatever the coarse stage did); the others act on the neural residual only, so they do not pull
    against the frozen coarse deformation.
    """
    if name == "gradicon":
        return R.gradicon(maps.forward, maps.backward, x, method)
    if name == "cycle":
        return R.cycle_consistency(maps.forward, maps.backward, x)
    both = (maps.residual_forward, maps.residual_backward)
    if name == "jacobian":
        terms = [R.jacobian_determinant_loss(f, x, mode="abs", method=method) for f in both]
    elif name == "symmetric_jacobian":
        terms = [R.jacobian_determinant_loss(f, x, mode="log", method=method) for f in both]
    elif name == "bending":
        terms = [R.bending_energy(f, x, method=method) for f in both]
    elif name == "diffusion":
        terms = [R.diffusion(f, x, method=method) for f in both]
    else:
        raise InputError(f"Unknown regularizer {name!r}; choose one of {', '.join(REGULARIZERS)}.")
    return 0.5 * (terms[0] + terms[1])


def _point_similarity(name: str, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    if name == "mse":
        if w is None:
            return ((a - b) ** 2).mean()
        return (w * (a - b) ** 2).sum() / w.sum().clamp_min(1e-6)
    return 1 - ncc(a, b, w)


def uniform_points(b: int, n: int, d: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.rand(b, n, d, generator=generator, device=device) * 2 - 1


def similarity_loss(
    maps: Maps,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    settings: OptimizeSettings,
    generator: torch.Generator,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    frame: bool = False,
) -> torch.Tensor:
    """Symmetric similarity on fresh random points (or densely, for local NCC). With ``frame``, a
    point the map takes outside the other image does not count (:func:`inside_frame`; NCC and MSE
    on points only: the dense local NCC has no frame weights)."""
    d = fixed.dim() - 2
    dev = fixed.device
    if settings.similarity == "lncc":
        shape = fixed.shape[2:]
        x = normalized_grid(shape, dev)[None].reshape(1, -1, d)
        wm = grid_sample_points(moving, maps.forward(x)).reshape(fixed.shape)
        wf = grid_sample_points(fixed, maps.backward(x)).reshape(moving.shape)
        return 0.5 * ((1 - lncc(fixed, wm)) + (1 - lncc(moving, wf)))
    pts = _SimilarityPoints(fixed, moving, settings, generator, fixed_mask, moving_mask)
    px, py = maps.forward(pts.x), maps.backward(pts.y)
    wm = grid_sample_points(moving, px)[:, 0]
    wf = grid_sample_points(fixed, py)[:, 0]
    if not frame:
        return pts.loss(wm, wf)
    return pts.loss(wm, wf, inside_frame(px), inside_frame(py))


def inside_frame(points: torch.Tensor) -> torch.Tensor:
    """1 where normalised ``points`` ``(B, N, D)`` lie inside the image frame, else 0 (no gradient):
    outside, the images are sampled at their edge values, which are no data."""
    return in_frame(points).to(points.dtype)


class _SimilarityPoints:
    """One step's random points: ``x`` in the fixed image, ``y`` in the moving one, with their
    intensities and mask weights; :meth:`loss` is the symmetric similarity of the warped values
    ``moving(phi(x))`` and ``fixed(phi_inv(y))``."""

    def __init__(self, fixed, moving, settings: OptimizeSettings, generator, fixed_mask, moving_mask):
        b, d, n = fixed.shape[0], fixed.dim() - 2, settings.sample_points
        self.similarity = settings.similarity
        self.x = uniform_points(b, n, d, generator, fixed.device)
        self.y = uniform_points(b, n, d, generator, fixed.device)
        self.fx = grid_sample_points(fixed, self.x)[:, 0]
        self.my = grid_sample_points(moving, self.y)[:, 0]
        self.w_f = None if fixed_mask is None else grid_sample_points(fixed_mask, self.x)[:, 0]
        self.w_m = None if moving_mask is None else grid_sample_points(moving_mask, self.y)[:, 0]

    def loss(self, wm: torch.Tensor, wf: torch.Tensor, in_m=None, in_f=None) -> torch.Tensor:
        """``in_m``, ``in_f``: :func:`inside_frame` of the points ``wm`` and ``wf`` were sampled at;
        a point mapped outside the other image does not count."""
        return 0.5 * (
            _point_similarity(self.similarity, self.fx, wm, _times(self.w_f, in_m))
            + _point_similarity(self.similarity, self.my, wf, _times(self.w_m, in_f))
        )


def _times(w: torch.Tensor | None, inside: torch.Tensor | None) -> torch.Tensor | None:
    """Mask weights ``w`` times the frame weights (None where every point is inside: unweighted)."""
    if inside is None or bool(inside.all()):
        return w
    return inside if w is None else w * inside


def step_loss(
    maps: Maps,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    settings: OptimizeSettings,
    generator: torch.Generator,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    frame: bool = False,
) -> torch.Tensor:
    """The loss of one step for a batch of pairs ``(B, 1, *spatial)``: similarity + regularisers.

    Shared by instance optimisation and training (:mod:`.train`); the latent prior acts on the
    codes in ``maps.codes``, whether free parameters or predicted by an encoder. ``frame`` (see
    :func:`similarity_loss`) is on in instance optimisation (:func:`step_backward`) and off in
    training, whose loss stays the one the shipped weights were trained with.
    """
    d = fixed.dim() - 2
    b = fixed.shape[0]
    loss = similarity_loss(maps, fixed, moving, settings, generator, fixed_mask, moving_mask, frame)
    return loss + _regularization_terms(maps, settings, generator, d, b, fixed.device)


#: Similarity points evaluated with autograd at once; more are handled in chunks (bounded memory).
SIMILARITY_CHUNK = 8192


def step_backward(
    maps: Maps,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    settings: OptimizeSettings,
    generator: torch.Generator,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    chunk: int | None = None,
    frame: bool = True,
) -> float:
    """:func:`step_loss` and its backward pass, in memory bounded by ``chunk`` points; the loss.
    Instance optimisation's: points mapped outside the other image's frame do not count (``frame``).

    Up to ``chunk`` similarity points this is ``step_loss(...).backward()``. Above, the sampled
    values ``moving(phi(x))`` and ``fixed(phi_inv(y))`` are first computed without autograd, the
    similarity's gradient with respect to them is taken on those values alone, and the maps are
    then re-run chunk by chunk and back-propagated with that gradient: the same gradient (same
    points, same random draws), but autograd never holds more than ``chunk`` points' activations.
    """
    if chunk is None:  # read at the call (session 40)
        chunk = SIMILARITY_CHUNK
    n = settings.sample_points
    if settings.similarity == "lncc" or n <= chunk:
        loss = step_loss(maps, fixed, moving, settings, generator, fixed_mask, moving_mask, frame)
        value = float(loss.detach())
        check_finite_loss(value)  # before the backward pass, which a NaN map can crash
        loss.backward()
        return value
    pts = _SimilarityPoints(fixed, moving, settings, generator, fixed_mask, moving_mask)

    def sampled(volume, point_map, p):
        return grid_sample_points(volume, point_map(p))[:, 0]

    with torch.no_grad():
        px = torch.cat([maps.forward(pts.x[:, s : s + chunk]) for s in range(0, n, chunk)], 1)
        py = torch.cat([maps.backward(pts.y[:, s : s + chunk]) for s in range(0, n, chunk)], 1)
        wm, wf = grid_sample_points(moving, px)[:, 0], grid_sample_points(fixed, py)[:, 0]
    wm.requires_grad_(True)
    wf.requires_grad_(True)
    sim = pts.loss(wm, wf, *((inside_frame(px), inside_frame(py)) if frame else ()))
    check_finite_loss(float(sim.detach()))
    sim.backward()
    for s in range(0, n, chunk):
        sampled(moving, maps.forward, pts.x[:, s : s + chunk]).backward(wm.grad[:, s : s + chunk])
        sampled(fixed, maps.backward, pts.y[:, s : s + chunk]).backward(wf.grad[:, s : s + chunk])
    rest = _regularization_terms(maps, settings, generator, fixed.dim() - 2, fixed.shape[0], fixed.device)
    rest_value = float(rest.detach() if torch.is_tensor(rest) else rest)
    check_finite_loss(rest_value)
    if torch.is_tensor(rest):
        rest.backward()
    return float(sim.detach()) + rest_value


def _regularization_terms(maps: Maps, settings: OptimizeSettings, generator, d: int, b: int, device):
    """Regulariser, cycle consistency and latent prior of one step (0.0 when all are off)."""
    loss = 0.0
    if settings.reg_weight > 0:
        xr = uniform_points(b, settings.reg_points, d, generator, device)
        loss = loss + settings.reg_weight * regularization(
            settings.regularizer, maps, xr, settings.derivatives
        )
    if settings.cycle_weight > 0:
        xc = uniform_points(b, settings.reg_points, d, generator, device)
        loss = loss + settings.cycle_weight * R.cycle_consistency(maps.forward, maps.backward, xc)
    if settings.latent_weight > 0:
        loss = loss + settings.latent_weight * sum((t**2).mean() for t in maps.codes.tensors())
    return loss


class NonFiniteLoss(ArithmeticError):
    """Raised inside a step whose loss is NaN or infinite (turned into an ``InputError``)."""


def check_finite_loss(value: float) -> None:
    """Stop a step whose loss is not finite before its backward pass: torch's CPU ``grid_sample``
    backward can crash the process (segmentation fault) on a non-finite sampling grid."""
    if not math.isfinite(value):
        raise NonFiniteLoss(value)


#: A step diverges when its loss is above the best so far by more than this, and by more than
#: ``DIVERGE_FACTOR`` times the best (the similarity ``1 - NCC`` lies in [0, 2]).
DIVERGE_MARGIN = 0.5
DIVERGE_FACTOR = 10.0
#: Diverging steps in a row (at least this many, and at least a fifth of the run) stop the run.
DIVERGE_STEPS = 10


class DivergenceWatch:
    """Stops an optimisation whose loss or weights stop being finite, or whose loss runs away.

    A run diverges when its loss stays far above the best loss reached (see ``DIVERGE_MARGIN``)
    for ``max(DIVERGE_STEPS, iterations / 5)`` steps in a row, or ends there. Normal runs only
    spike for a few steps (Adam's first steps, the learning-rate warm-up).
    """

    def __init__(self, iterations: int, settings: OptimizeSettings):
        self.iterations, self.settings = int(iterations), settings
        self.limit = max(DIVERGE_STEPS, self.iterations // 5)
        self.best = math.inf
        self.run = 0
        self.last = math.nan
        self.step = -1

    def _far(self, value: float) -> bool:
        return value > self.best + max(DIVERGE_MARGIN, DIVERGE_FACTOR * abs(self.best))

    def update(self, step: int, value: float, params) -> None:
        """Record step ``step``'s loss; raise when the weights are not finite or the run diverged."""
        self.step, self.last = step, value
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            raise self.error(step, value)
        if self.best < math.inf and self._far(value):
            self.run += 1
            if self.run >= self.limit:
                raise self.error(step, value)
        else:
            self.run = 0
        self.best = min(self.best, value)

    def finish(self) -> None:
        """Raise when the run ended far above its best loss."""
        if self.step >= 0 and self.run > 0 and self._far(self.last):
            raise self.error(self.step, self.last)

    def error(self, step: int, value: float) -> InputError:
        s = self.settings
        what = "became NaN or infinite" if not math.isfinite(value) else f"rose to {value:.3g}"
        best = f" (best {self.best:.3g})" if self.best < math.inf else ""
        return InputError(
            f"The NePhi optimisation diverged: at step {step + 1} of {self.iterations} the loss "
            f"{what}{best}. With learning_rate={s.learning_rate:g}, "
            f"code_learning_rate={s.code_learning_rate:g} and reg_weight={s.reg_weight:g} the steps "
            "are too large for this pair: leave learning_rate and code_learning_rate at their "
            "defaults (or lower them tenfold), or lower reg_weight."
        )


def _lr_factor(k: int, n_it: int, warmup: float, final: float) -> float:
    """Learning-rate factor of step ``k`` of ``n_it``: a linear warm-up over the first ``warmup``
    share of the steps, times a cosine decay to ``final``. Without the warm-up, Adam's first steps
    move every weight by about the full learning rate whatever the gradient's size, which throws a
    field that starts from a converged coarse stage off by a fraction of a voxel."""
    ramp = min(1.0, (k + 1) / max(1.0, warmup * n_it))
    return ramp * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(k, n_it) / n_it)))


def optimize_field(
    field: NeuralDeformationField,
    codes: Codes,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    settings: OptimizeSettings,
    coarse: DenseMaps | None = None,
    on_step: Callable[[float, Maps], None] | None = None,
    seed: int = 0,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    train_networks: bool = True,
) -> tuple[Maps, list[float]]:
    """Optimise ``codes`` (and the networks unless ``train_networks=False``) in place.

    ``fixed`` and ``moving`` are ``(1, 1, *spatial)`` on the same grid, intensities normalised;
    masks likewise, as float. Returns the final maps and the loss history.
    """
    if settings.similarity == "lncc" and math.prod(fixed.shape[2:]) > LNCC_MAX_VOXELS:
        raise InputError(
            f"similarity='lncc' is evaluated densely and allowed up to {LNCC_MAX_VOXELS} voxels; "
            "use similarity='ncc' (sampled points) for this image."
        )
    gen = torch.Generator(device=fixed.device).manual_seed(int(seed) + 1)
    code_params = [t.requires_grad_(True) for t in codes.tensors()]
    groups = [{"params": code_params, "lr": settings.code_learning_rate}]
    if train_networks:
        groups.append({"params": list(field.parameters()), "lr": settings.learning_rate})
    opt = torch.optim.Adam(groups)
    n_it = max(settings.iterations, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda k: _lr_factor(k, n_it, settings.warmup_fraction, settings.final_lr_fraction),
    )
    maps = Maps(field, codes, coarse)
    history: list[float] = []
    watch = DivergenceWatch(settings.iterations, settings)
    params = [p for g in groups for p in g["params"]]
    for k in range(settings.iterations):
        opt.zero_grad(set_to_none=True)
        try:
            value = step_backward(
                maps, fixed, moving, settings, gen, fixed_mask, moving_mask, frame=settings.frame_mask
            )
        except NonFiniteLoss:
            raise watch.error(k, math.nan) from None
        opt.step()
        sched.step()
        history.append(value)
        watch.update(k, value, params)
        if on_step is not None:
            on_step(value, maps)
    watch.finish()
    for t in code_params:
        t.requires_grad_(False)
    return maps, history
