"""MITO paired queue: a base drift decision against a switch of it, both arms per row.

Session 40 (issue 15). The base arm runs the earlier rule (:data:`BASE`: ``SE_FLOOR`` 0.02,
``SECOND_LOOK`` "undecided", the defaults up to session 40's change; ``--base-se-floor`` /
``--base-second-look`` name another, ``found`` the engine's settings as found) and the candidate
:data:`CANDIDATE` (0.06, "sections": since session 40 the engine's defaults), so the session 40 readings
rerun with the same command after the default moved. A switch of ``drift_correction="auto"``
(``background.SE_FLOOR``, ``background.SECOND_LOOK``: module settings) changes nothing but the drift decision
(``align._auto_decision``), which comes after the placement. So each row (seed, case) is run once:
the stack is generated once, the base arm runs ``mito_benchmark.py``'s ``mito-default`` row (its
``run_mito``: the same options, Dice ref / Dice fit / frame fit, the same JSON fields) with the
base's settings, and at its decision the candidate's decision is computed too, on the same
placement (a copy of the trend test, the same matrices; the settings switched for that call only).

* Where the candidate decides as the base (detrend or not, the same slope removed), its alignment is
  the base's: the candidate's row is the base's result with its own ``drift_auto`` record
  (``"cand_from": "shared"``; session 39: every such row identical to every digit in full runs).
* Where it decides otherwise, ``align_stack`` runs again with the candidate's settings in full
  (``"cand_from": "full"``) and its recorded reading must equal the predicted one
  (``"prediction_matches"``: the same decision, a slope within 1e-6; ``"prediction_identical"``: the
  whole record equal, which two runs of one stack miss by about 1e-9 in a slope). ``--full`` runs the
  candidate in full on every row.

Session 42 (issue 15): ``--arm-b-options JSON`` (an object of :func:`align_stack` options, e.g.
``'{"mask_dilation": 0}'``; names checked against ``align.STACK_OPTIONS`` at the start) gives arm B
(the candidate) those options too. They act before the decision (the keypoint stage, the placement), so
no twin is used: both arms run in full on the same stack in one process
(``"cand_from": "full"``, no prediction), and the row records ``"base_options": {}`` and
``"cand_options"``. The arm run first alternates with the row (:func:`first_arm`: seed + the case's position
in ``mito_benchmark.CASES`` even: the base; recorded as ``"first_arm"``, so ``cpu_s`` is paired; the rows of
session 42's fresh run, before this, all ran the base first). ``read --require-cases a,b`` reads a case
without a row as INCOMPLETE (mark (d)).
With options, the two arms' decision settings default to the engine's as found
(``--base-se-floor`` / ``--base-second-look`` / ``--se-floor`` / ``--second-look`` left out): only the
options differ. Without them every row is as before (no new key). ``read --targets kept`` takes as
targeted rows (c) the stage-drift+drift rows whose background the base keeps (any look), not only those
read "sections" on one look (session 40's rule, the default ``one-look``).

Session 43 (issue 15): options that act only on the background reading, after the placement
(:data:`READING_OPTIONS`: ``background_mask_dilation``), go through the decision twin after all: the base
arm runs once, and at each of its decisions the candidate's is computed on the same placement with the
background read as the option sets it (:class:`Twin` ``reading``: ``align.background_motion`` given the
masks at the option's dilation for that call only). A row that decides alike is the base's
(``"cand_from": "shared"``); one that does not (another decision, or "both" with another slope) runs the
candidate in full with the options, checked against the prediction as above. ``--full`` runs every such row
in full. Any other option in ``--arm-b-options`` runs both arms in full as in session 42.

Session 44 (issue 15): ``run --placement`` also records, per arm, the placement that the drift correction
was given (``align._detrended`` / ``align._detrended_elastic``'s input: the solve's, before any detrend)
against the truth's (:func:`placement_record`, session 41's split from ``mito_truth_read.placement_parts``),
and as ``placement_out`` the same of the placement the arm returned (what its Dice scores; review 1 of
session 44):
``lag`` ((y, x) px per section; ``lag_along_drift``: along the mitochondria's mean drift, +: follows it less;
None without organelle drift) and ``jitter_rms`` ((y, x) px, what is left off the straight line). The stack is
then made by ``mito_truth_read.generate`` (the same ``em_stack`` call, the drifts captured). Rows without it
are as before. For ``track_shift`` (session 44, an option that moves the placement) both arms run in full.

Rows are taken in the order ``for seed in --seeds: for case in --cases``; ``--lane K/N`` takes the
list's positions K, K + N, ... (two lanes: ``1/2`` and ``2/2``), so lanes split one fixed list;
``--until HH:MM`` (UTC) starts no row after that time (the bound within 12 h of the row's start: session 44,
:func:`past_until`); rows whose JSON exists are skipped.
``read DIR`` prints the table and the marks of session 40's rule (docs/mito.md): (a) no row loses more
than ``--loss`` Dice ref, (b) no stage-drift row the base keeps is detrended by the candidate, (c)
among the stage-drift+drift rows whose first look reads "sections" in the base's own record, at
least ``--min-rows`` exist and the candidate gains ``--gain`` Dice ref on at least ``--share`` of them.

Usage (``cd /work/main``; a row of 160 sections records about 22-25 CPU s per arm run in full, the
distorted cases 182-210 s with the elastic step; 1.5-4 min wall at load 10)::

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/mito_paired.py run \\
        --seeds 106 107 --cases stage-drift+drift,stage-drift --out /tmp/pairs --lane 1/2
    .venv/bin/python benchmarks/mito_paired.py read /tmp/pairs

Not part of the test run (``tests/mito/test_mito_paired.py`` tests the decision twin and the marks).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import glob
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _code_state  # noqa: E402
import mito_benchmark as mb  # noqa: E402
import mito_truth_read as mtr  # noqa: E402

from napari_nephi.engines.mito import align  # noqa: E402
from napari_nephi.engines.mito import background as bgm  # noqa: E402
from napari_nephi.synthetic import em_stack  # noqa: E402

#: The switch judged in session 40 (session 39's opt-in pair; the engine's defaults since session 40).
CANDIDATE = {"SE_FLOOR": 0.06, "SECOND_LOOK": "sections"}
#: The base arm's settings: the earlier rule (the engine's defaults up to session 40's change).
BASE = {"SE_FLOOR": 0.02, "SECOND_LOOK": "undecided"}


#: ``align_stack`` options that act only on the background reading of ``drift_correction="auto"`` (after the
#: placement; session 43), so the decision twin judges them (:func:`read_as`). Session 45: ``kept_reading``,
#: which acts only inside the decision (the local reading where the background keeps), is passed to the
#: twin's call (:class:`Twin`).
READING_OPTIONS = ("background_mask_dilation", "kept_reading")
#: The :data:`READING_OPTIONS` the twin passes to ``align._auto_decision`` itself (not :func:`read_as`).
DECISION_OPTIONS = ("kept_reading",)


@contextlib.contextmanager
def read_as(reading: dict):
    """Inside the block, ``align_stack``'s background reading (``align.background_motion``) reads the masks
    as the :data:`READING_OPTIONS` in ``reading`` set them: ``background_mask_dilation`` -> the keypoint
    stage's ``background_mask`` at that dilation (None: the run's own). Nothing is changed for ``{}``."""
    unknown = sorted(set(reading) - set(READING_OPTIONS) | set(reading) & set(DECISION_OPTIONS))
    if unknown:
        raise ValueError(f"not a reading option: {', '.join(unknown)}")
    if "background_mask_dilation" not in reading:
        yield
        return
    plain, dilation = align.background_motion, reading["background_mask_dilation"]

    def motion(read, mito, *args, **kwargs):
        if mito is not None:  # the bound _Sections.background_mask of the run
            mito = functools.partial(mito, dilation=dilation)
        return plain(read, mito, *args, **kwargs)

    align.background_motion = motion
    try:
        yield
    finally:
        align.background_motion = plain


@contextlib.contextmanager
def settings(values: dict):
    """``background`` module settings set to ``values`` inside the block, restored after."""
    old = {k: getattr(bgm, k) for k in values}
    try:
        for k, v in values.items():
            setattr(bgm, k, v)
        yield
    finally:
        for k, v in old.items():
            setattr(bgm, k, v)


def base_settings(se_floor: str, second_look: str) -> dict:
    """The base arm's module settings from ``--base-se-floor`` / ``--base-second-look`` (``found``: the
    engine's as found, left out)."""
    out = {}
    if se_floor != "found":
        try:
            out["SE_FLOOR"] = float(se_floor)
        except ValueError:
            raise SystemExit(f"--base-se-floor {se_floor!r}: a number or found") from None
    if second_look != "found":
        out["SECOND_LOOK"] = second_look
    return out


