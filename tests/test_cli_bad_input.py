"""Bad input to the CLI: one clear line on stderr, the documented exit code, no traceback,
and nothing on disk changed or lost."""

from __future__ import annotations

import hashlib
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipecat_roark import RoarkObserver
from pipecat_roark.lifecycle import close_all_writers
from pipecat_roark.store import connect
from pipecat_roark.testing import Bot, ScriptedCall, run_pipeline
from test_cli import cli, cli_env
from test_drain import KEY, record

pytestmark = pytest.mark.anyio


def one_error_line(done: object, code: int, *needles: str) -> str:
    returncode, stderr = done.returncode, done.stderr  # type: ignore[attr-defined]
    assert returncode == code, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_database(directory: Path) -> Path:
    connect(directory).close()
    return directory / "wal.sqlite"


@pytest.mark.parametrize("command", [["status"], ["calls"], ["show", "x"], ["drain"]])
def test_a_directory_with_nothing_recorded_says_so(tmp_path: Path, command: list[str]) -> None:
    done = cli(tmp_path / "nowhere", *command)
    one_error_line(done, 2, "error: no database at", "nothing has been recorded there yet")


def test_a_corrupt_database_is_reported_then_quarantined_by_doctor_never_deleted(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "roark"
    directory.mkdir(mode=0o700)
    garbage = b"this is not a database, it is what a bad disk left behind\n" * 200
    (directory / "wal.sqlite").write_bytes(garbage)

    line = one_error_line(cli(directory, "status"), 2, "is damaged or not a database")
    assert "`pipecat-roark doctor --repair`" in line
    assert (directory / "wal.sqlite").read_bytes() == garbage, "looking changed nothing"

    repaired = cli(directory, "doctor", "--repair", "--offline")
    assert "moved the corrupt database to" in repaired.stderr
    moved = list(directory.glob("wal.sqlite.corrupt-*"))
    assert len(moved) == 1 and moved[0].read_bytes() == garbage
    assert not (directory / "wal.sqlite").exists()
    assert "Traceback" not in repaired.stderr


def test_a_database_from_a_newer_version_is_refused_and_left_alone(tmp_path: Path) -> None:
    directory = tmp_path / "roark"
    db = make_database(directory)
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    before = digest(db)
    for command in (["status"], ["calls"], ["retry", "--dead"], ["prune"]):
        one_error_line(
            cli(directory, *command), 2, "has schema version 999", "upgrade pipecat-roark"
        )
    assert digest(db) == before


def test_a_foreign_database_is_refused_and_left_alone(tmp_path: Path) -> None:
    directory = tmp_path / "roark"
    directory.mkdir()
    db = directory / "wal.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO users (name) VALUES ('ada')")
    conn.commit()
    conn.close()
    before = digest(db)
    one_error_line(cli(directory, "status"), 2, "did not create", "nothing was changed")
    one_error_line(cli(directory, "prune"), 2, "did not create")
    assert digest(db) == before


