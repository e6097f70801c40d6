"""SectionSynthesizer: oblique re-slices against section_from_atlas, truth coordinates and labels,
partial sections, damage, polarity, presets, determinism and errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.morphology import skeletonize

from napari_nephi.core.errors import InputError
from napari_nephi.engines.atlas.plates import Plates
from napari_nephi.engines.atlas.synthesis import RESTAIN_GAIN, SectionSynthesizer, SynthesisConfig
from napari_nephi.synthetic.atlas import section_from_atlas, toy_atlas

WORK = 96


@pytest.fixture(scope="module")
def atlas():
    return toy_atlas((32, 56, 56), seed=3)


@pytest.fixture(scope="module")
def plates(atlas):
    return Plates.from_reference(*atlas)


@pytest.fixture(scope="module")
def z_plates(atlas):
    """The toy reference with labels that hold the plate index + 1 (which plate each pixel comes from)."""
    ref, _ = atlas
    return Plates.from_reference(ref, np.broadcast_to(np.arange(1, 33)[:, None, None], ref.shape))


def _cfg(**changes) -> SynthesisConfig:
    return dataclasses.replace(SynthesisConfig.none(), **changes)


def _tissue(image: np.ndarray) -> int:
    """Tissue pixels of a toy-atlas sample (dark background, tissue above 0.15)."""
    return int(np.count_nonzero(image > 0.15))


def test_deterministic_for_a_seed(plates):
    a = SectionSynthesizer(plates, SynthesisConfig(), work_size=WORK, seed=5)
    b = SectionSynthesizer(plates, SynthesisConfig(), work_size=WORK, seed=5)
    c = SectionSynthesizer(plates, SynthesisConfig(), work_size=WORK, seed=6)
    first = a.batch([3, 10, 20, 30])
    for x, y in zip(first, b.batch([3, 10, 20, 30]), strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(
        x.shape != y.shape or not np.array_equal(x, y) for x, y in zip(first, c.batch([3, 10, 20, 30]))
    )
    one = a.sample(12, seed=99)
    np.testing.assert_array_equal(one, a.sample_with_truth(12, seed=99).image)


def test_outputs_finite_float32_about_work_size(plates, atlas):
    ref, lab = atlas
    listed = Plates.from_reference(list(ref[4:28:3]), list(lab[4:28:3]))
    for source in (plates, listed):
        for cfg in (SynthesisConfig(), SynthesisConfig.paper()):
            synth = SectionSynthesizer(source, cfg, work_size=WORK, seed=1)
            for i in range(0, source.n, 3):
                img = synth.sample(i)
                assert img.dtype == np.float32 and img.ndim == 2
                assert np.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
                assert 0.75 * WORK <= max(img.shape) <= 1.25 * WORK


def test_oblique_sample_equals_section_from_atlas(plates):
    """A tilted sample lies on section_from_atlas's plane for its angles and shows the same image."""
    vol = plates.volume
    synth = SectionSynthesizer(plates, _cfg(max_tilt=10.0), work_size=WORK, seed=0)
    cy, cx = (vol.shape[1] - 1) / 2, (vol.shape[2] - 1) / 2
    tilts = []
    for i, seed in [(8, 0), (15, 1), (22, 2), (16, 3)]:
        s = synth.sample_with_truth(i, seed=seed)
        tilt = (s.params["pitch"], s.params["yaw"])
        tilts.append(tilt)
        _, c0 = section_from_atlas(vol, 0.0, tilt, return_coords=True)
        e_r, e_c = c0[:, 1, 0] - c0[:, 0, 0], c0[:, 0, 1] - c0[:, 0, 0]  # its unit row and column axes
        normal = np.cross(e_r, e_c)
        py, px = synth.tissue_centre(i)  # the sample's pivot, on the plane at plate params["plane"]
        index = s.params["plane"] - (normal[1] * (cy - py) + normal[2] * (cx - px)) / normal[0]
        cut, sc = section_from_atlas(vol, index, tilt, return_coords=True)
        d = s.coords.reshape(3, -1).T - sc[:, 0, 0]
        assert np.abs(d @ normal).max() < 1e-3  # every pixel on section_from_atlas's plane
        r, c = d @ e_r, d @ e_c  # pixel position in section_from_atlas's cut
        expect = ndi.map_coordinates(cut, [r, c], order=1).reshape(s.image.shape)
        assert np.corrcoef(s.image.ravel(), expect.ravel())[0, 1] > 0.99
        flat = ndi.map_coordinates(vol[i], s.coords[1:], order=1)  # the plate itself
        if max(abs(t) for t in tilt) > 4:  # the tilt shows: the sample is not the plate
            assert np.abs(s.image - expect).mean() < 0.5 * np.abs(s.image - flat).mean()
    assert max(abs(t) for tilt in tilts for t in tilt) > 4
    assert max(abs(t) for tilt in tilts for t in tilt) <= 10


