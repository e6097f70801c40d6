"""``benchmarks/_code_state.py`` (session 41): the one helper behind ``mito_paired.code_state`` and
``nephi_zoom_cases.code_state`` keeps both recorded formats exactly (the literals were computed with the two
scripts' own helpers before the move)."""

import glob
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from ._bench import import_benchmark

CS = import_benchmark("_code_state")
REPO = Path(__file__).resolve().parents[1]


def test_both_formats_read_as_the_scripts_recorded_them(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_bytes(b"x = 1\n")
    b.write_bytes(b"y = 2\n")
    assert CS.sha12([a, b]) == "8353afe579a1"  # mito_paired's: the bytes only
    assert CS.files_sha([a, b]) == "17f789a213367317"  # nephi_zoom_cases': names and bytes
    assert CS.sha12([b, a]) != CS.sha12([a, b]) and CS.files_sha([b, a]) != CS.files_sha([a, b])
    b.rename(tmp_path / "c.py")  # a name counts in one format only
    assert CS.sha12([a, tmp_path / "c.py"]) == "8353afe579a1"
    assert CS.files_sha([a, tmp_path / "c.py"]) != "17f789a213367317"


def test_the_scripts_record_the_helper_s_values_on_this_tree():
    """Each script records what the helper computes over its files (which files, in which order: sorted
    ``engines/nephi`` then sorted ``core``); the formats themselves are pinned by the other two tests, which
    are not redundant with this one."""
    P = import_benchmark("mito_paired")
    ZC = import_benchmark("nephi_zoom_cases")
    mito = P.code_state()
    engine = REPO / "src" / "napari_nephi" / "engines" / "mito"
    assert Path(mito["engine"]) == engine.resolve()
    assert mito["engine_sha"] == CS.sha12(sorted(glob.glob(os.path.join(mito["engine"], "*.py"))))
    assert mito["script_sha"] == CS.sha12([REPO / "benchmarks" / "mito_paired.py"])
    assert mito["benchmark_sha"] == CS.sha12([REPO / "benchmarks" / "mito_benchmark.py"])
    zoom = ZC.code_state(REPO / "benchmarks", REPO / "src" / "napari_nephi")
    pkg = REPO / "src" / "napari_nephi"
    code = sorted(pkg.glob("engines/nephi/*.py")) + sorted(pkg.glob("core/*.py"))
    assert zoom["code_sha"] == CS.files_sha(code) and len(zoom["code_sha"]) == 16
    assert zoom["harness_sha"] == CS.files_sha([REPO / "benchmarks" / "nephi_zoom_cases.py"])
    assert mito["head"] == zoom["head"]


def test_a_recorded_engine_sha_reads_the_same(tmp_path):
    """docs/mito.md records ``engine_sha`` b45189ed75b2 for the MITO engine of 8008ee3."""
    tar = tmp_path / "engine.tar"
    try:
        done = subprocess.run(
            ["git", "archive", "-o", str(tar), "8008ee3", "src/napari_nephi/engines/mito"],
            cwd=REPO,
            capture_output=True,
        )
    except OSError:
        done = None
    if done is None or done.returncode != 0:
        pytest.skip("no git history here (8008ee3)")
    with tarfile.open(tar) as tf:
        # the "data" filter came with Python 3.11.4 / 3.10.12; the archive is this repository's own
        tf.extractall(tmp_path, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    engine = tmp_path / "src" / "napari_nephi" / "engines" / "mito"
    assert CS.mito_state(REPO / "benchmarks" / "mito_paired.py", engine)["engine_sha"] == "b45189ed75b2"
