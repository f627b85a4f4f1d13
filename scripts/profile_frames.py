"""Where the per-frame time goes: CPU per frame by observer, split by thread, plus counts.

    uv run python scripts/profile_frames.py [FRAMES [BASE_URL [MODE,…]]]       # ours, baselines
    .bench/reference-venv/bin/python scripts/profile_frames.py FRAMES BASE_URL  # Roark's 0.2.5

BASE_URL is a running `pipecat-roark dev-server` for the modes that deliver.

Plays the audio-only call of scripts/bench (audio frames only, 5 pass-through hops,
pace 0) once to warm up (imports, the drainer's HTTP client) and three times measured,
per mode, in this one process (a delivering drainer keeps running between plays), and
prints one line per mode: process CPU per frame over no observer (the first mode), the writer thread's
share (read from /proc), and what Pipecat handed the observer per frame. CPU time, not
wall time: on a shared machine wall time mostly measures the neighbours.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_worker as bw
from loguru import logger

TICKS = os.sysconf("SC_CLK_TCK")


def writer_cpu_s() -> float:
    """CPU seconds of this process's writer threads, from /proc."""
    import threading

    total = 0
    for thread in threading.enumerate():
        if not thread.name.startswith("pipecat-roark-writer") or thread.native_id is None:
            continue
        try:
            stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


class Counting:
    """Counts what Pipecat's WorkerObserver queues for observers (a profiling aid only)."""

    pushes = 0
    delivered = 0
    processed = 0


def count_deliveries() -> None:
    from pipecat.pipeline.worker_observer import WorkerObserver

    push, process = WorkerObserver.on_push_frame, WorkerObserver.on_process_frame

    async def on_push_frame(self: Any, data: Any) -> None:
        Counting.pushes += 1
        await push(self, data)
        for proxy in (self._proxies or {}).values():
            if data.first_push or proxy.observer.observe_every_push:
                Counting.delivered += 1

    async def on_process_frame(self: Any, data: Any) -> None:
        Counting.processed += len(self._proxies or ())
        await process(self, data)

    WorkerObserver.on_push_frame = on_push_frame  # type: ignore[method-assign]
    WorkerObserver.on_process_frame = on_process_frame  # type: ignore[method-assign]


class FirstPushNoop(bw.NoopObserver):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__(observe_every_push=False)


async def measure(
    mode: str, frames: int, directory: Path, base_url: str
) -> tuple[float, float, float, float]:
    """(CPU s per frame, writer CPU s per frame, deliveries per frame, process events per frame)."""
    if mode == "noop-first":
        bw.make_observer = _with_first_push_noop(bw.make_observer)
        mode = "noop"
    cpus, writer = [], []
    for n in range(4):
        Counting.pushes = Counting.delivered = Counting.processed = 0
        cpu, wcpu = time.process_time(), writer_cpu_s()
        call_id = f"profile-{mode}-{n}-{os.getpid()}"
        await bw.play(mode, [], base_url, directory, call_id, 0.0, audio_frames=frames)
        if mode in ("capture", "ours"):
            from pipecat_roark.lifecycle import writer_for

            await writer_for(directory).flush(60)  # its work for this call counts
        if n:
            cpus.append(time.process_time() - cpu)
            writer.append(writer_cpu_s() - wcpu)
    if mode == "ours":  # it delivered the calls before while the next one played
        from pipecat_roark.background_drainer import stop_background_drainers

        await stop_background_drainers(30)
    return (
        statistics.median(cpus) / frames,
        statistics.median(writer) / frames,
        Counting.delivered / frames,
        Counting.processed / frames,
    )


def _with_first_push_noop(make: Any) -> Any:
    def make_observer(mode: str, *args: Any) -> Any:
        return FirstPushNoop() if mode == "noop" else make(mode, *args)

    return make_observer


def main() -> None:
    logger.remove()
    logger.add(sys.stderr, level="CRITICAL")
    frames = int(sys.argv[1]) if len(sys.argv) > 1 else bw.AUDIO_FRAMES
    base_url = sys.argv[2] if len(sys.argv) > 2 else "http://127.0.0.1:9"
    count_deliveries()
    try:
        import pipecat_roark.writer  # noqa: F401  (ours, not Roark's 0.2.5)

        modes = ["none", "noop", "noop-first", "capture"] + (["ours"] if len(sys.argv) > 2 else [])
        if len(sys.argv) > 3:
            modes = sys.argv[3].split(",")
    except ImportError:
        modes = ["none", "reference"]
    base = None
    for mode in modes:
        with tempfile.TemporaryDirectory() as tmp:
            cpu, writer, delivered, processed = asyncio.run(
                measure(mode, frames, Path(tmp), base_url)
            )
        base = cpu if base is None else base
        print(
            f"{mode:>10}: {cpu * 1e6:6.1f} µs CPU/frame, {(cpu - base) * 1e6:+6.1f} over none"
            f" (writer thread {writer * 1e6:4.1f}); observer handed {delivered:.2f} pushes"
            f" + {processed:.2f} process events per frame",
            flush=True,
        )


if __name__ == "__main__":
    main()
