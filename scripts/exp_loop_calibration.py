"""Experiment (issue 12): does the bot's own work run slower beside our children?

Runs ``bench.lag_probe`` (N real-time calls in this process, the dev server as idle work
as in the bench's lag rows) mode by mode, round after round, the order reversed every
other round, with one more task in the bot's event loop: every 20 ms it runs the same
fixed piece of Python work and notes the CPU it took (``time.thread_time``). If the
children (or the dev server they deliver to) slowed the bot's own instructions, through
the caches they share or by running on the same core, that piece would cost more in
their mode than beside the recording no-op. It also shows how much the machine's own
speed moves from one round to the next.

    uv run python scripts/exp_loop_calibration.py noop,children 3

Not a benchmark: a calibration of the bench's lag rows.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench
import exp_setup

from pipecat_roark.lifecycle import close_all_writers

_EVERY_S = 0.02
_WARM_UP = 50
"""Pieces left out at the start: the unmeasured first call, which starts the children."""


def fixed_work() -> dict[int, int]:
    """The same few thousand dict operations every time: the bot's kind of work."""
    table: dict[int, int] = {}
    for i in range(3000):
        table[i & 255] = table.get(i & 127, 0) + i
    return table


async def probed(mode: str, base_url: str, directory: Path, calls: int) -> tuple[float, list[int]]:
    """``bench.lag_probe`` with the fixed work beside it.

    Returns:
        The bot's CPU over the probe's window, and each piece's CPU in ns.
    """
    costs: list[int] = []
    done = asyncio.Event()

    async def calibrate() -> None:
        while not done.is_set():
            await asyncio.sleep(_EVERY_S)
            start = time.thread_time_ns()
            fixed_work()
            costs.append(time.thread_time_ns() - start)

    task = asyncio.create_task(calibrate())
    try:
        _, cpu, *_ = await bench.lag_probe(mode, base_url, directory, calls, 2)
    finally:
        done.set()
        await task
    return cpu, costs[_WARM_UP:]


def main() -> None:
    modes, rounds, calls, tmp, server, base_url = exp_setup.start("exp-loop-calibration-")
    bench.run_as(server.pid, idle=True)
    pieces: dict[str, list[int]] = {m: [] for m in modes}
    try:
        for n in range(rounds):
            for mode in modes if n % 2 == 0 else modes[::-1]:
                cpu, costs = asyncio.run(probed(mode, base_url, tmp / f"{mode}-{n}", calls))
                close_all_writers()
                bench.close_delivery_children()
                pieces[mode] += costs
                print(
                    f"{mode} round {n}: bot CPU {cpu:.2f} s, the fixed piece "
                    f"{statistics.median(costs) / 1000:.1f} µs (median of {len(costs)})",
                    flush=True,
                )
    finally:
        server.terminate()
    for mode, costs in pieces.items():
        print(f"{mode}: the fixed piece {statistics.median(costs) / 1000:.1f} µs, all rounds")


if __name__ == "__main__":
    main()
