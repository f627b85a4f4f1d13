"""Experiment (issue 12): what kept the bot's event loop off its CPU in the lag rows.

Runs ``bench.lag_probe`` (N real-time calls in this process, a 10 ms sleep probe) in
turns, the order reversed every other round, with the kernel's scheduler events recorded
system-wide around each probe (``perf sched record -a``; root, Linux). It then follows
this process's main thread (the event loop) through the recording: every time it was
ready to run but waited, from being woken or preempted until it ran again. Each wait is
put down to what held the CPU it waited for:

- ``children``: the writer or delivery child (processes this one started);
- ``bot threads``: another thread of this process (a GIL hand-off is not a wait here: a
  thread blocked on the GIL sleeps);
- ``dev server``: the stand-in for Roark (batch work, as in ``scripts/bench``);
- ``other (name)``: anything else on the machine (kernel threads, the sandbox's own
  agents), by its command name;
- ``idle``: nothing ran there, yet the loop waited (the kernel's wake-up itself).

A mode is one of ``bench.lag_probe``'s (``noop``, ``children``, ...), optionally with
``+childidle`` (this process's children made ``SCHED_IDLE``, from outside, as soon as
they are seen, instead of the ``SCHED_BATCH`` they choose), ``+childniceN`` (the
children's threads given nice ``N``, kept batch work), ``+childsliceN`` (the children's
threads ask for a time slice of ``N`` ms, kept batch work: Linux 6.12+ lets a waking task
whose slice is shorter than the running one's preempt it) and ``+serveridle`` (the dev
server ``SCHED_IDLE`` rather than batch work).

Prints, per mode: the probe's lag p99, the loop's CPU time, and its waits longer than
1 ms by holder (count, and their sum). A p99 of about 800 samples per probe is its
eighth-worst: a handful of such waits set it.

    uv run python scripts/exp_lag_sched.py noop,children 4
    uv run python scripts/exp_lag_sched.py noop,children,children+childidle,children+serveridle 4
    uv run python scripts/exp_lag_sched.py noop+serveridle,children+serveridle,children+serveridle+childnice19 4
    uv run python scripts/exp_lag_sched.py noop+serveridle,children+serveridle,children+serveridle+childslice20 4

Not a benchmark: a profile of the scheduler's part in the lag rows of ``scripts/bench``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench
import exp_setup

from pipecat_roark.lifecycle import close_all_writers

_LINE = re.compile(r"^\s*(.*?)\s+(\d+)/(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+sched:(\w+):\s+(.*)$")
_SWITCH = re.compile(r"prev_pid=(\d+) .*?prev_state=(\S+) ==> next_comm=.*? next_pid=(\d+)")
_WAKING = re.compile(r" pid=(\d+) .*?target_cpu=(\d+)")
LONG_S = 0.001
"""A wait counted as long: a tenth of the probe's sleep."""


def waits(data: Path, bot: int, children: set[int], server: int) -> list[tuple[float, str]]:
    """Every wait of thread ``bot`` in ``data``, with what held the CPU it waited for.

    Returns:
        ``(seconds, holder)`` per wait, holder as in the module's docstring.
    """
    text = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "comm,pid,tid,cpu,time,event,trace"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    process: dict[int, int] = {}
    name: dict[int, str] = {}
    events = []
    for line in text.splitlines():
        found = _LINE.match(line)
        if found:
            comm, pid, tid, cpu, at, kind, rest = found.groups()
            process[int(tid)] = int(pid)
            name[int(tid)] = comm
            events.append((kind, int(cpu), float(at), rest))

    def holder(tid: int) -> str:
        owner = process.get(tid)
        if tid == 0:
            return "idle"
        if owner == bot:
            return "bot threads"
        if owner in children:
            return "children"
        if owner == server:
            return "dev server"
        return f"other ({name.get(tid, '?').split('/')[0]})"

    running: dict[int, int] = {}
    found_waits: list[tuple[float, str]] = []
    ready: tuple[float, str] | None = None
    for kind, cpu, at, rest in events:
        if kind == "sched_switch":
            switch = _SWITCH.search(rest)
            if switch is None:
                continue
            prev, state, nxt = int(switch[1]), switch[2], int(switch[3])
            running[cpu] = nxt
            if prev == bot:  # preempted, it waits for its CPU back; else it sleeps
                ready = (at, holder(nxt)) if state.startswith("R") else None
            elif nxt == bot and ready is not None:
                found_waits.append((at - ready[0], ready[1]))
                ready = None
        elif kind == "sched_waking":
            waking = _WAKING.search(rest)
            if waking is not None and int(waking[1]) == bot and bot not in running.values():
                ready = (at, holder(running.get(int(waking[2]), 0)))
    return found_waits


