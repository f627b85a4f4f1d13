"""The dev server's own API under ``/_dev``, for the tests and the demo to read and change.

What it received (calls, recordings, requests) and its fault settings.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

from aiohttp import web

from .faults import FaultInjector
from .state import ReceivedState, error_response

__all__ = ["DevApi"]


class DevApi:
    """The ``/_dev`` routes over the server's state, request log and fault injector.

    Args:
        state: what the server received.
        requests: the server's request log, cleared by ``POST /_dev/reset``.
        lock: the server's lock over ``state``, held while resetting.
        injector: the fault settings ``POST /_dev/config`` changes.
    """

    def __init__(
        self,
        state: ReceivedState,
        requests: list[dict[str, Any]],
        lock: asyncio.Lock,
        injector: FaultInjector,
    ) -> None:
        self._state = state
        self._requests = requests
        self._lock = lock
        self._injector = injector

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """Serve the ``/_dev`` routes from ``router``'s application."""
        router.add_get("/_dev/calls", self._list_calls)
        router.add_get("/_dev/calls/{call_id}", self._get_call)
        router.add_get("/_dev/calls/{call_id}/recording.wav", self._recording)
        router.add_get("/_dev/call", self._get_call)  # ?id=: any id, "/" and ".." too
        router.add_get("/_dev/call/recording.wav", self._recording)
        router.add_get("/_dev/requests", self._list_requests)
        router.add_post("/_dev/config", self._configure)
        router.add_post("/_dev/reset", self._reset)
        router.add_get("/_dev/health", self._health)

    async def _list_calls(self, request: web.Request) -> web.Response:
        return web.json_response(self._state.summaries())

    async def _get_call(self, request: web.Request) -> web.Response:
        call_id = _call_id(request)
        call = self._state.calls.get(call_id)
        if call is None:
            return error_response(404, "no such call")
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
            return error_response(409, str(exc))
        return web.Response(body=wav, content_type="audio/wav")

    async def _list_requests(self, request: web.Request) -> web.Response:
        return web.json_response(self._requests)

    async def _configure(self, request: web.Request) -> web.Response:
        try:
            self._injector.configure(**(await request.json()))
        except (ValueError, TypeError) as exc:
            return error_response(400, str(exc))
        return web.json_response(asdict(self._injector.faults))

    async def _reset(self, request: web.Request) -> web.Response:
        async with self._lock:
            self._state.reset()
            self._requests.clear()
        return web.json_response({"ok": True})

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})


def _call_id(request: web.Request) -> str:
    """``/_dev/call?id=…`` (any id) or ``/_dev/calls/{id}`` (ids without a slash).

    Returns:
        The call id the request names.
    """
    return request.query["id"] if "id" in request.query else request.match_info["call_id"]
