"""Every bad command line ends with one ``error: ...`` line and exit code 2, never a traceback."""

import json
import os

import numpy as np
import pytest

from napari_nephi.cli import main
from napari_nephi.core.files import OUTPUT_MARKER
from napari_nephi.io import write_tiff


@pytest.fixture
def pair(tmp_path):
    """A 48 x 48 pair shifted by (2, -1) pixels, and labels."""
    yy, xx = np.mgrid[:48, :48]
    fixed = np.exp(-((yy - 24.0) ** 2 + (xx - 22.0) ** 2) / 60.0).astype(np.float32)
    moving = np.exp(-((yy - 26.0) ** 2 + (xx - 21.0) ** 2) / 60.0).astype(np.float32)
    write_tiff(tmp_path / "f.tif", fixed)
    write_tiff(tmp_path / "m.tif", moving)
    return tmp_path


def register_args(tmp, out, *extra):
    return ["register", str(tmp / "f.tif"), str(tmp / "m.tif"), "-o", str(out), "-q",
            "--kind", "translation", "--levels", "1", "--iterations", "30", *extra]  # fmt: skip


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return lines[0]


def test_missing_and_unknown_arguments(pair, capsys):
    assert main(["register", str(pair / "f.tif"), str(pair / "m.tif")]) == 2
    line = one_error_line(capsys)
    assert "required: -o/--output" in line and "napari-nephi register --help" in line
    assert main(["regster"]) == 2
    assert "invalid choice: 'regster'" in one_error_line(capsys)
    assert main(register_args(pair, pair / "o", "--iterations", "abc")) == 2
    assert "argument --iterations: invalid int value: 'abc'" in one_error_line(capsys)
    assert main(register_args(pair, pair / "o", "--option", "novalue")) == 2
    assert "--option takes KEY=VALUE, got 'novalue'" in one_error_line(capsys)
    assert not (pair / "o").exists()


def test_option_typo_lists_the_valid_options(pair, capsys, monkeypatch):
    import napari_nephi.cli.register as cli_register

    def read_one(path):
        raise AssertionError("the typo should be found before any file is read")

    monkeypatch.setattr(cli_register, "read_one", read_one)
    assert main(register_args(pair, pair / "o", "--option", "iteratons=10")) == 2
    line = one_error_line(capsys)
    assert "Unknown option for method 'affine': 'iteratons' (did you mean 'iterations'?)" in line
    assert "Valid options: " in line and "kind" in line and "levels" in line
    assert main(register_args(pair, pair / "o", "--method", "nephi")) == 2  # --kind is affine's
    assert "Unknown option for method 'nephi': 'kind'" in one_error_line(capsys)
    args = [
        "register",
        str(pair / "f.tif"),
        str(pair / "m.tif"),
        "-o",
        str(pair / "o"),
        "--method",
        "histology",
    ]
    assert main(args) == 2  # whole slides have their own command
    assert "use 'napari-nephi register-slides FIXED MOVING -o OUT'" in one_error_line(capsys)
    assert not (pair / "o").exists()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: (tmp / "afile").write_text("x") and tmp / "afile", "is a file, not a folder"),
        (
            lambda tmp: (tmp / "afile").write_text("x") and tmp / "afile" / "out",
            "afile is a file, not a folder",
        ),
        (
            lambda tmp: (
                (tmp / "mine").mkdir() or (tmp / "mine" / "notes.txt").write_text("x") and tmp / "mine"
            ),
            "holds files napari-nephi did not write; choose a new output folder",
        ),
    ],
)
def test_unusable_output_folders(pair, capsys, make, message):
    out = make(pair)
    before = sorted(p.name for p in pair.rglob("*"))
    assert main(register_args(pair, out)) == 2
    assert message in one_error_line(capsys)
    assert sorted(p.name for p in pair.rglob("*")) == before  # nothing written, nothing removed


