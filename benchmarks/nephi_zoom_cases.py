# ruff: noqa: E501  (table-printing lines)
"""NePhi's volume default on the bundled MRI zoomed up: fair pairs, one case per process (session 39).

    python benchmarks/nephi_zoom_cases.py run CASE ARM ZOOM [--pairs DIR] [--out FILE.jsonl] [--cap N] [--cap2 N]
    python benchmarks/nephi_zoom_cases.py pair CASE ZOOM [--pairs DIR]          # build and cache the pair only
    python benchmarks/nephi_zoom_cases.py paired CASE ZOOM --cap2 N [--cap2-a M|none] [--order ABBA] [--pairs DIR] [--out F]
    python benchmarks/nephi_zoom_cases.py table BEFORE AFTER [--expect-before ARM] [--expect-after ARM] [--last]

The harness of sessions 37-38 (``/tmp/s37/B2/fairzoom.py``, ``/tmp/s38/B/zoomcase.py``, ``cmp.py``), committed.
The image is nibabel's MRI (25 x 41 x 33) zoomed ``ZOOM`` times by ``ndimage.zoom(order=3)`` (itself at 1;
``ZOOM`` may give one factor per axis, ``0.5x3x3`` (z y x), for thin or anisotropic volumes, rigid cases only);
every pair is fair: both images area means over 4-voxel blocks of one object (the image upsampled 4x by cubic
splines), the moving one after the map moved the object on the fine grid (``nephi_large.rigid_pair_area`` and
``deformation_pair_area``). CASE:

* ``shift``: the shift (1.25, -0.75, 0.5) voxels.
* ``drawS.I``: pair ``I`` of rigid draw ``S`` (``nephi_large.rigid_draw``, as ``--global-rigid-seed S``: shifts
  in +-2 voxels, not scaled by the zoom; rotations about the zoomed volume's centre).
* ``setS.A``: field set ``S`` at ``A`` voxels times the zoom, smoothness 7 x the zoom, seed ``S + 40 + int(A)``
  (as ``nephi_large.py --seeds S --mri-amplitudes A``; at zoom 1 the pair equals its ``make_case(..., "area")``);
  the fine grid is warped in slabs of 4 voxels (:func:`deformation_pair_slabs`, the same values).

ARM: ``def`` (no options: the code's default), ``r0`` (R0 forced: ``coarse_warp_blur="all",
coarse_reg_weight=0.03, iterations=0``) or ``old`` (the earlier volume default: ``coarse_warp_blur=False,
coarse_reg_weight=0.1, iterations=50``) or ``r0s`` (R0's coarse stage with the preset's 50 neural steps:
``coarse_warp_blur="all", coarse_reg_weight=0.03, iterations=50``; session 40, the candidate above 2^20). ``--cap
N`` sets ``engine.VOLUME_DEFAULT_MAX_VOXELS`` to ``N`` in the process first (the default with another cap;
recorded as ``cap``); ``--cap2 N`` sets ``engine.VOLUME_DEFAULT_STEPS_MAX_VOXELS`` (the second cap, session 40:
over the first cap and up to it, R0's coarse stage with the neural steps; recorded as ``cap2``).

``paired CASE ZOOM --cap2 N [--cap2-a M|none]`` (session 40) times the default without (A: the second cap as the
code has it, or ``--cap2-a``) and with (B: ``--cap2 N``) the second cap in one process, alternating in ``--order`` (default ABBA), on one cached
pair: CPU seconds of each run, the ratio of B's mean to A's, each run's settings and displacement hash (the
same arm twice must hash the same: ``hashes_agree``, else exit status 1 after the row is written). CPU only: a
process's resident peak is not reset between runs.

Pairs are cached as ``CASE_zZOOM.npz`` in ``--pairs`` (default ``$NEPHI_ZOOM_PAIRS``, else
``/tmp/nephi_zoom_pairs``): build them once (``pair``), then run the arms on the same arrays. NePhi runs on the
CPU with one torch thread, through ``nephi_accuracy.run_nephi`` and ``timed`` (CPU seconds of this process during
the call, peak resident MiB above the level before it). One JSON line per run, printed and appended to ``--out``:
EPE (voxels) on tissue (``nephi_accuracy.tissue_mask``; on field cases textured and textureless besides;
``epe_inside``: 8 voxels inside the border), det J 8 voxels inside (min, max, largest ``|det J - 1|``), the
engine's inverse consistency ``|phi_inv(phi(x)) - x|`` (``metrics["inverse_consistency_max"]``, as sessions 37-38
reported it; ``ic_max_inside``: 8 voxels inside), folds (% of voxels with det J <= 0), the settings the engine
recorded, a hash of the displacement, the 1-minute load at the start, and the code: ``head``, ``dirty``
(``git status --porcelain -- benchmarks src`` not empty) at the start, ``package`` (the imported
``napari_nephi``'s folder); ``head`` and ``dirty`` read "unknown" outside a repository or where the imported
package is not under it.

``table BEFORE AFTER`` (files of JSON lines, or folders of ``*.jsonl``) pairs the rows by case and zoom and applies
B's marks (session 38): EPE not worse by more than 0.003; textureless not worse by more than 0.005 (field cases);
largest ``|det J - 1|`` not above before + 0.01 (rigid cases); folds 0; CPU at most 1.3x; peak at most 1.3x or
+50 MiB. The CPU mark compares two unpaired single runs (one process each, at the load shown beside
it), not a paired timing: it catches a gross cost, not a few percent. ``--expect-before old --expect-after r0``
(the session 39 reading) marks a row whose recorded settings are not that arm's options "**wrong arm**"
(``def``, the default, checks nothing). A case (case, zoom) given twice in BEFORE or in AFTER is listed and
refused (exit status 2) unless ``--last`` (then its last row counts). Run from anywhere with ``OMP_NUM_THREADS=1 nice -n 5``; a 2.9x case costs about 2 CPU minutes an arm.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from pathlib import Path

import _code_state
import nephi_accuracy as NA  # (sets ITK's thread count before anything imports it)
import nephi_large as NL
import numpy as np
from scipy import ndimage

#: Options of each arm (``def``: none, the code's default).
ARMS = {
    "def": {},
    "r0": {"coarse_warp_blur": "all", "coarse_reg_weight": 0.03, "iterations": 0},
    "old": {"coarse_warp_blur": False, "coarse_reg_weight": 0.1, "iterations": 50},
    "r0s": {"coarse_warp_blur": "all", "coarse_reg_weight": 0.03, "iterations": 50},
}
#: Settings ``paired`` records of each run.
PAIRED_KEYS = ("iterations", "coarse_warp_blur", "coarse_reg_weight")
#: Voxels inside the border where det J is read (and ``epe_inside``, ``ic_max_inside``).
MARGIN = 8


def margin_for(shape) -> int:
    """:data:`MARGIN`, or on a volume with an axis of at most ``2 * MARGIN + 4`` voxels (thin volumes, session 40)
    a quarter of its shortest axis (at least 1): 8 voxels inside would leave nothing of 12 slices."""
    short = min(int(n) for n in shape)
    return MARGIN if short > 2 * MARGIN + 4 else max(1, short // 4)


SHIFT = (1.25, -0.75, 0.5)
#: B's marks (sessions 37-38): EPE, textureless EPE (fields), largest |det J - 1| (rigid), CPU ratio, peak.
MARKS = {"epe": 0.003, "textureless": 0.005, "det": 0.01, "cpu": 1.3, "peak_ratio": 1.3, "peak_mib": 50.0}
#: Fine voxels per slab of the deformation pair's fine grid: a multiple of the area factor.
SLAB = 4 * NL.AREA_FACTOR
#: The package files ``code_sha`` hashes, in this order (:func:`code_state`).
CODE = ("engines/nephi/*.py", "core/*.py")
#: Settings copied into the JSON line (the volume default's switches and what decides them).
SETTING_KEYS = (
    "preset",
    "mode",
    "iterations",
    "coarse_warp_blur",
    "coarse_reg_weight",
    "coarse_volume_sampling",
)


def parse_zoom(text: str) -> float | str:
    """``"3.3"`` -> 3.3 (every axis); ``"0.5x3x3"`` -> ``"0.5x3x3"`` (one factor per axis, z y x: thin or
    anisotropic volumes, session 40; rigid cases only)."""
    parts = str(text).split("x")
    try:
        values = [float(v) for v in parts]
    except ValueError:
        raise SystemExit(f"zoom {text!r}: a number (3.3) or one per axis (0.5x3x3)") from None
    if len(values) not in (1, 3) or min(values) <= 0:
        raise SystemExit(f"zoom {text!r}: a positive number (3.3) or three (0.5x3x3)")
    return values[0] if len(values) == 1 else "x".join(f"{v:g}" for v in values)


def zoom_label(zoom: float | str) -> str:
    return zoom if isinstance(zoom, str) else f"{zoom:g}"


def zoom_factors(zoom: float | str) -> float | tuple[float, ...]:
    return tuple(float(v) for v in zoom.split("x")) if isinstance(zoom, str) else float(zoom)


def zoomed_mri(zoom: float | str) -> np.ndarray:
    from napari_nephi.synthetic import mri_volume

    img = mri_volume()[0]
    factors = zoom_factors(zoom)
    return img if factors == 1 else ndimage.zoom(img, factors, order=3)


def parse_case(case: str) -> tuple[str, int, float]:
    """``(kind, seed, index or amplitude)``: ``("shift", 0, 0)``, ``("draw", S, I)`` or ``("set", S, A)``."""
    if case == "shift":
        return "shift", 0, 0.0
    m = re.fullmatch(r"(draw|set)(\d+)\.(\d+(?:\.\d+)?)", case)
    if not m or (m[1] == "draw" and "." in m[3]):
        raise SystemExit(
            f"{case!r}: a case is shift, drawS.I (rigid draw S, pair I) or setS.A (field set S, A voxels)"
        )
    return m[1], int(m[2]), float(m[3])


def _spline_coefficients(img: np.ndarray) -> np.ndarray:
    """What ``map_coordinates(img, ..., order=3, mode="nearest")`` interpolates: ``img`` padded by 12 edge voxels
    and spline-filtered (scipy's prefilter); read with coordinates + 12 and ``prefilter=False``."""
    return ndimage.spline_filter(np.pad(img, 12, mode="edge"), 3, output=np.float64, mode="nearest")


def deformation_pair_slabs(
    img: np.ndarray, u_inv: np.ndarray, factor: int = NL.AREA_FACTOR, slab: int = SLAB
):
    """``nephi_large.deformation_pair_area`` with the fine grid warped ``slab`` fine voxels of the first axis at a
    time (the same values; the whole fine grid's coordinates would take 12 GiB at 3x the MRI)."""
    if slab % factor:
        raise ValueError(f"slab {slab} is not a multiple of the area factor {factor}")
    d = img.ndim
    fine = NL.fine_object(img, factor)
    fshape = fine.shape
    coef = _spline_coefficients(fine)
    ucoef = [_spline_coefficients(np.asarray(u_inv[i], np.float64)) for i in range(d)]
    out = []
    for a in range(0, fshape[0], slab):
        rows = np.arange(a, min(a + slab, fshape[0]), dtype=np.float64)
        fgrid = np.stack(
            np.meshgrid(rows, *[np.arange(n, dtype=np.float64) for n in fshape[1:]], indexing="ij")
        )
        pts = (fgrid - (factor - 1) / 2) / factor + 12
        uf = np.stack(
            [ndimage.map_coordinates(c, pts, order=3, mode="nearest", prefilter=False) for c in ucoef]
        )
        del pts
        moved = ndimage.map_coordinates(
            coef, fgrid + factor * uf + 12, order=3, mode="nearest", prefilter=False
        )
        out.append(NL.area_down(moved, factor))
    return NL.area_down(fine, factor), np.ascontiguousarray(np.concatenate(out), np.float32)


def build_pair(case: str, zoom: float) -> dict:
    """The fair pair of ``case`` on the MRI zoomed ``zoom`` times, with its truth and (field cases) masks."""
    from napari_nephi.core.jacobian import jacobian_determinant
    from napari_nephi.core.transform import AffineTransform
    from napari_nephi.synthetic import random_smooth_displacement

    kind, seed, k = parse_case(case)
    if kind == "set" and isinstance(zoom, str):
        raise SystemExit(
            f"{case}: field sets scale with one zoom; {zoom!r} zooms the axes apart (rigid cases only)"
        )
    img = zoomed_mri(zoom)
    if kind == "set":
        u, u_inv = random_smooth_displacement(
            img.shape,
            k * zoom,
            NL.MRI_SMOOTHNESS * zoom,
            seed=seed + 10 * NL.CASE_OFFSETS["mri"] + int(k),
            return_inverse=True,
        )
        assert np.all(jacobian_determinant(u) > 0)
        fixed, moving = deformation_pair_slabs(img, u_inv)
        mask = NA.tissue_mask(fixed, False)
        flat = NL.textureless_mask(fixed) & mask
        what = f"field set {seed} at {k:g} x {zoom:g} voxels, smoothness {NL.MRI_SMOOTHNESS * zoom:.1f}"
        return dict(
            fixed=fixed, moving=moving, truth=np.asarray(u, np.float32), mask=mask, flat=flat, what=what
        )
    if kind == "shift":
        mat = np.eye(4)
        mat[:3, 3] = SHIFT
        what = f"shift ({', '.join(f'{t:g}' for t in SHIFT)})"
    else:
        mat, what = NL.rigid_draw(seed, "mri", int(k), img.shape)
        what = f"draw {seed}.{int(k)}: {what}"
    fixed, moving = NL.rigid_pair_area(img, mat)
    truth = np.asarray(AffineTransform(mat).displacement(fixed.shape), np.float32)
    return dict(fixed=fixed, moving=moving, truth=truth, what=what)


def pairs_dir(option: str | None) -> Path:
    return Path(option or os.environ.get("NEPHI_ZOOM_PAIRS") or "/tmp/nephi_zoom_pairs")


def load_pair(case: str, zoom: float, folder: Path) -> dict:
    """The cached pair (built and written atomically first if missing)."""
    path = folder / f"{case}_z{zoom_label(zoom)}.npz"
    if not path.exists():
        pair = build_pair(case, zoom)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **pair)
        os.replace(tmp, path)
    with np.load(path) as f:
        return {k: (f[k].item() if f[k].ndim == 0 else f[k]) for k in f.files}


