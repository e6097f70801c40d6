"""``kept_reading`` (session 45, opt-in): where the background's reading keeps the positions' trend as the
sections' ("sections") on undistorted sections, the mitochondria read against the tissue right around them
(the elastic step's local reading) may still find them drifting; only that reading's "both" changes the
decision."""

import numpy as np
import pytest

from napari_nephi import InputError
from napari_nephi.engines.mito import align
from napari_nephi.engines.mito.align import _auto_decision, align_stack
from napari_nephi.synthetic import em_stack

from .._bench import import_benchmark

P = import_benchmark("mito_paired")

#: A positions' trend of 0.5 px per section along y: a stage drift (0.2) and an organelle drift (0.3).
TREND = [0.5, 0.0]
#: The background read still (0 within its se): "sections", the trend kept (no runs: no second look).
STILL = {"slope": [0.05, 0.0], "se": [0.1, 0.1], "pairs": 64}


def _test():
    return {"p": 1e-9, "slope": list(TREND)}


class Reader:
    """A local reading returning ``slope`` (the mitochondria's drift through the tissue); counts its calls."""

    def __init__(self, slope, se=(0.03, 0.03), readings=500):
        self.slope, self.se, self.readings, self.calls = list(slope), list(se), readings, 0

    def __call__(self, matrices, use):
        self.calls += 1
        return {
            "slope": list(self.slope), "se": list(self.se), "readings": self.readings,
            "placement_error": [0.0, 0.0],
        }  # fmt: skip


def _decide(background, reader, kept_reading="local"):
    test = _test()
    out = _auto_decision(
        test,
        None,
        np.ones(160, bool),
        lambda m, u, **_: dict(background),
        kept=reader,
        kept_reading=kept_reading,
    )
    return out, test


def test_a_kept_stack_whose_mitochondria_drift_through_the_tissue_removes_their_slope():
    """The background reads "sections"; the mitochondria drift 0.3 px per section through the tissue (the
    local reading's ``v`` = -0.3: the alignment followed them). That fits neither 0 nor the trend: "both",
    and ``-v`` is removed (not the whole trend)."""
    reader = Reader([-0.3, 0.0])
    (apply, slope), test = _decide(STILL, reader)
    assert apply and np.allclose(slope, [0.3, 0.0])
    assert test["decided_by"] == "kept-local" and test["background"]["decision"] == "sections"
    assert test["kept_reading"]["decision"] == "both" and reader.calls == 1


def test_a_kept_stack_whose_mitochondria_stay_in_the_tissue_stays_kept():
    """A stage drift alone: the mitochondria do not move through the tissue (0 within the se): kept, and the
    reading recorded."""
    reader = Reader([0.01, -0.02])
    (apply, slope), test = _decide(STILL, reader)
    assert (apply, slope) == (False, None)
    assert test["decided_by"] == "background" and test["kept_reading"]["decision"] == "sections"


def test_only_the_local_both_changes_the_decision():
    """A local reading equal to the trend ("organelles") contradicts the background's "sections": kept. Too
    few readings: "unmeasured", kept."""
    (apply, _), test = _decide(STILL, Reader([-0.5, 0.0]))
    assert not apply and test["kept_reading"]["decision"] == "organelles"
    (apply, _), test = _decide(STILL, Reader([-0.3, 0.0], readings=5))
    assert not apply and test["kept_reading"]["decision"] == "unmeasured"


def test_off_or_another_decision_never_reads_locally():
    """None (off): the reader is never called and nothing is recorded, the decision as before. A background
    that reads "both" or "organelles" decides as before, without the local reading."""
    reader = Reader([-0.3, 0.0])
    (apply, slope), test = _decide(STILL, reader, kept_reading=None)
    assert (apply, slope) == (False, None) and "kept_reading" not in test
    both = {"slope": [0.3, 0.0], "se": [0.03, 0.03], "pairs": 64}
    (apply, slope), test = _decide(both, reader)
    assert apply and np.allclose(slope, [0.3, 0.0]) and test["decided_by"] == "background"
    organelles = {"slope": [0.49, 0.0], "se": [0.03, 0.03], "pairs": 64}
    (apply, slope), test = _decide(organelles, reader)
    assert (apply, slope) == (True, None)
    assert reader.calls == 0


def test_off_is_bit_for_bit_the_code_before_the_option():
    """None (the default) runs the code of fb0cc16 (before the option) bit for bit: these values were printed
    there (the frozen tree, ``PYTHONPATH=/tmp/f45/src``) on this stage-drift stack with the defaults
    ("sections", kept). ``"local"`` keeps it too (at 256 x 256 no mitochondrion is large enough to read:
    "unmeasured"), with the same matrices; the settings record the choice."""
    d = em_stack(48, (256, 256), seed=3, placement_trend=0.5)
    for kw in ({}, {"kept_reading": None}, {"kept_reading": "LOCAL"}):
        reg = align_stack(d["stack"], masks=d["masks"], warp=False, workers=1, **kw)
        m = reg.transform.matrices
        assert m[-1].tolist() == [
            [-0.9345957465454098, -0.3557309973390598, 449.960202267619],
            [0.3557293764560764, -0.9345989355946033, 282.38822042086633],
            [0.0, 0.0, 1.0],
        ]
        assert m[20].tolist() == [
            [0.44157059437843926, -0.8972362457983166, 268.1082834894485],
            [0.8972359247466244, 0.441568568981471, -70.04679544342811],
            [0.0, 0.0, 1.0],
        ]
        auto = reg.metrics["drift_correction"]["auto"]
        assert auto["background"]["slope"] == [-0.02414407434664835, -0.006977228135467226]
        assert auto["background"]["decision"] == "sections"
        assert reg.settings["kept_reading"] == ("local" if kw.get("kept_reading") else None)
        assert ("kept_reading" in auto) == bool(kw.get("kept_reading"))
        if kw.get("kept_reading"):
            assert auto["kept_reading"]["decision"] == "unmeasured"


@pytest.mark.parametrize("value", ["global", 1, "both"])
def test_bad_values_raise(value):
    d = em_stack(20, (64, 64), seed=1)
    with pytest.raises(InputError, match="kept_reading must be None"):
        align_stack(d["stack"], masks=d["masks"], warp=False, workers=1, kept_reading=value)


def test_without_masks_it_is_refused():
    d = em_stack(20, (64, 64), seed=1)
    with pytest.raises(InputError, match="needs masks"):
        align_stack(d["stack"], detector="orb", descriptor="orb", warp=False, workers=1, kept_reading="local")


def test_the_command_line_and_the_paired_twin_reach_it():
    """``align-em --option kept_reading=local`` gives the engine the option; ``mito_paired``'s twin passes it
    to the candidate's decision only (the base's call is as it came)."""
    import argparse

    from napari_nephi.cli.em import _align_options, add_parser

    p = argparse.ArgumentParser(prog="napari-nephi")
    add_parser(p.add_subparsers(dest="command", required=True))
    kw = _align_options(p.parse_args(["align-em", "s.tif", "-o", "out", "--option", "kept_reading=local"]))
    assert kw["kept_reading"] == "local" and "kept_reading" in align.STACK_OPTIONS
    seen = []

    def decide(test, matrices, use, background, relative=None, **kw):
        seen.append(kw)
        return kw.get("kept_reading") is not None, None

    twin = P.Twin(decide, {}, {"kept_reading": "local"})
    assert twin({}, None, None, None, None, kept="reader", kept_reading=None) == (False, None)
    assert seen == [{"kept": "reader", "kept_reading": None}, {"kept": "reader", "kept_reading": "local"}]
    assert twin.calls[0]["other"] == (True, None)
