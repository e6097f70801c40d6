"""``method="nephi"`` with bad options, diverging runs and images too large for memory.

A NaN or huge learning rate used to crash the process (torch's CPU ``grid_sample`` backward on a
NaN grid); every case here must end in a ``RegistrationError`` instead, before any heavy work.
"""

import math

import numpy as np
import pytest
import torch

import napari_nephi
from napari_nephi.core import device as core_device
from napari_nephi.engines.nephi import checks
from napari_nephi.engines.nephi.coarse import grid_sample_points
from napari_nephi.engines.nephi.field import FieldConfig, NeuralDeformationField, zero_codes
from napari_nephi.engines.nephi.optimize import DivergenceWatch, OptimizeSettings, optimize_field

QUICK = dict(
    levels=1, iterations=12, sample_points=1024, reg_points=32, hidden=32, device="cpu", initial="none"
)


@pytest.mark.parametrize(
    "option, message",
    [
        ({"learning_rate": 1.0}, "learning_rate must be at most 0.1"),
        ({"learning_rate": float("nan")}, "learning_rate must be a finite number"),
        ({"learning_rate": float("inf")}, "learning_rate must be a finite number"),
        ({"learning_rate": -0.01}, "learning_rate must be greater than 0"),
        ({"code_learning_rate": 0}, "code_learning_rate must be greater than 0"),
        ({"reg_weight": float("inf")}, "reg_weight must be a finite number"),
        ({"reg_weight": -1}, "reg_weight must be at least 0"),
        ({"omega": 1e9}, "omega must be at most 1000"),
        ({"fourier_scale": float("nan")}, "fourier_scale must be a finite number"),
        ({"iterations": -5}, "iterations must be at least 0"),
        ({"iterations": "abc"}, "iterations must be a whole number, got 'abc'"),
        ({"iterations": 2.5}, "iterations must be a whole number"),
        ({"levels": 0}, "levels must be at least 1"),
        ({"sample_points": 3}, "sample_points must be at least 16"),
        ({"sample_fraction": 0.0}, "sample_fraction must be greater than 0"),
        ({"hidden": True}, "hidden must be a whole number"),
        ({"chunked": "yes"}, "chunked must be true or false"),
        ({"max_voxels": 100}, "max_voxels must be at least 4096"),
        ({"derivatives": "numeric"}, "derivatives must be one of"),
        ({"bspline_spacing": -1}, "bspline_spacing must be at least 0"),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else None,
)
def test_bad_option_values_raise_before_any_step(small_pair, option, message):
    fixed, moving = small_pair
    steps = []
    with pytest.raises(napari_nephi.InputError, match=message):
        napari_nephi.register(fixed, moving, method="nephi", progress=steps.append, **{**QUICK, **option})
    assert steps == []


def test_unknown_option_name_lists_the_valid_ones(small_pair):
    fixed, moving = small_pair
    with pytest.raises(napari_nephi.RegistrationError, match="'iteratons'.*did you mean 'iterations'"):
        napari_nephi.register(fixed, moving, method="nephi", iteratons=10)


def test_a_diverging_run_is_an_error_not_a_result(small_pair):
    fixed, moving = small_pair
    losses = []
    with pytest.raises(napari_nephi.InputError, match=r"diverged: at step \d+ of 30.*learning_rate=0.1"):
        napari_nephi.register(
            fixed,
            moving,
            method="nephi",
            learning_rate=0.1,
            progress=lambda e: losses.append(e.loss),
            **{**QUICK, "iterations": 30},
        )
    # stopped early, once the loss had stayed far above its best for DIVERGE_STEPS steps
    assert 10 <= len(losses) < 30
    assert max(losses) > 1e3 * min(losses)


def test_nan_weights_stop_the_run_without_crashing(small_pair):
    """NaN weights give a NaN sampling grid: the run stops with an error instead of a segfault."""
    fixed, moving = (torch.as_tensor(a)[None, None] for a in small_pair)
    cfg = FieldConfig(ndim=2, hidden=16)
    field = NeuralDeformationField(cfg)
    with torch.no_grad():
        next(field.parameters()).fill_(float("nan"))
    codes = zero_codes(cfg, (4, 4))
    settings = OptimizeSettings(iterations=5, sample_points=256, reg_points=16)
    with pytest.raises(napari_nephi.InputError, match="diverged: at step 1 of 5 the loss became NaN"):
        optimize_field(field, codes, fixed, moving, settings)


def test_non_finite_points_are_sampled_safely():
    volume = torch.arange(16.0).reshape(1, 1, 4, 4)
    points = torch.tensor(
        [[[float("nan"), 0.0], [float("inf"), -float("inf")], [1.0, 1.0]]], requires_grad=True
    )
    values = grid_sample_points(volume, points)
    values.sum().backward()  # crashed the process before (segmentation fault)
    assert torch.isfinite(values).all() and torch.isfinite(points.grad).all()
    assert float(values[0, 0, 0]) == 7.5  # NaN -> the centre
    assert float(values[0, 0, 1]) == 12.0  # +inf row -> last row, -inf column -> first column
    assert float(values[0, 0, 2]) == 15.0


def _watch(iterations=50):
    return DivergenceWatch(iterations, OptimizeSettings(iterations=iterations))


def test_divergence_watch_lets_normal_runs_and_short_spikes_pass():
    watch = _watch()
    losses = [0.3 * math.exp(-k / 10) for k in range(50)]
    losses[5:9] = [3.0, 2.0, 1.5, 0.9]  # a warm-up spike of a few steps
    for k, value in enumerate(losses):
        watch.update(k, value, [])
    watch.finish()
    assert watch.best == pytest.approx(min(losses))


def test_divergence_watch_stops_a_runaway_loss_and_a_bad_ending():
    watch = _watch()
    with pytest.raises(napari_nephi.InputError, match="step 11 of 50 the loss rose to 1e\\+06"):
        for k, value in enumerate([0.1] + [1e6] * 49):
            watch.update(k, value, [])
    ending = _watch()
    for k, value in enumerate([0.1] * 45 + [5.0] * 5):
        ending.update(k, value, [])
    with pytest.raises(napari_nephi.InputError, match="step 50 of 50 the loss rose to 5"):
        ending.finish()
    nan_weights = _watch()
    with pytest.raises(napari_nephi.InputError, match="became NaN or infinite"):
        nan_weights.update(0, float("nan"), [torch.tensor([1.0, float("nan")])])


def test_a_result_worse_than_the_start_with_folds_is_an_error():
    diverged = {"ncc_before": 0.96, "ncc_after": 0.03, "fold_percent": 50.0}
    with pytest.raises(napari_nephi.InputError, match="NCC 0.96 to 0.03 and 50.0 % of the voxels fold"):
        checks.check_result(diverged, 0.1, 0.01)
    note = checks.check_result({"ncc_before": 0.9, "ncc_after": 0.8, "fold_percent": 0.0}, 2e-3, 1e-2)
    assert "NCC 0.9 -> 0.8" in note
    assert (
        checks.check_result({"ncc_before": 0.9, "ncc_after": 0.88, "fold_percent": 5.0}, 2e-3, 1e-2) is None
    )


def test_a_multi_modal_result_is_judged_by_the_similarity_it_optimised():
    # inverted intensities: a better alignment makes NCC more negative, local NCC higher
    sound = {"ncc_before": -0.5, "ncc_after": -0.9, "fold_percent": 5.0}
    with pytest.raises(napari_nephi.InputError, match="NCC -0.5 to -0.9"):
        checks.check_result(sound, 2e-3, 1e-2)  # judged by NCC it would be discarded
    lncc = {**sound, "similarity": "lncc", "similarity_before": 0.4, "similarity_after": 0.7}
    assert checks.check_result(lncc, 2e-3, 1e-2) is None
    worse = {**lncc, "similarity_after": 0.2}
    with pytest.raises(napari_nephi.InputError, match="LNCC 0.4 to 0.2 and 5.0 % of the voxels fold"):
        checks.check_result(worse, 2e-3, 1e-2)
    mse = {"similarity": "mse", "similarity_before": 1.0, "similarity_after": 1.5, "fold_percent": 0.0}
    assert "MSE 1 -> 1.5" in checks.check_result(mse, 2e-3, 1e-2)
    assert (
        checks.check_result({**mse, "similarity_after": 0.5, "ncc_before": 0.9, "ncc_after": 0.1}, 2e-3, 1e-2)
        is None
    )


def test_an_inverted_pair_registered_with_local_ncc_is_kept(small_pair):
    fixed, moving = small_pair
    inverted = float(moving.max()) - moving
    reg = napari_nephi.register(
        fixed, inverted, method="nephi", similarity="lncc", **{**QUICK, "iterations": 40}
    )
    assert reg.metrics["similarity"] == "lncc"
    assert reg.metrics["ncc_before"] < 0  # NCC sees the inverted pair as anti-correlated
    assert reg.metrics["similarity_after"] > reg.metrics["similarity_before"]
    assert not any("got worse" in n for n in reg.metrics.get("notes", []))


def test_memory_estimate_of_two_20000_px_images():
    # per pixel: forward and backward fields (2 x 2 float32), warped image, copies and temporaries (5)
    overhead = checks.FIXED_OVERHEAD
    assert checks.output_bytes((20000, 20000)) == 4 * 20000**2 * 9 + overhead
    # divide-and-downsample adds the accumulators of the fused fields (2 x 2)
    assert checks.output_bytes((20000, 20000), chunked=True) == 4 * 20000**2 * 13 + overhead
    assert checks.output_bytes((100, 100, 100), backward=False) == 4 * 10**6 * 9 + overhead


def test_too_little_memory_stops_before_any_work(small_pair, monkeypatch):
    fixed, moving = small_pair
    monkeypatch.setattr(core_device, "available_memory_bytes", lambda device: 2**20)  # inputs fit
    steps = []
    with pytest.raises(napari_nephi.OutOfMemoryError, match=r"NePhi registration of 48 x 48 images"):
        napari_nephi.register(fixed, moving, method="nephi", progress=steps.append, **QUICK)
    assert steps == []


def test_two_20000_px_images_stop_with_the_estimate_and_advice(monkeypatch):
    monkeypatch.setattr(core_device, "available_memory_bytes", lambda device: 4 * 2**30)
    with pytest.raises(napari_nephi.OutOfMemoryError, match=r"needs about 19.6 GiB but only 4.0 GiB") as info:
        checks.check_run_memory((20000, 20000), torch.device("cpu"), chunked=True)
    assert "coarser level" in str(info.value) and "method='histology'" in str(info.value)


def test_gpu_memory_check_advises_the_chunked_mode(monkeypatch):
    free = {"cpu": 2**40, "cuda": 2**20}
    monkeypatch.setattr(core_device, "available_memory_bytes", lambda device: free[device.type])
    gpu = torch.device("cuda")
    with pytest.raises(napari_nephi.OutOfMemoryError, match=r"on cuda needs about .*chunked=True"):
        checks.check_run_memory((2048, 2048), gpu, chunked=False)
    checks.check_run_memory((2048, 2048), gpu, chunked=True)  # one chunk at a time: fits
    free["cuda"] = 2**40
    checks.check_run_memory((2048, 2048), gpu, chunked=False)
    assert np.isclose(checks.device_bytes((2048, 2048), masks=1), 3 * 4 * 2048**2)


def test_a_non_finite_coarse_loss_stops_before_the_backward_pass(small_pair, monkeypatch):
    from napari_nephi.engines.nephi import coarse

    monkeypatch.setattr(coarse, "_similarity", lambda name, a, b: (a - b).mean() * float("nan"))
    with pytest.raises(napari_nephi.InputError, match="coarse stage diverged at level 1"):
        napari_nephi.register(*small_pair, method="nephi", **{**QUICK, "levels": 2, "coarse_iterations": 5})
