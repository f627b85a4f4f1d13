"""The dev server for tests: in a thread of its own (usable from sync and async tests and
while subprocesses talk to it), or as a real subprocess, always on 127.0.0.1."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from pipecat_roark.devserver import DevServer, Faults, spawn


class RunningDevServer:
    """Sync helpers over the server's real read API."""

    def __init__(self, server: DevServer) -> None:
        self.server = server
        self.base_url = server.base_url
        self.http = httpx.Client(base_url=self.base_url, timeout=30)

    def calls(self) -> list[dict[str, Any]]:
        return self.http.get("/_dev/calls").json()  # type: ignore[no-any-return]

    def call(self, call_id: str) -> dict[str, Any]:
        response = self.http.get("/_dev/call", params={"id": call_id})
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def recording(self, call_id: str) -> bytes:
        response = self.http.get("/_dev/call/recording.wav", params={"id": call_id})
        response.raise_for_status()
        return response.content

    def requests(self) -> list[dict[str, Any]]:
        return self.http.get("/_dev/requests").json()  # type: ignore[no-any-return]

    def configure(self, **changes: Any) -> None:
        self.http.post("/_dev/config", json=changes).raise_for_status()

    def wait_until(self, condition: Callable[[], bool], timeout: float = 60.0) -> bool:
        """Block until ``condition()`` holds, looking again after every answered request
        (no polling interval to tune); False when ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        changed = self.server.answered_changed
        while True:
            with changed:
                seen = self.server.answered
            if condition():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with changed:
                changed.wait_for(lambda s=seen: self.server.answered != s, timeout=remaining)


@contextmanager
def running_dev_server(tmp_path: Path, **faults: Any) -> Iterator[RunningDevServer]:
    loop = asyncio.new_event_loop()
    server = DevServer(data_dir=tmp_path / "devserver", faults=Faults(**faults))
    ready = threading.Event()
    stop = asyncio.Event()

    async def run() -> None:
        await server.start()
        ready.set()
        try:
            await stop.wait()
        finally:
            await server.stop()

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    assert ready.wait(30), "dev server did not start"
    running = RunningDevServer(server)
    try:
        yield running
    finally:
        running.http.close()
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()


def start_dev_server_process(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    """``python -m pipecat_roark.devserver --port 0 ...``; returns (process, base URL)."""
    return spawn(tmp_path / "devserver", *args)
