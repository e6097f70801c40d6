"""The options panel on its own: rows per method, values ready for register()."""

import pytest

import napari_nephi
from napari_nephi.engines.registry import engine_info
from napari_nephi.synthetic import em_stack
from napari_nephi.widgets._options import RegistrationOptions


def test_affine_values(qtbot):
    opts = RegistrationOptions("affine")
    qtbot.addWidget(opts)
    opts.kind.setCurrentText("rigid")
    opts.iterations.setValue(20)
    values = opts.values()
    assert values == {
        "method": "affine",
        "device": "auto",
        "iterations": 20,
        "kind": "rigid",
        "similarity": "ncc",
    }


def test_auto_values_are_left_out(qtbot):
    opts = RegistrationOptions("affine")
    qtbot.addWidget(opts)
    assert opts.iterations.text() == "auto"
    assert "iterations" not in opts.values() and "levels" not in opts.values()


def test_rows_follow_method(qtbot):
    opts = RegistrationOptions("affine")
    qtbot.addWidget(opts)
    opts.show()
    assert opts.kind.isVisible() and not opts.mode.isVisible()
    if opts.method.findText("nephi") < 0:
        pytest.skip("nephi engine not installed")
    opts.method.setCurrentText("nephi")
    assert opts.mode.isVisible() and not opts.kind.isVisible()


def test_nephi_values(qtbot):
    opts = RegistrationOptions("nephi")
    qtbot.addWidget(opts)
    if opts.method.currentText() != "nephi":
        pytest.skip("nephi engine not installed")
    opts.preset.setCurrentText("accurate")
    opts.reg_weight.setValue(0.5)
    opts.model_path.setText("/models/tc.pt")
    values = opts.values()
    assert values["preset"] == "accurate" and values["reg_weight"] == 0.5
    assert "weights" not in values  # optimize mode needs no model
    assert not opts.model_row.isEnabled()
    opts.mode.setCurrentText("predict")
    assert opts.model_row.isEnabled()
    assert opts.values()["weights"] == "/models/tc.pt"


def test_advanced_options_are_folded_and_reachable(qtbot):
    opts = RegistrationOptions("affine")
    qtbot.addWidget(opts)
    opts.show()
    qtbot.waitExposed(opts)
    assert not opts.advanced.isExpanded()
    assert opts.iterations.visibleRegion().isEmpty()  # folded away
    folded_height = opts.sizeHint().height()
    opts.advanced.toggleButton().click()
    qtbot.waitUntil(lambda: not opts.iterations.visibleRegion().isEmpty(), timeout=2000)
    assert opts.sizeHint().height() > folded_height
    opts.iterations.setValue(40)
    assert opts.values()["iterations"] == 40
    if opts.method.findText("nephi") < 0:
        pytest.skip("nephi engine not installed")
    opts.method.setCurrentText("nephi")  # the open section takes the NePhi rows' height
    qtbot.waitUntil(lambda: not opts.sample_points.visibleRegion().isEmpty(), timeout=2000)
    assert opts.similarity.isHidden()


def _row_shown(opts: RegistrationOptions, widget) -> bool:
    label = opts.advanced_form.labelForField(widget)
    return not widget.isHidden() and label is not None and not label.isHidden()


def test_mito_gets_only_the_options_it_takes(qtbot):
    opts = RegistrationOptions("affine")
    qtbot.addWidget(opts)
    opts.iterations.setValue(30)
    opts.levels.setValue(2)
    assert _row_shown(opts, opts.iterations) and _row_shown(opts, opts.levels)
    assert opts.values()["iterations"] == 30 and opts.values()["levels"] == 2
    opts.method.setCurrentText("mito")  # keypoint matching has neither
    assert not _row_shown(opts, opts.iterations) and not _row_shown(opts, opts.levels)
    values = opts.values()
    assert values == {"method": "mito", "device": "auto"}
    assert set(values) - {"method", "device"} <= set(engine_info("mito").options)
    em = em_stack(2, (128, 128), seed=1)
    fixed, moving = em["stack"][0], em["stack"][1]
    reg = napari_nephi.register(fixed, moving, **values)  # register() accepts every option sent
    assert reg.settings["method"] == "mito"
    opts.method.setCurrentText("affine")  # the rows and their values come back
    assert _row_shown(opts, opts.iterations) and opts.values()["iterations"] == 30


@pytest.mark.parametrize("method", ["affine", "nephi", "mito"])
def test_every_method_gets_only_options_its_engine_takes(qtbot, method):
    opts = RegistrationOptions(method)
    qtbot.addWidget(opts)
    opts.iterations.setValue(5)
    opts.levels.setValue(1)
    opts.reg_weight.setValue(0.5)
    opts.sample_points.setValue(2048)
    sent = set(opts.values()) - {"method", "device"}
    assert sent <= set(engine_info(method).options)
    assert ("iterations" in sent) == (method != "mito")


def test_whole_slide_engines_are_not_offered(qtbot):
    """The histology engine returns a lazy pyramid and has its own widget: Register images leaves it out."""
    opts = RegistrationOptions("affine")
    qtbot.addWidget(opts)
    offered = [opts.method.itemText(i) for i in range(opts.method.count())]
    assert "histology" not in offered and {"affine", "nephi", "mito"} <= set(offered)
