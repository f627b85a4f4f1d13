"""``status``, ``calls`` and ``show``: read-only views of the queue, rendered as tables or JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.table import Table

from ..store import now_us
from ..wire import key_label
from .group import common_options, main, parse_since, reading
from .present import emit_json, fail, format_age, format_mb, out, shown, styled


@main.command()
@common_options
@click.option(
    "--max-age",
    help="Unhealthy (exit 1) if a row has waited this long past its due time without an"
    " attempt (default 15m: no drainer is working).",
)
def status(directory: Path, as_json: bool, max_age: str | None) -> None:
    """Queue depth by state, oldest pending age, bytes on disk, dead rows, paused keys.

    Exits 1, with the reasons, when a row is dead, stored events do not decode, a key is
    paused, or a row has waited past its due time longer than --max-age without an
    attempt: usable as a health check with no flags.

    \b
    Example:
        pipecat-roark status
        pipecat-roark status --json --max-age 1h
    """
    from ..inspection import DEFAULT_MAX_OVERDUE_S, queue_status
    from ..maintenance import parse_duration

    limit = DEFAULT_MAX_OVERDUE_S if max_age is None else parse_duration(max_age)
    with reading(directory) as conn:
        data = queue_status(conn, directory, now=now_us(), max_overdue_s=limit)
    age = data["oldestPendingAgeS"]
    healthy = data["healthy"]
    if as_json:
        emit_json(data)
    else:
        table = Table(title=f"pipecat-roark queue in {shown(directory)}", show_header=True)
        table.add_column("kind")
        for state in ("pending", "leased", "delivered", "dead"):
            table.add_column(state, justify="right")
        for kind, counts in data["byKind"].items():
            table.add_row(
                shown(kind), *(str(counts[s]) for s in ("pending", "leased", "delivered", "dead"))
            )
        out.print(table)
        out.print(
            f"calls: {data['calls']['open']} open, {data['calls']['ended']} ended · "
            f"oldest pending: {format_age(age)} · audio on disk: {format_mb(data['chunkBytes'])} "
            f"({format_mb(data['undeliveredChunkBytes'])} undelivered) · database: {format_mb(data['databaseBytes'])}"
        )
        for paused in data["pausedKeys"]:
            out.print(
                styled(f"paused key {shown(paused['keyFingerprint'])}", "red"),
                f"since {shown(paused['pausedAt'])}: {shown(paused['reason'])}",
            )
        if data["lastError"]:
            last = data["lastError"]
            out.print(f"last error ({shown(last['key'])}): {shown(last['error'])}")
        out.print(styled("healthy", "green") if healthy else styled("unhealthy", "red"))
        for reason in data["reasons"]:
            out.print(f"  {shown(reason)}")
    sys.exit(0 if healthy else 1)


@main.command()
@common_options
@click.option(
    "--state",
    type=click.Choice(["open", "pending", "delivered", "dead"]),
    help="Only calls in this state.",
)
@click.option("--agent", help="Only calls of this agent id.")
@click.option("--since", help="Only calls started since: a duration (2h, 7d) or an ISO date.")
@click.option("--limit", type=int, default=50, show_default=True, help="Show at most this many.")
def calls(
    directory: Path,
    as_json: bool,
    state: str | None,
    agent: str | None,
    since: str | None,
    limit: int,
) -> None:
    """A table of calls: id, agent, started, duration, state, chunks delivered/total, last error.

    \b
    Example:
        pipecat-roark calls --state dead
        pipecat-roark calls --agent support-bot --since 2h --json
    """
    from ..inspection import list_calls

    since_us = None if since is None else parse_since(since)
    with reading(directory) as conn:
        rows = list_calls(conn, state=state, agent=agent, since_us=since_us, limit=limit)
    if as_json:
        emit_json(rows)
        return
    table = Table(show_header=True)
    for column in ("id", "agent", "started", "duration", "state", "chunks", "last error"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            shown(row["id"]),
            shown(row["agentId"]),
            row["startedAt"][:19].replace("T", " "),
            "-" if row["durationS"] is None else f"{row['durationS']:.1f}s",
            shown(row["state"]),
            f"{row['chunksDelivered']}/{row['chunksTotal']}",
            shown(row["lastError"] or ""),
        )
    out.print(table)


@main.command()
@common_options
@click.argument("call_id")
def show(directory: Path, as_json: bool, call_id: str) -> None:
    """One call: its timeline, the exact payloads sent (or to be sent), each delivery's state.

    \b
    Example:
        pipecat-roark show 6f1c2a4e-...
    """
    from ..inspection import call_detail

    with reading(directory) as conn:
        detail = call_detail(conn, call_id)
    if detail is None:
        fail(f"no call {call_id!r} in {directory}; list them with `pipecat-roark calls`")
    if as_json:
        emit_json(detail)
        return
    call = detail["call"]
    out.print(
        styled(f"call {shown(call['id'])}", "bold"),
        f"· agent {shown(call['agentId'])} · {shown(call['state'])}"
        + (f" ({shown(call['endReason'])})" if call["endReason"] else "")
        + f" · started {call['startedAt']} · key {shown(call['keyFingerprint'] or 'none')}",
    )
    deliveries = Table(title="deliveries", show_header=True)
    for column in ("delivery", "state", "attempts", "next attempt", "last error"):
        deliveries.add_column(column)
    for row in detail["deliveries"]:
        deliveries.add_row(
            shown(key_label(row["key"], call_id)),
            shown(row["state"]),
            str(row["attempts"]),
            row["nextAttemptAt"] or "",
            shown(row["lastError"] or ""),
        )
    out.print(deliveries)
    undecodable = detail["damage"]["undecodableEvents"]
    if undecodable:
        out.print(
            styled("damaged:", "red"),
            f"{len(undecodable)} stored event(s) do not decode and are left out of the payloads",
        )
        for bad in undecodable:
            out.print(f"  event row {bad['eventRow']}: {shown(bad['error'])}")
    out.print(styled("timeline", "bold"))
    for event in detail["timeline"]:
        fields = {k: v for k, v in event.items() if k not in ("at", "event")}
        at = event["at"] if isinstance(event["at"], int) else event["at"][11:26]
        out.print(
            f"  {at}  {event['event']:<16} {json.dumps(fields) if fields else ''}", markup=False
        )
    if detail["payloadNote"]:
        out.print(styled(shown(detail["payloadNote"]), "yellow"))
    for name, payload in detail["payloads"].items():
        out.print(styled(name, "bold"))
        out.print_json(json.dumps(payload))
