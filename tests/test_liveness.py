"""Liveness across PID namespaces: what Kubernetes pods and compose files really do.

The containers of a pod share a hostname and a volume, not their pids; two containers
on one host can both be pid 1. Each test puts real processes in PID namespaces of their
own (``unshare --pid --fork --mount-proc``) on one data directory, with the dev server on
127.0.0.1 standing in for Roark, and checks that a live call is never taken for dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devserver_fixture import RunningDevServer
from pipecat_roark import call_ending, outbox
from pipecat_roark.drain import Drainer, DrainPolicy
from pipecat_roark.lifecycle import DEFAULT_EXIT_DRAIN_S
from pipecat_roark.owner import ENV_HEARTBEAT_S, ENV_ORPHAN_GRACE_S, owner_is_gone, parse_identity
from pipecat_roark.store import connect, now_us
from test_drain import KEY, assert_arrived_whole, chunk_rows, record, stored_under

HERE = Path(__file__).parent
BOT = HERE / "liveness_bot.py"
WORKER = HERE / "drain_worker.py"
LIFECYCLE_BOT = HERE / "lifecycle_bot.py"
TURNS = ["Hello, thanks for calling.", "I need to change my address.", "Sure, what is the new one?"]
TURNS += ["Ten Main Street.", "Done. Anything else?", "No, bye.", "Goodbye!"]
REASON = "customer-ended-call"
HEARTBEAT_S = "0.3"
GRACE_S = 3.0


def _unshare_refusal() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    try:
        done = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", "true"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed: {exc}"
    if done.returncode != 0:
        return f"new PID namespaces are not permitted here: {done.stderr.strip()}"
    return None


pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or _unshare_refusal() is not None,
    reason=f"needs Linux PID namespaces: {_unshare_refusal()}",
)


def env(directory: Path, base_url: str | None) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("ROARK_", "PIPECAT_ROARK"))}
    out |= {
        "PIPECAT_ROARK_DIR": str(directory),
        ENV_HEARTBEAT_S: HEARTBEAT_S,
        ENV_ORPHAN_GRACE_S: str(GRACE_S),
    }
    if base_url is not None:
        out |= {"ROARK_API_KEY": KEY, "ROARK_BASE_URL": base_url}
    return out


def in_own_pid_namespace(
    args: list[str], environment: dict[str, str], kill_child: str = "SIGKILL"
) -> subprocess.Popen[str]:
    """``args`` as pid 1 of a new PID namespace (same hostname, same filesystem)."""
    return subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", f"--kill-child={kill_child}", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )


def bot(directory: Path, call_id: str, end: str, base_url: str | None) -> subprocess.Popen[str]:
    return in_own_pid_namespace(
        [sys.executable, str(BOT), str(directory), call_id, end, "30"], env(directory, base_url)
    )


def wait_started(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "started", f"the bot did not start its call: {line!r}"


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, out, err


def stop(proc: subprocess.Popen[str], sig: int) -> tuple[int, str, str]:
    """Signal what unshare started (unshare itself ignores SIGTERM) and collect it."""
    os.kill(child_pid(proc), sig)
    return finish(proc)


def cleanup(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, AssertionError):
            os.kill(child_pid(proc), signal.SIGKILL)
        proc.kill()
        proc.wait(30)


def child_pid(proc: subprocess.Popen[str]) -> int:
    """The pid, as this namespace sees it, of what ``unshare --fork`` started."""
    for _ in range(500):  # bounded: the child is forked at once
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.01)
    raise AssertionError("unshare started no child")


def call_row(directory: Path, call_id: str) -> tuple[str, str | None, int, str]:
    with sqlite3.connect(directory / "wal.sqlite") as conn:
        row = conn.execute(
            "SELECT state, end_reason, heartbeat_at, owner_token FROM calls WHERE id = ?",
            (call_id,),
        ).fetchone()
    conn.close()
    return row  # type: ignore[no-any-return]


def assert_complete(server: RunningDevServer, directory: Path, call_id: str) -> None:
    """Every turn and chunk, call-ended once and after the last chunk, its real reason."""
    with sqlite3.connect(directory / "wal.sqlite") as conn:
        rows = conn.execute(
            "SELECT idempotency_key, state, attempts, last_error, lease_owner FROM deliveries"
            " WHERE call_id = ? AND state != 'delivered'",
            (call_id,),
        ).fetchall()
    conn.close()
    assert rows == [], f"undelivered rows of {call_id}: {rows}"
    call = assert_arrived_whole(server, directory, call_id)
    ended = call["callEnded"]
    assert ended["callEndedReason"] == REASON
    assert [t["content"] for t in ended["transcript"]] == TURNS
    requests = [(r["method"], r["path"], r["idempotencyKey"]) for r in server.requests()]
    ended_at = requests.index(("POST", "/v1/integrations/pipecat", f"{call_id}:call-ended"))
    puts = [i for i, (m, p, _) in enumerate(requests) if m == "PUT" and stored_under(call_id, p)]
    chunks = {requests[i][1] for i in puts}  # a PUT may be repeated: it is idempotent
    assert len(chunks) == len(chunk_rows(directory, call_id)) >= 10
    assert max(puts) < ended_at, "call-ended went out after the last chunk"


def wait_until_ended_at_server(server: RunningDevServer, call_id: str) -> None:
    for _ in range(600):  # bounded: 120 s
        if any(c["pipecatCallId"] == call_id and c["ended"] for c in server.calls()):
            return
        time.sleep(0.2)
    raise AssertionError(f"{call_id} never reached the server's call-ended")


@pytest.fixture
def directory(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "roark"


def test_a_sidecar_in_its_own_pid_namespace_leaves_a_live_call_alone(
    directory: Path, dev_server: RunningDevServer
) -> None:
    # The bot records only (no key): the sidecar delivers, as in the compose and k8s recipes.
    recorder = subprocess.Popen(
        [sys.executable, str(BOT), str(directory), "pod-call", "end"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(directory, None),
    )
    sidecar = None
    try:
        wait_started(recorder)
        sidecar = in_own_pid_namespace(
            [sys.executable, "-m", "pipecat_roark.cli", "drain", "--follow"],
            env(directory, dev_server.base_url),
            kill_child="SIGTERM",
        )
        code, out, err = finish(recorder)
        assert code == 0, err[-3000:]
        assert json.loads(out.splitlines()[-1]) == {"steps": 10}
        wait_until_ended_at_server(dev_server, "pod-call")
    finally:
        recorder.kill()
        if sidecar is not None:
            sidecar_code, _, sidecar_err = stop(sidecar, signal.SIGTERM)
    assert sidecar_code == 0, sidecar_err[-3000:]
    assert "finalized" not in sidecar_err, sidecar_err[-3000:]
    assert call_row(directory, "pod-call")[:2] == ("ended", REASON)
    assert_complete(dev_server, directory, "pod-call")


def test_two_bots_with_one_hostname_and_both_pid_1_share_a_volume(
    directory: Path, dev_server: RunningDevServer
) -> None:
    first = bot(directory, "bot-a", "end", dev_server.base_url)
    second = None
    try:
        wait_started(first)
        second = bot(directory, "bot-b", "end", dev_server.base_url)
        wait_started(second)
        results = [finish(first), finish(second)]
    finally:
        cleanup(first)
        if second is not None:
            cleanup(second)
    for code, out, err in results:
        assert code == 0, err[-3000:]
        assert json.loads(out.splitlines()[-1]) == {"steps": 10}
    tokens = {call_row(directory, c)[3] for c in ("bot-a", "bot-b")}
    namespaces = {parse_identity(t).pid_ns for t in tokens}  # type: ignore[union-attr]
    assert len(namespaces) == 2, "each bot ran in a PID namespace of its own"
    for call_id in ("bot-a", "bot-b"):
        assert call_row(directory, call_id)[:2] == ("ended", REASON)
        assert_complete(dev_server, directory, call_id)


@pytest.mark.anyio
async def test_a_call_of_another_namespace_ends_only_after_its_heartbeat_is_stale(
    directory: Path, dev_server: RunningDevServer
) -> None:
    grace_us = int(GRACE_S * 1e6)
    owner = bot(directory, "elsewhere", "hang", None)
    try:
        wait_started(owner)
        _, _, opened_at, token = call_row(directory, "elsewhere")
        assert owner_is_gone("same-host", 1, token) is None, "not ours to judge by pid"
        # Alive in its own namespace: checked again and again for twice the grace, it
        # stays open because its heartbeat stays fresh.
        conn = connect(directory)
        try:
            for _ in range(600):  # bounded: 120 s
                assert call_ending.finalize_orphans(conn, now=now_us(), grace_us=grace_us) == []
                if call_row(directory, "elsewhere")[2] > opened_at + 2 * grace_us:
                    break
                await asyncio.sleep(0.2)
            else:
                raise AssertionError("the owner never heartbeated")
        finally:
            conn.close()
        assert call_row(directory, "elsewhere")[0] == "open"
        stop(owner, signal.SIGKILL)
    finally:
        cleanup(owner)
    last_heartbeat = call_row(directory, "elsewhere")[2]

    # Gone: two drainers look until one of them finalizes it, exactly once, not before
    # the grace has passed since the last heartbeat.
    policy = DrainPolicy(orphan_grace_s=GRACE_S, poll_s=0.05, backoff_base_s=0.01)
    finalized: list[str] = []
    for _ in range(300):  # bounded: 60 s
        reports = await asyncio.gather(
            Drainer(directory, KEY, dev_server.base_url, policy).run_once(budget_s=10),
            Drainer(directory, KEY, dev_server.base_url, policy).run_once(budget_s=10),
        )
        finalized += [c for r in reports for c in r.finalized]
        if finalized:
            break
        await asyncio.sleep(0.2)
    assert finalized == ["elsewhere"]
    state, reason, finalized_at, _ = call_row(directory, "elsewhere")
    assert (state, reason) == ("ended", "observer-lost")
    assert finalized_at - last_heartbeat >= grace_us
    call = assert_arrived_whole(dev_server, directory, "elsewhere")
    assert call["callEnded"]["callEndedReason"] == "observer-lost"
    turns = [t["content"] for t in call["callEnded"]["transcript"]]
    assert turns == TURNS[: len(turns)] and len(turns) >= 1, "what was recorded, in order"


@pytest.mark.anyio
async def test_a_live_drainer_in_another_namespace_keeps_its_leases(
    directory: Path, dev_server: RunningDevServer
) -> None:
    await record(directory, "leased-call")
    dev_server.configure(latency_ms=1000)  # its requests stay in flight, its rows leased
    worker = in_own_pid_namespace(
        [sys.executable, str(WORKER), str(directory), KEY, dev_server.base_url],
        env(directory, dev_server.base_url),
    )
    try:
        leases: list[tuple[int, str]] = []
        for _ in range(600):  # bounded: 60 s
            leases = leased(directory)
            if leases:
                break
            await asyncio.sleep(0.1)
        assert leases, "the drainer never claimed a row"
        conn = connect(directory)
        try:
            assert outbox.release_dead_owners(conn) == 0
        finally:
            conn.close()
        still = dict(leased(directory))
        assert all(still.get(row) == owner for row, owner in leases if row in still)
        assert still, "its leases are still its own"
        code, out, err = finish(worker)
    finally:
        cleanup(worker)
    assert code == 0, err[-3000:]
    assert json.loads(out.splitlines()[-1])["pending"] == 0
    posts: dict[str, int] = {}
    for request in dev_server.requests():
        if request["method"] == "POST":
            posts[request["idempotencyKey"]] = posts.get(request["idempotencyKey"], 0) + 1
    assert set(posts.values()) == {1}, "nothing was sent twice"
    assert_arrived_whole(dev_server, directory, "leased-call")


def leased(directory: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(directory / "wal.sqlite") as conn:
        rows = conn.execute(
            "SELECT id, lease_owner FROM deliveries WHERE state = 'leased' ORDER BY id"
        ).fetchall()
    conn.close()
    return [(int(i), str(o)) for i, o in rows]


def test_a_bot_that_is_pid_1_of_its_container_still_leaves_on_sigterm(directory: Path) -> None:
    """As pid 1 (a container without an init) the kernel ignores a signal whose action is
    the default: re-raising SIGTERM cannot end the process, so it must leave by itself."""
    bot_pid_1 = in_own_pid_namespace(
        [sys.executable, str(LIFECYCLE_BOT), str(directory), "call-t", "default"],
        env(directory, None),
    )
    try:
        assert bot_pid_1.stdout is not None
        assert bot_pid_1.stdout.readline().strip() == "ready"
        os.kill(child_pid(bot_pid_1), signal.SIGTERM)
        try:
            bot_pid_1.wait(timeout=DEFAULT_EXIT_DRAIN_S + 10)
        except subprocess.TimeoutExpired:
            pytest.fail("pid 1 did not leave after SIGTERM")
    finally:
        cleanup(bot_pid_1)
        bot_pid_1.communicate()
    assert bot_pid_1.returncode == 128 + signal.SIGTERM
    assert call_row(directory, "call-t")[:2] == ("ended", "process-exit")
