"""Tests of the synthetic / bundled data generators and the npe2 sample-data functions."""

from __future__ import annotations

import numpy as np
import pytest

from napari_nephi.core import (
    AffineTransform,
    DisplacementTransform,
    InputError,
    PerSectionTransform,
    jacobian_determinant,
)
from napari_nephi.synthetic import (
    ATLAS_REGIONS,
    em_stack,
    ihc_pair,
    ihc_stains,
    mri_pair,
    mri_volume,
    random_smooth_displacement,
    rotation_matrix,
    section_from_atlas,
    tc_pair,
    toy_atlas,
    triangles_and_circles,
)


def _corr(a, b) -> float:
    return float(np.corrcoef(np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64))[0, 1])


def _phys_norm(u, spacing):
    sp = np.asarray(spacing, dtype=np.float64).reshape((-1,) + (1,) * (u.ndim - 1))
    return np.sqrt(((u.astype(np.float64) * sp) ** 2).sum(0))


# -- random_smooth_displacement -------------------------------------------------------------

FIELD_CASES = [
    ((96, 80), 6.0, 12.0, None),
    ((64, 64), 9.0, 8.0, None),
    ((20, 28, 24), 3.0, 6.0, None),
    ((16, 24, 24), 5.0, 10.0, (2.0, 1.0, 1.0)),
]


@pytest.mark.parametrize(("shape", "max_disp", "smooth", "spacing"), FIELD_CASES)
def test_random_field_is_bounded_diffeomorphism(shape, max_disp, smooth, spacing):
    u = random_smooth_displacement(shape, max_disp, smooth, seed=3, spacing=spacing)
    assert u.shape == (len(shape), *shape)
    assert u.dtype == np.float32
    assert np.all(np.isfinite(u))
    det = jacobian_determinant(u)
    assert det.min() > 0, "the field folds"
    norm = _phys_norm(u, spacing if spacing is not None else (1.0,) * len(shape))
    assert norm.max() <= max_disp + 1e-5  # a real bound ...
    assert norm.max() >= 0.95 * max_disp  # ... that is nearly reached
    # it is not a translation: the field varies
    assert np.std(u) > 0.1 * max_disp / 3


def test_random_field_seeded_and_zero_on_border():
    a = random_smooth_displacement((48, 40), 4.0, 8.0, seed=7)
    b = random_smooth_displacement((48, 40), 4.0, 8.0, seed=7)
    c = random_smooth_displacement((48, 40), 4.0, 8.0, seed=8)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.5
    for edge in (a[:, 0], a[:, -1], a[:, :, 0], a[:, :, -1]):
        assert np.abs(edge).max() < 1e-6
    free = random_smooth_displacement((48, 40), 4.0, 8.0, seed=7, zero_boundary=False)
    assert np.abs(free[:, 0]).max() > 0.05


@pytest.mark.parametrize("shape", [(64, 72), (20, 24, 28)])
def test_random_field_inverse(shape):
    u, u_inv = random_smooth_displacement(shape, 4.0, 8.0, seed=1, return_inverse=True)
    # map of u, then map of u_inv: the identity
    both = DisplacementTransform(u).then(DisplacementTransform(u_inv)).displacement(shape)
    assert np.abs(both).max() < 5e-3
    assert jacobian_determinant(u_inv).min() > 0
    # same u with or without the inverse
    np.testing.assert_array_equal(u, random_smooth_displacement(shape, 4.0, 8.0, seed=1))


def test_random_field_refuses_folding_and_bad_input():
    with pytest.raises(InputError, match="folds"):
        random_smooth_displacement((32, 32), 50.0, 2.0, seed=0)
    with pytest.raises(InputError):
        random_smooth_displacement((32,), 1.0, 4.0)
    with pytest.raises(InputError):
        random_smooth_displacement((32, 32), 1.0, 0.0)
    zero = random_smooth_displacement((16, 16), 0.0, 4.0)
    assert zero.shape == (2, 16, 16) and not zero.any()


# -- triangles and circles ------------------------------------------------------------------