def arm_settings(args, options: dict) -> tuple[dict, dict]:
    """The candidate's and the base's module settings from ``run``'s arguments: each one left out is
    :data:`CANDIDATE`'s / :data:`BASE`'s, or with ``options`` (``--arm-b-options``) the engine's as found."""
    cand = {} if options else dict(CANDIDATE)
    if args.se_floor is not None:
        cand["SE_FLOOR"] = args.se_floor
    if args.second_look is not None:
        cand["SECOND_LOOK"] = args.second_look
    found = "found" if options else None
    base = base_settings(
        args.base_se_floor or found or str(BASE["SE_FLOOR"]),
        args.base_second_look or found or BASE["SECOND_LOOK"],
    )
    return cand, base


def same_decision(a, b) -> bool:
    """Whether two ``_auto_decision`` results ``(detrend?, slope or None)`` move the sections alike."""
    if bool(a[0]) != bool(b[0]):
        return False
    if not a[0]:
        return True
    if a[1] is None or b[1] is None:
        return a[1] is None and b[1] is None
    return bool(np.array_equal(np.asarray(a[1]), np.asarray(b[1])))


class Twin:
    """``align._auto_decision`` that also decides under ``other`` (module settings) on the same input.

    The wrapped call runs first, exactly as without the twin, on ``test``; the other decision then runs
    on a copy of ``test`` as it came in, with the background read as the :data:`READING_OPTIONS` in
    ``reading`` set it (:func:`read_as`; session 43) and the :data:`DECISION_OPTIONS` in ``reading`` given to
    the call (session 45: ``kept_reading``, with the run's own local reader ``kept``). ``calls``: one dict per
    decision (``mine``, ``other``, the other's ``test`` record and its CPU seconds)."""

    def __init__(self, decide, other: dict, reading: dict | None = None):
        self.decide, self.other, self.calls = decide, other, []
        reading = dict(reading or {})
        self.passed = {k: reading.pop(k) for k in DECISION_OPTIONS if k in reading}
        self.reading = reading

    def __call__(self, test, matrices, use, background, relative=None, **kw):
        twin = copy.deepcopy(test)
        mine = self.decide(test, matrices, use, background, relative, **kw)
        cpu = time.process_time()
        with settings(self.other), read_as(self.reading):
            other = self.decide(twin, matrices, use, background, relative, **{**kw, **self.passed})
        self.calls.append({"mine": mine, "other": other, "test": twin, "cpu_s": time.process_time() - cpu})
        return mine


