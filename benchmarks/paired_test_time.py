"""CPU time of tests before and after a change to their file, paired in one pytest process (session 42).

Rule 5 of the sessions: timings are compared paired, both arms in one process and alternating. This script
copies the tests' file as it was at ``--rev`` (default HEAD) and as it is in the working tree into a scratch
folder, four times, in the order old, new, new, old (with the folder's other modules and every
``conftest.py``, so relative imports and fixtures resolve). Then it runs the named tests of all four copies
in one pytest process, with a small plugin that records each test phase's process CPU seconds (every
thread) and wall seconds. Each copy is its own module, so module-scoped fixtures run once per copy and are
counted. The first copy also carries the process's warm-up (session fixtures, first imports), so read the
second old copy against the two new ones.

    OMP_NUM_THREADS=1 nice -n 5 xvfb-run -a .venv/bin/python benchmarks/paired_test_time.py \\
        tests/nephi/test_nephi_noise.py test_noise_adapt_off_and_clean_images_run_as_before --rev HEAD~1

It prints one line per copy (``1old: cpu 14.91 s, wall 63.54 s``) and the load average, and writes every
phase to ``<scratch>/cpu.jsonl``. The scratch folder is ``--scratch`` (default: a temporary folder, removed
afterwards unless ``--keep``). Not a benchmark of the package; session 42's test cuts were timed with it
(benchmarks/README.md, "Test time, paired").

``--gc-freeze`` (session 43) compares the collector's state instead of two versions of the file: all four
copies are the working tree's file; the new copies run with the objects of the collected session frozen
(``gc.freeze`` once the tests are collected, as ``tests/conftest.py`` does since session 43), the old copies
with them unfrozen (the plugin unfreezes before each of their tests and collects and freezes again after
it, outside the timed phases). What an old copy's test leaves alive is frozen with the rest, so the new
copies' frozen set is a little larger than a real session's: read the saving as an upper bound.

    OMP_NUM_THREADS=1 nice -n 5 xvfb-run -a .venv/bin/python benchmarks/paired_test_time.py \\
        tests/widgets/test_register_widget.py test_end_to_end_affine_run --gc-freeze
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = ("1old", "2new", "3new", "4old")

PLUGIN = '''"""Per test phase: process CPU seconds and wall seconds, as JSON lines to $TEST_TIME_OUT."""
import json
import os
import time

import pytest


def _timed(phase):
    @pytest.hookimpl(hookwrapper=True)
    def hook(item):
        cpu, wall = time.process_time(), time.perf_counter()
        yield
        row = {"id": item.nodeid, "phase": phase, "cpu": time.process_time() - cpu,
               "wall": time.perf_counter() - wall}
        with open(os.environ["TEST_TIME_OUT"], "a") as fh:
            fh.write(json.dumps(row) + "\\n")

    return hook


pytest_runtest_setup = _timed("setup")
pytest_runtest_call = _timed("call")
pytest_runtest_teardown = _timed("teardown")

if os.environ.get("TEST_TIME_GC_FREEZE"):
    import gc

    def pytest_collection_finish(session):
        gc.collect()
        gc.freeze()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        old = item.nodeid.split("::")[0].endswith("old.py")
        if old:
            gc.unfreeze()
        yield
        if old:
            gc.collect()
            gc.freeze()
'''


def old_source(path: Path, rev: str) -> str:
    rel = path.resolve().relative_to(ROOT).as_posix()
    done = subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"git show {rev}:{rel} failed: {done.stderr.strip()}")
    return done.stdout


def build(scratch: Path, test_file: Path, rev: str | None) -> list[Path]:
    """The scratch tree: every conftest.py under tests/, the file's folder, and the four copies.

    ``rev`` None: every copy is the working tree's file (``--gc-freeze``)."""
    tests = ROOT / "tests"
    for conf in tests.rglob("conftest.py"):
        target = scratch / conf.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(conf, target)
    for extra in tests.glob("*.py"):  # helpers beside the top conftest (e.g. _bench.py)
        shutil.copy(extra, scratch / "tests" / extra.name)
    folder = scratch / test_file.parent.resolve().relative_to(ROOT)
    folder.mkdir(parents=True, exist_ok=True)
    for sibling in test_file.parent.glob("*.py"):  # modules the file imports from its folder
        shutil.copy(sibling, folder / sibling.name)
    new = test_file.read_text()
    old = new if rev is None else old_source(test_file, rev)
    copies = []
    for tag in ORDER:
        copy = folder / f"{test_file.stem}_{tag}.py"
        copy.write_text(old if tag.endswith("old") else new)
        copies.append(copy)
    (scratch / "pyproject.toml").write_text(
        '[tool.pytest.ini_options]\naddopts = "-ra --import-mode=importlib"\n'
    )
    (scratch / "timing_plugin.py").write_text(PLUGIN)
    return copies


def summarise(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """CPU and wall seconds per copy tag, all phases summed."""
    total: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for row in rows:
        tag = row["id"].split("::")[0].rsplit("_", 1)[1].removesuffix(".py")
        total[tag][0] += row["cpu"]
        total[tag][1] += row["wall"]
    return {tag: (cpu, wall) for tag, (cpu, wall) in sorted(total.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("test_file", type=Path, help="the tests' file, e.g. tests/nephi/test_nephi_noise.py")
    parser.add_argument("tests", nargs="+", help="test names in that file (parametrised ids allowed)")
    parser.add_argument("--rev", default="HEAD", help="the revision of the old copies (default HEAD)")
    parser.add_argument("--scratch", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument(
        "--gc-freeze", action="store_true", help="arms: the session's objects unfrozen (old) or frozen (new)"
    )
    args = parser.parse_args(argv)
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="paired_test_time_"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        copies = build(scratch, args.test_file, None if args.gc_freeze else args.rev)
        out = scratch / "cpu.jsonl"
        out.unlink(missing_ok=True)
        ids = [f"{copy.relative_to(scratch).as_posix()}::{name}" for copy in copies for name in args.tests]
        env = {**os.environ, "TEST_TIME_OUT": str(out), "PYTHONPATH": str(scratch)}
        if args.gc_freeze:
            env["TEST_TIME_GC_FREEZE"] = "1"
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "timing_plugin", "-q"]
        cmd += ["-c", str(scratch / "pyproject.toml"), "--rootdir", str(scratch), *ids]
        done = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True)
        print(done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:])
        rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
        for tag, (cpu, wall) in summarise(rows).items():
            print(f"{tag}: cpu {cpu:.2f} s, wall {wall:.2f} s")
        print("load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
        return done.returncode
    finally:
        if args.scratch is None and not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