def test_triangles_and_circles_labels_match_image():
    images, labels = triangles_and_circles(n=4, size=96, seed=2)
    assert images.shape == labels.shape == (4, 96, 96)
    assert images.dtype == np.float32 and labels.dtype == np.uint8
    assert images.min() >= 0 and images.max() <= 1
    for img, lab in zip(images, labels):
        assert set(np.unique(lab)) == {0, 1, 2, 3}
        # labels are the half-intensity outlines: the body (0.35-0.5) is labelled wherever the
        # image is above half of its brightest value, and unlabelled pixels stay below it
        assert np.all(lab[img > 0.26] > 0)
        assert img[lab == 0].max() <= 0.25 + 1e-6
        assert np.mean(img[lab == 1] > 0.3) > 0.9
        # circles and triangles are brighter than the body around them
        inner = np.isin(lab, (2, 3))
        assert img[inner].mean() > img[lab == 1].mean() + 0.15
    again, _ = triangles_and_circles(n=4, size=96, seed=2)
    np.testing.assert_array_equal(images, again)
    other, _ = triangles_and_circles(n=4, size=96, seed=3)
    assert np.abs(images - other).max() > 0.3


def test_tc_pair_corresponds():
    fixed, moving, fl, ml = tc_pair(seed=5)
    assert fixed.shape == moving.shape == fl.shape == ml.shape == (128, 128)
    assert set(np.unique(fl)) == set(np.unique(ml)) == {0, 1, 2, 3}
    assert np.abs(fixed - moving).max() > 0.3  # it needs registering
    for k in (1, 2, 3):
        a, b = np.count_nonzero(fl == k), np.count_nonzero(ml == k)
        assert 0.6 < a / b < 1.6
    f0, m0, _, _ = tc_pair(seed=5, strength=0.0)
    np.testing.assert_array_equal(f0, m0)


# -- bundled pairs with ground truth ---------------------------------------------------------


def test_ihc_pair_ground_truth_is_pull_back():
    fixed, moving, disp = ihc_pair(seed=0, max_displacement=10.0)
    stains = ihc_stains()
    assert fixed.shape == moving.shape == (512, 512)
    assert fixed.dtype == moving.dtype == np.float32
    assert disp.shape == (2, 512, 512)
    np.testing.assert_array_equal(fixed, stains["hematoxylin"])
    assert np.hypot(*disp).max() <= 10.0 + 1e-5
    back = DisplacementTransform(disp).warp(moving)
    inner = (slice(16, -16), slice(16, -16))
    assert _corr(back[inner], stains["dab"][inner]) > 0.99
    assert _corr(moving[inner], stains["dab"][inner]) < 0.95  # the deformation is not trivial
    # the opposite direction does not undo it
    wrong = DisplacementTransform(-disp).warp(moving)
    assert _corr(wrong[inner], stains["dab"][inner]) < _corr(back[inner], stains["dab"][inner]) - 0.1


def test_ihc_pair_options():
    fixed, moving, disp = ihc_pair(
        seed=1, moving_stain="gray", downscale=2, max_displacement=5, smoothness=20
    )
    assert fixed.shape == moving.shape == (256, 256) and disp.shape == (2, 256, 256)
    back = DisplacementTransform(disp).warp(moving)
    assert _corr(back[8:-8, 8:-8], ihc_stains(2)["gray"][8:-8, 8:-8]) > 0.98
    with pytest.raises(InputError):
        ihc_pair(moving_stain="eosin")


def test_mri_pair_ground_truth_is_pull_back():
    import nibabel

    from napari_nephi.synthetic import mri_path

    vol, spacing = mri_volume()
    assert vol.shape == nibabel.load(mri_path()).shape[::-1]  # (k, j, i) = (z, y, x)
    fixed, moving, disp, sp = mri_pair(seed=0, max_displacement=6.0)
    assert sp == spacing == (2.0, 2.0, 2.0)
    np.testing.assert_array_equal(fixed, vol)
    assert disp.shape == (3, *fixed.shape) and disp.dtype == np.float32
    assert _phys_norm(disp, sp).max() <= 6.0 + 1e-5
    assert jacobian_determinant(disp).min() > 0
    back = DisplacementTransform(disp, spacing=sp).warp(moving)
    before, after = _corr(moving, fixed), _corr(back, fixed)
    assert after > 0.97 and after > before + 0.03
    assert np.abs(back - fixed).mean() < 0.75 * np.abs(moving - fixed).mean()


# -- EM stack ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def em():
    return em_stack(n_sections=6, shape=(160, 192), seed=4, rotate=True)


