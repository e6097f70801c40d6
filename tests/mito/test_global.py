"""Multi-neighbour matching and the global solve of MITO (engines/mito/solve.py)."""

import argparse
import json

import numpy as np
import pytest

from napari_nephi.cli.em import _align_options, add_parser
from napari_nephi.core.errors import InputError
from napari_nephi.engines.mito import align_stack
from napari_nephi.engines.mito.solve import Edge, nearest_rotation, solve_global
from napari_nephi.io import write_tiff
from napari_nephi.synthetic import rotation_matrix

SHAPE = (200, 200)


def _noisy_chain(n: int, k: int, seed: int, noise: float = 0.3):
    """True pull-back maps of ``n`` sections rotated about their centre, and the pairwise maps
    (a -> a + d, d = 1..k), each off by an independent random shift of ``noise`` px per axis."""
    rng = np.random.default_rng(seed)
    true = np.stack([rotation_matrix(a, SHAPE) for a in rng.uniform(-np.pi, np.pi, n)])
    true = true @ np.linalg.inv(true[0])
    edges = []
    for a in range(n):
        for b in range(a + 1, min(n, a + k + 1)):
            shift = np.eye(3)
            shift[:2, 2] = rng.normal(0.0, noise, 2)
            edges.append(Edge(a, b, shift @ true[b] @ np.linalg.inv(true[a])))
    return true, edges


def _centre_error(m, true) -> float:
    c = np.array([(SHAPE[0] - 1) / 2, (SHAPE[1] - 1) / 2, 1.0])
    return float(np.linalg.norm((m @ c)[:, :2] - (true @ c)[:, :2], axis=1).mean())


@pytest.mark.parametrize("model", ["affine", "similarity", "rigid"])
def test_exact_pairs_give_the_exact_placement(model):
    true, edges = _noisy_chain(12, 3, seed=1, noise=0.0)
    m, info = solve_global(12, edges, 0, SHAPE, model)
    np.testing.assert_allclose(m, true, atol=1e-5)
    assert info["residuals"].max() < 1e-5 and info["unconstrained"] == []


@pytest.mark.parametrize(
    ("k", "model", "prior", "share", "growth"),
    [(3, "rigid", 0.0, 0.5, 0.4), (2, "affine", 0.1, 0.6, 0.5)],  # session 13's k = 3; the default
)
def test_global_error_grows_more_slowly_with_stack_length_than_the_chain(k, model, prior, share, growth):
    """Independent pair errors of 0.3 px: chaining (k = 1) adds them up like a random walk
    (mean error at the section centres 0.64 / 1.21 / 2.14 px at 8 / 24 / 72 sections, about
    sqrt(n)); k neighbours per section and the global solve average them (k = 2 with the default
    affine sections and prior: 0.36 / 0.61 / 0.90; k = 3 rigid: 0.27 / 0.41 / 0.71). Mean over 20
    stacks; stated bounds: global(24) / global(8) below chain(24) / chain(8), the global error at
    24 sections under ``share`` of the chained one, and its growth from 8 to 24 sections under
    ``growth`` of the chain's."""
    err = {}
    for kk, mod, pr in ((1, "rigid", 0.0), (k, model, prior)):
        for n in (8, 24):
            runs = []
            for seed in range(20):
                true, edges = _noisy_chain(n, kk, seed)
                runs.append(_centre_error(solve_global(n, edges, 0, SHAPE, mod, drift_prior=pr)[0], true))
            err[kk, n] = np.mean(runs)
    assert err[k, 24] / err[k, 8] < err[1, 24] / err[1, 8]
    assert err[k, 24] < share * err[1, 24]
    assert err[k, 24] - err[k, 8] < growth * (err[1, 24] - err[1, 8])