def evaluate(est: np.ndarray, pair: dict) -> dict:
    """EPE on tissue (textured and textureless besides on field cases; ``epe_inside``: 8 voxels inside the
    border), det J 8 voxels inside, folds (% of all voxels)."""
    from napari_nephi.core.jacobian import jacobian_determinant

    truth = pair["truth"]
    err = np.sqrt(((est - truth) ** 2).sum(0))
    det = jacobian_determinant(est)
    sl = NL.inner(est.shape[1:], margin_for(est.shape[1:]))
    mask = pair["mask"] if "mask" in pair else NA.tissue_mask(pair["fixed"], False)
    row = {"folds_pct": 100.0 * float((det <= 0).mean()), "epe": float(err[mask].mean())}
    if "flat" in pair:
        flat = pair["flat"]
        row["epe_textured"] = float(err[mask & ~flat].mean())
        row["epe_textureless"] = float(err[flat].mean()) if flat.any() else float("nan")
    row["epe_inside"] = float(err[sl].mean())
    inner = det[sl]
    row.update(det_min=float(inner.min()), det_max=float(inner.max()), det_dev=float(np.abs(inner - 1).max()))
    return row


def code_state(here: Path | None = None, package: Path | None = None) -> dict:
    """Which code a run measures: ``head`` (short hash) and ``dirty`` (``git status --porcelain -- benchmarks
    src`` not empty) of the repository holding ``here`` (this script's folder), and ``package``, the imported
    ``napari_nephi``'s folder. ``head`` and ``dirty`` are ``"unknown"`` outside a repository or where the
    package is not under the repository (an installed copy: the hash would not name the code that ran).
    Besides (session 40, review 1): ``code_sha``, a hash of the package's ``engines/nephi/*.py`` and
    ``core/*.py`` as they are on disk at the start, and ``harness_sha``, of this script: in a shared checkout
    ``dirty`` is always True, and two rows with the same ``code_sha`` ran the same engine code
    (:func:`_code_state.package_state`, since session 41; the same values)."""
    if package is None:
        import napari_nephi

        package = Path(napari_nephi.__file__).parent
    return _code_state.package_state(__file__, here or Path(__file__).parent, package, CODE)


