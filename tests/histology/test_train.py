"""Unsupervised training of the histology networks: loss goes down, cancel/resume, folders, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage
from skimage import data

from napari_nephi.cli import main
from napari_nephi.core.errors import Cancelled, InputError, UnsupportedFileError
from napari_nephi.engines.histology.networks import MultiMagNet, NetConfig, read_record, save_model
from napari_nephi.engines.histology.predict import warp
from napari_nephi.engines.histology.stain import choose_stain_channels, stain_channel
from napari_nephi.engines.histology.train import (
    _batch,
    _draw,
    _prepare_pairs,
    curvature,
    pairs_from_folder,
    patch_loss,
    train,
)
from napari_nephi.synthetic.deformation import random_smooth_displacement

SMALL = {"patch": 64, "widths": (8, 16, 32, 64)}


@pytest.fixture(scope="module")
def pair():
    """A 160 x 160 haematoxylin region of scikit-image's IHC slide and a smoothly warped copy."""
    h, _ = stain_channel(data.immunohistochemistry()[200:360, 180:340], "hematoxylin")
    u = random_smooth_displacement(h.shape, 4.0, 30.0, seed=11)
    return warp(h, u), h


def batch_loss(net, pairs, seed=99):
    data_ = _prepare_pairs(pairs)
    high, low, context = _batch(data_, _draw(data_, np.random.default_rng(seed), 64, 8), net.config)
    with torch.no_grad():
        return float(patch_loss(net.eval(), high, low, context, 60.0)[1])


def test_train_is_the_packages_public_function(pair):
    """``napari_nephi.engines.histology.train(...)`` as the docs call it (not the submodule)."""
    import napari_nephi.engines.histology as histology

    assert histology.train is train and histology.pairs_from_folder is pairs_from_folder
    net = histology.train([pair], "nonrigid", steps=1, seed=3, **SMALL)
    assert isinstance(net, MultiMagNet) and net.config.kind == "nonrigid" and net.config.patch == 64


def test_curvature_matches_a_direct_laplacian():
    rng = np.random.default_rng(0)
    u = ndimage.gaussian_filter(rng.normal(size=(2, 2, 40, 40)), (0, 0, 3, 3))
    kernel = -np.ones((3, 3)) / 9.0
    kernel[1, 1] = 8 / 9.0
    lap = np.stack([[ndimage.correlate(c, kernel)[1:-1, 1:-1] for c in item] for item in u])
    assert float(curvature(torch.tensor(u))) == pytest.approx(float((lap**2).mean()), rel=1e-6)
    y, x = np.mgrid[:20, :20].astype(np.float64)
    quad = torch.tensor(np.stack([x**2, np.zeros_like(x)])[None])  # Laplacian 2 -> filter -2/3
    assert float(curvature(quad)) == pytest.approx((2 / 3) ** 2 / 2)


@pytest.mark.parametrize(("kind", "steps"), [("nonrigid", 20), ("affine", 20)])
def test_a_few_steps_lower_the_loss(pair, kind, steps):
    torch.manual_seed(0)
    before = batch_loss(MultiMagNet(NetConfig(kind=kind, **SMALL)), [pair])
    net = train([pair], kind, steps=steps, lr=3e-3, seed=0, **SMALL)
    after = batch_loss(net, [pair])
    assert not net.training
    assert after < before - 0.01, (before, after)  # -NCC on 8 held-back patch sets


def test_single_magnification_variant_trains(pair):
    net = train([pair], "nonrigid", steps=3, magnifications=1, seed=0, **SMALL)
    assert net.config.magnifications == 1 and not hasattr(net, "low")


def test_cancel_leaves_a_checkpoint_that_resumes_the_same_run(pair, tmp_path):
    events = []
    out = tmp_path / "run.pt"

    def stop_after_three():
        return len(events) >= 3

    with pytest.raises(Cancelled):
        train(
            [pair],
            "nonrigid",
            steps=6,
            seed=0,
            out=out,
            progress=events.append,
            cancel=stop_after_three,
            **SMALL,
        )
    state = read_record(out)["extra"]["training"]
    assert state["step"] == 3 and len(state["history"]) == 3
    resumed = tmp_path / "resumed.pt"
    train([pair], "nonrigid", steps=6, out=resumed, resume=out, progress=events.append)
    assert [e.step for e in events] == [1, 2, 3, 4, 5, 6]
    full = tmp_path / "full.pt"
    train([pair], "nonrigid", steps=6, seed=0, out=full, **SMALL)
    a, b = read_record(resumed), read_record(full)
    assert a["extra"]["training"]["step"] == 6
    np.testing.assert_allclose(
        a["extra"]["training"]["history"], b["extra"]["training"]["history"], rtol=1e-4
    )
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(value, b["state_dict"][key], atol=1e-4, rtol=1e-3)


