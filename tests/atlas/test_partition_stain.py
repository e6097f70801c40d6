"""The synthesiser's partition stain (session 37, opt-in ``partition``): training views whose stain partly
follows compartments of their own, not the atlas's regions; the training option that turns it on."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_nephi.core.errors import InputError
from napari_nephi.engines.atlas.plates import Plates
from napari_nephi.engines.atlas.synthesis import PARTITION_SHARE, SectionSynthesizer, SynthesisConfig
from napari_nephi.engines.atlas.train import check_train_options, synthesis_config
from napari_nephi.synthetic.atlas import toy_atlas

WORK = 96


@pytest.fixture(scope="module")
def plates():
    return Plates.from_reference(*toy_atlas((32, 56, 56), seed=3))


def _cfg(**changes) -> SynthesisConfig:
    return dataclasses.replace(SynthesisConfig.none(), **changes)


def _explained(image: np.ndarray, labels: np.ndarray, inner: np.ndarray) -> float:
    """Share of the tissue's intensity variance that the labels explain (correlation ratio)."""
    v, g = image[inner].astype(np.float64), labels[inner]
    means = {k: v[g == k].mean() for k in np.unique(g)}
    within = sum(((v[g == k] - m) ** 2).sum() for k, m in means.items())
    return 1.0 - within / max(((v - v.mean()) ** 2).sum(), 1e-12)


def test_partition_stain_keeps_the_cut_and_unbinds_the_stain_from_the_labels(plates):
    """Same geometry, labels and background; a share in PARTITION_SHARE of the signal drawn from the
    partition's levels, so the labels explain much less of the view than of the plain one."""
    plain = SectionSynthesizer(plates, _cfg(), work_size=WORK)
    stained = SectionSynthesizer(plates, _cfg(partition=1.0), work_size=WORK)
    drops = []
    for seed in range(5):
        a, b = plain.sample_with_truth(16, seed=seed), stained.sample_with_truth(16, seed=seed)
        assert PARTITION_SHARE[0] <= b.params["partition"] <= PARTITION_SHARE[1]
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.coords, b.coords)
        inner = ndi.binary_erosion(a.labels > 0, iterations=2)
        drops.append(_explained(a.image, a.labels, inner) - _explained(b.image, b.labels, inner))
        far = ~ndi.binary_dilation(a.image > 0.05, iterations=6)
        assert np.abs(b.image[far] - a.image[far]).max() < 0.02  # the background stays background
    assert np.median(drops) > 0.1, drops


def test_partition_is_a_checked_training_option_and_off_by_default():
    assert SynthesisConfig().partition == 0.0
    assert synthesis_config(check_train_options({})).partition == 0.0
    assert synthesis_config(check_train_options({"partition": 0.3})).partition == 0.3
    with pytest.raises(InputError, match="partition"):
        check_train_options({"partition": 1.5})
    with pytest.raises(InputError, match="partition"):
        SynthesisConfig(partition=-0.1).checked()