def test_an_outlier_pair_is_downweighted():
    true, edges = _noisy_chain(10, 3, seed=2, noise=0.0)
    bad = np.eye(3)
    bad[:2, 2] = (25.0, -30.0)
    edges[4] = Edge(edges[4].a, edges[4].b, bad @ edges[4].matrix)
    m, info = solve_global(10, edges, 0, SHAPE, "affine", huber=3.0)
    assert _centre_error(m, true) < 0.5
    assert info["weights"][4] < 0.2 and np.all(np.delete(info["weights"], 4) > 0.5)


def test_drift_prior_holds_back_accumulated_scale():
    """Every pair map shrinks by 1 %: the chain of affine maps accumulates it; the prior keeps
    each section near a rotation."""
    true, edges = _noisy_chain(16, 2, seed=3, noise=0.0)
    shrink = np.diag([0.99, 0.99, 1.0])
    edges = [Edge(e.a, e.b, shrink @ e.matrix) for e in edges]
    free, _ = solve_global(16, edges, 0, SHAPE, "affine")
    held, _ = solve_global(16, edges, 0, SHAPE, "affine", drift_prior=1.0)

    def scale_error(m):
        return max(abs(np.linalg.svd(x[:2, :2], compute_uv=False) - 1).max() for x in m)

    assert scale_error(free) > 0.05
    assert scale_error(held) < 0.25 * scale_error(free)
    r = nearest_rotation(np.array([[1.2, 0.1], [-0.1, 0.9]]))
    np.testing.assert_allclose(r @ r.T, np.eye(2), atol=1e-12)


def test_align_stack_global_recovers_known_rotations(rotated_copies, max_error):
    """Identical sections rotated by known angles, three neighbours each, global rigid solve."""
    d = rotated_copies
    reg = align_stack(d["stack"], d["masks"], neighbours=3, global_model="rigid", warp=False, workers=2)
    err = max_error(reg.transform.matrices, d["matrices"], 0, d["stack"].shape[1:], d["pad"])
    assert err.max() < 0.5, err
    m = reg.metrics
    assert m["solver"]["pairs"] == 4 + 3 + 2 and m["solver"]["failed_pairs"] == 0
    rows = m["report"]
    assert [p["neighbour"] for p in rows[4]["pairs"]] == [3, 2, 1]
    assert all(p["inliers"] >= 10 and p["residual"] < 0.5 for r in rows[1:] for p in r["pairs"])
    assert reg.settings["solver"] == "global" and reg.settings["neighbours"] == 3
    # pairs two and three apart start from the composed neighbour maps and are only tracked
    far = [p for r in rows[1:] for p in r["pairs"] if abs(p["neighbour"] - r["section"]) > 1]
    assert len(far) == 2 + 1 + 2 and all(p["guided"] for p in far)
    assert reg.settings["guided_pairs"] is True
    # guided_pairs=False: every further pair matched in full, the same placement
    full = align_stack(d["stack"], d["masks"], neighbours=3, warp=False, workers=2, guided_pairs=False)
    far = [
        p for r in full.metrics["report"][1:] for p in r["pairs"] if abs(p["neighbour"] - r["section"]) > 1
    ]
    assert len(far) == 5 and not any(p["guided"] for p in far) and full.settings["guided_pairs"] is False
    assert max_error(full.transform.matrices, d["matrices"], 0, d["stack"].shape[1:], d["pad"]).max() < 0.5
    # the defaults (2 neighbours, affine sections, drift prior 0.1) recover them as well
    default = align_stack(d["stack"], d["masks"], warp=False, workers=2)
    assert (default.settings["neighbours"], default.settings["global_model"]) == (2, "affine")
    err = max_error(default.transform.matrices, d["matrices"], 0, d["stack"].shape[1:], d["pad"])
    assert err.max() < 0.5 and default.metrics["solver"]["pairs"] == 4 + 3, err


