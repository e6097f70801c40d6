"""brain_phantom (the atlas benchmark's reference) and atlas_queries (its query sections)."""

import numpy as np
import pytest
from scipy import ndimage

from napari_nephi.core.errors import InputError
from napari_nephi.synthetic.atlas import (
    PHANTOM_REGIONS,
    atlas_queries,
    brain_phantom,
    section_from_atlas,
    toy_atlas,
)

SHAPE = (66, 48, 56)


@pytest.fixture(scope="module")
def phantom():
    return brain_phantom(SHAPE, seed=0)


def _corr(a, b):
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def _runs(column):
    """Label values down a column, consecutive repeats merged, background dropped."""
    vals = [int(v) for v in column if v]
    return [v for i, v in enumerate(vals) if i == 0 or v != vals[i - 1]]


def test_phantom_regions_and_intensities(phantom):
    ref, labels = phantom
    assert ref.shape == labels.shape == SHAPE
    assert ref.dtype == np.float32 and labels.dtype == np.uint16
    assert 0 <= ref.min() and ref.max() <= 1
    assert set(np.unique(labels)) == set(PHANTOM_REGIONS)  # every region present, nothing else
    assert ref[labels == 0].mean() < 0.05
    # Nissl-like: cell-dense layers bright, white matter and ventricles dark
    assert ref[labels == 2].mean() > ref[labels == 6].mean() + 0.4
    assert ref[labels == 15].mean() > ref[labels == 16].mean() + 0.15
    assert ref[labels == 9].mean() < 0.2
    # mirrored hemispheres
    assert (labels == labels[:, :, ::-1]).mean() > 0.97


def test_phantom_cortex_layers_in_order(phantom):
    _, labels = phantom
    z, x = int(0.45 * SHAPE[0]), int(0.7 * SHAPE[2])  # dorsal cortex, off the midline
    runs = _runs(labels[z, :, x])
    assert runs[:6] == [1, 2, 3, 4, 5, 6]


