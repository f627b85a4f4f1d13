"""Experiment (issue 12): where frame → committed goes at N real-time calls in one process.

Runs ``bench.durable_latency``'s calls (sampling every 50th frame with a call-scoped
barrier) and, on the writer thread, times every SQLite call and ``stat`` that takes over
5 ms, split by ``/proc/thread-self/schedstat`` into time on a CPU, time runnable but
waiting for a CPU, and time asleep (waiting for the GIL, or for the disk). Also counts the
cyclic garbage collector's pauses, which stop every thread.

    uv run python scripts/exp_commit_waits.py [calls] [turns] [--dir /dev/shm]

``--dir /dev/shm`` puts the database and chunk files in memory: what is left is not the
disk. Not a benchmark (the hook slows the writer thread a little); a profile.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import bench
from loguru import logger

from pipecat_roark import writer as writer_module
from pipecat_roark.lifecycle import close_all_writers

WATCHED = {"Connection.execute", "Connection.executemany", "stat"}
slow_calls: list[tuple[float, float, float, str, str]] = []
gc_pauses: list[tuple[float, int]] = []


def schedstat() -> tuple[float, float]:
    """This thread's seconds on a CPU and seconds runnable but waiting for one."""
    with open("/proc/thread-self/schedstat") as f:
        on_cpu, waiting, _ = f.read().split()
    return int(on_cpu) / 1e9, int(waiting) / 1e9


def hook_writer_thread() -> None:
    original = writer_module.Writer._run

    def run(self: Any) -> None:
        stack: list[tuple[str, float, tuple[float, float] | None]] = []

        def profile(frame: Any, event: str, arg: Any) -> None:
            if event == "c_call":
                name = getattr(arg, "__qualname__", "")
                stack.append((name, time.perf_counter(), schedstat() if name in WATCHED else None))
            elif event in ("c_return", "c_exception") and stack:
                name, start, before = stack.pop()
                wall = time.perf_counter() - start
                if before is not None and wall > 0.005:
                    after = schedstat()
                    slow_calls.append(
                        (
                            wall,
                            after[0] - before[0],
                            after[1] - before[1],
                            name,
                            frame.f_code.co_name,
                        )
                    )

        sys.setprofile(profile)
        original(self)

    writer_module.Writer._run = run  # type: ignore[method-assign]


def hook_gc() -> None:
    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            gc_pauses.append((time.perf_counter() - started[0], info["generation"]))

    gc.callbacks.append(callback)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("calls", type=int, nargs="?", default=100)
    parser.add_argument("turns", type=int, nargs="?", default=4)
    parser.add_argument("--dir", default=None, help="where the data directory goes")
    args = parser.parse_args()
    logger.remove()
    hook_writer_thread()
    hook_gc()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        latencies = asyncio.run(
            bench.durable_latency(Path(tmp) / "data", args.calls, args.turns, sample_every=50)
        )
        close_all_writers()
    latencies.sort()
    n = len(latencies)
    print(
        f"frame → its call's records committed, {args.calls} calls, {n} samples: "
        f"p50 {latencies[n // 2] * 1e3:.1f} ms, p99 {latencies[int(0.99 * n)] * 1e3:.1f} ms, "
        f"max {latencies[-1] * 1e3:.1f} ms"
    )
    wall = sum(c[0] for c in slow_calls)
    on_cpu = sum(c[1] for c in slow_calls)
    runnable = sum(c[2] for c in slow_calls)
    print(
        f"writer thread, SQLite calls and stats over 5 ms: {len(slow_calls)}, {wall:.2f} s = "
        f"{on_cpu:.2f} s on a CPU + {runnable:.2f} s runnable, waiting for a CPU + "
        f"{wall - on_cpu - runnable:.2f} s asleep (the GIL, or the disk)"
    )
    slowest = sorted(slow_calls, reverse=True)[:5]
    print(
        "  slowest (wall, on CPU, runnable ms; call; caller):",
        [
            (round(w * 1e3), round(c * 1e3, 1), round(r * 1e3, 1), n_, f)
            for w, c, r, n_, f in slowest
        ],
    )
    for generation in (0, 1, 2):
        pauses = [p for p, g in gc_pauses if g == generation]
        if pauses:
            print(
                f"gc generation {generation}: {len(pauses)} pauses, {sum(pauses):.2f} s, "
                f"longest {max(pauses) * 1e3:.1f} ms (every thread waits)"
            )


if __name__ == "__main__":
    main()
