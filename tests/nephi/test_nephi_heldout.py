"""Held-out check of the coarse levels under noise (``noise_heldout``, nephi/heldout.py, session 21)."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage import data, transform

import napari_nephi as nn
from napari_nephi.core.errors import InputError
from napari_nephi.core.jacobian import jacobian_determinant
from napari_nephi.core.transform import DisplacementTransform
from napari_nephi.engines.nephi import heldout
from napari_nephi.engines.nephi.coarse import velocity_maps
from napari_nephi.synthetic import random_smooth_displacement

from .test_nephi_noise import _unit

INNER = (slice(8, -8),) * 2


def test_the_fit_images_depend_on_the_fit_half_only():
    rng = np.random.default_rng(0)
    img = rng.random((33, 40)).astype(np.float32)
    keep = heldout.split_mask(img.shape)
    assert keep.mean() == pytest.approx(0.5, abs=0.01)
    other = np.where(keep, img, rng.random(img.shape)).astype(np.float32)  # new held-out voxels
    a, b = heldout.fill_from(img, keep), heldout.fill_from(other, keep)
    assert np.array_equal(a, b)
    assert np.array_equal(a[keep], img[keep])
    # a held-out voxel inside is the mean of its four neighbours
    assert a[5, 6] == pytest.approx(np.mean([img[4, 6], img[6, 6], img[5, 5], img[5, 7]]), rel=1e-6)


def test_the_standard_error_matches_the_spread_of_the_scores_under_new_noise():
    """Two candidate maps (the identity and a shift of 0.3 px) scored against 40 draws of white noise
    0.05 on the held-out voxels: the spread of the score difference is the standard error computed from
    one draw within 25 % (measured: 0.95-1.1 of it)."""
    img = _unit("camera", 64)
    t = lambda x: torch.as_tensor(x)[None, None]  # noqa: E731
    zero = torch.zeros(1, 2, 2, 2)
    shift = torch.zeros(1, 2, 8, 8)
    shift[:, 0] = 0.3 * 2 / 63  # x component, normalised
    candidates = [velocity_maps(zero), velocity_maps(shift)]
    held = torch.as_tensor(~heldout.split_mask(img.shape))
    rng = np.random.default_rng(3)
    diffs, ses = [], []
    for _ in range(40):
        f = (img + 0.05 * rng.standard_normal(img.shape)).astype(np.float32)
        m = (img + 0.05 * rng.standard_normal(img.shape)).astype(np.float32)
        check = heldout.heldout_scores(t(f), t(m), t(img), t(img), (0.05, 0.05), candidates, held)
        diffs.append(check.scores[1] - check.scores[0])
        ses.append(check.se[1, 0])
    ratio = np.std(diffs) / np.mean(ses)
    assert 0.75 < ratio < 1.25, ratio
    assert np.mean(diffs) < 0  # the shift is worse, and the scores say so


def _noisy_camera(moving_of, seed: int):
    img = _unit("camera", 128)
    moving, truth = moving_of(img)
    rng = np.random.default_rng(seed)
    f, m = ((a + 0.05 * rng.standard_normal(a.shape)).astype(np.float32) for a in (img, moving))
    return f, m, truth


def test_a_noisy_pure_shift_keeps_the_global_map():
    """The camera at 128 px shifted by (2.3, 1.6) px, independent noise 0.05 on both images: no coarse level
    beats the global map on the held-out voxels, so the map is the rigid one: det J within 1 +- 0.05 and
    inverse consistency under 0.1 px 8 px inside the border (the issue's target). Measured: EPE 0.040 px,
    det J 1.000-1.000; without the check (the code before session 21) EPE 0.292, det J 0.868-1.144, inverse
    consistency up to 1.56 px."""
    shift = np.array([2.3, 1.6])

    def moving_of(img):
        moving = ndimage.shift(img, shift, order=1, mode="nearest").astype(np.float32)
        return moving, np.broadcast_to(shift[:, None, None], (2, *img.shape))

    f, m, truth = _noisy_camera(moving_of, 1)
    events = []
    reg = nn.register(f, m, method="nephi", device="cpu", progress=lambda e: events.append((e.step, e.total)))
    assert reg.settings["noise_heldout"] is True
    # the steps the check skipped are taken off: progress ends at its total (review 2 of session 21,
    # B7: it stopped at 329 of 629 with the stage "held-out check")
    assert events[-1][0] == events[-1][1], events[-1]
    assert reg.metrics["noise_heldout_levels"] == 0 and reg.metrics["iterations"] == 0
    u = reg.transform.displacement()
    det = jacobian_determinant(u)[INNER]
    assert 0.95 < det.min() and det.max() < 1.05, (det.min(), det.max())
    pts = np.stack(np.meshgrid(*[np.arange(8, 120.0)] * 2, indexing="ij"), -1).reshape(-1, 2)
    back = reg.transform.inverse().map_points(reg.transform.map_points(pts))
    assert np.linalg.norm(back - pts, axis=1).max() < 0.1
    assert np.sqrt(((u - truth) ** 2).sum(0))[INNER].mean() < 0.1


def test_a_noisy_small_field_keeps_only_what_the_held_out_half_supports():
    """The camera at 128 px under a random smooth field of at most 0.5 px (field seed 4), noise 0.05: the
    levels' increments are kept where the held-out voxels support them (the finest knots nowhere).
    Measured: EPE 0.266 px 8 px inside the border (no registration 0.172); without the check 0.290 (with
    the local test at two standard errors, bde8da4, 0.212: it lost on large fields)."""

    def moving_of(img):
        u, u_inv = random_smooth_displacement(img.shape, 0.5, 7.68, seed=4, return_inverse=True)
        return np.ascontiguousarray(DisplacementTransform(u_inv).warp(img), np.float32), u

    f, m, truth = _noisy_camera(moving_of, 4)
    reg = nn.register(f, m, method="nephi", device="cpu")
    shares = reg.metrics["noise_heldout_shares"]
    assert len(shares) == 3 and shares[-1] < 0.05 and all(0 <= s < 1 for s in shares), shares
    u = reg.transform.displacement()
    assert np.sqrt(((u - truth) ** 2).sum(0))[INNER].mean() < 0.28
    assert reg.metrics["folds"] == 0


def test_clean_pairs_and_the_option_off_run_as_before(small_pair):
    fixed, moving = small_pair
    # two coarse steps a level (session 42, 3x faster): forced True still moves the map (0.13 px against
    # False, 0.50 px with the preset's steps), so "auto" adapting would still break the equality below
    short = dict(iterations=5, coarse_iterations=2)
    runs = {
        h: nn.register(fixed, moving, method="nephi", device="cpu", **short, noise_heldout=h)
        for h in ("auto", False)
    }
    assert runs["auto"].settings["noise_heldout"] is False  # clean: the noise adaptation did not run
    assert "noise_heldout_scores" not in runs["auto"].metrics
    assert np.array_equal(runs["auto"].transform.displacement(), runs[False].transform.displacement())
    forced = nn.register(fixed, moving, method="nephi", device="cpu", **short, noise_heldout=True)
    assert forced.settings["noise_heldout"] is True
    n_levels = len(forced.settings["coarse_spacings"])
    assert len(forced.metrics["noise_heldout_scores"]) == n_levels + 1  # the global map and each level
    assert len(forced.metrics["noise_heldout_shares"]) == n_levels


def test_bad_noise_heldout_is_refused(small_pair, shapes_volume_pair):
    fixed, moving = small_pair
    with pytest.raises(InputError, match="noise_heldout must be 'auto', True or False"):
        nn.register(fixed, moving, method="nephi", device="cpu", noise_heldout="yes")
    with pytest.raises(InputError, match="noise_heldout=True checks the coarse stage's levels"):
        nn.register(fixed, moving, method="nephi", device="cpu", levels=1, noise_heldout=True)
    vol_f, vol_m, _ = shapes_volume_pair
    with pytest.raises(InputError, match="noise_heldout=True"):
        nn.register(vol_f, vol_m, method="nephi", device="cpu", iterations=1, noise_heldout=True)


def test_a_check_that_cannot_judge_says_so():
    """A fixed mask of 5 x 5 px leaves fewer than 16 held-out voxels: every level is kept, the shares are
    None (not 1.0, which would read as "passed everywhere") and a note says why (session-21 review B4)."""
    img = _unit("camera", 48)
    rng = np.random.default_rng(0)
    f = (img + 0.05 * rng.standard_normal(img.shape)).astype(np.float32)
    m = (np.roll(img, 1, 0) + 0.05 * rng.standard_normal(img.shape)).astype(np.float32)
    mask = np.zeros(img.shape, bool)
    mask[20:25, 20:25] = True
    reg = nn.register(
        f,
        m,
        method="nephi",
        device="cpu",
        iterations=2,
        coarse_iterations=2,
        fixed_mask=mask,
        noise_heldout=True,
    )
    assert reg.settings["noise_heldout"] is True
    assert reg.metrics["noise_heldout_shares"] is None
    assert reg.metrics["noise_heldout_levels"] == len(reg.settings["coarse_spacings"])
    assert any("noise_heldout could not judge" in n for n in reg.metrics["notes"])


def test_a_level_is_kept_where_its_local_gain_is_positive_but_under_two_standard_errors():
    """The local rule (``heldout.Z_LOCAL = 0``, 71ee23b; review 2 of session 21, B5): a candidate that
    beats the global map by 14 standard errors over the whole image, by 0.6-1.0 in every window of its
    knot width, is kept everywhere; at two standard errors locally (bde8da4's rule) it is kept nowhere."""
    rng = np.random.default_rng(0)
    r = torch.as_tensor(rng.standard_normal((128, 128)))
    r = r / r.square().sum().sqrt()
    a0 = torch.zeros_like(r)
    a1 = a0 + r  # better than the global map at every held-out voxel
    check = heldout.Heldout([r, r], [(a0, a0), (a1, a1)], [0.1, 0.1])
    z = (check.scores[1] - check.scores[0]) / check.se[1, 0]
    spacing = 2.0 * np.sqrt(3)  # a Gaussian window of 2 px
    local = check.local_z(1, 0, spacing * heldout.KNOT_WIDTH)
    assert z > 10 and 0 < local.min() and local.max() < 2, (z, local.min(), local.max())
    gates, compared = heldout.level_gates(check, [spacing])
    assert gates == [None] and compared == [0]  # kept everywhere
    strict, _ = heldout.level_gates(check, [spacing], z_local=2.0)
    assert strict[0] is not None and strict[0].max() < 0.01


def test_a_larger_noisy_field_keeps_the_level_that_carries_it():
    """The retina at 256 px under a random smooth field of at most 2 % of the size (5.12 px, smoothness
    6 %, field seed 4), noise 0.05: the first level carries most of the motion and is kept on more than
    90 % of the image. 25 coarse steps (the default 100 took 5.5-12 s; review 1 of session 22, B3) still
    separate the rules (session 23, /tmp/s23/B/b3.py): EPE 0.930 px 8 px inside the border, shares 0.930 /
    0.699 / 0; with the local test at two standard errors (bde8da4, the loss of review 1 of session 21,
    B1) 1.014 px, shares 0.847 / 0.473 / 0, so this test fails with ``heldout.Z_LOCAL = 2`` (review 2 of
    session 21, B5). At the default 100 steps: 0.885 / 1.001 px, shares 0.926 / 0.822."""
    grey = transform.resize(data.retina().astype(np.float64).mean(-1), (256, 256), anti_aliasing=True)
    img = ((grey - grey.min()) / (grey.max() - grey.min())).astype(np.float32)
    u, u_inv = random_smooth_displacement(img.shape, 5.12, 15.36, seed=4, return_inverse=True)
    moving = np.ascontiguousarray(DisplacementTransform(u_inv).warp(img), np.float32)
    rng = np.random.default_rng(4)
    f, m = ((a + 0.05 * rng.standard_normal(a.shape)).astype(np.float32) for a in (img, moving))
    reg = nn.register(f, m, method="nephi", device="cpu", coarse_iterations=25)
    assert reg.settings["noise_heldout"] is True
    shares = reg.metrics["noise_heldout_shares"]
    assert shares[0] > 0.9, shares
    u_est = reg.transform.displacement()
    assert np.sqrt(((u_est - u) ** 2).sum(0))[INNER].mean() < 0.97
    assert reg.metrics["folds"] == 0


def test_the_check_maps_slab_by_slab_with_the_same_scores(monkeypatch):
    """The candidates' maps are evaluated and the images warped a slab of points at a time (review 2 of
    session 21, B6: the whole grid at once was the check's memory peak); the slabs change no score."""
    img = _unit("camera", 64)
    rng = np.random.default_rng(5)
    t = lambda x: torch.as_tensor(x)[None, None]  # noqa: E731
    f = (img + 0.05 * rng.standard_normal(img.shape)).astype(np.float32)
    m = (np.roll(img, 1, 0) + 0.05 * rng.standard_normal(img.shape)).astype(np.float32)
    v = torch.as_tensor(rng.standard_normal((1, 2, 6, 6)) * 0.01, dtype=torch.float32)
    candidates = [velocity_maps(torch.zeros(1, 2, 2, 2)), velocity_maps(v)]
    held = torch.as_tensor(~heldout.split_mask(img.shape))
    runs = []
    for slab in (1 << 16, 1000):  # one slab, and five
        monkeypatch.setattr(heldout, "SLAB_POINTS", slab)
        runs.append(heldout.heldout_scores(t(f), t(m), t(img), t(img), (0.05, 0.05), candidates, held))
    assert runs[0].scores == runs[1].scores
    assert np.array_equal(runs[0].se, runs[1].se)
    assert all(torch.equal(a, b) for u, w in zip(runs[0].units, runs[1].units) for a, b in zip(u, w))
    runs[0].release()
    assert runs[0].units is None and len(runs[0].scores) == 2


def test_the_memory_check_counts_the_held_out_check(monkeypatch, small_pair):
    """``check_run_memory`` counts the check where it will run (review 2 of session 21, B6): 17 float32 a
    pixel for three levels, more than the outputs' 9. Under "auto" it is tested once the noise estimate asks
    for the check, and skipped with a note where it does not fit; a clean pair, which never checks, runs
    (review 1 of session 22, B1: counting it up front refused clean runs)."""
    from napari_nephi.core import device as core_device
    from napari_nephi.core.errors import OutOfMemoryError
    from napari_nephi.engines.nephi import checks

    n = 4096
    assert checks.heldout_bytes((n, n), 3) == 4 * n * n * 17 + checks.FIXED_OVERHEAD
    between = (checks.output_bytes((n, n)) + checks.heldout_bytes((n, n), 3)) // 2
    monkeypatch.setattr(core_device, "available_memory_bytes", lambda device: between)
    checks.check_run_memory((n, n), torch.device("cpu"), False)  # the outputs alone fit
    with pytest.raises(OutOfMemoryError, match=r"held-out check of the coarse levels.*noise_heldout=False"):
        checks.check_run_memory((n, n), torch.device("cpu"), False, heldout_levels=3)
    img = _unit("camera", 64)
    rng = np.random.default_rng(0)
    f = (img + 0.05 * rng.standard_normal(img.shape)).astype(np.float32)
    m = (np.roll(img, 1, 0) + 0.05 * rng.standard_normal(img.shape)).astype(np.float32)
    small = (checks.output_bytes(img.shape) + checks.heldout_bytes(img.shape, 3)) // 2
    monkeypatch.setattr(core_device, "available_memory_bytes", lambda device: small)
    with pytest.raises(OutOfMemoryError, match="held-out check"):
        nn.register(f, m, method="nephi", device="cpu", iterations=1, noise_heldout=True)
    quick = {"iterations": 1, "coarse_iterations": 2}
    reg = nn.register(f, m, method="nephi", device="cpu", **quick)  # "auto": skipped, with a note
    assert reg.settings["noise_heldout"] is False and "noise_heldout_shares" not in reg.metrics
    assert any("skipped the held-out check" in note for note in reg.metrics["notes"]), reg.metrics["notes"]
    fixed, moving = small_pair  # clean: never checks, so never refused for it
    small = (checks.output_bytes(fixed.shape) + checks.heldout_bytes(fixed.shape, 3)) // 2
    monkeypatch.setattr(core_device, "available_memory_bytes", lambda device: small)
    clean = nn.register(fixed, moving, method="nephi", device="cpu", **quick)
    assert clean.settings["noise_heldout"] is False
    assert not any("held-out" in note for note in clean.metrics.get("notes", []))


def test_level_gates_read_the_module_constants_at_the_call(monkeypatch):
    """Review 1 of session 22, B2: ``Z_LOCAL`` was bound as a default argument, so setting the module's
    value changed nothing; now a local test at two standard errors keeps the candidate of the test above
    nowhere."""
    rng = np.random.default_rng(0)
    r = torch.as_tensor(rng.standard_normal((128, 128)))
    r = r / r.square().sum().sqrt()
    check = heldout.Heldout([r, r], [(0 * r, 0 * r), (r, r)], [0.1, 0.1])
    spacing = 2.0 * np.sqrt(3)
    assert heldout.level_gates(check, [spacing])[0] == [None]
    monkeypatch.setattr(heldout, "Z_LOCAL", 2.0)
    gate = heldout.level_gates(check, [spacing])[0][0]
    assert gate is not None and gate.max() < 0.01


@pytest.mark.parametrize(
    ("off", "ran"),
    [
        ((), 2 + 4 + 4),
        ((1,), 2 + 4),
        ((1, 2), 2),
    ],  # none off; the middle level gated off; cut after the first
)
def test_coarse_iterations_counts_the_steps_the_checked_stage_ran(monkeypatch, off, ran):
    """``metrics["coarse_iterations"]`` is what the coarse stage ran (the lead, session 25): a level the
    held-out check keeps nowhere runs no step, also between two kept ones, where the count used to add
    its planned steps (4 here: 10 against the 6 run); the steps the progress reports agree."""
    img = _unit("camera", 64)
    rng = np.random.default_rng(0)
    f = (img + 0.05 * rng.standard_normal(img.shape)).astype(np.float32)
    m = (np.roll(img, 1, 0) + 0.05 * rng.standard_normal(img.shape)).astype(np.float32)

    def gates(check, spacings):  # levels 0, 1, 2 (the finer-knot one): kept everywhere, or nowhere
        return [np.zeros(check.raw[0].shape, np.float32) if k in off else None for k in range(3)], [0, 1, 2]

    monkeypatch.setattr(heldout, "level_gates", gates)
    events = []
    reg = nn.register(
        f, m, method="nephi", device="cpu", coarse_iterations=4, iterations=0, initial="none",
        noise_heldout=True, progress=events.append,
    )  # fmt: skip
    coarse = [e for e in events if e.stage == "coarse (3 level(s))"]
    assert reg.metrics["noise_heldout_shares"] == [0.0 if k in off else 1.0 for k in range(3)]
    assert reg.metrics["coarse_iterations"] == len(coarse) == ran
