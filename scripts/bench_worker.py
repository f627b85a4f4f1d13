"""One side of a side-by-side benchmark, run in its own process by scripts/bench.py.

    python scripts/bench_worker.py mixed MODE,MODE,... ROUNDS BASE_URL DIR [CALLS]
    python scripts/bench_worker.py audio MODE ROUNDS BASE_URL DIR [FRAMES]
    python scripts/bench_worker.py arrival MODE ROUNDS BASE_URL DIR
    python scripts/bench_worker.py longcall MODE MINUTES BASE_URL DIR

MODE is none | noop (a no-op observer; the same AudioBufferProcessor records) | capture
(ours, recording only) | ours (recording and delivering during the call) | process (ours,
a child process delivering: ``delivery_process=True``) | children (ours, a writer child
recording and a delivery child delivering: ``writer_process=True, delivery_process=True``;
the bot neither writes nor delivers) | wproc (ours, a writer child recording, delivering
in the loop: ``writer_process=True``) | reference. "reference" runs under the scratch venv that has
Roark's own `pipecat-roark==0.2.5` installed (which is also called `pipecat_roark`), so
the scripted call is loaded from our testing.py by path: both sides play the same call.
Prints one JSON line.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from loguru import logger

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src" / "pipecat_roark"


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


try:  # testing.py imports our compat; the reference's package (0.2.5) has none
    import pipecat_roark.compat  # noqa: F401
except ImportError:
    _load("pipecat_roark.compat", SRC / "compat.py")
scripted: Any = _load("bench_scripted", SRC / "testing.py")
_synth = scripted.tone


@functools.lru_cache(maxsize=4096)
def _cached_tone(freq: float, ms: int, sample_rate: int, phase: int) -> bytes:
    return bytes(_synth(freq, ms, sample_rate, phase))


def _tone(freq: float, ms: int, sample_rate: int = 16000, start: int = 0) -> bytes:
    # An integer frequency repeats every second: same bytes, without the synthesis
    # cost drowning the differences this benchmark is about.
    return _cached_tone(freq, ms, sample_rate, start % sample_rate)


scripted.tone = _tone

from pipecat.frames.frames import Frame, StartFrame  # noqa: E402
from pipecat.observers.base_observer import BaseObserver, FramePushed  # noqa: E402
from pipecat.processors.audio.audio_buffer_processor import AudioBufferProcessor  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402

KEY = "bench-key-not-secret"
HOPS = 4  # stand-ins for STT, LLM, TTS and the output transport: every hop is observed
AUDIO_HOPS = 5  # the audio-only workload of issue 12: 5 pass-through hops
AUDIO_FRAMES = 20_000  # 20 ms frames, user and bot alternating: 200 s of each side
MIXED_TURNS = 20  # the mixed call: 54 s of audio in 3,013 frames (see BENCHMARKS.md)
MIXED_CALLS = 3  # mixed calls per mode and round
SETTLE_S = 0.25  # after a mode's calls: delivery finishes (CPU is counted, this wall time not)
OURS = ("ours", "capture", "process", "children", "wproc")
"""The modes that run RoarkObserver."""
WRITER_CHILD = ("children", "wproc")
"""The modes whose records are committed by a writer child (``writer_process=True``)."""
DELIVERY_CHILD = ("process", "children")
"""The modes that deliver from a delivery child (``delivery_process=True``)."""
IN_LOOP_DRAINER = ("ours", "wproc")
"""The modes that deliver from the bot's event loop."""


class Hop(FrameProcessor):
    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)


class _Discard:
    """Where the scripted call's copy of everything it played goes in a benchmark."""

    def extend(self, data: bytes) -> None:
        return None


class NoopObserver(BaseObserver):
    async def on_push_frame(self, data: FramePushed) -> None:
        return None


class ArmedRecorder(AudioBufferProcessor):
    """What a bot that records without Roark runs: the same buffering, no uploads."""

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame) and not self._recording:
            await self.start_recording()


def long_call(turns: int) -> list[Any]:
    """An audio-heavy call: alternating user and bot speech, a tool call every few turns."""
    steps: list[Any] = []
    for turn in range(turns):
        steps.append(scripted.User(f"Question number {turn}, please.", ms=1200))
        if turn % 4 == 0:
            steps.append(scripted.Tool(f"t{turn}", "lookup", {"turn": turn}, {"ok": True}))
        steps.append(scripted.Bot([f"Answer{turn}", "is", "that", "it", "works."], ms_per_word=300))
    return steps


