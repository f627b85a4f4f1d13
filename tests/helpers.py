"""Helpers shared by the test modules (imported as ``from helpers import …``)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import NoReturn

import msgspec
import pytest

from pipecat_roark.events import Event, decode_event


class LogCapture:
    """A loguru sink that keeps (level, message) pairs for assertions."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str]] = []

    def __call__(self, message: object) -> None:
        record = message.record  # type: ignore[attr-defined]
        self.records.append((record["level"].name, record["message"]))

    def messages(self, level: str | None = None) -> list[str]:
        return [m for lvl, m in self.records if level is None or lvl == level]

    def matching(self, needle: str) -> list[str]:
        return [m for _, m in self.records if needle in m]


def stored_events(directory: Path, call_id: str) -> list[Event]:
    with sqlite3.connect(directory / "wal.sqlite") as conn:
        rows = conn.execute(
            "SELECT body FROM events WHERE call_id = ? ORDER BY id", (call_id,)
        ).fetchall()
    return [decode_event(body) for (body,) in rows]


def without_times(events: list[Event]) -> list[tuple[str, dict[str, object]]]:
    """Events as (type, fields) with the wall-clock time dropped: stable across runs."""
    out = []
    for event in events:
        fields = msgspec.structs.asdict(event)
        fields.pop("at")
        out.append((type(event).__name__, fields))
    return out


def has_null(value: object) -> bool:
    """A JSON value with a null anywhere in it (the wire omits absent fields instead)."""
    if value is None:
        return True
    if isinstance(value, dict):
        return any(has_null(v) for v in value.values())
    if isinstance(value, list):
        return any(has_null(v) for v in value)
    return False


def skip_outside_ci(reason: str) -> NoReturn:
    """Skip a test this machine cannot run (no root, no mounts); under ``CI=true`` fail
    instead: CI runs as root, so a skip there means the test silently stopped running."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true runs as root and must run this test", pytrace=False)
    pytest.skip(reason)
