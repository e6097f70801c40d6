"""Atlas lookup, two arms of the pose search paired per section, and a judge with written marks.

Session 39 (issue 12). A candidate option of the re-ranking (``rerank_options``) is judged
against another arm (usually the defaults) on the benchmark's sections (``atlas_lookup.py``'s
queries: query seed ``S`` gives 60 sections, 12 per case, built by ``atlas_lookup.make_queries``).
Both arms run on every section in one process, their order alternating section by section (arm a
first on the run's 1st, 3rd, ... section, arm b first on its 2nd, 4th, ...; each row's ``first_arm``
says which), so their CPU times are paired under the same load. The order alternates on the
section's place in the run (C2, session 39), not on its flat index: with ``--sections`` a subset of
even indexes is balanced too; a full run's order is unchanged (60 sections per seed, so the place
and the flat index have the same parity). Each arm may name its own index (a retrained network
against the default one, or the same candidate on two indexes).

Commands::

    # an index of the benchmark's phantom with another training seed (saved as DIR/ours, the
    # layout atlas_lookup.py --index-dir writes; the atlas is atlas_lookup.parse([])'s phantom)
    python atlas_paired.py train DIR --train-seed 1 --train-options '{"max_minutes": 90, "prefetch": true}'

    # both arms per section, saved to OUT.json after every section
    python atlas_paired.py run OUT.json --index /tmp/c13/idx --seeds 155,156 --compartments labels \\
        --arm-a '{}' --arm-b '{"prior_margin": 0.458}' [--index-b DIR] [--sections 0,12,13]

    # the judge: pooled and per case / seed, paired differences (b - a), the marks
    python atlas_paired.py judge OUT.json [MORE.json ...] --marks today|offlabel|JSON \\
        [--fluorescence] [--cap 10] [--list] [--mix]

``--ensemble-b DIR,DIR`` gives arm b a first stage averaged over several indexes (:class:`Ensemble`,
session 39's screen; measured only, nothing in the engine).

Each row of OUT.json: query seed, case, the query's place in its case, its flat index (0-59),
contrast (``nissl`` / ``fluorescence``), true plate, the plates the section's tissue spans (the
generator's ``plate_range``, 5th-95th percentile; session 40, where the query has it), and per arm
the true plate's rank (0-based, the paper's MAE as ``atlas_lookup.py``), the top-10 plates, the
lookup's CPU / wall ms, its pairs scored, all and stage 1's (``pairs_a`` / ``stage1_pairs_a``, session 43;
``RerankResult.pairs`` / ``stage1_pairs``; the judge prints their medians) and the prior's weight the ranking
used (``RerankResult.prior_weight``); where an
arm runs ``quarter_gate`` (session 41) also its stain reading and whether the gate opened
(``quarter_reading_a`` / ``quarter_open_a``, ``RerankResult.quarter_reading`` / ``quarter_open``). With
``--stages`` (C2, session 39; computed after the timed lookup) also, per arm, where the truth was
lost (:func:`stages`): its rank in the first stage's order, the plates from it to the nearest
stage-2 pose (0: the search reached its plate) and its best pose score against the winner's;
``judge --list`` lists them for the far misses.

The judge first prints each file's stain, indexes and arms (the options that differ from the
defaults). It refuses (exit status 2) to pool files that differ in any of these unless ``--mix`` is
given, and it drops (and lists) a row that an earlier file of the same setup already holds (same
query seed and section), so a re-run seed is not counted twice. Then it prints mean rank,
Top-1/3/5/10, better / worse counts (by the true plate's rank) and the paired mean difference with
its standard error (sd / sqrt(n)), pooled, per case and per query seed, and applies marks: ``today``
(session 38's paired mark for today's stain: pooled mean rank not higher, Top-5 not lower, the mean
difference not above zero by more than its SE, no case worse by more than 0.15) or ``offlabel`` (for
``foreign`` / ``marker``: pooled mean rank lower, more sections better than worse, the mean
difference below zero by more than its SE, no case worse by more than 0.3), or a JSON object with
the keys ``mean_rank`` (``"not_higher"`` / ``"lower"``), ``top5`` (``"not_lower"``),
``better_than_worse`` (true), ``diff_se`` (``"not_above"`` / ``"below"``) and ``case_bound`` (a
number); session 42 added ``identical`` (share of sections) and ``cpu_ratio`` (per-section b / a, median),
session 43 ``mean_rank_margin`` (b's pooled mean rank at most a's plus this) and ``top5_margin`` (b's
Top-5 at least a's less this many sections), for a cheaper search allowed a stated loss.
``--fluorescence`` judges the fluorescence-like sections alone (``marker`` stains only
those; its Nissl-like sections are today's bit for bit, so a ``marker`` run over every section is
the pooled reading). ``--cap N`` judges the ranks capped at ``N`` (a far miss counts as ``N``). The
judge exits with status 1 when a mark fails (2 on a bad ``--marks`` or on files that do not belong
together).

CPU: run with ``OMP_NUM_THREADS=1`` (the lookup uses 1 thread, ``--threads``). Not part of the test
run; the judge's arithmetic is tested in ``tests/atlas/test_paired_judge.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

TOPS = (1, 3, 5, 10)

#: Session 38's paired marks (docs/atlas.md, "Session 38 (C2)").
MARKS = {
    "today": {"mean_rank": "not_higher", "top5": "not_lower", "diff_se": "not_above", "case_bound": 0.15},
    "offlabel": {"mean_rank": "lower", "better_than_worse": True, "diff_se": "below", "case_bound": 0.3},
}
MARK_KEYS = {
    "mean_rank": ("not_higher", "lower"),
    "top5": ("not_lower",),
    "better_than_worse": (True,),
    "diff_se": ("not_above", "below"),
    "case_bound": None,
    "identical": None,
    "cpu_ratio": None,
    "mean_rank_margin": None,
    "top5_margin": None,
}


# --- the judge (pure arithmetic on rows) ---------------------------------------------------------


def _stats(ranks) -> dict:
    r = np.asarray(ranks, dtype=float)
    out = {"n": int(r.size), "mean_rank": float(r.mean()) if r.size else float("nan")}
    for k in TOPS:
        out[f"top{k}"] = int((r < k).sum())
    return out


def compare(rows: list[dict]) -> dict:
    """Arm a against arm b on ``rows`` (each with ``rank_a`` and ``rank_b``): both arms' stats,
    better / worse counts of b (a lower / higher rank of the truth), the paired mean difference
    b - a and its standard error."""
    a = np.array([r["rank_a"] for r in rows], dtype=float)
    b = np.array([r["rank_b"] for r in rows], dtype=float)
    d = b - a
    se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")
    return {
        "a": _stats(a),
        "b": _stats(b),
        "better": int((d < 0).sum()),
        "worse": int((d > 0).sum()),
        "diff": float(d.mean()) if d.size else float("nan"),
        "se": se,
    }


def capped(rows: list[dict], cap: int) -> list[dict]:
    """``rows`` with both arms' ranks capped at ``cap`` (``--cap``): a far miss counts as ``cap`` however far
    the first stage's order puts it (session 39: on today's stain a retrained index moves the pooled mean rank
    by +0.233 (se 0.280), capped at 10 by -0.092 (se 0.059))."""
    return [{**r, "rank_a": min(r["rank_a"], cap), "rank_b": min(r["rank_b"], cap)} for r in rows]


def groups(rows: list[dict], key: str) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(r[key], []).append(r)
    return out


def check_marks(marks) -> dict:
    """A preset name, a JSON string or a dict of marks, checked against :data:`MARK_KEYS`."""
    if isinstance(marks, str):
        marks = MARKS[marks] if marks in MARKS else json.loads(marks)
    for key, value in marks.items():
        if key not in MARK_KEYS:
            raise ValueError(f"unknown mark {key!r}; choose from {', '.join(MARK_KEYS)}")
        allowed = MARK_KEYS[key]
        if allowed is None:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"mark {key} must be a number >= 0, got {value!r}")
        elif value not in allowed:
            raise ValueError(f"mark {key} must be one of {allowed}, got {value!r}")
    return dict(marks)


def apply_marks(rows: list[dict], marks) -> list[tuple[str, bool, str]]:
    """Each mark as ``(name, passed, what was read)``; b is the candidate, a the reference."""
    marks = check_marks(marks)
    c = compare(rows)
    ma, mb = c["a"]["mean_rank"], c["b"]["mean_rank"]
    out = []
    if "mean_rank" in marks:
        ok = mb <= ma if marks["mean_rank"] == "not_higher" else mb < ma
        out.append((f"pooled mean rank {marks['mean_rank']}", ok, f"{ma:.3f} -> {mb:.3f}"))
    if "top5" in marks:
        ok = c["b"]["top5"] >= c["a"]["top5"]
        out.append(("Top-5 not lower", ok, f"{c['a']['top5']} -> {c['b']['top5']} of {c['a']['n']}"))
    if "mean_rank_margin" in marks:  # session 43: a cheaper search may cost at most this much rank
        bound = float(marks["mean_rank_margin"])
        ok = mb <= ma + bound + 1e-9
        out.append((f"pooled mean rank not higher by more than {bound}", ok, f"{ma:.3f} -> {mb:.3f}"))
    if "top5_margin" in marks:  # ... and at most this many sections out of the Top-5
        bound = float(marks["top5_margin"])
        ok = c["b"]["top5"] >= c["a"]["top5"] - bound
        what = f"{c['a']['top5']} -> {c['b']['top5']} of {c['a']['n']}"
        out.append((f"Top-5 not lower by more than {bound:g} sections", ok, what))
    if "better_than_worse" in marks:
        ok = c["better"] > c["worse"]
        out.append(("more better than worse", ok, f"{c['better']} better / {c['worse']} worse"))
    if "diff_se" in marks:
        if marks["diff_se"] == "not_above":
            ok = c["diff"] <= c["se"]
            what = "mean difference not above zero by more than its SE"
        else:
            ok = c["diff"] < -c["se"]
            what = "mean difference below zero by more than its SE"
        out.append((what, ok, f"{c['diff']:+.3f} (se {c['se']:.3f})"))
    if "case_bound" in marks:
        bound = float(marks["case_bound"])
        worst_case, worst = None, -np.inf
        for case, rs in groups(rows, "case").items():
            cc = compare(rs)
            if cc["diff"] > worst:
                worst_case, worst = case, cc["diff"]
        out.append(
            (f"no case worse by more than {bound}", worst <= bound, f"worst {worst_case} {worst:+.3f}")
        )
    if "identical" in marks:  # session 42: a speed-up judged by the rankings it keeps
        share = float(marks["identical"])
        known, same, _ = identical_counts(rows)
        ok = known > 0 and known == len(rows) and same >= share * len(rows)
        out.append((f"rankings identical on at least {share:.0%}", ok, f"{same} / {len(rows)}"))
    if "cpu_ratio" in marks:
        bound = float(marks["cpu_ratio"])
        ratio = cpu_ratio(rows)
        ok = ratio is not None and ratio <= bound
        what = "no CPU recorded" if ratio is None else f"{ratio:.3f}"
        out.append((f"CPU per lookup, per section b / a, median at most {bound}", ok, what))
    return out


def identical_counts(rows: list[dict]) -> tuple[int, int, int]:
    """``(known, same, poses)``: of the rows that record whether the arms' rankings are identical
    (``identical``, session 42), how many there are, how many are (every plate and distance) and how
    many also have the same poses and pair count (``same_poses``). One count for the marks and the table
    (session 43: they were counted twice, by two copies of the same lines)."""
    known = [r for r in rows if "identical" in r]
    same = sum(bool(r["identical"]) for r in known)
    poses = sum(bool(r.get("same_poses")) for r in known)
    return len(known), same, poses


def pair_medians(rows: list[dict]) -> dict | None:
    """The median pairs per lookup of each arm, all and stage 1's (``pairs_a`` / ``stage1_pairs_a`` ...,
    session 43; None where no row records them)."""
    keys = ("pairs_a", "pairs_b", "stage1_pairs_a", "stage1_pairs_b")
    known = [r for r in rows if all(r.get(k) is not None for k in keys)]
    if not known:
        return None
    return {k: float(np.median([r[k] for r in known])) for k in keys}


def cpu_ratio(rows: list[dict]) -> float | None:
    """The paired CPU ratio: the median over sections of arm b's CPU per lookup over arm a's on the
    same section (both arms run one after the other, under the same load; None where no row records
    both)."""
    ratios = [r["cpu_ms_b"] / r["cpu_ms_a"] for r in rows if r.get("cpu_ms_a") and "cpu_ms_b" in r]
    return float(np.median(ratios)) if ratios else None


def _line(name: str, c: dict) -> str:
    a, b = c["a"], c["b"]
    tops = " ".join(f"{a[f'top{k}']}->{b[f'top{k}']}" for k in TOPS)
    return (
        f"| {name} | {a['n']} | {a['mean_rank']:.3f} -> {b['mean_rank']:.3f} | {tops} | "
        f"{c['better']} / {c['worse']} | {c['diff']:+.3f} ({c['se']:.3f}) |"
    )


def in_span(rows: list[dict]) -> tuple[int, int, int] | None:
    """``(n, a, b)``: of the ``n`` rows that record the plates the section's tissue spans
    (``plate_range``, session 40), how many have arm a's and arm b's top plate within that span (a
    warped section is not flat in the atlas: a top plate a few plates from the tissue's mean plate may
    still be one its tissue lies on); None where no row records it."""
    spanned = [r for r in rows if r.get("plate_range") is not None]
    if not spanned:
        return None

    def inside(r, arm):  # atlas_lookup.in_span: one definition for both benchmarks (review 1 of session 41)
        return _atlas_lookup().in_span(r[f"top10_{arm}"][0], r["plate_range"])

    return len(spanned), sum(inside(r, "a") for r in spanned), sum(inside(r, "b") for r in spanned)


def report(rows: list[dict], marks=None) -> tuple[str, bool]:
    """The judge's table (pooled, per case, per query seed) and the marks; returns (text, passed)."""
    lines = [
        "| sections | n | mean rank a -> b | Top-1/3/5/10 a->b | better / worse | b - a (se) |",
        "|---|---|---|---|---|---|",
        _line("pooled", compare(rows)),
    ]
    for key in ("case", "seed"):
        for value, rs in groups(rows, key).items():
            lines.append(_line(f"{key} {value}", compare(rs)))
    cpu = [(r["cpu_ms_a"], r["cpu_ms_b"]) for r in rows if "cpu_ms_a" in r]
    if cpu:
        ca, cb = np.median(np.array(cpu), axis=0)
        lines.append(
            f"CPU per lookup, median: a {ca:.0f} ms, b {cb:.0f} ms (b / a {cb / ca:.3f}; "
            f"per section, median b / a {cpu_ratio(rows):.3f})"
        )
    span = in_span(rows)
    if span is not None:
        n, a, b = span
        lines.append(f"top plate within the section's own plate span (plate_range): a {a} / {n}, b {b} / {n}")
    known, same, poses = identical_counts(rows)
    if known:  # session 42
        lines.append(
            f"rankings identical (every plate and distance): {same} / {known}; "
            f"the same poses and pair count: {poses} / {known}"
        )
    pairs = pair_medians(rows)
    if pairs is not None:  # session 43
        lines.append(
            f"pairs per lookup, median: a {pairs['pairs_a']:.0f} (stage 1 {pairs['stage1_pairs_a']:.0f}), "
            f"b {pairs['pairs_b']:.0f} (stage 1 {pairs['stage1_pairs_b']:.0f})"
        )
    passed = True
    if marks is not None:
        for name, ok, what in apply_marks(rows, marks):
            passed &= ok
            lines.append(f"{'PASS' if ok else 'FAIL'}: {name}: {what}")
        lines.append("all marks pass" if passed else "a mark fails")
    return "\n".join(lines), passed


