"""Training the atlas index: options, determinism, progress, cancel, time budget, real sections."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_nephi import AtlasLookup, Cancelled, InputError
from napari_nephi.engines.atlas.preprocess import prepare_batch
from napari_nephi.engines.atlas.train import WARMUP, lr_factor, run_progress, true_plate_ranks
from napari_nephi.synthetic.atlas import section_from_atlas, toy_atlas

#: A tiny network and a few steps: these tests check the loop, not the accuracy.
TINY = {
    "input_size": 32,
    "widths": (4, 8),
    "embedding_dim": 8,
    "steps": 4,
    "batch_plates": 4,
    "views_per_plate": 1,
    "validate_every": 2,
    "validation_size": 6,
}


@pytest.fixture(scope="module")
def small_atlas():
    reference, labels = toy_atlas((16, 32, 32), seed=3)
    return reference[2:14], labels[2:14]


def test_trained_index_ranks_far_better_than_chance(trained_lookup):
    # mean 0-based rank of the true plate on the held-out validation sections; chance is (n - 1) / 2
    assert trained_lookup.settings["val_mean_rank"] < 0.75 * (trained_lookup.n_plates - 1) / 2
    assert 1 <= trained_lookup.settings["best_step"] <= 300


def test_true_plate_ranks_by_hand():
    plates = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    query = np.array([[0.9, 0.0], [2.9, 0.0], [0.1, 0.0]])
    np.testing.assert_array_equal(true_plate_ranks(query, plates, np.array([1, 1, 2])), [0, 1, 2])


def test_same_seed_same_index_other_seed_another(small_atlas):
    reference, labels = small_atlas
    a = AtlasLookup.train(reference, labels, device="cpu", seed=3, **TINY)
    b = AtlasLookup.train(reference, labels, device="cpu", seed=3, **TINY)
    c = AtlasLookup.train(reference, labels, device="cpu", seed=4, **TINY)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    assert not np.allclose(a.embeddings, c.embeddings)


def test_ordinal_loss_mirror_and_framed_partial_options_change_the_index(small_atlas):
    reference, labels = small_atlas
    plain = AtlasLookup.train(reference, labels, device="cpu", seed=3, **TINY, ordinal=0.0)
    ordinal = AtlasLookup.train(reference, labels, device="cpu", seed=3, **TINY, ordinal=2.0)
    assert not np.allclose(plain.embeddings, ordinal.embeddings)  # the ordinal term trains the net
    mirror = AtlasLookup.train(reference, labels, device="cpu", seed=3, **TINY)  # the default
    framed = AtlasLookup.train(reference, labels, device="cpu", seed=3, **TINY, framed_partial=True)
    assert framed.settings["options"]["framed_partial"] and not mirror.settings["options"]["framed_partial"]
    assert not np.allclose(mirror.embeddings, framed.embeddings)  # its partial views were framed
    half = AtlasLookup.train(reference, labels, device="cpu", seed=3, **TINY, framed_partial=0.5)
    assert half.settings["options"]["framed_partial"] == 0.5
    assert not np.allclose(half.embeddings, framed.embeddings)  # half of them were framed
    single = AtlasLookup.train(reference, labels, device="cpu", seed=3, **TINY, mirror=False)
    assert mirror.mirror and not single.mirror
    x = prepare_batch([reference[5]], TINY["input_size"])
    with torch.no_grad():
        np.testing.assert_allclose(single.embed([reference[5]]), single.net(x).numpy(), atol=1e-5)
    section = section_from_atlas(reference, 5.0, 3.0, crop=(0, 0, 0.3, 0))
    # a mirror index embeds a section as the normalised sum of it and its mirror image
    x = prepare_batch([section], TINY["input_size"])
    with torch.no_grad():
        expected = (mirror.net(x) + mirror.net(x.flip(-1))).numpy()
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(mirror.embed([section]), expected, atol=1e-5)
    assert mirror.lookup(section, top=3) == mirror.lookup(section.copy(), top=3)


@pytest.fixture(scope="module")
def toy_plates_aspect():
    """The 40-plate toy reference and its plates' aspect (framing.atlas_aspect at input size 64)."""
    from napari_nephi.engines.atlas.framing import atlas_aspect
    from napari_nephi.engines.atlas.plates import Plates

    reference, labels = toy_atlas((40, 64, 64), seed=0)
    return reference, atlas_aspect(Plates.from_reference(reference, labels), 64)


