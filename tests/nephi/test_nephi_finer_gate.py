"""The finer-knot level's near-rigid gate (option ``coarse_finer_gate``, opt-in, session 43): where the map
before the coarse stage's finer-knot level is near-rigid (RMS of det J - 1 at most the gate), that level does
not run; elsewhere, and by default, the stage is as before, bit for bit."""

import numpy as np
import pytest
from scipy import ndimage as ndi

import napari_nephi as nn
from napari_nephi.core.errors import InputError
from napari_nephi.engines.nephi.coarse import level_iterations

RUN = dict(method="nephi", device="cpu", initial="none", levels=3, coarse_iterations=4, iterations=0)
SIZE = (64, 64)


@pytest.fixture(scope="module")
def pair():
    """Smoothed noise and its copy shifted by one pixel along x (64 x 64): near-rigid."""
    texture = ndi.gaussian_filter(np.random.default_rng(1).random(SIZE), 2.0).astype(np.float32)
    return texture, np.roll(texture, 1, axis=1)


@pytest.fixture(scope="module")
def warped_pair(pair):
    """The same texture under a smooth 3 px deformation (a sine along x varying with y): not near-rigid."""
    y, x = np.mgrid[: SIZE[0], : SIZE[1]].astype(np.float32)
    u = 3.0 * np.sin(2 * np.pi * y / SIZE[0])
    moving = ndi.map_coordinates(pair[0], [y, x + u], order=1, mode="nearest").astype(np.float32)
    return pair[0], moving


def _run(pair, **options):
    """The registration and the number of coarse progress events."""
    stages: list[str] = []
    reg = nn.register(*pair, progress=lambda e: stages.append(e.stage), **{**RUN, **options})
    return reg, sum(name.startswith("coarse") for name in stages)


def _field(reg):
    return reg.transform.displacement(SIZE)


def test_the_gate_is_off_by_default_and_none_is_the_default_bit_for_bit(pair):
    default, steps = _run(pair)
    off, _ = _run(pair, coarse_finer_gate=None)
    assert default.settings["coarse_finer_gate"] is None and off.settings["coarse_finer_gate"] is None
    assert "coarse_finer_detj_rms" not in default.metrics and "coarse_finer_kept" not in default.metrics
    assert default.metrics["coarse_iterations"] == steps == sum(level_iterations(4, 2))
    assert np.array_equal(_field(default), _field(off))


def test_a_near_rigid_map_skips_the_finer_level(pair):
    """A one-pixel shift: the map before the finer level reads far under 0.02, so the level does not run;
    the result is the stage without that level, bit for bit, and its steps are not counted."""
    default, _ = _run(pair)
    without, _ = _run(pair, coarse_finer_level=False)
    gated, steps = _run(pair, coarse_finer_gate=0.02)
    reading = gated.metrics["coarse_finer_detj_rms"]
    assert 0 < reading <= 0.02 and gated.metrics["coarse_finer_kept"] is False
    assert gated.settings["coarse_finer_gate"] == 0.02
    last = level_iterations(4, 2)[-1]
    assert gated.metrics["coarse_iterations"] == steps == default.metrics["coarse_iterations"] - last
    assert np.array_equal(_field(gated), _field(without))
    assert not np.array_equal(_field(gated), _field(default))


def test_a_gate_the_reading_exceeds_keeps_the_level_bit_for_bit(pair, warped_pair):
    default, _ = _run(pair)
    kept, steps = _run(pair, coarse_finer_gate=0.0)
    assert kept.metrics["coarse_finer_kept"] is True and kept.metrics["coarse_finer_detj_rms"] > 0
    assert steps == default.metrics["coarse_iterations"]
    assert np.array_equal(_field(kept), _field(default))
    # a deformation reads over the project's near-rigid bound: the level runs, the default's result
    deformed, _ = _run(warped_pair, coarse_iterations=12)
    gated, _ = _run(warped_pair, coarse_iterations=12, coarse_finer_gate=0.02)
    assert gated.metrics["coarse_finer_detj_rms"] > 0.02 and gated.metrics["coarse_finer_kept"] is True
    assert np.array_equal(_field(gated), _field(deformed))


@pytest.mark.parametrize(
    "options, why",
    [
        (dict(mode="predict+refine"), "mode='optimize'"),
        (dict(levels=1), "levels > 1"),
        (dict(coarse_iterations=0), "coarse_iterations > 0"),
        (dict(coarse_finer_level=False), "coarse_finer_level"),
        (dict(coarse_reg_weight=0.0), "coarse_reg_weight"),
        (dict(coarse_finer_gate=-0.1), "coarse_finer_gate"),
        (dict(coarse_finer_gate=float("nan")), "coarse_finer_gate"),
        ("volume", "2D images"),
    ],
)
def test_the_gate_where_it_cannot_act_is_refused(pair, options, why):
    """Refused outside 2D optimize with a finer-knot level, and out of range; a 16^3 volume too."""
    if options == "volume":
        vol = ndi.gaussian_filter(np.random.default_rng(2).random((16, 16, 16)), 1.5).astype(np.float32)
        pair, options = (vol, vol), {}
    options = {"coarse_finer_gate": 0.02, **options}
    with pytest.raises(InputError, match=why.replace("(", r"\(").replace(")", r"\)")):
        nn.register(*pair, **{**RUN, **options})
