"""The widgets' small parts one by one: run state, Run/Cancel buttons, step queue, scroll panel, runner."""

import threading
import time

import pytest
from qtpy.QtCore import QObject
from qtpy.QtWidgets import QLabel, QVBoxLayout, QWidget

from napari_nephi.core.progress import Progress
from napari_nephi.widgets._panel import MAX_HEIGHT, MIN_HEIGHT, ScrollPanel
from napari_nephi.widgets._runner import RegistrationRunner
from napari_nephi.widgets._state import RunControls, RunState, RunStateMachine
from napari_nephi.widgets._steps import StepQueue


def test_state_machine_moves_only_along_allowed_transitions(qtbot):
    machine = RunStateMachine()
    seen = []
    machine.changed.connect(lambda old, new: seen.append((old, new)))
    assert machine.state is RunState.IDLE
    for new in (RunState.RUNNING, RunState.CANCELLING, RunState.IDLE, RunState.RUNNING):
        machine.to(new)
    machine.to(RunState.ADDING_RESULTS)
    with pytest.raises(RuntimeError, match="cannot go from adding results to running"):
        machine.to(RunState.RUNNING)
    machine.to(RunState.IDLE)
    with pytest.raises(RuntimeError, match="cannot go from idle to cancelling"):
        machine.to(RunState.CANCELLING)
    assert seen == [
        (RunState.IDLE, RunState.RUNNING),
        (RunState.RUNNING, RunState.CANCELLING),
        (RunState.CANCELLING, RunState.IDLE),
        (RunState.IDLE, RunState.RUNNING),
        (RunState.RUNNING, RunState.ADDING_RESULTS),
        (RunState.ADDING_RESULTS, RunState.IDLE),
    ]
    assert machine.is_(RunState.IDLE, RunState.RUNNING) and not machine.is_(RunState.RUNNING)


def test_run_controls_follow_the_state(qtbot):
    machine = RunStateMachine()
    controls = RunControls(machine)
    qtbot.addWidget(controls)

    def buttons():
        return controls.run_button.isEnabled(), controls.cancel_button.isEnabled()

    assert buttons() == (True, False)
    machine.to(RunState.RUNNING)
    assert buttons() == (False, True)
    machine.to(RunState.CANCELLING)
    assert buttons() == (False, False)
    machine.to(RunState.IDLE)
    machine.to(RunState.RUNNING)
    machine.to(RunState.ADDING_RESULTS)
    assert buttons() == (False, False)
    machine.to(RunState.IDLE)
    assert buttons() == (True, False)


def test_step_queue_runs_one_step_per_turn_in_order(qtbot):
    queue = StepQueue()
    done = []
    queue.add([lambda: done.append(1), lambda: done.append(2)], now=True)
    assert done == [1]  # the first at once, the next in a later turn
    queue.later(lambda: done.append(3))
    with qtbot.waitSignal(queue.emptied, timeout=2000):
        pass
    assert done == [1, 2, 3] and not queue.busy
    queue.add([lambda: done.append(4)])
    queue.clear()
    qtbot.wait(60)
    assert done == [1, 2, 3]


def test_step_queue_of_a_deleted_widget_runs_nothing(qtbot):
    owner = QWidget()
    queue = StepQueue(owner)
    done = []
    queue.add([lambda: done.append(1)])
    with qtbot.waitSignal(owner.destroyed, timeout=2000):
        owner.deleteLater()
    qtbot.wait(60)
    assert done == []


def test_step_queue_keeps_going_after_a_failing_step(qtbot):
    queue = StepQueue()
    done = []

    def fail():
        raise ValueError("a broken step")

    with pytest.raises(ValueError, match="a broken step"):
        queue.add([fail, lambda: done.append(2)], now=True)
    qtbot.waitUntil(lambda: done == [2], timeout=2000)


def test_scroll_panel_asks_for_at_most_max_height(qtbot):
    content = QWidget()
    box = QVBoxLayout(content)
    for k in range(80):  # far taller than a screen
        box.addWidget(QLabel(f"row {k}"))
    panel = ScrollPanel(content)
    qtbot.addWidget(panel)
    assert content.sizeHint().height() > MAX_HEIGHT
    assert panel.sizeHint().height() == MAX_HEIGHT
    assert panel.minimumSizeHint().height() == MIN_HEIGHT
    panel.resize(300, 400)
    panel.show()
    qtbot.waitExposed(panel)
    assert panel.verticalScrollBar().maximum() > 0  # the rest scrolls into view
    short = QWidget()
    QVBoxLayout(short).addWidget(QLabel("one row"))
    small = ScrollPanel(short)
    qtbot.addWidget(small)
    assert small.sizeHint().height() == short.sizeHint().height() < MAX_HEIGHT


def test_deleting_the_runner_cancels_its_run(qtbot):
    owner = QObject()
    runner = RegistrationRunner(owner)
    started, stopped = threading.Event(), []

    def slow(progress, cancel):
        p = Progress(progress, cancel)
        started.set()
        for i in range(1000):
            time.sleep(0.01)
            p.step(i + 1, 1000)
        stopped.append("finished")  # never reached: cancelled

    runner.run(slow)
    assert started.wait(5)
    t0 = time.monotonic()
    with qtbot.waitSignal(runner.destroyed, timeout=2000):
        owner.deleteLater()
    from qtpy.QtCore import QThreadPool

    qtbot.waitUntil(lambda: QThreadPool.globalInstance().activeThreadCount() == 0, timeout=5000)
    assert time.monotonic() - t0 < 2.0 and stopped == []