@pytest.mark.parametrize(
    "cut, at",
    [
        ((slice(None), slice(36, None)), (0.5, 0.0)),  # the right side cut away: tissue at the left
        ((slice(None), slice(0, 28)), (0.5, 1.0)),
        ((slice(38, None), slice(None)), (0.0, 0.5)),  # the bottom cut away: tissue at the top
        ((slice(0, 26), slice(None)), (1.0, 0.5)),
    ],
)
@pytest.mark.parametrize("flip", [False, True])
def test_framed_partial_frames_a_cut_section_where_its_tissue_sat(toy_plates_aspect, cut, at, flip):
    """framed_partial: a partial training view gets the lookup's framing (framing.framing_specs) that
    puts its tissue where it lay on the whole plate; a mirrored section (its atlas coordinates
    mirrored with it) the mirrored framing."""
    from types import SimpleNamespace

    from napari_nephi.engines.atlas.framing import framing_specs
    from napari_nephi.engines.atlas.preprocess import (
        framed_input_geometry,
        prepare_input_geometry,
        tissue_crop,
    )
    from napari_nephi.engines.atlas.train import _framed_partial

    reference, aspect = toy_plates_aspect
    size, plate = 64, 20
    image = reference[plate].copy()
    image[cut] = np.median(image[:3, :3])  # the background
    h, w = image.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    coords = np.stack([np.full((h, w), plate, np.float32), yy, xx])
    if flip:
        image, coords, at = image[:, ::-1].copy(), coords[:, :, ::-1].copy(), (at[0], 1.0 - at[1])
    section = SimpleNamespace(image=image, coords=coords, params={"partial": "side", "flip": flip})
    out, geometry = _framed_partial(section, size, aspect, prepare_input_geometry(reference[plate], size)[1])
    tc = tissue_crop(image, size)
    box = [b for b, a in framing_specs(tc.image.shape, aspect) if a == at]
    assert len(box) == 1  # the framing exists for this crop's shape
    expected, expected_geometry = framed_input_geometry(tc, size, box[0], at)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(geometry.mask, expected_geometry.mask)


@pytest.mark.parametrize("draw, framed", [(0.3, True), (0.7, False)])
def test_framed_partial_share_frames_that_share_of_partial_views(toy_plates_aspect, draw, framed):
    """framed_partial=0.5: a partial view is framed when the batch generator's draw falls below the
    share, else kept centred as by default; a whole view is never framed (and draws nothing)."""
    from types import SimpleNamespace

    from napari_nephi.engines.atlas.preprocess import prepare_input_geometry
    from napari_nephi.engines.atlas.train import _framed_partial, _view_with_truth

    reference, aspect = toy_plates_aspect
    size, plate = 64, 20
    image = reference[plate].copy()
    image[:, 36:] = np.median(image[:3, :3])  # the right side cut away
    h, w = image.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    coords = np.stack([np.full((h, w), plate, np.float32), yy, xx])
    params = {"partial": "side", "flip": False}
    section = SimpleNamespace(image=image, coords=coords, params=params)
    synth = SimpleNamespace(sample_with_truth=lambda p, labels: section)
    geometries = {plate: prepare_input_geometry(reference[plate], size)[1]}
    rng = SimpleNamespace(random=lambda: draw)
    out, _ = _view_with_truth(synth, plate, size, (aspect, geometries, 0.5), rng)
    expected = (
        _framed_partial(section, size, aspect, geometries[plate])[0]
        if framed
        else prepare_input_geometry(image, size)[0]
    )
    np.testing.assert_array_equal(out, expected)
    assert framed == (not np.array_equal(out, prepare_input_geometry(image, size)[0]))
    params["partial"] = None  # a whole view: centred whatever the draw, and no draw is made
    out, _ = _view_with_truth(synth, plate, size, (aspect, geometries, 0.5), None)
    np.testing.assert_array_equal(out, prepare_input_geometry(image, size)[0])


def test_progress_reports_every_step_with_loss_and_validation(small_atlas):
    events = []
    AtlasLookup.train(*small_atlas, device="cpu", progress=events.append, **TINY)
    assert [e.step for e in events] == [1, 2, 3, 4] and all(e.total == 4 for e in events)
    assert all(np.isfinite(e.loss) and e.loss >= 0 for e in events)
    assert events[0].extra["val_mean_rank"] is None
    assert all(0 <= e.extra["val_mean_rank"] <= 11 for e in events[1:])