def test_a_blank_section_is_reported_and_the_others_aligned(rotated_copies, max_error):
    d = rotated_copies
    stack = d["stack"].copy()
    stack[2] = 0
    reg = align_stack(stack, d["masks"], neighbours=2, warp=False, workers=2)
    rows = reg.metrics["report"]
    assert rows[2]["failed"] and rows[2]["fallback"] == "identity"
    assert 2 in reg.metrics["failed_sections"] and 2 in reg.metrics["solver"]["unconstrained_sections"]
    err = max_error(reg.transform.matrices, d["matrices"], 0, stack.shape[1:], d["pad"])
    assert np.delete(err, 2).max() < 0.5, err
    # the blank section gets its neighbour's placement (the chain's identity fallback)
    np.testing.assert_allclose(reg.transform.matrices[2], reg.transform.matrices[1], atol=1e-6)
    # the chain's own pair of 3 skips the blank section to 1: no extra pair 1 -> 3 repeats it
    (across,) = [p for p in rows[3]["pairs"] if p["neighbour"] == 1]
    assert "guided" not in across  # the chain's pair, not an extra one
    assert across["inliers"] >= 10 and across["residual"] < 0.5


def test_a_further_pair_starts_from_the_chain_only_through_real_matches():
    from concurrent.futures import Future

    from napari_nephi.engines.mito.align import _composed, _PairResult

    def done(section, source, matrix, fallback=""):
        f = Future()
        f.set_result(_PairResult(section, source, matrix, {"fallback": fallback}))
        return f

    m43, m32 = _shift(1.0, 2.0), _shift(-0.5, 3.0)
    chain = {4: done(4, 3, m43), 3: done(3, 2, m32)}
    np.testing.assert_allclose(_composed(chain, 2, 4), m43 @ m32)  # 2 -> 3 -> 4
    assert _composed({**chain, 3: done(3, 2, np.eye(3), "identity")}, 2, 4) is None  # a gap
    assert _composed({**chain, 3: done(3, 1, m32, "skip to 1")}, 2, 4) is None  # skips past 2
    assert _composed({4: chain[4]}, 2, 4) is None  # a pair not given


@pytest.mark.parametrize(("reference", "bad"), [(0, 4), (7, 3)])
def test_a_guided_further_pair_does_not_repeat_a_wrong_chain_map(monkeypatch, reference, bad):
    """A neighbour map 8 px off (no fallback flagged), between sections 3 and 4, aligned upward from
    section 0 or downward from section 7: the further pairs across it must not just repeat it (a
    guided refit lands within ransac_threshold of the chain), so the solve sees them disagree with
    the chain."""
    import napari_nephi.engines.mito.align as al
    from napari_nephi.synthetic import em_stack

    d = em_stack(8, (256, 256), seed=0)
    pair_job = al._pair_job

    def wrong_pair_job(sections, futs, k, chain, shape):
        r = pair_job(sections, futs, k, chain, shape)
        return r if k != bad else al._PairResult(r.section, r.source, r.matrix @ _shift(8.0, -8.0), r.row)

    monkeypatch.setattr(al, "_pair_job", wrong_pair_job)
    reg = align_stack(d["stack"], masks=d["masks"], warp=False, workers=1, neighbours=3, reference=reference)
    rows = reg.metrics["report"]
    across = [
        p
        for k in range(8)
        for p in rows[k]["pairs"]
        if min(k, p["neighbour"]) <= 3 < max(k, p["neighbour"]) and abs(k - p["neighbour"]) > 1
    ]
    assert len(across) == 2 + 2 + 1
    assert all(p["residual"] > 3.0 and p["robust_weight"] < 1.0 for p in across)


def test_global_options_are_checked(rotated_copies):
    s = rotated_copies["stack"]
    with pytest.raises(InputError, match="neighbours=2 needs solver='global'"):
        align_stack(s, neighbours=2, solver="chain")
    with pytest.raises(InputError, match="global_model"):
        align_stack(s, neighbours=2, global_model="elastic")
    with pytest.raises(InputError, match="neighbours"):
        align_stack(s, neighbours=0)
    with pytest.raises(InputError, match="drift_prior"):
        align_stack(s, neighbours=2, drift_prior=-1)
    with pytest.raises(InputError, match="guided_pairs"):
        align_stack(s, neighbours=2, guided_pairs="off")


