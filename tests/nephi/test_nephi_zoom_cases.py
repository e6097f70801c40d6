"""The pure parts of ``benchmarks/nephi_zoom_cases.py`` (session 39): B's marks on hand-made rows, the
table, the case names, and the slabbed fair deformation pair (equal to
``nephi_large.deformation_pair_area``)."""

import re
from pathlib import Path

import numpy as np
import pytest

from napari_nephi.synthetic import random_smooth_displacement

from .._bench import import_benchmark

NL = import_benchmark("nephi_large")
ZC = import_benchmark("nephi_zoom_cases")  # imports nephi_large and nephi_accuracy from benchmarks/ itself


def _rigid(**kw):
    row = dict(case="draw1.0", zoom=2.0, what="draw 1.0", voxels=1000, epe=0.05, det_min=0.98, det_max=1.02)
    row.update(det_dev=0.02, ic_max=0.01, folds_pct=0.0, cpu_s=100.0, peak_mib=300.0)
    row.update(kw)
    return row


def _field(**kw):
    return _rigid(**{"case": "set1.2", "what": "set 1 at 2", "epe_textureless": 0.08, **kw})


def test_marks_pass_at_their_bounds_and_fail_just_past_them():
    before = _rigid()
    at_bounds = _rigid(epe=0.053, det_dev=0.03, cpu_s=130.0, peak_mib=390.0)
    assert ZC.marks(before, at_bounds) == dict(epe=True, det=True, folds=True, cpu=True, peak=True)
    past = _rigid(epe=0.0531, det_dev=0.0301, cpu_s=130.1, peak_mib=390.1, folds_pct=0.001)
    assert ZC.marks(before, past) == dict(epe=False, det=False, folds=False, cpu=False, peak=False)
    # the peak passes by ratio or by +50 MiB: 60 -> 110 MiB is 1.83x but +50
    assert ZC.marks(_rigid(peak_mib=60.0), _rigid(peak_mib=110.0))["peak"]
    assert not ZC.marks(_rigid(peak_mib=60.0), _rigid(peak_mib=110.1))["peak"]


def test_field_rows_read_textureless_not_det_j():
    m = ZC.marks(_field(), _field(epe_textureless=0.0851, det_dev=0.5))
    assert m == dict(epe=True, textureless=False, folds=True, cpu=True, peak=True)


def test_the_table_pairs_rows_by_case_and_zoom_and_names_the_failed_marks():
    before = [_rigid(), _field(), _rigid(case="shift", zoom=3.0)]
    after = [_rigid(det_dev=0.05, det_max=1.05), _field(epe=0.04)]
    lines = ZC.table(before, after)
    assert len(lines) == 4  # header, rule, the two cases in both (shift at 3x has no after row)
    assert lines[2].endswith("| **fails det** |") and "0.020 -> 0.050" in lines[2]
    assert "textureless 0.0800 -> 0.0800" in lines[3] and lines[3].endswith("| pass |")


def test_case_names():
    assert ZC.parse_case("draw73.2") == ("draw", 73, 2.0)
    assert ZC.parse_case("set417.4") == ("set", 417, 4.0)
    assert ZC.parse_case("shift") == ("shift", 0, 0.0)
    for bad in ("draw73", "draw7.2.5", "set417", "rot1.0"):
        with pytest.raises(SystemExit, match="a case is shift"):
            ZC.parse_case(bad)


def test_the_slabbed_deformation_pair_equals_nephi_large_bit_for_bit():
    img = np.random.default_rng(0).random((7, 9, 8)).astype(np.float32)
    _, u_inv = random_smooth_displacement(img.shape, 1.5, 3.0, seed=3, return_inverse=True)
    fixed, moving = NL.deformation_pair_area(img, u_inv)
    f2, m2 = ZC.deformation_pair_slabs(img, u_inv, slab=8)  # 28 fine rows: three full slabs and a half one
    assert np.array_equal(fixed, f2) and np.array_equal(moving, m2)
    with pytest.raises(ValueError, match="multiple of the area factor"):
        ZC.deformation_pair_slabs(img, u_inv, slab=6)


# --- B2, session 39: review 2's findings (the arm each row records, repeated cases, the code, the load) ---

OLD = {"coarse_warp_blur": False, "coarse_reg_weight": 0.1, "iterations": 50, "preset": "fast"}
R0 = {"coarse_warp_blur": "all", "coarse_reg_weight": 0.03, "iterations": 0, "preset": "fast"}


def test_the_table_marks_a_row_whose_settings_are_not_the_expected_arm():
    before = [_rigid(settings=OLD, load=7.6), _field(settings=R0, load=9.1)]  # the field's before ran R0
    after = [_rigid(settings=R0, load=6.5), _field(settings=R0)]
    lines = ZC.table(before, after, expect_before="old", expect_after="r0")
    assert lines[2].endswith("| pass |") and "| 7.6 / 6.5 |" in lines[2]  # the load before / after
    assert (
        "| **wrong arm** (before reads all/0.03/0, not old); pass |" in lines[3] and "| 9.1 / ? |" in lines[3]
    )
    # def checks nothing; a row with no settings at all is the wrong arm for r0
    assert not any("wrong arm" in line for line in ZC.table(before, after))
    assert "after reads None/None/None, not r0" in ZC.table([_rigid()], [_rigid()], expect_after="r0")[2]


