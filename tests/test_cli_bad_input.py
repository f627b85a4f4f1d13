"""Bad input to the CLI: one clear line on stderr, the documented exit code, no traceback,
and nothing on disk changed or lost."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from pipecat_roark.store import connect
from test_cli import cli
from test_drain import record

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