def test_solver_chain_alone_runs_the_chain(rotated_copies):
    """``solver="chain"`` without ``neighbours`` is the chain (neighbours 1), as before session 14's
    default of 2 neighbours; without either, the global solve with 2."""
    s = rotated_copies["stack"][:3]
    chain = align_stack(s, solver="chain", warp=False, workers=1)
    assert (chain.settings["solver"], chain.settings["neighbours"]) == ("chain", 1)
    assert chain.settings["global_model"] is None and chain.settings["drift_prior"] is None  # not used
    assert "solver" not in chain.metrics and "pairs" not in chain.metrics["report"][1]
    default = align_stack(s, warp=False, workers=1)
    assert (default.settings["solver"], default.settings["neighbours"]) == ("global", 2)


def test_cli_options_reach_the_engine(rotated_copies, tmp_path):
    write_tiff(tmp_path / "s.tif", rotated_copies["stack"])
    p = argparse.ArgumentParser(prog="napari-nephi")
    add_parser(p.add_subparsers(dest="command", required=True))
    argv = ["align-em", str(tmp_path / "s.tif"), "-o", str(tmp_path / "out"), "--neighbours", "3",
            "--global-model", "rigid", "--drift-prior", "0.5", "--no-guided-pairs", "--no-masks-out",
            "-q"]  # fmt: skip
    args = p.parse_args(argv)
    kw = _align_options(args)
    assert (kw["neighbours"], kw["solver"], kw["global_model"], kw["drift_prior"]) == (3, None, "rigid", 0.5)
    assert kw["guided_pairs"] is False
    assert args.func(args) == 0
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert doc["settings"]["solver"] == "global" and doc["settings"]["neighbours"] == 3
    assert doc["settings"]["global_model"] == "rigid" and doc["metrics"]["solver"]["pairs"] == 9
    assert [q["neighbour"] for q in doc["report"][4]["pairs"]] == [3, 2, 1]


def _shift(dy, dx):
    m = np.eye(3)
    m[:2, 2] = dy, dx
    return m


def test_a_section_matched_only_further_away_is_solved_not_chained():
    """Section 2 is blank (identity fallback); section 3 matched section 1 (distance 2): 3 is
    solved, 2 takes its neighbour's solved map, and only 2 is unconstrained."""
    from types import SimpleNamespace

    from napari_nephi.engines.mito.align import _global_placement

    true = [_shift(0, 3.0 * k) for k in range(5)]  # pull-backs
    edge = lambda a, b, w=1.0: Edge(a, b, true[b] @ np.linalg.inv(true[a]), w)  # noqa: E731
    chain = [edge(0, 1), Edge(1, 2, np.eye(3), 1e-3), edge(1, 3), edge(3, 4)]
    chained = np.stack(true)
    chained[3] = chained[4] = _shift(40, 40)  # a wrong chain: must not survive
    rows = [{"inliers": 50, "reprojection_error": 0.1} for _ in range(5)]
    opts = SimpleNamespace(ransac_threshold=3.0)
    m, summary, _ = _global_placement(5, 0, SHAPE, chain, [], chained, rows, "rigid", opts, 0.0)
    assert summary["unconstrained_sections"] == [2]
    for k in (1, 3, 4):
        np.testing.assert_allclose(m[k], true[k], atol=1e-6)
    np.testing.assert_allclose(m[2], m[1], atol=1e-9)
    # the distance weight is not a down-weighting: all pairs agree
    assert summary["downweighted_pairs"] == 0
    pair = rows[3]["pairs"][0]
    assert pair["prior_weight"] == 0.25 and pair["robust_weight"] == 1.0 and pair["weight"] == 0.25


