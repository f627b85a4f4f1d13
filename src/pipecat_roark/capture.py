"""Turning Pipecat frame fields into clean event values.

Frames come from third-party services: text may be huge, not a string, or hold lone
surrogates that no encoder accepts; tool arguments may not be JSON-serialisable. Each
helper returns something storable instead of raising.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

__all__ = [
    "MAX_TEXT_CHARS",
    "arguments_json",
    "call_id_problem",
    "clean_text",
    "resolve_call_id",
    "result_text",
]

MAX_TEXT_CHARS = 100_000
"""Longer text is cut (with a trailing "…"): no spoken turn is that long, a runaway one is a bug."""


def clean_text(raw: Any) -> str:
    """A str that UTF-8 can encode, at most MAX_TEXT_CHARS long.

    Returns:
        ``raw`` as text (``""`` for None), cut with "…" past the limit, lone surrogates
        replaced.
    """
    value: str = raw if isinstance(raw, str) else ("" if raw is None else str(raw))
    if len(value) > MAX_TEXT_CHARS:
        value = value[: MAX_TEXT_CHARS - 1] + "…"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def arguments_json(value: Any) -> str:
    """Tool-call arguments as Roark wants them: JSON text.

    Returns:
        Strings verbatim, None as ``{}``, anything else compact JSON (its repr if it is
        not serialisable), cleaned by ``clean_text``.
    """
    if value is None:
        return "{}"
    if isinstance(value, str):
        return clean_text(value)
    try:
        return clean_text(_compact(value))
    except (TypeError, ValueError):
        return clean_text(repr(value))


def result_text(value: Any) -> str:
    """A tool result as the text Roark stores.

    Returns:
        Strings verbatim, dicts/lists compact JSON (their repr if not serialisable),
        other scalars ``str()``, None ``""``; cleaned by ``clean_text``.
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, (dict, list, tuple)):
        try:
            return clean_text(_compact(value))
        except (TypeError, ValueError):
            return clean_text(repr(value))
    return clean_text(value)


def resolve_call_id(explicit: str | None, runner_args: Any) -> str:
    """The id a call is recorded under: the first of these that is set.

    ``pipecat_call_id``, else SmallWebRTC's ``pc_id``, else Pipecat Cloud's
    ``session_id``, else a new UUID.

    Returns:
        The call id, as text.
    """
    if explicit:
        return str(explicit)
    if runner_args is not None:
        connection = getattr(runner_args, "webrtc_connection", None)
        pc_id = getattr(connection, "pc_id", None)
        if pc_id:
            return str(pc_id)
        session_id = getattr(runner_args, "session_id", None)
        if session_id:
            return str(session_id)
    return str(uuid.uuid4())


def call_id_problem(call_id: str) -> str | None:
    """Why ``call_id`` cannot be recorded as it is, or None: every other str is stored verbatim.

    SQLite and the filesystem take any text UTF-8 can encode (NUL, newlines, ``/``,
    ``..``, any length: unsafe ids get a hashed chunk folder). A lone surrogate has no
    UTF-8 form: such an id is refused rather than altered, since a changed id would
    no longer match the caller's records.

    Returns:
        A sentence for the log when the id cannot be stored, else None.
    """
    try:
        call_id.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"it holds a lone surrogate ({call_id[exc.start]!a}) at position {exc.start}, "
            "which no database or file can store; pass a pipecat_call_id that is valid text"
        )
    return None
