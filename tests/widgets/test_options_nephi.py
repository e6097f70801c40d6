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


def test_the_volume_warp_blur_row_reaches_the_engine(nephi_options):
    """Session 38 (review 2 of session 37, B4): the row "coarse warp blur (3D)" sends the engine's
    ``coarse_warp_blur``: "default" sends nothing (the engine's volume default: blur "all", weight 0.03, no
    neural steps), "off" gives the earlier volume default (no blur, weight 0.1, the neural steps asked); each
    lands in the result's settings. No "on" (review 1 of session 38, B4: the option "all" above the size
    cap keeps weight 0.1 and the neural steps, unmeasured)."""
    import numpy as np
    from scipy import ndimage as ndi

    import napari_nephi

    opts = nephi_options
    label = opts.advanced_form.labelForField(opts.warp_blur)
    assert label is not None and not label.isHidden() and not opts.warp_blur.isHidden()
    assert opts.warp_blur.currentText() == "default" and "coarse_warp_blur" not in opts.values()
    rng = np.random.default_rng(1)
    vol = ndi.gaussian_filter(rng.random((8, 10, 9)), 1.5).astype(np.float32)
    moving = ndi.shift(vol, (0.2, -0.15, 0.1), order=3, mode="nearest").astype(np.float32)
    tiny = dict(coarse_iterations=2, initial="none", sample_points=64, reg_points=4, hidden=8, layers=1,
                n_frequencies=4, local_dim=0)  # fmt: skip
    seen = {}
    assert [opts.warp_blur.itemText(i) for i in range(opts.warp_blur.count())] == ["default", "off"]
    for text in ("default", "off"):
        opts.warp_blur.setCurrentText(text)
        opts.iterations.setValue(2 if text == "off" else 0)  # 0: "auto"
        values = {**opts.values(), "device": "cpu"}
        s = napari_nephi.register(vol, moving, **values, **tiny).settings
        seen[text] = (
            values.get("coarse_warp_blur"),
            s["coarse_warp_blur"],
            s["coarse_reg_weight"],
            s["iterations"],
        )
    assert seen == {"default": (None, "all", 0.03, 0), "off": (False, False, 0.1, 2)}
    opts.method.setCurrentText("affine")
    assert opts.warp_blur.isHidden() and "coarse_warp_blur" not in opts.values()


def test_the_warp_blur_tooltip_names_the_caps_as_they_are_when_built(qtbot, monkeypatch, nephi_options):
    """Session 40 (review 2, B-4): the tooltip reads engine.VOLUME_DEFAULT_MAX_VOXELS and
    VOLUME_DEFAULT_STEPS_MAX_VOXELS when the panel is built, not when the module is imported, so a cap changed
    at run time (or the band switched off, None) is what the tooltip names. Fails when the widget imports the
    constants by name."""
    from napari_nephi.engines.nephi import engine as nephi_engine

    tip = nephi_options.warp_blur.toolTip()
    assert f"{nephi_engine.VOLUME_DEFAULT_MAX_VOXELS:,}" in tip
    assert f"neural steps up to {nephi_engine.VOLUME_DEFAULT_STEPS_MAX_VOXELS:,}" in tip
    monkeypatch.setattr(nephi_engine, "VOLUME_DEFAULT_MAX_VOXELS", 12_345)
    monkeypatch.setattr(nephi_engine, "VOLUME_DEFAULT_STEPS_MAX_VOXELS", None)
    opts = RegistrationOptions("nephi")
    qtbot.addWidget(opts)
    tip = opts.warp_blur.toolTip()
    assert "up to 12,345 voxels" in tip and "neural steps up to" not in tip
    monkeypatch.setattr(nephi_engine, "VOLUME_DEFAULT_STEPS_MAX_VOXELS", 67_890)
    opts = RegistrationOptions("nephi")
    qtbot.addWidget(opts)
    assert "neural steps up to 67,890" in opts.warp_blur.toolTip()
