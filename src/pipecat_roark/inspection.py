"""Read-only views of the WAL for the CLI: queue status and health, calls, one call in full.

Plain dicts of plain values, so ``--json`` prints exactly what the tables show. Every
query runs on a connection opened with ``PRAGMA query_only``: looking never writes.
The health decision lives here, not in the CLI, so every caller judges alike. The
statements are the tables' owners' (``calls_table``, ``events_table``, ``chunks_table``,
``paused_keys``, ``outbox``): this module composes and shapes what they read.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import msgspec

from . import calls_table, chunks_table, paused_keys
from .events import decode_event
from .events_table import bodies_to_check, read_events
from .outbox import (
    call_deliveries,
    calls_delivered_with_note,
    counts_by_kind_and_state,
    earliest_untouched_due_at,
    last_undelivered_error,
    oldest_queued_at,
    undelivered_audio_bytes,
    undelivered_chunk_files,
)
from .store import DB_NAME
from .timeline import (
    DEFAULT_RECOVERY_REASON,
    assemble_call_ended,
    assemble_call_started,
    iso,
)
from .wire import encode

__all__ = [
    "DEFAULT_MAX_OVERDUE_S",
    "SALVAGE_NOTE",
    "call_detail",
    "damaged_calls",
    "health",
    "missing_chunks",
    "list_calls",
    "queue_status",
]

STATES = ("pending", "leased", "delivered", "dead")

DEFAULT_MAX_OVERDUE_S = 15 * 60.0
"""A row due this long ago and still not attempted means no drainer is working."""

SALVAGE_NOTE = "salvaged:"
"""How the drainer's note on a row delivered without its undecodable events begins."""


def damaged_calls(conn: sqlite3.Connection, *, every_call: bool = False) -> dict[str, int]:
    """Calls with stored events that do not decode, and how many.

    By default only calls whose payloads are still to be sent are decoded (bounded by
    the backlog); ``every_call`` reads every event, for ``doctor``.

    Returns:
        Call id → undecodable events, sorted by id; -1 when known only from the note a
        drain left when it delivered the call without them.
    """
    found: dict[str, int] = dict.fromkeys(calls_delivered_with_note(conn, SALVAGE_NOTE), -1)
    for call_id, body in bodies_to_check(conn, every_call=every_call):
        try:
            decode_event(body)
        except (msgspec.DecodeError, msgspec.ValidationError, TypeError):
            found[call_id] = max(found.get(call_id, 0), 0) + 1
    return dict(sorted(found.items()))


def missing_chunks(conn: sqlite3.Connection, directory: Path) -> list[dict[str, Any]]:
    """Undelivered chunks whose file is gone or not the recorded size.

    A cheap look: the drainer checks the sha256 when it sends, and makes such a chunk dead.

    Returns:
        One dict per such chunk: call, index, path and the size on disk (None if gone).
    """
    found = []
    for call_id, idx, path, size in undelivered_chunk_files(conn):
        try:
            actual: int | None = (directory / path).stat().st_size
        except OSError:
            actual = None
        if actual != size:
            found.append({"call": call_id, "index": idx, "path": path, "size": actual})
    return found


def health(data: dict[str, Any], *, max_overdue_s: float) -> list[str]:
    """Why ``queue_status`` data is unhealthy: the one health decision every caller shares.

    Returns:
        One line per reason, each saying what to do; empty when healthy.
    """
    reasons = []
    if data["dead"]:
        reasons.append(f"{data['dead']} dead row(s): see `pipecat-roark calls --state dead`")
    if data["damagedCalls"]:
        reasons.append(
            f"{len(data['damagedCalls'])} call(s) with stored events that do not decode:"
            " see `pipecat-roark show <id>`"
        )
    if data["missingChunks"]:
        reasons.append(
            f"{len(data['missingChunks'])} undelivered chunk file(s) missing or truncated:"
            " they will go dead (the rest of each call is still delivered)"
        )
    for paused in data["pausedKeys"]:
        reasons.append(f"deliveries paused: Roark refused the API key {paused['keyFingerprint']}")
    overdue = data["overdueS"]
    if overdue is not None and overdue > max_overdue_s:
        reasons.append(
            f"a row has waited {overdue:.0f} s past its due time without an attempt (limit"
            f" {max_overdue_s:g} s): is a drainer running? (`pipecat-roark drain`)"
        )
    return reasons


def queue_status(
    conn: sqlite3.Connection,
    directory: Path,
    *,
    now: int,
    max_overdue_s: float = DEFAULT_MAX_OVERDUE_S,
    scan_damage: bool = True,
) -> dict[str, Any]:
    """Counts, sizes and the health verdict (``healthy``, ``reasons``).

    ``scan_damage=False`` skips decoding the events of undelivered calls and looking at
    their chunk files (what a metrics scrape, many times a minute, must not pay for); the
    verdict then rests on the counts alone.

    Returns:
        The status as ``status --json`` prints it (camelCase keys), with ``reasons`` and
        ``healthy``.
    """
    by_state = dict.fromkeys(STATES, 0)
    by_kind: dict[str, dict[str, int]] = {
        k: dict.fromkeys(STATES, 0) for k in ("call-started", "chunk", "call-ended")
    }
    for kind, state, count in counts_by_kind_and_state(conn):
        by_state[state] += count
        by_kind[kind][state] = count
    calls = calls_table.counts_by_state(conn)
    oldest = oldest_queued_at(conn)
    chunk_bytes = chunks_table.bytes_on_disk(conn)
    undelivered_bytes = undelivered_audio_bytes(conn)
    last_error = last_undelivered_error(conn)
    paused = [
        {"keyFingerprint": fp, "pausedAt": iso(at), "reason": reason}
        for fp, at, reason in paused_keys.paused(conn)
    ]
    overdue = earliest_untouched_due_at(conn)
    data: dict[str, Any] = {
        "directory": str(directory),
        "deliveries": by_state,
        "byKind": by_kind,
        "calls": {"open": int(calls.get("open", 0)), "ended": int(calls.get("ended", 0))},
        "oldestPendingAgeS": None if oldest is None else round((now - oldest) / 1e6, 3),
        "chunkBytes": int(chunk_bytes),
        "undeliveredChunkBytes": int(undelivered_bytes),
        "databaseBytes": _db_bytes(directory),
        "dead": by_state["dead"],
        "pausedKeys": paused,
        "lastError": None if last_error is None else {"key": last_error[0], "error": last_error[1]},
        "overdueS": None if overdue is None or overdue > now else round((now - overdue) / 1e6, 3),
        "damagedCalls": list(damaged_calls(conn)) if scan_damage else [],
        "missingChunks": missing_chunks(conn, directory) if scan_damage else [],
    }
    data["reasons"] = health(data, max_overdue_s=max_overdue_s)
    data["healthy"] = not data["reasons"]
    return data


