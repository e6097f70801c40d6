"""Network pieces: encoder shapes, identity at initialisation, model files, predict modes."""

import numpy as np
import pytest
import torch

import napari_nephi
from napari_nephi.engines.nephi.encoder import Encoder
from napari_nephi.engines.nephi.field import FieldConfig, NeuralDeformationField, zero_codes
from napari_nephi.engines.nephi.model import NePhiModel


@pytest.mark.parametrize("d, shape", [(2, (64, 48)), (3, (32, 32, 16))])
def test_encoder_global_and_local_codes(d, shape):
    enc = Encoder(d, global_dim=12, local_dim=5, channels=(4, 8, 8, 8), local_level=3)
    glob, loc = enc(torch.rand(2, 1, *shape), torch.rand(2, 1, *shape))
    assert glob.shape == (2, 12)
    assert loc.shape == (2, 5, *[s // 8 for s in shape])


@pytest.mark.parametrize("representation", ["modulated", "siren", "relu_fourier"])
@pytest.mark.parametrize("d", [2, 3])
def test_fresh_field_is_identity_and_learns(representation, d):
    cfg = FieldConfig(ndim=d, representation=representation, hidden=16, layers=2, global_dim=4, local_dim=3)
    field = NeuralDeformationField(cfg)
    codes = zero_codes(cfg, (4,) * d)
    x = torch.rand(1, 20, d) * 2 - 1
    for direction in ("forward", "backward"):
        assert torch.equal(field.map(x, codes, direction), x)
    # one gradient step on a target displacement moves the field off the identity
    opt = torch.optim.Adam(field.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        ((field.displacement(x, codes) - 0.1) ** 2).mean().backward()
        opt.step()
    assert float((field.map(x, codes) - x).detach().abs().max()) > 0


def test_same_seed_same_field_without_touching_global_rng():
    cfg = FieldConfig(ndim=2, hidden=8, layers=2, seed=3)
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    a, b = NeuralDeformationField(cfg), NeuralDeformationField(cfg)
    assert torch.equal(torch.rand(3), before)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def _tiny_model(d=2):
    cfg = FieldConfig(ndim=d, hidden=16, layers=2, global_dim=8, local_dim=4)
    return NePhiModel(cfg, channels=(4, 8, 8), local_level=2)


def test_model_file_round_trip(tmp_path):
    model = _tiny_model()
    path = model.save(tmp_path / "m.pt")
    back = NePhiModel.load(path)
    assert back.config() == model.config()
    for (ka, va), (kb, vb) in zip(model.state_dict().items(), back.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(napari_nephi.UnsupportedFileError):
        NePhiModel.load(tmp_path / "bad.pt")


def test_predict_and_refine_leave_the_stored_model_unchanged(small_pair, tmp_path):
    fixed, moving = small_pair
    model = _tiny_model()
    path = model.save(tmp_path / "m.pt")
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    # an untrained model's last layers are zero: prediction is the identity
    pred = napari_nephi.register(fixed, moving, method="nephi", mode="predict", weights=model, device="cpu")
    assert np.abs(pred.transform.displacement()).max() == 0
    refined = napari_nephi.register(
        fixed,
        moving,
        method="nephi",
        mode="predict+refine",
        weights=str(path),
        iterations=25,
        sample_points=1024,
        reg_points=32,
        device="cpu",
    )
    assert refined.metrics["ncc_after"] > pred.metrics["ncc_after"]
    assert refined.settings["mode"] == "predict+refine" and refined.settings["weights"] == str(path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, stored[k]), k
    reloaded = NePhiModel.load(path)
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, stored[k]), k


def test_predict_rejects_a_model_of_the_wrong_dimension(small_pair):
    fixed, moving = small_pair
    with pytest.raises(napari_nephi.DimensionMismatchError):
        napari_nephi.register(fixed, moving, method="nephi", mode="predict", weights=_tiny_model(3))
