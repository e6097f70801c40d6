"""MITO truth read: the background's looks read on the generator's own placement (session 40).

Where ``drift_correction="auto"`` reads an organelle drift short (stage-drift+drift 99: both looks
(0.166, -0.097) px per section against the (0.306, -0.038) the alignment left), is it the placement
or the sample? This script reads the background (:func:`.background.background_motion`, the engine's
crops, masks and runs) on the placement an aligner that follows the mitochondria perfectly would give:
the generator's true matrices followed by the mitochondria's true mean drift (captured from the
generator's ``_add_drift``), so that the background moves by exactly ``-v`` per section (``v``: the
mitochondria's mean drift). What it reads off ``-v`` there is the reading's own error on those pairs
(their sample, or a bias of the reading); what the engine's placement reads off the truth's reading
on the same pairs and crops is the placement's.

Readings (each: slope, se, pairs, :func:`.background.classify`'s decision at the floor ``--floor``,
chi-square from 0): the first look, the second, both (:func:`.background.second_look`) and ``all``
(:data:`--all-pairs` neighbour pairs in 8 runs: what the stack itself holds, a far larger sample).

* ``unrotated`` frame (session 38 A2's ``sdd_truth.py``, lost with /tmp): the truth placement in the
  generator's unrotated frame; the organelles' part is ``-v``.
* ``--mask given``: the background read with the true masks (full size, undilated) instead of the keypoint
  stage's dilated ones (what the engine reads with), to see what the mask's margin changes.
* ``--engine``: also runs the benchmark's ``mito-default`` row (``mito_benchmark.run_mito``, the
  defaults), keeps the placement the engine decided on (the matrices given to
  ``align._auto_decision``), reads it with the same function (which must reproduce the engine's own
  first look: ``engine_first_look_reproduced``) and reads the truth placement moved into the engine's
  frame (the reference section's), where the organelles' part is the reference's rotation of ``-v``.
* ``--oracle`` (session 41, with ``--engine``): where the engine's placement loses its reading. Every
  placement is read twice on the same looks' pairs: by the images (as above) and by geometry
  (:func:`background_geometry`: the still background's exact motion on that placement, from the generator's
  matrices; no image), so ``img - geo`` is the reading's own error and ``geo`` the placement's. The engine's
  placement against the truth's (:func:`placement_parts`): its translation's straight line over the sections
  (the lag: what it does not follow of the mitochondria's drift), the rest (jitter) and its linear part, and
  hybrids that put one part at a time on the truth placement (``trend``, ``jitter``, ``translation``,
  ``linear``), each read both ways (:func:`oracle_reads`). ``--engine-option NAME=VALUE`` (repeatable) runs
  the engine with an ``align_stack`` option, e.g. ``mask_dilation=0`` (the keypoint masks' oracle). A look
  that measures no pair (a short stack's second look) reads "unmeasured" and None in the JSON (session 42;
  it printed 0.0000 before).

Usage (``cd /work/main``; one 160-section stack, measured in session 41: about 16 CPU s to generate, 37 for
the engine's run, 87 in all with ``--engine --oracle`` on 98; 5 min of wall at load 11-14)::

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/mito_truth_read.py --seeds 98 99 \\
        --case stage-drift+drift --json /tmp/truth.json [--engine [--oracle] \\
        [--engine-option mask_dilation=0]]

Not part of the test run (``tests/mito/test_mito_truth_read.py`` tests the truth placement, the geometry and
the placement's parts).
"""

from __future__ import annotations

import argparse
import ast
import copy
import inspect
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mito_benchmark as mb  # noqa: E402

from napari_nephi.engines.mito import align  # noqa: E402
from napari_nephi.engines.mito import background as bgm  # noqa: E402
from napari_nephi.engines.mito.detrend import section_centres, trend_test  # noqa: E402
from napari_nephi.synthetic import em as em_module  # noqa: E402


def translation(t) -> np.ndarray:
    """The homogeneous (y, x) translation by ``t``."""
    m = np.eye(3)
    m[:2, 2] = t
    return m


