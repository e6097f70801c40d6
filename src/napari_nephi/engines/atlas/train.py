"""Training the plate-embedding network from the atlas alone (real sections an optional extra).

Each step draws a PK batch: ``batch_plates`` plates (half the steps from a local window of the
atlas, so that nearby plates, the hard negatives, meet often), each seen as its clean plate and
``views_per_plate`` synthetic sections (oblique re-slices, partial crops, stain changes; see
:mod:`.synthesis`); real sections, when given, join as anchors with their plates. Triplet loss
with online semi-hard mining (contrastive as an option) plus, with weight ``ordinal``, an ordinal
ranking loss (plates are positions: a plate 2 away must embed nearer than one 5 away, so errors
become near-misses; on held-out oblique partial sections of two toy volumes it lowered the mean
rank from 5.9 to 3.5 and 3.9 to 2.5, see benchmarks/atlas_method_study.py), Adam, cosine or step
learning-rate decay. The decay follows the run's progress: the share of ``steps`` done or, when the
machine is too slow to do them all, the share of the time budget ``max_minutes`` spent (the decay
ends at :data:`SCHEDULE_SHARE` of the budget left when the loop starts), whichever is further, so the
run anneals and converges before the budget ends on any machine; on a machine fast enough for all
steps it is deterministic for a seed. Every ``validate_every`` steps the mean rank of the true plate
on a fixed held-out set of synthetic sections is measured and the best weights are kept.

Plates and sections are embedded as the normalised mean of the image and its left-right mirror
(``mirror``, default since session 9): on the session-8 index it lowered the mean rank of the true
plate on three sets of phantom sections of another brain (60 + 60 + 120) from 11.7 / 11.6 / 10.7 to
10.3 / 10.7 / 9.7, for one more network pass per image. ``loss="proxy"`` replaces the triplet loss by
a soft-label proxy loss (one learnt vector per plate, :func:`.losses.proxy_loss`); it did not beat
the triplet loss at 600 steps (benchmarks/atlas_method_study.py) and stays an option.

With ``vote > 0`` (default 1) the network also has a cell head (:mod:`.vote`): on a ``vote_cells``
grid over the input each cell predicts where along the plate axis it lies, trained in the same run
by a cross-entropy against soft targets from the synthesiser's atlas coordinates of every pixel
(mapped through the input's crop, pad and resize, and moved with each bank view's jitter), weight
``vote``; the history records the vote's validation rank too (the embedding's chooses the weights).
It costs about half as much again per step (70 against 45 ms for a batch of 64). As an auxiliary task it
made the embedding itself better: at 800 steps (phantom, mean rank of the true plate with the
embedding alone, query seeds 0 / 1 and 60 sections of atlas_queries seeds 5000-5004) 12.5 / 13.2 /
9.5 without the head and 9.3 / 11.2 / 7.4 with it (training seed 0), 15.7 / 15.8 / 11.1 against
12.0 / 13.3 / 11.2 (training seed 1); a head that sees only the fine stages (``vote_context="local"``)
ranked far worse (33 on the validation sections) and hurt the embedding (14.4 / 17.8 / 14.6).

Training runs on one CPU thread by default (``threads``): the network is small, and on the shared
two-core machine (load 6.5) 60 steps took 14 s on one thread against 81 s on two (which spent five
times the CPU time); the full default training did its 2000 steps in 403 s on one thread at load 5.6,
where session 8's on two threads needed 805 s at load 2-4 (and ran out of its time budget).
The time saved buys steps: 3500 (was 2000) took 378 s at load 2-4 and lowered the held-out synthetic
validation rank from 9.9 to 5.4; on phantom sections of another brain (embedding alone, mirror on)
the mean rank went from 9.1 / 7.4 / 8.0 to 7.4 / 8.2 / 6.8 (query seeds 0 and 1, 120 sections of
seeds 5000-5004) and Top-20 from 88 / 87 / 89 % to 92 / 90 / 93 %. A slower machine anneals within
``max_minutes`` as before.

**Prefetch** (session 34, opt-in ``prefetch``). About a third of a step's CPU is the synthesis and
preparation of its 8 fresh views (profile of 200 steps on the benchmark's phantom, one thread: views
5.2 ms each, 8.7 of 41.6 s; backward 11.6 s, forward 6.2 s); with ``prefetch`` a forked process
synthesises the next step's views while the network trains on this one. The batch draws that say
which plates get fresh views come from the batch's random stream and not from the views, so the
next step's are drawn ahead on a copy of that stream; the worker owns the synthesiser (forked with
its random state) and draws the views in the order the steps ask for them: the views, the batches and
the trained weights are those of a run without it, bit for bit, as long as the run does all its
``steps`` before ``max_minutes`` (the learning rate follows the share of the steps done, or of the
time budget where that is further, and prefetch changes the time). It needs a second core to gain
anything, a platform that forks and ``framed_partial`` off (a framed view draws from the batch's
stream); the result's ``prefetched`` and the index's ``settings["prefetched"]`` say whether it ran.
docs/atlas.md, "Session 34".
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ...core.device import choose_device
from ...core.errors import InputError
from ...core.options import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_int_list,
    check_known,
)
from ...core.progress import Progress
from .framing import atlas_aspect, framing_specs
from .losses import contrastive_loss, ordinal_loss, proxy_loss, triplet_loss
from .network import VOTE_CONTEXTS, EmbeddingConfig, EmbeddingNet, embed_batch, embed_with_cells
from .plates import Plates
from .preprocess import (
    InputGeometry,
    framed_input_geometry,
    prepare_input,
    prepare_input_geometry,
    tissue_crop,
)
from .synthesis import SectionSynthesizer, SynthesisConfig
from .vote import cell_cover, cell_loss, cell_targets, max_gradient, section_vote, truth_channels

#: Training options and their defaults (``AtlasLookup.train(**options)``).
DEFAULTS: dict = {
    "input_size": 64,
    "embedding_dim": 64,
    "widths": (16, 32, 64, 128),
    "steps": 3500,  # one thread does them in ~6-7 min on a shared 2-core machine (module docstring)
    "batch_plates": 16,
    "views_per_plate": 3,
    "bank_views": 8,
    "fresh_views": 8,
    "loss": "triplet",
    "mining": "semi-hard",
    "proxy_scale": 16.0,  # loss="proxy": cosine logits' scale (see losses.proxy_loss)
    "proxy_sigma": 1.0,  # loss="proxy": width in plates of the soft target
    "margin": None,  # 0.2 for triplet, 1.0 for contrastive
    "lr": 2e-3,
    "lr_decay": "cosine",
    "exclude_within": 1,
    "augment": "full",
    "max_minutes": 14.0,
    "validate_every": 100,
    "validation_size": 64,
    "plate_views": 0,
    "ordinal": 1.0,  # weight of the ordinal ranking loss (see losses.ordinal_loss)
    "ordinal_reach": 8,
    "mirror": True,  # embed every image as the mean with its left-right mirror (module docstring)
    "threads": 1,  # CPU threads while training (0: torch's setting; module docstring)
    "vote": 1.0,  # weight of the cell head's loss (0: no cell head; see .vote and the module docstring)
    "vote_cells": 8,  # cells per side of the cell head's grid
    "vote_sigma": 1.0,  # width in plates of a cell's soft target (plus the cell's own spread)
    "vote_context": "stages",  # what a cell sees (network.VOTE_CONTEXTS)
    # partial views framed in place as the lookup frames them (_framed_partial): True for all of them
    # (lost on the benchmark: embedding alone 9.10 / 9.82 against 5.88 / 5.77 on query seeds 0 / 1,
    # see docs/atlas.md), a number in [0, 1] for that share of them (the others stay centred)
    "framed_partial": False,
    # synthesise the next step's fresh views in a second process while the network trains (CPU and a
    # platform that forks; needs framed_partial off). The same views in the same order: the trained
    # weights are those of a run without it, bit for bit (module docstring, "Prefetch")
    "prefetch": False,
    # probability that a training view's stain partly follows compartments of its own, not the atlas's
    # regions (SynthesisConfig.partition; 0: none, the views as before; session 37, opt-in: at 0.3 the
    # benchmark's independent stain ranked better and today's stain worse, docs/atlas.md "Session 37")
    "partition": 0.0,
}
LOSSES = ("triplet", "contrastive", "proxy")
MININGS = ("semi-hard", "hard", "all")
DECAYS = ("cosine", "step")
AUGMENTS = ("full", "paper")
#: Margins when ``margin`` is not given, by loss (the paper's TF-Addons triplet default; Eq. 1's m).
DEFAULT_MARGINS = {"triplet": 0.2, "contrastive": 1.0, "proxy": 0.2}
#: Seed offset of the held-out validation sections (never drawn by the training synthesiser).
VALIDATION_SEED = 7919
#: The proxies (``loss="proxy"``) learn at this multiple of the network's learning rate.
PROXY_LR_FACTOR = 10.0
#: Mild views averaged with the clean plate when ``plate_views > 0``.
MILD_VIEWS = {"rotation": 3.0, "scale": (1.0, 1.1), "max_tilt": 2.0}


#: The learning-rate schedule ends at this share of the time budget left when the training loop
#: starts (the rest is for the last validation and the plate embeddings).
SCHEDULE_SHARE = 0.95


#: Ranges of the cheap variation applied each time a bank view is used (see ``_jitter``).
JITTER = {"rotation": 6.0, "scale": 0.06, "shift": 0.05, "gamma": (0.8, 1.25), "contrast": (0.85, 1.15)}


@dataclass
class TrainResult:
    """The trained network and what happened while training."""

    net: EmbeddingNet
    options: dict
    seconds: float
    steps_done: int
    best_step: int
    val_mean_rank: float | None
    stopped: str
    history: list = field(default_factory=list)
    proxies: np.ndarray | None = None  # (n_plates, D) L2-normalised learnt proxies, with loss="proxy"
    pixel_scale: float | None = None  # with a cell head: see pixel_scale()
    #: whether the fresh views were synthesised in a second process (``prefetch`` asked for, on the CPU, on
    #: a platform that forks; the ``prefetch`` option records only what was asked for)
    prefetched: bool = False


def check_train_options(options: dict) -> dict:
    """All training options with defaults filled in, validated; :class:`InputError` otherwise."""
    check_known("atlas", options, DEFAULTS)
    o = {**DEFAULTS, **options}
    o["input_size"] = check_int("input_size", o["input_size"], 32, 1024)
    o["embedding_dim"] = check_int("embedding_dim", o["embedding_dim"], 2, 1024)
    o["widths"] = tuple(check_int_list("widths", o["widths"], low=1, high=1024))
    if not 1 <= len(o["widths"]) <= 6:
        raise InputError(f"Option widths needs 1 to 6 stage widths, got {len(o['widths'])}.")
    o["steps"] = check_int("steps", o["steps"], 1, 10**7)
    o["batch_plates"] = check_int("batch_plates", o["batch_plates"], 2, 4096)
    o["views_per_plate"] = check_int("views_per_plate", o["views_per_plate"], 1, 64)
    o["bank_views"] = check_int("bank_views", o["bank_views"], 1, 256)
    o["fresh_views"] = check_int("fresh_views", o["fresh_views"], 0, 4096)
    if o["bank_views"] < o["views_per_plate"]:
        raise InputError(
            f"Option bank_views ({o['bank_views']}) must be at least views_per_plate "
            f"({o['views_per_plate']})."
        )
    o["loss"] = check_choice("loss", o["loss"], LOSSES)
    o["mining"] = check_choice("mining", o["mining"], MININGS)
    o["proxy_scale"] = check_float("proxy_scale", o["proxy_scale"], 0.0, 1000.0, low_open=True)
    o["proxy_sigma"] = check_float("proxy_sigma", o["proxy_sigma"], 0.0, 1000.0)
    if o["margin"] is None:
        o["margin"] = DEFAULT_MARGINS[o["loss"]]
    o["margin"] = check_float("margin", o["margin"], 0.0, 10.0, low_open=True)
    o["lr"] = check_float("lr", o["lr"], 0.0, 1.0, low_open=True)
    o["lr_decay"] = check_choice("lr_decay", o["lr_decay"], DECAYS)
    o["exclude_within"] = check_int("exclude_within", o["exclude_within"], 0, 1000)
    o["augment"] = check_choice("augment", o["augment"], AUGMENTS)
    o["partition"] = check_float("partition", o["partition"], 0.0, 1.0)
    o["max_minutes"] = check_float("max_minutes", o["max_minutes"], 0.0, 10**6, low_open=True)
    o["validate_every"] = check_int("validate_every", o["validate_every"], 1, 10**7)
    o["validation_size"] = check_int("validation_size", o["validation_size"], 1, 10**5)
    o["plate_views"] = check_int("plate_views", o["plate_views"], 0, 64)
    o["ordinal"] = check_float("ordinal", o["ordinal"], 0.0, 100.0)
    o["ordinal_reach"] = check_int("ordinal_reach", o["ordinal_reach"], 1, 10**5)
    o["mirror"] = check_bool("mirror", o["mirror"])
    o["threads"] = check_int("threads", o["threads"], 0, 1024)
    o["vote"] = check_float("vote", o["vote"], 0.0, 100.0)
    o["vote_cells"] = check_int("vote_cells", o["vote_cells"], 1, 32)
    o["vote_context"] = check_choice("vote_context", o["vote_context"], VOTE_CONTEXTS)
    o["vote_sigma"] = check_float("vote_sigma", o["vote_sigma"], 0.0, 100.0, low_open=True)
    if not isinstance(o["framed_partial"], bool):
        try:
            o["framed_partial"] = check_float("framed_partial", o["framed_partial"], 0.0, 1.0)
        except InputError:
            raise InputError(
                "Option framed_partial must be True, False or the share of partial views framed "
                f"(a number in [0, 1]), got {o['framed_partial']!r}."
            ) from None
    o["prefetch"] = check_bool("prefetch", o["prefetch"])
    if o["prefetch"] and o["framed_partial"] is not False and o["framed_partial"] != 0:
        raise InputError(
            "Option prefetch needs framed_partial off: a framed view draws from the batch's random "
            "stream, so the next step's views cannot be synthesised ahead in the same order."
        )
    if o["vote"] > 0 and o["vote_cells"] > o["input_size"] // 4:
        raise InputError(
            f"Option vote_cells ({o['vote_cells']}) must be at most input_size / 4 "
            f"({o['input_size'] // 4}): a cell needs a few pixels."
        )
    return o


def synthesis_config(options: dict) -> SynthesisConfig:
    """The augmentation preset of ``options["augment"]``, with ``options["partition"]`` (when set)."""
    cfg = SynthesisConfig.paper() if options["augment"] == "paper" else SynthesisConfig()
    if options.get("partition"):
        cfg.partition = float(options["partition"])
    return cfg


def work_size(options: dict) -> int:
    """Size the synthesiser works at: a little above the network input (it is resized down to it)."""
    return max(32, round(1.25 * options["input_size"]))


def network_config(options: dict, n_plates: int = 0) -> EmbeddingConfig:
    """The network configuration of ``options`` (with a cell head over ``n_plates`` when ``vote > 0``)."""
    vote = options.get("vote", 0.0) > 0 and n_plates > 0
    return EmbeddingConfig(
        input_size=options["input_size"],
        widths=tuple(options["widths"]),
        embedding_dim=options["embedding_dim"],
        vote_plates=n_plates if vote else 0,
        vote_cells=options.get("vote_cells", 8),
        vote_context=options.get("vote_context", DEFAULTS["vote_context"]),
    )


def _batch_tensor(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([prepare_input(im, size) for im in images]))[:, None]


def _plate_truth(geometries: Sequence, size: int) -> torch.Tensor:
    """``(n, 3, size, size)`` cell-head truth of the clean plates (each at its own plate position),
    from their :func:`.preprocess.prepare_input_geometry` geometries."""
    return torch.from_numpy(np.stack([truth_channels(float(i), g, size) for i, g in enumerate(geometries)]))


def pixel_scale(geometries: Sequence) -> float:
    """Atlas pixels per network-input pixel of the largest plate (a whole section's, the most a
    section's input pixel spans; the cell vote's gradients are bounded with it), from the plates'
    :func:`.preprocess.prepare_input_geometry` geometries."""
    return float(max(max(g.scale) for g in geometries))


def _view_with_truth(
    synth: SectionSynthesizer,
    plate: int,
    size: int,
    framed: tuple | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A prepared synthetic view of ``plate`` and its per-pixel truth (:func:`.vote.truth_channels`);
    with ``framed`` (the atlas aspect, the clean plates' geometries and the share of partial views
    to frame, drawn from ``rng`` when below 1) a partial view is framed by :func:`_framed_partial`."""
    section = synth.sample_with_truth(plate, labels=False)
    partial = section.params.get("partial") not in (None, "edges")
    if partial and framed is not None and (framed[2] >= 1.0 or rng.random() < framed[2]):
        image, geometry = _framed_partial(section, size, framed[0], framed[1][plate])
    else:
        image, geometry = prepare_input_geometry(section.image, size)
    return image, truth_channels(section.coords[0], geometry, size)


