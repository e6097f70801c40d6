"""``napari-nephi atlas-train`` and ``atlas-lookup``: round trip, outputs, QuickNII anchoring, bad input."""

import csv
import json

import numpy as np
import pytest
import tifffile

from napari_nephi.cli import main
from napari_nephi.cli._quicknii import anchoring, section_corners
from napari_nephi.cli.atlas import _quicknii
from napari_nephi.core.errors import InputError
from napari_nephi.io import write_nifti, write_tiff
from napari_nephi.io.plates import read_reference
from napari_nephi.synthetic.atlas import section_from_atlas, toy_atlas

#: A small training through the command line (a straight cut of this atlas is ranked well by it).
FAST = ["--steps", "40", "--device", "cpu", "--option", "input_size=64", "--option", "widths=[8, 16, 32]",
        "--option", "embedding_dim=32", "--option", "batch_plates=12", "--option", "views_per_plate=2",
        "--option", "validate_every=20", "--option", "validation_size=10"]  # fmt: skip
#: True plates of the straight cuts of the round trip (the briefly trained index is checked on
#: easy sections; oblique and partial ones are the lookup's own tests).
PLATES = (5, 11, 17)


@pytest.fixture(scope="module")
def cli_index(tmp_path_factory):
    """A 24-plate atlas written as NIfTI, and the index ``atlas-train`` wrote for it."""
    folder = tmp_path_factory.mktemp("atlas_cli")
    reference, labels = toy_atlas((24, 48, 48), seed=1)
    write_nifti(folder / "ref.nii.gz", reference)
    write_nifti(folder / "labels.nii.gz", labels.astype(np.int16))
    args = ["atlas-train", str(folder / "ref.nii.gz"), "-o", str(folder / "index"),
            "--annotation", str(folder / "labels.nii.gz"), *FAST, "-q"]  # fmt: skip
    assert main(args) == 0
    return folder, reference, labels


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_round_trip_ranks_registers_and_carries_labels(cli_index, capsys):
    folder, reference, labels = cli_index
    assert (folder / "index" / "config.json").exists()
    names = []
    for plate in PLATES:
        section = section_from_atlas(reference, plate, 0.0)
        write_tiff(folder / f"s{plate}.tif", section)
        names.append(str(folder / f"s{plate}.tif"))
    out = folder / "out"
    args = ["atlas-lookup", str(folder / "index"), *names, "--top", "3", "-o", str(out), "--register",
            "--method", "affine", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "s5: plate" in printed and "Results written to" in printed
    with open(out / "ranks.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 * len(PLATES)
    for plate in PLATES:
        mine = [r for r in rows if r["section"] == f"s{plate}"]
        assert [int(r["rank"]) for r in mine] == [1, 2, 3]
        assert plate in [int(r["plate"]) for r in mine], mine  # the true plate in the top 3
        distances = [float(r["distance"]) for r in mine]
        assert distances == sorted(distances)
        assert [r["chosen"] for r in mine] == ["True", "False", "False"]  # the best, without --series
    summary = json.loads((out / "ranks.json").read_text())
    first = summary["sections"][0]
    assert first["section"] == "s5" and first["chosen"] == int(rows[0]["plate"])
    assert [e["plate"] for e in first["ranking"]] == [int(r["plate"]) for r in rows[:3]]
    atlas_values = set(np.unique(labels).tolist())
    for k, plate in enumerate(PLATES):
        warped = tifffile.imread(out / "warped" / f"s{plate}.tif")
        carried = tifffile.imread(out / "labels" / f"s{plate}.tif")
        assert warped.shape == carried.shape == (48, 48)
        assert set(np.unique(carried).tolist()) <= atlas_values and len(np.unique(carried)) >= 4
        # the regions on the section, named, with their pixel counts in the labels written
        regions = summary["sections"][k]["regions"]
        assert [r["label"] for r in regions] == [v for v in np.unique(carried).tolist() if v != 0]
        assert [r["pixels"] for r in regions] == [int((carried == r["label"]).sum()) for r in regions]
        assert all(r["name"] == f"region {r['label']}" for r in regions)  # no names given to this atlas
    assert not (out / "quicknii.json").exists()  # not a brainglobe atlas
    # --series on the sections in cutting order: increasing picks; --labels writes only labels
    args = ["atlas-lookup", str(folder / "index"), *names, "-o", str(out), "--series", "--labels", "-q",
            "--method", "affine"]  # fmt: skip
    assert main(args) == 0
    chosen = [s["chosen"] for s in json.loads((out / "ranks.json").read_text())["sections"]]
    assert chosen == sorted(chosen) and json.loads((out / "ranks.json").read_text())["series"]
    assert (out / "labels" / "s5.tif").exists() and not (out / "warped").exists()


def test_labels_need_labels_and_the_method_is_checked_first(cli_index, tmp_path, capsys):
    from napari_nephi import AtlasLookup

    folder, reference, _ = cli_index
    tiny = {"steps": 2, "input_size": 32, "widths": (4, 8), "embedding_dim": 8, "validation_size": 4}
    index = AtlasLookup.train(reference, device="cpu", **tiny).save(tmp_path / "no_labels")
    write_tiff(tmp_path / "s.tif", section_from_atlas(reference, 8.0))
    out = tmp_path / "o"
    args = ["atlas-lookup", str(index), str(tmp_path / "s.tif"), "-o", str(out), "--no-rerank", "-q"]
    assert main([*args, "--labels"]) == 2  # nothing to write: refused before any work
    assert "has no region labels" in one_error_line(capsys)
    assert main([*args, "--register", "--method", "elastix"]) == 2  # refused before the ranking
    assert "invalid choice: 'elastix'" in capsys.readouterr().err
    assert not out.exists()
    assert main([*args, "--register", "--method", "affine"]) == 0  # no labels: the plate only
    assert (out / "warped" / "s.tif").exists() and not (out / "labels").exists()
    assert json.loads((out / "ranks.json").read_text())["sections"][0]["regions"] is None


def test_region_names_file_names_the_carried_regions(cli_index, tmp_path, capsys):
    from napari_nephi import AtlasLookup

    folder, reference, labels = cli_index
    names = tmp_path / "names.csv"
    names.write_text("ID, Name ,colour\n1,cortex left,red\n7,hippocampus left,blue\n\n")
    tiny = ["--steps", "2", "--device", "cpu", "--option", "input_size=32", "--option", "widths=[4, 8]",
            "--option", "embedding_dim=8", "--option", "validation_size=4", "-q"]  # fmt: skip
    index = tmp_path / "named"
    train = ["atlas-train", str(folder / "ref.nii.gz"), "--annotation", str(folder / "labels.nii.gz"), *tiny]
    assert main([*train, "-o", str(index), "--region-names", str(names)]) == 0
    lk = AtlasLookup.load(index)
    assert (lk.region_name(7), lk.region_name(1), lk.region_name(3)) == (
        "hippocampus left",
        "cortex left",
        "region 3",
    )
    (tmp_path / "names.json").write_text('{"7": "CA", "12": "brainstem"}')
    assert main([*train, "-o", str(tmp_path / "j"), "--region-names", str(tmp_path / "names.json")]) == 0
    assert AtlasLookup.load(tmp_path / "j").region_names == {7: "CA", 12: "brainstem"}
    (tmp_path / "bad.csv").write_text("value,colour\n7,red\n")
    assert main([*train, "-o", str(tmp_path / "b"), "--region-names", str(tmp_path / "bad.csv")]) == 2
    assert "needs a value column (label, index" in one_error_line(capsys) and not (tmp_path / "b").exists()
    # the regions of a registered section are named in ranks.json
    write_tiff(tmp_path / "s.tif", section_from_atlas(reference, 12.0))
    out = tmp_path / "out"
    lookup = ["atlas-lookup", str(index), str(tmp_path / "s.tif"), "--register", "--method", "affine"]
    assert main([*lookup, "--no-rerank", "-o", str(out), "-q"]) == 0
    regions = json.loads((out / "ranks.json").read_text())["sections"][0]["regions"]
    assert {r["label"]: r["name"] for r in regions}.get(1) == "cortex left"


def test_ranking_reports_progress_per_reranked_section(cli_index):
    from napari_nephi import AtlasLookup
    from napari_nephi.cli.atlas import _rank_all
    from napari_nephi.core.progress import Progress

    folder, reference, _ = cli_index
    lk = AtlasLookup.load(folder / "index", device="cpu")
    images = [section_from_atlas(reference, z, (3.0, 0.0)) for z in (6.0, 12.0, 18.0)]
    events = []
    rankings, picks = _rank_all(lk, images, 4, True, True, Progress(events.append))
    assert [(e.step, e.total, e.stage) for e in events] == [
        (1, 3, "ranking"),
        (2, 3, "ranking"),
        (3, 3, "ranking"),
    ]
    series = lk.lookup_series(images, top=4, rerank=True)
    assert rankings == series["rankings"] and picks == series["picks"]
    rankings, picks = _rank_all(lk, images, 4, False, False)
    assert rankings == lk.lookup_many(images, top=4, rerank=False) and picks == [r[0][0] for r in rankings]


def test_labels_into_their_own_folder_as_the_issue_writes_it(cli_index, tmp_path, capsys):
    folder, reference, labels = cli_index
    section = tmp_path / "s9.tif"
    write_tiff(section, section_from_atlas(reference, 9.0))
    out, own = tmp_path / "out", tmp_path / "labels_out"
    index = str(folder / "index")
    # napari-nephi atlas-lookup INDEX SECTION... --top 5 --register --labels OUT
    args = ["atlas-lookup", index, str(section), "--top", "5", "--register", "--labels", str(own),
            "-o", str(out), "--no-rerank", "--method", "affine", "-q"]  # fmt: skip
    assert main(args) == 0
    assert (out / "warped" / "s9.tif").exists() and not (out / "labels").exists()
    carried = tifffile.imread(own / "s9.tif")
    assert carried.shape == (48, 48) and set(np.unique(carried).tolist()) <= set(np.unique(labels).tolist())
    assert len(np.unique(carried)) >= 4
    # --labels before the sections would take a section for its folder: said so, nothing done
    assert (
        main(["atlas-lookup", index, "--labels", str(section), str(section), "-o", str(tmp_path / "o")]) == 2
    )
    assert "give the sections before --labels" in one_error_line(capsys)
    assert main(["atlas-lookup", index, str(section), "--labels", str(out), "-o", str(out)]) == 2
    assert "is the output folder itself" in one_error_line(capsys)
    # a labels folder holding the output (or inside it) would replace it when written
    nested = ["-o", str(tmp_path / "res" / "out")]
    assert main(["atlas-lookup", index, str(section), "--labels", str(tmp_path / "res"), *nested]) == 2
    assert "lie one inside the other" in one_error_line(capsys)
    assert not (tmp_path / "o").exists() and not (tmp_path / "res").exists()


def test_quicknii_names_are_file_names_unless_two_files_share_one():
    from napari_nephi.cli.atlas import quicknii_names

    names = ["s1", "0001_s1", "0002_s1", "st_0", "st_1"]
    files = ["x/a.png", "y/s1.png", "z/s1.png", "st.tif", "st.tif"]
    assert quicknii_names(names, files) == ["a.png", "0001_s1", "0002_s1", "st_0", "st_1"]


def test_png_and_jpeg_sections_and_folders(cli_index, tmp_path, capsys):
    import cv2

    from napari_nephi import AtlasLookup
    from napari_nephi.io.atlas_files import read_picture

    folder, reference, _ = cli_index
    grey = (section_from_atlas(reference, 10.0) * 255).astype(np.uint8)
    rgb = np.stack([grey, grey // 2, np.zeros_like(grey)], axis=-1)  # tissue in red and green
    (tmp_path / "pics").mkdir()
    cv2.imwrite(str(tmp_path / "pics" / "s10.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(tmp_path / "pics" / "s2.jpg"), grey)
    write_tiff(tmp_path / "pics" / "s3.tif", grey)
    np.testing.assert_array_equal(read_picture(tmp_path / "pics" / "s10.png"), rgb)  # RGB, not BGR
    out = tmp_path / "out"
    args = [
        "atlas-lookup",
        str(folder / "index"),
        str(tmp_path / "pics"),
        "--no-rerank",
        "-o",
        str(out),
        "-q",
    ]
    assert main(args) == 0
    sections = json.loads((out / "ranks.json").read_text())["sections"]
    assert [s["section"] for s in sections] == ["s2", "s3", "s10"]  # natural order, every kind
    lk = AtlasLookup.load(folder / "index", device="cpu")
    expected = lk.lookup(rgb, top=5, rerank=False)
    assert [e["plate"] for e in sections[2]["ranking"]] == [p for p, _ in expected]
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert (
        main(["atlas-lookup", str(folder / "index"), str(tmp_path / "bad.png"), "-o", str(tmp_path / "o")])
        == 2
    )
    assert "not a readable .png picture" in one_error_line(capsys)


def test_atlas_train_on_a_folder_of_png_plates(cli_index, tmp_path):
    import cv2

    from napari_nephi import AtlasLookup

    _, reference, labels = cli_index
    for name in ("plates", "labels"):
        (tmp_path / name).mkdir()
    for k, z in enumerate(range(0, 24, 3)):  # scanned pages of different sizes, natural order
        crop = slice(k % 3, 48 - k % 2)
        cv2.imwrite(str(tmp_path / "plates" / f"page{z}.png"), (reference[z, crop] * 255).astype(np.uint8))
        cv2.imwrite(str(tmp_path / "labels" / f"page{z}.png"), labels[z, crop].astype(np.uint16))
    index = tmp_path / "index"
    tiny = ["--steps", "2", "--device", "cpu", "--option", "input_size=32", "--option", "widths=[4, 8]",
            "--option", "embedding_dim=8", "--option", "validation_size=4", "-q"]  # fmt: skip
    args = [
        "atlas-train",
        str(tmp_path / "plates"),
        "--annotation",
        str(tmp_path / "labels"),
        "-o",
        str(index),
    ]
    assert main([*args, *tiny]) == 0
    lk = AtlasLookup.load(index)
    assert lk.n_plates == 8 and lk.plates.shapes[1] == (46, 48)  # page3: rows 1-46
    np.testing.assert_array_equal(lk.plate_labels(7), labels[21, 1:47])  # page21, values kept


def test_a_stack_gives_one_section_per_plane(cli_index):
    folder, reference, _ = cli_index
    write_tiff(folder / "stack.tif", reference[[6, 12]])
    out = folder / "stack_out"
    assert main(["atlas-lookup", str(folder / "index"), str(folder / "stack.tif"), "-o", str(out), "-q"]) == 0
    summary = json.loads((out / "ranks.json").read_text())
    assert [s["section"] for s in summary["sections"]] == ["stack_0", "stack_1"]
    assert len(summary["sections"][0]["ranking"]) == 5


def test_rerank_flag_reranks_by_the_pose_search(cli_index):
    from napari_nephi import AtlasLookup

    folder, reference, _ = cli_index
    section = section_from_atlas(reference, 13.0, (5.0, 0.0), crop=(0, 0, 0, 0.4))  # oblique, partial
    write_tiff(folder / "p13.tif", section)
    lk = AtlasLookup.load(folder / "index", device="cpu")
    for flag, rerank in (("--rerank", True), ("--no-rerank", False)):
        out = folder / f"out{flag}"
        args = ["atlas-lookup", str(folder / "index"), str(folder / "p13.tif"), "--top", "4", "-o", str(out),
                flag, "-q", "--device", "cpu"]  # fmt: skip
        assert main(args) == 0
        summary = json.loads((out / "ranks.json").read_text())
        assert summary["rerank"] is rerank
        got = [(e["plate"], e["distance"]) for e in summary["sections"][0]["ranking"]]
        expected = lk.lookup(tifffile.imread(folder / "p13.tif"), top=4, rerank=rerank)
        # whether the pose search widened (rerank option widen_score) is recorded per section
        widened = lk.search_poses(tifffile.imread(folder / "p13.tif")).widened if rerank else None
        assert summary["sections"][0]["widened"] is widened
        assert [p for p, _ in got] == [p for p, _ in expected]
        np.testing.assert_allclose([d for _, d in got], [d for _, d in expected], atol=1e-6)
    reranked = json.loads((folder / "out--rerank" / "ranks.json").read_text())["sections"][0]
    assert abs(reranked["chosen"] - 13) <= 1  # the pose search finds the cut's centre plate


def test_rerank_options_are_passed_and_recorded(cli_index, capsys):
    """--rerank-option reaches the pose search; ranks.json records every option the search ran with
    and whether plain_reach ordered each section's plates, so the ranking can be repeated."""
    from napari_nephi import AtlasLookup
    from napari_nephi.engines.atlas.rerank import check_rerank_options

    folder, reference, _ = cli_index
    section = section_from_atlas(reference, 13.0, (5.0, 0.0), crop=(0, 0, 0, 0.4))
    write_tiff(folder / "o13.tif", section)
    lk = AtlasLookup.load(folder / "index", device="cpu")
    base = [
        "atlas-lookup",
        str(folder / "index"),
        str(folder / "o13.tif"),
        "--top",
        "4",
        "-q",
        "--device",
        "cpu",
    ]
    for extra, given, ordered in (
        ([], {}, True),
        (["--rerank-option", "plain_reach=null"], {"plain_reach": None}, False),
    ):
        out = folder / f"opt{len(extra)}"
        assert main([*base, "-o", str(out), *extra]) == 0
        summary = json.loads((out / "ranks.json").read_text())
        assert summary["rerank_options"] == check_rerank_options(given)
        assert summary["sections"][0]["plain_ranked"] is ordered
        assert summary["sections"][0]["densified"] is False  # dense_sweep off by default
        got = [e["plate"] for e in summary["sections"][0]["ranking"]]
        assert got == [
            p for p, _ in lk.lookup(section, top=4, rerank=True, rerank_options=summary["rerank_options"])
        ]
    assert main([*base, "-o", str(folder / "optoff"), "--no-rerank"]) == 0
    off = json.loads((folder / "optoff" / "ranks.json").read_text())
    assert off["rerank_options"] is None and off["sections"][0]["plain_ranked"] is None
    assert off["sections"][0]["densified"] is None
    assert main([*base, "-o", str(folder / "optbad"), "--no-rerank", "--rerank-option", "plain_reach=2"]) == 2
    assert "--rerank-option sets the pose search" in one_error_line(capsys)
    assert main([*base, "-o", str(folder / "optbad"), "--rerank-option", "plain_rech=2"]) == 2
    assert "plain_rech" in one_error_line(capsys)


def test_framing_flag(cli_index):
    from napari_nephi import AtlasLookup

    folder, reference, _ = cli_index
    write_tiff(folder / "f11.tif", section_from_atlas(reference, 11.0, 0.0, crop=(0.4, 0, 0, 0)))
    lk = AtlasLookup.load(folder / "index", device="cpu")
    image = tifffile.imread(folder / "f11.tif")
    for flag, framing in (("--framing", True), ("--no-framing", False)):
        out = folder / f"out{flag}"
        args = ["atlas-lookup", str(folder / "index"), str(folder / "f11.tif"), "--top", "6", "-o", str(out),
                flag, "--no-rerank", "-q", "--device", "cpu"]  # fmt: skip
        assert main(args) == 0
        summary = json.loads((out / "ranks.json").read_text())
        assert summary["framing"] is framing
        lk.framing = framing
        expected = lk.lookup(image, top=6, rerank=False)
        got = [(e["plate"], e["distance"]) for e in summary["sections"][0]["ranking"]]
        assert [p for p, _ in got] == [p for p, _ in expected]
        np.testing.assert_allclose([d for _, d in got], [d for _, d in expected], atol=1e-6)
    plain = json.loads((folder / "out--no-framing" / "ranks.json").read_text())["sections"][0]["ranking"]
    framed = json.loads((folder / "out--framing" / "ranks.json").read_text())["sections"][0]["ranking"]
    assert [e["distance"] for e in plain] != [e["distance"] for e in framed]  # the flag changes the ranking


def test_framing_is_recorded_off_when_the_vote_ranks(cli_index, monkeypatch):
    from napari_nephi.engines.atlas import lookup as lookup_module

    folder, reference, _ = cli_index
    write_tiff(folder / "v11.tif", section_from_atlas(reference, 11.0, 0.0, crop=(0.4, 0, 0, 0)))
    monkeypatch.setattr(lookup_module, "FIRST_STAGE_DEFAULT", "vote")  # the index has a cell head
    out = folder / "out-vote"
    args = ["atlas-lookup", str(folder / "index"), str(folder / "v11.tif"), "--top", "3", "-o", str(out),
            "--framing", "--no-rerank", "-q", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "ranks.json").read_text())
    assert summary["framing"] is False  # framings pool embedding distances only
    lk = lookup_module.AtlasLookup.load(folder / "index", device="cpu")
    assert lk.first_stage == "vote"
    expected = lk.lookup(tifffile.imread(folder / "v11.tif"), top=3, rerank=False)
    assert [e["plate"] for e in summary["sections"][0]["ranking"]] == [p for p, _ in expected]


def test_bad_input_gives_one_error_line(cli_index, tmp_path, capsys):
    folder, _, _ = cli_index
    section = folder / "s.tif"
    write_tiff(section, np.random.default_rng(0).random((20, 20)).astype(np.float32))
    index = str(folder / "index")
    assert main(["atlas-lookup", str(tmp_path / "nowhere"), str(section), "-o", str(tmp_path / "o")]) == 2
    assert "does not exist" in one_error_line(capsys)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    assert main(["atlas-lookup", str(broken), str(section), "-o", str(tmp_path / "o")]) == 2
    one_error_line(capsys)
    assert main(["atlas-lookup", str(section), str(section), "-o", str(tmp_path / "o")]) == 2
    assert "is a file" in one_error_line(capsys)
    assert main(["atlas-lookup", index, str(tmp_path / "missing.tif"), "-o", str(tmp_path / "o")]) == 2
    assert "missing.tif does not exist" in one_error_line(capsys)
    assert main(["atlas-lookup", index, str(section), "--top", "0", "-o", str(tmp_path / "o")]) == 2
    assert "--top must be at least 1" in one_error_line(capsys)
    flat = tmp_path / "flat.tif"
    write_tiff(flat, np.full((20, 20), 3.0, np.float32))
    assert main(["atlas-lookup", index, str(flat), "-o", str(tmp_path / "o")]) == 2
    assert "constant" in one_error_line(capsys).lower()
    assert main(["atlas-train", str(tmp_path / "none.nii.gz"), "-o", str(tmp_path / "i")]) == 2
    assert "does not exist" in one_error_line(capsys)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    assert main(["atlas-train", str(folder / "ref.nii.gz"), "-o", str(foreign)]) == 2  # before training
    assert "holds files napari-nephi did not write" in one_error_line(capsys)
    assert (
        main(["atlas-train", str(folder / "ref.nii.gz"), "-o", str(tmp_path / "i"), "--option", "stpes=3"])
        == 2
    )
    assert "stpes" in one_error_line(capsys)
    assert not (tmp_path / "o").exists() and not (tmp_path / "i").exists()


def test_plate_folder_of_different_sizes(tmp_path):
    rng = np.random.default_rng(2)
    shapes = [(30, 40), (36, 36), (28, 50)]
    for k, shape in enumerate(shapes):  # natural order: p2 before p10
        write_tiff(tmp_path / f"p{[10, 2, 33][k]}.tif", rng.random(shape).astype(np.float32))
    plates, meta = read_reference(tmp_path)
    assert [p.shape for p in plates] == [shapes[1], shapes[0], shapes[2]]
    assert [f.rsplit("/", 1)[-1] for f in meta["files"]] == ["p2.tif", "p10.tif", "p33.tif"]
    write_tiff(tmp_path / "p40.tif", rng.random((3, 8, 8)).astype(np.float32))
    with pytest.raises(InputError, match="p40.tif is 3D"):
        read_reference(tmp_path)
    write_tiff(tmp_path / "vol.tif", rng.random((30, 40)).astype(np.float32))
    with pytest.raises(InputError, match="pass a 3D volume"):
        read_reference(tmp_path / "vol.tif")


def test_quicknii_anchoring_by_hand():
    # a section of the plate's size on plate 100 of the Allen 25 um atlas (528, 320, 456): it
    # spans the plate, so o is the plate's top-left corner, u its width and v its height
    corners = section_corners(320, 456)
    vector = anchoring(corners, 100, (1.0, 1.0), (528, 320, 456))
    assert vector == pytest.approx([0.0, 528 - 100.5, 320.0, 456.0, 0.0, 0.0, 0.0, 0.0, -320.0])
    # the plate stored at half the atlas's resolution (the section maps onto it at half size), and
    # the atlas at half the target's voxel size (factor 0.5): the same plane, in target voxels
    on_half_plate = (corners + 0.5) / 2 - 0.5
    half = anchoring(on_half_plate, 100, (2.0, 2.0), (528, 320, 456), factor=0.5)
    assert half == pytest.approx([v * 0.5 for v in vector])


class _FakeIndex:
    """Stands in for an index built from brainglobe (only what the QuickNII writer reads)."""

    n_plates = 132
    plates = [4 * k for k in range(132)]
    settings = {"brainglobe": {"name": "allen_mouse_25um", "resolution": [25.0, 25.0, 25.0],
                               "shape": [528, 320, 456], "plate_positions": plates}}  # fmt: skip

    def plate_image(self, i):
        return np.zeros((320, 456), np.float32)


def test_quicknii_series_of_a_brainglobe_index():
    images = [np.zeros((160, 228)), np.zeros((320, 456, 3))]
    series = _quicknii(_FakeIndex(), ["a", "b"], images, [10, 20], [])
    assert series["target"] == "ABA_Mouse_CCFv3_2017_25um.cutlas"
    assert series["target-resolution"] == [456.0, 528.0, 320.0]
    a, b = series["slices"]
    assert (a["filename"], a["nr"], a["width"], a["height"]) == ("a", 1, 228, 160)
    assert a["anchoring"] == pytest.approx([0.0, 528 - 40.5, 320.0, 456.0, 0.0, 0.0, 0.0, 0.0, -320.0])
    assert b["anchoring"][1] == pytest.approx(528 - 80.5) and b["nr"] == 2
    assert _quicknii(type("NoBrainglobe", (), {"settings": {}})(), ["a"], images[:1], [0], []) is None