def descendants(pid: int) -> set[int]:
    """Every live process started by ``pid`` or by one of its descendants."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                kids = {int(c) for c in (task / "children").read_text().split()}
            except OSError:
                continue
            todo += kids - found
            found |= kids
    return found


async def probed(
    mode: str, base_url: str, directory: Path, calls: int, seen: set[int], server: int, perf: int
) -> tuple:
    """``bench.lag_probe``, noting the bot's children while it runs (they exit after).

    The dev server and ``perf`` are this process's children too, not the bot's. With
    ``+childidle``, each child seen is made ``SCHED_IDLE`` (its first call, which
    ``lag_probe`` runs unmeasured, starts it).
    """
    base, *options = mode.split("+")
    others = {server, perf}
    bench.run_as(server, idle="serveridle" in options)
    task = asyncio.create_task(bench.lag_probe(base, base_url, directory, calls, 2))
    while not task.done():
        seen |= descendants(os.getpid()) - others
        if "childidle" in options:
            for pid in seen:
                bench.run_as(pid, idle=True)
        for option in options:
            if option.startswith("childnice"):
                for pid in seen:
                    renice(pid, int(option.removeprefix("childnice")))
            if option.startswith("childslice"):
                for pid in seen:
                    reslice(pid, int(option.removeprefix("childslice")))
        await asyncio.sleep(0.2)
    return await task


def renice(pid: int, niceness: int) -> None:
    """Give every thread of ``pid`` the nice value ``niceness`` (Linux: per thread)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.setpriority(os.PRIO_PROCESS, int(task.name), niceness)
        except (OSError, ValueError):  # gone meanwhile
            continue


_SCHED_SETATTR = 314
"""``sched_setattr``'s number on x86_64."""


def reslice(pid: int, ms: int) -> None:
    """Ask a time slice of ``ms`` for every thread of ``pid``, as batch work at nice 0.

    ``sched_setattr`` with ``sched_runtime`` (Linux 6.12+; x86_64 here); Python has no call
    for it. ``0`` gives the kernel's default back.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    attr = struct.pack("IIQiIQQQII", 56, os.SCHED_BATCH, 0, 0, 0, ms * 1_000_000, 0, 0, 0, 0)
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ValueError):  # a thread gone meanwhile fails quietly
            libc.syscall(_SCHED_SETATTR, int(task.name), ctypes.create_string_buffer(attr), 0)


def main() -> None:
    if shutil.which("perf") is None:
        raise SystemExit("this experiment needs perf (linux-perf) and root")
    modes, rounds, calls, tmp, server, base_url = exp_setup.start("exp-lag-sched-")
    lags: dict[str, list[float]] = {m: [] for m in modes}
    cpus: dict[str, list[float]] = {m: [] for m in modes}
    held: dict[str, list[tuple[float, str]]] = {m: [] for m in modes}
    try:
        asyncio.run(bench.lag_probe("noop", base_url, tmp / "warm", 5, 1))
        for n in range(rounds):
            for mode in modes if n % 2 == 0 else modes[::-1]:
                data = tmp / f"{mode}-{n}.perf"
                perf = subprocess.Popen(
                    ["perf", "sched", "record", "-a", "-o", str(data)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                seen: set[int] = set()
                try:
                    got, cpu, *_ = asyncio.run(
                        probed(
                            mode,
                            base_url,
                            tmp / f"{mode.replace('+', '-')}-{n}",
                            calls,
                            seen,
                            server.pid,
                            perf.pid,
                        )
                    )
                finally:
                    perf.send_signal(signal.SIGINT)
                    perf.wait(60)
                close_all_writers()
                bench.close_delivery_children()
                lags[mode] += got
                cpus[mode].append(cpu)
                these = waits(data, os.getpid(), seen, server.pid)
                held[mode] += these
                long = [w for w in these if w[0] > LONG_S]
                print(
                    f"{mode} round {n}: lag p99 {bench.p(got, 0.99) * 1000:.2f} ms, "
                    f"{len(long)} waits > 1 ms ({sum(w for w, _ in long) * 1000:.1f} ms)",
                    flush=True,
                )
    finally:
        server.terminate()
    print(f"\n{calls} real-time calls, {rounds} rounds; the event loop's waits for its CPU")
    for mode in modes:
        long = [w for w in held[mode] if w[0] > LONG_S]
        by = collections.defaultdict(list)
        for seconds, who in long:
            by[who].append(seconds)
        parts = ", ".join(
            f"{who} {len(s)} ({sum(s) * 1000:.0f} ms)"
            for who, s in sorted(by.items(), key=lambda kv: -sum(kv[1]))
        )
        print(
            f"{mode:10s} lag p99 {bench.p(lags[mode], 0.99) * 1000:.2f} ms, CPU "
            f"{statistics.median(cpus[mode]):.2f} s, {len(held[mode])} waits, "
            f"{len(long)} > 1 ms: {parts or 'none'}"
        )


if __name__ == "__main__":
    main()
