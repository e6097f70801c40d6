"""The "Atlas lookup" dock widget: its parts one by one, then end to end in a real viewer."""

import numpy as np
import pytest

from napari_nephi.engines.atlas.rerank import check_rerank_options
from napari_nephi.synthetic.atlas import section_from_atlas
from napari_nephi.widgets import atlas_widget as aw
from napari_nephi.widgets._atlas_parts import SOURCES, AtlasSource, PlateAdjust, PlateGallery
from napari_nephi.widgets._state import RunState

#: A section cut from the toy atlas at a plate. The test lookup is trained briefly, so the widget
#: is checked on a straight, whole cut; oblique and partial ones are the lookup's own tests.
PLATE, TILT, CROP = 21, 0.0, None


@pytest.fixture
def errors(monkeypatch):
    messages = []
    monkeypatch.setattr(aw, "show_error", messages.append)
    return messages


@pytest.fixture(scope="module")
def saved_index(trained_lookup, tmp_path_factory):
    """The session's trained lookup saved as an index folder."""
    return trained_lookup.save(tmp_path_factory.mktemp("atlas") / "index")


# -- parts --------------------------------------------------------------------------------------
def test_gallery_shows_hits_best_first_and_reports_choices(qtbot):
    gallery = PlateGallery()
    qtbot.addWidget(gallery)
    chosen = []
    gallery.plate_chosen.connect(chosen.append)
    thumbs = [np.full((96, 96), v, np.float32) for v in (0.2, 0.5, 0.9)]
    gallery.set_hits([(7, 0.11), (8, 0.25), (3, 0.4)], thumbs)
    assert gallery.plates() == [7, 8, 3] and gallery.chosen() == 7 and chosen == [7]
    assert "d = 0.250" in gallery.item(1).text() and not gallery.item(1).icon().isNull()
    gallery.setCurrentRow(2)
    assert chosen == [7, 3] and gallery.chosen() == 3
    gallery.choose(8)  # a plate chosen elsewhere is selected without a new signal
    assert gallery.chosen() == 8 and chosen == [7, 3]
    gallery.choose(30)  # not shown: nothing selected
    assert gallery.chosen() is None
    gallery.set_hits([], [])
    assert gallery.plates() == [] and gallery.chosen() is None