def run(case: str, arm: str, zoom: float, folder: Path, cap: int | None, cap2: int | None = None) -> dict:
    import torch

    from napari_nephi.engines.nephi import engine

    state = code_state()  # at the start: the code that runs
    torch.set_num_threads(1)
    if cap is not None:
        engine.VOLUME_DEFAULT_MAX_VOXELS = cap
    if cap2 is not None:
        engine.VOLUME_DEFAULT_STEPS_MAX_VOXELS = cap2
    pair = load_pair(case, zoom, folder)
    fixed, moving = pair["fixed"], pair["moving"]
    load0 = os.getloadavg()[0]
    (est, reg), wall, cpu, mib = NA.timed(lambda f, m: NA.run_nephi(f, m, **ARMS[arm]), fixed, moving)
    row = dict(
        case=case, arm=arm, zoom=zoom, what=pair["what"], shape=list(fixed.shape), voxels=int(fixed.size)
    )
    row.update(evaluate(est, pair))
    ic = NL.inverse_consistency_inside(reg.transform, fixed.shape, margin_for(fixed.shape))
    row.update(
        ic_mean=reg.metrics.get("inverse_consistency_mean"), ic_max=reg.metrics.get("inverse_consistency_max")
    )
    row.update(ic_mean_inside=ic[0], ic_max_inside=ic[1], engine_fold_pct=reg.metrics.get("fold_percent"))
    row["margin"] = margin_for(fixed.shape)
    row.update(cpu_s=cpu, wall_s=wall, peak_mib=mib, load=load0, options=ARMS[arm], **state)
    row.update(cap=int(engine.VOLUME_DEFAULT_MAX_VOXELS), cap_set=cap is not None)
    row.update(cap2=getattr(engine, "VOLUME_DEFAULT_STEPS_MAX_VOXELS", None), cap2_set=cap2 is not None)
    row["settings"] = {k: reg.settings.get(k) for k in SETTING_KEYS}
    row["displacement_sha"] = hashlib.sha256(np.ascontiguousarray(est).tobytes()).hexdigest()[:16]
    return row