def test_bad_training_inputs(pair, tmp_path):
    f, m = pair
    with pytest.raises(InputError, match="steps"):
        train([pair], "nonrigid", steps=0)
    with pytest.raises(InputError, match="kind"):
        train([pair], "rigid", steps=1)
    with pytest.raises(InputError, match="non-empty list"):
        train([], "affine", steps=1)
    with pytest.raises(InputError, match="pre-align"):
        train([(f, m[:100])], "affine", steps=1)
    with pytest.raises(InputError, match="NaN"):
        train([(f, np.full_like(m, np.nan))], "affine", steps=1)
    with pytest.raises(InputError, match="constant"):
        train([(f, np.zeros_like(m))], "affine", steps=1)
    with pytest.raises(InputError, match="lr"):
        train([pair], "affine", steps=1, lr=float("nan"))
    exported = save_model(MultiMagNet(NetConfig(kind="affine", **SMALL)), tmp_path / "exported.pt")
    with pytest.raises(InputError, match="no training state"):
        train([pair], "affine", steps=2, resume=exported)
    run = tmp_path / "run.pt"
    train([pair], "affine", steps=1, out=run, **SMALL)
    with pytest.raises(InputError, match="affine network, not nonrigid"):
        train([pair], "nonrigid", steps=2, resume=run)
    with pytest.raises(UnsupportedFileError, match="does not exist"):
        train([pair], "affine", steps=1, out=tmp_path / "missing" / "run.pt")


def write_pairs(folder, count=2):
    rgb = data.immunohistochemistry()
    folder.mkdir()
    for i in range(count):
        tile = rgb[100 * i : 100 * i + 160, 150:310]
        tifffile.imwrite(folder / f"s{i}_fixed.tif", tile, photometric="rgb")
        tifffile.imwrite(folder / f"s{i}_moving.tif", np.ascontiguousarray(tile[:, ::-1]), photometric="rgb")
    return rgb


def test_pairs_from_folder_reads_stain_channels(tmp_path):
    rgb = write_pairs(tmp_path / "pairs")
    pairs = pairs_from_folder(tmp_path / "pairs")
    assert len(pairs) == 2
    f, m, kind = choose_stain_channels(rgb[100:260, 150:310], rgb[100:260, 150:310][:, ::-1])
    np.testing.assert_allclose(pairs[1][0], f, atol=1e-6)
    np.testing.assert_allclose(pairs[1][1], m, atol=1e-6)
    (tmp_path / "pairs" / "s1_moving.tif").unlink()
    with pytest.raises(InputError, match="no partner s1_moving"):
        pairs_from_folder(tmp_path / "pairs")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="No training pairs"):
        pairs_from_folder(tmp_path / "empty")
    with pytest.raises(UnsupportedFileError, match="does not exist"):
        pairs_from_folder(tmp_path / "nowhere")
    with pytest.raises(InputError, match="max_side"):
        pairs_from_folder(tmp_path / "pairs", max_side=0)
    tifffile.imwrite(tmp_path / "pairs" / "s1_moving.tif", rgb[:100, :120], photometric="rgb")
    with pytest.raises(InputError, match="pre-aligned"):
        pairs_from_folder(tmp_path / "pairs")


def test_large_lazy_training_image_is_thinned_before_it_is_read(tmp_path, monkeypatch):
    """A flat 4096^2 RGB image opened lazily (as large TIFFs are) is never loaded whole."""
    import tracemalloc

    import dask.array as da

    import napari_nephi.io
    from napari_nephi.engines.histology.train import _read_stain

    big = da.random.default_rng(0).integers(0, 255, (4096, 4096, 3), dtype=np.uint8, chunks=(256, 256, 3))
    monkeypatch.setattr(napari_nephi.io, "read_image", lambda path: [(big, {"rgb": True}, "image")])
    tracemalloc.start()
    try:
        small = _read_stain(tmp_path / "big_fixed.tif", 512)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert small.shape == (512, 512, 3)
    np.testing.assert_array_equal(small[:4, :4], np.asarray(big[:32:8, :32:8]))
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB read for a 0.75 MiB result (whole image is 48 MiB)"


def test_train_histology_command_trains_and_resumes(tmp_path, capsys):
    write_pairs(tmp_path / "pairs", count=1)
    out = tmp_path / "net.pt"
    common = [
        "train-histology",
        str(tmp_path / "pairs"),
        "-o",
        str(out),
        "--kind",
        "nonrigid",
        "--patch",
        "64",
    ]
    small = ["--widths", "8", "16", "32", "64", "-q"]
    assert main([*common, "--steps", "2", *small]) == 0
    assert read_record(out)["extra"]["training"]["step"] == 2
    assert main([*common, "--steps", "2", *small]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main([*common, "--steps", "3", "--resume"]) == 0
    assert read_record(out)["extra"]["training"]["step"] == 3
    assert '"steps": 3' in capsys.readouterr().out
    assert (
        main(["train-histology", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x.pt"), "--kind", "affine"])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
