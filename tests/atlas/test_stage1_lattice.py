"""Stage 1 on every second shift first (session 46, opt-in ``stage1_lattice_margin``).

:meth:`Correlator.best_lattice` gives :meth:`Correlator.best`'s scores on the lattice of every second
shift per axis through the shift (0, 0), from the spectrum folded onto half its frequencies; the search
then scores at every shift only the pairs within the margin of their plate's lattice best. None by
default, and then the search is the one before bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_nephi import InputError
from napari_nephi.engines.atlas import pose_grid
from napari_nephi.engines.atlas.pose_grid import MIN_OVERLAP, Correlator, field
from napari_nephi.engines.atlas.rerank import DEFAULTS, PoseSearch, check_rerank_options

from .test_tilt_share import toy  # noqa: F401 (the fixture: the toy atlas cut at plate 20, tilted)

#: The default search of the toy section (``test_tilt_share.toy``) in the frozen tree of 849993e, the
#: session's base (``PYTHONPATH=/tmp/f46/src``): ``ranking[:3]``, ``pairs``, ``stage1_pairs`` and the best
#: pose's score, printed with ``repr``.
FROZEN = (
    [(20, 0.22259122133255005), (19, 0.22759122133255005), (21, 0.22759122133255005)],
    825,
    555,
    0.77740877866745,
)


def _score_map(corr: Correlator, fa, ea, na, fb, nr, outside):
    """Every searched shift's score (C, R, h, w), in float64 from one 2D inverse FFT: an independent
    reading of what :meth:`Correlator.best` maximises."""
    spec = corr._spectra(fa, fb, outside > 0, corr.ramp)
    h, w = corr.window
    num, energy, overlap, band = torch.fft.irfft2(spec, s=corr.pad)[..., :h, :w].double().unbind(2)
    ea, na = ea.double()[None, :, None, None], na.double()[None, :, None, None]
    share = overlap / na
    score = num / torch.sqrt(torch.clamp(energy, min=1e-3 * ea) * ea + 1e-12) * share.clamp(0, 1)
    score = score * (1 - outside * (band / nr.double()[None, :, None, None].clamp_min(1)).clamp(0, 1))
    return score.masked_fill(share < MIN_OVERLAP, -2.0)


def _pairs(corr: Correlator, rng, n_sections=3, n_slices=5):
    """Random section variants (smooth blobs of tissue) and atlas slices with shifted copies of them."""
    h, w = corr.shape
    yy, xx = np.mgrid[:h, :w]
    fa, ea, na, nr, fb = [], [], [], [], []
    for _ in range(n_sections):
        img = sum(
            rng.uniform(0.5, 1)
            * np.exp(-((yy - rng.uniform(10, h - 10)) ** 2 + (xx - rng.uniform(10, w - 10)) ** 2) / 30)
            for _ in range(6)
        ).astype(np.float32)
        mask = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.3 * h) ** 2).astype(np.float32)
        re, im = field(img, mask > 0)
        ring = pose_grid.outside_band(mask > 0, 2).astype(np.float32)
        f, e, a = corr.section(re * mask, im * mask, mask, ring)
        fa.append(f)
        ea.append(e)
        na.append(a)
        nr.append(float(ring.sum()))
        for _ in range(n_slices // n_sections + 1):
            dy, dx = rng.integers(-6, 7, size=2)
            moved = np.roll(img, (dy, dx), axis=(0, 1)) + rng.normal(0, 0.05, img.shape).astype(np.float32)
            big = np.roll((((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (0.42 * h) ** 2), (dy, dx), axis=(0, 1))
            fb.append(corr.slice(*field(moved, big), big.astype(np.float32)))
    as_f = torch.tensor
    return (
        torch.stack(fa),
        as_f(ea, dtype=torch.float32),
        as_f(na, dtype=torch.float32),
        torch.stack(fb[:n_slices]),
        as_f(nr, dtype=torch.float32),
    )


@pytest.mark.parametrize("shape", [(45, 45), (44, 46)])
def test_lattice_scores_are_the_full_map_on_every_second_shift(shape):
    corr = Correlator(shape)
    assert corr.lattice_ok()
    fa, ea, na, fb, nr = _pairs(corr, np.random.default_rng(3))
    full = _score_map(corr, fa, ea, na, fb, nr, 0.3)
    value, index, plain = corr.best_lattice(fa, ea, na, fb, nr, 0.3, 0.0, True)
    exact, _, _ = corr.best(fa, ea, na, fb, nr, 0.3, 0.0, True)
    (l0, n0), (l1, n1) = corr._lattice_axes()
    assert l0 % 2 == 0 and l1 % 2 == 0
    # the lattice holds the shift (0, 0) and only shifts of the window, every second one
    rows = np.arange(n0) * 2 - l0 + corr.low[0]
    cols = np.arange(n1) * 2 - l1 + corr.low[1]
    assert corr.low[0] in rows and corr.low[1] in cols
    assert rows.min() >= 0 and rows.max() < corr.window[0] and cols.max() < corr.window[1]
    on = full[..., rows[:, None], cols[None, :]]
    want = on.flatten(2).max(2).values
    assert torch.allclose(value.double(), want, atol=2e-6)
    # the index names a lattice shift of the window whose score is that value
    r, c = index // corr.window[1], index % corr.window[1]
    assert set(r.flatten().tolist()) <= set(rows.tolist()) and set(c.flatten().tolist()) <= set(cols.tolist())
    assert torch.allclose(full.flatten(2).gather(2, index[..., None])[..., 0], value.double(), atol=2e-6)
    # never above the best over every shift, and most pairs found their slice's shifted copy
    assert bool((value <= exact + 1e-6).all())
    assert (plain >= value - 1e-6).all()
    assert float((exact - value).max()) > 1e-4  # some pair's best lies off the lattice


def test_lattice_needs_even_padding():
    corr = Correlator((45, 45))
    corr.pad = (75, 72)
    assert not corr.lattice_ok()
    with pytest.raises(ValueError, match="even"):
        corr.best_lattice(None, None, None, None)


def test_off_by_default_recorded_and_bad_values_refused():
    assert DEFAULTS["stage1_lattice_margin"] is None
    assert check_rerank_options({"stage1_lattice_margin": 0.02})["stage1_lattice_margin"] == 0.02
    for bad in (-0.1, 2.5, "small"):
        with pytest.raises(InputError, match="stage1_lattice_margin"):
            check_rerank_options({"stage1_lattice_margin": bad})
    # a coarse_size whose stage-1 FFT length is odd (20: a 28-pixel canvas, a 45-pixel FFT) cannot halve it:
    # refused, not silently searched at every shift (review 1, C3)
    assert not Correlator((28, 28)).lattice_ok()
    with pytest.raises(InputError, match="even FFT length.*coarse_size 20 gives 45"):
        check_rerank_options({"stage1_lattice_margin": 0.01, "coarse_size": 20})
    assert check_rerank_options({"coarse_size": 20})["stage1_lattice_margin"] is None


def _facts(found):
    poses = {k: (p.score, p.z, p.tilt, p.rotation, p.scale, p.centre) for k, p in found.poses.items()}
    return found.ranking, found.pairs, found.stage1_pairs, poses


def test_default_search_is_the_frozen_one_and_a_wide_margin_the_default(toy, monkeypatch):  # noqa: F811
    plates, section, order = toy
    base = PoseSearch(plates).search(section, order, check_rerank_options({}))
    assert (base.ranking[:3], base.pairs, base.stage1_pairs, base.poses[20].score) == FROZEN
    assert base.options["stage1_lattice_margin"] is None
    calls = {"lattice": 0, "full": 0}
    lattice, full = Correlator.best_lattice, Correlator.best

    def spy_lattice(self, *a, **k):
        calls["lattice"] += 1
        return lattice(self, *a, **k)

    def spy_full(self, *a, **k):
        calls["full"] += 1
        return full(self, *a, **k)

    monkeypatch.setattr(Correlator, "best_lattice", spy_lattice)
    monkeypatch.setattr(Correlator, "best", spy_full)
    # margin 2: every pair scored again at every shift, so the search is the default's bit for bit
    wide = PoseSearch(plates).search(section, order, check_rerank_options({"stage1_lattice_margin": 2.0}))
    assert calls["lattice"] > 0
    assert _facts(wide) == _facts(base)
    assert wide.options["stage1_lattice_margin"] == 2.0


def test_a_small_margin_scores_fewer_pairs_at_every_shift(toy, monkeypatch):  # noqa: F811
    plates, section, order = toy
    counted = {"lattice": 0, "full": 0}
    scores = pose_grid.SectionGrid._scores

    def spy(self, pairs, lattice=False):
        if self.lattice_margin is not None:  # stage 1's grid only
            counted["lattice" if lattice else "full"] += len(pairs)
        return scores(self, pairs, lattice)

    monkeypatch.setattr(pose_grid.SectionGrid, "_scores", spy)
    found = PoseSearch(plates).search(section, order, check_rerank_options({"stage1_lattice_margin": 0.0}))
    assert found.ranking[0][0] in (19, 20, 21)  # the section's plate (20) or its neighbour first
    # every stage-1 pair on the lattice; at every shift at least one per plate, far from all
    assert counted["lattice"] == found.stage1_pairs
    assert 0 < counted["full"] < counted["lattice"] / 3


def test_stage2_canvas_off_by_default_recorded_and_bad_values_refused():
    assert DEFAULTS["stage2_canvas"] is None
    assert check_rerank_options({"stage2_canvas": 1.2})["stage2_canvas"] == 1.2
    for bad in (1.0, 3.5, "wide"):
        with pytest.raises(InputError, match="stage2_canvas"):
            check_rerank_options({"stage2_canvas": bad})


def test_stage2_canvas_sizes_stage_2_grid_only(toy, monkeypatch):  # noqa: F811
    plates, section, order = toy
    base = PoseSearch(plates).search(section, order, check_rerank_options({}))
    # the value of None (pose_grid.CANVAS) is the default search bit for bit
    same = PoseSearch(plates).search(
        section, order, check_rerank_options({"stage2_canvas": pose_grid.CANVAS})
    )
    assert _facts(same) == _facts(base)
    grids = []
    init = pose_grid.SectionGrid.__init__

    def spy(self, *a, **k):
        init(self, *a, **k)
        grids.append((self.grid_size, self.canvas, self.corr.pad, self.corr.window))

    monkeypatch.setattr(pose_grid.SectionGrid, "__init__", spy)
    small = PoseSearch(plates).search(section, order, check_rerank_options({"stage2_canvas": 1.2}))
    # stage 1's grid as before (32 px of tissue on 45, a 72-pixel FFT); stage 2's 56 on 67, an 81-pixel
    # FFT whose 29 x 29 shifts are LOCAL_REACH's +-14 exactly (96 and 37 x 37 at 1.4)
    assert grids == [(32, (45, 45), (72, 72), [55, 55]), (56, (67, 67), (81, 81), [29, 29])]
    assert small.ranking[0][0] == 20 and small.options["stage2_canvas"] == 1.2
    assert small.stage1_pairs == base.stage1_pairs


def test_the_cut_cache_drops_the_cut_used_longest_ago(toy_reference, monkeypatch):
    from napari_nephi.engines.atlas.plates import Plates

    grid = pose_grid.AtlasGrid(Plates.from_reference(*toy_reference), 32)
    one = torch.zeros(4, 8, 5, dtype=torch.complex64)
    monkeypatch.setattr(pose_grid, "CUT_CACHE_BYTES", 2 * one.element_size() * one.nelement())
    built = []

    def make(name):
        def build():
            built.append(name)
            return one.clone()

        return build

    for name in ("a", "b", "a", "c", "a", "b"):
        grid.cached_cut(name, make(name))
    # "a" used again before "c" came: "b" (used longest ago) was dropped, not "a" (made first)
    assert built == ["a", "b", "c", "b"]
    assert list(grid._cuts) == ["a", "b"]


def test_rotation_climb_off_by_default_recorded_and_bad_values_refused():
    assert DEFAULTS["stage1_rotation_climb"] is False
    assert check_rerank_options({"stage1_rotation_climb": True})["stage1_rotation_climb"] is True
    for bad in (1, "yes", None):
        with pytest.raises(InputError, match="stage1_rotation_climb"):
            check_rerank_options({"stage1_rotation_climb": bad})


def test_rotation_climb_turns_further_only_where_the_last_turn_gained(toy, monkeypatch):  # noqa: F811
    plates, section, order = toy
    base = PoseSearch(plates).search(section, order, check_rerank_options({}))
    same = PoseSearch(plates).search(section, order, check_rerank_options({"stage1_rotation_climb": False}))
    assert _facts(same) == _facts(base)
    seen: dict[tuple[float, float], float] = {}  # the climb's (plate, turn) -> best score over the scales
    zero: dict[float, float] = {}  # each plate's rotation-0 best
    batches = []
    score = pose_grid.SectionGrid.score

    def spy(self, pairs, n_plates, best_per_cut_z=False):
        out = score(self, pairs, n_plates, best_per_cut_z)
        if self.grid_size != DEFAULTS["coarse_size"]:
            return out
        if best_per_cut_z and all(r == 0.0 for r, _, _ in pairs):  # a rotation-0 pass
            zero.update({p.z: p.score for p in out})
        elif not best_per_cut_z:  # a step of the climb
            batches.append({r for r, _, _ in pairs})
            for (r, _, cut), pose in zip(pairs, out, strict=True):
                seen[(cut.z, r)] = max(seen.get((cut.z, r), -9.0), pose.score)
        return out

    monkeypatch.setattr(pose_grid.SectionGrid, "score", spy)
    climb = PoseSearch(plates).search(section, order, check_rerank_options({"stage1_rotation_climb": True}))
    assert climb.ranking[0][0] == 20
    assert climb.stage1_pairs < base.stage1_pairs
    # the climb's batches: the 7.5-degree turns first, then 15 degrees
    assert {7.5, -7.5} in batches and any(b and b <= {15.0, -15.0} for b in batches)
    inner = [(z, r) for (z, r) in seen if abs(r) == 7.5]
    assert inner
    for z, r in inner:  # 15 degrees on a side exactly where 7.5 scored above rotation 0's best
        assert ((z, 2 * r) in seen) == (seen[(z, r)] > zero[z])
    assert any((z, 2 * r) in seen for z, r in inner) and not all((z, 2 * r) in seen for z, r in inner)