def paired(
    case: str, zoom: float, folder: Path, cap2: int, order: str = "ABBA", cap2_a: int | None | str = "code"
) -> dict:
    """CPU seconds of the default without (A) and with (B) ``engine.VOLUME_DEFAULT_STEPS_MAX_VOXELS = cap2``,
    the runs alternating in ``order`` in this process on one cached pair (a paired timing)."""
    import torch

    from napari_nephi.engines.nephi import engine

    if not order or set(order) - {"A", "B"}:
        raise SystemExit(f"--order {order!r}: a string of A and B (e.g. ABBA)")
    state = code_state()
    torch.set_num_threads(1)
    pair = load_pair(case, zoom, folder)
    base = engine.VOLUME_DEFAULT_STEPS_MAX_VOXELS
    arm_a = base if cap2_a == "code" else cap2_a
    runs = []
    try:
        for arm in order:
            engine.VOLUME_DEFAULT_STEPS_MAX_VOXELS = cap2 if arm == "B" else arm_a
            load0 = os.getloadavg()[0]
            (est, reg), wall, cpu, _ = NA.timed(
                lambda f, m: NA.run_nephi(f, m), pair["fixed"], pair["moving"]
            )
            runs.append(
                dict(
                    arm=arm,
                    cpu_s=cpu,
                    wall_s=wall,
                    load=load0,
                    settings={k: reg.settings.get(k) for k in PAIRED_KEYS},
                    displacement_sha=hashlib.sha256(np.ascontiguousarray(est).tobytes()).hexdigest()[:16],
                )
            )
    finally:
        engine.VOLUME_DEFAULT_STEPS_MAX_VOXELS = base
    cpu = {a: sum(r["cpu_s"] for r in runs if r["arm"] == a) for a in "AB"}
    hashes = {a: {r["displacement_sha"] for r in runs if r["arm"] == a} for a in "AB"}
    ratio = cpu["B"] / cpu["A"] if cpu["A"] and cpu["B"] else None
    n = {a: sum(r["arm"] == a for r in runs) for a in "AB"}
    if ratio is not None:
        ratio *= n["A"] / n["B"]  # per run
    return dict(
        case=case,
        zoom=zoom,
        what=pair["what"],
        order=order,
        cap2=cap2,
        base_cap2=base,
        cap2_a=arm_a,
        runs=runs,
        cpu_ratio_b_over_a=ratio,
        hashes_agree={a: len(hashes[a]) <= 1 for a in "AB"},
        **state,
    )


