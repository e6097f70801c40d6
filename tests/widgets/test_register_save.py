"""The register widget's "Save transform…": the files are written in a worker thread (session 44)."""

import json
import threading

import numpy as np
import pytest

from napari_nephi.core import DisplacementTransform, Registration
from napari_nephi.core.errors import RegistrationError
from napari_nephi.core.transform_io import load_transform
from napari_nephi.widgets import RegisterWidget
from napari_nephi.widgets import register_widget as rw
from napari_nephi.widgets._state import RunState

WAIT_MS = 30000


@pytest.fixture
def messages(monkeypatch):
    seen = {"error": [], "info": []}
    monkeypatch.setattr(rw, "show_error", seen["error"].append)
    monkeypatch.setattr(rw, "show_info", seen["info"].append)
    return seen


class SaveGate:
    """Replaces ``DisplacementTransform.save``: waits until :meth:`open` (at most 30 s), records the thread,
    then saves as before (or raises ``error``)."""

    def __init__(self, monkeypatch):
        self.opened, self.entered = threading.Event(), threading.Event()
        self.threads: list = []
        self.error: Exception | None = None
        real = DisplacementTransform.save

        def save(transform, folder):
            self.threads.append(threading.current_thread())
            self.entered.set()
            assert self.opened.wait(30)
            if self.error is not None:
                raise self.error
            return real(transform, folder)

        monkeypatch.setattr(DisplacementTransform, "save", save)

    def open(self) -> None:
        self.opened.set()


def _widget(make_napari_viewer):
    """A widget whose last registration is a small smooth displacement (as a finished run leaves it)."""
    rng = np.random.default_rng(3)
    field = np.stack([np.cumsum(rng.normal(0, 0.05, (24, 20)), axis=a) for a in (0, 1)]).astype(np.float32)
    viewer = make_napari_viewer()
    viewer.add_image(rng.random((24, 20)).astype(np.float32), name="image")
    widget = RegisterWidget(viewer)
    viewer.window.add_dock_widget(widget)
    t = DisplacementTransform(field, spacing=(1.5, 1.5))
    widget.last = Registration(
        np.zeros((24, 20), np.float32), t, metrics={"ncc_after": 0.9}, settings={"a": 1}
    )
    widget._last_run = {"settings": {"fixed": "f", "moving": "m", "method": "nephi"}, "world_affine": None}
    widget.state.changed.emit(RunState.IDLE, RunState.IDLE)  # as the end of a run: the buttons follow
    return viewer, widget


def _wait_idle(widget, qtbot):
    qtbot.waitUntil(lambda: widget.state.is_(RunState.IDLE) and not widget.saver.busy, timeout=WAIT_MS)


def test_save_returns_before_the_files_are_written_and_saves_what_the_synchronous_save_did(
    make_napari_viewer, qtbot, tmp_path, messages, monkeypatch
):
    viewer, widget = _widget(make_napari_viewer)
    assert widget.save_button.isEnabled()
    gate = SaveGate(monkeypatch)
    folder = tmp_path / "t"
    assert widget.save_transform(folder, wait=False) is None  # returns at once
    assert gate.entered.wait(10) and gate.threads[0] is not threading.main_thread()
    assert not (folder / "run.json").exists()
    for button in (widget.save_button, widget.apply_button, widget.run_button, widget.cancel_button):
        assert not button.isEnabled()  # one job at a time; a save is not cancelled half way
    assert "Saving" in widget.status.text()
    with qtbot.waitSignal(widget.save_done, timeout=WAIT_MS) as done:
        gate.open()
    assert done.args == [folder]
    _wait_idle(widget, qtbot)
    assert (
        widget.save_button.isEnabled() and widget.apply_button.isEnabled() and widget.run_button.isEnabled()
    )
    assert messages == {"error": [], "info": [f"Transform saved to {folder}"]}
    # what the synchronous save of session 43 wrote: the same transform, the same run.json
    t = widget.last.transform
    t.save(tmp_path / "sync")
    np.testing.assert_array_equal(
        load_transform(folder).displacement(), load_transform(tmp_path / "sync").displacement()
    )
    np.testing.assert_allclose(load_transform(folder).displacement(), t.displacement(), atol=1e-6)
    run = json.loads((folder / "run.json").read_text())
    assert run == {"settings": widget._last_run["settings"], "metrics": {"ncc_after": 0.9}}
    assert load_transform(folder).settings == {"a": 1, **widget._last_run["settings"]}


def test_save_with_wait_returns_the_folder(make_napari_viewer, qtbot, tmp_path, messages):
    viewer, widget = _widget(make_napari_viewer)
    assert widget.save_transform(tmp_path / "t") == tmp_path / "t"  # wait=True: scripts and tests
    assert (tmp_path / "t" / "run.json").exists() and widget.state.is_(RunState.IDLE)


def test_a_failed_save_reaches_show_error_and_the_widget_is_idle(
    make_napari_viewer, qtbot, tmp_path, messages, monkeypatch
):
    viewer, widget = _widget(make_napari_viewer)
    gate = SaveGate(monkeypatch)
    gate.error = OSError("disk full")
    gate.open()
    assert widget.save_transform(tmp_path / "t") is None
    assert messages["error"] == ["Could not save the transform: disk full"] and messages["info"] == []
    _wait_idle(widget, qtbot)
    assert widget.save_button.isEnabled() and widget.run_button.isEnabled()
    gate.error = RegistrationError("The folder is a file.")
    assert widget.save_transform(tmp_path / "t") is None
    assert messages["error"][1] == "Could not save the transform: The folder is a file."


def test_a_save_is_refused_while_another_job_runs_and_blocks_the_others(
    make_napari_viewer, qtbot, tmp_path, messages, monkeypatch
):
    viewer, widget = _widget(make_napari_viewer)
    widget.state.to(RunState.RUNNING)  # a registration is on
    assert not widget.save_button.isEnabled()
    assert widget.save_transform(tmp_path / "a") is None
    assert messages["error"] == ["A registration is running; wait for it to finish (or Cancel it) first."]
    widget.state.to(RunState.IDLE)
    gate = SaveGate(monkeypatch)
    widget.save_transform(tmp_path / "b", wait=False)
    assert gate.entered.wait(10)
    assert widget.save_transform(tmp_path / "c", wait=False) is None
    assert widget.apply_transform(tmp_path / "b", layer=viewer.layers["image"], wait=False) is None
    assert messages["error"][1:] == ["A transform is being saved; wait for it to finish first."] * 2
    widget.cancel()  # not cancelled: the files are being written
    widget.state.cancel()  # nor through the machine (review 1 of session 44, D1)
    assert widget.state.is_(RunState.RUNNING) and not widget.cancel_button.isEnabled()
    with qtbot.waitSignal(widget.save_done, timeout=WAIT_MS) as done:
        gate.open()
    assert done.args == [tmp_path / "b"] and not (tmp_path / "c").exists()
    _wait_idle(widget, qtbot)


def test_save_before_any_run_says_so(make_napari_viewer, qtbot, tmp_path, messages):
    viewer = make_napari_viewer()
    widget = RegisterWidget(viewer)
    assert not widget.save_button.isEnabled()
    assert widget.save_transform(tmp_path / "t") is None
    assert messages["error"] == ["Run a registration first."]
