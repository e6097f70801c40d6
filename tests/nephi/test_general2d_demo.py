"""``napari-nephi demo`` predicts with the shipped general 2D model; 3D still optimises."""

import pytest

from napari_nephi.cli.demo import run_and_wait, setup_demo
from napari_nephi.engines.nephi import weights
from napari_nephi.engines.nephi.train import dice


@pytest.mark.parametrize("sample", ["tc", "ihc"])
def test_2d_demos_use_the_general_model(make_napari_viewer, sample):
    options = setup_demo(make_napari_viewer(), sample).widget.options
    assert options.mode.currentText() == "predict"
    values = options.values()
    assert values["mode"] == "predict" and values["weights"] == "general2d"


def test_3d_demo_optimises(make_napari_viewer):
    assert weights.default_model(3) is None
    options = setup_demo(make_napari_viewer(), "mri").widget.options
    assert options.values()["mode"] == "optimize"


def test_tc_demo_registers_with_the_general_model(make_napari_viewer):
    viewer = make_napari_viewer()
    setup = setup_demo(viewer, "tc")
    run_and_wait(setup, timeout=120)
    reg = setup.widget.last
    assert reg.settings["mode"] == "predict" and reg.settings["weights"] == "general2d"
    assert reg.metrics["ncc_after"] > reg.metrics["ncc_before"] + 0.02, reg.metrics
    fixed_labels = viewer.layers["fixed labels (T&C)"].data
    moving_labels = viewer.layers["moving labels (T&C)"].data
    before, after = (
        dice(moving_labels, fixed_labels),
        dice(reg.transform.warp_labels(moving_labels), fixed_labels),
    )
    assert after > before + 0.1, (before, after)  # the shapes, which the model never saw, line up
    assert reg.metrics["folds"] == 0
