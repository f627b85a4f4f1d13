"""A real voice bot with pipecat-roark: Deepgram STT → OpenAI LLM → Cartesia TTS.

    uv sync --extra examples
    cp .env.example .env   # fill in the keys
    uv run examples/bot.py --transport webrtc     # open http://localhost:7860/client
    uv run examples/bot.py --transport daily

Every call is recorded into the local WAL and delivered to Roark in the background.
What matters for pipecat-roark is marked "Roark:"; the rest is a plain Pipecat 1.x bot.
"""

from __future__ import annotations

import os
from typing import Any

from dotenv import load_dotenv
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.frames.frames import LLMRunFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.runner.types import RunnerArguments
from pipecat.runner.utils import create_transport
from pipecat.services.cartesia.tts import CartesiaTTSService
from pipecat.services.deepgram.stt import DeepgramSTTService
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.transports.base_transport import TransportParams

from pipecat_roark import RoarkObserver
from pipecat_roark.compat import PipelineWorker, WorkerRunner, run_worker

load_dotenv(override=True)

SYSTEM_PROMPT = "You are a friendly support agent for an online shop. Keep answers short."

TRANSPORT_PARAMS: dict[str, Any] = {
    "daily": lambda: _daily_params(),
    "webrtc": lambda: TransportParams(audio_in_enabled=True, audio_out_enabled=True),
}


def _daily_params() -> Any:
    from pipecat.transports.daily.transport import DailyParams

    return DailyParams(audio_in_enabled=True, audio_out_enabled=True)


async def bot(runner_args: RunnerArguments) -> None:
    transport = await create_transport(runner_args, TRANSPORT_PARAMS)

    # Roark: one observer per call. The call id comes from the runner (SmallWebRTC pc_id,
    # Pipecat Cloud session_id) and is shared with OpenTelemetry below. ROARK_API_KEY is
    # read from the environment.
    roark = RoarkObserver(
        agent_id="support-bot",
        agent_name="Support Bot",
        agent_prompt=SYSTEM_PROMPT,
        runner_args=runner_args,
    )

    stt = DeepgramSTTService(api_key=os.environ["DEEPGRAM_API_KEY"])
    llm = OpenAILLMService(api_key=os.environ["OPENAI_API_KEY"])
    tts = CartesiaTTSService(
        api_key=os.environ["CARTESIA_API_KEY"],
        settings=CartesiaTTSService.Settings(
            voice=os.getenv("CARTESIA_VOICE_ID", "71a7ad14-091c-4e8e-a314-022ece01c121")
        ),
    )
    context = LLMContext([{"role": "system", "content": SYSTEM_PROMPT}])
    aggregators = LLMContextAggregatorPair(
        context, user_params=LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer())
    )

    pipeline = Pipeline(
        [
            transport.input(),
            stt,
            aggregators.user(),
            llm,
            tts,
            transport.output(),
            roark.audio_processor,  # Roark: after transport.output(), records both sides
            aggregators.assistant(),
        ]
    )
    worker = PipelineWorker(
        pipeline,
        observers=[roark],  # Roark: here, not in PipelineParams (ignored by Pipecat 1.x)
        conversation_id=roark.pipecat_call_id,
    )

    @transport.event_handler("on_client_connected")
    async def on_client_connected(transport: Any, client: Any) -> None:
        await worker.queue_frames([LLMRunFrame()])

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport: Any, client: Any) -> None:
        # Roark: end the call now. Without this, a session that vanishes is still
        # finalized, only later (watchdog, or the next drainer after a crash).
        await roark.aflush(reason="client-disconnected")
        await worker.cancel()

    await run_worker(WorkerRunner(handle_sigint=runner_args.handle_sigint), worker)


if __name__ == "__main__":
    from pipecat.runner.run import main

    main()
