"""Experiment (issue 12): where the writer and delivery children run, and the bot's lag.

Runs ``bench.lag_probe`` (N real-time calls in this process, a 10 ms sleep probe) in
turns, the order reversed every other round, for the recording no-op and for
``writer_process=True, delivery_process=True`` with the children placed three ways:

- ``children``: as shipped (the children run ``SCHED_BATCH``: ``scheduling``);
- ``children-other``: the children put back to the default policy (``SCHED_OTHER``), as
  before the fifth pass;
- ``children-pinned``: this process on CPU 0; the children and the dev server on CPU 1;
- ``children-serverbatch``: the children as shipped, the dev server (standing in for Roark,
  which runs on other machines) as batch work too, so its wake-ups never preempt the bot.

A watcher thread applies the placement to every child of this process (and to each of
its threads) as soon as it appears. Prints, per variant, the median bot CPU, the lag's
p99 over all rounds and its per-round median, and how many times the kernel preempted
this process (involuntary context switches, counted).

    uv run python scripts/exp_lag_placement.py noop,children,children-other,children-pinned 6
    uv run python scripts/exp_lag_placement.py noop,children,children-serverbatch 6

Not a benchmark: a profile of the scheduler's part in the lag rows of scripts/bench.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench
import exp_setup

from pipecat_roark.lifecycle import close_all_writers


def children_of(pid: int) -> set[int]:
    """Every direct child of ``pid`` (read from each of its threads' ``children``)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            continue
    return found


def place(pid: int, variant: str) -> None:
    """Apply ``variant`` to every thread of process ``pid`` (one of ours: same user)."""
    try:
        tids = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return
    for tid in tids:
        try:
            if variant == "children-other":
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
            elif variant == "children-pinned":
                os.sched_setaffinity(tid, {1})
        except OSError:
            continue


def server_policy(pid: int, batch: bool) -> None:
    """The dev server's threads as batch work, or back to the default policy."""
    policy = os.SCHED_BATCH if batch else os.SCHED_OTHER
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setscheduler(int(task.name), policy, os.sched_param(0))
        except OSError:
            continue


def watch(variant: list[str], server_pid: int, stop: threading.Event) -> None:
    """Every 20 ms: the current variant's placement for each child that is not the server."""
    while not stop.wait(0.02):
        for pid in children_of(os.getpid()) - {server_pid}:
            place(pid, variant[0])


def main() -> None:
    modes, rounds, calls, tmp, server, base_url = exp_setup.start("exp-lag-placement-")
    variant = [""]
    stop = threading.Event()
    threading.Thread(target=watch, args=(variant, server.pid, stop), daemon=True).start()
    results: dict[str, list[tuple[list[float], float, int]]] = {m: [] for m in modes}
    everywhere = os.sched_getaffinity(0)
    try:
        asyncio.run(bench.lag_probe("noop", base_url, tmp / "warm", 5, 1))
        for n in range(rounds):
            for mode in modes if n % 2 == 0 else modes[::-1]:
                variant[0] = mode
                pinned = mode == "children-pinned"
                os.sched_setaffinity(0, {0} if pinned else everywhere)
                os.sched_setaffinity(server.pid, {1} if pinned else everywhere)
                server_policy(server.pid, mode == "children-serverbatch")
                lags, cpu, _, _, preempted = asyncio.run(
                    bench.lag_probe(
                        "children" if mode.startswith("children") else mode,
                        base_url,
                        tmp / f"{mode}-{n}",
                        calls,
                        2,
                    )
                )
                close_all_writers()
                bench.close_delivery_children()
                results[mode].append((lags, cpu, preempted))
                print(
                    f"{mode} round {n}: CPU {cpu:.2f} s, lag p99 {bench.p(lags, 0.99) * 1000:.2f}"
                    f" ms, preempted {preempted}",
                    flush=True,
                )
    finally:
        stop.set()
        os.sched_setaffinity(0, everywhere)
        server.terminate()
    print(f"\n{calls} real-time calls, {rounds} rounds; medians over rounds")
    for mode in modes:
        runs = results[mode]
        pooled = [lag for lags, _, _ in runs for lag in lags]
        print(
            f"{mode:16s} CPU {statistics.median(r[1] for r in runs):.2f} s"
            f"  lag p99 {bench.p(pooled, 0.99) * 1000:.2f} ms (per round, median"
            f" {statistics.median(bench.p(r[0], 0.99) for r in runs) * 1000:.2f})"
            f"  preempted {statistics.median(r[2] for r in runs):.0f}"
        )


if __name__ == "__main__":
    main()
