"""Elastic refinement of MITO and its transform kind (ElasticSectionTransform): fields, warps, files."""

import argparse

import cv2
import numpy as np
import pytest

from napari_nephi import load_transform
from napari_nephi.cli.em import add_parser
from napari_nephi.core.errors import InputError
from napari_nephi.core.transform import ElasticSectionTransform, PerSectionTransform
from napari_nephi.engines.mito import align_stack, warp_masks
from napari_nephi.engines.mito.align import warp_sections
from napari_nephi.engines.mito.elastic import elastic_fields
from napari_nephi.io import read_image, write_tiff
from napari_nephi.synthetic import em_stack

N = 7


@pytest.fixture(scope="module")
def distorted(em):
    """Seven identical unrotated sections; section 3 shows the base at ``p + d(p)`` with a known
    smooth ``d`` (up to 3 px)."""
    base = em["unrotated_stack"][2]
    h, w = base.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy = 3.0 * np.sin(2 * np.pi * xx / w) * np.cos(np.pi * yy / h)
    dx = 2.0 * np.cos(2 * np.pi * yy / h)
    stack = np.stack([base] * N)
    stack[3] = cv2.remap(base, xx + dx, yy + dy, cv2.INTER_LINEAR)
    mask = np.stack([em["unrotated_masks"][2]] * N)
    mask[3] = cv2.remap(mask[3], xx + dx, yy + dy, cv2.INTER_NEAREST)
    return {"stack": stack, "masks": mask, "d": np.stack([dy, dx], -1), "base": base, "pad": em["pad"]}


def _inner_points(shape, pad, step=8):
    yy, xx = np.mgrid[pad + 20 : shape[0] - pad - 20 : step, pad + 20 : shape[1] - pad - 20 : step]
    return np.stack([yy.ravel(), xx.ravel()], 1).astype(float)


def test_known_smooth_distortion_is_recovered_and_the_others_stay_put(distorted):
    d = distorted
    n, h, w = d["stack"].shape
    mats = np.repeat(np.eye(3)[None], n, axis=0)
    fields = elastic_fields(
        lambda k: d["stack"][k], mats, (h, w), spacing=16, radius=2, scale=1.0, solver="local"
    )
    assert np.abs(np.delete(fields, 3, axis=0)).max() < 0.05  # undistorted sections: field ~0
    t = ElasticSectionTransform(mats, fields, shape=(n, h, w))
    p = _inner_points((h, w), d["pad"])
    truth = d["d"][p[:, 0].astype(int), p[:, 1].astype(int)]
    u = t.field_at(3, p)  # the correction samples section 3 at p + u(p): u ~ -d
    err = np.abs(u + truth).mean()
    assert err < 0.3 * np.abs(truth).mean(), (err, np.abs(truth).mean())
    # warping through the field undoes the distortion (independent check: image difference)
    warped = warp_sections(d["stack"], mats, fields=fields)
    inner = (slice(d["pad"] + 20, h - d["pad"] - 20),) * 2
    before = np.abs(d["stack"][3].astype(float) - d["base"])[inner].mean()
    after = np.abs(warped[3].astype(float) - d["base"])[inner].mean()
    assert after < 0.6 * before
    np.testing.assert_array_equal(warped[0], d["base"])  # zero field: exactly the plain warp


@pytest.mark.parametrize("iterations", [1, 2])
def test_two_sections_meet_halfway_and_stay(distorted, iterations):
    """Section 1 is section 0 distorted by a known d: with neighbours on one side only, each
    takes half the step (a full step each swapped them, and the next pass swapped them back)."""
    d = distorted
    stack = d["stack"][2:4]  # the base, then the distorted section
    n, h, w = stack.shape
    mats = np.repeat(np.eye(3)[None], n, axis=0)
    fields = elastic_fields(
        lambda k: stack[k],
        mats,
        (h, w),
        spacing=16,
        radius=4,
        scale=1.0,
        iterations=iterations,
        solver="local",
    )
    t = ElasticSectionTransform(mats, fields, shape=(n, h, w))
    p = _inner_points((h, w), d["pad"])
    half = 0.5 * d["d"][p[:, 0].astype(int), p[:, 1].astype(int)]
    scale = np.abs(half).mean()
    assert np.abs(t.field_at(1, p) + half).mean() < 0.3 * scale  # samples at p - d/2
    assert np.abs(t.field_at(0, p) - half).mean() < 0.3 * scale  # and section 0 at p + d/2


