"""The Roark HTTP client: three requests, and the one place failures get classified.

Every transport error and HTTP status becomes one of errors.py's classes here, so the
drainer decides on the class alone: retry later, pause the key, or give up on the row.
A connection that cannot be made is tried once more at once; 5xx/429 policy is the
drainer's.

The transport is one ``aiohttp.ClientSession`` per client, keep-alive, because the
drainer runs in the bot's event loop: a delivered chunk (mint + PUT) cost that loop
about 2 ms of CPU inside httpx and costs about 0.45 ms in aiohttp, whose parser is in C
(scripts/exp_http_cost.py, issue 12). Redirects are never followed, TLS is verified for
https, proxies come from the environment (``env_proxy``), cookies are not kept.

Each request has one total deadline (connect, write and read together): the socket
timeouts are per read, so an answer that trickles in would otherwise keep a request
alive past the lease it was sent under. Idempotency keys go through
``wire.header_key``, so any call id can be sent, and an upload URL or content type that
cannot be used is refused before anything is sent.
"""

from __future__ import annotations

import asyncio
import email.utils
import ssl
import time
from types import TracebackType
from typing import NamedTuple

import aiohttp
import certifi
import msgspec
from yarl import URL

from . import config, faultpoints, metrics
from .env_proxy import EnvProxies
from .errors import AuthError, PermanentError, RetryableError, UploadUrlExpired
from .wire import (
    CallEnded,
    CallStarted,
    ChunkUploadUrl,
    ChunkUploadUrlRequest,
    decode_chunk_upload_url,
    encode,
    header_key,
)

__all__ = [
    "EVENT_PATH",
    "Answer",
    "UPLOAD_URL_PATH",
    "RoarkClient",
    "classify_status",
    "classify_transport_error",
    "parse_retry_after",
    "usable_upload_url",
]

EVENT_PATH = "/v1/integrations/pipecat"
"""Roark's endpoint for call-started and call-ended (roark-api.md); the dev server serves it."""
UPLOAD_URL_PATH = "/v1/integrations/pipecat/chunk-upload-url"
"""Roark's endpoint that mints a chunk's presigned upload URL."""
_BODY_LIMIT = 500
_REQUEST_NAMES = {EVENT_PATH: "call-event", UPLOAD_URL_PATH: "chunk-upload-url"}


class Answer(NamedTuple):
    """An HTTP answer read whole within the request's deadline: what classification needs."""

    status: int
    content: bytes
    retry_after: str | None = None

    @property
    def is_success(self) -> bool:
        """Whether the status is 2xx."""
        return 200 <= self.status < 300

    @property
    def text(self) -> str:
        """The body as text (undecodable bytes replaced), for error messages."""
        return self.content.decode("utf-8", "replace")


