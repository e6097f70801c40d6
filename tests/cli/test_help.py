"""Help texts, ``methods`` and the progress bars of the command line."""

import argparse
import io
import re
import subprocess
import sys

import numpy as np
import pytest

import napari_nephi as nn
from napari_nephi.cli import build_parser, main
from napari_nephi.cli._common import ProgressBars
from napari_nephi.core.progress import ProgressEvent

COMMANDS = (
    "demo",
    "register",
    "apply",
    "methods",
    "train",
    "align-em",
    "atlas-train",
    "atlas-lookup",
    "train-histology",
    "register-slides",
    "batch",
)


def subparsers() -> dict:
    return build_parser().commands


def test_every_command_is_there():
    assert tuple(subparsers()) == COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_shows_its_default(command, capsys):
    parser = subparsers()[command]
    for action in parser.arguments:
        assert action.help and len(action.help) > 8, (command, action.dest)
    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for action in parser.arguments:
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            default = " ".join(str(action.default).split())
            assert f"(default: {default})" in text, (command, action.dest)
    assert "(default: None)" not in text and "(default: False)" not in text


def test_register_help_says_what_happens_to_an_existing_output(capsys):
    assert main(["register", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "replaced as a whole" in text and "(default: affine)" in text


def test_engine_option_flags_list_the_engines_own_values_and_defaults(capsys):
    import inspect

    from napari_nephi.engines.affine.model import KINDS
    from napari_nephi.engines.nephi.engine import MODES, PRESETS
    from napari_nephi.engines.registry import engine_info

    assert main(["register", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    nephi = inspect.signature(engine_info("nephi").func).parameters
    assert "predict+refine" in MODES and "predict+optimize" not in text
    assert f"nephi: {', '.join(MODES[:-1])} or {MODES[-1]} (engine default: {nephi['mode'].default})" in text
    presets = list(PRESETS)
    assert (
        f"nephi: {', '.join(presets[:-1])} or {presets[-1]} (engine default: {nephi['preset'].default})"
        in text
    )
    affine = inspect.signature(engine_info("affine").func).parameters
    assert (
        f"affine: {', '.join(KINDS[:-1])} or {KINDS[-1]} (engine default: {affine['kind'].default})" in text
    )


def test_every_listed_mode_is_accepted_by_the_engine():
    """The values --mode lists are the ones the nephi engine takes: no help names a refused mode."""
    from napari_nephi.engines.nephi.engine import MODES

    fixed = np.zeros((16, 16, 16), np.float32)  # 3D: no built-in model (2D has general2d)
    fixed[4:12, 4:12, 4:12] = 1
    assert MODES[0] == "optimize"  # the default, which needs no model
    for mode in MODES[1:]:  # a predict mode without a model asks for weights, not for another mode
        with pytest.raises(nn.InputError, match=rf"mode='{re.escape(mode)}' needs a trained NePhi model"):
            nn.register(fixed, fixed, method="nephi", mode=mode)
    with pytest.raises(nn.InputError, match=r"Unknown mode 'predict\+optimize'"):
        nn.register(fixed, fixed, method="nephi", mode="predict+optimize")


def test_methods_prints_name_and_description(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    expected = nn.method_descriptions()
    assert [line.split()[0] for line in lines] == list(expected)
    for line, (name, description) in zip(lines, expected.items(), strict=True):
        assert line.split(None, 1)[1] == description and description, name


def test_python_dash_m_runs_the_command_line():
    out = subprocess.run(
        [sys.executable, "-m", "napari_nephi.cli", "methods"], capture_output=True, text=True, check=True
    )
    assert [line.split()[0] for line in out.stdout.splitlines()] == nn.available_methods()


def events(total, stage, steps, loss=None):
    return [ProgressEvent(k, total, loss, stage) for k in steps]


def test_progress_in_a_log_is_one_line_per_update_and_one_bar_per_stage():
    stream = io.StringIO()  # not a terminal
    bars = ProgressBars(stream=stream)
    for ev in events(4, "level 1/2", [1, 2, 3, 4], loss=0.5) + events(3, "writing", [1, 2, 3]):
        bars(ev)
    bars.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    finished = [line for line in lines if "100%" in line]
    assert len(finished) == 2  # one bar per stage, each ends at 100 %
    assert finished[0].startswith("level 1/2: 100%") and "4/4" in finished[0] and "loss 0.5000" in finished[0]
    assert finished[1].startswith("writing: 100%") and "3/3" in finished[1]
    assert len(lines) <= 6  # a line per bar start and end, not one per step (updates every 5 s at most)


def test_progress_restarts_when_the_count_starts_again_and_quiet_draws_nothing():
    stream = io.StringIO()
    bars = ProgressBars(stream=stream)
    for ev in events(5, "pass 1", [1, 2, 3]) + events(5, "pass 2", [1, 2, 3, 4, 5]):
        bars(ev)
    assert [line.split(":")[0] for line in stream.getvalue().splitlines() if "5/5" in line] == ["pass 2"]
    assert stream.getvalue().count("0/5") == 2  # two bars started
    quiet = io.StringIO()
    silent = ProgressBars(quiet=True, stream=quiet)
    for ev in events(3, "x", [1, 2, 3]):
        silent(ev)
    silent.close()
    assert quiet.getvalue() == ""


def test_a_new_stage_in_one_count_gets_its_own_bar():
    stream = io.StringIO()
    bars = ProgressBars(stream=stream)
    stages = [
        "coarse level 1/2",
        "coarse level 1/2",
        "coarse level 2/2",
        "coarse level 2/2",
        "neural",
        "neural",
    ]
    for k, stage in enumerate(stages, start=1):
        bars(ProgressEvent(k, 6, None, stage))
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("  0%") and "0/6" in lines[0]  # the coarse bar starts at 0
    assert any(line.startswith("coarse level 2/2:  67%") and "4/6" in line for line in lines), lines
    starts = [line for line in lines if "| 4/6" in line and not line.startswith("coarse")]
    assert starts, lines  # the neural bar goes on from step 4
    assert lines[-1].startswith("neural: 100%") and "6/6" in lines[-1]
    assert sum("0/6" in line for line in lines) == 1
