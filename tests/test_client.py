"""The Roark client against the real dev server over 127.0.0.1: headers, bodies, error classes."""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import inspect
import ssl
import struct
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import httpx
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from devserver_fixture import RunningDevServer, running_dev_server, start_dev_server_process
from pipecat_roark.client import (
    Answer,
    RoarkClient,
    classify_status,
    classify_transport_error,
    parse_retry_after,
)
from pipecat_roark.errors import AuthError, PermanentError, RetryableError, UploadUrlExpired
from pipecat_roark.wire import HEADER_KEY_MAX, CallEnded, CallStarted, TranscriptEntry, header_key

pytestmark = pytest.mark.anyio

KEY = "rk_test_123"
STARTED = CallStarted(
    pipecat_call_id="c1", event_timestamp="2026-05-28T10:00:00.000000+00:00", agent_id="bot"
)
ENDED = CallEnded(
    pipecat_call_id="c1",
    event_timestamp="2026-05-28T10:01:00.000000+00:00",
    call_started_at="2026-05-28T10:00:00.000000+00:00",
    call_ended_at="2026-05-28T10:01:00.000000+00:00",
    call_ended_reason="agent-ended",
    recording_sample_rate=16000,
    recording_num_channels=2,
    transcript=[
        TranscriptEntry(role="user", content="hi", timestamp="2026-05-28T10:00:01.000000+00:00")
    ],
)


async def test_events_carry_both_auth_headers_and_the_idempotency_key(
    dev_server: RunningDevServer,
) -> None:
    async with RoarkClient(KEY, dev_server.base_url) as client:
        await client.send_event(STARTED, idempotency_key="c1:call-started")
        await client.send_event(ENDED, idempotency_key="c1:call-ended")
    call = dev_server.call("c1")
    assert call["callStarted"] == {
        "event": "call-started",
        "pipecatCallId": "c1",
        "eventTimestamp": "2026-05-28T10:00:00.000000+00:00",
        "agentId": "bot",
    }
    assert call["callEnded"]["transcript"] == [
        {"role": "user", "content": "hi", "timestamp": "2026-05-28T10:00:01.000000+00:00"}
    ]
    assert [(r["path"], r["idempotencyKey"], r["status"]) for r in dev_server.requests()] == [
        ("/v1/integrations/pipecat", "c1:call-started", 200),
        ("/v1/integrations/pipecat", "c1:call-ended", 200),
    ]


async def test_a_replayed_key_is_answered_once_and_not_recorded_twice(
    dev_server: RunningDevServer,
) -> None:
    async with RoarkClient(KEY, dev_server.base_url) as client:
        for _ in range(3):
            await client.send_event(STARTED, idempotency_key="c1:call-started")
        other = CallStarted(pipecat_call_id="c1", event_timestamp="x", agent_id="other")
        with pytest.raises(PermanentError, match="HTTP 422"):
            await client.send_event(other, idempotency_key="c1:call-started")
    call = dev_server.call("c1")
    assert call["eventCounts"] == {"callStarted": 1}
    assert call["idempotencyKeys"] == {"c1:call-started": 4}