class RoarkClient:
    """``async with RoarkClient(key) as client: await client.send_event(...)``."""

    def __init__(
        self,
        api_key: str,
        base_url: str | None = None,
        *,
        timeout: float = 30.0,
        deadline: float | None = None,
        max_connections: int = 32,
    ) -> None:
        """A client for one API key, with its own connection pool.

        Args:
            api_key: the Roark API key; sent in headers only, never logged.
            base_url: Roark's address; None reads ``ROARK_BASE_URL`` or the default.
            timeout: bounds each connect or read.
            deadline: bounds a whole request (default ``timeout``).
            max_connections: the pool's size, kept alive between requests.

        Raises:
            ValueError: ``api_key`` is empty.
        """
        if not api_key:
            raise ValueError("RoarkClient needs an API key")
        self.deadline = timeout if deadline is None else deadline
        self.base_url = config.resolve_base_url(base_url)
        self.key_fingerprint = config.key_fingerprint(api_key)
        self._roark_headers = {
            "x-roark-api-key": api_key,
            "authorization": f"Bearer {api_key}",
            "content-type": "application/json",
        }
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=timeout, sock_connect=min(10.0, timeout), sock_read=timeout
        )
        self._max_connections = max_connections
        self._proxies = EnvProxies()
        self._http: aiohttp.ClientSession | None = None
        """Opened by the first request: a session belongs to the loop it is made in."""
        self._tls: ssl.SSLContext | None = None
        """Made by the first https request (a context costs milliseconds to load)."""

    async def __aenter__(self) -> RoarkClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def send_event(self, payload: CallStarted | CallEnded, *, idempotency_key: str) -> None:
        """POST a call-started or call-ended event.

        Raises:
            RetryableError: network trouble, no whole answer within the deadline, or a
                3xx, 408, 429 or 5xx answer.
            AuthError: Roark refused the API key (401/403).
            PermanentError: Roark refused the event (any other 4xx).
        """
        await self._post(EVENT_PATH, encode(payload), idempotency_key)

    async def mint_upload_url(
        self, call_id: str, index: int, *, idempotency_key: str
    ) -> ChunkUploadUrl:
        """Ask Roark for a presigned URL for chunk ``index``.

        Returns:
            Where and how to PUT the chunk, as Roark answered.

        Raises:
            RetryableError: as ``send_event``, and for an answer that does not decode.
            AuthError: as ``send_event``.
            PermanentError: as ``send_event``.
        """
        body = encode(ChunkUploadUrlRequest(pipecat_call_id=call_id, chunk_index=index))
        response = await self._post(UPLOAD_URL_PATH, body, idempotency_key)
        try:
            return decode_chunk_upload_url(response.content)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise RetryableError(
                f"malformed chunk-upload-url response from {self.base_url} ({exc}); will retry",
                status=response.status,
                body=response.text[:_BODY_LIMIT],
            ) from exc

    async def put_chunk(self, url: ChunkUploadUrl, data: bytes) -> None:
        """PUT the bytes to the presigned URL: no Authorization, the minted content type.

        Raises:
            PermanentError: the URL, method or content type cannot be used, or storage
                refused the upload with a 4xx other than 403, 408 and 429.
            UploadUrlExpired: storage refused the URL (403: expired or bad signature).
            RetryableError: network trouble, the deadline, a 3xx, 408, 429 or 5xx.
        """  # noqa: DOC501 (the failure's class is picked by classify_status)
        target, method = usable_upload_url(url)
        response = await self._send(
            "chunk upload",
            method,
            target,
            content=data,
            headers={"content-type": url.content_type},
            request="chunk-upload",
        )
        if response.is_success:
            return
        if response.status == 403:
            raise UploadUrlExpired(
                "the presigned upload URL was refused (expired or signature mismatch); "
                "a new one will be requested",
                status=403,
                body=response.text[:_BODY_LIMIT],
            )
        raise classify_status(response, "chunk upload", roark=False)

    async def upload_chunk(
        self, call_id: str, index: int, data: bytes, *, idempotency_key: str, attempt: int
    ) -> None:
        """Mint a URL and PUT the chunk to it.

        Each attempt mints with a fresh idempotency key, so an expired URL is not replayed.

        Raises:
            RetryableError: as ``mint_upload_url`` and ``put_chunk``.
            AuthError: Roark refused the API key while minting.
            PermanentError: as ``mint_upload_url`` and ``put_chunk``.
        """
        faultpoints.reached("drain:mint-url", call_id)
        url = await self.mint_upload_url(
            call_id, index, idempotency_key=f"{idempotency_key}:url:{attempt}"
        )
        faultpoints.reached("drain:put", call_id)
        await self.put_chunk(url, data)

    async def _post(self, path: str, body: bytes, idempotency_key: str) -> Answer:
        headers = {**self._roark_headers, "Idempotency-Key": header_key(idempotency_key)}
        response = await self._send(
            f"POST {path}",
            "POST",
            URL(self.base_url + path),
            content=body,
            headers=headers,
            request=_REQUEST_NAMES.get(path, path),
        )
        if response.is_success:
            return response
        raise classify_status(response, f"POST {path}", roark=True)

    async def _send(
        self,
        what: str,
        method: str,
        url: URL,
        *,
        content: bytes,
        headers: dict[str, str],
        request: str,
    ) -> Answer:
        """One request, whole (the answer's body read) within ``deadline`` seconds.

        Timed for the ``pipecat_roark_request_duration_seconds`` histogram under ``request``.

        Returns:
            The answer, whatever its status.

        Raises:
            RetryableError: no whole answer within the deadline, or network trouble.
        """  # noqa: DOC501 (network trouble is classified by classify_transport_error)
        try:
            with metrics.REQUEST_SECONDS.labels(request).time():
                async with asyncio.timeout(self.deadline):
                    try:
                        return await self._exchange(method, url, content, headers)
                    except aiohttp.ClientConnectorError:  # nothing was sent: once more
                        return await self._exchange(method, url, content, headers)
        except aiohttp.ClientError as exc:  # before TimeoutError: a socket timeout is both
            raise classify_transport_error(exc, what) from exc
        except TimeoutError as exc:
            raise RetryableError(
                f"{what}: no complete answer within {self.deadline:g} s; will retry"
            ) from exc

    async def _exchange(
        self, method: str, url: URL, content: bytes, headers: dict[str, str]
    ) -> Answer:
        http = self._http or self._open()
        async with http.request(
            method,
            url,
            data=content,
            headers=headers,
            allow_redirects=False,
            proxy=self._proxies.for_url(url.scheme, url.host or ""),
            ssl=self._tls_for(url),
        ) as response:
            body = await response.read()
            return Answer(response.status, body, response.headers.get("retry-after"))

    def _tls_for(self, url: URL) -> ssl.SSLContext | bool:
        if url.scheme != "https":
            return True
        if self._tls is None:
            self._tls = tls_context()
        return self._tls

    def _open(self) -> aiohttp.ClientSession:
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._max_connections),
            timeout=self._timeout,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        return self._http