def truth_placement(matrices: np.ndarray, velocity, ref: int | None = None) -> np.ndarray:
    """The placement that follows the mitochondria perfectly: ``matrices[k] @ T(velocity * (k - k0))``
    (``matrices``: the generator's, unrotated frame -> section ``k``; ``k0`` the middle section, where the
    generator's drift is zero), so that aligned content moving by ``velocity`` per section stands still
    and a still background moves by ``-velocity``. ``ref``: expressed in section ``ref``'s frame (the
    engine's aligned frame), i.e. multiplied by the inverse of its matrix ``ref``."""
    n = len(matrices)
    k0 = (n - 1) / 2.0
    v = np.asarray(velocity, np.float64)
    out = np.stack([matrices[k] @ translation(v * (k - k0)) for k in range(n)])
    if ref is not None:
        out = out @ np.linalg.inv(out[ref])
    return out


def expected_background(velocity, frame: np.ndarray | None = None) -> np.ndarray:
    """The still background's slope under :func:`truth_placement`: ``-velocity``, turned by the linear
    part of ``frame`` (the truth placement's matrix of the reference section) where given."""
    v = -np.asarray(velocity, np.float64)
    return v if frame is None else (frame[:2, :2] / frame[2, 2]) @ v


def generate(seed: int, case: str, args) -> tuple[dict, dict]:
    """The benchmark's stack and the generator's truth: the mitochondria's drifts (each, their mean and
    the population's velocity) and the stage's path (captured from ``_add_drift`` / ``_stage_path``)."""
    seen: dict = {}
    add_drift, stage_path = em_module._add_drift, em_module._stage_path

    def add(mitos, *a):
        seen["population"] = add_drift(mitos, *a)
        seen["mitos"] = [list(m.drift[0]) for m in mitos]
        return seen["population"]

    def path(*a):
        seen["path"] = stage_path(*a)
        return seen["path"]

    em_module._add_drift, em_module._stage_path = add, path
    try:
        data = mb.em_stack(args.sections, tuple(args.shape), seed=seed, pad=args.pad, **mb.CASES[case])
    finally:
        em_module._add_drift, em_module._stage_path = add_drift, stage_path
    truth = {"population": [0.0, 0.0], "mitos_mean": [0.0, 0.0], "stage_step": [0.0, 0.0]}
    if "mitos" in seen:
        truth["population"] = [float(v) for v in seen["population"]]
        truth["mitos_mean"] = [float(v) for v in np.mean(seen["mitos"], axis=0)]
    if "path" in seen:
        truth["stage_step"] = [float(v) for v in np.polyfit(np.arange(args.sections), seen["path"], 1)[0]]
    return data, truth


def stack_defaults() -> dict:
    """:func:`.align.build_options`'s arguments as ``align_stack`` passes them by default (the
    ``mito-default`` row: its detector, descriptor, matcher and model are ``align_stack``'s own defaults),
    read from ``align_stack``'s signature so that they follow a changed default (session 41; they were
    restated by hand up to session 40). ``shape`` and ``masks_given`` are the caller's."""
    given = ("shape", "masks_given")
    stack = inspect.signature(align.align_stack).parameters
    names = [name for name in inspect.signature(align.build_options).parameters if name not in given]
    missing = [n for n in names if n not in stack or stack[n].default is inspect.Parameter.empty]
    if missing:  # review 1 (LOW): the signatures no longer match; never pass a sentinel on
        raise ValueError(f"align_stack has no default for build_options' {', '.join(missing)}")
    return {name: stack[name].default for name in names}


def reader(data: dict, workers: int, mask: str = "keypoint", options: dict | None = None):
    """``background(mats, use, second, trend, pairs)``: :func:`.background.background_motion` as
    ``align_stack`` calls it with the given masks (``mask`` "keypoint": the keypoint stage's masks at its
    working scale, dilated by ``mask_dilation``), or with the true masks themselves ("given": full size,
    undilated; the background's own margin still applies). ``options``: the engine run's ``align_stack``
    options (``--engine-option``); those :func:`.align.build_options` takes (e.g. ``mask_dilation``) build the
    masks as the engine's run did (session 41)."""
    stack, masks = data["stack"], data["masks"]
    h, w = stack.shape[1:]
    defaults = stack_defaults()  # with the engine's options (--engine-option) where they set the masks
    given = {name: value for name, value in (options or {}).items() if name in defaults}
    opts = align.build_options(shape=(h, w), masks_given=True, **{**defaults, **given})
    sections = align._Sections(stack, masks, opts, (None, None))
    mito = sections.background_mask if mask == "keypoint" else (lambda k: (masks[k] > 0).view(np.uint8))

    def background(mats, use, second=False, trend=None, pairs=bgm.PAIRS):
        try:
            return bgm.background_motion(
                lambda k: align.to_uint8(align.read_section(stack, k), None, None), mito,
                mats, (h, w), use, pairs=pairs, workers=workers, second=second, trend=trend,
            )  # fmt: skip
        finally:
            sections.release_masks()

    return background


