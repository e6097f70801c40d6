"""Session fixtures of the atlas tests: the toy atlas and a lookup trained on it (fast options)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_nephi.synthetic.atlas import ATLAS_REGIONS, section_from_atlas, toy_atlas

#: Fast training options for tests: a small network on 48-pixel inputs, a few hundred steps.
FAST_OPTIONS = {
    "input_size": 48,
    "widths": (8, 16, 32),
    "embedding_dim": 32,
    "steps": 300,
    "batch_plates": 12,
    "views_per_plate": 2,
    "bank_views": 6,
    "fresh_views": 2,
    "lr": 2e-3,
    "validate_every": 100,
    "validation_size": 20,
    "max_minutes": 3.0,
}


@pytest.fixture(scope="session")
def toy_reference():
    """``(reference, labels)``: the 40-plate toy atlas ``toy_atlas((40, 64, 64), seed=0)``."""
    return toy_atlas((40, 64, 64), seed=0)


@pytest.fixture(scope="session")
def toy_pose_search(toy_reference):
    """The pose search (:class:`~napari_nephi.engines.atlas.rerank.PoseSearch`) of ``toy_reference``."""
    from napari_nephi.engines.atlas.plates import Plates
    from napari_nephi.engines.atlas.rerank import PoseSearch

    reference, labels = toy_reference
    return PoseSearch(Plates.from_reference(reference, labels))


@pytest.fixture(scope="session")
def trained_lookup(toy_reference):
    """An AtlasLookup trained on ``toy_reference`` with :data:`FAST_OPTIONS` and the toy region names."""
    import torch

    from napari_nephi import AtlasLookup

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: one thread is faster than two contended ones
    try:
        reference, labels = toy_reference
        lk = AtlasLookup.train(
            reference, labels, device="cpu", seed=0, region_names=ATLAS_REGIONS, **FAST_OPTIONS
        )
        # the tests that use this index check the embedding's ranking; re-ranking (on by default) is
        # tested with rerank=True and the default itself in test_lookup.test_rerank_default_and_bad_values
        lk.rerank_default = False
        return lk
    finally:
        torch.set_num_threads(threads)


def _held_out_sections(
    reference, labels, count: int, seed: int, max_tilt: float = 8.0, max_crop: float = 0.35
):
    """Oblique, partial sections cut at random plates: ``[(image, section_labels, true_plate), ...]``.

    Tilts up to ``max_tilt`` degrees about both in-plane axes; one side cut away by up to
    ``max_crop`` (cortex, a hemisphere, the base) in most of them; the true plate is the one at the
    cut's centre.
    """
    rng = np.random.default_rng(seed)
    n = reference.shape[0]
    out = []
    for _ in range(count):
        index = float(rng.uniform(2, n - 3))
        tilt = tuple(rng.uniform(-max_tilt, max_tilt, 2))
        crop = [0.0, 0.0, 0.0, 0.0]
        if rng.random() < 0.8:
            crop[int(rng.integers(4))] = float(rng.uniform(0.1, max_crop))
        image, section_labels = section_from_atlas((reference, labels), index, tilt, crop=crop)
        out.append((image, section_labels, round(index)))
    return out


@pytest.fixture(scope="session")
def cut_sections():
    """The function ``(reference, labels, count, seed, max_tilt=8, max_crop=0.35)`` -> held-out sections.

    Each item is ``(image, section_labels, true_plate)``: an oblique, partial section cut with
    :func:`napari_nephi.synthetic.atlas.section_from_atlas` at a random plate.
    """
    return _held_out_sections
