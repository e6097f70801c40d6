"""The shipped general 2D model: safe loading, default for 2D, predict and refine on a held-out image."""

import numpy as np
import pytest
import torch
from scipy import ndimage

import napari_nephi
from napari_nephi.core.transform import DisplacementTransform
from napari_nephi.engines.nephi import weights
from napari_nephi.engines.nephi.model import FORMAT, NePhiModel
from napari_nephi.engines.nephi.shipped_pairs import HELD_OUT, TRAINING, shipped_image
from napari_nephi.synthetic import random_smooth_displacement

PATH = weights.BUILTIN["general2d"]


def _ncc(a, b) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.fixture(scope="module")
def held_out_pair():
    """scikit-image's camera (held out from training) at 192 x 192, warped by a known smooth field
    (largest vector 4 % of the size, smoothness 5 %; a seed no training field uses)."""
    from skimage.transform import resize

    assert "camera" in HELD_OUT and "camera" not in TRAINING
    fixed = resize(shipped_image("camera"), (192, 192), anti_aliasing=True).astype(np.float32)
    u, u_inv = random_smooth_displacement(fixed.shape, 7.7, 9.6, seed=4242, return_inverse=True)
    moving = DisplacementTransform(u_inv).warp(fixed)
    return fixed, np.ascontiguousarray(moving, np.float32), u


def test_shipped_file_loads_with_weights_only_and_its_config():
    assert PATH.is_file() and PATH.stat().st_size < 5 * 2**20
    ckpt = torch.load(PATH, map_location="cpu", weights_only=True)
    assert ckpt["format"] == FORMAT and "optimizer" not in ckpt["extra"]
    model = NePhiModel.load(PATH)
    assert model.config() == ckpt["config"]
    assert model.cfg.ndim == 2 and model.input_shape == (128, 128) and model.antialias
    train = ckpt["extra"]["train"]
    assert train["data"] == "general2d" and train["shape"] == [128, 128] and train["truth_weight"] > 0
    assert ckpt["extra"]["step"] == train["steps"]  # a finished run, not a checkpoint half-way
    # the validation on held-out images, recorded by training, ends better than the identity
    last = ckpt["extra"]["validation"][-1]
    assert last["epe"] < last["epe_before"] and last["fold_percent"] == 0.0


def test_default_model_is_general2d_in_2d_only(monkeypatch, tmp_path):
    assert weights.default_model(2) == "general2d"
    assert weights.default_model(3) is None
    monkeypatch.setitem(weights.BUILTIN, "general2d", tmp_path / "missing.pt")
    assert weights.default_model(2) is None  # an installation without the file has no default


def test_predict_and_refine_improve_ncc_on_a_held_out_image(held_out_pair):
    fixed, moving, truth = held_out_pair
    model = NePhiModel.load(PATH)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ncc0 = _ncc(moving, fixed)
    epe0 = float(np.sqrt((truth**2).sum(0)).mean())
    pred = napari_nephi.register(fixed, moving, method="nephi", mode="predict", weights=model, device="cpu")
    refined = napari_nephi.register(
        fixed, moving, method="nephi", mode="predict+refine", weights=model, iterations=30, device="cpu"
    )
    ncc1, ncc2 = _ncc(pred.warped, fixed), _ncc(refined.warped, fixed)
    # the same warp computed independently (scipy) from the engine's displacement
    grid = np.mgrid[: fixed.shape[0], : fixed.shape[1]].astype(np.float64)
    u = pred.transform.displacement(fixed.shape)
    inside = (slice(8, -8),) * 2  # borders: points mapped outside are padded differently
    by_scipy = ndimage.map_coordinates(moving, grid + u, order=1)
    np.testing.assert_allclose(by_scipy[inside], pred.warped[inside], atol=0.02)
    epe1 = float(np.sqrt(((u - truth) ** 2).sum(0)).mean())
    assert ncc1 > ncc0 + 0.02 and epe1 < 0.8 * epe0, (ncc0, ncc1, epe0, epe1)
    assert ncc2 > ncc1 + 0.005, (ncc1, ncc2)
    assert pred.metrics["folds"] == 0 and refined.metrics["folds"] == 0
    after = model.state_dict()  # refinement worked on a copy: the stored model is unchanged
    assert all(torch.equal(state[k], after[k]) for k in state)
