"""The cell head and the vote as the lookup's first stage: training, saving, loading, old indexes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_nephi import AtlasLookup
from napari_nephi.core.errors import InputError
from napari_nephi.engines.atlas.lookup import FIRST_STAGE_DEFAULT
from napari_nephi.engines.atlas.network import EmbeddingConfig, EmbeddingNet, embed_with_cells

from .conftest import FAST_OPTIONS

#: A short run with the cell head (the vote's accuracy is measured in benchmarks/atlas_lookup.py).
VOTE_OPTIONS = {**FAST_OPTIONS, "steps": 40, "validate_every": 20, "vote": 1.0, "vote_cells": 6}


@pytest.fixture(scope="module")
def vote_lookup(toy_reference):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference, labels = toy_reference
        lk = AtlasLookup.train(reference, labels, device="cpu", seed=0, **VOTE_OPTIONS)
        lk.rerank_default = False
        return lk
    finally:
        torch.set_num_threads(threads)


def test_old_config_without_head_loads_and_has_no_head_weights():
    old = {"input_size": 48, "widths": [8, 16], "blocks_per_stage": 1, "embedding_dim": 8}
    config = EmbeddingConfig.from_dict(old)
    assert config.vote_plates == 0
    net = EmbeddingNet(config)
    assert net.cell_head is None
    assert not any(k.startswith("cell_head") for k in net.state_dict())
    emb, logits = net.forward_all(torch.rand(2, 1, 48, 48))
    assert emb.shape == (2, 8) and logits is None
    with pytest.raises(InputError, match="no cell head"):
        embed_with_cells(net, torch.rand(1, 1, 48, 48))


def test_head_does_not_change_the_embedding_layers_initial_weights():
    torch.manual_seed(0)
    plain = EmbeddingNet(EmbeddingConfig(input_size=48, widths=(8, 16, 32)))
    torch.manual_seed(0)
    headed = EmbeddingNet(EmbeddingConfig(input_size=48, widths=(8, 16, 32), vote_plates=30, vote_cells=6))
    for key, value in plain.state_dict().items():
        assert torch.equal(value, headed.state_dict()[key])
    emb, logits = headed.forward_all(torch.rand(3, 1, 48, 48))
    assert logits.shape == (3, 30, 6, 6)
    # the mirror average: the mirrored pass's cells are flipped back onto the image's own cells
    x = torch.rand(1, 1, 48, 48)
    _, both = embed_with_cells(headed.eval(), x, mirror=True)
    _, own = embed_with_cells(headed, x)
    _, flipped = embed_with_cells(headed, x.flip(-1))
    expected = 0.5 * (own + flipped.view(1, 6, 6, 30).flip(2).reshape(1, 36, 30))
    assert torch.allclose(both, expected, atol=1e-5)


def test_index_without_head_ranks_by_embedding(vote_lookup):
    """An index without a cell head (as every index before session 10) ranks by its embedding."""
    net = EmbeddingNet(EmbeddingConfig(input_size=48, widths=(8, 16, 32), embedding_dim=32))
    embeddings = np.random.default_rng(0).normal(size=(vote_lookup.n_plates, 32)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    old = AtlasLookup(net, vote_lookup.plates, embeddings, {"options": {"mirror": False}}, device="cpu")
    assert old.first_stage == "embedding"
    old.framing = False  # the centred section alone, as before session 12 (framings: test_framing.py)
    section = vote_lookup.plate_image(7)
    query = old.embed([section])[0]
    expected = np.argsort(np.linalg.norm(embeddings - query, axis=1), kind="stable")[:5]
    assert [p for p, _ in old.lookup(section, top=5, rerank=False)] == expected.tolist()
    with pytest.raises(InputError, match="needs an index trained with a cell head"):
        old.first_stage = "vote"
    with pytest.raises(InputError, match="first_stage must be one of"):
        vote_lookup.first_stage = "votes"


def test_vote_index_trains_saves_and_loads(vote_lookup, toy_reference, cut_sections, tmp_path):
    lk = vote_lookup
    assert lk.net.cell_head is not None and lk.first_stage == FIRST_STAGE_DEFAULT
    assert lk.settings["vote_pixel_scale"] > 0
    history = [h for h in lk.settings["history"] if "val_vote_rank" in h]
    assert [h["step"] for h in history] == [20, 40]
    reference, labels = toy_reference
    sections = [s[0] for s in cut_sections(reference, labels, 4, seed=11)]
    rankings = {}
    for stage in ("vote", "vote+embedding", "embedding"):
        lk.first_stage = stage
        rankings[stage] = lk.lookup_many(sections, top=None, rerank=False)
        for ranking in rankings[stage]:
            assert sorted(p for p, _ in ranking) == list(range(lk.n_plates))
            d = [v for _, v in ranking]
            assert d == sorted(d)
    # vote+embedding adds the embedding distance (weight 1) to the vote's mean negative log-likelihood
    emb = lk.embed(sections)
    for q, ranking in enumerate(rankings["vote+embedding"]):
        vote_d = dict(rankings["vote"][q])
        for plate, d in ranking[:5]:
            assert np.isclose(d, vote_d[plate] + np.linalg.norm(lk.embeddings[plate] - emb[q]), atol=1e-4)
    lk.first_stage = "vote+embedding"
    try:
        path = lk.save(tmp_path / "index")
    finally:
        lk.first_stage = FIRST_STAGE_DEFAULT  # the fixture is shared
    again = AtlasLookup.load(path, device="cpu")
    assert again.first_stage == FIRST_STAGE_DEFAULT  # not saved: the default of an index with a head
    again.first_stage = "vote+embedding"
    assert again.lookup_many(sections, top=None, rerank=False) == rankings["vote+embedding"]
    again.first_stage = "vote"
    assert again.lookup_many(sections, top=None, rerank=False) == rankings["vote"]
