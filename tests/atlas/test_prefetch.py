"""Training option ``prefetch`` (session 34): the next step's fresh views are synthesised in a second
process while the network trains; the views and their order are the same, so are the weights."""

from __future__ import annotations

import time

import pytest
import torch

from napari_nephi import InputError
from napari_nephi.engines.atlas import train as train_module
from napari_nephi.engines.atlas.plates import Plates
from napari_nephi.engines.atlas.train import check_train_options, train_network

from .conftest import FAST_OPTIONS


def _train(reference, labels, **extra):
    plates = Plates.from_reference(reference, labels)
    # 12 fresh views a step: more than a pipe's buffer holds, as the default's 8 at 64 pixels
    options = {**FAST_OPTIONS, "steps": 6, "bank_views": 2, "fresh_views": 12, "validation_size": 8}
    options = check_train_options({**options, "validate_every": 3, "threads": 1, **extra})
    return train_network(plates, options, device="cpu", seed=3)


def test_prefetch_trains_the_same_weights_bit_for_bit(toy_reference, monkeypatch):
    """The same losses and weights; the worker ends cleanly (it is not left blocked sending the views
    asked for after the last step)."""
    reference, labels = toy_reference
    plain = _train(reference, labels)
    ended = []
    stop = train_module._Batches.stop_prefetch

    def watched(self):
        worker, t0 = self._worker, time.perf_counter()
        stop(self)
        ended.append((None if worker is None else worker.exitcode, time.perf_counter() - t0 < 5.0))

    monkeypatch.setattr(train_module._Batches, "stop_prefetch", watched)
    ahead = _train(reference, labels, prefetch=True)
    assert ended == [(0, True)]  # the worker ran and ended by itself, at once
    assert ahead.prefetched and not plain.prefetched
    assert ahead.options["prefetch"] and not plain.options["prefetch"]
    assert [h["loss"] for h in ahead.history] == [h["loss"] for h in plain.history]
    a, b = plain.net.state_dict(), ahead.net.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prefetch_needs_framed_partial_off():
    assert check_train_options({})["prefetch"] is False
    with pytest.raises(InputError, match="prefetch needs framed_partial off"):
        check_train_options({"prefetch": True, "framed_partial": 0.5})
