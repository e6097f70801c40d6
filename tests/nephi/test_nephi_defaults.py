"""The fast preset's cheaper default: no neural steps after the coarse stage on large 2D images and on
volumes (optimize, not chunked)."""

import numpy as np
from scipy import ndimage as ndi

import napari_nephi as nn
from napari_nephi.engines.nephi import engine as nephi_engine
from napari_nephi.engines.nephi.engine import NEURAL_2D_MIN_SIDE, NEURAL_3D_GATE_RMS, PRESETS


def _pair(n: int):
    rng = np.random.default_rng(0)
    img = ndi.gaussian_filter(rng.random((n, n)), 2.0).astype(np.float32)
    return img, np.roll(img, 1, axis=0)


def test_large_2d_images_skip_the_neural_stage_after_the_coarse_one():
    fixed, moving = _pair(NEURAL_2D_MIN_SIDE)
    reg = nn.register(fixed, moving, method="nephi", device="cpu", coarse_iterations=6, initial="none")
    assert reg.settings["iterations"] == 0 and reg.metrics["iterations"] == 0
    assert reg.metrics["coarse_iterations"] > 0 and reg.metrics["ncc_after"] > reg.metrics["ncc_before"]
    assert reg.metrics["inverse_consistency_mean"] < 0.05  # exp(v) and exp(-v)


def test_small_images_keep_the_neural_steps():
    fixed, moving = _pair(32)
    tiny = dict(sample_points=64, reg_points=4, hidden=8, layers=1, n_frequencies=4, local_dim=0)
    reg = nn.register(
        fixed, moving, method="nephi", device="cpu", coarse_iterations=2, initial="none", **tiny
    )
    assert reg.settings["iterations"] == reg.metrics["iterations"] == PRESETS["fast"]["iterations"]


def _volume_pair(shift, n: int = 16):
    rng = np.random.default_rng(1)
    vol = ndi.gaussian_filter(rng.random((n, n + 2, n + 1)), 1.5).astype(np.float32)
    vol = (vol - vol.min()) / (vol.max() - vol.min())
    return vol, ndi.shift(vol, shift, order=3, mode="nearest").astype(np.float32)


TINY = dict(sample_points=64, reg_points=4, hidden=8, layers=1, n_frequencies=4, local_dim=0)
GATE = 0.4  # an opt-in threshold measured in session 33 (engine.NEURAL_3D_GATE_RMS; None by default)


def test_volumes_keep_the_neural_stage_by_default():
    """The gate is opt-in (review 1 of session 33: on rough fields it skipped the stage where it gains)."""
    reg = nn.register(
        *_volume_pair((0.2, -0.15, 0.1), 8),
        method="nephi",
        device="cpu",
        coarse_iterations=2,
        initial="none",
        **TINY,
    )
    assert NEURAL_3D_GATE_RMS is None and reg.settings["neural_3d_gate_rms"] is None
    assert "neural_3d_gate" not in reg.metrics and reg.metrics["iterations"] == PRESETS["fast"]["iterations"]


def test_volumes_skip_the_neural_stage_after_a_small_coarse_map(monkeypatch):
    """Session 33: with NEURAL_3D_GATE_RMS set, on volumes (optimize, not chunked) the fast preset runs the
    neural stage after the coarse one only where the coarse map's displacement RMS reaches it. A shift of
    0.27 voxel (no global stage) reads about 0.27: the result is the coarse stage's map, inverse by
    construction (exp(v) and exp(-v)): mean inverse-consistency error 0.0009 voxel, where the 50 neural
    steps after it (the default) gave 0.0047."""
    monkeypatch.setattr(nephi_engine, "NEURAL_3D_GATE_RMS", GATE)
    fixed, moving = _volume_pair((0.2, -0.15, 0.1))
    reg = nn.register(fixed, moving, method="nephi", device="cpu", coarse_iterations=6, initial="none")
    gate = reg.metrics["neural_3d_gate"]
    assert gate["threshold"] == GATE and 0.15 < gate["rms"] < GATE
    assert not gate["ran"] and reg.metrics["iterations"] == 0
    assert reg.settings["neural_3d_gate_rms"] == GATE
    assert reg.metrics["coarse_iterations"] > 0 and reg.metrics["ncc_after"] > reg.metrics["ncc_before"]
    assert reg.metrics["inverse_consistency_mean"] < 0.002


def test_volumes_keep_the_neural_stage_after_a_large_coarse_map(monkeypatch):
    """A coarse map of RMS 0.87 voxel runs the neural steps."""
    monkeypatch.setattr(nephi_engine, "NEURAL_3D_GATE_RMS", GATE)
    fixed, moving = _volume_pair((0.9, -0.7, 0.6))  # 1.3 voxels
    reg = nn.register(
        fixed, moving, method="nephi", device="cpu", coarse_iterations=6, initial="none", **TINY
    )
    gate = reg.metrics["neural_3d_gate"]
    assert gate["ran"] and gate["rms"] > 0.6
    assert reg.metrics["iterations"] == PRESETS["fast"]["iterations"]


def test_no_neural_gate_when_iterations_are_given_or_chunked(monkeypatch):
    monkeypatch.setattr(nephi_engine, "NEURAL_3D_GATE_RMS", GATE)
    small = _volume_pair((0.2, -0.15, 0.1), 8)
    common = dict(method="nephi", device="cpu", coarse_iterations=1, initial="none", levels=2, **TINY)
    reg = nn.register(*small, iterations=2, **common)
    assert reg.metrics["iterations"] == 2 and reg.settings["neural_3d_gate_rms"] is None
    assert "neural_3d_gate" not in reg.metrics
    reg = nn.register(*small, chunked=True, chunk_iterations=1, **common)
    assert reg.settings["chunked"] and reg.settings["neural_3d_gate_rms"] is None
    assert "neural_3d_gate" not in reg.metrics
