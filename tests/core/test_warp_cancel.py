"""``Transform.warp`` / ``warp_labels`` stop between chunks when cancelled (session 44); None: as before."""

import hashlib
import threading

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from napari_nephi.core import AffineTransform, DisplacementTransform
from napari_nephi.core import warp as warp_module
from napari_nephi.core.errors import Cancelled, InputError

CASES = [(37, 41), (9, 11, 13)]  # 2D and 3D


def _transforms(shape):
    """An affine and a smooth displacement transform of ``shape``."""
    rng = np.random.default_rng(len(shape))
    m = np.eye(len(shape) + 1)
    m[: len(shape), : len(shape)] += rng.uniform(-0.08, 0.08, (len(shape), len(shape)))
    m[: len(shape), -1] = rng.uniform(-2.5, 2.5, len(shape))
    field = np.stack([ndi.gaussian_filter(rng.normal(0, 6, shape), 3) for _ in shape]).astype(np.float32)
    return AffineTransform(m, shape=shape), DisplacementTransform(field)


def _inputs(shape):
    rng = np.random.default_rng(7)
    image = ndi.gaussian_filter(rng.random(shape), 1.5).astype(np.float32)
    labels = (image * 9).astype(np.uint16) * 37
    return image, labels


@pytest.fixture
def slabs(monkeypatch):
    """The warps work on slabs of at most 64 output voxels (many chunks; ``slab_count`` agrees); counts
    the slabs handed out."""
    real, real_count = warp_module.iter_slabs, warp_module.slab_count
    given = []

    def small(shape, chunk_voxels=warp_module.CHUNK_VOXELS):
        for slab in real(shape, 64):
            given.append(slab)
            yield slab

    monkeypatch.setattr(warp_module, "iter_slabs", small)
    monkeypatch.setattr(warp_module, "slab_count", lambda shape, chunk_voxels=0: real_count(shape, 64))
    return given


@pytest.mark.parametrize("shape", CASES)
def test_an_unset_cancel_gives_the_same_arrays_bit_for_bit(shape, slabs):
    image, labels = _inputs(shape)
    for t in _transforms(shape):
        plain_image, plain_labels = t.warp(image), t.warp_labels(labels)
        assert len(slabs) > 4  # the chunked path, many chunks
        for cancel in (None, threading.Event(), lambda: False):
            assert np.array_equal(t.warp(image, cancel=cancel), plain_image)
            out = t.warp_labels(labels, cancel=cancel)
            assert np.array_equal(out, plain_labels) and out.dtype == labels.dtype


#: sha256 (first 16 hex digits) of each warp with 64-voxel chunks, made by ea17525 (before the option):
#: (ndim, transform, kind) -> digest. Review 1 of session 44 (D4): a change of the chunk loop fails here.
BEFORE = {
    (2, "affine", "image"): "29ee11b67c926d7f",
    (2, "affine", "labels"): "2813b99ddaa230a9",
    (2, "displacement", "image"): "840ab91e7d6167d7",
    (2, "displacement", "labels"): "e0966708137702e9",
    (3, "affine", "image"): "5d594d3fc94de7e9",
    (3, "affine", "labels"): "0d5b04435440dc6e",
    (3, "displacement", "image"): "9af97e684de747ac",
    (3, "displacement", "labels"): "e6fa16f63d4323ea",
}


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="the digests were read with torch's AVX2 / AVX512 kernels (review 2 of session 44)",
)
@pytest.mark.parametrize("shape", CASES)
def test_no_cancel_gives_the_arrays_of_the_code_before_the_option(shape, slabs):
    image, labels = _inputs(shape)
    for name, t in zip(("affine", "displacement"), _transforms(shape), strict=True):
        for kind, out in (("image", t.warp(image)), ("labels", t.warp_labels(labels, cancel=None))):
            assert hashlib.sha256(out.tobytes()).hexdigest()[:16] == BEFORE[(len(shape), name, kind)]


