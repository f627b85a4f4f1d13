"""The dev server's command line, defined once.

``pipecat-roark dev-server`` and ``python -m pipecat_roark.devserver`` are this one click
command.

Only click is imported here, so the CLI starts without loading the server (aiohttp);
the server is imported when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["dev_server"]


@click.command("dev-server", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--port",
    type=int,
    default=8787,
    show_default=True,
    help="Port on 127.0.0.1 (0: any free port).",
)
@click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep what is received here (default: a temp dir).",
)
@click.option("--fail-rate", type=float, default=0.0, help="Fraction of requests answered 503.")
@click.option("--latency-ms", type=int, default=0, help="Delay before every answer.")
@click.option(
    "--status-sequence", default="", help="Statuses for the next requests, e.g. 500,429,200."
)
@click.option("--reset-rate", type=float, default=0.0, help="Fraction of connections dropped.")
@click.option("--url-ttl", type=float, default=900.0, help="Presigned URL lifetime in seconds.")
@click.option(
    "--garbage-rate", type=float, default=0.0, help="Fraction of truncated upload-URL answers."
)
@click.option("--retry-after", type=float, default=1.0, help="Retry-After seconds sent with 429.")
@click.option("--api-key", multiple=True, help="Accept only this key (repeatable; default: any).")
@click.option("--seed", type=int, default=0, help="Seed of the injected faults.")
def dev_server(
    port: int,
    data: Path | None,
    fail_rate: float,
    latency_ms: int,
    status_sequence: str,
    reset_rate: float,
    url_ttl: float,
    garbage_rate: float,
    retry_after: float,
    api_key: tuple[str, ...],
    seed: int,
) -> None:
    """Run a local Roark-compatible server (loopback only) with fault injection.

    \b
    Example:
        pipecat-roark dev-server --port 8787 --fail-rate 0.3
        ROARK_BASE_URL=http://127.0.0.1:8787 ROARK_API_KEY=dev pipecat-roark drain
    """
    from .devserver import Faults, serve

    faults = Faults(
        fail_rate=fail_rate,
        latency_ms=latency_ms,
        status_sequence=[int(s) for s in status_sequence.split(",") if s.strip()],
        reset_rate=reset_rate,
        url_ttl_s=url_ttl,
        garbage_rate=garbage_rate,
        retry_after_s=retry_after,
        accepted_keys=list(api_key),
        seed=seed,
    )
    serve(port=port, data_dir=data, faults=faults)
