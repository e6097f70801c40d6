"""Training: checkpoints with config, cancel + exact resume, validation Dice, folders, CLI, distributed."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch

from napari_nephi.cli import main
from napari_nephi.core.errors import Cancelled, InputError
from napari_nephi.core.progress import Progress
from napari_nephi.engines.nephi.model import NePhiModel
from napari_nephi.engines.nephi.train import dice, train

TINY = {
    "shape": (32, 32),
    "batch_size": 2,
    "sample_points": 256,
    "reg_points": 8,
    "val_pairs": 2,
    "field_options": {"hidden": 16, "layers": 2, "n_frequencies": 8, "global_dim": 4, "local_dim": 2},
    "channels": (4, 8, 8),
    "local_level": 2,
}


def _states_equal(a, b, atol=0.0):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.allclose(sa[k].float(), sb[k].float(), atol=atol, rtol=0) for k in sa)


def test_dice_against_hand_computed_values():
    a = np.array([[1, 1, 0], [2, 2, 0]])
    b = np.array([[1, 0, 0], [2, 2, 2]])
    # label 1: 2*1/(2+1); label 2: 2*2/(2+3)
    assert dice(a, b) == pytest.approx(np.mean([2 / 3, 4 / 5]))


def test_checkpoint_holds_config_weights_and_state(tmp_path):
    out = tmp_path / "m.pt"
    result = train("tc", out, steps=3, val_every=3, checkpoint_every=2, device="cpu", **TINY)
    assert len(result.history) == 3 and all(np.isfinite(result.history))
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["extra"]["step"] == 3 and ckpt["extra"]["train"]["steps"] == 3
    assert "optimizer" in ckpt["extra"]
    loaded = NePhiModel.load(out)
    assert loaded.config() == result.model.config()
    assert loaded.input_shape == (32, 32)
    assert _states_equal(loaded, result.model.cpu())
    # validation on held-out generated pairs, with Dice before and after
    (row,) = result.validation
    assert row["step"] == 3 and row["pairs"] == 2
    assert 0 < row["dice_before"] <= 1 and 0 < row["dice"] <= 1


def test_cancel_keeps_a_checkpoint_and_resume_is_exact(tmp_path):
    straight = train(
        "tc", tmp_path / "a.pt", steps=4, checkpoint_every=100, val_every=100, device="cpu", **TINY
    )

    seen = []
    progress = Progress(lambda ev: seen.append(ev.step), cancel=lambda: len(seen) >= 2)
    with pytest.raises(Cancelled):
        train("tc", tmp_path / "b.pt", steps=4, checkpoint_every=100, val_every=100, device="cpu",
              progress=progress, **TINY)  # fmt: skip
    assert torch.load(tmp_path / "b.pt", weights_only=True)["extra"]["step"] == 2
    resumed = train(resume=tmp_path / "b.pt", output=tmp_path / "b.pt", steps=4, device="cpu")
    assert len(resumed.history) == 4
    np.testing.assert_allclose(resumed.history, straight.history, rtol=1e-5)
    assert _states_equal(resumed.model, straight.model, atol=1e-6)
    # the training moved the weights: not a trivially equal comparison
    fresh = train("tc", tmp_path / "c.pt", steps=0, device="cpu", **TINY).model
    assert not _states_equal(fresh, straight.model, atol=1e-6)


def _write_folder(folder, n, shape=(40, 36), with_labels=True):
    folder.mkdir()
    (folder / "labels").mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.indices(shape)
    for i in range(n):
        cy, cx = shape[0] / 2 + rng.uniform(-4, 4), shape[1] / 2 + rng.uniform(-4, 4)
        lab = (((yy - cy) ** 2 + (xx - cx) ** 2) < 100).astype(np.uint8)
        img = (lab * 100 + rng.normal(0, 5, shape)).astype(np.float32)
        tifffile.imwrite(folder / f"img{i}.tif", img)
        if with_labels:
            tifffile.imwrite(folder / "labels" / f"img{i}.tif", lab)


def test_folder_of_images_with_labels(tmp_path):
    _write_folder(tmp_path / "data", 5)
    result = train(tmp_path / "data", tmp_path / "m.pt", steps=2, val_every=2, device="cpu", **TINY)
    (row,) = result.validation
    assert row["pairs"] == 2  # 2 of the 5 images held out -> 2 ordered pairs
    assert row["dice_before"] > 0.3


def test_folder_errors_name_the_problem(tmp_path):
    _write_folder(tmp_path / "one", 1)
    with pytest.raises(InputError, match="at least 2"):
        train(tmp_path / "one", tmp_path / "m.pt", steps=1, device="cpu", **TINY)
    _write_folder(tmp_path / "mixed", 2)
    tifffile.imwrite(tmp_path / "mixed" / "vol.tif", np.random.default_rng(1).random((4, 8, 8), np.float32))
    with pytest.raises(InputError, match="vol.tif is 3D"):
        train(tmp_path / "mixed", tmp_path / "m.pt", steps=1, device="cpu", **TINY)
    _write_folder(tmp_path / "flat", 2)
    tifffile.imwrite(tmp_path / "flat" / "zero.tif", np.zeros((40, 36), np.float32))
    with pytest.raises(InputError, match="zero.tif is constant"):
        train(tmp_path / "flat", tmp_path / "m.pt", steps=1, device="cpu", **TINY)
    with pytest.raises(InputError, match="not a folder"):
        train(tmp_path / "missing", tmp_path / "m.pt", steps=1, device="cpu", **TINY)
    NePhiModel.from_config(train("tc", tmp_path / "m.pt", steps=0, device="cpu", **TINY).model.config()).save(
        tmp_path / "plain.pt"
    )
    with pytest.raises(InputError, match="no training state"):
        train(resume=tmp_path / "plain.pt", output=tmp_path / "x.pt", device="cpu")


def test_train_command_writes_a_model(tmp_path, capsys):
    out = tmp_path / "cli.pt"
    argv = ["train", "--data", "tc", "-o", str(out), "--shape", "32", "32", "--steps", "2",
            "--batch-size", "2", "--sample-points", "256", "--reg-points", "8", "--val-pairs", "2",
            "--val-every", "2", "--channels", "4", "8", "8", "--local-level", "2", "--field", "hidden=16",
            "--field", "layers=2", "--device", "cpu", "-q"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["validation"]["pairs"] == 2
    model = NePhiModel.load(out)
    assert model.cfg.hidden == 16 and model.channels == (4, 8, 8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RANK_SCRIPT = """
