"""The drainer against the real dev server over 127.0.0.1: every call once, in order, whole.

The server runs in strict order mode: a request of a call that arrives out of Roark's
order (a chunk before call-started, call-ended before its chunks) is refused with 409.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from devserver_fixture import RunningDevServer, running_dev_server
from helpers import LogCapture, stored_events
from pipecat_roark import RoarkObserver
from pipecat_roark.background_drainer import ensure_background_drainer, stop_background_drainers
from pipecat_roark.drain import Drainer, DrainPolicy, DrainReport
from pipecat_roark.lifecycle import writer_for
from pipecat_roark.testing import Bot, ScriptedCall, Tool, User, run_pipeline
from pipecat_roark.timeline import assemble_call_ended, assemble_call_started
from pipecat_roark.wire import encode

pytestmark = [pytest.mark.anyio, pytest.mark.strict_order]

KEY = "rk_live_drain"
QUICK = DrainPolicy(backoff_base_s=0.01, backoff_cap_s=0.05, max_attempts=200, poll_s=0.05)


def short_script(n: int) -> list[object]:
    return [
        Bot([f"Hello {n}."]),
        User(f"Question {n}?", ms=600),
        Tool(f"t{n}", "lookup", {"n": n}, {"ok": True}),
        Bot(["Answer", str(n)]),
    ]


async def record(
    directory: Path, call_id: str, n: int = 0, *, key: str | None = KEY, **options: Any
) -> None:
    """A short scripted call recorded (not delivered) in 8000-byte chunks."""
    roark = RoarkObserver(
        agent_id="drain-bot",
        api_key=key,
        pipecat_call_id=call_id,
        data_dir=directory,
        deliver=False,
        chunk_bytes=8000,
        **options,
    )
    await run_pipeline([ScriptedCall(short_script(n)), roark.audio_processor], observers=[roark])  # type: ignore[arg-type]


def chunk_files(directory: Path, call_id: str) -> list[bytes]:
    with sqlite3.connect(directory / "wal.sqlite") as conn:
        rows = conn.execute(
            "SELECT path FROM chunks WHERE call_id = ? ORDER BY idx", (call_id,)
        ).fetchall()
    conn.close()
    return [(directory / p).read_bytes() for (p,) in rows]


def chunk_rows(directory: Path, call_id: str) -> list[tuple[int, str]]:
    """(size, sha256) of each recorded chunk, hashed from its bytes when it was made durable.

    The rows outlive the files (delivered audio is deleted once Roark has the call), so
    they are what a delivered recording is checked against.
    """
    with sqlite3.connect(directory / "wal.sqlite") as conn:
        rows = conn.execute(
            "SELECT size, sha256 FROM chunks WHERE call_id = ? ORDER BY idx", (call_id,)
        ).fetchall()
    conn.close()
    return [(int(size), str(sha)) for size, sha in rows]


def stored_under(call_id: str, path: str) -> bool:
    """Whether a PUT to the dev server's storage ``path`` is one of this call's chunks (its
    objects live in a folder named for the id: readable part, then a hash of the whole id)."""
    readable = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in call_id)
    digest = hashlib.sha256(call_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"/{readable[:80]}-{digest}/" in path


def delivery_states(directory: Path) -> dict[str, str]:
    with sqlite3.connect(directory / "wal.sqlite") as conn:
        rows = conn.execute("SELECT idempotency_key, state FROM deliveries").fetchall()
    conn.close()
    return dict(rows)


def assert_arrived_whole(
    server: RunningDevServer, directory: Path, call_id: str, *, in_order: bool = True
) -> dict[str, object]:
    """The call at the server equals what is stored, each chunk byte for byte; and, unless
    ``in_order`` is False (a row of it went dead and was retried later), in Roark's order."""
    call = server.call(call_id)
    events = stored_events(directory, call_id)
    assert call["callStarted"] == json.loads(encode(assemble_call_started(call_id, events)))
    assert call["callEnded"] == json.loads(encode(assemble_call_ended(call_id, events)))
    assert call["eventCounts"] == {"callStarted": 1, "callEnded": 1}
    rows = chunk_rows(directory, call_id)
    assert len(rows) >= 2, "the call has several chunks"
    stored = call["chunks"]
    assert sorted(int(i) for i in stored) == list(range(len(rows)))
    recording = server.recording(call_id)[44:]
    assert len(recording) == sum(size for size, _ in rows)
    offset = 0
    for index, (size, sha) in enumerate(rows):
        assert stored[str(index)]["sha256"] == sha
        assert hashlib.sha256(recording[offset : offset + size]).hexdigest() == sha
        offset += size
    if in_order:
        assert_in_order(call, len(rows))
    return call