def test_em_stack_structure(em):
    n = 6
    pad = em["pad"]
    assert pad == int(np.ceil(np.hypot(160, 192) / 2 - 80))
    shape = (n, 160 + 2 * pad, 192 + 2 * pad)
    for key in ("stack", "unrotated_stack"):
        assert em[key].shape == shape and em[key].dtype == np.uint8
    for key in ("masks", "unrotated_masks"):
        assert em[key].shape == shape and em[key].dtype == np.uint16
    assert em["matrices"].shape == (n, 3, 3) and em["angles"].shape == (n,)
    assert np.all(np.abs(em["angles"]) < np.pi)
    # the padding is empty in the aligned stack
    assert not em["unrotated_stack"][:, :pad].any() and not em["unrotated_masks"][:, :, -pad:].any()
    ids = [set(np.unique(m)) - {0} for m in em["unrotated_masks"]]
    assert len(ids[0]) >= 5
    assert len(ids[0] & ids[-1]) >= 0.7 * len(ids[0])  # the same mitochondria through depth


def test_em_masks_are_dark_mitochondria(em):
    img, masks, pad = em["unrotated_stack"], em["unrotated_masks"], em["pad"]
    section = np.zeros(img.shape, bool)
    section[:, pad:-pad, pad:-pad] = True
    mito = masks > 0
    rest = section & ~mito
    assert mito.any() and np.all(section[mito])
    assert img[mito].mean() < img[rest].mean() - 50
    assert np.mean(img[mito] < np.median(img[rest])) > 0.97


def test_em_matrices_recover_unrotated(em):
    stack, unrot, pad = em["stack"], em["unrotated_stack"], em["pad"]
    inner = np.zeros(stack.shape[1:], bool)
    inner[pad + 4 : -pad - 4, pad + 4 : -pad - 4] = True
    for k in range(stack.shape[0]):
        m = em["matrices"][k]
        np.testing.assert_allclose(m, rotation_matrix(em["angles"][k], stack.shape[1:]))
        assert abs(np.linalg.det(m[:2, :2]) - 1) < 1e-9
        back = AffineTransform(m).warp(stack[k].astype(np.float32))
        assert _corr(back[inner], unrot[k][inner]) > 0.95
        assert _corr(stack[k][inner], unrot[k][inner]) < 0.5  # rotated: misaligned
        labels = AffineTransform(m).warp_labels(em["masks"][k])
        assert np.mean(labels[inner] == em["unrotated_masks"][k][inner]) > 0.99
    whole = PerSectionTransform(em["matrices"]).warp(stack.astype(np.float32))
    assert _corr(whole[:, inner], unrot[:, inner]) > 0.95


def test_em_stack_unrotated_and_seeded():
    a = em_stack(n_sections=3, shape=(96, 128), seed=1, rotate=False)
    b = em_stack(n_sections=3, shape=(96, 128), seed=1, rotate=False)
    assert a["pad"] == 0 and a["stack"].shape == (3, 96, 128)
    np.testing.assert_array_equal(a["stack"], b["stack"])
    np.testing.assert_array_equal(a["stack"], a["unrotated_stack"])
    np.testing.assert_array_equal(a["matrices"], np.repeat(np.eye(3)[None], 3, axis=0))
    c = em_stack(n_sections=3, shape=(96, 128), seed=2, rotate=False)
    assert not np.array_equal(a["stack"], c["stack"])
    # consecutive sections agree much better than a noise-free random pairing would
    assert _corr(a["stack"][0], a["stack"][1]) > 0.5
    with pytest.raises(InputError):
        em_stack(n_sections=0)


# -- toy atlas --------------------------------------------------------------------------------


def test_toy_atlas_regions():
    ref, labels = toy_atlas(shape=(40, 48, 56), seed=0)
    assert ref.shape == labels.shape == (40, 48, 56)
    assert ref.dtype == np.float32 and labels.dtype == np.uint16
    assert ref.min() >= 0 and ref.max() <= 1
    present = set(np.unique(labels))
    assert 0 in present and len(present - {0}) >= 10
    assert present <= set(ATLAS_REGIONS)
    # hemispheres: left cortex on the left half, right cortex on the right half
    xs = np.nonzero(labels == 1)[2]
    assert xs.max() < 56 / 2 and np.nonzero(labels == 2)[2].min() >= 56 / 2 - 1
    assert ref[labels == 0].mean() < 0.1 < ref[labels > 0].mean()
    # plates differ along z: far plates less alike than near ones
    assert _corr(ref[20], ref[21]) > _corr(ref[20], ref[35]) + 0.1


