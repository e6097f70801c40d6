"""MITO engine: accuracy against known rotations, masks, failures, labels, errors, lazy input."""

import collections
import threading
import tracemalloc

import cv2
import numpy as np
import pytest

import napari_nephi
from napari_nephi.core.errors import Cancelled, DimensionMismatchError, InputError
from napari_nephi.core.transform import AffineTransform, PerSectionTransform
from napari_nephi.engines.mito import (
    align_stack,
    detect_mitochondria,
    match_pair,
    warp_masks,
    warp_sections,
)
from napari_nephi.engines.mito import features as ft
from napari_nephi.engines.mito.background import runs as background_runs
from napari_nephi.io import read_section_folder, write_tiff
from napari_nephi.synthetic import rotation_matrix

SWAP = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def dice(a, b):
    a, b = a > 0, b > 0
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


# -- conventions -----------------------------------------------------------------------------------
def test_opencv_xy_fit_becomes_yx_pull_back():
    rng = np.random.default_rng(0)
    src_yx = rng.uniform(0, 200, (40, 2))
    dst_yx = src_yx + (3.0, -5.0)  # moved down 3 rows, left 5 columns
    for model in ft.MODELS:
        m_xy, inl = ft.fit_model(src_yx[:, ::-1], dst_yx[:, ::-1], model, 1.0)
        assert inl.all()
        m = ft.xy_to_yx(m_xy)
        np.testing.assert_allclose(m[:2, 2], (3.0, -5.0), atol=1e-6)
        np.testing.assert_allclose(m[:2, :2], np.eye(2), atol=1e-6)
    # a general homography: our (y, x) matrix maps (y, x) points as OpenCV maps (x, y) ones
    h_xy = np.array([[1.01, 0.05, 4.0], [-0.03, 0.98, -7.0], [1e-4, -2e-4, 1.0]])
    moved_xy = cv2.perspectiveTransform(src_yx[:, ::-1].reshape(-1, 1, 2), h_xy).reshape(-1, 2)
    h_yx = ft.xy_to_yx(h_xy)
    q = np.c_[src_yx, np.ones(len(src_yx))] @ h_yx.T
    np.testing.assert_allclose(q[:, :2] / q[:, 2:], moved_xy[:, ::-1], atol=1e-6)
    # the rotation read from a (y, x) matrix follows synthetic.rotation_matrix's sign
    from napari_nephi.synthetic import rotation_matrix

    assert ft.rotation_degrees(rotation_matrix(0.5, (64, 64))) == pytest.approx(np.degrees(0.5))


# -- accuracy --------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, selection", [("homography", True), ("similarity", False), ("rigid", False)])
def test_known_rotations_recovered_within_one_pixel(rotated_copies, max_error, model, selection):
    d = rotated_copies
    reg = align_stack(d["stack"], d["masks"], model=model, model_selection=selection, workers=2)
    assert isinstance(reg.transform, PerSectionTransform)
    assert reg.transform.matrices.shape == (5, 3, 3)
    err = max_error(reg.transform.matrices, d["matrices"], 0, d["stack"].shape[1:], d["pad"])
    assert err[0] == 0.0
    assert err.max() < 1.0, err
    report = reg.metrics["report"]
    assert [r["section"] for r in report] == list(range(5))
    assert not any(r["failed"] for r in report)
    assert all(r["inliers"] >= 10 for r in report[1:])
    if not selection:
        assert all(r["model"] == model for r in report[1:])
    # the aligned stack is the reference section everywhere (same content, same frame)
    ref_mask = d["masks"][0]
    aligned = warp_masks(reg, d["masks"])
    for k in range(1, 5):
        assert dice(aligned[k], ref_mask) > 0.97


