"""The Pipecat names that differ between API generations, in one import.

pipecat-roark supports Pipecat 0.0.104 up to the latest 1.x (docs/compat.md lists what
changed, and in which version). A bot, an example or a test that must run on every
supported version takes the renamed parts from here instead of choosing them itself:

    from pipecat_roark.compat import PipelineWorker, WorkerRunner, run_worker

    worker = PipelineWorker(pipeline, observers=[roark], idle_timeout_secs=None)
    await run_worker(WorkerRunner(handle_sigint=False), worker)

From 1.3 on these are Pipecat's own ``PipelineWorker`` / ``WorkerRunner``; before, they
are ``PipelineTask`` / ``PipelineRunner``, which take the same constructor arguments a
bot uses. Nothing here wraps or patches Pipecat: each name is Pipecat's own class.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

__all__ = [
    "CancelWorkerFrame",
    "EndWorkerFrame",
    "HAS_WORKER",
    "PIPECAT_VERSION",
    "PipelineWorker",
    "StopWorkerFrame",
    "WorkerRunner",
    "run_worker",
    "tts_text_frame",
]


def _parse(text: str) -> tuple[int, ...]:
    parts: list[int] = []
    for part in text.split("."):
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


PIPECAT_VERSION: tuple[int, ...] = _parse(version("pipecat-ai"))
"""The installed Pipecat as numbers, e.g. ``(0, 0, 104)`` or ``(1, 14, 0)``."""

try:  # Pipecat 1.3+
    from pipecat.pipeline.worker import PipelineWorker
    from pipecat.workers.runner import WorkerRunner

    HAS_WORKER = True
except ImportError:  # Pipecat < 1.3: the only names there
    from pipecat.pipeline.runner import PipelineRunner as WorkerRunner
    from pipecat.pipeline.task import PipelineTask as PipelineWorker

    HAS_WORKER = False
# HAS_WORKER: Pipecat 1.3+. Before it, a host cancelling ``run()`` while the pipeline's
# teardown awaits anything hangs that ``run()`` for good (see RoarkObserver's cleanup).

try:  # Pipecat 1.4+
    from pipecat.frames.frames import CancelWorkerFrame, EndWorkerFrame, StopWorkerFrame
except ImportError:  # Pipecat < 1.4
    from pipecat.frames.frames import CancelTaskFrame as CancelWorkerFrame
    from pipecat.frames.frames import EndTaskFrame as EndWorkerFrame
    from pipecat.frames.frames import StopTaskFrame as StopWorkerFrame


async def run_worker(runner: Any, worker: Any) -> None:
    """Run one worker to its end: ``add_workers()`` + ``run()`` from 1.3, ``run(task)`` before.

    ``runner.run(worker)`` still works on 1.x but is deprecated there; this spells each
    generation's own way.
    """
    if HAS_WORKER:
        await runner.add_workers(worker)
        await runner.run()
    else:
        await runner.run(worker)


def tts_text_frame(text: str, text_type: str = "sentence") -> Any:
    """A ``TTSTextFrame``: its required ``text_type`` was named ``aggregated_by`` before 1.13.

    Returns:
        The frame, built with whichever name the installed Pipecat takes.
    """
    from pipecat.frames.frames import TTSTextFrame

    name = "text_type" if PIPECAT_VERSION >= (1, 13) else "aggregated_by"
    kwargs: dict[str, Any] = {"text": text, name: text_type}
    return TTSTextFrame(**kwargs)