class AudioOnlyCall(scripted.ScriptedCall):  # type: ignore[misc, name-defined]
    """Audio frames only: ``frames`` 20 ms frames, user and bot alternating, then the end."""

    def __init__(self, frames: int, **kwargs: Any) -> None:
        super().__init__([], **kwargs)
        self.frames = frames

    async def _play(self) -> None:
        for n in range(self.frames):
            if n % 2:
                await self._bot_audio(scripted.TICK_MS)
            else:
                await self._user_audio(scripted.TICK_MS, voiced=True)
        await self.push_frame(scripted.EndWorkerFrame(), FrameDirection.UPSTREAM)


def short_call() -> list[Any]:
    return [
        scripted.Bot(["Hi,", "how", "can", "I", "help?"]),
        scripted.User("My order is late.", ms=800),
        scripted.Bot(["It", "arrives", "tomorrow."]),
    ]


def make_observer(mode: str, base_url: str, directory: Path, call_id: str) -> Any:
    if mode in OURS:
        from pipecat_roark import RoarkObserver

        return RoarkObserver(
            api_key=KEY,
            agent_id="bench-bot",
            pipecat_call_id=call_id,
            base_url=base_url,
            data_dir=directory,
            deliver=mode != "capture",
            delivery_process=mode in DELIVERY_CHILD,
            writer_process=mode in WRITER_CHILD,
        )
    if mode == "reference":
        import pipecat_roark.client as reference_client
        from pipecat_roark import RoarkObserver as ReferenceObserver

        # The reference hard-codes api.roark.ai; point its constants at the dev server.
        reference_client.WEBHOOK_URL = f"{base_url}/v1/integrations/pipecat"
        reference_client.CHUNK_UPLOAD_URL_ENDPOINT = (
            f"{base_url}/v1/integrations/pipecat/chunk-upload-url"
        )

        class Args:
            session_id = call_id

        return ReferenceObserver(api_key=KEY, agent_id="bench-bot", runner_args=Args())
    if mode == "noop":
        return NoopObserver()
    return None


def stat_cpu_s(stat: str) -> float:
    """CPU seconds (user + system) in the text of a /proc ``stat`` file (a process's, or
    one thread's under ``task/``)."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) a live process has used so far, from
    /proc/<pid>/stat."""
    return stat_cpu_s(Path(f"/proc/{pid}/stat").read_text())


def delivery_child(directory: Path) -> Any:
    """The delivery child this process started for ``directory`` (``delivery_process``)."""
    from pipecat_roark import config, lifecycle

    key = (config.registry_key(directory), config.key_fingerprint(KEY))
    child = lifecycle.PROCESS.delivery_processes[key]
    for _ in range(600):  # bounded: it is spawned in a thread
        if child.pid is not None:
            return child
        time.sleep(0.05)
    raise SystemExit("the delivery child did not start")


def writer_child_pid(directory: Path) -> int:
    """The pid of the writer child recording ``directory`` for this process
    (``writer_process``); a writer that fell back to a thread of ours is an error here:
    the figures would be the thread's."""
    from pipecat_roark import lifecycle
    from pipecat_roark.writer_process import ProcessWriter

    writer = lifecycle.running_writer(directory)
    if not isinstance(writer, ProcessWriter):
        raise SystemExit(f"{directory} is not recorded by a writer child: {writer!r}")
    for _ in range(600):  # bounded: it is spawned by the writer's sender thread
        if writer.fell_back:
            raise SystemExit(f"the writer child of {directory} failed: {writer.fell_back}")
        if writer.child_pid is not None:
            return int(writer.child_pid)
        time.sleep(0.05)
    raise SystemExit("the writer child did not start")


def children_pids(mode: str, directory: Path) -> list[int]:
    """The pids of the children ``mode`` runs for ``directory`` (none for most modes)."""
    pids = []
    if mode in WRITER_CHILD:
        pids.append(writer_child_pid(directory))
    if mode in DELIVERY_CHILD:
        pids.append(delivery_child(directory).pid)
    return pids