def along_drift(slope, part) -> float:
    """The share of the organelles' part ``part`` (the background's true slope, ``-v``) that ``slope`` reads
    along it: ``slope . part / |part|^2`` (1: the drift read whole; review 2, A-2)."""
    part = np.asarray(part, np.float64)
    return float(np.asarray(slope, np.float64) @ part / (part @ part))


def looks(background, mats, use, shape, floor: float, all_pairs: int, expected=None, part=None) -> dict:
    """The first, second, both looks and ``all`` pairs on the placement ``mats`` (sections of ``shape``; see
    the module's docstring); ``expected``: the background's true slope there (errors reported against it);
    ``part`` (default ``expected``): the organelles' part each reading's ``along_drift`` share is taken of."""
    part = expected if part is None else part
    trend = trend_test(section_centres(mats, shape), use)["slope"]
    first = background(mats, use, False, trend)
    second = background(mats, use, True, trend)
    out = {"trend": [float(v) for v in trend], "first": first, "second": second}
    out["both"] = bgm.second_look(first, second)
    out["all"] = background(mats, use, False, trend, all_pairs)
    for name in ("first", "second", "both", "all"):
        r = out[name]
        r.pop("around_0", None)
        r.pop("runs", None)
        if math.isfinite(r["se"][0]):
            r["decision"], r["share"] = bgm.classify(trend, r, floor=floor)
            r["chi_square_from_0"] = bgm.chi_square_from_0(r, floor)
            if expected is not None:
                err = np.asarray(r["slope"]) - expected
                r["error"] = [float(v) for v in err]
                r["error_in_se"] = [float(v) for v in err / np.maximum(r["se"], floor)]
            if part is not None:
                r["along_drift"] = along_drift(r["slope"], part)
    if expected is not None:
        out["organelles_part"] = [float(v) for v in expected]
    return out


def engine_placement(data: dict, workers: int, options: dict | None = None) -> dict:
    """The benchmark's ``mito-default`` row with the defaults (and ``options``, ``align_stack``'s, e.g.
    ``mask_dilation``: session 41's oracle of the keypoint masks); the placement, ``use`` and the trend test
    that ``align._auto_decision`` was given, and the row's result."""
    seen: dict = {}
    decide = align._auto_decision

    def hook(test, matrices, use, background, relative=None, **kw):  # kw: session 45's kept reader
        seen.update(matrices=np.array(matrices), use=np.array(use), test_in=copy.deepcopy(test))
        out = decide(test, matrices, use, background, relative, **kw)
        seen["test"] = copy.deepcopy(test)
        return out

    bench = SimpleNamespace(model="homography", reference="auto", workers=workers, extra=dict(options or {}))
    align._auto_decision = hook
    try:
        seen["result"] = mb.run_mito(data, "mito-default", "bf", bench)
    finally:
        align._auto_decision = decide
    return seen


def _apply(m: np.ndarray, p) -> np.ndarray:
    q = m @ np.array([p[0], p[1], 1.0])
    return q[:2] / q[2]


def background_geometry(mats, true, use, shape, second: bool = False, pairs: int = bgm.PAIRS) -> np.ndarray:
    """Session 41: the still background's exact motion per section on the placement ``mats`` (aligned frame ->
    section ``k``), from the generator's matrices ``true`` (its unrotated frame -> section ``k``, where the
    background stands still), on the runs of pairs :func:`.background.runs` plans (``second``, ``pairs``) and
    averaged over the crops' centres (:func:`.background.crops`): what a perfect reading of those pairs would
    read, no image involved. Returns the runs' mean steps ``(runs, 2)`` (their mean: the slope)."""
    centres = [(y0 + ch / 2 - 0.5, x0 + cw / 2 - 0.5) for y0, x0, ch, cw in bgm.crops(shape)]
    means = []
    for run in bgm.runs(np.asarray(use, bool), pairs, second):
        steps = []
        for k in run:  # where section k's background at aligned c lies in the aligned frame of k + GAP
            m = np.linalg.inv(mats[k + bgm.GAP]) @ true[k + bgm.GAP] @ np.linalg.inv(true[k]) @ mats[k]
            steps.append(np.mean([_apply(m, c) - c for c in centres], axis=0) / bgm.GAP)
        means.append(np.mean(steps, axis=0))
    return np.array(means, dtype=np.float64).reshape(-1, 2)  # (0, 2) where a look plans no run


