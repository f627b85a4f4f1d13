"""The minimal wiring: two lines in any Pipecat bot.

    from pipecat_roark import RoarkObserver

    roark = RoarkObserver(agent_id="my-agent")           # 1. create (ROARK_API_KEY from env)
    pipeline = Pipeline([..., transport.output(), roark.audio_processor, ...])
    worker = PipelineWorker(pipeline, observers=[roark])  # 2. attach

Runnable offline: the "transport" here is a scripted caller and bot from
pipecat_roark.testing, so this file shows the wiring without any service keys. It runs
on every supported Pipecat: ``pipecat_roark.compat`` gives Pipecat's PipelineWorker and
WorkerRunner (1.3+), or PipelineTask and PipelineRunner on older versions.

    uv run examples/basic_observer.py
"""

from __future__ import annotations

import asyncio

from pipecat.pipeline.pipeline import Pipeline

from pipecat_roark import RoarkObserver
from pipecat_roark.compat import PipelineWorker, WorkerRunner, run_worker
from pipecat_roark.testing import ScriptedCall


async def main() -> None:
    roark = RoarkObserver(agent_id="basic-example", agent_name="Basic example")
    pipeline = Pipeline([ScriptedCall(), roark.audio_processor])
    worker = PipelineWorker(pipeline, observers=[roark], idle_timeout_secs=None)
    await run_worker(WorkerRunner(handle_sigint=False), worker)
    print(f"recorded call {roark.pipecat_call_id} in {roark.data_dir}")
    print("see it with: pipecat-roark show", roark.pipecat_call_id)


if __name__ == "__main__":
    asyncio.run(main())
