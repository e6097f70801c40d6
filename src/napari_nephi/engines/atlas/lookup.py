"""``AtlasLookup``: find the atlas plates that match a brain section, register one, carry its labels.

>>> lk = AtlasLookup.train(reference, annotation)          # doctest: +SKIP
>>> lk.lookup(section, top=5)                              # doctest: +SKIP
[(57, 0.21), (58, 0.25), (56, 0.31), (59, 0.38), (55, 0.44)]

Distances are Euclidean between L2-normalised embeddings (0 to 2), best (smallest) first; with
:attr:`AtlasLookup.framing` (the default) the mean of the centred section's distance and the smallest
over several framings of it (:mod:`.framing`).
With ``rerank=True`` the embedding's shortlist is re-ranked by a pose search of the section in the
atlas (:mod:`.rerank`); the distance is then ``1 - similarity`` of the best pose near the plate,
less ``plate_penalty`` per plate between the pose's plate and it, up to ``penalty_reach`` plates
(0: a perfect match, 1: none); plates farther than that from every good pose tie and keep the first
stage's order.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ...core.device import choose_device
from ...core.errors import InputError
from ...core.options import check_int
from ...core.progress import CancelFlag, Progress, ProgressCallback
from ...core.registration import Registration
from .framing import atlas_aspect, framed_inputs, interleaved_order, pooled_distance
from .network import EmbeddingNet, embed, embed_batch, embed_cells
from .plates import Plates
from .preprocess import image_list
from .rerank import PoseSearch, RerankResult, check_rerank_options
from .series import smooth_series
from .train import (
    _batch_tensor,
    check_train_options,
    plate_embeddings,
    synthesis_config,
    train_network,
)
from .vote import max_gradient, section_vote

#: Default of ``rerank`` in :meth:`AtlasLookup.lookup` (benchmarks/README.md, "Atlas lookup"). On the
#: phantom benchmark re-ranking lowers the mean rank of the true plate from 11.7 to 2.7 (Top-5 45 ->
#: 83 %; session 9, query seed 0) at about 0.4 s of CPU per section (session 13) instead of
#: ~5 ms: a right plate matters more to users than the second, so it is on; ``rerank=False`` (``atlas-lookup
#: --no-rerank``, the widget's "Re-rank by pose" unticked) gives the embedding's ranking alone,
#: within the 50 ms target.
RERANK_DEFAULT = True
#: First stages (:attr:`AtlasLookup.first_stage`): the embedding's distances, the cell vote
#: (:mod:`.vote`), or the vote's mean negative log-likelihood plus ``VOTE_EMBEDDING_WEIGHT`` times the
#: embedding distance.
FIRST_STAGES = ("embedding", "vote", "vote+embedding")
VOTE_EMBEDDING_WEIGHT = 1.0
#: First stage of an index with a cell head. On the phantom benchmark (session 10, full defaults, one
#: index; mean rank of the true plate for query seeds 0 / 1 / 60 other sections, Top-5 %) the
#: embedding gave 6.73 / 7.75 / 4.92 (67 / 65 / 70), the vote 6.38 / 7.03 / 5.02 (58 / 60 / 77),
#: the vote plus the embedding distance 6.45 / 6.87 / 4.98 (62 / 63 / 78); re-ranked by the pose
#: search, the embedding's order gave 1.53 / 3.07 and the vote plus embedding's 2.22 / 2.98 (seeds 0 /
#: 1), and on two toy atlases (benchmarks/atlas_method_study.py, 500 steps) the embedding ranked
#: better (3.27 / 1.96 against 3.36 / 2.24). No clear gain: the embedding stays the first stage; the
#: cell head is trained because it makes the embedding better (train.py's module docstring).
FIRST_STAGE_DEFAULT = "embedding"
#: Default of :attr:`AtlasLookup.framing`: the embedding's first stage compares each section at several
#: framings (:mod:`.framing`). Phantom benchmark, session 12, the session-10 index, query seeds 0 / 1 /
#: 5 / 6 (60 sections each): the embedding alone 6.73 / 7.75 / 7.10 / 6.60 -> 5.88 / 5.77 / 6.17 / 6.25
#: (about 1 ms more CPU per lookup); the pose search started from the centred order interleaved with the
#: pooled one 1.58 / 3.05 / 2.48 / 2.37 against 1.53 / 3.07 / 2.48 / 3.55 from the centred order alone
#: (2.37 against 2.66 over the 240 sections, Top-5 87.1 against 86.0 %). Lookup-time only, for every
#: index; ``framing = False`` ranks as before.
FRAMING_DEFAULT = True


def _best(d: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The ``k`` plates of smallest distance ``d`` (a stable sort: ties keep the plate order)."""
    order = np.argsort(d, kind="stable")[:k]
    return [(int(j), float(d[j])) for j in order]


