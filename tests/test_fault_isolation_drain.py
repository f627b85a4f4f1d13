"""One bad row, id or answer touches only itself (issue 10, the drainer half).

Calls are recorded through real pipelines, stored data is damaged in the real SQLite
file, and everything is delivered over 127.0.0.1 to the dev server, which also plays the
misbehaving Roark (redirects, unusable upload URLs, answers that trickle in).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from devserver_fixture import RunningDevServer, running_dev_server
from pipecat_roark import faultpoints
from pipecat_roark.drain import Drainer
from pipecat_roark.events import Event, decode_event
from pipecat_roark.lifecycle import close_all_writers
from pipecat_roark.timeline import assemble_call_ended, assemble_call_started
from pipecat_roark.wire import encode
from test_cli import cli, cli_env, cli_json, sql
from test_drain import KEY, QUICK, assert_arrived_whole, record

pytestmark = pytest.mark.anyio

EVENT_PATH = "/v1/integrations/pipecat"


def states(directory: Path, call_id: str) -> dict[str, tuple[str, int, str | None]]:
    """kind[:idx] → (state, attempts, last_error) of one call's rows."""
    rows = sql(
        directory,
        "SELECT kind, chunk_idx, state, attempts, last_error FROM deliveries WHERE call_id = ?",
        call_id,
    )
    return {
        (kind if idx is None else f"{kind}:{idx}"): (state, attempts, error)
        for kind, idx, state, attempts, error in rows
    }


def decodable(directory: Path, call_id: str) -> tuple[list[Event], list[tuple[int, str]]]:
    """The call's events that decode, and (row id, error) of those that do not."""
    events: list[Event] = []
    bad: list[tuple[int, str]] = []
    for row_id, body in sql(
        directory, "SELECT id, body FROM events WHERE call_id = ? ORDER BY id", call_id
    ):
        try:
            events.append(decode_event(body))
        except Exception as exc:
            bad.append((row_id, str(exc)))
    return events, bad


def damage_event(directory: Path, call_id: str, kind_tag: bytes, body: bytes) -> int:
    """Overwrite the body of the call's first event whose msgpack holds ``kind_tag``."""
    conn = sqlite3.connect(directory / "wal.sqlite")
    try:
        for row_id, old in conn.execute(
            "SELECT id, body FROM events WHERE call_id = ? ORDER BY id", (call_id,)
        ).fetchall():
            if kind_tag in old:
                conn.execute("UPDATE events SET body = ? WHERE id = ?", (body, row_id))
                conn.commit()
                return int(row_id)
    finally:
        conn.close()
    raise AssertionError(f"no {kind_tag!r} event in {call_id}")


# ---- finding 1: damaged stored events ----


