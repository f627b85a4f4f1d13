"""Experiment (issue 12): how often each thread of the bot and its children woke, and its CPU.

Runs ``bench.lag_probe`` (N real-time calls in this process, the dev server as idle work
as in the bench's lag rows) once per mode, and reads every thread of this process's
children from ``/proc`` at the start and the end of the probe's measured window (the two
times ``lag_probe`` reads its own CPU), and the bot's own threads the same way. Per
thread it prints the wake-ups (voluntary context switches: it slept, and was woken), the
times the kernel preempted it, and its CPU. Every wake-up of a child is a scheduling
event on the two CPUs the bot shares with it.

    uv run python scripts/exp_child_wakes.py children,children 1

Not a benchmark: a count of the children's wake-ups (Linux).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench
import exp_setup
from bench_worker import stat_cpu_s
from exp_lag_sched import descendants

from pipecat_roark.lifecycle import close_all_writers

Threads = dict[tuple[int, int], tuple[str, int, int, float]]
"""(pid, tid) → (which child, wake-ups, preemptions, CPU s)."""


def threads_of(pids: set[int]) -> Threads:
    """Every thread of ``pids``, read from ``/proc`` (a thread gone meanwhile is left out)."""
    found: Threads = {}
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_text()
        except OSError:
            continue
        if pid == os.getpid():
            child = "bot"
        else:
            child = "writer child" if "writer_child" in command else "delivery child"
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                status = (task / "status").read_text()
                stat = (task / "stat").read_text()
            except OSError:
                continue
            found[(pid, int(task.name))] = (
                f"{child} {pid}",
                int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0]),
                int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0]),
                stat_cpu_s(stat),
            )
    return found


def main() -> None:
    modes, _, calls, tmp, server, base_url = exp_setup.start("exp-child-wakes-")
    marks: list[Threads] = []
    process_time = time.process_time

    def marked() -> float:  # lag_probe reads its CPU at the window's start and end
        marks.append(threads_of(descendants(os.getpid()) - {server.pid} | {os.getpid()}))
        return process_time()

    bench.time.process_time = marked
    bench.run_as(server.pid, idle=True)
    try:
        for n, mode in enumerate(modes):
            marks.clear()
            lags, cpu, _, child_cpu, preempted = asyncio.run(
                bench.lag_probe(mode, base_url, tmp / f"{mode}-{n}", calls, 2)
            )
            close_all_writers()
            bench.close_delivery_children()
            print(
                f"{mode}: lag p99 {bench.p(lags, 0.99) * 1000:.2f} ms, bot CPU {cpu:.2f} s, "
                f"children's CPU {child_cpu:.2f} s, the bot preempted {preempted} times"
            )
            start, end = marks[0], marks[-1]
            woke = 0
            for key, (child, wakes, preempts, cpu_s) in sorted(end.items()):
                _, wakes0, preempts0, cpu0 = start.get(key, ("", 0, 0, 0.0))
                if not child.startswith("bot"):
                    woke += wakes - wakes0
                elif wakes == wakes0 and cpu_s == cpu0:
                    continue  # a thread of the bot that did nothing meanwhile
                print(
                    f"  {child:22s} thread {key[1]:7d}: woke {wakes - wakes0:5d}, "
                    f"preempted {preempts - preempts0:4d}, CPU {cpu_s - cpu0:.2f} s"
                )
            print(f"  the children woke {woke} times in all")
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
