"""Metric-learning losses with online mining inside a batch: triplet (semi-hard, hard, all), contrastive.

Labels are plate indices. With ``exclude_within = k``, a sample whose plate is 1 to k plates away
from the anchor's is neither a positive nor a negative of that anchor: neighbouring plates are
nearly identical and must not be pushed apart.
"""

from __future__ import annotations

import torch

from napari_nephi.core.errors import InputError
from napari_nephi.core.options import check_bool, check_choice, check_float, check_int

MINING = ("semi-hard", "hard", "all")


def pairwise_distances(emb: torch.Tensor) -> torch.Tensor:
    """(B, B) Euclidean distances between the rows of ``emb`` (B, D); zero gradient where a distance is 0.

    Computed from the differences (not the |a|^2 + |b|^2 - 2ab expansion), so coinciding rows give
    exactly 0, the diagonal is exactly 0, and the gradient (a unit vector per pair) stays finite.
    """
    diff = emb[:, None, :] - emb[None, :, :]
    d2 = (diff * diff).sum(-1)
    positive = d2 > 0
    return torch.where(
        positive, torch.sqrt(torch.where(positive, d2, torch.ones_like(d2))), torch.zeros_like(d2)
    )


def _check(emb, labels, exclude_within) -> tuple[torch.Tensor, int]:
    if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[0] < 2:
        shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
        raise InputError(f"Embeddings must be a tensor (B, D) with B >= 2, got {shape}.")
    labels = torch.as_tensor(labels, device=emb.device)
    if labels.ndim != 1 or labels.shape[0] != emb.shape[0]:
        raise InputError(
            f"Labels must be one per embedding ({emb.shape[0]}), got shape {tuple(labels.shape)}."
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dtype.is_complex:
        raise InputError(f"Labels must be whole numbers (plate indices), got dtype {labels.dtype}.")
    return labels.long(), check_int("exclude_within", exclude_within, 0)


def _masks(labels: torch.Tensor, exclude_within: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) boolean (B, B) masks; row = anchor. Positives exclude the anchor itself."""
    gap = (labels[:, None] - labels[None, :]).abs()
    positive = gap == 0
    positive.fill_diagonal_(False)
    return positive, gap > exclude_within


def _zero(emb: torch.Tensor) -> torch.Tensor:
    """A zero loss still attached to the graph (a batch with no valid pair or triplet)."""
    return emb.sum() * 0.0


def triplet_loss(
    emb: torch.Tensor,
    labels,
    margin: float = 0.2,
    mining: str = "semi-hard",
    exclude_within: int = 0,
    *,
    squared: bool = False,
) -> torch.Tensor:
    """Triplet loss max(d_ap - d_an + margin, 0) with online mining in the batch.

    ``"semi-hard"`` (as TF-Addons TripletSemiHardLoss): for every anchor-positive pair, the negative
    with the smallest d_an > d_ap, or failing that the negative with the largest d_an; mean over
    all anchor-positive pairs. ``"hard"``: per anchor the hardest positive and hardest negative,
    mean over anchors. ``"all"``: mean over the valid triplets whose loss is positive.
    Anchors without any negative are skipped; a batch without a valid triplet gives 0.
    ``squared=True`` uses squared Euclidean distances, as TF-Addons' default ``"L_2"`` metric does
    (with its default margin 1.0 that is the authors' setting). Unlike TF-Addons, pairs whose anchor
    has no negative in the batch are skipped (TF-Addons counts them with d_an = 0), and "hard"
    averages over anchors that have a positive (TF-Addons over every anchor).
    """
    labels, exclude_within = _check(emb, labels, exclude_within)
    margin = check_float("margin", margin, 0.0, None, low_open=True)
    check_choice("mining", mining, MINING)
    check_bool("squared", squared)
    d = pairwise_distances(emb)
    if squared:
        d = d * d
    positive, negative = _masks(labels, exclude_within)
    has_negative = negative.any(dim=1)
    positive = positive & has_negative[:, None]
    if not positive.any():
        return _zero(emb)
    inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
    if mining == "hard":
        anchors = positive.any(dim=1)
        d_ap = torch.where(positive, d, -inf).amax(dim=1)
        d_an = torch.where(negative, d, inf).amin(dim=1)
        return torch.relu(d_ap - d_an + margin)[anchors].mean()
    if mining == "all":  # (a, p, n) cube
        valid = positive[:, :, None] & negative[:, None, :]
        losses = torch.relu(d[:, :, None] - d[:, None, :] + margin)[valid]
        hot = losses > 0
        return losses[hot].mean() if hot.any() else _zero(emb)
    # semi-hard: each anchor's negative distances sorted; the first one beyond d_ap, else the largest
    ordered = torch.where(negative, d, inf).sort(dim=1).values
    count = negative.sum(dim=1, keepdim=True)
    first = torch.searchsorted(ordered.detach().contiguous(), d.detach().contiguous(), right=True)
    beyond = first < count
    nearest = ordered.gather(1, first.clamp(max=d.shape[1] - 1))
    farthest = ordered.gather(1, (count - 1).clamp(min=0))
    chosen = torch.where(beyond, nearest, farthest.expand_as(nearest))
    return torch.relu(d - chosen + margin)[positive].mean()


def contrastive_loss(emb: torch.Tensor, labels, margin: float = 1.0, exclude_within: int = 0) -> torch.Tensor:
    """Contrastive loss (the paper's Eq. 1): d^2 / 2 for positive pairs, max(0, margin - d)^2 / 2 for
    negative pairs; mean over the pairs (i < j) that are either.
    """
    labels, exclude_within = _check(emb, labels, exclude_within)
    margin = check_float("margin", margin, 0.0, None, low_open=True)
    d = pairwise_distances(emb)
    positive, negative = _masks(labels, exclude_within)
    upper = torch.ones_like(positive).triu(diagonal=1)
    positive, negative = positive & upper, negative & upper
    if not (positive.any() or negative.any()):
        return _zero(emb)
    pos = 0.5 * d[positive] ** 2
    neg = 0.5 * torch.relu(margin - d[negative]) ** 2
    return torch.cat([pos, neg]).mean()


def ordinal_loss(emb: torch.Tensor, labels, margin: float = 0.2, reach: int = 8) -> torch.Tensor:
    """Ordinal ranking loss: embedding distance should grow with the plate distance.

    For every anchor ``a`` and samples ``j``, ``k`` with plate gaps ``g_j < g_k`` (``g = |label -
    label_a|``, capped at ``reach``; ``g_j < reach``) the hinge ``max(d_aj - d_ak + margin * (g_k -
    g_j) / reach, 0)``; mean over the triplets whose hinge is positive. So a plate 2 away is nearer
    than one 5 away, and errors become near-misses. Plates beyond ``reach`` need no order among
    themselves.
    """
    labels, _ = _check(emb, labels, 0)
    margin = check_float("margin", margin, 0.0, None, low_open=True)
    reach = check_int("reach", reach, 1)
    d = pairwise_distances(emb)
    gap = (labels[:, None] - labels[None, :]).abs().clamp(max=reach).to(d.dtype)
    eye = torch.eye(len(labels), dtype=torch.bool, device=d.device)
    near = (gap < reach) & ~eye  # (a, j)
    valid = near[:, :, None] & (gap[:, None, :] > gap[:, :, None]) & ~eye[:, None, :]
    hinge = torch.relu(d[:, :, None] - d[:, None, :] + margin * (gap[:, None, :] - gap[:, :, None]) / reach)
    losses = hinge[valid]
    hot = losses > 0
    return losses[hot].mean() if hot.any() else _zero(emb)


def proxy_loss(
    emb: torch.Tensor, labels, proxies: torch.Tensor, scale: float = 16.0, sigma: float = 1.0
) -> torch.Tensor:
    """Soft-label proxy loss: cross-entropy of cosine logits against one learnt proxy per plate.

    ``logits = scale * emb . normalise(proxies)^T`` (``(B, n_plates)``); the target of a sample of
    plate ``y`` is a Gaussian over the plates, ``exp(-(j - y)^2 / (2 sigma^2))`` normalised, so a
    neighbouring plate is a lesser error than a far one (plates are positions; ``sigma = 0``: one-hot).
    Every step compares each sample with every plate, not only those of its batch. ``emb`` rows are
    expected L2-normalised; labels must index ``proxies``' rows.
    """
    labels, _ = _check(emb, labels, 0)
    if not isinstance(proxies, torch.Tensor) or proxies.ndim != 2 or proxies.shape[1] != emb.shape[1]:
        shape = tuple(proxies.shape) if isinstance(proxies, torch.Tensor) else type(proxies).__name__
        raise InputError(f"Proxies must be a tensor (n_plates, {emb.shape[1]}), got {shape}.")
    if int(labels.min()) < 0 or int(labels.max()) >= proxies.shape[0]:
        raise InputError(
            f"Labels must be plate indices 0-{proxies.shape[0] - 1} (one proxy per plate), got "
            f"{int(labels.min())}-{int(labels.max())}."
        )
    scale = check_float("scale", scale, 0.0, 1000.0, low_open=True)
    sigma = check_float("sigma", sigma, 0.0, 1000.0)
    logits = scale * emb @ torch.nn.functional.normalize(proxies, dim=1).T
    plates = torch.arange(proxies.shape[0], device=emb.device, dtype=emb.dtype)
    gap = plates[None, :] - labels[:, None].to(emb.dtype)
    if sigma > 0:
        target = torch.softmax(-(gap * gap) / (2 * sigma * sigma), dim=1)
    else:
        target = (gap == 0).to(emb.dtype)
    return -(target * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