def test_synthetic_stack_rotations_recovered(em, max_error):
    """The generator's stack: the content changes between sections, the maps are rotations.

    Pairwise errors accumulate along the chain, so the 1 px check uses the middle reference
    (chains of 2-3 pairs); the default (reference 0, homography) gets 1.5 px.
    """
    reg = align_stack(em["stack"], em["masks"], model="rigid", reference="middle")
    assert reg.metrics["reference"] == 2
    np.testing.assert_allclose(reg.transform.matrices[2], np.eye(3))
    err = max_error(reg.transform.matrices, em["matrices"], 2, em["stack"].shape[1:], em["pad"])
    assert err.max() < 1.0, err
    default = align_stack(em["stack"], em["masks"], warp=False)
    assert default.warped is None
    err = max_error(default.transform.matrices, em["matrices"], 0, em["stack"].shape[1:], em["pad"])
    assert err.max() < 0.5, err
    assert default.metrics["refined_sections"] == [1, 2, 3, 4, 5]
    assert {r["model"] for r in default.metrics["report"][1:]} == {"rigid"}  # the truth: rotations
    # without the sub-pixel refinement (RANSAC on whole-pixel FAST corners only) it is worse
    coarse = align_stack(em["stack"], em["masks"], warp=False, refine=False)
    assert not coarse.metrics["refined_sections"]
    err_coarse = max_error(coarse.transform.matrices, em["matrices"], 0, em["stack"].shape[1:], em["pad"])
    assert err.mean() < 0.6 * err_coarse.mean(), (err, err_coarse)
    assert reg.warped.shape == em["stack"].shape and reg.warped.dtype == np.uint8
    # .warped agrees with the generic (torch) per-section warp of the same transform
    ref = reg.transform.warp(em["stack"].astype(np.float32))
    inside = ref > 0
    assert np.abs(reg.warped[inside].astype(np.float32) - ref[inside]).mean() < 1.0


@pytest.mark.parametrize(
    "detector, descriptor, matcher",
    [
        ("mito", "orb", "bf"),
        ("mito", "freak", "flann"),
        ("mito", "sift", "flann"),
        ("orb", "orb", "flann"),
        ("brisk", "brisk", "bf"),
        ("fast", "freak", "bf"),
        ("sift", "sift", "bf"),
    ],
)
def test_detectors_descriptors_matchers(rotated_copies, max_error, detector, descriptor, matcher):
    d = rotated_copies
    reg = align_stack(
        d["stack"], d["masks"], detector=detector, descriptor=descriptor, matcher=matcher, warp=False
    )
    err = max_error(reg.transform.matrices, d["matrices"], 0, d["stack"].shape[1:], d["pad"])
    assert err.max() < 1.5, err
    assert not reg.metrics["failed_sections"]


def _warped_copies(section, mask, matrices):
    """``section`` and ``mask`` resampled with each (y, x) pull-back matrix (content -> section)."""
    stack, masks = [], []
    for m in matrices:
        inv_xy = (SWAP @ np.linalg.inv(m) @ SWAP)[:2]
        size = section.shape[::-1]
        stack.append(cv2.warpAffine(section, inv_xy, size, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP))
        masks.append(cv2.warpAffine(mask, inv_xy, size, flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP))
    return np.stack(stack), np.stack(masks)


