"""Fixtures of the command-line tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest


@pytest.fixture
def error_line(capsys) -> Callable[[], str]:
    """A function returning the one ``error: ...`` line a failed command printed (and checking it)."""

    def read() -> str:
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
        assert "Traceback" not in captured.err and captured.out == ""
        return lines[0]

    return read
