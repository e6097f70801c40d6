"""Atlas-plate lookup benchmark: rank the true plate of synthetic sections among every plate.

The reference is :func:`napari_nephi.synthetic.atlas.brain_phantom` (132 plates of 96 x 112 by
default) with its labels; the queries come from
:func:`napari_nephi.synthetic.atlas.atlas_queries` (sections of a deformed specimen with its own
texture, written independently of the engine's training synthesiser) in five case groups:

* ``straight``: coronal cuts of the whole section, the atlas's stain;
* ``oblique``: pitch and yaw each up to 15 degrees;
* ``partial``: top, bottom, a hemisphere or a corner cut away (20-55 %);
* ``contrast``: fluorescence-like (other per-region levels, the opposite background);
* ``combined``: tilt up to 12 degrees, half of them partial, mixed stains, more noise, tears.

Every query also has an in-plane rotation (+-10 degrees), another pixel size (0.8-1.25) and
noise. The truth is the plate at the centre of the section's tissue.

``--compartments foreign`` stains the same sections (same plates, cuts, noise and tears) with
levels that do not follow the annotation's labels: touching regions merged, every region split
by a smooth surface, a drift across the brain (``atlas_queries(..., compartments="foreign")``).
A real stain does not know the atlas's parcellation; the default (``labels``: one level per
label) is the phantom's own model, which a score built on the labels can exploit. ``foreign``'s
compartments are still mostly the labels'; ``--compartments independent`` gives the
fluorescence-like sections levels mostly (``--partition-weight``, 0.7) from Voronoi cells drawn
independently of the annotation (the Nissl-like sections stay as they are).
``--compartments marker`` (session 38) gives them a marker's stain: a random subset of the
regions lit, each with a texture inside it, the others one dim level (``atlas_queries`` option).

Methods (``--methods``):

* ``ours``: ``AtlasLookup.train(reference, labels)`` with default options (atlas alone);
* ``ncc``: each section against every plate after the same preprocessing
  (``engines.atlas.preprocess.prepare_input``), best normalised cross-correlation over a small
  rotation (-10..10 degrees) x scale (0.9-1.1) search of the section;
* ``paper``: the same network trained with the paper's augmentations only (``augment="paper"``)
  on 50 "real" training sections (``atlas_queries`` with another seed, combined settings) plus
  the plates;
* ``ours+sections``: ours plus the same 50 sections;
* ``ours+rerank``: the ``ours`` index, its shortlist re-ranked by the pose search in the atlas
  (``lk.lookup(section, rerank=True)``, :mod:`napari_nephi.engines.atlas.rerank`);
* ``ncc+rerank``: the NCC ranking's shortlist re-ranked by the same pose search (no network).

``--rerank-options JSON`` passes options to the re-ranking (see ``rerank.DEFAULTS``).
``--framing off`` ranks by the centred section alone (``AtlasLookup.framing``, on by default since
session 12: the embedding also compares the section framed as part of a whole section, see
:mod:`napari_nephi.engines.atlas.framing`). ``--first-stage`` sets the network indexes' first
stage (``AtlasLookup.first_stage``: ``embedding``, ``vote`` or ``vote+embedding``; default: the
index's own, the embedding since session 10):
the ranking of ``ours``, ``paper``, ``ours+sections`` and the order the pose search of
``ours+rerank`` starts from.

Columns: mean rank of the true plate (0-based, the paper's MAE), mean |picked - true| in plates,
Top-1/3/5/10 (%), "in span" (session 41: the share of sections, %, whose top plate lies within the
plates the section's own tissue spans, the generator's ``plate_range``, its tissue's atlas plate from
the 5th to the 95th percentile; :func:`in_span`), train seconds, ms per lookup (one section at a time,
all plates ranked; wall clock, and the process's CPU time, which a shared machine's load inflates
less), and
Dice of the carried labels: the method's top-1 plate is registered onto the section with
``lk.register`` (the ``ours`` index, so every method gets the same registration) and its warped
labels are compared with the section's true labels (mean Dice over the regions in the truth).
``oracle`` registers the true plate.

The truth (the plate at the tissue's centre) stays the headline. "In span" stands beside it because
the sections are cuts of a warped brain (anisotropic scale and a smooth deformation of about 2 plates
along the plate axis) and may be oblique, so their tissue crosses several plates (session 40: a median
5 for the Top-1 hits, 9 for the far misses); a top plate within that span is one the section's tissue
lies on, off the centre's plate. It is per case and overall in the table and in the JSON (each row's
``plate_range`` and ``in_span``, each summary's ``in_span``, None where no section records a span).

Usage::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/atlas_lookup.py --threads 2 --json atlas.json
    .venv/bin/python benchmarks/atlas_lookup.py --quick          # small atlas, few steps (minutes)

Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import cv2
import numpy as np
import torch
from scipy import ndimage

from napari_nephi import AtlasLookup
from napari_nephi.engines.atlas.preprocess import prepare_input
from napari_nephi.synthetic.atlas import atlas_queries, brain_phantom
from napari_nephi.synthetic.atlas_sections import COMPARTMENTS, PARTITION_WEIGHT

#: Case groups: atlas_queries options.
CASES = {
    "straight": dict(max_tilt=0.0, partial=0.0, contrast="nissl", noise=0.03, tears=0.0),
    "oblique": dict(max_tilt=15.0, partial=0.0, contrast="nissl", noise=0.03, tears=0.0),
    "partial": dict(max_tilt=0.0, partial=1.0, contrast="nissl", noise=0.03, tears=0.0),
    "contrast": dict(max_tilt=0.0, partial=0.0, contrast="fluorescence", noise=0.03, tears=0.0),
    "combined": dict(max_tilt=12.0, partial=0.5, contrast="mixed", noise=0.06, tears=0.5),
}
METHODS = ("ours", "ncc", "paper", "ours+sections", "ours+rerank", "ncc+rerank")
#: Methods that re-rank the shortlist of another method by the pose search.
RERANKED = {"ours+rerank": "ours", "ncc+rerank": "ncc"}
TOPS = (1, 3, 5, 10)


class NCCRanker:
    """Best NCC of a section against every plate over a small rotation x scale search."""

    def __init__(self, plates, size: int = 128, angles=(-10, -5, 0, 5, 10), scales=(0.9, 1.0, 1.1)):
        self.size = size
        self.variants = [(a, s) for a in angles for s in scales]
        self.plates = self._normalise(np.stack([prepare_input(p, size).ravel() for p in plates]))

    @staticmethod
    def _normalise(x: np.ndarray) -> np.ndarray:
        x = x - x.mean(axis=1, keepdims=True)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)

    def _variant(self, img: np.ndarray, angle: float, scale: float) -> np.ndarray:
        t = np.deg2rad(angle)
        mat = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]) / scale
        c = (np.array(img.shape) - 1) / 2
        return ndimage.affine_transform(img, mat, offset=c - mat @ c, order=1, cval=0.0)

    def scores(self, section) -> np.ndarray:
        img = prepare_input(section, self.size)
        views = np.stack([self._variant(img, a, s).ravel() for a, s in self.variants])
        return (self._normalise(views) @ self.plates.T).max(axis=0)

    def rank(self, section) -> list[int]:
        return [int(i) for i in np.argsort(-self.scores(section), kind="stable")]

    def ranking(self, section) -> list[tuple[int, float]]:
        """Every plate as ``(plate, 1 - best NCC)``, best first."""
        scores = self.scores(section)
        return [(int(i), float(1.0 - scores[i])) for i in np.argsort(-scores, kind="stable")]


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean Dice over the region values (> 0) present in ``truth``."""
    values = [v for v in np.unique(truth) if v > 0]
    out = []
    for v in values:
        a, b = pred == v, truth == v
        out.append(2.0 * (a & b).sum() / (a.sum() + b.sum()))
    return float(np.mean(out)) if out else float("nan")


