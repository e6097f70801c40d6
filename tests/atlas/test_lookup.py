"""AtlasLookup: ranking, batching, series smoothing, save/load, bad input, brainglobe (faked, offline)."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from napari_nephi import AtlasLookup, InputError, UnsupportedFileError
from napari_nephi.engines.atlas.series import smooth_series
from napari_nephi.synthetic.atlas import section_from_atlas, toy_atlas

#: Share of held-out oblique (up to 6 degrees about both axes) partial sections whose top 3 must hold
#: the true plate or a neighbour of it. Chance is about 0.12. The fixture trains a tiny network for
#: 300 steps (under a minute); longer training ranks better (see the report for measured rates).
TOP3_THRESHOLD = 0.6


def test_true_plate_in_top3_for_most_oblique_partial_sections(trained_lookup, toy_reference, cut_sections):
    reference, labels = toy_reference
    sections = cut_sections(reference, labels, 60, seed=123, max_tilt=6.0)
    hits = trained_lookup.lookup_many([s for s, _, _ in sections], top=3)
    truth = [t for _, _, t in sections]
    # a plate within one of the truth counts: neighbouring plates of the centre are the same anatomy
    near = np.mean([any(abs(p - t) <= 1 for p, _ in h) for h, t in zip(hits, truth, strict=True)])
    exact = np.mean([any(p == t for p, _ in h) for h, t in zip(hits, truth, strict=True)])
    print(f"top-3 holds the true plate or a neighbour: {near:.3f}; the true plate itself: {exact:.3f}")
    assert near >= TOP3_THRESHOLD


def test_ranking_is_complete_sorted_and_matches_embedding_distances(trained_lookup, toy_reference):
    reference, _ = toy_reference
    section = section_from_atlas(reference, 17.4, (4.0, -3.0), crop=(0.15, 0, 0, 0))
    default = trained_lookup.first_stage
    trained_lookup.first_stage = "embedding"  # the vote's distances: test_vote_lookup.py
    trained_lookup.framing = False  # one framing; the pooled framings: test_framing.py
    try:
        ranking = trained_lookup.lookup(section, top=None)
        again = trained_lookup.lookup(section, top=trained_lookup.n_plates + 10)
        four = trained_lookup.lookup(section, top=4)
    finally:
        trained_lookup.first_stage = default
        trained_lookup.framing = True
    plates = [p for p, _ in ranking]
    assert sorted(plates) == list(range(trained_lookup.n_plates))
    dist = np.array([d for _, d in ranking])
    assert np.all(np.diff(dist) >= 0)
    # independent computation from the embeddings
    q = trained_lookup.embed([section])[0]
    expected = np.linalg.norm(trained_lookup.embeddings - q, axis=1)
    np.testing.assert_allclose(dist, expected[plates], rtol=1e-5, atol=1e-6)
    assert again == ranking
    assert four == ranking[:4]


def test_lookup_many_equals_lookup(trained_lookup, toy_reference):
    reference, _ = toy_reference
    sections = [section_from_atlas(reference, i, 3.0) for i in (5, 20, 33)]
    many = trained_lookup.lookup_many(sections, top=5)
    for section, hits in zip(sections, many, strict=True):
        single = trained_lookup.lookup(section, top=5)
        assert [p for p, _ in single] == [p for p, _ in hits]
        np.testing.assert_allclose([d for _, d in single], [d for _, d in hits], atol=1e-5)


def test_large_rgb_section_is_downsampled_not_refused(trained_lookup, toy_reference):
    reference, _ = toy_reference
    section = section_from_atlas(reference, 24, 2.0)
    big = np.repeat(np.repeat(section, 40, axis=0), 40, axis=1)  # 2560 x 2560
    rgb = np.stack([big, big * 0.8, big * 0.6], axis=-1)
    hits = trained_lookup.lookup(rgb, top=5)
    assert len(hits) == 5
    assert any(abs(p - 24) <= 2 for p, _ in hits)


@pytest.mark.parametrize(
    "section, match",
    [
        (np.full((64, 64), np.nan, np.float32), "NaN"),
        (np.full((64, 64), 0.5, np.float32), "constant"),
        (np.zeros((0, 64), np.float32), "empty"),
        (np.zeros((5, 64, 64), np.float32), "2D image"),
    ],
)
def test_bad_sections_raise_input_error(trained_lookup, section, match):
    with pytest.raises(InputError, match=match):
        trained_lookup.lookup(section)


def test_bad_top_raises(trained_lookup, toy_reference):
    section = section_from_atlas(toy_reference[0], 10)
    with pytest.raises(InputError, match="top"):
        trained_lookup.lookup(section, top=0)


def test_region_names(trained_lookup):
    assert trained_lookup.region_name(7) == "hippocampus left"
    assert trained_lookup.region_name(0) == "background"
    assert trained_lookup.region_name(999) == "region 999"
    assert trained_lookup.region_names[10] == "cerebellum"


def test_accessors(trained_lookup, toy_reference):
    reference, labels = toy_reference
    assert trained_lookup.n_plates == reference.shape[0]
    assert trained_lookup.embeddings.shape == (reference.shape[0], 32)
    np.testing.assert_allclose(np.linalg.norm(trained_lookup.embeddings, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(trained_lookup.plate_labels(12), labels[12])
    assert trained_lookup.plate_image(12).shape == reference.shape[1:]
    settings = trained_lookup.settings
    assert settings["options"]["steps"] == 300 and settings["seconds"] > 0
    assert settings["network"]["embedding_dim"] == 32


# -- save / load --------------------------------------------------------------------------------


def test_save_load_round_trip_gives_identical_rankings(trained_lookup, toy_reference, tmp_path):
    reference, labels = toy_reference
    sections = [section_from_atlas(reference, i, (3.0, -2.0)) for i in (4, 19, 31)]
    path = trained_lookup.save(tmp_path / "index")
    assert sorted(p.name for p in path.iterdir() if not p.name.startswith(".")) == sorted(
        ["config.json", "weights.pt", "embeddings.npy", "plates.npz"]
    )
    loaded = AtlasLookup.load(path)
    assert loaded.lookup_many(sections, top=None, rerank=False) == trained_lookup.lookup_many(
        sections, top=None, rerank=False
    )
    # the pose search (the default) reads the stored plates (float16): same best plate, same distances
    # within the rounding
    for got, want in zip(
        loaded.lookup_many(sections, top=None), trained_lookup.lookup_many(sections, top=None, rerank=True)
    ):
        assert got[0][0] == want[0][0]
        got_d, want_d = dict(got), dict(want)
        np.testing.assert_allclose(
            [got_d[p] for p in range(len(got))], [want_d[p] for p in range(len(got))], atol=2e-3
        )
    np.testing.assert_array_equal(loaded.embeddings, trained_lookup.embeddings)
    np.testing.assert_array_equal(loaded.plate_labels(20), labels[20])
    np.testing.assert_allclose(loaded.plate_image(20), trained_lookup.plate_image(20), atol=1e-3)
    assert loaded.region_name(10) == "cerebellum"
    with_ref = AtlasLookup.load(path, reference, labels)
    assert with_ref.lookup(sections[1], top=None) == trained_lookup.lookup(sections[1], top=None, rerank=True)


def test_load_refuses_another_atlas(trained_lookup, tmp_path):
    path = trained_lookup.save(tmp_path / "index")
    other, other_labels = toy_atlas((40, 64, 64), seed=5)
    with pytest.raises(InputError, match="another atlas"):
        AtlasLookup.load(path, other, other_labels)


def test_load_refuses_another_version(trained_lookup, tmp_path):
    path = trained_lookup.save(tmp_path / "index")
    config = json.loads((path / "config.json").read_text())
    config["version"] = 999
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="version 999"):
        AtlasLookup.load(path)


def test_load_of_a_damaged_or_missing_index(trained_lookup, tmp_path):
    with pytest.raises(UnsupportedFileError, match="not an atlas index folder"):
        AtlasLookup.load(tmp_path / "nothing")
    path = trained_lookup.save(tmp_path / "index")
    (path / "weights.pt").write_bytes(b"not a torch file")
    with pytest.raises(UnsupportedFileError, match="damaged"):
        AtlasLookup.load(path)


def test_save_refuses_a_folder_of_other_files(trained_lookup, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(UnsupportedFileError, match="did not write"):
        trained_lookup.save(target)
    assert (target / "notes.txt").read_text() == "keep me"


# -- series --------------------------------------------------------------------------------------


def _noisy_rankings(truth, n_plates, seed, wrong=0.35, k=5):
    """Rankings of nearby plates by a noisy distance to the truth; at times a far plate comes first."""
    rng = np.random.default_rng(seed)
    rankings = []
    for t in truth:
        near = np.clip(np.arange(t - 4, t + 5), 0, n_plates - 1)
        score = np.abs(near - t) + rng.normal(0, 0.8, len(near))
        ordered = [int(p) for p in near[np.argsort(score)]]
        if rng.random() < wrong:
            ordered = [int(rng.integers(n_plates))] + ordered
        ordered = list(dict.fromkeys(ordered))[:k]
        rankings.append([(p, 0.1 * (r + 1)) for r, p in enumerate(ordered)])
    return rankings


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("direction", [1, -1])
def test_series_smoothing_gives_monotonic_evenly_spaced_picks(seed, direction):
    n_plates = 130
    truth = np.arange(10, 110, 4)[::direction]
    rankings = _noisy_rankings(truth, n_plates, seed)
    out = smooth_series(rankings, n_plates)
    picks = np.array(out["picks"])
    steps = np.diff(picks) * direction
    assert np.all(steps >= 0)
    assert out["direction"] == ("increasing" if direction > 0 else "decreasing")
    assert abs(out["step"] - 4 * direction) < 0.5
    top1 = np.array([r[0][0] for r in rankings])
    assert np.mean(np.abs(picks - truth)) < 0.5 * np.mean(np.abs(top1 - truth))
    assert np.mean(np.abs(picks - truth)) <= 1.0
    assert out["rankings"] is rankings


def test_series_single_section_keeps_its_best_plate():
    out = smooth_series([[(7, 0.1), (8, 0.2)]], 20)
    assert out["picks"] == [7]


def test_lookup_series_on_a_cut_series(trained_lookup, toy_reference):
    reference, _ = toy_reference
    rng = np.random.default_rng(4)
    truth = np.arange(4, 36, 3)
    sections = []
    for t in truth:
        image = section_from_atlas(
            reference, float(t), tuple(rng.uniform(-6, 6, 2)), crop=(0.0, 0.2, 0.0, 0.0)
        )
        sections.append(np.clip(image + rng.normal(0, 0.05, image.shape), 0, 1).astype(np.float32))
    for series in (sections, sections[::-1]):
        out = trained_lookup.lookup_series(series, top=5)
        steps = np.diff(out["picks"]) * (1 if out["direction"] == "increasing" else -1)
        assert np.all(steps >= 0)  # monotonic whatever the rankings
        assert out["rankings"] == trained_lookup.lookup_many(series, top=5)
        assert all(len(r) == 5 for r in out["rankings"])


def test_lookup_series_follows_the_cutting_order(trained_lookup, toy_reference):
    reference, _ = toy_reference
    truth = np.arange(3, 37, 3)
    sections = [section_from_atlas(reference, float(t), 2.0) for t in truth]
    forward = trained_lookup.lookup_series(sections, top=5)
    assert forward["direction"] == "increasing" and np.all(np.diff(forward["picks"]) >= 0)
    best = np.array([r[0][0] for r in forward["rankings"]])
    assert np.mean(np.abs(np.array(forward["picks"]) - truth)) <= np.mean(np.abs(best - truth)) + 0.5
    backward = trained_lookup.lookup_series(sections[::-1], top=5)
    assert backward["direction"] == "decreasing" and np.all(np.diff(backward["picks"]) <= 0)


# -- brainglobe (faked: the extra is optional and nothing is downloaded in tests) ---------------


def test_from_brainglobe_without_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "brainglobe_atlasapi", None)
    with pytest.raises(InputError, match=r'pip install "napari-nephi\[brainglobe\]"'):
        AtlasLookup.from_brainglobe("allen_mouse_25um")


def _fake_brainglobe(monkeypatch, tmp_path, cached: list[str], atlas=None):
    api = types.ModuleType("brainglobe_atlasapi")
    config = types.ModuleType("brainglobe_atlasapi.config")
    config.get_brainglobe_dir = lambda: tmp_path / "brainglobe"
    listing = types.ModuleType("brainglobe_atlasapi.list_atlases")
    listing.get_downloaded_atlases = lambda: list(cached)
    calls = []

    class BrainGlobeAtlas:
        def __init__(self, name, check_latest=True):
            calls.append((name, check_latest))
            self.reference, self.annotation = atlas
            self.structures = {7: {"name": "Hippocampal region"}, 10: {"name": "Cerebellum"}}

    api.BrainGlobeAtlas = BrainGlobeAtlas
    monkeypatch.setitem(sys.modules, "brainglobe_atlasapi", api)
    monkeypatch.setitem(sys.modules, "brainglobe_atlasapi.config", config)
    monkeypatch.setitem(sys.modules, "brainglobe_atlasapi.list_atlases", listing)
    monkeypatch.setattr("pathlib.Path.home", lambda: tmp_path / "home")
    return calls


def test_from_brainglobe_not_cached_says_how_to_download(monkeypatch, tmp_path):
    calls = _fake_brainglobe(monkeypatch, tmp_path, cached=[])
    with pytest.raises(InputError, match="brainglobe install -a allen_mouse_25um"):
        AtlasLookup.from_brainglobe("allen_mouse_25um")
    assert calls == []  # the atlas class (which would download) is never made


def test_from_brainglobe_uses_the_cache_and_structure_names(monkeypatch, tmp_path):
    atlas = toy_atlas((16, 32, 32), seed=1)
    calls = _fake_brainglobe(monkeypatch, tmp_path, cached=["toy_mouse_50um"], atlas=atlas)
    lk = AtlasLookup.from_brainglobe(
        "toy_mouse_50um", device="cpu", steps=2, input_size=32, widths=(4, 8), validation_size=4
    )
    assert calls == [("toy_mouse_50um", False)]
    assert lk.n_plates == 16 and lk.region_name(10) == "Cerebellum" and lk.region_name(3) == "region 3"
    np.testing.assert_array_equal(lk.plate_labels(8), atlas[1][8])


def test_lookup_with_rerank_ranks_every_plate_by_the_pose_search(trained_lookup, toy_reference):
    reference, _ = toy_reference
    section = section_from_atlas(reference, 21.0, (5.0, 0.0), crop=(0, 0, 0, 0.4))
    result = trained_lookup.search_poses(section)
    ranking = trained_lookup.lookup(section, top=None, rerank=True)
    assert ranking == result.ranking
    assert sorted(p for p, _ in ranking) == list(range(trained_lookup.n_plates))
    dist = np.array([d for _, d in ranking])
    assert np.all(np.diff(dist) >= 0)
    assert abs(ranking[0][0] - 21) <= 1
    # distance of every plate: 1 - best (pose score - prior of its plate - penalty * plates between)
    from napari_nephi.engines.atlas.rerank import DEFAULTS, _prior

    penalty, reach = DEFAULTS["plate_penalty"], DEFAULTS["penalty_reach"]
    prior = DEFAULTS["prior_weight"] * _prior(trained_lookup.search_order(section), trained_lookup.n_plates)

    def value(pose, plate):
        return pose.score - prior[pose.plate] - penalty * min(abs(plate - pose.z), reach)

    poses = list(result.poses.values())  # the best pose of each plate reached
    # plain_reach: the plates next to the best pose are spaced from the best distance by the scores
    # without the outside band instead (rerank._plain_near_best): they only lie at or after the first
    lead = max(poses, key=lambda p: p.score - prior[p.plate])
    near = {lead.plate} | {
        q for q in range(trained_lookup.n_plates) if abs(q - lead.z) <= DEFAULTS["plain_reach"]
    }
    for plate, d in ranking:
        if result.plain_ranked and plate in near:
            assert d >= ranking[0][1]
            continue
        assert d <= 1.0 - max(value(p, plate) for p in poses) + 1e-6
    # a plate's other poses lie within half a plate of its best: at most a penalty apart
    top = 1.0 - max(value(p, ranking[0][0]) for p in poses)
    assert top - penalty - 1e-6 <= ranking[0][1] <= top + 1e-6
    assert trained_lookup.lookup(section, top=3, rerank=True) == ranking[:3]
    many = trained_lookup.lookup_many([section], top=3, rerank=True)
    assert many == [ranking[:3]]


def test_rerank_default_and_bad_values(trained_lookup, toy_reference):
    reference, _ = toy_reference
    section = section_from_atlas(reference, 10.0)
    fresh = AtlasLookup(
        trained_lookup.net, trained_lookup.plates, trained_lookup.embeddings, trained_lookup.settings
    )
    assert fresh.rerank_default is True  # re-ranking by pose is the default
    assert fresh.lookup(section, top=3) == fresh.lookup(section, top=3, rerank=True)
    assert trained_lookup.lookup(section, top=3) == trained_lookup.lookup(section, top=3, rerank=False)
    with pytest.raises(InputError, match="rerank must be True, False or None"):
        trained_lookup.lookup(section, rerank="yes")
    with pytest.raises(InputError, match="tilt"):
        trained_lookup.lookup(section, rerank=True, rerank_options={"tilt": 3})
    with pytest.raises(InputError, match="tilt"):  # checked even when not re-ranking
        trained_lookup.lookup(section, rerank=False, rerank_options={"tilt": 3})
    from napari_nephi import Cancelled

    with pytest.raises(Cancelled):
        trained_lookup.search_poses(section, cancel=lambda: True)


def test_train_with_sections_given_as_arrays(toy_reference):
    """Real sections and their plates as numpy arrays (a stack and an index array) train an index."""
    reference, labels = toy_reference
    lk = AtlasLookup.train(
        reference,
        labels,
        sections=reference[3:5],
        section_plates=np.array([3, 4]),
        device="cpu",
        steps=2,
        input_size=32,
        widths=(4, 8),
        validation_size=4,
    )
    assert lk.settings["real_sections"] == 2
    assert len(lk.lookup(reference[3], top=3, rerank=False)) == 3


def test_search_order_is_public_and_is_the_order_the_pose_search_starts_from(trained_lookup, toy_reference):
    """Session 40 (C): ``AtlasLookup.search_order`` (public; the benchmarks called the private
    ``_search_order``) gives every plate once, is deterministic, and the pose search run from it gives
    ``search_poses``' ranking bit for bit."""
    from napari_nephi.engines.atlas.rerank import PoseSearch, check_rerank_options

    reference, _ = toy_reference
    section = section_from_atlas(reference, 12.0, (3.0, -2.0), crop=(0.2, 0, 0, 0))
    order = trained_lookup.search_order(section)
    assert sorted(p for p, _ in order) == list(range(trained_lookup.n_plates))
    assert all(isinstance(p, int) and isinstance(d, float) for p, d in order)
    assert trained_lookup.search_order(section) == order
    found = PoseSearch(trained_lookup.plates).search(section, order, check_rerank_options(None))
    assert found.ranking == trained_lookup.search_poses(section).ranking
    with pytest.raises(InputError, match="No section given"):
        trained_lookup.search_order(None)
