"""Running job tables on a real in-process Dask LocalCluster: results, failures, resume, kills, summary."""

from __future__ import annotations

import csv
import json
import os
import sys

import numpy as np
import pytest
import tifffile

from napari_nephi import UnsupportedFileError, load_transform
from napari_nephi.batch import RESULT, MissingDependencyError, run
from napari_nephi.batch.run import BATCH_MARKER
from napari_nephi.io import read_image

from .conftest import write_table

pytest.importorskip("distributed")

#: Tiny, quick jobs: a 48 x 48 pair, few iterations.
AFFINE = {"iterations": 15, "levels": 1}
NEPHI = {"iterations": 4, "coarse_iterations": 10, "levels": 1}


def _table(images, tmp_path) -> list[dict]:
    pair = {"fixed": str(images / "fixed.tif"), "moving": str(images / "moving.tif")}
    rows = [
        {
            **pair,
            "method": "affine",
            "output": "affine/shift",
            "options": json.dumps({**AFFINE, "kind": "translation"}),
            "animal": "m1",
        },
        {**pair, "method": "nephi", "output": "nephi", "options": json.dumps(NEPHI), "animal": "m1"},
        {
            **pair,
            "moving": str(images / "bad.tif"),
            "method": "affine",
            "output": "corrupt",
            "options": json.dumps(AFFINE),
            "animal": "m2",
        },
        {**pair, "method": "afine", "output": "typo", "options": "", "animal": "m2"},
        {
            **pair,
            "moving": str(images / "other.tif"),
            "fixed_mask": str(images / "mask.tif"),
            "method": "affine",
            "output": "other",
            "options": json.dumps({**AFFINE, "kind": "rigid"}),
            "animal": "m3",
        },
    ]
    write_table(tmp_path / "jobs.csv", rows)
    return rows


@pytest.fixture(scope="module")
def first_run(images, tmp_path_factory):
    """One run of the mixed table on 2 in-process workers; returns (table folder, summary rows)."""
    tmp_path = tmp_path_factory.mktemp("batch")
    _table(images, tmp_path)
    rows = run(tmp_path / "jobs.csv", tmp_path / "OUT", workers=2, processes=False)
    return tmp_path, rows


def _ncc(a, b) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_mixed_methods_run_and_a_corrupt_input_is_reported(first_run, images):
    tmp_path, rows = first_run
    out = tmp_path / "OUT"
    by_job = {r["job"]: r for r in rows}
    assert [r["row"] for r in rows] == [2, 3, 4, 5, 6]
    assert {j: r["status"] for j, r in by_job.items()} == {
        "affine/shift": "done",
        "nephi": "done",
        "corrupt": "failed",
        "typo": "failed",
        "other": "done",
    }
    fixed, moving = (tifffile.imread(images / n) for n in ("fixed.tif", "moving.tif"))
    for name in ("affine/shift", "nephi"):
        m = by_job[name]["metrics"]
        assert m["ncc_before"] == pytest.approx(_ncc(fixed, moving), abs=5e-3)  # an independent NCC
        assert m["ncc_after"] > m["ncc_before"] + 0.1
        warped = tifffile.imread(out / name / "warped.tif")
        assert _ncc(fixed[4:-4, 4:-4], warped[4:-4, 4:-4]) > 0.97
        record = json.loads((out / name / RESULT).read_text())
        assert record["status"] == "done" and record["metrics"] == m
    assert by_job["corrupt"]["error_type"] == "UnsupportedFileError"
    with pytest.raises(UnsupportedFileError) as reading:  # the reader's own message, unchanged
        read_image(str(images / "bad.tif"))
    assert by_job["corrupt"]["error"] == " ".join(str(reading.value).split()) and "bad.tif" in str(
        reading.value
    )
    assert by_job["typo"]["error"].startswith("row 5: method 'afine' is unknown")
    assert not (out / "corrupt").exists() and not (out / "typo").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith((".tmp", "..tmp"))]
    assert {r["worker"] for r in rows if r["status"] == "done"} <= {
        "0@" + os.uname().nodename,
        "1@" + os.uname().nodename,
    }