def test_centre_of_an_oblique_sample_is_its_plate(z_plates):
    """Oblique and partial: the mean plate of the kept tissue is the labelled plate, the edges are not."""
    cfg = _cfg(max_tilt=10.0, offset=0.2, partial=1.0, rotation=10.0, scale=(1.0, 1.4), crop_pad=0.1)
    synth = SectionSynthesizer(z_plates, cfg, work_size=WORK, seed=2)
    spans = []
    for i in (6, 12, 16, 20, 25):
        s = synth.sample_with_truth(i)
        tissue = s.image > 0.15
        assert abs(s.coords[0][tissue].mean() - i - s.params["offset"]) < 0.3
        assert abs(s.coords[0][tissue].mean() - i) < 0.5
        inside = np.all((s.coords >= 0) & (s.coords <= np.array([31, 55, 55])[:, None, None]), axis=0)
        # labels read from the atlas at the truth coordinates: the plate index of every pixel
        np.testing.assert_array_equal(s.labels[inside] - 1, np.round(s.coords[0][inside]).astype(int))
        assert np.round(np.mean(s.labels[tissue] - 1)) == i
        spans.append(np.ptp(s.labels[tissue]))
    assert max(spans) >= 3  # oblique: top/bottom or sides reach neighbouring plates


def test_pitch_moves_the_top_to_later_plates(z_plates):
    synth = SectionSynthesizer(z_plates, _cfg(max_tilt=10.0), work_size=WORK, seed=4)
    for seed in range(6):
        s = synth.sample_with_truth(16, seed=seed)
        pitch = s.params["pitch"]
        top, bottom = s.coords[0, 0].mean(), s.coords[0, -1].mean()
        if abs(pitch) > 2:
            assert np.sign(top - bottom) == np.sign(pitch)


def test_paper_preset_never_tilts(z_plates):
    cfg = SynthesisConfig.paper()
    assert cfg.max_tilt == 0 and cfg.scale == (1.0, 1.8) and cfg.pepper == 0.1 and cfg.partial == 0
    synth = SectionSynthesizer(z_plates, cfg, work_size=WORK, seed=0)
    for i in (0, 9, 31):
        s = synth.sample_with_truth(i)
        assert np.all(s.coords[0] == i)
        assert set(np.unique(s.labels)) <= {0, i + 1}


def test_partial_sections_remove_tissue(plates):
    whole = SectionSynthesizer(plates, _cfg(), work_size=WORK)
    part = SectionSynthesizer(plates, _cfg(partial=1.0), work_size=WORK)
    modes = set()
    for seed in range(14):
        i = 6 + seed
        s = part.sample_with_truth(i, seed=seed)
        modes.add(s.params["partial"])
        assert _tissue(s.image) < 0.97 * _tissue(whole.sample(i, seed=seed))
    assert len(modes) >= 4


def test_holes_and_tears_damage_little(plates):
    clean = SectionSynthesizer(plates, _cfg(), work_size=WORK)
    holes = SectionSynthesizer(plates, _cfg(holes=1.0), work_size=WORK)
    tears = SectionSynthesizer(plates, _cfg(tears=1.0), work_size=WORK)
    for seed in range(5):
        ref = clean.sample(15, seed=seed)
        lost = 1 - _tissue(holes.sample(15, seed=seed)) / _tissue(ref)
        assert 0 < lost < 0.35
        changed = np.abs(tears.sample(15, seed=seed) - ref) > 0.05
        assert 0 < changed.mean() < 0.15
        # thin curves: the changed area is a few pixels wide along its skeleton
        assert changed.sum() / skeletonize(changed).sum() < 8


