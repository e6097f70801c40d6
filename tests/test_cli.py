"""The napari-nephi command line on small files written by the test."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi
import skimage.data
import tifffile

from napari_nephi import load_transform, overlays
from napari_nephi.cli import main
from napari_nephi.io import read_image, write_nifti, write_tiff


@pytest.fixture
def files(tmp_path):
    fixed = skimage.data.camera()[::4, ::4].astype(np.float32)
    m = np.eye(3)
    m[:2, 2] = (4.0, -3.0)
    moving = ndi.affine_transform(fixed, np.linalg.inv(m), order=1, mode="reflect").astype(np.float32)
    labels = np.zeros(fixed.shape, np.uint8)
    labels[40:80, 40:90] = 3
    write_tiff(tmp_path / "fixed.tif", fixed, spacing=(0.5, 0.5))
    write_tiff(tmp_path / "moving.tif", moving, spacing=(0.5, 0.5))
    write_tiff(tmp_path / "labels.tif", labels, spacing=(0.5, 0.5))
    return tmp_path, m


def test_register_writes_everything(files, capsys):
    tmp, m = files
    out = tmp / "out"
    code = main(
        [
            "register", str(tmp / "fixed.tif"), str(tmp / "moving.tif"), "-o", str(out),
            "--kind", "translation", "--iterations", "80", "--levels", "2",
            "--moving-labels", str(tmp / "labels.tif"),
        ]
    )  # fmt: skip
    assert code == 0
    for name in (
        "warped.tif",
        "jacobian.tif",
        "folds.tif",
        "warped_labels.tif",
        "deformation_grid.csv",
        "deformation_grid.tif",
        "metrics.json",
        "settings.json",
    ):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ncc_after"] > metrics["ncc_before"]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["method"] == "affine" and settings["kind"] == "translation"
    t = load_transform(out / "transform")
    np.testing.assert_allclose(t.matrix[:2, 2], m[:2, 2], atol=0.3)
    data, meta, _ = read_image(out / "warped.tif")[0]
    assert data.shape == (128, 128) and tuple(meta["scale"]) == (0.5, 0.5)
    labels = tifffile.imread(out / "warped_labels.tif")
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 3}
    assert int(tifffile.imread(out / "folds.tif").sum()) == 0
    assert "Results written" in capsys.readouterr().out


def test_register_writes_the_deformation_grid(files):
    """The grid overlay as napari shapes CSV and as an image: moving grid lines, moved by -t."""
    from napari_builtins.io import csv_to_layer_data

    tmp, m = files
    out = tmp / "out"
    assert main(["register", str(tmp / "fixed.tif"), str(tmp / "moving.tif"), "-o", str(out), "-q",
                 "--kind", "translation", "--iterations", "80", "--levels", "2"]) == 0  # fmt: skip
    t = load_transform(out / "transform").matrix[:2, 2]
    np.testing.assert_allclose(t, m[:2, 2], atol=0.3)
    spacing = overlays.deformation_grid(load_transform(out / "transform"), (128, 128))[1]["metadata"]
    s = spacing["spacing_px"]  # automatic: about 12 lines across
    assert 8 <= s <= 16
    # lines at moving coordinates 0, s, 2s, ... show up at fixed coordinates s k - t
    paths, kwargs, kind = csv_to_layer_data(str(out / "deformation_grid.csv"), require_type="shapes")
    assert kind == "shapes" and set(kwargs["shape_type"]) == {"path"}
    constant_axes = []
    for p in paths:
        axis = int(np.argmin(np.ptp(p, axis=0)))  # the coordinate that stays fixed along the line
        level = p[:, axis] + t[axis]
        np.testing.assert_allclose(level, s * np.round(level / s), atol=0.05)
        constant_axes.append(axis)
    assert constant_axes.count(0) >= 6 and constant_axes.count(1) >= 6
    grid = tifffile.imread(out / "deformation_grid.tif")
    assert grid.shape == (128, 128)
    inner = slice(20, 108)
    ks = np.array([2, 3, 4, 5])
    for axis in (0, 1):
        on = np.round(np.round(s * ks) - t[axis]).astype(int)  # painted at the nearest moving voxel
        between = np.round(s * (ks + 0.5) - t[axis]).astype(int)
        lines = grid[on, inner] if axis == 0 else grid[inner, on]
        gaps = grid[between, inner] if axis == 0 else grid[inner, between]
        assert lines.mean() > 0.6 and gaps.mean() < 0.15, axis


def test_register_nifti_3d(tmp_path):
    rng = np.random.default_rng(0)
    vol = ndi.gaussian_filter(rng.random((24, 28, 32)), 2).astype(np.float32)
    moving = ndi.shift(vol, (1.0, -1.5, 2.0), order=1, mode="nearest")
    write_nifti(tmp_path / "f.nii.gz", vol, spacing=(2.0, 1.0, 1.0))
    write_nifti(tmp_path / "m.nii.gz", moving, spacing=(2.0, 1.0, 1.0))
    code = main(
        ["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "-o", str(tmp_path / "o"),
         "--kind", "translation", "--format", ".nii.gz", "-q"]
    )  # fmt: skip
    assert code == 0
    img = nib.load(tmp_path / "o" / "warped.nii.gz")
    assert img.shape == (32, 28, 24)  # NIfTI order (x, y, z)
    np.testing.assert_allclose(img.header.get_zooms(), (1.0, 1.0, 2.0))
    t = load_transform(tmp_path / "o" / "transform")
    np.testing.assert_allclose(
        t.matrix[:3, 3], [1.0, -1.5, 2.0], atol=0.3
    )  # ndi.shift: moving(x + s) = fixed(x)


def test_apply_transform_to_labels(files):
    tmp, _ = files
    out = tmp / "out"
    assert main(["register", str(tmp / "fixed.tif"), str(tmp / "moving.tif"), "-o", str(out), "-q",
                 "--kind", "translation", "--iterations", "40"]) == 0  # fmt: skip
    assert (
        main(
            [
                "apply",
                str(out / "transform"),
                str(tmp / "labels.tif"),
                "-o",
                str(tmp / "l.tif"),
                "--labels",
                "-q",
            ]
        )
        == 0
    )
    applied = tifffile.imread(tmp / "l.tif")
    assert applied.dtype == np.uint8 and set(np.unique(applied)) == {0, 3}


def test_bad_files_give_clear_errors(tmp_path, capsys):
    (tmp_path / "junk.tif").write_bytes(b"this is not a tiff at all" * 10)
    code = main(
        ["register", str(tmp_path / "junk.tif"), str(tmp_path / "junk.tif"), "-o", str(tmp_path / "o")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "junk.tif" in err
    assert (
        main(["register", str(tmp_path / "nope.tif"), str(tmp_path / "nope.tif"), "-o", str(tmp_path / "o")])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_option_passthrough_and_bad_option(files, capsys):
    tmp, _ = files
    code = main(["register", str(tmp / "fixed.tif"), str(tmp / "moving.tif"), "-o", str(tmp / "o"), "-q",
                 "--option", "kind=rigid", "--option", "iterations=[5, 5, 5]"])  # fmt: skip
    assert code == 0
    assert json.loads((tmp / "o" / "settings.json").read_text())["iterations"] == [5, 5, 5]
    assert (
        main(
            [
                "register",
                str(tmp / "fixed.tif"),
                str(tmp / "moving.tif"),
                "-o",
                str(tmp / "o"),
                "--option",
                "novalue",
            ]
        )
        == 2
    )
    assert "KEY=VALUE" in capsys.readouterr().err


def test_console_script_lists_methods():
    out = subprocess.run(
        [sys.executable, "-m", "napari_nephi.cli", "methods"], capture_output=True, text=True, check=True
    )
    assert "affine" in out.stdout.split()


def test_apply_to_a_channel_at_another_spacing(files):
    """The saved transform knows the moving frame: a half-resolution channel lands where the full one does."""
    tmp, m = files
    moving = read_image(tmp / "moving.tif")[0][0]
    half = ndi.zoom(moving, 0.5, order=1).astype(np.float32)  # same field of view, spacing 1.0
    write_tiff(tmp / "half.tif", half, spacing=(1.0, 1.0))
    out = tmp / "out"
    argv = ["register", str(tmp / "fixed.tif"), str(tmp / "moving.tif"), "-o", str(out),
            "--kind", "translation", "--iterations", "80", "--levels", "2", "-q"]  # fmt: skip
    assert main(argv) == 0
    t = load_transform(out / "transform")
    assert t.has_moving_frame and tuple(t.moving_spacing) == (0.5, 0.5)
    assert main(["apply", str(out / "transform"), str(tmp / "half.tif"), "-o", str(tmp / "h.tif"), "-q"]) == 0
    warped_half = tifffile.imread(tmp / "h.tif")
    warped_full = tifffile.imread(out / "warped.tif")
    assert warped_half.shape == warped_full.shape
    inner = (slice(12, -12), slice(12, -12))
    err = np.abs(warped_half[inner] - warped_full[inner]).mean() / np.abs(warped_full[inner]).mean()
    assert err < 0.1, err  # without the frame, the half image would fill only a quarter of the grid