def test_options_reach_the_engine(first_run, images):
    out = first_run[0] / "OUT"
    shift = json.loads((out / "affine/shift/settings.json").read_text())
    rigid = json.loads((out / "other/settings.json").read_text())
    assert shift["kind"] == "translation" and rigid["kind"] == "rigid"
    assert rigid["fixed_mask"] == str(images / "mask.tif") and shift.get("fixed_mask") is None
    u = load_transform(out / "affine/shift/transform").displacement((48, 48))
    assert float(u.std(axis=(1, 2)).max()) < 1e-4  # a translation: the same shift everywhere
    assert u.mean(axis=(1, 2)) == pytest.approx([2.0, 1.0], abs=0.3)  # moving = fixed shifted by (2, 1)
    nephi = json.loads((out / "nephi/settings.json").read_text())
    assert nephi["iterations"] == NEPHI["iterations"]


def test_summary_files_hold_every_row_and_column(first_run):
    out = first_run[0] / "OUT"
    with open(out / "summary.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [t["job"] for t in table] == ["affine/shift", "nephi", "corrupt", "typo", "other"]
    for column in (
        "row",
        "kind",
        "method",
        "status",
        "attempts",
        "seconds",
        "worker",
        "ncc_before",
        "ncc_after",
        "folds",
        "error_type",
        "error",
        "animal",
    ):
        assert column in table[0], column
    assert [t["animal"] for t in table] == ["m1", "m1", "m2", "m2", "m3"]
    assert float(table[1]["seconds"]) > 0 and table[2]["status"] == "failed" and table[2]["ncc_after"] == ""
    doc = json.loads((out / "summary.json").read_text())
    assert doc["counts"] == {"done": 3, "skipped": 0, "failed": 2}
    assert doc["jobs"][0]["metrics"]["ncc_after"] == pytest.approx(float(table[0]["ncc_after"]))


def test_resume_skips_finished_jobs_and_reruns_failed_and_changed_ones(images, tmp_path):
    rows = _table(images, tmp_path)[:3]
    write_table(tmp_path / "jobs.csv", rows)
    out = tmp_path / "OUT"
    run(tmp_path / "jobs.csv", out, workers=1, processes=False)
    stamps = {n: (out / n / RESULT).stat().st_mtime_ns for n in ("affine/shift", "nephi")}
    rows[1]["options"] = json.dumps({**NEPHI, "iterations": 3})  # changed: run again
    write_table(tmp_path / "jobs.csv", rows)
    second = run(tmp_path / "jobs.csv", out, workers=1, processes=False)
    assert [r["status"] for r in second] == ["skipped", "done", "failed"]
    assert [r["attempts"] for r in second] == [1, 1, 1]  # the failed one was tried again
    assert (out / "affine/shift" / RESULT).stat().st_mtime_ns == stamps["affine/shift"]
    assert (out / "nephi" / RESULT).stat().st_mtime_ns != stamps["nephi"]
    assert json.loads((out / "nephi/settings.json").read_text())["iterations"] == 3
    third = run(tmp_path / "jobs.csv", out, workers=1, processes=False, resume=False)
    assert [r["status"] for r in third] == ["done", "done", "failed"]
    assert (out / "affine/shift" / RESULT).stat().st_mtime_ns != stamps["affine/shift"]


def test_a_killed_run_leaves_no_partial_folder_and_is_redone(images, tmp_path):
    """A run killed while writing left temporary folders (ours and the command's); the next run
    removes them and runs the job, which has no folder of its own."""
    write_table(tmp_path / "jobs.csv", _table(images, tmp_path)[:1])
    out = tmp_path / "OUT"
    out.mkdir()
    (out / BATCH_MARKER).write_text("")
    for leftover in (".tmp-affine_shift-0123456789", "..tmp-affine_shift-0123456789.partial-999999-x"):
        (out / leftover).mkdir()
        (out / leftover / "warped.tif").write_bytes(b"half")
    (rows,) = run(tmp_path / "jobs.csv", out, workers=1, processes=False)
    assert rows["status"] == "done" and rows["attempts"] == 1
    assert sorted(p.name for p in out.iterdir()) == [BATCH_MARKER, "affine", "summary.csv", "summary.json"]
    assert tifffile.imread(out / "affine/shift/warped.tif").shape == (48, 48)


@pytest.mark.skipif(sys.platform == "win32", reason="kills a process group")
def test_the_command_killed_mid_run_leaves_no_partial_folder(images, tmp_path):
    """napari-nephi batch killed (SIGKILL, with its workers) while a job writes: no job folder, and
    the next run does the job."""
    import signal
    import subprocess
    import time

    pair = {"fixed": str(images / "fixed.tif"), "moving": str(images / "moving.tif")}
    slow = {
        **pair,
        "method": "nephi",
        "output": "slow",
        "options": json.dumps({"iterations": 5000, "levels": 1}),
    }
    write_table(tmp_path / "jobs.csv", [slow])
    out = tmp_path / "OUT"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "napari_nephi.cli",
        "batch",
        str(tmp_path / "jobs.csv"),
        "-o",
        str(out),
        "--workers",
        "1",
        "-q",
    ]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(p.name.startswith(".tmp-") for p in out.glob(".*")):
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert any(p.name.startswith(".tmp-") for p in out.glob(".*"))  # it was killed while a job ran
    assert not (out / "slow").exists()
    write_table(tmp_path / "jobs.csv", [{**slow, "options": json.dumps({"iterations": 3, "levels": 1})}])
    (row,) = run(tmp_path / "jobs.csv", out, workers=1, processes=False)
    assert row["status"] == "done" and (out / "slow" / RESULT).is_file()
    assert not [p for p in out.iterdir() if p.name.startswith((".tmp", "..tmp"))]