def test_the_table_refuses_a_case_given_twice_unless_last():
    before = [_rigid(epe=0.09), _field(), _rigid(epe=0.05)]
    with pytest.raises(ValueError, match=r"before draw1\.0 at 2x\): keep one, or pass --last"):
        ZC.table(before, [_rigid(), _field()])
    with pytest.raises(ValueError, match=r"after set1\.2 at 2x"):
        ZC.table([_rigid()], [_field(), _field()])
    lines = ZC.table(before, [_rigid(), _field()], last=True)
    assert "| 0.0500 -> 0.0500 |" in lines[2]  # the last before row counts


def test_the_code_state_names_the_head_only_for_the_repository_s_own_package(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    here = ZC.code_state(repo / "benchmarks", repo / "src" / "napari_nephi")
    assert re.fullmatch(r"[0-9a-f]{7,}", here["head"]) and isinstance(here["dirty"], bool)
    elsewhere = ZC.code_state(repo / "benchmarks", tmp_path)  # an installed copy: not this tree's code
    assert {k: elsewhere[k] for k in ("head", "dirty", "package")} == {
        "head": "unknown",
        "dirty": "unknown",
        "package": str(tmp_path.resolve()),
    }
    outside = ZC.code_state(tmp_path, repo / "src" / "napari_nephi")  # run from outside any repository
    assert outside["head"] == outside["dirty"] == "unknown"


def test_paired_refuses_an_order_of_other_arms(tmp_path):
    """Session 40: ``paired`` alternates arms A and B only; another letter is refused before any pair is built
    (no file written)."""
    for order in ("AC", "", "abba"):
        with pytest.raises(SystemExit, match="a string of A and B"):
            ZC.paired("shift", 1.0, tmp_path, 1 << 21, order)
    assert not list(tmp_path.iterdir())
    assert ZC.ARMS["r0s"] == {"coarse_warp_blur": "all", "coarse_reg_weight": 0.03, "iterations": 50}


def test_a_zoom_per_axis_names_thin_volumes_and_refuses_field_sets(tmp_path):
    """Session 40: ZOOM ``0.5x3x3`` zooms the axes apart (thin / anisotropic volumes): its label names the
    cached pair and the table row; a field set, scaled by one zoom, is refused."""
    assert ZC.parse_zoom("3.3") == 3.3 and ZC.parse_zoom("0.5x3x3") == "0.5x3x3"
    assert ZC.parse_zoom("0.50x3x3.0") == "0.5x3x3" and ZC.zoom_factors("0.5x3x3") == (0.5, 3.0, 3.0)
    for bad in ("3x3", "0x3x3", "ax3x3"):
        with pytest.raises(SystemExit):
            ZC.parse_zoom(bad)
    assert ZC.zoomed_mri("0.64x3x3").shape == (16, 123, 99)
    # det J and IC are read a quarter of the shortest axis inside on thin volumes, 8 voxels elsewhere
    assert ZC.margin_for((12, 164, 132)) == 3 and ZC.margin_for((16, 123, 99)) == 4
    assert ZC.margin_for((25, 41, 33)) == ZC.margin_for((82, 135, 109)) == ZC.MARGIN == 8
    with pytest.raises(SystemExit, match="rigid cases only"):
        ZC.build_pair("set1.2", "0.5x3x3")
    rows = [_rigid(zoom="0.5x3x3"), _rigid(zoom=2.0)]
    lines = ZC.table(rows, rows)
    assert lines[2].startswith("| 2x") and lines[3].startswith("| 0.5x3x3x")


def test_the_code_state_hashes_the_engine_code_it_runs(tmp_path):
    """Session 40, review 1: ``code_sha`` names the engine code on disk (``engines/nephi`` and ``core``): a
    changed file changes it, another folder does not."""
    pkg = tmp_path / "napari_nephi"
    for sub in ("engines/nephi", "core", "widgets"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "a.py").write_text("x = 1\n")
    first = ZC.code_state(here=tmp_path, package=pkg)
    assert first["head"] == "unknown" and len(first["code_sha"]) == 16 and len(first["harness_sha"]) == 16
    (pkg / "widgets" / "a.py").write_text("x = 2\n")
    assert ZC.code_state(here=tmp_path, package=pkg)["code_sha"] == first["code_sha"]
    (pkg / "engines/nephi" / "a.py").write_text("x = 2\n")
    assert ZC.code_state(here=tmp_path, package=pkg)["code_sha"] != first["code_sha"]