def test_unwritable_output_folder(pair, capsys, monkeypatch):
    if os.geteuid() != 0:
        (pair / "ro").mkdir(mode=0o555)
        out = pair / "ro" / "out"
        expected = "is not writable. Choose a writable place."
    else:  # root may write anywhere: the folder cannot be made, as on a read-only file system
        import napari_nephi.core.files as files

        def mkdtemp(prefix, dir):
            raise OSError(30, "Read-only file system", dir)

        monkeypatch.setattr(files.tempfile, "mkdtemp", mkdtemp)
        out = pair / "out"
        expected = "Cannot write the output folder"
    assert main(register_args(pair, out)) == 2
    assert expected in one_error_line(capsys)
    assert not out.exists()


def test_an_os_error_during_the_run_is_one_line(pair, capsys, monkeypatch):
    import napari_nephi.cli.register as cli_register

    def read_one(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cli_register, "read_one", read_one)
    assert main(register_args(pair, pair / "o")) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: Permission denied: ") and "f.tif" in line


def test_apply_errors(pair, capsys):
    assert main(register_args(pair, pair / "out")) == 0
    assert main(["apply", str(pair / "out" / "transform"), str(pair / "m.tif"), "-o", str(pair / "out")]) == 2
    assert "is a folder; give the name of the file to write" in one_error_line(capsys)
    target = pair / "nofolder" / "w.tif"
    assert main(["apply", str(pair / "out" / "transform"), str(pair / "m.tif"), "-o", str(target)]) == 2
    assert "folder" in one_error_line(capsys) and not target.parent.exists()
    assert main(["apply", str(pair / "nope"), str(pair / "m.tif"), "-o", str(pair / "w.tif")]) == 2
    assert "nope" in one_error_line(capsys)


def test_earlier_output_is_replaced_as_a_whole(pair, capsys):
    out = pair / "out"
    assert (
        main(register_args(pair, out, "--moving-labels", str(pair / "m.tif").replace("m.tif", "lab.tif")))
        == 2
    )
    one_error_line(capsys)  # the labels file does not exist
    write_tiff(pair / "lab.tif", np.ones((48, 48), np.uint8))
    assert main(register_args(pair, out, "--moving-labels", str(pair / "lab.tif"))) == 0
    assert (out / "warped_labels.tif").exists() and (out / OUTPUT_MARKER).exists()
    assert main(register_args(pair, out, "--kind", "rigid")) == 0  # the second run has no labels
    assert not (out / "warped_labels.tif").exists()
    assert json.loads((out / "settings.json").read_text())["kind"] == "rigid"
    assert [p.name for p in pair.iterdir() if p.name.startswith(".out.")] == []


def test_a_run_stopped_while_writing_leaves_nothing(pair, capsys, monkeypatch):
    import napari_nephi.overlays as overlays

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the results are being written

    monkeypatch.setattr(overlays, "folds_layer", interrupted)
    assert main(register_args(pair, pair / "out")) == 130
    assert "Interrupted." in capsys.readouterr().err
    assert not (pair / "out").exists()
    assert [p.name for p in pair.iterdir() if p.name.startswith(".out.")] == []


def test_align_em_and_train_option_typos(tmp_path, capsys):
    stack = np.zeros((3, 32, 32), np.uint8)
    write_tiff(tmp_path / "s.tif", stack)
    argv = ["align-em", str(tmp_path / "s.tif"), "-o", str(tmp_path / "o"), "--option", "max_keypoint=5"]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert "'max_keypoint' (did you mean 'max_keypoints'?)" in line and "Valid options:" in line
    argv = ["train", "-o", str(tmp_path / "m.pt"), "--field", "hiden=16", "--steps", "1"]
    assert main(argv) == 2
    assert "'hiden' (did you mean 'hidden'?)" in one_error_line(capsys)
    assert main(["align-em", str(tmp_path / "s.tif"), "-o", str(tmp_path / "s.tif")]) == 2
    assert "is a file, not a folder" in one_error_line(capsys)
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.pt").exists()