# --------------------------------------------------------------------------------------------
# the table (pure: tested in tests/nephi/test_nephi_zoom_cases.py)


def marks(before: dict, after: dict) -> dict[str, bool]:
    """B's marks on one case: which pass (``textureless`` only on field rows, ``det`` only on rigid ones)."""
    out = {"epe": after["epe"] <= before["epe"] + MARKS["epe"]}
    if "epe_textureless" in before:
        out["textureless"] = after["epe_textureless"] <= before["epe_textureless"] + MARKS["textureless"]
    else:
        out["det"] = after["det_dev"] <= before["det_dev"] + MARKS["det"]
    out["folds"] = after["folds_pct"] == 0
    out["cpu"] = after["cpu_s"] <= MARKS["cpu"] * before["cpu_s"]
    out["peak"] = (
        after["peak_mib"] <= MARKS["peak_ratio"] * before["peak_mib"]
        or after["peak_mib"] <= before["peak_mib"] + MARKS["peak_mib"]
    )
    return out


def read_rows(source: str) -> list[dict]:
    path = Path(source)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]


def wrong_arm(row: dict, arm: str) -> str | None:
    """Where ``row``'s recorded settings are not arm ``arm``'s options (``r0``, ``old``), a note naming them;
    None where they are, and always for ``def`` (whatever the default records: nothing to check)."""
    want = ARMS[arm]
    got = {k: row.get("settings", {}).get(k) for k in want}
    if got == want:
        return None
    return "/".join(str(got[k]) for k in want) + f", not {arm}"


