"""Side-by-side benchmarks: every row is a ratio of two things measured in this one run.

    scripts/bench                 # the full table, written to BENCHMARKS.md
    scripts/bench --quick         # small sizes, a smoke run (tests use it); BENCHMARKS.md untouched
    scripts/bench --no-reference  # skip Roark's reference observer (no scratch venv)

"Ours" is RoarkObserver recording, durable and delivering; a "recording no-op" is a no-op
observer beside the same armed AudioBufferProcessor (what a bot that records pays anyway).
Ours also runs with the writer in a child process: with a delivery child too
(``writer_process=True, delivery_process=True``: the bot neither writes nor delivers) and
with the loop delivering (``writer_process=True``); the children's CPU is read from
/proc/<pid>/stat over the same window as the bot's and shown beside it, never hidden.
Everything talks to the Roark-compatible dev server on 127.0.0.1, in its own process.
Roark's reference observer (`pipecat-roark==0.2.5`) runs from a scratch venv in .bench/,
created with uv on first use, its endpoint constants pointed at the dev server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import yarl
from loguru import logger

from pipecat_roark.devserver import spawn

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "scripts" / "bench_worker.py"
SCRATCH = ROOT / ".bench"
REFERENCE = "pipecat-roark==0.2.5"
KEY = "bench-key-not-secret"
sys.path.insert(0, str(ROOT / "scripts"))


@dataclass
class Row:
    what: str
    ours: str
    other: str
    ratio: float | None
    target: str
    command: str

    def cells(self) -> list[str]:
        ratio = "n/a" if self.ratio is None else f"{self.ratio:.2f}×"
        return [self.what, self.ours, self.other, ratio, self.target]


def median(values: list[float]) -> float:
    return statistics.median(values)


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---- the reference venv ----


def reference_python() -> str | None:
    python = SCRATCH / "reference-venv" / "bin" / "python"
    if python.exists():
        return str(python)
    uv = [sys.executable, "-m", "uv"] if _has_uv_module() else ["uv"]
    print(f"creating a scratch venv with {REFERENCE} in {python.parent.parent} ...", flush=True)
    try:
        subprocess.run([*uv, "venv", "-q", str(python.parent.parent)], check=True, timeout=300)
        subprocess.run(
            [*uv, "pip", "install", "-q", "--python", str(python), REFERENCE],
            check=True,
            timeout=900,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"could not install {REFERENCE} ({exc}): reference rows skipped", flush=True)
        return None
    return str(python)


def _has_uv_module() -> bool:
    return (
        subprocess.run(
            [sys.executable, "-m", "uv", "--version"], capture_output=True, check=False
        ).returncode
        == 0
    )


def worker(
    python: str, what: str, mode: str, rounds: int, base_url: str, tmp: Path, *extra: int
) -> Any:
    done = subprocess.run(
        [
            python,
            str(WORKER),
            what,
            mode,
            str(rounds),
            base_url,
            str(tmp / f"{what}-{mode}"),
            *map(str, extra),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise SystemExit(f"bench worker {what} {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- 1. pipeline overhead, 2. arrival at the server ----


CHILDREN = "ours with writer_process=True and delivery_process=True"
"""What the "children" mode is: a writer child records and a delivery child delivers."""
WPROC = "ours with writer_process=True (delivering in the loop)"
"""What the "wproc" mode is: a writer child records, the bot's loop delivers."""


@dataclass
class AudioCosts:
    """Per mode, medians over every worker's counted plays of the audio-only call."""

    times: dict[str, float]
    """Pipeline wall time per play."""
    cpu: dict[str, float]
    """The worker process's CPU per play."""
    total_cpu: dict[str, float]
    """The worker's CPU plus its children's (writer, delivery) per play."""


def audio_costs(
    base_url: str, tmp: Path, ref: str | None, rounds: int, repeats: int, frames: int
) -> AudioCosts:
    """The audio-only call per mode; modes interleaved, so drift hits every mode alike."""
    modes = ["none", "noop", "capture", "ours", "children", "wproc"]
    modes += ["reference"] if ref else []
    times: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    total: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(repeats):
        for mode in modes:
            python = ref if mode == "reference" and ref else sys.executable
            run = worker(python, "audio", mode, rounds, base_url, tmp, frames)
            times[mode] += run["times"]
            cpu[mode].append(run["cpu"])
            total[mode].append(run["cpu"] + run["child_cpu"])
    return AudioCosts(
        {m: median(v) for m, v in times.items()},
        {m: median(v) for m, v in cpu.items()},
        {m: median(v) for m, v in total.items()},
    )


def per_frame_rows(
    over: dict[str, float],
    frames: int,
    workload: str,
    cmd: str,
    mode: str = "ours",
    label: str = "ours",
    *,
    reference: bool = True,
    targets: bool = True,
) -> list[Row]:
    """Issue 12's ratios: what ``mode`` adds over no observer (``over``: per mode), against
    what the recording no-op adds and (``reference``, if measured) Roark's 0.2.5; with
    ``targets``, the issue's targets beside them."""

    def shown(m: str) -> str:
        return f"{over[m] / frames * 1e6:.1f} µs/frame"

    def ratio(a: str, b: str) -> float | None:
        return over[a] / over[b] if over[b] > 0 else None

    rows = [
        Row(
            f"{workload}: overhead over no observer, {label} vs a recording no-op",
            shown(mode),
            shown("noop"),
            ratio(mode, "noop"),
            "≤ 1.25×" if targets else "",
            cmd,
        )
    ]
    if reference and "reference" in over:
        rows.append(
            Row(
                f"{workload}: overhead over no observer, {label} vs Roark's reference 0.2.5",
                shown(mode),
                shown("reference"),
                ratio(mode, "reference"),
                "≤ 0.8×" if targets else "",
                cmd,
            )
        )
    return rows


