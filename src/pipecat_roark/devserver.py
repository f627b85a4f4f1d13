"""A local Roark-compatible server: the demo's Roark and the tests' real HTTP peer.

Same paths, headers, status codes and bodies as roark-api.md, plus the object storage
behind the presigned URLs (with expiry and signatures), idempotency by key, state kept
on disk, a read API under ``/_dev`` and fault injection. It is a faithful stand-in,
not a mock: our client and drainer talk to it exactly as they talk to Roark.

It also keeps, per call, the order in which its requests arrived (``arrivals`` in
``GET /_dev/calls/{id}``), and with ``strict_order`` it refuses with 409 what arrives
out of the order Roark expects (chunks before call-started, call-ended before the
chunks whose URLs were minted, anything of a call after its call-ended): the tests
assert the per-call order directly instead of inferring it from side effects.

    pipecat-roark dev-server --port 8787 --data ./roark-dev --fail-rate 0.3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import random
import secrets
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from .store import make_private_dirs
from .wire import CallEnded, CallStarted

__all__ = ["DevServer", "Faults", "main", "serve"]

ROARK_EVENT_PATH = "/v1/integrations/pipecat"
ROARK_URL_PATH = "/v1/integrations/pipecat/chunk-upload-url"
STORAGE_PREFIX = "/_storage/"


@dataclass
class Faults:
    """What goes wrong, on purpose. Changeable at runtime through ``POST /_dev/config``."""

    fail_rate: float = 0.0
    """Fraction of requests answered 503 (seeded)."""
    latency_ms: int = 0
    status_sequence: list[int] = field(default_factory=list)
    """Statuses served to the next requests, in order, before normal service resumes."""
    reset_rate: float = 0.0
    """Fraction of requests whose connection is dropped without an answer."""
    url_ttl_s: float = 900.0
    garbage_rate: float = 0.0
    """Fraction of chunk-upload-url answers that are 200 with a truncated body."""
    retry_after_s: float = 1.0
    accepted_keys: list[str] = field(default_factory=list)
    """Empty: any non-empty key is accepted."""
    bare_url_response: bool = False
    upload_answer_patch: dict[str, Any] = field(default_factory=dict)
    """Fields that override the chunk-upload-url answer (a bad ``uploadUrl``, say)."""
    trickle_s: float = 0.0
    """Roark answers are sent a byte at a time over this many seconds (a stuck peer)."""
    seed: int = 0
    strict_order: bool = False
    """Refuse (409) requests of a call that arrive out of order, instead of accepting them."""
    rendezvous: int = 0
    """Hold the next N requests until all N are in flight (at most 30 s), then answer them:
    proves that N clients really work at the same time."""


class _Abort(Exception):
    """Drop the connection without an answer."""


class DevServer:
    """The server, in this event loop. ``async with DevServer() as s: s.base_url``."""

    def __init__(
        self, *, data_dir: Path | None = None, port: int = 0, faults: Faults | None = None
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="roark-dev-")
            data_dir = Path(self._tmp.name)
        self.data_dir = data_dir
        self.faults = faults or Faults()
        self._rng = random.Random(self.faults.seed)
        self._secret = secrets.token_bytes(32)
        self._requested_port = port
        self._runner: web.AppRunner | None = None
        self._persister: asyncio.Task[None] | None = None
        self.port = 0
        self._lock = asyncio.Lock()
        self.requests: list[dict[str, Any]] = []
        self._answering: dict[str, list[web.Request]] = {}
        """Requests by Idempotency-Key whose answer is still being sent."""
        self.answered = 0
        """Requests answered so far; ``answered_changed`` is notified after each one."""
        self.answered_changed = threading.Condition()
        self._rendezvous: list[asyncio.Event] = []
        self._state = _State.load(self.data_dir)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(ROARK_EVENT_PATH, self._event)
        app.router.add_post(ROARK_URL_PATH, self._upload_url)
        app.router.add_put(STORAGE_PREFIX + "{key:.+}", self._put)
        app.router.add_get("/_dev/calls", self._list_calls)
        app.router.add_get("/_dev/calls/{call_id}", self._get_call)
        app.router.add_get("/_dev/calls/{call_id}/recording.wav", self._recording)
        app.router.add_get("/_dev/call", self._get_call)  # ?id=: any id, "/" and ".." too
        app.router.add_get("/_dev/call/recording.wav", self._recording)
        app.router.add_get("/_dev/requests", self._list_requests)
        app.router.add_post("/_dev/config", self._configure)
        app.router.add_post("/_dev/reset", self._reset)
        app.router.add_get("/_dev/health", self._health)
        # Any call id must fit in the read API's query string: a 2,000-character id of
        # 4-byte characters is 24 KB once percent-encoded (aiohttp's default line is 8 KB).
        self._runner = web.AppRunner(app, access_log=None, max_line_size=256 * 1024)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self._requested_port)
        await site.start()
        server: Any = site._server
        self.port = int(server.sockets[0].getsockname()[1])
        self._persister = asyncio.create_task(self._persist())

    async def _persist(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            self._state.write()

    async def stop(self) -> None:
        if self._persister is not None:
            self._persister.cancel()
            self._persister = None
        self._state.write()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def __aenter__(self) -> DevServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def configure(self, **changes: Any) -> None:
        for name, value in changes.items():
            if not hasattr(self.faults, name):
                raise ValueError(f"unknown dev-server setting {name!r}")
            setattr(self.faults, name, value)
        if "seed" in changes:
            self._rng = random.Random(self.faults.seed)

    # ---- faults and auth ----

    async def _faults(self, request: web.Request, *, storage: bool) -> web.Response | None:
        faults = self.faults
        if faults.rendezvous:
            await self._meet()
        if faults.latency_ms:
            await asyncio.sleep(faults.latency_ms / 1000)
        if faults.status_sequence:
            status = faults.status_sequence.pop(0)
            if status == 0:
                raise _Abort
            if status >= 300:
                return _error(
                    status,
                    f"injected {status}",
                    retry_after=faults.retry_after_s if status == 429 else None,
                )
        if faults.reset_rate and self._rng.random() < faults.reset_rate:
            raise _Abort
        if faults.fail_rate and self._rng.random() < faults.fail_rate:
            return _error(503, "injected 503: service unavailable")
        return None

    async def _meet(self) -> None:
        """One of the next ``rendezvous`` requests: wait until all of them have arrived."""
        arrived = asyncio.Event()
        self._rendezvous.append(arrived)
        if len(self._rendezvous) >= self.faults.rendezvous:
            self.faults.rendezvous = 0
            for event in self._rendezvous:
                event.set()
            self._rendezvous = []
            return
        with contextlib.suppress(TimeoutError):  # the others never came: answer anyway
            await asyncio.wait_for(arrived.wait(), timeout=30)

    def _auth(self, request: web.Request) -> web.Response | None:
        key = request.headers.get("x-roark-api-key", "")
        bearer = request.headers.get("authorization", "")
        if not key or bearer != f"Bearer {key}":
            return _error(
                401, "missing or mismatched x-roark-api-key / authorization: Bearer headers"
            )
        if self.faults.accepted_keys and key not in self.faults.accepted_keys:
            return _error(401, "invalid API key")
        return None

    async def _guarded(
        self, request: web.Request, handler: Any, *, storage: bool = False
    ) -> web.StreamResponse:
        try:
            body = await request.read()
        except ConnectionResetError:  # the client died mid-body (a crash test killed it)
            return _error(400, "the request body was cut off")
        key = request.headers.get("Idempotency-Key")
        record: dict[str, Any] = {
            "method": request.method,
            "path": request.path,
            "idempotencyKey": key,
            "status": 0,
        }
        answering = self._answering.setdefault(key, []) if key else []
        # A lease that outlived its request shows here: a second request with the key
        # while the first one's answer is still being sent to a live connection.
        record["overlapping"] = any(_connected(r) for r in answering)
        self.requests.append(record)
        answering.append(request)
        try:
            response = await self._faults(request, storage=storage) or await handler(request, body)
            record["status"] = response.status
            if self.faults.trickle_s > 0 and not storage:
                return await self._trickle(request, response)
            return response
        except _Abort:
            if request.transport is not None:
                request.transport.abort()  # the client sees a reset connection
            return web.Response(status=500)
        finally:
            answering.remove(request)
            if key and not answering:
                self._answering.pop(key, None)
            with self.answered_changed:
                self.answered += 1
                self.answered_changed.notify_all()

    async def _trickle(self, request: web.Request, response: web.Response) -> web.StreamResponse:
        """Send the answer a byte at a time over ``trickle_s``: each byte comes well within
        any per-read timeout, the whole answer does not. Stops when the client hangs up."""
        assert isinstance(response.body, bytes)
        body = response.body
        stream = web.StreamResponse(status=response.status)
        stream.content_type = response.content_type
        stream.content_length = len(body)
        await stream.prepare(request)
        step = self.faults.trickle_s / max(1, len(body))
        try:
            for i in range(len(body)):
                started = time.monotonic()
                while time.monotonic() - started < step:
                    if not _connected(request):
                        return stream
                    await asyncio.sleep(min(0.01, step))
                await stream.write(body[i : i + 1])
            await stream.write_eof()
        except ConnectionError:  # the client hung up between two checks
            pass
        return stream

    # ---- Roark endpoints ----

    async def _event(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(request, self._handle_event)

    async def _handle_event(self, request: web.Request, body: bytes) -> web.Response:
        refused = self._auth(request)
        if refused is not None:
            return refused
        key = request.headers.get("Idempotency-Key") or None  # optional, as at Roark
        async with self._lock:
            replay = self._state.replay(key, body)
            if replay is not None:
                return replay
            try:
                payload = msgspec.json.decode(body, type=CallStarted | CallEnded)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                return self._state.remember(key, body, _error(400, f"invalid payload: {exc}"))
            call_id = payload.pipecat_call_id
            what = "call-started" if isinstance(payload, CallStarted) else "call-ended"
            refused = self._out_of_order(call_id, what)
            if refused is not None:  # not remembered: the same key may come back in order
                return self._state.arrived(call_id, what, refused)
            self._state.record_event(payload, json.loads(body))
            response = self._state.remember(
                key, body, web.json_response({"ok": True}), call_id=call_id
            )
            return self._state.arrived(call_id, what, response)

    async def _upload_url(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(request, self._handle_upload_url)

    async def _handle_upload_url(self, request: web.Request, body: bytes) -> web.Response:
        refused = self._auth(request)
        if refused is not None:
            return refused
        key = request.headers.get("Idempotency-Key") or None  # optional, as at Roark
        async with self._lock:
            replay = self._state.replay(key, body)
            if replay is not None:
                return replay
            try:
                asked = json.loads(body)
                call_id = str(asked["pipecatCallId"])
                index = int(asked["chunkIndex"])
                content_type = str(asked.get("contentType", "audio/pcm"))
                if index < 0:
                    raise ValueError("chunkIndex must be >= 0")
            except (ValueError, KeyError, TypeError) as exc:
                return self._state.remember(
                    key, body, _error(400, f"invalid chunk-upload-url request: {exc}")
                )
            refused = self._out_of_order(call_id, f"url:{index}")
            if refused is not None:
                return self._state.arrived(call_id, f"url:{index}", refused)
            s3_key = f"pipecat/{_object_name(call_id)}/{index:06d}.pcm"
            expires = int(time.time() + self.faults.url_ttl_s)
            sig = self._sign(s3_key, expires, content_type)
            data = {
                "uploadUrl": f"{self.base_url}{STORAGE_PREFIX}{s3_key}?expires={expires}&sig={sig}",
                "s3Key": s3_key,
                "chunkIndex": index,
                "expiresInSeconds": self.faults.url_ttl_s,
                "method": "PUT",
                "contentType": content_type,
                **self.faults.upload_answer_patch,
            }
            self._state.expect_chunk(s3_key, call_id, index)
            answer = data if self.faults.bare_url_response else {"data": data}
            response = self._state.remember(key, body, web.json_response(answer), call_id=call_id)
            self._state.arrived(call_id, f"url:{index}", response)
        if self.faults.garbage_rate and self._rng.random() < self.faults.garbage_rate:
            return web.Response(
                status=200, body=b'{"data": {"uploadU', content_type="application/json"
            )
        return response

    async def _put(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(request, self._handle_put, storage=True)

    async def _handle_put(self, request: web.Request, body: bytes) -> web.Response:
        if "authorization" in request.headers:
            return _error(400, "InvalidArgument: only one auth mechanism allowed (query signature)")
        s3_key = request.match_info["key"]
        try:
            expires = int(request.query["expires"])
            sig = request.query["sig"]
        except (KeyError, ValueError):
            return _error(403, "AccessDenied: missing signature")
        content_type = request.headers.get("content-type", "")
        if not hmac.compare_digest(sig, self._sign(s3_key, expires, content_type)):
            return _error(403, "SignatureDoesNotMatch")
        if time.time() > expires:
            return _error(403, "AccessDenied: Request has expired")
        async with self._lock:
            call_id, index = self._state.chunk_of(s3_key)
            refused = self._out_of_order(call_id, f"put:{index}")
            if refused is not None:
                return self._state.arrived(call_id, f"put:{index}", refused)
            self._state.store_chunk(s3_key, body)
            return self._state.arrived(call_id, f"put:{index}", web.Response(status=200))

    def _out_of_order(self, call_id: str, what: str) -> web.Response | None:
        """In strict mode, the 409 for a request that Roark's per-call order forbids now."""
        if not self.faults.strict_order:
            return None
        problem = self._state.order_problem(call_id, what)
        if problem is None:
            return None
        return _error(409, f"out of order: {what} of call {call_id!r} {problem}")

    def _sign(self, s3_key: str, expires: int, content_type: str) -> str:
        message = f"{s3_key}\n{expires}\n{content_type}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    # ---- read API ----

    async def _list_calls(self, request: web.Request) -> web.Response:
        return web.json_response(self._state.summaries())

    async def _get_call(self, request: web.Request) -> web.Response:
        call_id = _call_id(request)
        call = self._state.calls.get(call_id)
        if call is None:
            return _error(404, "no such call")
        keys = {
            key: seen["count"]
            for key, seen in self._state.idempotency.items()
            if seen.get("callId") == call_id
            or ("callId" not in seen and key.startswith(f"{call_id}:"))
        }
        arrivals = self._state.arrivals.get(call_id, [])
        return web.json_response({**call, "idempotencyKeys": keys, "arrivals": arrivals})

    async def _recording(self, request: web.Request) -> web.Response:
        call_id = _call_id(request)
        try:
            wav = self._state.wav(call_id)
        except LookupError as exc:
            return _error(409, str(exc))
        return web.Response(body=wav, content_type="audio/wav")

    async def _list_requests(self, request: web.Request) -> web.Response:
        return web.json_response(self.requests)

    async def _configure(self, request: web.Request) -> web.Response:
        try:
            self.configure(**(await request.json()))
        except (ValueError, TypeError) as exc:
            return _error(400, str(exc))
        return web.json_response(asdict(self.faults))

    async def _reset(self, request: web.Request) -> web.Response:
        async with self._lock:
            self._state.reset()
            self.requests.clear()
        return web.json_response({"ok": True})

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})