def _db_bytes(directory: Path) -> int:
    total = 0
    for suffix in ("", "-wal", "-shm"):
        path = directory / f"{DB_NAME}{suffix}"
        if path.exists():
            total += path.stat().st_size
    return total


def call_state(state: str, delivered: int, total: int, dead: int) -> str:
    """A call's state as the CLI shows it, from its row and its deliveries' tallies.

    Returns:
        ``open`` (still recording), ``dead`` (a row gave up), ``delivered`` (all of it)
        or ``pending``.
    """
    if state == "open":
        return "open"
    if dead:
        return "dead"
    if total and delivered == total:
        return "delivered"
    return "pending"


def list_calls(
    conn: sqlite3.Connection,
    *,
    state: str | None = None,
    agent: str | None = None,
    since_us: int | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """The calls table of ``pipecat-roark calls``, newest first, filtered.

    Returns:
        Up to ``limit`` calls, each a dict of plain values (camelCase keys).
    """
    out: list[dict[str, Any]] = []
    for row in calls_table.call_summaries(conn, agent=agent, since_us=since_us):
        (
            call_id,
            agent_id,
            agent_name,
            raw_state,
            reason,
            started,
            ended,
            delivered,
            total,
            dead,
            chunks,
            chunks_ok,
            error,
        ) = row
        derived = call_state(raw_state, delivered or 0, total or 0, dead or 0)
        if state is not None and derived != state:
            continue
        out.append(
            {
                "id": call_id,
                "agentId": agent_id,
                "agentName": agent_name,
                "state": derived,
                "endReason": reason,
                "startedAt": iso(started),
                "durationS": None if ended is None else round((ended - started) / 1e6, 3),
                "chunksDelivered": int(chunks_ok or 0),
                "chunksTotal": int(chunks or 0),
                "lastError": error,
            }
        )
        if len(out) >= limit:
            break
    return out


def call_detail(conn: sqlite3.Connection, call_id: str) -> dict[str, Any] | None:
    """One call in full for ``pipecat-roark show``: what a drain would make of it.

    Returns:
        The call's row, damage, the payloads a drain would send (or why it cannot),
        its deliveries and its event timeline; None when there is no such call.
    """
    row = calls_table.call_row(conn, call_id)
    if row is None:
        return None
    names = [
        "id",
        "agentId",
        "agentName",
        "keyFingerprint",
        "state",
        "endReason",
        "sampleRate",
        "numChannels",
        "ownerHost",
        "ownerPid",
        "startedAt",
        "endedAt",
        "heartbeatAt",
    ]
    call = dict(zip(names, row, strict=True))
    for key in ("startedAt", "endedAt", "heartbeatAt"):
        call[key] = None if call[key] is None else iso(call[key])
    stored = read_events(conn, call_id)
    timeline = []
    for event in stored.events:
        fields = msgspec.structs.asdict(event)
        timeline.append(
            {"at": _iso_or_raw(fields.pop("at")), "event": type(event).__name__, **fields}
        )
    payloads: dict[str, Any] = {}
    try:
        payloads["callStarted"] = msgspec.json.decode(
            encode(assemble_call_started(call_id, stored.events))
        )
        payloads["callEnded"] = msgspec.json.decode(
            encode(assemble_call_ended(call_id, stored.events))
        )
    except Exception as exc:  # what the drainer would make of it: shown, never a traceback
        payloads["error"] = str(exc)
    deliveries = [
        {
            "key": row.key,
            "kind": row.kind,
            "state": row.state,
            "attempts": row.attempts,
            "nextAttemptAt": iso(row.next_attempt_at) if row.state == "pending" else None,
            "lastError": row.last_error,
            "deliveredAt": None if row.delivered_at is None else iso(row.delivered_at),
        }
        for row in call_deliveries(conn, call_id)
    ]
    return {
        "call": call,
        "damage": {
            "undecodableEvents": [
                {"eventRow": row_id, "error": why} for row_id, why in stored.undecodable
            ]
        },
        "payloadNote": None
        if call["state"] == "ended"
        else f"the call has not ended: call-ended shows what a drain would send now ({DEFAULT_RECOVERY_REASON})",
        "payloads": payloads,
        "deliveries": deliveries,
        "timeline": timeline,
    }


def _iso_or_raw(at: int) -> str | int:
    """A decodable event may still hold a time no calendar has: show the number.

    Returns:
        ``at`` as ISO 8601, or the number itself.
    """
    try:
        return iso(at)
    except (ValueError, OverflowError, OSError):
        return at
