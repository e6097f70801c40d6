"""atlas_queries(compartments="foreign"): a stain whose compartments are not the annotation's labels."""

import numpy as np
import pytest

from napari_nephi.core.errors import InputError
from napari_nephi.engines.atlas.region_fit import correlation_ratio
from napari_nephi.synthetic.atlas import atlas_queries, brain_phantom


@pytest.fixture(scope="module")
def small_phantom():
    return brain_phantom((66, 48, 56), seed=0)


def _ratio(image, regions):
    """How much of the tissue's variance ``regions`` explain (adjusted correlation ratio)."""
    tissue = regions > 0
    _, groups = np.unique(regions[tissue], return_inverse=True)
    return float(correlation_ratio(image[tissue], groups[None] + 1, int(groups.max()) + 2)[0])


def test_foreign_stain_same_sections_other_compartments(small_phantom):
    ref, labels = small_phantom
    opts = dict(max_tilt=8, partial=0.5, contrast="fluorescence", tears=0.3, noise=0.03)
    own = atlas_queries(ref, labels, 8, seed=11, **opts)
    same = atlas_queries(ref, labels, 8, seed=11, compartments="labels", **opts)
    foreign = atlas_queries(ref, labels, 8, seed=11, compartments="foreign", **opts)
    gaps, merged, split = [], 0, 0
    for a, b, f in zip(own, same, foreign, strict=True):
        # "labels" is the default bit for bit; "foreign" cuts the same sections with the same truth
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["labels"], f["labels"])
        assert (a["plate"], a["tilt"], a["crop"]) == (f["plate"], f["tilt"], f["crop"])
        assert a["compartments"] == "labels" and "stain_regions" not in a
        lab, reg = f["labels"], f["stain_regions"]
        assert f["compartments"] == "foreign" and ((reg > 0) == (lab > 0)).all()
        assert np.abs(a["image"] - f["image"])[lab > 0].mean() > 0.02  # another stain on them
        pairs = np.unique(np.stack([lab[lab > 0], reg[lab > 0]]), axis=1)
        merged += len(np.unique(pairs[0])) > len(np.unique((pairs[1] - 1) // 2))  # two labels, one group
        split += len(np.unique(pairs[0])) < pairs.shape[1]  # a label on both sides of the surface
        # the stain follows its own compartments better than the annotation's labels
        gaps.append(_ratio(f["image"], reg) - _ratio(f["image"], lab))
    assert merged >= 4 and split == 8, (merged, split)
    assert np.mean(gaps) > 0.04 and sum(g > 0 for g in gaps) >= 7, gaps
    with pytest.raises(InputError, match="Option compartments"):
        atlas_queries(ref, labels, 1, seed=0, compartments="regions")
