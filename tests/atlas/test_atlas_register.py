"""Registering a chosen plate onto a section and carrying its labels (AtlasLookup.register)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_nephi import InputError, Registration
from napari_nephi.core.transform import AffineTransform
from napari_nephi.engines.atlas.plates import Plates
from napari_nephi.engines.atlas.register import block_mean, initial_map, register_plate
from napari_nephi.synthetic.atlas import atlas_queries, brain_phantom, section_from_atlas

#: Share of the best Dice a 2D map can reach on an oblique section (the plate's labels read at the
#: true in-plane position of every section pixel) that the carried labels must reach.
ORACLE_SHARE = 0.85
#: Fast settings of the deformable step for tests.
NEPHI_FAST = {"iterations": 50, "coarse_iterations": 50}


def mean_dice(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean Dice over the non-zero labels of ``truth``."""
    scores = []
    for v in np.unique(truth):
        if v == 0:
            continue
        a, b = found == v, truth == v
        scores.append(2.0 * np.sum(a & b) / (a.sum() + b.sum()))
    return float(np.mean(scores))


def oracle_dice(coords: np.ndarray, plate_labels: np.ndarray, truth: np.ndarray) -> float:
    """Dice of the plate's labels read at each section pixel's true in-plane (y, x) atlas position."""
    h, w = plate_labels.shape
    yy = np.clip(np.round(coords[1]).astype(int), 0, h - 1)
    xx = np.clip(np.round(coords[2]).astype(int), 0, w - 1)
    return mean_dice(plate_labels[yy, xx], truth)


def unregistered(plate_labels: np.ndarray, shape, zoom: float = 1.0) -> np.ndarray:
    """The plate's labels placed on the section grid with centres aligned (no registration)."""
    fs, ms = np.asarray(shape, float), np.asarray(plate_labels.shape, float)
    mat = np.eye(3)
    mat[0, 0] = mat[1, 1] = 1.0 / zoom
    mat[:2, 2] = (ms - 1) / 2 - (fs - 1) / (2 * zoom)
    return AffineTransform(mat).warp_labels(plate_labels, tuple(shape))


@pytest.fixture(scope="module")
def oblique_partial(toy_reference):
    reference, labels = toy_reference
    image, section_labels, coords = section_from_atlas(
        (reference, labels), 21.3, (5.0, -4.0), crop=(0.25, 0.0, 0.0, 0.0), return_coords=True
    )
    return image, section_labels, 21, oracle_dice(coords, labels[21], section_labels)


@pytest.fixture(scope="module")
def nephi_oblique(trained_lookup, oblique_partial):
    """``(reg, seen)``: the nephi registration of ``oblique_partial`` with :data:`NEPHI_FAST` (read only; two
    tests share it, session 41) and the ``(initial, contrast_match)`` of every nephi call it made."""
    from napari_nephi.engines.atlas import register as module

    seen = []
    real = module.register

    def spy(*args, **kwargs):
        if kwargs.get("method") == "nephi":
            seen.append((kwargs.get("initial"), kwargs.get("contrast_match")))
        return real(*args, **kwargs)

    image, _, plate, _ = oblique_partial
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "register", spy)
        reg = trained_lookup.register(image, plate, method="nephi", device="cpu", **NEPHI_FAST)
    return reg, seen


def test_affine_carries_labels_that_keep_their_values(trained_lookup, toy_reference, oblique_partial):
    _, labels = toy_reference
    image, truth, plate, best = oblique_partial
    reg = trained_lookup.register(image, plate, method="affine", device="cpu")
    assert isinstance(reg, Registration)
    carried = reg.metrics["labels"]
    assert carried.shape == image.shape and carried.dtype == labels.dtype
    assert set(np.unique(carried)) <= set(np.unique(labels[plate]))
    dice = mean_dice(carried, truth)
    assert dice >= ORACLE_SHARE * best
    assert dice > mean_dice(unregistered(labels[plate], image.shape), truth) + 0.2
    assert reg.metrics["regions"] == {
        int(v): trained_lookup.region_name(v) for v in np.unique(carried) if v != 0
    }
    # the transform maps section pixels to plate pixels: it reproduces warped and labels
    np.testing.assert_array_equal(reg.transform.warp_labels(labels[plate], image.shape), carried)
    np.testing.assert_allclose(
        reg.transform.warp(trained_lookup.plate_image(plate), image.shape), reg.warped, atol=1e-5
    )