async def test_an_undecodable_event_is_left_out_and_the_rest_of_the_call_is_delivered(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    await record(data_dir, "damaged", 0)
    await record(data_dir, "intact", 1)
    close_all_writers()
    row_id = damage_event(data_dir, "damaged", b"ut", b"\xc1 not msgpack")

    done = cli(data_dir, "drain", base_url=dev_server.base_url)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr

    events, bad = decodable(data_dir, "damaged")
    assert [row for row, _ in bad] == [row_id]
    call = dev_server.call("damaged")
    assert call["callStarted"] == json.loads(encode(assemble_call_started("damaged", events)))
    assert call["callEnded"] == json.loads(encode(assemble_call_ended("damaged", events)))
    assert [t["content"] for t in call["callEnded"]["transcript"] if t["role"] == "user"] == []
    assert_arrived_whole(dev_server, data_dir, "intact")

    note = states(data_dir, "damaged")["call-ended"]
    assert note[0] == "delivered" and note[1] == 1
    assert note[2] is not None and note[2].startswith(
        f"salvaged: 1 of {len(events) + 1} stored events did not decode"
    )

    status = cli_json(data_dir, "status", expect=1)
    assert status["healthy"] is False
    assert status["damagedCalls"] == ["damaged"]
    assert status["reasons"] == [
        "1 call(s) with stored events that do not decode: see `pipecat-roark show <id>`"
    ]
    shown = cli(data_dir, "show", "damaged")
    assert shown.returncode == 0, shown.stderr
    assert "1 stored event(s) do not decode" in shown.stdout
    detail = cli_json(data_dir, "show", "damaged")
    assert detail["damage"]["undecodableEvents"] == [{"eventRow": row_id, "error": bad[0][1]}]
    doctor = cli_json(data_dir, "doctor", "--offline", expect=1)
    assert {
        "check": "stored events",
        "ok": False,
        "detail": "1 event(s) of 1 call(s) do not decode: damaged",
    } in doctor


async def test_a_call_whose_open_event_is_lost_goes_dead_with_the_reason_and_health_says_so(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    await record(data_dir, "headless", 0)
    await record(data_dir, "fine", 1)
    close_all_writers()
    damage_event(data_dir, "headless", b"open", b"\x92\x01")  # valid msgpack, not an event

    report = await Drainer(data_dir, KEY, dev_server.base_url, QUICK).run_once(budget_s=60)
    assert_arrived_whole(dev_server, data_dir, "fine")
    rows = states(data_dir, "headless")
    assert rows["call-started"] == (
        "dead",
        1,
        "cannot assemble call-started from what is stored: call 'headless' has no call-open"
        " event: nothing to assemble",
    )
    assert rows["call-ended"][0:2] == ("dead", 1)
    assert all(state == "delivered" for k, (state, _, _) in rows.items() if k.startswith("chunk"))
    assert report.dead == 2
    status = cli_json(data_dir, "status", expect=1)
    assert status["reasons"][0] == "2 dead row(s): see `pipecat-roark calls --state dead`"


@pytest.mark.parametrize("harm", ["missing", "corrupt"])
async def test_a_damaged_chunk_goes_dead_and_call_ended_still_follows_the_intact_chunks(
    data_dir: Path, dev_server: RunningDevServer, harm: str
) -> None:
    await record(data_dir, "cut", 0)
    close_all_writers()
    ((path,),) = sql(data_dir, "SELECT path FROM chunks WHERE call_id = 'cut' AND idx = 1")
    if harm == "missing":
        (data_dir / path).unlink()
        status = cli_json(data_dir, "status", expect=1)
        assert status["missingChunks"] == [{"call": "cut", "index": 1, "path": path, "size": None}]
        assert status["reasons"] == [
            "1 undelivered chunk file(s) missing or truncated: they will go dead (the rest of"
            " each call is still delivered)"
        ]
        checks = cli_json(data_dir, "doctor", "--offline", expect=1)
        assert {
            "check": "chunk files",
            "ok": False,
            "detail": f"1 undelivered chunk file(s) missing or truncated, first: {path}",
        } in checks
        reason = f"chunk file missing: {data_dir / path}"
    else:
        data = (data_dir / path).read_bytes()
        (data_dir / path).write_bytes(bytes(len(data)))  # same size, other bytes
        reason = f"chunk file corrupt (size or sha256 differs): {data_dir / path}"

    report = await Drainer(data_dir, KEY, dev_server.base_url, QUICK).run_once(budget_s=60)
    rows = states(data_dir, "cut")
    assert rows["chunk:1"] == ("dead", 1, reason)
    assert report.dead == 1 and report.pending == 0
    assert {k: v[0] for k, v in rows.items() if k != "chunk:1"} == dict.fromkeys(
        [k for k in rows if k != "chunk:1"], "delivered"
    )
    call = dev_server.call("cut")
    assert call["callEnded"] is not None
    assert sorted(int(i) for i in call["chunks"]) == [i for i in range(len(rows) - 2) if i != 1]
    assert cli_json(data_dir, "status", expect=1)["reasons"] == [
        "1 dead row(s): see `pipecat-roark calls --state dead`"
    ]


# ---- findings 2 and 5: any str is a call id ----


@pytest.mark.parametrize(
    ("call_id", "header"),
    [
        ("réunion-42", "r%C3%A9union-42"),
        ("nul\x00id", "nul%00id"),
        ("two\nlines", "two%0Alines"),
        ("50% off", "50%25%20off"),
    ],
    ids=["non-ascii", "nul", "newline", "percent-space"],
)
async def test_an_id_that_cannot_go_in_a_header_is_encoded_in_the_key_and_sent_verbatim(
    data_dir: Path, dev_server: RunningDevServer, call_id: str, header: str
) -> None:
    await record(data_dir, call_id, 0)
    await record(data_dir, "plain", 1)
    close_all_writers()
    done = cli(data_dir, "drain", base_url=dev_server.base_url)
    assert done.returncode == 0, done.stderr
    assert_arrived_whole(dev_server, data_dir, call_id)
    assert_arrived_whole(dev_server, data_dir, "plain")
    assert {attempts for _, attempts, _ in states(data_dir, call_id).values()} == {1}
    posts = [r["idempotencyKey"] for r in dev_server.requests() if r["path"] == EVENT_PATH]
    assert f"{header}:call-started" in posts and f"{header}:call-ended" in posts
    assert sql(data_dir, "SELECT DISTINCT call_id FROM deliveries WHERE call_id != 'plain'") == [
        (call_id,)
    ], "the stored id stays verbatim"


async def bot_call(directory: Path, base_url: str, call_id: str, n: int) -> None:
    """A short call recorded by a delivering bot: its own background drainer sends it."""
    from pipecat_roark import RoarkObserver
    from pipecat_roark.testing import ScriptedCall, run_pipeline
    from test_drain import short_script

    roark = RoarkObserver(
        agent_id="bot",
        api_key=KEY,
        base_url=base_url,
        pipecat_call_id=call_id,
        data_dir=directory,
        chunk_bytes=8000,
        exit_drain_s=0,  # the background drainer is under test; no exit drain at pytest's exit
    )
    await run_pipeline([ScriptedCall(short_script(n)), roark.audio_processor], observers=[roark])  # type: ignore[arg-type]


async def test_the_bots_background_drainer_delivers_an_odd_id_and_the_next_call(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    from pipecat_roark.background_drainer import stop_background_drainers

    for n, call_id in enumerate(["réunion-42", "after-it"]):
        await bot_call(data_dir, dev_server.base_url, call_id, n)
    try:
        for _ in range(600):  # bounded: both calls delivered by the bot's own drainer
            left = await asyncio.to_thread(
                sql, data_dir, "SELECT count(*) FROM deliveries WHERE state != 'delivered'"
            )
            if left == [(0,)]:
                break
            await asyncio.sleep(0.05)
    finally:
        await stop_background_drainers()
    assert_arrived_whole(dev_server, data_dir, "réunion-42")
    assert_arrived_whole(dev_server, data_dir, "after-it")


async def test_the_bots_background_drainer_outlives_a_row_that_raises_and_delivers_the_next_calls(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    from pipecat_roark.background_drainer import stop_background_drainers

    faultpoints.inject("drain:load", RuntimeError("boom"), call_id="victim")
    try:
        for n, call_id in enumerate(["victim", "next-1", "next-2"]):
            await bot_call(data_dir, dev_server.base_url, call_id, n)
        for _ in range(600):  # bounded: the later calls go out through the same drainer
            left = await asyncio.to_thread(
                sql,
                data_dir,
                "SELECT count(*) FROM deliveries WHERE call_id != 'victim' AND state != 'delivered'",
            )
            if left == [(0,)]:
                break
            await asyncio.sleep(0.05)
    finally:
        faultpoints.clear()
        await stop_background_drainers()
    assert_arrived_whole(dev_server, data_dir, "next-1")
    assert_arrived_whole(dev_server, data_dir, "next-2")
    state, attempts, error = states(data_dir, "victim")["call-started"]
    assert state == "pending" and attempts >= 1
    assert error == "RuntimeError: boom; will retry"


@pytest.mark.parametrize(
    ("patch", "reason"),
    [
        ({"contentType": "audio/pcm; é"}, "contentType 'audio/pcm; é' cannot go in an HTTP header"),
        ({"uploadUrl": "http://[::1"}, "uploadUrl 'http://[::1' does not parse"),
        ({"uploadUrl": "ftp://127.0.0.1/x"}, "is not an http(s) URL with a host"),
    ],
    ids=["content-type", "unparsable-url", "not-http"],
)
async def test_an_unusable_upload_url_answer_makes_that_chunk_dead_and_the_call_goes_on(
    data_dir: Path, dev_server: RunningDevServer, patch: dict[str, str], reason: str
) -> None:
    await record(data_dir, "odd-answer", 0)
    close_all_writers()
    dev_server.configure(upload_answer_patch=patch)
    report = await Drainer(data_dir, KEY, dev_server.base_url, QUICK).run_once(budget_s=60)
    rows = states(data_dir, "odd-answer")
    chunks = {k: v for k, v in rows.items() if k.startswith("chunk")}
    assert len(chunks) >= 2 and report.dead == len(chunks)
    for state, attempts, error in chunks.values():
        assert (state, attempts) == ("dead", 1)
        assert error is not None and error.startswith("chunk-upload-url answer unusable: ")
        assert reason in error
    assert rows["call-started"][0] == rows["call-ended"][0] == "delivered"
    call = dev_server.call("odd-answer")
    assert call["eventCounts"] == {"callStarted": 1, "callEnded": 1} and call["chunks"] == {}


# ---- finding 3: a request never outlives its lease; the budget holds ----


async def test_an_answer_that_trickles_is_cut_before_the_lease_ends_and_no_two_drainers_overlap(
    data_dir: Path, tmp_path: Path
) -> None:
    await record(data_dir, "slow-drip", 0)
    close_all_writers()
    policy = dataclasses.replace(QUICK, lease_s=2.0, request_timeout_s=1.0, max_attempts=1000)
    assert policy.request_deadline_s == 0.8
    # 12 answer bytes over 6 s: one every 0.5 s, inside the client's 1 s per-read timeout.
    with running_dev_server(tmp_path, trickle_s=6.0) as server:
        drainers = [Drainer(data_dir, KEY, server.base_url, policy) for _ in range(2)]
        reports = await asyncio.wait_for(
            asyncio.gather(*(d.run_once(budget_s=4) for d in drainers)), timeout=60
        )
        sent = [r for r in server.requests() if r["idempotencyKey"] == "slow-drip:call-started"]
        assert len(sent) >= 2, "the row was tried more than once"
        assert [r for r in server.requests() if r["overlapping"]] == [], (
            "a key was sent again while an earlier request with it was still answered"
        )
        assert all(r.out_of_time or r.pending for r in reports)
        state, attempts, error = states(data_dir, "slow-drip")["call-started"]
        # Each request cut at the deadline is an attempt; one cut by a drain's budget is not.
        assert state == "pending" and len(sent) - len(drainers) <= attempts <= len(sent)
        assert error == f"POST {EVENT_PATH}: no complete answer within 0.8 s; will retry"

        server.configure(trickle_s=0.0)
        done = await Drainer(data_dir, KEY, server.base_url, QUICK).run_once(budget_s=60)
        assert done.complete, str(done)
        assert_arrived_whole(server, data_dir, "slow-drip")


async def test_drain_timeout_is_honoured_while_an_answer_trickles(
    data_dir: Path, tmp_path: Path
) -> None:
    await record(data_dir, "stuck", 0)
    close_all_writers()
    # 12 bytes over 240 s: one every 20 s, inside the default 30 s per-read timeout.
    with running_dev_server(tmp_path, trickle_s=240.0) as server:
        done = subprocess.run(  # the timeout is a hang guard: old drains ran for minutes
            [sys.executable, "-m", "pipecat_roark.cli", "drain", "--timeout", "2"],
            capture_output=True,
            text=True,
            env=cli_env(data_dir, server.base_url),
            timeout=90,
            check=False,
        )
        assert done.returncode == 1
        assert "stopped at the time budget (run drain again to go on)" in done.stdout
        assert states(data_dir, "stuck")["call-started"][0] == "pending", "lease handed back"


# ---- finding 4: a redirect is retried ----


async def test_a_redirect_is_retried_not_dead(data_dir: Path, dev_server: RunningDevServer) -> None:
    await record(data_dir, "moved", 0)
    close_all_writers()
    dev_server.configure(status_sequence=[301, 307, 308])
    report = await Drainer(data_dir, KEY, dev_server.base_url, QUICK).run_once(budget_s=60)
    assert report.complete and report.retried == 3, str(report)
    assert states(data_dir, "moved")["call-started"] == ("delivered", 4, None)
    assert_arrived_whole(dev_server, data_dir, "moved")


# ---- every step of the drainer, an arbitrary exception on one call's row ----

# The steps of delivering a row (finalizing an orphan is not one: tests/test_owner.py covers it).
STEPS = [p for p in faultpoints.POINTS if p.startswith("drain:") and p != "drain:finalize-orphan"]
EXCEPTIONS: list[BaseException] = [
    RuntimeError("boom"),
    KeyError("missing"),
    UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
    MemoryError("no room"),
    OSError(errno.EIO, "Input/output error"),
    sqlite3.OperationalError("database is locked"),
    ZeroDivisionError("division by zero"),
]
SEED = int(os.environ.get("PIPECAT_ROARK_FAULT_SEED", "10"))
"""Which exception each step gets; set the variable to try other draws."""


@pytest.fixture(scope="module")
def three_calls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Three calls recorded once through real pipelines; each test drains a copy."""
    directory = tmp_path_factory.mktemp("three") / "roark"

    async def record_all() -> None:
        for n, call_id in enumerate(["victim", "bystander-1", "bystander-2"]):
            await record(directory, call_id, n)

    asyncio.run(record_all())
    close_all_writers()
    yield directory


@pytest.mark.parametrize("step", STEPS)
async def test_an_exception_at_any_drain_step_touches_only_its_own_call(
    three_calls: Path, data_dir: Path, tmp_path: Path, step: str
) -> None:
    shutil.copytree(three_calls, data_dir)
    exc = random.Random(f"{SEED}:{step}").choice(EXCEPTIONS)
    policy = dataclasses.replace(QUICK, max_attempts=4)
    with running_dev_server(tmp_path) as server:
        faultpoints.inject(step, exc, call_id="victim")
        try:
            report = await Drainer(data_dir, KEY, server.base_url, policy).run_once(budget_s=60)
        finally:
            faultpoints.clear()
        for bystander in ("bystander-1", "bystander-2"):
            assert_arrived_whole(server, data_dir, bystander)
        rows = states(data_dir, "victim")
        failed = {k: v for k, v in rows.items() if v[0] != "delivered"}
        assert failed, f"{step} was reached for the victim"
        for state, attempts, error in failed.values():
            assert error is not None and type(exc).__name__ in error, error
            if isinstance(exc, UnicodeError) and step != "drain:mark-delivered":
                assert (state, attempts) == ("dead", 1), "permanent: dead at once"
            else:
                assert (state, attempts) == ("dead", 4), "retryable: retried, then dead"
        assert report.dead_total == len(failed)

        # Disarmed, the victim is recovered: retry, drain, all of it arrives once.
        assert cli(data_dir, "retry", "victim").returncode == 0
        done = cli(data_dir, "drain", base_url=server.base_url)
        assert done.returncode == 0, done.stderr
        # Its dead row settled its place in the order, so the rest went on without it and
        # the retried row came later: whole, but not in Roark's order.
        assert_arrived_whole(server, data_dir, "victim", in_order=False)


async def test_a_chunk_read_held_by_a_slow_disk_holds_up_no_other_call(
    three_calls: Path, data_dir: Path, tmp_path: Path
) -> None:
    # The victim's first chunk read waits (a stalled disk under that one file) while the
    # bystanders' rows are claimed, sent and marked: the read is not on the drainer's
    # database thread, so their statements never queue behind it. A row per claim, so
    # every worker joins and none holds a bystander's row behind the victim's.
    shutil.copytree(three_calls, data_dir)
    policy = dataclasses.replace(QUICK, claim_batch=1, concurrency=4)
    gate = threading.Event()
    bystanders = ("bystander-1", "bystander-2")

    def bystanders_ended(server: RunningDevServer) -> bool:
        return {c["pipecatCallId"] for c in server.calls() if c["ended"]} >= set(bystanders)

    with running_dev_server(tmp_path) as server:
        faultpoints.inject("drain:read-chunk", faultpoints.Hold(gate), call_id="victim", times=1)
        try:
            drain = asyncio.ensure_future(
                Drainer(data_dir, KEY, server.base_url, policy).run_once(budget_s=60)
            )
            # Bounded below the hold's own limit (30 s), so a held statement fails here.
            arrived = await asyncio.to_thread(
                server.wait_until, lambda: bystanders_ended(server), 20.0
            )
            victim_ended_meanwhile = server.call("victim")["callEnded"] is not None
        finally:
            gate.set()
            faultpoints.clear()
        report = await drain
        assert arrived, "the bystanders arrived while the victim's chunk read was held"
        assert not victim_ended_meanwhile, "the victim's end waited for its held chunk"
        assert report.complete, str(report)
        for call_id in ("victim", *bystanders):
            assert_arrived_whole(server, data_dir, call_id)
