"""Plates: the atlas container (volume or list of plates, labels, fingerprint, errors)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.color import rgb2gray

from napari_nephi.core.errors import DimensionMismatchError, InputError
from napari_nephi.engines.atlas.plates import Plates, index_ranges
from napari_nephi.synthetic.atlas import toy_atlas


@pytest.fixture(scope="module")
def atlas():
    return toy_atlas((20, 40, 48), seed=1)


def _rgb_plates():
    """Three RGB plates of different shapes: a bright disc on a dark background, uint8."""
    out = []
    for i, (h, w) in enumerate([(40, 52), (36, 36), (60, 44)]):
        yy, xx = np.mgrid[:h, :w]
        disc = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (min(h, w) / 3 + i) ** 2
        img = np.zeros((h, w, 3), np.uint8)
        img[disc] = (200, 120 + 20 * i, 60)
        out.append(img)
    return out


def test_volume_plates_normalised(atlas):
    ref, lab = atlas
    before = ref.copy()
    p = Plates.from_reference(ref, lab)
    assert p.n == 20 == len(p)
    assert p.shapes == [(40, 48)] * 20
    assert p.volume.shape == (20, 40, 48) and p.volume.dtype == np.float32
    assert 0 <= p.volume.min() and p.volume.max() == pytest.approx(1.0)
    # one linear map for the whole volume (not per plate): plates stay comparable
    lo, hi = np.percentile(ref, [0.5, 99.5])
    expect = np.clip((ref - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(p.volume, expect, atol=1e-5)
    np.testing.assert_array_equal(p.labels(7), lab[7])
    assert p.has_labels and p.plate(7).dtype == np.float32
    np.testing.assert_array_equal(ref, before)
    # copies: changing what we got back changes nothing inside
    got = p.plate(3)
    got[:] = 0
    assert p.plate(3).max() > 0


@pytest.mark.parametrize("axis", [1, 2, -1, -2])
def test_plate_axis(atlas, axis):
    ref, lab = atlas
    moved, moved_lab = np.moveaxis(ref, 0, axis), np.moveaxis(lab, 0, axis)
    p = Plates.from_reference(moved, moved_lab, plate_axis=axis)  # -1: numpy's last axis
    q = Plates.from_reference(ref, lab)
    np.testing.assert_array_equal(p.volume, q.volume)
    np.testing.assert_array_equal(p.labels(11), lab[11])
    assert p.fingerprint() == q.fingerprint()


def test_list_of_rgb_plates_of_different_shapes():
    plates = _rgb_plates()
    copies = [p.copy() for p in plates]
    labels = [(rgb2gray(p) > 0).astype(np.uint8) * (i + 1) for i, p in enumerate(plates)]
    p = Plates.from_reference(plates, labels)
    assert p.volume is None and p.n == 3
    assert p.shapes == [(40, 52), (36, 36), (60, 44)]
    for i, raw in enumerate(plates):
        grey = rgb2gray(raw)
        expect = (grey - grey.min()) / (grey.max() - grey.min())
        np.testing.assert_allclose(p.plate(i), expect, atol=1e-4)
        assert set(np.unique(p.labels(i))) == {0, i + 1}
    for a, b in zip(plates, copies, strict=True):
        np.testing.assert_array_equal(a, b)
    thumb = p.thumbnail(2, size=30)
    assert thumb.shape == (30, 22) and thumb.dtype == np.float32


def test_annotation_of_floats_holding_whole_numbers(atlas):
    ref, lab = atlas
    p = Plates.from_reference(ref, lab.astype(np.float64))
    assert np.issubdtype(p.labels(5).dtype, np.integer)
    np.testing.assert_array_equal(p.labels(5), lab[5])
    with pytest.raises(InputError, match="integer labels"):
        Plates.from_reference(ref, lab + 0.5)
    assert Plates.from_reference(ref).labels(0) is None


def test_fingerprint(atlas):
    ref, _ = atlas
    a = Plates.from_reference(ref)
    assert a.fingerprint() == Plates.from_reference(ref.copy()).fingerprint()
    assert len(a.fingerprint()) == 64
    changed = ref.copy()
    changed[9, 5:30, 10:30] = 0.2
    assert Plates.from_reference(changed).fingerprint() != a.fingerprint()
    assert Plates.from_reference(ref[:-1]).fingerprint() != a.fingerprint()


def test_errors(atlas):
    ref, lab = atlas
    with pytest.raises(InputError, match="at least 2 plates"):
        Plates.from_reference(ref[:1])
    with pytest.raises(InputError, match="at least 2 plates"):
        Plates.from_reference([ref[3]])
    with pytest.raises(InputError, match="at least 2 plates"):
        Plates.from_reference(ref[3])
    blank = ref.copy()
    blank[4] = 0
    blank[12:14] = 0.3
    with pytest.raises(InputError, match=r"Plates 4, 12-13 show no tissue"):
        Plates.from_reference(blank)
    with pytest.raises(InputError, match=r"Plate 1 shows no tissue"):
        Plates.from_reference([ref[3], np.full((30, 30), 7.0), ref[5]])
    nan = ref.copy()
    nan[6, 3, 3] = np.nan
    with pytest.raises(InputError, match=r"Plate 6 .*NaN"):
        Plates.from_reference(nan)
    with pytest.raises(InputError, match=r"Plate 0 .*NaN"):
        Plates.from_reference([nan[6], ref[2]])
    with pytest.raises(DimensionMismatchError, match="annotation has shape"):
        Plates.from_reference(ref, lab[:, :-1])
    with pytest.raises(DimensionMismatchError, match="list of as many label images"):
        Plates.from_reference(list(ref[:3]), list(lab[:2]))
    with pytest.raises(DimensionMismatchError, match="annotation of plate 1"):
        Plates.from_reference(list(ref[:3]), [lab[0], lab[1, :-2], lab[2]])
    with pytest.raises(InputError, match="plate_axis"):
        Plates.from_reference(ref, plate_axis=3)
    with pytest.raises(InputError, match="out of range: the atlas has 20 plates"):
        Plates.from_reference(ref).plate(20)


def test_constructor_takes_normalised_plates(atlas):
    ref, lab = atlas
    p = Plates.from_reference(ref, lab)
    q = Plates(p.volume, [p.labels(i) for i in range(p.n)])
    assert q.fingerprint() == p.fingerprint() and q.volume is not None
    with pytest.raises(InputError, match=r"values in \[0, 1\]"):
        Plates(ref * 3)


def test_index_ranges():
    assert index_ranges([7, 0, 1, 2, 9, 10]) == "0-2, 7, 9-10"
    assert index_ranges([4]) == "4"


def test_region_names_from_a_table():
    from napari_nephi.engines.atlas.plates import region_names_from_table

    table = {
        " ID": ["7", "12", " ", None],
        "Acronym ": ["CA1", " DG ", "x", "y"],
        "colour": ["r", "g", "b", "k"],
    }
    assert region_names_from_table(table) == {7: "CA1", 12: "DG"}  # blank values skipped
    with pytest.raises(InputError, match=r"needs a value column .* it has \['id', 'colour'\]"):
        region_names_from_table({"id": [1], "colour": ["r"]}, "names.csv")
    with pytest.raises(InputError, match="names.csv: label values must be whole numbers, got '1.5'"):
        region_names_from_table({"label": ["1.5"], "name": ["a"]}, "names.csv")
