"""The NePhi rows of the options panel: the global stage and the default model."""

import pytest

from napari_nephi.engines.nephi.initial import INITIALS
from napari_nephi.engines.nephi.weights import BUILTIN
from napari_nephi.widgets._options import RegistrationOptions


@pytest.fixture
def nephi_options(qtbot):
    opts = RegistrationOptions("nephi")
    qtbot.addWidget(opts)
    if opts.method.currentText() != "nephi":
        pytest.skip("nephi engine not installed")
    return opts


def test_global_stage_is_left_to_the_engine_unless_chosen(nephi_options):
    opts = nephi_options
    assert opts.initial.currentText() == "auto" and "initial" not in opts.values()
    assert [opts.initial.itemText(i) for i in range(opts.initial.count())] == ["auto", *INITIALS]
    opts.initial.setCurrentText("rigid")
    assert opts.values()["initial"] == "rigid"


def test_an_empty_model_field_lets_the_engine_choose_its_default(nephi_options):
    opts = nephi_options
    opts.mode.setCurrentText("predict")
    assert "weights" not in opts.values()
    assert all(name in opts.model_path.placeholderText() for name in BUILTIN)
    opts.model_path.setText("tc")
    assert opts.values()["weights"] == "tc"