async def children_warm(mode: str, base_url: str, call_id: str) -> None:
    """Wait until ``mode``'s delivery child, if it has one, delivered the warm-up call.

    Its start-up (imports, about 0.6 s of its own CPU) runs beside the first call, in
    another process; unwaited, it would land in the first counted round. The writer child
    is warm already: the end of the call waited for its commit.
    """
    if mode not in DELIVERY_CHILD:
        return
    import httpx

    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        await _arrived(http, call_id)


def children_cpu_s(pids: list[int]) -> float:
    """The CPU seconds the children ``pids`` have used so far, together."""
    return sum(child_cpu_s(pid) for pid in pids)


async def play(
    mode: str,
    script: list[Any],
    base_url: str,
    directory: Path,
    call_id: str,
    pace: float,
    on_step: Any = None,
    audio_frames: int = 0,
) -> None:
    """Play ``script`` (or, with ``audio_frames``, the audio-only call) through the hops."""
    observer = make_observer(mode, base_url, directory, call_id)
    recorder = (
        observer.audio_processor
        if hasattr(observer, "audio_processor")
        else ArmedRecorder(num_channels=2, buffer_size=256 * 1024)
    )
    if audio_frames:
        call = AudioOnlyCall(audio_frames, pace=pace, on_step=on_step)
    else:
        call = scripted.ScriptedCall(script, pace=pace, on_step=on_step)
    call.stats.user_audio = call.stats.bot_audio = _Discard()  # tests keep it; we must not
    processors = [
        call,
        *(Hop() for _ in range(AUDIO_HOPS if audio_frames else HOPS)),
        recorder,
    ]
    await scripted.run_pipeline(processors, observers=[] if observer is None else [observer])


async def mixed(
    modes: str, rounds: int, base_url: str, directory: Path, calls: int = MIXED_CALLS
) -> dict[str, Any]:
    """The mixed call at pace 0 under each of ``modes`` (comma-separated), in turn.

    Every round plays ``calls`` calls under each mode, the order reversed every other
    round, so the machine's drift and the neighbours' load fall on every mode alike
    (one 0.4 s call in a process of its own is too short to tell a few ms of CPU from
    that noise). Each mode starts from a collected heap. Round 0 plays one call per
    mode to warm up imports, caches, the writer and the drainer, and is not counted.
    Per mode and round: the process CPU per call (every thread: the writer's, the spool
    threads' and the drainer's work counts), taken until ``SETTLE_S`` after the last
    call, by when the drainer (ours) or the reference's end-of-call upload has normally
    delivered it; the CPU per call of the mode's children (writer and delivery child,
    read from /proc over the same window; 0 for modes without) and the pipeline's wall
    time per call. A mode's children start with its first call and live to the end.
    """
    order = modes.split(",")
    cpu: dict[str, list[float]] = {mode: [] for mode in order}
    wall: dict[str, list[float]] = {mode: [] for mode in order}
    child_cpu: dict[str, list[float]] = {mode: [] for mode in order}
    pids: dict[str, list[int]] = {}
    for n in range(rounds + 1):
        for mode in order if n % 2 == 0 else order[::-1]:
            played = 0.0
            gc.collect()  # the garbage of the mode before is not this mode's cost
            start_children = children_cpu_s(pids.get(mode, []))
            start_cpu = time.process_time()
            for k in range(calls if n else 1):
                start = time.perf_counter()
                # Unique per dev server: a repeated id's call-started is refused (its
                # Idempotency-Key was used with another body) and the call delivers less.
                call_id = f"{mode}-mixed-{os.getpid()}-{n}-{k}"
                script = long_call(MIXED_TURNS)
                await play(mode, script, base_url, directory / mode, call_id, pace=0.0)
                played += time.perf_counter() - start
            await asyncio.sleep(SETTLE_S)
            if n:
                cpu[mode].append((time.process_time() - start_cpu) / calls)
                wall[mode].append(played / calls)
                ran = children_cpu_s(pids[mode]) - start_children
                child_cpu[mode].append(ran / calls)
            else:  # the children live from this first call to the end of the process
                pids[mode] = children_pids(mode, directory / mode)
                await children_warm(mode, base_url, call_id)
    for mode in order:
        await _drain_leftovers(mode)
    return {"cpu": cpu, "child_cpu": child_cpu, "times": wall, "calls": calls}


