"""Stage 2's joint tilt grid shared within a region (session 44, ``rerank_options={"tilt_share": k}``; 1 by
default since the lead's held-out reading, None: every hypothesis cuts its own joint grid, the search before):
a hypothesis whose untilted best lies within ``k`` plates of a better one's starts its finer grid from the
tilt that one's joint grid found."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from napari_nephi import InputError
from napari_nephi.engines.atlas import rerank
from napari_nephi.engines.atlas.plates import Plates
from napari_nephi.engines.atlas.rerank import DEFAULTS, PoseSearch, _leaders, check_rerank_options
from napari_nephi.synthetic.atlas import section_from_atlas


def test_one_by_default_recorded_and_bad_values_refused():
    assert DEFAULTS["tilt_share"] == 1  # since session 44 (held out: docs/prereg/s44_lead_C.txt)
    assert check_rerank_options({})["tilt_share"] == 1
    # the default steps aside where the joint grid is not cut whole; given with them, it is refused below
    assert check_rerank_options({"tilt_climb": True})["tilt_share"] is None
    assert check_rerank_options({"tilt_search": "sequential"})["tilt_share"] is None
    assert check_rerank_options({"tilt_share": None})["tilt_share"] is None
    assert check_rerank_options({"tilt_share": 1})["tilt_share"] == 1
    for bad in (-1, 1.5, "one", 1001):
        with pytest.raises(InputError, match="tilt_share"):
            check_rerank_options({"tilt_share": bad})
    with pytest.raises(InputError, match="tilt_climb"):  # the climb replaces the grid it shares
        check_rerank_options({"tilt_share": 1, "tilt_climb": True})
    with pytest.raises(InputError, match="tilt_search"):
        check_rerank_options({"tilt_share": 1, "tilt_search": "sequential"})


def test_leaders_by_hand():
    def poses(*pairs):
        return [SimpleNamespace(plate=p, score=s) for p, s in pairs]

    # 20 leads; 21 follows it; 23 lies 3 from 20: its own leader at reach 1 and 2, 20's at 3
    bests = poses((21, 0.5), (20, 0.6), (23, 0.4), (40, 0.55))
    assert _leaders(bests, 1) == [1, 1, 2, 3]
    assert _leaders(bests, 3) == [1, 1, 1, 3]
    assert _leaders(bests, 0) == [0, 1, 2, 3]
    assert _leaders(bests, 1000) == [1, 1, 1, 1]
    # ties: the first in the list leads; a pose near two leaders follows the better one
    assert _leaders(poses((10, 0.5), (11, 0.5)), 1) == [0, 0]
    assert _leaders(poses((10, 0.6), (14, 0.5), (12, 0.4)), 2) == [0, 1, 0]


@pytest.fixture(scope="module")
def toy(toy_reference):
    reference, labels = toy_reference
    plates = Plates.from_reference(reference, labels)
    section = section_from_atlas(reference, 20, (12.0, 6.0))
    return plates, section, [(p, 0.0) for p in range(plates.n)]


#: The default search of the toy section below in the frozen tree of 189fa38 (before tilt_share; review 1 of
#: session 44, C2): ``PYTHONPATH=/tmp/f44/src`` (``git worktree add /tmp/f44 189fa38``), the volume and
#: the list of 2D plates of ``toy_atlas((40, 64, 64), seed=0)``, the section
#: ``section_from_atlas(reference, 20, (12.0, 6.0))``, the order ``[(p, 0.0) for p in range(40)]``:
#: ``ranking[:5]``, ``pairs``, ``stage1_pairs``, ``poses[20]``'s score and tilt, printed with ``repr``.
FROZEN = {
    "volume": (
        [
            (20, 0.22259122133255005),
            (19, 0.22759122133255005),
            (21, 0.22759122133255005),
            (18, 0.23259122133255006),
            (22, 0.23259122133255006),
        ],
        825,
        555,
        0.77740877866745,
        (9.0, 6.0),
    ),
    "list": (
        [
            (20, 0.3615546226501465),
            (19, 0.3665546226501465),
            (21, 0.3665546226501465),
            (18, 0.3715546226501465),
            (22, 0.3715546226501465),
        ],
        682,
        555,
        0.6384453773498535,
        (0.0, 0.0),
    ),
}


@pytest.mark.parametrize("kind", ["volume", "list"])
@pytest.mark.parametrize("options", [{"tilt_share": None}])
def test_off_is_the_frozen_default_search_bit_for_bit(toy, toy_reference, kind, options):
    plates, section, order = toy
    if kind == "list":
        reference, labels = toy_reference
        plates = Plates(list(reference), list(labels))
    found = PoseSearch(plates).search(section, order, check_rerank_options(options))
    ranking, pairs, stage1, score, tilt = FROZEN[kind]
    assert found.ranking[:5] == ranking
    assert (found.pairs, found.stage1_pairs) == (pairs, stage1)
    assert (found.poses[20].score, found.poses[20].tilt) == (score, tilt)
    assert found.tilts_shared == 0


def test_followers_skip_their_joint_grid_and_keep_the_truth(toy, monkeypatch):
    plates, section, order = toy
    grids = []
    tilted = rerank._Refine.tilted

    def spy(self, best, shared=None):
        grids.append(shared)
        return tilted(self, best, shared)

    monkeypatch.setattr(rerank._Refine, "tilted", spy)
    off = PoseSearch(plates).search(section, order, check_rerank_options({"tilt_share": None}))
    own = len(grids)
    assert own >= 3 and all(s is None for s in grids)  # every hypothesis its own joint grid
    grids.clear()
    on = PoseSearch(plates).search(section, order, check_rerank_options({"tilt_share": 1000}))
    # one region leads (its own grid), every other hypothesis starts from that grid's tilt
    assert len(grids) == own and grids[0] is None
    assert on.tilts_shared == own - 1 and all(s is not None for s in grids[1:])
    assert len({s for s in grids[1:]}) == 1
    # 24 joint cuts less per follower, at most 9 more (the shared tilt and its 8 neighbours at three
    # plate offsets are finer-grid cuts either way): fewer pairs in stage 2, the same stage 1
    assert on.stage1_pairs == off.stage1_pairs
    assert on.pairs - on.stage1_pairs < off.pairs - off.stage1_pairs
    assert on.ranking[0][0] == off.ranking[0][0] == 20
    assert on.options["tilt_share"] == 1000 and off.options["tilt_share"] is None


def test_the_widening_pass_shares_and_counts_too(toy):
    plates, section, order = toy
    once = PoseSearch(plates).search(section, order, check_rerank_options({"tilt_share": 1000}))
    wide = {"tilt_share": 1000, "widen_score": 0.99}  # no pose scores that: the second pass always runs
    found = PoseSearch(plates).search(section, order, check_rerank_options(wide))
    assert found.widened and not once.widened
    assert found.tilts_shared > once.tilts_shared > 0  # the second pass's followers counted (review 1, C5)
