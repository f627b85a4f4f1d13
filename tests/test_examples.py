"""The examples run (or, for the service-backed bot, import and wire) as the README says."""

from __future__ import annotations

import os
import runpy
import sqlite3
import subprocess
import sys
import warnings
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_the_real_bot_example_imports_with_its_extras_and_defines_bot() -> None:
    with warnings.catch_warnings():  # Pipecat's own service modules deprecate each other
        warnings.simplefilter("ignore", DeprecationWarning)
        namespace = runpy.run_path(str(EXAMPLES / "bot.py"), run_name="example_bot")
    assert callable(namespace["bot"])
    assert set(namespace["TRANSPORT_PARAMS"]) == {"daily", "webrtc"}


def test_basic_observer_records_a_call_with_two_lines_of_wiring(tmp_path: Path) -> None:
    env = {**os.environ, "PIPECAT_ROARK_DIR": str(tmp_path)}
    env.pop("ROARK_API_KEY", None)
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "basic_observer.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    call_id = result.stdout.split()[2]
    with sqlite3.connect(tmp_path / "wal.sqlite") as conn:
        row = conn.execute(
            "SELECT state, end_reason, agent_id FROM calls WHERE id = ?", (call_id,)
        ).fetchone()
    conn.close()
    assert row == ("ended", "agent-ended", "basic-example")
