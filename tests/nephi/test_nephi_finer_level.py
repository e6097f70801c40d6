"""The coarse stage's finer-knot level as an option: recorded in the settings, switchable, skipped
without a bending penalty."""

import numpy as np
import pytest
from scipy import ndimage as ndi

import napari_nephi as nn
from napari_nephi.core.errors import InputError
from napari_nephi.engines.nephi.coarse import knot_spacings, level_iterations, level_spacings

RUN = dict(method="nephi", device="cpu", initial="none", levels=3, coarse_iterations=4, iterations=0)


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(1)
    img = ndi.gaussian_filter(rng.random((48, 48)), 2.0).astype(np.float32)
    return img, np.roll(img, 1, axis=1)


def _run(pair, **options):
    events = []
    reg = nn.register(*pair, progress=events.append, **RUN, **options)
    return reg, [e.stage for e in events if e.stage.startswith("coarse")]


def test_finer_level_is_on_by_default_and_recorded(pair):
    reg, stages = _run(pair)
    s = reg.settings
    grids = [tuple(g) for g in s["coarse_shapes"]]
    assert s["coarse_finer_level"] is True and len(grids) == 2
    assert s["coarse_spacings"] == pytest.approx(
        [*knot_spacings((48, 48), grids), s["coarse_spacings"][1] / 2]
    )
    assert reg.metrics["coarse_levels"] == 3 and reg.metrics["levels"] == 3
    assert reg.metrics["coarse_iterations"] == len(stages) == sum(level_iterations(4, 2)) == 2 + 4 + 4
    assert set(stages) == {"coarse (3 level(s))"}  # the label counts the finer-knot level


@pytest.mark.parametrize("options", [dict(coarse_finer_level=False), dict(coarse_reg_weight=0.0)])
def test_finer_level_off_or_unregularised_runs_the_grids_only(pair, options):
    reg, stages = _run(pair, **options)
    s = reg.settings
    assert s["coarse_finer_level"] is options.get("coarse_finer_level", True)
    assert len(s["coarse_spacings"]) == len(s["coarse_shapes"]) == 2
    assert reg.metrics["coarse_iterations"] == len(stages) == sum(level_iterations(4, 2, False)) == 2 + 4
    assert set(stages) == {"coarse (2 level(s))"} and reg.metrics["coarse_levels"] == 2


def test_level_spacings_halve_the_last_down_to_one_grid_voxel():
    assert level_spacings((512, 512), [(128, 128), (256, 256)]) == [32, 16, 8]
    assert level_spacings((512, 512), [(128, 128), (256, 256)], finer=False) == [32, 16]
    assert level_spacings((64, 64), [(32, 32)], spacings=[3.0]) == [3.0, 2.0]  # one voxel of the grid
    assert level_spacings((64, 64), []) == []


def test_finer_level_option_must_be_a_bool(pair):
    with pytest.raises(InputError, match="coarse_finer_level must be true or false"):
        nn.register(*pair, coarse_finer_level="yes", **RUN)


@pytest.mark.parametrize("finer", [True, False])
def test_chunked_global_pass_follows_the_option(pair, finer):
    events = []
    tiny = dict(sample_points=64, reg_points=4, hidden=8, layers=1, n_frequencies=4, local_dim=0)
    options = dict(RUN, levels=2, iterations=1, chunk_iterations=1, chunk_size=32, chunk_overlap=8)
    reg = nn.register(
        *pair,
        chunked=True,
        global_factor=2,
        coarse_finer_level=finer,
        progress=events.append,
        **options,
        **tiny,
    )
    coarse = [e for e in events if e.stage == "global: coarse"]
    assert len(coarse) == reg.metrics["coarse_iterations"] == sum(level_iterations(4, 1, finer))
    assert [e.step for e in events] == list(range(1, events[-1].total + 1))
    assert len(reg.settings["coarse_spacings"]) == 1 + finer
    # the global pass's flat fill is reported as in unchunked runs (it was dropped before)
    assert 0.0 <= reg.metrics["coarse_flat_share"] <= 1.0
    assert "coarse_flat_fill_info" not in reg.metrics


def test_finer_level_none_means_the_default(pair):
    """None (automatic) is the default True, and the settings say so (it once read as False)."""
    reg, stages = _run(pair, coarse_finer_level=None)
    assert reg.settings["coarse_finer_level"] is True and reg.metrics["coarse_levels"] == 3
    assert len(stages) == sum(level_iterations(4, 2))
