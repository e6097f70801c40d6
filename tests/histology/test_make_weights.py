"""scripts/make_histology_weights.py: the seed of the training pairs is an option and is recorded."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from skimage import data

from napari_nephi.engines.histology.networks import read_record

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_histology_weights.py"


@pytest.fixture
def script(monkeypatch):
    """The script as a module, shrunk to a few small pairs of scikit-image's IHC image."""
    spec = importlib.util.spec_from_file_location("make_histology_weights", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ihc = data.immunohistochemistry()
    monkeypatch.setattr(module, "load_sources", lambda svs: {"ihc": ihc, "he": ihc, "he_half": ihc})
    monkeypatch.setattr(module, "PAIRS", {"ihc": 1, "he": 1, "he_half": 0})
    monkeypatch.setattr(module, "REGION", 192)
    small = {"patch": 64, "widths": (8, 16, 32, 64), "checkpoint_every": 1}
    monkeypatch.setattr(module, "SETTINGS", {k: {**v, **small} for k, v in module.SETTINGS.items()})
    return module


def _run(script, tmp_path, seed: int, *extra: str) -> dict:
    (tmp_path / f"w{seed}").mkdir(parents=True)
    out = tmp_path / f"seed{seed}.pt"
    args = ["--svs", "unused", "--kind", "nonrigid", "--steps", "2", "--work", str(tmp_path / f"w{seed}")]
    assert script.main([*args, "--out", str(out), "--seed", str(seed), *extra]) == 0
    return read_record(out)["extra"]["provenance"]


def test_seed_is_used_and_recorded(script, tmp_path):
    first, again, other = (
        _run(script, tmp_path / name, seed) for name, seed in (("a", 3), ("b", 3), ("c", 4))
    )
    assert first["seed"] == again["seed"] == 3 and other["seed"] == 4
    assert first["steps"] == 2
    # same seed: the same pairs and initialisation, so the same losses; another seed: other ones
    np.testing.assert_allclose(first["history"], again["history"], rtol=1e-5)
    assert not np.allclose(first["history"], other["history"], rtol=1e-3)


def test_resume_with_another_seed_is_refused(script, tmp_path, capsys):
    _run(script, tmp_path, 3)
    work = tmp_path / "w3" / "histology_nonrigid.run.pt"
    assert read_record(work)["extra"]["training"]["seed"] == 3
    with pytest.raises(SystemExit):
        script.main(
            ["--svs", "x", "--kind", "nonrigid", "--work", str(tmp_path / "w3"), "--resume", "--seed", "5"]
        )
    assert "trained with another seed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["--svs", "x", "--kind", "nonrigid", "--seed", "-1"])
    assert "--seed must be in" in capsys.readouterr().err
