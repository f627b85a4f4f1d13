"""What stays on disk: delivered audio leaves once Roark has the whole call (unless kept),
rows stay for retention, and `pipecat-roark forget` erases one call on request."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from pathlib import Path

import pytest

from devserver_fixture import RunningDevServer, running_dev_server
from pipecat_roark.background_drainer import stop_background_drainers
from pipecat_roark.drain import Drainer
from pipecat_roark.observer import RoarkObserver
from pipecat_roark.testing import ScriptedCall, run_pipeline
from test_cli import cli, cli_json, sql
from test_drain import KEY, QUICK, chunk_files, chunk_rows, record, short_script
from test_drain_processes import kill_bot_mid_call

pytestmark = pytest.mark.anyio


def discarded(directory: Path, call_id: str) -> list[bool]:
    return [
        bool(flag)
        for (flag,) in sql(
            directory,
            "SELECT discarded_at IS NOT NULL FROM chunks WHERE call_id = ? ORDER BY idx",
            call_id,
        )
    ]


async def test_delivered_audio_leaves_the_disk_and_the_rows_stay(
    data_dir: Path, dev_server: RunningDevServer, tmp_path: Path
) -> None:
    await record(data_dir, "gone", 0)
    rows = chunk_rows(data_dir, "gone")
    report = await Drainer(data_dir, KEY, dev_server.base_url, QUICK).run_once()
    assert report.complete, str(report)

    assert not (data_dir / "chunks" / "gone").exists()
    assert discarded(data_dir, "gone") == [True] * len(rows)
    assert chunk_rows(data_dir, "gone") == rows, "the rows stay until retention"
    assert {c["sha256"] for c in dev_server.call("gone")["chunks"].values()} == {
        sha for _, sha in rows
    }
    status = cli_json(data_dir, "status")
    assert (status["chunkBytes"], status["undeliveredChunkBytes"]) == (0, 0)
    assert [(c["id"], c["state"]) for c in cli_json(data_dir, "calls")] == [("gone", "delivered")]

    exported = cli(data_dir, "export", "gone", "--wav", str(tmp_path / "gone.wav"))
    assert exported.returncode == 1
    assert exported.stderr.strip().endswith(
        "it was deleted once Roark had the call (keep it with keep_delivered_audio=True or "
        "`drain --keep-delivered-audio`)"
    )


async def test_kept_audio_stays_byte_for_byte(data_dir: Path, dev_server: RunningDevServer) -> None:
    await record(data_dir, "kept", 0)
    files = chunk_files(data_dir, "kept")
    keep = dataclasses.replace(QUICK, keep_delivered_audio=True)
    assert (await Drainer(data_dir, KEY, dev_server.base_url, keep).run_once()).complete
    assert chunk_files(data_dir, "kept") == files
    assert discarded(data_dir, "kept") == [False] * len(files)
    assert dev_server.recording("kept")[44:] == b"".join(files)


async def test_a_call_with_a_dead_row_keeps_its_audio_until_it_is_whole(
    data_dir: Path, tmp_path: Path
) -> None:
    await record(data_dir, "half", 0)
    files = chunk_files(data_dir, "half")
    with running_dev_server(tmp_path, status_sequence=[400]) as server:  # call-started refused
        report = await Drainer(data_dir, KEY, server.base_url, QUICK).run_once()
        assert report.dead_total == 1
        assert chunk_files(data_dir, "half") == files, "not whole at Roark: the audio stays"

        assert cli_json(data_dir, "retry", "--dead") == {"retried": 1}
        assert (await Drainer(data_dir, KEY, server.base_url, QUICK).run_once()).complete
        assert not (data_dir / "chunks" / "half").exists()
        assert discarded(data_dir, "half") == [True] * len(files)


async def test_the_bots_own_drainer_deletes_or_keeps_as_the_observer_says(
    tmp_path: Path, dev_server: RunningDevServer
) -> None:
    async def one_call(directory: Path, call_id: str, keep: bool) -> list[bytes]:
        emitted: list[bytes] = []
        roark = RoarkObserver(
            agent_id="disk",
            api_key=KEY,
            base_url=dev_server.base_url,
            pipecat_call_id=call_id,
            data_dir=directory,
            chunk_bytes=8000,
            keep_delivered_audio=keep,
        )

        async def keep_bytes(_processor: object, audio: bytes, *_: object) -> None:
            emitted.append(bytes(audio))

        roark.audio_processor.add_event_handler("on_audio_data", keep_bytes)
        try:
            await run_pipeline(
                [ScriptedCall(short_script(0)), roark.audio_processor], observers=[roark]
            )
            for _ in range(600):  # bounded: the drainer runs in this loop
                if all(s == "delivered" for (s,) in sql(directory, "SELECT state FROM deliveries")):
                    break
                await asyncio.sleep(0.05)
        finally:
            await stop_background_drainers(5)
        return emitted

    kept_dir, gone_dir = tmp_path / "kept", tmp_path / "gone"
    kept_audio = await one_call(kept_dir, "bot-kept", keep=True)
    gone_audio = await one_call(gone_dir, "bot-gone", keep=False)

    assert chunk_files(kept_dir, "bot-kept") == kept_audio
    assert dev_server.recording("bot-kept")[44:] == b"".join(kept_audio)
    assert not (gone_dir / "chunks" / "bot-gone").exists()
    assert [sha for _, sha in chunk_rows(gone_dir, "bot-gone")] == [
        hashlib.sha256(a).hexdigest() for a in gone_audio
    ]
    assert dev_server.recording("bot-gone")[44:] == b"".join(gone_audio)


async def test_forget_erases_one_call_delivered_or_not_and_nothing_else(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    await record(data_dir, "erase-me", 0)
    await record(data_dir, "keep-me", 1)
    kept_files = chunk_files(data_dir, "keep-me")
    kept_rows = {
        table: sql(data_dir, f"SELECT count(*) FROM {table} WHERE call_id = 'keep-me'")[0][0]
        for table in ("events", "chunks", "deliveries")
    }
    erased_rows = 1 + sum(
        sql(data_dir, f"SELECT count(*) FROM {table} WHERE call_id = 'erase-me'")[0][0]
        for table in ("events", "chunks", "deliveries")
    )
    erased_bytes = sum(size for size, _ in chunk_rows(data_dir, "erase-me"))

    no_tty = cli(data_dir, "forget", "erase-me")
    assert no_tty.returncode == 2
    assert no_tty.stderr.strip() == (
        "error: forget erases call 'erase-me' for good: pass --yes to confirm"
    )
    assert (data_dir / "chunks" / "erase-me").is_dir(), "nothing erased without confirmation"

    assert cli_json(data_dir, "forget", "erase-me", "--yes") == {
        "forgotten": "erase-me",
        "state": "ended",
        "rows": erased_rows,
        "bytes": erased_bytes,
    }
    assert not (data_dir / "chunks" / "erase-me").exists()
    for table in ("calls", "events", "chunks", "deliveries"):
        column = "id" if table == "calls" else "call_id"
        assert sql(data_dir, f"SELECT count(*) FROM {table} WHERE {column} = 'erase-me'") == [(0,)]
    assert chunk_files(data_dir, "keep-me") == kept_files
    assert {
        table: sql(data_dir, f"SELECT count(*) FROM {table} WHERE call_id = 'keep-me'")[0][0]
        for table in ("events", "chunks", "deliveries")
    } == kept_rows

    again = cli(data_dir, "forget", "erase-me", "--yes")
    assert again.returncode == 2
    assert "no call 'erase-me'" in again.stderr

    # What is left still delivers whole.
    done = cli(data_dir, "drain", base_url=dev_server.base_url)
    assert done.returncode == 0, done.stderr
    assert [c["pipecatCallId"] for c in dev_server.calls()] == ["keep-me"]


async def test_forget_refuses_an_open_call_unless_forced(data_dir: Path) -> None:
    kill_bot_mid_call(data_dir, "open-1", chunk_bytes=8000)
    refused = cli(data_dir, "forget", "open-1", "--yes")
    assert refused.returncode == 2
    assert "still open" in refused.stderr and "--force" in refused.stderr
    assert sql(data_dir, "SELECT state FROM calls") == [("open",)]

    forced = cli_json(data_dir, "forget", "open-1", "--yes", "--force")
    assert (forced["forgotten"], forced["state"]) == ("open-1", "open")
    assert sql(data_dir, "SELECT count(*) FROM calls") == [(0,)]
    assert not (data_dir / "chunks" / "open-1").exists()
