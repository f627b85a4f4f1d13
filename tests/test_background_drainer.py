"""The bot's background drainer (``background_drainer``) at teardown: stopping it lets go of
what it held and starts nothing.

A real pipeline records a call through a real ``RoarkObserver`` whose drainer delivers to
the dev server over loopback; then the process shuts down in the order ``shut_down``
uses (writers closed, drainers stopped)."""

from __future__ import annotations

from pathlib import Path

import pytest

from devserver_fixture import RunningDevServer
from pipecat_roark import RoarkObserver
from pipecat_roark.background_drainer import stop_background_drainers
from pipecat_roark.lifecycle import PROCESS, close_all_writers, running_writer
from pipecat_roark.testing import ScriptedCall, run_pipeline
from test_drain import KEY, short_script


@pytest.mark.anyio
async def test_stopping_the_drainer_after_the_writers_closed_starts_no_writer(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    """The drainer's task, once done, let go of its commit listener through
    ``writer_for``: with the writers closed (as at exit), that started a new writer (a
    thread, or a writer child) just to take a listener off it."""
    roark = RoarkObserver(
        agent_id="teardown",
        api_key=KEY,
        base_url=dev_server.base_url,
        pipecat_call_id="torn-down",
        chunk_bytes=8000,
        exit_drain_s=0,
    )
    script = ScriptedCall(short_script(1))
    await run_pipeline([script, roark.audio_processor], observers=[roark])  # type: ignore[arg-type]
    assert PROCESS.drainers, "the observer started its background drainer"
    close_all_writers()
    await stop_background_drainers(5)
    assert running_writer(data_dir) is None, "a writer was started at teardown"
    assert PROCESS.writers == {}