def test_without_distributed_the_message_says_what_to_install(images, tmp_path, monkeypatch):
    write_table(tmp_path / "jobs.csv", _table(images, tmp_path)[:1])
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'napari-nephi\[batch\]'"):
        run(tmp_path / "jobs.csv", tmp_path / "OUT", workers=1, processes=False)


def test_an_output_folder_of_other_files_is_refused(images, tmp_path):
    write_table(tmp_path / "jobs.csv", _table(images, tmp_path)[:1])
    (tmp_path / "OUT").mkdir()
    (tmp_path / "OUT" / "mine.txt").write_text("keep")
    with pytest.raises(UnsupportedFileError, match="holds files napari-nephi batch did not write"):
        run(tmp_path / "jobs.csv", tmp_path / "OUT", workers=1, processes=False)


@pytest.mark.parametrize(("retries", "status", "attempts"), [(1, "done", 2), (0, "failed", 1)])
def test_a_job_out_of_memory_is_tried_again(images, tmp_path, monkeypatch, retries, status, attempts):
    """The first try runs out of memory (after the engine, while its metrics are read): with a retry the
    job is done on its second try; without, it is reported with its error."""
    from napari_nephi.batch import tasks

    calls = []
    read = tasks.read_metrics

    def flaky(folder, kind):
        calls.append(kind)
        if len(calls) == 1:
            raise MemoryError("no room for the metrics")
        return read(folder, kind)

    monkeypatch.setattr(tasks, "read_metrics", flaky)  # the in-process workers share this module
    write_table(tmp_path / "jobs.csv", _table(images, tmp_path)[:1])
    (row,) = run(tmp_path / "jobs.csv", tmp_path / "OUT", workers=1, processes=False, retries=retries)
    assert (row["status"], row["attempts"], len(calls)) == (status, attempts, attempts)
    if status == "failed":
        assert (row["error_type"], row["error"]) == ("MemoryError", "no room for the metrics")
        assert not (tmp_path / "OUT" / "affine").exists()
    else:
        assert row["metrics"]["ncc_after"] > row["metrics"]["ncc_before"]


