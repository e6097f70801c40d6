"""``napari-nephi register-slides``: a re-stained, rotated and mirrored IHC pair written as pyramidal
OME-TIFFs (the moving slide at twice the fixed pixel size) is registered; the command writes a valid
OME-TIFF pyramid with the fixed pixel size, carries GeoJSON and CSV annotations onto the fixed slide
within a stated distance of the truth, and reports improved metrics. Bad inputs end with one error
line and exit code 2, and write nothing."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
import xml.etree.ElementTree as ET

import cv2
import numpy as np
import pytest
import tifffile
import torch
from skimage import data
from skimage.color import rgb2hed

from napari_nephi.cli import main
from napari_nephi.core.files import OUTPUT_MARKER
from napari_nephi.io.annotations import Annotation, write_geojson, write_landmarks_csv
from napari_nephi.io.pyramid_writer import write_ome_pyramid
from napari_nephi.synthetic.histology import slide_pair

#: Fixed slide side (pixels, > 512 so the warped pyramid has two levels) and the pixel sizes (um/px).
SIDE, FIXED_UM, MOVING_UM = 576, 0.5, 1.0
#: Carried annotation vertices must land within this many fixed pixels of the truth (rigid stage only).
MAX_PX, MEDIAN_PX = 3.0, 1.5


def fixed_to_moving(pair, pts: np.ndarray) -> np.ndarray:
    """True moving level-0 pixels (moving slide downsampled by 2) of fixed level-0 pixels."""
    return (pair.transform.map_points(pts) + 0.5) * (FIXED_UM / MOVING_UM) - 0.5


def tissue_points(pair, n: int, seed: int) -> np.ndarray:
    ys, xs = np.nonzero(pair.tissue[40:-40, 40:-40])
    pick = np.random.default_rng(seed).choice(len(ys), n, replace=False)
    return np.stack([ys[pick] + 40.0, xs[pick] + 40.0], 1)


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Pyramidal OME-TIFFs of a pair rotated by 130 degrees and mirrored, annotations and landmarks."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("slides")
    rgb = cv2.resize(data.immunohistochemistry(), (SIDE, SIDE), interpolation=cv2.INTER_AREA)
    pair = slide_pair(rgb, seed=11, rotation=130.0, flip=True)
    moving = cv2.resize(pair.moving, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    write_ome_pyramid(tmp / "fixed.ome.tif", pair.fixed, spacing_um=FIXED_UM, tile=128)
    write_ome_pyramid(tmp / "moving.ome.tif", moving, spacing_um=MOVING_UM, tile=128)
    centres = tissue_points(pair, 3, seed=1)
    ring = 12.0 * np.stack([np.sin(np.linspace(0, 2 * np.pi, 8, endpoint=False))] * 2, 1)
    ring[:, 1] = 12.0 * np.cos(np.linspace(0, 2 * np.pi, 8, endpoint=False))
    truth = [c + ring for c in centres]  # polygons on the fixed slide
    cls = {"name": "Tumor", "color": [200, 0, 0]}
    drawn = [
        Annotation("Polygon", [fixed_to_moving(pair, p)], name=f"region {i}", classification=cls)
        for i, p in enumerate(truth)
    ]
    point = tissue_points(pair, 1, seed=2)
    truth.append(point)
    drawn.append(Annotation("Point", fixed_to_moving(pair, point), name="cell"))
    write_geojson(tmp / "moving.geojson", drawn)
    marks = tissue_points(pair, 12, seed=3)
    write_landmarks_csv(tmp / "fixed_marks.csv", marks)
    write_landmarks_csv(tmp / "moving_marks.csv", fixed_to_moving(pair, marks))
    return tmp, pair, truth


@pytest.fixture(scope="module")
def run(slides):
    """The command on the slides (rigid stage), with GeoJSON annotations and landmarks."""
    tmp, pair, truth = slides
    inputs = {p.name: sha(p) for p in tmp.iterdir()}
    out, err = io.StringIO(), io.StringIO()
    args = ["register-slides", str(tmp / "fixed.ome.tif"), str(tmp / "moving.ome.tif"),
            "-o", str(tmp / "out"), "--annotations", str(tmp / "moving.geojson"), "--stages", "rigid",
            "--landmarks", str(tmp / "fixed_marks.csv"), str(tmp / "moving_marks.csv")]  # fmt: skip
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    return rc, tmp / "out", out.getvalue(), err.getvalue(), inputs


def test_writes_every_output_and_keeps_the_inputs(slides, run):
    tmp, _, _ = slides
    rc, out, stdout, stderr, inputs = run
    assert rc == 0, stderr
    names = {p.name for p in out.iterdir()}
    assert names == {"transform", "warped.ome.tif", "annotations.geojson", "metrics.json", "settings.json",
                     OUTPUT_MARKER}  # fmt: skip
    assert {name: sha(tmp / name) for name in inputs} == inputs
    for stage in ("rigid: rotation search", "write OME-TIFF"):  # a progress bar per stage
        assert stage in stderr
    summary = json.loads(stdout[: stdout.rindex("}") + 1])
    assert summary["rigid_flipped"] is True and f"Results written to {out}" in stdout


def test_warped_pyramid_is_a_valid_ome_tiff(slides, run):
    _, pair, _ = slides
    with tifffile.TiffFile(run[1] / "warped.ome.tif") as tif:
        assert tif.is_ome and tif.pages[0].is_tiled
        levels = [level.asarray() for level in tif.series[0].levels]
        pixels = ET.fromstring(tif.ome_metadata).find(".//{*}Pixels").attrib
    assert [lv.shape for lv in levels] == [(SIDE, SIDE, 3), (SIDE // 2, SIDE // 2, 3)]
    assert float(pixels["PhysicalSizeX"]) == FIXED_UM and float(pixels["PhysicalSizeY"]) == FIXED_UM
    assert pixels["PhysicalSizeXUnit"] == "µm"
    # the haematoxylin of the warped slide matches the fixed slide's on the tissue (stains differ)
    h_fixed, h_warped = rgb2hed(pair.fixed)[..., 0], rgb2hed(levels[0])[..., 0]
    tissue = pair.tissue
    assert np.corrcoef(h_fixed[tissue], h_warped[tissue])[0, 1] > 0.8
    half = cv2.resize(levels[0], (SIDE // 2, SIDE // 2), interpolation=cv2.INTER_AREA).astype(float)
    assert np.abs(levels[1] - half).mean() < 2.0  # level 1 is level 0 halved


def test_metrics_and_settings(run):
    out = run[1]
    metrics = json.loads((out / "metrics.json").read_text())
    settings = json.loads((out / "settings.json").read_text())
    assert metrics["ncc_after"] > metrics["ncc_before"] + 0.5
    assert metrics["nmi_after"] > metrics["nmi_before"]
    assert abs((metrics["rigid_angle"] - 130.0 + 180) % 360 - 180) < 1.0
    assert metrics["landmarks"] == 12 and metrics["tre_median_um"] < MEDIAN_PX * FIXED_UM * 2
    assert metrics["annotations_carried"] == 4 and metrics["annotations_not_carried"] == []
    assert settings["spacing"] == [FIXED_UM] * 2 and settings["moving_spacing"] == [MOVING_UM] * 2
    assert settings["stages"] == ["rigid"] and settings["method"] == "histology"
    # the automatic stain channel is reported: which kind "auto" chose for these H&E / H-DAB slides
    assert settings["channel"] == "auto" and settings["stain_kind"] == metrics["channel"] == "hematoxylin"
    assert settings["fixed"].endswith("fixed.ome.tif") and settings["annotations"].endswith("moving.geojson")
    assert settings["warped"] is True and settings["tile"] == 512 and settings["compression"] == "zlib"


def test_geojson_annotations_land_on_the_truth(slides, run):
    _, _, truth = slides
    doc = json.loads((run[1] / "annotations.geojson").read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(truth)
    errors = []
    for feature, expected in zip(doc["features"], truth, strict=True):
        geometry = feature["geometry"]
        if geometry["type"] == "Polygon":
            xy = np.array(geometry["coordinates"][0][:-1])  # QuPath: (x, y), closed ring
            assert geometry["coordinates"][0][0] == geometry["coordinates"][0][-1]
            assert feature["properties"]["classification"]["name"] == "Tumor"
        else:
            xy = np.array([geometry["coordinates"]])
            assert feature["properties"]["name"] == "cell"
        errors.append(np.linalg.norm(xy[:, ::-1] - expected, axis=1))
    errors = np.concatenate(errors)
    assert errors.max() < MAX_PX and np.median(errors) < MEDIAN_PX


def test_csv_points_in_um_on_flat_tiffs_with_given_pixel_sizes(slides, tmp_path, capsys):
    """Flat TIFFs without a pixel size: --spacing/--moving-spacing given; CSV in um (--csv-um); -q."""
    _, pair, _ = slides
    small = slide_pair(pair.fixed[::2, ::2].copy(), seed=5, rotation=-70.0)
    tifffile.imwrite(tmp_path / "f.tif", small.fixed, photometric="rgb")
    tifffile.imwrite(tmp_path / "m.tif", small.moving, photometric="rgb")
    pts = tissue_points(small, 6, seed=4)
    write_landmarks_csv(tmp_path / "m.csv", small.transform.map_points(pts), spacing=(2.0, 2.0))
    args = ["register-slides", str(tmp_path / "f.tif"), str(tmp_path / "m.tif"), "-o", str(tmp_path / "o"),
            "--spacing", "2", "--moving-spacing", "2", "2", "--annotations", str(tmp_path / "m.csv"),
            "--csv-um", "--stages", "rigid", "--no-warped", "-q"]  # fmt: skip
    assert main(args) == 0
    assert capsys.readouterr().out == ""
    out = tmp_path / "o"
    assert not (out / "warped.ome.tif").exists()
    rows = np.loadtxt(out / "annotations.csv", delimiter=",", skiprows=1)
    assert np.abs(rows[:, 0] - np.arange(6)).max() == 0
    err = np.linalg.norm(rows[:, 1:] / 2.0 - pts, axis=1)  # um -> px
    assert err.max() < MAX_PX
    assert json.loads((out / "settings.json").read_text())["spacing"] == [2.0, 2.0]


# -- bad input -------------------------------------------------------------------------------------
@pytest.fixture
def flat(tmp_path):
    """Two small flat RGB TIFFs with no pixel size: a tissue-like blob and a blank slide."""
    yy, xx = np.mgrid[:96, :96]
    blob = np.exp(-((yy - 48.0) ** 2 + (xx - 40.0) ** 2) / 400.0)
    tissue = (255 - blob[..., None] * np.array([120, 160, 80])).astype(np.uint8)
    tifffile.imwrite(tmp_path / "tissue.tif", tissue, photometric="rgb")
    tifffile.imwrite(tmp_path / "blank.tif", np.full((96, 96, 3), 250, np.uint8), photometric="rgb")
    return tmp_path


def slides_args(tmp, fixed, moving, *extra):
    return ["register-slides", str(tmp / fixed), str(tmp / moving), "-o", str(tmp / "out"), "-q", *extra]


@pytest.mark.parametrize(
    ("fixed", "moving", "extra", "message"),
    [
        ("missing.svs", "tissue.tif", ["--spacing", "1"], "missing.svs does not exist"),
        ("tissue.tif", "tissue.tif", [], "tissue.tif does not say its pixel size; give it with --spacing UM"),
        ("tissue.tif", "tissue.tif", ["--spacing", "0.5"], "give it with --moving-spacing UM"),
        ("tissue.tif", "tissue.tif", ["--spacing", "1", "2", "3"], "--spacing takes one pixel size, or two"),
        ("tissue.tif", "tissue.tif", ["--spacing", "-1", "--moving-spacing", "1"], "--spacing: "),
        ("blank.tif", "tissue.tif", ["--spacing", "1", "--moving-spacing", "1"],
         "No tissue found in the fixed"),
        ("tissue.tif", "tissue.tif", ["--spacing", "1", "--moving-spacing", "1", "--channel", "dapi"],
         "channel"),
        ("tissue.tif", "tissue.tif", ["--spacing", "1", "--moving-spacing", "1", "--annotations", "a.xml"],
         "'.xml' is not an annotation format; give QuPath GeoJSON"),
        ("tissue.tif", "tissue.tif", ["--spacing", "1", "--moving-spacing", "1", "--stages", "warp"],
         "argument --stages: invalid choice: 'warp'"),
        ("tissue.tif", "tissue.tif", ["--spacing", "1", "--moving-spacing", "1", "--weights", "nope.pt"],
         "nope.pt is neither a model file nor a folder of them"),
        ("tissue.tif", "tissue.tif", ["--spacing", "1", "--moving-spacing", "1", "--landmarks", "two.csv",
                                      "one.csv"], "2 fixed but 1 moving landmarks"),
        ("tissue.tif", "tissue.tif", ["--spacing", "1", "--moving-spacing", "1", "--fixed-mask", "no.tif"],
         "no.tif does not exist"),
    ],
)  # fmt: skip
def test_bad_input_is_one_error_line(flat, error_line, fixed, moving, extra, message):
    write_landmarks_csv(flat / "two.csv", [[10.0, 10.0], [20.0, 30.0]])
    write_landmarks_csv(flat / "one.csv", [[10.0, 10.0]])
    extra = [str(flat / a) if a.endswith(".csv") else a for a in extra]
    assert main(slides_args(flat, fixed, moving, *extra)) == 2
    assert message in error_line()
    assert not (flat / "out").exists()


def test_openslide_format_without_the_extra(flat, error_line, monkeypatch):
    (flat / "slide.ndpi").write_bytes(b"not read without OpenSlide")
    monkeypatch.setitem(sys.modules, "openslide", None)  # as if the extra were not installed
    assert main(slides_args(flat, "slide.ndpi", "tissue.tif", "--spacing", "1")) == 2
    assert 'pip install "napari-nephi[openslide]"' in error_line()


def test_fluorescence_against_brightfield_names_the_channel_flag(flat, error_line):
    yy, xx = np.mgrid[:96, :96]
    nuclei = np.exp(-((yy - 48.0) ** 2 + (xx - 40.0) ** 2) / 400.0)
    channels = np.stack([nuclei * 200, nuclei[::-1] * 90]).astype(np.uint8)
    tifffile.imwrite(flat / "fl.ome.tif", channels, ome=True, metadata={"axes": "CYX"})
    assert main(slides_args(flat, "fl.ome.tif", "tissue.tif", "--spacing", "1", "--moving-spacing", "1")) == 2
    assert "fl.ome.tif has 2 channels (fluorescence?)" in (line := error_line())
    assert "--channel 0" in line


def test_interrupted_while_writing_leaves_nothing(flat, capsys, monkeypatch):
    """Ctrl-C while warped.ome.tif is written: exit 130, no output folder, no temporary folder."""
    import napari_nephi.cli.slides as cli_slides

    def interrupt(self, event):
        if event.stage == "write OME-TIFF":
            raise KeyboardInterrupt

    monkeypatch.setattr(cli_slides.ProgressBars, "__call__", interrupt)
    args = slides_args(flat, "tissue.tif", "tissue.tif", "--spacing", "1", "--moving-spacing", "1",
                       "--stages", "rigid")  # fmt: skip
    assert main(args) == 130
    assert "Interrupted." in capsys.readouterr().err
    assert sorted(p.name for p in flat.iterdir()) == ["blank.tif", "tissue.tif"]


def test_tissue_masks_from_files(flat, error_line):
    """--fixed-mask / --moving-mask reach the engine (an empty mask: no tissue); a wrong aspect is refused."""
    half = np.zeros((48, 48), np.uint8)
    half[10:40, 5:35] = 255
    tifffile.imwrite(flat / "mask.tif", half)
    tifffile.imwrite(flat / "empty.tif", np.zeros((48, 48), np.uint8))
    tifffile.imwrite(flat / "wide.tif", np.full((48, 96), 255, np.uint8))
    base = slides_args(flat, "tissue.tif", "tissue.tif", "--spacing", "1", "--moving-spacing", "1")
    assert main([*base, "--fixed-mask", str(flat / "empty.tif")]) == 2
    assert "No tissue found in the fixed slide" in error_line()
    assert main([*base, "--moving-mask", str(flat / "wide.tif")]) == 2
    assert "--moving-mask" in (line := error_line()) and "not the shape of the slide (96 x 96 px)" in line
    assert not (flat / "out").exists()
    args = [*base, "--fixed-mask", str(flat / "mask.tif"), "--moving-mask", str(flat / "mask.tif")]
    assert main([*args, "--stages", "rigid", "--no-warped"]) == 0
    settings = json.loads((flat / "out" / "settings.json").read_text())
    assert settings["fixed_mask"].endswith("mask.tif") and settings["moving_mask"].endswith("mask.tif")


def test_options_reach_the_engine_and_writer_options_are_checked_first(flat, error_line, monkeypatch):
    """Every engine flag becomes its register() keyword; a bad --tile fails before any registration."""
    import napari_nephi.engines.registry as registry
    from napari_nephi.core.errors import InputError

    calls = []

    def fake_register(fixed, moving, **kwargs):
        calls.append(kwargs)
        raise InputError("stopped by the test")

    monkeypatch.setattr(registry, "register", fake_register)
    base = slides_args(flat, "tissue.tif", "tissue.tif", "--spacing", "0.5", "--moving-spacing", "0.25", "1")
    assert main([*base, "--tile", "100"]) == 2
    assert "--tile must be a multiple of 16" in error_line() and calls == []
    assert main([*base, "--tile", "8"]) == 2 and "--tile" in error_line() and calls == []
    flags = ["--channel", "OD", "--no-flip", "--stages", "refine", "rigid", "--rigid-um", "4",
             "--working-um", "2", "--refine-um", "0", "--affine-iterations", "3", "--nonrigid-iterations",
             "2", "--magnifications", "1", "--device", "cpu", "--seed", "7", "--weights", "w.pt"]  # fmt: skip
    assert main([*base, *flags]) == 2 and "stopped by the test" in error_line()
    assert calls == [{
        "method": "histology", "spacing": (0.5, 0.5), "moving_spacing": (0.25, 1.0), "device": "cpu",
        "progress": calls[0]["progress"], "fixed_mask": None, "moving_mask": None, "channel": "od",
        "allow_flip": False, "stages": ("refine", "rigid"), "affine_iterations": 3, "nonrigid_iterations": 2,
        "magnifications": 1, "seed": 7, "rigid_um": 4.0, "working_um": 2.0, "refine_um": 0.0,
        "weights": ["w.pt"],
    }]  # fmt: skip
    assert not (flat / "out").exists()


def test_output_folder_of_the_user_is_refused(flat, error_line):
    (flat / "out").mkdir()
    (flat / "out" / "mine.txt").write_text("keep")
    assert main(slides_args(flat, "tissue.tif", "tissue.tif", "--spacing", "1", "--moving-spacing", "1")) == 2
    assert "holds files napari-nephi did not write" in error_line()
    assert (flat / "out" / "mine.txt").read_text() == "keep"
