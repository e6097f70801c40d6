"""The synthetic EM generator: organelles move on their own, the population has no net motion."""

import math

import numpy as np
import pytest
from scipy import ndimage

from napari_nephi.core.errors import InputError, OutOfMemoryError
from napari_nephi.synthetic import em_stack
from napari_nephi.synthetic.em import _make_vesicles, _vesicles_at


def _rigid(src, dst, weights):
    """Weighted least-squares rotation (degrees) of ``src`` onto ``dst`` and shift of their centroid."""
    w = weights[:, None] / weights.sum()
    cs, cd = (src * w).sum(0), (dst * w).sum(0)
    u, _, vt = np.linalg.svd(((src - cs) * w).T @ (dst - cd))
    r = vt.T @ u.T
    return math.degrees(math.atan2(r[1, 0], r[0, 0])), cd - cs


def test_mitochondria_move_but_the_population_has_no_net_motion():
    """A net motion of all organelles would be indistinguishable from misalignment and would
    be followed, and accumulated, by any neighbour-to-neighbour aligner."""
    d = em_stack(40, (256, 256), seed=0, rotate=False)
    masks = d["unrotated_masks"]
    ids = sorted(set(np.unique(masks[0])) - {0})
    assert len(ids) >= 6
    c0 = np.array(ndimage.center_of_mass(masks[0] > 0, masks[0], ids))
    area = np.array(ndimage.sum(masks[0] > 0, masks[0], ids), dtype=float)
    own, rotations, shifts = [], [], []
    for k in range(1, 40):
        present = [i for i in ids if (masks[k] == i).any()]
        sel = [ids.index(i) for i in present]
        ck = np.array(ndimage.center_of_mass(masks[k] > 0, masks[k], present))
        own.append(np.abs(ck - c0[sel]).max())
        theta, t = _rigid(c0[sel], ck, area[sel])
        rotations.append(abs(theta))
        shifts.append(np.abs(t).max())
    # each mitochondrion moves by pixels through the stack ...
    assert max(own) > 2.0, own
    # ... but the population as a whole neither drifts nor turns (the former linear drifts of
    # ten mitochondria moved their mean by ~2 px and turned it by ~1.2 degrees over 40 sections)
    assert max(shifts) < 0.75, shifts
    assert max(rotations) < 0.6, rotations
    # consecutive sections are alike but not identical
    a, b = d["unrotated_stack"][10].astype(float), d["unrotated_stack"][11].astype(float)
    assert 0.5 < np.corrcoef(a.ravel(), b.ravel())[0, 1] < 0.99


def test_vesicles_per_section_do_not_depend_on_stack_length():
    """About 70 vesicles in every section of a short or a long stack, with no net drift."""
    rng = np.random.default_rng(0)
    for n in (6, 160):
        v = _make_vesicles(n, (256, 256), 1.0, rng)
        counts = [len(_vesicles_at(v, k)) for k in range(n)]
        assert 45 < np.mean(counts) < 100, (n, np.mean(counts))
        assert min(counts) > 20
        np.testing.assert_allclose(v["drift"].mean(0), 0.0, atol=1e-9)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"n_sections": 0}, "n_sections must be at least 1"),
        ({"n_sections": 2.5}, "n_sections must be a whole number"),
        ({"shape": (16, 64)}, r"shape\[0\] must be at least 32"),
        ({"shape": "abc"}, "shape must be a list of whole numbers"),
        ({"noise": float("nan")}, "noise must be a finite number"),
        ({"pad": -1}, "pad must be at least 0"),
        ({"rotate": "yes"}, "rotate must be true or false"),
    ],
)
def test_generator_options_are_checked(options, message):
    with pytest.raises(InputError, match=message):
        em_stack(**{"n_sections": 2, "shape": (64, 64), **options})


def test_generator_refuses_a_stack_larger_than_memory(monkeypatch):
    from napari_nephi.core import device as core_device

    monkeypatch.setattr(core_device, "available_memory_bytes", lambda device: 2**30)
    with pytest.raises(
        OutOfMemoryError, match="synthetic EM stack of 1000 x 4096 x 4096 needs about 94.0 GiB"
    ):
        em_stack(1000, (4096, 4096), rotate=False)