def in_span(picked: int, plate_range) -> bool | None:
    """Whether the top plate ``picked`` lies within ``plate_range`` (``(first, last)``, both included: the
    plates the section's tissue spans, ``atlas_queries``' ``plate_range``); None without a range."""
    if plate_range is None:
        return None
    first, last = plate_range
    return bool(int(first) <= int(picked) <= int(last))


def summarise(rows: list[dict]) -> dict:
    ranks = np.array([r["rank"] for r in rows], dtype=float)
    err = np.array([abs(r["picked"] - r["plate"]) for r in rows], dtype=float)
    out = {"n": len(rows), "mean_rank": float(ranks.mean()), "mean_abs_plate_error": float(err.mean())}
    for k in TOPS:
        out[f"top{k}"] = float(100.0 * (ranks < k).mean())
    spans = [r["in_span"] for r in rows if r.get("in_span") is not None]
    # % of the sections that record a span (all of the benchmark's; None for the oracle's rows)
    out["in_span"] = float(100.0 * np.mean(spans)) if spans else None
    d = [r["dice"] for r in rows if r.get("dice") is not None]
    out["dice"] = float(np.mean(d)) if d else None
    return out


def load_average() -> float:
    return os.getloadavg()[0]


def make_queries(ref, labels, args) -> dict[str, list[dict]]:
    out = {}
    for i, case in enumerate(args.cases):
        seed = args.query_seed * 1000 + 101 + i
        out[case] = atlas_queries(
            ref,
            labels,
            args.per_case,
            seed=seed,
            compartments=args.compartments,
            partition_weight=args.partition_weight,
            **CASES[case],
        )
    return out