def test_cancel_stops_training_and_writes_nothing(small_atlas, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    events = []

    def cancel():
        return len(events) >= 2

    with pytest.raises(Cancelled):
        AtlasLookup.train(*small_atlas, device="cpu", progress=events.append, cancel=cancel, **TINY)
    assert len(events) == 2
    assert list(tmp_path.iterdir()) == []


def test_time_budget_stops_early(small_atlas):
    lk = AtlasLookup.train(*small_atlas, device="cpu", **{**TINY, "steps": 1000, "max_minutes": 1e-5})
    assert lk.settings["stopped"] == "max_minutes"
    assert lk.settings["steps_done"] < 1000
    assert lk.settings["val_mean_rank"] is not None  # validated on the last step before stopping


def test_contrastive_loss_step_decay_and_plate_views(small_atlas):
    lk = AtlasLookup.train(
        *small_atlas,
        device="cpu",
        loss="contrastive",
        lr_decay="step",
        plate_views=2,
        augment="paper",
        **TINY,
    )
    assert lk.settings["options"]["margin"] == 1.0
    np.testing.assert_allclose(np.linalg.norm(lk.embeddings, axis=1), 1.0, atol=1e-5)


def test_proxy_loss_trains_its_proxies(small_atlas):
    from napari_nephi.engines.atlas.plates import Plates
    from napari_nephi.engines.atlas.train import check_train_options, train_network

    reference, labels = small_atlas
    plates = Plates.from_reference(reference, labels)
    options = check_train_options({**TINY, "loss": "proxy"})
    result = train_network(plates, options, device="cpu", seed=2)
    assert result.proxies.shape == (12, TINY["embedding_dim"])
    np.testing.assert_allclose(np.linalg.norm(result.proxies, axis=1), 1.0, atol=1e-5)
    # the proxies moved from their random start: the same seed and the triplet loss give other weights
    triplet = train_network(plates, check_train_options(TINY), device="cpu", seed=2)
    assert triplet.proxies is None
    assert not torch.allclose(result.net.head[-1].weight, triplet.net.head[-1].weight)
    lk = AtlasLookup.train(reference, labels, device="cpu", seed=2, loss="proxy", **TINY)
    assert sorted(p for p, _ in lk.lookup(reference[4], top=None, rerank=False)) == list(range(12))


def test_training_runs_on_its_threads_and_restores_them(small_atlas):
    seen = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        AtlasLookup.train(
            *small_atlas, device="cpu", progress=lambda e: seen.append(torch.get_num_threads()), **TINY
        )
        assert set(seen) == {1} and torch.get_num_threads() == 2  # the default: one thread, then restored
        seen.clear()
        AtlasLookup.train(
            *small_atlas,
            device="cpu",
            progress=lambda e: seen.append(torch.get_num_threads()),
            threads=0,
            **TINY,
        )
        assert set(seen) == {2}  # 0: the process's own setting
    finally:
        torch.set_num_threads(before)


def test_real_sections_join_training(small_atlas):
    reference, labels = small_atlas
    sections = [section_from_atlas(reference, i, 4.0, crop=(0.2, 0, 0, 0)) for i in (2, 6, 9)]
    lk = AtlasLookup.train(
        reference, labels, device="cpu", sections=sections, section_plates=[2, 6, 9], **TINY
    )
    assert lk.settings["real_sections"] == 3
    with pytest.raises(InputError, match="one plate index per section"):
        AtlasLookup.train(reference, device="cpu", sections=sections, section_plates=[2, 6], **TINY)
    with pytest.raises(InputError, match="section_plates"):
        AtlasLookup.train(reference, device="cpu", sections=sections, **TINY)
    with pytest.raises(InputError, match="at most 11"):
        AtlasLookup.train(reference, device="cpu", sections=sections[:1], section_plates=[12], **TINY)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"stepz": 3}, "did you mean 'steps'"),
        ({"loss": "hinge"}, "loss must be one of"),
        ({"mining": "easy"}, "mining must be one of"),
        ({"margin": -1.0}, "margin must be greater than 0"),
        ({"steps": 0}, "steps must be at least 1"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"widths": (4,) * 7}, "1 to 6 stage widths"),
        ({"augment": "heavy"}, "augment must be one of"),
        ({"ordinal": -0.5}, "ordinal must be at least 0"),
        ({"ordinal_reach": 0}, "ordinal_reach must be at least 1"),
        ({"mirror": "yes"}, "mirror must be"),
        ({"framed_partial": "yes"}, "framed_partial must be True, False or the share"),
        ({"framed_partial": 1.5}, "framed_partial must be True, False or the share"),
        ({"loss": "proxy", "proxy_sigma": -1}, "proxy_sigma must be at least 0"),
        ({"threads": -1}, "threads must be at least 0"),
        ({"loss": "proxy", "proxy_scale": 0}, "proxy_scale must be greater than 0"),
        ({"region_names": ["cortex"]}, "region_names must be a dict"),
    ],
)
def test_bad_options_raise_before_training(small_atlas, options, match):
    with pytest.raises(InputError, match=match):
        AtlasLookup.train(*small_atlas, device="cpu", **options)