def placement_parts(truth: np.ndarray, engine: np.ndarray, use, shape, ref: int) -> dict:
    """Session 41: the engine's placement against the truth's (both in one frame), ``D_k = truth_k^-1
    engine_k``, split into its translation at the frame's centre (a straight line over the placed sections,
    ``lag``: px per section, and what is left, ``jitter``) and its linear part; and the hybrids that put one
    part at a time on the truth placement: ``trend``, ``jitter``, ``translation`` (both), ``linear``."""
    h, w = shape
    c0 = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    d = np.stack([np.linalg.solve(t, e) for t, e in zip(truth, engine)])
    t = np.array([_apply(m, c0) - c0 for m in d])
    ks = np.arange(len(d))
    use = np.asarray(use, bool)
    lag, icpt = np.polyfit(ks[use], t[use], 1)
    line = np.outer(ks, lag) + icpt
    jitter = t - line

    def moved(part):
        return np.stack([truth[k] @ translation(part[k] - part[ref]) for k in ks])

    linear = []
    for k in ks:
        a = d[k, :2, :2] / d[k, 2, 2]
        m = np.eye(3)
        m[:2, :2], m[:2, 2] = a, c0 - a @ c0
        linear.append(truth[k] @ m)
    steps = np.diff(jitter, axis=0)[use[1:] & use[:-1]]
    hybrids = {
        "trend": moved(line),
        "jitter": moved(jitter),
        "translation": moved(t),
        "linear": np.stack(linear),
    }
    return {
        "lag": lag, "jitter_rms": np.sqrt((jitter[use] ** 2).mean(0)),
        "jitter_step_rms": np.sqrt((steps**2).mean(0)), "hybrids": hybrids,
    }  # fmt: skip


def oracle_reads(background, true, placements: dict, use, shape, part) -> dict:
    """Session 41: each placement read twice on the same looks' pairs, by the images (``img``: the first, the
    second and both looks, as the engine reads) and by :func:`background_geometry` (``geo``), along the
    organelles' part ``part`` (the truth placement's background slope): ``img - geo`` is the reading's own
    error there, ``geo`` the placement's."""
    u = np.asarray(part, np.float64) / float(np.linalg.norm(part))
    out = {}
    for name, mats in placements.items():
        trend = trend_test(section_centres(mats, shape), use)["slope"]
        first, second = background(mats, use, False, trend), background(mats, use, True, trend)
        both = bgm.second_look(first, second)
        g1, g2 = (background_geometry(mats, true, use, shape, look) for look in (False, True))
        gb = np.concatenate([g1, g2]).mean(0)
        looks = {"first": first, "second": second, "both": both}
        out[name] = r = {
            "img": {k: _along(look, u) for k, look in looks.items()},
            "geo": {"first": float(g1.mean(0) @ u), "both": float(gb @ u)}, "both_slope": both["slope"],
            "both_geo": gb.tolist(), "pairs": [first["pairs"], second["pairs"]],
        }  # fmt: skip
        img, geo = r["img"], r["geo"]
        shown = {k: "unmeasured" if v is None else f"{v:.4f}" for k, v in img.items()}
        diff = "unmeasured" if img["both"] is None else f"{img['both'] - geo['both']:+.4f}"
        print(
            f"  {name:<11} along the drift: geo first {geo['first']:.4f} both {geo['both']:.4f} | img first "
            f"{shown['first']} second {shown['second']} both {shown['both']} "
            f"({first['pairs']}+{second['pairs']} pairs); img - geo both {diff}",
            flush=True,
        )
    return out


def _along(look: dict, u: np.ndarray) -> float | None:
    """A look's slope along the unit vector ``u``; None where the look is unmeasured (its se not finite, the
    slope a placeholder 0: session 42, as :func:`_line` shows it)."""
    if not np.all(np.isfinite(look["se"])):
        return None
    return float(np.asarray(look["slope"]) @ u)


def _line(name: str, r: dict) -> str:
    if not math.isfinite(r["se"][0]):
        return f"  {name:<6} unmeasured ({r['pairs']} pairs)"
    (by, bx), (sy, sx) = r["slope"], r["se"]
    s = f"  {name:<6} ({by:.3f}, {bx:.3f}) +- ({sy:.3f}, {sx:.3f}), {r['pairs']} pairs"
    s += f", |b| {math.hypot(by, bx):.3f}"
    s += f", chi-square from 0 {r['chi_square_from_0']:.1f}: {r['decision']}"
    if "error" in r:
        (ey, ex), (zy, zx) = r["error"], r["error_in_se"]
        s += f"; error ({ey:.3f}, {ex:.3f}) = ({zy:.1f}, {zx:.1f}) se"
    if "along_drift" in r:
        s += f"; along the drift {r['along_drift']:.2f} of it"
    return s


