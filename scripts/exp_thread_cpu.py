"""Experiment (issue 12): the bot's CPU per mixed call, thread by thread, mode by mode.

Plays ``bench_worker``'s mixed call (pace 0) under each mode in turn in this one process,
round after round, the order reversed every other round (as ``bench_worker mixed``
does), and reads every thread's CPU from ``/proc/self/task/*/stat`` around each mode's
calls. It shows where a mode's cost lands: the event loop (``MainThread``), the writer
thread and its spool threads, or the writer child's sender and reader threads. The
children's own CPU is not in it (see scripts/bench's "bot + children" rows).

    uv run python scripts/exp_thread_cpu.py none,noop,children,capture 8 [--dir DIR]

A dev server must run on ``--server`` (default http://127.0.0.1:18801): ``pipecat-roark
dev-server --port 18801``. Not a benchmark (thread CPU is counted in clock ticks); a
profile, median per call of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_worker
from loguru import logger

CALLS = 3


def thread_cpu() -> dict[str, tuple[str, float]]:
    """Every thread's CPU seconds so far, by native id, with its name (numbers stripped)."""
    names = {str(t.native_id): t.name.split(":")[0] for t in threading.enumerate()}
    out = {}
    for task in Path("/proc/self/task").iterdir():
        tid = task.name
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        out[tid] = (names.get(tid, "other"), bench_worker.stat_cpu_s(stat))
    return out


async def run(modes: list[str], rounds: int, server: str, directory: Path) -> None:
    per_call: dict[str, dict[str, list[float]]] = {mode: {} for mode in modes}
    for n in range(rounds + 1):  # round 0 warms up (imports, children): not counted
        for mode in modes if n % 2 == 0 else modes[::-1]:
            gc.collect()
            before, cpu = thread_cpu(), time.process_time()
            for k in range(CALLS if n else 1):
                await bench_worker.play(
                    mode,
                    bench_worker.long_call(bench_worker.MIXED_TURNS),
                    server,
                    directory / mode,
                    f"{mode}-{os.getpid()}-{n}-{k}",
                    pace=0.0,
                )
            await asyncio.sleep(bench_worker.SETTLE_S)
            after, cpu = thread_cpu(), time.process_time() - cpu
            if not n:
                continue
            spent: dict[str, float] = {"process": cpu}
            for tid, (name, seconds) in after.items():
                spent[name] = spent.get(name, 0.0) + seconds - before.get(tid, (name, 0.0))[1]
            for name, seconds in spent.items():
                per_call[mode].setdefault(name, []).append(seconds / CALLS * 1000)
    for mode in modes:
        shown = {
            name: round(statistics.median(values), 1)
            for name, values in sorted(per_call[mode].items())
            if statistics.median(values) > 0
        }
        print(f"{mode}: ms of CPU per call {shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modes", help="comma-separated bench_worker modes")
    parser.add_argument("rounds", type=int)
    parser.add_argument("--server", default="http://127.0.0.1:18801")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    logger.remove()
    directory = args.dir or Path(tempfile.mkdtemp(prefix="exp-thread-cpu-"))
    asyncio.run(run(args.modes.split(","), args.rounds, args.server, directory))


if __name__ == "__main__":
    main()