def test_refinement_chooses_the_model_the_sections_need(em, max_error):
    """Compressed / sheared sections get an affine map, recovered to a small fraction of a pixel."""
    base, base_mask = em["unrotated_stack"][2], em["unrotated_masks"][2]
    shape = base.shape
    c = (np.array(shape) - 1) / 2.0

    def about_centre(a):
        m = np.eye(3)
        m[:2, :2] = a
        m[:2, 2] = c - a @ c
        return m

    mats = np.stack(
        [
            rotation_matrix(0.3, shape),
            rotation_matrix(-2.0, shape) @ about_centre(np.diag([1.04, 1.0])),  # compressed 4 % in y
            rotation_matrix(1.1, shape) @ about_centre(np.array([[1.0, 0.03], [0.0, 1.0]])),  # sheared
            rotation_matrix(2.9, shape),
        ]
    )
    stack, masks = _warped_copies(base, base_mask, mats)
    chain = align_stack(stack, masks, warp=False, neighbours=1)  # homography allowed, model selection on
    rows = chain.metrics["report"]
    assert [r["model"] for r in rows[1:]] == ["affine"] * 3
    assert all(r["refined"] and r["tracks"] >= 50 and r["tracking_error"] < 0.2 for r in rows[1:])
    err = max_error(chain.transform.matrices, mats, 0, shape, em["pad"])
    assert err.max() < 0.2, err
    # the default global solve (affine sections) keeps the sections' own compression and shear ...
    free = align_stack(stack, masks, warp=False, drift_prior=0.0)
    assert free.settings["solver"] == "global" and free.settings["global_model"] == "affine"
    assert max_error(free.transform.matrices, mats, 0, shape, em["pad"]).max() < 0.1
    # ... its default drift prior (0.1) holds back about 3 % of them (0.19 px at the 4 % compression)
    default = align_stack(stack, masks, warp=False)
    assert max_error(default.transform.matrices, mats, 0, shape, em["pad"]).max() < 0.3
    # a rigid model cannot follow the compression: several pixels off, pair by pair or globally
    for kw in ({"model": "rigid", "neighbours": 1}, {"global_model": "rigid"}):
        rigid = align_stack(stack, masks, warp=False, **kw)
        assert max_error(rigid.transform.matrices, mats, 0, shape, em["pad"]).max() > 3.0, kw


class LazyRotations:
    """A lazy ``(n, y, x)`` stack: section ``k`` is made on access by rotating one section; reads counted."""

    def __init__(self, section, angles, flags=cv2.INTER_LINEAR):
        self.section, self.angles, self.flags = section, angles, flags
        self.shape = (len(angles), *section.shape)
        self.dtype = section.dtype
        self.ndim = 3
        self.reads = collections.Counter()

    def __getitem__(self, k):
        self.reads[int(k)] += 1
        m = rotation_matrix(self.angles[int(k)], self.section.shape)
        inv_xy = (SWAP @ np.linalg.inv(m) @ SWAP)[:2]
        size = self.section.shape[::-1]
        return cv2.warpAffine(self.section, inv_xy, size, flags=self.flags | cv2.WARP_INVERSE_MAP)


