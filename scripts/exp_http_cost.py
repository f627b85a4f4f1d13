"""Experiment (issue 12): event-loop CPU per delivered chunk, httpx vs aiohttp vs bare HTTP/1.1.

    uv run python scripts/exp_http_cost.py [--chunks 800] [--rounds 2]

Delivering in the bot's loop costs a chunk two requests (mint an upload URL, PUT the
256 KiB) and a call two more (call-started, call-ended). Bot CPU ≤ 1.05× a recording
no-op leaves about 1 ms of loop CPU per chunk for all of it. This measures the floor
of the requests alone against the dev server in another process, with 8 requests in
flight as the drainer has: ``httpx.AsyncClient``, an ``aiohttp.ClientSession``
(keep-alive, one session, ``TCPConnector(limit=...)``, its C-accelerated parser) and a
keep-alive HTTP/1.1 client on asyncio streams with no other work (no pool bookkeeping,
no cancel scopes, no URL model). CPU is this thread's (the loop's), per chunk.
Nothing here is used by the library.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import httpx

from pipecat_roark.devserver import spawn

KEY = "bench-key-not-secret"
MINT = "/v1/integrations/pipecat/chunk-upload-url"
CONCURRENCY = 8


def mint_body(n: int) -> bytes:
    return json.dumps(
        {"pipecatCallId": f"exp-{n // 8}", "chunkIndex": n % 8, "contentType": "audio/pcm"}
    ).encode()


async def with_httpx(base_url: str, data: bytes, chunks: int, offset: int) -> None:
    headers = {"x-roark-api-key": KEY, "authorization": f"Bearer {KEY}"}
    todo = iter(range(offset, offset + chunks))
    async with httpx.AsyncClient(timeout=60) as http:

        async def work() -> None:
            for n in todo:
                minted = await http.post(
                    base_url + MINT,
                    content=mint_body(n),
                    headers={
                        **headers,
                        "content-type": "application/json",
                        "idempotency-key": f"x{n}",
                    },
                )
                url = minted.json()["data"]["uploadUrl"]
                put = await http.put(url, content=data, headers={"content-type": "audio/pcm"})
                put.raise_for_status()

        await asyncio.gather(*(work() for _ in range(CONCURRENCY)))


async def with_aiohttp(base_url: str, data: bytes, chunks: int, offset: int) -> None:
    headers = {"x-roark-api-key": KEY, "authorization": f"Bearer {KEY}"}
    todo = iter(range(offset, offset + chunks))
    connector = aiohttp.TCPConnector(limit=CONCURRENCY * 2)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def work() -> None:
            for n in todo:
                async with http.post(
                    base_url + MINT,
                    data=mint_body(n),
                    headers={
                        **headers,
                        "content-type": "application/json",
                        "idempotency-key": f"a{n}",
                    },
                    allow_redirects=False,
                ) as minted:
                    url = json.loads(await minted.read())["data"]["uploadUrl"]
                async with http.put(
                    url, data=data, headers={"content-type": "audio/pcm"}, allow_redirects=False
                ) as put:
                    await put.read()
                    put.raise_for_status()

        await asyncio.gather(*(work() for _ in range(CONCURRENCY)))


class BareConnection:
    """One keep-alive HTTP/1.1 connection: write a request, read one answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def request(
        self, method: str, target: str, host: str, headers: str, body: bytes
    ) -> tuple[int, bytes]:
        self.writer.write(
            f"{method} {target} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {len(body)}\r\n"
            f"{headers}\r\n".encode()
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)


async def with_bare(base_url: str, data: bytes, chunks: int, offset: int) -> None:
    host = urlsplit(base_url).netloc
    todo = iter(range(offset, offset + chunks))
    auth = f"x-roark-api-key: {KEY}\r\nauthorization: Bearer {KEY}\r\ncontent-type: application/json\r\n"

    async def work() -> None:
        parts = urlsplit(base_url)
        conn = BareConnection(*await asyncio.open_connection(parts.hostname, parts.port))
        try:
            for n in todo:
                status, body = await conn.request(
                    "POST", MINT, host, auth + f"idempotency-key: b{n}\r\n", mint_body(n)
                )
                assert status == 200, (status, body)
                target = urlsplit(json.loads(body)["data"]["uploadUrl"])
                status, body = await conn.request(
                    "PUT",
                    target.path + ("?" + target.query if target.query else ""),
                    target.netloc,
                    "content-type: audio/pcm\r\n",
                    data,
                )
                assert status < 300, (status, body)
        finally:
            conn.writer.close()

    await asyncio.gather(*(work() for _ in range(CONCURRENCY)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=800)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    data = os.urandom(256 << 10)
    with tempfile.TemporaryDirectory(prefix="exp-http-cost-") as tmp:
        server, base_url = spawn(Path(tmp) / "devserver")
        try:
            offset = 0
            for round_ in range(args.rounds):
                for name, run in (
                    ("httpx", with_httpx),
                    ("aiohttp", with_aiohttp),
                    ("bare", with_bare),
                ):
                    cpu, wall = time.thread_time(), time.perf_counter()
                    asyncio.run(run(base_url, data, args.chunks, offset))
                    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
                    offset += args.chunks
                    print(
                        f"round {round_ + 1} {name}: loop CPU {cpu / args.chunks * 1e3:.2f} ms"
                        f" per chunk (mint + PUT), wall {wall:.2f} s",
                        flush=True,
                    )
        finally:
            server.terminate()
            server.wait(30)
    sys.exit(0)


if __name__ == "__main__":
    main()
