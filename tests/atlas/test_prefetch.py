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


def test_without_prefetch_each_view_is_drawn_just_before_its_bank_slot(toy_reference, monkeypatch):
    """A view may draw from the batch's stream (``framed_partial`` as a share), so without a worker each
    fresh view is synthesised just before its bank slot is drawn, as before prefetch: the training of
    4541a11 bit for bit (review 2 of session 34, C1: all views first changed its losses)."""
    events = []

    class Logged:  # the batch's random stream, logging the bank slots' draws
        def __init__(self, rng):
            self.rng = rng

        def integers(self, *args, **kwargs):
            events.append("slot")
            return self.rng.integers(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.rng, name)

    view, draw = train_module._Batches._view, train_module._Batches.draw

    def logged_view(self, plate):
        if isinstance(self.rng, Logged):  # inside a step (not the bank's first views)
            events.append("view")
        return view(self, plate)

    def logged_draw(self):
        self.rng = Logged(self.rng)
        try:
            return draw(self)
        finally:
            self.rng = self.rng.rng

    monkeypatch.setattr(train_module._Batches, "_view", logged_view)
    monkeypatch.setattr(train_module._Batches, "draw", logged_draw)
    reference, labels = toy_reference
    _train(reference, labels, steps=1, framed_partial=0.5)
    # (the step's plates may draw integers first)
    assert events[events.index("view") :] == ["view", "slot"] * 12
