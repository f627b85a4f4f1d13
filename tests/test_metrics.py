"""Prometheus metrics, scraped over HTTP during real drains and parsed with
prometheus-client's own parser: the figures must equal what happened."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devserver_fixture import RunningDevServer
from pipecat_roark.background_drainer import stop_background_drainers
from pipecat_roark.observer import RoarkObserver
from pipecat_roark.testing import ScriptedCall, run_pipeline
from test_cli import cli, sql, start_cli
from test_drain import KEY, chunk_rows, record, short_script
from test_drain_processes import kill_bot_mid_call

pytestmark = pytest.mark.anyio

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    text = httpx.get(url, timeout=10).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def metrics_url(proc: subprocess.Popen[str]) -> str:
    assert proc.stderr is not None
    line = proc.stderr.readline().strip()
    assert line.startswith("metrics at http://127.0.0.1:"), line
    return line.removeprefix("metrics at ")


async def test_a_drain_sidecar_serves_exactly_what_it_did(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    await record(data_dir, "m-1", 0)
    await record(data_dir, "m-2", 1)
    kill_bot_mid_call(data_dir, "m-orphan", chunk_bytes=8000)
    calls = ["m-1", "m-2", "m-orphan"]
    chunks = {c: chunk_rows(data_dir, c) for c in calls}
    n_chunks = sum(len(rows) for rows in chunks.values())
    n_bytes = sum(size for rows in chunks.values() for size, _ in rows)
    dev_server.configure(status_sequence=[503])  # the first request fails once, then all is well

    follower = start_cli(
        data_dir,
        "drain",
        "--follow",
        "--metrics-port",
        "0",
        "--metrics-addr",
        "127.0.0.1",
        base_url=dev_server.base_url,
    )
    try:
        url = metrics_url(follower)
        samples: Samples = {}
        for _ in range(600):  # bounded: at most about 60 s
            samples = await asyncio.to_thread(scrape, url)
            if value(samples, "pipecat_roark_deliveries_total", kind="call-ended") == 3:
                break
            await asyncio.sleep(0.1)
    finally:
        follower.terminate()
        follower.communicate(timeout=60)

    assert value(samples, "pipecat_roark_deliveries_total", kind="call-started") == 3
    assert value(samples, "pipecat_roark_deliveries_total", kind="chunk") == n_chunks
    assert value(samples, "pipecat_roark_deliveries_total", kind="call-ended") == 3
    assert value(samples, "pipecat_roark_delivered_bytes_total") == n_bytes
    assert (
        value(
            samples,
            "pipecat_roark_delivery_failures_total",
            kind="call-started",
            failure="retryable",
        )
        == 1
    )
    assert value(samples, "pipecat_roark_calls_finalized_total", reason="observer-lost") == 1
    # Every request was timed: 3 call-started (one of them twice), 3 call-ended, and a URL
    # mint and a PUT per chunk.
    assert value(samples, "pipecat_roark_request_duration_seconds_count", request="call-event") == 7
    assert (
        value(samples, "pipecat_roark_request_duration_seconds_count", request="chunk-upload-url")
        == n_chunks
    )
    assert (
        value(samples, "pipecat_roark_request_duration_seconds_count", request="chunk-upload")
        == n_chunks
    )
    # The queue as the database holds it (read at scrape time).
    directory = str(data_dir.resolve())
    for kind, count in (("call-started", 3), ("chunk", n_chunks), ("call-ended", 3)):
        assert value(
            samples, "pipecat_roark_rows", dir=directory, kind=kind, state="delivered"
        ) == (count)
        assert value(samples, "pipecat_roark_rows", dir=directory, kind=kind, state="pending") == 0
    assert value(samples, "pipecat_roark_dead_rows", dir=directory) == 0
    assert value(samples, "pipecat_roark_paused_keys", dir=directory) == 0
    assert value(samples, "pipecat_roark_calls_open", dir=directory) == 0
    assert value(samples, "pipecat_roark_oldest_pending_age_seconds", dir=directory) == 0
    assert value(samples, "pipecat_roark_undelivered_audio_bytes", dir=directory) == 0
    assert value(samples, "pipecat_roark_database_up", dir=directory) == 1
    assert value(samples, "pipecat_roark_writer_queue_depth", dir=directory) is None, (
        "a sidecar has no writer"
    )


async def test_a_taken_metrics_port_is_a_clear_error(data_dir: Path) -> None:
    await record(data_dir, "x", 0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = cli(data_dir, "drain", "--metrics-port", str(port), "--metrics-addr", "127.0.0.1")
    assert done.returncode == 2
    assert done.stderr.strip().startswith(f"error: cannot serve metrics on 127.0.0.1:{port} (")
    assert done.stderr.strip().endswith("choose another --metrics-port")
    assert sql(data_dir, "SELECT count(*) FROM deliveries WHERE state = 'pending'")[0][0] > 0


async def test_the_bot_process_serves_metrics_while_it_records(
    data_dir: Path, dev_server: RunningDevServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:  # a free port for the bot to take
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("PIPECAT_ROARK_METRICS_ADDR", "127.0.0.1")
    url = f"http://127.0.0.1:{port}/metrics"
    directory = str(data_dir.resolve())
    during: list[Samples] = []

    async def look(step: int) -> None:
        if step == 2:
            during.append(await asyncio.to_thread(scrape, url))

    roark = RoarkObserver(
        agent_id="metrics-bot",
        api_key=KEY,
        base_url=dev_server.base_url,
        pipecat_call_id="bot-m",
        chunk_bytes=8000,
        metrics_port=port,
    )
    before = await asyncio.to_thread(scrape, url)
    started_before = value(before, "pipecat_roark_deliveries_total", kind="call-started") or 0.0
    try:
        await run_pipeline(
            [ScriptedCall(short_script(0), on_step=look), roark.audio_processor],
            observers=[roark],
        )
        for _ in range(600):  # bounded: the bot's drainer runs in this loop
            if all(s == "delivered" for (s,) in sql(data_dir, "SELECT state FROM deliveries")):
                break
            await asyncio.sleep(0.05)
    finally:
        await stop_background_drainers(5)
    after = await asyncio.to_thread(scrape, url)

    assert value(during[0], "pipecat_roark_calls_open", dir=directory) == 1
    assert value(during[0], "pipecat_roark_writer_queue_depth", dir=directory) is not None
    assert value(during[0], "pipecat_roark_spool_cap_bytes", dir=directory) == 1 << 30
    assert value(after, "pipecat_roark_calls_open", dir=directory) == 0
    assert value(after, "pipecat_roark_deliveries_total", kind="call-started") == started_before + 1
    assert value(after, "pipecat_roark_writer_commit_duration_seconds_count") is not None
    assert (value(after, "pipecat_roark_writer_commit_duration_seconds_count") or 0) > (
        value(before, "pipecat_roark_writer_commit_duration_seconds_count") or 0
    )