def test_bad_atlases(small_atlas):
    reference, _ = small_atlas
    with pytest.raises(InputError, match="at least 2 plates"):
        AtlasLookup.train(reference[:1], device="cpu", **TINY)
    blank = reference.copy()
    blank[[3, 4, 7]] = 0
    with pytest.raises(InputError, match="Plates 3-4, 7 show no tissue"):
        AtlasLookup.train(blank, device="cpu", **TINY)
    assert reference[3].max() > 0  # the input was not modified
    with pytest.raises(InputError, match="Unknown device"):
        AtlasLookup.train(reference, device="tpu", **TINY)


def test_plates_of_different_shapes(small_atlas, tmp_path):
    reference, labels = small_atlas
    plates = [reference[i][: 24 + i, :] for i in range(8)]
    lk = AtlasLookup.train(plates, [labels[i][: 24 + i, :] for i in range(8)], device="cpu", **TINY)
    assert lk.n_plates == 8 and lk.plate_image(5).shape == (29, 32)
    ranking = lk.lookup(plates[5], top=None, rerank=False)
    assert sorted(p for p, _ in ranking) == list(range(8))
    assert lk.lookup(plates[5], top=1)[0][0] == 5  # the pose search (default) finds a plate itself
    loaded = AtlasLookup.load(lk.save(tmp_path / "index"))
    assert loaded.plates.volume is None and loaded.plate_image(5).shape == (29, 32)
    np.testing.assert_array_equal(loaded.plate_labels(6), labels[6][:30])
    assert loaded.lookup(plates[5], top=None, rerank=False) == ranking
    assert loaded.lookup(plates[5], top=1)[0][0] == 5


def test_learning_rate_schedule_by_hand():
    assert lr_factor(0.0) == pytest.approx(1e-3 / WARMUP)
    assert lr_factor(WARMUP / 2) == pytest.approx(0.5)
    assert lr_factor(WARMUP) == pytest.approx(1.0)
    assert lr_factor(WARMUP + (1 - WARMUP) / 2) == pytest.approx(0.5)
    assert lr_factor(1.0) == pytest.approx(0.0, abs=1e-12) and lr_factor(3.0) == lr_factor(1.0)
    assert [lr_factor(p, "step") for p in (0.1, 0.7, 0.9)] == [1.0, 0.1, 0.01]
    assert run_progress(50, 100, 10.0, 100.0) == 0.5  # steps ahead of the clock
    assert run_progress(10, 100, 60.0, 100.0) == 0.6  # a slow machine: the clock leads


def test_slow_run_anneals_within_its_time_budget(small_atlas):
    """When the steps cannot all be done in ``max_minutes``, the learning rate still decays to ~0
    by the end of the budget (a slow machine converges instead of stopping at a high rate)."""
    # 3 s (9 s until session 42; 73 steps here at load 9, the last one at lr 0 as with 175)
    lk = AtlasLookup.train(*small_atlas, device="cpu", **{**TINY, "steps": 10**6, "max_minutes": 0.05})
    history = lk.settings["history"]
    assert lk.settings["stopped"] == "max_minutes" and 2 < len(history) < 10**6
    lrs = np.array([h["lr"] for h in history])
    assert lrs.max() > 0.5 * lk.settings["options"]["lr"]  # it went through the full rate
    assert lrs[-1] < 0.02 * lk.settings["options"]["lr"]  # and ended annealed
    steps = AtlasLookup.train(*small_atlas, device="cpu", **TINY).settings["history"]
    assert [h["step"] for h in steps] == [1, 2, 3, 4] and steps[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