@pytest.mark.parametrize(("model", "prior"), [("affine", 0.0), ("affine", 0.3), ("similarity", 0.3)])
def test_the_block_assembly_solves_the_stacked_least_squares(model, prior):
    """The normal equations assembled per pair of sections give the dense least-squares
    solution of the stacked residual rows (reference in the middle, mixed weights, the prior)."""
    from napari_nephi.engines.mito import solve

    n, ref = 9, 4
    _, edges = _noisy_chain(n, 3, seed=5, noise=0.8)
    rng = np.random.default_rng(6)
    for e in edges:
        e.weight = rng.uniform(0.1, 1.0)
    robust = rng.uniform(0.3, 1.0, len(edges))
    npar = 6 if model == "affine" else 4
    pts = solve._grid(SHAPE)
    radius = float(np.linalg.norm(pts - pts.mean(0), axis=1).max())
    x0 = np.stack([solve._from_matrix(np.eye(3), model)] * n)
    x = x0 + rng.normal(0, 0.01, x0.shape)  # the previous solve: the prior's rotation targets
    da, db = solve._blocks(edges, pts, model)
    got = solve._solve_linear(n, ref, npar, edges, (da, db), robust, x, x0, model, prior, radius)
    # dense: one row per point coordinate and pair, the reference's terms on the right
    free = [k for k in range(n) if k != ref]
    rows, rhs = [], []
    for e, g, rw in zip(edges, db, robust):
        w = np.sqrt(e.weight * rw)
        row = np.zeros((len(da), n * npar))
        row[:, e.a * npar : (e.a + 1) * npar] += w * da
        row[:, e.b * npar : (e.b + 1) * npar] -= w * g
        rows.append(row)
        rhs.append(np.zeros(len(da)))
    for k in free if prior else ():
        s = np.sqrt(prior) * radius
        if model == "affine":
            which, target = [0, 1, 3, 4], solve.nearest_rotation(x[k].reshape(2, 3)[:, :2]).ravel()
        else:
            which, target = [0, 1], x[k][:2] / np.hypot(*x[k][:2])
        row = np.zeros((len(which), n * npar))
        row[np.arange(len(which)), k * npar + np.array(which)] = s
        rows.append(row)
        rhs.append(s * target)
    a, b = np.concatenate(rows), np.concatenate(rhs)
    cols = np.concatenate([np.arange(k * npar, (k + 1) * npar) for k in free])
    b = b - a[:, ref * npar : (ref + 1) * npar] @ x0[ref]
    want, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
    np.testing.assert_allclose(got[free].ravel(), want, atol=1e-7)
    np.testing.assert_array_equal(got[ref], x[ref])


def test_default_solve_on_a_one_section_stack_gives_the_identity():
    """A single section has no pair: the default global solve places it at the identity (it used to
    raise an IndexError from an empty, float-typed index array)."""
    rng = np.random.default_rng(3)
    stack = rng.random((1, 64, 80)).astype(np.float32)
    reg = align_stack(stack, warp=False)
    assert reg.settings["solver"] == "global"
    assert reg.metrics["solver"]["pairs"] == 0
    np.testing.assert_allclose(reg.transform.matrices[0], np.eye(3), atol=1e-12)


def test_elastic_on_a_one_section_stack_gives_a_zero_field():
    """One section with ``elastic=True`` (the joint solve has no pair) gives the identity and a zero
    field; it raised a ValueError from an empty reshape in the joint affine solve."""
    rng = np.random.default_rng(4)
    stack = rng.random((1, 64, 80)).astype(np.float32)
    reg = align_stack(stack, elastic=True, warp=False)
    np.testing.assert_allclose(reg.transform.matrices[0], np.eye(3), atol=1e-12)
    assert np.abs(reg.transform.fields).max() == 0.0
