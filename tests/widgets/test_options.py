"""The options panel on its own: rows per method, values ready for register()."""

import pytest

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