def test_phantom_changes_along_plates(phantom):
    ref, labels = phantom
    z = SHAPE[0] // 2
    near, mid, far = (_corr(ref[z], ref[z + d]) for d in (1, 6, 25))
    assert near > mid > far
    assert near > 0.8 and far < near - 0.15
    # the hippocampal fold moves ventrally and laterally from front to back
    zs = np.nonzero((labels == 14).any(axis=(1, 2)))[0]
    front, back = zs[: len(zs) // 4], zs[-len(zs) // 4 :]

    def centre(sel):
        _, yy, xx = np.nonzero(labels[sel] == 14)
        return yy.mean(), np.abs(xx - (SHAPE[2] - 1) / 2).mean()

    (yf, xf), (yb, xb) = centre(front), centre(back)
    assert yb > yf + 0.05 * SHAPE[1] and xb > xf + 0.04 * SHAPE[2]
    # olfactory bulbs only in front, cerebellum only behind
    assert np.nonzero(labels == 25)[0].max() < 0.25 * SHAPE[0]
    assert np.nonzero(labels == 20)[0].min() > 0.6 * SHAPE[0]


def test_phantom_seeded():
    a, la = brain_phantom((32, 32, 32), seed=3)
    b, lb = brain_phantom((32, 32, 32), seed=3)
    c, _ = brain_phantom((32, 32, 32), seed=4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert np.abs(a - c).mean() > 0.01
    with pytest.raises(InputError, match="each >= 24"):
        brain_phantom((10, 48, 48))


def test_queries_straight_match_their_plate(phantom):
    ref, labels = phantom
    qs = atlas_queries(
        ref, labels, 8, seed=1, max_tilt=0, partial=0, noise=0, tears=0, rotation=0, scale=(1, 1), deform=0
    )
    assert len(qs) == 8
    for q in qs:
        img, lab = q["image"], q["labels"]
        assert img.dtype == np.float32 and img.shape == lab.shape and 0 <= img.min() <= img.max() <= 1
        assert q["plate"] == round(q["index"])
        # the tissue is the true plate's tissue, shifted onto the canvas
        box = ndimage.find_objects((lab > 0).astype(int))[0]
        plate = labels[q["plate"]]
        pbox = ndimage.find_objects((plate > 0).astype(int))[0]
        a, b = lab[box], plate[pbox]
        assert abs(a.shape[0] - b.shape[0]) <= 1 and abs(a.shape[1] - b.shape[1]) <= 1
        h, w = min(a.shape[0], b.shape[0]) - 1, min(a.shape[1], b.shape[1]) - 1
        # the same labels up to a sub-voxel shift of the canvas
        agree = max(
            max((a[i : i + h, j : j + w] == b[:h, :w]).mean(), (a[:h, :w] == b[i : i + h, j : j + w]).mean())
            for i in range(2)
            for j in range(2)
        )
        assert agree > 0.95
        # Nissl-like: brighter where the atlas is brighter
        assert _corr(img[box][:h, :w], ref[q["plate"]][pbox][:h, :w]) > 0.6


def test_queries_oblique_truth_is_the_tissue_centre(phantom):
    ref, labels = phantom
    qs = atlas_queries(
        ref, labels, 6, seed=2, max_tilt=14, partial=0, tears=0, rotation=0, scale=(1, 1), deform=0
    )
    spans = []
    for q in qs:
        assert all(abs(t) <= 14 for t in q["tilt"])
        # independent: the same plane cut by section_from_atlas, mean z of its tissue
        _, lab, coords = section_from_atlas(
            ref, q["index"], tilt_degrees=q["tilt"], labels=labels, return_coords=True
        )
        assert abs(q["plate"] - coords[0][lab > 0].mean()) <= 1.0
        spans.append(q["plate_range"][1] - q["plate_range"][0])
        assert q["plate_range"][0] <= q["plate"] <= q["plate_range"][1]
    assert max(spans) >= 4  # oblique cuts cross several plates


def test_queries_partial_contrast_and_tears(phantom):
    ref, labels = phantom
    full = atlas_queries(ref, labels, 6, seed=3, partial=0, tears=0, contrast="nissl")
    part = atlas_queries(ref, labels, 6, seed=3, partial=1, tears=0, contrast="nissl")
    for f, p in zip(full, part, strict=True):
        assert p["part"] is not None and max(p["crop"]) >= 0.1
        # scale differs between draws: compare areas in atlas voxels
        assert (p["labels"] > 0).sum() / p["scale"] ** 2 < 0.9 * (f["labels"] > 0).sum() / f["scale"] ** 2
    fluo = atlas_queries(ref, labels, 6, seed=4, partial=0, tears=0, contrast="fluorescence")
    for q in fluo + full:
        img, tissue = q["image"], q["labels"] > 0
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        if q["contrast"] == "fluorescence":  # the opposite background: bright around darker tissue
            assert np.median(border) > np.median(img[tissue]) + 0.2
        else:
            assert np.median(border) < np.median(img[tissue]) - 0.2
    # per-region levels: mostly inverted (the opposite background), but neither a copy nor an inversion
    cs = []
    for q in fluo:
        vals = [v for v in np.unique(q["labels"]) if v and (q["labels"] == v).sum() > 30]
        mq = [q["image"][q["labels"] == v].mean() for v in vals]
        ma = [ref[labels == v].mean() for v in vals]
        cs.append(_corr(np.array(mq), np.array(ma)))
    assert np.mean(cs) < 0 and np.mean(np.abs(cs)) < 0.95
    torn = atlas_queries(ref, labels, 4, seed=5, partial=0, tears=1, noise=0)
    for q in torn:  # cracks: background pixels inside the filled tissue
        tissue = q["labels"] > 0
        assert (ndimage.binary_fill_holes(tissue) & ~tissue).sum() > 5 or ndimage.label(tissue)[1] > 1
    mixed = atlas_queries(ref, labels, 12, seed=6, contrast="mixed")
    assert {q["contrast"] for q in mixed} == {"nissl", "fluorescence"}


def test_queries_seeded_spread_and_generic(phantom):
    ref, labels = phantom
    a = atlas_queries(ref, labels, 10, seed=7)
    b = atlas_queries(ref, labels, 10, seed=7)
    c = atlas_queries(ref, labels, 10, seed=8)
    for qa, qb in zip(a, b, strict=True):
        np.testing.assert_array_equal(qa["image"], qb["image"])
        assert qa["plate"] == qb["plate"]
    assert [q["plate"] for q in a] != [q["plate"] for q in c]
    # stratified: the plates cover the atlas's extent
    plates = sorted(q["plate"] for q in a)
    assert plates[0] < 0.3 * SHAPE[0] and plates[-1] > 0.7 * SHAPE[0]
    # any labelled atlas works, e.g. the toy atlas
    tref, tlab = toy_atlas((40, 48, 48), seed=0)
    (q,) = atlas_queries(tref, tlab, 1, seed=0)
    assert 0 <= q["plate"] < 40 and (q["labels"] > 0).any()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, "Option n"),
        ({"contrast": "dapi"}, "Option contrast"),
        ({"max_tilt": 60}, "Option max_tilt"),
        ({"scale": (2, 1)}, "scale must be a pair"),
        ({"partial": float("nan")}, "Option partial"),
    ],
)
def test_queries_bad_options(phantom, kwargs, match):
    ref, labels = phantom
    args = {"n": 2, **kwargs}
    with pytest.raises(InputError, match=match):
        atlas_queries(ref, labels, **args)


def test_queries_bad_atlas(phantom):
    ref, labels = phantom
    with pytest.raises(InputError, match="differs from the reference shape"):
        atlas_queries(ref, labels[:-1], 2)
    with pytest.raises(InputError, match="NaN"):
        atlas_queries(np.where(labels == 3, np.nan, ref), labels, 2)
    with pytest.raises(InputError, match="all 0"):
        atlas_queries(ref, np.zeros_like(labels), 2)
    with pytest.raises(InputError, match="3D"):
        atlas_queries(ref[0], labels[0], 2)