def code_state() -> dict:
    """The code a row ran (review 1 of session 40): ``head`` (``git rev-parse --short HEAD`` of this
    script's checkout, "unknown" outside one; the checkout may hold other uncommitted changes) and sha256
    (first 12 hex) of this script, of ``mito_benchmark.py`` and of the imported MITO engine's ``*.py`` (with
    ``PYTHONPATH`` set to a frozen ``src``, that one's), with the engine's folder
    (:func:`_code_state.mito_state`, since session 41; the same values)."""
    return _code_state.mito_state(__file__, os.path.dirname(os.path.abspath(align.__file__)))


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def arm_options(text: str | None) -> dict:
    """``--arm-b-options``: a JSON object of :func:`align_stack` options ({} for None or empty); a name
    ``align_stack`` lacks, or one the row sets itself (the stack, masks, detector, descriptor, matcher,
    model, reference, workers, warp), stops the run at the start."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--arm-b-options {text!r}: not JSON ({e})") from None
    if not isinstance(value, dict):
        raise SystemExit(f"--arm-b-options {text!r}: a JSON object of align_stack options, e.g. "
                         '\'{"mask_dilation": 0}\'')  # fmt: skip
    bad = sorted(k for k in value if k not in align.STACK_OPTIONS or k in ROW_SETS)
    if bad:
        raise SystemExit(
            f"--arm-b-options: {', '.join(bad)} not an align_stack option the arm may set; choose from "
            f"{', '.join(k for k in align.STACK_OPTIONS if k not in ROW_SETS)}"
        )
    return value


#: ``align_stack`` arguments the row itself sets (``mito_benchmark.run_mito``), not an arm's to change.
ROW_SETS = ("masks", "detector", "descriptor", "matcher", "model", "reference", "workers", "warp")


def _bench(workers: int, options: dict | None = None) -> SimpleNamespace:
    return SimpleNamespace(model="homography", reference="auto", workers=workers, extra=dict(options or {}))


def run_row(seed: int, case: str, args, cand: dict, base: dict | None = None, cand_options=None) -> dict:
    """Both arms of one (seed, case) row (see the module's docstring); the base arm under the module
    settings ``base`` (None: the engine's as found); the candidate's with the ``align_stack`` options
    ``cand_options`` too (session 42; both arms then run in full, no twin)."""
    truth = None
    if getattr(args, "placement", False):  # session 44: the same stack, its drifts captured
        data, truth = mtr.generate(seed, case, args)
    else:
        data = em_stack(args.sections, tuple(args.shape), seed=seed, pad=args.pad, **mb.CASES[case])
    reading = dict(cand_options or {})
    if reading and not set(reading) <= set(READING_OPTIONS):
        return _run_options_row(seed, case, data, args, cand, base, reading, truth)
    bench = _bench(args.workers)
    twin = Twin(align._auto_decision, cand, reading)
    with settings(base or {}):
        used = {k: getattr(bgm, k) for k in cand}
        align._auto_decision = twin
        try:
            cpu = time.process_time()
            base = mb.run_mito(data, "mito-default", "bf", bench)
            base_cpu = time.process_time() - cpu
        finally:
            align._auto_decision = twin.decide
    row = {
        "seed": seed, "case": case, "sections": args.sections, "base_settings": used,
        "cand_settings": dict(cand), "base": base, "decisions": len(twin.calls), "code": code_state(),
    }  # fmt: skip
    if reading:  # session 43: a reading option, judged by the twin
        row.update(base_options={}, cand_options=reading)
    extra_cpu = sum(c["cpu_s"] for c in twin.calls)
    row["cpu_s"] = {"base": base_cpu - extra_cpu, "cand_decision": extra_cpu}
    shared = len(twin.calls) <= 1 and all(same_decision(c["mine"], c["other"]) for c in twin.calls)
    if shared and not args.full:
        row["cand"] = copy.deepcopy(base)
        if twin.calls:
            applied = base.get("drift_auto", {}).get("applied")
            row["cand"]["drift_auto"] = {"applied": applied, **twin.calls[0]["test"]}
        row["cand_from"], row["prediction_matches"] = "shared", None
    else:
        with settings(cand):
            cpu = time.process_time()
            row["cand"] = mb.run_mito(data, "mito-default", "bf", _bench(args.workers, reading))
            row["cpu_s"]["cand"] = time.process_time() - cpu
        row["cand_from"] = "full"
        if len(twin.calls) == 1:
            want = twin.calls[0]["test"].get("background")
            row["prediction_identical"] = _jsonable(row["cand"].get("drift_auto", {}).get("background")) == (
                _jsonable(want)
            )
    row["predicted"] = [_jsonable(c["other"]) for c in twin.calls]
    row = _jsonable(row)
    if row["cand_from"] == "full":
        row["prediction_matches"] = prediction_matches(row)
    return row


@contextlib.contextmanager
def placement_seen(seen: dict):
    """Inside the block, the placement ``align_stack`` gives its drift correction (``_detrended`` /
    ``_detrended_elastic``: matrices and reference) is kept in ``seen`` (the last call's), and the placement
    it returned, as ``mito_benchmark.evaluate`` scores it, in ``seen["out"]`` (review 1 of session 44, A1:
    ``track_shift="decision"`` hands the decision a shifted placement and returns the solved one where it
    keeps); nothing else changes."""
    plain, elastic, evaluate = align._detrended, align._detrended_elastic, mb.evaluate

    def scored(matrices, data, ref, *a, **kw):
        seen["out"] = {
            "matrices": np.array(matrices),
            "ref": int(ref),
            "shape": tuple(data["stack"].shape[1:]),
        }
        return evaluate(matrices, data, ref, *a, **kw)

    def detrended(matrices, shape, ref, *a, **kw):
        seen.update(matrices=np.array(matrices), ref=int(ref), shape=tuple(shape))
        return plain(matrices, shape, ref, *a, **kw)

    def detrended_elastic(matrices, fields, shape, ref, *a, **kw):
        seen.update(matrices=np.array(matrices), ref=int(ref), shape=tuple(shape))
        return elastic(matrices, fields, shape, ref, *a, **kw)

    align._detrended, align._detrended_elastic, mb.evaluate = detrended, detrended_elastic, scored
    try:
        yield
    finally:
        align._detrended, align._detrended_elastic, mb.evaluate = plain, elastic, evaluate


def placement_record(seen: dict, data: dict, truth: dict) -> dict | None:
    """Session 44: the placement in ``seen`` (:func:`placement_seen`) against the truth placement (the
    generator's matrices and the mitochondria's mean drift ``truth["mitos_mean"]``, in the placement's
    reference frame): ``lag`` / ``jitter_rms`` ((y, x) px; :func:`mito_truth_read.placement_parts`) and
    ``lag_along_drift`` (px per section along the drift, +: follows it less; None without drift). None
    where no drift correction ran."""
    if "matrices" not in seen:
        return None
    mats, ref, shape = seen["matrices"], seen["ref"], seen["shape"]
    v = np.asarray(truth["mitos_mean"], np.float64)
    parts = mtr.placement_parts(
        mtr.truth_placement(data["matrices"], v, ref), mats, np.ones(len(mats), bool), shape, ref
    )
    part = mtr.expected_background(v, mtr.truth_placement(data["matrices"], v)[ref])
    norm = float(np.linalg.norm(part))
    return {
        "reference": ref, "lag": [float(x) for x in parts["lag"]],
        "lag_along_drift": float(parts["lag"] @ part / norm) if norm > 0 else None,
        "jitter_rms": [float(x) for x in parts["jitter_rms"]],
    }  # fmt: skip


def first_arm(seed: int, case: str) -> str:
    """The arm an options row runs first (review 1 of session 42: paired CPU alternates): ``"base"`` where
    ``seed`` + the case's position in ``mito_benchmark.CASES`` is even, else ``"cand"``; fixed by the row, so
    a row run alone or in a lane starts alike."""
    return "base" if (int(seed) + list(mb.CASES).index(case)) % 2 == 0 else "cand"


def _run_options_row(
    seed, case, data, args, cand: dict, base: dict | None, options: dict, truth: dict | None = None
) -> dict:
    """A row whose candidate takes ``align_stack`` options: both arms in full on ``data``, in the order
    :func:`first_arm` (the options act before the decision, so nothing is shared or predicted). With the
    generator's ``truth`` (``--placement``) each arm's result gets its ``placement`` record
    (:func:`placement_record`)."""
    arms = {"base": (base or {}, {}), "cand": (cand, options)}
    res, used, cpu_s = {}, {}, {}
    first = first_arm(seed, case)
    for name in (first, "cand" if first == "base" else "base"):
        module, opts = arms[name]
        seen: dict = {}
        with settings(module), placement_seen(seen) if truth is not None else contextlib.nullcontext():
            used[name] = {k: getattr(bgm, k) for k in CANDIDATE}
            cpu = time.process_time()
            res[name] = mb.run_mito(data, "mito-default", "bf", _bench(args.workers, opts))
            cpu_s[name] = time.process_time() - cpu
        if truth is not None:
            res[name]["placement"] = placement_record(seen, data, truth)
            res[name]["placement_out"] = placement_record(seen.get("out", {}), data, truth)
    base_res, cand_res, cand_used = res["base"], res["cand"], used["cand"]
    used = used["base"]
    row = {
        "seed": seed, "case": case, "sections": args.sections, "base_settings": used,
        "cand_settings": cand_used, "base_options": {}, "cand_options": options, "base": base_res,
        "decisions": None, "code": code_state(), "cpu_s": cpu_s, "first_arm": first,
        "cand": cand_res, "cand_from": "full", "predicted": [], "prediction_matches": None,
    }  # fmt: skip
    if truth is not None:
        row["truth"] = truth
    return _jsonable(row)


def prediction_matches(row: dict, atol: float = 1e-6) -> bool | None:
    """Whether a candidate run in full decided as predicted at the base's decision: detrended or not as
    predicted, and where a slope was predicted, "detrend-slope" with the background's slope within ``atol``
    (the same readings differ by about 1e-9 between two runs of one stack: session 39, "removed slope equal
    to 1e-9"; stage-drift+drift 112 here). None where there was no single prediction."""
    if len(row.get("predicted", [])) != 1:
        return None
    apply, slope = row["predicted"][0]
    auto = row["cand"].get("drift_auto", {})
    applied = auto.get("applied", "none")
    if not apply:
        return applied == "none"
    if slope is None:
        return applied == "detrend"
    got = removed_slope(auto)
    return applied == "detrend-slope" and got is not None and bool(np.allclose(got, slope, rtol=0, atol=atol))


def removed_slope(auto: dict):
    """The slope a "detrend-slope" decision removes, from an arm's ``drift_auto`` record: the background's,
    or (session 45, ``decided_by`` "kept-local") the local reading's ``-v`` (its placement error where
    ``both_slope`` is "placement"); None where neither was read."""
    if auto.get("decided_by") == "kept-local":
        local = auto.get("kept_reading") or {}
        if local.get("both_slope") == "placement":
            return local.get("placement_error")
        return None if "slope" not in local else [-float(v) for v in local["slope"]]
    return (auto.get("background") or {}).get("slope")


def prediction_diff(row: dict) -> float | None:
    """The largest difference between the predicted slope and the full candidate's background slope (px per
    section; 0.0 where identical), or None where no slope was predicted."""
    if len(row.get("predicted", [])) != 1 or row["predicted"][0][1] is None:
        return None
    got = removed_slope(row["cand"].get("drift_auto", {}))
    return None if got is None else float(np.max(np.abs(np.subtract(got, row["predicted"][0][1]))))


def past_until(until: str, now: datetime.datetime) -> bool:
    """Whether ``now`` is at or past ``--until HH:MM`` (UTC), the bound taken on the day that puts it within
    12 h of ``now`` (session 44: the "HH:MM" strings compared before let a lane start rows after midnight past
    a bound of 23:58)."""
    try:
        h, m = (int(v) for v in until.split(":"))
        bound = now.replace(hour=h, minute=m, second=0, microsecond=0)
    except ValueError:
        raise SystemExit(f"--until {until!r}: give HH:MM (UTC)") from None
    half = datetime.timedelta(hours=12)
    if bound - now > half:
        bound -= datetime.timedelta(days=1)
    elif now - bound >= half:
        bound += datetime.timedelta(days=1)
    return now >= bound


def queue(seeds, cases, lane: str = "1/1") -> list[tuple[int, str]]:
    """The rows ``(seed, case)`` of lane ``K/N``: positions K, K + N, ... of the seed-major list."""
    k, n = (int(v) for v in lane.split("/"))
    if not 1 <= k <= n:
        raise SystemExit(f"--lane {lane}: K must be 1 to N")
    rows = [(int(s), c) for s in seeds for c in cases]
    return rows[k - 1 :: n]


def summary(row: dict) -> dict:
    """What the marks read from one row's JSON."""

    def arm(r):
        auto = r.get("drift_auto", {})
        bg = auto.get("background") or {}
        first = bg.get("first_look")
        return {
            "dice_ref": r["dice_ref"], "dice_fit": r["dice_fit"], "applied": auto.get("applied", "none"),
            "decision": bg.get("decision"), "first_look": first["decision"] if first else bg.get("decision"),
            "looks": 2 if first else (1 if bg else 0),
            "chi0": (first or {}).get("chi_square_from_0"),
            **{k: r[k] for k in ("placement", "placement_out") if k in r},
        }  # fmt: skip

    return {
        "seed": row["seed"], "case": row["case"], "base": arm(row["base"]), "cand": arm(row["cand"]),
        "cand_from": row.get("cand_from"),
        "prediction_matches": prediction_matches(row) if row.get("cand_from") == "full" else None,
        "prediction_diff": prediction_diff(row) if row.get("cand_from") == "full" else None,
    }  # fmt: skip


def _change(row: dict) -> float:
    """The candidate's Dice ref less the base's, each to 4 decimals (as the rule reads them)."""
    return round(row["cand"]["dice_ref"], 4) - round(row["base"]["dice_ref"], 4)


def _one_look_sections(arm: dict) -> bool:
    """Whether an arm's background read "sections" on its first (and only) look."""
    return arm["looks"] == 1 and arm["decision"] == "sections"


def _targeted(row: dict, targets: str) -> bool:
    """Whether a stage-drift+drift row is one the mark (c) reads: ``one-look`` (session 40) its base read
    "sections" on one look; ``kept`` (session 42) its base kept the background (``applied`` "none")."""
    if row["case"] != "stage-drift+drift":
        return False
    if targets == "kept":
        return row["base"]["applied"] == "none"
    return _one_look_sections(row["base"])


#: The rows the mark (c) reads (:func:`_targeted`).
TARGETS = ("one-look", "kept")


def marks(
    rows: list[dict], loss=0.005, gain=0.02, share=1 / 3, min_rows=2, targets="one-look", require_cases=()
) -> dict:
    """Session 40's marks on row summaries (:func:`summary`; Dice ref to 4 decimals); ``verdict`` PASS,
    FAIL, NOT ENOUGH ROWS or (session 42's mark (d)) INCOMPLETE where a case of ``require_cases`` has no
    row (FAIL wins over it); ``targets`` the rows (c) reads (:func:`_targeted`)."""
    losers = [r for r in rows if _change(r) < -loss - 1e-9]
    detrended = [
        r for r in rows
        if r["case"] == "stage-drift" and r["base"]["applied"] == "none" and r["cand"]["applied"] != "none"
    ]  # fmt: skip
    s_rows = [r for r in rows if _targeted(r, targets)]
    gained = [r for r in s_rows if _change(r) >= gain - 1e-9]
    need = max(1, math.ceil(len(s_rows) * share - 1e-9))
    missing = [c for c in require_cases if c not in {r["case"] for r in rows}]
    if losers or detrended:
        verdict = "FAIL"
    elif missing:
        verdict = "INCOMPLETE"
    elif len(s_rows) < min_rows:
        verdict = "NOT ENOUGH ROWS"
    else:
        verdict = "PASS" if len(gained) >= need else "FAIL"
    return {
        "a_losses": [(r["seed"], r["case"]) for r in losers],
        "b_detrended": [(r["seed"], r["case"]) for r in detrended],
        "c_sections_rows": [(r["seed"], r["case"]) for r in s_rows],
        "c_gained": [(r["seed"], r["case"]) for r in gained],
        "c_needed": need, "d_missing_cases": missing, "verdict": verdict,
    }  # fmt: skip


def _read(args) -> int:
    rows = [summary(json.load(open(f))) for f in sorted(glob.glob(os.path.join(args.dir, "*.json")))]
    rows.sort(key=lambda r: (r["seed"], r["case"]))
    print("| seed | case | base Dice ref / fit (applied, first look) | candidate | from |")
    print("|---|---|---|---|---|")
    for r in rows:
        b, c = r["base"], r["cand"]
        chi = "" if c["chi0"] is None else f", chi-square from 0 {c['chi0']:.2f}"
        print(
            f"| {r['seed']} | {r['case']} | {b['dice_ref']:.4f} / {b['dice_fit']:.4f} ({b['applied']}, "
            f"{b['first_look']}) | {c['dice_ref']:.4f} / {c['dice_fit']:.4f} ({c['applied']}, {c['looks']} "
            f"look(s): {c['decision']}{chi}) | {r['cand_from']}"
            + ("" if r["prediction_matches"] is None else f", prediction {r['prediction_matches']}")
            + ("" if r["prediction_diff"] is None else f" (slope {r['prediction_diff']:.1g} apart)")
            + " |"
        )
    for r in rows:  # session 44 (--placement): the placement's lag along the drift and jitter, both arms
        for key, what in (("placement", "given to the decision"), ("placement_out", "returned")):
            b, c = r["base"].get(key), r["cand"].get(key)
            if not b or not c:
                continue
            along = [x["lag_along_drift"] for x in (b, c)]
            text = "" if None in along else f"lag along the drift {along[0]:+.4f} -> {along[1]:+.4f}, "
            print(
                f"# {r['seed']} {r['case']} ({what}): {text}jitter rms ({b['jitter_rms'][0]:.3f}, "
                f"{b['jitter_rms'][1]:.3f}) -> ({c['jitter_rms'][0]:.3f}, {c['jitter_rms'][1]:.3f})"
            )
    need = [c for c in (args.require_cases or "").split(",") if c]
    m = marks(rows, args.loss, args.gain, args.share, args.min_rows, args.targets, need)
    for k, v in m.items():
        print(f"{k}: {v}")
    return 0 if m["verdict"] == "PASS" else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the rows, one JSON each")
    r.add_argument("--seeds", type=int, nargs="+", required=True)
    r.add_argument("--cases", default="stage-drift+drift,stage-drift")
    r.add_argument("--out", required=True)
    r.add_argument("--lane", default="1/1", help="K/N: this lane's share of the row list")
    r.add_argument("--until", default=None, help="HH:MM UTC: start no row after it")
    r.add_argument("--full", action="store_true", help="run the candidate in full on every row")
    r.add_argument(
        "--placement", action="store_true",
        help="options rows: record each arm's placement lag and jitter against the truth (session 44)",
    )  # fmt: skip
    r.add_argument("--sections", type=int, default=160)
    r.add_argument("--shape", type=int, nargs=2, default=(768, 1024))
    r.add_argument("--pad", type=int, default=250)
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--se-floor", type=float, default=None, help="the candidate's (default: CANDIDATE's)")
    r.add_argument(
        "--second-look", choices=bgm.SECOND_LOOKS, default=None, help="the candidate's (default: CANDIDATE's)"
    )
    r.add_argument("--base-se-floor", default=None, help="the base's (default: BASE's); found: as found")
    r.add_argument(
        "--base-second-look", choices=(*bgm.SECOND_LOOKS, "found"), default=None,
        help="the base's (default: the earlier rule); found: the engine's as found",
    )  # fmt: skip
    r.add_argument(
        "--arm-b-options", default=None,
        help='JSON object of align_stack options for the candidate only, e.g. \'{"mask_dilation": 0}\'; '
        "the four decision settings then default to the engine's as found",
    )  # fmt: skip
    d = sub.add_parser("read", help="the table and the marks of a folder of row JSONs")
    d.add_argument("dir")
    d.add_argument("--loss", type=float, default=0.005)
    d.add_argument("--gain", type=float, default=0.02)
    d.add_argument("--share", type=float, default=1 / 3)
    d.add_argument("--min-rows", type=int, default=2)
    d.add_argument("--targets", choices=TARGETS, default="one-look", help="the rows (c) reads")
    d.add_argument("--require-cases", default=None, help="comma-separated: INCOMPLETE where one has no row")
    args = p.parse_args(argv)
    if args.command == "read":
        return _read(args)
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in mb.CASES]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(mb.CASES)}")
    options = arm_options(args.arm_b_options)
    cand, base = arm_settings(args, options)
    for arm in (cand, base):
        with settings(arm):  # the engine refuses a bad pair (e.g. "sections" under the floor): at the start
            align._sections_c0()
    os.makedirs(args.out, exist_ok=True)
    for seed, case in queue(args.seeds, cases, args.lane):
        path = os.path.join(args.out, f"pair_{seed}_{case}.json")
        if os.path.exists(path):
            continue
        now = datetime.datetime.now(datetime.timezone.utc)
        if args.until and past_until(args.until, now):
            print(f"# {now:%H:%M} UTC: --until {args.until}, no more rows started", flush=True)
            break
        t0 = time.perf_counter()
        row = run_row(seed, case, args, cand, base, options)
        row["started_utc"], row["wall_s"], row["load"] = (
            f"{now:%H:%M:%S}",
            time.perf_counter() - t0,
            os.getloadavg()[0],
        )
        with open(path, "w") as fh:
            json.dump(row, fh, indent=1)
        s = summary(row)
        print(
            f"{seed} {case}: base {s['base']} cand {s['cand']} ({row['cand_from']}), {row['wall_s']:.0f} s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