@pytest.mark.parametrize("neighbours", [1, 2, 3])
def test_long_lazy_stack_read_once_in_bounded_memory(em, neighbours):
    """Every section is read (and its features computed) once; memory does not grow with n.

    The window of sections held at once grows with ``neighbours`` and ``workers``, not with n:
    the features of about ``2 (neighbours + 2 workers)`` sections and the pairs in flight, measured
    22 / 42 / 57 sections' worth (1 / 2 / 3 neighbours, 2 workers) of these small 364 x 364 uint8
    sections, whose work images and descriptors weigh more than the section itself; 32 / 49 / 56 at
    the start of session 30 and 33-35 / 50 / 64 with its distortion reading (the ring's point pairs
    of the pairs in flight, bounded by ``distortion.CHUNK``; /tmp/l30/memprobe.py). What grows
    with n is small per section: a report row with its pairs (about 2 KB) and the global solve's
    normal equations, built after the last section (about 10 / 13 KB per section with 2 / 3
    neighbours; a 160-section stack of 1268 x 1524: 2 MB against its 310 MB).
    """
    n = 100
    angles = np.linspace(-3.0, 3.0, n)
    stack = LazyRotations(em["unrotated_stack"][1], angles)
    masks = LazyRotations(em["unrotated_masks"][1], angles, cv2.INTER_NEAREST)
    halves = []

    def halfway(event):  # the peak up to the middle section placed, then up to the last one
        if event.step in (n // 2, n):
            halves.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.reset_peak()

    tracemalloc.start()
    try:
        reg = align_stack(
            stack, masks, model="rigid", warp=False, workers=2, neighbours=neighbours, progress=halfway
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not reg.metrics["failed_sections"]
    section = stack.section.nbytes  # the whole stack: 100 of them, ~13 MB
    assert len(halves) == 2, halves
    # the second half of the sections needs no more than the first (but for the timing of the
    # threads: a few sections' worth; features kept per section would add 50 x 130 KB and more), and
    # the masks kept for drift_correction="auto"'s background (session 23): at most its planned
    # sections' (72 at most, whatever n), packed, a bit each
    kept = len({k for r in background_runs(np.ones(n, bool)) for k in (*r, *(r + 1))}) * (section // 8 + 1)
    assert halves[1] < halves[0] + 8 * section + kept, (halves, section, kept)
    # the window: measured 33-35 / 50 / 64 sections' worth at most (session 30, docstring)
    assert max(halves) < {1: 40, 2: 60, 3: 72}[neighbours] * section, (halves, section)
    # after the last section: the global solve's equations, 10-13 KB per section
    assert peak < max(halves) + (0 if neighbours == 1 else 20_000 * n), (halves, peak)
    # once per section (the reference once more, to size the keypoints from its mitochondria)
    assert stack.reads[0] == 2 and all(stack.reads[k] == 1 for k in range(1, n))
    assert masks.reads[0] == 2 and all(masks.reads[k] == 1 for k in range(1, n))
    # and the result is right: every section's rotation relative to section 0
    for k in (1, n // 2, n - 1):
        diff = ft.rotation_degrees(reg.transform.matrices[k]) - np.degrees(angles[k] - angles[0])
        assert abs((diff + 180.0) % 360.0 - 180.0) < 0.05, (k, diff)


# -- masks -----------------------------------------------------------------------------------------
def test_masks_really_restrict_keypoints(em):
    stack, masks = em["stack"], em["masks"]
    dilation = 12
    res = match_pair(stack, 0, 1, masks, mask_dilation=dilation)
    assert len(res["points_a"]) > 30 and len(res["points_b"]) > 30
    r = dilation + 2  # + rounding of the dilation radius and keypoint positions
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    for k, pts in ((0, res["points_a"]), (1, res["points_b"])):
        allowed = cv2.dilate((masks[k] > 0).astype(np.uint8), kernel)
        iy, ix = np.round(pts).astype(int).T
        assert allowed[iy, ix].all(), f"keypoints outside the dilated masks in section {k}"
    # the same detector without masks puts most keypoints elsewhere: the check above can fail
    free = match_pair(stack, 0, 1, masks, detector="fast", use_masks=False)
    allowed = cv2.dilate((masks[0] > 0).astype(np.uint8), kernel)
    iy, ix = np.round(free["points_a"]).astype(int).T
    assert allowed[iy, ix].mean() < 0.5
    # other detectors use given masks too, unless told not to
    orb = match_pair(stack, 0, 1, masks, detector="orb", descriptor="orb")
    iy, ix = np.round(orb["points_a"]).astype(int).T
    assert len(iy) > 10 and allowed[iy, ix].all()
    # an empty mask leaves no keypoint at all
    none = match_pair(stack, 0, 1, np.zeros_like(masks))
    assert len(none["points_a"]) == 0 and none["matrix"] is None


def test_automatic_masks_find_the_mitochondria(em):
    auto = detect_mitochondria(em["stack"])
    assert auto.shape == em["stack"].shape and auto.dtype == np.uint16
    scores = [dice(a, m) for a, m in zip(auto, em["masks"])]
    assert min(scores) > 0.85, scores
    # labels: one id per connected component
    assert auto[0].max() >= 3
    # a blank section has none
    assert not detect_mitochondria(np.zeros((1, 64, 64), np.uint8)).any()


def test_alignment_with_automatic_masks(em, max_error):
    reg = align_stack(em["stack"])  # detector "mito", no masks: detected automatically
    assert reg.metrics["mask_source"] == "automatic"
    err = max_error(reg.transform.matrices, em["matrices"], 0, em["stack"].shape[1:], em["pad"])
    assert err.max() < 1.5, err


# -- failures --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fill", [0, 128])
def test_blank_or_featureless_section_is_reported_not_fatal(em, max_error, fill):
    stack = em["stack"].copy()
    stack[3] = fill
    reg = align_stack(stack, em["masks"])
    report = reg.metrics["report"]
    assert len(report) == 6
    row = report[3]
    assert row["failed"] and row["fallback"] == "identity" and row["method"] == "identity"
    assert row["tried"]  # what was attempted is listed
    assert 3 in reg.metrics["failed_sections"] and 3 in reg.metrics["identity_sections"]
    # a constant section is named as such, in the report and in a note
    assert reg.metrics["blank_sections"] == {3: f"constant ({fill})"} and row["blank"] == f"constant ({fill})"
    assert f"3 (constant ({fill}))" in reg.metrics["notes"][0]
    # the next section skips the blank one and is still placed correctly
    assert "skip to 2" in report[4]["fallback"] and report[4]["neighbour"] == 2
    err = max_error(reg.transform.matrices, em["matrices"], 0, stack.shape[1:], em["pad"])
    assert np.delete(err, 3).max() < 1.5, err


def test_failed_pair_falls_back_to_another_detector(rotated_copies, max_error):
    d = rotated_copies
    masks = d["masks"].copy()
    masks[2] = 0  # no mitochondria in section 2: the mito detector finds nothing there
    reg = align_stack(d["stack"], masks, fallback=("orb", "identity"))
    rows = reg.metrics["report"]
    assert rows[2]["failed"] and rows[2]["fallback"] == "orb+orb" and rows[2]["method"] == "orb+orb"
    err = max_error(reg.transform.matrices, d["matrices"], 0, d["stack"].shape[1:], d["pad"])
    assert err[2] < 1.5, err


# -- labels ----------------------------------------------------------------------------------------
def test_aligned_labels_keep_values(em):
    reg = align_stack(em["stack"], em["masks"], warp=False)
    masks = em["masks"]
    aligned = warp_masks(reg, masks)
    assert aligned.dtype == masks.dtype and aligned.shape == masks.shape
    assert set(np.unique(aligned)) <= set(np.unique(masks))
    assert len(np.unique(aligned)) >= len(np.unique(masks)) - 1
    # agrees with the generic nearest-neighbour warp of the transform
    generic = reg.transform.warp_labels(masks)
    assert (generic == aligned).mean() > 0.995
    # any integer dtype, large values, kept exactly
    big = masks.astype(np.int64) * 1_000_003 + np.where(masks > 0, 10**12, 0)
    out = warp_sections(big, reg.transform.matrices, labels=True)
    assert out.dtype == np.int64
    assert set(np.unique(out)) <= set(np.unique(big))
    np.testing.assert_array_equal(out > 0, aligned > 0)
    # the aligned masks match the unrotated ground truth (up to the reference's rotation)
    truth = warp_sections(em["unrotated_masks"], np.linalg.inv(em["matrices"][0])[None].repeat(6, 0), True)
    assert np.mean([dice(a, t) for a, t in zip(aligned, truth)]) > 0.9


def test_label_warps_agree_for_every_dtype(em):
    """One code path for every label dtype: the same pixels land in the same places."""
    reg = align_stack(em["stack"], em["masks"], warp=False)
    masks = em["masks"].astype(np.int64)
    values = np.unique(masks)
    assert len(values) > 3
    # a one-to-one relabelling into each dtype's range (largest label the dtype's largest value)
    outs = {}
    for dtype in (np.uint8, np.uint16, np.int32, np.int64, np.float32):
        top = np.iinfo(dtype).max // 2 if np.dtype(dtype).kind in "iu" else 1e30
        new_values = np.linspace(0, top, len(values)).astype(dtype)
        assert len(np.unique(new_values)) == len(values)
        relabelled = new_values[np.searchsorted(values, masks)]
        out = warp_sections(relabelled, reg.transform.matrices, labels=True)
        assert out.dtype == np.dtype(dtype)
        assert set(np.unique(out)) <= set(new_values)
        # back to the original labels to compare dtypes with each other
        outs[dtype] = values[np.searchsorted(new_values, out)]
    first = outs[np.uint8]
    assert (first > 0).mean() > 0.01
    for dtype, out in outs.items():
        np.testing.assert_array_equal(out, first, err_msg=str(dtype))


# -- input errors ----------------------------------------------------------------------------------
def test_clear_errors(em):
    with pytest.raises(InputError, match="2D"):
        align_stack(em["stack"][0])
    with pytest.raises(DimensionMismatchError, match="masks"):
        align_stack(em["stack"], em["masks"][:, :-1])
    with pytest.raises(InputError, match="empty"):
        align_stack(np.zeros((0, 64, 64), np.uint8))
    with pytest.raises(InputError, match="empty"):
        align_stack([])
    with pytest.raises(InputError, match="3D"):
        align_stack(np.zeros((2, 3, 64, 64), np.uint8))
    with pytest.raises(InputError, match="detector"):
        align_stack(em["stack"], detector="surf")
    with pytest.raises(InputError, match="reference"):
        align_stack(em["stack"], reference=6)
    assert issubclass(DimensionMismatchError, InputError)


# -- lazy input, progress, cancel ------------------------------------------------------------------
def test_lazy_section_folder(em, tmp_path):
    folder = tmp_path / "sections"
    folder.mkdir()
    for k, sec in enumerate(em["stack"]):
        write_tiff(folder / f"s{k}.tif", sec)
    lazy, _ = read_section_folder(folder)
    reg = align_stack(lazy, em["masks"], lazy=True)
    eager = align_stack(em["stack"], em["masks"])
    np.testing.assert_allclose(reg.transform.matrices, eager.transform.matrices, atol=1e-9)
    assert hasattr(reg.warped, "dask")  # computed on access, one section at a time
    np.testing.assert_array_equal(np.asarray(reg.warped), eager.warped)
    # a path works as well
    by_path = align_stack(folder, em["masks"], warp=False)
    np.testing.assert_allclose(by_path.transform.matrices, eager.transform.matrices, atol=1e-9)


def test_progress_per_section_and_cancel(em):
    events = []
    align_stack(em["stack"], em["masks"], progress=events.append)
    sections = [e.extra["section"] for e in events if "section" in e.extra]
    assert sorted(sections) == list(range(6))
    assert all("row" in e.extra for e in events if "section" in e.extra)
    assert events[-1].step == events[-1].total == 12  # 6 sections + 6 warped
    flag = threading.Event()

    def stop_after_two(ev):
        if ev.step >= 2:
            flag.set()

    with pytest.raises(Cancelled):
        align_stack(em["stack"], em["masks"], progress=stop_after_two, cancel=flag)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"ratoi": 0.5}, "Unknown option for method 'mito': 'ratoi' \\(did you mean 'ratio'\\?\\)"),
        # options of the iterative engines: keypoint matching has none, so they are refused
        ({"iterations": 10}, "Unknown option for method 'mito': 'iterations'.*Valid options: .*ratio"),
        ({"levels": 2}, "Unknown option for method 'mito': 'levels'"),
        ({"ratio": float("nan")}, "ratio must be a finite number"),
        ({"ransac_threshold": 0}, "ransac_threshold must be greater than 0"),
        ({"max_keypoints": 2.5}, "max_keypoints must be a whole number"),
        ({"refine": "no"}, "refine must be true or false"),
        ({"fast_threshold": 300}, "fast_threshold must be at most 255"),
        ({"detector": "surf"}, "Unknown detector 'surf'"),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else None,
)
def test_pair_engine_checks_option_names_and_values(rotated_copies, options, message):
    fixed, moving = rotated_copies["stack"][:2]
    with pytest.raises(InputError, match=message):
        napari_nephi.register(fixed, moving, method="mito", **options)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_keypoints": "many"}, "max_keypoints must be a whole number, got 'many'"),
        ({"workers": -1}, "workers must be at least 0"),
        ({"reference": 1.5}, "reference must be a whole number"),
        ({"max_skip": 0}, "max_skip must be at least 1"),
        ({"smooth": float("inf")}, "smooth must be a finite number"),
        ({"scale": 2}, "scale must be at most 1"),
        ({"warp": "yes"}, "warp must be true or false"),
        ({"keypoint_size": -3}, "keypoint_size must be greater than 0"),
        (
            {"iteratons": 3},
            r"Unknown option for method 'mito': 'iteratons' \(did you mean 'elastic_iterations'\?\)\. "
            "Valid options: background_mask_dilation, border, cancel",
        ),
        ({"wrkers": 2}, "'wrkers' \\(did you mean 'workers'\\?\\)"),
        ({"fallback": 5}, "fallback must be detector names; give a detector name or a list .* got 5"),
        ({"fallback": ["sift", None]}, "fallback must be detector names.*got \\['sift', None\\]"),
        ({"fallback": "surf"}, "Unknown fallback detector 'surf'; choose one of orb, brisk, fast, sift"),
        ({"spacing": "abc"}, "spacing must be numbers, got 'abc'"),
        ({"progress": 5}, "progress must be a function taking a ProgressEvent \\(or None\\), got int"),
        ({"cancel": "stop"}, "cancel must be a threading.Event or a function returning True to stop"),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else None,
)
def test_align_stack_checks_option_values(em, options, message):
    with pytest.raises(InputError, match=message):
        align_stack(em["stack"], **options)