# --- running the arms -----------------------------------------------------------------------------


def _lookup_folder(path: str) -> str:
    """An index folder, or a folder holding one as ``ours`` (``atlas_lookup.py --index-dir``)."""
    inner = os.path.join(path, "ours")
    return inner if os.path.isdir(inner) else path


def _load(path: str):
    from napari_nephi import AtlasLookup

    lk = AtlasLookup.load(_lookup_folder(path), device="cpu")
    lk.framing = True  # as atlas_lookup.py's default --framing on
    return lk


def _atlas_lookup():
    """``benchmarks/atlas_lookup.py`` as a module (its folder put on ``sys.path`` once)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import atlas_lookup

    return atlas_lookup


def benchmark_atlas():
    """The benchmark's atlas (reference, labels): the phantom of ``atlas_lookup.parse([])``'s shape
    and seed."""
    from napari_nephi.synthetic.atlas import brain_phantom

    args = _atlas_lookup().parse([])
    return brain_phantom(args.shape, seed=args.seed)


def sections_of(seed: int, compartments: str):
    """The benchmark's 60 sections of query seed ``seed``: atlas_lookup.py's own construction."""
    atlas_lookup = _atlas_lookup()
    from napari_nephi.synthetic.atlas import brain_phantom

    args = atlas_lookup.parse(["--query-seed", str(seed), "--compartments", compartments])
    ref, labels = brain_phantom(args.shape, seed=args.seed)
    queries = atlas_lookup.make_queries(ref, labels, args)
    flat = []
    for case, qs in queries.items():
        for j, q in enumerate(qs):
            flat.append((case, j, q))
    return flat


def _one(lk, image, options) -> tuple[list[int], float, float, float, object]:
    """The ranking, CPU and wall ms, the prior's weight the ranking used, and the search's result."""
    t0, c0 = time.perf_counter(), time.process_time()
    found = lk.search_poses(image, options)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    return [p for p, _ in found.ranking], 1000 * cpu, 1000 * wall, float(found.prior_weight), found


def stages(lk, image, found, plate: int) -> dict:
    """Where the search lost the truth (``run --stages``, C2 of session 39; untimed): the truth's rank in
    the first stage's order (the order the pose search starts from), the plates between the truth and the
    nearest stage-2 pose (0: the search reached the truth's plate; ``RerankResult.poses``), the best pose
    score on the truth's plate (None: no pose there) and the winner's."""
    order = lk.order(image) if isinstance(lk, Ensemble) else lk.search_order(image)
    reached = sorted(found.poses)
    winner = found.ranking[0][0]
    own = found.poses.get(plate)
    return {
        "first_rank": [int(p) for p, _ in order].index(plate),
        "pose_gap": min(abs(plate - p) for p in reached) if reached else None,
        "truth_score": None if own is None else float(own.score),
        "winner_score": float(found.poses[winner].score) if winner in found.poses else None,
    }


class Ensemble:
    """Arm b's first stage from several indexes (``--ensemble-b``, session 39's screen): per section each
    index's centred and pooled framing distances scaled to 0 at the best plate and 1 at the median, averaged
    over the indexes; the order interleaved as :meth:`AtlasLookup.search_order` does (the centred order with
    the pooled one's), each plate with its averaged pooled distance (the prior's input); then the default
    pose search. With one index the ranking is that index's own (a linear rescaling changes neither the
    order, the prior nor ``prior_margin``'s margin)."""

    def __init__(self, folders: list[str]):
        from napari_nephi.engines.atlas.plates import Plates
        from napari_nephi.engines.atlas.rerank import PoseSearch

        self.lks = [_load(f) for f in folders]
        self.search = PoseSearch(Plates.from_reference(*benchmark_atlas()))

    @staticmethod
    def _scaled(v: np.ndarray) -> np.ndarray:
        low, mid = float(v.min()), float(np.median(v))
        return (v - low) / max(mid - low, 1e-12)

    def order(self, image) -> list[tuple[int, float]]:
        from napari_nephi.engines.atlas.framing import interleaved_order, pooled_distance

        centred, pooled = [], []
        for lk in self.lks:
            d = lk.framed_distances(image)
            centred.append(self._scaled(d[0]))
            pooled.append(self._scaled(pooled_distance(d)))
        c, p = np.mean(centred, axis=0), np.mean(pooled, axis=0)
        return interleaved_order(np.argsort(c, kind="stable"), np.argsort(p, kind="stable"), p)

    def search_poses(self, image, options):
        return self.search.search(image, self.order(image), options)