def _framed_partial(section, size: int, aspect: float, plate_geometry: InputGeometry):
    """(input, geometry) of a partial synthetic section in the lookup's framing
    (:func:`.framing.framing_specs`, the centred one among them) that puts its tissue nearest to where
    that tissue lies in the clean plate's input (from the section's atlas coordinates; mirrored for a
    mirrored section): the network learns partial sections framed where they sat, as the lookup's
    smallest framing distance looks for them."""
    tc = tissue_crop(section.image, size)
    framed = [framed_input_geometry(tc, size, box, at) for box, at in framing_specs(tc.image.shape, aspect)]
    centred = framed[0][1]
    target = []
    for axis in (1, 2):  # the tissue's mean atlas row and column, then their input pixel on the plate
        m, zm, _ = truth_channels(section.coords[axis], centred, size)
        mean = float(zm.sum() / max(float(m.sum()), 1e-6))
        target.append((mean - plate_geometry.offset[axis - 1]) / plate_geometry.scale[axis - 1])
    if section.params.get("flip"):
        target[1] = size - 1 - target[1]
    r = np.arange(size, dtype=np.float64)

    def miss(geometry: InputGeometry) -> float:
        m = geometry.mask.astype(np.float64)
        total = max(float(m.sum()), 1e-6)
        cy, cx = float(m.sum(axis=1) @ r) / total, float(m.sum(axis=0) @ r) / total
        return (cy - target[0]) ** 2 + (cx - target[1]) ** 2

    return min(framed, key=lambda f: miss(f[1]))


