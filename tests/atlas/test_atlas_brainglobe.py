"""brainglobe atlases from a fake local cache (never downloaded): the crop to the annotated plates,
the atlas's positions kept in the index, and the QuickNII anchoring the command line writes from them."""

import json
import sys
import types

import numpy as np
import pytest

from napari_nephi import AtlasLookup
from napari_nephi.cli import main
from napari_nephi.core.errors import InputError
from napari_nephi.engines.atlas.brainglobe import read_brainglobe, train_brainglobe
from napari_nephi.io import write_tiff
from napari_nephi.synthetic.atlas import section_from_atlas, toy_atlas

NAME = "toy_mouse_50um"
#: Blank plates in front of and behind the brain, as real atlases have (empty space in the volume).
FRONT, BACK = 2, 1
#: A few steps of a tiny network: these tests check where the plates come from, not the ranking.
TINY = {
    "device": "cpu",
    "steps": 2,
    "input_size": 32,
    "widths": (4, 8),
    "embedding_dim": 8,
    "validation_size": 4,
}


def _padded_atlas():
    reference, labels = toy_atlas((16, 32, 32), seed=2)
    pad = ((FRONT, BACK), (0, 0), (0, 0))
    return np.pad(reference, pad), np.pad(labels, pad)


@pytest.fixture
def fake_cache(monkeypatch, tmp_path):
    """brainglobe_atlasapi stood in for, with the atlas ``NAME`` in a cache folder of brainglobe's layout.

    Returns ``(reference, annotation, made)``: ``made`` lists the atlases constructed (construction
    is what would download).
    """
    reference, annotation = _padded_atlas()
    made = []

    class BrainGlobeAtlas:
        def __init__(self, name, check_latest=True):
            made.append((name, check_latest))
            self.reference, self.annotation = reference, annotation
            self.resolution = (50.0, 50.0, 50.0)
            self.structures = {7: {"name": "Hippocampal region"}, 10: {"name": "Cerebellum"}}

    api = types.ModuleType("brainglobe_atlasapi")
    api.BrainGlobeAtlas = BrainGlobeAtlas
    monkeypatch.setitem(sys.modules, "brainglobe_atlasapi", api)
    home = tmp_path / "home"
    (home / ".brainglobe" / f"{NAME}_v1.2").mkdir(parents=True)  # brainglobe's NAME_vX.Y folders
    monkeypatch.setattr("pathlib.Path.home", lambda: home)
    return reference, annotation, made


def test_plates_outside_the_annotation_are_left_out_and_positions_kept(fake_cache):
    reference, annotation, made = fake_cache
    atlas = read_brainglobe(NAME)
    assert made == [(NAME, False)]
    n = reference.shape[0] - FRONT - BACK
    assert atlas.positions == tuple(range(FRONT, FRONT + n)) and atlas.shape == reference.shape
    np.testing.assert_array_equal(atlas.reference, reference[FRONT : FRONT + n])
    assert atlas.info()["resolution"] == [50.0, 50.0, 50.0] and atlas.names[10] == "Cerebellum"
    with pytest.raises(InputError, match="brainglobe install -a allen_mouse_25um"):
        read_brainglobe("allen_mouse_25um")  # not in the cache
    assert len(made) == 1


def test_a_damaged_cache_says_to_install_again(fake_cache, monkeypatch):
    def offline(self, name, check_latest=True):  # brainglobe reaching for the network
        raise ConnectionError("Max retries exceeded with url: /atlases/toy_mouse_50um.tar.gz")

    monkeypatch.setattr(sys.modules["brainglobe_atlasapi"].BrainGlobeAtlas, "__init__", offline)
    with pytest.raises(
        InputError, match=r"could not be read \(ConnectionError.*brainglobe install -a toy_mouse_50um"
    ):
        read_brainglobe(NAME)


