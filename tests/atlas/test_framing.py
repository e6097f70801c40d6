"""Several framings of a section for the embedding's first stage (engines/atlas/framing.py)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import ellipse

from napari_nephi import AtlasLookup, InputError
from napari_nephi.engines.atlas.framing import (
    atlas_aspect,
    framed_inputs,
    interleaved_order,
    place,
    pooled_distance,
)
from napari_nephi.engines.atlas.network import embed_batch
from napari_nephi.engines.atlas.plates import Plates
from napari_nephi.engines.atlas.preprocess import prepare_input, tissue_crop
from napari_nephi.synthetic.atlas import section_from_atlas, toy_atlas

SIZE = 64


@pytest.fixture(scope="module")
def atlas():
    return toy_atlas((24, 96, 112), seed=1)


def _rows(image: np.ndarray) -> tuple[int, int]:
    rows = np.flatnonzero((image > 0).any(axis=1))
    return int(rows[0]), int(rows[-1])


def test_first_framing_is_prepare_input(atlas):
    reference, _ = atlas
    section = section_from_atlas(reference, 11.0, (4.0, 2.0), crop=(0.3, 0, 0, 0))
    brightfield = np.stack([1.0 - section] * 3, axis=-1)  # RGB, bright background
    for image in (reference[12], section, brightfield):
        before = image.copy()
        framed = framed_inputs(image, 1.3, SIZE)
        np.testing.assert_array_equal(framed[0], prepare_input(image, SIZE))
        np.testing.assert_array_equal(image, before)  # the input is not modified
        assert framed.dtype == np.float32 and framed.shape[1:] == (SIZE, SIZE)


def test_top_cut_section_is_also_framed_like_its_whole_plate(atlas):
    reference, _ = atlas
    whole = prepare_input(reference[12], SIZE)
    h, w = tissue_crop(reference[12], SIZE).image.shape
    cut = section_from_atlas(reference, 12.0, 0.0, crop=(0.4, 0, 0, 0))  # the top 40 % cut away
    framed = framed_inputs(cut, w / h, SIZE)
    # wider than the atlas: centred, tissue at the top, at the bottom, then 4 corners
    assert len(framed) == 7
    centred, bottom = framed[0], framed[2]
    # at the bottom of a box of the whole plate's shape, the tissue ends where the whole plate's does
    assert abs(_rows(bottom)[1] - _rows(whole)[1]) <= 1
    assert abs(_rows(centred)[1] - _rows(whole)[1]) >= 5  # centred, it does not
    on_whole = (whole > 0)[bottom > 0].mean()
    assert on_whole > 0.99 and on_whole > (whole > 0)[centred > 0].mean() + 0.02


def test_framings_of_whole_side_cut_sections(atlas):
    reference, _ = atlas
    h, w = tissue_crop(reference[12], SIZE).image.shape
    aspect = w / h
    assert len(framed_inputs(reference[12], aspect, SIZE)) == 5  # centred and 4 corners
    half = section_from_atlas(reference, 12.0, 0.0, crop=(0, 0, 0, 0.5))  # the left half kept
    framed = framed_inputs(half, aspect, SIZE)
    assert len(framed) == 7
    left = framed[1]  # in a box of the atlas's shape, at its left: the tissue keeps its columns
    cols = np.flatnonzero((left > 0).any(axis=0))
    whole_cols = np.flatnonzero((prepare_input(reference[12], SIZE) > 0).any(axis=0))
    assert abs(cols[0] - whole_cols[0]) <= 1
    assert abs(cols[-1] - (whole_cols[0] + whole_cols[-1]) / 2) <= 3


def test_place_matches_a_hand_layout():
    crop = np.arange(1, 7, dtype=np.float32).reshape(2, 3) / 6
    # box 4 x 3 at the bottom: square side round(4 * 1.08) = 4, tissue in rows 2-3, columns 0-2
    out = place(crop, (4, 3), (1.0, 0.0), 4)
    expected = np.zeros((4, 4), np.float32)
    expected[2:4, 0:3] = crop
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_pooled_distance_by_hand():
    d = np.array([[1.0, 2.0, 3.0], [0.5, 3.0, 1.0], [0.9, 2.5, 2.0]])
    np.testing.assert_allclose(pooled_distance(d), [0.75, 2.0, 2.0])


def test_atlas_aspect_is_the_median_of_the_large_plates():
    plates = []
    for ry, rx in [(20, 30), (20, 34), (20, 40), (5, 30)]:  # the last is small: left out
        img = np.zeros((64, 96), np.float32)
        rr, cc = ellipse(32, 48, ry, rx, shape=img.shape)
        img[rr, cc] = 0.8 + 0.1 * np.sin(rr / 3.0)
        plates.append(img)
    aspect = atlas_aspect(Plates.from_reference(plates), SIZE)
    assert aspect == pytest.approx(34 / 20, rel=0.06)


def test_no_tissue_raises():
    with pytest.raises(InputError, match="has no tissue"):
        framed_inputs(np.pad(np.ones((1, 1), np.float32), 100), 1.4, SIZE)  # a hot pixel is no section


def test_lookup_pools_the_framings(trained_lookup, toy_reference):
    reference, _ = toy_reference
    section = section_from_atlas(reference, 17.4, (4.0, -3.0), crop=(0.3, 0, 0, 0))
    lk = trained_lookup
    assert lk.framing is True and lk.first_stage == "embedding"
    ranking = lk.lookup(section, top=None, rerank=False)
    # independently: every framing through the network, then the pooled distance
    import torch

    aspect = atlas_aspect(lk.plates, lk.net.config.input_size)
    assert lk.settings["atlas_aspect"] == pytest.approx(aspect) and lk.atlas_aspect == pytest.approx(aspect)
    # an index saved before session 12 has no stored aspect: it is computed from the plates
    old = AtlasLookup(
        lk.net, lk.plates, lk.embeddings, {k: v for k, v in lk.settings.items() if k != "atlas_aspect"}
    )
    assert old.atlas_aspect == pytest.approx(aspect)
    x = framed_inputs(section, aspect, lk.net.config.input_size)
    with torch.no_grad():
        emb = embed_batch(lk.net, torch.from_numpy(x[:, None]), lk.mirror).numpy()
    d = np.linalg.norm(emb[:, None, :] - lk.embeddings[None], axis=2)
    expected = 0.5 * (d[0] + d.min(axis=0))
    plates = [p for p, _ in ranking]
    np.testing.assert_allclose([v for _, v in ranking], expected[plates], rtol=1e-5, atol=1e-6)
    assert plates == list(np.argsort(expected, kind="stable"))
    lk.framing = False
    try:
        plain = lk.lookup(section, top=None, rerank=False)
    finally:
        lk.framing = True
    q = lk.embed([section])[0]
    np.testing.assert_allclose(
        [v for _, v in plain], np.linalg.norm(lk.embeddings - q, axis=1)[[p for p, _ in plain]], atol=1e-6
    )


def test_an_old_index_gets_its_aspect_when_loaded(trained_lookup, toy_reference, tmp_path, monkeypatch):
    import json

    from napari_nephi.engines.atlas import lookup as lookup_module

    reference, _ = toy_reference
    path = trained_lookup.save(tmp_path / "index")
    stored = AtlasLookup.load(path)
    config = json.loads((path / "config.json").read_text())
    del config["settings"]["atlas_aspect"]  # as saved before session 12
    (path / "config.json").write_text(json.dumps(config))
    old = AtlasLookup.load(path)
    aspect = atlas_aspect(old.plates, old.net.config.input_size)
    assert old.settings["atlas_aspect"] == pytest.approx(aspect) and old.atlas_aspect == pytest.approx(aspect)
    assert aspect == pytest.approx(stored.atlas_aspect, rel=0.02)

    # the lookup computes nothing more: the aspect is not recomputed there
    def no_aspect(*args, **kwargs):
        raise AssertionError("atlas_aspect computed during a lookup")

    monkeypatch.setattr(lookup_module, "atlas_aspect", no_aspect)
    section = section_from_atlas(reference, 12.6, (2.0, 3.0), crop=(0, 0.3, 0, 0))
    assert old.lookup(section, top=None, rerank=False) == stored.lookup(section, top=None, rerank=False)


def test_interleaved_order_by_hand():
    values = np.array([0.5, 0.1, 0.2, 0.3, 0.4])
    got = interleaved_order(np.array([1, 2, 0, 3, 4]), np.array([2, 3, 1, 4, 0]), values)
    assert got == [(1, 0.1), (2, 0.2), (3, 0.3), (0, 0.5), (4, 0.4)]


def test_pose_search_starts_from_both_orders(trained_lookup, toy_reference, monkeypatch):
    from napari_nephi.engines.atlas.rerank import PoseSearch

    reference, _ = toy_reference
    section = section_from_atlas(reference, 23.0, (3.0, 2.0), crop=(0, 0, 0.45, 0))
    lk = trained_lookup
    d = lk.framed_distances(section)
    centred, pooled = np.argsort(d[0], kind="stable"), np.argsort(pooled_distance(d), kind="stable")
    seen = []
    real = PoseSearch.search

    def spy(self, image, order, options, progress=None):
        seen.append(order)
        return real(self, image, order, options, progress)

    monkeypatch.setattr(PoseSearch, "search", spy)
    lk.search_poses(section)
    order = seen[-1]
    assert sorted(p for p, _ in order) == list(range(lk.n_plates))
    first = [p for p, _ in order[:4]]
    assert first[0] == centred[0] and set(first) >= {int(centred[0]), int(pooled[0]), int(centred[1])}
    lk.framing = False
    try:
        lk.search_poses(section)
    finally:
        lk.framing = True
    assert [p for p, _ in seen[-1]] == centred.tolist()  # the centred order alone, as before


def test_framing_accepts_only_true_or_false(trained_lookup):
    lk = trained_lookup
    for bad in ("off", "False", 0, 1, None, [False]):
        with pytest.raises(InputError, match="framing must be True or False"):
            lk.framing = bad
        assert lk.framing is True  # unchanged
    lk.framing = np.bool_(False)
    try:
        assert lk.framing is False
    finally:
        lk.framing = True
    assert lk.framing is True


def test_no_pose_scored_ranks_by_the_first_stage_distance(trained_lookup, toy_reference, monkeypatch):
    from napari_nephi.engines.atlas import rerank

    reference, _ = toy_reference
    section = section_from_atlas(reference, 23.0, (3.0, 2.0), crop=(0, 0, 0.45, 0))
    lk = trained_lookup
    d = lk.framed_distances(section)
    pooled = pooled_distance(d)
    order = interleaved_order(np.argsort(d[0], kind="stable"), np.argsort(pooled, kind="stable"), pooled)
    assert [v for _, v in order] != sorted(v for _, v in order)  # the search gets an unsorted order
    monkeypatch.setattr(rerank, "_anchored", lambda first, hyps, anchors: [])  # no pose is scored
    ranking = lk.lookup(section, top=None, rerank=True)
    dist = [v for _, v in ranking]
    assert dist == sorted(dist) and min(dist) >= 2.0
    np.testing.assert_allclose(dist, 2.0 + np.sort(pooled), rtol=1e-6)
    assert sorted(p for p, _ in ranking) == list(range(lk.n_plates))