def tls_context() -> ssl.SSLContext:
    """What an https request to Roark or its storage is verified against.

    The system's CAs (with ``SSL_CERT_FILE``/``SSL_CERT_DIR``, where a company's own CA
    goes) and certifi's public bundle, which minimal container images without a system
    store lack: httpx, which delivered before aiohttp, verified against certifi's alone,
    so a deployment that worked then keeps working.

    Returns:
        A client context that verifies the certificate and the host name.
    """
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=certifi.where())
    return context


def usable_upload_url(url: ChunkUploadUrl) -> tuple[URL, str]:
    """The presigned URL and method, checked before anything is sent.

    Usable means an http(s) URL with a host, a PUT or POST, a content type that fits in
    a header.

    Returns:
        The parsed URL and the method in upper case.

    Raises:
        PermanentError: the answer is unusable. Roark answered 2xx with it, so asking
            again for the same chunk is not expected to help.
    """
    problem = None
    try:
        target = URL(url.upload_url, encoded=True)  # as minted: a signature covers it
    except (ValueError, TypeError) as exc:
        problem = f"uploadUrl {url.upload_url[:200]!r} does not parse ({exc})"
    else:
        if target.scheme not in ("http", "https") or not target.host:
            problem = f"uploadUrl {url.upload_url[:200]!r} is not an http(s) URL with a host"
    method = (url.method or "PUT").upper()
    if problem is None and method not in ("PUT", "POST"):
        problem = f"upload method {url.method[:40]!r} is neither PUT nor POST"
    if problem is None and not _header_safe(url.content_type):
        problem = f"contentType {url.content_type[:80]!r} cannot go in an HTTP header"
    if problem is not None:
        raise PermanentError(f"chunk-upload-url answer unusable: {problem}")
    return target, method


def _header_safe(value: str) -> bool:
    return value.isascii() and value.isprintable() and value.strip() == value and bool(value)


def classify_transport_error(exc: aiohttp.ClientError, what: str) -> RetryableError:
    """Network trouble of any kind is worth another try later.

    Returns:
        The error to raise, naming ``what`` failed and how.
    """
    return RetryableError(f"{what} failed: {type(exc).__name__}: {exc or 'no detail'}; will retry")


def classify_status(response: Answer, what: str, *, roark: bool) -> Exception:
    """Map an HTTP failure status to the drainer's error classes.

    A 3xx is retryable: we never follow redirects (a POST must not turn into a GET
    elsewhere), and a redirect is a deployment in motion, not a refusal of the row.

    Returns:
        The error to raise: RetryableError (3xx, 408, 429, 5xx, with the server's
        Retry-After), AuthError (401/403 from Roark itself), else PermanentError.
    """
    status = response.status
    body = response.text[:_BODY_LIMIT]
    if status >= 500 or status in (408, 429) or 300 <= status < 400:
        retry_after = parse_retry_after(response.retry_after)
        return RetryableError(
            f"{what}: HTTP {status}; will retry", status=status, body=body, retry_after=retry_after
        )
    if roark and status in (401, 403):
        return AuthError(
            f"{what}: HTTP {status}: Roark refused the API key; set a valid ROARK_API_KEY",
            status=status,
            body=body,
        )
    return PermanentError(f"{what}: HTTP {status}: {body}", status=status, body=body)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date).

    Returns:
        The wait in seconds (never negative), or None if the header is absent or bad.
    """
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