def test_align_stack_refuses_extra_positional_arguments(em):
    with pytest.raises(InputError, match="align_stack takes at most 12 positional arguments.*got 13"):
        align_stack(em["stack"], None, "mito", "brisk", "bf", "homography", 0, 3.0, 0.8, 1, None, None, 5)


@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        cv2.error("OpenCV(5.0) alloc.cpp:73: error: (-4:Insufficient memory) Failed to allocate 1 bytes"),
    ],
    ids=["MemoryError", "cv2-insufficient-memory"],
)
def test_running_out_of_memory_is_an_out_of_memory_error(rotated_copies, monkeypatch, error):
    from napari_nephi.engines.mito import align

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(align.ft, "features", fail)
    stack = rotated_copies["stack"][:2]
    with pytest.raises(napari_nephi.OutOfMemoryError, match="The stack alignment ran out of memory"):
        align_stack(stack, warp=False)
    with pytest.raises(napari_nephi.OutOfMemoryError, match="The mito registration ran out of memory"):
        napari_nephi.register(stack[0], stack[1], method="mito")


def test_other_opencv_errors_are_not_called_out_of_memory(rotated_copies, monkeypatch):
    from napari_nephi.engines.mito import align

    def fail(*args, **kwargs):
        raise cv2.error("OpenCV(5.0) error: (-215:Assertion failed) !empty()")

    monkeypatch.setattr(align.ft, "features", fail)
    with pytest.raises(cv2.error, match="Assertion failed"):
        align_stack(rotated_copies["stack"][:2], warp=False)


