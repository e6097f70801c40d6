"""Training option ``prefetch`` (session 34): the next step's fresh views are synthesised in a second
process while the network trains; the views and their order are the same, so are the weights."""

from __future__ import annotations

import pytest
import torch

from napari_nephi import InputError
from napari_nephi.engines.atlas.plates import Plates
from napari_nephi.engines.atlas.train import check_train_options, train_network

from .conftest import FAST_OPTIONS


def _train(reference, labels, **extra):
    plates = Plates.from_reference(reference, labels)
    options = check_train_options(
        {
            **FAST_OPTIONS,
            "steps": 6,
            "bank_views": 2,
            "validation_size": 8,
            "validate_every": 3,
            "threads": 1,
            **extra,
        }
    )
    return train_network(plates, options, device="cpu", seed=3)


def test_prefetch_trains_the_same_weights_bit_for_bit(toy_reference):
    reference, labels = toy_reference
    plain = _train(reference, labels)
    ahead = _train(reference, labels, prefetch=True)
    assert ahead.options["prefetch"] and not plain.options["prefetch"]
    assert [h["loss"] for h in ahead.history] == [h["loss"] for h in plain.history]
    a, b = plain.net.state_dict(), ahead.net.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prefetch_needs_framed_partial_off():
    assert check_train_options({})["prefetch"] is False
    with pytest.raises(InputError, match="prefetch needs framed_partial off"):
        check_train_options({"prefetch": True, "framed_partial": 0.5})