def assert_in_order(call: dict[str, Any], chunks: int) -> None:
    """Roark's per-call order, as the requests arrived at the server: call-started first,
    each chunk's URL minted before its PUT, call-ended after every chunk."""
    accepted = [a["request"] for a in call["arrivals"] if a["status"] == 200]
    assert accepted[0] == "call-started", accepted
    assert accepted[-1] == "call-ended", accepted
    assert set(accepted) == {"call-started", "call-ended"} | {
        f"{step}:{i}" for i in range(chunks) for step in ("url", "put")
    }, accepted
    for i in range(chunks):
        assert accepted.index(f"url:{i}") < accepted.index(f"put:{i}"), accepted
    assert not [a for a in call["arrivals"] if a["status"] == 409], "nothing out of order"


async def test_a_recorded_call_arrives_whole_and_in_order(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    await record(data_dir, "call-1")
    report = await Drainer(data_dir, KEY, dev_server.base_url, QUICK).run_once()
    assert_arrived_whole(dev_server, data_dir, "call-1")
    rows = chunk_rows(data_dir, "call-1")
    assert (report.delivered, report.chunks, report.bytes) == (
        len(rows) + 2,
        len(rows),
        sum(size for size, _ in rows),
    )
    assert not (data_dir / "chunks" / "call-1").exists(), "Roark has the call: its audio left"
    assert (report.pending, report.dead_total, report.complete) == (0, 0, True)
    assert set(delivery_states(data_dir).values()) == {"delivered"}
    posts = [
        r["idempotencyKey"]
        for r in dev_server.requests()
        if r["path"] == "/v1/integrations/pipecat"
    ]
    assert posts == ["call-1:call-started", "call-1:call-ended"], (
        "call-started first, call-ended last"
    )


async def test_deliveries_go_out_during_the_call(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    seen_during_call: list[dict[str, object]] = []

    def a_chunk_arrived() -> bool:
        calls = dev_server.calls()
        return bool(calls and calls[0]["chunks"])

    async def look(step: int) -> None:
        # The call holds still at step 3 until a chunk has arrived (the background drainer
        # runs in this loop, so wait in a thread), however slow the machine is.
        if step == 3 and await asyncio.to_thread(dev_server.wait_until, a_chunk_arrived):
            seen_during_call.append(dev_server.calls()[0])

    roark = RoarkObserver(
        agent_id="live",
        api_key=KEY,
        base_url=dev_server.base_url,
        pipecat_call_id="live-1",
        chunk_bytes=8000,
    )
    script = ScriptedCall(short_script(1), on_step=look)  # type: ignore[arg-type]
    try:
        await run_pipeline([script, roark.audio_processor], observers=[roark])
        await asyncio.to_thread(
            dev_server.wait_until, lambda: any(c["ended"] for c in dev_server.calls())
        )
    finally:
        await stop_background_drainers(5)
    assert (
        seen_during_call
        and seen_during_call[0]["started"] is True
        and not seen_during_call[0]["ended"]
    )
    assert_arrived_whole(dev_server, data_dir, "live-1")


async def test_every_call_arrives_exactly_once_through_storms_of_faults(
    data_dir: Path, tmp_path: Path
) -> None:
    for n in range(4):
        await record(data_dir, f"storm-{n}", n)
    faults = {
        "fail_rate": 0.3,
        "reset_rate": 0.1,
        "status_sequence": [429, 500, 0, 429],
        "retry_after_s": 0.05,
        "seed": 7,
    }
    with running_dev_server(tmp_path, strict_order=True, **faults) as server:
        drainer = Drainer(data_dir, KEY, server.base_url, QUICK)
        report = await drainer.run_once(budget_s=120)
        assert report.complete, str(report)
        assert report.retried > 0, "the storm really hit"
        for n in range(4):
            call = assert_arrived_whole(server, data_dir, f"storm-{n}")
            chunks = len(chunk_rows(data_dir, f"storm-{n}"))
            # Each URL mint carries its attempt (a fresh URL per retry); the rest is exact.
            assert {k.split(":url:")[0] for k in call["idempotencyKeys"]} == {
                f"storm-{n}:call-started",
                f"storm-{n}:call-ended",
            } | {f"storm-{n}:chunk:{i}" for i in range(chunks)}
        statuses = {r["status"] for r in server.requests()}
        assert {200, 429, 503}.issubset(statuses)


async def test_slow_answers_and_expiring_urls_still_deliver_once(
    data_dir: Path, tmp_path: Path
) -> None:
    await record(data_dir, "slow-1")
    with running_dev_server(tmp_path, latency_ms=2000, url_ttl_s=-1, strict_order=True) as server:
        impatient = DrainPolicy(
            backoff_base_s=0.01,
            backoff_cap_s=0.05,
            max_attempts=200,
            poll_s=0.05,
            request_timeout_s=0.5,
            lease_s=1.0,  # the whole-request deadline: 0.4 s, before the per-read 0.5 s
        )
        first = await Drainer(data_dir, KEY, server.base_url, impatient).run_once(budget_s=3)
        assert first.delivered == 0 and first.pending > 0
        assert first.last_error == (
            "POST /v1/integrations/pipecat: no complete answer within 0.4 s; will retry"
        )
        server.configure(latency_ms=0)
        # The URLs stay refused for this whole drain: with QUICK's 200 attempts a fast client
        # could spend them all on one chunk within the budget and the row would go dead.
        patient = DrainPolicy(
            backoff_base_s=0.01, backoff_cap_s=0.05, max_attempts=100_000, poll_s=0.05
        )
        second = await Drainer(data_dir, KEY, server.base_url, patient).run_once(budget_s=5)
        assert second.delivered == 1 and "presigned upload URL was refused" in (
            second.last_error or ""
        )
        server.configure(url_ttl_s=900)
        third = await Drainer(data_dir, KEY, server.base_url, QUICK).run_once(budget_s=30)
        assert third.complete, str(third)
        assert_arrived_whole(server, data_dir, "slow-1")


async def test_a_budget_running_out_as_the_last_worker_finishes_never_cancels_the_caller(
    data_dir: Path, tmp_path: Path
) -> None:
    """The loop stalls past the budget in the very step where the last worker ends (a slow
    progress display here; a descheduled process or a GC pause in the field). The budget
    then expired while the drainer stopped its lease renewer, and run_once raised a bare
    CancelledError at its caller (a drain command, a bot's exit drain) instead of
    returning a report that is out of time."""
    await record(data_dir, "stall-1")
    budget_s = 0.3
    failing_fast = DrainPolicy(backoff_base_s=0.001, backoff_cap_s=0.001)
    with running_dev_server(tmp_path, fail_rate=1.0) as server:
        for _ in range(3):
            stall = LoopStall(until=time.monotonic() + budget_s + 0.7)
            drainer = Drainer(data_dir, KEY, server.base_url, failing_fast, stall)
            report = await drainer.run_once(budget_s=budget_s)
            assert stall.after_retries == [1], "the loop stalled after one failed attempt"
            assert report.out_of_time and report.delivered == 0 and report.pending > 0


class LoopStall:
    """A progress callback that blocks the event loop once, until ``until`` (monotonic):
    the first row outcome reported is followed by the worker's last step."""

    def __init__(self, until: float) -> None:
        self.until = until
        self.after_retries: list[int] = []

    def __call__(self, report: DrainReport) -> None:
        if not self.after_retries:
            self.after_retries.append(report.retried)
            time.sleep(max(0.0, self.until - time.monotonic()))


async def test_a_refused_key_pauses_without_loss_and_resumes_when_fixed(
    data_dir: Path, tmp_path: Path, logs: LogCapture
) -> None:
    await record(data_dir, "auth-1")
    with running_dev_server(tmp_path, accepted_keys=["someone-else"], strict_order=True) as server:
        paused = await Drainer(data_dir, KEY, server.base_url, QUICK).run_once()
        again = await Drainer(data_dir, KEY, server.base_url, QUICK).run_once()
        assert paused.paused and again.paused and paused.delivered == 0
        assert set(delivery_states(data_dir).values()) == {"pending"}, "nothing dead, nothing lost"
        with sqlite3.connect(data_dir / "wal.sqlite") as conn:
            assert conn.execute("SELECT attempts FROM deliveries").fetchall() == [(0,)] * len(
                delivery_states(data_dir)
            )
            assert [r[0] for r in conn.execute("SELECT key_fp FROM paused_keys")] == [paused_fp()]
        [line] = logs.matching("Roark refused the API key")
        assert "deliveries for it are paused" in line and KEY not in line

        server.configure(accepted_keys=[KEY])
        fixed = await Drainer(data_dir, KEY, server.base_url, QUICK).run_once()
        assert fixed.complete and not fixed.paused
        assert_arrived_whole(server, data_dir, "auth-1")
        with sqlite3.connect(data_dir / "wal.sqlite") as conn:
            assert conn.execute("SELECT count(*) FROM paused_keys").fetchone() == (0,)


def paused_fp() -> str:
    from pipecat_roark.config import key_fingerprint

    fp = key_fingerprint(KEY)
    assert fp is not None
    return fp


async def test_a_permanent_refusal_makes_a_dead_row_with_its_reason(
    data_dir: Path, tmp_path: Path
) -> None:
    await record(data_dir, "a-bad")
    await record(data_dir, "b-good", 1)
    one_at_a_time = DrainPolicy(concurrency=1, backoff_base_s=0.01, backoff_cap_s=0.05)
    # Not strict: call-started is refused for good, and the rest of the call still goes.
    with running_dev_server(tmp_path, status_sequence=[400]) as server:
        report = await Drainer(data_dir, KEY, server.base_url, one_at_a_time).run_once()
        assert report.dead == 1 and report.dead_total == 1 and not report.complete
        with sqlite3.connect(data_dir / "wal.sqlite") as conn:
            dead = conn.execute(
                "SELECT idempotency_key, last_error FROM deliveries WHERE state = 'dead'"
            ).fetchall()
        assert [k for k, _ in dead] == ["a-bad:call-started"]
        assert dead[0][1].startswith("POST /v1/integrations/pipecat: HTTP 400: ")
        assert "injected 400" in dead[0][1]
        assert_arrived_whole(server, data_dir, "b-good")
        assert server.call("a-bad")["callEnded"] is not None, "the rest of the call still went"


async def test_a_missing_chunk_file_is_dead_and_the_rest_of_the_call_goes(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    await record(data_dir, "gap-1")
    with sqlite3.connect(data_dir / "wal.sqlite") as conn:
        (path,) = conn.execute(
            "SELECT path FROM chunks WHERE call_id = 'gap-1' AND idx = 1"
        ).fetchone()
    conn.close()
    (data_dir / path).unlink()
    report = await Drainer(data_dir, KEY, dev_server.base_url, QUICK).run_once()
    assert report.dead == 1
    with sqlite3.connect(data_dir / "wal.sqlite") as conn:
        assert conn.execute(
            "SELECT last_error FROM deliveries WHERE state = 'dead'"
        ).fetchone() == (f"chunk file missing: {data_dir / path}",)
    conn.close()
    call = dev_server.call("gap-1")
    with sqlite3.connect(data_dir / "wal.sqlite") as conn:
        stored = dict(conn.execute("SELECT idx, sha256 FROM chunks WHERE call_id = 'gap-1'"))
    conn.close()
    assert len(stored) >= 3, "a chunk after the gap"
    assert call["callEnded"] is not None
    assert {int(i): c["sha256"] for i, c in call["chunks"].items()} == {
        i: sha for i, sha in stored.items() if i != 1
    }, "every chunk but the missing one arrived, byte for byte"


async def test_calls_of_another_key_are_skipped_and_reported(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    await record(data_dir, "mine")
    await record(data_dir, "theirs", key="another-key")
    await record(data_dir, "keyless", key=None)
    report = await Drainer(data_dir, KEY, dev_server.base_url, QUICK).run_once()
    assert report.skipped_calls == ["theirs"]
    assert sorted(c["pipecatCallId"] for c in dev_server.calls()) == ["keyless", "mine"]


async def test_ensure_background_drainer_is_one_per_process_and_stops_bounded(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    await record(data_dir, "bg-1")
    ensure_background_drainer(data_dir, KEY, dev_server.base_url)
    ensure_background_drainer(data_dir, KEY, dev_server.base_url)
    try:
        ended = await asyncio.to_thread(
            dev_server.wait_until, lambda: any(c["ended"] for c in dev_server.calls())
        )
        assert ended
    finally:
        await stop_background_drainers(5)
    assert_arrived_whole(dev_server, data_dir, "bg-1")
    assert sum(1 for t in asyncio.all_tasks() if "pipecat-roark-drainer" in t.get_name()) == 0
    assert writer_for(data_dir).flush_sync(5)


async def test_run_once_keeps_its_budget_while_every_row_fails_fast(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    await record(data_dir, "fast-fail")
    dev_server.configure(fail_rate=1.0)  # every request: 503, due again at once
    eager = DrainPolicy(backoff_base_s=0.0, backoff_cap_s=0.0, max_attempts=10**9)
    drainer = Drainer(data_dir, KEY, dev_server.base_url, eager)
    # 60 s only detects a drain that never returns; the budget is 0.5 s.
    report = await asyncio.wait_for(drainer.run_once(budget_s=0.5), timeout=60)
    assert report.delivered == 0 and report.retried > 0
    assert report.pending == len(delivery_states(data_dir)), "nothing lost, nothing dead"


async def test_chunks_wait_for_call_started_and_call_ended_waits_for_every_chunk(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    await record(data_dir, "order-1")
    # One request at a time, so the sequence is known: call-started is refused once, then
    # the first chunk's URL, which may come back only after a second (Retry-After) while
    # the other chunks go. A drainer that sent a chunk before call-started, or call-ended
    # before that chunk, would be refused (409) by the strict server.
    dev_server.configure(status_sequence=[503, 200, 429], retry_after_s=1.0)
    one_by_one = DrainPolicy(
        concurrency=1, claim_batch=1, backoff_base_s=0.01, backoff_cap_s=0.05, poll_s=0.05
    )
    report = await Drainer(data_dir, KEY, dev_server.base_url, one_by_one).run_once(budget_s=60)
    assert report.complete and report.retried == 2, str(report)
    assert_arrived_whole(dev_server, data_dir, "order-1")  # in order, nothing refused


async def test_a_backlog_is_delivered_by_several_workers_at_once(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    # One worker starts and the rest join once a claim comes back full. The server holds
    # the first three requests until all three are in flight (else 30 s): a drainer that
    # never brought in more workers would run out of its 20 s with the backlog undelivered.
    for n in range(12):
        await record(data_dir, f"backlog-{n}", n)
    dev_server.configure(rendezvous=3)
    report = await Drainer(data_dir, KEY, dev_server.base_url, QUICK).run_once(budget_s=20)
    assert report.complete and not report.out_of_time, str(report)
    for n in range(12):
        assert_arrived_whole(dev_server, data_dir, f"backlog-{n}")