def test_nephi_refines_the_affine_map(trained_lookup, toy_reference, oblique_partial, nephi_oblique):
    _, labels = toy_reference
    image, truth, plate, best = oblique_partial
    affine = trained_lookup.register(image, plate, method="affine", device="cpu")
    reg = nephi_oblique[0]
    dice = mean_dice(reg.metrics["labels"], truth)
    assert dice >= ORACLE_SHARE * best
    assert dice >= mean_dice(affine.metrics["labels"], truth) - 0.02
    assert set(np.unique(reg.metrics["labels"])) <= set(np.unique(labels[plate]))
    assert "nephi" in reg.metrics and reg.settings["method"] == "nephi"


def test_nephi_runs_no_second_global_stage(trained_lookup, oblique_partial, nephi_oblique, monkeypatch):
    """The plate is already affinely aligned and mapped to the section's contrast: nephi gets
    initial='none' and contrast_match=False unless the caller says otherwise (the default call is
    ``nephi_oblique``'s, made under the same spy)."""
    from napari_nephi.engines.atlas import register as module

    first = nephi_oblique[1]
    seen = []

    def spy(*args, **kwargs):
        if kwargs.get("method") == "nephi":
            seen.append((kwargs.get("initial"), kwargs.get("contrast_match")))
            kwargs = {**kwargs, "iterations": 1, "coarse_iterations": 1}  # only the options are read here
        return real(*args, **kwargs)

    real = module.register
    monkeypatch.setattr(module, "register", spy)
    image, _, plate, _ = oblique_partial
    trained_lookup.register(
        image, plate, method="nephi", device="cpu", initial="translation", contrast_match=True, **NEPHI_FAST
    )
    assert len(first) >= 1 and all(call == ("none", False) for call in first)
    assert seen and seen[-1] == ("translation", True)


#: Share of that best Dice required on a section of another stain (region levels redrawn): the
#: contrast is fitted from the image, so a little less than on the atlas's own stain.
RESTAINED_SHARE = 0.8


def _restained(image: np.ndarray, truth: np.ndarray, seed: int) -> np.ndarray:
    """The section with every region's level redrawn (mostly inverted against the atlas stain)."""
    levels = np.random.default_rng(seed).uniform(0.2, 1.0, int(truth.max()) + 1).astype(np.float32)
    levels[0] = 0.0
    out = ndi.gaussian_filter(levels[truth], 0.7) + 0.1 * (image - ndi.gaussian_filter(image, 2.0))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def test_nephi_on_a_restained_section(trained_lookup, toy_reference, oblique_partial):
    image, truth, plate, best = oblique_partial
    stained = _restained(image, truth, seed=4)
    inside = truth > 0
    assert np.corrcoef(stained[inside], image[inside])[0, 1] < 0.5  # another contrast indeed
    affine = trained_lookup.register(stained, plate, method="affine", device="cpu")
    reg = trained_lookup.register(stained, plate, method="nephi", device="cpu", **NEPHI_FAST)
    dice = mean_dice(reg.metrics["labels"], truth)
    assert mean_dice(affine.metrics["labels"], truth) >= RESTAINED_SHARE * best
    assert dice >= RESTAINED_SHARE * best and dice >= mean_dice(affine.metrics["labels"], truth) - 0.02