def test_plate_adjust_steps_within_the_atlas(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    adjust = PlateAdjust(viewer)
    qtbot.addWidget(adjust)
    assert not adjust.next.isEnabled()  # no atlas yet
    adjust.set_plates(10)
    seen = []
    adjust.plate_changed.connect(seen.append)
    adjust.next.click()
    adjust.next.click()
    adjust.previous.click()
    assert seen == [1, 2, 1]
    adjust.set_plate(9)
    adjust.next.click()  # stays on the last plate
    assert adjust.values()["plate"] == 9 and seen[-1] == 9
    adjust.rotation.setValue(12.0)
    adjust.scale.setValue(1.5)
    points = viewer.add_points(np.array([[1.0, 2.0], [3.0, 4.0]]), name="pts")
    adjust.section_points.set_layer(points)
    values = adjust.values()
    assert (values["rotation"], values["scale"], values["section_points"]) == (12.0, 1.5, points)
    assert values["plate_points"] is None
    adjust.reset()
    assert (adjust.values()["rotation"], adjust.values()["scale"]) == (0.0, 1.0)


def test_atlas_source_spec_follows_the_kind(make_napari_viewer, qtbot, monkeypatch):
    from napari_nephi.widgets import _atlas_parts as _parts

    viewer = make_napari_viewer()
    image = viewer.add_image(np.zeros((4, 8, 8)), name="volume")
    labels = viewer.add_labels(np.zeros((4, 8, 8), np.uint8), name="regions")
    source = AtlasSource(viewer)
    qtbot.addWidget(source)
    changes = []
    source.changed.connect(lambda: changes.append(1))
    source.annotation.set_layer(labels)
    assert source.spec() == {"kind": "image layer", "plate_axis": 0, "layer": image, "annotation": labels}
    source.set_kind("file or folder")
    source.path.setText("  /data/plates  ")
    source.plate_axis.setValue(2)
    spec = source.spec()
    assert spec == {"kind": "file or folder", "plate_axis": 2, "path": "/data/plates", "annotation_path": ""}
    asked = []  # the file and folder buttons ask for what they say
    monkeypatch.setattr(
        _parts.QFileDialog, "getOpenFileName", lambda *a: asked.append("file") or ("/a/v.nii", "")
    )
    monkeypatch.setattr(
        _parts.QFileDialog, "getExistingDirectory", lambda *a: asked.append("folder") or "/a/plates"
    )
    source.browse.click()
    assert source.spec()["path"] == "/a/v.nii"
    source.browse_folder.click()
    assert source.spec()["path"] == "/a/plates" and asked == ["file", "folder"]
    source.set_kind("brainglobe atlas")
    assert source.spec()["name"] == "allen_mouse_25um" and not source.plate_axis.isEnabled()
    assert len(changes) >= 4 and SOURCES.index(source.spec()["kind"]) == 2


def test_region_names_from_a_labels_layers_features(make_napari_viewer):
    viewer = make_napari_viewer()
    layer = viewer.add_labels(np.zeros((4, 8, 8), np.uint8))
    assert aw.region_names_of(layer) == {} and aw.region_names_of(None) == {}
    layer.features = {"label": [3, 5], "acronym": ["CA1", "DG"]}
    assert aw.region_names_of(layer) == {3: "CA1", 5: "DG"}
    layer.features = {"index": [3, 5], "colour": ["red", "blue"]}  # no name column
    assert aw.region_names_of(layer) == {}


# -- end to end --------------------------------------------------------------------------------
def _widget(make_napari_viewer, toy_reference, section=None):
    reference, labels = toy_reference
    viewer = make_napari_viewer()
    viewer.add_image(reference, name="toy atlas")
    viewer.add_labels(labels, name="toy atlas labels")
    if section is not None:
        viewer.add_image(section, name="section")
    widget = aw.AtlasWidget(viewer)
    viewer.window.add_dock_widget(widget)
    return viewer, widget


def _run(widget, qtbot, action, timeout=120000):
    with qtbot.waitSignal(widget.run_done, timeout=timeout):
        assert action()


def test_find_choose_register_in_a_viewer(make_napari_viewer, qtbot, toy_reference, saved_index, errors):
    reference, labels = toy_reference
    section, truth = section_from_atlas((reference, labels), PLATE, TILT, crop=CROP)
    viewer, widget = _widget(make_napari_viewer, toy_reference, section)
    layer = viewer.layers["section"]
    before = layer.data.copy()
    assert not widget.find_button.isEnabled()  # no index yet
    _run(widget, qtbot, lambda: widget.load_index(saved_index))
    assert widget.lookup is not None and widget.lookup.n_plates == reference.shape[0]
    assert "40 plates" in widget.index_status.text() and widget.find_button.isEnabled()
    widget.section.set_layer(layer)
    _run(widget, qtbot, widget.find_plates)
    plates = widget.gallery.plates()
    assert plates == [i for i, _ in widget.lookup.lookup(section, top=5)]  # the lookup's ranking
    assert PLATE in plates[:3], plates
    assert widget.gallery.chosen() == plates[0] == widget.adjust.values()["plate"]  # best preselected
    preview = viewer.layers["atlas plate"]  # the chosen plate shown beside the section
    assert preview.translate[-1] > section.shape[1]
    widget.gallery.setCurrentRow(plates.index(PLATE))  # clicking a plate chooses it
    assert widget.adjust.values()["plate"] == PLATE
    np.testing.assert_array_equal(preview.data, widget.lookup.plate_image(PLATE))
    widget.method.setCurrentText("affine")
    _run(widget, qtbot, widget.register)
    assert errors == [] and "Done" in widget.status.text()
    warped = viewer.layers[f"section atlas plate {PLATE}"]
    carried = viewer.layers["section atlas labels"]
    assert warped.data.shape == section.shape and carried.data.shape == section.shape
    values = set(np.unique(carried.data).tolist())
    assert values <= set(np.unique(labels).tolist()) and len(values - {0}) >= 3  # atlas values kept
    inside = truth > 0
    assert np.mean(carried.data[inside] == truth[inside]) > 0.5  # mostly the true regions
    # region names on hover, through the layer's features
    names = dict(zip(carried.features["index"], carried.features["region"], strict=True))
    value = int(carried.data[section.shape[0] // 2, section.shape[1] // 2])
    assert names[value] == widget.lookup.region_name(value)
    status = carried.get_status((section.shape[0] // 2, section.shape[1] // 2), world=True)
    assert f"region: {widget.lookup.region_name(value)}" in status["coordinates"]
    np.testing.assert_array_equal(layer.data, before)  # the section is untouched
    # a second run with a nudge replaces the result layers instead of adding more
    count = len(viewer.layers)
    widget.adjust.rotation.setValue(6.0)
    _run(widget, qtbot, widget.register)
    assert len(viewer.layers) == count and "Done" in widget.status.text()
    assert widget.last.metrics["start"] is not None
    # landmark pairs placed in world coordinates (the plate layer sits beside the section) start
    # the registration: here the straight cut lies on its plate as it is, so the start is the identity
    widget.adjust.reset()
    pixels = np.array([[8.0, 10.0], [20.0, 40.0], [35.0, 22.0]])
    on_section = viewer.add_points(pixels, name="section landmarks")
    on_plate = viewer.add_points(pixels + np.asarray(preview.translate), name="plate landmarks")
    widget.adjust.section_points.set_layer(on_section)
    widget.adjust.plate_points.set_layer(on_plate)
    _run(widget, qtbot, widget.register)
    np.testing.assert_allclose(widget.last.metrics["start"], np.eye(3), atol=1e-6)
    # the confirmed pair is kept for the next training
    assert widget.add_example()
    assert len(widget.examples) == 1 and widget.examples[0][1] == PLATE
    assert widget.examples[0][0] is not layer.data


def test_rerank_by_pose_reaches_the_lookup(make_napari_viewer, qtbot, toy_reference, saved_index, errors):
    reference, labels = toy_reference
    section, _ = section_from_atlas((reference, labels), PLATE, TILT, crop=CROP)
    viewer, widget = _widget(make_napari_viewer, toy_reference, section)
    _run(widget, qtbot, lambda: widget.load_index(saved_index))
    assert widget.rerank.isChecked() == widget.lookup.rerank_default  # follows the index's default
    widget.section.set_layer(viewer.layers["section"])
    calls = []
    real, real_search = widget.lookup.lookup, widget.lookup.search_poses

    def recording(*args, **kwargs):
        calls.append(kwargs.get("rerank"))
        return real(*args, **kwargs)

    def searching(*args, **kwargs):  # re-ranking: the pose search itself, with the job's cancel
        calls.append("pose search" if kwargs.get("cancel") is not None else "no cancel")
        return real_search(*args, **kwargs)

    widget.lookup.lookup, widget.lookup.search_poses = recording, searching
    assert widget.lookup.first_stage == "embedding" and widget.lookup.framing is True
    cases = [
        (True, True, "pose search", "pose distance"),
        (False, True, False, "framing-pooled embedding distance"),
        (False, False, False, "embedding distance"),
    ]
    for checked, framing, call, kind in cases:
        widget.rerank.setChecked(checked)
        widget.lookup.framing = framing
        _run(widget, qtbot, widget.find_plates)
        assert calls[-1] == call and errors == []
        expected = real(section, top=widget.top.value(), rerank=checked)
        assert widget.gallery.plates() == [p for p, _ in expected]
        # the tooltips say which distance
        assert widget.gallery.item(0).toolTip().startswith(f"plate {expected[0][0]}, {kind} "), kind
        # what the find ran with: every option of the pose search, None without it
        settings = widget.find_settings
        assert settings["rerank"] is checked and settings["plain_ranked"] is (True if checked else None)
        assert settings["rerank_options"] == (check_rerank_options({}) if checked else None)
        assert settings["densified"] is (False if checked else None)  # dense_sweep is off by default
        assert settings["framing"] is framing  # the order the search starts from depends on it
    widget.lookup.framing = True
    assert calls.count("pose search") == 1 and calls.count(False) == 2  # one find each way


def test_the_pose_search_stops_on_cancel(trained_lookup, toy_reference):
    from napari_nephi import Cancelled
    from napari_nephi.widgets import _atlas_jobs as jobs

    section = section_from_atlas(toy_reference[0], 12.0)
    checks = []

    def cancel_during_the_search():
        checks.append(1)
        return len(checks) >= 2  # the first check passes, the next one (inside the search) stops

    with pytest.raises(Cancelled):
        jobs.find_plates(None, cancel_during_the_search, trained_lookup, section, 5, rerank=True)
    assert len(checks) == 2


def test_train_cancel_then_train_and_save(make_napari_viewer, qtbot, toy_reference, tmp_path, errors):
    viewer, widget = _widget(make_napari_viewer, toy_reference)
    widget.source.layer.set_layer(viewer.layers["toy atlas"])
    regions = viewer.layers["toy atlas labels"]
    regions.features = {"index": [0, 7, 10], "name": ["background", "hippocampus left", "cerebellum"]}
    widget.source.annotation.set_layer(regions)
    widget.steps.setValue(100000)
    with qtbot.waitSignal(widget.run_done, timeout=120000):
        assert widget.train()
        assert not widget.train_button.isEnabled() and widget.cancel_button.isEnabled()
        qtbot.waitUntil(lambda: widget.progress.maximum() > 0, timeout=60000)  # training has begun
        widget.cancel_button.click()
    assert "Cancelled" in widget.status.text() and widget.lookup is None and errors == []
    assert widget.state.is_(RunState.IDLE) and widget.train_button.isEnabled()
    widget.steps.setValue(3)  # the widget is usable again: a short training goes through
    _run(widget, qtbot, widget.train)
    assert errors == [] and widget.lookup is not None and widget.lookup.settings["steps_done"] == 3
    assert widget.lookup.region_name(7) == "hippocampus left"  # named by the Labels layer's features
    assert widget.lookup.region_name(10) == "cerebellum" and widget.lookup.region_name(3) == "region 3"
    assert widget.lookup.settings["real_sections"] == 0
    reference, _ = toy_reference  # a confirmed section goes into the next training
    widget.section.set_layer(viewer.add_image(reference[10], name="plate 10"))
    widget.adjust.set_plate(10)
    assert widget.add_example()
    _run(widget, qtbot, widget.train)
    assert widget.lookup.settings["real_sections"] == 1
    _run(widget, qtbot, lambda: widget.save_index(tmp_path / "saved"))
    assert (tmp_path / "saved" / "config.json").exists() and "saved" in widget.status.text()


def test_errors_are_shown_not_raised(make_napari_viewer, qtbot, toy_reference, saved_index, tmp_path, errors):
    viewer, widget = _widget(make_napari_viewer, toy_reference)
    not_an_index = tmp_path / "empty"
    not_an_index.mkdir()
    _run(widget, qtbot, lambda: widget.load_index(not_an_index))
    assert len(errors) == 1 and widget.lookup is None and "Failed" in widget.status.text()
    _run(widget, qtbot, lambda: widget.load_index(saved_index))
    flat = viewer.add_image(np.full((40, 40), 0.5, np.float32), name="flat")
    widget.section.set_layer(flat)
    _run(widget, qtbot, widget.find_plates)
    assert len(errors) == 2 and "constant" in errors[1].lower()
    assert widget.gallery.count() == 0 and widget.find_button.isEnabled()
    widget.source.set_kind("file or folder")  # no path given
    _run(widget, qtbot, widget.train)
    assert len(errors) == 3 and "path of the atlas" in errors[2]
    assert widget.lookup is not None and widget.train_button.isEnabled()  # the loaded index is kept


def test_widget_docks_from_the_plugin_menu(make_napari_viewer, toy_reference):
    viewer = make_napari_viewer()
    viewer.add_image(toy_reference[0], name="toy atlas")
    _, widget = viewer.window.add_plugin_dock_widget("napari-nephi", "Atlas lookup")
    assert isinstance(widget, aw.AtlasWidget) and widget.source.layer.layer() is viewer.layers["toy atlas"]
    assert widget.train_button.isEnabled() and not widget.find_button.isEnabled()


def test_multiscale_section_uses_a_level_that_fits(
    make_napari_viewer, qtbot, toy_reference, saved_index, errors, monkeypatch
):
    from napari_nephi.widgets import _atlas_section

    monkeypatch.setattr(_atlas_section, "MAX_SECTION_SIDE", 100)  # stands in for a whole slide's 4096
    reference, labels = toy_reference
    section, truth = section_from_atlas((reference, labels), PLATE, TILT, crop=CROP)
    pyramid = [np.kron(section, np.ones((k, k), np.float32)) for k in (4, 2, 1)]  # 256, 128, 64 px
    viewer, widget = _widget(make_napari_viewer, toy_reference)
    layer = viewer.add_image(pyramid, multiscale=True, name="slide", scale=(0.5, 0.5), translate=(3.0, 7.0))
    widget.section.set_layer(layer)
    image = widget.section_image()
    assert image.shape == section.shape  # the 64-pixel level, not the 256-pixel one
    _run(widget, qtbot, lambda: widget.load_index(saved_index))
    widget.adjust.set_plate(PLATE)
    # landmarks on the slide in world coordinates: level-0 pixel (4 y, 4 x) is the level's (y, x)
    pixels = np.array([[8.0, 10.0], [20.0, 40.0], [35.0, 22.0]])
    on_slide = viewer.add_points(4 * pixels * 0.5 + (3.0, 7.0), name="slide landmarks")
    preview = viewer.layers["atlas plate"]  # beside the slide, as large as it: 128 world units
    np.testing.assert_allclose(preview.scale, (2.0, 2.0))
    on_plate = viewer.add_points(pixels * 2.0 + np.asarray(preview.translate), name="plate marks")
    widget.adjust.section_points.set_layer(on_slide)
    widget.adjust.plate_points.set_layer(on_plate)
    widget.method.setCurrentText("affine")
    _run(widget, qtbot, widget.register)
    assert errors == []
    np.testing.assert_allclose(widget.last.metrics["start"], np.eye(3), atol=1e-6)
    carried = viewer.layers["slide atlas labels"]
    assert carried.data.shape == section.shape
    np.testing.assert_allclose(carried.scale, (2.0, 2.0))  # 4 level-0 pixels of 0.5
    np.testing.assert_allclose(carried.translate, (3.0, 7.0))
    inside = truth > 0
    assert np.mean(carried.data[inside] == truth[inside]) > 0.5


def test_train_from_a_folder_of_plates_with_labels(
    make_napari_viewer, qtbot, toy_reference, tmp_path, errors
):
    from napari_nephi.io import write_tiff

    reference, labels = toy_reference
    for name, stack in (("plates", reference[::4]), ("labels", labels[::4].astype(np.uint16))):
        (tmp_path / name).mkdir()
        for k, image in enumerate(stack):  # natural order: p2 after p1, p10 after p9
            write_tiff(tmp_path / name / f"p{k + 1}.tif", image)
    viewer, widget = _widget(make_napari_viewer, toy_reference)
    widget.source.set_kind("file or folder")
    widget.source.path.setText(str(tmp_path / "plates"))
    widget.source.annotation_path.setText(str(tmp_path / "labels"))
    widget.steps.setValue(2)
    _run(widget, qtbot, widget.train)
    assert errors == [] and widget.lookup.n_plates == 10
    np.testing.assert_array_equal(widget.lookup.plate_labels(9), labels[36])
    assert "10 plates, with labels" in widget.index_status.text()