async def audio(
    mode: str, rounds: int, base_url: str, directory: Path, frames: int = AUDIO_FRAMES
) -> dict[str, Any]:
    """The audio-only call: ``frames`` frames through AUDIO_HOPS hops at pace 0.

    Per counted round, the pipeline's wall time; and per counted round on average, the
    process CPU (every thread) and the CPU of the mode's children (read from /proc; 0 for
    modes without), both from the first counted play to ``SETTLE_S`` after the last (what
    a play leaves to deliver or commit counts, whenever it runs).
    """
    times: list[float] = []
    pids: list[int] = []
    counted_cpu = counted_children = 0.0
    for n in range(rounds + 1):  # round 0 warms up: not counted
        if n == 1:
            counted_children, counted_cpu = children_cpu_s(pids), time.process_time()
        call_id = f"{mode}-audio-{os.getpid()}-{n}"  # unique per dev server, as in mixed()
        start = time.perf_counter()
        await play(mode, [], base_url, directory, call_id, pace=0.0, audio_frames=frames)
        if n:
            times.append(time.perf_counter() - start)
        else:  # the children live from this first call to the end of the process
            pids = children_pids(mode, directory)
            await children_warm(mode, base_url, call_id)
    await asyncio.sleep(SETTLE_S)
    cpu = (time.process_time() - counted_cpu) / rounds
    child_cpu = (children_cpu_s(pids) - counted_children) / rounds
    await _drain_leftovers(mode)
    return {"times": times, "cpu": cpu, "child_cpu": child_cpu, "frames": frames}


async def arrival(mode: str, rounds: int, base_url: str, directory: Path) -> dict[str, Any]:
    """Seconds from the script's last step to call-ended stored at the server."""
    import httpx

    script = short_call()
    latencies = []
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        for n in range(rounds):
            call_id = f"{mode}-arrival-{n}"
            ended_at: list[float] = []

            async def last_step(
                step: int, script_len: int = len(script), marks: list[float] = ended_at
            ) -> None:
                if step == script_len:
                    marks.append(time.perf_counter())

            waiter = asyncio.create_task(_arrived(http, call_id))
            await play(mode, script, base_url, directory, call_id, pace=1.0, on_step=last_step)
            arrived = await asyncio.wait_for(waiter, 60)
            latencies.append(arrived - ended_at[0])
    await _drain_leftovers(mode)
    return {"latencies": latencies}


async def _arrived(http: Any, call_id: str) -> float:
    for _ in range(60_000):  # bounded: 60 s at 1 ms
        response = await http.get(f"/_dev/calls/{call_id}")
        if response.status_code == 200 and response.json().get("callEnded"):
            return time.perf_counter()
        await asyncio.sleep(0.001)
    raise TimeoutError(call_id)


async def _drain_leftovers(mode: str) -> None:
    if mode in IN_LOOP_DRAINER:
        from pipecat_roark.background_drainer import stop_background_drainers

        await stop_background_drainers(10)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def longcall(mode: str, minutes: int, base_url: str, directory: Path) -> dict[str, Any]:
    """One call of ``minutes`` of audio at pace 0; RSS sampled after every tenth of it."""
    turns = max(10, round(minutes * 60 / 2.7))
    script = long_call(turns)
    samples: list[int] = []

    async def sample(step: int) -> None:
        if step % max(1, len(script) // 10) == 0:
            if mode in ("ours", "capture"):
                # Pace 0 plays audio ~100x faster than real time; at real time the writer
                # keeps up. Let it catch up, so this measures what a call holds, not a
                # backlog that only this speed creates.
                from pipecat_roark.lifecycle import writer_for

                await writer_for(directory).flush(60)
            samples.append(rss_bytes())

    await play(mode, script, base_url, directory, f"{mode}-long", pace=0.0, on_step=sample)
    await _drain_leftovers(mode)
    return {"rss": samples, "audio_seconds": turns * 2.7}


def main() -> None:
    logger.remove()
    logger.add(sys.stderr, level="ERROR")
    what, mode, rounds, base_url, directory = sys.argv[1:6]
    extra = [int(arg) for arg in sys.argv[6:]]
    run = {"mixed": mixed, "audio": audio, "arrival": arrival, "longcall": longcall}[what]
    result = asyncio.run(run(mode, int(rounds), base_url, Path(directory), *extra))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