@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("kind", ["image", "labels"])
def test_a_cancel_set_during_the_first_chunk_stops_before_the_next(shape, kind, slabs):
    """The cancel is set (as by another thread) while the first chunk is mapped: no second chunk is mapped."""
    image, labels = _inputs(shape)
    t = _transforms(shape)[1]
    cancel = threading.Event()
    mapped = []
    real_map = type(t)._map

    def map_and_cancel(self, points):
        mapped.append(len(points))
        cancel.set()
        return real_map(self, points)

    type(t)._map = map_and_cancel
    try:
        with pytest.raises(Cancelled, match="Warp cancelled"):
            if kind == "image":
                t.warp(image, cancel=cancel)
            else:
                t.warp_labels(labels, cancel=cancel)
    finally:
        type(t)._map = real_map
    total = len(list(warp_module.iter_slabs(shape)))
    assert total > 4 and len(mapped) == 1  # one chunk of many


def test_a_callable_cancel_is_asked_before_each_chunk(slabs):
    image, _ = _inputs(CASES[1])
    t = _transforms(CASES[1])[0]
    asked = []

    def cancel():
        asked.append(len(asked))
        return len(asked) == 3  # stop before the third chunk

    with pytest.raises(Cancelled):
        t.warp(image, cancel=cancel)
    assert len(asked) == 3 and len(slabs) == 3  # the third slab was handed out, then refused


def test_a_cancel_that_is_neither_an_event_nor_callable_is_an_input_error():
    image, labels = _inputs(CASES[0])
    t = _transforms(CASES[0])[0]
    with pytest.raises(InputError, match="cancel must be a threading.Event"):
        t.warp(image, cancel="yes")
    with pytest.raises(InputError, match="cancel must be a threading.Event"):
        t.warp_labels(labels, cancel=1)


# -- progress per chunk (session 46): the Apply's progress bar ------------------------------------


@pytest.mark.parametrize("shape", CASES)
def test_progress_reports_every_chunk_and_leaves_the_arrays_as_they_were(shape, slabs):
    """``(0, total)`` first, then ``(k, total)`` after chunk ``k``, ending at the total; the arrays are
    the digests of the code before the option (as ``progress=None``)."""
    image, labels = _inputs(shape)
    for name, t in zip(("affine", "displacement"), _transforms(shape), strict=True):
        for kind in ("image", "labels"):
            events = []
            warp = t.warp if kind == "image" else t.warp_labels
            out = warp(
                image if kind == "image" else labels, progress=lambda *e, events=events: events.append(e)
            )
            total = events[0][1]
            assert total > 4 and events == [(k, total) for k in range(total + 1)]
            assert np.array_equal(out, warp(image if kind == "image" else labels))
            if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
                assert hashlib.sha256(out.tobytes()).hexdigest()[:16] == BEFORE[(len(shape), name, kind)]


def test_a_cancel_set_from_the_progress_stops_before_the_next_chunk(slabs):
    image, labels = _inputs(CASES[0])
    t = _transforms(CASES[0])[1]
    for warp, data in ((t.warp, image), (t.warp_labels, labels)):
        cancel, events = threading.Event(), []

        def report(done, total, events=events, cancel=cancel):
            events.append(done)
            if done == 2:
                cancel.set()

        with pytest.raises(Cancelled):
            warp(data, cancel=cancel, progress=report)
        assert events == [0, 1, 2]


def test_a_progress_that_is_not_callable_is_an_input_error():
    image, labels = _inputs(CASES[0])
    t = _transforms(CASES[0])[0]
    with pytest.raises(InputError, match=r"progress must be a function taking \(done, total\)"):
        t.warp(image, progress=5)
    with pytest.raises(InputError, match="progress must be a function"):
        t.warp_labels(labels, progress="bar")


@pytest.mark.parametrize("shape", [(1, 5), (7, 3, 2), (100, 300), (4097, 256), (3, 1000, 1000)])
@pytest.mark.parametrize("chunk", [1, 64, 1000, warp_module.CHUNK_VOXELS])
def test_the_chunk_count_is_the_number_of_slabs(shape, chunk):
    assert warp_module.slab_count(shape, chunk) == len(list(warp_module.iter_slabs(shape, chunk)))
