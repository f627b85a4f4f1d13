"""`scripts/demo` runs examples/offline_call.py: run it as the README says, both ways."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from devserver_fixture import RunningDevServer

ROOT = Path(__file__).resolve().parent.parent


def run_demo(
    tmp_path: Path, *args: str, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROARK_", "PIPECAT_ROARK"))}
    env |= {"COLUMNS": "120", "LOGURU_LEVEL": "WARNING", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "offline_call.py"), "--dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_the_demo_call_arrives_and_its_wav_equals_the_recorded_audio(tmp_path: Path) -> None:
    done = run_demo(tmp_path / "roark")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "My order is late." in done.stdout
    assert "tool_call call_1 lookup_order" in done.stdout
    assert "reason: agent-ended" in done.stdout
    assert "✓ its audio equals every chunk the AudioBufferProcessor emitted" in done.stdout
    assert (tmp_path / "roark" / "demo-call-1.wav").stat().st_mode & 0o777 == 0o600
    assert "healthy" in done.stdout


def test_the_crash_demo_recovers_the_killed_call(tmp_path: Path) -> None:
    done = run_demo(tmp_path / "roark", "--crash")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "bot killed (exit -9)" in done.stdout
    assert "1 orphaned call(s) finalized" in done.stdout
    assert "reason: observer-lost" in done.stdout
    assert "✓ its audio equals the chunks made durable before the kill" in done.stdout


def test_with_a_key_the_demo_says_how_to_send_to_roark_and_real_sends_there(
    tmp_path: Path, dev_server: RunningDevServer
) -> None:
    stand_in = {"ROARK_API_KEY": "rk_demo_real", "ROARK_BASE_URL": dev_server.base_url}
    hinted = run_demo(tmp_path / "hint", env_extra=stand_in)
    assert hinted.returncode == 0
    assert "`scripts/demo --real` sends the call to Roark" in hinted.stdout
    assert dev_server.calls() == [], "without --real (and no terminal to ask) nothing goes out"

    sent = run_demo(tmp_path / "real", "--real", env_extra=stand_in)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    [call] = dev_server.calls()
    assert call["pipecatCallId"].startswith("pipecat-roark-demo-")
    assert call["ended"] and call["callEndedReason"] == "agent-ended"