def _write(path: str, out: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(out, fh, indent=1)
    os.replace(tmp, path)


def run(args) -> dict:
    import torch

    from napari_nephi.engines.atlas.rerank import check_rerank_options

    torch.set_num_threads(args.threads)
    opts = {
        "a": check_rerank_options(json.loads(args.arm_a)),
        "b": check_rerank_options(json.loads(args.arm_b)),
    }
    lk_a = _load(args.index)
    lk = {"a": lk_a, "b": lk_a if args.index_b is None else _load(args.index_b)}
    if args.ensemble_b is not None:
        if args.index_b is not None:
            raise SystemExit("--ensemble-b names arm b's indexes: give it or --index-b, not both")
        lk["b"] = Ensemble(args.ensemble_b.split(","))
    out = {
        "command": " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "index_a": os.path.abspath(args.index),
        "index_b": os.path.abspath(args.index_b or args.index),
        "ensemble_b": args.ensemble_b,
        "arm_a": opts["a"],
        "arm_b": opts["b"],
        "compartments": args.compartments,
        "load_start": os.getloadavg()[0],
        "rows": [],
    }
    wanted = None if args.sections is None else {int(s) for s in args.sections.split(",")}
    warm = False  # one untimed lookup per index first: the first call's set-up is no arm's CPU
    position = 0  # the section's place in this run: the arms' order alternates on it
    for seed in [int(s) for s in args.seeds.split(",")]:
        for k, (case, j, q) in enumerate(sections_of(seed, args.compartments)):
            if wanted is not None and k not in wanted:
                continue
            if not warm:
                for arm in "ab" if lk["b"] is not lk["a"] else "a":
                    _one(lk[arm], q["image"], opts[arm])
                warm = True
            row = dict(seed=seed, case=case, query=j, section=k, contrast=q["contrast"], plate=q["plate"])
            if "plate_range" in q:  # the plates the section's tissue spans, 5th-95th percentile (session 40)
                row["plate_range"] = [int(v) for v in q["plate_range"]]
            row["first_arm"] = "a" if position % 2 == 0 else "b"
            results = {}
            for arm in "ab" if position % 2 == 0 else "ba":
                order, cpu, wall, row[f"prior_weight_{arm}"], found = _one(lk[arm], q["image"], opts[arm])
                results[arm] = found
                row[f"rank_{arm}"] = order.index(q["plate"])
                row[f"top10_{arm}"] = order[:10]
                row[f"cpu_ms_{arm}"] = cpu
                row[f"wall_ms_{arm}"] = wall
                row[f"pairs_{arm}"] = getattr(found, "pairs", None)  # session 43: the work, in pairs
                row[f"stage1_pairs_{arm}"] = getattr(found, "stage1_pairs", None)
                if getattr(found, "quarter_open", None) is not None:  # quarter_gate (session 41)
                    reading = found.quarter_reading  # NaN (too little shared tissue) written as null
                    row[f"quarter_reading_{arm}"] = None if reading != reading else reading
                    row[f"quarter_open_{arm}"] = found.quarter_open
                if args.stages:
                    for key, value in stages(lk[arm], q["image"], found, q["plate"]).items():
                        row[f"{key}_{arm}"] = value
            # session 42: whether b's ranking is a's (every plate and distance), and its poses and pairs
            a, b = results["a"], results["b"]
            row["identical"] = bool(a.ranking == b.ranking)
            row["same_poses"] = bool(
                getattr(a, "poses", None) == getattr(b, "poses", None)
                and getattr(a, "pairs", None) == getattr(b, "pairs", None)
            )
            out["rows"].append(row)
            position += 1
            out["load_end"] = os.getloadavg()[0]
            _write(args.out, out)
            print(
                f"{seed} {case} {j:2d} plate {q['plate']:3d}: rank {row['rank_a']} / {row['rank_b']}, "
                f"CPU {row['cpu_ms_a']:.0f} / {row['cpu_ms_b']:.0f} ms",
                flush=True,
            )
    return out


def train(args) -> None:
    import torch

    from napari_nephi import AtlasLookup

    torch.set_num_threads(args.threads)
    ref, labels = benchmark_atlas()
    t0, c0 = time.perf_counter(), time.process_time()
    lk = AtlasLookup.train(ref, labels, device="cpu", seed=args.train_seed, **json.loads(args.train_options))
    folder = os.path.join(args.out, "ours")
    lk.save(folder)
    s = lk.settings
    print(
        f"saved {folder}: training seed {args.train_seed}, steps {s.get('steps_done')}, best step "
        f"{s.get('best_step')}, validation mean rank {s.get('val_mean_rank')}, "
        f"{time.process_time() - c0:.0f} s CPU, {time.perf_counter() - t0:.0f} s wall",
        flush=True,
    )


def _index_name(path):
    """An index as a run file names it, ``DIR`` and ``DIR/ours`` alike."""
    if path is None:
        return None
    path = os.path.normpath(path)
    return os.path.dirname(path) if os.path.basename(path) == "ours" else path


def setup_of(run_file: dict) -> dict:
    """What a run file compared: its stain, each arm's index and options (as ``run`` saved them)."""
    return {
        "compartments": run_file.get("compartments"),
        "index_a": _index_name(run_file.get("index_a")),
        "index_b": _index_name(run_file.get("index_b")),
        "ensemble_b": run_file.get("ensemble_b"),
        "arm_a": run_file.get("arm_a"),
        "arm_b": run_file.get("arm_b"),
    }


def _rerank_defaults() -> dict | None:
    try:
        from napari_nephi.engines.atlas.rerank import check_rerank_options
    except ImportError:  # the judge's arithmetic needs numpy only
        return None
    return check_rerank_options({})


def describe(setup: dict, defaults: dict | None = None) -> str:
    """One line: the stain, the indexes and each arm's options that differ from ``defaults``."""

    def arm(options):
        if options is None:
            return "?"
        if defaults is None:
            return json.dumps(options, sort_keys=True)
        changed = {k: v for k, v in options.items() if defaults.get(k, object()) != v}
        return json.dumps(changed, sort_keys=True) if changed else "defaults"

    index_b = setup["index_b"] if setup["ensemble_b"] is None else f"ensemble {setup['ensemble_b']}"
    return (
        f"stain {setup['compartments']}; index a {setup['index_a']}, b {index_b}; "
        f"arm a {arm(setup['arm_a'])}, arm b {arm(setup['arm_b'])}"
    )


def pool(runs: list[tuple[str, dict]], mix: bool = False, defaults: dict | None = None):
    """The rows of several run files ``(path, contents)`` and the lines that say what was pooled.

    Each file's stain, indexes and arms are printed; files that differ in any of them are refused
    (``ValueError``) unless ``mix``. A row that an earlier file already holds (the same setup, query
    seed and section) is dropped and reported; rows within one file are kept as they are."""
    lines, rows, seen, dropped = [], [], set(), []
    setups = [setup_of(run_file) for _, run_file in runs]
    for (path, run_file), setup in zip(runs, setups):
        n = len(run_file["rows"])
        lines.append(f"{path}: {n} sections; {describe(setup, defaults)}")
    if not mix and any(setup != setups[0] for setup in setups[1:]):
        raise ValueError(
            "the files differ in their stain, indexes or arms (above): give --mix to pool them anyway"
        )
    first = {}
    for (path, run_file), setup in zip(runs, setups):
        tag = json.dumps(setup, sort_keys=True)
        keys = []
        for r in run_file["rows"]:
            key = (tag, r.get("seed"), r.get("section", r.get("query")), r.get("case"))
            if key in seen:
                dropped.append((path, r, first[key]))
                continue
            keys.append(key)
            first.setdefault(key, r)
            rows.append(r)
        seen.update(keys)
    if dropped:
        lines.append(f"dropped {len(dropped)} rows repeated across files (the first file's row is kept):")
        shown, hidden = 0, 0
        for path, r, kept in dropped:
            same = (r["rank_a"], r["rank_b"]) == (kept["rank_a"], kept["rank_b"])
            if same and shown >= 10:  # every row whose ranks differ is listed, 10 of the others
                hidden += 1
                continue
            shown += same
            lines.append(
                f"  {path}: seed {r.get('seed')} section {r.get('section')} ({r.get('case')}): ranks "
                f"{r['rank_a']} / {r['rank_b']}"
                + (" (as kept)" if same else f", kept {kept['rank_a']} / {kept['rank_b']}")
            )
        if hidden:
            lines.append(f"  ... and {hidden} more with the kept ranks")
    return rows, lines


def far_misses(rows: list[dict], far: int = 5) -> str:
    """``judge --list``'s lines on the far misses (either arm's rank >= ``far``) of rows run with
    ``--stages``: per arm the truth's rank in the first stage -> after the pose search, the plates from
    the truth to the nearest pose, and the truth's best pose score against the winner's ("" without
    ``--stages``); with the plates the section's tissue spans where the run recorded them (session 40:
    a warped brain's cut is not flat in the atlas, and far misses span more plates than hits)."""
    staged = [r for r in rows if "first_rank_a" in r and max(r["rank_a"], r["rank_b"]) >= far]
    if not staged:
        return ""

    def score(value):
        return "none" if value is None else f"{value:.3f}"

    text = (
        f"\nfar misses (rank >= {far}), per arm a; b: first stage -> final rank, winner plate, nearest "
        "pose (plates from the truth), truth's / winner's pose score"
    )
    for r in staged:
        span = r.get("plate_range")
        text += f"\n  {r['seed']} {r['case']} {r['query']} ({r['section']}, plate {r['plate']}"
        text += "):" if span is None else f", its tissue on plates {span[0]}-{span[1]}):"
        for arm in "ab":
            scores = f"{score(r[f'truth_score_{arm}'])} / {score(r[f'winner_score_{arm}'])}"
            text += (
                f" {r[f'first_rank_{arm}']} -> {r[f'rank_{arm}']}, {r[f'top10_{arm}'][0]}, "
                f"{r[f'pose_gap_{arm}']}, {scores}" + (";" if arm == "a" else "")
            )
    return text


def judge(args) -> bool:
    if args.marks is not None:
        try:
            check_marks(args.marks)
        except ValueError as err:  # a bad mark (or its JSON) is the user's: a message, no traceback
            print(f"--marks: {err}", file=sys.stderr)
            raise SystemExit(2) from None
    runs = []
    for path in args.files:
        with open(path) as fh:
            runs.append((path, json.load(fh)))
    try:
        rows, lines = pool(runs, args.mix, _rerank_defaults())
    except ValueError as err:
        print("\n".join(f"{path}: {describe(setup_of(r), _rerank_defaults())}" for path, r in runs))
        print(f"judge: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print("\n".join(lines))
    if args.fluorescence:
        rows = [r for r in rows if r["contrast"] == "fluorescence"]
    if args.cap is not None:
        rows = capped(rows, args.cap)
    text, passed = report(rows, args.marks)
    if args.list:
        changed = [r for r in rows if r["rank_a"] != r["rank_b"]]
        text += f"\nsections whose rank differs ({len(changed)}): seed case query (section): a -> b"
        for r in changed:
            weight = r.get("prior_weight_b")
            text += (
                f"\n  {r['seed']} {r['case']} {r['query']} ({r['section']}, {r['contrast']}, "
                f"plate {r['plate']}): "
                f"{r['rank_a']} -> {r['rank_b']}"
                + ("" if weight is None else f" (b's prior weight {weight})")
            )
        far = [r for r in rows if r["rank_a"] >= 5]
        text += f"\nfar misses of a (rank >= 5): {len(far)}, of b: {sum(r['rank_b'] >= 5 for r in rows)}"
        text += far_misses(rows)
    print(
        f"{len(rows)} sections from {', '.join(args.files)}"
        + (" (fluorescence-like only)" if args.fluorescence else "")
    )
    print(text)
    return passed


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train an index of the benchmark's phantom with a training seed")
    t.add_argument("out")
    t.add_argument("--train-seed", type=int, default=0)
    t.add_argument("--train-options", default="{}", help="JSON options of AtlasLookup.train")
    t.add_argument("--threads", type=int, default=1)
    r = sub.add_parser("run", help="both arms per section, alternating")
    r.add_argument("out", help="JSON written after every section")
    r.add_argument("--index", required=True, help="index folder (or a folder holding it as 'ours')")
    r.add_argument("--index-b", default=None, help="arm b's own index (default: --index)")
    r.add_argument("--seeds", required=True, help="comma-separated query seeds")
    r.add_argument("--compartments", default="labels", help="labels, foreign, independent or marker")
    r.add_argument("--arm-a", default="{}", help="JSON rerank_options of arm a")
    r.add_argument("--arm-b", default="{}", help="JSON rerank_options of arm b")
    r.add_argument(
        "--ensemble-b",
        default=None,
        help="comma-separated index folders: arm b's first stage averages theirs (class Ensemble)",
    )
    r.add_argument("--sections", default=None, help="comma-separated flat indexes (0-59) only")
    r.add_argument(
        "--stages",
        action="store_true",
        help="also record per arm the truth's first-stage rank, nearest pose and pose scores (untimed)",
    )
    r.add_argument("--threads", type=int, default=1)
    j = sub.add_parser("judge", help="pooled / per case / per seed, paired differences, marks")
    j.add_argument("files", nargs="+")
    j.add_argument("--marks", default=None, help="today, offlabel or a JSON object")
    j.add_argument("--fluorescence", action="store_true", help="the fluorescence-like sections only")
    j.add_argument("--cap", type=int, default=None, help="judge the ranks capped at this (e.g. 10)")
    j.add_argument("--list", action="store_true", help="also list every section whose rank differs")
    j.add_argument(
        "--mix",
        action="store_true",
        help="pool files whose stain, indexes or arms differ (refused otherwise)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.command == "train":
        train(args)
    elif args.command == "run":
        run(args)
    else:
        return 0 if judge(args) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
