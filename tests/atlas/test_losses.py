"""Triplet and contrastive losses against plain-numpy loops and a hand computation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from napari_nephi.core.errors import InputError
from napari_nephi.engines.atlas.losses import (
    contrastive_loss,
    ordinal_loss,
    pairwise_distances,
    proxy_loss,
    triplet_loss,
)


def _dist(emb: np.ndarray) -> np.ndarray:
    n = len(emb)
    d = np.zeros((n, n))
    for i, j in itertools.product(range(n), range(n)):
        d[i, j] = np.sqrt(np.sum((emb[i] - emb[j]) ** 2))
    return d


def _roles(labels, a, j, k):
    """'pos', 'neg' or None: the role of sample j for anchor a."""
    if j == a:
        return None
    gap = abs(labels[j] - labels[a])
    if gap == 0:
        return "pos"
    return "neg" if gap > k else None


def _triplet_reference(emb, labels, margin, mining, k, squared=False):
    """The losses written out with loops, from their definitions."""
    d = _dist(emb) ** (2 if squared else 1)
    n = len(emb)
    losses = []
    for a in range(n):
        pos = [j for j in range(n) if _roles(labels, a, j, k) == "pos"]
        neg = [j for j in range(n) if _roles(labels, a, j, k) == "neg"]
        if not pos or not neg:
            continue
        if mining == "hard":
            losses.append(max(max(d[a, p] for p in pos) - min(d[a, q] for q in neg) + margin, 0.0))
            continue
        for p in pos:
            if mining == "semi-hard":
                further = [d[a, q] for q in neg if d[a, q] > d[a, p]]
                d_an = min(further) if further else max(d[a, q] for q in neg)
                losses.append(max(d[a, p] - d_an + margin, 0.0))
            else:
                for q in neg:
                    value = d[a, p] - d[a, q] + margin
                    if value > 0:
                        losses.append(value)
    return float(np.mean(losses)) if losses else 0.0


def _contrastive_reference(emb, labels, margin, k):
    d = _dist(emb)
    terms = []
    for i, j in itertools.combinations(range(len(emb)), 2):
        role = _roles(labels, i, j, k)
        if role == "pos":
            terms.append(0.5 * d[i, j] ** 2)
        elif role == "neg":
            terms.append(0.5 * max(margin - d[i, j], 0.0) ** 2)
    return float(np.mean(terms))


def test_pairwise_distances_match_loops():
    emb = np.random.default_rng(3).normal(size=(7, 5))
    got = pairwise_distances(torch.tensor(emb)).numpy()
    np.testing.assert_allclose(got, _dist(emb), atol=1e-12)


def test_semi_hard_and_hard_by_hand():
    # points on a line: d01=1, d02=1.5, d03=3, d12=0.5, d13=2, d23=1.5; margin 0.2
    emb = torch.tensor([[0.0], [1.0], [1.5], [3.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    # pairs (0,1): semi-hard negative 2 (1.5 > 1) -> 0; (1,0): negative 3 (2 > 1) -> 0;
    # (2,3): no negative further than 1.5 -> the farthest, 0 at 1.5 -> 0.2; (3,2): negative 1 (2) -> 0
    assert triplet_loss(emb, labels, margin=0.2).item() == pytest.approx(0.2 / 4)
    # hard: anchors 1 (1 - 0.5 + 0.2 = 0.7) and 2 (1.5 - 0.5 + 0.2 = 1.2) contribute, 0 and 3 do not
    assert triplet_loss(emb, labels, margin=0.2, mining="hard").item() == pytest.approx(1.9 / 4)
    # all: the triplets with a positive loss are (1,0,2) 0.7, (2,3,0) 0.2, (2,3,1) 1.2 -> mean of three
    assert triplet_loss(emb, labels, margin=0.2, mining="all").item() == pytest.approx(2.1 / 3)


@pytest.mark.parametrize("mining", ["semi-hard", "hard", "all"])
@pytest.mark.parametrize("k", [0, 1, 2])
@pytest.mark.parametrize("seed", range(4))
def test_triplet_matches_reference_loops(mining, k, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 6, size=12)
    emb = rng.normal(size=(12, 3))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb[-1] = emb[0]  # a tie: strict d_an > d_ap must hold
    margin = float(rng.uniform(0.1, 1.0))
    squared = seed % 2 == 1
    got = triplet_loss(
        torch.tensor(emb),
        torch.tensor(labels),
        margin=margin,
        mining=mining,
        exclude_within=k,
        squared=squared,
    )
    assert got.item() == pytest.approx(_triplet_reference(emb, labels, margin, mining, k, squared), abs=1e-10)


def test_semi_hard_on_a_training_sized_batch():
    # 32 plates x 4 views, as a training step sees them, clustered so both semi-hard branches occur
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(32), 4)
    emb = rng.normal(size=(32, 8))[labels] + 0.6 * rng.normal(size=(128, 8))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    got = triplet_loss(torch.tensor(emb), torch.tensor(labels), margin=0.3, exclude_within=1)
    assert got.item() == pytest.approx(_triplet_reference(emb, labels, 0.3, "semi-hard", 1), abs=1e-10)
    assert got.item() > 0


@pytest.mark.parametrize("k", [0, 1])
@pytest.mark.parametrize("seed", range(3))
def test_contrastive_matches_reference_loop(k, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, size=10)
    emb = rng.normal(size=(10, 4))
    got = contrastive_loss(torch.tensor(emb), labels, margin=1.5, exclude_within=k)
    assert got.item() == pytest.approx(_contrastive_reference(emb, labels, 1.5, k), abs=1e-10)


def test_contrastive_by_hand():
    emb = torch.tensor([[0.0, 0.0], [0.6, 0.8], [0.0, 0.5]], dtype=torch.float64)
    # pairs: (0,1) positive d=1 -> 0.5; (0,2) negative d=0.5 -> 0.5 * 0.5^2; (1,2) negative d=sqrt(0.45)
    d12 = np.sqrt(0.36 + 0.09)
    expected = (0.5 + 0.125 + 0.5 * max(1.0 - d12, 0) ** 2) / 3
    assert contrastive_loss(emb, [4, 4, 7], margin=1.0).item() == pytest.approx(expected)


def test_exclude_within_removes_neighbours():
    # two samples of plate 3, one of its neighbour plate 4 just beyond them, one of plate 9 far away
    emb = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.15, 0.0], [0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([3, 3, 4, 9])
    for mining in ("semi-hard", "hard", "all"):
        pushed = triplet_loss(emb, labels, margin=0.5, mining=mining)
        kept = triplet_loss(emb, labels, margin=0.5, mining=mining, exclude_within=1)
        assert pushed.item() > 0.2  # plate 4 is a negative within the margin of both plate-3 samples
        assert kept.item() == pytest.approx(0.0)  # only plate 9 is a negative, far beyond the margin
    pushed = contrastive_loss(emb, labels, margin=1.0)
    kept = contrastive_loss(emb, labels, margin=1.0, exclude_within=1)
    assert kept.item() < pushed.item()
    # with neighbours excluded the pairs are (0,1) positive and the three with plate 9
    d = _dist(emb.numpy())
    expected = (0.5 * d[0, 1] ** 2 + sum(0.5 * max(1 - d[i, 3], 0) ** 2 for i in range(3))) / 4
    assert kept.item() == pytest.approx(expected)


@pytest.mark.parametrize("mining", ["semi-hard", "hard", "all"])
def test_gradients_finite_when_embeddings_coincide(mining):
    base = torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    emb = torch.cat([base, base[:2]]).requires_grad_()  # rows 6, 7 equal rows 0, 1
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 2])
    loss = triplet_loss(emb, labels, margin=0.5, mining=mining) + contrastive_loss(emb, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(emb.grad).all()
    assert emb.grad.abs().sum() > 0


@pytest.mark.parametrize("mining", ["semi-hard", "hard"])
def test_gradients_match_a_loop_written_in_torch(mining):
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, size=10)
    start = rng.normal(size=(10, 3))
    ours = torch.tensor(start, requires_grad=True)
    triplet_loss(ours, labels, margin=0.4, mining=mining).backward()
    ref = torch.tensor(start, requires_grad=True)
    d = pairwise_distances(ref)
    terms = []
    for a in range(10):
        pos = [j for j in range(10) if j != a and labels[j] == labels[a]]
        neg = [j for j in range(10) if labels[j] != labels[a]]
        if not pos or not neg:
            continue
        if mining == "hard":
            hardest = max(pos, key=lambda j: d[a, j].item())
            nearest = min(neg, key=lambda j: d[a, j].item())
            terms.append(torch.relu(d[a, hardest] - d[a, nearest] + 0.4))
            continue
        for p in pos:
            further = [j for j in neg if d[a, j] > d[a, p]]
            q = (
                min(further, key=lambda j: d[a, j].item())
                if further
                else max(neg, key=lambda j: d[a, j].item())
            )
            terms.append(torch.relu(d[a, p] - d[a, q] + 0.4))
    torch.stack(terms).mean().backward()
    assert ours.grad.abs().sum() > 0
    torch.testing.assert_close(ours.grad, ref.grad)


def test_no_valid_pair_gives_zero_with_a_graph():
    emb = torch.randn(3, 4, requires_grad=True)
    loss = triplet_loss(emb, [0, 1, 2])  # no positives
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(emb.grad, torch.zeros_like(emb))


def test_bad_arguments():
    emb = torch.randn(4, 3)
    with pytest.raises(InputError, match="mining must be one of"):
        triplet_loss(emb, [0, 0, 1, 1], mining="hardest")
    with pytest.raises(InputError, match="one per embedding"):
        triplet_loss(emb, [0, 0, 1])
    with pytest.raises(InputError, match="whole numbers"):
        contrastive_loss(emb, [0.0, 0.5, 1.0, 1.0])
    with pytest.raises(InputError, match="margin must be greater than 0"):
        triplet_loss(emb, [0, 0, 1, 1], margin=-0.1)
    with pytest.raises(InputError, match="exclude_within must be at least 0"):
        triplet_loss(emb, [0, 0, 1, 1], exclude_within=-1)
    with pytest.raises(InputError, match=r"\(B, D\) with B >= 2"):
        triplet_loss(torch.randn(1, 3), [0])


def _ordinal_loop(emb: np.ndarray, labels, margin: float, reach: int) -> float:
    """Mean positive hinge over (a, j, k) with capped gaps g_j < g_k, g_j < reach, all distinct."""
    d, hinges = _dist(emb), []
    for a, j, k in itertools.product(range(len(labels)), repeat=3):
        if len({a, j, k}) < 3:
            continue
        gj, gk = (min(abs(labels[i] - labels[a]), reach) for i in (j, k))
        if gj < gk and gj < reach:
            h = d[a, j] - d[a, k] + margin * (gk - gj) / reach
            if h > 0:
                hinges.append(h)
    return float(np.mean(hinges)) if hinges else 0.0


@pytest.mark.parametrize("seed, reach", [(0, 3), (1, 8)])
def test_ordinal_loss_matches_reference_loop(seed, reach):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 12, 10).tolist()
    emb = rng.normal(size=(10, 5))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    got = ordinal_loss(torch.tensor(emb), labels, margin=0.3, reach=reach).item()
    assert got > 0
    assert got == pytest.approx(_ordinal_loop(emb, labels, 0.3, reach), rel=1e-6)


def test_ordinal_loss_is_zero_when_distance_follows_plate_distance():
    # embeddings on a line at their plate positions: farther plates are always farther away
    labels = [0, 0, 1, 2, 4, 7]
    emb = torch.tensor([[float(p), 0.0] for p in labels], requires_grad=True)
    assert ordinal_loss(emb, labels, margin=0.5, reach=4).item() == 0.0
    # swap two plates' places: the order breaks and the loss rises
    swapped = torch.tensor([[0.0, 0], [0, 0], [4, 0], [2, 0], [1, 0], [7, 0]])
    assert ordinal_loss(swapped, labels, margin=0.5, reach=4).item() > 0
    with pytest.raises(InputError, match="reach must be at least 1"):
        ordinal_loss(emb, labels, reach=0)


def _proxy_loop(emb: np.ndarray, labels, proxies: np.ndarray, scale: float, sigma: float) -> float:
    """The soft-label proxy loss written out per sample and plate."""
    unit = proxies / np.linalg.norm(proxies, axis=1, keepdims=True)
    total = 0.0
    for e, y in zip(emb, labels):
        logits = [scale * float(e @ p) for p in unit]
        top = max(logits)
        log_z = top + np.log(sum(np.exp(v - top) for v in logits))
        if sigma > 0:
            weights = [np.exp(-((j - y) ** 2) / (2 * sigma**2)) for j in range(len(unit))]
        else:
            weights = [float(j == y) for j in range(len(unit))]
        total -= sum(w / sum(weights) * (v - log_z) for w, v in zip(weights, logits))
    return total / len(emb)


@pytest.mark.parametrize("sigma", [0.0, 1.0, 2.5])
def test_proxy_loss_matches_reference_loop(sigma):
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(9, 4))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    proxies = rng.normal(size=(6, 4))
    labels = rng.integers(0, 6, 9)
    got = proxy_loss(torch.tensor(emb), labels, torch.tensor(proxies), scale=7.0, sigma=sigma).item()
    assert got == pytest.approx(_proxy_loop(emb, labels, proxies, 7.0, sigma), rel=1e-9)


def test_proxy_loss_prefers_the_true_plate_then_its_neighbours():
    proxies = torch.eye(5)
    labels = torch.tensor([2, 2])
    losses = [proxy_loss(proxies[[j, j]], labels, proxies, scale=10.0, sigma=1.0).item() for j in range(5)]
    assert losses[1] == pytest.approx(losses[3]) and losses[0] == pytest.approx(losses[4])
    assert losses[2] < losses[1] < losses[0]
    # gradients reach both the embeddings and the proxies
    emb = torch.nn.functional.normalize(torch.randn(3, 5, dtype=torch.float64), dim=1).requires_grad_()
    learnt = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    proxy_loss(emb, [0, 2, 4], learnt).backward()
    assert emb.grad.abs().sum() > 0 and learnt.grad.abs().sum() > 0


def test_proxy_loss_bad_arguments():
    emb = torch.nn.functional.normalize(torch.randn(4, 3), dim=1)
    with pytest.raises(InputError, match="plate indices 0-2"):
        proxy_loss(emb, [0, 1, 2, 3], torch.randn(3, 3))
    with pytest.raises(InputError, match=r"Proxies must be a tensor \(n_plates, 3\)"):
        proxy_loss(emb, [0, 1, 2, 0], torch.randn(3, 4))
    with pytest.raises(InputError, match="scale must be greater than 0"):
        proxy_loss(emb, [0, 1, 2, 0], torch.randn(3, 3), scale=0.0)
