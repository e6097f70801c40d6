"""Multi-magnification networks: shapes, identity start, affine fields, saving and loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_nephi.core.errors import InputError, UnsupportedFileError
from napari_nephi.engines.histology.networks import (
    MultiMagNet,
    NetConfig,
    affine_displacement,
    fit_affine,
    load_model,
    save_model,
    shipped_path,
)
from napari_nephi.engines.histology.predict import warp

SMALL = {"patch": 64, "widths": (8, 16, 32, 64)}


def perturbed(cfg: NetConfig, seed: int = 0) -> MultiMagNet:
    torch.manual_seed(seed)
    net = MultiMagNet(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def inputs(n=3, p=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 2, p, p, generator=g), torch.rand(n, 2, p, p, generator=g)


@pytest.mark.parametrize("kind", ["affine", "nonrigid"])
@pytest.mark.parametrize("mags", [1, 2])
def test_untrained_nets_output_the_identity(kind, mags):
    net = MultiMagNet(NetConfig(kind=kind, magnifications=mags, **SMALL)).eval()
    high, low = inputs()
    with torch.no_grad():
        out = net(high, low if mags == 2 else None)
    if kind == "affine":
        assert out.shape == (3, 2, 3)
        torch.testing.assert_close(out, torch.eye(2, 3).expand(3, -1, -1))
        assert float(affine_displacement(out, 64).abs().max()) < 1e-6
    else:
        assert out.shape == (3, 2, 64, 64) and float(out.abs().max()) == 0.0


def test_zero_affine_output_gives_identity_and_affine_fields_are_fitted_exactly():
    mats = fit_affine(torch.zeros(2, 2, 64, 64))
    torch.testing.assert_close(mats, torch.eye(2, 3).expand(2, -1, -1))
    field = affine_displacement(mats, 64)
    image = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    np.testing.assert_allclose(warp(image, field[0].numpy()), image, atol=1e-5)
    known = torch.tensor([[[1.03, -0.04, 2.5], [0.05, 0.98, -1.0]]], dtype=torch.float64)
    torch.testing.assert_close(fit_affine(affine_displacement(known, 48)), known)
    rng = np.random.default_rng(1)  # least squares: numpy's lstsq on the same grid agrees
    u = torch.tensor(rng.normal(size=(1, 2, 16, 16)))
    r = np.stack(np.mgrid[:16, :16], -1).reshape(-1, 2) - 7.5
    design = np.concatenate([r, np.ones((256, 1))], 1)
    coef = np.linalg.lstsq(design, u[0].reshape(2, -1).numpy().T, rcond=None)[0]  # (3, 2)
    expected = np.concatenate([np.eye(2) + coef[:2].T, coef[2:].T], 1)
    np.testing.assert_allclose(fit_affine(u)[0].numpy(), expected, atol=1e-10)


def test_affine_displacement_of_a_quarter_turn():
    p = 8
    mat = torch.tensor([[[0.0, -1.0, 0.5], [1.0, 0.0, 0.0]]])  # (y, x) -> (-x + 0.5, y) about the centre
    field = affine_displacement(mat, p)[0].numpy()
    c = (p - 1) / 2
    for y, x in [(0, 0), (3, 7), (7, 2)]:
        ry, rx = y - c, x - c
        np.testing.assert_allclose(field[:, y, x], [-rx + 0.5 - ry, ry - rx], atol=1e-6)


@pytest.mark.parametrize("kind", ["affine", "nonrigid"])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, kind):
    net = perturbed(NetConfig(kind=kind, magnifications=2, **SMALL))
    high, low = inputs()
    path = save_model(net, tmp_path / "net.pt")
    assert not list(tmp_path.glob(".net.pt*"))  # nothing temporary left
    raw = torch.load(path, weights_only=True)
    assert raw["config"] == {"kind": kind, "magnifications": 2, "patch": 64, "widths": [8, 16, 32, 64]}
    loaded = load_model(path)
    assert not loaded.training
    with torch.no_grad():
        expected, got = net(high, low), loaded(high, low)
    assert torch.equal(expected, got) and float(expected.abs().max()) > 0
    half = load_model(save_model(net, tmp_path / "half.pt", half=True))
    with torch.no_grad():
        torch.testing.assert_close(half(high, low), expected, atol=0.05, rtol=0.05)
    assert (tmp_path / "half.pt").stat().st_size < 0.6 * path.stat().st_size


def test_config_round_trip_and_bad_settings():
    cfg = NetConfig(kind="affine", magnifications=1, patch=96, widths=(8, 16, 24, 32))
    assert NetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(InputError, match="kind"):
        NetConfig(kind="rigid")
    with pytest.raises(InputError, match="magnifications"):
        NetConfig(magnifications=3)
    with pytest.raises(InputError, match="multiple of 16"):
        NetConfig(patch=100)
    with pytest.raises(InputError, match="multiples of 4"):
        NetConfig(widths=(8, 16, 30, 64))
    with pytest.raises(InputError, match="Unknown network settings"):
        NetConfig.from_dict({"kind": "affine", "depth": 5})


def test_bad_network_inputs():
    net = MultiMagNet(NetConfig(**SMALL))
    high, low = inputs()
    with pytest.raises(InputError, match=r"\(N, 2, 64, 64\)"):
        net(high[:, :1], low)
    with pytest.raises(InputError, match="low-magnification"):
        net(high)
    with pytest.raises(InputError, match=r"\(N, 2, 3\)"):
        affine_displacement(torch.zeros(2, 3, 3), 64)


def test_unreadable_model_files(tmp_path):
    with pytest.raises(UnsupportedFileError, match="does not exist"):
        load_model(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(UnsupportedFileError, match="Cannot read model file"):
        load_model(junk)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(UnsupportedFileError, match="not a histology network"):
        load_model(other)
    with pytest.raises(UnsupportedFileError, match="does not exist"):
        save_model(MultiMagNet(NetConfig(**SMALL)), tmp_path / "no" / "net.pt")
    with pytest.raises(UnsupportedFileError, match="is a folder; give the name of the model file"):
        save_model(MultiMagNet(NetConfig(**SMALL)), tmp_path)
    with pytest.raises(InputError, match="kind"):
        shipped_path("rigid")
