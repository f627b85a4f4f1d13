"""The background drainer of a bot process: one per database and key, in the bot's loop.

Started by the first RoarkObserver that delivers, woken by the writer's commits, and
stopped (bounded, leases handed back) when the bot's loop winds down, or by
``lifecycle.shut_down``. The registry of running ones is ``lifecycle.PROCESS.drainers``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from loguru import logger

from . import config
from .drain import Drainer
from .drain_policy import DrainPolicy
from .lifecycle import PROCESS, RunningDrainer, running_writer

__all__ = ["ensure_background_drainer", "stop_background_drainers"]


def ensure_background_drainer(
    directory: Path, api_key: str, base_url: str | None, *, keep_delivered_audio: bool = False
) -> None:
    """Start this process's drainer for ``directory`` and key in the running loop (once).

    The first observer's settings hold for the drainer's life. Never raises and never
    blocks: delivery problems are logged, the call goes on.
    """
    try:
        loop = asyncio.get_running_loop()
        key = (config.registry_key(directory), config.key_fingerprint(api_key))
        current = PROCESS.drainers.get(key)
        if current is not None and not current.task.done() and current.task.get_loop() is loop:
            return
        policy = DrainPolicy(keep_delivered_audio=keep_delivered_audio)
        drainer = Drainer(directory, api_key, base_url, policy)
        stop = asyncio.Event()
        task = loop.create_task(
            _run_background(drainer, stop), name=f"pipecat-roark-drainer:{directory}"
        )
        PROCESS.drainers[key] = RunningDrainer(drainer, task, stop)

        def on_commit() -> None:
            loop.call_soon_threadsafe(drainer.wake)

        # The writer that runs, never a new one (without it the drainer looks every poll_s);
        # and at the task's end, that same writer: a lookup there could start a writer (a
        # thread, or a child process) at teardown just to take a listener off it.
        writer = running_writer(directory)
        if writer is not None:
            writer.add_commit_listener(on_commit)
            task.add_done_callback(lambda _: writer.remove_commit_listener(on_commit))
    except Exception as exc:
        logger.error(
            f"pipecat-roark: the background drainer did not start ({exc}); run `pipecat-roark drain`"
        )


async def _run_background(drainer: Drainer, stop: asyncio.Event) -> None:
    try:
        await drainer.run_forever(stop)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        logger.error(
            f"pipecat-roark: the background drainer stopped ({exc}); run `pipecat-roark drain`"
        )


async def stop_background_drainers(limit_s: float = 5.0) -> None:
    """Stop this loop's background drainers, bounded: leases are released, nothing is lost."""
    loop = asyncio.get_running_loop()
    mine = [(k, v) for k, v in PROCESS.drainers.items() if v.task.get_loop() is loop]
    for key, running in mine:
        running.stop.set()
        PROCESS.drainers.pop(key, None)
    tasks = [running.task for _, running in mine]
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=limit_s)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=1.0)
