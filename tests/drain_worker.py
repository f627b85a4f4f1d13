"""A drainer process for the multi-process and crash tests.

    python drain_worker.py DATA_DIR API_KEY BASE_URL [GATE_FILE]
Prints the drain report as one JSON line. With GATE_FILE it first prints "ready" and
waits (bounded) until that file exists, so several workers start draining together;
it then delivers one row at a time, so each worker has at most one request in flight.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from pipecat_roark.drain import Drainer, DrainPolicy

QUICK = DrainPolicy(backoff_base_s=0.01, backoff_cap_s=0.05, max_attempts=200, poll_s=0.05)


async def main(directory: Path, key: str, base_url: str, gate: str | None = None) -> None:
    if gate is not None:
        print("ready", flush=True)
        for _ in range(3000):  # bounded: at most 30 s
            if Path(gate).exists():
                break
            time.sleep(0.01)
    policy = QUICK if gate is None else replace(QUICK, concurrency=1, claim_batch=1)
    report = await Drainer(directory, key, base_url, policy).run_once(budget_s=60)
    line = {"delivered": report.delivered, "pending": report.pending, "dead": report.dead_total}
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], *sys.argv[4:5]))