def _corner_error(reg, d, fixed_index, moving_index):
    """Largest distance (px) between the fitted and the true map at four inner corners."""
    truth = d["matrices"][moving_index] @ np.linalg.inv(d["matrices"][fixed_index])
    h, w = d["stack"].shape[1:]
    corners = np.array([[90, 90, 1], [90, w - 90, 1], [h - 90, 90, 1], [h - 90, w - 90, 1.0]]).T
    return float(np.abs(reg.transform.matrix @ corners - truth @ corners)[:2].max())


def test_pair_with_one_mask_uses_it(rotated_copies):
    d = rotated_copies
    fixed, moving = d["stack"][0], d["stack"][1]
    mask = d["masks"][0] > 0
    half = mask.copy()
    half[:, fixed.shape[1] // 2 :] = False  # mitochondria of the left half only
    both = napari_nephi.register(fixed, moving, method="mito", model="rigid", fixed_mask=mask)
    left = napari_nephi.register(fixed, moving, method="mito", model="rigid", fixed_mask=half)
    assert _corner_error(both, d, 0, 1) < 1.0 and _corner_error(left, d, 0, 1) < 1.5
    # the fixed keypoints follow the given mask; the moving ones (mitochondria found automatically) do not
    assert left.metrics["keypoints_a"] < 0.75 * both.metrics["keypoints_a"]
    # (only the descriptor support, sized from the fixed mitochondria, may drop a few at the border)
    assert abs(left.metrics["keypoints_b"] - both.metrics["keypoints_b"]) < 0.05 * both.metrics["keypoints_b"]
    only_moving = napari_nephi.register(
        fixed, moving, method="mito", model="rigid", moving_mask=d["masks"][1] > 0, detector="sift"
    )
    assert _corner_error(only_moving, d, 0, 1) < 1.0


def test_match_pair_ignores_stack_options_and_refuses_unknown_ones(em):
    res = match_pair(em["stack"], 0, 1, workers=2, reference="middle", fallback=("orb",))
    assert res["matrix"] is not None and res["stats"]["inliers"] >= 10
    with pytest.raises(InputError, match="'wrkers' \\(did you mean 'workers'\\?\\)"):
        match_pair(em["stack"], 0, 1, wrkers=2)


@pytest.mark.parametrize(
    "value, message",
    [(7, "constant or all NaN \\(section 0: constant \\(7\\)\\)"), (np.nan, "section 0: all NaN")],
)
def test_constant_or_nan_stack_is_refused(value, message):
    stack = np.full((4, 64, 64), value, np.float32)
    with pytest.raises(InputError, match=message):
        align_stack(stack)


def test_blank_reference_names_a_section_with_content(em):
    stack = em["stack"].astype(np.float32)
    stack[0] = np.nan
    with pytest.raises(InputError, match="reference section 0 is all NaN.*reference=1"):
        align_stack(stack)


def test_all_nan_sections_are_kept_in_place_and_reported(em, max_error):
    stack = em["stack"].astype(np.float32)
    stack[2] = np.nan
    reg = align_stack(stack, em["masks"])
    assert reg.metrics["blank_sections"] == {2: "all NaN"}
    assert reg.metrics["identity_sections"] == [2]
    assert "2 (all NaN)" in reg.metrics["notes"][0]
    np.testing.assert_array_equal(reg.transform.matrices[2], reg.transform.matrices[1])  # its neighbour's
    # section 3 skips the blank one and is placed correctly against section 1
    assert reg.metrics["report"][3]["neighbour"] == 1
    err = max_error(reg.transform.matrices, em["matrices"], 0, stack.shape[1:], em["pad"])
    assert np.delete(err, 2).max() < 1.5, err


def test_too_little_memory_for_the_aligned_stack(em, monkeypatch):
    from napari_nephi.core import device as core_device

    reg = align_stack(em["stack"], warp=False)
    monkeypatch.setattr(core_device, "available_memory_bytes", lambda device: 2**16)
    with pytest.raises(
        napari_nephi.OutOfMemoryError, match=r"aligned stack \(6 x 364 x 364, uint8\).*lazy=True"
    ):
        warp_sections(em["stack"], reg.transform.matrices)
    lazy = warp_sections(em["stack"], reg.transform.matrices, lazy=True)  # nothing allocated up front
    assert lazy.shape == em["stack"].shape and lazy[1].compute().any()


def test_register_pair_engine(rotated_copies):
    d = rotated_copies
    fixed, moving = d["stack"][0], d["stack"][1]
    reg = napari_nephi.register(fixed, moving, method="mito", model="rigid")
    assert isinstance(reg.transform, AffineTransform)
    truth = d["matrices"][1] @ np.linalg.inv(d["matrices"][0])  # fixed -> moving coordinates
    h, w = fixed.shape
    corners = np.array([[90, 90, 1], [90, w - 90, 1], [h - 90, 90, 1], [h - 90, w - 90, 1.0]]).T
    np.testing.assert_allclose(reg.transform.matrix @ corners, truth @ corners, atol=1.0)
    assert reg.metrics["ncc_after"] > reg.metrics["ncc_before"]
    with pytest.raises(InputError, match="homography"):
        napari_nephi.register(fixed, moving, method="mito", model="homography")