class AtlasLookup:
    """A trained plate index of one atlas: embedding network, plate embeddings and the plates.

    Make one with :meth:`train`, :meth:`load` or :meth:`from_brainglobe`.
    """

    def __init__(
        self,
        net: EmbeddingNet,
        plates: Plates,
        embeddings: np.ndarray,
        settings: dict,
        region_names: dict | None = None,
        device: str = "auto",
    ):
        self._net = net.eval()
        self._plates = plates
        self._embeddings = np.asarray(embeddings, dtype=np.float32)
        self._settings = dict(settings)
        self._region_names = {int(k): str(v) for k, v in (region_names or {}).items()}
        self._device = choose_device(device)
        self._net.to(self._device)
        #: Sections are embedded as the mean with their left-right mirror (as the plates were).
        self.mirror = bool(self._settings.get("options", {}).get("mirror", False))
        #: Whether :meth:`lookup` re-ranks by the pose search when ``rerank`` is not given.
        self.rerank_default = RERANK_DEFAULT
        self._pose_search: PoseSearch | None = None
        self._first_stage = "embedding" if self._net.cell_head is None else FIRST_STAGE_DEFAULT
        self._framing = FRAMING_DEFAULT
        if self._settings.get("atlas_aspect") is None:  # indexes saved before session 12: here, once
            self._settings["atlas_aspect"] = atlas_aspect(self._plates, self._net.config.input_size)
        self._aspect = float(self._settings["atlas_aspect"])

    @property
    def first_stage(self) -> str:
        """How plates are ranked without re-ranking, and the order the pose search gets
        (:data:`FIRST_STAGES`): :data:`FIRST_STAGE_DEFAULT` for an index with a cell head, else
        ``"embedding"`` (the only one an index without a cell head has)."""
        return self._first_stage

    @first_stage.setter
    def first_stage(self, value: str) -> None:
        if value not in FIRST_STAGES:
            raise InputError(f"first_stage must be one of {', '.join(FIRST_STAGES)}, got {value!r}.")
        if value != "embedding" and self._net.cell_head is None:
            raise InputError(
                f"first_stage {value!r} needs an index trained with a cell head (vote > 0); this one has "
                "none: train the index again, or rank by the embedding."
            )
        self._first_stage = value

    @property
    def framing(self) -> bool:
        """Whether the embedding's first stage pools several framings of a section (:mod:`.framing`;
        default :data:`FRAMING_DEFAULT`)."""
        return self._framing

    @framing.setter
    def framing(self, value: bool) -> None:
        if not isinstance(value, (bool, np.bool_)):
            raise InputError(f"framing must be True or False, got {value!r}.")
        self._framing = bool(value)

    # -- making one --------------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        reference,
        annotation=None,
        *,
        plate_axis: int = 0,
        sections=None,
        section_plates=None,
        device: str = "auto",
        progress: ProgressCallback | None = None,
        cancel: CancelFlag = None,
        seed: int = 0,
        **options,
    ) -> AtlasLookup:
        """Train the index of an atlas.

        ``reference``: a 3D volume with plates along ``plate_axis`` or a list of 2D plates (grey or
        RGB, any range); ``annotation``: matching integer labels. ``sections`` / ``section_plates``:
        optional real sections and their plate indices, mixed into training as anchors.
        ``region_names``: optional ``{label value: name}``. Other options: see
        :data:`napari_nephi.engines.atlas.train.DEFAULTS` (unknown names raise :class:`InputError`).
        ``progress`` gets a :class:`~napari_nephi.core.progress.ProgressEvent` per step (``loss``
        and ``extra["val_mean_rank"]``); ``cancel`` stops with :class:`~napari_nephi.Cancelled`.
        """
        region_names = _check_region_names(options.pop("region_names", None))
        opts = check_train_options(options)
        seed = check_int("seed", seed, 0, 2**62)
        dev = choose_device(device)
        prog = Progress(progress, cancel)
        plates = Plates.from_reference(reference, annotation, plate_axis=plate_axis)
        result = train_network(
            plates,
            opts,
            sections=sections,
            section_plates=section_plates,
            device=dev,
            progress=prog,
            seed=seed,
        )
        t0 = time.perf_counter()
        clean = _batch_tensor([plates.plate(i) for i in range(plates.n)], opts["input_size"])
        emb = plate_embeddings(result.net, plates, clean, opts, dev, seed)
        settings = {
            "options": _jsonable(opts),
            "network": result.net.config.to_dict(),
            "synthesis": _jsonable(synthesis_config(opts).to_dict()),
            "seed": seed,
            "seconds": result.seconds + time.perf_counter() - t0,
            "steps_done": result.steps_done,
            "best_step": result.best_step,
            "val_mean_rank": result.val_mean_rank,
            "stopped": result.stopped,
            "prefetched": result.prefetched,
            "real_sections": 0 if section_plates is None else len(list(section_plates)),
            "fingerprint": plates.fingerprint(),
            "plate_shapes": [list(s) for s in plates.shapes],
            "vote_pixel_scale": result.pixel_scale,
            "atlas_aspect": atlas_aspect(plates, opts["input_size"]),
            "history": result.history,
        }
        return cls(result.net, plates, emb, settings, region_names, device=str(dev))

    @classmethod
    def from_brainglobe(cls, name: str, **options) -> AtlasLookup:
        """Train on a brainglobe atlas from the local brainglobe cache (never downloads); the index's
        ``settings["brainglobe"]`` keeps the atlas's name, resolution, shape and plate positions."""
        from .brainglobe import train_brainglobe

        return train_brainglobe(cls, name, **options)

    def save(self, path) -> Path:
        """Write the index folder ``path`` atomically (see :mod:`.store`)."""
        from .store import save_index

        return save_index(self, path)

    @classmethod
    def load(
        cls, path, reference=None, annotation=None, *, plate_axis: int = 0, device: str = "auto"
    ) -> AtlasLookup:
        """Read an index folder written by :meth:`save`.

        With ``reference`` (and ``annotation``) the atlas is checked against the one the index was
        trained on (:class:`InputError` when it differs) and its full-resolution plates are used;
        without, the plates stored in the index are.
        """
        from .store import load_index

        return load_index(cls, path, reference, annotation, plate_axis=plate_axis, device=device)

    # -- properties --------------------------------------------------------------------------
    @property
    def n_plates(self) -> int:
        """Number of plates."""
        return self._plates.n

    @property
    def plates(self) -> Plates:
        """The atlas plates."""
        return self._plates

    @property
    def embeddings(self) -> np.ndarray:
        """``(n_plates, D)`` float32 plate embeddings (a copy)."""
        return self._embeddings.copy()

    @property
    def net(self) -> EmbeddingNet:
        """The embedding network (eval mode)."""
        return self._net

    @property
    def settings(self) -> dict:
        """Training options, network and synthesis configs, seconds, validation rank (a copy)."""
        return dict(self._settings)

    @property
    def region_names(self) -> dict[int, str]:
        """``{label value: region name}`` known to the index (a copy; may be empty)."""
        return dict(self._region_names)

    def region_name(self, value: int) -> str:
        """Name of label ``value``: given or brainglobe name, "background" for 0, else "region <value>"."""
        v = int(value)
        if v in self._region_names:
            return self._region_names[v]
        return "background" if v == 0 else f"region {v}"

    def plate_image(self, i: int) -> np.ndarray:
        """Plate ``i``, float32 in [0, 1]."""
        return self._plates.plate(i)

    def plate_labels(self, i: int) -> np.ndarray | None:
        """Labels of plate ``i`` (integer), or ``None`` when the atlas has no annotation."""
        return self._plates.labels(i)

    # -- lookups -----------------------------------------------------------------------------
    def _top(self, top) -> int:
        if top is None:
            return self.n_plates
        return min(check_int("top", top, 1), self.n_plates)

    def _distances(self, query: np.ndarray) -> np.ndarray:
        """``(N, n_plates)`` Euclidean distances of ``(N, D)`` embeddings to the plates'."""
        return np.linalg.norm(query[:, None, :] - self._embeddings[None, :, :], axis=2)

    def _rank(self, query: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        return [_best(d, k) for d in self._distances(query)]

    def embed(self, sections) -> np.ndarray:
        """``(N, D)`` embeddings of sections (a list of 2D/RGB images)."""
        return embed(self._net, sections, device=self._device, mirror=self.mirror)

    def _use_rerank(self, rerank) -> bool:
        if rerank is None:
            return bool(self.rerank_default)
        if not isinstance(rerank, (bool, np.bool_)):
            raise InputError(f"rerank must be True, False or None (the index's default), got {rerank!r}.")
        return bool(rerank)

    def search_poses(
        self,
        section,
        rerank_options: dict | None = None,
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelFlag = None,
    ) -> RerankResult:
        """The pose search of :mod:`.rerank` for one section: every plate ranked and the best pose
        found near each searched plate (atlas position, tilt, rotation, scale, centre), with every
        option it ran with (``.options``: ``rerank_options=result.options`` repeats the ranking) and
        whether ``plain_reach`` ordered the plates next to the best pose (``.plain_ranked``). With the
        opt-in ``quarter_shift`` a plate's pose may have been moved there along the plate axis, with the
        score of its cut before the move (:attr:`.pose_grid.Pose.shifted`).
        ``cancel`` is checked between the search's steps (:class:`~napari_nephi.Cancelled`)."""
        opts = check_rerank_options(rerank_options)
        section = _section(section)
        prog = Progress(progress, cancel)
        prog.check()
        order = self.search_order(section)
        if self._pose_search is None:
            self._pose_search = PoseSearch(self._plates)
        return self._pose_search.search(section, order, opts, prog)

    def search_order(self, section) -> list[tuple[int, float]]:
        """The first stage's order of every plate for ``section``: the order the pose search
        (:meth:`search_poses`) starts from, as ``[(plate_index, distance), ...]``, each plate once.

        With :attr:`first_stage` ``"embedding"`` and :attr:`framing` on (the defaults) it is the
        centred section's order interleaved with the pooled framings' (:func:`.framing.interleaved_order`),
        each plate with its pooled distance, so the list is not sorted by distance; otherwise it is
        :attr:`first_stage`'s ranking, best first. The pose search shortlists its first plates and
        its prior reads the distances (:mod:`.rerank`). ``section``: a 2D image (y, x) or RGB (y, x, 3),
        as for :meth:`lookup`. Public since session 40 (the benchmarks called the private
        ``_search_order``, the same method)."""
        section = _section(section)
        if self._first_stage != "embedding" or not self.framing:
            return self._first_rank([section], self.n_plates)[0]
        d = self.framed_distances(section)
        pooled = pooled_distance(d)
        return interleaved_order(np.argsort(d[0], kind="stable"), np.argsort(pooled, kind="stable"), pooled)

    def lookup(
        self,
        section,
        top: int | None = 5,
        rerank: bool | None = None,
        rerank_options: dict | None = None,
    ) -> list[tuple[int, float]]:
        """The ``top`` plates nearest to ``section``: ``[(plate_index, distance), ...]`` best first.

        ``section``: 2D or RGB, any size (large ones are downsampled), possibly partial or in another
        stain. ``top=None`` (or at least the number of plates) ranks every plate once. Empty,
        constant, NaN or tissue-less sections raise :class:`InputError`.
        ``rerank``: re-rank the embedding's shortlist by a pose search in the atlas (see
        :mod:`.rerank`; distances are then ``1 - pose similarity``); ``None`` takes
        :attr:`rerank_default`. ``rerank_options``: see :data:`.rerank.DEFAULTS`.
        """
        return self.lookup_many([_section(section)], top, rerank, rerank_options)[0]

    def lookup_many(
        self,
        sections: Sequence,
        top: int | None = 5,
        rerank: bool | None = None,
        rerank_options: dict | None = None,
    ) -> list[list[tuple[int, float]]]:
        """:meth:`lookup` for every section of a list: embedded in one batch, except with the
        embedding and :attr:`framing` or with re-ranking, which take one section at a time (a
        section's framings in one batch)."""
        k = self._top(top)
        images = image_list(sections)
        if self._use_rerank(rerank):
            return [self.search_poses(s, rerank_options).ranking[:k] for s in images]
        check_rerank_options(rerank_options)
        return self._first_rank(images, k)

    def _first_rank(self, images: list, k: int, framing: bool | None = None) -> list[list[tuple[int, float]]]:
        """The ``k`` best plates of each section by :attr:`first_stage` (the embedding's with the
        pooled framings when ``framing``, default :attr:`framing`)."""
        if self._first_stage == "embedding":
            if not (self.framing if framing is None else framing):
                return self._rank(self.embed(images), k)
            return [self._framed_rank(im, f"image {i}", k) for i, im in enumerate(images)]
        emb, logp, covers = embed_cells(self._net, images, device=self._device, mirror=self.mirror)
        size = self._net.config.input_size
        gradient = max_gradient(float(self._settings.get("vote_pixel_scale") or 1.0))
        out = []
        for q in range(len(images)):
            d = -section_vote(logp[q], covers[q], size, gradient).scores
            if self._first_stage == "vote+embedding":
                d = d + VOTE_EMBEDDING_WEIGHT * np.linalg.norm(self._embeddings - emb[q], axis=1)
            out.append(_best(d, k))
        return out

    @property
    def atlas_aspect(self) -> float:
        """Median width / height of the plates' tissue boxes (:func:`.framing.atlas_aspect`): stored
        with the index when it was trained; for an index saved before session 12, computed from the
        plates when it is loaded (not in the first lookup)."""
        return self._aspect

    def framed_distances(self, section, name: str = "section") -> np.ndarray:
        """``(F, n_plates)`` embedding distances of the section's framings (:mod:`.framing`; the
        centred one, :meth:`embed`'s, first)."""
        x = framed_inputs(section, self.atlas_aspect, self._net.config.input_size, name)
        with torch.no_grad():
            emb = embed_batch(self._net, torch.from_numpy(x[:, None]).to(self._device), self.mirror)
        return self._distances(emb.float().cpu().numpy())

    def _framed_rank(self, section, name: str, k: int) -> list[tuple[int, float]]:
        return _best(pooled_distance(self.framed_distances(section, name)), k)

    def lookup_series(
        self,
        sections: Sequence,
        top: int | None = 5,
        rerank: bool | None = None,
        rerank_options: dict | None = None,
    ) -> dict:
        """Plates for sections in cutting order, made monotonic and evenly spaced (as DeepSlice).

        Returns ``dict(picks=[plate per section], rankings=[lookup() of each section], start, step,
        direction)``: the picks lie near the line ``start + step * order`` fitted robustly to the
        sections' top candidates (increasing or decreasing, whichever fits), each chosen among the
        section's own ``top`` plates when one is near the line. ``rerank``: as :meth:`lookup`.
        """
        rankings = self.lookup_many(sections, top, rerank=rerank, rerank_options=rerank_options)
        return smooth_series(rankings, self.n_plates)

    # -- after a pick ------------------------------------------------------------------------
    def register(
        self,
        section,
        plate_index: int,
        method: str = "nephi",
        *,
        device: str = "auto",
        progress: ProgressCallback | None = None,
        cancel: CancelFlag = None,
        **reg_options,
    ) -> Registration:
        """Register plate ``plate_index`` onto ``section``; carry its labels. See :mod:`.register`."""
        from .register import register_plate

        return register_plate(
            self, section, plate_index, method, device=device, progress=progress, cancel=cancel, **reg_options
        )

    def __repr__(self) -> str:
        return f"AtlasLookup(n_plates={self.n_plates}, labels={self._plates.has_labels})"


def _section(section):
    if section is None:
        raise InputError("No section given: pass a 2D image (y, x) or RGB (y, x, 3).")
    return section


def _check_region_names(names) -> dict[int, str]:
    if names is None:
        return {}
    if not isinstance(names, dict):
        raise InputError(f"region_names must be a dict {{label value: name}}, got {type(names).__name__}.")
    out = {}
    for k, v in names.items():
        try:
            out[int(k)] = str(v)
        except (TypeError, ValueError) as exc:
            raise InputError(f"region_names keys must be whole label values, got {k!r}.") from exc
    return out


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, torch.device):
        return str(value)
    return value
