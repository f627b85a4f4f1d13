"""The dev server itself: Roark's two endpoints and the object storage behind its URLs.

It works over the received state (``state``), the fault injector (``faults``) and the
``/_dev`` API (``dev_api``); ``serve`` runs it in the foreground and ``spawn`` as a process.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from ..client import EVENT_PATH, UPLOAD_URL_PATH
from ..wire import CallEnded, CallStarted
from .dev_api import DevApi
from .faults import Abort, FaultInjector, Faults, connected
from .state import ReceivedState, error_response

__all__ = ["DevServer", "serve", "spawn"]

STORAGE_PREFIX = "/_storage/"
PERSIST_EVERY_S = 0.2
PERSIST_SHARE = 9
"""After a save that took t seconds, the next waits 9 t: saving is at most a tenth of the time."""


class DevServer:
    """The server, in this event loop. ``async with DevServer() as s: s.base_url``.

    Args:
        data_dir: where received state and recordings are kept; a temporary folder,
            removed on ``stop``, when None.
        port: the loopback port to listen on; 0 picks a free one (see ``port`` once started).
        faults: what goes wrong on purpose; none by default.
    """

    def __init__(
        self, *, data_dir: Path | None = None, port: int = 0, faults: Faults | None = None
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="roark-dev-")
            data_dir = Path(self._tmp.name)
        self.data_dir = data_dir
        self._injector = FaultInjector(faults or Faults())
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
        self._state = ReceivedState.load(self.data_dir)

    @property
    def faults(self) -> Faults:
        """The fault settings in force (changed by ``configure`` or ``POST /_dev/config``)."""
        return self._injector.faults

    @property
    def base_url(self) -> str:
        """Where clients reach the server, ``http://127.0.0.1:<port>`` once started."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen on loopback (a free port when ``port`` is 0) and start saving state."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(EVENT_PATH, self._event)
        app.router.add_post(UPLOAD_URL_PATH, self._upload_url)
        app.router.add_put(STORAGE_PREFIX + "{key:.+}", self._put)
        DevApi(self._state, self.requests, self._lock, self._injector).add_routes(app.router)
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
        """Save the received state every 0.2 s, or less often once saving it takes long.

        Each save rewrites the whole state; after a few thousand calls that is megabytes of
        JSON, and saving it every 0.2 s kept the server busy for as long as requests came
        (a third of a core at 9 MB), taken from the bots it serves on the same machine.
        Waiting ``PERSIST_SHARE`` times a save's own time keeps saving to a tenth of the
        server's time; ``stop`` still saves the last of it.
        """
        while True:
            started = time.perf_counter()
            self._state.write()
            took = time.perf_counter() - started
            await asyncio.sleep(max(PERSIST_EVERY_S, took * PERSIST_SHARE))

    async def stop(self) -> None:
        """Stop listening, with the received state written to disk (a temporary data dir goes)."""
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
        """Change fault settings by name; raises ValueError for a name ``Faults`` lacks."""
        self._injector.configure(**changes)

    # ---- auth and the request log ----

    def _auth(self, request: web.Request) -> web.Response | None:
        key = request.headers.get("x-roark-api-key", "")
        bearer = request.headers.get("authorization", "")
        if not key or bearer != f"Bearer {key}":
            return error_response(
                401, "missing or mismatched x-roark-api-key / authorization: Bearer headers"
            )
        if self.faults.accepted_keys and key not in self.faults.accepted_keys:
            return error_response(401, "invalid API key")
        return None

    async def _guarded(
        self, request: web.Request, handler: Any, *, storage: bool = False
    ) -> web.StreamResponse:
        try:
            body = await request.read()
        except ConnectionResetError:  # the client died mid-body (a crash test killed it)
            return error_response(400, "the request body was cut off")
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
        record["overlapping"] = any(connected(r) for r in answering)
        self.requests.append(record)
        answering.append(request)
        try:
            response = await self._injector.before_answer() or await handler(request, body)
            record["status"] = response.status
            if self.faults.trickle_s > 0 and not storage:
                return await self._injector.trickle(request, response)
            return response
        except Abort:
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
                return self._state.remember(
                    key, body, error_response(400, f"invalid payload: {exc}")
                )
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
                    key, body, error_response(400, f"invalid chunk-upload-url request: {exc}")
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
        if self._injector.chance(self.faults.garbage_rate):
            return web.Response(
                status=200, body=b'{"data": {"uploadU', content_type="application/json"
            )
        return response

    async def _put(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(request, self._handle_put, storage=True)

    async def _handle_put(self, request: web.Request, body: bytes) -> web.Response:
        if "authorization" in request.headers:
            return error_response(
                400, "InvalidArgument: only one auth mechanism allowed (query signature)"
            )
        s3_key = request.match_info["key"]
        try:
            expires = int(request.query["expires"])
            sig = request.query["sig"]
        except (KeyError, ValueError):
            return error_response(403, "AccessDenied: missing signature")
        content_type = request.headers.get("content-type", "")
        if not hmac.compare_digest(sig, self._sign(s3_key, expires, content_type)):
            return error_response(403, "SignatureDoesNotMatch")
        if time.time() > expires:
            return error_response(403, "AccessDenied: Request has expired")
        async with self._lock:
            call_id, index = self._state.chunk_of(s3_key)
            refused = self._out_of_order(call_id, f"put:{index}")
            if refused is not None:
                return self._state.arrived(call_id, f"put:{index}", refused)
            self._state.store_chunk(s3_key, body)
            return self._state.arrived(call_id, f"put:{index}", web.Response(status=200))

    def _out_of_order(self, call_id: str, what: str) -> web.Response | None:
        """In strict mode, refuse a request that Roark's per-call order forbids now.

        Returns:
            The 409 to answer with, or None when the request may be served.
        """
        if not self.faults.strict_order:
            return None
        problem = self._state.order_problem(call_id, what)
        if problem is None:
            return None
        return error_response(409, f"out of order: {what} of call {call_id!r} {problem}")

    def _sign(self, s3_key: str, expires: int, content_type: str) -> str:
        message = f"{s3_key}\n{expires}\n{content_type}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()


def _object_name(call_id: str) -> str:
    """A folder name for any call id: readable, and distinct for distinct ids.

    Returns:
        The id made safe and cut to 80 characters, then a hash of the whole id, so ids
        that look alike once made safe or cut short still get distinct folders.
    """
    readable = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in call_id)
    digest = hashlib.sha256(call_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{readable[:80]}-{digest}"


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8787,
    data_dir: Path | None = None,
    faults: Faults | None = None,
) -> None:
    """Run until Ctrl-C or SIGTERM (the ``pipecat-roark dev-server`` command). Loopback only.

    Raises:
        ValueError: ``host`` is not a loopback address.
    """
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
    """The dev server as a process of its own on a free loopback port.

    For tests and benchmarks that must not share an event loop (or a GIL) with it.

    Returns:
        The running process (the caller stops it) and the base URL it listens on.

    Raises:
        RuntimeError: the process did not announce that it listens (it is killed).
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
