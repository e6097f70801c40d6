"""The shipped Triangles-and-Circles model: predict and refine work out of the box, file untouched."""

import hashlib

import pytest

import napari_nephi
from napari_nephi.core.errors import DimensionMismatchError
from napari_nephi.engines.nephi.model import NePhiModel
from napari_nephi.engines.nephi.train import VALIDATION_SEED, dice
from napari_nephi.engines.nephi.weights import BUILTIN
from napari_nephi.synthetic import tc_pair


@pytest.fixture(scope="module")
def held_out_pair():
    # seeds >= VALIDATION_SEED are never drawn for training pairs
    return tc_pair(seed=VALIDATION_SEED + 20_000, size=128)


def test_shipped_model_loads_safely_with_its_config():
    path = BUILTIN["tc"]
    assert path.is_file() and path.stat().st_size < 2 * 2**20  # small enough to ship
    model = NePhiModel.load(path)  # weights_only=True inside
    assert model.cfg.ndim == 2 and model.input_shape == (64, 64)


def test_predict_then_refine_improve_dice_and_leave_the_model_unchanged(held_out_pair):
    fixed, moving, fl, ml = held_out_pair
    path = BUILTIN["tc"]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    before = dice(ml, fl)
    pred = napari_nephi.register(fixed, moving, method="nephi", mode="predict", weights="tc", device="cpu")
    d_pred = dice(pred.transform.warp_labels(ml), fl)
    refined = napari_nephi.register(
        fixed, moving, method="nephi", mode="predict+refine", weights="tc", iterations=40, device="cpu"
    )
    d_ref = dice(refined.transform.warp_labels(ml), fl)
    assert d_pred > before + 0.05, (before, d_pred)
    assert d_ref > d_pred + 0.02, (d_pred, d_ref)
    assert pred.metrics["folds"] == 0 and refined.metrics["folds"] == 0
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_shipped_2d_model_refuses_a_volume():
    import numpy as np

    vol = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    with pytest.raises(DimensionMismatchError, match="2D but the images are 3D"):
        napari_nephi.register(vol, vol, method="nephi", mode="predict", weights="tc", device="cpu")