def _show(title: str, out: dict) -> None:
    part = out.get("organelles_part")
    extra = (
        "" if part is None else f", organelles' part ({part[0]:.3f}, {part[1]:.3f}) |{math.hypot(*part):.3f}|"
    )
    print(f" {title}: trend ({out['trend'][0]:.3f}, {out['trend'][1]:.3f}){extra}")
    for name in ("first", "second", "both", "all"):
        print(_line(name, out[name]))


def table(paths) -> dict:
    """The truth placement's looks along the drift (unrotated frame), as a share of it, for every row of the
    JSON files ``paths`` (this script's ``--json``; rows without the share are read from their slopes), one
    row a seed, then the mean (sd) and the se of the mean; returned as ``{look: [shares]}`` with ``seeds``."""
    rows = sorted((r for path in paths for r in json.load(open(path))), key=lambda r: r["seed"])
    out: dict = {"seeds": [r["seed"] for r in rows], **{k: [] for k in ("first", "second", "both", "all")}}
    print("| seed | drift (px per section) | first look | second | both | all pairs | first / both decide |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        u = r["unrotated"]
        for k in ("first", "second", "both", "all"):
            out[k].append(u[k].get("along_drift", along_drift(u[k]["slope"], u["organelles_part"])))
        shares = " | ".join(f"{out[k][-1]:.2f}" for k in ("first", "second", "both", "all"))
        decide = f"{u['first'].get('decision')} / {u['both'].get('decision')}"
        print(f"| {r['seed']} | {math.hypot(*u['organelles_part']):.3f} | {shares} | {decide} |")
    a = {k: np.array(out[k]) for k in ("first", "second", "both", "all")}
    ms = " | ".join(f"{a[k].mean():.2f} ({a[k].std(ddof=1):.2f})" for k in a) if len(rows) > 1 else ""
    print(f"| mean (sd) of {len(rows)} | | {ms} | |")
    if len(rows) > 1:
        se = {k: a[k].std(ddof=1) / math.sqrt(len(rows)) for k in a}
        print(f"# se of the mean: both looks {se['both']:.3f}, all pairs {se['all']:.3f}")
    for r in rows:  # --engine rows: the reference frame, the truth's part there
        if "truth_in_engine_frame" in r:
            t, e = r["truth_in_engine_frame"], r["engine_placement"]
            part = t["organelles_part"]
            shares = ", ".join(
                f"{k} {along_drift(t[k]['slope'], part):.2f} / {along_drift(e[k]['slope'], part):.2f}"
                for k in ("first", "second", "both", "all")
            )
            print(f"# {r['seed']} reference frame, along the drift (truth / engine placement): {shares}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--case", default="stage-drift+drift")
    p.add_argument("--sections", type=int, default=160)
    p.add_argument("--shape", type=int, nargs=2, default=(768, 1024))
    p.add_argument("--pad", type=int, default=250)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--floor", type=float, default=0.02, help="se floor of the decisions (the default's)")
    p.add_argument("--all-pairs", type=int, default=159, help="pairs of the 'all' reading")
    p.add_argument("--mask", choices=("keypoint", "given"), default="keypoint", help="see reader()")
    p.add_argument("--engine", action="store_true", help="also the engine's placement (a full alignment)")
    p.add_argument(
        "--oracle",
        action="store_true",
        help="with --engine: the placement split into parts, read by image and geometry",
    )
    p.add_argument(
        "--engine-option", action="append", default=[], metavar="NAME=VALUE",
        help="an align_stack option of the engine's run (a Python literal), e.g. mask_dilation=0",
    )  # fmt: skip
    p.add_argument("--json", help="write the readings here")
    p.add_argument(
        "--table", nargs="+", metavar="JSON", help="only print the along-drift table of these --json files"
    )
    args = p.parse_args(argv)
    if args.table:
        table(args.table)
        return 0
    if not args.seeds:
        p.error("--seeds is required (or --table JSON ...)")
    if args.oracle and not args.engine:
        p.error("--oracle needs --engine")
    options = {}
    for item in args.engine_option:
        name, _, value = item.partition("=")
        if name not in align.STACK_OPTIONS or not value:
            p.error(f"--engine-option {item!r}: give NAME=VALUE with an align_stack option")
        options[name] = ast.literal_eval(value)
    if args.case not in mb.CASES:
        p.error(f"unknown case {args.case}; choose from {', '.join(mb.CASES)}")
    results = []
    for seed in args.seeds:
        cpu = time.process_time()
        data, truth = generate(seed, args.case, args)
        shape = data["stack"].shape[1:]
        background = reader(data, args.workers, args.mask, options)
        v = np.asarray(truth["mitos_mean"])
        use = np.ones(args.sections, bool)
        row = {"seed": seed, "case": args.case, "mask": args.mask, "truth": truth}
        print(
            f"# seed {seed} {args.case}: mitochondria's mean drift ({v[0]:.3f}, {v[1]:.3f}) "
            f"|{math.hypot(*v):.3f}|, "
            f"population ({truth['population'][0]:.3f}, {truth['population'][1]:.3f}), stage step "
            f"({truth['stage_step'][0]:.3f}, {truth['stage_step'][1]:.3f}) px per section",
            flush=True,
        )
        row["unrotated"] = looks(
            background, truth_placement(data["matrices"], v), use, shape, args.floor, args.all_pairs,
            expected_background(v),
        )  # fmt: skip
        _show("truth placement, unrotated frame", row["unrotated"])
        if args.engine:
            seen = engine_placement(data, args.workers, options)
            mats, use_e = seen["matrices"], seen["use"]
            ref = int(np.argmin([np.abs(m - np.eye(3)).sum() for m in mats]))
            placed = truth_placement(data["matrices"], v)
            frame = placed[ref]
            truth_ref = truth_placement(data["matrices"], v, ref)  # the truth placement in the engine's frame
            part = expected_background(v, frame)  # the organelles' part there
            res = seen["result"]
            row["engine"] = {
                "reference": ref, "dice_ref": res["dice_ref"], "dice_fit": res["dice_fit"],
                "frame_fit_slope": res["frame_fit"]["slope"], "drift_auto": res.get("drift_auto"),
                "options": options,
            }  # fmt: skip
            row["engine_placement"] = looks(
                background, mats, use_e, shape, args.floor, args.all_pairs, part=part
            )
            bg = seen["test"].get("background") or {}
            rec = bg.get("first_look", bg).get("slope")
            # within 1e-6: two readings of one placement differ by about 1e-9 (98: 6e-9)
            got = row["engine_placement"]["first"]["slope"]
            row["engine_first_look_reproduced"] = rec is not None and bool(
                np.allclose(rec, got, rtol=0, atol=1e-6)
            )
            row["truth_in_engine_frame"] = looks(
                background, truth_ref, use_e, shape, args.floor, args.all_pairs, part,
            )  # fmt: skip
            print(
                f" engine (defaults): reference {ref}, Dice ref {res['dice_ref']:.4f}, "
                f"fit {res['dice_fit']:.4f}, "
                f"left slope ({res['frame_fit']['slope'][0]:.3f}, {res['frame_fit']['slope'][1]:.3f}); "
                f"engine's first look reproduced: {row['engine_first_look_reproduced']}"
            )
            _show("engine placement (reference frame)", row["engine_placement"])
            _show("truth placement, reference frame", row["truth_in_engine_frame"])
            if args.oracle:
                split = placement_parts(truth_ref, mats, use_e, shape, ref)
                u = part / np.linalg.norm(part)
                lag, rms, step = split["lag"], split["jitter_rms"], split["jitter_step_rms"]
                row["oracle"] = {
                    "lag": lag.tolist(), "lag_along_drift": float(lag @ u), "jitter_rms": rms.tolist(),
                    "jitter_step_rms": step.tolist(),
                }  # fmt: skip
                print(
                    f" oracle: the engine's placement against the truth's: translation lag ({lag[0]:.4f}, "
                    f"{lag[1]:.4f}) px per section, {lag @ u:+.4f} along the drift (+: follows it less); "
                    f"jitter rms {np.round(rms, 3).tolist()}, per section {np.round(step, 3).tolist()}",
                    flush=True,
                )
                row["oracle"]["reads"] = oracle_reads(
                    background, data["matrices"], {"engine": mats, "truth": truth_ref, **split["hybrids"]},
                    use_e, shape, part,
                )  # fmt: skip
        row["cpu_s"] = time.process_time() - cpu
        results.append(row)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(results, fh, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