def rerank_method(name: str, base: dict, ref, labels, args) -> dict:
    """``base`` (a built ``ours`` or ``ncc`` method) with its shortlist re-ranked by the pose search."""
    from napari_nephi.engines.atlas.plates import Plates
    from napari_nephi.engines.atlas.rerank import PoseSearch, check_rerank_options

    options = check_rerank_options(args.rerank_options)
    t0 = time.perf_counter()
    # per section: whether stage 1 ran again with the dense_sweep plates, whether stage 2 refined
    # stage 1's best start alone (route_gap)
    flags: dict[str, list[bool]] = {"densified": [], "routed": [], "refined": []}

    def record(found) -> list[int]:
        for key, values in flags.items():
            values.append(bool(getattr(found, key, False)))  # False: a tree before the flag (frozen runs)
        return [p for p, _ in found.ranking]

    if name == "ours+rerank":
        lk = base["lk"]

        def rank(img):
            # lookup(img, top=None, rerank=True, rerank_options=options), keeping what the search did
            return record(lk.search_poses(img, options))

    else:
        search = PoseSearch(Plates.from_reference(ref, labels))
        ranker = base["ranker"]

        def rank(img):
            return record(search.search(img, ranker.ranking(img), options))

    out = dict(rank=rank, train_s=base["train_s"], lk=base["lk"], settings=dict(base["settings"] or {}))
    out.update(flags)
    out["settings"]["rerank_options"] = options
    out["load"] = max(base["load"], load_average())
    print(f"  {name}: ready in {time.perf_counter() - t0:.1f} s on top of {RERANKED[name]}", flush=True)
    return out


