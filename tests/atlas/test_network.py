"""The embedding network: shape, normalisation, config round trip, weights round trip, embed()."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_nephi.core.errors import InputError
from napari_nephi.engines.atlas.network import EmbeddingConfig, EmbeddingNet, embed, embed_batch
from napari_nephi.engines.atlas.preprocess import prepare_batch

SMALL = EmbeddingConfig(input_size=32, widths=(8, 16), embedding_dim=12, hidden=24)


def _blobs(n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` images of different sizes, each a bright ellipse with a darker spot on black."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(40, 90, size=2))
        yy, xx = np.mgrid[:h, :w]
        cy, cx = h / 2 + rng.uniform(-5, 5), w / 2 + rng.uniform(-5, 5)
        img = (((yy - cy) / (0.35 * h)) ** 2 + ((xx - cx) / (0.35 * w)) ** 2 < 1).astype(np.float32)
        sy, sx = cy + rng.uniform(-8, 8), cx + rng.uniform(-8, 8)
        img[(yy - sy) ** 2 + (xx - sx) ** 2 < 30] *= 0.4
        out.append(img)
    return out


def test_output_is_normalised_with_configured_dim():
    torch.manual_seed(0)
    net = EmbeddingNet(SMALL).eval()
    out = net(torch.rand(5, 1, 32, 32))
    assert out.shape == (5, 12)
    np.testing.assert_allclose(out.norm(dim=1).detach().numpy(), 1.0, atol=1e-5)


def test_default_net_is_compact():
    net = EmbeddingNet(EmbeddingConfig())
    n = sum(p.numel() for p in net.parameters())
    assert 300_000 <= n <= 1_000_000
    assert net(torch.rand(2, 1, 128, 128)).shape == (2, 64)


def test_config_round_trip_and_checks():
    cfg = EmbeddingConfig(
        input_size=96, widths=(8, 16, 32), blocks_per_stage=2, embedding_dim=32, dropout=0.1
    )
    back = EmbeddingConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and isinstance(back.widths, tuple)
    with pytest.raises(InputError, match="Unknown embedding config keys: 'depth'"):
        EmbeddingConfig.from_dict({**cfg.to_dict(), "depth": 3})
    with pytest.raises(InputError, match="dropout must be at most 0.95"):
        EmbeddingConfig(dropout=2.0)
    with pytest.raises(InputError, match="widths needs 1 to 6"):
        EmbeddingConfig(widths=())
    with pytest.raises(InputError, match="embedding_dim must be a whole number"):
        EmbeddingConfig(embedding_dim=6.5)


def test_state_dict_round_trip_with_weights_only(tmp_path):
    torch.manual_seed(1)
    net = EmbeddingNet(SMALL)
    with torch.no_grad():  # move norm layers off their initial values so the round trip is not trivial
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "config.json").write_text(json.dumps(net.config.to_dict()))
    cfg = EmbeddingConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    other = EmbeddingNet(cfg)
    other.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    x = torch.rand(3, 1, 32, 32)
    net.eval(), other.eval()
    assert torch.equal(net(x), other(x))


def test_forward_checks_its_input():
    with pytest.raises(InputError, match=r"\(B, 1, S, S\)"):
        EmbeddingNet(SMALL)(torch.rand(2, 3, 32, 32))


def test_embed_prepares_raw_images_and_restores_the_net():
    torch.manual_seed(2)
    net = EmbeddingNet(SMALL).train()
    images = _blobs(5)
    got = embed(net, images, batch_size=2)
    assert net.training  # mode restored
    assert got.dtype == np.float32 and got.shape == (5, 12)
    net.eval()
    with torch.no_grad():
        expected = net(prepare_batch(images, 32)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # GroupNorm: an embedding does not depend on the other images of its batch
    np.testing.assert_allclose(embed(net, images[3:4]), got[3:4], atol=1e-5)
    # eval mode: dropout is off, so two runs agree
    np.testing.assert_array_equal(embed(net, images), embed(net, images))


def test_mirror_embedding_is_the_same_for_an_image_and_its_mirror():
    torch.manual_seed(3)
    net = EmbeddingNet(SMALL).eval()
    images = _blobs(3)
    x = prepare_batch(images, 32)
    with torch.no_grad():
        plain, flipped = net(x), net(x.flip(-1))
        assert not torch.allclose(plain, flipped, atol=1e-3)  # the net alone is not symmetric
        both = embed_batch(net, x, mirror=True)
        torch.testing.assert_close(both, embed_batch(net, x.flip(-1), mirror=True))
        torch.testing.assert_close(embed_batch(net, x), plain)
    # independent computation: the normalised sum of the two embeddings; embed() does the same
    expected = (plain + flipped).numpy()
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(both.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(embed(net, images, mirror=True), expected, atol=1e-5)


def test_embed_refuses_bad_input():
    net = EmbeddingNet(SMALL)
    with pytest.raises(InputError, match="No images given"):
        embed(net, [])
    with pytest.raises(InputError, match="Wrap it in a list"):
        embed(net, _blobs(1)[0])
    with pytest.raises(InputError, match="image 1 contains NaN"):
        embed(net, [_blobs(1)[0], np.full((40, 40), np.nan)])
    with pytest.raises(InputError, match="batch_size must be at least 1"):
        embed(net, _blobs(1), batch_size=0)