def test_stack_and_slides_jobs_run_their_commands(tmp_path):
    """An EM stack (align-em, with its masks) and a slide pair (register-slides, rigid stage) in one table."""
    import cv2
    from skimage import data

    from napari_nephi.synthetic import em_stack, slide_pair

    em = em_stack(n_sections=4, shape=(128, 128), seed=0)
    tifffile.imwrite(tmp_path / "em.tif", em["stack"])
    tifffile.imwrite(tmp_path / "mito.tif", em["masks"])
    rgb = cv2.resize(data.immunohistochemistry(), (256, 256), interpolation=cv2.INTER_AREA)
    pair = slide_pair(rgb, seed=3, rotation=20.0, flip=False)
    tifffile.imwrite(tmp_path / "he.tif", pair.fixed)
    tifffile.imwrite(tmp_path / "ihc.tif", pair.moving)
    slides = {"spacing": [2.0], "moving_spacing": [2.0], "stages": ["rigid"], "no_warped": True}
    rows = [
        {"kind": "stack", "moving": "em.tif", "moving_labels": "mito.tif", "output": "em",
         "options": json.dumps({"max_keypoints": 300})},
        {"kind": "slides", "fixed": "he.tif", "moving": "ihc.tif", "output": "slides",
         "options": json.dumps(slides)},
    ]  # fmt: skip
    write_table(tmp_path / "jobs.csv", rows)
    stack, slide = run(tmp_path / "jobs.csv", tmp_path / "OUT", workers=2, processes=False)
    assert (stack["status"], slide["status"]) == ("done", "done"), (stack["error"], slide["error"])
    out = tmp_path / "OUT"
    report = json.loads((out / "em/report.json").read_text())
    assert stack["metrics"]["inliers_mean"] == report["metrics"]["inliers_mean"] > 0
    assert (
        tifffile.imread(out / "em/aligned_masks.tif").shape == tifffile.imread(out / "em/aligned.tif").shape
    )
    assert report["settings"]["max_keypoints"] == 300
    settings = json.loads((out / "slides/settings.json").read_text())
    assert settings["stages"] == ["rigid"] and not (out / "slides/warped.ome.tif").exists()
    assert slide["metrics"]["ncc_after"] > slide["metrics"]["ncc_before"]
    assert abs(abs(slide["metrics"]["rigid_angle"]) - 20.0) < 3.0  # the slide pair's known rotation


def test_atlas_jobs_rank_the_plates_of_an_index(tmp_path):
    """Two sections looked up in a (barely trained) toy index: the summary holds each job's chosen plate
    and distance, as atlas-lookup wrote them."""
    import torch

    from napari_nephi import AtlasLookup
    from napari_nephi.synthetic.atlas import section_from_atlas, toy_atlas

    reference, labels = toy_atlas((20, 48, 48), seed=0)
    fast = {
        "input_size": 48,
        "widths": (8, 16, 32),
        "embedding_dim": 16,
        "steps": 5,
        "batch_plates": 6,
        "views_per_plate": 2,
        "bank_views": 4,
        "fresh_views": 2,
        "validate_every": 5,
        "validation_size": 4,
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        AtlasLookup.train(reference, labels, device="cpu", seed=0, **fast).save(tmp_path / "index")
    finally:
        torch.set_num_threads(threads)
    rows = []
    for plate in (5, 14):
        image, _ = section_from_atlas((reference, labels), float(plate), (0.0, 0.0))
        tifffile.imwrite(tmp_path / f"s{plate}.tif", image.astype(np.float32))
        rows.append(
            {
                "kind": "atlas",
                "fixed": "index",
                "moving": f"s{plate}.tif",
                "output": f"s{plate}",
                "options": json.dumps({"top": 3, "rerank": False, "device": "cpu"}),
            }
        )
    write_table(tmp_path / "jobs.csv", rows)
    summary = run(tmp_path / "jobs.csv", tmp_path / "OUT", workers=1, processes=False)
    for row, plate in zip(summary, (5, 14), strict=True):
        assert row["status"] == "done", row["error"]
        ranks = json.loads((tmp_path / "OUT" / f"s{plate}" / "ranks.json").read_text())
        (section,) = ranks["sections"]
        assert len(section["ranking"]) == 3 and ranks["rerank"] is False
        assert row["metrics"]["plate"] == section["chosen"] == section["ranking"][0]["plate"]
        assert row["metrics"]["distance"] == section["ranking"][0]["distance"]