def _check_sections(sections, section_plates, n_plates: int):
    """Real sections and their plate indices as two lists, or :class:`InputError`."""
    if sections is None and section_plates is None:
        return [], []
    if sections is None or section_plates is None:
        raise InputError("Give both sections and section_plates (their plate indices), or neither.")
    secs = list(sections)
    idx = [check_int(f"section_plates[{i}]", p, 0, n_plates - 1) for i, p in enumerate(section_plates)]
    if len(secs) != len(idx):
        raise InputError(
            f"{len(secs)} sections but {len(idx)} section_plates: give one plate index per section."
        )
    return secs, idx


class _Batches:
    """Draws the PK batches (plates, their clean and synthetic views, real sections as anchors).

    Synthetic views come from a bank of ``bank_views`` prepared views per plate, of which
    ``fresh_views`` are replaced by new draws every step: synthesis and CLAHE cost more than a
    training step of the network, and a bank that keeps changing gives fresh views without
    drawing every one anew.
    """

    def __init__(
        self,
        plates: Plates,
        options: dict,
        synth: SectionSynthesizer,
        clean: torch.Tensor,
        clean_truth: torch.Tensor | None,
        real: torch.Tensor | None,
        real_plates: np.ndarray,
        rng: np.random.Generator,
        progress: Progress,
        framed: tuple | None = None,
    ):
        self.n = plates.n
        self.o = options
        self.synth = synth
        self.clean = clean
        self.real = real
        self.real_plates = real_plates
        self.rng = rng
        #: with ``framed_partial``: the atlas aspect, the clean plates' geometries and the share framed
        #: (_view_with_truth)
        self.framed = framed
        size = options["input_size"]
        #: with a cell head, 3 more channels per view: its per-pixel truth (see .vote.truth_channels)
        self.clean_truth = clean_truth
        self._worker = self._conn = None  # the prefetch process (start_prefetch) and its pipe
        self._pending: list[int] = []
        channels = 1 if self.clean_truth is None else 4
        self.bank = torch.empty((self.n, options["bank_views"], channels, size, size))
        for i in range(self.n):
            for j in range(options["bank_views"]):
                self.bank[i, j] = torch.from_numpy(self._view(i))
            progress.check()

    def _plates(self, rng: np.random.Generator) -> np.ndarray:
        n, k = self.n, min(self.o["batch_plates"], self.n)
        if rng.random() < 0.5 and n > 2 * k:  # local window: neighbours are the hard negatives
            width = min(n, 3 * k)
            lo = int(rng.integers(0, n - width + 1))
            return lo + rng.choice(width, k, replace=False)
        return rng.choice(n, k, replace=False)

    def _choose(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A step's plates, real sections and plates whose bank gets a fresh view, drawn from ``rng``."""
        plates = self._plates(rng)
        real_idx = np.empty(0, dtype=np.int64)
        if self.real is not None:
            m = min(len(self.real_plates), max(1, len(plates) // 4))
            real_idx = rng.choice(len(self.real_plates), m, replace=False)
            own = np.unique(self.real_plates[real_idx])  # the real sections' plates join the batch
            others = plates[~np.isin(plates, own)][: max(0, len(plates) - len(own))]
            plates = np.concatenate([own, others])
        return plates, real_idx, rng.choice(plates, min(len(plates), self.o["fresh_views"]), replace=False)

    def start_prefetch(self) -> bool:
        """Start the process that synthesises the next step's fresh views (``prefetch``); False where
        the platform cannot fork (the run then synthesises them itself, with the same result)."""
        import multiprocessing

        if "fork" not in multiprocessing.get_all_start_methods():
            return False
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        # forked: the worker has this object as it is now, its synthesiser's random state included, and
        # from here on only the worker draws views, in the order the steps ask for them
        self._worker = ctx.Process(target=_prefetch_views, args=(self, child), daemon=True)
        self._worker.start()
        child.close()
        self._request_next()
        return True

    def stop_prefetch(self) -> None:
        if self._worker is not None:
            # the views asked for last are never used: take them, or the worker stays blocked sending
            # them (larger than the pipe's buffer) and never reads the stop
            if self._pending and self._conn.poll(60):
                self._conn.recv()
            self._pending = []
            self._conn.send(None)
            self._worker.join(timeout=30)
            if self._worker.is_alive():
                self._worker.terminate()
            self._conn.close()
            self._worker = self._conn = None

    def _request_next(self) -> None:
        """Ask the worker for the fresh views of the next step: its draws made on a copy of the
        batch's random state, which is left where it was."""
        state = copy.deepcopy(self.rng.bit_generator.state)
        _, _, fresh = self._choose(self.rng)
        self.rng.bit_generator.state = state
        self._pending = [int(p) for p in fresh]
        self._conn.send(self._pending)

    def _fresh_views(self, fresh: np.ndarray) -> Iterator[np.ndarray] | list[np.ndarray]:
        if self._worker is None:  # lazily: each view is drawn just before its bank slot, as before prefetch
            return (self._view(int(p)) for p in fresh)
        if [int(p) for p in fresh] != self._pending:  # cannot happen: the same draws from the same state
            raise RuntimeError("prefetched views for other plates than the step drew")
        views = self._conn.recv()
        self._pending = []  # received: nothing left for stop_prefetch to take
        return views

    def _view(self, plate: int) -> np.ndarray:
        """A prepared synthetic view of ``plate`` ``(C, S, S)`` (with the cell head's truth after the
        image); a draw that left no tissue is drawn again."""
        size = self.o["input_size"]
        for _ in range(3):
            try:
                if self.clean_truth is None and self.framed is None:
                    return prepare_input(self.synth.sample(plate), size)[None]
                image, truth = _view_with_truth(self.synth, plate, size, self.framed, self.rng)
                if self.clean_truth is None:
                    return image[None]
                return np.concatenate([image[None], truth])
            except InputError:
                continue
        if self.clean_truth is None:
            return self.clean[plate].numpy()
        return torch.cat([self.clean[plate], self.clean_truth[plate]]).numpy()

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        plates, real_idx, fresh = self._choose(self.rng)
        v = self.o["views_per_plate"]
        # each view is drawn just before its bank slot, as before prefetch: a view may draw from the batch's
        # stream too (framed_partial as a share), so the order is kept (review 2 of session 34, C1)
        for p, view in zip(fresh, self._fresh_views(fresh), strict=True):
            self.bank[p, int(self.rng.integers(self.o["bank_views"]))] = torch.from_numpy(view)
        slots = np.argsort(self.rng.random((len(plates), self.o["bank_views"])), axis=1)[:, :v]
        views = _jitter(self.bank[plates[:, None], slots].reshape(-1, *self.bank.shape[2:]), self.rng)
        x = [self.clean[plates], views[:, :1]]
        labels = [plates, np.repeat(plates, v)]
        truth = None
        if self.clean_truth is not None:
            truth = [self.clean_truth[plates], views[:, 1:]]
        if len(real_idx):
            x.append(self.real[real_idx])
            labels.append(self.real_plates[real_idx])
            if truth is not None:  # real sections: no per-pixel truth, their cells do not vote
                truth.append(torch.zeros((len(real_idx), *self.clean_truth.shape[1:])))
        batch_labels = torch.from_numpy(np.concatenate(labels).astype(np.int64))
        if self._worker is not None:  # the next step's views are synthesised while this one trains
            self._request_next()
        return torch.cat(x), batch_labels, None if truth is None else torch.cat(truth)


def _prefetch_views(batches: _Batches, conn) -> None:
    """The prefetch process: for each list of plates received, their fresh views (``_Batches._view``),
    until None."""
    torch.set_num_threads(1)
    while (plates := conn.recv()) is not None:
        conn.send([batches._view(p) for p in plates])


def _jitter(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Cheap per-use variation of bank views: a small random affine map, gamma and contrast.

    So a bank view seen again is never the same input (the bank changes only slowly). ``x``:
    ``(B, C, S, S)``: every channel is moved by the same map, gamma and contrast touch the first
    (the image; the others are its per-pixel truth).
    """
    b = x.shape[0]
    angle = np.radians(rng.uniform(-JITTER["rotation"], JITTER["rotation"], b))
    scale = rng.uniform(1 - JITTER["scale"], 1 + JITTER["scale"], b)
    shift = rng.uniform(-JITTER["shift"], JITTER["shift"], (b, 2))
    theta = np.zeros((b, 2, 3), dtype=np.float32)
    theta[:, 0, 0] = theta[:, 1, 1] = np.cos(angle) / scale
    theta[:, 0, 1] = -np.sin(angle) / scale
    theta[:, 1, 0] = np.sin(angle) / scale
    theta[:, :, 2] = shift
    grid = torch.nn.functional.affine_grid(torch.from_numpy(theta), list(x.shape), align_corners=False)
    y = torch.nn.functional.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    gamma = torch.from_numpy(rng.uniform(*JITTER["gamma"], (b, 1, 1, 1)).astype(np.float32))
    gain = torch.from_numpy(rng.uniform(*JITTER["contrast"], (b, 1, 1, 1)).astype(np.float32))
    image = (y[:, :1].clamp(0, 1) ** gamma * gain).clamp(0, 1)
    return image if y.shape[1] == 1 else torch.cat([image, y[:, 1:]], dim=1)


#: Share of the run spent warming the learning rate up (cosine decay).
WARMUP = 0.05


def lr_factor(progress: float, decay: str = "cosine") -> float:
    """Multiplier of the learning rate at ``progress`` (0 at the start, 1 at the end of the run).

    ``"cosine"``: linear warm-up over the first :data:`WARMUP` of the run, then a half cosine to 0;
    ``"step"``: 1, then 0.1 from 60 %, 0.01 from 85 %.
    """
    p = min(max(float(progress), 0.0), 1.0)
    if decay == "step":
        return 1.0 if p < 0.6 else (0.1 if p < 0.85 else 0.01)
    if p < WARMUP:
        return max(p, 1e-3) / WARMUP
    return 0.5 * (1 + math.cos(math.pi * (p - WARMUP) / (1 - WARMUP)))


def run_progress(step: int, steps: int, elapsed: float, available: float) -> float:
    """Progress of a run after ``step`` of ``steps`` steps and ``elapsed`` of ``available`` seconds:
    the further of the two shares (so a slow machine anneals within its time budget)."""
    return max(step / max(1, steps), elapsed / max(available, 1e-9))


@torch.no_grad()
def embed_tensor(
    net: EmbeddingNet, x: torch.Tensor, device, batch_size: int = 64, mirror: bool = False
) -> np.ndarray:
    """Embeddings ``(N, D)`` of prepared inputs ``(N, 1, S, S)`` in eval mode.

    ``mirror``: the normalised mean of the embeddings of each input and its left-right mirror.
    """
    was_training = net.training
    net.eval()
    out = [
        embed_batch(net, x[i : i + batch_size].to(device), mirror).cpu() for i in range(0, len(x), batch_size)
    ]
    net.train(was_training)
    return torch.cat(out).numpy().astype(np.float32)


def plate_embeddings(
    net: EmbeddingNet, plates: Plates, clean: torch.Tensor, options: dict, device, seed: int = 0
) -> np.ndarray:
    """Plate embeddings: of the clean plates, or (``plate_views > 0``) the mean with mild views."""
    mirror = options["mirror"]
    emb = embed_tensor(net, clean, device, mirror=mirror)
    if options["plate_views"] > 0:
        cfg = SynthesisConfig.none()
        for key, value in MILD_VIEWS.items():
            setattr(cfg, key, value)
        synth = SectionSynthesizer(plates, cfg, work_size=work_size(options), seed=seed + 1)
        for _ in range(options["plate_views"]):
            views = _batch_tensor([synth.sample(i) for i in range(plates.n)], options["input_size"])
            emb = emb + embed_tensor(net, views, device, mirror=mirror)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb.astype(np.float32)


@torch.no_grad()
def _vote_rank(
    net: EmbeddingNet, x: torch.Tensor, truth: np.ndarray, vote: tuple, device, mirror: bool
) -> float:
    """Mean rank of the true plate by the cell vote (:func:`.vote.section_vote`) on prepared inputs."""
    was_training = net.training
    net.eval()
    covers, gradient = vote[0], vote[1]
    ranks = []
    try:
        for i in range(0, len(x), 64):
            logp = embed_with_cells(net, x[i : i + 64].to(device), mirror)[1].cpu().numpy()
            for j, lp in enumerate(logp):
                scores = section_vote(lp, covers[i + j], x.shape[-1], gradient).scores
                ranks.append(int((scores > scores[truth[i + j]]).sum()))
    finally:
        net.train(was_training)
    return float(np.mean(ranks))


def _snapshot(net: EmbeddingNet, proxies: torch.Tensor | None) -> tuple[dict, np.ndarray | None]:
    """A copy of the weights and of the normalised proxies, if any (the best so far is kept)."""
    if proxies is None:
        return copy.deepcopy(net.state_dict()), None
    unit = torch.nn.functional.normalize(proxies.detach(), dim=1).cpu().numpy()
    return copy.deepcopy(net.state_dict()), unit.astype(np.float32)


def true_plate_ranks(query: np.ndarray, plates: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """0-based rank of the true plate (number of plates strictly closer) for every query."""
    d = np.linalg.norm(query[:, None, :] - plates[None, :, :], axis=2)
    return (d < d[np.arange(len(truth)), truth][:, None]).sum(axis=1)


def train_network(
    plates: Plates,
    options: dict,
    *,
    sections=None,
    section_plates=None,
    device: str = "auto",
    progress: Progress | None = None,
    seed: int = 0,
) -> TrainResult:
    """Train an :class:`EmbeddingNet` on ``plates`` with validated ``options`` (see :data:`DEFAULTS`).

    ``seed`` makes training deterministic on the CPU. Stops after ``steps`` steps or
    ``max_minutes``; returns the weights with the best validation mean rank. Runs on
    ``options["threads"]`` CPU threads (0: torch's setting), restored afterwards.
    """
    threads = torch.get_num_threads()
    if options["threads"] > 0:
        torch.set_num_threads(options["threads"])
    try:
        return _train(plates, options, sections, section_plates, device, progress, seed)
    finally:
        torch.set_num_threads(threads)


def _train(plates, options, sections, section_plates, device, progress, seed) -> TrainResult:
    """:func:`train_network` on the threads it set."""
    prog = progress or Progress()
    start = time.perf_counter()
    dev = choose_device(device)
    o = options
    secs, sec_plates = _check_sections(sections, section_plates, plates.n)
    size = o["input_size"]
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        net = EmbeddingNet(network_config(o, plates.n)).to(dev)
        prog.check()
        # every plate prepared once: the network's clean input, and the cell head's truth and scale
        prepared = [prepare_input_geometry(plates.plate(i), size) for i in range(plates.n)]
        clean = torch.from_numpy(np.stack([image for image, _ in prepared]))[:, None]
        plate_geometries = [geometry for _, geometry in prepared]
        clean_truth = _plate_truth(plate_geometries, size) if o["vote"] > 0 else None
        real = _batch_tensor(secs, size) if secs else None
        synth = SectionSynthesizer(plates, synthesis_config(o), work_size=work_size(o), seed=seed)
        val_synth = SectionSynthesizer(
            plates, synthesis_config(o), work_size=work_size(o), seed=seed + VALIDATION_SEED
        )
        val_truth = np.unique(np.linspace(0, plates.n - 1, min(plates.n, o["validation_size"])).round())
        val_truth = val_truth.astype(np.int64)
        val_prepared = [prepare_input_geometry(val_synth.sample(int(p)), size) for p in val_truth]
        val_x = torch.from_numpy(np.stack([image for image, _ in val_prepared]))[:, None]
        val_vote = None
        if net.cell_head is not None:  # the validation sections' cells' tissue shares
            scale = pixel_scale(plate_geometries)
            covers = [cell_cover(g.mask, o["vote_cells"]) for _, g in val_prepared]
            val_vote = (covers, max_gradient(scale), scale)
        prog.check()
        share = float(o["framed_partial"])
        framed = (atlas_aspect(plates, size), plate_geometries, share) if share > 0 else None
        batches = _Batches(
            plates,
            o,
            synth,
            clean,
            clean_truth,
            real,
            np.asarray(sec_plates, dtype=np.int64),
            rng,
            prog,
            framed,
        )
        groups = [{"params": list(net.parameters()), "scale": 1.0}]
        proxies = None
        if o["loss"] == "proxy":  # one learnt vector per plate (drawn only then: the default stays as it was)
            proxies = torch.nn.Parameter(torch.randn(plates.n, o["embedding_dim"], device=dev))
            groups.append({"params": [proxies], "scale": PROXY_LR_FACTOR})
        opt = torch.optim.Adam(groups, lr=o["lr"] * lr_factor(0.0, o["lr_decay"]))
        best = (math.inf, _snapshot(net, proxies), 0)
        history, val_rank, stopped = [], None, "steps"
        budget = 60.0 * o["max_minutes"]
        loop_start = time.perf_counter()
        available = SCHEDULE_SHARE * (budget - (loop_start - start))
        progress = 0.0
        step = 0
        ranks_of: dict = {}
        # the next step's fresh views synthesised while this one trains (CPU; the same weights)
        prefetched = bool(o["prefetch"] and dev.type == "cpu" and batches.start_prefetch())
        try:
            for step in range(1, o["steps"] + 1):
                x, labels, truth = batches.draw()
                emb, logits = net.forward_all(x.to(dev), cells=truth is not None)
                labels = labels.to(dev)
                if o["loss"] == "triplet":
                    loss = triplet_loss(emb, labels, o["margin"], o["mining"], o["exclude_within"])
                elif o["loss"] == "proxy":
                    loss = proxy_loss(emb, labels, proxies, o["proxy_scale"], o["proxy_sigma"])
                else:
                    loss = contrastive_loss(emb, labels, o["margin"], o["exclude_within"])
                if o["ordinal"] > 0:
                    loss = loss + o["ordinal"] * ordinal_loss(emb, labels, o["margin"], o["ordinal_reach"])
                if truth is not None:
                    z, var, weight = cell_targets(truth.to(dev), o["vote_cells"])
                    loss = loss + o["vote"] * cell_loss(logits, z, var, weight, o["vote_sigma"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                now = time.perf_counter()
                progress = run_progress(step, o["steps"], now - loop_start, available)
                for group in opt.param_groups:
                    group["lr"] = group["scale"] * o["lr"] * lr_factor(progress, o["lr_decay"])
                last = progress >= 1.0 or now - start > budget
                if step % o["validate_every"] == 0 or last:
                    mirror = o["mirror"]
                    ranks = true_plate_ranks(
                        embed_tensor(net, val_x, dev, mirror=mirror),
                        embed_tensor(net, clean, dev, mirror=mirror),
                        val_truth,
                    )
                    val_rank = float(ranks.mean())
                    if val_vote is not None:  # recorded; the embedding (the first stage) chooses the weights
                        ranks_of = {"val_vote_rank": _vote_rank(net, val_x, val_truth, val_vote, dev, mirror)}
                    if val_rank < best[0]:
                        best = (val_rank, _snapshot(net, proxies), step)
                value = float(loss.detach())
                lr = opt.param_groups[0]["lr"]
                history.append({"step": step, "loss": value, "val_mean_rank": val_rank, "lr": lr, **ranks_of})
                ranks_of = {}
                prog.step(step, o["steps"], loss=value, stage="training", val_mean_rank=val_rank)
                if last:
                    if step < o["steps"]:
                        stopped = "max_minutes"
                    break
        finally:
            batches.stop_prefetch()
        net.load_state_dict(best[1][0])
        net.eval()
    return TrainResult(
        net=net,
        options=dict(o),
        seconds=time.perf_counter() - start,
        steps_done=step,
        best_step=best[2],
        val_mean_rank=None if math.isinf(best[0]) else best[0],
        stopped=stopped,
        history=history,
        proxies=best[1][1],
        pixel_scale=None if val_vote is None else val_vote[2],
        prefetched=prefetched,
    )
