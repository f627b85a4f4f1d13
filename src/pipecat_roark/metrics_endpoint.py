"""The Prometheus endpoint: the queue's state read at scrape time, served over HTTP.

The state of the queue (rows by kind and state, oldest pending age, dead rows, paused keys,
open calls, audio on disk) is read from the database at scrape time, so a sidecar reports
the truth about every process that shares the volume, not just its own share. The
counters of what this process did are ``metrics``, in the same default registry.

``serve(port, addr, directory)`` starts the endpoint once per address and port; the
``drain --follow --metrics-port`` sidecar and ``RoarkObserver(metrics_port=…)`` use it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from loguru import logger
from prometheus_client import REGISTRY, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from . import config
from .inspection import queue_status
from .lifecycle import PROCESS, running_writer
from .store import connect, now_us

__all__ = [
    "ENV_METRICS_ADDR",
    "ENV_METRICS_PORT",
    "QueueCollector",
    "resolve_addr",
    "resolve_port",
    "serve",
]

ENV_METRICS_PORT = "PIPECAT_ROARK_METRICS_PORT"
ENV_METRICS_ADDR = "PIPECAT_ROARK_METRICS_ADDR"
DEFAULT_METRICS_ADDR = "0.0.0.0"
"""All interfaces: Prometheus scrapes the pod's address, not its loopback."""


class QueueCollector(Collector):
    """The queue's state read from each database at scrape time (read-only, never writes)."""

    def describe(self) -> list[Metric]:
        """Nothing up front, for prometheus-client's registry.

        Returns:
            An empty list.
        """
        # Nothing up front: registering must not read a database.
        return []

    def collect(self) -> Iterator[Metric]:
        """Read every registered database now; one that cannot be read reports database_up 0.

        Yields:
            One gauge family per queue metric, a sample per database.
        """
        families = {
            name: GaugeMetricFamily(name, doc, labels=["dir", *extra])
            for name, (doc, extra) in _QUEUE_GAUGES.items()
        }
        for directory in sorted(PROCESS.metrics_directories):
            self._read(directory, families)
        yield from families.values()

    def _read(self, directory: Path, families: dict[str, GaugeMetricFamily]) -> None:
        label = str(directory)
        try:
            conn = connect(directory, read_only=True)
            try:
                status = queue_status(conn, directory, now=now_us(), scan_damage=False)
            finally:
                conn.close()
        except Exception as exc:  # no database yet, or unusable: say so, the scrape goes on
            families["pipecat_roark_database_up"].add_metric([label], 0)
            logger.debug(f"pipecat-roark: metrics could not read {directory}: {exc}")
            return
        families["pipecat_roark_database_up"].add_metric([label], 1)
        for kind, states in status["byKind"].items():
            for state, count in states.items():
                families["pipecat_roark_rows"].add_metric([label, kind, state], count)
        age = status["oldestPendingAgeS"]
        values = {
            "pipecat_roark_oldest_pending_age_seconds": 0.0 if age is None else float(age),
            "pipecat_roark_dead_rows": status["dead"],
            "pipecat_roark_paused_keys": len(status["pausedKeys"]),
            "pipecat_roark_calls_open": status["calls"]["open"],
            "pipecat_roark_undelivered_audio_bytes": status["undeliveredChunkBytes"],
            "pipecat_roark_audio_bytes": status["chunkBytes"],
            "pipecat_roark_database_bytes": status["databaseBytes"],
        }
        with contextlib.suppress(OSError):
            values["pipecat_roark_disk_free_bytes"] = shutil.disk_usage(directory).free
        writer = running_writer(directory)
        if writer is not None:  # a sidecar has no writer: the queue above is the whole story
            values["pipecat_roark_writer_queue_depth"] = writer.queue_depth
            values["pipecat_roark_spool_cap_bytes"] = writer.max_spool_bytes
        for name, value in values.items():
            families[name].add_metric([label], value)


_QUEUE_GAUGES: dict[str, tuple[str, list[str]]] = {
    "pipecat_roark_database_up": ("1 when the database could be read, else 0.", []),
    "pipecat_roark_rows": ("Delivery rows by kind and state.", ["kind", "state"]),
    "pipecat_roark_oldest_pending_age_seconds": (
        "Age of the oldest undelivered row (0 when none).",
        [],
    ),
    "pipecat_roark_dead_rows": ("Rows that gave up; `pipecat-roark calls --state dead`.", []),
    "pipecat_roark_paused_keys": ("API keys Roark refused (their deliveries wait).", []),
    "pipecat_roark_calls_open": ("Calls still recording.", []),
    "pipecat_roark_undelivered_audio_bytes": (
        "Recording bytes on disk that Roark does not have yet (counted against the cap).",
        [],
    ),
    "pipecat_roark_audio_bytes": ("Recording bytes on disk.", []),
    "pipecat_roark_database_bytes": ("Size of wal.sqlite with its -wal and -shm files.", []),
    "pipecat_roark_disk_free_bytes": ("Free space on the data directory's volume.", []),
    "pipecat_roark_writer_queue_depth": ("Records waiting for this process's writer.", []),
    "pipecat_roark_spool_cap_bytes": (
        "Cap on undelivered audio (max_spool_bytes); past it new audio is not recorded.",
        [],
    ),
}


def serve(port: int, addr: str, directory: Path) -> int:
    """Serve ``/metrics`` on ``addr:port`` (once per process and address).

    Port 0 picks a free port.

    Returns:
        The port served.

    Raises:
        OSError: the port cannot be bound.
    """
    with PROCESS.lock:
        if PROCESS.metrics_collector is None:
            PROCESS.metrics_collector = QueueCollector()
            REGISTRY.register(PROCESS.metrics_collector)
        PROCESS.metrics_directories.add(config.registry_key(directory))
        bound = PROCESS.metrics_ports.get((addr, port))
        if bound is None:
            server, _thread = start_http_server(port, addr=addr)
            bound = int(server.server_port)
            PROCESS.metrics_ports[(addr, port)] = bound
        return bound


def resolve_port(explicit: int | None) -> int | None:
    """The argument, else ``PIPECAT_ROARK_METRICS_PORT``.

    Returns:
        The port, or None: no endpoint (also for an invalid setting, which is logged).
    """
    if explicit is not None:
        return explicit
    raw = os.environ.get(ENV_METRICS_PORT, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) > 65535:
        logger.error(
            f"pipecat-roark: {ENV_METRICS_PORT}={raw!r} is not a port number; no metrics "
            "endpoint is served (set it to e.g. 9464)"
        )
        return None
    return int(raw)


def resolve_addr() -> str:
    """``PIPECAT_ROARK_METRICS_ADDR``, else all interfaces (what a Prometheus scrape needs).

    Returns:
        The address to bind.
    """
    return os.environ.get(ENV_METRICS_ADDR, "").strip() or DEFAULT_METRICS_ADDR
