"""``benchmarks/mito_local_truth.py`` (session 46): the local reading on the truth placement, per
mitochondrion."""

import json

import numpy as np

from napari_nephi.engines.mito.organelles import relative_motion
from napari_nephi.synthetic import em_stack

from .._bench import import_benchmark

T = import_benchmark("mito_local_truth")


def test_it_reads_what_the_engine_reads_and_names_each_mitochondrion():
    """Tile by tile, the script's readings are the engine's (``relative_motion`` on the same placement, border
    4 and 12: the same count and mean to 1e-12); each reading carries the generator's id, and on a stage-drift
    stack (nothing moves in the truth frame) the mitochondria's own steps follow their centroids within 0.5 px
    per section on average. The harness's blocks' se is the engine's. Review 1 of session 46, A3: the reading
    of before (border None, no tracks) pinned where it measures, to the values frozen 849993e printed
    (``PYTHONPATH=/tmp/f46/src``, /tmp/s46/A/pinlocal.py), to 1e-6 relative: OpenCV's and numpy's
    sums may differ in the last bits on other CPUs (review 2 of session 46)."""
    d = em_stack(5, (768, 1024), seed=98, pad=250, placement_trend=0.5)
    n, h, w = d["stack"].shape
    for border in (4, 12):
        got = T.read_stack(d, border)
        r = relative_motion(lambda k: d["stack"][k], lambda k: d["masks"][k], d["matrices"], (h, w),
                            np.ones(n, bool), border=None if border == 4 else border)  # fmt: skip
        assert len(got["reads"]) == r["readings"] > 0
        np.testing.assert_allclose(got["reads"][:, 2:4].mean(0), r["slope"], atol=1e-12)
        assert set(got["reads"][:, 1].astype(int)) <= set(np.unique(d["masks"])) - {0}
        if border == 4:
            np.testing.assert_allclose(r["slope"], [-0.14306237907730973, -0.06194396920036525], rtol=1e-6)
            np.testing.assert_allclose(r["se"], [0.13091243843063924, 0.129078369836101], rtol=1e-6)
            assert (r["readings"], r["pairs"]) == (40, 4)
            np.testing.assert_allclose(
                r["placement_error"], [0.048673943482572216, -0.003249351680278778], rtol=1e-6
            )
            np.testing.assert_allclose(
                T.summary(got, (h, w), 250, (768, 1024))["se_blocks"], r["se"], rtol=1e-9
            )
    s = T.summary(got, (h, w), 250, (768, 1024))
    assert np.all(np.abs(np.asarray(s["own"]) - np.asarray(s["centroid"])) < 0.5)
    assert all(0.0 <= m["near_border"] <= 1.0 for m in s["mitochondria"])
    assert len(s["mitochondria"]) == len(set(got["reads"][:, 1].astype(int))) >= 5


def test_the_command_writes_every_row(tmp_path, capsys):
    out = tmp_path / "lt.json"
    assert (
        T.main(["98:stage-drift", "--sections", "3", "--border", "12", "--engine", "--json", str(out)]) == 0
    )
    got = json.loads(out.read_text())["98:stage-drift"]
    assert got["border"] == 12 and got["readings"] == sum(m["readings"] for m in got["mitochondria"]) > 0
    assert got["engine"]["readings"] == got["readings"]  # the engine reads the same (pair, mitochondrion)s
    np.testing.assert_allclose(got["engine"]["slope"], got["reading"], atol=1e-12)
    assert "border 12" in capsys.readouterr().out