def test_inversion_and_stain_remap(plates):
    base = SectionSynthesizer(plates, _cfg(), work_size=WORK)
    inv = SectionSynthesizer(plates, _cfg(invert=1.0), work_size=WORK)
    img, flipped = base.sample(16, seed=0), inv.sample(16, seed=0)
    border = np.concatenate([flipped[0], flipped[-1], flipped[:, 0], flipped[:, -1]])
    assert np.median(border) > 0.7 and np.median(np.concatenate([img[0], img[-1]])) < 0.1
    tissue = img > 0.15
    assert np.corrcoef(img[tissue], flipped[tissue])[0, 1] < -0.9
    remap = SectionSynthesizer(plates, _cfg(modality=1.0), work_size=WORK)
    from scipy.stats import spearmanr

    rhos = [spearmanr(img[tissue], remap.sample(16, seed=k)[tissue])[0] for k in range(6)]
    assert min(rhos) < 0.8  # not a monotonic map of the plate's intensities


def test_list_of_plates_labels_and_blend(atlas):
    ref, lab = atlas
    plates = Plates.from_reference(
        [ref[k, 4:, :50] for k in (8, 12, 16)], [lab[k, 4:, :50] for k in (8, 12, 16)]
    )
    synth = SectionSynthesizer(plates, SynthesisConfig(), work_size=WORK, seed=0)
    for i in range(3):
        s = synth.sample_with_truth(i)
        assert np.all(s.coords[0] == i)
        ry, rx = np.round(s.coords[1]).astype(int), np.round(s.coords[2]).astype(int)
        ok = (ry >= 0) & (ry < 52) & (rx >= 0) & (rx < 50)
        assert ok.mean() > 0.5
        np.testing.assert_array_equal(s.labels[ok], plates.labels(i)[ry[ok], rx[ok]])
    blended = SectionSynthesizer(plates, _cfg(blend=0.5), work_size=WORK)
    s = blended.sample_with_truth(1, seed=3)
    assert s.params["blend_plate"] in (0, 2) and 0 < s.params["blend"] <= 0.5
    plain = SectionSynthesizer(plates, _cfg(), work_size=WORK).sample(1, seed=3)
    assert s.image.shape == plain.shape and not np.allclose(s.image, plain)


def test_inputs_not_modified(atlas):
    ref, lab = atlas
    before = ref.copy(), lab.copy()
    synth = SectionSynthesizer(Plates.from_reference(ref, lab), SynthesisConfig(), work_size=WORK)
    for i in range(10):
        synth.sample_with_truth(i * 3)
    np.testing.assert_array_equal(ref, before[0])
    np.testing.assert_array_equal(lab, before[1])


def test_config_round_trip_and_errors(plates):
    cfg = SynthesisConfig(max_tilt=7.5, scale=(1.1, 1.3))
    back = SynthesisConfig.from_dict(cfg.to_dict())
    assert back == cfg and back.scale == (1.1, 1.3)
    assert SynthesisConfig.none().partial == 0 and SynthesisConfig.none().scale == (1.0, 1.0)
    with pytest.raises(InputError, match="Unknown option.*'tilt'"):
        SynthesisConfig.from_dict({"tilt": 3})
    with pytest.raises(InputError, match="partial must be at most 1"):
        SynthesisConfig.from_dict({"partial": 2})
    with pytest.raises(InputError, match="low <= high"):
        SynthesisConfig.from_dict({"scale": [1.5, 1.0]})
    with pytest.raises(InputError, match="max_tilt must be a finite number"):
        SectionSynthesizer(plates, SynthesisConfig(max_tilt=float("nan")))
    with pytest.raises(InputError, match="out of range: the atlas has 32 plates"):
        SectionSynthesizer(plates, work_size=WORK).sample(32)
    with pytest.raises(InputError, match="needs Plates"):
        SectionSynthesizer(np.zeros((4, 20, 20)))
    with pytest.raises(InputError, match="work_size must be at least 16"):
        SectionSynthesizer(plates, work_size=4)


