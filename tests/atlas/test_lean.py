"""The pose search's ``lean`` option (session 42, the default since the lead's held-out reading;
``rerank_options={"lean": False}`` keeps the code path before; engines/atlas/pose_grid.py
``SectionGrid(lean=True)``): the same search with less work per lookup
(fields with fewer array passes, a cut's channels written into one stack, each oblique cut and each
plate cut through a given atlas point made once per section, each pair of such a cut and a section
variant correlated once). It must give the same poses, scores and ranking bit for bit, and do less.
"Bit for bit" is measured on this CPU and torch build (``addcmul_`` against ``+= a * b`` on complex
spectra, FFTs of a slice in batches of other sizes): vectorised kernels elsewhere (FMA, other SIMD widths)
could differ in the last bit; should these exact asserts trip on other hardware without a regression,
compare the scores to 1 ulp and the rankings exactly (review 2)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from napari_nephi import InputError
from napari_nephi.engines.atlas import pose_grid
from napari_nephi.engines.atlas.plates import Plates
from napari_nephi.engines.atlas.pose_grid import Correlator, _field, _field_lean, _stacked, field
from napari_nephi.engines.atlas.rerank import DEFAULTS, PoseSearch, check_rerank_options
from napari_nephi.synthetic.atlas import section_from_atlas

from .test_information import _restained
from .test_rerank import search  # noqa: F401 (the fixture)


def _images(seed: int, n: int = 5, shape=(41, 37)):
    rng = np.random.default_rng(seed)
    for k in range(n):
        image = rng.random(shape).astype(np.float32) * rng.uniform(0.1, 10.0)
        yy, xx = np.mgrid[: shape[0], : shape[1]]
        disc = (yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2 - k) ** 2 < (shape[0] / 3) ** 2
        yield image, disc


def test_the_lean_field_is_the_field_bit_for_bit():
    for image, disc in _images(0):
        weights = (disc, pose_grid.section_weight(disc), pose_grid.dilate(disc), np.zeros_like(disc))
        for weight in (*weights, disc.astype(np.float64) * 0.5):
            a, b = _field(image, weight), _field_lean(image, weight)
            assert a[0].dtype == b[0].dtype == np.float32
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
            # the blurred mean too, and the dilation with its disc built once
            a, b = field(image, weight, 1.2), field(image, weight, 1.2, lean=True)
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        # the dilation with its disc built once and a boolean mask read in place: the plain formula's values
        for mask in (disc, disc[:, ::2], disc.astype(np.float32)):
            for radius in (1, 3):
                kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
                plain = cv2.dilate(mask.astype(np.uint8), kernel) > 0
                assert np.array_equal(pose_grid.dilate(mask, radius), plain)


def test_slices_into_gives_the_slices_ffts_bit_for_bit():
    corr = Correlator((41, 41), reach=9)
    parts, stack = [], np.empty((4, 4, 41, 41), dtype=np.float32)
    for k, (image, disc) in enumerate(_images(1, 4, (41, 41))):
        re, im = field(image, pose_grid.dilate(disc), 1.2)
        parts.append((re, im, disc.astype(np.float32)))
        stack[k, 0], stack[k, 1], stack[k, 3] = re, im, disc
    assert torch.equal(corr.slices(parts), corr.slices_into(stack))


def test_stacked_is_a_view_of_consecutive_rows_and_a_copy_otherwise():
    base = torch.fft.rfft2(torch.rand(6, 4, 8, 8))
    rows = [base[i] for i in range(6)]
    view = _stacked(rows[2:5])
    assert torch.equal(view, torch.stack(rows[2:5])) and view.data_ptr() == base[2].data_ptr()
    gap = _stacked([rows[0], rows[2]])  # not consecutive: stacked as before
    assert torch.equal(gap, torch.stack([rows[0], rows[2]])) and gap.data_ptr() != base.data_ptr()
    other = _stacked([rows[1], rows[0].clone()])
    assert torch.equal(other, torch.stack([rows[1], rows[0]]))


def test_on_by_default_off_on_request_and_bad_values_refused():
    # the default since the lead's held-out reading of session 42 (query seeds 157 / 158, both indexes)
    assert DEFAULTS["lean"] is True
    assert check_rerank_options({})["lean"] is True
    assert check_rerank_options({"lean": False})["lean"] is False
    with pytest.raises(InputError, match="lean"):
        check_rerank_options({"lean": "yes"})


def _counting(monkeypatch):
    """Count the fields computed (cuts made) and the pairs correlated."""
    made = {"fields": 0, "pairs": 0}
    plain, lean, best = pose_grid._field, pose_grid._field_lean, Correlator.best

    def count(f):
        def wrapped(*a, **k):
            made["fields"] += 1
            return f(*a, **k)

        return wrapped

    def counted_best(self, fa, ea, na, fb, *a, **k):
        made["pairs"] += fa.shape[0] * fb.shape[0]
        return best(self, fa, ea, na, fb, *a, **k)

    monkeypatch.setattr(pose_grid, "_field", count(plain))
    monkeypatch.setattr(pose_grid, "_field_lean", count(lean))
    monkeypatch.setattr(Correlator, "best", counted_best)
    return made


@pytest.mark.parametrize("which", ["restained", "oblique"])
def test_lean_search_gives_the_same_poses_scores_and_ranking_with_less_work(
    search,  # noqa: F811
    toy_reference,
    monkeypatch,
    which,
):
    reference, labels = toy_reference
    if which == "restained":
        section = _restained(reference, labels, 24, seed=1)
    else:
        section = section_from_atlas(reference, 17, (4.0, -4.0))
    order = [(p, 0.0) for p in range(search.n)]
    counted = which == "restained"  # the work is counted on one section (review 1: test time)
    old_path = check_rerank_options({"lean": False})  # the search's code path before session 42
    # each arm its own search, so that each builds (and caches) its own stage-1 plate cuts: lean's build of
    # them is compared too (review 2)
    plates = Plates.from_reference(reference, labels)
    made = _counting(monkeypatch)
    off = PoseSearch(plates).search(section, order, old_path)
    work_off = dict(made)
    made.update(fields=0, pairs=0)
    on = PoseSearch(plates).search(section, order, check_rerank_options({}))  # the default: lean
    assert on.ranking == off.ranking  # every plate and distance
    assert on.poses == off.poses and on.pairs == off.pairs
    assert on.options["lean"] is True and off.options["lean"] is False
    if counted:  # less work: cuts made again and pairs correlated again are not
        assert made["fields"] < work_off["fields"], (made, work_off)
        assert made["pairs"] <= work_off["pairs"], (made, work_off)
        # the defaults' pinned toy search (test_quarter_shift) holds with lean too
        assert [p for p, _ in on.ranking[:10]] == [24, 23, 25, 22, 26, 21, 27, 20, 28, 19]
        assert on.pairs == 1677
        assert on.ranking[0][1] == pytest.approx(0.537109285593, abs=1e-9)


def test_lean_on_a_list_of_plates_gives_the_same_ranking(toy_reference):
    reference, labels = toy_reference
    plates = Plates.from_reference([reference[i] for i in range(0, reference.shape[0], 2)])
    flat = PoseSearch(plates)
    section = _restained(reference, labels, 24, seed=1)
    order = [(p, 0.0) for p in range(flat.n)]
    off = flat.search(section, order, check_rerank_options({"lean": False}))
    on = PoseSearch(plates).search(section, order, check_rerank_options({}))  # its own cut cache
    assert on.ranking == off.ranking and on.poses == off.poses and on.pairs == off.pairs