def train_method(name: str, ref, labels, train_secs, args) -> dict:
    """A trained ranker: dict(rank=function, train_s, lk=AtlasLookup or None, settings, load).

    With ``--index-dir``, a network index saved there by an earlier run is loaded instead of
    trained (its recorded training seconds are reported), and a newly trained one is saved.
    """
    t0, load0 = time.perf_counter(), load_average()
    if name == "ncc":
        ranker = NCCRanker([ref[i] for i in range(ref.shape[0])], size=args.ncc_size)
        out = dict(rank=ranker.rank, train_s=time.perf_counter() - t0, lk=None, settings=None, ranker=ranker)
    else:
        folder = None if args.index_dir is None else os.path.join(args.index_dir, name.replace("+", "_"))
        if folder is not None and os.path.isdir(folder):
            lk = AtlasLookup.load(folder, device="cpu")
            train_s = float(lk.settings["seconds"])
        else:
            sections = [q["image"] for q in train_secs]
            plates_of = [q["plate"] for q in train_secs]
            recipe = {
                "ours": dict(),
                "paper": dict(sections=sections, section_plates=plates_of, augment="paper"),
                "ours+sections": dict(sections=sections, section_plates=plates_of),
            }[name]
            opts = {} if args.steps is None else {"steps": args.steps}
            opts.update(json.loads(args.train_options))
            lk = AtlasLookup.train(ref, labels, device="cpu", seed=args.seed, **opts, **recipe)
            train_s = time.perf_counter() - t0
            if folder is not None:
                lk.save(folder)

        if args.first_stage is not None:
            lk.first_stage = args.first_stage
        lk.framing = args.framing == "on"

        def rank(img, lk=lk):
            return [p for p, _ in lk.lookup(img, top=None, rerank=False)]

        settings = {k: v for k, v in lk.settings.items() if k != "history"}
        settings["first_stage"] = lk.first_stage
        settings["framing"] = lk.framing
        out = dict(rank=rank, train_s=train_s, lk=lk, settings=settings)
    out["load"] = max(load0, load_average())
    print(f"  {name}: ready in {out['train_s']:.1f} s (load {out['load']:.1f})", flush=True)
    return out


def evaluate(name: str, m: dict, queries: dict) -> dict:
    """Rank every plate for every query; the true plate's rank and the top-1 pick."""
    rows, times, cpu = [], [], []
    for case, qs in queries.items():
        for j, q in enumerate(qs):
            t0, c0 = time.perf_counter(), time.process_time()
            order = m["rank"](q["image"])
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            span = q.get("plate_range")
            rows.append(
                dict(
                    case=case,
                    query=j,
                    plate=q["plate"],
                    picked=order[0],
                    rank=order.index(q["plate"]),
                    plate_range=None if span is None else [int(v) for v in span],
                    in_span=in_span(order[0], span),
                )
            )
    ms = 1000 * float(np.median(times[1:] if len(times) > 1 else times))
    cpu_ms = 1000 * float(np.median(cpu[1:] if len(cpu) > 1 else cpu))
    cpu_mean = 1000 * float(np.mean(cpu[1:] if len(cpu) > 1 else cpu))
    out = dict(
        rows=rows,
        ms_per_lookup=ms,
        cpu_ms_per_lookup=cpu_ms,
        cpu_ms_mean=cpu_mean,
        train_s=m["train_s"],
        load=m["load"],
        settings=m["settings"],
    )
    fired = ""
    for key, what in (
        ("densified", "dense_sweep fired"),
        ("routed", "routed"),
        ("refined", "sweep_refine fired"),
    ):
        if key in m:  # the pose search: each section's flag, and the share where it fired
            for row, flag in zip(rows, m[key], strict=True):
                row[key] = flag
            out[f"{key}_share"] = float(np.mean(m[key])) if rows else 0.0
            fired += f", {what} on {100 * out[f'{key}_share']:.0f} %"
    print(
        f"  {name}: looked up {len(rows)} sections, {ms:.1f} ms each (median; CPU {cpu_ms:.1f} ms, "
        f"mean {cpu_mean:.1f} ms{fired})",
        flush=True,
    )
    return out


