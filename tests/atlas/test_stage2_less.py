"""Stage 2 with less work (session 45, opt-in): ``share_finer_reach`` (the plate offsets of a ``tilt_share``
follower's finer grid: 0, its own plate only) and ``untilted_reach`` (plates each side of a hypothesis in
the untilted step). None by default, and then the search is the one before bit for bit."""

from __future__ import annotations

import pytest

from napari_nephi import InputError
from napari_nephi.engines.atlas import pose_grid, rerank
from napari_nephi.engines.atlas.rerank import DEFAULTS, PoseSearch, check_rerank_options

from .test_tilt_share import toy  # noqa: F401 (the fixture: the toy atlas cut at plate 20, tilted)


def test_off_by_default_recorded_and_bad_values_refused():
    assert DEFAULTS["share_finer_reach"] is None and DEFAULTS["untilted_reach"] is None
    assert check_rerank_options({"share_finer_reach": 0})["share_finer_reach"] == 0
    assert check_rerank_options({"untilted_reach": 1})["untilted_reach"] == 1
    for bad in (-1, 2, 0.5, "none"):
        with pytest.raises(InputError, match="share_finer_reach"):
            check_rerank_options({"share_finer_reach": bad})
    for bad in (-1, 11, 1.5, "two"):
        with pytest.raises(InputError, match="untilted_reach"):
            check_rerank_options({"untilted_reach": bad})
    # without tilt_share no hypothesis follows: it would silently do nothing
    for off in ({"tilt_share": None}, {"tilt_climb": True}, {"tilt_search": "sequential"}):
        with pytest.raises(InputError, match="tilt_share"):
            check_rerank_options({**off, "share_finer_reach": 0})


def _same(a, b) -> None:
    assert a.ranking == b.ranking
    assert (a.pairs, a.stage1_pairs, a.tilts_shared) == (b.pairs, b.stage1_pairs, b.tilts_shared)

    def poses(found):  # each plate's best pose
        return {k: (p.score, p.z, p.tilt, p.rotation, p.scale, p.centre) for k, p in found.poses.items()}

    assert poses(a) == poses(b)


def test_the_values_of_none_are_the_search_before(toy):  # noqa: F811
    plates, section, order = toy
    base = PoseSearch(plates).search(section, order, check_rerank_options({}))
    for same in ({"share_finer_reach": 1}, {"untilted_reach": 2}):
        _same(PoseSearch(plates).search(section, order, check_rerank_options(same)), base)


def test_a_follower_cuts_its_finer_grid_at_its_own_plate_only(toy, monkeypatch):  # noqa: F811
    plates, section, order = toy
    offsets = {"lead": set(), "follow": set()}  # plate offsets of the finer grids' oblique cuts
    tilted, cuts = rerank._Refine.tilted, pose_grid.SectionGrid.oblique_cuts
    state = {}

    def spy_tilted(self, best, shared=None):
        state["who"], state["z"] = ("lead" if shared is None else "follow"), best.z
        try:
            return tilted(self, best, shared)
        finally:
            state.clear()

    def spy_cuts(self, atlas, specs, pivot, scale, aspect=1.0):
        if state and len(specs) > 1 and "seen" not in state:  # the first grid of this tilt search
            state["seen"] = True  # (the joint grid's cuts lie at offset 0; a second round's grid is
            offsets[state["who"]].update(round(z - state["z"], 6) for z, _ in specs)  # centred elsewhere)
        return cuts(self, atlas, specs, pivot, scale, aspect)

    monkeypatch.setattr(rerank._Refine, "tilted", spy_tilted)
    monkeypatch.setattr(pose_grid.SectionGrid, "oblique_cuts", spy_cuts)
    # every hypothesis but the best region's leader follows, and every finer grid runs
    wide = {"tilt_share": 1000, "finer_margin": None}
    before = PoseSearch(plates).search(section, order, check_rerank_options(wide))
    assert offsets["follow"] == {-1.0, 0.0, 1.0}
    offsets["follow"].clear()
    offsets["lead"].clear()
    after = PoseSearch(plates).search(section, order, check_rerank_options({**wide, "share_finer_reach": 0}))
    assert offsets["follow"] == {0.0}  # the follower's first finer grid at its own plate only
    assert offsets["lead"] == {0.0}  # the leader's first grid is its joint grid (offset 0)
    assert after.tilts_shared == before.tilts_shared > 0
    assert after.stage1_pairs == before.stage1_pairs
    # each follower scores at most 9 tilts at one offset instead of three: 18 pairs fewer or so
    assert before.pairs - after.pairs >= 9 * after.tilts_shared
    assert after.ranking[0][0] == before.ranking[0][0] == 20
    assert after.options["share_finer_reach"] == 0


