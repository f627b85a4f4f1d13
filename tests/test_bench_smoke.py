"""scripts/bench runs end to end at small sizes (no timing is asserted: numbers live in
BENCHMARKS.md, written by the full run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(900)  # every row at small sizes: about 90 s on an idle machine
def test_the_quick_benchmark_runs_every_row_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROARK_", "PIPECAT_ROARK"))}
    env["COLUMNS"] = "200"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench.py"),
            "--quick",
            "--no-reference",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for row in (
        "RoarkObserver recording vs no observer",
        "mixed call: overhead over no observer, ours vs a recording no-op",
        "the bot's CPU alone vs a recording no-op",
        "the bot + its children's CPU vs a recording no-op",
        "audio-only call: overhead over no observer, ours with writer_process=True and",
        "the bot + its writer and delivery children vs a recording no-op",
        "bot + writer and delivery children CPU for",
        "writer_process=True vs the writer thread",
        "audio-only call: overhead over no observer, ours vs a recording no-op",
        "event-loop lag p99 during",
        "frame → its call's records committed, p99",
        "committed (a flush), p99",
        "concurrent calls and a drain --follow sidecar",
        "bot process CPU for 10 concurrent calls",
        "RSS over a 3-minute call",
        "disk per call-hour",
        "events appended per second",
        "drain a 20-call backlog",
        "pipecat-roark status --json",
        "while /metrics is scraped",
        "heartbeats every",
    ):
        assert row in done.stdout, row
    assert not out.exists(), "--quick leaves BENCHMARKS.md alone"