def test_deformable_map_is_kept_only_when_it_helps(trained_lookup, oblique_partial, monkeypatch):
    from napari_nephi.engines.atlas import register as module

    image, _, plate, _ = oblique_partial
    affine = trained_lookup.register(image, plate, method="affine", device="cpu")
    monkeypatch.setattr(module, "KEEP_GAIN", 2.0)  # no map can add 2 to an agreement in [0, 1]
    # the gate is judged, not the map (NEPHI_FAST until session 42): 5 steps a stage change 143 label pixels
    short = {"iterations": 5, "coarse_iterations": 5}
    rejected = trained_lookup.register(image, plate, method="nephi", device="cpu", **short)
    checked = rejected.metrics["nephi"]
    assert checked["kept"] is False and 0.0 <= checked["edges_before"] <= 1.0
    np.testing.assert_array_equal(rejected.metrics["labels"], affine.metrics["labels"])
    np.testing.assert_allclose(rejected.warped, affine.warped, atol=1e-5)
    monkeypatch.setattr(module, "KEEP_GAIN", -2.0)  # any map that does not fold is kept
    kept = trained_lookup.register(image, plate, method="nephi", device="cpu", **short)
    assert kept.metrics["nephi"]["kept"] is (kept.metrics["nephi"]["folds"] == 0)
    if kept.metrics["nephi"]["kept"]:
        assert not np.array_equal(kept.metrics["labels"], affine.metrics["labels"])


def test_brightfield_section_at_another_scale(trained_lookup, toy_reference, oblique_partial):
    _, labels = toy_reference
    image, truth, plate, best = oblique_partial
    # twice the resolution, dark tissue on a bright background (brightfield-like)
    big = ndi.zoom(image, 2.0, order=1)
    big_truth = ndi.zoom(truth, 2.0, order=0)
    bright = 1.0 - big
    reg = trained_lookup.register(bright, plate, method="affine", device="cpu")
    assert reg.metrics["plate_scale"] == pytest.approx(2.0, rel=0.15)
    dice = mean_dice(reg.metrics["labels"], big_truth)
    assert dice >= ORACLE_SHARE * best
    assert dice > mean_dice(unregistered(labels[plate], big.shape, zoom=2.0), big_truth) + 0.2


def test_large_section_is_registered_on_a_downsampled_grid(trained_lookup, toy_reference):
    reference, labels = toy_reference
    image, truth, coords = section_from_atlas((reference, labels), 15, 3.0, return_coords=True)
    big = np.kron(image, np.ones((10, 10), np.float32))  # 640 x 640 > the 512 working grid
    big_truth = np.kron(truth, np.ones((10, 10), truth.dtype))
    reg = trained_lookup.register(big, 15, method="affine", device="cpu")
    assert reg.metrics["labels"].shape == big.shape
    assert reg.metrics["work_zoom"][0] > 1
    best = oracle_dice(coords, labels[15], truth)
    assert mean_dice(reg.metrics["labels"], big_truth) >= ORACLE_SHARE * best


def test_block_mean_by_hand():
    image = np.arange(7 * 10 * 3, dtype=np.uint16).reshape(7, 10, 3)
    got = block_mean(image, 3)
    padded = np.pad(image.astype(np.float64), ((0, 2), (0, 2), (0, 0)), mode="edge")
    for i in range(3):
        for j in range(4):
            np.testing.assert_allclose(got[i, j], padded[3 * i : 3 * i + 3, 3 * j : 3 * j + 3].mean((0, 1)))


