"""``napari-nephi demo`` predicts with the shipped general 2D model; 3D still optimises."""

import numpy as np
import pytest
from scipy import ndimage

from napari_nephi.cli.demo import known_error, run_and_wait, setup_demo
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


def _predicted_demo(viewer, sample: str):
    """Run the ``sample`` demo; it predicts with the general model."""
    setup = setup_demo(viewer, sample)
    run_and_wait(setup, timeout=120)
    reg = setup.widget.last
    assert reg.settings["mode"] == "predict" and reg.settings["weights"] == "general2d"
    return setup, reg


def test_tc_demo_registers_with_the_general_model(make_napari_viewer):
    viewer = make_napari_viewer()
    _, reg = _predicted_demo(viewer, "tc")
    assert reg.metrics["ncc_after"] > reg.metrics["ncc_before"] + 0.02, reg.metrics
    fixed_labels = viewer.layers["fixed labels (T&C)"].data
    moving_labels = viewer.layers["moving labels (T&C)"].data
    before, after = (
        dice(moving_labels, fixed_labels),
        dice(reg.transform.warp_labels(moving_labels), fixed_labels),
    )
    assert after > before + 0.1, (before, after)  # the shapes, which the model never saw, line up
    assert reg.metrics["folds"] == 0


def test_ihc_demo_moves_the_one_stain_pair_onto_its_known_deformation(make_napari_viewer):
    setup, reg = _predicted_demo(make_napari_viewer(), "ihc")
    truth = setup.inputs["moving"].metadata["true_displacement"]
    # the endpoint error, computed here from points mapped by the transform
    rng = np.random.default_rng(0)
    pts = rng.uniform(32, 480, size=(500, 2))
    mapped = reg.transform.map_points(pts)
    true_at = np.stack([ndimage.map_coordinates(t, pts.T, order=1) for t in truth], axis=1) + pts
    err_pts = float(np.linalg.norm(mapped - true_at, axis=1).mean())
    before, after = known_error(setup)
    assert before == pytest.approx(float(np.linalg.norm(truth, axis=0).mean()), rel=1e-5)
    assert after < 0.4 * before and err_pts < 0.4 * before, (before, after, err_pts)
    assert reg.metrics["folds"] == 0
