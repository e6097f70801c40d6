"""``benchmarks/paired_test_time.py`` (session 42): the scratch tree holds the old and new copies in the
order old, new, new, old, and the summary adds every phase of a copy."""

from ._bench import import_benchmark

TP = import_benchmark("paired_test_time")


def test_the_copies_alternate_old_and_new(tmp_path):
    source = TP.ROOT / "tests" / "test_code_state.py"  # any committed test file
    copies = TP.build(tmp_path, source, "HEAD")
    assert [c.stem.rsplit("_", 1)[1] for c in copies] == ["1old", "2new", "3new", "4old"]
    old = TP.old_source(source, "HEAD")
    assert copies[0].read_text() == copies[3].read_text() == old
    assert copies[1].read_text() == copies[2].read_text() == source.read_text()
    assert (tmp_path / "tests" / "conftest.py").exists() and (tmp_path / "timing_plugin.py").exists()


def test_the_summary_adds_the_phases_of_each_copy():
    rows = [
        {"id": "tests/x/test_a_1old.py::t", "phase": "setup", "cpu": 1.0, "wall": 2.0},
        {"id": "tests/x/test_a_1old.py::t", "phase": "call", "cpu": 0.5, "wall": 1.0},
        {"id": "tests/x/test_a_2new.py::t[p]", "phase": "call", "cpu": 0.25, "wall": 0.5},
    ]
    assert TP.summarise(rows) == {"1old": (1.5, 3.0), "2new": (0.25, 0.5)}


def test_gc_freeze_arms_run_the_working_trees_file_in_every_copy(tmp_path):
    """``--gc-freeze``: the arms differ by the collector's state, so all four copies are the same file."""
    source = TP.ROOT / "tests" / "test_code_state.py"
    copies = TP.build(tmp_path, source, None)
    assert {c.read_text() for c in copies} == {source.read_text()}
    plugin = (tmp_path / "timing_plugin.py").read_text()
    assert 'os.environ.get("TEST_TIME_GC_FREEZE")' in plugin and "gc.unfreeze()" in plugin