def test_untilted_reach_cuts_fewer_plates_per_hypothesis(toy, monkeypatch):  # noqa: F811
    plates, section, order = toy
    calls = []  # per untilted step: its hypothesis's plate and the plate offsets of the cuts it asked
    untilted, plate_cut = rerank._Refine.untilted, pose_grid.SectionGrid.plate_cut

    def spy_untilted(self, hyp):
        calls.append((hyp.plate, []))
        return untilted(self, hyp)

    def spy_plate_cut(self, atlas, z, scale, pivot=None, aspect=1.0):
        if calls and pivot is not None:
            calls[-1][1].append(int(z) - calls[-1][0])
        return plate_cut(self, atlas, z, scale, pivot, aspect)

    def expected(reach):  # three scales on every plate within reach (inside the atlas)
        return [sorted(3 * [d for d in range(-reach, reach + 1) if 0 <= z + d < plates.n]) for z, _ in calls]

    monkeypatch.setattr(rerank._Refine, "untilted", spy_untilted)
    monkeypatch.setattr(pose_grid.SectionGrid, "plate_cut", spy_plate_cut)
    base = PoseSearch(plates).search(section, order, check_rerank_options({}))
    assert len(calls) >= 3 and [sorted(d) for _, d in calls] == expected(2)
    calls.clear()
    one = PoseSearch(plates).search(section, order, check_rerank_options({"untilted_reach": 1}))
    assert len(calls) >= 3 and [sorted(d) for _, d in calls] == expected(1)
    assert one.stage1_pairs == base.stage1_pairs
    assert one.pairs < base.pairs
    assert one.ranking[0][0] == base.ranking[0][0] == 20
    assert one.options["untilted_reach"] == 1


def test_untilted_scale_prune_refused_without_the_rotation_pass_and_bad_values():
    assert DEFAULTS["untilted_scale_prune"] is None
    assert check_rerank_options({"untilted_scale_prune": 0.02})["untilted_scale_prune"] == 0.02
    for bad in (-0.1, 2.5, "tight"):
        with pytest.raises(InputError, match="untilted_scale_prune"):
            check_rerank_options({"untilted_scale_prune": bad})
    with pytest.raises(InputError, match="untilted_prune"):
        check_rerank_options({"untilted_scale_prune": 0.02, "untilted_prune": None})


def test_untilted_scale_prune_cuts_the_other_scales_on_the_near_plates_only(toy, monkeypatch):  # noqa: F811
    plates, section, order = toy
    calls = []  # per untilted step: the hypothesis's scale and the (plate offset, scale) of each cut asked
    untilted, plate_cut = rerank._Refine.untilted, pose_grid.SectionGrid.plate_cut

    def spy_untilted(self, hyp):
        calls.append((hyp, []))
        return untilted(self, hyp)

    def spy_plate_cut(self, atlas, z, scale, pivot=None, aspect=1.0):
        if calls and pivot is not None:
            calls[-1][1].append((int(z) - calls[-1][0].plate, scale))
        return plate_cut(self, atlas, z, scale, pivot, aspect)

    monkeypatch.setattr(rerank._Refine, "untilted", spy_untilted)
    monkeypatch.setattr(pose_grid.SectionGrid, "plate_cut", spy_plate_cut)
    base = PoseSearch(plates).search(section, order, check_rerank_options({}))
    full = [sorted(cuts) for _, cuts in calls]
    calls.clear()
    # the widest margin: the default's cuts (in another order) on every plate but those whose cut at the
    # hypothesis's scale overlaps the section too little for any shift (scored -2, below any margin)
    PoseSearch(plates).search(section, order, check_rerank_options({"untilted_scale_prune": 2.0}))
    wide = [sorted(cuts) for _, cuts in calls]
    assert len(wide) == len(full) and all(set(w) <= set(f) for w, f in zip(wide, full, strict=True))
    assert sum(w == f for w, f in zip(wide, full, strict=True)) >= len(full) - 1
    calls.clear()
    tight = PoseSearch(plates).search(section, order, check_rerank_options({"untilted_scale_prune": 0.0}))
    for hyp, cuts in calls:
        at_own = [d for d, s in cuts if s == hyp.scale]
        others = [d for d, s in cuts if s != hyp.scale]
        assert cuts[: len(at_own)] == [(d, hyp.scale) for d in at_own]  # the hypothesis's scale first
        assert len(set(at_own)) == len(at_own) >= 3  # every plate once at its scale
        assert len(others) == 2 * len(set(others)) and set(others) < set(at_own)  # both scales, some plates
    assert sum(len(c) for _, c in calls) < sum(len(c) for c in full)
    assert tight.pairs < base.pairs and tight.stage1_pairs == base.stage1_pairs
    assert tight.ranking[0][0] == base.ranking[0][0] == 20
    assert tight.options["untilted_scale_prune"] == 0.0