def _write_private(path: Path, data: bytes) -> None:
    """Write ``path`` as 0600 whatever the umask: what the server received is call data."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


class _State:
    """What the server received, mirrored to ``state.json`` and chunk files in its data dir."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.calls: dict[str, dict[str, Any]] = {}
        self.idempotency: dict[str, dict[str, Any]] = {}
        self.pending_chunks: dict[str, tuple[str, int]] = {}
        self.arrivals: dict[str, list[dict[str, Any]]] = {}
        """Per call, every request that reached a handler: {"request", "status"}, in order."""
        self.dirty = False

    @classmethod
    def load(cls, directory: Path) -> _State:
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
        """Mark for the next write (every 0.2 s and at stop): rewriting the whole file
        per request would make a large backlog quadratic."""
        self.dirty = True

    def write(self) -> None:
        if not self.dirty:
            return
        self.dirty = False
        tmp = self.directory / "state.json.tmp"
        _write_private(
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
        seen = None if key is None else self.idempotency.get(key)
        if seen is None:
            return None
        seen["count"] += 1
        self.changed()
        if seen["body_sha256"] != hashlib.sha256(body).hexdigest():
            return _error(422, "Idempotency-Key reused with a different request body")
        return web.Response(
            status=seen["status"],
            body=seen["response"].encode(),
            content_type="application/json",
            headers={"Idempotent-Replayed": "true"},
        )

    def remember(
        self, key: str | None, body: bytes, response: web.Response, *, call_id: str | None = None
    ) -> web.Response:
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
        call = self._call(payload.pipecat_call_id)
        field_name = "callStarted" if isinstance(payload, CallStarted) else "callEnded"
        call[field_name] = raw
        call.setdefault("eventCounts", {}).setdefault(field_name, 0)
        call["eventCounts"][field_name] += 1

    def arrived(self, call_id: str, what: str, response: web.Response) -> web.Response:
        self.arrivals.setdefault(call_id, []).append({"request": what, "status": response.status})
        self.changed()
        return response

    def order_problem(self, call_id: str, what: str) -> str | None:
        """Why ``what`` may not arrive now: Roark's order is call-started, then chunks (each
        URL minted, then PUT), then call-ended."""
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
        """(call id, chunk index) of an object key."""
        return self.pending_chunks.get(s3_key, (s3_key.split("/")[1], int(s3_key[-10:-4])))

    def expect_chunk(self, s3_key: str, call_id: str, index: int) -> None:
        self.pending_chunks[s3_key] = (call_id, index)

    def store_chunk(self, s3_key: str, data: bytes) -> None:
        call_id, index = self.chunk_of(s3_key)
        path = self.directory / s3_key
        make_private_dirs(path.parent)
        _write_private(path, data)
        chunk = self._call(call_id)["chunks"].setdefault(str(index), {"puts": 0})
        chunk.update(size=len(data), sha256=hashlib.sha256(data).hexdigest(), path=s3_key)
        chunk["puts"] += 1
        self.changed()

    def summaries(self) -> list[dict[str, Any]]:
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
    """A 16-bit PCM WAV file around ``pcm``."""
    block = num_channels * 2
    header = b"RIFF" + struct.pack("<I", 36 + len(pcm)) + b"WAVE"
    header += b"fmt " + struct.pack(
        "<IHHIIHH", 16, 1, num_channels, sample_rate, sample_rate * block, block, 16
    )
    return header + b"data" + struct.pack("<I", len(pcm)) + pcm


def _error(status: int, message: str, *, retry_after: float | None = None) -> web.Response:
    headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
    return web.json_response({"error": message}, status=status, headers=headers)


def _object_name(call_id: str) -> str:
    """A folder name for any call id: readable, and distinct for distinct ids (the hash),
    however alike they look once made safe or cut short."""
    readable = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in call_id)
    digest = hashlib.sha256(call_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{readable[:80]}-{digest}"


def _connected(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and not transport.is_closing()


def _call_id(request: web.Request) -> str:
    """``/_dev/call?id=…`` (any id) or ``/_dev/calls/{id}`` (ids without a slash)."""
    return request.query["id"] if "id" in request.query else request.match_info["call_id"]


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8787,
    data_dir: Path | None = None,
    faults: Faults | None = None,
) -> None:
    """Run until Ctrl-C (the ``pipecat-roark dev-server`` command). Loopback only."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError("the dev server binds to loopback only")

    async def run() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with DevServer(data_dir=data_dir, port=port, faults=faults) as server:
            print(f"dev server listening on {server.base_url}", flush=True)
            print(f"data: {server.data_dir}", flush=True)
            await stop.wait()  # SIGTERM: stop cleanly, state.json written

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        print("dev server stopped", flush=True)


def spawn(data_dir: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    """The dev server as a process of its own on a free loopback port: (process, base URL).

    For tests and benchmarks that must not share an event loop (or a GIL) with it.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipecat_roark.devserver", "--port", "0", "--data", str(data_dir)]
        + list(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("dev server listening on "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the dev server did not start: {line!r}")
    return proc, line.split()[-1]


def add_fault_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--port", type=int, default=8787, help="port on 127.0.0.1 (0: any free port)"
    )
    parser.add_argument(
        "--data", type=Path, help="keep what is received here (default: a temp dir)"
    )
    parser.add_argument(
        "--fail-rate", type=float, default=0.0, help="fraction of requests answered 503"
    )
    parser.add_argument("--latency-ms", type=int, default=0, help="delay before every answer")
    parser.add_argument(
        "--status-sequence", default="", help="statuses for the next requests, e.g. 500,429,200"
    )
    parser.add_argument(
        "--reset-rate", type=float, default=0.0, help="fraction of connections dropped"
    )
    parser.add_argument(
        "--url-ttl", type=float, default=900.0, help="presigned URL lifetime in seconds"
    )
    parser.add_argument(
        "--garbage-rate", type=float, default=0.0, help="fraction of truncated URL answers"
    )
    parser.add_argument(
        "--retry-after", type=float, default=1.0, help="Retry-After seconds sent with 429"
    )
    parser.add_argument(
        "--api-key", action="append", default=[], help="accept only this key (repeatable)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the injected faults")


def faults_from(args: argparse.Namespace) -> Faults:
    sequence = [int(s) for s in str(args.status_sequence).split(",") if s.strip()]
    return Faults(
        fail_rate=args.fail_rate,
        latency_ms=args.latency_ms,
        status_sequence=sequence,
        reset_rate=args.reset_rate,
        url_ttl_s=args.url_ttl,
        garbage_rate=args.garbage_rate,
        retry_after_s=args.retry_after,
        accepted_keys=list(args.api_key),
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipecat_roark.devserver", description=__doc__)
    add_fault_arguments(parser)
    args = parser.parse_args(argv)
    serve(port=args.port, data_dir=args.data, faults=faults_from(args))


if __name__ == "__main__":
    main()