def add_dice(results: dict, queries: dict, lk, args) -> None:
    """Register each method's top-1 plate (and the true plate: 'oracle') and score the labels."""
    flat = [(case, j, q) for case, qs in queries.items() for j, q in enumerate(qs)]
    cache: dict[tuple[int, int], float] = {}
    seconds = []

    def score(k: int, plate: int) -> float:
        if (k, plate) not in cache:
            t0 = time.perf_counter()
            reg = lk.register(flat[k][2]["image"], plate, method=args.register, device="cpu")
            seconds.append(time.perf_counter() - t0)
            if len(seconds) % 10 == 0:
                print(f"  registered {len(seconds)} pairs, last {seconds[-1]:.1f} s", flush=True)
            cache[(k, plate)] = dice(np.asarray(reg.metrics["labels"]), flat[k][2]["labels"])
        return cache[(k, plate)]

    oracle = []
    for k, (case, j, q) in enumerate(flat):
        oracle.append(
            dict(case=case, query=j, plate=q["plate"], picked=q["plate"], rank=0, dice=score(k, q["plate"]))
        )
    for name, res in results.items():
        if name in args.dice_methods:
            for k, row in enumerate(res["rows"]):
                row["dice"] = score(k, row["picked"])
    results["oracle"] = dict(rows=oracle, ms_per_lookup=None, train_s=None, load=None)
    mean_s = float(np.mean(seconds)) if seconds else 0.0
    print(f"  registered {len(seconds)} pairs, {mean_s:.2f} s each ({args.register})", flush=True)


def table(results: dict, cases: list[str]) -> str:
    head = (
        "| method | cases | n | mean rank | mean abs plate err | Top-1 | Top-3 | Top-5 | Top-10 | in span "
        "| Dice | train s | ms/lookup | CPU ms/lookup |"
    )
    lines = [head, "|" + "---|" * 14]
    for name, res in results.items():
        groups = [("all", res["rows"])] + [(c, [r for r in res["rows"] if r["case"] == c]) for c in cases]
        for g, rows in groups:
            s = summarise(rows)
            res.setdefault("summary", {})[g] = s
            dice_s = "" if s["dice"] is None else f"{s['dice']:.3f}"
            span = "" if s["in_span"] is None else f"{s['in_span']:.0f}"
            train = "" if g != "all" or res["train_s"] is None else f"{res['train_s']:.0f}"
            ms = "" if g != "all" or res["ms_per_lookup"] is None else f"{res['ms_per_lookup']:.1f}"
            cpu = (
                ""
                if g != "all" or res.get("cpu_ms_per_lookup") is None
                else f"{res['cpu_ms_per_lookup']:.1f}"
            )
            lines.append(
                f"| {name} | {g} | {s['n']} | {s['mean_rank']:.2f} | {s['mean_abs_plate_error']:.2f} | "
                + " | ".join(f"{s[f'top{k}']:.0f}" for k in TOPS)
                + f" | {span} | {dice_s} | {train} | {ms} | {cpu} |"
            )
    return "\n".join(lines)


