"""The coarse stage's capture level (option ``coarse_capture``, opt-in, session 42): one level on a grid
and with knots twice as coarse as the schedule's first, run before the schedule, which stays as it was."""

import numpy as np
import pytest
from scipy import ndimage as ndi

import napari_nephi as nn
from napari_nephi.core.errors import InputError
from napari_nephi.engines.nephi.coarse import knot_spacings, level_iterations

RUN = dict(method="nephi", device="cpu", initial="none", levels=3, coarse_iterations=4, iterations=0)
SIZE = (64, 64)
# ``displacement(SIZE)[:, 8::16, 8::16]`` of the default run below, read at ccab1dc, before ``coarse_capture``
BEFORE_OPTION = [
    -0.01283,
    -0.09237,
    0.00020,
    0.04193,
    -0.07503,
    -0.02105,
    -0.07138,
    -0.07001,
    -0.02642,
    0.05784,
    -0.01384,
    0.14013,
    0.08555,
    -0.02944,
    -0.07447,
    0.11857,
    1.06093,
    1.00818,
    1.02156,
    1.04346,
    0.98942,
    0.96011,
    0.94529,
    0.99509,
    1.01359,
    0.95791,
    0.95808,
    1.02339,
    1.04250,
    1.01973,
    1.01937,
    1.07596,
]


@pytest.fixture(scope="module")
def pair():
    """Smoothed noise and its copy shifted by one pixel along x (64 x 64)."""
    texture = ndi.gaussian_filter(np.random.default_rng(1).random(SIZE), 2.0).astype(np.float32)
    return texture, np.roll(texture, 1, axis=1)


def _run(pair, **options):
    """The registration and the stage name of every coarse progress event."""
    stages: list[str] = []
    reg = nn.register(*pair, progress=lambda e: stages.append(e.stage), **RUN, **options)
    return reg, [name for name in stages if name.startswith("coarse")]


def test_capture_is_off_by_default_and_zero_is_the_default_bit_for_bit(pair):
    default, stages = _run(pair)
    off, _ = _run(pair, coarse_capture=0)
    assert default.settings["coarse_capture"] == off.settings["coarse_capture"] == 0
    assert [tuple(g) for g in default.settings["coarse_shapes"]] == [(16, 16), (32, 32)]
    assert default.metrics["coarse_iterations"] == len(stages) == sum(level_iterations(4, 2))
    assert np.array_equal(default.transform.displacement(SIZE), off.transform.displacement(SIZE))
    # the off path as before the option existed: a 4 x 4 sample read at ccab1dc (frozen tree, CPU, torch 2.13)
    sample = default.transform.displacement(SIZE)[:, 8::16, 8::16].ravel()
    np.testing.assert_allclose(sample, BEFORE_OPTION, atol=1e-4)


def test_capture_adds_a_coarser_level_before_the_same_schedule(pair):
    default, _ = _run(pair)
    reg, stages = _run(pair, coarse_capture=3)
    s, s0 = reg.settings, default.settings
    assert s["coarse_capture"] == 3
    grids = [tuple(g) for g in s["coarse_shapes"]]
    assert grids == [(8, 8), (16, 16), (32, 32)]  # a grid twice as coarse first, then the schedule's
    assert s["coarse_spacings"][1:] == s0["coarse_spacings"]  # the later levels' knots unchanged
    assert s["coarse_spacings"][0] == pytest.approx(2 * s0["coarse_spacings"][0])
    assert s["coarse_spacings"][:3] == pytest.approx(knot_spacings(SIZE, grids))
    # the capture level's steps, then the schedule's steps as they were
    assert reg.metrics["coarse_iterations"] == len(stages) == 3 + default.metrics["coarse_iterations"]
    assert set(stages) == {"coarse (4 level(s))"} and reg.metrics["coarse_levels"] == 4
    assert not np.array_equal(reg.transform.displacement(SIZE), default.transform.displacement(SIZE))


@pytest.mark.parametrize(
    "options, why",
    [
        (dict(mode="predict+refine"), "mode='optimize'"),
        (dict(levels=1), "levels > 1"),
        (dict(coarse_capture=-1), "coarse_capture"),
        (dict(coarse_capture=2.5), "coarse_capture"),
    ],
)
def test_capture_where_it_cannot_run_is_refused(pair, options, why):
    options = {"coarse_capture": 5, **options}
    with pytest.raises(InputError, match=why.replace("(", r"\(").replace(")", r"\)")):
        nn.register(*pair, **{**RUN, **options})


def test_capture_is_refused_on_volumes():
    vol = ndi.gaussian_filter(np.random.default_rng(2).random((16, 16, 16)), 1.5).astype(np.float32)
    with pytest.raises(InputError, match="2D images"):
        nn.register(vol, vol, **RUN, coarse_capture=5)


def test_the_gate_drops_a_near_rigid_capture_and_gives_the_default_bit_for_bit(pair):
    """A one-pixel shift: the capture level's map is near-rigid (RMS of det J - 1 about 0.0015), so with the
    gate at 0.02 its velocity is dropped and the result is the default's; with the gate at 0 it is kept."""
    default, _ = _run(pair)
    ungated, _ = _run(pair, coarse_capture=3)
    dropped, stages = _run(pair, coarse_capture=3, coarse_capture_gate=0.02)
    kept, _ = _run(pair, coarse_capture=3, coarse_capture_gate=0.0)
    reading = dropped.metrics["coarse_capture_detj_rms"]
    assert 0 < reading <= 0.02 and dropped.metrics["coarse_capture_kept"] is False
    assert dropped.settings["coarse_capture_gate"] == 0.02 and len(stages) == 3 + 2 + 4 + 4  # it still ran
    assert np.array_equal(dropped.transform.displacement(SIZE), default.transform.displacement(SIZE))
    assert kept.metrics["coarse_capture_kept"] is True and kept.metrics["coarse_capture_detj_rms"] == reading
    assert np.array_equal(kept.transform.displacement(SIZE), ungated.transform.displacement(SIZE))
    assert "coarse_capture_detj_rms" not in ungated.metrics  # no gate: no reading


def test_the_gate_needs_the_capture_level(pair):
    with pytest.raises(InputError, match="set coarse_capture"):
        nn.register(*pair, coarse_capture_gate=0.02, **RUN)
    with pytest.raises(InputError, match="coarse_capture_gate"):
        nn.register(*pair, coarse_capture=3, coarse_capture_gate=-0.1, **RUN)


def test_capture_is_refused_with_the_first_level_blur(pair, monkeypatch):
    """The opt-in first-level blur acts on level 0, which would be the capture level: refused, not moved."""
    from napari_nephi.engines.nephi import coarse

    monkeypatch.setattr(coarse, "FIRST_LEVEL_BLUR", 1.0)
    with pytest.raises(InputError, match="FIRST_LEVEL_BLUR"):
        nn.register(*pair, coarse_capture=3, **RUN)
