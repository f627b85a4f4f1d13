"""Shared fixtures: a private data directory per test, and captured log lines."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from loguru import logger

from devserver_fixture import RunningDevServer, running_dev_server
from helpers import LogCapture
from pipecat_roark.lifecycle import close_all_writers


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh data directory; no ambient key or base URL leaks in from the environment."""
    directory = tmp_path / "roark"
    monkeypatch.delenv("ROARK_API_KEY", raising=False)
    monkeypatch.delenv("ROARK_BASE_URL", raising=False)
    monkeypatch.setenv("PIPECAT_ROARK_DIR", str(directory))
    yield directory
    close_all_writers()


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    capture = LogCapture()
    sink = logger.add(capture, level="DEBUG")
    yield capture
    logger.remove(sink)


@pytest.fixture
def dev_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RunningDevServer]:
    """A real Roark-compatible server on 127.0.0.1 (no faults; `.configure(...)` adds some).

    Under ``@pytest.mark.strict_order`` it refuses requests of a call that arrive out of
    order (409), so a drainer that breaks the order fails the test.
    """
    strict = request.node.get_closest_marker("strict_order") is not None
    with running_dev_server(tmp_path, strict_order=strict) as server:
        yield server