def _share(text: str) -> float:
    """``--partition-weight``: a number in [0, 1], refused with argparse's message otherwise (review 2
    of session 36, C4: a value outside had failed with a traceback from inside ``atlas_queries``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="small atlas (66 plates), 4 queries per case, 150 steps"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="seed of the atlas, the training and the queries")
    p.add_argument("--query-seed", type=int, default=None, help="another seed for the queries only")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ",".join(CASES))
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ",".join(METHODS))
    p.add_argument("--per-case", type=int, default=12)
    p.add_argument("--train-sections", type=int, default=50)
    p.add_argument("--shape", default="132,96,112", help="phantom (z, y, x): z plates")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the engine's)")
    p.add_argument("--ncc-size", type=int, default=128)
    p.add_argument(
        "--train-options", default="{}", help="JSON training options (train.DEFAULTS) of new indexes"
    )
    p.add_argument("--register", default="nephi", help="registration method for Dice, or 'none'")
    p.add_argument("--dice-methods", default=",".join(METHODS), help="methods whose picks are registered")
    p.add_argument("--index-dir", default=None, help="save trained indexes here; load them when present")
    p.add_argument("--json", default=None, help="write the results here (after every method)")
    p.add_argument("--rerank-options", default="{}", help="JSON options of the re-ranking (rerank.DEFAULTS)")
    p.add_argument(
        "--compartments",
        choices=COMPARTMENTS,
        default="labels",
        help="what the queries' stain follows: the annotation's labels (default), foreign compartments "
        "(labels merged and split), an independent partition or a marker in a subset of the regions with a "
        "texture (the last two: fluorescence-like sections only)",
    )
    p.add_argument(
        "--partition-weight",
        type=_share,
        default=PARTITION_WEIGHT,
        help="with --compartments independent: the partition's share of the stain's level",
    )
    p.add_argument(
        "--first-stage", default=None, help="embedding, vote or vote+embedding (default: the index's own)"
    )
    p.add_argument(
        "--framing",
        choices=("on", "off"),
        default="on",
        help="AtlasLookup.framing: the embedding compares several framings of each section (default on)",
    )
    args = p.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    args.methods = [m for m in args.methods.split(",") if m]
    args.dice_methods = [m for m in args.dice_methods.split(",") if m]
    for c in args.cases:
        if c not in CASES:
            p.error(f"unknown case {c!r}; choose from {', '.join(CASES)}")
    for m in args.methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    args.shape = tuple(int(s) for s in args.shape.split(","))
    args.rerank_options = json.loads(args.rerank_options)
    args.query_seed = args.seed if args.query_seed is None else args.query_seed
    if args.quick:
        args.shape = (66, 64, 72) if args.shape == (132, 96, 112) else args.shape
        args.per_case = min(args.per_case, 4)
        args.train_sections = min(args.train_sections, 20)
        args.steps = 150 if args.steps is None else args.steps
    return args


def write_json(path, machine, args, queries, results, t0) -> None:
    out = dict(
        machine=machine,
        args={k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        cases={c: CASES[c] for c in args.cases},
        truth={c: [q["plate"] for q in qs] for c, qs in queries.items()},
        results=results,
        seconds=time.perf_counter() - t0,
    )
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(out, fh, indent=1, default=str)
    os.replace(tmp, path)


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    machine = dict(
        cpus=os.cpu_count(),
        threads=args.threads,
        gpu=torch.cuda.is_available(),
        python=platform.python_version(),
        torch=torch.__version__,
        numpy=np.__version__,
        processor=platform.processor() or platform.machine(),
        load_start=load_average(),
    )
    print(f"machine: {machine}", flush=True)
    print(f"command: {' '.join(sys.argv)}", flush=True)
    t0 = time.perf_counter()
    ref, labels = brain_phantom(args.shape, seed=args.seed)
    queries = make_queries(ref, labels, args)
    train_secs = atlas_queries(
        ref, labels, args.train_sections, seed=args.seed * 1000 + 999, **CASES["combined"]
    )
    print(f"atlas {ref.shape}, {sum(map(len, queries.values()))} queries ({time.perf_counter() - t0:.1f} s)")
    results, lks, built = {}, {}, {}
    for name in args.methods:
        if name in RERANKED:
            base = RERANKED[name]
            if base not in built:
                built[base] = train_method(base, ref, labels, train_secs, args)
            m = rerank_method(name, built[base], ref, labels, args)
        else:
            m = built.get(name) or train_method(name, ref, labels, train_secs, args)
            built[name] = m
            lks[name] = m["lk"]
        results[name] = evaluate(name, m, queries)
        print(table({name: results[name]}, args.cases), flush=True)
        if args.json:
            write_json(args.json, machine, args, queries, results, t0)
    if args.register != "none":
        lk = lks.get("ours") or next((v for v in lks.values() if v is not None), None)
        if lk is None:
            lk = AtlasLookup.train(ref, labels, device="cpu", seed=args.seed, steps=1)  # registration only
        add_dice(results, queries, lk, args)
    print(table(results, args.cases))
    machine["load_end"] = load_average()
    if args.json:
        write_json(args.json, machine, args, queries, results, t0)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