@pytest.mark.parametrize("iterations", [1, 2])
def test_a_distorted_end_section_is_corrected_like_a_middle_one(distorted, iterations):
    """The distorted section first in a stack of seven: its neighbours, for which it is one vote
    among several, stay put, so it takes the full step (a half step left a quarter of d)."""
    d = distorted
    stack = np.concatenate([d["stack"][3:4], np.delete(d["stack"], 3, axis=0)])
    n, h, w = stack.shape
    mats = np.repeat(np.eye(3)[None], n, axis=0)
    fields = elastic_fields(
        lambda k: stack[k],
        mats,
        (h, w),
        spacing=16,
        radius=2,
        scale=1.0,
        iterations=iterations,
        solver="local",
    )
    assert np.abs(fields[1:]).max() < 0.05
    t = ElasticSectionTransform(mats, fields, shape=(n, h, w))
    p = _inner_points((h, w), d["pad"])
    truth = d["d"][p[:, 0].astype(int), p[:, 1].astype(int)]
    err = np.abs(t.field_at(0, p) + truth).mean()
    assert err < 0.15 * np.abs(truth).mean(), (err, np.abs(truth).mean())


def test_identical_sections_get_zero_fields(em):
    stack = np.stack([em["stack"][1]] * 4)
    reg = align_stack(stack, model="rigid", elastic=True, warp=False, workers=2)
    assert isinstance(reg.transform, ElasticSectionTransform)
    assert np.abs(reg.transform.fields).max() < 0.05
    assert reg.metrics["elastic"]["displacement_max"] < 0.05 and reg.settings["elastic"] is True


def test_engine_elastic_improves_the_distorted_section(distorted):
    d = distorted
    # without the elastic step (elastic="auto", the default since session 29, reads these sections distorted)
    plain = align_stack(d["stack"], d["masks"], model="rigid", warp=False, workers=2, elastic=False)
    reg = align_stack(d["stack"], d["masks"], model="rigid", elastic=True, elastic_spacing=16, workers=2)
    truth = d["masks"][0] > 0

    def dice(a):
        a = a > 0
        return 2 * (a & truth).sum() / (a.sum() + truth.sum())

    assert dice(warp_masks(reg, d["masks"])[3]) > dice(warp_masks(plain, d["masks"])[3]) + 0.02
    assert reg.warped.shape == d["stack"].shape and reg.warped.dtype == np.uint8


def test_elastic_transform_saves_and_loads(tmp_path, distorted):
    d = distorted
    n, h, w = d["stack"].shape
    rng = np.random.default_rng(0)
    mats = np.repeat(np.eye(3)[None], n, axis=0)
    mats[:, :2, 2] = rng.normal(0, 3, (n, 2))
    fields = rng.normal(0, 1, (n, 5, 6, 2)).astype(np.float32)
    t = ElasticSectionTransform(mats, fields, shape=(n, h, w), spacing=(2.0, 0.5, 0.5))
    t.save(tmp_path / "t")
    back = load_transform(tmp_path / "t")
    assert isinstance(back, ElasticSectionTransform) and back.kind == "per_section_elastic"
    np.testing.assert_array_equal(back.fields, fields)
    np.testing.assert_allclose(back.matrices, mats)
    assert back.spacing == (2.0, 0.5, 0.5)
    # the torch map agrees with the OpenCV warp: point p of section k -> matrices[k] (p + field)
    pts = np.array([[2.0, 10.0, 20.0], [5.0, 100.5, 200.25]])
    mapped = back.map_points(pts)
    for q, m in zip(pts, mapped):
        k = int(q[0])
        moved = q[1:] + t.field_at(k, q[None, 1:])[0]
        expect = (mats[k] @ np.array([*moved, 1.0]))[:2]
        np.testing.assert_allclose(m[1:], expect, atol=1e-4)
    # zero fields map like the plain per-section transform
    zero = ElasticSectionTransform(mats, np.zeros_like(fields), shape=(n, h, w))
    np.testing.assert_allclose(zero.map_points(pts), PerSectionTransform(mats).map_points(pts), atol=1e-6)


def test_bad_fields_and_options_are_refused(distorted):
    mats = np.repeat(np.eye(3)[None], 3, axis=0)
    with pytest.raises(InputError, match="Section fields must have shape"):
        ElasticSectionTransform(mats, np.zeros((2, 4, 4, 2)), shape=(3, 32, 32))
    with pytest.raises(InputError, match="NaN"):
        ElasticSectionTransform(mats, np.full((3, 4, 4, 2), np.nan), shape=(3, 32, 32))
    with pytest.raises(InputError, match="needs the stack shape"):
        ElasticSectionTransform(mats, np.zeros((3, 4, 4, 2)))
    with pytest.raises(InputError, match="elastic_spacing"):
        align_stack(distorted["stack"], elastic=True, elastic_spacing=0)