def by_case(rows: list[dict], last: bool = False) -> tuple[dict, list]:
    """Rows keyed by (case, zoom), and the keys seen more than once (with ``last``, the last row of each)."""
    out: dict = {}
    seen_twice = []
    for r in rows:
        key = (r["case"], r["zoom"])
        if key in out and key not in seen_twice:
            seen_twice.append(key)
        out[key] = r
    return out, seen_twice


def _load(row: dict) -> str:
    return f"{row['load']:.1f}" if isinstance(row.get("load"), (int, float)) else "?"


def table(
    before_rows: list[dict],
    after_rows: list[dict],
    expect_before: str = "def",
    expect_after: str = "def",
    last: bool = False,
) -> list[str]:
    """Markdown lines: one row per (case, zoom) found in both, marks applied; a row whose recorded settings
    are not the expected arm's (``expect_before``, ``expect_after``: ``r0`` or ``old``) reads "**wrong
    arm**". A (case, zoom) given twice in one side raises ``ValueError`` naming them, unless ``last`` (then
    the last row of each counts). Load: the 1-minute load average at each run's start (the CPU mark compares
    two unpaired single runs)."""
    before, twice_b = by_case(before_rows)
    after, twice_a = by_case(after_rows)
    if (twice_b or twice_a) and not last:
        names = [
            f"{side} {c} at {zoom_label(z)}x"
            for side, keys in (("before", twice_b), ("after", twice_a))
            for c, z in keys
        ]
        raise ValueError(f"cases given more than once ({', '.join(names)}): keep one, or pass --last")
    lines = [
        "| zoom (voxels) | case | EPE | det J (8 inside), largest abs(det J - 1) | IC max | CPU s (unpaired) | load b / a | peak MiB | marks |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(
        set(before) & set(after),
        key=lambda k: (isinstance(k[1], str), str(k[1]) if isinstance(k[1], str) else k[1], k[0]),
    ):
        b, a = before[key], after[key]
        m = marks(b, a)
        epe = f"{b['epe']:.4f} -> {a['epe']:.4f}"
        if "epe_textureless" in b:
            epe += f" (textureless {b['epe_textureless']:.4f} -> {a['epe_textureless']:.4f})"
        det = (
            f"{b['det_min']:.3f}-{b['det_max']:.3f} -> {a['det_min']:.3f}-{a['det_max']:.3f} "
            f"({b['det_dev']:.3f} -> {a['det_dev']:.3f})"
        )
        cpu = f"{b['cpu_s']:.1f} -> {a['cpu_s']:.1f} ({a['cpu_s'] / b['cpu_s']:.2f}x)"
        peak = f"{b['peak_mib']:.0f} -> {a['peak_mib']:.0f} ({a['peak_mib'] / b['peak_mib']:.2f}x, {a['peak_mib'] - b['peak_mib']:+.0f})"
        failed = [k for k, ok in m.items() if not ok]
        verdict = "pass" if not failed else "**fails " + ", ".join(failed) + "**"
        wrong = [
            f"{side} reads {note}"
            for side, row, arm in (("before", b, expect_before), ("after", a, expect_after))
            if (note := wrong_arm(row, arm))
        ]
        if wrong:
            verdict = "**wrong arm** (" + "; ".join(wrong) + "); " + verdict
        lines.append(
            f"| {zoom_label(key[1])}x ({a['voxels']:,}) | {a['what']} | {epe} | {det} | {b['ic_max']:.3f} -> {a['ic_max']:.3f} "
            f"| {cpu} | {_load(b)} / {_load(a)} | {peak} | {verdict} |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("case")
    r.add_argument("arm", choices=sorted(ARMS))
    r.add_argument("zoom", type=parse_zoom)
    r.add_argument("--pairs")
    r.add_argument("--out")
    r.add_argument("--cap", type=int, help="engine.VOLUME_DEFAULT_MAX_VOXELS for this run")
    r.add_argument("--cap2", type=int, help="engine.VOLUME_DEFAULT_STEPS_MAX_VOXELS for this run")
    q = sub.add_parser("paired")
    q.add_argument("case")
    q.add_argument("zoom", type=parse_zoom)
    q.add_argument("--cap2", type=int, required=True, help="engine.VOLUME_DEFAULT_STEPS_MAX_VOXELS of arm B")
    q.add_argument("--order", default="ABBA")
    q.add_argument(
        "--cap2-a",
        type=lambda v: None if v.lower() == "none" else int(v),
        default="code",
        help="arm A's second cap (none: no band; default: the code's)",
    )
    q.add_argument("--pairs")
    q.add_argument("--out")
    b = sub.add_parser("pair")
    b.add_argument("case")
    b.add_argument("zoom", type=parse_zoom)
    b.add_argument("--pairs")
    t = sub.add_parser("table")
    t.add_argument("before")
    t.add_argument("after")
    t.add_argument(
        "--expect-before", choices=sorted(ARMS), default="def", help="the arm before's rows must read"
    )
    t.add_argument(
        "--expect-after", choices=sorted(ARMS), default="def", help="the arm after's rows must read"
    )
    t.add_argument("--last", action="store_true", help="a case given twice: keep its last row")
    args = p.parse_args()
    if args.command == "table":
        try:
            lines = table(
                read_rows(args.before),
                read_rows(args.after),
                args.expect_before,
                args.expect_after,
                args.last,
            )
        except ValueError as e:
            print(f"table: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        print("\n".join(lines))
        return
    parse_case(args.case)
    if args.command == "pair":
        pair = load_pair(args.case, args.zoom, pairs_dir(args.pairs))
        print(f"{args.case} at {zoom_label(args.zoom)}x: {pair['what']}, shape {pair['fixed'].shape}")
        return
    if args.command == "paired":
        row = paired(args.case, args.zoom, pairs_dir(args.pairs), args.cap2, args.order, args.cap2_a)
    else:
        row = run(args.case, args.arm, args.zoom, pairs_dir(args.pairs), args.cap, args.cap2)
    line = json.dumps(row, default=str)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(line + "\n")
    if args.command == "paired" and not all(row["hashes_agree"].values()):
        print("paired: one arm's runs hash differently (not deterministic?)", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