@pytest.mark.parametrize("bare", [False, True], ids=["data-envelope", "bare"])
async def test_a_chunk_is_uploaded_byte_identical_without_auth_on_the_put(
    tmp_path: Path, bare: bool
) -> None:
    data = bytes(range(256)) * 100
    with running_dev_server(tmp_path, bare_url_response=bare) as server:
        async with RoarkClient(KEY, server.base_url) as client:
            await client.upload_chunk("c1", 0, data, idempotency_key="c1:chunk:0", attempt=0)
        chunk = server.call("c1")["chunks"]["0"]
        assert (chunk["size"], chunk["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
        assert (Path(server.server.data_dir) / chunk["path"]).read_bytes() == data
        assert [(r["method"], r["idempotencyKey"]) for r in server.requests()] == [
            ("POST", "c1:chunk:0:url:0"),
            ("PUT", None),
        ]


async def test_the_storage_refuses_a_put_with_an_authorization_header(
    dev_server: RunningDevServer,
) -> None:
    async with RoarkClient(KEY, dev_server.base_url) as client:
        url = await client.mint_upload_url("c1", 0, idempotency_key="k")
    async with httpx.AsyncClient() as raw:
        response = await raw.put(
            url.upload_url,
            content=b"x",
            headers={"content-type": "audio/pcm", "authorization": f"Bearer {KEY}"},
        )
    assert response.status_code == 400
    wrong_type = httpx.put(url.upload_url, content=b"x", headers={"content-type": "audio/wav"})
    assert wrong_type.status_code == 403


async def test_an_expired_url_is_upload_url_expired_and_the_next_attempt_mints_a_new_one(
    tmp_path: Path,
) -> None:
    with running_dev_server(tmp_path, url_ttl_s=-1) as server:
        async with RoarkClient(KEY, server.base_url) as client:
            with pytest.raises(UploadUrlExpired, match="presigned upload URL was refused"):
                await client.upload_chunk("c1", 3, b"abc", idempotency_key="c1:chunk:3", attempt=0)
            server.configure(url_ttl_s=900)
            await client.upload_chunk("c1", 3, b"abc", idempotency_key="c1:chunk:3", attempt=1)
        assert server.call("c1")["chunks"]["3"]["size"] == 3
        assert [r["idempotencyKey"] for r in server.requests() if r["method"] == "POST"] == [
            "c1:chunk:3:url:0",
            "c1:chunk:3:url:1",
        ]


@pytest.mark.parametrize(
    ("status", "error", "retry_after"),
    [
        (500, RetryableError, None),
        (503, RetryableError, None),
        (408, RetryableError, None),
        (429, RetryableError, 7.0),
        (401, AuthError, None),
        (403, AuthError, None),
        (400, PermanentError, None),
        (404, PermanentError, None),
        (409, PermanentError, None),
    ],
)
async def test_each_status_maps_to_its_error_class(
    tmp_path: Path, status: int, error: type[Exception], retry_after: float | None
) -> None:
    with running_dev_server(tmp_path, status_sequence=[status], retry_after_s=7) as server:
        async with RoarkClient(KEY, server.base_url) as client:
            with pytest.raises(error) as caught:
                await client.send_event(STARTED, idempotency_key="c1:call-started")
            await client.send_event(STARTED, idempotency_key="c1:call-started")
    assert type(caught.value) is error
    assert caught.value.status == status  # type: ignore[attr-defined]
    assert f"HTTP {status}" in str(caught.value)
    if error is RetryableError:
        assert caught.value.retry_after == retry_after  # type: ignore[attr-defined]
    assert KEY not in str(caught.value)


async def test_a_wrong_key_is_an_auth_error_that_never_shows_the_key(tmp_path: Path) -> None:
    with running_dev_server(tmp_path, accepted_keys=["the-right-key"]) as server:
        async with RoarkClient(KEY, server.base_url) as client:
            with pytest.raises(AuthError) as caught:
                await client.send_event(STARTED, idempotency_key="k")
    assert "set a valid ROARK_API_KEY" in str(caught.value) and KEY not in str(caught.value)


async def test_a_reset_connection_and_a_refused_port_are_retryable(tmp_path: Path) -> None:
    with running_dev_server(tmp_path, status_sequence=[0]) as server:
        async with RoarkClient(KEY, server.base_url) as client:
            with pytest.raises(RetryableError) as caught:
                await client.send_event(STARTED, idempotency_key="k")
    assert caught.value.status is None, "no HTTP answer at all: the connection was dropped"
    assert "ServerDisconnectedError" in str(caught.value) or "ClientOSError" in str(caught.value)
    async with RoarkClient(KEY, server.base_url, timeout=2) as client:  # the server is gone
        with pytest.raises(RetryableError, match="ClientConnectorError"):
            await client.send_event(STARTED, idempotency_key="k")


async def test_a_garbage_url_answer_is_retryable(tmp_path: Path) -> None:
    with running_dev_server(tmp_path, garbage_rate=1.0) as server:
        async with RoarkClient(KEY, server.base_url) as client:
            with pytest.raises(RetryableError, match="malformed chunk-upload-url response"):
                await client.upload_chunk("c1", 0, b"x", idempotency_key="c1:chunk:0", attempt=0)


def test_every_aiohttp_client_error_maps_to_retryable() -> None:
    """Those that take a plain message (the rest need a connection key or a request)."""
    classes = []
    for obj in vars(aiohttp).values():
        if inspect.isclass(obj) and issubclass(obj, aiohttp.ClientError):
            with contextlib.suppress(TypeError):
                obj("boom")
                classes.append(obj)
    assert len(classes) >= 12, "aiohttp's client error tree was found"
    for cls in classes:
        mapped = classify_transport_error(cls("boom"), "POST /x")
        assert type(mapped) is RetryableError
        assert cls.__name__ in str(mapped)


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    parsed = parse_retry_after(when)
    assert parsed is not None and 25 <= parsed <= 31


def test_the_server_keeps_what_it_received_across_a_restart(tmp_path: Path) -> None:
    proc, base_url = start_dev_server_process(tmp_path)
    try:
        headers = {
            "x-roark-api-key": KEY,
            "authorization": f"Bearer {KEY}",
            "Idempotency-Key": "c9:call-started",
        }
        body = b'{"event":"call-started","pipecatCallId":"c9","eventTimestamp":"t","agentId":"a"}'
        assert (
            httpx.post(
                base_url + "/v1/integrations/pipecat", content=body, headers=headers
            ).status_code
            == 200
        )
    finally:
        proc.terminate()
        proc.wait(30)
        assert proc.stdout is not None
        proc.stdout.close()
    proc, base_url = start_dev_server_process(tmp_path)
    try:
        calls = httpx.get(base_url + "/_dev/calls").json()
        assert calls == [
            {
                "pipecatCallId": "c9",
                "agentId": "a",
                "started": True,
                "ended": False,
                "chunks": [],
                "callEndedReason": None,
            }
        ]
        replay = httpx.post(base_url + "/v1/integrations/pipecat", content=body, headers=headers)
        assert replay.headers["Idempotent-Replayed"] == "true"
    finally:
        proc.terminate()
        proc.wait(30)
        assert proc.stdout is not None
        proc.stdout.close()


async def test_the_recording_is_a_wav_of_the_chunks_in_index_order(
    dev_server: RunningDevServer,
) -> None:
    async with RoarkClient(KEY, dev_server.base_url) as client:
        await client.upload_chunk(
            "c1", 1, b"\x03\x00\x04\x00", idempotency_key="c1:chunk:1", attempt=0
        )
        await client.upload_chunk(
            "c1", 0, b"\x01\x00\x02\x00", idempotency_key="c1:chunk:0", attempt=0
        )
        await client.send_event(ENDED, idempotency_key="c1:call-ended")
    wav = dev_server.recording("c1")
    assert wav[:4] == b"RIFF" and wav[8:16] == b"WAVEfmt "
    assert struct.unpack("<HHIIHH", wav[20:36]) == (1, 2, 16000, 64000, 4, 16)
    assert wav[36:44] == b"data" + struct.pack("<I", 8)
    assert wav[44:] == b"\x01\x00\x02\x00\x03\x00\x04\x00"
    missing = httpx.get(dev_server.base_url + "/_dev/calls/nope/recording.wav")
    assert missing.status_code == 409


# ---- any call id fits in the Idempotency-Key header ----


@given(st.text(min_size=0, max_size=600))
def test_every_key_becomes_a_short_ascii_header_the_same_every_time(key: str) -> None:
    header = header_key(key)
    assert header == header_key(key), "deterministic"
    assert all(0x20 <= ord(c) <= 0x7E for c in header), "printable ASCII only"
    assert header.strip() == header, "nothing a proxy would trim"
    assert len(header) <= HEADER_KEY_MAX
    plain = (
        len(key) <= HEADER_KEY_MAX
        and all(0x20 <= ord(c) <= 0x7E and c != "%" for c in key)
        and key.strip(" ") == key
    )
    assert (header == key) == plain, "plain keys go out exactly as older versions sent them"


@given(st.text(max_size=300), st.text(max_size=300))
def test_distinct_keys_never_share_a_header(a: str, b: str) -> None:
    if a != b:
        assert header_key(a) != header_key(b)


@pytest.mark.parametrize(
    ("key", "header"),
    [
        ("call-1:call-started", "call-1:call-started"),
        ("réunion-42:call-ended", "r%C3%A9union-42:call-ended"),
        ("a\x00b:chunk:3", "a%00b:chunk:3"),
        ("two words:call-started", "two words:call-started"),
        (" padded:call-ended", "%20padded:call-ended"),
        ("%C3%A9:call-ended", "%25C3%25A9:call-ended"),
        ("x" * 250, "x" * 64 + "%sha256:" + hashlib.sha256(b"x" * 250).hexdigest()),
    ],
)
def test_the_header_forms_are_exactly_these(key: str, header: str) -> None:
    assert header_key(key) == header


@pytest.mark.parametrize("status", [300, 301, 302, 303, 304, 307, 308])
def test_a_redirect_status_is_retryable(status: int) -> None:
    error = classify_status(Answer(status, b"moved"), "POST /v1/integrations/pipecat", roark=True)
    assert isinstance(error, RetryableError) and not isinstance(error, UploadUrlExpired)
    assert str(error) == f"POST /v1/integrations/pipecat: HTTP {status}; will retry"


# ---- what the transport must do and not do (real HTTP over 127.0.0.1) ----


@contextlib.asynccontextmanager
async def _local_server(
    handler: web.RequestHandler, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    """A one-route aiohttp server on a free 127.0.0.1 port; yields its host:port."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        yield f"{host}:{port}"
    finally:
        await runner.cleanup()


async def test_a_redirect_is_answered_retryable_and_never_followed(
    dev_server: RunningDevServer,
) -> None:
    seen: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        seen.append(request.method)
        raise web.HTTPTemporaryRedirect(dev_server.base_url + request.path)

    async with _local_server(redirect) as where, RoarkClient(KEY, f"http://{where}") as client:
        with pytest.raises(RetryableError, match="HTTP 307; will retry"):
            await client.send_event(STARTED, idempotency_key="c1:call-started")
    assert seen == ["POST"]
    assert dev_server.requests() == [], "the POST never reached the redirect's target"


async def test_the_proxy_comes_from_the_environment_and_no_proxy_is_honoured(
    dev_server: RunningDevServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxied: list[str] = []

    async def proxy(request: web.Request) -> web.Response:
        proxied.append(str(request.url))
        return web.Response(text="{}")

    for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    async with _local_server(proxy) as where:
        monkeypatch.setenv("http_proxy", f"http://{where}")
        monkeypatch.setenv("HTTP_PROXY", f"http://{where}")
        async with RoarkClient(KEY, dev_server.base_url) as client:
            await client.send_event(STARTED, idempotency_key="c1:call-started")
        assert proxied == [dev_server.base_url + "/v1/integrations/pipecat"]
        assert dev_server.requests() == []
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        async with RoarkClient(KEY, dev_server.base_url) as client:
            await client.send_event(STARTED, idempotency_key="c1:call-started")
    assert len(proxied) == 1
    assert [r["idempotencyKey"] for r in dev_server.requests()] == ["c1:call-started"]


def self_signed(tmp_path: Path) -> tuple[Path, ssl.SSLContext]:
    """A certificate for 127.0.0.1 that no CA signed, and a server context serving it."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1"]
        + ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    return cert, server_tls


@contextlib.asynccontextmanager
async def https_server(tmp_path: Path) -> AsyncIterator[tuple[str, Path, list[str]]]:
    """A local https server with a self-signed certificate that answers ``{}``.

    Yields its address, its certificate, and the paths it answered.
    """
    cert, server_tls = self_signed(tmp_path)
    answered: list[str] = []

    async def ok(request: web.Request) -> web.Response:
        answered.append(request.path)
        return web.Response(text="{}")

    async with _local_server(ok, server_tls) as where:
        yield where, cert, answered


async def test_https_verifies_the_certificate(tmp_path: Path) -> None:
    """A self-signed certificate is refused (retryable: the deployment may be fixed)."""
    async with (
        https_server(tmp_path) as (where, _, answered),
        RoarkClient(KEY, f"https://{where}", timeout=5) as client,
    ):
        with pytest.raises(RetryableError, match="certificate verify failed"):
            await client.send_event(STARTED, idempotency_key="c1:call-started")
    assert answered == []


async def test_https_trusts_the_system_store_and_ssl_cert_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CA named by SSL_CERT_FILE (a company's own) is trusted, as OpenSSL's default is."""
    async with https_server(tmp_path) as (where, cert, answered):
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        async with RoarkClient(KEY, f"https://{where}", timeout=5) as client:
            await client.send_event(STARTED, idempotency_key="c1:call-started")
    assert answered == ["/v1/integrations/pipecat"]


def test_https_trusts_certifis_public_cas_where_the_system_has_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container image with no CA store still verifies Roark: certifi's bundle is loaded."""
    import certifi

    from pipecat_roark.client import tls_context

    empty = tmp_path / "empty.pem"
    empty.write_text("")
    monkeypatch.setenv("SSL_CERT_FILE", str(empty))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    bare = ssl.create_default_context()
    assert bare.cert_store_stats()["x509_ca"] == 0, "the system store is out of the way"
    bundle = ssl.create_default_context(cafile=certifi.where())
    ours = tls_context()
    assert ours.cert_store_stats()["x509_ca"] == bundle.cert_store_stats()["x509_ca"] > 100
    assert ours.verify_mode == ssl.CERT_REQUIRED and ours.check_hostname