def mixed_call_costs(
    base_url: str, tmp: Path, ref: str | None, processes: int, rounds: int, calls: int
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Per mode, the mixed call's CPU over no observer and its wall time per call (medians).

    Each worker process plays every mode in turn, round after round (``bench_worker
    mixed``); a mode's CPU over no observer is taken within its round, against that
    round's "none", so the neighbours' load on this shared machine falls on both alike.
    Roark's reference runs in its own venv, beside a "none" of its own, in processes
    alternating with ours. The modes with children ("children", "wproc") start them in
    their first (uncounted) call; the children live through the worker's rounds and their
    CPU per round is the difference of two /proc reads around the mode's block.

    Returns:
        (the bot's CPU seconds over no observer, pipeline wall seconds, the bot's and its
        children's CPU seconds over no observer), per call, by mode.
    """
    groups = [(sys.executable, ["none", "noop", "capture", "ours", "children", "wproc"])]
    if ref:
        groups.append((ref, ["none", "reference"]))  # its "none" pairs with it, no more
    over: dict[str, list[float]] = {}
    wall: dict[str, list[float]] = {}
    total: dict[str, list[float]] = {}
    for _ in range(processes):
        for python, modes in groups:
            run = worker(python, "mixed", ",".join(modes), rounds, base_url, tmp, calls)
            for mode in modes if python == sys.executable else modes[1:]:
                paired = zip(run["cpu"][mode], run["cpu"]["none"], strict=True)
                mine = [cpu - none for cpu, none in paired]
                over.setdefault(mode, []).extend(mine)
                wall.setdefault(mode, []).extend(run["times"][mode])
                children = zip(mine, run["child_cpu"][mode], strict=True)
                total.setdefault(mode, []).extend(bot + child for bot, child in children)
    return (
        {mode: median(values) for mode, values in over.items()},
        {mode: median(values) for mode, values in wall.items()},
        {mode: median(values) for mode, values in total.items()},
    )


def overhead_rows(
    base_url: str, tmp: Path, ref: str | None, processes: int, rounds: int, calls: int
) -> list[Row]:
    """The mixed call's rows: what each observer adds over none, in process CPU per call."""
    from bench_worker import HOPS

    over, t, total = mixed_call_costs(base_url, tmp, ref, processes, rounds, calls)
    workload = (
        "mixed call: a 54 s scripted call (3,013 frames: audio, speaking edges, transcripts,"
        f" TTS words, tool calls), {HOPS} observed hops, pace 0; every mode in turn in one"
        " process (none, a recording no-op, recording only, ours, ours with a writer and a"
        " delivery child, ours with a writer child),"
        f" {rounds} rounds × {calls} calls, order reversed every other round,"
        f" {processes} processes"
    )
    cmd = (
        f"scripts/bench ({workload}; process CPU per call, all threads, until delivered,"
        f" over the same round's no observer; median of {processes * rounds} rounds)"
    )
    wall_cmd = f"scripts/bench ({workload}; pipeline wall time per call, median)"
    total_cmd = (
        f"scripts/bench ({workload}; process CPU per call, all threads, until delivered, plus"
        " the children's CPU over the same window from /proc/<pid>/stat (they live across"
        " the worker's calls: a delta per round), over the same round's no observer;"
        f" median of {processes * rounds} rounds)"
    )

    def shown(mode: str) -> str:
        return f"{over[mode] * 1000:.0f} ms CPU"

    def ratio(a: str, b: str) -> float | None:
        return over[a] / over[b] if over[b] > 0 else None

    rows = [
        Row(
            "mixed call: overhead over no observer, ours vs a recording no-op",
            shown("ours"),
            shown("noop"),
            ratio("ours", "noop"),
            "≤ 1.25×",
            cmd,
        )
    ]
    if "reference" in over:
        rows.append(
            Row(
                "mixed call: overhead over no observer, ours vs Roark's reference 0.2.5",
                shown("ours"),
                shown("reference"),
                ratio("ours", "reference"),
                "≤ 0.8×",
                cmd,
            )
        )
    rows += [
        Row(
            "pipeline time, RoarkObserver recording vs no observer",
            f"{t['capture']:.3f} s",
            f"{t['none']:.3f} s",
            t["capture"] / t["none"],
            "",
            wall_cmd,
        ),
        Row(
            "mixed call: overhead over no observer, recording only vs a recording no-op",
            shown("capture"),
            shown("noop"),
            ratio("capture", "noop"),
            "",
            cmd,
        ),
        Row(
            "pipeline time, RoarkObserver recording + delivering during the call vs recording only",
            f"{t['ours']:.3f} s",
            f"{t['capture']:.3f} s",
            t["ours"] / t["capture"],
            "",
            wall_cmd,
        ),
    ]
    for mode, label in (("children", CHILDREN), ("wproc", WPROC)):
        rows.append(
            Row(
                f"mixed call: overhead over no observer, {label}, the bot's CPU alone vs a"
                " recording no-op",
                shown(mode),
                shown("noop"),
                ratio(mode, "noop"),
                "≤ 1.25×" if mode == "children" else "",
                cmd,
            )
        )
        if mode == "children" and "reference" in over:
            rows.append(
                Row(
                    f"mixed call: overhead over no observer, {label}, the bot's CPU alone vs"
                    " Roark's reference 0.2.5",
                    shown(mode),
                    shown("reference"),
                    ratio(mode, "reference"),
                    "≤ 0.8×",
                    cmd,
                )
            )
        rows.append(
            Row(
                f"mixed call: overhead over no observer, {label}, the bot + its children's CPU"
                " vs a recording no-op",
                f"{total[mode] * 1000:.0f} ms CPU",
                shown("noop"),
                total[mode] / over["noop"] if over["noop"] > 0 else None,
                "",
                total_cmd,
            )
        )
        if mode == "children" and "reference" in over:
            rows.append(
                Row(
                    f"mixed call: overhead over no observer, {label}, the bot + its children's"
                    " CPU vs Roark's reference 0.2.5 (in-process: all of its CPU is the bot's)",
                    f"{total[mode] * 1000:.0f} ms CPU",
                    shown("reference"),
                    total[mode] / over["reference"] if over["reference"] > 0 else None,
                    "",
                    total_cmd,
                )
            )
    if "reference" in t:
        rows.append(
            Row(
                "pipeline time, RoarkObserver (recording + delivering) vs Roark's reference observer",
                f"{t['ours']:.3f} s",
                f"{t['reference']:.3f} s",
                t["ours"] / t["reference"],
                "≤ 1×",
                wall_cmd,
            )
        )
    return rows


def audio_only_rows(
    base_url: str, tmp: Path, ref: str | None, rounds: int, repeats: int, frames: int
) -> list[Row]:
    from bench_worker import AUDIO_HOPS

    costs = audio_costs(base_url, tmp, ref, rounds, repeats, frames)
    workload = f"audio-only: {frames:,} audio frames, {AUDIO_HOPS} pass-through hops, pace 0"
    cmd = f"scripts/bench ({workload}, median of {rounds * repeats} rounds)"
    workload += f"; a process per mode and repeat, modes in turn, {repeats} repeats"
    wall_over = {m: t - costs.times["none"] for m, t in costs.times.items()}
    rows = per_frame_rows(wall_over, frames, "audio-only call", cmd)
    children_cmd = (
        f"scripts/bench ({workload}; pipeline wall time, median of {rounds * repeats} rounds:"
        " the bot's, the children commit and deliver on the other core, their CPU is in the"
        " CPU rows)"
    )
    rows += per_frame_rows(wall_over, frames, "audio-only call", children_cmd, "children", CHILDREN)
    rows += per_frame_rows(
        wall_over, frames, "audio-only call", children_cmd, "wproc", WPROC, reference=False
    )
    cpu_cmd = (
        f"scripts/bench ({workload}; process CPU per play, every thread, from the first"
        f" counted play to 0.25 s after the last, over no observer's; the children's from"
        f" /proc/<pid>/stat over the same window; median of {repeats} processes)"
    )
    cpu_over = {m: c - costs.cpu["none"] for m, c in costs.cpu.items()}
    rows += per_frame_rows(
        cpu_over,
        frames,
        "audio-only call, CPU",
        cpu_cmd,
        "children",
        f"{CHILDREN}, the bot",
        targets=False,
    )
    total_over = {m: c - costs.cpu["none"] for m, c in costs.total_cpu.items()}
    rows += per_frame_rows(
        total_over,
        frames,
        "audio-only call, CPU",
        cpu_cmd,
        "children",
        f"{CHILDREN}, the bot + its writer and delivery children",
        targets=False,
    )
    return rows


def arrival_rows(base_url: str, tmp: Path, ref: str | None, rounds: int) -> list[Row]:
    if ref is None:
        return []
    ours = worker(sys.executable, "arrival", "ours", rounds, base_url, tmp)["latencies"]
    theirs = worker(ref, "arrival", "reference", rounds, base_url, tmp)["latencies"]
    child = worker(sys.executable, "arrival", "process", rounds, base_url, tmp)["latencies"]
    return [
        Row(
            "end of a real-time call → call-ended stored at the server (median)",
            f"{median(ours) * 1000:.0f} ms",
            f"{median(theirs) * 1000:.0f} ms (reference)",
            median(ours) / median(theirs),
            "≤ 1×",
            "scripts/bench (arrival: a 3 s call at real-time pace, per round)",
        ),
        Row(
            "end of a real-time call → call-ended stored at the server (median): ours with"
            " delivery_process=True",
            f"{median(child) * 1000:.0f} ms",
            f"{median(theirs) * 1000:.0f} ms (reference)",
            median(child) / median(theirs),
            "≤ 1×",
            "scripts/bench (arrival: a 3 s call at real-time pace, per round; the child"
            " starts during the first round's call)",
        ),
    ]


# ---- 3. frame to durable with 50 concurrent calls ----


async def durable_latency(
    directory: Path,
    calls: int,
    turns: int,
    key: str | None = None,
    sample_every: int = 10,
    flushes: list[float] | None = None,
    writer_process: bool = False,
    started_s: list[float] | None = None,
) -> list[float]:
    """Per-frame time until its call's records are committed, sampled every ``sample_every``
    frames (0: a plain RoarkObserver, nothing sampled: for CPU measurements the probes do
    not disturb). ``flushes``, if given, also gets the time until everything any call
    queued before the frame is committed (a flush). With ``writer_process`` the records
    are committed by a writer child, started (and a first flush answered) before the
    calls, the time that took put in ``started_s`` if given: a sample is released when the
    bot's event loop reads the child's answer."""
    from bench_worker import Hop, long_call, scripted

    from pipecat_roark import RoarkObserver, lifecycle
    from pipecat_roark.config import DEFAULT_MIN_FREE_BYTES
    from pipecat_roark.ops import BarrierOp
    from pipecat_roark.writer import DEFAULT_MAX_SPOOL_BYTES
    from pipecat_roark.writer_process import ProcessWriter

    if writer_process:  # a bot that has been up for a while: its writer child is running
        start = time.perf_counter()
        child = lifecycle.writer_for(
            directory,
            process=True,
            max_spool_bytes=DEFAULT_MAX_SPOOL_BYTES,
            min_free_bytes=DEFAULT_MIN_FREE_BYTES,
        )
        if not isinstance(child, ProcessWriter) or not await child.flush(60) or child.fell_back:
            raise SystemExit(f"the writer child for {directory} did not start")
        if started_s is not None:
            started_s.append(time.perf_counter() - start)

    latencies: list[float] = []

    class Timed(RoarkObserver):
        """Every n-th frame: barriers behind it in the writer queue say when it is durable."""

        seen = 0

        async def on_push_frame(self, data: Any) -> None:
            start = time.perf_counter()
            await super().on_push_frame(data)
            Timed.seen += 1
            writer = self._recorder.writer
            if Timed.seen % sample_every == 0 and writer is not None:
                mine = BarrierOp(
                    lambda: latencies.append(time.perf_counter() - start), self.pipecat_call_id
                )
                writer.submit(mine)
                if flushes is not None:
                    writer.submit(BarrierOp(lambda: flushes.append(time.perf_counter() - start)))

    async def one(n: int) -> None:
        observer_class = Timed if sample_every else RoarkObserver
        roark = observer_class(
            agent_id="bench",
            pipecat_call_id=f"c{n}",
            data_dir=directory,
            deliver=False,
            api_key=key,
            writer_process=writer_process,
        )
        await asyncio.sleep(n * 0.01)  # calls start staggered, as real ones do
        await scripted.run_pipeline(
            [
                scripted.ScriptedCall(long_call(turns), pace=1.0),
                Hop(),
                Hop(),
                roark.audio_processor,
            ],
            observers=[roark],
        )

    await asyncio.gather(*(one(n) for n in range(calls)))
    return latencies


async def lag_probe(
    mode: str, base_url: str, directory: Path, calls: int, turns: int
) -> tuple[list[float], float, float, float, int]:
    """N real-time calls in this loop with a probe that sleeps 10 ms and notes the oversleep.

    Returns (oversleeps in s, process CPU s, wall s, children's CPU s, how many times the
    kernel preempted this process's threads: involuntary context switches, counted). ``mode`` is
    "noop" (a no-op observer, the same armed AudioBufferProcessor), "ours" (recording,
    durable, delivering), "capture" (recording and durable; a sidecar would deliver),
    "process" (ours with ``delivery_process=True``: a child delivers), "children" (ours
    with ``writer_process=True, delivery_process=True``: a writer child records, a
    delivery child delivers) or "wproc" (ours with ``writer_process=True``: a writer child
    records, the loop delivers). The children's CPU is read from /proc over the same
    window (0 in the modes without). One call runs first, unmeasured, in every mode (it
    starts the children).
    """
    from bench_worker import (
        DELIVERY_CHILD,
        IN_LOOP_DRAINER,
        OURS,
        WRITER_CHILD,
        ArmedRecorder,
        Hop,
        NoopObserver,
        children_cpu_s,
        children_pids,
        delivery_child,
        long_call,
        scripted,
    )

    from pipecat_roark import RoarkObserver

    lags: list[float] = []
    done = asyncio.Event()

    async def probe() -> None:
        while not done.is_set():
            start = time.perf_counter()
            await asyncio.sleep(0.010)
            lags.append(time.perf_counter() - start - 0.010)

    async def one(n: int) -> None:
        await asyncio.sleep(n * 0.01)  # calls start staggered, as real ones do
        observer: Any
        if mode in OURS:
            observer = RoarkObserver(
                api_key=KEY,
                agent_id="bench",
                pipecat_call_id=f"{directory.name}-{n}",  # every round its own calls
                data_dir=directory,
                base_url=base_url,
                deliver=mode != "capture",
                delivery_process=mode in DELIVERY_CHILD,
                writer_process=mode in WRITER_CHILD,
            )
            recorder = observer.audio_processor
        else:
            observer = NoopObserver()
            recorder = ArmedRecorder(num_channels=2, buffer_size=256 * 1024)
        await scripted.run_pipeline(
            [scripted.ScriptedCall(long_call(turns), pace=1.0), Hop(), Hop(), recorder],
            observers=[observer],
        )

    # A bot that has been up for a while: imports done, ours' drainer and its HTTP client
    # made (a one-off per process, tens of ms in the loop), or the delivery child started,
    # then the calls are measured.
    await one(calls)
    pids = children_pids(mode, directory)
    child = delivery_child(directory) if mode in DELIVERY_CHILD else None
    child_cpu = children_cpu_s(pids)
    prober = asyncio.create_task(probe())
    wall, cpu = time.perf_counter(), time.process_time()
    preempted = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
    await asyncio.gather(*(one(n) for n in range(calls)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    preempted = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - preempted
    child_cpu = children_cpu_s(pids) - child_cpu
    done.set()
    await prober
    if mode in IN_LOOP_DRAINER:
        from pipecat_roark.background_drainer import stop_background_drainers

        await stop_background_drainers(30)
    if child is not None:  # EOF: its last pass, then it exits (and this round is over)
        from pipecat_roark import lifecycle

        lifecycle.PROCESS.delivery_processes.clear()
        child.close()
        await asyncio.to_thread(child.exited.wait, 120)
    return lags, cpu, wall, child_cpu, preempted


def close_delivery_children() -> None:
    """Let this process's delivery children make their last pass and exit, as at shutdown.

    Each lag probe's bot is done when it returns; left running, its delivery child went
    on following its directory beside every later probe of the run (up to eight by the
    last round), one more process to wake on the bot's two CPUs.
    """
    from pipecat_roark import lifecycle

    with lifecycle.PROCESS.lock:
        children = list(lifecycle.PROCESS.delivery_processes.values())
        lifecycle.PROCESS.delivery_processes.clear()
    for child in children:
        child.close()


def lag_rows(base_url: str, tmp: Path, calls: int, turns: int, rounds: int) -> list[Row]:
    """Event-loop lag and bot CPU at the call count where the recording no-op uses ≤ ~70% of
    a core (starting from ``calls``): ours (delivering in the loop, or from a child
    process) vs the recording no-op, interleaved rounds."""
    from pipecat_roark.lifecycle import close_all_writers

    _, cpu, wall, _, _ = asyncio.run(lag_probe("noop", base_url, tmp / "lag-size", calls, turns))
    share = cpu / wall
    chosen = calls if share <= 0.7 else max(1, int(calls * 0.7 / share))
    print(
        f"  the recording no-op used {share:.0%} of a core at {calls} calls: "
        f"measuring at {chosen} calls",
        flush=True,
    )
    modes = ("noop", "ours", "capture", "process", "children", "wproc")
    lags: dict[str, list[float]] = {m: [] for m in modes}
    cpus: dict[str, list[float]] = {m: [] for m in modes}
    with_children: dict[str, list[float]] = {m: [] for m in modes}
    preemptions: dict[str, list[int]] = {m: [] for m in modes}
    for round_ in range(rounds):
        for mode in modes if round_ % 2 == 0 else modes[::-1]:
            got, cpu, _, child_cpu, preempted = asyncio.run(
                lag_probe(mode, base_url, tmp / f"lag-{mode}-{round_}", chosen, turns)
            )
            close_all_writers()
            close_delivery_children()
            lags[mode] += got
            cpus[mode].append(cpu)
            with_children[mode].append(cpu + child_cpu)
            preemptions[mode].append(preempted)
    child_cpus = with_children["process"]

    def paired(cpu: list[float]) -> float:
        """The median of each round's ratio to the same round's no-op: the machine's speed
        drifts between rounds (16% in issue 12's eighth pass) more than the gap measured."""
        return median([mine / theirs for mine, theirs in zip(cpu, cpus["noop"], strict=True)])

    for mode in ("ours", "process", "children"):
        each = ", ".join(
            f"{mine / theirs:.2f}" for mine, theirs in zip(cpus[mode], cpus["noop"], strict=True)
        )
        print(f"  bot CPU vs the no-op, round by round: {mode} {each}", flush=True)

    ours, noop = p(lags["ours"], 0.99), p(lags["noop"], 0.99)
    cmd = (
        f"scripts/bench (lag: {chosen} real-time calls in one process, {turns} turns each, a"
        f" 10 ms sleep probe; recording no-op at {share:.0%} of a core with {calls} calls;"
        f" {rounds} rounds, the modes in turn, their order reversed every other round; CPU:"
        " medians, the ratio the median of each round's ratio to that round's no-op)"
    )
    rows = [
        Row(
            f"event-loop lag p99 during {chosen} real-time calls: ours vs a recording no-op",
            f"{ours * 1000:.2f} ms (p50 {p(lags['ours'], 0.5) * 1000:.2f})",
            f"{noop * 1000:.2f} ms (p50 {p(lags['noop'], 0.5) * 1000:.2f})",
            ours / noop if noop > 0 else None,
            "≤ 1.1×",
            cmd,
        ),
        Row(
            f"bot process CPU for {chosen} real-time calls: ours vs a recording no-op",
            f"{median(cpus['ours']):.2f} s",
            f"{median(cpus['noop']):.2f} s",
            paired(cpus["ours"]),
            "≤ 1.05×",
            cmd,
        ),
        Row(
            f"event-loop lag p99 during {chosen} real-time calls: recording only (a drain"
            " --follow sidecar delivers) vs a recording no-op",
            f"{p(lags['capture'], 0.99) * 1000:.2f} ms",
            f"{noop * 1000:.2f} ms",
            p(lags["capture"], 0.99) / noop if noop > 0 else None,
            "",
            cmd,
        ),
        Row(
            f"bot process CPU for {chosen} real-time calls: recording only (a drain --follow"
            " sidecar delivers) vs a recording no-op",
            f"{median(cpus['capture']):.2f} s",
            f"{median(cpus['noop']):.2f} s",
            paired(cpus["capture"]),
            "",
            cmd,
        ),
        Row(
            f"event-loop lag p99 during {chosen} real-time calls: ours with"
            " delivery_process=True (a child delivers) vs a recording no-op",
            f"{p(lags['process'], 0.99) * 1000:.2f} ms",
            f"{noop * 1000:.2f} ms",
            p(lags["process"], 0.99) / noop if noop > 0 else None,
            "≤ 1.1×",
            cmd,
        ),
        Row(
            f"bot process CPU for {chosen} real-time calls: ours with delivery_process=True"
            " vs a recording no-op",
            f"{median(cpus['process']):.2f} s",
            f"{median(cpus['noop']):.2f} s",
            paired(cpus["process"]),
            "≤ 1.05×",
            cmd,
        ),
        Row(
            f"bot + delivery child CPU for {chosen} real-time calls: ours with"
            " delivery_process=True (the child's from /proc over the same window) vs a"
            " recording no-op",
            f"{median(child_cpus):.2f} s",
            f"{median(cpus['noop']):.2f} s",
            paired(child_cpus),
            "",
            cmd,
        ),
    ]
    for mode, label, children in (
        ("children", CHILDREN, "writer and delivery children"),
        ("wproc", WPROC, "writer child"),
    ):
        rows += [
            Row(
                f"event-loop lag p99 during {chosen} real-time calls: {label} vs a recording no-op",
                f"{p(lags[mode], 0.99) * 1000:.2f} ms (p50 {p(lags[mode], 0.5) * 1000:.2f})",
                f"{noop * 1000:.2f} ms",
                p(lags[mode], 0.99) / noop if noop > 0 else None,
                "≤ 1.1×" if mode == "children" else "",
                cmd,
            ),
            Row(
                f"bot process CPU for {chosen} real-time calls: {label} vs a recording no-op",
                f"{median(cpus[mode]):.2f} s",
                f"{median(cpus['noop']):.2f} s",
                paired(cpus[mode]),
                "≤ 1.05×" if mode == "children" else "",
                cmd,
            ),
            Row(
                f"bot + {children} CPU for {chosen} real-time calls: {label} (the children's"
                " from /proc over the same window) vs a recording no-op",
                f"{median(with_children[mode]):.2f} s",
                f"{median(cpus['noop']):.2f} s",
                paired(with_children[mode]),
                "",
                cmd,
            ),
        ]
    rows += [
        Row(
            f"times the kernel preempted the bot during {chosen} real-time calls (involuntary"
            f" context switches, median): {label} vs a recording no-op",
            f"{median(preemptions[mode]):.0f}",
            f"{median(preemptions['noop']):.0f}",
            median(preemptions[mode]) / max(1.0, median(preemptions["noop"])),
            "",
            cmd,
        )
        for mode, label in (("ours", "ours"), ("children", CHILDREN))
    ]
    return rows


def fsync_seconds(directory: Path, count: int) -> float:
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        start = time.perf_counter()
        for n in range(count):
            os.pwrite(fd, b"x" * 4096, (n % 16) * 4096)
            os.fsync(fd)
        return (time.perf_counter() - start) / count
    finally:
        os.close(fd)
        path.unlink()


def durable_rows(tmp: Path, calls: int, turns: int) -> list[Row]:
    from pipecat_roark.lifecycle import close_all_writers

    directory = tmp / "durable"
    flushes: list[float] = []
    latencies = asyncio.run(
        durable_latency(directory, calls, turns, sample_every=50, flushes=flushes)
    )
    close_all_writers()
    one_fsync = fsync_seconds(tmp, 200)
    cmd = f"scripts/bench (durable: {calls} real-time scripted calls in one process)"
    rows = [
        Row(
            f"frame → its call's records committed, p99 over {len(latencies)} samples, "
            f"{calls} concurrent calls",
            f"{p(latencies, 0.99) * 1000:.1f} ms (p50 {p(latencies, 0.5) * 1000:.1f})",
            f"{one_fsync * 1000:.2f} ms (one fsync of this disk)",
            p(latencies, 0.99) / one_fsync,
            "p99 ≤ 20 ms",
            cmd,
        ),
        Row(
            f"frame → everything any call queued before it committed (a flush), p99, "
            f"{calls} concurrent calls",
            f"{p(flushes, 0.99) * 1000:.1f} ms (p50 {p(flushes, 0.5) * 1000:.1f})",
            f"{p(latencies, 0.99) * 1000:.1f} ms (its call's records)",
            p(flushes, 0.99) / p(latencies, 0.99),
            "",
            cmd,
        ),
    ]
    # The same calls with the writer in a child process (its start-up before them).
    child_flushes: list[float] = []
    started: list[float] = []
    child = asyncio.run(
        durable_latency(
            tmp / "durable-child",
            calls,
            turns,
            sample_every=50,
            flushes=child_flushes,
            writer_process=True,
            started_s=started,
        )
    )
    close_all_writers()
    child_cmd = (
        f"scripts/bench (durable: {calls} real-time scripted calls in one process, after the"
        " same calls with the writer thread; the writer child started and answered a first"
        f" flush before the calls, in {started[0] * 1000:.0f} ms; a sample ends when the"
        " bot's event loop reads the child's answer)"
    )
    return [
        *rows,
        Row(
            f"frame → its call's records committed, p99 over {len(child)} samples, {calls}"
            " concurrent calls: ours with writer_process=True vs the writer thread",
            f"{p(child, 0.99) * 1000:.1f} ms (p50 {p(child, 0.5) * 1000:.1f})",
            f"{p(latencies, 0.99) * 1000:.1f} ms (p50 {p(latencies, 0.5) * 1000:.1f})",
            p(child, 0.99) / p(latencies, 0.99),
            "p99 ≤ 20 ms",
            child_cmd,
        ),
        Row(
            "frame → everything any call queued before it committed (a flush), p99, "
            f"{calls} concurrent calls: ours with writer_process=True",
            f"{p(child_flushes, 0.99) * 1000:.1f} ms (p50 {p(child_flushes, 0.5) * 1000:.1f})",
            f"{p(child, 0.99) * 1000:.1f} ms (its call's records)",
            p(child_flushes, 0.99) / p(child, 0.99),
            "",
            child_cmd,
        ),
    ]


LOAD_CPU_ROUNDS = 2


def load_rows(base_url: str, tmp: Path, calls: int, turns: int) -> list[Row]:
    """Many concurrent calls in this process, `pipecat-roark drain --follow` in another."""
    directory = tmp / "load"
    env = {
        **os.environ,
        "PIPECAT_ROARK_DIR": str(directory),
        "ROARK_API_KEY": KEY,
        "ROARK_BASE_URL": base_url,
    }
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    from pipecat_roark.lifecycle import close_all_writers
    from pipecat_roark.store import connect

    connect(directory).close()
    sidecar = subprocess.Popen(
        [sys.executable, "-m", "pipecat_roark.cli", "drain", "--follow"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        latencies = asyncio.run(durable_latency(directory, calls, turns, KEY, sample_every=50))
        close_all_writers()
    finally:
        sidecar.terminate()
        sidecar.wait(60)
    cpu_of: dict[str, list[float]] = {"ours": [], "none": [], "noop": []}
    for round_ in range(LOAD_CPU_ROUNDS):  # interleaved: the machine drifts between runs
        for mode in ("ours", "none", "noop") if round_ % 2 == 0 else ("noop", "none", "ours"):
            cpu = time.process_time()
            if mode == "ours":
                asyncio.run(
                    durable_latency(tmp / f"load-cpu-{round_}", calls, turns, KEY, sample_every=0)
                )
            else:
                asyncio.run(plain_calls(calls, turns, noop=mode == "noop"))
            cpu_of[mode].append(time.process_time() - cpu)
            close_all_writers()
    ours_cpu, none_cpu, noop_cpu = (median(cpu_of[m]) for m in ("ours", "none", "noop"))
    cmd = (
        f"scripts/bench (load: {calls} concurrent real-time calls, drain --follow in another "
        f"process; CPU: recording only, median of {LOAD_CPU_ROUNDS} interleaved rounds)"
    )
    return [
        Row(
            f"frame → its call's records committed with {calls} concurrent calls and a "
            "drain --follow sidecar, p99",
            f"{p(latencies, 0.99) * 1000:.1f} ms (p50 {p(latencies, 0.5) * 1000:.1f})",
            "20 ms (target)",
            p(latencies, 0.99) / 0.020,
            "≤ 1×",
            cmd,
        ),
        Row(
            f"bot process CPU for {calls} concurrent calls: with RoarkObserver vs without",
            f"{ours_cpu:.1f} s",
            f"{none_cpu:.1f} s",
            ours_cpu / none_cpu,
            "",
            cmd,
        ),
        Row(
            f"bot process CPU for {calls} concurrent calls: RoarkObserver recording (a sidecar "
            "delivers) vs a recording no-op observer",
            f"{ours_cpu:.1f} s",
            f"{noop_cpu:.1f} s",
            ours_cpu / noop_cpu,
            "≤ 1.05×",
            cmd,
        ),
    ]


async def plain_calls(calls: int, turns: int, *, noop: bool) -> None:
    from bench_worker import ArmedRecorder, Hop, NoopObserver, long_call, scripted

    async def one(n: int) -> None:
        await asyncio.sleep(n * 0.01)
        recorder = ArmedRecorder(num_channels=2, buffer_size=256 * 1024)
        await scripted.run_pipeline(
            [scripted.ScriptedCall(long_call(turns), pace=1.0), Hop(), Hop(), recorder],
            observers=[NoopObserver()] if noop else [],
        )

    await asyncio.gather(*(one(n) for n in range(calls)))


def long_call_rows(base_url: str, tmp: Path, minutes: int) -> list[Row]:
    ours = worker(sys.executable, "longcall", "capture", minutes, base_url, tmp)
    none = worker(sys.executable, "longcall", "none", minutes, base_url, tmp)
    directory = tmp / "longcall-capture"
    conn = sqlite3.connect(directory / "wal.sqlite")
    audio = conn.execute("SELECT sum(size) FROM chunks").fetchone()[0] or 0
    conn.close()
    db = sum(f.stat().st_size for f in directory.glob("wal.sqlite*"))
    hours = ours["audio_seconds"] / 3600
    growth_ours = (ours["rss"][-1] - ours["rss"][0]) / 1e6
    growth_none = (none["rss"][-1] - none["rss"][0]) / 1e6
    cmd = (
        f"scripts/bench (longcall: one {minutes}-minute call at pace 0, RSS after each tenth, "
        "once the writer has caught up)"
    )
    return [
        Row(
            f"RSS over a {minutes}-minute call: at the end vs after its first tenth, RoarkObserver vs no observer",
            f"{ours['rss'][-1] / 1e6:.0f} MB ({growth_ours:+.0f} MB)",
            f"{none['rss'][-1] / 1e6:.0f} MB ({growth_none:+.0f} MB)",
            ours["rss"][-1] / none["rss"][-1],
            "no growth with call length",
            cmd,
        ),
        Row(
            "disk per call-hour: database vs the recording itself",
            f"{db / hours / 1e6:.1f} MB/h database",
            f"{audio / hours / 1e6:.0f} MB/h audio (16 kHz stereo)",
            db / audio if audio else None,
            "",
            cmd,
        ),
    ]


# ---- 4. store append throughput ----


def store_rows(tmp: Path, events: int) -> list[Row]:
    from pipecat_roark.events import CallOpened, UserText, encode_event
    from pipecat_roark.ops import EventOp, OpenOp
    from pipecat_roark.writer import Writer

    calls = 100
    bodies = [
        UserText(at=1_700_000_000_000_000 + n, text=f"word {n} of the caller", language="en-US")
        for n in range(events)
    ]
    writer = Writer(tmp / "store")
    for c in range(calls):
        writer.submit(OpenOp(f"s{c}", CallOpened(at=1, agent_id="bench"), None))
    writer.flush_sync(60)
    start = time.perf_counter()
    for n, event in enumerate(bodies):
        writer.submit(EventOp(f"s{n % calls}", event))
    assert writer.flush_sync(600)
    ours = events / (time.perf_counter() - start)
    writer.close()

    raw = sqlite3.connect(tmp / "raw.sqlite", isolation_level=None)
    raw.execute("PRAGMA journal_mode = WAL")
    raw.execute("PRAGMA synchronous = NORMAL")
    raw.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, call_id TEXT, body BLOB)")
    start = time.perf_counter()
    encoded = [(f"s{n % calls}", encode_event(e)) for n, e in enumerate(bodies)]
    for offset in range(0, events, 1000):
        raw.execute("BEGIN")
        raw.executemany(
            "INSERT INTO events (call_id, body) VALUES (?, ?)", encoded[offset : offset + 1000]
        )
        raw.execute("COMMIT")
    theirs = events / (time.perf_counter() - start)
    raw.close()
    return [
        Row(
            "events appended per second: the writer (queue, encode, group commit) vs raw SQLite executemany in 1,000-row transactions",
            f"{ours:,.0f}/s",
            f"{theirs:,.0f}/s",
            ours / theirs,
            "≥ 150k/s",
            f"scripts/bench (store: {events:,} events over {calls} calls)",
        )
    ]


# ---- 5. drain a backlog, 6. status on a big database ----


def clone_calls(
    directory: Path, template: str, count: int, *, events: bool = True, prefix: str = "bench-"
) -> None:
    """Copies of one recorded call, named ``<prefix><i>`` (rows only: they share its chunk files)."""
    conn = sqlite3.connect(directory / "wal.sqlite", isolation_level=None)
    series = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
    conn.execute("BEGIN")
    conn.execute(
        series + "INSERT INTO calls SELECT ? || i, agent_id, agent_name, key_fp, state,"
        " end_reason, sample_rate, num_channels, owner_host, owner_pid, owner_token,"
        " started_at, ended_at, heartbeat_at FROM calls, n WHERE id = ?",
        (count, prefix, template),
    )
    if events:
        conn.execute(
            series + "INSERT INTO events (call_id, body) SELECT ? || i, body"
            " FROM n, events WHERE call_id = ? ORDER BY i, events.id",
            (count, prefix, template),
        )
    conn.execute(
        series + "INSERT INTO chunks (call_id, idx, path, size, sha256, sample_rate, num_channels,"
        " created_at) SELECT ? || i, idx, path, size, sha256, sample_rate,"
        " num_channels, created_at FROM chunks, n WHERE call_id = ?",
        (count, prefix, template),
    )
    conn.execute(
        series + "INSERT INTO deliveries (call_id, kind, chunk_idx, idempotency_key, state,"
        " attempts, next_attempt_at, created_at) SELECT ? || i, kind, chunk_idx,"
        " ? || i || substr(idempotency_key, length(?) + 1), 'pending', 0,"
        " next_attempt_at, created_at FROM n, deliveries WHERE call_id = ? ORDER BY i, deliveries.id",
        (count, prefix, prefix, template, template),
    )
    conn.execute("COMMIT")
    conn.close()


async def record_template(directory: Path, seconds: int, call_id: str = "template") -> str:
    from bench_worker import long_call, scripted

    from pipecat_roark import RoarkObserver
    from pipecat_roark.lifecycle import close_all_writers

    roark = RoarkObserver(
        api_key=KEY, agent_id="bench", pipecat_call_id=call_id, data_dir=directory, deliver=False
    )
    turns = max(1, round(seconds / 2.7))
    await scripted.run_pipeline(
        [scripted.ScriptedCall(long_call(turns)), roark.audio_processor], observers=[roark]
    )
    close_all_writers()
    return call_id


async def raw_uploads(base_url: str, chunks: list[bytes], concurrency: int) -> float:
    """The same requests with no WAL behind them: mint a URL, PUT the bytes.

    Through aiohttp, the HTTP client RoarkClient uses, so the ratio is the WAL's and the
    drainer's cost, not a difference between HTTP libraries.
    """
    queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
    for n, data in enumerate(chunks):
        queue.put_nowait((n, data))
    headers = {"x-roark-api-key": KEY, "authorization": f"Bearer {KEY}"}
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def work() -> None:
            while not queue.empty():
                n, data = queue.get_nowait()
                async with http.post(
                    f"{base_url}/v1/integrations/pipecat/chunk-upload-url",
                    json={
                        "pipecatCallId": f"raw-{n // 8}",
                        "chunkIndex": n % 8,
                        "contentType": "audio/pcm",
                    },
                    headers={**headers, "Idempotency-Key": f"raw-{n}"},
                ) as minted:
                    url = (await minted.json())["data"]["uploadUrl"]
                async with http.put(
                    yarl.URL(url, encoded=True), data=data, headers={"content-type": "audio/pcm"}
                ) as stored:
                    stored.raise_for_status()
                    await stored.read()

        start = time.perf_counter()
        await asyncio.gather(*(work() for _ in range(concurrency)))
        return time.perf_counter() - start


def drain_rows(base_url: str, tmp: Path, calls: int, seconds: int) -> list[Row]:
    from pipecat_roark.drain import Drainer, DrainPolicy

    directory = tmp / "backlog"
    template = asyncio.run(record_template(directory, seconds))
    clone_calls(directory, template, calls - 1)
    conn = sqlite3.connect(directory / "wal.sqlite")
    total_bytes = conn.execute("SELECT sum(size) FROM chunks").fetchone()[0]
    paths = [
        r[0]
        for r in conn.execute("SELECT path FROM chunks WHERE call_id = ? ORDER BY idx", (template,))
    ]
    conn.close()
    template_chunks = [(directory / path).read_bytes() for path in paths]
    # The clones share the template's chunk files: none may be deleted while others need them.
    policy = DrainPolicy(keep_delivered_audio=True)
    start = time.perf_counter()
    report = asyncio.run(Drainer(directory, KEY, base_url, policy).run_once(budget_s=3600))
    elapsed = time.perf_counter() - start
    assert report.complete, str(report)
    all_chunks = template_chunks * calls
    raw_elapsed = asyncio.run(raw_uploads(base_url, all_chunks, policy.concurrency))
    ours_mb = total_bytes / elapsed / 1e6
    raw_mb = total_bytes / raw_elapsed / 1e6
    cmd = f"scripts/bench (drain: {calls} calls × {seconds} s of 16 kHz stereo, concurrency {policy.concurrency})"
    return [
        Row(
            f"drain a {calls}-call backlog to the dev server: audio MB/s, vs the bare mint-URL + PUT requests without a WAL",
            f"{ours_mb:.1f} MB/s ({calls / elapsed:.1f} calls/s)",
            f"{raw_mb:.1f} MB/s",
            ours_mb / raw_mb,
            "≥ 0.8× (≥ 50 MB/s)",
            cmd,
        )
    ]


def operations_rows(base_url: str, tmp: Path, calls: int, seconds: int, live: int) -> list[Row]:
    """What running it in production adds: the metrics endpoint, and the owners' heartbeats."""
    from pipecat_roark import lifecycle, metrics_endpoint
    from pipecat_roark.drain import Drainer, DrainPolicy
    from pipecat_roark.owner import ENV_HEARTBEAT_S, heartbeat_interval_s

    def backlog(name: str) -> Path:
        directory = tmp / name
        template = asyncio.run(record_template(directory, seconds, f"{name}-0"))
        clone_calls(directory, template, calls - 1, prefix=f"{name}-")
        return directory

    def drain(directory: Path, scraped: bool) -> tuple[float, float]:
        stop = threading.Event()
        scraper = None
        if scraped:
            port = metrics_endpoint.serve(0, "127.0.0.1", directory)

            def scrape() -> None:
                with httpx.Client(timeout=10) as http:
                    while not stop.wait(0.25):  # 4 scrapes a second: far above Prometheus' 15 s
                        http.get(f"http://127.0.0.1:{port}/metrics").raise_for_status()

            scraper = threading.Thread(target=scrape, daemon=True)
            scraper.start()
        policy = DrainPolicy(keep_delivered_audio=True)  # the clones share one call's files
        wall, cpu = time.perf_counter(), time.process_time()
        report = asyncio.run(Drainer(directory, KEY, base_url, policy).run_once(budget_s=3600))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        stop.set()
        if scraper is not None:
            scraper.join(10)
        assert report.complete, str(report)
        return wall, cpu

    plain = [drain(backlog(f"ops-plain-{i}"), scraped=False) for i in range(2)]
    scraped = [drain(backlog(f"ops-scraped-{i}"), scraped=True) for i in range(2)]
    plain_wall, plain_cpu = median([w for w, _ in plain]), median([c for _, c in plain])
    scraped_wall, scraped_cpu = median([w for w, _ in scraped]), median([c for _, c in scraped])

    interval = heartbeat_interval_s()
    beats: dict[str, list[float]] = {"on": [], "off": []}
    saved = os.environ.get(ENV_HEARTBEAT_S)
    try:
        for round_ in range(2):  # interleaved: drift hits both alike
            for mode in ("on", "off"):
                # Read when the writer starts: "off" is one heartbeat a day.
                os.environ[ENV_HEARTBEAT_S] = str(interval if mode == "on" else 86399)
                cpu = time.process_time()
                asyncio.run(durable_latency(tmp / f"beats-{mode}-{round_}", live, 2, KEY, 0))
                beats[mode].append(time.process_time() - cpu)
                lifecycle.close_all_writers()
    finally:
        if saved is None:
            os.environ.pop(ENV_HEARTBEAT_S, None)
        else:
            os.environ[ENV_HEARTBEAT_S] = saved
    on, off = median(beats["on"]), median(beats["off"])
    return [
        Row(
            f"drain a {calls}-call backlog while /metrics is scraped 4×/s vs the same drain unscraped: wall time",
            f"{scraped_wall:.2f} s (CPU {scraped_cpu:.2f} s)",
            f"{plain_wall:.2f} s (CPU {plain_cpu:.2f} s)",
            scraped_wall / plain_wall,
            "",
            f"scripts/bench (operations: {calls} calls × {seconds} s, median of 2 each)",
        ),
        Row(
            f"bot process CPU for {live} concurrent real-time calls: heartbeats every "
            f"{interval:g} s vs none",
            f"{on:.2f} s",
            f"{off:.2f} s",
            on / off,
            "",
            f"scripts/bench (operations: {live} calls, 2 rounds interleaved, median)",
        ),
    ]


def status_rows(tmp: Path, calls: int) -> list[Row]:
    directory = tmp / "big"
    asyncio.run(record_template(directory, 3))
    clone_calls(directory, "template", calls - 1, events=False)
    env = {**os.environ, "PIPECAT_ROARK_DIR": str(directory)}

    def timed(*args: str) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "pipecat_roark.cli", *args],
                env=env,
                capture_output=True,
                check=False,
            )
            best = min(best, time.perf_counter() - start)
        return best

    status = timed("status", "--json")
    version = timed("--version")
    return [
        Row(
            f"`pipecat-roark status --json` on {calls:,} calls vs the CLI starting (`--version`)",
            f"{status * 1000:.0f} ms",
            f"{version * 1000:.0f} ms",
            status / version,
            "",
            f"scripts/bench (status: {calls:,} calls cloned in SQL, best of 3)",
        )
    ]


# ---- the table ----


def render(rows: list[Row], quick: bool, elapsed: float) -> str:
    head = ["measured", "ours", "compared with", "ratio", "target"]
    lines = [
        "# Benchmarks",
        "",
        "Written by `scripts/bench` (`scripts/bench --quick` for a smoke run). Every row is two",
        "things measured side by side in the same run on the same machine; compare the ratios,",
        "not the absolute times: these machines are noisy.",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.system()}",
        f"- run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {elapsed:.0f} s"
        + (" (quick sizes)" if quick else ""),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        lines.append("| " + " | ".join(row.cells()) + " |")
    lines += ["", "How each row was produced:", ""]
    for row in rows:
        lines.append(f"- {row.what}: `{row.command}`")
    return "\n".join(lines) + "\n"


PROFILE_HEADING = "## Where the time goes"


def kept_profile(out: Path) -> str:
    """The hand-written profile section of BENCHMARKS.md (scripts/profile_frames.py and
    py-spy, read by a person) survives a rerun of the table."""
    try:
        old = out.read_text()
    except OSError:
        return ""
    at = old.find(PROFILE_HEADING)
    return "" if at < 0 else "\n" + old[at:]


def run_as(pid: int, *, idle: bool) -> None:
    """Run process ``pid`` (the dev server) as Linux idle work (``SCHED_IDLE``), else as
    batch work.

    It stands in for Roark, which runs on other machines; here it shares the bot's two
    CPUs. At its normal priority each request it received woke it on the bot's own CPU
    and preempted the bot's event loop, in the modes that deliver while the no-op does
    not: 50 real-time calls with the writer and delivery children, 6 rounds, lag p99
    3.62 ms against the no-op's 2.47 ms, and 2.48 ms with the server as batch work
    (``scripts/exp_lag_placement.py noop,children,children-serverbatch 6``). As batch
    work it still kept the loop off its CPU for more than 1 ms 17 times in 6 rounds, and
    5 times as idle work (``scripts/exp_lag_sched.py
    noop,children,children+childidle,children+serveridle 6``): this guest's kernel does
    not preempt a task inside a system call (``Dynamic Preempt: none``), whatever its
    policy, but an idle task is not picked while the loop is ready. Threads it starts
    later inherit the policy.
    """
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            policy = os.SCHED_IDLE if idle else os.SCHED_BATCH
            os.sched_setscheduler(int(task.name), policy, os.sched_param(0))
        except (OSError, AttributeError):  # not Linux, or refused: measured as it is
            continue


SERVER_AS_IDLE_WORK = ("event-loop lag",)
"""The groups of rows whose dev server runs as idle work (``SCHED_IDLE``): they measure
the bot's event loop, which the server must never take a CPU from. Every other group's
server runs as batch work (``SCHED_BATCH``): where the server's speed is part of what is
measured (a backlog drained to it), an idle server got only what the drainer under test
left it (a full run with an idle server for every group, 12:35 UTC: the 1,000-call
drain fell from 0.82× to 0.64× of the bare requests)."""


def with_fresh_server(
    directory: Path, step: Callable[[str], list[Row]], *, idle: bool = False
) -> list[Row]:
    """Run one group of rows against a dev server of its own, stopped after it.

    The dev server stands in for Roark, which runs on other machines; here it shares the
    bot's two CPUs (as idle work if ``idle``, else as batch work: ``run_as``). One
    server for the whole run let each group pay for what the groups before it had sent
    (the server's received state grew to megabytes, and its upkeep competed with the bot
    only in the modes that deliver), so each group starts from an empty server, as the
    first did.
    """
    server, base_url = spawn(directory)
    run_as(server.pid, idle=idle)
    try:
        return step(base_url)
    finally:
        server.terminate()
        server.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes; do not write BENCHMARKS.md"
    )
    parser.add_argument(
        "--no-reference", action="store_true", help="skip Roark's reference observer"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="ERROR")
    q = args.quick
    started = time.perf_counter()
    ref = None if args.no_reference else reference_python()
    with tempfile.TemporaryDirectory(prefix="pipecat-roark-bench-") as raw_tmp:
        tmp = Path(raw_tmp)
        rows: list[Row] = []
        steps: list[tuple[str, Callable[[str], list[Row]]]] = [
            (
                "pipeline overhead",
                lambda base_url: overhead_rows(
                    base_url, tmp, ref, 1 if q else 3, 1 if q else 8, 1 if q else 3
                ),
            ),
            ("arrival", lambda base_url: arrival_rows(base_url, tmp, ref, 1 if q else 5)),
            (
                "audio-only overhead",
                lambda base_url: audio_only_rows(
                    base_url, tmp, ref, 1 if q else 2, 1 if q else 2, 2_000 if q else 20_000
                ),
            ),
            (
                "event-loop lag",
                lambda base_url: lag_rows(
                    base_url, tmp, 5 if q else 50, 1 if q else 2, 1 if q else 4
                ),
            ),
            (
                "frame to durable",
                lambda base_url: durable_rows(tmp, 5 if q else 100, 1 if q else 4),
            ),
            ("load", lambda base_url: load_rows(base_url, tmp, 10 if q else 200, 1 if q else 2)),
            ("long call", lambda base_url: long_call_rows(base_url, tmp, 3 if q else 60)),
            ("store append", lambda base_url: store_rows(tmp, 20_000 if q else 300_000)),
            (
                "drain backlog",
                lambda base_url: drain_rows(base_url, tmp, 20 if q else 1000, 5 if q else 30),
            ),
            ("status", lambda base_url: status_rows(tmp, 2_000 if q else 100_000)),
            (
                "operations",
                lambda base_url: operations_rows(
                    base_url, tmp, 10 if q else 300, 3 if q else 10, 5 if q else 50
                ),
            ),
        ]
        for number, (name, step) in enumerate(steps):
            print(f"… {name}", flush=True)
            idle = name in SERVER_AS_IDLE_WORK
            rows += with_fresh_server(tmp / f"devserver-{number}", step, idle=idle)
    elapsed = time.perf_counter() - started
    text = render(rows, q, elapsed)
    from rich.console import Console
    from rich.table import Table

    table = Table(title="pipecat-roark benchmarks (ratios measured side by side)")
    for column in ("measured", "ours", "compared with", "ratio", "target"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row.cells())
    Console(width=200 if not sys.stdout.isatty() else None).print(table)
    if not q:
        args.out.write_text(text + kept_profile(args.out))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
