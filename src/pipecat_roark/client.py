"""The Roark HTTP client: three requests, and the one place failures get classified.

Every httpx error and HTTP status becomes one of errors.py's classes here, so the
drainer decides on the class alone: retry later, pause the key, or give up on the row.
httpx's own retries cover only connect errors; 5xx/429 policy is the drainer's.
"""

from __future__ import annotations

import email.utils
import time
from types import TracebackType

import httpx
import msgspec

from . import config, metrics
from .errors import AuthError, PermanentError, RetryableError, UploadUrlExpired
from .wire import (
    CallEnded,
    CallStarted,
    ChunkUploadUrl,
    ChunkUploadUrlRequest,
    decode_chunk_upload_url,
    encode,
)

__all__ = ["RoarkClient", "classify_status", "classify_transport_error", "parse_retry_after"]

EVENT_PATH = "/v1/integrations/pipecat"
UPLOAD_URL_PATH = "/v1/integrations/pipecat/chunk-upload-url"
_BODY_LIMIT = 500
_REQUEST_NAMES = {EVENT_PATH: "call-event", UPLOAD_URL_PATH: "chunk-upload-url"}


class RoarkClient:
    """``async with RoarkClient(key) as client: await client.send_event(...)``."""

    def __init__(
        self,
        api_key: str,
        base_url: str | None = None,
        *,
        timeout: float = 30.0,
        max_connections: int = 32,
    ) -> None:
        if not api_key:
            raise ValueError("RoarkClient needs an API key")
        self.base_url = config.resolve_base_url(base_url)
        self.key_fingerprint = config.key_fingerprint(api_key)
        self._roark_headers = {
            "x-roark-api-key": api_key,
            "authorization": f"Bearer {api_key}",
            "content-type": "application/json",
        }
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            transport=httpx.AsyncHTTPTransport(retries=1),
        )

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
        await self._http.aclose()

    async def send_event(self, payload: CallStarted | CallEnded, *, idempotency_key: str) -> None:
        """POST a call-started or call-ended event."""
        await self._post(EVENT_PATH, encode(payload), idempotency_key)

    async def mint_upload_url(
        self, call_id: str, index: int, *, idempotency_key: str
    ) -> ChunkUploadUrl:
        """Ask Roark for a presigned URL for chunk ``index``."""
        body = encode(ChunkUploadUrlRequest(pipecat_call_id=call_id, chunk_index=index))
        response = await self._post(UPLOAD_URL_PATH, body, idempotency_key)
        try:
            return decode_chunk_upload_url(response.content)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise RetryableError(
                f"malformed chunk-upload-url response from {self.base_url} ({exc}); will retry",
                status=response.status_code,
                body=response.text[:_BODY_LIMIT],
            ) from exc

    async def put_chunk(self, url: ChunkUploadUrl, data: bytes) -> None:
        """PUT the bytes to the presigned URL: no Authorization, the minted content type."""
        try:
            with metrics.REQUEST_SECONDS.labels("chunk-upload").time():
                response = await self._http.request(
                    url.method or "PUT",
                    url.upload_url,
                    content=data,
                    headers={"content-type": url.content_type},
                )
        except httpx.TransportError as exc:
            raise classify_transport_error(exc, "chunk upload") from exc
        if response.is_success:
            return
        if response.status_code == 403:
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
        """Mint a URL (a fresh idempotency key per attempt, so an expired URL is not replayed) and PUT."""
        url = await self.mint_upload_url(
            call_id, index, idempotency_key=f"{idempotency_key}:url:{attempt}"
        )
        await self.put_chunk(url, data)

    async def _post(self, path: str, body: bytes, idempotency_key: str) -> httpx.Response:
        headers = {**self._roark_headers, "Idempotency-Key": idempotency_key}
        try:
            with metrics.REQUEST_SECONDS.labels(_REQUEST_NAMES.get(path, path)).time():
                response = await self._http.post(
                    self.base_url + path, content=body, headers=headers
                )
        except httpx.TransportError as exc:
            raise classify_transport_error(exc, f"POST {path}") from exc
        if response.is_success:
            return response
        raise classify_status(response, f"POST {path}", roark=True)


def classify_transport_error(exc: httpx.TransportError, what: str) -> RetryableError:
    """Network trouble of any kind is worth another try later."""
    return RetryableError(f"{what} failed: {type(exc).__name__}: {exc or 'no detail'}; will retry")


def classify_status(response: httpx.Response, what: str, *, roark: bool) -> Exception:
    """Map an HTTP failure status to the drainer's error classes."""
    status = response.status_code
    body = response.text[:_BODY_LIMIT]
    if status >= 500 or status in (408, 429):
        retry_after = parse_retry_after(response.headers.get("retry-after"))
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
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None if absent or bad."""
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
