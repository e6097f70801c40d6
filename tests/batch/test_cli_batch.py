"""``napari-nephi batch``: a round trip through the command line, its messages and exit codes."""

from __future__ import annotations

import argparse
import json

import pytest

from napari_nephi.batch import run
from napari_nephi.cli import main

from .conftest import write_table

pytest.importorskip("distributed")


def test_batch_round_trip_through_the_command_line(images, tmp_path, capsys):
    """A first run through the API, then the command on the same table: every job is complete, so it
    reports them as skipped, rewrites the summary and exits 0; a table error exits 2 with one line."""
    pair = {"fixed": str(images / "fixed.tif"), "moving": str(images / "moving.tif"), "method": "affine"}
    rows = [
        {**pair, "output": "a", "options": '{"iterations": 10, "levels": 1}'},
        {**pair, "output": "b", "options": '{"iterations": 10, "levels": 1, "kind": "rigid"}'},
    ]
    write_table(tmp_path / "jobs.csv", rows)
    out = tmp_path / "OUT"
    first = run(tmp_path / "jobs.csv", out, workers=1, processes=False)
    assert [r["status"] for r in first] == ["done", "done"]
    (out / "summary.csv").unlink()
    assert main(["batch", str(tmp_path / "jobs.csv"), "-o", str(out), "--retries", "0"]) == 0
    captured = capsys.readouterr()
    assert "2 jobs: 0 done, 2 already complete (skipped), 0 failed" in captured.out
    doc = json.loads((out / "summary.json").read_text())
    assert [j["status"] for j in doc["jobs"]] == ["skipped", "skipped"]
    assert doc["jobs"][1]["metrics"] == first[1]["metrics"] and (out / "summary.csv").is_file()

    write_table(tmp_path / "dup.csv", [*rows, rows[0]])
    assert main(["batch", str(tmp_path / "dup.csv"), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {tmp_path / 'dup.csv'}: rows 2 and 4 write the same output 'a'; give each job "
        "its own output folder."
    ]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--memory-limit", "lots"], r"--memory-limit takes a size such as 4GB"),
        (["--retries", "-1"], r"Option retries must be at least 0"),
        (["--workers", "0"], r"Option workers must be at least 1"),
    ],
)
def test_bad_arguments_give_one_line(images, tmp_path, capsys, argv, match):
    pair = {"fixed": str(images / "fixed.tif"), "moving": str(images / "moving.tif"), "method": "affine"}
    write_table(tmp_path / "jobs.csv", [{**pair, "output": "a"}])
    assert main(["batch", str(tmp_path / "jobs.csv"), "-o", str(tmp_path / "OUT"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    import re

    assert re.search(match, err[0]), err[0]


def test_batch_help_shows_every_option_and_default(capsys):
    from napari_nephi.cli import build_parser

    parser = build_parser().commands["batch"]
    for action in parser.arguments:
        assert action.help and len(action.help) > 8, action.dest
    assert main(["batch", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for action in parser.arguments:
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            assert f"(default: {action.default})" in text, action.dest
    assert "(default: None)" not in text and "--scheduler ADDRESS" in text