@pytest.mark.parametrize(
    ("command", "needle"),
    [
        (["show", "nope"], "no call 'nope'"),
        (["export", "nope", "--wav", "x.wav"], "no call 'nope'"),
        (["retry", "nope"], "no call 'nope'"),
        (["prune", "--older-than", "a week"], "'a week' is not a duration"),
        (["status", "--max-age", "soon"], "'soon' is not a duration"),
        (["calls", "--since", "yesterday"], "--since 'yesterday'"),
        (["retry"], "say what to retry"),
        (["export", "x"], "say what to export"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    tmp_path: Path, command: list[str], needle: str
) -> None:
    directory = tmp_path / "roark"
    make_database(directory)
    one_error_line(cli(directory, *command), 2, needle)


def test_drain_without_a_key_says_which_variable_to_set(tmp_path: Path) -> None:
    directory = tmp_path / "roark"
    make_database(directory)
    one_error_line(cli(directory, "drain", key=None), 2, "set ROARK_API_KEY")


def test_a_plain_http_base_url_that_is_not_loopback_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "roark"
    make_database(directory)
    one_error_line(cli(directory, "drain", base_url="http://roark.example.com"), 2, "https")


async def test_export_with_a_missing_chunk_file_names_it_and_writes_nothing(
    data_dir: Path, tmp_path: Path
) -> None:
    await record(data_dir, "holey", 0)
    victim = sorted((data_dir / "chunks" / "holey").iterdir())[1]
    victim.unlink()
    out = tmp_path / "holey.wav"
    one_error_line(
        cli(data_dir, "export", "holey", "--wav", str(out)), 1, "chunk 1 of call 'holey'"
    )
    assert not out.exists()
    assert list(tmp_path.glob(".holey.wav*")) == [], "no half-written file left behind"


ODD = {
    "[/]": "[/agent]",
    "[bold]x": "[bold]agent",
    "[link=http://evil]y[/link]": "[link=http://evil]a[/link]",
    "esc\x1b[31mred": "agent\x1b[31m",
    ":smile: [red]": ":thumbs_up:",
}
ERROR_BODY = 'HTTP 422: {"error": "[/transcript/0] must be [bold]text[/bold] \x1b[2J"}'


def visible(text: str) -> str:
    """How the CLI shows stored text: control characters spelled out."""
    return text.replace("\x1b", "\\x1b")


def wide_cli(directory: Path, *args: str, base_url: str = "http://127.0.0.1:9") -> Any:
    """The CLI in a wide pseudo-terminal width, so table cells are not folded."""
    env = cli_env(directory, base_url) | {"COLUMNS": "400"}
    return subprocess.run(
        [sys.executable, "-m", "pipecat_roark.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )


async def record_odd_calls(directory: Path, key: str) -> None:
    for call_id, agent_id in ODD.items():
        roark = RoarkObserver(
            agent_id=agent_id,
            api_key=key,
            pipecat_call_id=call_id,
            data_dir=directory,
            deliver=False,
            chunk_bytes=8000,
        )
        await run_pipeline([ScriptedCall([Bot(["Hi."])]), roark.audio_processor], observers=[roark])
    close_all_writers()
    conn = sqlite3.connect(directory / "wal.sqlite")
    with conn:  # what a drainer stores after Roark's answer: the error body, verbatim
        conn.execute(
            "UPDATE deliveries SET state = 'dead', attempts = 1, last_error = ?"
            " WHERE idempotency_key = '[/]:call-started'",
            (ERROR_BODY,),
        )
    conn.close()


def no_crash(done: Any, code: int) -> None:
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr and "MarkupError" not in done.stderr
    assert "\x1b" not in done.stdout + done.stderr, "stored data never reaches the terminal raw"


async def test_stored_strings_are_printed_as_text_never_as_markup(data_dir: Path) -> None:
    await record_odd_calls(data_dir, KEY)

    listed = wide_cli(data_dir, "calls")
    no_crash(listed, 0)
    for call_id, agent_id in ODD.items():
        row = next(line for line in listed.stdout.splitlines() if visible(call_id) + " " in line)
        assert visible(agent_id) + " " in row
    assert visible(ERROR_BODY) in listed.stdout

    for call_id, agent_id in ODD.items():
        shown = wide_cli(data_dir, "show", call_id)
        no_crash(shown, 0)
        header = shown.stdout.splitlines()[0]
        assert header.startswith(f"call {visible(call_id)} · agent {visible(agent_id)} · ended")
    assert visible(ERROR_BODY) in wide_cli(data_dir, "show", "[/]").stdout

    status = wide_cli(data_dir, "status")
    no_crash(status, 1)  # a dead row: unhealthy, as ever
    assert f"last error ([/]:call-started): {visible(ERROR_BODY)}" in status.stdout.splitlines()


async def test_drain_prints_skipped_odd_ids_as_they_are(data_dir: Path) -> None:
    await record_odd_calls(data_dir, "rk_live_someone_else")
    drained = wide_cli(data_dir, "drain", "--timeout", "5")
    no_crash(drained, 1)
    for call_id in ODD:
        assert (
            f"skipped call {visible(call_id)}: recorded under another API key (set that key "
            "and drain again)"
        ) in drained.stderr.splitlines()


@pytest.mark.parametrize("planted", ["target", "temp"])
@pytest.mark.parametrize("option", ["--wav", "--payloads"])
async def test_export_never_writes_or_chmods_through_a_planted_symlink(
    data_dir: Path, tmp_path: Path, planted: str, option: str
) -> None:
    await record(data_dir, "call-1", 0)
    close_all_writers()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    victim.chmod(0o644)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "call.out"
    if planted == "target":
        out.symlink_to(victim)
    else:  # every name the old code would have used for its temp file
        (out_dir / ".call.out.tmp").symlink_to(victim)

    done = cli(data_dir, "export", "call-1", option, str(out))
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == "precious\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert not out.is_symlink() and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_bytes()[:4] == (b"RIFF" if option == "--wav" else b"{\n  ")
    leftovers = {p.name for p in out_dir.iterdir()} - {"call.out", ".call.out.tmp"}
    assert leftovers == set(), "no temp file left behind"