def test_cli_elastic_writes_the_elastic_transform_and_masks(distorted, tmp_path):
    d = distorted
    write_tiff(tmp_path / "s.tif", d["stack"])
    write_tiff(tmp_path / "m.tif", d["masks"])
    p = argparse.ArgumentParser(prog="napari-nephi")
    add_parser(p.add_subparsers(dest="command", required=True))
    out = tmp_path / "out"
    argv = ["align-em", str(tmp_path / "s.tif"), "--masks", str(tmp_path / "m.tif"), "-o", str(out),
            "--model", "rigid", "--elastic", "--option", "elastic_spacing=16", "-q"]  # fmt: skip
    args = p.parse_args(argv)
    assert args.func(args) == 0
    t = load_transform(out / "transform")
    assert isinstance(t, ElasticSectionTransform) and np.abs(t.fields[3]).max() > 1.0
    masks = np.asarray(read_image(out / "aligned_masks.tif")[0][0])
    np.testing.assert_array_equal(masks, warp_sections(d["masks"], t.matrices, labels=True, fields=t.fields))


@pytest.mark.parametrize("solver", ["local", "joint"])
def test_a_blank_section_gets_no_field_and_the_others_are_refined(distorted, solver):
    d = distorted
    stack = d["stack"].copy()
    stack[5] = 0
    n, h, w = stack.shape
    mats = np.repeat(np.eye(3)[None], n, axis=0)
    fields = elastic_fields(
        lambda k: stack[k], mats, (h, w), spacing=16, radius=2, scale=1.0, workers=2, solver=solver
    )
    assert np.abs(fields[5]).max() == 0 and np.abs(fields[3]).max() > 1.0
    assert np.abs(fields[[0, 1, 6]]).max() < 0.05


def test_opencv_warp_agrees_with_the_transform_warp(em):
    """warp_sections (OpenCV, per section) and ElasticSectionTransform.warp (torch) sample the
    same points: the fields are interpolated exactly in both."""
    st = em["stack"][:3].astype(np.float32)
    n, h, w = st.shape
    mats = em["matrices"][:3] @ np.linalg.inv(em["matrices"][0])
    fields = np.random.default_rng(0).normal(0, 2, (n, 4, 5, 2)).astype(np.float32)
    t = ElasticSectionTransform(mats, fields, shape=(n, h, w))
    diff = np.abs(t.warp(st) - warp_sections(st, mats, fields=fields))[:, 10:-10, 10:-10]
    assert diff.mean() < 0.01 and diff.max() < 0.5


def test_the_grid_reproduces_a_linear_field_at_its_nodes():
    """Node (i, j) sits at (i (h-1)/(gh-1), j (w-1)/(gw-1)); a linear field must be read there,
    not at cell centres (half a cell off at the edges), also with content on part of the section."""
    from napari_nephi.engines.mito.elastic import _to_grid

    h, w, gh, gw = 121, 161, 5, 6
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u = np.stack([0.02 * xx - 1.0, 0.03 * yy + 0.01 * xx], -1)  # (x, y) flow
    ny, nx = np.meshgrid(np.linspace(0, h - 1, gh), np.linspace(0, w - 1, gw), indexing="ij")
    truth = np.stack([0.03 * ny + 0.01 * nx, 0.02 * nx - 1.0], -1)  # (y, x)
    valid = np.ones((h, w), bool)
    np.testing.assert_allclose(_to_grid(u, valid, (gh, gw), 0.5), truth, atol=0.01)
    valid[:, :40] = False  # content on the right part only: still the line, extrapolated
    np.testing.assert_allclose(_to_grid(u, valid, (gh, gw), 0.5), truth, atol=0.01)


def test_blank_runs_around_two_sections_do_not_break_the_median():
    """Two sections with content among blank ones (12 sections, radius 2): each has only the other as
    a partner, whose own partners lie partly outside the window of kept images. Before session 15
    this raised KeyError (reviewer's case)."""
    d = em_stack(12, (96, 96), seed=1, rotate=False, pad=8)
    stack = np.zeros_like(d["unrotated_stack"])
    stack[[6, 8]] = d["unrotated_stack"][[6, 8]]
    mats = np.repeat(np.eye(3)[None], 12, axis=0)
    f = elastic_fields(lambda k: stack[k], mats, stack.shape[1:], spacing=16, radius=2, scale=1.0, workers=1)
    assert np.abs(np.delete(f, [6, 8], axis=0)).max() == 0  # blank sections: no field
    assert np.isfinite(f).all() and np.abs(f[[6, 8]]).max() < 3.0
