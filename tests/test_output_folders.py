"""Output folders are published atomically: all or nothing, never mixed with an earlier run's files."""

import os
import subprocess
import sys

import numpy as np
import pytest

from napari_nephi import AffineTransform, Registration, UnsupportedFileError
from napari_nephi.core.files import OUTPUT_MARKER, check_output_folder, clean_leftovers, output_folder


def leftovers(folder, name="out"):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


def test_output_appears_only_at_the_end(tmp_path):
    out = tmp_path / "out"
    with output_folder(out) as tmp:
        (tmp / "a.txt").write_text("new")
        assert not out.exists() and tmp.parent == tmp_path  # next to OUT, not in it
    assert (out / "a.txt").read_text() == "new" and (out / OUTPUT_MARKER).exists()
    assert leftovers(tmp_path) == []
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)  # a normal folder, not mkdtemp's 0700


def test_a_failed_run_leaves_the_earlier_output_untouched(tmp_path):
    out = tmp_path / "out"
    with output_folder(out) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(KeyboardInterrupt), output_folder(out) as tmp:
        (tmp / "a.txt").write_text("second, half-written")
        raise KeyboardInterrupt  # the run is stopped while writing
    assert (out / "a.txt").read_text() == "first"
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "a.txt"]
    assert leftovers(tmp_path) == []


def test_a_new_run_replaces_the_earlier_output_as_a_whole(tmp_path):
    out = tmp_path / "out"
    with output_folder(out) as tmp:
        (tmp / "old_only.txt").write_text("first run")
    with output_folder(out) as tmp:
        (tmp / "b.txt").write_text("second run")
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "b.txt"]  # no file of the first run
    assert leftovers(tmp_path) == []


def test_a_killed_run_leaves_a_leftover_that_the_next_run_removes(tmp_path):
    out = tmp_path / "out"
    code = (
        "import os, sys\n"
        "from napari_nephi.core.files import output_folder\n"
        "with output_folder(sys.argv[1]) as tmp:\n"
        "    (tmp / 'half.txt').write_text('half')\n"
        "    os._exit(9)  # killed: no cleanup runs\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    left = leftovers(tmp_path)
    assert len(left) == 1 and left[0].startswith(".out.partial-") and not out.exists()
    with output_folder(out) as tmp:
        (tmp / "a.txt").write_text("complete")
    assert leftovers(tmp_path) == [] and (out / "a.txt").read_text() == "complete"


def test_leftovers_of_a_running_process_are_kept(tmp_path):
    mine = tmp_path / f".out.partial-{os.getpid()}-abc"
    mine.mkdir()
    assert clean_leftovers(tmp_path / "out") == [] and mine.exists()


def test_a_foreign_folder_or_a_file_is_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.docx").write_text("precious")
    with pytest.raises(UnsupportedFileError, match="holds files napari-nephi did not write"):
        check_output_folder(tmp_path / "mine")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UnsupportedFileError, match="is a file, not a folder"):
        with output_folder(tmp_path / "file"):
            pass
    with pytest.raises(UnsupportedFileError, match="Cannot write the output folder"):
        with output_folder(tmp_path / "file" / "out"):  # its parent is a file
            pass
    assert (tmp_path / "mine" / "thesis.docx").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    assert check_output_folder(tmp_path / "empty") == tmp_path / "empty"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_place_gives_a_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(UnsupportedFileError, match="Cannot write the output folder .*writable place"):
            with output_folder(ro / "out"):
                pass
    finally:
        ro.chmod(0o755)


def test_registration_save_is_atomic_and_replaces_its_earlier_folder(tmp_path):
    reg = Registration(
        warped=np.ones((8, 9), np.float32),
        transform=AffineTransform(np.eye(3)),
        metrics={"ncc_after": 0.9},
        settings={"method": "affine"},
    )
    out = reg.save(tmp_path / "out")
    names = {p.name for p in out.iterdir()}
    assert names == {"transform", "warped.tif", "metrics.json", "settings.json", OUTPUT_MARKER}
    (out / "stale.txt").write_text("from somewhere else")
    reg.save(out)  # a folder of an earlier save: replaced as a whole
    assert not (out / "stale.txt").exists()
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("keep")
    with pytest.raises(UnsupportedFileError, match="choose a new output folder"):
        reg.save(tmp_path / "user")
    assert leftovers(tmp_path) == [] and leftovers(tmp_path, "user") == []