import sys, torch
from napari_nephi.engines.nephi.train import train
folder, rank = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
result = train("tc", f"{folder}/ddp.pt", steps=2, val_every=100, device="cpu", **TINY)
torch.save(result.model.state_dict(), f"{folder}/rank{rank}.pt")
"""


def test_distributed_training_averages_gradients(tmp_path):
    """Two Gloo processes (as under torchrun) end with identical weights that differ from one process."""
    script = tmp_path / "rank.py"
    script.write_text(f"TINY = {TINY!r}\n" + _RANK_SCRIPT)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        cmd = [sys.executable, str(script), str(tmp_path), str(rank)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in procs:
        out = p.communicate(timeout=300)[0].decode(errors="replace")
        assert p.returncode == 0, out[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    single = train(
        "tc", tmp_path / "single.pt", steps=2, val_every=100, device="cpu", **TINY
    ).model.state_dict()
    params = [k for k in r0 if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(r0[k], r1[k]) for k in params)
    assert any(not torch.allclose(r0[k], single[k], atol=1e-7) for k in params)
    assert NePhiModel.load(tmp_path / "ddp.pt").config()["input_shape"] == [32, 32]


@pytest.mark.parametrize(
    "option, message",
    [
        ({"learning_rate": float("nan")}, "learning_rate must be a finite number"),
        ({"learning_rate": 1.0}, "learning_rate must be at most 0.1"),
        ({"steps": "abc"}, "steps must be a whole number, got 'abc'"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"reg_weight": float("inf")}, "reg_weight must be a finite number"),
        ({"shape": (64, "x")}, r"shape\[1\] must be a whole number"),
    ],
)
def test_bad_training_settings_raise_before_training(tmp_path, option, message):
    with pytest.raises(InputError, match=message):
        train("tc", tmp_path / "m.pt", **{**dict(steps=1, device="cpu", **TINY), **option})
    assert not (tmp_path / "m.pt").exists()


def test_a_non_finite_training_loss_stops_before_the_backward_pass(tmp_path, monkeypatch):
    import napari_nephi.engines.nephi.train as train_module

    def nan_loss(maps, fixed, moving, settings, gen):
        return train_module.step_loss_orig(maps, fixed, moving, settings, gen) * float("nan")

    monkeypatch.setattr(train_module, "step_loss_orig", train_module.step_loss, raising=False)
    monkeypatch.setattr(train_module, "step_loss", nan_loss)
    with pytest.raises(InputError, match="Training diverged at step 1: the loss became NaN"):
        train("tc", tmp_path / "m.pt", steps=3, device="cpu", **TINY)
