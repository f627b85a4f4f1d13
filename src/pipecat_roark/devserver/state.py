"""What the dev server received, kept on disk so a restarted server still knows it.

Events, chunk objects, idempotency records and per-call arrival order, mirrored to
``state.json`` in its data dir.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

from aiohttp import web

from ..store import make_private_dirs
from ..wire import CallEnded, CallStarted

__all__ = ["ReceivedState", "error_response", "wav_bytes", "write_private"]


def write_private(path: Path, data: bytes) -> None:
    """Write ``path`` as 0600 whatever the umask: what the server received is call data."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


class ReceivedState:
    """What the server received, mirrored to ``state.json`` and chunk files in its data dir.

    Args:
        directory: the data dir; ``load`` is the way in, which reads what it already holds.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.calls: dict[str, dict[str, Any]] = {}
        self.idempotency: dict[str, dict[str, Any]] = {}
        self.pending_chunks: dict[str, tuple[str, int]] = {}
        self.arrivals: dict[str, list[dict[str, Any]]] = {}
        """Per call, every request that reached a handler: {"request", "status"}, in order."""
        self.dirty = False

    @classmethod
    def load(cls, directory: Path) -> ReceivedState:
        """Open the data dir (created 0700), with what an earlier run saved in ``state.json``.

        Returns:
            The state saved there, or an empty one for a new data dir.
        """
        make_private_dirs(directory)
        state = cls(directory)
        saved = directory / "state.json"
        if saved.exists():
            raw = json.loads(saved.read_text())
            state.calls = raw["calls"]
            state.idempotency = raw["idempotency"]
            state.pending_chunks = {k: (v[0], v[1]) for k, v in raw["pending_chunks"].items()}
            state.arrivals = raw.get("arrivals", {})
        return state

    def changed(self) -> None:
        """Mark for the next write (every 0.2 s and at stop), instead of writing now.

        Rewriting the whole file per request would make a large backlog quadratic.
        """
        self.dirty = True

    def write(self) -> None:
        """Save to ``state.json`` (through a 0600 temp file and a rename) if anything changed."""
        if not self.dirty:
            return
        self.dirty = False
        tmp = self.directory / "state.json.tmp"
        write_private(
            tmp,
            json.dumps(
                {
                    "calls": self.calls,
                    "idempotency": self.idempotency,
                    "pending_chunks": self.pending_chunks,
                    "arrivals": self.arrivals,
                }
            ).encode(),
        )
        tmp.replace(self.directory / "state.json")

    def reset(self) -> None:
        """Forget every call, key and arrival (``POST /_dev/reset``); chunk files stay."""
        self.calls.clear()
        self.idempotency.clear()
        self.pending_chunks.clear()
        self.arrivals.clear()
        self.changed()

    def _call(self, call_id: str) -> dict[str, Any]:
        return self.calls.setdefault(
            call_id,
            {"pipecatCallId": call_id, "callStarted": None, "callEnded": None, "chunks": {}},
        )

    def replay(self, key: str | None, body: bytes) -> web.Response | None:
        """The stored answer to a repeated Idempotency-Key, as Roark replays it.

        Returns:
            The first answer again (marked ``Idempotent-Replayed``), a 422 if the key comes
            back with a different body, or None for a key not seen (or no key).
        """
        seen = None if key is None else self.idempotency.get(key)
        if seen is None:
            return None
        seen["count"] += 1
        self.changed()
        if seen["body_sha256"] != hashlib.sha256(body).hexdigest():
            return error_response(422, "Idempotency-Key reused with a different request body")
        return web.Response(
            status=seen["status"],
            body=seen["response"].encode(),
            content_type="application/json",
            headers={"Idempotent-Replayed": "true"},
        )

    def remember(
        self, key: str | None, body: bytes, response: web.Response, *, call_id: str | None = None
    ) -> web.Response:
        """Keep ``response`` as the answer to ``key``, for ``replay`` to send again.

        Returns:
            ``response`` itself, to send now.
        """
        assert isinstance(response.body, bytes)
        if key is None:  # without a key a retry is a new request: nothing to replay
            return response
        self.idempotency[key] = {
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "status": response.status,
            "response": response.body.decode(),
            "count": 1,
        }
        if call_id is not None:  # the key may be encoded: say whose it is
            self.idempotency[key]["callId"] = call_id
        self.changed()
        return response

    def record_event(self, payload: CallStarted | CallEnded, raw: dict[str, Any]) -> None:
        """Keep an accepted event's JSON on its call, and count how often it came."""
        call = self._call(payload.pipecat_call_id)
        field_name = "callStarted" if isinstance(payload, CallStarted) else "callEnded"
        call[field_name] = raw
        call.setdefault("eventCounts", {}).setdefault(field_name, 0)
        call["eventCounts"][field_name] += 1

    def arrived(self, call_id: str, what: str, response: web.Response) -> web.Response:
        """Log that ``what`` of a call reached a handler, with the status it is answered.

        Returns:
            ``response`` itself, to send now.
        """
        self.arrivals.setdefault(call_id, []).append({"request": what, "status": response.status})
        self.changed()
        return response

    def order_problem(self, call_id: str, what: str) -> str | None:
        """Why ``what`` may not arrive now, in Roark's per-call order.

        That order is call-started, then chunks (each URL minted, then PUT), then call-ended.

        Returns:
            The reason, worded to follow the request's name, or None when it may arrive.
        """
        call = self.calls.get(call_id)
        if what == "call-started":
            return None
        if call is None or call["callStarted"] is None:
            return "arrived before its call-started"
        if call["callEnded"] is not None and what != "call-ended":
            return "arrived after its call-ended"
        if what == "call-ended":
            minted = {index for owner, index in self.pending_chunks.values() if owner == call_id}
            missing = sorted(minted - {int(i) for i in call["chunks"]})
            if missing:
                return f"arrived before chunk(s) {missing}, whose upload URLs were minted"
        return None

    def chunk_of(self, s3_key: str) -> tuple[str, int]:
        """Which chunk an object key holds.

        Returns:
            The call id and chunk index, from the minted URL or else parsed from the key.
        """
        return self.pending_chunks.get(s3_key, (s3_key.split("/")[1], int(s3_key[-10:-4])))

    def expect_chunk(self, s3_key: str, call_id: str, index: int) -> None:
        """Remember which chunk a minted upload URL's object key is for."""
        self.pending_chunks[s3_key] = (call_id, index)

    def store_chunk(self, s3_key: str, data: bytes) -> None:
        """Save a PUT chunk as a 0600 file and note its size, hash and PUT count on its call."""
        call_id, index = self.chunk_of(s3_key)
        path = self.directory / s3_key
        make_private_dirs(path.parent)
        write_private(path, data)
        chunk = self._call(call_id)["chunks"].setdefault(str(index), {"puts": 0})
        chunk.update(size=len(data), sha256=hashlib.sha256(data).hexdigest(), path=s3_key)
        chunk["puts"] += 1
        self.changed()

    def summaries(self) -> list[dict[str, Any]]:
        """One line per call for ``GET /_dev/calls``.

        Returns:
            Per call: its id, agent, whether it started and ended, its chunk indexes and
            end reason.
        """
        out = []
        for call_id, call in self.calls.items():
            ended = call["callEnded"] or {}
            out.append(
                {
                    "pipecatCallId": call_id,
                    "agentId": (call["callStarted"] or {}).get("agentId"),
                    "started": call["callStarted"] is not None,
                    "ended": call["callEnded"] is not None,
                    "chunks": sorted(int(i) for i in call["chunks"]),
                    "callEndedReason": ended.get("callEndedReason"),
                }
            )
        return out

    def wav(self, call_id: str) -> bytes:
        """A call's recording as Roark would assemble it from the chunks it received.

        Returns:
            A WAV file of the chunks in order, at the rate and channels call-ended named.

        Raises:
            LookupError: no such call, it has not ended, or a chunk is missing.
        """
        call = self.calls.get(call_id)
        if call is None:
            raise LookupError(f"no call {call_id!r}")
        ended = call["callEnded"]
        if ended is None:
            raise LookupError(f"call {call_id!r} has not ended yet")
        indexes = sorted(int(i) for i in call["chunks"])
        if indexes != list(range(len(indexes))):
            raise LookupError(f"call {call_id!r} has a gap in its chunks: {indexes}")
        pcm = b"".join(
            (self.directory / call["chunks"][str(i)]["path"]).read_bytes() for i in indexes
        )
        rate = int(ended.get("recordingSampleRate") or 16000)
        channels = int(ended.get("recordingNumChannels") or 2)
        return wav_bytes(pcm, rate, channels)


def wav_bytes(pcm: bytes, sample_rate: int, num_channels: int) -> bytes:
    """A 16-bit PCM WAV file around ``pcm``.

    Returns:
        The RIFF header followed by ``pcm`` as it is.
    """
    block = num_channels * 2
    header = b"RIFF" + struct.pack("<I", 36 + len(pcm)) + b"WAVE"
    header += b"fmt " + struct.pack(
        "<IHHIIHH", 16, 1, num_channels, sample_rate, sample_rate * block, block, 16
    )
    return header + b"data" + struct.pack("<I", len(pcm)) + pcm


def error_response(status: int, message: str, *, retry_after: float | None = None) -> web.Response:
    """A JSON ``{"error": …}`` answer, as Roark sends them (with Retry-After on 429).

    Returns:
        The response, with a Retry-After header when ``retry_after`` is given.
    """
    headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
    return web.json_response({"error": message}, status=status, headers=headers)
