"""``export``, ``retry``, ``prune``, ``forget`` and ``doctor``: an operator's hands on local data.

Each command is a call into ``maintenance`` rendered as a line or JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from .. import config
from ..errors import PipecatRoarkError
from ..store import now_us
from .group import common_options, main, reading, writing
from .present import emit_json, err, fail, format_mb, out, shown, styled


@main.command()
@common_options
@click.argument("call_id")
@click.option(
    "--wav",
    "wav_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the recording here.",
)
@click.option(
    "--payloads",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write both payloads as JSON here.",
)
def export(
    directory: Path, as_json: bool, call_id: str, wav_path: Path | None, payloads: Path | None
) -> None:
    """Rebuild a call's recording locally from its chunk files (and its payloads).

    \b
    Example:
        pipecat-roark export 6f1c2a4e-... --wav call.wav --payloads call.json
    """
    from ..inspection import call_detail
    from ..maintenance import export_wav, private_file

    if wav_path is None and payloads is None:
        fail("say what to export: --wav FILE and/or --payloads FILE")
    result: dict[str, Any] = {"call": call_id}
    with reading(directory) as conn:
        detail = call_detail(conn, call_id)
        if detail is None:
            fail(f"no call {call_id!r} in {directory}; list them with `pipecat-roark calls`")
        if payloads is not None:
            with private_file(payloads) as file:
                file.write((json.dumps(detail["payloads"], indent=2) + "\n").encode())
            result["payloads"] = str(payloads)
        if wav_path is not None:
            try:
                exported = export_wav(conn, directory, call_id, wav_path)
            except PipecatRoarkError as exc:
                fail(str(exc), code=1)
            result.update(
                wav=str(exported.path),
                chunks=exported.chunks,
                bytes=exported.bytes,
                sampleRate=exported.sample_rate,
                numChannels=exported.num_channels,
            )
    if as_json:
        emit_json(result)
    else:
        if "wav" in result:
            seconds = result["bytes"] / (2 * result["numChannels"] * result["sampleRate"])
            out.print(
                f"wrote {shown(result['wav'])}: {result['chunks']} chunks, {seconds:.1f} s, "
                f"{result['sampleRate']} Hz"
            )
        if "payloads" in result:
            out.print(f"wrote {shown(result['payloads'])}")


@main.command()
@common_options
@click.argument("call_id", required=False)
@click.option("--dead", "all_dead", is_flag=True, help="Retry every dead or backing-off row.")
def retry(directory: Path, as_json: bool, call_id: str | None, all_dead: bool) -> None:
    """Make dead (and backing-off) rows due again, with their attempts reset.

    \b
    Example:
        pipecat-roark retry --dead
        pipecat-roark retry 6f1c2a4e-...
    """
    from ..calls_table import call_record_state
    from ..outbox import make_due_again

    if call_id is None and not all_dead:
        fail("say what to retry: a CALL id, or --dead for every dead row")
    with writing(directory) as conn:
        if call_id is not None and call_record_state(conn, call_id) is None:
            fail(f"no call {call_id!r} in {directory}; list them with `pipecat-roark calls`")
        count = make_due_again(conn, call_id=call_id, now=now_us())
    if as_json:
        emit_json({"retried": count})
    else:
        out.print(f"{count} row(s) are due again; run `pipecat-roark drain`")


@main.command()
@common_options
@click.option(
    "--older-than",
    default="7d",
    show_default=True,
    help="Age of delivered calls to delete (90s, 12h, 7d).",
)
def prune(directory: Path, as_json: bool, older_than: str) -> None:
    """Delete delivered calls (rows and chunk files) older than --older-than.

    Only calls whose every delivery is delivered; never anything pending, dead or open.

    \b
    Example:
        pipecat-roark prune --older-than 3d
    """
    from ..maintenance import parse_duration, prune_delivered

    seconds = parse_duration(older_than)
    with writing(directory) as conn:
        result = prune_delivered(conn, directory, seconds, now=now_us())
    if as_json:
        emit_json({"calls": result.calls, "bytes": result.bytes})
    else:
        out.print(f"pruned {result.calls} delivered call(s), {format_mb(result.bytes)} of audio")


@main.command()
@common_options
@click.argument("call_id")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--force", is_flag=True, help="Erase a call that is still open too.")
def forget(directory: Path, as_json: bool, call_id: str, yes: bool, force: bool) -> None:
    """Erase one call's local data: its rows, events and chunk files, delivered or not.

    For erasure requests. What Roark already received is not touched (ask Roark for
    that). Asks for confirmation unless --yes; an open call needs --force.

    \b
    Example:
        pipecat-roark forget 6f1c2a4e-...
        pipecat-roark forget 6f1c2a4e-... --yes --json
    """
    from ..calls_table import call_record_state
    from ..maintenance import forget_call

    with writing(directory) as conn:
        found = call_record_state(conn, call_id)
        if found is None:
            fail(f"no call {call_id!r} in {directory}; list them with `pipecat-roark calls`")
        if not yes:
            if not sys.stdin.isatty():
                fail(f"forget erases call {call_id!r} for good: pass --yes to confirm")
            click.confirm(
                f"Erase call {call_id!r} ({found}) and its recording from {directory}?",
                abort=True,
            )
        result = forget_call(conn, directory, call_id, force=force)
    if as_json:
        emit_json(
            {
                "forgotten": result.call_id,
                "state": result.state,
                "rows": result.rows,
                "bytes": result.bytes,
            }
        )
    else:
        out.print(
            f"erased call {shown(result.call_id)}: {result.rows} row(s), {format_mb(result.bytes)} of audio"
        )


@main.command()
@common_options
@click.option(
    "--repair", is_flag=True, help="Move a corrupt database aside (timestamped, never deleted)."
)
@click.option("--offline", is_flag=True, help="Skip the base URL reachability check.")
def doctor(directory: Path, as_json: bool, repair: bool, offline: bool) -> None:
    """Check the directory, database, disk, key and base URL; one line per check.

    \b
    Example:
        pipecat-roark doctor
        pipecat-roark doctor --repair
    """
    from ..doctor import doctor as run_checks
    from ..doctor import repair as move_corrupt_database_aside

    moved = move_corrupt_database_aside(directory) if repair else None
    if moved is not None:
        err.print(
            f"moved the corrupt database to {shown(moved)} (kept: `sqlite3 {shown(moved)} "
            ".recover` salvages it); a fresh one starts with the next call"
        )
    checks = run_checks(
        directory, api_key=config.resolve_api_key(None), base_url=None, reachability=not offline
    )
    if as_json:
        emit_json([{"check": c.name, "ok": c.ok, "detail": c.detail} for c in checks])
    else:
        for check in checks:
            mark = styled("✓", "green") if check.ok else styled("✗", "red")
            out.print(mark, f"{check.name}: {shown(check.detail)}")
    sys.exit(0 if all(c.ok for c in checks) else 1)