def test_the_index_keeps_the_atlas_positions(fake_cache, tmp_path):
    reference, annotation, _ = fake_cache
    lk = train_brainglobe(AtlasLookup, NAME, **TINY)
    n = reference.shape[0] - FRONT - BACK
    assert lk.n_plates == n and lk.region_name(7) == "Hippocampal region"
    np.testing.assert_array_equal(lk.plate_labels(0), annotation[FRONT])
    info = lk.settings["brainglobe"]
    assert info == {"name": NAME, "resolution": [50.0, 50.0, 50.0], "shape": list(reference.shape),
                    "plate_positions": list(range(FRONT, FRONT + n))}  # fmt: skip
    assert AtlasLookup.load(lk.save(tmp_path / "index")).settings["brainglobe"] == info
    assert AtlasLookup.from_brainglobe(NAME, **TINY).settings["brainglobe"] == info  # the public way
    with pytest.raises(InputError, match="plate_axis"):
        train_brainglobe(AtlasLookup, NAME, plate_axis=1, **TINY)


def test_command_line_writes_the_quicknii_anchoring(fake_cache, tmp_path, capsys):
    reference, _, _ = fake_cache
    tiny = ["--steps", "2", "--device", "cpu", "--option", "input_size=32", "--option", "widths=[4, 8]",
            "--option", "embedding_dim=8", "--option", "validation_size=4", "-q"]  # fmt: skip
    index = tmp_path / "index"
    assert main(["atlas-train", f"brainglobe:{NAME}", "-o", str(index), "--plate-axis", "1", *tiny]) == 2
    assert "--plate-axis is not used" in capsys.readouterr().err and not index.exists()
    assert main(["atlas-train", f"brainglobe:{NAME}", "-o", str(index), *tiny]) == 0
    section = section_from_atlas(reference, 7.0)
    write_tiff(tmp_path / "s.tif", section)
    out = tmp_path / "out"
    args = ["atlas-lookup", str(index), str(tmp_path / "s.tif"), "--no-rerank", "-o", str(out), "-q"]
    assert main(args) == 0
    chosen = json.loads((out / "ranks.json").read_text())["sections"][0]["chosen"]
    series = json.loads((out / "quicknii.json").read_text())
    assert series["target"] == NAME  # not a QuickNII atlas: its own voxel grid (LR, AP, DV)
    assert series["target-resolution"] == [32.0, float(reference.shape[0]), 32.0]
    (entry,) = series["slices"]
    assert (entry["filename"], entry["width"], entry["height"]) == ("s.tif", 32, 32)  # as QuickNII matches it
    # unregistered, the section spans its plate; the plate lies at its position in the whole atlas
    ap = reference.shape[0] - (chosen + FRONT + 0.5)
    assert entry["anchoring"] == pytest.approx([0.0, ap, 32.0, 32.0, 0.0, 0.0, 0.0, 0.0, -32.0])


def test_widget_trains_on_a_brainglobe_atlas(fake_cache, make_napari_viewer, qtbot, monkeypatch):
    from napari_nephi.widgets import atlas_widget as aw

    errors = []
    monkeypatch.setattr(aw, "show_error", errors.append)
    widget = aw.AtlasWidget(make_napari_viewer())
    qtbot.addWidget(widget)
    widget.source.set_kind("brainglobe atlas")
    widget.source.brainglobe.setText(NAME)
    widget.steps.setValue(2)
    with qtbot.waitSignal(widget.run_done, timeout=120000):
        assert widget.train()
    assert errors == [] and widget.lookup.settings["brainglobe"]["plate_positions"][0] == FRONT


def test_quicknii_anchoring_follows_the_registration(fake_cache):
    from napari_nephi.cli._quicknii import anchoring
    from napari_nephi.cli.atlas import _quicknii

    reference, _, _ = fake_cache
    lk = train_brainglobe(AtlasLookup, NAME, **TINY)
    plate = 6
    section = np.pad(lk.plate_image(plate), ((8, 8), (4, 4)))  # the plate 8 rows down, 4 columns right
    reg = lk.register(section, plate, method="affine", device="cpu")
    (entry,) = _quicknii(lk, ["s"], [section], [plate], [reg])["slices"]
    h, w = section.shape  # the section's corners on the plate: shifted back by (8, 4)
    corners = np.array([[-8.5, -4.5], [-8.5, w - 4.5], [h - 8.5, -4.5]])
    expected = anchoring(corners, FRONT + plate, (1.0, 1.0), reference.shape)
    np.testing.assert_allclose(entry["anchoring"], expected, atol=0.5)
    assert (entry["width"], entry["height"]) == (w, h)
