"""Several framings of a section for the embedding: where a partial section's tissue may have sat.

:func:`.preprocess.prepare_input` crops a section to its tissue and centres that box in a square, as
it does for the whole plates the index holds. A partial section (its top, bottom, one side or a
corner cut away) is then framed unlike any plate: half a brain fills the square where the whole
plate's half filled only its upper part. At lookup the section is also framed as if its tissue box
were part of a whole section's box (:func:`framed_inputs`):

* a box wider than the atlas's sections (:func:`atlas_aspect`; more than :data:`ASPECT_TOLERANCE`
  times): the missing part is above or below: the box is extended to the atlas's shape, the tissue
  at its top and at its bottom (2 framings);
* a box narrower: a side is missing: the tissue at the left and at the right of the box;
* always: the box enlarged by :data:`CORNER_ZOOM` with the tissue in each of its 4 corners (a corner
  cut away).

The distance of a plate is :func:`pooled_distance`: the mean of the centred framing's distance and the
smallest over all framings (the centred one alone lets no framing win by chance on a whole section).
Measured on the phantom benchmark (session 12, the session-10 index, ``rerank=False``; mean rank of
the true plate, 60 sections per query seed): 6.73 / 7.75 / 7.10 / 6.60 -> 5.88 / 5.77 / 6.17 / 6.25
on query seeds 0 / 1 / 5 / 6, mostly on partial sections, for 2-3 ms more per lookup. In a study of
variants the smallest distance alone was worse on seed 0 (7.90), and the 2 lower corners alone about
as good (5.77 / 6.08 / 5.97 / 5.95; not kept: it assumes which corner a cut takes). The pose search
(:mod:`.rerank`) started from the pooled order ranked 1.70 / 3.08 / 2.53 / 2.50 against 1.53 / 3.07 /
2.48 / 3.55 from the centred one (2.45 against 2.66 over the 240 sections); from the two interleaved
(:func:`interleaved_order`, what :meth:`.AtlasLookup.search_poses` does) 1.58 / 3.05 / 2.48 / 2.37
(2.37, Top-5 87.1 % against 86.0 %) at the same cost.
"""

from __future__ import annotations

import numpy as np

from .plates import Plates
from .preprocess import TissueCrop, _resize, frame_offsets, tissue_crop

#: A tissue box this much wider (or narrower) than the atlas's sections is taken as cut.
ASPECT_TOLERANCE = 1.08
#: The box of a section with a corner cut away, as a multiple of its tissue box.
CORNER_ZOOM = 1.25
#: Plates whose tissue box holds at least this share of the largest one's area set the aspect.
ASPECT_MIN_AREA = 0.25


def place(crop: np.ndarray, box: tuple[int, int], at: tuple[float, float], size: int) -> np.ndarray:
    """``crop`` placed in a ``box`` (height, width; at least the crop's) at ``at`` (0: top or left, 1:
    bottom or right of the free room), the box centred in a square with :data:`.preprocess.MARGIN`,
    resized to ``(size, size)``; ``at=(0.5, 0.5)`` in the crop's own box is
    :func:`.preprocess.prepare_input`'s framing."""
    h, w = crop.shape
    side, oy, ox = frame_offsets((h, w), box, at)
    square = np.zeros((side, side), dtype=np.float32)
    square[oy : oy + h, ox : ox + w] = crop
    return np.clip(_resize(square, (size, size)), 0.0, 1.0).astype(np.float32, copy=False)


def atlas_aspect(plates: Plates, size: int) -> float:
    """Median width / height of the plates' tissue boxes (as :func:`.preprocess.tissue_crop` finds
    them), over the plates with at least :data:`ASPECT_MIN_AREA` of the largest box's area."""
    shapes = np.array([tissue_crop(plates.plate(i), size, f"plate {i}").image.shape for i in range(plates.n)])
    areas = shapes[:, 0] * shapes[:, 1]
    big = shapes[areas >= ASPECT_MIN_AREA * areas.max()]
    return float(np.median(big[:, 1] / big[:, 0]))


def framing_specs(shape: tuple[int, int], aspect: float) -> list[tuple[tuple[int, int], tuple[float, float]]]:
    """``(box, at)`` of every framing of a tissue crop of ``shape`` (see the module); the first is
    centred in the crop's own box."""
    h, w = shape
    out = [((h, w), (0.5, 0.5))]
    ratio = w / h
    if ratio > aspect * ASPECT_TOLERANCE:  # wider than a section: its top or bottom is missing
        full = (round(w / aspect), w)
        out += [(full, (0.0, 0.5)), (full, (1.0, 0.5))]
    elif ratio < aspect / ASPECT_TOLERANCE:  # narrower: a side is missing
        full = (h, round(h * aspect))
        out += [(full, (0.5, 0.0)), (full, (0.5, 1.0))]
    box = (round(h * CORNER_ZOOM), round(w * CORNER_ZOOM))
    return out + [(box, at) for at in ((0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0))]


def framings(crop: TissueCrop, aspect: float, size: int) -> np.ndarray:
    """``(F, size, size)`` inputs of one section's tissue (see the module); the first is centred."""
    return np.stack([place(crop.image, box, at, size) for box, at in framing_specs(crop.image.shape, aspect)])


def framed_inputs(image, aspect: float, size: int, name: str = "image") -> np.ndarray:
    """:func:`framings` of a raw section (grey or RGB, any size); the first is
    :func:`.preprocess.prepare_input`'s. Raises its :class:`~napari_nephi.InputError` s."""
    return framings(tissue_crop(image, size, name), float(aspect), size)


def pooled_distance(d: np.ndarray) -> np.ndarray:
    """``(P,)`` distances of plates from ``(F, P)`` distances of the framings (the centred one first):
    the mean of the centred framing's and the smallest."""
    d = np.asarray(d)
    return 0.5 * (d[0] + d.min(axis=0))


def interleaved_order(first: np.ndarray, second: np.ndarray, values: np.ndarray) -> list[tuple[int, float]]:
    """Every plate once: ``first[0], second[0], first[1], second[1], ...`` with repeats left out, each
    with its ``values`` entry. The pose search starts from the centred framing's order interleaved with
    the pooled one's: both orders' best plates get searched and anchored."""
    seen: set[int] = set()
    out = []
    for pair in zip(first, second, strict=True):
        for p in pair:
            if int(p) not in seen:
                seen.add(int(p))
                out.append((int(p), float(values[int(p)])))
    return out