def test_plate_spacing_scales_the_tilt(z_plates):
    one = SectionSynthesizer(z_plates, _cfg(max_tilt=10.0), work_size=WORK)
    four = SectionSynthesizer(z_plates, _cfg(max_tilt=10.0), work_size=WORK, plate_spacing=4.0)
    for seed in range(3):
        a, b = one.sample_with_truth(16, seed=seed), four.sample_with_truth(16, seed=seed)
        assert a.params["pitch"] == b.params["pitch"]
        slopes = []
        for t in (a, b):  # plates per native pixel along y and x: a plane fitted to the coordinates
            design = np.stack([np.ones(t.coords[1].size), t.coords[1].ravel(), t.coords[2].ravel()], 1)
            slopes.append(np.linalg.lstsq(design, t.coords[0].ravel(), rcond=None)[0][1:])
        np.testing.assert_allclose(slopes[1], slopes[0] / 4, atol=1e-5)
        assert np.abs(slopes[0]).max() > 0.02
    with pytest.raises(InputError, match="plate_spacing must be greater than 0"):
        SectionSynthesizer(z_plates, plate_spacing=0)


def test_squeeze_and_elastic_stretch_the_tissue(plates):
    whole = SectionSynthesizer(plates, _cfg(), work_size=WORK)
    squeezed = SectionSynthesizer(plates, _cfg(squeeze=0.4), work_size=WORK)
    stretched = SectionSynthesizer(plates, _cfg(elastic=0.05), work_size=WORK)
    for seed in range(4):
        base = whole.sample_with_truth(14, seed=seed)
        s = squeezed.sample_with_truth(14, seed=seed)
        ratio = _tissue(s.image) / _tissue(base.image)
        assert ratio == pytest.approx(1 - s.params["squeeze"], abs=0.06)
        e = stretched.sample_with_truth(14, seed=seed)
        shift = np.hypot(*(e.coords[1:] - base.coords[1:]))
        y0, y1, x0, x1 = stretched.frame_box(14)
        native_px = e.params["elastic"] * max(y1 - y0, x1 - x0) / WORK  # work pixels -> native pixels
        assert 0 < shift.max() <= 1.8 * native_px + 1e-3  # two fields of about [-1, 1] (cubic overshoot)
        assert np.abs(np.diff(shift, axis=1)).max() < 0.2 * shift.max() + 1e-3  # smooth


def test_brightfield_plates_keep_a_bright_background(atlas):
    """Nissl-like plates (dark tissue on white): padding, cuts and holes show white, not black."""
    ref, _ = atlas
    rgb = [np.stack([1 - ref[k] * 0.8, 1 - ref[k] * 0.9, 1 - ref[k] * 0.6], axis=-1) for k in (10, 16, 22)]
    plates = Plates.from_reference(rgb)
    whole = SectionSynthesizer(plates, _cfg(crop_pad=0.1), work_size=WORK)
    part = SectionSynthesizer(plates, _cfg(crop_pad=0.1, partial=1.0, holes=1.0), work_size=WORK)
    for seed in range(4):
        img, cut = whole.sample(1, seed=seed), part.sample(1, seed=seed)
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        assert np.median(border) > 0.9
        assert np.count_nonzero(cut < 0.7) < 0.93 * np.count_nonzero(img < 0.7)  # less dark tissue
        assert np.count_nonzero(cut < 0.05) <= np.count_nonzero(img < 0.05)  # nothing turned black


def _high_pass(image: np.ndarray) -> np.ndarray:
    return image - ndi.gaussian_filter(image, 2.0)


@pytest.fixture(scope="module")
def textured(atlas):
    """The toy atlas with a fixed cell-like texture on its tissue (as real atlases have)."""
    ref, lab = atlas
    noise = np.random.default_rng(0).standard_normal(ref.shape).astype(np.float32)
    return np.clip(ref * (1 + 0.35 * noise), 0, 1), lab