def test_section_from_atlas():
    ref, labels = toy_atlas(shape=(32, 40, 48), seed=1)
    plate = section_from_atlas(ref, 12)
    np.testing.assert_allclose(plate, ref[12], atol=1e-6)
    img, lab, coords = section_from_atlas((ref, labels), 12, tilt_degrees=(15, 10), return_coords=True)
    assert img.shape == lab.shape == (40, 48) and coords.shape == (3, 40, 48)
    assert set(np.unique(lab)) <= set(np.unique(labels))
    assert np.ptp(coords[0]) > 5  # oblique: the cut crosses several plates
    assert np.abs(img - ref[12]).mean() > 0.01
    part, part_lab = section_from_atlas(ref, 12.5, 5.0, crop=(0.1, 0.2, 0.0, 0.5), labels=labels)
    assert part.shape == part_lab.shape == (40 - 4 - 8, 24)
    with pytest.raises(InputError):
        section_from_atlas(ref, 3, crop=(0.6, 0.5, 0, 0))


# -- npe2 sample data ------------------------------------------------------------------------

SAMPLES = {
    "tc_sample": (2, 4),
    "ihc_sample": (2, 2),
    "mri_sample": (3, 2),
    "em_sample": (3, 2),
    "atlas_sample": (3, 3),
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_functions_return_layer_data(name):
    from napari_nephi import sample_data

    ndim, count = SAMPLES[name]
    layers = getattr(sample_data, name)()
    assert isinstance(layers, list) and len(layers) == count
    names = set()
    for item in layers:
        assert isinstance(item, tuple) and len(item) == 3
        data, kwargs, kind = item
        assert kind in ("image", "labels")
        assert isinstance(data, np.ndarray) and data.size > 0
        assert data.ndim in (ndim, 2)
        assert len(kwargs["scale"]) == data.ndim
        assert all(s > 0 for s in kwargs["scale"])
        if kind == "labels":
            assert data.dtype.kind in "ui" and data.max() > 0
        else:
            assert np.issubdtype(data.dtype, np.number) and np.ptp(data) > 0
        names.add(kwargs["name"])
    assert len(names) == count
    assert layers[0][0].ndim == ndim
    if name == "mri_sample":
        assert tuple(layers[0][1]["scale"]) == (2.0, 2.0, 2.0)
    if name in ("ihc_sample", "mri_sample"):
        fixed, moving = layers[0][0], layers[1][0]
        disp = layers[1][1]["metadata"]["true_displacement"]
        back = DisplacementTransform(disp).warp(moving)
        if name == "mri_sample":
            assert _corr(back, fixed) > _corr(moving, fixed)
        else:  # one stain: undone, the deformation leaves the fixed image up to its staining
            inner = (slice(8, -8),) * 2
            assert _corr(back[inner], fixed[inner]) > 0.99 > 0.8 > _corr(moving[inner], fixed[inner])


def test_sample_layers_build_in_napari():
    layers_mod = pytest.importorskip("napari.layers")
    from napari_nephi import sample_data

    for name in SAMPLES:
        for data, kwargs, kind in getattr(sample_data, name)():
            layer = layers_mod.Layer.create(data, kwargs, kind)
            assert layer.name == kwargs["name"]
            np.testing.assert_allclose(layer.scale, kwargs["scale"])


def test_atlas_sample_labels_name_their_regions(make_napari_viewer):
    """The sample's labels carry region names as features, which the Atlas lookup widget reads."""
    from napari_nephi import sample_data
    from napari_nephi.synthetic.atlas import ATLAS_REGIONS
    from napari_nephi.widgets.atlas_widget import region_names_of

    viewer = make_napari_viewer()
    data, kwargs, _ = sample_data.atlas_sample()[1]
    layer = viewer.add_labels(data, **kwargs)
    names = region_names_of(layer)
    assert set(np.unique(data)) - {0} <= set(names)
    assert names[7] == ATLAS_REGIONS[7] == "hippocampus left"
