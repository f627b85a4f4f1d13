"""The `pipecat-roark` CLI run as a user runs it: a subprocess, a real database, the real
dev server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import wave
from pathlib import Path
from typing import Any

import pytest

from devserver_fixture import RunningDevServer
from helpers import stored_events
from pipecat_roark.timeline import assemble_call_ended, assemble_call_started
from pipecat_roark.wire import encode
from test_drain import KEY, chunk_files, delivery_states, record
from test_drain_processes import kill_bot_mid_call

pytestmark = pytest.mark.anyio


def cli_env(directory: Path, base_url: str, key: str | None = KEY) -> dict[str, str]:
    """This environment without any ambient Roark settings, plus the given ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROARK_", "PIPECAT_ROARK"))}
    env |= {"PIPECAT_ROARK_DIR": str(directory), "ROARK_BASE_URL": base_url}
    if key is not None:
        env["ROARK_API_KEY"] = key
    return env


def cli(
    directory: Path, *args: str, base_url: str = "http://127.0.0.1:9", key: str | None = KEY
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipecat_roark.cli", *args],
        capture_output=True,
        text=True,
        env=cli_env(directory, base_url, key),
        timeout=180,
        check=False,
    )


def start_cli(directory: Path, *args: str, base_url: str) -> subprocess.Popen[str]:
    """A long-running command (drain --follow, dev-server) as a process of its own."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipecat_roark.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(directory, base_url),
    )


def cli_json(directory: Path, *args: str, expect: int = 0, **kwargs: Any) -> Any:
    done = cli(directory, *args, "--json", **kwargs)
    assert done.returncode == expect, done.stderr
    return json.loads(done.stdout)


def sql(directory: Path, query: str, *params: object) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(directory / "wal.sqlite")
    try:
        return conn.execute(query, params).fetchall()
    finally:
        conn.close()


def wav_frames(data: bytes) -> tuple[tuple[int, int, int], bytes]:
    with wave.open(io.BytesIO(data)) as wav:
        return (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()), wav.readframes(
            wav.getnframes()
        )


async def test_a_killed_bot_is_recovered_by_cli_drain_whole_and_once(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    kill_bot_mid_call(data_dir, "crashed-1", chunk_bytes=8000)
    durable = chunk_files(data_dir, "crashed-1")
    assert len(durable) >= 2, "chunks were made durable before the kill"

    done = cli(data_dir, "drain", base_url=dev_server.base_url)
    assert done.returncode == 0, done.stderr
    assert "1 orphaned call(s) finalized" in done.stdout

    call = dev_server.call("crashed-1")
    events = stored_events(data_dir, "crashed-1")
    assert call["callEnded"] == json.loads(encode(assemble_call_ended("crashed-1", events)))
    assert call["callEnded"]["callEndedReason"] == "observer-lost"
    assert [t["content"] for t in call["callEnded"]["transcript"]][:2] == ["Hello there.", "Hi."]
    assert call["eventCounts"] == {"callStarted": 1, "callEnded": 1}
    assert sorted(call["chunks"], key=int) == [str(i) for i in range(len(durable))]
    for index, data in enumerate(durable):
        assert call["chunks"][str(index)]["sha256"] == hashlib.sha256(data).hexdigest()
    assert dev_server.recording("crashed-1")[44:] == b"".join(durable), "byte-identical audio"
    posts: dict[str, int] = {}
    for request in dev_server.requests():
        if request["method"] == "POST":
            posts[request["idempotencyKey"]] = posts.get(request["idempotencyKey"], 0) + 1
    assert set(posts.values()) == {1}, "nothing was sent twice"

    again = cli(data_dir, "drain", base_url=dev_server.base_url)
    assert again.returncode == 0
    assert again.stdout.splitlines()[-1].startswith("0 delivered")


async def test_status_calls_show_and_export_report_exactly_what_the_database_holds(
    data_dir: Path, dev_server: RunningDevServer, tmp_path: Path
) -> None:
    # The killed bot first: its drainer may have tried port 9 already, and the newest row
    # with an error must be the one refused below.
    kill_bot_mid_call(data_dir, "still-open", chunk_bytes=8000)
    for n, call_id in enumerate(["good", "refused", "waiting"]):
        await record(data_dir, call_id, n)

    kept = ("--keep-delivered-audio",)  # the export below rebuilds the recording from the files
    assert (
        cli(data_dir, "drain", "--call", "good", *kept, base_url=dev_server.base_url).returncode
        == 0
    )
    dev_server.configure(status_sequence=[400])
    refused = cli(
        data_dir, "drain", "--call", "refused", "--timeout", "5", base_url=dev_server.base_url
    )
    assert refused.returncode == 1
    assert "400" in refused.stderr

    status = cli_json(data_dir, "status", expect=1)  # a dead row: unhealthy
    counts = dict.fromkeys(("pending", "leased", "delivered", "dead"), 0)
    for state, count in sql(data_dir, "SELECT state, count(*) FROM deliveries GROUP BY state"):
        counts[state] = count
    assert status["deliveries"] == counts
    assert counts["dead"] == 1 and counts["pending"] > 0 and counts["delivered"] > 0
    assert status["calls"] == {"open": 1, "ended": 3}
    assert status["healthy"] is False
    assert status["lastError"]["key"] == "refused:call-started"
    assert "400" in status["lastError"]["error"]
    chunk_bytes = sql(data_dir, "SELECT sum(size) FROM chunks")[0][0]
    assert status["chunkBytes"] == chunk_bytes

    rows = cli_json(data_dir, "calls")
    assert {r["id"]: r["state"] for r in rows} == {
        "good": "delivered",
        "refused": "dead",
        "waiting": "pending",
        "still-open": "open",
    }
    for row in rows:
        chunks = sql(data_dir, "SELECT count(*) FROM chunks WHERE call_id = ?", row["id"])[0][0]
        assert row["chunksTotal"] == chunks
    assert [r["id"] for r in cli_json(data_dir, "calls", "--state", "dead")] == ["refused"]
    assert cli_json(data_dir, "calls", "--agent", "nobody") == []

    shown = cli_json(data_dir, "show", "good")
    events = stored_events(data_dir, "good")
    assert shown["payloads"] == {
        "callStarted": json.loads(encode(assemble_call_started("good", events))),
        "callEnded": json.loads(encode(assemble_call_ended("good", events))),
    }
    assert shown["payloads"]["callEnded"] == dev_server.call("good")["callEnded"]
    assert {d["state"] for d in shown["deliveries"]} == {"delivered"}
    assert len(shown["timeline"]) == len(events)
    open_call = cli_json(data_dir, "show", "still-open")
    assert open_call["payloads"]["callEnded"]["callEndedReason"] == "observer-lost"
    assert "has not ended" in open_call["payloadNote"]

    out = tmp_path / "good.wav"
    exported = cli_json(data_dir, "export", "good", "--wav", str(out))
    assert exported["chunks"] == len(chunk_files(data_dir, "good"))
    assert out.stat().st_mode & 0o777 == 0o600
    mine = wav_frames(out.read_bytes())
    assert mine == wav_frames(dev_server.recording("good"))
    assert mine[1] == b"".join(chunk_files(data_dir, "good"))

    human = cli(data_dir, "status")
    assert human.returncode == 1
    assert "unhealthy" in human.stdout and "calls: 1 open, 3 ended" in human.stdout


async def test_retry_then_drain_delivers_the_dead_call_and_prune_deletes_only_delivered(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    await record(data_dir, "kept", 0)
    await record(data_dir, "flaky", 1)
    dev_server.configure(status_sequence=[400])
    kept = ("--keep-delivered-audio",)  # prune below is what deletes this call's audio
    assert (
        cli(data_dir, "drain", "--call", "flaky", *kept, base_url=dev_server.base_url).returncode
        == 1
    )
    assert "dead" in delivery_states(data_dir).values()

    assert cli_json(data_dir, "retry", "--dead") == {"retried": 1}
    assert (
        cli(data_dir, "drain", "--call", "flaky", *kept, base_url=dev_server.base_url).returncode
        == 0
    )
    assert dev_server.call("flaky")["eventCounts"] == {"callStarted": 1, "callEnded": 1}

    kept_files = chunk_files(data_dir, "kept")
    pruned = cli_json(data_dir, "prune", "--older-than", "0s")
    assert pruned["calls"] == 1
    assert pruned["bytes"] == sum(c["size"] for c in dev_server.call("flaky")["chunks"].values())
    assert [r[0] for r in sql(data_dir, "SELECT id FROM calls")] == ["kept"]
    assert not (data_dir / "chunks" / "flaky").exists()
    assert chunk_files(data_dir, "kept") == kept_files, "undelivered data is never pruned"
    assert cli_json(data_dir, "prune", "--older-than", "0s") == {"calls": 0, "bytes": 0}


async def test_a_refused_key_pauses_and_says_so_then_the_right_key_delivers(
    data_dir: Path, tmp_path: Path
) -> None:
    from devserver_fixture import running_dev_server

    await record(data_dir, "keyed", 0)
    with running_dev_server(tmp_path, accepted_keys=[KEY]) as server:
        wrong = cli(data_dir, "drain", "--timeout", "5", base_url=server.base_url, key="rk_wrong")
        assert wrong.returncode == 1
        assert "skipped call keyed: recorded under another API key" in wrong.stderr

        # Same fingerprint as recorded, but the server no longer accepts it.
        server.configure(accepted_keys=["rk_rotated"])
        paused = cli(data_dir, "drain", "--timeout", "5", base_url=server.base_url)
        assert paused.returncode == 1
        assert "Roark refused the API key" in paused.stderr
        status = cli_json(data_dir, "status", expect=1)
        assert [p["keyFingerprint"] for p in status["pausedKeys"]] == [
            sql(data_dir, "SELECT key_fp FROM calls")[0][0]
        ]
        assert status["dead"] == 0, "a refused key drops nothing"

        server.configure(accepted_keys=[KEY])
        fixed = cli(data_dir, "drain", base_url=server.base_url)
        assert fixed.returncode == 0, fixed.stderr
        assert server.call("keyed")["eventCounts"] == {"callStarted": 1, "callEnded": 1}
        assert cli_json(data_dir, "status")["pausedKeys"] == []


async def test_drain_follow_delivers_a_call_recorded_while_it_runs(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    wanted = {"first", "second"}
    await record(data_dir, "first", 0)
    follower = start_cli(data_dir, "drain", "--follow", base_url=dev_server.base_url)
    try:
        await record(data_dir, "second", 1)
        for _ in range(600):  # bounded: at most 60 s
            if {c["pipecatCallId"] for c in dev_server.calls() if c["ended"]} == wanted:
                break
            await asyncio.sleep(0.1)
        assert {c["pipecatCallId"] for c in dev_server.calls() if c["ended"]} == wanted
    finally:
        follower.terminate()  # SIGTERM: stop cleanly
        _, stderr = follower.communicate(timeout=60)
    assert follower.returncode == 0, stderr
    assert set(delivery_states(data_dir).values()) == {"delivered"}


async def test_ctrl_c_stops_a_drain_cleanly_and_the_next_drain_finishes_the_call(
    data_dir: Path, tmp_path: Path
) -> None:
    from devserver_fixture import running_dev_server

    await record(data_dir, "interrupted", 0)
    with running_dev_server(tmp_path, latency_ms=3000) as server:
        proc = start_cli(data_dir, "drain", base_url=server.base_url)
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("draining")
        proc.send_signal(signal.SIGINT)  # Ctrl-C, while a request is in flight
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 1
        assert "stopped: leases released" in stderr
        assert "Traceback" not in stderr
        assert "leased" not in delivery_states(data_dir).values(), "nothing stays leased"

        server.configure(latency_ms=0)
        done = cli(data_dir, "drain", base_url=server.base_url)
        assert done.returncode == 0, done.stderr
        assert server.call("interrupted")["eventCounts"] == {"callStarted": 1, "callEnded": 1}


async def test_on_a_terminal_drain_shows_a_progress_bar(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    import pty

    await record(data_dir, "on-a-tty", 0)
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipecat_roark.cli", "drain"],
        stdout=terminal,
        stderr=terminal,
        env=cli_env(data_dir, dev_server.base_url) | {"COLUMNS": "160", "TERM": "xterm"},
    )
    os.close(terminal)
    seen = b""
    while True:  # bounded by the process: EOF (EIO) once it exits
        try:
            data = os.read(controller, 65536)
        except OSError:
            break
        if not data:
            break
        seen += data
    os.close(controller)
    assert proc.wait(60) == 0
    text = seen.decode(errors="replace")
    assert "delivering" in text and "rows" in text and "MB/s" in text
    assert "delivered (" in text and "0 pending" in text
