"""Training pairs of the general 2D model: held-out images, true fields, the endpoint-error loss."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_nephi.core.errors import InputError
from napari_nephi.engines.nephi.encoder import FEATURES, flow_features
from napari_nephi.engines.nephi.field import FieldConfig
from napari_nephi.engines.nephi.model import NePhiModel
from napari_nephi.engines.nephi.shipped_pairs import (
    HELD_OUT,
    TRAINING,
    ShippedPairs,
    _dihedral_field,
    random_field,
    shipped_image,
)
from napari_nephi.engines.nephi.train import train, truth_loss
from napari_nephi.engines.nephi.weights import BUILTIN


def _compose_residual(u, w):
    """``x + u(x) + w(x + u(x)) - x`` on every pixel (scipy, linear): 0 where w inverts u."""
    grid = np.mgrid[: u.shape[1], : u.shape[2]].astype(np.float64)
    p = grid + u
    return u + np.stack([ndimage.map_coordinates(w[i], p, order=1, mode="nearest") for i in range(2)])


def test_held_out_images_are_never_training_images():
    assert not set(HELD_OUT) & set(TRAINING)
    for name in HELD_OUT + TRAINING:
        img = shipped_image(name)
        for im in img if isinstance(img, tuple) else (img,):
            assert im.ndim == 2 and im.dtype == np.float32 and 0 <= im.min() < im.max() <= 1
    with pytest.raises(InputError, match="Unknown shipped image 'kidney'"):
        shipped_image("kidney")  # not in the wheel: it would be downloaded


def test_flipped_and_transposed_fields_stay_inverse_pairs():
    u, u_inv = random_field(48, seed=5)
    assert np.abs(u).max() > 0.2
    for k in range(8):
        a, b = _dihedral_field(u, k), _dihedral_field(u_inv, k)
        assert np.abs(_compose_residual(a, b))[:, 2:-2, 2:-2].max() < 0.02
    # a flip of the rows reverses the row component and mirrors the field
    np.testing.assert_allclose(_dihedral_field(u, 1)[0], -u[0][::-1])
    np.testing.assert_allclose(_dihedral_field(u, 4)[1], u[0].T)


def test_batches_carry_the_true_pull_back_field():
    fixed, moving, truth = ShippedPairs((48, 48), val_pairs=0, bank=4).batch(3, np.random.default_rng(1))
    assert fixed.shape == moving.shape == (3, 1, 48, 48) and truth.shape == (3, 4, 48, 48)
    for t in truth.numpy():
        assert np.abs(_compose_residual(t[:2], t[2:]))[:, 2:-2, 2:-2].max() < 0.02


class _ShiftMaps:
    """Maps moving every point by a constant (normalised coordinates), the backward one undoing it."""

    def __init__(self, shift):
        self.shift = torch.as_tensor(shift, dtype=torch.float32)

    def forward(self, x):
        return x + self.shift

    def backward(self, x):
        return x - self.shift


def test_truth_loss_is_the_squared_endpoint_error_in_voxels():
    shape = (33, 17)  # normalised -> voxels: (n - 1) / 2 = 16 and 8
    u = np.zeros((1, 4, *shape), np.float32)
    u[0, 0], u[0, 1], u[0, 2], u[0, 3] = 1.5, -2.0, -1.5, 2.0  # a shift (1.5, -2) voxels, its inverse
    truth = torch.as_tensor(u)
    gen = torch.Generator().manual_seed(0)
    exact = _ShiftMaps([1.5 / 16, -2.0 / 8])
    assert float(truth_loss(exact, truth, 64, gen)) < 1e-10
    zero = _ShiftMaps([0.0, 0.0])
    assert float(truth_loss(zero, truth, 64, gen)) == pytest.approx(2 * (1.5**2 + 2.0**2), rel=1e-5)


def test_training_with_the_true_field_reports_the_held_out_endpoint_error(tmp_path):
    result = train(
        "general2d",
        tmp_path / "g.pt",
        shape=(32, 32),
        steps=2,
        batch_size=2,
        sample_points=64,
        reg_points=8,
        truth_weight=1.0,
        antialias=True,
        val_pairs=2,
        val_every=2,
        field_options={"hidden": 16, "layers": 2, "n_frequencies": 8, "global_dim": 8, "local_dim": 4},
        channels=(8, 8),
        local_level=2,
        device="cpu",
    )
    last = result.validation[-1]
    assert last["pairs"] == 2 and last["epe_before"] > 0 and np.isfinite(last["epe"])
    assert result.model.antialias and result.model.config()["antialias"] is True
    with pytest.raises(InputError, match="needs pairs with a known field"):
        train("tc", tmp_path / "t.pt", shape=(32, 32), steps=1, truth_weight=1.0, device="cpu")


def test_flow_features_are_the_demons_terms():
    rng = np.random.default_rng(0)
    f, m = (torch.as_tensor(rng.random((1, 1, 9, 11), dtype=np.float32)) for _ in range(2))
    h = flow_features(f, m).numpy()[0]
    assert h.shape[0] == FEATURES["flow"](2) == 5
    diff = (f - m).numpy()[0, 0]
    gy, gx = np.gradient(0.5 * (f + m).numpy()[0, 0])
    np.testing.assert_allclose(h[2], diff, atol=1e-6)
    # inside; on the edges numpy takes one-sided differences, replicate padding half of one
    np.testing.assert_allclose(h[3, 1:-1], (diff * gy)[1:-1], atol=1e-6)
    np.testing.assert_allclose(h[4, :, 1:-1], (diff * gx)[:, 1:-1], atol=1e-6)
    assert flow_features(torch.ones(1, 1, 4, 5, 6), torch.zeros(1, 1, 4, 5, 6)).shape == (1, 6, 4, 5, 6)


def test_encoder_inputs_are_stored_and_older_files_load_as_image_pairs():
    with pytest.raises(InputError, match="Unknown encoder features 'optical'"):
        NePhiModel(FieldConfig(ndim=2), features="optical")
    model = NePhiModel(
        FieldConfig(ndim=2, hidden=8, layers=1), channels=(4, 4), local_level=2, features="flow"
    )
    assert NePhiModel.from_config(model.config()).encoder.features == "flow"
    old = NePhiModel.load(BUILTIN["tc"])  # saved before the option existed
    assert old.encoder.features == "pair" and old.antialias is False
