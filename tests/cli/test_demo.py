"""``napari-nephi demo``: each sample docks the widget that fits it, with distinct inputs."""

import numpy as np
import pytest
from napari.layers import Image, Labels

from napari_nephi import InputError
from napari_nephi.cli import main
from napari_nephi.cli.demo import ATLAS_PLATE, setup_demo
from napari_nephi.widgets import EMAlignWidget, NephiWidget, RegisterWidget


def test_em_sample_docks_the_em_alignment_widget(make_napari_viewer):
    viewer = make_napari_viewer()
    setup = setup_demo(viewer, "em")
    assert isinstance(setup.widget, EMAlignWidget) and setup.title == "EM stack alignment"
    assert setup.widget.stack.layer() is setup.inputs["stack"]
    assert isinstance(setup.inputs["stack"], Image) and setup.inputs["stack"].data.ndim == 3
    assert setup.widget.masks.layer() is setup.inputs["masks"] and isinstance(setup.inputs["masks"], Labels)
    assert setup.title in viewer.window.dock_widgets
    # the same viewer (one fewer to open and close): the refusal does not depend on its layers
    with pytest.raises(InputError, match="takes no --method"):
        setup_demo(viewer, "em", method="nephi")


def test_atlas_sample_registers_the_section_onto_its_plate(make_napari_viewer):
    viewer = make_napari_viewer()
    setup = setup_demo(viewer, "atlas")
    widget = setup.widget
    assert isinstance(widget, RegisterWidget) and not isinstance(widget, NephiWidget)
    fixed, moving = widget.fixed.layer(), widget.moving.layer()
    assert (
        fixed is not moving
        and fixed.name == f"atlas plate {ATLAS_PLATE}"
        and moving.name.startswith("section")
    )
    assert fixed.data.ndim == moving.data.ndim == 2
    np.testing.assert_array_equal(fixed.data, viewer.layers["toy atlas"].data[ATLAS_PLATE])
    assert widget.options.method.currentText() == "affine"


@pytest.mark.parametrize("sample", ["tc", "mri"])
def test_pair_samples_use_fixed_and_moving_of_the_pair(make_napari_viewer, sample):
    viewer = make_napari_viewer()
    setup = setup_demo(viewer, sample)
    widget = setup.widget
    assert isinstance(widget, NephiWidget) and widget.options.method.currentText() == "nephi"
    assert widget.fixed.layer().name.startswith("fixed") and widget.moving.layer().name.startswith("moving")
    with pytest.raises(InputError, match="Unknown method 'nefi'"):  # (the same viewer, as above)
        setup_demo(viewer, sample, method="nefi")


def test_em_demo_runs_and_writes_a_screenshot(tmp_path, capsys, qapp):
    png = tmp_path / "em.png"
    assert main(["demo", "--sample", "em", "--run", "--screenshot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "The em demo ran in" in out and f"Wrote {png}" in out
    from imageio.v3 import imread

    image = imread(png)
    assert image.ndim == 3 and image.shape[0] >= 600 and image.shape[1] >= 900
    assert image[..., :3].std() > 10  # a picture, not a blank window


def test_ihc_demo_prints_an_error_below_the_unregistered_one(tmp_path, capsys, qapp, monkeypatch):
    """... and gives its caller torch's thread count back: numba's OpenMP pool, which napari starts on
    this thread when it first colours a labels layer, sets it to the number of cores (session 41). The
    pool starts once per process, so the test changes the count itself where the demo reads its result."""
    import re

    import torch

    from napari_nephi.cli import demo

    threads = torch.get_num_threads()
    real = demo.known_error

    def known_error(setup):
        torch.set_num_threads(threads + 1)  # what the pool's omp_set_num_threads did to this thread
        return real(setup)

    monkeypatch.setattr(demo, "known_error", known_error)
    png = tmp_path / "ihc.png"
    try:
        assert main(["demo", "--sample", "ihc", "--run", "--screenshot", str(png)]) == 0
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    found = re.search(r"known deformation: ([\d.]+) px unregistered, ([\d.]+) px registered", out)
    assert found is not None, out
    before, after = float(found.group(1)), float(found.group(2))
    assert before > 2.0 and after < 0.5 * before, (before, after)  # one stain: the model's NCC holds