def test_restaining_keeps_labels_and_replaces_the_texture(textured):
    """Per-region restaining: same geometry and labels, a gain of its own per region, none of the
    atlas's fine texture (its fingerprint) left; the background stays background."""
    plates = Plates.from_reference(*textured)
    plain = SectionSynthesizer(plates, _cfg(), work_size=WORK)
    restained = SectionSynthesizer(plates, _cfg(restain=1.0), work_size=WORK)
    spreads = []
    for seed in range(5):
        a, b = plain.sample_with_truth(16, seed=seed), restained.sample_with_truth(16, seed=seed)
        assert b.params["restain"] == "regions"
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.coords, b.coords)
        inner = ndi.binary_erosion(a.labels > 0, iterations=3)
        values = [v for v in np.unique(a.labels[inner]) if np.count_nonzero(inner & (a.labels == v)) > 30]
        old = np.array([a.image[inner & (a.labels == v)].mean() for v in values])
        new = np.array([b.image[inner & (b.labels == v)].mean() for v in values])
        spreads.append(np.std(np.log(new / old)))  # 0 if every region kept its relative level
        texture = np.corrcoef(_high_pass(a.image)[inner], _high_pass(b.image)[inner])[0, 1]
        assert texture < 0.3  # the atlas's texture is gone
        far = ~ndi.binary_dilation(a.image > 0.05, iterations=6)
        assert np.abs(b.image[far] - a.image[far]).max() < 0.02
    assert 0.1 < np.median(spreads) < 3 * RESTAIN_GAIN  # a gain per region, about as drawn


def test_restaining_without_labels_smooths_and_retextures(textured):
    plates = Plates.from_reference(textured[0])
    plain = SectionSynthesizer(plates, _cfg(), work_size=WORK)
    restained = SectionSynthesizer(plates, _cfg(restain=1.0), work_size=WORK)
    for seed in range(3):
        a, b = plain.sample(16, seed=seed), restained.sample_with_truth(16, seed=seed)
        assert b.params["restain"] == "smooth" and b.labels is None
        tissue = ndi.binary_erosion(a > 0.15, iterations=3)
        coarse = np.corrcoef(ndi.gaussian_filter(a, 6)[tissue], ndi.gaussian_filter(b.image, 6)[tissue])[0, 1]
        assert coarse > 0.6  # the plate's structure stays
        assert np.corrcoef(_high_pass(a)[tissue], _high_pass(b.image)[tissue])[0, 1] < 0.3


def test_flip_mirrors_the_section_and_its_truth(plates):
    plain = SectionSynthesizer(plates, _cfg(rotation=8.0, squeeze=0.1), work_size=WORK)
    flipping = SectionSynthesizer(plates, _cfg(rotation=8.0, squeeze=0.1, flip=1.0), work_size=WORK)
    for seed in range(3):
        a, b = plain.sample_with_truth(12, seed=seed), flipping.sample_with_truth(12, seed=seed)
        assert b.params["flip"] is True
        np.testing.assert_allclose(b.coords, a.coords[:, :, ::-1], atol=1e-4)
        np.testing.assert_allclose(b.image, a.image[:, ::-1], atol=1e-4)
        np.testing.assert_array_equal(b.labels, a.labels[:, ::-1])


def test_depth_warp_bends_the_cut_about_its_plate(z_plates):
    """A straight cut through another brain reaches neighbouring plates in places; its centre stays."""
    straight = SectionSynthesizer(z_plates, _cfg(), work_size=WORK)
    warped = SectionSynthesizer(z_plates, _cfg(depth_warp=0.1), work_size=WORK)
    spans = []
    for seed, i in enumerate((8, 14, 20, 24)):
        a, b = straight.sample_with_truth(i, seed=seed), warped.sample_with_truth(i, seed=seed)
        tissue = b.image > 0.15
        assert np.ptp(a.coords[0]) < 1e-4
        assert abs(b.coords[0][tissue].mean() - i) < 0.3
        assert np.abs(b.coords[0] - i).max() <= 1.8 * b.params["depth_warp"] + 0.3
        assert np.abs(np.diff(b.coords[0], axis=1)).max() < 0.2  # smooth: no jumps between pixels
        spans.append(np.ptp(b.labels[tissue]))
    assert max(spans) >= 2