def test_a_large_section_is_reduced_without_a_full_size_copy(toy_reference):
    import tracemalloc

    import cv2

    from napari_nephi.engines.atlas.preprocess import tissue_mask, to_grey
    from napari_nephi.engines.atlas.register import _working_image

    reference, _ = toy_reference
    image = section_from_atlas(reference, 15, 3.0)
    grey8 = np.clip(np.kron(image, np.ones((47, 38), np.float32)) * 255, 0, 255).astype(np.uint8)
    big = np.repeat(grey8[..., None], 3, axis=2)  # 3008 x 2432 RGB, 22 MB
    tracemalloc.start()
    try:
        work, mask, zoom, full = _working_image(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.75 * big.nbytes  # a grey float copy alone would be 1.33 times the input
    assert full == big.shape[:2] and max(work.shape) == 512
    k = max(big.shape[:2]) // 512  # whole blocks of 5 pixels, then resized to the work grid
    np.testing.assert_allclose(zoom, (k * -(-3008 // k) / work.shape[0], k * -(-2432 // k) / work.shape[1]))
    direct = cv2.resize(to_grey(big), work.shape[::-1], interpolation=cv2.INTER_AREA)
    expected = tissue_mask(direct)
    assert np.logical_and(mask, expected).sum() / np.logical_or(mask, expected).sum() > 0.97


class PlateAtlas:
    """The part of AtlasLookup that registration reads, over a :class:`Plates` (no training)."""

    def __init__(self, reference, labels):
        self.plates = Plates.from_reference(reference, labels)

    def plate_image(self, i):
        return self.plates.plate(i)

    def plate_labels(self, i):
        return self.plates.labels(i)

    def region_name(self, value):
        return f"region {value}"


#: Mean and lowest Dice of the labels carried by the affine map onto straight, whole sections of
#: the phantom given their true plate (the sections differ from the atlas by a smooth deformation,
#: stain jitter, noise, in-plane rotation up to 10 degrees and scale 0.8-1.25).
PHANTOM_MEAN_DICE = 0.6
PHANTOM_MIN_DICE = 0.45


@pytest.fixture(scope="module")
def phantom_atlas():
    reference, labels = brain_phantom((66, 64, 72), seed=0)
    return reference, labels, PlateAtlas(reference, labels)


def test_straight_phantom_sections_with_their_true_plate(phantom_atlas):
    reference, labels, atlas = phantom_atlas
    qs = atlas_queries(reference, labels, 4, seed=11, max_tilt=0, partial=0, noise=0.03, tears=0)
    scores = []
    for q in qs:
        reg = register_plate(atlas, q["image"], q["plate"], "affine", device="cpu")
        scores.append(mean_dice(reg.metrics["labels"], q["labels"]))
        # never squeezed into a band: the map's linear part stays close to a similarity
        sv = np.linalg.svd(_linear_part(reg.transform, q["image"].shape), compute_uv=False)
        assert sv.max() / sv.min() < 1.4
    assert np.mean(scores) >= PHANTOM_MEAN_DICE and min(scores) >= PHANTOM_MIN_DICE, scores


def _linear_part(transform, shape) -> np.ndarray:
    """Least-squares linear part of ``transform`` over a grid of points of ``shape``."""
    pts = np.argwhere(np.ones(shape, bool))[::7].astype(float)
    return _fit_linear(pts, transform.map_points(pts))


def _fit_linear(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    a = np.c_[src, np.ones(len(src))]
    return np.linalg.lstsq(a, dst, rcond=None)[0][:2].T


def _angle(linear: np.ndarray) -> float:
    """Rotation angle (degrees) of the closest rotation to ``linear`` ((y, x) axes)."""
    u, _, vt = np.linalg.svd(linear)
    r = u @ vt
    return float(np.degrees(np.arctan2(r[1, 0], r[0, 0])))


@pytest.mark.parametrize("angle", [8.0, -8.0, 18.0])
def test_rotated_section_is_recovered(trained_lookup, toy_reference, angle):
    reference, labels = toy_reference
    image, truth, coords = section_from_atlas((reference, labels), 18, 0.0, return_coords=True)
    rotated = ndi.rotate(image, angle, order=1, reshape=True)
    truth = ndi.rotate(truth, angle, order=0, reshape=True)
    yx = np.stack([ndi.rotate(c, angle, order=1, reshape=True) for c in coords[1:]], -1)
    inside = truth > 0
    # the true map: each section pixel's plate position, fitted by least squares
    expected = _angle(_fit_linear(np.argwhere(inside).astype(float), yx[inside]))
    assert abs(abs(expected) - abs(angle)) < 0.5  # the construction is what it claims
    reg = trained_lookup.register(rotated, 18, method="affine", device="cpu")
    found = _angle(_linear_part(reg.transform, rotated.shape))
    assert abs(found - expected) < 2.0
    assert mean_dice(reg.metrics["labels"], truth) >= 0.8


def test_initial_map_recovers_rotation_scale_and_shift(toy_reference):
    reference, _ = toy_reference
    plate = reference[20]
    truth = np.eye(3)  # section pixel -> plate pixel: rotation by 10 degrees, scale 1/1.3, a shift
    a = np.radians(10.0)
    truth[:2, :2] = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) / 1.3
    truth[:2, 2] = [-6.0, 4.0]
    section = ndi.affine_transform(plate, truth, output_shape=(90, 96), order=1)
    mask = section > 0.2
    found, info = initial_map(section, mask, plate, 1.3)
    assert abs(info["angle"] - 10.0) <= 3.0
    assert info["scale"] == pytest.approx(1.3, rel=0.1)
    pts = np.argwhere(mask).astype(float)
    err = np.abs(pts @ found[:2, :2].T + found[:2, 2] - (pts @ truth[:2, :2].T + truth[:2, 2]))
    assert np.median(err) < 2.0


@pytest.mark.parametrize(
    "section, plate, kwargs, match",
    [
        (np.zeros((64, 64), np.float32), 3, {}, "constant"),
        (np.full((64, 64), np.nan, np.float32), 3, {}, "NaN"),
        ("ok", 40, {}, "out of range"),
        ("ok", 3, {"method": "nonsense"}, "Unknown method"),
        ("ok", 3, {"method": "affine", "kindd": "rigid"}, "did you mean 'kind'"),
    ],
)
def test_bad_registration_input(trained_lookup, toy_reference, section, plate, kwargs, match):
    if isinstance(section, str):
        section = section_from_atlas(toy_reference[0], 10)
    with pytest.raises(InputError, match=match):
        trained_lookup.register(section, plate, device="cpu", **kwargs)


def test_an_affine_stage_that_lowers_the_edge_agreement_is_dropped(toy_reference, monkeypatch):
    from napari_nephi.engines.atlas import register as module

    reference, _ = toy_reference
    plate = reference[20]
    truth = np.eye(3)
    truth[:2, 2] = [-3.0, 2.0]  # section pixel -> plate pixel: a shift
    section = ndi.affine_transform(plate, truth, output_shape=plate.shape, order=1)
    mask = section > 0.2
    common = {"device": "cpu", "progress": None, "cancel": None, "fixed_mask": mask}
    options = {**module.AFFINE_DEFAULTS, "kind": "similarity"}
    pmask = module.tissue_mask(plate).astype(np.float32)
    start = np.eye(3)  # 3.6 px off
    reg, found, name = module._best_stage(section, mask, plate, pmask, start, common, options, ("plate",))
    assert name == "plate" and reg is not None
    assert np.abs(found[:2, 2] - truth[:2, 2]).max() < 1.0  # the stage found the shift: kept
    monkeypatch.setattr(module, "STAGE_DROP", -2.0)  # the start wins whatever the stage does
    reg, found, name = module._best_stage(section, mask, plate, pmask, start, common, options, ("plate",))
    assert (reg, name) == (None, "start") and np.array_equal(found, start)


def test_a_large_section_given_as_a_nested_list_registers_like_its_array(trained_lookup, toy_reference):
    """A section without a dtype (a nested list) larger than the work grid is read whole, not by blocks."""
    from napari_nephi.engines.atlas.register import MAX_WORK_SIDE

    reference, _ = toy_reference
    plate = np.kron(np.asarray(reference[20], np.float32), np.ones((24, 24), np.float32))
    assert max(plate.shape) >= 2 * MAX_WORK_SIDE
    by_array = trained_lookup.register(plate, 20, method="affine")
    by_list = trained_lookup.register(plate.tolist(), 20, method="affine")
    same = np.mean(np.asarray(by_list.metrics["labels"]) == np.asarray(by_array.metrics["labels"]))
    assert same > 0.97  # the same map up to the reduction (block means against one resize)
