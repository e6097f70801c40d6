"""``align-em`` through a fresh argparse parser (as napari_nephi.cli wires it with add_parser)."""

import argparse
import csv
import json

import numpy as np
import pytest

from napari_nephi import load_transform
from napari_nephi.cli.em import add_parser
from napari_nephi.core.errors import InputError
from napari_nephi.io import read_image, write_tiff


def parse(argv):
    p = argparse.ArgumentParser(prog="napari-nephi")
    sub = p.add_subparsers(dest="command", required=True)
    add_parser(sub)
    return p.parse_args(argv)


def dice(a, b):
    a, b = a > 0, b > 0
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def test_align_em_writes_stack_masks_matrices_and_report(em, tmp_path, capfd):
    write_tiff(tmp_path / "stack.tif", em["stack"], spacing=(1.0, 0.5, 0.5))
    write_tiff(tmp_path / "masks.tif", em["masks"], spacing=(1.0, 0.5, 0.5))
    out = tmp_path / "out"
    args = parse(
        ["align-em", str(tmp_path / "stack.tif"), "-o", str(out), "--masks", str(tmp_path / "masks.tif"),
         "--model", "rigid", "--option", "max_keypoints=800"]
    )  # fmt: skip
    assert args.command == "align-em"
    assert args.func(args) == 0
    for name in (
        "aligned.tif",
        "aligned_masks.tif",
        "matrices.npy",
        "matrices.json",
        "report.csv",
        "report.json",
    ):
        assert (out / name).exists(), name
    # the aligned stack: dtype, shape and spacing kept
    data, meta, _ = read_image(out / "aligned.tif")[0]
    data = np.asarray(data)
    assert data.shape == em["stack"].shape and data.dtype == np.uint8
    assert tuple(meta["scale"])[1:] == (0.5, 0.5)
    # matrices agree with the saved transform and with the truth (section 0 is the reference)
    mats = np.load(out / "matrices.npy")
    np.testing.assert_allclose(np.array(json.loads((out / "matrices.json").read_text())), mats)
    t = load_transform(out / "transform")
    np.testing.assert_allclose(t.matrices, mats)
    truth = em["matrices"] @ np.linalg.inv(em["matrices"][0])
    c = np.array([180.0, 180.0, 1.0])
    for k in range(len(mats)):
        assert np.linalg.norm((mats[k] @ c)[:2] - (truth[k] @ c)[:2]) < 1.0
    # aligned masks: label values kept, all sections on top of the reference's mitochondria
    masks, _, _ = read_image(out / "aligned_masks.tif")[0]
    masks = np.asarray(masks)
    assert masks.dtype == em["masks"].dtype
    assert set(np.unique(masks)) <= set(np.unique(em["masks"]))
    assert dice(masks[1], masks[0]) > 0.8
    # the report, one row per section
    with open(out / "report.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["section"]) for r in rows] == list(range(6))
    assert {"keypoints", "matches", "inliers", "reprojection_error", "failed", "fallback"} <= set(rows[0])
    assert all(int(r["inliers"]) >= 10 for r in rows[1:])
    assert all(r["refined"] == "True" and float(r["tracking_error"]) < 1.5 for r in rows[1:])
    doc = json.loads((out / "report.json").read_text())
    assert len(doc["report"]) == 6 and doc["settings"]["model"] == "rigid"
    assert doc["settings"]["max_keypoints"] == 800 and doc["settings"]["refine"] is True
    captured = capfd.readouterr()
    assert "Aligned 6 sections" in captured.out
    # progress bars (stderr): the alignment, section by section, then writing stack and masks
    bars = captured.err.splitlines()  # not a terminal: one line per update, a bar per stage
    assert any(b.startswith("section 6/6: 100%") and "| 6/6 [" in b for b in bars), captured.err
    assert any(b.startswith("writing aligned masks 6/6: 100%") and "| 12/12 [" in b for b in bars)
    assert "\r" not in captured.err


def test_align_em_section_folder_without_masks(em, tmp_path):
    folder = tmp_path / "sections"
    folder.mkdir()
    for k, sec in enumerate(em["stack"][:4]):
        write_tiff(folder / f"z{k}.tif", sec)
    out = tmp_path / "out"
    args = parse(["align-em", str(folder), "-o", str(out), "--reference", "middle", "--no-refine", "-q"])
    assert args.func(args) == 0
    auto, _, _ = read_image(out / "aligned_masks.tif")[0]  # automatic mitochondria, aligned
    auto = np.asarray(auto)
    assert auto.shape == (4, *em["stack"].shape[1:]) and auto.max() > 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["metrics"]["reference"] == 1 and doc["metrics"]["mask_source"] == "automatic"
    assert doc["settings"]["refine"] is False and not any(r["refined"] for r in doc["report"])


def test_align_em_clear_error_for_2d_input(em, tmp_path):
    write_tiff(tmp_path / "one.tif", em["stack"][0])
    args = parse(["align-em", str(tmp_path / "one.tif"), "-o", str(tmp_path / "out"), "-q"])
    with pytest.raises(InputError, match="2D"):
        args.func(args)


def test_the_report_csv_has_the_drift_shift(tmp_path):
    """``drift_shift`` ((y, x), only with drift correction) gets two CSV columns, empty without it."""
    from types import SimpleNamespace

    from napari_nephi.engines.mito.report import write_report

    rows = [
        {"section": 0, "inliers": 0, "drift_shift": [0.0, 0.0]},
        {"section": 1, "drift_shift": [1.5, -2.25]},
    ]
    write_report(tmp_path, SimpleNamespace(metrics={"report": rows}, settings={}))
    with open(tmp_path / "report.csv") as fh:
        got = list(csv.DictReader(fh))
    assert (float(got[1]["drift_shift_y"]), float(got[1]["drift_shift_x"])) == (1.5, -2.25)
    write_report(tmp_path, SimpleNamespace(metrics={"report": [{"section": 0}]}, settings={}))
    with open(tmp_path / "report.csv") as fh:
        (got,) = list(csv.DictReader(fh))
    assert got["drift_shift_y"] == got["drift_shift_x"] == ""


def test_drift_window_help_gives_the_minimum_the_engine_checks():
    from napari_nephi.engines.mito.detrend import MIN_WINDOW, check_drift_options

    p = argparse.ArgumentParser(prog="napari-nephi")
    sub = p.add_subparsers(dest="command", required=True)
    em_parser = add_parser(sub)
    text = " ".join(em_parser.format_help().split())
    assert f"at least {MIN_WINDOW:g}" in text
    with pytest.raises(InputError, match=f"at least {MIN_WINDOW:g}"):
        check_drift_options("detrend", MIN_WINDOW - 1)


def test_align_em_defaults_are_the_engines():
    """Without flags align-em runs what align_stack runs by default (2 neighbours, global solve)."""
    import inspect

    from napari_nephi.cli.em import _align_options
    from napari_nephi.engines.mito import align_stack
    from napari_nephi.engines.mito.solve import check_global_options

    kw = _align_options(parse(["align-em", "stack.tif", "-o", "out"]))
    defaults = inspect.signature(align_stack).parameters
    keys = (
        "neighbours",
        "solver",
        "global_model",
        "drift_prior",
        "drift_correction",
        "drift_window",
        "elastic_solver",
        "elastic_landmarks",
        "organelle_reading",
    )
    for key in keys:
        assert kw[key] == defaults[key].default, key
    assert check_global_options(kw["neighbours"], kw["solver"], kw["global_model"], kw["drift_prior"]) == (
        2, "global", "affine", 0.1,
    )  # fmt: skip
    # --solver chain alone: the chain (neighbours 1), as before the default changed
    kw = _align_options(parse(["align-em", "stack.tif", "-o", "out", "--solver", "chain"]))
    resolved = check_global_options(kw["neighbours"], kw["solver"], kw["global_model"], kw["drift_prior"])
    assert resolved[:2] == (1, "chain")


def test_align_em_elastic_auto_reaches_the_engine():
    """Session 29: ``--elastic-auto`` (the elastic step where the sections read distorted), ``--elastic``
    (always, also just before the stack: review 1 A2) and ``--no-elastic``; no flag leaves the engine's
    default; two of them are refused."""
    from napari_nephi.cli.em import _align_options

    base = ["align-em", "stack.tif", "-o", "out"]
    assert _align_options(parse([*base, "--elastic-auto"]))["elastic"] == "auto"
    assert _align_options(parse([*base, "--elastic", "--elastic-solver", "joint"]))["elastic"] is True
    assert _align_options(parse(["align-em", "--elastic", "stack.tif", "-o", "out"]))["elastic"] is True
    assert _align_options(parse([*base, "--no-elastic"]))["elastic"] is False
    assert "elastic" not in _align_options(parse(base))
    with pytest.raises(SystemExit):
        parse([*base, "--elastic", "--elastic-auto"])


def test_align_em_elastic_solver_flag_reaches_the_engine():
    from napari_nephi.cli.em import _align_options

    kw = _align_options(
        parse(["align-em", "stack.tif", "-o", "out", "--elastic", "--elastic-solver", "joint"])
    )
    assert kw["elastic"] is True and kw["elastic_solver"] == "joint"
    assert kw["elastic_landmarks"] is None  # the engine's default: on with the joint solver and masks
    kw = _align_options(parse(["align-em", "stack.tif", "-o", "out", "--elastic", "--no-elastic-landmarks"]))
    assert kw["elastic_landmarks"] is False and kw["elastic_solver"] is None
    kw = _align_options(
        parse(
            [
                "align-em",
                "stack.tif",
                "-o",
                "out",
                "--elastic",
                "--elastic-solver",
                "joint",
                "--elastic-landmarks",
            ]
        )
    )
    assert kw["elastic_landmarks"] is True
    kw = _align_options(parse(["align-em", "stack.tif", "-o", "out", "--elastic-solver", "local"]))
    assert kw["elastic_solver"] == "local"
    with pytest.raises(SystemExit):
        parse(["align-em", "stack.tif", "-o", "out", "--elastic-solver", "global"])


def test_align_em_passes_the_organelle_reading():
    """--organelle-reading reaches align_stack; a name it does not know is refused by argparse."""
    from napari_nephi.cli.em import _align_options

    kw = _align_options(parse(["align-em", "stack.tif", "-o", "out", "--organelle-reading", "local"]))
    assert kw["organelle_reading"] == "local"
    with pytest.raises(SystemExit):
        parse(["align-em", "stack.tif", "-o", "out", "--organelle-reading", "nearby"])
